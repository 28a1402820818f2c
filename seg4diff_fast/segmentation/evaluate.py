"""Dataset evaluation: per-image results written as they come, resumable, data parallel, merged at the end.

Layout of ``out_dir``::

    per_image/<id>.npz     confusion matrix of that image (sparse: flat indices + counts), its prompt classes
    pred/<id>.png          the prediction in dataset class ids as a palette PNG (when save_predictions)
    summary.json           written by the main process from all per_image files: confusion, IoU, mIoU, ...

Every file is written to a temporary name and moved into place with ``os.replace``, so a crash leaves either
the whole file or none. A second run skips the ids whose ``per_image`` file exists: nothing is computed twice
and nothing already computed is lost. Under ``accelerate launch`` each process takes every ``world``-th
sample; after a barrier the main process merges the files (the folder is the gather).

Protocols:
- ``"gt"`` (the paper's): the prompt holds only the classes present in the image's ground truth. An oracle:
  use it to compare with the paper's table.
- ``"full"``: the prompt holds every class of the dataset, split over several prompts when needed. What a
  user without ground truth gets.

Classes are prompted by their :attr:`SegDataset.prompt_names` (the paper's words); a dataset's ``unscored`` classes
(COCO-Object's background) are prompted when present but their pixels are not scored. Each image's noise is keyed
by its sample id (``segment(..., noise_key=id)``): different per image, reproducible, independent of sharding.
mIoU averages over the classes with ground-truth pixels (``average="gt"``, detectron2's SemSegEvaluator, which
scored the paper's Table 1) unless ``average="union"``.

:func:`evaluate_unsupervised` is the paper's Table 2 protocol (DiffSeg's mask proposals): ``segment_unsupervised``
per image, its segments matched to the ground-truth classes by the Hungarian algorithm (:func:`hungarian_counts`).
"""
from __future__ import annotations

import os
import time
from typing import Dict, Optional

import numpy as np

from .._io import atomic_write_bytes, atomic_write_json
from .datasets import SegDataset
from .metrics import IGNORE_INDEX, confusion_matrix, hungarian_counts, scores_from_confusion, scores_from_counts

__all__ = ["evaluate", "merge_results", "evaluate_unsupervised", "merge_unsupervised"]

PROTOCOLS = ("gt", "full")


def _npz_bytes(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _safe_id(sample_id: str) -> str:
    return sample_id.replace(os.sep, "__").replace("/", "__")


def _dist():
    """(rank, world, state or None): accelerate's state when launched on several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    import torch
    from accelerate import PartialState

    st = PartialState(cpu=not torch.cuda.is_available())  # without cpu=True accelerate ignores CPU ranks
    return st.process_index, st.num_processes, st


def evaluate(segmenter, dataset: SegDataset, out_dir: str, *, protocol: str = "gt", save_predictions: bool = True,
             progress: bool = True, merge: bool = True, average: str = "gt") -> Optional[Dict]:
    """Evaluate ``segmenter`` (anything with ``segment(image_path, classes, noise_key=id) -> result.labels``) on
    ``dataset``.

    Returns the summary dict on the main process (``None`` on the others): ``mIoU``, ``pixel_accuracy``,
    ``mean_accuracy``, per-class ``IoU``, ``confusion`` (list of lists), ``num_images``, ``missing``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
    _check_prompt_names(dataset)
    rank, world, state = _dist()
    C = len(dataset.classes)
    names = dataset.prompt_names
    per_dir = os.path.join(out_dir, "per_image")
    os.makedirs(per_dir, exist_ok=True)
    mine = dataset.samples[rank::world]
    todo = [s for s in mine if not os.path.exists(os.path.join(per_dir, _safe_id(s.id) + ".npz"))]
    it = todo
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(todo, desc=f"eval {dataset.name} [{protocol}]" + (f" rank {rank}" if world > 1 else ""),
                  initial=len(mine) - len(todo), total=len(mine))
    for s in it:
        gt = dataset.load_label(s)
        if protocol == "gt":
            present = [int(c) for c in np.unique(gt) if c != IGNORE_INDEX]
        else:
            present = list(range(C))
        t0 = time.perf_counter()
        if present:
            res = segmenter.segment(s.image, [names[c] for c in present], noise_key=s.id)
            local = np.asarray(res.labels)
            if local.shape != gt.shape:
                raise RuntimeError(f"{s.id}: prediction {local.shape} and label {gt.shape} differ in size")
            pred = np.asarray(present, dtype=np.int64)[local]
        else:  # nothing to score in this image
            pred = np.full(gt.shape, IGNORE_INDEX, dtype=np.int64)
        if dataset.unscored:  # prompted when present, not scored (COCO-Object's background: ignore label 0)
            gt = np.where(np.isin(gt, dataset.unscored), IGNORE_INDEX, gt)
        cm = confusion_matrix(pred, gt, C) if present else np.zeros((C, C), dtype=np.int64)
        flat = cm.reshape(-1)
        nz = np.nonzero(flat)[0]
        if save_predictions:
            from .visualize import label_png_bytes

            atomic_write_bytes(os.path.join(out_dir, "pred", _safe_id(s.id) + ".png"), label_png_bytes(pred))
        atomic_write_bytes(os.path.join(per_dir, _safe_id(s.id) + ".npz"),
                           _npz_bytes(index=nz.astype(np.int64), count=flat[nz].astype(np.int64),
                                      num_classes=np.int64(C), classes=np.asarray(present, dtype=np.int64),
                                      seconds=np.float64(time.perf_counter() - t0)))
    if state is not None:
        state.wait_for_everyone()
    if rank != 0 or not merge:
        return None
    summary = merge_results(out_dir, dataset, protocol, average=average)
    return summary


def merge_results(out_dir: str, dataset: SegDataset, protocol: str = "gt", average: str = "gt") -> Dict:
    """Sum the per-image confusion matrices of ``dataset``'s samples found in ``out_dir``; write summary.json."""
    C = len(dataset.classes)
    total = np.zeros(C * C, dtype=np.int64)
    found, missing, seconds = 0, [], 0.0
    for s in dataset.samples:
        path = os.path.join(out_dir, "per_image", _safe_id(s.id) + ".npz")
        if not os.path.exists(path):
            missing.append(s.id)
            continue
        with np.load(path) as z:
            if int(z["num_classes"]) != C:
                raise ValueError(f"{path} has {int(z['num_classes'])} classes, the dataset {C}: a different run?")
            np.add.at(total, z["index"], z["count"])
            seconds += float(z["seconds"])
        found += 1
    cm = total.reshape(C, C)
    summary = scores_from_confusion(cm, dataset.classes, average=average)
    summary.update(dataset=dataset.name, protocol=protocol, num_images=found, missing=missing[:20],
                   num_missing=len(missing), seconds_per_image=seconds / max(found, 1),
                   confusion=cm.tolist())
    atomic_write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary


def _check_prompt_names(dataset: SegDataset):
    names = dataset.prompt_names
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{dataset.name}: the paper's prompt words collide for {dup} (e.g. 'food-things' and "
                         "'food-stuff' are both prompted 'food'), so classes cannot be told apart by their tokens; "
                         "the paper evaluates this dataset unsupervised only (eval --unsupervised)")


def _nearest(arr: np.ndarray, size) -> np.ndarray:
    """``[H, W]`` labels -> ``size`` (h, w) by nearest neighbour, as PIL (detectron2's segmentation resize)."""
    from PIL import Image

    if tuple(arr.shape) == tuple(size):
        return arr
    if arr.max(initial=0) > 255 or arr.min(initial=0) < 0:
        raise ValueError("label maps must hold values in 0..255")
    with Image.fromarray(arr.astype(np.uint8)) as im:
        return np.asarray(im.resize((size[1], size[0]), Image.NEAREST)).astype(np.int64)


UNSUP_SETTINGS = ("match", "kl_threshold", "eval_size")


def evaluate_unsupervised(segmenter, dataset: SegDataset, out_dir: str, *, match: str = "row",
                          kl_threshold: float = 0.1, eval_size: str = "paper", save_predictions: bool = True,
                          progress: bool = True, merge: bool = True) -> Optional[Dict]:
    """The paper's unsupervised evaluation (Table 2) of ``segmenter`` (anything with
    ``segment_unsupervised(image_path, kl_threshold=, noise_key=) -> result.labels``, segment ids ``[H, W]``).

    Per image, its segments are matched one-to-one to the ground-truth classes with the Hungarian algorithm and
    TP / FP / FN accumulate per class (:func:`hungarian_counts`; ``match="row"`` is what the paper's code executes,
    ``"image"`` DiffSeg's per-image matching). ``eval_size="paper"`` scores at the size the paper's code does: the
    640-pixel-shortest-edge resize of the image (ground truth and segments resized by nearest neighbour, as
    detectron2 resizes labels); ``"input"`` at the label's own size. Which classes exist is the dataset's: for
    VOC21, PC59 and COCO-Object take ``voc21``, ``context59_bg``, ``coco_object_bg`` (background is a class, as in
    the paper after DiffCut). Resumable and data parallel like :func:`evaluate`; per-image files hold the counts.

    Returns the summary on the main process: ``mIoU``, ``pixel_accuracy``, per-class ``IoU``, ``segments_per_image``.
    """
    from .images import paper_resize_shape

    if match not in ("row", "image"):
        raise ValueError(f"match must be 'row' (the paper's code) or 'image' (DiffSeg's protocol), not {match!r}")
    if eval_size not in ("paper", "input"):
        raise ValueError(f"eval_size must be 'paper' or 'input', not {eval_size!r}")
    if not kl_threshold > 0:
        raise ValueError(f"kl_threshold must be > 0, not {kl_threshold!r}")
    rank, world, state = _dist()
    C = len(dataset.classes)
    per_dir = os.path.join(out_dir, "per_image")
    os.makedirs(per_dir, exist_ok=True)
    mine = dataset.samples[rank::world]
    todo = [s for s in mine if not os.path.exists(os.path.join(per_dir, _safe_id(s.id) + ".npz"))]
    it = todo
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(todo, desc=f"eval {dataset.name} [unsupervised]" + (f" rank {rank}" if world > 1 else ""),
                  initial=len(mine) - len(todo), total=len(mine))
    for s in it:
        gt = dataset.load_label(s)
        t0 = time.perf_counter()
        res = segmenter.segment_unsupervised(s.image, kl_threshold=kl_threshold, noise_key=s.id)
        pred = np.asarray(res.labels).astype(np.int64)
        if pred.shape != gt.shape:
            raise RuntimeError(f"{s.id}: prediction {pred.shape} and label {gt.shape} differ in size")
        if save_predictions:  # segment ids at the input's size
            from .visualize import label_png_bytes

            atomic_write_bytes(os.path.join(out_dir, "pred", _safe_id(s.id) + ".png"), label_png_bytes(pred))
        if eval_size == "paper":
            size = paper_resize_shape(*gt.shape)
            pred, gt = _nearest(pred, size), _nearest(gt, size)
        tp, fp, fn, pixels = hungarian_counts(pred, gt, C, match=match)
        atomic_write_bytes(os.path.join(per_dir, _safe_id(s.id) + ".npz"),
                           _npz_bytes(tp=tp, fp=fp, fn=fn, pixels=np.int64(pixels), num_classes=np.int64(C),
                                      segments=np.int64(len(np.unique(pred))), match=np.str_(match),
                                      kl_threshold=np.float64(kl_threshold), eval_size=np.str_(eval_size),
                                      seconds=np.float64(time.perf_counter() - t0)))
    if state is not None:
        state.wait_for_everyone()
    if rank != 0 or not merge:
        return None
    return merge_unsupervised(out_dir, dataset, match=match, kl_threshold=kl_threshold, eval_size=eval_size)


def merge_unsupervised(out_dir: str, dataset: SegDataset, *, match: str = "row", kl_threshold: float = 0.1,
                       eval_size: str = "paper") -> Dict:
    """Sum the per-image TP / FP / FN of ``dataset``'s samples found in ``out_dir``; write summary.json. Files of
    another run (other classes, matching, threshold or size) are refused, not mixed in."""
    C = len(dataset.classes)
    want = dict(match=match, kl_threshold=float(kl_threshold), eval_size=eval_size)
    tp, fp, fn = (np.zeros(C, np.int64) for _ in range(3))
    pixels, found, missing, seconds, segments = 0, 0, [], 0.0, 0
    for s in dataset.samples:
        path = os.path.join(out_dir, "per_image", _safe_id(s.id) + ".npz")
        if not os.path.exists(path):
            missing.append(s.id)
            continue
        with np.load(path) as z:
            if "tp" not in z.files or int(z["num_classes"]) != C:
                raise ValueError(f"{path} is not an unsupervised result for {C} classes: a different run?")
            got = dict(match=str(z["match"]), kl_threshold=float(z["kl_threshold"]), eval_size=str(z["eval_size"]))
            if got != want:
                raise ValueError(f"{path} was computed with {got}, this run asks for {want}: use another --out")
            tp += z["tp"]
            fp += z["fp"]
            fn += z["fn"]
            pixels += int(z["pixels"])
            segments += int(z["segments"])
            seconds += float(z["seconds"])
        found += 1
    summary = scores_from_counts(tp, fp, fn, pixels, dataset.classes)
    summary.update(dataset=dataset.name, protocol="unsupervised", **want, num_images=found, missing=missing[:20],
                   num_missing=len(missing), seconds_per_image=seconds / max(found, 1),
                   segments_per_image=segments / max(found, 1), tp=tp.tolist(), fp=fp.tolist(), fn=fn.tolist())
    atomic_write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary
