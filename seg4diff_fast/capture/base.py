"""What every model family shares: the per-forward context, the capture site of one layer, the adapter base.

A family adapter (``sd3.py``, ``flux.py``, ``flux2.py``, ``families.py``) knows its transformer class, the names
of its attention layers, where the text sits in the joint sequence and the image grid (SD3's also how its
processor projects/norms q, k, v; the others are intercepted at their attention call, ``dispatch.py``). Everything else (the store, the batch and step policy, the kernel call) is here, once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from ..attention import joint_attention

__all__ = ["ForwardContext", "CaptureSite", "FamilyAdapter", "LayerSpec", "SKIP"]

SKIP = "skip"  # ForwardContext.rows value: this forward is not a step (e.g. Flux's unconditional pass)


@dataclass
class ForwardContext:
    """What the transformer's forward pre-hook learns about the current forward, for the processors.

    text_len: text tokens of the joint sequence (``encoder_hidden_states.shape[1]``); single-stream
        processors are never told it by diffusers. grid: ``(h, w)`` of the image tokens, or a callable that
        computes it when read (Flux reads it from ``img_ids`` without a device sync during the forward).
    rows: batch rows to record: ``None`` (all), a ``slice``/tuple of indices, or ``SKIP``.
    timestep: the forward's ``timestep`` argument as given (``[B]`` tensor or number), or ``None``.
    """

    text_len: Optional[int] = None
    grid: Union[None, Tuple[int, ...], Callable[[], Tuple[int, ...]]] = None
    rows: Union[None, str, slice, Tuple[int, ...]] = None
    timestep: Union[None, float, torch.Tensor] = None


@dataclass
class LayerSpec:
    """One capturable attention layer: its name (a module path, e.g. ``"transformer_blocks.9"``), its
    attention module, and its kind (``"joint"``: text comes as ``encoder_hidden_states``; ``"single"``: text
    already concatenated in front of the image tokens)."""

    name: str
    attn: torch.nn.Module
    kind: str


class CaptureSite:
    """The state of one captured layer, shared by its processor: store, layer name, and the handle that
    holds the current :class:`ForwardContext`. ``attention`` runs the fused kernel and records the maps."""

    def __init__(self, handle, name: str):
        self.handle = handle
        self.name = name

    @property
    def store(self):
        return self.handle.store

    @property
    def context(self) -> ForwardContext:
        return self.handle.context

    def text_len(self) -> int:
        """Text length of the current forward, for single-stream layers (learnt by the pre-hook)."""
        text_len = self.context.text_len
        if text_len is None:
            raise RuntimeError(
                f"capture on {self.name!r}: the text length of this forward is unknown. A single-stream layer "
                "learns it from the transformer's forward (encoder_hidden_states.shape[1], read by a forward "
                "pre-hook); call the transformer, not the block on its own"
            )
        return text_len

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_slice: slice, scale: Optional[float] = None
    ) -> torch.Tensor:
        """``q, k, v``: ``[B, H, N, D]`` (views are fine); ``scale``: the softmax scale (``None``: ``D ** -0.5``).
        Returns ``out`` ``[B, H, N, D]``, equal to SDPA's."""
        store, ctx = self.store, self.context
        rows = ctx.rows
        capture = None if rows == SKIP else store.capture
        out, maps = joint_attention(
            q, k, v, text_slice, capture=capture, heads=store.heads, text_index=store._text_index(q.device),
            map_dtype=store.map_dtype, scale=scale, backend=store.backend,
        )
        if capture is not None:
            kept = {}
            for kind, m in (("i2t", maps.i2t), ("t2i", maps.t2i)):
                if m is not None:
                    kept[kind] = m if rows is None else m[rows if isinstance(rows, slice) else list(rows)]
            store._record(self.name, kept, ctx.grid, ctx.timestep)
        return out


class FamilyAdapter:
    """Model knowledge of one family. Subclasses fill in the class attributes and the methods below."""

    family: str = ""
    #: transformer classes (imported lazily by ``transformer_classes()``)
    cfg_batched: bool = False  # the family's pipelines batch [uncond, cond] in one forward (SD3)

    @classmethod
    def transformer_classes(cls) -> Tuple[type, ...]:
        raise NotImplementedError

    @classmethod
    def layers(cls, transformer) -> List[LayerSpec]:
        """Every capturable attention layer, in block order."""
        raise NotImplementedError

    @classmethod
    def not_capturable(cls, transformer) -> Dict[str, str]:
        """``{name: why}`` for attention layers that exist but carry no text (e.g. SD3.5's ``attn2``)."""
        return {}

    @classmethod
    def index_to_name(cls, transformer, index: int) -> str:
        raise NotImplementedError

    @classmethod
    def make_processor(cls, spec: LayerSpec, site: CaptureSite, old):
        """A capture processor for ``spec`` replacing ``old``; raises if ``old`` is a processor we do not
        replicate (IP-adapter, KV-cache ...)."""
        raise NotImplementedError

    @classmethod
    def read_forward(cls, transformer, bound: dict) -> Tuple[Optional[int], object, int]:
        """From the transformer's forward arguments (by name): ``(text_len, grid, batch_size)``."""
        raise NotImplementedError

    @classmethod
    def skip_forward(cls, bound: dict) -> bool:
        """Whether this forward is not a step (SD3's skip-layer-guidance pass)."""
        return False


def check_old_processor(spec: LayerSpec, old, allowed: Tuple[type, ...]) -> None:
    if type(old) not in allowed:
        raise ValueError(
            f"layer {spec.name!r} runs {type(old).__name__}; capture replicates only "
            f"{', '.join(c.__name__ for c in allowed)} (IP-adapter, KV-cache and other custom processors change "
            "the attention, so capture cannot stand in for them)"
        )


def ids_grid(ids: torch.Tensor) -> Callable[[], Tuple[int, int]]:
    """Grid of Flux-style position ids ``[N_img, C]`` (column 1 = row, column 2 = column of the patch), computed
    when read. Tokens sharing the first token's column 0 (the generated image; Kontext / reference images
    have another index there) make the grid."""

    def grid() -> Tuple[int, int]:
        i = ids[0] if ids.ndim == 3 else ids
        i = i[i[:, 0] == i[0, 0]]
        h = int(i[:, 1].max() - i[:, 1].min()) + 1
        w = int(i[:, 2].max() - i[:, 2].min()) + 1
        return h, w

    return grid
