"""Krea 2: ``Krea2Transformer2DModel``, single-stream ``transformer_blocks.{i}.attn`` (``Krea2AttnProcessor``) over
``[text, image]``; the text-fusion blocks before them see text only. Grouped-query attention is expanded by the
processor before the dispatcher (q, k, v have the same heads there). ``encoder_attention_mask`` ``[B, T]`` becomes a
boolean key mask ``[B, 1, 1, N]``: captured. Grid from the image rows of ``position_ids`` ``[T + N_img, 3]``
(``(0, h, w)``).
"""
from __future__ import annotations

from .record import Family, Layers

__all__ = ["KREA2", "FAMILIES"]


def _read(transformer, bound: dict):
    hidden_states = bound["hidden_states"]  # [B, N_img, C] packed latent
    text_len = bound["encoder_hidden_states"].shape[1]  # [B, T, text layers, D]
    position_ids = bound["position_ids"]  # [T + N_img, 3]
    if position_ids.shape[0] != text_len + hidden_states.shape[1]:
        raise ValueError(
            f"position_ids has {position_ids.shape[0]} rows, expected {text_len} text + {hidden_states.shape[1]} "
            "image tokens"
        )
    return text_len, position_ids[text_len:], hidden_states.shape[0]  # the store reads the grid from the ids


KREA2 = Family(
    family="krea2", title="Krea 2", transformers=("diffusers.Krea2Transformer2DModel",),
    processors=("diffusers.models.transformers.transformer_krea2.Krea2AttnProcessor",),
    blocks=(Layers("transformer_blocks.{i}.attn", "single"),), text_at="start",
    cfg_batched=False,  # Krea2Pipeline: the negative prompt's forward after the positive one
    read=_read, grid_text="from `position_ids`", text="mask: `encoder_attention_mask`",
)
FAMILIES = (KREA2,)
