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

from .record import Family, Layers, MIDDLE, Segment, read_latent

__all__ = ["COGVIEW4", "COGVIEW3PLUS", "GLM_IMAGE", "FAMILIES"]

_T = "diffusers.models.transformers."
_SEG = "seg4diff_fast.segmentation.families."  # the Seg4Diff descriptions (segment.description)


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


COGVIEW4 = Family(
    family="cogview4", title="CogView4", transformers=("diffusers.CogView4Transformer2DModel",),
    processors=(_T + "transformer_cogview4.CogView4AttnProcessor",), blocks=(Layers("transformer_blocks.{i}.attn1"),),
    text_at="start",
    cfg_batched=False,  # CogView4Pipeline: conditional and unconditional forwards one after the other
    read=read_latent, grid_text="`(H/p, W/p)`",
    segment=Segment(pipelines=("CogView4Pipeline",), layer=MIDDLE, model_ids=("cogview4",),
                    settings=dict(prompt_batch=1, generate_guidance_scale=5.0),
                    description=_SEG + "CogView4Family", batch_prompts=False,
                    tiny={"cogview4": ("tiny_cogview4_pipeline", {})}),
)
COGVIEW3PLUS = replace(
    COGVIEW4, family="cogview3plus", title="CogView3-Plus", transformers=("diffusers.CogView3PlusTransformer2DModel",),
    processors=("diffusers.models.attention_processor.CogVideoXAttnProcessor2_0",),
    cfg_batched=True,  # CogView3PlusPipeline batches [uncond, cond] in one forward
    segment=Segment(pipelines=("CogView3PlusPipeline",), layer=MIDDLE, model_ids=("cogview3-plus", "cogview3plus"),
                    settings=dict(num_inference_steps=50, t5_tokens=224, generate_guidance_scale=7.0),
                    description=_SEG + "CogView3PlusFamily",
                    tiny={"cogview3plus": ("tiny_cogview3plus_pipeline", {})}),
)
GLM_IMAGE = replace(
    COGVIEW4, family="glm_image", title="GLM-Image", transformers=("diffusers.GlmImageTransformer2DModel",),
    processors=(_T + "transformer_glm_image.GlmImageAttnProcessor",),
    cfg_batched=False,  # GlmImagePipeline: the unconditional forward after the conditional one
    read=_glm_read, skip=_glm_skip, text="KV-cache reads refused", segment=None,
)
FAMILIES = (COGVIEW4, COGVIEW3PLUS, GLM_IMAGE)
