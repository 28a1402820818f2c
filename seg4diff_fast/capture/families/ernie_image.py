"""ERNIE-Image: ``ErnieImageTransformer2DModel``, ``layers.{i}.self_attention``
(``ErnieImageSingleStreamAttnProcessor``) over ``[image, text]``; ``text_lens`` give the boolean key mask
``[B, 1, 1, N]`` of the padded text (``text_bth`` ``[B, T, D]``): captured. Grid ``(H / p, W / p)`` of the latent
``[B, C, H, W]``.
"""
from __future__ import annotations

from .record import Family, Layers, latent_grid

__all__ = ["ERNIE_IMAGE", "FAMILIES"]


def _read(transformer, bound: dict):
    hidden_states = bound["hidden_states"]  # [B, C, H, W] latent
    return bound["text_bth"].shape[1], latent_grid(transformer, hidden_states), hidden_states.shape[0]


ERNIE_IMAGE = Family(
    family="ernie_image", title="ERNIE-Image", transformers=("diffusers.ErnieImageTransformer2DModel",),
    processors=("diffusers.models.transformers.transformer_ernie_image.ErnieImageSingleStreamAttnProcessor",),
    blocks=(Layers("layers.{i}.self_attention", "single"),), text_at="end",
    cfg_batched=True,  # ErnieImagePipeline batches [uncond, cond] in one forward
    read=_read, grid_text="`(H/p, W/p)`", text="mask: `text_lens`",
)
FAMILIES = (ERNIE_IMAGE,)
