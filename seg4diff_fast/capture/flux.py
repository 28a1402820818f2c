"""Flux.1 adapter: ``FluxTransformer2DModel`` (Flux.1 dev / schnell / Kontext) with ``FluxAttnProcessor``.

Joint sequence ``[text, image]`` (q, k, v after QK-norm and RoPE on the joint sequence), captured at the
processor's ``dispatch_attention_fn`` call (:mod:`seg4diff_fast.capture.dispatch`). Layers:
``transformer_blocks.{i}`` (double-stream, text comes as ``encoder_hidden_states``) and
``single_transformer_blocks.{j}`` (single-stream: the block concatenates ``[text, image]`` before the processor,
which is never told the text length). Integer layers follow Seg4Diff: double-stream blocks ``0 .. D-1``, then
single-stream block ``j`` is ``D + j`` (``D = 19`` for Flux.1-dev).

Text length: the forward pre-hook of the transformer reads ``encoder_hidden_states.shape[1]`` (checked against
``txt_ids``) into the handle's :class:`~seg4diff_fast.capture.base.ForwardContext`. Grid: from ``img_ids``
(row, column of each packed 2x2 patch): the ids cross the ``record_maps`` op and the store computes the grid
when read. Kontext appends the reference image's tokens after the generated image's (``img_ids`` column 0 = 1 for them): the grid is the generated image's, and the
store keeps only its rows (the first ``h * w`` image tokens).
"""
from __future__ import annotations

from typing import List

from .base import LayerSpec
from .dispatch import DispatchAdapter

__all__ = ["FluxAdapter"]


class FluxAdapter(DispatchAdapter):
    family = "flux"
    cfg_batched = False  # FluxPipeline's true CFG is a second forward inside cache_context("uncond")
    text_at = "start"

    @classmethod
    def transformer_classes(cls):
        from diffusers import FluxTransformer2DModel

        return (FluxTransformer2DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        return (FluxAttnProcessor,)

    @classmethod
    def layers(cls, transformer) -> List[LayerSpec]:
        double = [LayerSpec(f"transformer_blocks.{i}", b.attn, "joint") for i, b in enumerate(transformer.transformer_blocks)]
        single = [
            LayerSpec(f"single_transformer_blocks.{j}", b.attn, "single")
            for j, b in enumerate(transformer.single_transformer_blocks)
        ]
        return double + single

    @classmethod
    def index_to_name(cls, transformer, index: int) -> str:
        n_double = len(transformer.transformer_blocks)
        if index < n_double:
            return f"transformer_blocks.{index}"
        return f"single_transformer_blocks.{index - n_double}"

    @classmethod
    def read_forward(cls, transformer, bound: dict):
        hidden_states = bound["hidden_states"]  # [B, N_img, C] packed latent
        encoder_hidden_states = bound.get("encoder_hidden_states")
        txt_ids, img_ids = bound.get("txt_ids"), bound.get("img_ids")
        text_len = None if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        if text_len is not None and txt_ids is not None and txt_ids.shape[-2] != text_len:
            raise ValueError(f"txt_ids has {txt_ids.shape[-2]} positions but encoder_hidden_states {text_len} tokens")
        return text_len, img_ids, hidden_states.shape[0]  # the store computes the grid from img_ids when read
