"""Flux.2 adapter: ``Flux2Transformer2DModel``.

Double-stream blocks: ``Flux2Attention`` + ``Flux2AttnProcessor`` (as Flux.1). Single-stream blocks:
``Flux2ParallelSelfAttention`` + ``Flux2ParallelSelfAttnProcessor`` (one projection gives q, k, v and the MLP
input); the transformer concatenates ``[text, image]`` once before all single-stream blocks, so their
processors never see the text length: the forward pre-hook reads it from ``encoder_hidden_states.shape[1]``.
Both are captured at their ``dispatch_attention_fn`` call (:mod:`seg4diff_fast.capture.dispatch`). Layers,
integer indices and grid as in :mod:`seg4diff_fast.capture.flux` (``img_ids`` columns ``(t, h, w, l)``;
reference images come after the generated image with another ``t``: the store keeps the generated image's
rows only). The KV-cache processors (``Flux2KV*``) are refused.
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
    read_forward = FluxAdapter.read_forward
