"""Tiny random-weight MM-DiT transformers and pipelines, built offline from configs (no hub, no download).

Shapes follow diffusers' own tests (tests/models/transformers/test_models_transformer_{sd3,flux,flux2}.py,
tests/pipelines/...): a few heads of 8-16 dims, 1-2 blocks of each kind. Tokenizers are built from a tiny
vocabulary written to a temporary folder (CLIP: characters + end-of-word characters, no merges; T5: a
``tokenizers`` word-level model wrapped in ``T5TokenizerFast``), so they tokenize any lowercase text.

Public helpers (other test files import them):

- ``tiny_sd3_transformer(sd35=False)``, ``tiny_flux_transformer()``, ``tiny_flux2_transformer()``
- ``sd3_inputs(...)``, ``flux_inputs(...)``, ``flux2_inputs(...)``: forward kwargs for those transformers
- ``tiny_sd3_pipeline()`` (``text_encoder_3=None`` as in Seg4Diff), ``tiny_flux_pipeline()``
- ``clip_tokenizer(max_length)``, ``t5_tokenizer(max_length)``
"""
from __future__ import annotations

import json
import os
import string
import tempfile

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
    "clip_tokenizer",
    "t5_tokenizer",
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


# ---------------------------------------------------------------------------------------------- tokenizers


def clip_tokenizer(max_length: int = 16):
    """A ``CLIPTokenizer`` over lowercase characters (``"a"``, ``"a</w>"``, ...), no merges: offline."""
    from transformers import CLIPTokenizer

    folder = tempfile.mkdtemp(prefix="s4d_clip_tok_")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=max_length)


def t5_tokenizer(max_length: int = 16):
    """A ``T5TokenizerFast`` over a word-level vocabulary of lowercase characters (split per character)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for c in string.ascii_lowercase + string.digits:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return T5TokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
        model_max_length=max_length,
    )


def _clip_text_model(cls, seed: int):
    from transformers import CLIPTextConfig

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=100, hidden_act="gelu", projection_dim=32,
        max_position_embeddings=77,
    )
    return cls(config).eval()


def _tiny_vae(latent_channels: int, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()


# ---------------------------------------------------------------------------------------------- pipelines


def tiny_sd3_pipeline(sd35: bool = False, max_length: int = 8, seed: int = 0):
    """``StableDiffusion3Pipeline`` from tiny components, ``text_encoder_3=None`` (Seg4Diff's setting). The CLIP
    part of the text is ``max_length`` tokens; the T5 part is ``max_sequence_length`` zero vectors (a pipeline
    call argument: diffusers 0.42 defaults it to 256), so call it with ``max_sequence_length=max_length`` for a
    ``2 * max_length`` text block. The VAE does not downsample: ``height x width`` pixels give a
    ``height x width`` token grid (patch size 1)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    transformer = tiny_sd3_transformer(sd35=sd35, seed=seed)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(4, seed),
        text_encoder=_clip_text_model(CLIPTextModelWithProjection, seed + 1),
        tokenizer=clip_tokenizer(max_length),
        text_encoder_2=_clip_text_model(CLIPTextModelWithProjection, seed + 2),
        tokenizer_2=clip_tokenizer(max_length),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def tiny_flux_pipeline(max_length: int = 8, seed: int = 0):
    """``FluxPipeline`` from tiny components (CLIP + tiny T5, 1-channel VAE latent packed 2x2). Call it with
    ``max_sequence_length=max_length``: the text block is that many T5 tokens; ``height x width`` pixels give an
    ``(height/2) x (width/2)`` token grid."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    transformer = tiny_flux_transformer(num_layers=1, num_single_layers=1, seed=seed)
    torch.manual_seed(seed + 2)
    t5 = T5EncoderModel(
        T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, pad_token_id=0,
                 eos_token_id=1, decoder_start_token_id=0, relative_attention_num_buckets=8)
    ).eval()
    return FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(1, seed),
        text_encoder=_clip_text_model(CLIPTextModel, seed + 1),
        tokenizer=clip_tokenizer(max_length),
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer(max_length),
    )
