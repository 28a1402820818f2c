"""MAGNET fine-tuning: LoRA on an SD3 transformer with a mask loss on the expert layer's i2t scores plus flow matching.

``train(TrainConfig(...))`` (Python) and ``seg4diff-fast train`` (command line; ``accelerate launch -m
seg4diff_fast.cli train ...`` for several GPUs) run the recipe of the paper's code (cvlab-kaist/Seg4Diff at
bb500ca: ``configs/train_coco.yaml``, ``configs/train_sa1b.yaml``, ``configs/config.yaml``, ``seg4diff/config.py``,
``seg4diff/seg4diff_model_train.py``, ``seg4diff/modeling/backbone/sd3_backbone.py``, ``train_net.py``) as it
*executes*: where that differs from its config's reading or the paper's text (LoRA lr 1e-4 not 1e-5, 8 images per
step not 16, the top-left 640^2 of a random 1024^2 crop, the best validated LoRA, the per-process mask normaliser),
the executed value is the default and the other reading an option; each option's help says which is which
(docs/05-training.md has the table). The mask loss itself is :mod:`seg4diff_fast.magnet.criterion`; the data and its
geometry :mod:`seg4diff_fast.magnet.data`.

One training step, per micro-batch of B images (SD3-medium at 1024^2: latents [B, 16, 128, 128], grid 64 x 64):

  images [B, 3, S, S] in [-1, 1] -> VAE posterior mean, (z - shift) * scale -> z [B, c, S/8, S/8]
  u ~ logit-normal(0, 0.5) -> index = int(u * 1000) into the 1000-step training schedule (shift 3) -> t, sigma
  z_t = (1 - sigma) z + sigma noise                                (sd3_backbone.py ``sample_noise``)
  one transformer forward on z_t with the prompts' embeddings (CLIP + 77 zero T5 tokens; ``learnable_tokens``: the
  learned tokens instead, :mod:`.prompt_tokens`; ``caption_dropout``: the empty prompt); at the mask layer the
  attention runs through ``joint_attention(..., capture="i2t", normalize="logits")``: the scaled scores
  q k^T / sqrt(d) of image queries x the 77 CLIP columns, differentiable, never an N x N matrix
  mask loss: candidates_from_maps (token mode: heads averaged, a class = mean of its name's columns, matched by
  index; head mode: every (head, column) map, Hungarian matching) -> focal x 0.1 + dice x 0.2
  flow matching: mean((v_pred - (noise - z))^2) x 1
  loss = mask loss (normalised by this process's matched masks, or their mean over processes: ``num_masks``) +
  fm_weight * fm, divided by grad_accum; AdamW step every grad_accum micro-batches (1) after clipping the gradient
  norm of all trained parameters; the LR follows detectron2's WarmupCosineLR (:func:`warmup_cosine`).

Everything random is a function of (seed, step, micro-batch, process) or (seed, epoch, position): the batch order,
each sample's augmentation, the noise and the timesteps. So ``resume`` continues exactly: same batches, same noise,
same weights, bit for bit on the CPU.

Checkpoints (``OUT/checkpoints/step-NNNNNN/``, written into a temporary folder beside and renamed, so a kill leaves
the previous one whole): ``pytorch_lora_weights.safetensors`` (diffusers' format, :func:`~.lora.save_lora`),
beside it ``attn_mlp.safetensors`` (the residual map head) and ``prompt_tokens.safetensors`` when the run has them,
``training_state.pt`` (optimizer, scheduler, grad scaler, the head, the tokens, the best validation, RNG states of
every process, step), ``config.json``. Validation (``val_protocol``, every ``val_every`` steps: by default the
official run's own, :mod:`.validate`) keeps ``OUT/best/`` (the best mIoU's LoRA, head, tokens, ``best.json``).
At the end ``OUT/pytorch_lora_weights.safetensors`` (``keep="best"``: best/'s; else the last step's), its head and
tokens, and ``OUT/summary.json``; ``OUT/metrics.jsonl`` has one line per step (losses, lr, seconds) and per
validation (mIoU); ``OUT/val/step-NNNNNN/`` the evaluations.
A used ``OUT`` is written only to continue its run (``resume``) or with ``overwrite`` (which deletes those entries
first, nothing else); a checkpoint past ``steps`` is refused, not returned as the result.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

__all__ = ["TrainConfig", "ConfigError", "train", "latest_checkpoint", "apply_lora", "trainable_maps",
           "register_commands", "MapHeadSource", "mask_normaliser", "warmup_cosine", "freeze_lora_from",
           "save_map_head", "load_map_head"]

CHECKPOINTS = "checkpoints"
STATE_FILE = "training_state.pt"
SCHEDULERS = ("warmup_cosine", "linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
              "constant_with_warmup")


class ConfigError(ValueError):
    """A :class:`TrainConfig` value that cannot work, raised before any model is loaded. ``field`` names the
    option (the command line turns it into its flag)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.reason = message


def _opt(default, help: str, **meta):
    """A TrainConfig field: its help text (argparse %-formatting: write %% for %) and its checks: ``choices``,
    ``min`` / ``max``, ``integer`` (Optional ints), ``kind`` ``names`` / ``ints`` (comma-separated tuples)."""
    meta.setdefault("integer", isinstance(default, int) and not isinstance(default, bool))
    return field(default=default, metadata=dict(help=help, **meta))


@dataclass
class TrainConfig:
    """Every option of MAGNET training. Defaults: the paper's COCO run (``configs/train_coco.yaml``) as its code
    executes it."""

    # -- model and data
    model: str = _opt("stabilityai/stable-diffusion-3-medium-diffusers",
                      "diffusers SD3 / SD3.5 pipeline: hub id or local folder; 'tiny' builds the tiny random SD3 "
                      "offline (tests)")
    family: Optional[str] = _opt(None, "model family, 'sd3' or 'sd3.5' (default: from the model id)",
                                 choices=("sd3", "sd3.5"))
    data_root: str = _opt("", "training data folder (layouts: seg4diff_fast.magnet.data) (required)")
    data_kind: str = _opt("coco", "coco: class masks, prompt = the class names present (the paper's COCO run); "
                                  "sa1b: class-agnostic masks with captions", choices=("coco", "sa1b"))
    prompt: Optional[str] = _opt(None, "'classes' (names of the classes present) or 'caption' (default: classes for "
                                       "coco, caption for sa1b)", choices=("classes", "caption"))
    short_captions: bool = _opt(True, "cut captions to their first two sentences (the paper's SHORT_CAPTION)")
    max_masks: int = _opt(32, "masks per image at most (the paper's MAX_MASK)", min=1)
    min_area: float = _opt(0.005, "sa1b: drop masks below this fraction of the image (the paper's 0.5 %%)",
                           min=0.0, max=1.0)
    hflip: float = _opt(0.5, "probability of a horizontal flip per sample (the paper's RandomFlip)", min=0.0, max=1.0)
    data_limit: Optional[int] = _opt(None, "first N training images only (default: all)", min=1, integer=True)
    captioned_only: bool = _opt(True, "coco: train only on the images captions.json lists, when there is one (the "
                                      "official coco_2017_train_subset is built from the caption file's keys)")
    image_transform: str = _opt("official", "official: what the paper's code executes (shortest edge to --short-edge, "
                                            "random --crop-size crop, flip, then its negative 'padding' to "
                                            "SIZE_DIVISIBILITY keeps the top-left --size-divisibility square, "
                                            "squashed to --size; masks stay at that square); squash: the whole "
                                            "image squashed to --size (the paper's text)",
                                choices=("official", "squash"))
    short_edge: int = _opt(1024, "official transform: shortest edge resize (MIN_SIZE_TRAIN)", min=1)
    crop_size: int = _opt(1024, "official transform: the random square crop (the mapper's FixedSizeCrop)", min=1)
    size_divisibility: int = _opt(640, "official transform: the top-left square kept (INPUT.SIZE_DIVISIBILITY; "
                                       "larger than the crop: padded)", min=1)
    size: int = _opt(1024, "training image size in pixels, a multiple of the model's patch (the paper: 1024)", min=1)
    output_dir: str = _opt("magnet_out", "output folder: checkpoints, LoRA, metrics, validations")
    # -- optimisation
    steps: int = _opt(3000, "optimizer steps (the paper: 3000 COCO, 1000 SA-1B)", min=1)
    batch_size: int = _opt(8, "images per micro-batch per process (the paper: 8 COCO, 4 SA-1B, over all GPUs)",
                           min=1)
    grad_accum: int = _opt(1, "micro-batches per optimizer step. 1: what the official code executes (train_coco.yaml "
                              "sets GRADIENT_ACCUMULATION_STEPS 2 on the trainer, but detectron2's AMPTrainer never "
                              "reads that attribute: 8 images per step); 2: the paper's text (16)", min=1)
    lr: float = _opt(1e-4, "LoRA learning rate. 1e-4: what the official code executes: its optimizer loop walks "
                           "model.named_modules(), whose first entry is the root module named '', and takes every "
                           "parameter there, so 'backbone' is never in the module name and BACKBONE_MULTIPLIER 0.1 "
                           "is never applied; 1e-5: the paper's text (BASE_LR 1e-4 x 0.1)", min=0.0)
    weight_decay: float = _opt(1e-4, "AdamW weight decay (the paper's WEIGHT_DECAY)", min=0.0)
    lr_scheduler: str = _opt("warmup_cosine", "learning-rate schedule. warmup_cosine: detectron2's WarmupCosineLR, "
                                              "as the official run (LRMultiplier: linear from --warmup-factor x lr "
                                              "to the cosine's value at the end of the warm-up, then 0.5 (1 + cos(pi "
                                              "step / steps))); the others: diffusers' get_scheduler (linear warm-up "
                                              "from 0)", choices=SCHEDULERS)
    warmup_steps: int = _opt(500, "warm-up steps (the paper's WARMUP_ITERS)", min=0)
    warmup_factor: float = _opt(0.01, "warmup_cosine: the warm-up starts at this fraction of the LR (WARMUP_FACTOR; "
                                      "WARMUP_METHOD linear, detectron2's default)", min=0.0, max=1.0)
    max_grad_norm: float = _opt(0.01, "clip the L2 norm of all trained parameters' gradient to this; 0: off "
                                      "(the paper: full-model clipping at 0.01)", min=0.0)
    mixed_precision: str = _opt("auto", "autocast precision: auto (fp16 on CUDA as the paper's AMP, no elsewhere), "
                                        "no, fp16, bf16", choices=("auto", "no", "fp16", "bf16"))
    gradient_checkpointing: bool = _opt(False, "recompute each block in the backward (less memory, ~30 %% slower)")
    seed: int = _opt(0, "seed of the LoRA init, batch order, augmentation, noise and timesteps", min=0,
                     max=2 ** 62)
    # -- LoRA
    rank: int = _opt(16, "LoRA rank (the paper's LORA_RANK)", min=1)
    lora_alpha: Optional[float] = _opt(None, "LoRA alpha (default: the rank, as the paper)", min=0.0)
    lora_targets: Tuple[str, ...] = _opt(("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"),
                                         "comma-separated module names adapted in every chosen block (the paper: "
                                         "the image stream's attention projections)", kind="names")
    lora_blocks: Optional[Tuple[int, ...]] = _opt(None, "comma-separated block indices to adapt, or 'all' "
                                                        "(default: all)", kind="ints")
    # -- losses
    mask_layer: Optional[int] = _opt(None, "block whose i2t scores get the mask loss, 0-based (default: the "
                                           "expert layer, 9 for SD3; the tiny model's middle block)", min=0,
                                     integer=True)
    candidates: str = _opt("auto", "token: a class's map is the mean of its name's columns, matched by index (class "
                                   "masks); head: every (head, column) map, Hungarian matching (class-agnostic "
                                   "masks); auto: token for coco, head for sa1b", choices=("auto", "token", "head"))
    focal_weight: float = _opt(0.1, "weight of the sigmoid focal loss (the paper's MASK_LOSS_WEIGHT)", min=0.0)
    dice_weight: float = _opt(0.2, "weight of the dice loss (the paper's DICE_LOSS_WEIGHT)", min=0.0)
    fm_weight: float = _opt(1.0, "weight of the flow-matching loss (the paper's FM_WEIGHT); 0 also freezes the LoRA of "
                                 "the blocks from the mask layer on (the official code: FM_WEIGHT <= 0 freezes "
                                 "blocks >= 9), which no loss would reach", min=0.0)
    num_masks: str = _opt("auto", "normaliser of the mask loss. process: this process's matched masks (the official "
                                  "COCO path: preds.shape[0], never all-reduced); all: the mean over processes (its "
                                  "SA-1B path, SetCriterion); auto: process for token candidates, all for head",
                          choices=("auto", "process", "all"))
    caption_dropout: float = _opt(0.0, "probability that a micro-batch's prompts are all replaced by the empty prompt "
                                       "(the official CAPTION_DROPOUT: one draw per batch, prompt ''; 0 in both "
                                       "train configs); the mask loss then has no token candidates", min=0.0, max=1.0)
    focal_alpha: float = _opt(0.25, "focal loss alpha", min=0.0, max=1.0)
    focal_gamma: float = _opt(2.0, "focal loss gamma", min=0.0)
    focal_modulation: str = _opt("logits", "logits: the paper's code ((1 - p_t)^gamma from the raw score); sigmoid: "
                                           "RetinaNet's", choices=("logits", "sigmoid"))
    match_focal: float = _opt(0.02, "focal weight of the Hungarian matching cost (the paper's MASK_WEIGHT)", min=0.0)
    match_dice: float = _opt(1.0, "dice weight of the Hungarian matching cost (the paper's DICE_WEIGHT)", min=0.0)
    cost_thresh: Optional[float] = _opt(None, "head candidates: drop from the mask loss (and its normaliser) every "
                                              "mask whose mean matching cost over the image's candidates is not "
                                              "below this, after the Hungarian matching (the official "
                                              "SEM_SEG_HEAD.COST_THRESH, off in every official config; its code runs "
                                              "it only for one image with one mask, and raises IndexError otherwise) "
                                              "(default: off)", min=0.0)
    attn_mlp: bool = _opt(True, "train the paper's residual conv head on each map before the mask loss "
                                "(USE_ATTN_MLP); saved beside the LoRA as attn_mlp.safetensors (segment / eval "
                                "--attn-mlp apply it)")
    learnable_tokens: bool = _opt(False, "learn the prompt's embeddings instead (USE_LEARNABLE_TOKENS, off in the "
                                         "official configs): tokens initialised from the empty prompt's (77 CLIP + "
                                         "256 zero T5), fed for every image, trained alone as the official optimizer "
                                         "does (the LoRA and the map head stay as built); saved beside the LoRA as "
                                         "prompt_tokens.safetensors, used by segment / eval --lora")
    attn_mlp_lr: float = _opt(1e-4, "learning rate of that head (the official BASE_LR, as the LoRA's)", min=0.0)
    timestep_sampling: str = _opt("logit_normal", "timestep density (diffusers' compute_density_for_timestep_"
                                                  "sampling)", choices=("logit_normal", "mode", "uniform"))
    logit_mean: float = _opt(0.0, "mean of the logit-normal density (the paper: 0.0)")
    logit_std: float = _opt(0.5, "std of the logit-normal density (the paper: 0.5)", min=0.0)
    mode_scale: float = _opt(1.29, "scale of the 'mode' density")
    fm_weighting: str = _opt("none", "flow-matching loss weighting (compute_loss_weighting_for_sd3; the paper: none)",
                             choices=("none", "sigma_sqrt", "cosmap"))
    backend: str = _opt("auto", "joint_attention backend of the mask layer",
                        choices=("auto", "triton", "triton-split", "sdpa", "torch"))
    # -- validation, checkpoints, run
    val_root: Optional[str] = _opt(None, "validation dataset folder: mIoU of the Segmenter with the LoRA applied "
                                         "(default: no validation)")
    val_protocol: str = _opt("official", "official: what the official training validates with "
                                         "(magnet.validate): each image padded to a --size-divisibility multiple, "
                                         "prompted with the training classes' names at the validation ids present "
                                         "(coco; sa1b: the empty prompt), the mask layer's pre-softmax maps at "
                                         "timesteps[-14], min-max normalised and squared, KL-merged at 0.01, the "
                                         "training's Hungarian matcher to the classes' masks, mIoU; unsupervised: "
                                         "the paper's Table 2 protocol (eval --unsupervised: empty prompt, KL merge "
                                         "at 0.1, per-image Hungarian counts); gt: the zero-shot protocol with the "
                                         "ground truth's class names",
                             choices=("official", "unsupervised", "gt"))
    val_kl_threshold: Optional[float] = _opt(None, "the KL merge threshold of --val-protocol official / unsupervised "
                                                   "(default: 0.01 official, its KL_THRESHOLD; 0.1 unsupervised, "
                                                   "eval --kl-threshold)", min=0.0)
    keep: str = _opt("best", "the LoRA written to --output-dir: best: the validation with the highest mIoU (the "
                             "official BestCheckpointer; the last step's without validation); last: the last step's "
                             "(the paper's text)", choices=("best", "last"))
    val_dataset: str = _opt("voc20", "its layout (seg4diff-fast eval --dataset; the official run: "
                                     "voc_2012_train_sem_seg, which is VOC 2012 val with the 20 object classes, "
                                     "background ignored)",
                            choices=("voc20", "voc21", "coco_object", "coco_object_bg", "context59", "context59_bg",
                                     "ade150", "cityscapes", "coco_stuff27", "folder"))
    val_split: str = _opt("val", "its split")
    val_limit: Optional[int] = _opt(None, "first N validation images only (default: all)", min=1, integer=True)
    val_size: Optional[int] = _opt(None, "validation working size in pixels (default: --size)", min=1, integer=True)
    val_every: int = _opt(250, "validate every N steps and at the end; 0: only at the end (the paper's "
                               "EVAL_PERIOD)", min=0)
    val_at_start: bool = _opt(False, "validate before the first step too (the starting mIoU; it competes for --keep "
                                     "best). Off: the official run's first validation is at step EVAL_PERIOD")
    checkpoint_every: int = _opt(250, "write a checkpoint every N steps; 0: never (the paper's CHECKPOINT_PERIOD)",
                                 min=0)
    resume: Optional[str] = _opt(None, "'latest' (the newest checkpoint of --output-dir; none: start fresh in an "
                                       "empty folder) or a checkpoint folder")
    overwrite: bool = _opt(False, "start over in a used --output-dir: delete the results a run writes there first "
                                  "(checkpoints/, the LoRA, summary.json, metrics.jsonl, val/; never other files). "
                                  "Without it a non-empty --output-dir is refused unless --resume continues its run")
    num_workers: int = _opt(2, "data-loading worker processes per training process", min=0)
    cpu: bool = _opt(False, "train on the CPU even when CUDA is available")
    progress: bool = _opt(True, "show a progress bar with the losses")

    # ------------------------------------------------------------------------------------------------ checks
    def check(self) -> "TrainConfig":
        """Raise :class:`ConfigError` (naming the option) for a value that cannot work; no model, no data read."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            meta = f.metadata
            if v is None:
                if f.default is not None:
                    raise ConfigError(f.name, "must be given")
                continue
            if "choices" in meta and v not in meta["choices"]:
                raise ConfigError(f.name, f"must be one of {', '.join(meta['choices'])}, got {v!r}")
            if isinstance(f.default, bool):
                if not isinstance(v, bool):
                    raise ConfigError(f.name, f"must be True or False, got {v!r}")
                continue
            if "min" in meta or "max" in meta:
                integral = meta["integer"]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or (integral and not isinstance(v, int)):
                    raise ConfigError(f.name, f"must be {'an integer' if integral else 'a number'}, got {v!r}")
                if not math.isfinite(v) or v < meta.get("min", -math.inf) or v > meta.get("max", math.inf):
                    bounds = " and ".join(s for s in (f">= {meta['min']}" if "min" in meta else "",
                                                      f"<= {meta['max']}" if "max" in meta else "") if s)
                    raise ConfigError(f.name, f"must be {bounds}, got {v!r}")
        if not self.data_root:
            raise ConfigError("data_root", "give the training data folder")
        if not os.path.isdir(self.data_root):
            raise ConfigError("data_root", f"{self.data_root!r} is not a folder")
        if self.val_root is not None and not os.path.isdir(self.val_root):
            raise ConfigError("val_root", f"{self.val_root!r} is not a folder")
        if not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets):
            raise ConfigError("lora_targets", f"name at least one module, e.g. attn.to_q; got {self.lora_targets!r}")
        if self.lora_blocks is not None and (not self.lora_blocks or not all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in self.lora_blocks)):
            raise ConfigError("lora_blocks", f"must be block indices >= 0, got {self.lora_blocks!r}")
        if self.candidates == "token" and self.data_kind == "sa1b":
            raise ConfigError("candidates", "token candidates need class names; sa1b masks have none (use head)")
        if self.cost_thresh is not None and not self.cost_thresh > 0:
            raise ConfigError("cost_thresh", f"must be > 0 (costs are >= 0: every mask would be dropped), got "
                                             f"{self.cost_thresh!r}")
        if self.cost_thresh is not None and self.resolved_candidates() != "head":
            raise ConfigError("cost_thresh", "filters Hungarian matches of head candidates (--candidates head, the "
                                             "sa1b default); token candidates are matched by index (the official "
                                             "COCO path never calls the matcher)")
        if self.prompt == "classes" and self.data_kind == "sa1b":
            raise ConfigError("prompt", "'classes' needs class names; sa1b masks have none (use caption)")
        if self.val_kl_threshold is not None and not self.val_kl_threshold > 0:
            raise ConfigError("val_kl_threshold", f"must be > 0, got {self.val_kl_threshold!r}")
        if self.val_kl_threshold is not None and self.val_protocol == "gt":
            raise ConfigError("val_kl_threshold", "the gt validation protocol merges nothing; it is for official and "
                                                  "unsupervised")
        if self.focal_weight == 0 and self.dice_weight == 0 and self.fm_weight == 0:
            raise ConfigError("fm_weight", "every loss weight is 0: nothing to train")
        if self.mixed_precision == "fp16" and (self.cpu or not torch.cuda.is_available()):
            raise ConfigError("mixed_precision", "fp16 autocast needs a CUDA device; use no or bf16")
        if self.resume is not None and self.resume != "latest" and not os.path.isfile(
                os.path.join(self.resume, STATE_FILE)):
            raise ConfigError("resume", f"{self.resume!r} is not a checkpoint folder (no {STATE_FILE}); give one "
                                        f"or 'latest'")
        from .._io import check_writable_folder

        try:
            check_writable_folder(self.output_dir, "output_dir")
        except ValueError as e:
            raise ConfigError("output_dir", str(e).split(": ", 1)[-1]) from None
        self._check_output_dir_free()
        return self

    def _check_output_dir_free(self) -> None:
        """A used ``output_dir`` (anything but temporaries of killed runs) is written only to continue its own run
        (``resume``: ``latest`` with a checkpoint there, or a checkpoint folder inside it) or with ``overwrite``, which
        deletes a run's own entries and nothing else: a new run never replaces an old run's LoRA, summary and metrics
        while keeping its later checkpoints."""
        used = _used_entries(self.output_dir)
        if self.overwrite and self.resume is not None:
            raise ConfigError("overwrite", "--overwrite starts over, --resume continues a run: give one of them")
        if not used:
            return
        shown = ", ".join(used[:4]) + (", ..." if len(used) > 4 else "")
        if self.overwrite:
            other = [n for n in used if n not in RUN_ENTRIES]
            if other:
                raise ConfigError("overwrite", f"{self.output_dir!r} holds files a training run does not write "
                                               f"({', '.join(other[:4])}); --overwrite deletes only a run's own "
                                               "results: move them or give a new --output-dir")
            return
        if self.resume is None:
            raise ConfigError("output_dir", f"{self.output_dir!r} is not empty ({shown}): a new run would replace its "
                                            "results; pass --resume latest to continue its run, --overwrite to start "
                                            "over, or give a new folder")
        if self.resume == "latest":
            if latest_checkpoint(self.output_dir) is None:
                raise ConfigError("resume", f"no checkpoint in {self.output_dir!r} to continue, but it is not empty "
                                            f"({shown}): pass --overwrite to start over there, or give a new folder")
            return
        inside = os.path.join(os.path.realpath(self.output_dir), CHECKPOINTS) + os.sep
        if not os.path.realpath(self.resume).startswith(inside):
            raise ConfigError("resume", f"{self.resume!r} is not a checkpoint of --output-dir {self.output_dir!r}, "
                                        f"which is not empty ({shown}): continuing another run there would mix their "
                                        "results; give an empty --output-dir (or --overwrite)")

    def resolved_prompt(self) -> str:
        return self.prompt if self.prompt is not None else ("classes" if self.data_kind == "coco" else "caption")

    def resolved_candidates(self) -> str:
        return self.candidates if self.candidates != "auto" else ("token" if self.data_kind == "coco" else "head")


# Options that change nothing a resumed run computes: a checkpoint may be continued with other values of these.
_RUN_FIELDS = {"steps", "output_dir", "val_root", "val_dataset", "val_split", "val_limit", "val_size", "val_every",
               "val_at_start", "checkpoint_every", "resume", "overwrite", "num_workers", "progress", "backend", "cpu",
               "val_protocol", "val_kl_threshold", "keep"}
# what a run writes into its output folder: all that --overwrite deletes
HEAD_FILE = "attn_mlp.safetensors"  # the trained residual map head, beside the LoRA
TOKENS_FILE = "prompt_tokens.safetensors"  # learnable prompt tokens (prompt_tokens.TOKENS_FILE), beside the LoRA
BEST = "best"  # OUT/best/: the LoRA (and head) of the best validation so far
RUN_ENTRIES = (CHECKPOINTS, "pytorch_lora_weights.safetensors", HEAD_FILE, TOKENS_FILE, BEST, "summary.json",
               "metrics.jsonl", "val")


def _used_entries(output_dir: str) -> List[str]:
    """The entries of ``output_dir`` but temporaries of killed runs (``.tmp-...``); [] if it does not exist."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir) if not n.startswith(".tmp-"))


# ---------------------------------------------------------------------------------------------- randomness
def _seed_of(*parts: int) -> int:
    """A 63-bit seed mixed from integers (numpy's SeedSequence: different tuples give unrelated streams)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]) >> 1


_NOISE, _SAMPLE, _PERM, _DROPOUT = 1, 2, 3, 4  # streams of _seed_of


class _BatchOrder(torch.utils.data.Sampler):
    """This process's micro-batches, endless, from micro-batch ``start`` on.

    Epoch ``e`` orders the dataset by a permutation drawn from (seed, e); micro-batch ``k`` of the epoch on
    process ``r`` of ``world`` holds permutation positions ``[(k * world + r) * B, ... + B)`` (the last incomplete
    round is dropped, as ``drop_last``). Yields lists of ``(index, epoch, position)`` keys for :class:`_Seeded`."""

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int, start: int = 0):
        self.n, self.batch_size, self.world, self.rank, self.seed = n, batch_size, world, rank, seed
        self.per_epoch = n // (batch_size * world)
        self.start = start

    def __iter__(self):
        b, perm_epoch, perm = self.start, None, None
        while True:
            epoch, k = divmod(b, self.per_epoch)
            if epoch != perm_epoch:
                g = torch.Generator().manual_seed(_seed_of(_PERM, self.seed, epoch))
                perm, perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
            base = (k * self.world + self.rank) * self.batch_size
            yield [(perm[base + j], epoch, base + j) for j in range(self.batch_size)]
            b += 1


class _Seeded(torch.utils.data.Dataset):
    """``dataset[index]`` with torch's CPU generator seeded from (seed, epoch, position) for the call and restored
    after: the sample's augmentation (the flip) does not depend on workers, prefetching or where a run resumed."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch, position = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed_of(_SAMPLE, self.seed, epoch, position))
            return self.dataset[index]


def _rng_state() -> dict:
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


# ---------------------------------------------------------------------------------------------- trainable maps
class _MapsSite:
    """What :class:`~seg4diff_fast.capture.families.sd3.SD3CaptureProcessor` calls for its attention, during a training
    forward: the layer's attention through :func:`joint_attention` with differentiable pre-softmax i2t scores
    (``normalize="logits"``, no N x N matrix), kept in ``maps`` (``[B, (H,) N_img, T]`` float32) for the loss.
    (The capture store detaches what it records; training needs the graph.)"""

    def __init__(self, name: str, heads: str, text_index: Optional[torch.Tensor], backend: str):
        self.name, self.heads, self.text_index, self.backend = name, heads, text_index, backend
        self.maps: Optional[torch.Tensor] = None

    def attention(self, q, k, v, text_slice: slice, scale: Optional[float] = None, original=None,
                  key_mask: Optional[torch.Tensor] = None, query_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q, k, v ``[B, H, N, D]`` -> out ``[B, H, N, D]`` (SDPA's); the maps go to ``self.maps``. (The arguments
        of :meth:`CaptureSite.attention`: ``original`` is unused, every row is trained on; SD3 passes no masks.)"""
        if key_mask is not None or query_mask is not None:
            raise ValueError(f"trainable maps on {self.name!r}: attention masks are not supported in training")
        from ..attention import joint_attention
        from ..capture.base import _recomputing

        out, maps = joint_attention(q, k, v, text_slice, capture="i2t", heads=self.heads,
                                    text_index=None if self.text_index is None else self.text_index.to(q.device),
                                    map_dtype=torch.float32, scale=scale,
                                    backend=self.backend, normalize="logits")
        if not _recomputing():  # gradient checkpointing re-runs the block in the backward: keep the forward's maps
            self.maps = maps.i2t
        return out


@contextmanager
def trainable_maps(transformer, layer: int, heads: str = "mean", text_index: Optional[torch.Tensor] = None,
                   backend: str = "auto"):
    """While inside, the attention of SD3 block ``layer`` computes its output as before and leaves its
    differentiable pre-softmax i2t scores in ``site.maps`` (``[B, N_img, T]`` heads averaged, or ``[B, H, N_img, T]``
    with ``heads="all"``; ``T = len(text_index)``, default the whole text block). Yields the site; the layer's own
    processor is put back on exit. With gradient checkpointing keep it open through the backward: the
    recomputation must run the same processor."""
    from ..capture.handle import _resolve_layers
    from ..capture.families.sd3 import SD3

    spec = _resolve_layers(SD3, transformer, [layer])[0]
    site = _MapsSite(spec.name, heads, text_index, backend)
    old = spec.attn.processor
    spec.attn.set_processor(SD3.make_processor(spec, site, old))
    try:
        yield site
    finally:
        spec.attn.set_processor(old)


def warmup_cosine(where: float, warmup: float, factor: float) -> float:
    """detectron2's ``WarmupCosineLR`` multiplier (``build_lr_scheduler``: ``WarmupParamScheduler(
    CosineParamScheduler(1, 0), factor, warmup, "linear")`` in an ``LRMultiplier``) at ``where = step / steps``:
    linear from ``factor * c(0)`` to ``c(warmup)`` over ``[0, warmup)``, then ``c(where)``, with
    ``c(x) = 0.5 (1 + cos(pi x))``."""
    def c(x):
        return 0.5 * (1.0 + math.cos(math.pi * x))
    if where < warmup:
        start, end = factor * c(0.0), c(warmup)
        return start + (end - start) * where / warmup
    return c(where)


def mask_normaliser(matched: int, mode: str, world: int, mean_over_processes) -> Optional[float]:
    """The ``num_masks`` the mask loss divides by, given this process's ``matched`` count: ``None`` (the loss takes
    its own count: the official COCO path, ``preds.shape[0]``) for ``mode="process"`` or one process; for
    ``"all"`` the mean over processes (the official SA-1B path, ``SetCriterion``: all-reduce / world size).
    ``mean_over_processes``: tensor -> tensor (``accelerator.reduce(x, "mean")``)."""
    if mode not in ("process", "all"):
        raise ValueError(f"mode must be 'process' or 'all', got {mode!r}")
    if world == 1 or mode == "process":
        return None
    return float(mean_over_processes(torch.tensor(float(matched))))


def freeze_lora_from(transformer, layer: int) -> List[torch.nn.Parameter]:
    """Freeze the LoRA of ``transformer_blocks`` ``>= layer`` (the official code, ``FM_WEIGHT <= 0``: ``int(name.
    split('.')[1]) >= 9``). Returns the LoRA parameters still trained."""
    params = []
    for name, p in transformer.named_parameters():
        if "lora_" not in name:
            continue
        parts = name.split(".")
        if parts[0] == "transformer_blocks" and int(parts[1]) >= layer:
            p.requires_grad_(False)
        elif p.requires_grad:
            params.append(p)
    if not params:
        raise ConfigError("fm_weight", f"0 freezes the LoRA of blocks >= {layer}, which leaves nothing to train: adapt "
                                       "earlier blocks (--lora-blocks) or give the flow-matching loss a weight")
    return params


def save_map_head(head, folder: str) -> str:
    """Write the residual map head's weights to ``folder/attn_mlp.safetensors``; returns the file."""
    from safetensors.torch import save_file

    path = os.path.join(folder, HEAD_FILE)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, path)
    return path


def load_map_head(path: str):
    """The :class:`~.criterion.ResidualMapHead` saved beside a LoRA: ``path`` a folder (its ``attn_mlp.safetensors``)
    or a LoRA file (the head in its folder). None when there is none."""
    from .criterion import ResidualMapHead

    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    file = os.path.join(folder, HEAD_FILE)
    if not os.path.isfile(file):
        return None
    from safetensors.torch import load_file

    head = ResidualMapHead()
    try:
        head.load_state_dict(load_file(file))
    except Exception as e:  # safetensors' and torch's own error types for a damaged or foreign file
        raise ValueError(f"{file}: not a residual map head saved by seg4diff-fast train ({e})") from e
    return head.eval()


ATTN_MLP_MODES = ("off", "grid", "ovss")


class MapHeadSource:
    """An ``attention_source`` (the Segmenter's seam) that applies a trained :class:`~.criterion.ResidualMapHead`
    to the maps of ``inner``: ``i2t [B, N_img, T]`` -> ``[B, N_img, T]`` (float32, on the maps' device).

    - ``mode="grid"``: as the head was trained (``seg4diff_model_train.py`` l. 335-345): each text column's map on
      the latent grid ``[h, w]``, ``x + layers(x)``.
    - ``mode="ovss"``: what the official ``Seg4DiffOVSS`` computes when ``USE_ATTN_MLP`` is set (l. 195-203): the
      conv stack *without* the residual over the whole ``[N_img, T]`` matrix as one image (image tokens x text
      columns), ``layers(x)``.
    (The official evaluations run neither: their eval configs leave ``USE_ATTN_MLP`` False, and the training
    model's validation computes the head and then segments from the raw maps.) ``inner``'s maps are what the
    Segmenter reads (joint-softmax probabilities by default; several layers already averaged), while the head was
    trained on one layer's pre-softmax scores."""

    def __init__(self, inner, head, mode: str):
        if mode not in ("grid", "ovss"):
            raise ValueError(f"mode must be 'grid' or 'ovss', got {mode!r}")
        self.inner, self.head, self.mode = inner, head, mode

    @torch.no_grad()
    def __call__(self, batch) -> torch.Tensor:
        i2t = self.inner(batch)
        if len(batch.grid) != 2:
            raise ValueError(f"the residual map head takes image maps on an [h, w] grid, got grid {batch.grid}")
        head = self.head.to(i2t.device, torch.float32)
        x = i2t.float()
        B, N, T = x.shape
        if self.mode == "ovss":
            return head.layers(x[:, None])[:, 0]
        h, w = batch.grid
        maps = x.transpose(1, 2).reshape(B * T, 1, h, w)
        return head(maps).reshape(B, T, N).transpose(1, 2).contiguous()


def apply_lora(segmenter, path: str, attn_mlp: str = "off", learnable_tokens: bool = True):
    """Load a LoRA (a file or folder written by :func:`train`, a checkpoint folder, or the paper's
    ``lora_weights.pth``) into ``segmenter``'s pipeline (:func:`~seg4diff_fast.magnet.lora.load_lora`, through
    diffusers' ``load_lora_weights``) and name it in ``segmenter.model_name``, so that ``settings()`` (and with it
    an evaluation's resume fingerprint) tells the adapted model from the base one. ``attn_mlp``: ``"off"`` (the
    official evaluation), or ``"grid"`` / ``"ovss"`` to apply the residual map head saved beside the LoRA
    (``attn_mlp.safetensors``, :class:`MapHeadSource`; an error if there is none). Learnable prompt tokens saved
    beside it (``prompt_tokens.safetensors``) replace the prompts' embeddings unless ``learnable_tokens=False``
    (:class:`~.prompt_tokens.PromptTokensFamily`). Returns ``segmenter``."""
    from .prompt_tokens import PromptTokensFamily, load_prompt_tokens

    from .lora import load_lora

    if attn_mlp not in ATTN_MLP_MODES:
        raise ValueError(f"attn_mlp must be one of {', '.join(ATTN_MLP_MODES)}, got {attn_mlp!r}")
    head = load_map_head(path) if attn_mlp != "off" else None
    if attn_mlp != "off" and head is None:
        raise FileNotFoundError(f"attn_mlp={attn_mlp!r}: no {HEAD_FILE} beside the LoRA {path} (train writes it "
                                "with --attn-mlp, the default)")
    tokens = load_prompt_tokens(path) if learnable_tokens else None
    spec = PromptTokensFamily(segmenter.spec, tokens) if tokens is not None else None  # refuses other families
    load_lora(segmenter.pipe, path)
    segmenter.model_name = f"{segmenter.model_name}+lora:{os.path.abspath(path)}"
    if spec is not None:
        segmenter.spec = spec
        segmenter.model_name += "+prompt_tokens"
    if head is not None:
        segmenter.attention_source = MapHeadSource(segmenter.attention_source, head, attn_mlp)
        segmenter.model_name += f"+attn_mlp:{attn_mlp}"
    return segmenter


# ---------------------------------------------------------------------------------------------- checkpoints
def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The complete checkpoint of ``output_dir`` with the highest step, or None. (A checkpoint folder gets its
    name only once whole; temporaries of killed runs are ``.tmp-...`` and never match.)"""
    root = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return None
    steps = []
    for name in os.listdir(root):
        if name.startswith("step-") and name[5:].isdigit() and os.path.isfile(os.path.join(root, name, STATE_FILE)):
            steps.append((int(name[5:]), name))
    return os.path.join(root, max(steps)[1]) if steps else None


def _config_dict(cfg: TrainConfig) -> dict:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _check_resumable(cfg: TrainConfig, saved: dict, path: str) -> None:
    mine = _config_dict(cfg)
    diff = [k for k in sorted(mine) if k not in _RUN_FIELDS and k in saved and saved[k] != mine[k]]
    if diff:
        shown = ", ".join(f"{k} {saved[k]!r} -> {mine[k]!r}" for k in diff[:4])
        raise ConfigError("resume", f"{path} was trained with other settings ({shown}); resume with the same ones")


# ---------------------------------------------------------------------------------------------- the run
def _mixed_precision(cfg: TrainConfig) -> str:
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    return "fp16" if torch.cuda.is_available() and not cfg.cpu else "no"


def _encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, S, S]`` in [-1, 1] -> ``[B, c, S/f, S/f]``: posterior mean, ``(z - shift) * scale`` (as the paper's
    ``img_to_latents`` and the Segmenter)."""
    z = vae.encode(images.to(vae.dtype)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


def train(config: TrainConfig) -> dict:
    """Run MAGNET training as ``config`` says (see the module docstring). Returns a dict: ``step`` (reached),
    ``lora`` (the final LoRA file), ``val`` (list of ``{"step", "mIoU"}``, on the main process; empty on the
    others), ``last`` (the last step's losses), ``seconds_per_step`` (mean over this run's steps), ``output_dir``.
    Raises :class:`ConfigError` for settings that cannot work, before any training step."""
    cfg = config.check()
    try:
        import accelerate  # noqa: F401
        import peft  # noqa: F401
    except ImportError as e:
        from .._optional import is_missing
        if not (is_missing(e, "accelerate") or is_missing(e, "peft")):
            raise  # installed but broken (e.g. a package that peft imports fails): its own error is the cause
        raise RuntimeError(f"training needs the [train] extra ({e}): pip install 'seg4diff-fast[train]'") from None
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, gather_object

    from .._io import atomic_folder, atomic_write_json, clean_temporaries
    from . import data as mdata
    from .criterion import MaskAlignmentLoss, ResidualMapHead, candidates_from_maps
    from .lora import add_lora, load_lora, lora_config, save_lora

    mp = _mixed_precision(cfg)
    # every LoRA gets a gradient through the flow-matching loss; without it the blocks after the mask layer get none
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.fm_weight == 0)
    accelerator = Accelerator(mixed_precision=mp, cpu=cfg.cpu, kwargs_handlers=[ddp])
    main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    device = accelerator.device

    # -- resume point (before anything heavy, so that a bad --resume fails fast)
    resume_dir = None
    if cfg.resume == "latest":
        resume_dir = latest_checkpoint(cfg.output_dir)
        if resume_dir is None and main:
            print(f"seg4diff-fast train: note: no checkpoint in {cfg.output_dir}; starting from step 0", flush=True)
    elif cfg.resume is not None:
        resume_dir = cfg.resume
    state = None
    if resume_dir is not None:
        with open(os.path.join(resume_dir, "config.json")) as f:
            _check_resumable(cfg, json.load(f), resume_dir)
        state = torch.load(os.path.join(resume_dir, STATE_FILE), map_location="cpu", weights_only=False)
        if state["world"] != world:
            raise ConfigError("resume", f"{resume_dir} was written by {state['world']} processes, this run has "
                                        f"{world}: the batch order would differ")
    start_step = int(state["step"]) if state is not None else 0
    if start_step > cfg.steps:
        raise ConfigError("steps", f"the checkpoint {resume_dir} is at step {start_step}, past --steps {cfg.steps}: "
                                   f"nothing to train, and its LoRA is not a {cfg.steps}-step one; give --steps "
                                   f">= {start_step} to continue it")
    if state is not None and start_step == cfg.steps and main:
        print(f"seg4diff-fast train: note: {resume_dir} is already at step {cfg.steps}: nothing to train, writing its "
              "LoRA and summary", flush=True)

    # -- data (layout errors are usage errors: nothing is loaded yet)
    try:
        dataset = mdata.MaskCaptionDataset(cfg.data_root, kind=cfg.data_kind, size=cfg.size, prompt=cfg.prompt,
                                           short_captions=cfg.short_captions, max_masks=cfg.max_masks,
                                           min_area=cfg.min_area, hflip=cfg.hflip, limit=cfg.data_limit,
                                           transform=cfg.image_transform, short_edge=cfg.short_edge,
                                           crop_size=cfg.crop_size, size_divisibility=cfg.size_divisibility,
                                           captioned_only=cfg.captioned_only)
    except (OSError, ValueError) as e:
        raise ConfigError("data_root", str(e)) from None
    if len(dataset) < cfg.batch_size * world:
        raise ConfigError("batch_size", f"{len(dataset)} training images cannot fill one micro-batch of "
                                        f"{cfg.batch_size} on each of {world} processes")
    val_set = None
    if cfg.val_root is not None:
        from ..segmentation.datasets import open_dataset

        try:
            val_set = open_dataset(cfg.val_dataset, cfg.val_root, cfg.val_split, limit=cfg.val_limit)
        except (OSError, ValueError) as e:
            raise ConfigError("val_root", str(e)) from None
        if cfg.val_protocol == "official" and cfg.resolved_prompt() == "classes" and \
                len(dataset.classes) < len(val_set.classes):
            raise ConfigError("val_protocol", f"official: the validation prompts the training classes' names at the "
                                              f"validation class ids, and {len(dataset.classes)} training names do "
                                              f"not cover {len(val_set.classes)} {cfg.val_dataset} classes; use "
                                              "--val-protocol unsupervised or gt")

    # -- model
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    from ..segmentation.protocol import ProtocolError
    from ..segmentation.segmenter import TINY_MODELS, Segmenter, load_pipeline

    fam = TINY_MODELS.get(cfg.model, cfg.family)
    if fam is not None and fam not in ("sd3", "sd3.5"):  # before any weights load
        raise ConfigError("model", f"MAGNET training supports the SD3 family (SD3, SD3.5), not {fam!r} (the paper "
                                   "trains SD3 only)")
    # float32 weights, autocast for the compute: the paper's FP16: False + AMP
    pipe = load_pipeline(cfg.model, torch_dtype=torch.float32, device=device, family=fam)
    from diffusers import SD3Transformer2DModel

    if not isinstance(pipe.transformer, SD3Transformer2DModel):
        raise ConfigError("model", f"MAGNET training supports SD3 transformers, got {type(pipe.transformer).__name__}")
    for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, getattr(pipe, "text_encoder_3", None)):
        if m is not None:
            m.requires_grad_(False)
            m.eval()
    transformer = pipe.transformer
    try:
        seg = Segmenter(pipe, family=fam, seed=cfg.seed, size=cfg.val_size or cfg.size,
                        **({"layers": (cfg.mask_layer,)} if cfg.mask_layer is not None else {}))
    except ProtocolError as e:
        raise ConfigError({"layers": "mask_layer", "size": "val_size" if cfg.val_size else "size"}.get(
            e.field, e.field), e.reason) from None
    proto = seg.protocol
    mask_layer = proto.layers[0]
    if cfg.size % seg.patch:
        raise ConfigError("size", f"must be a multiple of the model's {seg.patch}-pixel patch, got {cfg.size}")
    if seg.max_side is not None and cfg.size > seg.max_side:
        raise ConfigError("size", f"{cfg.size} exceeds the model's positional limit of {seg.max_side} pixels")
    grid = (cfg.size // seg.patch, cfg.size // seg.patch)
    T = proto.max_sequence_length  # the CLIP columns: the paper's attn_scores[..., 4096:4096 + 77]
    mode = cfg.resolved_candidates()
    num_masks_mode = cfg.num_masks if cfg.num_masks != "auto" else ("process" if mode == "token" else "all")

    torch.manual_seed(cfg.seed)  # the LoRA's gaussian init and the map head's init
    params = add_lora(transformer, lora_config(cfg.rank, cfg.lora_alpha, cfg.lora_targets,
                                               "all" if cfg.lora_blocks is None else cfg.lora_blocks))
    if cfg.fm_weight == 0:  # the official FM_WEIGHT <= 0: the LoRA of blocks >= the mask layer (9) is frozen
        params = freeze_lora_from(transformer, mask_layer)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    head = ResidualMapHead().to(device) if cfg.attn_mlp else None
    tokens = None
    if cfg.learnable_tokens:  # the official optimizer then takes the tokens only: the LoRA and the head stay as built
        from .prompt_tokens import PromptTokens

        tokens = PromptTokens.from_pipeline(pipe).to(device)
        for p in params + (list(head.parameters()) if head is not None else []):
            p.requires_grad_(False)
        groups = [dict(params=[tokens.embeds], lr=cfg.lr)]
    else:
        groups = [dict(params=params, lr=cfg.lr)]
        if head is not None:
            groups.append(dict(params=list(head.parameters()), lr=cfg.attn_mlp_lr))
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # accelerate's prepared scheduler steps once per process per optimizer step: count in those units
    if cfg.lr_scheduler == "warmup_cosine":
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: warmup_cosine(
            k / (cfg.steps * world), cfg.warmup_steps / cfg.steps, cfg.warmup_factor))
    else:
        lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps * world,
                                     num_training_steps=cfg.steps * world)
    criterion = MaskAlignmentLoss(cfg.focal_weight, cfg.dice_weight, cfg.focal_alpha, cfg.focal_gamma,
                                  focal_modulation=cfg.focal_modulation, cost_focal=cfg.match_focal,
                                  cost_dice=cfg.match_dice, matching="index" if mode == "token" else "hungarian",
                                  cost_thresh=cfg.cost_thresh)
    # the official validation's matcher: the training's HungarianMatcher, called without COST_THRESH
    val_matcher = MaskAlignmentLoss(focal_modulation=cfg.focal_modulation, alpha=cfg.focal_alpha,
                                    gamma=cfg.focal_gamma, cost_focal=cfg.match_focal, cost_dice=cfg.match_dice)
    if tokens is not None:  # nothing of the transformer or the head trains: only the tokens go through DDP
        model = transformer
        tokens, optimizer, lr_scheduler = accelerator.prepare(tokens, optimizer, lr_scheduler)
        trained = [accelerator.unwrap_model(tokens).embeds]
    elif head is not None:
        model, head, optimizer, lr_scheduler = accelerator.prepare(transformer, head, optimizer, lr_scheduler)
        trained = params + list(accelerator.unwrap_model(head).parameters())
    else:
        model, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
        trained = params
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)  # the 1000-step training schedule

    if state is not None:
        load_lora(transformer, resume_dir)
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        if head is not None:
            accelerator.unwrap_model(head).load_state_dict(state["attn_mlp"])
        if tokens is not None:
            accelerator.unwrap_model(tokens).load_state_dict(state["prompt_tokens"])
        _set_rng_state(state["rng"][rank])
        best = state.get("best")

    loader = torch.utils.data.DataLoader(
        _Seeded(dataset, cfg.seed), collate_fn=mdata.collate_masks, num_workers=cfg.num_workers,
        batch_sampler=_BatchOrder(len(dataset), cfg.batch_size, world, rank, cfg.seed, start_step * cfg.grad_accum))

    # -- logs
    if cfg.overwrite and main:  # the old run's own entries only (check() refused a folder with other files)
        import shutil

        for name in RUN_ENTRIES:
            path = os.path.join(cfg.output_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)
    accelerator.wait_for_everyone()
    os.makedirs(cfg.output_dir, exist_ok=True)
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    val_history: List[dict] = []
    if state is None:
        best = None  # {"step", "mIoU"} of OUT/best/
    if main:
        clean_temporaries(cfg.output_dir)
        kept = []
        if start_step and os.path.exists(metrics_path):  # drop what a killed run logged after its checkpoint
            with open(metrics_path) as f:
                kept = [json.loads(l) for l in f if l.strip()]
            kept = [r for r in kept if r["step"] <= start_step]
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        val_history = [dict(step=r["step"], mIoU=r["val_mIoU"]) for r in kept if "val_mIoU" in r]

    def log(record: dict):
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def validate(step: int):
        if val_set is None:
            return
        from ..segmentation.evaluate import evaluate, evaluate_unsupervised
        from .validate import OFFICIAL_KL_THRESHOLD, official_validation

        nonlocal best
        was = transformer.training
        transformer.eval()
        folder = os.path.join(cfg.output_dir, "val", f"step-{step:06d}")
        spec = seg.spec
        if tokens is not None:  # the learned tokens replace every prompt, as in the official model's validation
            from .prompt_tokens import PromptTokensFamily

            live = accelerator.unwrap_model(tokens)
            tokens_were = live.training
            seg.spec = PromptTokensFamily(spec, live)
        try:
            with accelerator.autocast():
                if cfg.val_protocol == "official":
                    summary = official_validation(seg, val_set, folder, dataset.classes, val_matcher,
                                                  prompt_classes=cfg.resolved_prompt() == "classes",
                                                  size_divisibility=cfg.size_divisibility,
                                                  kl_threshold=cfg.val_kl_threshold or OFFICIAL_KL_THRESHOLD)
                elif cfg.val_protocol == "unsupervised":
                    summary = evaluate_unsupervised(seg, val_set, folder, kl_threshold=cfg.val_kl_threshold or 0.1,
                                                    save_predictions=False, progress=False, overwrite=True)
                else:
                    summary = evaluate(seg, val_set, folder, protocol="gt", save_predictions=False, progress=False,
                                       overwrite=True)
        finally:
            transformer.train(was)
            if tokens is not None:
                seg.spec = spec
                live.train(tokens_were)
        miou = gather_object([summary["mIoU"] if summary is not None else None])[0]  # the main process's
        if best is None or miou > best["mIoU"]:  # the same decision on every process
            best = dict(step=step, mIoU=miou)
            if main:
                with atomic_folder(os.path.join(cfg.output_dir, BEST)) as tmp:
                    save_beside(tmp)
                    atomic_write_json(os.path.join(tmp, "best.json"), best)
            accelerator.wait_for_everyone()
        if main and summary is not None:
            val_history.append(dict(step=step, mIoU=summary["mIoU"]))
            log(dict(step=step, val_mIoU=summary["mIoU"]))
            if bar is not None and cfg.progress:
                bar.write(f"step {step}: validation mIoU {summary['mIoU']:.2f}")

    def save_beside(folder: str):
        """The LoRA and, beside it, the map head and the prompt tokens when this run has them."""
        save_lora(transformer, folder)
        if head is not None:
            save_map_head(accelerator.unwrap_model(head), folder)
        if tokens is not None:
            from .prompt_tokens import save_prompt_tokens

            save_prompt_tokens(accelerator.unwrap_model(tokens), folder)

    def save_checkpoint(step: int):
        rngs = gather_object([_rng_state()])
        if main:
            path = os.path.join(cfg.output_dir, CHECKPOINTS, f"step-{step:06d}")
            with atomic_folder(path) as tmp:
                save_beside(tmp)
                torch.save(dict(step=step, world=world, best=best, optimizer=optimizer.state_dict(),
                                scheduler=lr_scheduler.state_dict(),
                                scaler=accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                                attn_mlp=accelerator.unwrap_model(head).state_dict() if head is not None else None,
                                prompt_tokens=accelerator.unwrap_model(tokens).state_dict() if tokens is not None
                                else None,
                                rng=rngs), os.path.join(tmp, STATE_FILE))
                atomic_write_json(os.path.join(tmp, "config.json"), _config_dict(cfg))
        accelerator.wait_for_everyone()

    def losses_of(batch: dict, step: int, micro: int, site: _MapsSite) -> Dict[str, torch.Tensor]:
        images = batch["images"].to(device)
        B = images.shape[0]
        gen = torch.Generator().manual_seed(_seed_of(_NOISE, cfg.seed, step, micro, rank))
        prompts, spans = batch["prompts"], batch["spans"]
        if cfg.caption_dropout > 0:  # one draw per micro-batch, as the official model's torch.rand(1) < p
            drop = torch.Generator().manual_seed(_seed_of(_DROPOUT, cfg.seed, step, micro, rank))
            if float(torch.rand((), generator=drop)) < cfg.caption_dropout:
                prompts, spans = [""] * B, [[None] * len(sp) for sp in spans]
        with torch.no_grad():
            z = _encode_latents(pipe.vae, images).float()
            enc = seg.spec.encode_prompts(pipe, prompts, seg.protocol) if tokens is None else None
        if tokens is not None:  # the learned tokens replace every prompt's embeddings (the prompt still places columns)
            enc = tokens(B)
        noise = torch.randn(z.shape, generator=gen).to(device)
        u = compute_density_for_timestep_sampling(cfg.timestep_sampling, B, cfg.logit_mean, cfg.logit_std,
                                                  cfg.mode_scale, generator=gen)
        index = (u * sched.config.num_train_timesteps).long()
        timesteps = sched.timesteps[index].to(device)
        sigmas = sched.sigmas[index].to(device, torch.float32).view(B, 1, 1, 1)
        z_t = (1.0 - sigmas) * z + sigmas * noise
        with accelerator.autocast():
            pred = model(hidden_states=z_t, timestep=timesteps, return_dict=False, **enc)[0]
        target = noise - z
        weight = compute_loss_weighting_for_sd3(cfg.fm_weighting, sigmas)
        fm = (weight * (pred.float() - target) ** 2).reshape(B, -1).mean(1).mean()
        tg = None
        if mode == "token":
            from .data import token_groups

            tg = token_groups(seg.tokenizer, prompts, spans, T)
        cand, valid = candidates_from_maps(site.maps.float(), grid, mode=mode, token_groups=tg, refine=head)
        masks = [m.to(device) for m in batch["masks"]]
        pairs = criterion.match(cand, masks, valid)  # the normaliser counts the pairs (cost_thresh drops some)
        num_masks = mask_normaliser(sum(len(r) for r, _ in pairs), num_masks_mode, world,
                                    lambda x: accelerator.reduce(x.to(device), "mean"))
        mask = criterion(cand, masks, valid, num_masks=num_masks, pairs=pairs)
        loss = mask["loss"] + cfg.fm_weight * fm
        return dict(loss=loss, fm=fm.detach(), focal=mask["focal"].detach(), dice=mask["dice"].detach(),
                    matched=torch.tensor(float(mask["matched"])))

    # -- loop
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start_step, desc="train", disable=not (main and cfg.progress),
               dynamic_ncols=True) if cfg.steps > start_step else None
    if start_step == 0 and cfg.val_at_start:
        validate(0)
    data_iter = iter(loader)
    step, seconds, last = start_step, [], {}
    while step < cfg.steps:
        t0 = time.perf_counter()
        sums: Dict[str, float] = {}
        # the mask layer's processor stays in place through the backward (gradient checkpointing recomputes it),
        # and leaves before validation (the Segmenter captures that layer its own way)
        with trainable_maps(transformer, mask_layer, "mean" if mode == "token" else "all", torch.arange(T),
                            cfg.backend) as site:
            for micro in range(cfg.grad_accum):
                batch = next(data_iter)
                with ExitStack() as stack:
                    if micro < cfg.grad_accum - 1:  # no gradient all-reduce before the last micro-batch
                        for m in (model, head, tokens):
                            if m is not None:
                                stack.enter_context(accelerator.no_sync(m))
                    out = losses_of(batch, step, micro, site)
                    accelerator.backward(out["loss"] / cfg.grad_accum)
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
        grad_norm = None
        if cfg.max_grad_norm > 0:
            grad_norm = float(accelerator.clip_grad_norm_(trained, cfg.max_grad_norm))
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seconds.append(time.perf_counter() - t0)
        last = dict(step=step, **{k: round(v, 6) for k, v in sums.items()}, lr=optimizer.param_groups[0]["lr"],
                    grad_norm=grad_norm, seconds=round(seconds[-1], 4))
        log(last)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss']:.4f}", fm=f"{sums['fm']:.4f}", focal=f"{sums['focal']:.4f}",
                            dice=f"{sums['dice']:.4f}", lr=f"{last['lr']:.2e}")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save_checkpoint(step)
        if cfg.val_every and step % cfg.val_every == 0 and step < cfg.steps:
            validate(step)
    if bar is not None:
        bar.close()
    if step > start_step:  # the same decision on every process: evaluate() waits for all of them
        validate(step)
    del data_iter

    lora_file = os.path.join(cfg.output_dir, "pytorch_lora_weights.safetensors")
    result = dict(step=step, lora=lora_file, val=val_history, last=last, best=best if cfg.keep == "best" else None,
                  seconds_per_step=float(np.mean(seconds)) if seconds else None, output_dir=cfg.output_dir)
    if main:
        best_dir = os.path.join(cfg.output_dir, BEST)
        if cfg.keep == "best" and best is not None:  # the best validation's LoRA (and head) is the result
            import shutil

            for name in (os.path.basename(lora_file), HEAD_FILE, TOKENS_FILE):
                if os.path.isfile(os.path.join(best_dir, name)):
                    shutil.copyfile(os.path.join(best_dir, name), os.path.join(cfg.output_dir, name + ".tmp"))
                    os.replace(os.path.join(cfg.output_dir, name + ".tmp"), os.path.join(cfg.output_dir, name))
        else:
            save_beside(cfg.output_dir)
        atomic_write_json(os.path.join(cfg.output_dir, "summary.json"),
                          dict(result, config=_config_dict(cfg), mask_layer=mask_layer, candidates=mode,
                               mixed_precision=mp, processes=world, resumed_from=resume_dir))
    accelerator.wait_for_everyone()
    return result


# ---------------------------------------------------------------------------------------------- command line
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parser_for(f: dataclasses.Field):
    """argparse ``type`` for a TrainConfig field: the CLI's parsers (:mod:`seg4diff_fast.cli`) with the field's range
    from its metadata; messages name what was expected."""
    from ..cli import integer, integer_list, number

    meta = f.metadata
    lo, hi = meta.get("min"), meta.get("max")
    kind = meta.get("kind")
    if kind == "names":
        def names(text: str):
            items = tuple(t.strip() for t in text.split(","))
            if not all(items):
                raise argparse.ArgumentTypeError(f"expected comma-separated module names, got {text!r}")
            if len(set(items)) != len(items):
                raise argparse.ArgumentTypeError(f"a module name is given twice in {text!r}")
            return items
        return names
    if kind == "ints":
        return integer_list(lo=0, what="block indices", keyword="all")
    if meta["integer"]:
        return integer(lo, hi)
    if lo is not None or hi is not None or isinstance(f.default, float) or f.name == "lora_alpha":
        return number(lo, hi)

    def text_value(text: str):
        if not text.strip():
            raise argparse.ArgumentTypeError("expected a non-empty value")
        return text
    return text_value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field (``--data-root`` for ``data_root``; booleans also ``--no-...``)."""
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = meta["help"] if "(default" in meta["help"] or "(required)" in meta["help"] \
            else meta["help"] + f" (default: {shown})"
        if isinstance(default, bool):
            g = p.add_mutually_exclusive_group()
            state = "on" if default else "off"
            g.add_argument(_flag(f.name), dest=f.name, action="store_true", default=default,
                           help=f"{meta['help']} (default: {state})")
            g.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                           help=f"turn {_flag(f.name)} off (its default: {state})")
            continue
        kwargs = dict(dest=f.name, default=default, help=help_text, metavar=f.name.upper())
        if "choices" in meta:
            kwargs.update(choices=meta["choices"], metavar=None)
        else:
            kwargs["type"] = _parser_for(f)
        if f.name == "data_root":
            kwargs["required"] = True
        p.add_argument(_flag(f.name), **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def cmd_train(args) -> int:
    from ..cli import UsageError

    cfg = config_from_args(args)
    try:
        cfg.check()
        result = train(cfg)
    except ConfigError as e:
        raise UsageError(f"{_flag(e.field)}: {e.reason}") from None
    if result["val"]:
        v = result["val"]
        print(f"validation mIoU {v[0]['mIoU']:.2f} (step {v[0]['step']}) -> {v[-1]['mIoU']:.2f} (step {v[-1]['step']})")
    print(f"LoRA: {result['lora']}")
    return 0


def register_commands(subparsers) -> None:
    """Add ``train`` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "train", help="MAGNET fine-tuning: LoRA with a mask loss on the expert layer's attention",
        description="LoRA fine-tuning of an SD3 transformer with the paper's mask-alignment loss on the expert "
                    "layer's pre-softmax image-to-text scores plus the flow-matching loss. Writes OUT/checkpoints/"
                    "step-N/ (each whole or not at all), OUT/metrics.jsonl, OUT/val/step-N/, OUT/summary.json and "
                    "OUT/pytorch_lora_weights.safetensors (diffusers' format). Several GPUs: `accelerate launch -m "
                    "seg4diff_fast.cli train ...`. Defaults: the paper's COCO run.")
    add_arguments(p)
    p.set_defaults(func=cmd_train, command="train")
