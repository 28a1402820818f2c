"""CogView4, CogView3-Plus and GLM-Image: one joint attention per block, ``transformer_blocks.{i}.attn1``, over
``[text, image]`` with RoPE on the image part; grid ``(H / p, W / p)`` of the latent ``[B, C, H, W]`` (patches
row-major).

- CogView4: ``CogView4Transformer2DModel`` with ``CogView4AttnProcessor`` (``F.scaled_dot_product_attention``). Its
  pipeline passes no attention mask; a forward given ``attention_mask`` (the processor turns it into a float 0 / 1
  outer product that SDPA adds to the scores: a bias, not a key mask) is reproduced as ChromaPipeline's is
  (``dispatch._key_mask``).
- CogView3-Plus (``CogView3PlusTransformer2DModel``) alike, with ``CogVideoXAttnProcessor2_0``.
- GLM-Image (``GlmImageTransformer2DModel``, ``GlmImageAttnProcessor``, dispatcher): a text ``attention_mask``
  becomes a float 0 / 1 matrix that SDPA adds to the scores: reproduced as CogView4's (its pipeline passes none).
  The KV cache of condition images (image-to-image): the forwards that write it (mode "write": condition image, no
  text) are not steps; a forward that reads it (keys = [cached condition tokens, text, image], queries = [text,
  image]: not one joint sequence) is refused. Mode "skip" (the unconditional forward) and no cache (text-to-image)
  are captured.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .cogvideox import DDIM_V, t5_encode, tiny_t5_parts
from .record import Family, Layers, Segment, Tiny, read_latent

__all__ = ["COGVIEW4", "COGVIEW3PLUS", "GLM_IMAGE", "FAMILIES"]

_T = "diffusers.models.transformers."


def _cache_mode(bound: dict):
    kv_caches = bound.get("kv_caches")
    return None if kv_caches is None else (kv_caches[0].mode, len(kv_caches[0].k_caches))


def _glm_skip(bound: dict) -> bool:
    mode = _cache_mode(bound)
    return mode is not None and mode[0] == "write"  # encoding a condition image (no text): not a step


def _glm_read(transformer, bound: dict):
    mode = _cache_mode(bound)
    if mode is not None and mode[0] == "read" and mode[1]:
        raise ValueError(
            "capture on GlmImageTransformer2DModel: this forward reads the KV cache of condition images "
            "(image-to-image): the keys are [cached condition tokens, text, image] and the queries [text, image], "
            "not one joint sequence; capture supports text-to-image (no cached condition images)"
        )
    text_len, grid, batch_size = read_latent(transformer, bound)
    return (None if _glm_skip(bound) else text_len), grid, batch_size


# ----------------------------------------------------------------------- segmentation (the records' Segment code)
# CogView4: GLM text encoder; the pipeline tokenises with padding="longest" and then LEFT-pads the ids to a multiple
# of 16 with the pad token (visible tokens: no mask), so a prompt's columns move right by that padding. Latent
# z * scaling_factor (its pipeline decodes z / scaling_factor, no shift); schedule: its pipeline's linspace(1000, 1)
# timesteps as sigmas, shifted by CogView4's own calculate_shift of the token count.
# CogView3-Plus: CogView4's latent and forward (size conditioning), CogVideoX's T5 text (t5_tokens = 224, padded;
# fixed length, prompts batch) and DDPM-style noise; positional limit pos_embed_max_size patches per side.
def _cogview4_schedule(pipe, sched, z, protocol):
    import numpy as np
    from diffusers.pipelines.cogview4.pipeline_cogview4 import calculate_shift

    n = protocol.num_inference_steps
    p = pipe.transformer.config.patch_size
    seq = protocol.shift_seq_len or (z.shape[-2] // p) * (z.shape[-1] // p)
    steps = np.linspace(sched.config.num_train_timesteps, 1.0, n).astype(np.int64).astype(np.float32)
    mu = calculate_shift(seq, sched.config.get("base_image_seq_len", 256), sched.config.get("base_shift", 0.25),
                         sched.config.get("max_shift", 0.75))
    sched.set_timesteps(timesteps=steps, sigmas=steps / sched.config.num_train_timesteps, mu=mu, device=z.device)
    return sched.timesteps


def _cogview4_text_layout(pipe, tokenizer, prompt, spans, protocol):
    from ...segmentation.families import template_columns

    columns, n = template_columns(tokenizer, "{}", prompt, spans, max_length=1024)
    pad = (16 - n % 16) % 16  # the pipeline's left padding
    return [[c + pad for c in cols] for cols in columns], n + pad


def _cogview4_encode(pipe, prompts, protocol, device):
    pe, _ = pipe.encode_prompt(prompt=prompts, do_classifier_free_guidance=False, device=device)
    return dict(encoder_hidden_states=pe)


def _cogview_forward(pipe, lat, t, enc, protocol):
    from ...segmentation.families import vae_scale

    B = lat.shape[0]
    vs = vae_scale(pipe)
    size = torch.tensor([[lat.shape[-2] * vs, lat.shape[-1] * vs]], dtype=enc["encoder_hidden_states"].dtype,
                        device=lat.device).repeat(B, 1)
    return pipe.transformer(hidden_states=lat, timestep=t.expand(B).to(lat.device), original_size=size,
                            target_size=size, crop_coords=torch.zeros_like(size), return_dict=False, **enc)


# tiny pipelines (the records' Tiny code). CogView4: GLM text encoder (2 layers, hidden 32), the byte-level stand-in
# tokenizer padding on the left (as GLM's), a 2-level VAE (2 px per latent, 4 channels), patch 2: 4 px per token.
# CogView3-Plus: T5 stand-in (224 tokens), a 2-level VAE, patch 2 (4 px per token, at most 16 tokens per side), DDIM
# v-prediction scheduler.
def _tiny_cogview4_parts(max_length):
    from transformers import GlmConfig, GlmModel

    from ...segmentation.tiny import tiny_bpe_tokenizer

    tok = tiny_bpe_tokenizer(padding_side="left", prefix=("[gMASK]", "<sop>"))
    te = GlmModel(GlmConfig(hidden_size=32, intermediate_size=8, num_hidden_layers=2, num_attention_heads=4,
                            head_dim=8, vocab_size=len(tok), pad_token_id=tok.pad_token_id))
    return dict(tokenizer=tok, text_encoder=te)


_TINY_COGVIEW4 = Tiny(
    pipeline="CogView4Pipeline", parts=_tiny_cogview4_parts, vae=dict(latent_channels=4),
    scheduler=("FlowMatchEulerDiscreteScheduler", dict(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                       use_dynamic_shifting=True, time_shift_type="linear")),
    transformer=dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=4,
                     out_channels=4, text_embed_dim=32, time_embed_dim=8, condition_dim=4))
_TINY_COGVIEW3PLUS = Tiny(
    pipeline="CogView3PlusPipeline", parts=tiny_t5_parts, max_length=224, vae=dict(latent_channels=4),
    scheduler=DDIM_V, order=("transformer", "parts", "vae"),
    transformer=dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=2,
                     out_channels=4, text_embed_dim=32, time_embed_dim=8, condition_dim=2, pos_embed_max_size=16,
                     sample_size=16))


COGVIEW4 = Family(
    family="cogview4", title="CogView4", transformers=("diffusers.CogView4Transformer2DModel",),
    processors=(_T + "transformer_cogview4.CogView4AttnProcessor",), blocks=(Layers("transformer_blocks.{i}.attn1"),),
    text_at="start",
    cfg_batched=False,  # CogView4Pipeline: conditional and unconditional forwards one after the other
    read=read_latent, grid_text="`(H/p, W/p)`",
    segment=Segment(pipelines=("CogView4Pipeline",), model_ids=("cogview4",),
                    settings=dict(prompt_batch=1, generate_guidance_scale=5.0),
                    columns="GLM tokens, after the pipeline's left padding to 16 (one prompt per forward)",
                    batch_prompts=False, latents="scale", schedule=_cogview4_schedule,
                    text_layout=_cogview4_text_layout, encode=_cogview4_encode, forward=_cogview_forward,
                    tiny={"cogview4": _TINY_COGVIEW4}),
)
COGVIEW3PLUS = replace(
    COGVIEW4, family="cogview3plus", title="CogView3-Plus", transformers=("diffusers.CogView3PlusTransformer2DModel",),
    processors=("diffusers.models.attention_processor.CogVideoXAttnProcessor2_0",),
    cfg_batched=True,  # CogView3PlusPipeline batches [uncond, cond] in one forward
    segment=Segment(pipelines=("CogView3PlusPipeline",), model_ids=("cogview3-plus", "cogview3plus"),
                    settings=dict(num_inference_steps=50, t5_tokens=224, generate_guidance_scale=7.0),
                    columns="T5 (first 77 of 224)",
                    latents="scale", noise="ddpm", encode=t5_encode, forward=_cogview_forward,
                    tiny={"cogview3plus": _TINY_COGVIEW3PLUS}),
)
GLM_IMAGE = replace(
    COGVIEW4, family="glm_image", title="GLM-Image", transformers=("diffusers.GlmImageTransformer2DModel",),
    processors=(_T + "transformer_glm_image.GlmImageAttnProcessor",),
    cfg_batched=False,  # GlmImagePipeline: the unconditional forward after the conditional one
    read=_glm_read, skip=_glm_skip, text="KV-cache reads refused", segment=None,
)
FAMILIES = (COGVIEW4, COGVIEW3PLUS, GLM_IMAGE)
