"""Lumina-Image 2.0: ``Lumina2Transformer2DModel``, ``layers.{i}`` (``Lumina2AttnProcessor2_0``, SDPA; its
``noise_refiner`` / ``context_refiner`` blocks attend within the image or the text only: refused). Per sample the
joint sequence is ``[c_b valid text tokens (the first c_b of encoder_attention_mask's), image, padding]`` with a key
mask when the ``c_b`` differ; captured in the order of :func:`_text_first` (``record.ReorderingSite``). The text block
of the maps is ``max_b c_b`` columns (a sample's columns past its ``c_b`` are 0). Grouped-query heads are repeated by
the processor before SDPA. Grid ``(H / p, W / p)``. Lumina2Pipeline runs its unconditional forward as a second
forward on the same latents (not a step with ``batch="cond"``: ``CaptureHandle._second_pass``).
"""
from __future__ import annotations

import torch

from .record import Family, Layers, latent_grid

__all__ = ["LUMINA2", "FAMILIES"]


def _text_first(site, q, key_mask, text_slice):
    """Per sample ``[c_b text, image, padding]`` (``key_mask`` ``[B, N]`` True on the first ``c_b + N_img``
    positions; None when every ``c_b`` is the same: no padding) -> ``[c_b text, padding, image]``: one text
    block ``[0, max c_b)`` whose padded columns are masked keys, the image rows after it."""
    if key_mask is None:
        return None
    h, w = site.context.grid
    n, texts = q.shape[2], text_slice.stop
    valid_text = key_mask.sum(1, keepdim=True) - h * w  # [B, 1] c_b (no device sync)
    p = torch.arange(n, device=q.device)[None, :]  # [1, N] reordered position
    # its model position: a text token, then padding (after the model's image), then the image
    return torch.where(p < valid_text, p, torch.where(p < texts, p + h * w, p - texts + valid_text))


def _read(transformer, bound: dict):
    hidden_states = bound["hidden_states"]  # [B, C, H, W] latent
    valid = bound["encoder_attention_mask"].sum(1)  # [B]: the model reads it with .tolist() too (a sync)
    return int(valid.max()), latent_grid(transformer, hidden_states), hidden_states.shape[0]


def _refiners(transformer):
    why = {"noise_refiner": "image tokens only", "context_refiner": "text tokens only"}
    return {f"{name}.{i}": f"a Lumina2 refiner block: it attends within the {reason}, no text-image attention"
            for name, reason in why.items() for i in range(len(getattr(transformer, name)))}


LUMINA2 = Family(
    family="lumina2", title="Lumina-Image 2.0", transformers=("diffusers.Lumina2Transformer2DModel",),
    processors=("diffusers.models.transformers.transformer_lumina2.Lumina2AttnProcessor2_0",),
    blocks=(Layers("layers.{i}.attn"),), text_at="start", cfg_batched=False, read=_read,
    grid_text="`(H/p, W/p)`", text="per sample (reordered, mask); refiners refused", refused=_refiners,
    reorder=_text_first,
)
FAMILIES = (LUMINA2,)
