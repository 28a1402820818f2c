"""Z-Image: ``ZImageTransformer2DModel`` (basic mode, ``x`` a list of latents ``[C, F, H, W]``):
``layers.{i}.attention`` (``ZSingleStreamAttnProcessor``) over one sequence per sample, ``[image, caption]``, each part
padded with learnt pad tokens to a multiple of 32 (``SEQ_MULTI_OF``; the pad tokens take part in attention, as in the
model), the samples then padded to the longest with a boolean key mask ``[B, N]`` (captured). With every image of the
batch of one size, the image part has the same length in every sample, so the captions start at the same position: the
text block is the end of the sequence, ``max_b(padded caption length)`` tokens (a shorter caption's tail is masked).
Grid: the image's ``(H / p, W / p)`` (``patch_size``, ``f_patch_size`` of the call); the store keeps its rows (not the
image pad tokens). Refused: images of different sizes in one batch, and omni mode (``x`` nested lists: ``[caption,
condition images, generated image, SigLIP]``, the generated image not first). The noise and context refiners see image
resp. text tokens only.

ZImagePipeline batches ``[cond, uncond]`` (conditional FIRST) and drops the second half on truncated-CFG steps:
``batch="cond"`` keeps every row; pass ``batch=[0, ..]`` for the conditional rows.
"""
from __future__ import annotations

import inspect

from .record import Family, Layers, image_grid

__all__ = ["Z_IMAGE", "FAMILIES"]


def _refiners(transformer):
    names = {f"noise_refiner.{i}": "image tokens only" for i in range(len(transformer.noise_refiner))}
    names.update({f"context_refiner.{i}": "caption tokens only" for i in range(len(transformer.context_refiner))})
    return {name: f"a refiner block of Z-Image: its attention sees {what} (no text-image attention)"
            for name, what in names.items()}


def _read(transformer, bound: dict):
    from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

    images, captions = bound["x"], bound["cap_feats"]  # lists of [C, F, H, W] and [L_b, D]
    if isinstance(images[0], list):
        raise ValueError(
            "capture on ZImageTransformer2DModel: omni mode (x a list of lists) puts the generated image after "
            "the condition images and before the SigLIP tokens, not a [generated image, ...] block; capture "
            "supports the basic mode (one latent per sample)"
        )
    defaults = inspect.signature(type(transformer).forward).parameters
    p = bound.get("patch_size", defaults["patch_size"].default)
    p_f = bound.get("f_patch_size", defaults["f_patch_size"].default)
    sizes = {tuple(x.shape[-3:]) for x in images}
    if len(sizes) > 1:
        raise ValueError(
            f"capture on ZImageTransformer2DModel: the images of the batch have different sizes {sorted(sizes)} "
            "[F, H, W]: their captions would start at different positions; one size per forward is supported"
        )
    f, h, w = sizes.pop()
    text_len = max(-(-len(c) // SEQ_MULTI_OF) * SEQ_MULTI_OF for c in captions)  # padded caption tokens
    return text_len, image_grid(f // p_f, h // p, w // p), len(images)


Z_IMAGE = Family(
    family="z_image", title="Z-Image (basic mode)", transformers=("diffusers.ZImageTransformer2DModel",),
    processors=("diffusers.models.transformers.transformer_z_image.ZSingleStreamAttnProcessor",),
    blocks=(Layers("layers.{i}.attention", "single"),), text_at="end", cfg_batched=False, read=_read,
    grid_text="`(H/p, W/p)`", text="caption padded to 32, key mask; refiners refused", refused=_refiners,
)
FAMILIES = (Z_IMAGE,)
