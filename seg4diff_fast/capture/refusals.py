"""What ``register`` refuses, and why ("never silently wrong"). (Attention masks that capture cannot reproduce are
refused at the attention call: ``dispatch._key_mask``.)

- Context or tensor parallelism (``transformer.enable_parallelism``): each rank holds a shard of the sequence
  or of the heads, so one rank's maps are not the model's.
- diffusers hooks that skip blocks or reuse their outputs across steps (first-block cache, MagCache,
  TaylorSeer, FasterCache, pyramid attention broadcast, SeaCache, layer skip, text KV cache ...): on a step
  they skip, the captured layer's attention does not run (or runs on stale inputs), so the maps would mix
  steps silently. Only hooks known to leave every block's computation as it is are allowed.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

__all__ = ["check_transformer"]

# diffusers hook names (HookRegistry, module._diffusers_hook) that leave every block's computation as it is
_HARMLESS_HOOKS = (
    "layerwise_casting", "peft_autocast_disable", "group_offloading", "layer_execution_tracker",
    "lazy_prefetch_group_offloading", "lazy_leafs",
)


def module_dicts(transformer: torch.nn.Module) -> List[dict]:
    """The ``__dict__`` of the transformer and of each of its submodules (where diffusers puts a module's hook
    registry, ``_diffusers_hook``): listed once at ``register``, looked through at every forward."""
    return [vars(m) for m in transformer.modules()]


def _hook_names(transformer: torch.nn.Module, dicts: Optional[Sequence[dict]] = None) -> List[str]:
    """``"module path: hook name"`` of every diffusers hook on the transformer or its submodules that may skip or
    reuse blocks. ``dicts``: :func:`module_dicts` (None: walk the model). At every forward of a registered capture a
    look through that list comes first (0.14 ms for Flux.1-dev's 1279 modules on a busy CPU, where walking the model
    takes 8 ms), the paths only when there is something to name."""
    dicts = module_dicts(transformer) if dicts is None else dicts
    if not any(not name.startswith(_HARMLESS_HOOKS)
               for registry in [d["_diffusers_hook"] for d in dicts if "_diffusers_hook" in d]
               for name in getattr(registry, "hooks", ())):
        return []
    found = []
    for path, module in transformer.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        for name in getattr(registry, "hooks", {}):
            found.append((path or "<transformer>", name))
    return [f"{path}: {name}" for path, name in found if not name.startswith(_HARMLESS_HOOKS)]


def check_transformer(transformer: torch.nn.Module, dicts: Optional[Sequence[dict]] = None,
                      registered: bool = False) -> None:
    """Raise if the transformer runs parallelism or block-skipping / -reusing hooks: at ``register`` (before
    anything changes) and, ``registered=True``, at every forward of a registered capture (enabled after
    ``register()``: the forward is refused before it runs; ``dicts``: :func:`module_dicts`, made once)."""
    after = " after register() (call handle.remove(), undo it, register again)" if registered else ""
    if getattr(transformer, "_parallel_config", None) is not None:
        raise ValueError(
            f"capture refuses a {type(transformer).__name__} with context or tensor parallelism enabled{after} "
            "(enable_parallelism): each rank sees a shard of the sequence or of the heads, so its maps are not the "
            "model's; capture on a single device"
        )
    hooks = _hook_names(transformer, dicts)
    if hooks:
        raise ValueError(
            f"capture refuses a {type(transformer).__name__} with diffusers hooks that may skip blocks or reuse their "
            f"outputs across steps ({', '.join(hooks)}){after}: on a skipped step the captured attention does not "
            "run, so the maps would mix steps; disable the cache (e.g. transformer.disable_cache()) for the captured "
            "run"
        )
