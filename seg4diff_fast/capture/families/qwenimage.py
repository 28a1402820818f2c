"""Qwen-Image (and its Edit pipelines): ``QwenImageTransformer2DModel``, ``transformer_blocks.{i}`` with
``QwenDoubleStreamAttnProcessor2_0`` (dispatcher), ``[text, image]``. Its pipelines pass ``encoder_hidden_states_mask``
``[B, T]`` when the prompts of a batch have padding (``None`` when every token is valid, e.g. one prompt per
forward); the processor turns it into the key mask ``[B, 1, 1, N]``, which capture passes on to ``joint_attention``
(masked text columns of the maps are 0). Grid: the first entry of ``img_shapes`` (the generated image; Edit appends
the condition images after it).
"""
from __future__ import annotations

from .record import Family, Layers, MIDDLE, Segment

_SEG = "seg4diff_fast.segmentation.families."  # the Seg4Diff descriptions (segment.description)

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


QWENIMAGE = Family(
    family="qwenimage", title="Qwen-Image (and Edit)", transformers=("diffusers.QwenImageTransformer2DModel",),
    processors=("diffusers.models.transformers.transformer_qwenimage.QwenDoubleStreamAttnProcessor2_0",),
    blocks=(Layers("transformer_blocks.{i}.attn"),), text_at="start",
    cfg_batched=False,  # QwenImagePipeline: true CFG, the unconditional forward inside cache_context("uncond")
    read=read_img_shapes, grid_text="first of `img_shapes`", text="mask: `encoder_hidden_states_mask`",
    segment=Segment(pipelines=("QwenImagePipeline",), layer=MIDDLE, model_ids=("qwen-image", "qwenimage"),
                    settings=dict(prompt_batch=1, generate_guidance_scale=4.0), models="Qwen-Image",
                    description=_SEG + "QwenImageFamily", batch_prompts=False,
                    tiny={"qwenimage": ("tiny_qwenimage_pipeline", {})}),
)
FAMILIES = (QWENIMAGE,)
