"""HiDream-I1: ``HiDreamImageTransformer2DModel``, ``double_stream_blocks.{i}`` then ``single_stream_blocks.{j}``
(attention ``.block.attn1``, ``HiDreamAttnProcessor``, SDPA), ``[image, text]`` in both kinds of block. The text of
every block is ``[T5, Llama (last listed layer), Llama (this block's layer)]``: ``T5 + 2 * L`` tokens, the same in
every block. Non-square latents are padded to ``max_seq`` image tokens (their keys zeroed by the processor, as the
model does); the grid ``(H / p, W / p)`` keeps the real image's rows only.
"""
from __future__ import annotations

from .record import Family, Layers, MIDDLE, Segment, latent_grid

_SEG = "seg4diff_fast.segmentation.families."  # the Seg4Diff descriptions (segment.description)

__all__ = ["HIDREAM", "FAMILIES"]


def _read(transformer, bound: dict):
    hidden_states = bound["hidden_states"]  # [B, C, H, W] latent (pre-patchified input: refused below)
    if hidden_states.ndim != 4:
        raise ValueError(
            "capture on HiDream needs the latent as [B, C, H, W] (hidden_states), got a pre-patchified "
            f"{tuple(hidden_states.shape)}"
        )
    llama = bound["encoder_hidden_states_llama3"]  # [layers, B, L, D] (or a list of [B, L, D])
    text_len = bound["encoder_hidden_states_t5"].shape[1] + 2 * llama[0].shape[-2]
    return text_len, latent_grid(transformer, hidden_states), hidden_states.shape[0]


HIDREAM = Family(
    family="hidream", title="HiDream-I1", transformers=("diffusers.HiDreamImageTransformer2DModel",),
    processors=("diffusers.models.transformers.transformer_hidream_image.HiDreamAttnProcessor",),
    blocks=(Layers("double_stream_blocks.{i}.block.attn1"), Layers("single_stream_blocks.{i}.block.attn1", "single")),
    text_at="end", cfg_batched=True,  # HiDreamImagePipeline batches [uncond, cond] in one forward
    read=_read, grid_text="`(H/p, W/p)`",
    segment=Segment(pipelines=("HiDreamImagePipeline",), layer=MIDDLE, model_ids=("hidream",),
                    settings=dict(tokenizer="tokenizer_3", drop_t5=False, t5_tokens=128, generate_guidance_scale=5.0),
                    description=_SEG + "HiDreamFamily",
                    tiny={"hidream": ("tiny_hidream_pipeline", {})}),
)
FAMILIES = (HIDREAM,)
