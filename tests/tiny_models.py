"""Tiny random-weight MM-DiT transformers and pipelines, built offline from configs (no hub, no download).

Shapes follow diffusers' own tests (tests/models/transformers/test_models_transformer_{sd3,flux,flux2}.py,
tests/pipelines/...): a few heads of 8-16 dims, 1-2 blocks of each kind.

Public helpers (other test files import them):

- ``tiny_sd3_transformer(sd35=False)``, ``tiny_flux_transformer()``, ``tiny_flux2_transformer()``
- ``sd3_inputs(...)``, ``flux_inputs(...)``, ``flux2_inputs(...)``: forward kwargs for those transformers
- ``tiny_sd3_pipeline()`` (``text_encoder_3=None`` as in Seg4Diff), ``tiny_flux_pipeline()``: the package's
  builder (``seg4diff_fast.segmentation.tiny``) at test sizes
"""
from __future__ import annotations

import torch

__all__ = [
    "tiny_sd3_transformer",
    "tiny_flux_transformer",
    "tiny_flux2_transformer",
    "sd3_inputs",
    "flux_inputs",
    "flux2_inputs",
    "tiny_sd3_pipeline",
    "tiny_flux_pipeline",
]


# ---------------------------------------------------------------------------------------------- transformers


def tiny_sd3_transformer(sd35: bool = False, num_layers: int = 2, seed: int = 0, dtype=torch.float32):
    """SD3 (``sd35=False``) or SD3.5-style (RMS QK-norm, dual attention in block 0) transformer: 4 heads x 8,
    patch 1, 4 latent channels, joint_attention_dim 32; the last block is ``context_pre_only``."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        qk_norm="rms_norm" if sd35 else None,
        dual_attention_layers=(0,) if sd35 else (),
    )
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def sd3_inputs(batch: int = 2, height: int = 6, width: int = 5, text_len: int = 7, seed: int = 1, dtype=torch.float32):
    """Forward kwargs for :func:`tiny_sd3_transformer`: latent ``[B, 4, height, width]``, text ``[B, T, 32]``."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, height, width, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(batch, text_len, 32, generator=g).to(dtype),
        pooled_projections=torch.randn(batch, 64, generator=g).to(dtype),
        timestep=torch.full((batch,), 500.0).to(dtype),
    )


def tiny_flux_transformer(num_layers: int = 2, num_single_layers: int = 2, seed: int = 0, dtype=torch.float32):
    """Flux.1 transformer: 2 heads x 16, 4 input channels (a 2x2-packed 1-channel latent), text dim 32."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def _ids(h: int, w: int, columns: int) -> torch.Tensor:
    """Flux-style image position ids ``[h*w, columns]``: column 1 the row, column 2 the column."""
    ids = torch.zeros(h, w, columns)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, columns)


def flux_inputs(batch: int = 2, height: int = 5, width: int = 6, text_len: int = 7, seed: int = 1, dtype=torch.float32):
    """Forward kwargs for :func:`tiny_flux_transformer`: ``height x width`` packed image tokens, ``text_len`` text."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, height * width, 4, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(batch, text_len, 32, generator=g).to(dtype),
        pooled_projections=torch.randn(batch, 32, generator=g).to(dtype),
        timestep=torch.full((batch,), 0.5).to(dtype),
        img_ids=_ids(height, width, 3).to(dtype),
        txt_ids=torch.zeros(text_len, 3).to(dtype),
    )


def tiny_flux2_transformer(num_layers: int = 1, num_single_layers: int = 2, seed: int = 0, dtype=torch.float32):
    """Flux.2 transformer: 2 heads x 16, 4 input channels, text dim 16, 4-axis RoPE."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4],
    )
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def flux2_inputs(batch: int = 2, height: int = 4, width: int = 5, text_len: int = 6, seed: int = 1, dtype=torch.float32):
    """Forward kwargs for :func:`tiny_flux2_transformer` (ids columns ``(t, h, w, l)``)."""
    g = torch.Generator().manual_seed(seed)
    txt_ids = torch.zeros(text_len, 4)
    txt_ids[:, 3] = torch.arange(text_len)
    return dict(
        hidden_states=torch.randn(batch, height * width, 4, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(batch, text_len, 16, generator=g).to(dtype),
        timestep=torch.full((batch,), 0.5).to(dtype),
        img_ids=_ids(height, width, 4).to(dtype),
        txt_ids=txt_ids.to(dtype),
        guidance=torch.full((batch,), 3.5).to(dtype),
    )


# ---------------------------------------------------------------------------------------------- pipelines
# One tiny-pipeline builder: the package's (seg4diff_fast.segmentation.tiny, behind `--model tiny`), with one
# image token per pixel (SD3: patch size 1, VAE without downsampling) and short tokenizers for fast tests.


def tiny_sd3_pipeline(sd35: bool = False, max_length: int = 8, seed: int = 0):
    """``StableDiffusion3Pipeline`` from tiny components, ``text_encoder_3=None`` (Seg4Diff's setting). The CLIP
    part of the text is ``max_length`` tokens; the T5 part is ``max_sequence_length`` zero vectors (a pipeline
    call argument: diffusers 0.42 defaults it to 256), so call it with ``max_sequence_length=max_length`` for a
    ``2 * max_length`` text block. ``height x width`` pixels give a ``height x width`` token grid."""
    from seg4diff_fast.segmentation.tiny import tiny_sd3_pipeline as build

    return build(num_layers=2, seed=seed, sd35=sd35, max_length=max_length, patch_size=1, vae_blocks=1)


def tiny_flux_pipeline(max_length: int = 8, seed: int = 0):
    """``FluxPipeline`` from tiny components (CLIP + tiny T5). Call it with ``max_sequence_length=max_length``:
    the text block is that many T5 tokens."""
    from seg4diff_fast.segmentation.tiny import tiny_flux_pipeline as build

    return build(num_layers=1, num_single_layers=1, seed=seed, max_length=max_length, vae_blocks=1)
