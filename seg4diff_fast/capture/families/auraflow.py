"""AuraFlow: ``AuraFlowTransformer2DModel``, ``joint_transformer_blocks.{i}`` (MM-DiT) then
``single_transformer_blocks.{j}``, ``AuraFlowAttnProcessor2_0`` (or its fused variant; SDPA), ``[text, image]``. The
text block is ``[8 register tokens, prompt tokens]`` (the model prepends its learnt ``register_tokens``): prompt token
``t`` is text column ``8 + t``. No mask. Grid ``(H / p, W / p)`` of the latent ``[B, C, H, W]``.
"""
from __future__ import annotations

from .record import Family, Layers, latent_grid

__all__ = ["AURAFLOW", "FAMILIES"]


def _read(transformer, bound: dict):
    hidden_states = bound["hidden_states"]  # [B, C, H, W] latent
    text_len = transformer.register_tokens.shape[1] + bound["encoder_hidden_states"].shape[1]
    return text_len, latent_grid(transformer, hidden_states), hidden_states.shape[0]


AURAFLOW = Family(
    family="auraflow", title="AuraFlow", transformers=("diffusers.AuraFlowTransformer2DModel",),
    processors=("diffusers.models.attention_processor.AuraFlowAttnProcessor2_0",
                "diffusers.models.attention_processor.FusedAuraFlowAttnProcessor2_0"),
    blocks=(Layers("joint_transformer_blocks.{i}.attn"), Layers("single_transformer_blocks.{i}.attn", "single")),
    text_at="start", cfg_batched=True,  # AuraFlowPipeline batches [uncond, cond] in one forward
    read=_read, grid_text="`(H/p, W/p)`", text="`[8 register tokens, prompt]`",
)
FAMILIES = (AURAFLOW,)
