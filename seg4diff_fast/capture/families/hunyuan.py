"""The Hunyuan families: HunyuanImage 2.1, HunyuanVideo, HunyuanVideo 1.5, HunyuanVideo FramePack.

- HunyuanImage 2.1 (``HunyuanImageTransformer2DModel``, ``HunyuanImageAttnProcessor``) and HunyuanVideo
  (``HunyuanVideoTransformer3DModel``, ``HunyuanVideoAttnProcessor2_0``): Flux-style layer names
  (``transformer_blocks.{i}``, ``single_transformer_blocks.{j}``), dispatcher, ``[image, text]``. Their forwards
  build a key mask ``[B, 1, 1, N]`` from ``encoder_attention_mask`` (valid text first): capture passes it on.
  HunyuanImage's text is ``[valid ByT5, valid MLLM, padding]`` when a second text encoder is given (its length is
  the sum). Grid ``(H / p, W / p)``, video ``(F / p_t, H / p, W / p)`` of the latent.
- HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``, ``HunyuanVideo15AttnProcessor2_0``, only
  ``transformer_blocks.{i}``): ``[video, text]`` where the text block is ``[image condition, ByT5, MLLM]`` tokens
  (the image-condition tokens are masked for text-to-video), valid tokens first; its processor builds the outer
  product ``m_i & m_j`` ``[B, 1, N, N]`` of the token mask: keys ``m``, and the masked text queries get SDPA's zero
  rows (reproduced, see ``dispatch._key_mask``).
- FramePack: ``HunyuanVideoFramepackTransformer3DModel``, HunyuanVideo's blocks and processor, ``[history, generated
  video, text]``: the history tokens (``latents_history_4x``, ``_2x``, ``latents_clean``, each of its own patch size,
  in that order) join the image part in front of the generated frames. The grid is the generated frames'
  ``(F / p_t, H / p, W / p)``; the layer's attention runs on ``[generated, history, text]`` (``ReorderingSite``), so
  the store keeps the generated frames' rows (their softmax over every key, history included, as the model computes
  it). Text block: ``[image_embeds tokens, prompt tokens]``, key mask from ``encoder_attention_mask`` when the batch
  has several samples; a batch of one cuts the prompt to its valid tokens. HunyuanVideoFramepackPipeline runs its
  true-CFG forward as a second forward on the same latents (not a step with ``batch="cond"``:
  ``CaptureHandle._second_pass``).
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from .flux import FLUX_LAYERS, embedded_guidance
from .record import Family, Layers, Segment, Tiny, count_template_start, template_start_idx, video_grid

__all__ = ["HUNYUANIMAGE", "HUNYUANVIDEO", "HUNYUANVIDEO15", "HUNYUANVIDEO_FRAMEPACK", "FAMILIES",
           "hunyuanimage_byt5_tokens", "hunyuanvideo15_byt5_tokens"]

_T = "diffusers.models.transformers."


def _read_image(transformer, bound: dict):
    hidden_states = bound["hidden_states"]  # [B, C, H, W] latent
    if hidden_states.ndim != 4:
        raise ValueError(f"capture on HunyuanImage needs a [B, C, H, W] latent, got {tuple(hidden_states.shape)}")
    text_len = bound["encoder_hidden_states"].shape[1]
    second = bound.get("encoder_hidden_states_2")
    if second is not None and transformer.context_embedder_2 is not None:  # ByT5 tokens join the text block
        text_len += second.shape[1]
    p_h, p_w = transformer.config.patch_size
    return text_len, (hidden_states.shape[-2] // p_h, hidden_states.shape[-1] // p_w), hidden_states.shape[0]


def _read_video(transformer, bound: dict):
    hidden_states = bound["hidden_states"]  # [B, C, F, H, W] latent video
    return bound["encoder_hidden_states"].shape[1], video_grid(transformer, hidden_states), hidden_states.shape[0]


def _read_video15(transformer, bound: dict):
    hidden_states = bound["hidden_states"]  # [B, C, F, H, W] latent video
    # text block: [image-condition tokens, ByT5, MLLM] (image_embeds [B, T_img, D] -> one token each)
    names = ("image_embeds", "encoder_hidden_states_2", "encoder_hidden_states")
    text_len = sum(bound[name].shape[1] for name in names)
    return text_len, video_grid(transformer, hidden_states), hidden_states.shape[0]


def _read_framepack(transformer, bound: dict):
    hidden_states = bound["hidden_states"]  # [B, C, F, H, W] generated latent video
    mask = bound["encoder_attention_mask"]  # [B, T]
    prompt = bound["encoder_hidden_states"].shape[1] if hidden_states.shape[0] > 1 else int(mask.sum())
    text_len = bound["image_embeds"].shape[1] + prompt  # a batch of one: the forward cuts the padding off
    return text_len, video_grid(transformer, hidden_states), hidden_states.shape[0]


def _generated_first(site, q, key_mask, text_slice):
    """``[history, generated, text]`` -> ``[generated, history, text]``: ``[N]``."""
    n_gen = math.prod(site.context.grid)
    n_hist = text_slice.start - n_gen
    p = torch.arange(q.shape[2], device=q.device)
    return torch.where(p < n_gen, p + n_hist, torch.where(p < text_slice.start, p - n_gen, p))


# ----------------------------------------------------------------------- segmentation (the records' Segment code)
def _schedule(pipe, sched, z, protocol):
    """The Hunyuan pipelines' ``linspace(1, 0, n + 1)[:-1]`` sigmas through the scheduler's own shift."""
    import numpy as np

    n = protocol.num_inference_steps
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, n + 1)[:-1], device=z.device)
    return sched.timesteps


# HunyuanImage 2.1 (HunyuanImagePipeline): Qwen2.5-VL text behind a chat template whose system prefix
# (prompt_template_encode_start_idx tokens) is dropped, padded to tokenizer_max_length (1000) with a mask; ByT5 for
# the quoted (glyph) text, padded to tokenizer_2_max_length (128) with a mask (all zeros when the prompt quotes
# nothing). The transformer reorders its text block to [valid ByT5, valid MLLM, padding ByT5, padding MLLM] and masks
# the padding (a boolean key mask, which capture passes on): a prompt's column is its position among the valid MLLM
# tokens plus the count of valid ByT5 tokens; the block holds 1000 + 128 columns (all kept; fixed length: prompts
# batch). Latent z * scaling_factor (32 px per latent, patch 1x1). Distilled checkpoints: guidance embedding
# guidance * 1000 (guidance, default the pipeline's 3.25) and MeanFlow's timestep_r (the next timestep of the
# schedule). generate: the pipeline's guider sets classifier-free guidance (its __call__ takes no guidance_scale,
# which is not applied).
def _image_second_text(pipe) -> bool:
    return getattr(pipe.transformer, "context_embedder_2", None) is not None and pipe.text_encoder_2 is not None


def hunyuanimage_byt5_tokens(pipe, prompt: str) -> int:
    """Valid ByT5 tokens of ``prompt``'s glyph text (0 when it quotes nothing): they come first in the block."""
    from diffusers.pipelines.hunyuan_image.pipeline_hunyuanimage import extract_glyph_text

    glyph = extract_glyph_text(prompt)
    if glyph is None or not _image_second_text(pipe):
        return 0
    return len(pipe.tokenizer_2(glyph, truncation=True, max_length=pipe.tokenizer_2_max_length)["input_ids"])


def _image_text_layout(pipe, tokenizer, prompt, spans, protocol):
    from ...segmentation.families import template_columns

    columns, _ = template_columns(tokenizer, pipe.prompt_template_encode, prompt, spans,
                                  drop=template_start_idx(pipe, tokenizer), max_length=pipe.tokenizer_max_length)
    shift = hunyuanimage_byt5_tokens(pipe, prompt)
    n = pipe.tokenizer_max_length + (pipe.tokenizer_2_max_length if _image_second_text(pipe) else 0)
    return [[c + shift for c in cols] for cols in columns], n


def _image_encode(pipe, prompts, protocol, device):
    pe, mask, pe2, mask2 = pipe.encode_prompt(prompt=prompts, device=device, batch_size=len(prompts))
    return dict(encoder_hidden_states=pe, encoder_attention_mask=mask, encoder_hidden_states_2=pe2,
                encoder_attention_mask_2=mask2)


def _image_forward(pipe, lat, t, enc, protocol):
    import copy

    tf = pipe.transformer
    B = lat.shape[0]
    guidance = embedded_guidance(pipe, lat, protocol.guidance or 3.25, scale=1000.0, dtype=lat.dtype)
    timestep_r = None
    if tf.config.use_meanflow:  # the pipeline's timestep_r: the schedule's next timestep (0 after the last)
        ts = _schedule(pipe, copy.deepcopy(pipe.scheduler), lat, protocol)
        i = int((ts - t.to(ts.device)).abs().argmin())
        timestep_r = (ts[i + 1] if i + 1 < len(ts) else torch.zeros(())).expand(B).to(lat.device, lat.dtype)
    enc = {k: v.to(lat.dtype) if k.startswith("encoder_hidden") else v for k, v in enc.items()}
    return tf(hidden_states=lat, timestep=t.expand(B).to(lat.device, lat.dtype), timestep_r=timestep_r,
              guidance=guidance, return_dict=False, **enc)


def _image_generate(pipe, kwargs):
    return {k: v for k, v in kwargs.items() if k != "guidance_scale"}  # the guider's, see above


# HunyuanVideo (HunyuanVideoPipeline): Llama text (the third-last hidden state) behind the pipeline's template, whose
# first crop_start tokens are dropped, padded to t5_tokens (its max_sequence_length, 256) with a mask the transformer
# turns into a boolean key mask (capture passes it on); the prompt's tokens come first (right padding), the whole
# block is kept (fixed length: prompts batch). CLIP's pooled text. The template: pipe.prompt_template when set, else
# the pipeline's default (crop_start 95, the real Llama tokenizer's count). A 3D VAE that compresses time 4x (as
# CogVideoX's), latents z * scaling_factor [1, F', C, h, w]; guidance-distilled: guidance embedding guidance * 1000
# (guidance, default the pipeline's 6.0). Temporal patches (patch_size_t > 1) are refused.
def _video_template(pipe) -> dict:
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    return getattr(pipe, "prompt_template", None) or DEFAULT_PROMPT_TEMPLATE


def _video_crop_start(pipe, tokenizer) -> int:
    crop_start = _video_template(pipe).get("crop_start")
    if crop_start is None:
        raise ValueError("prompt_template needs its crop_start (the template's head, in tokens)")
    return crop_start


def _video_text_layout(pipe, tokenizer, prompt, spans, protocol):
    from ...segmentation.families import template_columns

    columns, _ = template_columns(tokenizer, _video_template(pipe)["template"], prompt, spans,
                                  drop=_video_crop_start(pipe, tokenizer), max_length=protocol.t5_tokens)
    return columns, protocol.t5_tokens


def _video_encode(pipe, prompts, protocol, device):
    pe, pooled, mask = pipe.encode_prompt(prompt=prompts, prompt_template=_video_template(pipe), device=device,
                                          max_sequence_length=protocol.t5_tokens)
    return dict(encoder_hidden_states=pe, encoder_attention_mask=mask, pooled_projections=pooled)


def _video_forward(pipe, lat, t, enc, protocol):
    tf = pipe.transformer
    if int(tf.config.patch_size_t) != 1:
        raise NotImplementedError("HunyuanVideo with temporal patches (patch_size_t > 1) is not supported by "
                                  "segment_video yet")
    B = lat.shape[0]
    guidance = embedded_guidance(pipe, lat, protocol.guidance or 6.0, scale=1000.0, dtype=lat.dtype)
    enc = {k: v.to(lat.dtype) if v.is_floating_point() else v for k, v in enc.items()}
    return tf(hidden_states=lat.permute(0, 2, 1, 3, 4), timestep=t.expand(B).to(lat.device, lat.dtype),
              guidance=guidance, return_dict=False, **enc)


# HunyuanVideo 1.5 (HunyuanVideo15Pipeline, text-to-video): the transformer's text block is [image condition
# (vision_num_semantic_tokens, 729), ByT5 (tokenizer_2_max_length, 256), MLLM (tokenizer_max_length, 1000)]
# reordered to valid tokens first ([valid image, valid ByT5, valid MLLM, padding]) with a key mask; text-to-video
# passes zero image embeddings, whose tokens are all masked. So a prompt's column is its position among the valid
# MLLM tokens (Qwen2.5-VL's third-last hidden state of the pipeline's chat template with its system message, the
# first prompt_template_encode_start_idx tokens dropped) plus the count of valid ByT5 tokens (its quoted glyph text;
# 0 when it quotes nothing); the whole block is kept (fixed length: prompts batch). A 3D VAE that compresses time 4x
# (as CogVideoX's), latents z * scaling_factor [1, F', C, h, w]; the forward's input is [latent, zero condition
# latent, zero mask] (2C + 1 channels, as the pipeline's text-to-video); the timestep unscaled, no guidance embedding
# (the pipeline's guider does classifier-free guidance).
def hunyuanvideo15_byt5_tokens(pipe, prompt: str) -> int:
    """Valid ByT5 tokens of ``prompt``'s glyph text (0 when it quotes nothing): they come first in the block."""
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts

    glyph = extract_glyph_texts(prompt)
    if glyph is None:
        return 0
    return len(pipe.tokenizer_2(glyph, truncation=True, max_length=pipe.tokenizer_2_max_length)["input_ids"])


def _video15_text_layout(pipe, tokenizer, prompt, spans, protocol):
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input

    from ...segmentation.families import template_columns

    marker = "\ue000"
    messages = format_text_input([marker], pipe.system_message)[0]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if text.count(marker) != 1:
        raise ValueError("the tokenizer's chat template does not insert the prompt once, verbatim")
    # valid MLLM tokens in order (either padding side: the transformer takes the valid ones), after the crop
    columns, _ = template_columns(tokenizer, text.replace(marker, "{}"), prompt, spans,
                                  drop=template_start_idx(pipe, tokenizer), max_length=pipe.tokenizer_max_length,
                                  special_tokens=False)
    shift = hunyuanvideo15_byt5_tokens(pipe, prompt)  # t2v: no valid image-condition token before them
    n = pipe.vision_num_semantic_tokens + pipe.tokenizer_2_max_length + pipe.tokenizer_max_length
    return [[c + shift for c in cols] for cols in columns], n


def _video15_encode(pipe, prompts, protocol, device):
    tf = pipe.transformer
    pe, mask, pe2, mask2 = pipe.encode_prompt(prompt=prompts, device=device, dtype=tf.dtype, batch_size=len(prompts))
    image = torch.zeros(len(prompts), pipe.vision_num_semantic_tokens, tf.config.image_embed_dim,
                        device=device, dtype=tf.dtype)  # text-to-video: zero (masked) image condition
    return dict(encoder_hidden_states=pe, encoder_attention_mask=mask, encoder_hidden_states_2=pe2,
                encoder_attention_mask_2=mask2, image_embeds=image)


def _video15_forward(pipe, lat, t, enc, protocol):
    x = lat.permute(0, 2, 1, 3, 4)  # [B, C, F', h, w]
    B, _, F, h, w = x.shape
    cond = torch.zeros_like(x)  # the pipeline's text-to-video condition latents and mask: zeros
    x = torch.cat([x, cond, torch.zeros(B, 1, F, h, w, device=x.device, dtype=x.dtype)], dim=1)
    return pipe.transformer(hidden_states=x, timestep=t.expand(B).to(lat.device, lat.dtype), return_dict=False,
                            **enc)


# ------------------------------------------------------------------------ tiny pipelines (the records' Tiny code)
# HunyuanImage 2.1: Qwen2.5-VL text encoder stand-in (as Qwen-Image's) behind the pipeline's chat template (its system
# prefix dropped: the stand-in tokenizer's own count), a real ByT5Tokenizer (bytes: no vocabulary file) and a tiny T5
# for the glyph text, a 2-level HunyuanImage VAE (2 px per latent), patch 1x1; max_length: the MLLM text length the
# pipeline pads to (tokenizer_max_length, 1000 for the real model; 77 here to keep the tests small).
def _tiny_image_parts(max_length):
    from transformers import ByT5Tokenizer

    from ...segmentation.tiny import tiny_bpe_tokenizer, tiny_qwen25_vl, tiny_t5

    tok = tiny_bpe_tokenizer()
    te = tiny_qwen25_vl(tok, num_layers=3)
    tok2 = ByT5Tokenizer()
    return dict(text_encoder=te, tokenizer=tok, text_encoder_2=tiny_t5(tok2), tokenizer_2=tok2)


def _tiny_image_vae():
    from diffusers import AutoencoderKLHunyuanImage

    return AutoencoderKLHunyuanImage(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                                     layers_per_block=1, spatial_compression_ratio=2, sample_size=32,
                                     scaling_factor=0.75)


def _tiny_image_after(pipe, max_length):
    count_template_start(pipe)
    pipe.tokenizer_max_length = max_length


# HunyuanVideo (configs like diffusers' tests): a Llama text encoder stand-in (3 layers, hidden 16; the pipeline reads
# the third-last hidden state) with the byte-level tokenizer behind the pipeline's own template, a CLIP stand-in for
# the pooled text, a 4-level HunyuanVideo VAE (8 px per latent, time 4x), patch 1. pipe.prompt_template: the
# pipeline's template with crop_start counted by the stand-in tokenizer (the real one's 95 is the real Llama
# tokenizer's count); the segmentation family and generate pass it.
def _tiny_video_parts(max_length):
    from transformers import LlamaConfig, LlamaModel

    from ...segmentation.tiny import tiny_bpe_tokenizer, tiny_clip, tiny_clip_tokenizer

    tok = tiny_bpe_tokenizer()
    te = LlamaModel(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=16, num_hidden_layers=3,
                                num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                                bos_token_id=None, eos_token_id=None))
    tok2 = tiny_clip_tokenizer()
    return dict(text_encoder=te, tokenizer=tok, text_encoder_2=tiny_clip(tok2, projection=False), tokenizer_2=tok2)


def _tiny_video_vae():
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True,
    )


def _tiny_video_after(pipe, max_length):
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    template = DEFAULT_PROMPT_TEMPLATE["template"]
    pipe.prompt_template = dict(template=template, crop_start=len(pipe.tokenizer(template.split("{}")[0])["input_ids"]))


# HunyuanVideo 1.5 (text-to-video; configs like diffusers' test): a Qwen2.5-VL text model stand-in (3 layers, hidden
# 16; the pipeline reads the third-last hidden state) with the byte-level tokenizer and a Qwen-style chat template, a
# real ByT5Tokenizer and a tiny T5 for the glyph text, a 3-level HunyuanVideo 1.5 VAE (8 px per latent, time 4x, 4
# channels), patch 1. Scaled down like the other tiny pipelines: max_length MLLM tokens (tokenizer_max_length, 1000
# for the real model), 32 ByT5 tokens (256), 9 image-condition tokens (vision_num_semantic_tokens, 729);
# prompt_template_encode_start_idx: the stand-in tokenizer's count of the template's head (the real 108 is the real
# Qwen tokenizer's).
def _tiny_video15_parts(max_length):
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    from ...segmentation.tiny import TINY_CHAT_TEMPLATE, tiny_bpe_tokenizer, tiny_t5

    tok = tiny_bpe_tokenizer()
    tok.chat_template = TINY_CHAT_TEMPLATE
    te = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        hidden_size=16, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
        rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}, rope_theta=1000000.0,
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=None))
    tok2 = ByT5Tokenizer()
    return dict(text_encoder=te, tokenizer=tok, text_encoder_2=tiny_t5(tok2), tokenizer_2=tok2,
                guider=ClassifierFreeGuidance(guidance_scale=1.0))


def _tiny_video15_vae():
    from diffusers import AutoencoderKLHunyuanVideo15

    return AutoencoderKLHunyuanVideo15(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8),
                                       layers_per_block=1, spatial_compression_ratio=8, temporal_compression_ratio=4,
                                       downsample_match_channel=False, upsample_match_channel=False)


def _tiny_video15_after(pipe, max_length):
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input

    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length, pipe.vision_num_semantic_tokens = max_length, 32, 9
    marker = "\ue000"
    head = pipe.tokenizer.apply_chat_template(format_text_input([marker], pipe.system_message)[0],
                                              add_generation_prompt=True, tokenize=False).split(marker)[0]
    pipe.prompt_template_encode_start_idx = len(pipe.tokenizer(head, add_special_tokens=False)["input_ids"])


_SHIFT = lambda shift: ("FlowMatchEulerDiscreteScheduler", dict(shift=shift))  # noqa: E731
_FIRST = ("parts", "vae", "transformer")
_TINY_IMAGE = Tiny(pipeline="HunyuanImagePipeline", parts=_tiny_image_parts, max_length=77, vae=_tiny_image_vae,
                   scheduler=_SHIFT(3.0), after=_tiny_image_after, order=_FIRST,
                   transformer=dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                    num_layers=2, num_single_layers=1, num_refiner_layers=1, patch_size=(1, 1),
                                    text_embed_dim=16, text_embed_2_dim=32, rope_axes_dim=(4, 4)))
_TINY_VIDEO = Tiny(pipeline="HunyuanVideoPipeline", parts=_tiny_video_parts, vae=_tiny_video_vae,
                   scheduler=_SHIFT(7.0), after=_tiny_video_after, order=_FIRST,
                   transformer=dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
                                    num_layers=2, num_single_layers=1, num_refiner_layers=1, patch_size=1,
                                    patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
                                    pooled_projection_dim=32, rope_axes_dim=(2, 4, 4)))
_TINY_VIDEO15 = Tiny(pipeline="HunyuanVideo15Pipeline", parts=_tiny_video15_parts, max_length=64,
                     vae=_tiny_video15_vae, scheduler=_SHIFT(7.0), after=_tiny_video15_after, order=_FIRST,
                     transformer=dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                      num_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1,
                                      text_embed_dim=16, text_embed_2_dim=32, image_embed_dim=12,
                                      rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v"))


HUNYUANIMAGE = Family(
    family="hunyuanimage", title="HunyuanImage 2.1", transformers=("diffusers.HunyuanImageTransformer2DModel",),
    processors=(_T + "transformer_hunyuanimage.HunyuanImageAttnProcessor",), blocks=FLUX_LAYERS, text_at="end",
    cfg_batched=False,  # HunyuanImagePipeline: its guider runs one forward per condition (cache_context "pred_uncond")
    read=_read_image, grid_text="`(H/p, W/p)`", text="mask: `encoder_attention_mask`",
    segment=Segment(pipelines=("HunyuanImagePipeline",), model_ids=("hunyuanimage", "hunyuan-image"),
                    settings=dict(num_inference_steps=50, drop_t5=False), latents="scale",
                    columns=("Qwen2.5-VL prompt tokens after the system prefix, after the valid ByT5 tokens; padding "
                             "masked"),
                    schedule=_schedule, text_layout=_image_text_layout, text_head=template_start_idx,
                    encode=_image_encode, forward=_image_forward, generate=_image_generate,
                    tiny={"hunyuanimage": _TINY_IMAGE}),
)
HUNYUANVIDEO = replace(
    HUNYUANIMAGE, family="hunyuanvideo", title="HunyuanVideo",
    transformers=("diffusers.HunyuanVideoTransformer3DModel",),
    processors=(_T + "transformer_hunyuan_video.HunyuanVideoAttnProcessor2_0",),
    # HunyuanVideoPipeline: true CFG, the unconditional forward inside cache_context("uncond")
    read=_read_video, grid_text="`(F/p_t, H/p, W/p)`", video=True,
    segment=Segment(pipelines=("HunyuanVideoPipeline",), model_ids=("hunyuanvideo",),
                    settings=dict(num_inference_steps=50, size=480, resize="square", drop_t5=False, t5_tokens=256,
                                  guidance=6.0), latents="video",
                    columns="Llama prompt tokens after the template's `crop_start`; padding masked",
                    schedule=_schedule, text_layout=_video_text_layout, text_head=_video_crop_start,
                    encode=_video_encode, forward=_video_forward, generate_tokens=256,
                    tiny={"hunyuanvideo": _TINY_VIDEO}),
)
HUNYUANVIDEO15 = replace(
    HUNYUANIMAGE, family="hunyuanvideo15", title="HunyuanVideo 1.5",
    transformers=("diffusers.HunyuanVideo15Transformer3DModel",),
    processors=(_T + "transformer_hunyuan_video15.HunyuanVideo15AttnProcessor2_0",),
    blocks=(Layers("transformer_blocks.{i}.attn"),),  # HunyuanVideo15Pipeline: its guider, one forward per condition
    read=_read_video15, grid_text="`(F/p_t, H/p, W/p)`", text="`[image cond., ByT5, MLLM]`, masks", video=True,
    segment=Segment(pipelines=("HunyuanVideo15Pipeline",), model_ids=("hunyuanvideo15", "hunyuanvideo-1.5"),
                    settings=dict(num_inference_steps=50, size=480, resize="square", drop_t5=False),
                    columns=("Qwen2.5-VL prompt tokens after the template head, after the valid ByT5 tokens; padding "
                             "masked (text-to-video)"),
                    latents="video", schedule=_schedule, text_layout=_video15_text_layout,
                    text_head=template_start_idx,
                    encode=_video15_encode, forward=_video15_forward, generate_tokens=256,
                    tiny={"hunyuanvideo15": _TINY_VIDEO15}),
)
HUNYUANVIDEO_FRAMEPACK = replace(
    HUNYUANVIDEO, family="hunyuanvideo_framepack", title="HunyuanVideo FramePack",
    transformers=("diffusers.HunyuanVideoFramepackTransformer3DModel",), read=_read_framepack,
    reorder=_generated_first, grid_text="generated frames `(F/p_t, H/p, W/p)` (history reordered)",
    text="`[image tokens, prompt]`, mask", segment=None,
)
FAMILIES = (HUNYUANIMAGE, HUNYUANVIDEO, HUNYUANVIDEO15, HUNYUANVIDEO_FRAMEPACK)
