"""Semantic segmentation metrics: confusion matrix, per-class IoU, mIoU, pixel accuracy (ignore index 255).

Conventions: ``confusion[g, p]`` counts pixels of ground-truth class ``g`` predicted as ``p``; pixels whose ground
truth is the ignore index are not counted; a class's IoU is ``TP / (TP + FP + FN)``; pixel accuracy is
``trace / sum``. Which classes mIoU averages over is explicit (``average``):

- ``"gt"`` (default): classes with ground-truth pixels in the evaluated set, as detectron2's ``SemSegEvaluator``
  does (``iou_valid = pos_gt > 0 & union > 0``), which produced the paper's Table 1. A class that is only
  predicted (e.g. COCO-Object's prompted but unscored background) is not in the mean.
- ``"union"``: classes that occur in the ground truth *or* the predictions (``TP + FP + FN > 0``), as mmseg's
  ``nanmean`` over IoU does: a class predicted but absent from the ground truth counts with IoU 0.

Unsupervised evaluation (the paper's Table 2, DiffSeg's mask-proposal protocol) matches proposals to ground-truth
classes with the Hungarian algorithm and accumulates TP / FP / FN per class: :func:`hungarian_counts`.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["IGNORE_INDEX", "AVERAGES", "confusion_matrix", "scores_from_confusion", "hungarian_counts",
           "scores_from_counts"]

IGNORE_INDEX = 255
AVERAGES = ("gt", "union")


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """``pred``, ``gt``: integer arrays of the same shape -> ``[num_classes, num_classes]`` int64.

    Predictions outside ``[0, num_classes)`` are an error; ground truth outside it (other than ignore) too."""
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    keep = gt != ignore_index
    g = gt[keep].astype(np.int64)
    p = pred[keep].astype(np.int64)
    if g.size and (g.min() < 0 or g.max() >= num_classes):
        raise ValueError(f"ground truth has labels outside [0, {num_classes}) other than {ignore_index}: "
                         f"{sorted(set(np.unique(g).tolist()) - set(range(num_classes)))[:10]}")
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"prediction has labels outside [0, {num_classes})")
    return np.bincount(g * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores_from_confusion(confusion: np.ndarray, class_names: Optional[Sequence[str]] = None,
                          average: str = "gt") -> Dict:
    """Confusion ``[C, C]`` -> ``{"mIoU", "pixel_accuracy", "mean_accuracy", "IoU": {name: value or None}, ...}``
    (IoU in percent, like the paper's table; None where the class is left out of the mean, see ``average``)."""
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, not {average!r}")
    cm = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(cm)
    gt_count = cm.sum(1)
    pred_count = cm.sum(0)
    union = gt_count + pred_count - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        if average == "gt":
            iou = np.where(gt_count > 0, iou, np.nan)
        acc = np.where(gt_count > 0, tp / gt_count, np.nan)
    names: List[str] = list(class_names) if class_names is not None else [str(i) for i in range(len(tp))]
    total = cm.sum()
    valid = ~np.isnan(iou)
    return {
        "mIoU": float(np.mean(iou[valid]) * 100) if valid.any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / total * 100) if total > 0 else float("nan"),
        "mean_accuracy": float(np.nanmean(acc) * 100) if (~np.isnan(acc)).any() else float("nan"),
        "IoU": {n: (None if np.isnan(v) else float(v * 100)) for n, v in zip(names, iou)},
        "num_pixels": int(total),
        "num_classes_scored": int(valid.sum()),
        "average": average,
    }


def hungarian_counts(pred: np.ndarray, gt: np.ndarray, num_classes: int, match: str = "row",
                     ignore_index: int = IGNORE_INDEX):
    """Per-class TP, FP, FN of unsupervised segments matched to ground-truth classes (the paper's Table 2).

    ``pred``: ``[H, W]`` segment ids (any non-negative ints, unrelated to classes); ``gt``: ``[H, W]`` class ids in
    ``[0, num_classes)``, other values (the ignore index) not counted. For each matching unit, a histogram
    ``hist[class, segment]`` of the counted pixels (``max(num_classes, pred.max() + 1)`` segment columns) is
    matched one-to-one with scipy's ``linear_sum_assignment(hist, maximize=True)``; then, as in the paper's
    ``train_net.py`` (after DiffSeg): ``TP += hist[c, s(c)]``, ``FN += row sum - TP``, ``FP += column sum of
    s(c) - TP``. Every class row is assigned a column, so a class absent from the unit takes the FP of whatever
    segment the assignment gives it; a segment left unassigned counts nowhere.

    ``match``: ``"image"``: one matching per image (DiffSeg's protocol as the paper describes it). ``"row"``:
    one matching per image *row*, which is what the paper's code executes (it passes one ``[H, W]`` image to a
    function written for a batch ``[B, H, W]``, so each row is a "batch item"); it produced Table 2's numbers
    and scores higher than ``"image"``, since every row may match its segments anew.

    Returns ``(tp, fp, fn, pixels)``: three ``[num_classes]`` int64 arrays and the number of counted pixels."""
    from scipy.optimize import linear_sum_assignment

    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"pred and gt must be [H, W] of the same shape, got {pred.shape} and {gt.shape}")
    if match not in ("row", "image"):
        raise ValueError(f"match must be 'row' (the paper's code) or 'image' (DiffSeg's protocol), not {match!r}")
    if pred.size and pred.min() < 0:
        raise ValueError("pred holds negative segment ids")
    units = [(pred[i], gt[i]) for i in range(pred.shape[0])] if match == "row" else [(pred.ravel(), gt.ravel())]
    tp = np.zeros(num_classes, np.int64)
    fp = np.zeros(num_classes, np.int64)
    fn = np.zeros(num_classes, np.int64)
    pixels = 0
    for p, g in units:
        p = p.astype(np.int64).ravel()
        g = g.astype(np.int64).ravel()
        cols = max(num_classes, int(p.max()) + 1 if p.size else 0)
        keep = (g >= 0) & (g < num_classes) & (g != ignore_index)
        hist = np.bincount(g[keep] * cols + p[keep], minlength=num_classes * cols).reshape(num_classes, cols)
        rows, assigned = linear_sum_assignment(hist, maximize=True)
        hit = hist[rows, assigned]
        tp[rows] += hit
        fn[rows] += hist[rows].sum(1) - hit
        fp[rows] += hist[:, assigned].sum(0) - hit
        pixels += int(hist.sum())
    return tp, fp, fn, pixels


def scores_from_counts(tp, fp, fn, pixels: int, class_names: Optional[Sequence[str]] = None) -> Dict:
    """Accumulated TP / FP / FN ``[C]`` -> ``{"mIoU", "pixel_accuracy", "IoU": {...}}`` in percent, as the paper's
    unsupervised evaluation: IoU = TP / (TP + FP + FN), mIoU its nanmean (a class never matched nor seen is left
    out), pixel accuracy = sum(TP) / counted pixels."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    den = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(den > 0, tp / den, np.nan)
    names: List[str] = list(class_names) if class_names is not None else [str(i) for i in range(len(tp))]
    valid = ~np.isnan(iou)
    return {
        "mIoU": float(np.mean(iou[valid]) * 100) if valid.any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / pixels * 100) if pixels > 0 else float("nan"),
        "IoU": {n: (None if np.isnan(v) else float(v * 100)) for n, v in zip(names, iou)},
        "num_pixels": int(pixels),
        "num_classes_scored": int(valid.sum()),
    }
