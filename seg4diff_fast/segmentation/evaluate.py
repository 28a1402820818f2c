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
"""
from __future__ import annotations

import os
import time
from typing import Dict, Optional

import numpy as np

from .._io import atomic_write_bytes, atomic_write_json
from .datasets import SegDataset
from .metrics import IGNORE_INDEX, confusion_matrix, scores_from_confusion

__all__ = ["evaluate", "merge_results"]

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
             progress: bool = True, merge: bool = True) -> Optional[Dict]:
    """Evaluate ``segmenter`` (anything with ``segment(image_path, classes) -> result.labels``) on ``dataset``.

    Returns the summary dict on the main process (``None`` on the others): ``mIoU``, ``pixel_accuracy``,
    ``mean_accuracy``, per-class ``IoU``, ``confusion`` (list of lists), ``num_images``, ``missing``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
    rank, world, state = _dist()
    C = len(dataset.classes)
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
            res = segmenter.segment(s.image, [dataset.classes[c] for c in present])
            local = np.asarray(res.labels)
            if local.shape != gt.shape:
                raise RuntimeError(f"{s.id}: prediction {local.shape} and label {gt.shape} differ in size")
            pred = np.asarray(present, dtype=np.int64)[local]
        else:  # nothing to score in this image
            pred = np.full(gt.shape, IGNORE_INDEX, dtype=np.int64)
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
    summary = merge_results(out_dir, dataset, protocol)
    return summary


def merge_results(out_dir: str, dataset: SegDataset, protocol: str = "gt") -> Dict:
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
    summary = scores_from_confusion(cm, dataset.classes)
    summary.update(dataset=dataset.name, protocol=protocol, num_images=found, missing=missing[:20],
                   num_missing=len(missing), seconds_per_image=seconds / max(found, 1),
                   confusion=cm.tolist())
    atomic_write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary
