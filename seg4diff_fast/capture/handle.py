"""``register()`` / ``capture_attention()``: install capture processors on chosen layers of a diffusers transformer.

Only the chosen layers change: their attention module's ``processor`` is replaced (``set_processor``) by the
family's capture processor, which computes the same output through the fused kernel and records the maps.
Every other layer keeps its processor (and its attention backend). ``handle.remove()`` puts back the very
processor objects that were there.

Per forward, a forward pre-hook on the transformer (``register_forward_pre_hook(with_kwargs=True)``) reads
the text length (``encoder_hidden_states.shape[1]``: single-stream processors are never told it), the image
grid and the batch size into ``handle.context`` (a :class:`~seg4diff_fast.capture.base.ForwardContext`), and
decides which batch rows to record:

- ``batch="cond"``: under a pipeline whose ``do_classifier_free_guidance`` is true and whose family batches CFG
  (SD3: ``[uncond, cond]``), the second half; a forward inside ``transformer.cache_context("uncond")`` (Flux's
  true-CFG pass) or ``"pred_uncond"`` (diffusers' guiders) is not recorded and is not a step, and neither is a
  forward that evaluates the very latents tensor of the last forward that was a step, under other
  conditioning: the unconditional pass of the
  pipelines that run guidance as a second forward, conditional first, outside any ``cache_context``
  (ChromaPipeline, FluxKontextPipeline, Flux img2img / inpaint / ControlNet, Lumina2Pipeline, Krea2Pipeline,
  GlmImagePipeline, JoyImageEditPipeline, NucleusMoEImagePipeline, FramePack, ...: ``CaptureHandle._second_pass``;
  under torch.compile ``base._second_pass_at_run_time``); otherwise the whole batch.
- ``batch="all"``: every row; explicit indices: those rows of the transformer batch.

Under any policy, a forward during which the transformer has the attribute ``COMPANION_FORWARD`` set true (the
companion forward of perturbed-I2T guidance, :mod:`seg4diff_fast.guidance`) is not recorded and is not a step.

To see ``cache_context("uncond")``, the transformer's ``cache_context`` method is wrapped by an instance
attribute (shared by all handles on that transformer, deleted when the last one is removed).
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch

from .base import SKIP, CaptureSite, ForwardContext, LayerSpec, eager_when_called_by_torch
from .dispatch import InterceptingProcessor
from .families import FAMILIES, Family
from .families.sd3 import SD3CaptureProcessor
from .refusals import check_transformer, module_dicts
from .store import AttentionStore

__all__ = ["register", "capture_attention", "CaptureHandle", "ADAPTERS", "layer_names"]

ADAPTERS: List[Family] = list(FAMILIES)  # every family record (capture/families/)
COMPANION_FORWARD = "_seg4diff_companion_forward"  # transformer attribute: this forward is not a step
_CAPTURE_PROCESSORS = (SD3CaptureProcessor, InterceptingProcessor)
# cache_context names of unconditional forwards: the pipelines' true CFG ("uncond"), diffusers' guiders
# (ClassifierFreeGuidance's identifier "pred_uncond": HunyuanImage, HunyuanVideo 1.5)
_UNCOND_CONTEXTS = ("uncond", "pred_uncond")


def _set_processor(attn: torch.nn.Module, processor) -> None:
    """``attn.set_processor(processor)``; an attention module without that method (Mochi's ``MochiAttention``)
    holds its processor in a plain ``processor`` attribute."""
    if hasattr(attn, "set_processor"):
        attn.set_processor(processor)
    else:
        attn.processor = processor


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "_orig_mod", module)  # torch.compile's OptimizedModule


def _find_transformer(pipe_or_transformer):
    """``(transformer, pipe or None)``."""
    if isinstance(pipe_or_transformer, torch.nn.Module):
        return _unwrap(pipe_or_transformer), None
    transformer = getattr(pipe_or_transformer, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return _unwrap(transformer), pipe_or_transformer
    raise TypeError(
        f"register() needs a diffusers pipeline with a .transformer or a transformer module, got "
        f"{type(pipe_or_transformer).__name__}"
    )


def _adapter_for(transformer) -> Family:
    known = []
    for adapter in ADAPTERS:
        classes = adapter.transformer_classes()
        if isinstance(transformer, classes):
            return adapter
        known += [c.__name__ for c in classes]
    name = type(transformer).__name__
    raise TypeError(
        f"capture does not know {name}; supported transformers: {', '.join(known)} (the table in "
        "seg4diff_fast/capture/README.md lists every diffusers transformer)"
    )


def layer_names(pipe_or_transformer) -> List[str]:
    """The capturable layer names of a model, in block order (integer ``i`` names the ``i``-th)."""
    transformer, _ = _find_transformer(pipe_or_transformer)
    return [s.name for s in _adapter_for(transformer).layers(transformer)]


def _resolve_layers(adapter: Family, transformer, layers) -> List[LayerSpec]:
    specs = adapter.layers(transformer)
    by_name: Dict[str, LayerSpec] = {s.name: s for s in specs}
    image_only = adapter.not_capturable(transformer)
    if isinstance(layers, (int, str)):
        layers = [layers]
    chosen: List[LayerSpec] = []
    for layer in layers:
        name = layer
        if isinstance(layer, int) and not isinstance(layer, bool):
            if not 0 <= layer < len(specs):
                raise ValueError(
                    f"layer {layer} is out of range for {type(transformer).__name__}: integers 0..{len(specs) - 1} "
                    f"name {specs[0].name} .. {specs[-1].name}"
                )
            name = adapter.index_to_name(transformer, layer)
        elif not isinstance(layer, str):
            raise TypeError(f"a layer is a module path or an int, got {layer!r}")
        if name in image_only:
            raise ValueError(f"layer {name!r}: {image_only[name]}")
        if name.endswith(".attn") and name[: -len(".attn")] in by_name:
            name = name[: -len(".attn")]
        if name not in by_name:
            raise ValueError(
                f"unknown layer {layer!r} for {type(transformer).__name__}; valid layers: "
                f"{', '.join(by_name)} (or their index 0..{len(specs) - 1})"
            )
        if any(s.name == name for s in chosen):
            raise ValueError(f"layer {name!r} is given twice")
        chosen.append(by_name[name])
    if not chosen:
        raise ValueError("no layers given")
    return chosen


class _CacheContextProbe:
    """Knows the name of the transformer's current ``cache_context`` ("cond" / "uncond"): diffusers hands it
    only to its own stateful hooks, so the transformer's ``cache_context`` method is wrapped by an instance
    attribute (one per transformer, shared by all handles, deleted when the last handle is removed)."""

    ATTR = "_seg4diff_cache_context"  # [name or None, number of handles]

    @classmethod
    def attach(cls, transformer) -> None:
        state = vars(transformer).get(cls.ATTR)
        if state is not None:
            state[1] += 1
            return
        if not hasattr(transformer, "cache_context"):
            return
        state = [None, 1]
        original = transformer.cache_context

        @contextlib.contextmanager
        def cache_context(name: str, **kwargs):
            outer, state[0] = state[0], name
            try:
                with original(name, **kwargs):
                    yield
            finally:
                state[0] = outer

        transformer.cache_context = cache_context
        setattr(transformer, cls.ATTR, state)

    @classmethod
    def detach(cls, transformer) -> None:
        state = vars(transformer).get(cls.ATTR)
        if state is None:
            return
        state[1] -= 1
        if state[1] == 0:
            del transformer.cache_context
            delattr(transformer, cls.ATTR)

    @classmethod
    def current(cls, transformer) -> Optional[str]:
        state = getattr(transformer, cls.ATTR, None)  # getattr, not vars(): this runs in the traced forward
        return None if state is None else state[0]


class CaptureHandle:
    """What :func:`register` returns: ``store``, ``layers`` (names), ``context`` (the current forward's
    :class:`ForwardContext`), and ``remove()`` (also on leaving a ``with`` block)."""

    def __init__(self, transformer, pipe, store: AttentionStore, adapter: Family, specs: List[LayerSpec]):
        self.transformer = transformer
        self.pipe = pipe
        self.store = store
        self.adapter = adapter
        self.layers = [s.name for s in specs]
        self.context = ForwardContext()
        self._old: Dict[str, object] = {}  # layer -> the processor before register()
        self._specs = specs
        self._params = list(inspect.signature(type(transformer).forward).parameters)[1:]  # without self
        self._hook = None
        self._removed = False
        self._step_tensors = None  # weak references to the last step's (latents, conditioning): _second_pass
        self._module_dicts = module_dicts(transformer)  # where a cache enabled after register() puts its hooks

    # -- installation
    def _install(self) -> None:
        for spec in self._specs:  # check everything before changing anything
            if isinstance(spec.attn.processor, _CAPTURE_PROCESSORS):
                raise ValueError(f"layer {spec.name!r} already has a capture registered; remove that handle first")
        new = {s.name: self.adapter.make_processor(s, CaptureSite(self, s.name), s.attn.processor) for s in self._specs}
        for spec in self._specs:
            self._old[spec.name] = spec.attn.processor
            _set_processor(spec.attn, new[spec.name])
        self._hook = self.transformer.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        _CacheContextProbe.attach(self.transformer)


    # -- per forward
    def _pre_forward(self, module, args, kwargs):
        self._check_processors()
        check_transformer(module, self._module_dicts, registered=True)  # a cache or parallelism added after register()
        bound = dict(zip(self._params, args))
        bound.update(kwargs)
        text_len, grid, batch_size = self.adapter.read_forward(module, bound)
        self._check_text_index(text_len)
        rows = self._rows(bound, batch_size)
        x, c = self._pass_tensors(bound)
        compiling = torch.compiler.is_compiling()
        if rows != SKIP and not compiling:  # a step: what _second_pass compares the next forwards with (weakly)
            self._step_tensors = None if x is None or c is None else (weakref.ref(x), weakref.ref(c))
        compiled_cond = compiling and self.store.batch == "cond" and rows != SKIP and x is not None and c is not None
        self.context = ForwardContext(
            text_len=text_len, grid=grid, rows=rows,
            # under torch.compile the second-pass check runs in the record_maps op (base._second_pass_at_run_time)
            pass_tensors=[x, c] if compiled_cond else None,
            # HiDream calls it timesteps, Z-Image t
            timestep=bound.get("timestep", bound.get("timesteps", bound.get("t"))),
        )
        return None

    def _check_processors(self) -> None:
        """Refuse a forward whose captured layers lost their capture processor since register() (replaced by
        ``set_attn_processor``, ``fuse_qkv_projections``, an IP-adapter loader ...): it would record nothing."""
        for spec in self._specs:
            # a capture processor of any handle counts as ours: guidance's companion forward swaps in its own
            # (perturbing) capture processors for one forward
            if not isinstance(spec.attn.processor, _CAPTURE_PROCESSORS):
                raise RuntimeError(
                    f"capture of {spec.name!r} was dropped: its processor was replaced by "
                    f"{type(spec.attn.processor).__name__} after register() (set_attn_processor, "
                    "fuse_qkv_projections, load_ip_adapter, ... replace every processor). Call handle.remove(), "
                    "make the change, then register() again"
                )

    def _check_text_index(self, text_len: Optional[int]) -> None:
        top = self.store._text_index_max  # a Python int: nothing for the compiled graph to read
        if top is not None and text_len is not None and top >= text_len:
            raise ValueError(
                f"text_index has position {top}, but this forward's text block has {text_len} tokens "
                f"(encoder_hidden_states.shape[1]): text_index positions must be < {text_len}"
            )

    @staticmethod
    def _pass_tensors(bound: dict):
        """The forward's latents (``hidden_states``; Z-Image: ``x``) and conditioning (``encoder_hidden_states``)
        tensors, each None where the forward has no such tensor."""
        x, c = bound.get("hidden_states", bound.get("x")), bound.get("encoder_hidden_states")
        return (x if isinstance(x, torch.Tensor) else None), (c if isinstance(c, torch.Tensor) else None)

    def _second_pass(self, bound: dict) -> bool:
        """Whether this forward evaluates the very latents tensor that the last forward recorded as a step
        evaluated, under other conditioning (another ``encoder_hidden_states`` tensor): the unconditional pass of
        a pipeline that runs classifier-free guidance as a second forward outside any ``cache_context``. Every such
        pipeline of diffusers 0.42 runs the conditional forward first and passes the same latents object to both,
        with ``negative_prompt_embeds``; a new step, a second-order scheduler's second evaluation or the next image
        get a new latents tensor, a repeated call (same latents, same conditioning) is a step, and a forward that
        is not a step (a guider's ``pred_uncond`` run first, guidance's companion) is never compared with.
        Identity, not values: no device sync. Under torch.compile the pre-hook is traced and a tensor's identity is
        not a graph value: the ``record_maps`` op decides at run time (``base._second_pass_at_run_time``)."""
        x, c = self._pass_tensors(bound)
        if torch.compiler.is_compiling() or x is None or c is None or self._step_tensors is None:
            return False
        step_x, step_c = (r() for r in self._step_tensors)
        return step_x is x and step_c is not c

    def _rows(self, bound: dict, batch_size: int):
        second_pass = self._second_pass(bound)
        if self.adapter.skip_forward(bound) or getattr(self.transformer, COMPANION_FORWARD, False):
            return SKIP
        batch = self.store.batch
        if batch == "all":
            return None
        if batch != "cond":
            if max(batch) >= batch_size or min(batch) < -batch_size:
                raise IndexError(f"store batch indices {batch} out of range for a transformer batch of {batch_size}")
            return batch
        if _CacheContextProbe.current(self.transformer) in _UNCOND_CONTEXTS or second_pass:
            return SKIP
        cfg = self.pipe is not None and bool(getattr(self.pipe, "do_classifier_free_guidance", False))
        if cfg and self.adapter.cfg_batched:
            return slice(batch_size // 2, batch_size)  # [uncond, cond]
        return None

    # -- removal
    def remove(self) -> None:
        """Put back exactly the processor objects that were there; remove the hook and the wrapper."""
        if self._removed:
            return
        for spec in self._specs:
            if not isinstance(spec.attn.processor, _CAPTURE_PROCESSORS):
                warnings.warn(
                    f"the processor of {spec.name!r} was replaced while the capture was registered (e.g. by "
                    "set_attn_processor or fuse_qkv_projections); restoring the one from before register()"
                )
            _set_processor(spec.attn, self._old[spec.name])
        if self._hook is not None:
            self._hook.remove()
        _CacheContextProbe.detach(self.transformer)
        self._removed = True

    def __enter__(self) -> "CaptureHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "active"
        return f"CaptureHandle({type(self.transformer).__name__}, layers={self.layers}, {state})"


eager_when_called_by_torch(CaptureHandle._pre_forward)  # one graph per forward (base.ForwardContext)


def register(
    pipe_or_transformer,
    layers: Union[int, str, Iterable[Union[int, str]]],
    store: Optional[AttentionStore] = None,
    **store_options,
) -> CaptureHandle:
    """Capture the text-image attention of ``layers`` into ``store`` (a new ``AttentionStore(**store_options)``
    if not given) while the pipeline or transformer runs as usual.

    ``layers``: module paths (``"transformer_blocks.9"``, ``"single_transformer_blocks.3"``) or block indices
    (Flux: double-stream blocks first, then single-stream block ``j`` as ``num_layers + j``).
    Returns a :class:`CaptureHandle`; ``handle.remove()`` restores the processors.
    """
    transformer, pipe = _find_transformer(pipe_or_transformer)
    adapter: Family = _adapter_for(transformer)
    check_transformer(transformer)  # parallelism, block-skipping caches
    if store is None:
        store = AttentionStore(**store_options)
    elif store_options:
        raise TypeError(f"give either a store or store options, not both (got {sorted(store_options)})")
    elif not isinstance(store, AttentionStore):
        raise TypeError(f"store must be an AttentionStore, got {type(store).__name__}")
    if store.loaded:
        raise ValueError(
            "this AttentionStore was loaded from a file (AttentionStore.load) and is read-only: register a new "
            "AttentionStore(...) to capture"
        )
    specs = _resolve_layers(adapter, transformer, layers)
    store.model_class = type(transformer).__name__
    handle = CaptureHandle(transformer, pipe, store, adapter, specs)
    handle._install()
    return handle


@contextlib.contextmanager
def capture_attention(pipe_or_transformer, layers, store: Optional[AttentionStore] = None, **store_options):
    """``with capture_attention(pipe, layers=[9], capture="i2t") as store: pipe(prompt)``: :func:`register` for the
    duration of the block; yields the store."""
    handle = register(pipe_or_transformer, layers, store=store, **store_options)
    try:
        yield handle.store
    finally:
        handle.remove()
