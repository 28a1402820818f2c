"""Flux.2 adapter: ``Flux2Transformer2DModel``.

Double-stream blocks: ``Flux2Attention`` + ``Flux2AttnProcessor`` (as Flux.1). Single-stream blocks:
``Flux2ParallelSelfAttention`` + ``Flux2ParallelSelfAttnProcessor`` (one projection gives q, k, v and the MLP
input); the transformer concatenates ``[text, image]`` once before all single-stream blocks, so their
processors never see the text length: the forward pre-hook reads it from ``encoder_hidden_states.shape[1]``.
Both are captured at their ``dispatch_attention_fn`` call (:mod:`seg4diff_fast.capture.dispatch`). Layers,
integer indices and grid as in :mod:`seg4diff_fast.capture.flux` (``img_ids`` columns ``(t, h, w, l)``;
reference images come after the generated image with another ``t``: the store keeps the generated image's
rows only). The KV-cache processors (``Flux2KV*``) are refused, and so is a forward with ``kv_cache_mode="extract"``
and reference tokens (they come before the generated image there).
"""
from __future__ import annotations

from .base import LayerSpec
from .dispatch import DispatchAdapter
from .flux import FluxAdapter

__all__ = ["Flux2Adapter"]


class Flux2Adapter(DispatchAdapter):
    family = "flux2"
    cfg_batched = False  # Flux2Pipeline: guidance-distilled, one conditional forward per step
    text_at = "start"

    @classmethod
    def transformer_classes(cls):
        from diffusers import Flux2Transformer2DModel

        return (Flux2Transformer2DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor

        return (Flux2AttnProcessor,) if spec.kind == "joint" else (Flux2ParallelSelfAttnProcessor,)

    layers = FluxAdapter.layers
    index_to_name = FluxAdapter.index_to_name

    @classmethod
    def read_forward(cls, transformer, bound: dict):
        """As Flux.1's; a forward with ``kv_cache_mode="extract"`` and reference tokens is refused: its image part is
        ``[references, generated image]`` (the references first, unlike Flux2Pipeline's ``[generated, references]``),
        so the image rows and the grid the store reads would be the references'."""
        if bound.get("kv_cache_mode") == "extract" and bound.get("num_ref_tokens"):
            raise ValueError(
                f"capture on {type(transformer).__name__}: kv_cache_mode='extract' puts {bound['num_ref_tokens']} "
                "reference-image tokens before the generated image ([text, references, image]), so the image rows "
                "capture reads would not be the generated image's; capture forwards without the KV cache "
                "(kv_cache_mode=None, the reference tokens after the image as Flux2Pipeline puts them) or with "
                "kv_cache_mode='cached' only"
            )
        return FluxAdapter.read_forward.__func__(cls, transformer, bound)
