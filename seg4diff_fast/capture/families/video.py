"""Video families with no code of their own beyond the text length and the grid: EasyAnimate, Motif-Video, Mochi.

- EasyAnimate V5.1: ``EasyAnimateTransformer3DModel``, ``transformer_blocks.{i}.attn1``
  (``EasyAnimateAttnProcessor2_0``, SDPA; MM-DiT blocks project the text separately, the blocks past ``mmdit_layers``
  concatenate it first: both ``[text, video]``, RoPE on the video part). Text block: the ``encoder_hidden_states``
  tokens, then the ``encoder_hidden_states_t5`` ones when given. No mask (the pipeline's text mask is for its text
  encoder only). Grid ``(F, H / p, W / p)`` of the latent ``[B, C, F, H, W]`` (no temporal patch).
- Motif-Video: ``MotifVideoTransformer3DModel``, ``transformer_blocks.{i}`` then ``single_transformer_blocks.{j}``
  (``.attn``, ``MotifVideoAttnProcessor2_0``, dispatcher; the single blocks hand the processor the text part apart
  too), ``[video, text]`` with the text block ``[image_embeds tokens (image-to-video), prompt tokens]``. Its forward
  builds the key mask ``[B, 1, 1, N]`` from ``encoder_attention_mask`` (captured as a key mask). The last
  ``num_decoder_layers`` single blocks attend from the video to the encoder's video tokens (no text): refused. The
  optional text cross-attention (``.cross_attn``, a second attention to the text) is not captured: the maps are the
  joint attention's. Grid ``(F / p_t, H / p, W / p)``.
- Mochi 1: ``MochiTransformer3DModel``, ``transformer_blocks.{i}.attn1`` (``MochiAttnProcessor2_0``, SDPA). Its
  processor calls attention once PER SAMPLE, on ``[video, that sample's valid text tokens]`` (gathered by
  ``encoder_attention_mask``): one layer call is ``B`` attention calls of different lengths, while a capture site
  records one call per layer call. So capture serves a transformer batch of one (the text block: the valid tokens,
  in order) and refuses a larger batch before the forward runs (MochiPipeline batches ``[uncond, cond]`` under
  guidance). Grid ``(F, H / p, W / p)`` of the latent ``[B, C, F, H, W]`` (no temporal patch).
"""
from __future__ import annotations

from .record import Family, Layers, video_grid

__all__ = ["EASYANIMATE", "MOTIF_VIDEO", "MOCHI", "FAMILIES"]

_T = "diffusers.models.transformers."


def _read_easyanimate(transformer, bound: dict):
    hidden_states = bound["hidden_states"]  # [B, C, F, H, W] latent video
    t5 = bound.get("encoder_hidden_states_t5")
    text_len = bound["encoder_hidden_states"].shape[1] + (0 if t5 is None else t5.shape[1])
    return text_len, video_grid(transformer, hidden_states), hidden_states.shape[0]


def _read_motif(transformer, bound: dict):
    hidden_states = bound["hidden_states"]  # [B, C, F, H, W] latent video
    image_embeds = bound.get("image_embeds")  # [B, T_img, D] or None
    text_len = bound["encoder_hidden_states"].shape[1] + (0 if image_embeds is None else image_embeds.shape[1])
    return text_len, video_grid(transformer, hidden_states), hidden_states.shape[0]


def _motif_decoder_blocks(transformer):
    singles = len(transformer.single_transformer_blocks)
    return {f"single_transformer_blocks.{j}": "a Motif-Video decoder block: it attends to the encoder's video "
            "tokens, not to the text" for j in range(singles - transformer.num_decoder_layers, singles)}


def _read_mochi(transformer, bound: dict):
    hidden_states = bound["hidden_states"]  # [B, C, F, H, W] latent video
    if hidden_states.shape[0] != 1:
        raise ValueError(
            f"capture on Mochi needs a transformer batch of one, got {hidden_states.shape[0]}: MochiAttnProcessor2_0 "
            "calls attention once per sample (on the video and that sample's valid text tokens), and capture records "
            "one attention call per layer call. Call the transformer once per sample (MochiPipeline batches "
            "[uncond, cond] when guidance_scale > 1)"
        )
    text_len = int(bound["encoder_attention_mask"].sum())  # the processor gathers the valid tokens (a sync too)
    return text_len, video_grid(transformer, hidden_states), 1


EASYANIMATE = Family(
    family="easyanimate", title="EasyAnimate", transformers=("diffusers.EasyAnimateTransformer3DModel",),
    processors=(_T + "transformer_easyanimate.EasyAnimateAttnProcessor2_0",),
    blocks=(Layers("transformer_blocks.{i}.attn1"),), text_at="start",
    cfg_batched=True,  # EasyAnimatePipeline batches [uncond, cond] in one forward
    read=_read_easyanimate, grid_text="`(F, H/p, W/p)`", text="`[prompt, T5]`", video=True,
)
MOTIF_VIDEO = Family(
    family="motif_video", title="Motif-Video", transformers=("diffusers.MotifVideoTransformer3DModel",),
    processors=(_T + "transformer_motif_video.MotifVideoAttnProcessor2_0",),
    blocks=(Layers("transformer_blocks.{i}.attn"),
            Layers("single_transformer_blocks.{i}.attn", "single", skip_last="num_decoder_layers")),
    text_at="end",
    cfg_batched=False,  # MotifVideoPipeline: its guider runs one forward per condition (cache_context "pred_uncond")
    read=_read_motif, grid_text="`(F/p_t, H/p, W/p)`", text="`[image tokens, prompt]`, mask; decoder blocks refused",
    refused=_motif_decoder_blocks, video=True,
)
MOCHI = Family(
    family="mochi", title="Mochi 1 (batch of one)", transformers=("diffusers.MochiTransformer3DModel",),
    processors=("diffusers.models.attention_processor.MochiAttnProcessor2_0",),
    blocks=(Layers("transformer_blocks.{i}.attn1"),), text_at="end", cfg_batched=True, read=_read_mochi,
    grid_text="`(F, H/p, W/p)`", text="the valid tokens", video=True,
)
FAMILIES = (EASYANIMATE, MOTIF_VIDEO, MOCHI)
