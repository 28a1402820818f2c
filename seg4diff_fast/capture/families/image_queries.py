"""Families whose attention has the image tokens as its only queries and the joint sequence (``[text, image]`` or
``[image, text]``) as keys and values: the text tokens are never updated by attention (PRX, NucleusMoE-Image).
Their i2t map is well-defined, the image rows of a joint softmax over every key; t2i does not exist (no text query),
so only ``capture="i2t"`` is served (``Family.image_queries``). The capture processor pads the queries with ``T``
zero text queries at the text's place, runs the joint attention on the ``N`` tokens and returns the image rows: the
text rows' outputs are discarded (``T / N_img`` extra attention rows, e.g. 6 % for 256 text tokens at 1024^2).

- PRX: ``PRXTransformer2DModel``, ``blocks.{i}`` (``.attention``, ``PRXAttnProcessor2_0``, dispatcher): image queries,
  keys ``[text, image]`` with the key mask ``[B, 1, 1, N]`` of ``attention_mask`` (``[B, T]``). Text tokens are the
  projected prompt, the same in every block. Grid ``(H / p, W / p)`` (patches row-major).
- NucleusMoE-Image: ``NucleusMoEImageTransformer2DModel``, ``transformer_blocks.{i}`` (``.attn``,
  ``NucleusMoEAttnProcessor2_0``, dispatcher; grouped-query heads repeated before the call): image queries, keys
  ``[image, text]`` with the key mask ``[B, N]`` built from ``encoder_hidden_states_mask``. Grid: the first entry of
  ``img_shapes`` (packed latents, as Qwen-Image). NucleusMoEImagePipeline runs its unconditional forward as a second
  forward on the same latents (not a step with ``batch="cond"``: ``CaptureHandle._second_pass``).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..base import SKIP
from .qwenimage import read_img_shapes
from .record import Family, Layers, read_latent

__all__ = ["PRX", "NUCLEUSMOE_IMAGE", "image_queries_call", "FAMILIES"]


def image_queries_call(capture_call: Callable, text_at: str) -> Callable:
    """Wraps the capture function of a capture class (``dispatch._capture_call``, called with the processor first:
    its layer is ``processor.site``) for a processor that calls the dispatcher with ``query`` ``[B, N_img, H, D]`` and
    ``key, value`` ``[B, N, H, D]`` (the joint sequence), and a key mask ``[B, N]`` (the dispatcher's native backend
    reads it as ``[B, 1, 1, N]``), ``[B, 1, 1, N]`` or None. Returns ``[B, N_img, H, D]``."""

    def attention(processor, query, key, value, attn_mask=None, **kwargs):
        n_img, n_txt = query.shape[1], key.shape[1] - query.shape[1]
        if processor.site.context.rows == SKIP:  # not a step: the processor's own call, as given
            return _dispatcher(query, key, value, attn_mask=attn_mask, **kwargs)
        if attn_mask is not None and attn_mask.ndim == 2:
            attn_mask = attn_mask[:, None, None, :]
        pad = query.new_zeros(query.shape[0], n_txt, *query.shape[2:])  # [B, T, H, D] text queries
        joint = torch.cat([pad, query] if text_at == "start" else [query, pad], dim=1)  # [B, N, H, D]
        out = capture_call(processor, joint, key, value, attn_mask, **kwargs)  # [B, N, H, D]
        return out[:, n_txt:] if text_at == "start" else out[:, :n_img]

    return attention


def _dispatcher(*args, **kwargs):
    """diffusers' ``dispatch_attention_fn`` as it is at the call."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn(*args, **kwargs)


PRX = Family(
    family="prx", title="PRX", transformers=("diffusers.PRXTransformer2DModel",),
    processors=("diffusers.models.transformers.transformer_prx.PRXAttnProcessor2_0",),
    blocks=(Layers("blocks.{i}.attention"),), text_at="start",
    cfg_batched=True,  # PRXPipeline batches [uncond, cond] in one forward
    read=read_latent, grid_text="`(H/p, W/p)`", text="keys only: i2t only, mask", image_queries=True,
)
NUCLEUSMOE_IMAGE = Family(
    family="nucleusmoe_image", title="NucleusMoE-Image", transformers=("diffusers.NucleusMoEImageTransformer2DModel",),
    processors=("diffusers.models.transformers.transformer_nucleusmoe_image.NucleusMoEAttnProcessor2_0",),
    blocks=(Layers("transformer_blocks.{i}.attn"),), text_at="end", cfg_batched=False,
    read=read_img_shapes, grid_text="first of `img_shapes`", text="keys only: i2t only, mask", image_queries=True,
)
FAMILIES = (PRX, NUCLEUSMOE_IMAGE)
