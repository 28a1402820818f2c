"""Semantic segmentation metrics: confusion matrix, per-class IoU, mIoU, pixel accuracy (ignore index 255).

Conventions (those of mmseg / detectron2's SemSegEvaluator): ``confusion[g, p]`` counts pixels of ground-truth
class ``g`` predicted as ``p``; pixels whose ground truth is the ignore index are not counted; a class's IoU is
``TP / (TP + FP + FN)``; mIoU averages over classes that occur in the ground truth *or* the predictions
(``TP + FP + FN > 0``; a class absent from both is NaN and left out); pixel accuracy is ``trace / sum``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["IGNORE_INDEX", "confusion_matrix", "scores_from_confusion"]

IGNORE_INDEX = 255


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


def scores_from_confusion(confusion: np.ndarray, class_names: Optional[Sequence[str]] = None) -> Dict:
    """Confusion ``[C, C]`` -> ``{"mIoU", "pixel_accuracy", "mean_accuracy", "IoU": {name: value or None}, ...}``
    (IoU in percent, like the paper's table; None where the class occurs in neither GT nor predictions)."""
    cm = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(cm)
    gt_count = cm.sum(1)
    pred_count = cm.sum(0)
    union = gt_count + pred_count - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
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
    }
