"""SD3 / SD3.5: ``SD3Transformer2DModel`` with ``JointAttnProcessor2_0`` (or its fused variant), which calls SDPA
itself: captured by a processor of its own, :class:`SD3CaptureProcessor`.

Joint sequence ``[image, text]``; q, k, v ``[B, H, N, D]``; per-head RMS QK-norm when ``qk_norm`` is set
(SD3.5); no RoPE. Layers: ``transformer_blocks.{i}`` (their ``attn``). SD3.5's dual-attention blocks also have
an image-only ``attn2``: nothing to capture there. Grid: ``hidden_states.shape[-2:] // patch_size`` (the
conv patch embedding flattens the latent row-major).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..base import CaptureSite, LayerSpec, check_old_processor, no_direct_construction
from .record import Family, Layers, Segment, Tiny, latent_grid

__all__ = ["SD3CaptureProcessor", "SD3", "FAMILIES"]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows) -> torch.Tensor:
    """``JointAttnProcessor2_0``'s own attention call (``[B', H, N, D]``, no mask), for what capture does not record
    (``rows``: which batch rows q, k, v hold; nothing per row to follow them)."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)


class SD3CaptureProcessor:
    """``JointAttnProcessor2_0`` whose attention is :func:`joint_attention`, recording the text-image maps."""

    def __init__(self, site: Optional[CaptureSite] = None, fused: bool = False):
        if site is None:
            no_direct_construction(self)
        self.site = site
        self.fused = fused  # FusedJointAttnProcessor2_0 was there: projections come from to_qkv / to_added_qkv

    def __call__(
        self,
        attn,
        hidden_states: torch.FloatTensor,
        encoder_hidden_states: torch.FloatTensor = None,
        attention_mask: torch.FloatTensor | None = None,
        *args,
        **kwargs,
    ) -> torch.FloatTensor:
        if encoder_hidden_states is None:
            raise ValueError(f"capture on {self.site.name!r}: this attention got no text (encoder_hidden_states is None)")
        if attention_mask is not None:
            raise ValueError(f"capture on {self.site.name!r}: attention masks are not supported by joint_attention")
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        # `sample` projections: [B, N_img, H*D]
        if self.fused:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # `context` projections: [B, T, H*D]
        if self.fused:
            enc_q, enc_k, enc_v = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            enc_q = attn.add_q_proj(encoder_hidden_states)
            enc_k = attn.add_k_proj(encoder_hidden_states)
            enc_v = attn.add_v_proj(encoder_hidden_states)
        enc_q, enc_k, enc_v = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (enc_q, enc_k, enc_v))
        if attn.norm_added_q is not None:
            enc_q = attn.norm_added_q(enc_q)
        if attn.norm_added_k is not None:
            enc_k = attn.norm_added_k(enc_k)

        # joint sequence [image, text]: q, k, v [B, H, N_img + T, D]
        n_img = query.shape[2]
        query = torch.cat([query, enc_q], dim=2)
        key = torch.cat([key, enc_k], dim=2)
        value = torch.cat([value, enc_v], dim=2)
        hidden_states = self.site.attention(query, key, value, slice(n_img, query.shape[2]), original=_sdpa)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states, encoder_hidden_states = hidden_states[:, : residual.shape[1]], hidden_states[:, residual.shape[1] :]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        return hidden_states, encoder_hidden_states


def _processor(spec: LayerSpec, site: CaptureSite, old) -> SD3CaptureProcessor:
    from diffusers.models.attention_processor import FusedJointAttnProcessor2_0, JointAttnProcessor2_0

    check_old_processor(spec, old, (JointAttnProcessor2_0, FusedJointAttnProcessor2_0))
    return SD3CaptureProcessor(site, fused=isinstance(old, FusedJointAttnProcessor2_0))


def _read(transformer, bound: dict):
    hidden_states = bound["hidden_states"]  # [B, C, H, W] latent
    encoder_hidden_states = bound.get("encoder_hidden_states")
    text_len = None if encoder_hidden_states is None else encoder_hidden_states.shape[1]
    return text_len, latent_grid(transformer, hidden_states), hidden_states.shape[0]


def _attn2(transformer) -> Dict[str, str]:
    return {
        f"transformer_blocks.{i}.attn2": "SD3.5's dual-attention attn2 is image-only self-attention: no text to capture"
        for i, b in enumerate(transformer.transformer_blocks)
        if getattr(b, "attn2", None) is not None
    }


def _encode(pipe, prompts, protocol, device) -> dict:
    """Segmentation's prompt encoding: the paper loads SD3 without T5 (``drop_t5``: 77 zero tokens instead);
    ``max_sequence_length`` is the T5 part's length (CLIP is always 77): 77 zero vectors in the paper's SD3 code,
    diffusers' default 256 in its SD3.5 code (``t5_tokens``)."""
    te3 = getattr(pipe, "text_encoder_3", None)
    if protocol.drop_t5 and te3 is not None:
        pipe.text_encoder_3 = None
    try:
        pe, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=protocol.t5_tokens)
    finally:
        if te3 is not None:
            pipe.text_encoder_3 = te3
    return dict(encoder_hidden_states=pe, pooled_projections=pooled)


def _tiny_parts(max_length):
    """CLIP-L/G stand-ins, no T5 (as the paper loads SD3)."""
    from ...segmentation.tiny import tiny_clip, tiny_clip_tokenizer

    tok, tok2 = tiny_clip_tokenizer(model_max_length=max_length), tiny_clip_tokenizer(model_max_length=max_length)
    return dict(text_encoder=tiny_clip(tok), tokenizer=tok, text_encoder_2=tiny_clip(tok2), tokenizer_2=tok2,
                text_encoder_3=None, tokenizer_3=None)


# 4 joint blocks (the last context_pre_only, as in SD3), 4 px per image token (patch_size=1, vae_blocks=1: one per
# pixel); SD3.5: RMS QK-norm, dual attention in block 0
_TINY = Tiny(pipeline="StableDiffusion3Pipeline", parts=_tiny_parts, max_length=77, vae=dict(latent_channels=4),
             scheduler=("FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
             transformer=dict(sample_size=32, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8,
                              num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                              pooled_projection_dim=64, out_channels=4, pos_embed_max_size=64))


def _name_of(low: str):
    """SD3.5 or SD3 by the version in a (lower-case) model id or pipeline name; None: neither."""
    if "3.5" in low or "3-5" in low or "35" in low:
        return "sd3.5"
    if "3" in low and ("stable" in low or "sd" in low):
        return "sd3"
    return None


SD3 = Family(
    family="sd3", title="SD3, SD3.5", transformers=("diffusers.SD3Transformer2DModel",),
    processors=("diffusers.models.attention_processor.JointAttnProcessor2_0",
                "diffusers.models.attention_processor.FusedJointAttnProcessor2_0"),
    blocks=(Layers("transformer_blocks.{i}.attn"),), text_at="end",
    cfg_batched=True,  # StableDiffusion3Pipeline runs [uncond, cond] in one forward
    read=_read, grid_text="`(H/p, W/p)`",
    # StableDiffusion3Pipeline's skip-layer-guidance pass (a third forward, cond only): not a step
    skip=lambda bound: bound.get("skip_layers") is not None,
    refused=_attn2, processor=_processor,
    # the paper's (segmentation/protocol.py): block 9, 77 CLIP tokens + 77 zero vectors (no T5); SD3.5: block 9 too
    # (the paper's appendix C), diffusers' default 256 T5 zero vectors
    segment=Segment(pipelines=("StableDiffusion3Pipeline",), layer=9, paper=True, name_of=_name_of,
                    variants={"sd3.5": dict(t5_tokens=256)}, models="SD3-medium, SD3.5-medium",
                    columns="CLIP (77)", loader="StableDiffusion3Pipeline",
                    load_without=("text_encoder_3", "tokenizer_3"), dtype="float16",  # the paper's: no T5, fp16
                    encode=_encode, generate_tokens=256,
                    tiny={"sd3": _TINY, "sd3.5": _TINY.but(qk_norm="rms_norm", dual_attention_layers=(0,))}),
)
FAMILIES = (SD3,)
