"""Flux.2 adapter: ``Flux2Transformer2DModel``.

Double-stream blocks: ``Flux2Attention`` + ``Flux2AttnProcessor`` (as Flux.1). Single-stream blocks:
``Flux2ParallelSelfAttention`` + ``Flux2ParallelSelfAttnProcessor``, whose one ``to_qkv_mlp_proj`` gives q, k, v
and the MLP input, and whose ``to_out`` takes ``[attention, MLP]``; the transformer concatenates ``[text, image]``
once before all single-stream blocks, so their processors (and the blocks) never see the text length: the
forward pre-hook reads it from ``encoder_hidden_states.shape[1]``. Layers, integer indices and grid as in
:mod:`seg4diff_fast.capture.flux` (``img_ids`` columns ``(t, h, w, l)``).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .base import CaptureSite, FamilyAdapter, LayerSpec, check_old_processor, no_direct_construction
from .flux import FluxAdapter

__all__ = ["Flux2CaptureProcessor", "Flux2SingleCaptureProcessor", "Flux2Adapter"]


class Flux2CaptureProcessor:
    """``Flux2AttnProcessor`` (double-stream) whose attention is :func:`joint_attention`."""

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
        from diffusers.models.transformers.transformer_flux2 import _get_qkv_projections

        if encoder_hidden_states is None:
            raise ValueError(f"capture on {self.site.name!r}: this attention got no text (encoder_hidden_states is None)")
        if attention_mask is not None:
            raise ValueError(f"capture on {self.site.name!r}: attention masks are not supported by joint_attention")
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        # [B, N, H, D]
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
        encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
        encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
        text_len = encoder_hidden_states.shape[1]
        query = torch.cat([encoder_query, query], dim=1)
        key = torch.cat([encoder_key, key], dim=1)
        value = torch.cat([encoder_value, value], dim=1)
        hidden_states = self.site.attention_text_first(query, key, value, text_len, image_rotary_emb)  # [B, N, H*D]

        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [text_len, hidden_states.shape[1] - text_len], dim=1
        )
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states, encoder_hidden_states


class Flux2SingleCaptureProcessor:
    """``Flux2ParallelSelfAttnProcessor`` (single-stream) whose attention is :func:`joint_attention`."""

    def __init__(self, site: Optional[CaptureSite] = None):
        if site is None:
            no_direct_construction(self)
        self.site = site

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError(f"capture on {self.site.name!r}: attention masks are not supported by joint_attention")
        text_len = self.site.text_len()
        # one projection gives [q | k | v | MLP in], split by the global ratio as diffusers does
        hidden_states = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp_hidden_states = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
        query, key, value = qkv.chunk(3, dim=-1)
        # [B, N, H, D], N = text_len + N_img
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        hidden_states = self.site.attention_text_first(query, key, value, text_len, image_rotary_emb)  # [B, N, H*D]

        mlp_hidden_states = attn.mlp_act_fn(mlp_hidden_states)
        hidden_states = torch.cat([hidden_states, mlp_hidden_states], dim=-1)
        return attn.to_out(hidden_states)


class Flux2Adapter(FamilyAdapter):
    family = "flux2"
    cfg_batched = False  # Flux2Pipeline: guidance-distilled, one conditional forward per step

    @classmethod
    def transformer_classes(cls):
        from diffusers import Flux2Transformer2DModel

        return (Flux2Transformer2DModel,)

    layers = FluxAdapter.layers
    index_to_name = FluxAdapter.index_to_name
    read_forward = FluxAdapter.read_forward

    @classmethod
    def make_processor(cls, spec: LayerSpec, site: CaptureSite, old):
        from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor

        if spec.kind == "joint":
            check_old_processor(spec, old, (Flux2AttnProcessor,))
            return Flux2CaptureProcessor(site)
        check_old_processor(spec, old, (Flux2ParallelSelfAttnProcessor,))
        return Flux2SingleCaptureProcessor(site)
