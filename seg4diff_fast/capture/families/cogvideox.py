"""CogVideoX (1.0 and 1.5) and ConsisID (``ConsisIDTransformer3DModel``, the same blocks and processor):
``CogVideoXTransformer3DModel``, ``transformer_blocks.{i}.attn1`` with ``CogVideoXAttnProcessor2_0`` (SDPA),
``[text, video]``. Grid ``(frames, H / p, W / p)`` of the latent ``[B, F, C, H, W]``, ``frames = ceil(F / p_t)``
with CogVideoX 1.5's temporal patch ``p_t`` (tokens are frame-major, then row-major).
"""
from __future__ import annotations

from dataclasses import replace

from .record import Family, Layers, MIDDLE, Segment

_SEG = "seg4diff_fast.segmentation.families."  # the Seg4Diff descriptions (segment.description)

__all__ = ["COGVIDEOX", "CONSISID", "FAMILIES"]


def _read(transformer, bound: dict):
    hidden_states = bound["hidden_states"]  # [B, F, C, H, W] latent video
    p, p_t = transformer.config.patch_size, getattr(transformer.config, "patch_size_t", None)
    frames = hidden_states.shape[1] if p_t is None else -(-hidden_states.shape[1] // p_t)
    grid = (frames, hidden_states.shape[-2] // p, hidden_states.shape[-1] // p)
    return bound["encoder_hidden_states"].shape[1], grid, hidden_states.shape[0]


COGVIDEOX = Family(
    family="cogvideox", title="CogVideoX 1.0 / 1.5", transformers=("diffusers.CogVideoXTransformer3DModel",),
    processors=("diffusers.models.attention_processor.CogVideoXAttnProcessor2_0",),
    blocks=(Layers("transformer_blocks.{i}.attn1"),), text_at="start",
    cfg_batched=True,  # CogVideoXPipeline batches [uncond, cond] in one forward
    read=_read, grid_text="`(frames, H/p, W/p)`", video=True,
    segment=Segment(pipelines=("CogVideoXPipeline", "CogVideoXVideoToVideoPipeline"), layer=MIDDLE,
                    model_ids=("cogvideox",), settings=dict(num_inference_steps=50, size=480, resize="square",
                                                            t5_tokens=226, generate_guidance_scale=6.0),
                    description=_SEG + "CogVideoXFamily",
                    tiny={"cogvideox": ("tiny_cogvideox_pipeline", {}),
                          "cogvideox1.5": ("tiny_cogvideox_pipeline", dict(patch_size_t=2))}),
)
CONSISID = replace(COGVIDEOX, family="consisid", title="ConsisID",
                   transformers=("diffusers.ConsisIDTransformer3DModel",), segment=None)
FAMILIES = (COGVIDEOX, CONSISID)
