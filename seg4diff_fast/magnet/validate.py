"""MAGNET's validation as the official training executes it (``train --val-protocol official``, the default).

The official run (cvlab-kaist/Seg4Diff at bb500ca: ``train_net.py``, ``configs/train_coco.yaml`` over
``configs/config.yaml`` and ``seg4diff/config.py``, the eval branch of ``Seg4DiffTrainer.forward`` in
``seg4diff/seg4diff_model_train.py``) validates every ``TEST.EVAL_PERIOD`` 250 iterations on
``voc_2012_train_sem_seg`` (VOC 2012 val, the 20 object classes, background ignored) with detectron2's
``SemSegEvaluator`` (mIoU over the classes with ground-truth pixels: ``evaluate(..., average="gt")``), and its
``BestCheckpointer`` keeps the weights of the best mIoU. Per image:

1. Pixels (:func:`official_canvas`): detectron2's test-time DatasetMapper resizes the image to a 640-pixel shortest
   edge (longest at most 2560); the model pads it bottom/right with zeros to a multiple of ``SIZE_DIVISIBILITY``
   640 (``ImageList.from_tensors``: a 640 x 853 VOC image becomes a 640 x 1280 canvas) and squashes the canvas to
   1024^2 (bilinear): the black padding is part of the image the model sees and of the maps.
2. Prompt (:func:`official_prompt`): with ``GT_ONLY_PROMPT`` (train_coco.yaml) the names of the *training* classes
   (``TRAIN_CLASS_JSON``, COCO-Stuff's 171) at the VOC ids present in the image's resized label, joined with spaces:
   VOC id 0 (aeroplane) is prompted "person", 2 (bird) "car", ... (``train_class_texts[i] for i in idx``); without
   it (train_sa1b.yaml) the empty prompt.
3. Maps: one forward at ``timesteps[-NOISE_STEPS]`` of the 28-step schedule, NOISE_STEPS 14 (config.py's default,
   which train_coco.yaml keeps; the eval configs set 8); block 9's pre-softmax scaled scores (``SOFTMAX: False``),
   heads averaged, all 77 CLIP columns (BOS, the names, EOS, padding: no token is picked out).
4. Merge (:func:`official_merge`): ``NORM_BEFORE_MERGE`` and ``NORM_AFTER_MERGE`` are True (config.py; the train
   configs do not set them), so ``att2mask`` runs: each column min-max normalised over the pixels (+1e-6) and raised
   to ``OUTPUT_POWER`` 2.0; then ``mask_merge`` at ``KL_THRESHOLD`` 0.01: softmax over the pixels, greedy
   symmetric-KL grouping, group means (:func:`~seg4diff_fast.segmentation.segmenter.merge_maps`, the same code as
   the unsupervised mode). The trained map head is computed there and its result discarded.
5. Matching (:func:`official_prediction`): the training's ``HungarianMatcher`` (0.02 focal with the raw-score
   modulation + 1.0 dice, the masks downsampled nearest to the grid; no ``COST_THRESH`` at validation) between the
   merged maps and the masks of the present classes in the resized label; matched map ``src`` becomes class
   ``idxs[tgt]``'s score map, every other class's map is 0; the 64 x 64 maps are upsampled bilinearly to the
   image's size (``sem_seg_postprocess``: its crop to the resized size does nothing to a 64 x 64 map, so the canvas,
   padding included, is stretched over the image), argmax.

Not copied: the official noise is fresh per image (``randn_tensor``); here it is keyed by the sample id, as in every
evaluation of the project.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["official_canvas", "official_prompt", "official_merge", "official_prediction", "official_validation",
           "OFFICIAL_KL_THRESHOLD", "OFFICIAL_POWER", "OFFICIAL_TIMESTEP_INDEX"]

OFFICIAL_KL_THRESHOLD = 0.01  # train_coco.yaml / train_sa1b.yaml MODEL.KL_THRESHOLD
OFFICIAL_POWER = 2.0  # config.py MODEL.OUTPUT_POWER (att2mask's power; the train configs keep it)
OFFICIAL_TIMESTEP_INDEX = -14  # config.py MODEL.NOISE_STEPS 14: timesteps[-14] of NUM_INFERENCE_STEPS 28


def official_canvas(px: torch.Tensor, size_divisibility: int = 640) -> torch.Tensor:
    """``[3, H, W]`` pixels in [0, 1] -> the canvas the official validation squashes: resized to a 640-pixel shortest
    edge (8-bit, :func:`~seg4diff_fast.segmentation.images.resize_8bit`), padded bottom/right with zeros to a
    multiple of ``size_divisibility`` on each side, ``[3, H', W']``."""
    from ..segmentation.images import resize_8bit

    if isinstance(size_divisibility, bool) or not isinstance(size_divisibility, int) or size_divisibility < 1:
        raise ValueError(f"size_divisibility must be a positive int, got {size_divisibility!r}")
    x = resize_8bit(px)
    h, w = x.shape[-2:]
    d = size_divisibility
    return F.pad(x, (0, -(-w // d) * d - w, 0, -(-h // d) * d - h))


def official_prompt(train_classes: Sequence[str], present: Sequence[int]) -> str:
    """The official validation prompt: the training classes' names at the validation class ids ``present`` (their
    order), joined with spaces. ``ValueError`` for an id without a training name (the official code: IndexError)."""
    missing = [int(c) for c in present if not 0 <= int(c) < len(train_classes)]
    if missing:
        raise ValueError(f"validation class ids {missing} have no training class name ({len(train_classes)} names): "
                         "the official validation prompts train_class_texts[id]")
    return " ".join(train_classes[int(c)] for c in present)


def official_merge(i2t: torch.Tensor, grid: Tuple[int, int], kl_threshold: float = OFFICIAL_KL_THRESHOLD,
                   power: float = OFFICIAL_POWER) -> Tuple[torch.Tensor, List[List[int]]]:
    """``i2t`` ``[N_img, T]`` pre-softmax maps of one image -> (merged maps ``[M, h, w]``, the groups of columns):
    ``att2mask`` (each column min-max over the pixels, +1e-6, to the ``power``) then ``mask_merge`` at
    ``kl_threshold`` (:func:`~seg4diff_fast.segmentation.segmenter.merge_maps`). In float64."""
    from ..segmentation.segmenter import merge_maps, norm_before_merge

    if i2t.dim() != 2 or i2t.shape[0] != grid[0] * grid[1]:
        raise ValueError(f"i2t must be [h * w, T] = [{grid[0] * grid[1]}, T], got {tuple(i2t.shape)}")
    x = norm_before_merge(i2t.double()) ** power
    return merge_maps(x.T.reshape(i2t.shape[1], *grid), kl_threshold)


def official_prediction(merged: torch.Tensor, label: np.ndarray, present: Sequence[int], num_classes: int,
                        out_size: Tuple[int, int], matcher) -> np.ndarray:
    """The official validation's class map of one image.

    merged ``[M, h, w]`` (:func:`official_merge`); ``label`` ``[H', W']`` the resized ground truth (640-pixel
    shortest edge, nearest); ``present``: the class ids prompted, ascending; ``matcher``: a
    :class:`~seg4diff_fast.magnet.criterion.MaskAlignmentLoss` whose Hungarian cost is the training's. Returns
    ``[H, W]`` (``out_size``) int64 class ids: argmax over the ``num_classes`` score maps, each matched class's map
    being its merged map, the others 0, upsampled bilinearly."""
    if not len(present):
        raise ValueError("present: no class to match")
    masks = torch.from_numpy(np.stack([np.asarray(label) == c for c in present])).float()
    rows, cols = matcher.match(merged[None].float(), [masks], None, matching="hungarian")[0]
    scores = torch.zeros(num_classes, *merged.shape[-2:], dtype=torch.float64)
    scores[torch.as_tensor(np.asarray(present, dtype=np.int64)[cols])] = merged[torch.as_tensor(rows)].double()
    up = F.interpolate(scores[None], size=tuple(out_size), mode="bilinear", align_corners=False)[0]
    return up.argmax(0).numpy().astype(np.int64)


def official_validation(segmenter, dataset, out_dir: str, train_classes: Sequence[str], matcher, *,
                        prompt_classes: bool = True, size_divisibility: int = 640,
                        kl_threshold: float = OFFICIAL_KL_THRESHOLD, power: float = OFFICIAL_POWER,
                        timestep_index: int = OFFICIAL_TIMESTEP_INDEX, progress: bool = False,
                        overwrite: bool = True) -> Optional[Dict]:
    """The official training validation of ``segmenter`` (a Segmenter whose ``layers`` is the mask layer) on
    ``dataset`` (the module docstring), through :func:`~seg4diff_fast.segmentation.evaluate.evaluate` (``protocol
    "gt"``: the classes of the resized label; mIoU over the classes with ground truth). ``prompt_classes``: prompt
    ``train_classes`` at the present ids (the COCO run), else the empty prompt (SA-1B). Returns the summary on the
    main process."""
    from ..segmentation.evaluate import _nearest, evaluate
    from ..segmentation.images import load_image, paper_resize_shape

    if prompt_classes and len(train_classes) < len(dataset.classes):
        raise ValueError(f"the official validation prompts the training classes' names at the validation ids: "
                         f"{len(train_classes)} training names for {len(dataset.classes)} validation classes")
    if not kl_threshold > 0:
        raise ValueError(f"kl_threshold must be > 0, got {kl_threshold!r}")
    vseg = segmenter._with(dict(normalize="logits", heads="mean", timestep_index=timestep_index, resize="square"))
    C = len(dataset.classes)

    @torch.no_grad()
    def predict(s, gt: np.ndarray, present: List[int]) -> np.ndarray:
        canvas = official_canvas(load_image(s.image), size_divisibility)
        geom = vseg.geometry(*canvas.shape[-2:])
        prompt = official_prompt(train_classes, present) if prompt_classes else ""
        i2t, _ = vseg._i2t_for_image(canvas, geom, [prompt], None, s.id)
        merged, _ = official_merge(i2t[0], geom.grid, kl_threshold, power)
        return official_prediction(merged, _nearest(gt, paper_resize_shape(*gt.shape)), present, C, gt.shape,
                                   matcher)

    settings = dict(validation="magnet-official", train_classes=list(train_classes) if prompt_classes else None,
                    size_divisibility=size_divisibility, kl_threshold=float(kl_threshold), power=float(power),
                    match=dict(focal=matcher.cost_focal, dice=matcher.cost_dice, modulation=matcher.focal_modulation))
    return evaluate(vseg, dataset, out_dir, protocol="gt", predict=predict, settings=settings,
                    save_predictions=False, progress=progress, overwrite=overwrite)
