"""JoyImage (Edit) and JoyImage Edit Plus: ``double_blocks.{i}.attn`` over ``[image, text]``.

- JoyImage: ``JoyImageEditTransformer3DModel`` (``JoyImageAttnProcessor``, no mask). The latent is ``[B, C, T, H, W]``
  or, for editing, ``[B, items, C, T, H, W]`` with the generated item last: the transformer moves it first, so the
  image tokens are ``[generated, references]`` and the grid is one item's ``(T / p_t, H / p_h, W / p_w)`` (``(h, w)``
  for one frame); the store keeps its rows. The pipelines pad the text with zeros and pass no mask (the padding takes
  part, as in the model).
- JoyImage Edit Plus: ``JoyImageEditPlusTransformer3DModel`` (``JoyImageEditPlusAttnProcessor``), the image part a
  padded sequence of patches ``[generated, references, padding]`` with per-sample ``shape_list`` (the generated image
  first). ``encoder_hidden_states_mask`` ``[B, T]`` gives the boolean key mask ``[B, 1, 1, N]`` of the padded image
  patches and text: captured. The grid is the generated image's (the same in every sample).
"""
from __future__ import annotations

from dataclasses import replace

from .record import Family, Layers, image_grid

__all__ = ["JOYIMAGE", "JOYIMAGE_EDIT_PLUS", "FAMILIES"]

_T = "diffusers.models.transformers."


def _read(transformer, bound: dict):
    hidden_states = bound["hidden_states"]  # [B, C, T, H, W] or [B, items, C, T, H, W]
    p_t, p_h, p_w = transformer.config.patch_size
    t, h, w = hidden_states.shape[-3:]
    grid = image_grid(t // p_t, h // p_h, w // p_w)
    return bound["encoder_hidden_states"].shape[1], grid, hidden_states.shape[0]


def _read_plus(transformer, bound: dict):
    hidden_states = bound["hidden_states"]  # [B, max patches, C, p_t, p_h, p_w]
    shape_list = bound.get("shape_list")  # per sample [(t, h, w) of the generated image, of each reference]
    generated = {tuple(int(x) for x in shapes[0]) for shapes in shape_list or ()}
    if len(generated) > 1:
        raise ValueError(
            f"capture on JoyImageEditPlusTransformer3DModel: the generated images of the batch have different "
            f"grids {sorted(generated)}; one grid per forward is supported"
        )
    grid = image_grid(*generated.pop()) if generated else None
    return bound["encoder_hidden_states"].shape[1], grid, hidden_states.shape[0]


JOYIMAGE = Family(
    family="joyimage", title="JoyImage (Edit)", transformers=("diffusers.JoyImageEditTransformer3DModel",),
    processors=(_T + "transformer_joyimage.JoyImageAttnProcessor",), blocks=(Layers("double_blocks.{i}.attn"),),
    text_at="end", cfg_batched=False,  # JoyImageEditPipeline: the negative prompt's forward after the positive one
    read=_read, grid_text="one item's `(T/p_t, H/p, W/p)`",
)
JOYIMAGE_EDIT_PLUS = replace(
    JOYIMAGE, family="joyimage_edit_plus", title="JoyImage Edit Plus",
    transformers=("diffusers.JoyImageEditPlusTransformer3DModel",),
    processors=(_T + "transformer_joyimage_edit_plus.JoyImageEditPlusAttnProcessor",),
    cfg_batched=True,  # JoyImageEditPlusPipeline batches [uncond, cond] in one forward
    read=_read_plus, grid_text="first of `shape_list`", text="mask: `encoder_hidden_states_mask`",
)
FAMILIES = (JOYIMAGE, JOYIMAGE_EDIT_PLUS)
