"""Flux.1 adapter: ``FluxTransformer2DModel`` with ``FluxAttention`` + ``FluxAttnProcessor``.

Joint sequence ``[text, image]``; q, k, v ``[B, N, H, D]``; per-head RMS QK-norm; RoPE on the joint sequence.
Layers: ``transformer_blocks.{i}`` (double-stream, text comes as ``encoder_hidden_states``) and
``single_transformer_blocks.{j}`` (single-stream: the block concatenates ``[text, image]`` before the processor,
which is never told the text length). Integer layers follow Seg4Diff: double-stream blocks ``0 .. D-1``, then
single-stream block ``j`` is ``D + j`` (``D = 19`` for Flux.1-dev).

Text length: the forward pre-hook of the transformer reads ``encoder_hidden_states.shape[1]`` (checked against
``txt_ids``) into the handle's :class:`~seg4diff_fast.capture.base.ForwardContext`; single-stream processors
read it from there. Grid: from ``img_ids`` (row, column of each packed 2x2 patch), computed when read.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .base import CaptureSite, FamilyAdapter, LayerSpec, check_old_processor, no_direct_construction

__all__ = ["FluxCaptureProcessor", "FluxAdapter"]


class FluxCaptureProcessor:
    """``FluxAttnProcessor`` (double- and single-stream) whose attention is :func:`joint_attention`."""

    def __init__(self, site: Optional[CaptureSite] = None):
        if site is None:
            no_direct_construction(self)
        self.site = site

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        if attention_mask is not None:
            raise ValueError(f"capture on {self.site.name!r}: attention masks are not supported by joint_attention")
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        # [B, N, H, D]
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:  # double-stream: text comes separately
            if encoder_hidden_states is None:
                raise ValueError(f"capture on {self.site.name!r}: this attention got no text (encoder_hidden_states is None)")
            text_len = encoder_hidden_states.shape[1]
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        else:  # single-stream: [text, image] already
            text_len = self.site.text_len()

        hidden_states = self.site.attention_text_first(query, key, value, text_len, image_rotary_emb)  # [B, N, H*D]

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [text_len, hidden_states.shape[1] - text_len], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


class FluxAdapter(FamilyAdapter):
    family = "flux"
    cfg_batched = False  # FluxPipeline's true CFG is a second forward inside cache_context("uncond")

    @classmethod
    def transformer_classes(cls):
        from diffusers import FluxTransformer2DModel

        return (FluxTransformer2DModel,)

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
    def make_processor(cls, spec: LayerSpec, site: CaptureSite, old):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        check_old_processor(spec, old, (FluxAttnProcessor,))
        return FluxCaptureProcessor(site)

    @classmethod
    def read_forward(cls, transformer, bound: dict):
        hidden_states = bound["hidden_states"]  # [B, N_img, C] packed latent
        encoder_hidden_states = bound.get("encoder_hidden_states")
        txt_ids, img_ids = bound.get("txt_ids"), bound.get("img_ids")
        text_len = None if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        if text_len is not None and txt_ids is not None and txt_ids.shape[-2] != text_len:
            raise ValueError(f"txt_ids has {txt_ids.shape[-2]} positions but encoder_hidden_states {text_len} tokens")
        return text_len, img_ids, hidden_states.shape[0]  # the store computes the grid from img_ids when read
