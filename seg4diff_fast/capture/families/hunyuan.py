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

from .flux import FLUX_LAYERS
from .record import Family, Layers, MIDDLE, Segment, video_grid

__all__ = ["HUNYUANIMAGE", "HUNYUANVIDEO", "HUNYUANVIDEO15", "HUNYUANVIDEO_FRAMEPACK", "FAMILIES"]

_T = "diffusers.models.transformers."
_SEG = "seg4diff_fast.segmentation.families."  # the Seg4Diff descriptions (segment.description)


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


HUNYUANIMAGE = Family(
    family="hunyuanimage", title="HunyuanImage 2.1", transformers=("diffusers.HunyuanImageTransformer2DModel",),
    processors=(_T + "transformer_hunyuanimage.HunyuanImageAttnProcessor",), blocks=FLUX_LAYERS, text_at="end",
    cfg_batched=False,  # HunyuanImagePipeline: its guider runs one forward per condition (cache_context "pred_uncond")
    read=_read_image, grid_text="`(H/p, W/p)`", text="mask: `encoder_attention_mask`",
    segment=Segment(pipelines=("HunyuanImagePipeline",), layer=MIDDLE, model_ids=("hunyuanimage", "hunyuan-image"),
                    settings=dict(num_inference_steps=50, drop_t5=False), description=_SEG + "HunyuanImageFamily",
                    tiny={"hunyuanimage": ("tiny_hunyuanimage_pipeline", {})}),
)
HUNYUANVIDEO = replace(
    HUNYUANIMAGE, family="hunyuanvideo", title="HunyuanVideo",
    transformers=("diffusers.HunyuanVideoTransformer3DModel",),
    processors=(_T + "transformer_hunyuan_video.HunyuanVideoAttnProcessor2_0",),
    # HunyuanVideoPipeline: true CFG, the unconditional forward inside cache_context("uncond")
    read=_read_video, grid_text="`(F/p_t, H/p, W/p)`", video=True,
    segment=Segment(pipelines=("HunyuanVideoPipeline",), layer=MIDDLE, model_ids=("hunyuanvideo",),
                    settings=dict(num_inference_steps=50, size=480, resize="square", drop_t5=False, t5_tokens=256,
                                  guidance=6.0), description=_SEG + "HunyuanVideoFamily",
                    tiny={"hunyuanvideo": ("tiny_hunyuanvideo_pipeline", {})}),
)
HUNYUANVIDEO15 = replace(
    HUNYUANIMAGE, family="hunyuanvideo15", title="HunyuanVideo 1.5",
    transformers=("diffusers.HunyuanVideo15Transformer3DModel",),
    processors=(_T + "transformer_hunyuan_video15.HunyuanVideo15AttnProcessor2_0",),
    blocks=(Layers("transformer_blocks.{i}.attn"),),  # HunyuanVideo15Pipeline: its guider, one forward per condition
    read=_read_video15, grid_text="`(F/p_t, H/p, W/p)`", text="`[image cond., ByT5, MLLM]`, masks", video=True,
    segment=Segment(pipelines=("HunyuanVideo15Pipeline",), layer=MIDDLE,
                    model_ids=("hunyuanvideo15", "hunyuanvideo-1.5"),
                    settings=dict(num_inference_steps=50, size=480, resize="square", drop_t5=False),
                    description=_SEG + "HunyuanVideo15Family",
                    tiny={"hunyuanvideo15": ("tiny_hunyuanvideo15_pipeline", {})}),
)
HUNYUANVIDEO_FRAMEPACK = replace(
    HUNYUANVIDEO, family="hunyuanvideo_framepack", title="HunyuanVideo FramePack",
    transformers=("diffusers.HunyuanVideoFramepackTransformer3DModel",), read=_read_framepack,
    reorder=_generated_first, grid_text="generated frames `(F/p_t, H/p, W/p)` (history reordered)",
    text="`[image tokens, prompt]`, mask", segment=None,
)
FAMILIES = (HUNYUANIMAGE, HUNYUANVIDEO, HUNYUANVIDEO15, HUNYUANVIDEO_FRAMEPACK)
