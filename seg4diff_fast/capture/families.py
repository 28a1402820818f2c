"""Families captured through :mod:`seg4diff_fast.capture.dispatch` that need no code of their own beyond where
the text sits, its length and the image grid: CogView4 (image) and CogVideoX (video).

- CogView4: ``CogView4Transformer2DModel``, ``transformer_blocks.{i}.attn1`` with ``CogView4AttnProcessor``
  (``F.scaled_dot_product_attention``), joint sequence ``[text, image]``, RoPE on the image part only. Its
  pipeline passes no attention mask; a forward given ``attention_mask`` is refused at the attention call.
  Grid ``(H / p, W / p)`` of the latent ``[B, C, H, W]`` (patches row-major).
- CogVideoX (1.0 and 1.5): ``CogVideoXTransformer3DModel``, ``transformer_blocks.{i}.attn1`` with
  ``CogVideoXAttnProcessor2_0`` (SDPA), ``[text, video]``. Grid ``(frames, H / p, W / p)`` of the latent
  ``[B, F, C, H, W]``, ``frames = ceil(F / p_t)`` with CogVideoX 1.5's temporal patch ``p_t`` (tokens are
  frame-major, then row-major).
"""
from __future__ import annotations

from typing import List

from .base import LayerSpec
from .dispatch import DispatchAdapter

__all__ = ["CogView4Adapter", "CogVideoXAdapter"]


class _BlocksAttn1(DispatchAdapter):
    """Families with one joint attention per block: ``transformer_blocks.{i}.attn1``, integer ``i``."""

    @classmethod
    def layers(cls, transformer) -> List[LayerSpec]:
        return [LayerSpec(f"transformer_blocks.{i}", b.attn1, "joint") for i, b in enumerate(transformer.transformer_blocks)]

    @classmethod
    def index_to_name(cls, transformer, index: int) -> str:
        return f"transformer_blocks.{index}"


class CogView4Adapter(_BlocksAttn1):
    family = "cogview4"
    cfg_batched = False  # CogView4Pipeline: conditional and unconditional forwards one after the other
    text_at = "start"

    @classmethod
    def transformer_classes(cls):
        from diffusers import CogView4Transformer2DModel

        return (CogView4Transformer2DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.transformers.transformer_cogview4 import CogView4AttnProcessor

        return (CogView4AttnProcessor,)

    @classmethod
    def read_forward(cls, transformer, bound: dict):
        hidden_states = bound["hidden_states"]  # [B, C, H, W] latent
        p = transformer.config.patch_size
        grid = (hidden_states.shape[-2] // p, hidden_states.shape[-1] // p)
        return bound["encoder_hidden_states"].shape[1], grid, hidden_states.shape[0]


class CogVideoXAdapter(_BlocksAttn1):
    family = "cogvideox"
    cfg_batched = True  # CogVideoXPipeline batches [uncond, cond] in one forward
    text_at = "start"

    @classmethod
    def transformer_classes(cls):
        from diffusers import CogVideoXTransformer3DModel

        return (CogVideoXTransformer3DModel,)

    @classmethod
    def processor_classes(cls, spec: LayerSpec):
        from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

        return (CogVideoXAttnProcessor2_0,)

    @classmethod
    def read_forward(cls, transformer, bound: dict):
        hidden_states = bound["hidden_states"]  # [B, F, C, H, W] latent video
        p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
        frames = hidden_states.shape[1] if p_t is None else -(-hidden_states.shape[1] // p_t)
        grid = (frames, hidden_states.shape[-2] // p, hidden_states.shape[-1] // p)
        return bound["encoder_hidden_states"].shape[1], grid, hidden_states.shape[0]
