"""Qwen-Image (and its Edit pipelines): ``QwenImageTransformer2DModel``, ``transformer_blocks.{i}`` with
``QwenDoubleStreamAttnProcessor2_0`` (dispatcher), ``[text, image]``. Its pipelines pass ``encoder_hidden_states_mask``
``[B, T]`` when the prompts of a batch have padding (``None`` when every token is valid, e.g. one prompt per
forward); the processor turns it into the key mask ``[B, 1, 1, N]``, which capture passes on to ``joint_attention``
(masked text columns of the maps are 0). Grid: the first entry of ``img_shapes`` (the generated image; Edit appends
the condition images after it).
"""
from __future__ import annotations

import torch

from .flux import embedded_guidance
from .record import Family, Layers, Segment, Tiny, count_template_start, template_start_idx

__all__ = ["QWENIMAGE", "read_img_shapes", "FAMILIES"]


def read_img_shapes(transformer, bound: dict):
    hidden_states = bound["hidden_states"]  # [B, N_img, C] packed latents, generated image first
    img_shapes = bound.get("img_shapes")
    grid = None
    if img_shapes:
        first = img_shapes[0]  # pipelines: per sample a list of (frames, h, w), the generated image first
        if isinstance(first[0], (list, tuple)):
            first = first[0]
        frames, h, w = (int(x) for x in first)
        grid = (h, w) if frames == 1 else (frames, h, w)
    return bound["encoder_hidden_states"].shape[1], grid, hidden_states.shape[0]


# segmentation (the record's Segment code): Qwen2.5-VL text encoder behind a chat template whose system prefix (drop
# tokens) the pipeline drops; the text block is the remaining tokens of ONE prompt (no padding, no mask). Its VAE is
# a video VAE ([B, 3, 1, H, W]) normalised with latents_mean / latents_std; latents packed 2x2 as Flux's;
# flow-matching schedule shifted by the image's token count (as its pipeline).
def _latents(pipe, x):
    vae = pipe.vae
    z = vae.encode(x[:, :, None]).latent_dist.mean  # [1, C, 1, h, w]
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z.device, z.dtype)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z.device, z.dtype)
    return ((z - mean) / std)[:, :, 0]  # [1, C, h, w]


def _text_layout(pipe, tokenizer, prompt, spans, protocol):
    from ...segmentation.families import template_columns

    return template_columns(tokenizer, pipe.prompt_template_encode, prompt, spans,
                            drop=template_start_idx(pipe, tokenizer), max_length=pipe.tokenizer_max_length)


def _encode(pipe, prompts, protocol, device):
    pe, mask = pipe.encode_prompt(prompt=prompts, device=device)
    return dict(encoder_hidden_states=pe, encoder_hidden_states_mask=mask)


def _forward(pipe, lat, t, enc, protocol):
    tf = pipe.transformer
    B, c, h, w = lat.shape
    packed = pipe._pack_latents(lat, B, c, h, w)
    guidance = embedded_guidance(pipe, lat, protocol.guidance or 1.0)
    return tf(hidden_states=packed, timestep=(t / 1000).expand(B).to(lat.device, lat.dtype), guidance=guidance,
              img_shapes=[[(1, h // 2, w // 2)]] * B, return_dict=False, **enc)


# tiny pipeline (the record's Tiny code; configs like diffusers' tests): Qwen2.5-VL text encoder (2 layers, hidden
# 16), the byte-level stand-in tokenizer, a 2-level video VAE (4 latent channels, 2 px per latent), 4 px per token
def _tiny_parts(max_length):
    from ...segmentation.tiny import tiny_bpe_tokenizer, tiny_qwen25_vl

    tok = tiny_bpe_tokenizer()
    return dict(text_encoder=tiny_qwen25_vl(tok, num_layers=2), tokenizer=tok)


def _tiny_vae():
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                  latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 1.0])


# after: the real system prefix is 34 Qwen tokens; the stand-in tokenizer spends one per byte on it: its own count
_TINY = Tiny(pipeline="QwenImagePipeline", parts=_tiny_parts, vae=_tiny_vae, after=count_template_start,
             scheduler=("FlowMatchEulerDiscreteScheduler", dict(use_dynamic_shifting=True)),
             order=("parts", "vae", "transformer"),
             transformer=dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                              num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False,
                              axes_dims_rope=(8, 4, 4)))


QWENIMAGE = Family(
    family="qwenimage", title="Qwen-Image (and Edit)", transformers=("diffusers.QwenImageTransformer2DModel",),
    processors=("diffusers.models.transformers.transformer_qwenimage.QwenDoubleStreamAttnProcessor2_0",),
    blocks=(Layers("transformer_blocks.{i}.attn"),), text_at="start",
    cfg_batched=False,  # QwenImagePipeline: true CFG, the unconditional forward inside cache_context("uncond")
    read=read_img_shapes, grid_text="first of `img_shapes`", text="mask: `encoder_hidden_states_mask`",
    segment=Segment(pipelines=("QwenImagePipeline",), model_ids=("qwen-image", "qwenimage"),
                    settings=dict(prompt_batch=1, generate_guidance_scale=4.0), models="Qwen-Image",
                    columns="Qwen2.5-VL prompt tokens after the system prefix (one prompt per forward)",
                    batch_prompts=False, packed=True, latents=_latents, schedule="token_shift",
                    text_layout=_text_layout, text_head=template_start_idx, encode=_encode, forward=_forward,
                    tiny={"qwenimage": _TINY}),
)
FAMILIES = (QWENIMAGE,)
