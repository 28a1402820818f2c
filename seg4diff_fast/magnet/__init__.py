"""MAGNET (the paper's mask-alignment fine-tuning): loss, data and LoRA layout. See docs/05-training.md.

- :mod:`.criterion`: candidate maps from the expert layer's i2t scores, Hungarian matching, focal + dice.
- :mod:`.data`: COCO-style and SA-1B-style folder datasets with prompts and the text columns of each mask.
- :mod:`.lora`: the paper's LoRA config, saving in diffusers' format, loading ours and the paper's checkpoints.
- :mod:`.prompt_tokens`: learnable prompt tokens (``USE_LEARNABLE_TOKENS``), saved beside the LoRA.
- :mod:`.train`: the training run, and ``apply_lora`` (the LoRA with its map head and tokens, into a Segmenter).
- :mod:`.validate`: the official training validation (padded canvas, COCO names at VOC ids, KL merge at 0.01, the
  training's matcher).
"""
from .criterion import (MaskAlignmentLoss, ResidualMapHead, candidates_from_maps, dice_loss, hungarian_match,
                        pairwise_dice_cost, pairwise_focal_cost, sigmoid_focal_loss)
from .data import MaskCaptionDataset, collate_masks, short_caption, token_groups
from .lora import PAPER_TARGETS, add_lora, load_lora, lora_config, lora_state_dict, read_lora, save_lora

__all__ = ["MaskAlignmentLoss", "ResidualMapHead", "candidates_from_maps", "dice_loss", "hungarian_match",
           "pairwise_dice_cost", "pairwise_focal_cost", "sigmoid_focal_loss", "MaskCaptionDataset", "collate_masks",
           "short_caption", "token_groups", "PAPER_TARGETS", "add_lora", "load_lora", "lora_config",
           "lora_state_dict", "read_lora", "save_lora"]
