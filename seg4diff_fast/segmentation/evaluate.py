"""Dataset evaluation: per-image results written as they come, resumable, shareable, data parallel, merged.

Layout of ``out_dir``::

    run.json               the settings of the run and their fingerprint (sha256): model, family, dtype, the
                           protocol (layers, timestep, steps, size, resize, seed, combine, ...), VAE tiling, the
                           dataset (name, root folder, split, class names) and the prompt protocol (gt / full)
    per_image/<id>.npz     confusion matrix of that image (sparse: flat indices + counts), its prompt classes,
                           the fingerprint of the settings that produced it and its inputs: path, size in bytes,
                           mtime, ctime and sha256 of its image and its label file
    per_image/<id>.lock    a claim on a sample being computed (pid, host, time); removed when it is done
    failed/<id>.json       a sample that could not be scored: its files and the reason (retried by a rerun)
    pred/<id>.png          the prediction in dataset class ids as a palette PNG (when save_predictions)
    summary.json           merged from all per_image files: settings, counts, confusion, IoU, mIoU, ...

Not in the fingerprint: the device, ``prompt_batch`` / ``tokens_per_batch`` (they group the same forwards) and
the package version; a run moved to another GPU or upgraded resumes.

Resume: a rerun with the same settings skips the samples that have a result and computes the rest; a rerun
with other settings (another dataset root included) is refused (:class:`ResumeError`, naming what differs) unless
``overwrite=True``, which deletes the folder's results first. Nothing of one run is ever reported under another's
settings, nor a sample's result under other data: a result whose image or label file changed since (another
content; a file touched but equal is hashed again and kept) is recomputed, and so is a per-image file that cannot
be read (empty, cut: named in a warning). A ``run.json`` that cannot be read is refused naming it. Checking a
result costs a ``stat`` of its two files; a file is hashed again only when its size, mtime or ctime changed.

Sharing: several runs into one folder (two shells, ``accelerate launch``, a cluster array) never compute a
sample twice: each sample is claimed by creating its lock file with ``O_CREAT | O_EXCL`` (atomic on local
filesystems and NFSv3+). A lock is stale when its process is dead: same host and no such pid, or the lock still
empty or unreadable a minute after it was made (its writer was killed while writing it); a stale lock is taken
over (under a second ``O_EXCL`` lock, so that two runs do not both take it). Other locks of another host are
never taken over automatically: after a crash there, delete ``per_image/*.lock`` by hand or pass
``overwrite``. Temporary files ``.tmp-<host>-<pid>-*`` of dead processes are removed at the start of a run.

Bad samples (unreadable image, label values outside the classes, image and label of different sizes, ...) do
not end the run: each is recorded in ``failed/`` and counted in the summary; the command line exits 3 then.

Classes are prompted by their :attr:`SegDataset.prompt_names` (the paper's words); a dataset's ``unscored`` classes
(COCO-Object's background) are prompted when present but their pixels are not scored. Each image's noise is keyed
by its sample id (``segment(..., noise_key=id)``): different per image, reproducible, independent of sharding.
mIoU averages over the classes with ground-truth pixels (``average="gt"``, detectron2's SemSegEvaluator, which
scored the paper's Table 1) unless ``average="union"`` (a merge-time choice: not in the fingerprint).

:func:`evaluate_unsupervised` is the paper's Table 2 protocol (DiffSeg's mask proposals): ``segment_unsupervised``
per image, its segments matched to the ground-truth classes by the Hungarian algorithm (:func:`hungarian_counts`).
It shares the run machinery above (settings, claims, failures); its settings add match, threshold, size and how
the prediction reaches that size (``pred_fit``: aligned ``"resize"``, or the paper's ``"top-left-crop"``).

Under ``accelerate launch`` each process takes every ``world``-th sample; after a barrier the main process
merges the files (the folder is the gather).

Protocols:
- ``"gt"`` (the paper's): the prompt holds only the classes present in the image's ground truth, read, as the
  paper's code reads them, from the label resized to the 640-pixel shortest edge (:func:`gt_classes`: a class the
  resize removes is not prompted, though its pixels are scored). An oracle: use it to compare with the paper's
  table.
- ``"full"``: the prompt holds every class of the dataset, split over several prompts when needed. What a
  user without ground truth gets.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
import zipfile
import zlib
from typing import Dict, List, Optional

import numpy as np

from .._io import HOST, atomic_write_bytes, atomic_write_json, clean_temporaries, current_umask, pid_alive, read_json
from .datasets import SegDataset
from .images import image_size
from .metrics import IGNORE_INDEX, confusion_matrix, hungarian_counts, scores_from_confusion, scores_from_counts

__all__ = ["evaluate", "merge_results", "evaluate_unsupervised", "merge_unsupervised", "run_settings", "ResumeError",
           "PROTOCOLS", "PRED_FITS", "gt_classes", "fit_prediction"]

PROTOCOLS = ("gt", "full")
MAX_LISTED = 50  # failed / skipped samples listed by id in summary.json (all are counted)


class ResumeError(ValueError):
    """``out_dir`` holds results of other settings (or of an older version without recorded settings)."""


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


def run_settings(segmenter, dataset: SegDataset, protocol: str) -> Dict:
    """Everything that changes a result of this evaluation (see the module doc), JSON-able."""
    settings_of = getattr(segmenter, "settings", None)
    seg = settings_of() if callable(settings_of) else {"segmenter": type(segmenter).__qualname__}
    out = {"segmenter": seg, "dataset": dataset.name, "root": getattr(dataset, "root", None),
           "split": getattr(dataset, "split", None), "classes": list(dataset.classes), "protocol": protocol}
    if dataset.prompt_classes != dataset.classes:  # voc20b
        out.update(prompt_classes=list(dataset.prompt_classes), prompt_class_ids=list(dataset.prompt_class_ids))
    if protocol == "gt":
        out["gt_classes"] = "paper-resized"  # gt_classes(): what an older version (the label as stored) lacks
    return out


def _fingerprint(settings: Dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(text: str, n: int = 60) -> str:
    """``text`` cut to about ``n`` characters in the middle (the ends of a path tell paths apart)."""
    return text if len(text) <= n else text[: n // 3] + "..." + text[-(n - n // 3 - 3):]


def _differences(old: Dict, new: Dict) -> str:
    a, b = _flat(old), _flat(new)
    diffs = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            va, vb = (_short(json.dumps(x.get(k))) if k in x else "(absent)" for x in (a, b))
            diffs.append(f"{k}: {va} then, {vb} now")
    return "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_record(path: str) -> Dict:
    """What a result was computed from: the file's path, size, mtime, ctime and content hash."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns, "sha256": _sha256(path)}


def _sample_inputs(s) -> Dict:
    return {"image": _file_record(s.image), "label": _file_record(s.label)}


def _input_change(s, inputs: Dict, rehash: bool = True) -> Optional[str]:
    """How the sample's files differ from ``inputs`` (their records when its result was computed), or None when
    they hold the same content: size, mtime and ctime unchanged (nothing wrote to the file since), or else the same
    sha256 (hashed again only then; not at all with ``rehash=False``, which any change of those fails)."""
    for what, path in (("image", s.image), ("label", s.label)):
        rec = inputs.get(what) or {}
        if rec.get("path") != os.path.abspath(path):
            return f"its {what} was {rec.get('path')!r}, now {path!r}"
        try:
            st = os.stat(path)
        except OSError:
            return f"its {what} {path!r} is gone"
        if st.st_size != rec.get("bytes"):
            return f"its {what} {path!r} changed ({rec.get('bytes')} bytes then, {st.st_size} now)"
        if (st.st_mtime_ns, st.st_ctime_ns) == (rec.get("mtime_ns"), rec.get("ctime_ns")):
            continue
        if not rehash or _sha256(path) != rec.get("sha256"):
            return f"its {what} {path!r} changed (other content)"
    return None


_NPZ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)


def _read_result(path: str, fp: str, s) -> tuple:
    """The per-image result ``path`` of sample ``s`` -> (arrays, None) when it is readable, of the run's
    fingerprint ``fp`` and computed from the sample's present files; (None, why not) otherwise."""
    if not os.path.exists(path):
        return None, "missing"
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}  # every member read: a cut file fails here, not later
    except _NPZ_ERRORS as e:
        return None, f"{path} cannot be read ({type(e).__name__}: {e or 'empty or cut'})"
    if "fingerprint" not in arrays or str(arrays["fingerprint"]) != fp:
        return None, f"{path} was computed with other settings than run.json records"
    try:
        inputs = json.loads(str(arrays["inputs"]))
    except (KeyError, ValueError):
        return None, f"{path} does not record the files it was computed from (an older version)"
    change = _input_change(s, inputs)
    if change is not None:
        return None, f"{path} was computed from other data: {change}"
    return arrays, None


def _read_run(run_file: str) -> Dict:
    try:
        run = read_json(run_file, "run.json")
    except ValueError as e:
        raise ResumeError(f"{e}: it records the settings of the results beside it; pass overwrite to start over "
                          "(its results are deleted), or use another output folder") from None
    if not isinstance(run, dict) or not isinstance(run.get("fingerprint"), str):
        raise ResumeError(f"run.json: {run_file!r} holds no fingerprint; pass overwrite to start over, or use "
                          "another output folder")
    return run


def _our_entries(out_dir: str) -> List[str]:
    return [os.path.join(out_dir, n) for n in ("per_image", "failed", "pred", "summary.json", "run.json")]


def _start_run(out_dir: str, settings: Dict, overwrite: bool, rank: int, state) -> str:
    """Claim ``out_dir`` for ``settings`` (or find it is ours): returns the fingerprint; raises ResumeError."""
    fp = _fingerprint(settings)
    run_file = os.path.join(out_dir, "run.json")
    if overwrite and rank == 0:
        for p in _our_entries(out_dir):
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.unlink(p)
    if state is not None:
        state.wait_for_everyone()
    os.makedirs(out_dir, exist_ok=True)
    if not os.path.exists(run_file):
        per = os.path.join(out_dir, "per_image")
        if os.path.isdir(per) and any(f.endswith(".npz") and not f.startswith(".tmp-") for f in os.listdir(per)):
            raise ResumeError(f"{out_dir} holds per-image results without a run.json (an older version, or another "
                              "tool): their settings are unknown. Use another output folder, or overwrite to start over")
        # create run.json only if absent (os.link fails on an existing name): of two runs starting at once with
        # different settings exactly one wins, the other compares below and is refused
        data = (json.dumps({"fingerprint": fp, "settings": settings}, indent=2, sort_keys=True) + "\n").encode()
        tmp = os.path.join(out_dir, f".tmp-{HOST}-{os.getpid()}-run.json")
        with open(tmp, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~current_umask())
        try:
            os.link(tmp, run_file)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    old = _read_run(run_file)
    if old.get("fingerprint") != fp:
        raise ResumeError(f"{out_dir} holds results of other settings ({_differences(old.get('settings', {}), settings)}). "
                          "Use another output folder, or overwrite to start over")
    return fp


def _lock_path(per_dir: str, sid: str) -> str:
    return os.path.join(per_dir, sid + ".lock")


#: seconds after which a lock still empty or unreadable was left by a writer killed while writing it (a live
#: writer fills it within microseconds of creating it)
UNREADABLE_LOCK_S = 60.0


def _read_lock(path: str) -> Optional[Dict]:
    """The lock's record; None when there is no lock; ``{}`` when it is empty or unreadable."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
        int(info.get("pid", 0))
    except (ValueError, TypeError, AttributeError):
        return {}
    return info


def _stale(path: str) -> bool:
    """Whether the lock ``path`` was left by a dead process: one of this host whose pid is gone, or a lock that
    has stayed empty / unreadable for :data:`UNREADABLE_LOCK_S` (being written this instant, it is not stale)."""
    info = _read_lock(path)
    if info is None:
        return False
    if not info:
        try:
            return time.time() - os.stat(path).st_mtime > UNREADABLE_LOCK_S
        except FileNotFoundError:
            return False
    return info.get("host") == HOST and not pid_alive(int(info.get("pid", 0)))


def _create_lock(path: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": HOST, "time": time.time()}, f)
    return True


def _claim(per_dir: str, sid: str) -> bool:
    """Take the sample's lock; True if this process now holds it."""
    path = _lock_path(per_dir, sid)
    if _create_lock(path):
        return True
    if not _stale(path):
        return False
    # take over a dead process's lock; the .reclaim lock keeps two runs from both doing it
    guard = path + ".reclaim"
    if not _create_lock(guard):
        if not _stale(guard):
            return False
        os.unlink(guard)  # its owner died while taking over; the window is microseconds wide
        if not _create_lock(guard):
            return False
    try:
        if _stale(path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        return _create_lock(path)
    finally:
        os.unlink(guard)


def _release(per_dir: str, sid: str) -> None:
    path = _lock_path(per_dir, sid)
    info = _read_lock(path)
    if info and info.get("pid") == os.getpid() and info.get("host") == HOST:
        os.unlink(path)


def _checked_label(dataset: SegDataset, s, C: int) -> np.ndarray:
    """The sample's label ``[H, W]`` int64, checked against the classes and the image's size (from its header)
    before any model work."""
    gt = dataset.load_label(s)
    keep = gt != dataset.ignore_index
    if keep.any() and (gt[keep].min() < 0 or gt[keep].max() >= C):
        bad = sorted(set(np.unique(gt[keep]).tolist()) - set(range(C)))
        raise ValueError(f"label values {bad[:10]} are outside the {C} classes (0..{C - 1}, {dataset.ignore_index} "
                         "ignored)")
    if not os.path.exists(s.image):
        raise FileNotFoundError(f"no such image {s.image}")
    h, w = image_size(s.image)  # the header (EXIF orientation applied, as the image is read): size without decoding
    if (h, w) != gt.shape:
        raise ValueError(f"image {h}x{w} and label {gt.shape[0]}x{gt.shape[1]} differ in size")
    return gt


def gt_classes(label: np.ndarray, ignore_index: int = IGNORE_INDEX) -> List[int]:
    """The classes the ``gt`` protocol prompts for ``label`` ``[H, W]``: those left in it once resized as the paper's
    code resizes it before reading them (detectron2's DatasetMapper: 640-pixel shortest edge, longest at most 2560,
    nearest neighbour; :func:`~seg4diff_fast.segmentation.images.paper_resize_shape`). A class that the resize
    removes (a sliver of a large Cityscapes or ADE image) is not prompted; upsizing keeps every class."""
    from .images import paper_resize_shape

    small = _nearest(label, paper_resize_shape(*label.shape))
    return [int(c) for c in np.unique(small) if c != ignore_index]


def _segment_predict(segmenter, dataset: SegDataset):
    """The default ``predict`` of :func:`evaluate`: ``segmenter.segment`` with the prompt words of the classes."""

    def predict(s, gt: np.ndarray, present: List[int]) -> np.ndarray:
        names, ids = dataset.prompt_for(present)  # voc20b: 39 background names score as background
        local = np.asarray(segmenter.segment(s.image, names, noise_key=s.id).labels)
        if local.shape != gt.shape:
            raise ValueError(f"prediction {local.shape} and label {gt.shape} differ in size")
        return np.asarray(ids, dtype=np.int64)[local]
    return predict


def _score_sample(predict, dataset: SegDataset, s, protocol: str, C: int):
    """One sample -> (pred ``[H, W]`` int64 in dataset ids / 255, npz arrays: the confusion, prompt class ids)."""
    gt = _checked_label(dataset, s, C)
    present = gt_classes(gt, dataset.ignore_index) if protocol == "gt" else list(range(C))
    if not present:  # nothing to score in this image
        pred, cm = np.full(gt.shape, IGNORE_INDEX, dtype=np.int64), np.zeros((C, C), dtype=np.int64)
    else:
        pred = np.asarray(predict(s, gt, present), dtype=np.int64)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {pred.shape} and label {gt.shape} differ in size")
        if dataset.unscored:  # prompted when present, not scored (COCO-Object's background: ignore label 0)
            gt = np.where(np.isin(gt, dataset.unscored), dataset.ignore_index, gt)
        cm = confusion_matrix(pred, gt, C, ignore_index=dataset.ignore_index)
    flat = cm.reshape(-1)
    nz = np.nonzero(flat)[0]
    return pred, dict(index=nz.astype(np.int64), count=flat[nz].astype(np.int64), num_classes=np.int64(C),
                      classes=np.asarray(present, dtype=np.int64))


def evaluate(segmenter, dataset: SegDataset, out_dir: str, *, protocol: str = "gt", save_predictions: bool = True,
             progress: bool = True, merge: bool = True, overwrite: bool = False, average: str = "gt",
             predict=None, settings: Optional[Dict] = None) -> Optional[Dict]:
    """Evaluate ``segmenter`` (anything with ``segment(image_path, classes, noise_key=id) -> result.labels``; its
    ``settings()``, when it has one, goes into the fingerprint) on ``dataset``, writing into ``out_dir``.

    ``predict``: another way to predict an image, ``predict(sample, label [H, W], classes) -> [H, W]`` dataset class
    ids, given the sample's label and the classes the protocol prompts (MAGNET's official validation matches its
    maps to the label's masks: :mod:`seg4diff_fast.magnet.validate`); ``settings``: what it adds to the
    fingerprint. Default: ``segmenter.segment`` with the classes' prompt words.

    Returns the summary dict on the main process (``None`` on the others): ``mIoU``, ``pixel_accuracy``,
    ``mean_accuracy``, per-class ``IoU``, ``confusion``, ``counts`` (done, failed, skipped), ``failed`` (id,
    files, reason), the settings. Raises :class:`ResumeError` when ``out_dir`` holds results of other settings.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
    if predict is None:
        _check_prompt_names(dataset)
        predict = _segment_predict(segmenter, dataset)
    C = len(dataset.classes)
    _check_predictions(save_predictions, C)
    run = run_settings(segmenter, dataset, protocol)
    run.update(settings or {})
    done = _run(segmenter, dataset, out_dir, run, lambda s: _score_sample(predict, dataset, s, protocol, C),
                save_predictions=save_predictions, progress=progress, overwrite=overwrite, desc=protocol)
    if not done or not merge:
        return None
    return merge_results(out_dir, dataset, protocol, average=average)


def _run(segmenter, dataset: SegDataset, out_dir: str, settings: Dict, score, *, save_predictions: bool,
         progress: bool, overwrite: bool, desc: str) -> bool:
    """The run machinery shared by both evaluations: claim ``out_dir`` for ``settings``, then for each of this
    process's samples without a result: claim it, ``score(sample) -> (pred [H, W] or None, npz arrays)``, write
    ``pred/<id>.png`` and ``per_image/<id>.npz`` (with the fingerprint), or ``failed/<id>.json`` when ``score``
    raises. Returns True on the process that merges (rank 0, after a barrier)."""
    rank, world, state = _dist()
    fp = _start_run(out_dir, settings, overwrite, rank, state)
    clean_temporaries(out_dir)
    per_dir, failed_dir = os.path.join(out_dir, "per_image"), os.path.join(out_dir, "failed")
    os.makedirs(per_dir, exist_ok=True)
    mine = dataset.samples[rank::world]

    def why_not_done(s):  # None when the sample has a valid result
        return _read_result(os.path.join(per_dir, _safe_id(s.id) + ".npz"), fp, s)[1]

    todo = [s for s in mine if why_not_done(s) is not None]
    it = todo
    bar = None
    if progress:
        from tqdm.auto import tqdm

        it = bar = tqdm(todo, desc=f"eval {dataset.name} [{desc}]" + (f" rank {rank}" if world > 1 else ""),
                        initial=len(mine) - len(todo), total=len(mine))
    for s in it:
        sid = _safe_id(s.id)
        if not _claim(per_dir, sid):
            continue  # another run is computing it
        try:
            why = why_not_done(s)
            if why is None:  # finished by another run between our check and our claim
                continue
            if why != "missing":  # a corrupt or outdated result: said, removed, computed again
                if bar is not None:
                    bar.write(f"recomputing {s.id}: {why}")
                else:
                    warnings.warn(f"recomputing {s.id}: {why}", stacklevel=2)
                for old in (os.path.join(per_dir, sid + ".npz"), os.path.join(out_dir, "pred", sid + ".png")):
                    if os.path.exists(old):
                        os.unlink(old)
            t0 = time.perf_counter()
            try:
                inputs = _sample_inputs(s)  # hashed before scoring; a file written meanwhile fails the check below
                pred, arrays = score(s)
                change = _input_change(s, inputs, rehash=False)
                if change is not None:
                    raise RuntimeError(f"the sample's files changed while it was evaluated ({change}); rerun")
            except Exception as e:  # a bad sample: recorded, the run goes on
                reason = f"{type(e).__name__}: {' '.join(str(e).split())}"
                atomic_write_json(os.path.join(failed_dir, sid + ".json"),
                                  {"id": s.id, "image": s.image, "label": s.label, "reason": reason, "fingerprint": fp})
                if bar is not None:
                    bar.write(f"failed {s.id}: {reason[:200]}")
                continue
            if save_predictions and pred is not None:
                from .visualize import label_png_bytes

                atomic_write_bytes(os.path.join(out_dir, "pred", sid + ".png"), label_png_bytes(pred))
            atomic_write_bytes(os.path.join(per_dir, sid + ".npz"),
                               _npz_bytes(**arrays, seconds=np.float64(time.perf_counter() - t0),
                                          fingerprint=np.str_(fp), inputs=np.str_(json.dumps(inputs))))
            if os.path.exists(os.path.join(failed_dir, sid + ".json")):
                os.unlink(os.path.join(failed_dir, sid + ".json"))
        finally:
            _release(per_dir, sid)
    if state is not None:
        state.wait_for_everyone()
    return rank == 0


def _check_predictions(save_predictions: bool, C: int):
    if save_predictions and C > IGNORE_INDEX:
        raise ValueError(f"save_predictions: a prediction PNG holds class ids 0..{IGNORE_INDEX - 1}, the dataset has "
                         f"{C} classes; pass save_predictions=False")


def _check_prompt_names(dataset: SegDataset):
    from .tokens import check_class_names

    check_class_names(dataset.classes, f"{dataset.name}: classes")  # before any sample runs (none, '', repeats)
    names = dataset.prompt_names
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{dataset.name}: the paper's prompt words collide for {dup} (e.g. 'food-things' and "
                         "'food-stuff' are both prompted 'food'), so classes cannot be told apart by their tokens; "
                         "the paper evaluates this dataset unsupervised only (eval --unsupervised)")


def _gather(out_dir: str, dataset: SegDataset):
    """Walk ``dataset``'s samples in ``out_dir``: (run.json, [(sample, npz arrays)] of done ones, failed records,
    skipped ids). Each npz must be readable, carry run.json's fingerprint and match the sample's present files
    (:class:`ResumeError` naming the file otherwise: a rerun of the evaluation recomputes it)."""
    run_file = os.path.join(out_dir, "run.json")
    run = _read_run(run_file)
    done, failed, skipped = [], [], []
    for s in dataset.samples:
        sid = _safe_id(s.id)
        path = os.path.join(out_dir, "per_image", sid + ".npz")
        fail = os.path.join(out_dir, "failed", sid + ".json")
        if os.path.exists(path):
            z, why = _read_result(path, run["fingerprint"], s)
            if why is not None:
                raise ResumeError(f"{why}; rerun the evaluation to recompute it")
            if int(z["num_classes"]) != len(dataset.classes):
                raise ResumeError(f"{path} has {int(z['num_classes'])} classes, the dataset {len(dataset.classes)}")
            done.append((s, z))
        elif os.path.exists(fail):
            try:
                rec = read_json(fail, "failure record")
            except ValueError as e:  # a cut record: still a failed sample, retried by the next run
                rec = {"id": s.id, "image": s.image, "label": s.label, "reason": f"(unreadable record) {e}"}
            failed.append({k: rec.get(k) for k in ("id", "image", "label", "reason")})
        else:
            skipped.append(s.id)
    return run, done, failed, skipped


def _run_fields(run, dataset, done, failed, skipped) -> Dict:
    seg = run["settings"].get("segmenter", {})
    return dict(model=seg.get("model") if isinstance(seg, dict) else None, dataset=dataset.name,
                split=getattr(dataset, "split", None), settings=run["settings"], fingerprint=run["fingerprint"],
                counts={"done": len(done), "failed": len(failed), "skipped": len(skipped)}, num_images=len(done),
                failed=failed[:MAX_LISTED], skipped=skipped[:MAX_LISTED])


def merge_results(out_dir: str, dataset: SegDataset, protocol: str = "gt", average: str = "gt") -> Dict:
    """Sum the per-image confusion matrices of ``dataset``'s samples found in ``out_dir``; write summary.json.

    A sample counts as ``done`` (has a result), ``failed`` (recorded in ``failed/``) or ``skipped`` (no result:
    claimed by a run still going, or not reached)."""
    C = len(dataset.classes)
    run, done, failed, skipped = _gather(out_dir, dataset)
    total = np.zeros(C * C, dtype=np.int64)
    seconds = 0.0
    for _, z in done:
        np.add.at(total, z["index"], z["count"])
        seconds += float(z["seconds"])
    cm = total.reshape(C, C)
    summary = scores_from_confusion(cm, dataset.classes, average=average)
    summary.update(protocol=protocol, average=average, **_run_fields(run, dataset, done, failed, skipped),
                   seconds_per_image=seconds / max(len(done), 1), confusion=cm.tolist())
    atomic_write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary


def _nearest(arr: np.ndarray, size) -> np.ndarray:
    """``[H, W]`` labels -> ``size`` (h, w) by nearest neighbour, as PIL (detectron2's segmentation resize; PIL
    samples the same pixels in every mode, so 32-bit labels of more than 255 classes resize as 8-bit ones)."""
    from PIL import Image

    if tuple(arr.shape) == tuple(size):
        return arr
    if arr.max(initial=0) >= 2 ** 31 or arr.min(initial=0) < 0:
        raise ValueError("label maps must hold values in 0..2**31-1")
    with Image.fromarray(arr.astype(np.int32)) as im:
        return np.asarray(im.resize((size[1], size[0]), Image.NEAREST)).astype(np.int64)


UNSUP_SETTINGS = ("match", "kl_threshold", "eval_size", "pred_fit")
PRED_FITS = ("resize", "top-left-crop")


def fit_prediction(pred: np.ndarray, size, pred_fit: str = "resize") -> np.ndarray:
    """Segment ids ``pred`` ``[H, W]`` (at the input's size) -> ``size`` (h, w), the scoring size.

    ``"resize"``: nearest-neighbour resize, aligned with the label resized the same way. ``"top-left-crop"``: what
    the paper's ``test_unsupervised`` executes: detectron2's ``sem_seg_postprocess(output, image_size, ...)`` with
    the output at the input's size crops its top-left ``min(H, h) x min(W, w)`` before resizing to ``(h, w)``; for an
    image the 640-pixel resize shrinks (Cityscapes 1024x2048 -> 640x1280) that is the top-left 640x1280 of the
    prediction scored against the whole label resized to 640x1280 (misaligned); for one it enlarges (VOC, most of
    ADE) it is the whole prediction, the same as ``"resize"``."""
    if pred_fit not in PRED_FITS:
        raise ValueError(f"pred_fit must be one of {PRED_FITS}, not {pred_fit!r}")
    if pred_fit == "top-left-crop":
        pred = pred[: size[0], : size[1]]
    return _nearest(pred, size)


def evaluate_unsupervised(segmenter, dataset: SegDataset, out_dir: str, *, match: str = "row",
                          kl_threshold: float = 0.1, eval_size: str = "paper", pred_fit: str = "resize",
                          save_predictions: bool = True, progress: bool = True, merge: bool = True,
                          overwrite: bool = False) -> Optional[Dict]:
    """The paper's unsupervised evaluation (Table 2) of ``segmenter`` (anything with
    ``segment_unsupervised(image_path, kl_threshold=, noise_key=) -> result.labels``, segment ids ``[H, W]``).

    Per image, its segments are matched one-to-one to the ground-truth classes with the Hungarian algorithm and
    TP / FP / FN accumulate per class (:func:`hungarian_counts`; ``match="row"`` is what the paper's code executes,
    ``"image"`` DiffSeg's per-image matching). ``eval_size="paper"`` scores at the size the paper's code does: the
    640-pixel-shortest-edge resize of the image (ground truth and segments resized by nearest neighbour, as
    detectron2 resizes labels); ``"input"`` at the label's own size. ``pred_fit`` (with ``eval_size="paper"``): how
    the segments reach that size, ``"resize"`` (aligned with the label) or ``"top-left-crop"`` (the paper's code:
    on Cityscapes the top-left 640x1280 of the prediction against the whole resized label; :func:`fit_prediction`).
    Which classes exist is the dataset's: for
    VOC21, PC59 and COCO-Object take ``voc21``, ``context59_bg``, ``coco_object_bg`` (background is a class, as in
    the paper after DiffCut). Resumable, shareable and data parallel like :func:`evaluate` (the same run.json,
    claims and failure records); per-image files hold the counts.

    Returns the summary on the main process: ``mIoU``, ``pixel_accuracy``, per-class ``IoU``, ``segments_per_image``.
    """
    from .images import paper_resize_shape

    if match not in ("row", "image"):
        raise ValueError(f"match must be 'row' (the paper's code) or 'image' (DiffSeg's protocol), not {match!r}")
    if eval_size not in ("paper", "input"):
        raise ValueError(f"eval_size must be 'paper' or 'input', not {eval_size!r}")
    if pred_fit not in PRED_FITS:
        raise ValueError(f"pred_fit must be one of {PRED_FITS}, not {pred_fit!r}")
    if pred_fit != "resize" and eval_size != "paper":
        raise ValueError(f"pred_fit={pred_fit!r} brings the prediction to the paper's size: it needs eval_size='paper'")
    if not kl_threshold > 0:
        raise ValueError(f"kl_threshold must be > 0, not {kl_threshold!r}")
    C = len(dataset.classes)

    def score(s):
        gt = _checked_label(dataset, s, C)
        res = segmenter.segment_unsupervised(s.image, kl_threshold=kl_threshold, noise_key=s.id)
        pred = np.asarray(res.labels).astype(np.int64)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {pred.shape} and label {gt.shape} differ in size")
        saved = pred  # segment ids at the input's size
        if eval_size == "paper":
            size = paper_resize_shape(*gt.shape)
            pred, gt = fit_prediction(pred, size, pred_fit), _nearest(gt, size)
        tp, fp, fn, pixels = hungarian_counts(pred, gt, C, match=match, ignore_index=dataset.ignore_index)
        return saved, dict(tp=tp, fp=fp, fn=fn, pixels=np.int64(pixels), num_classes=np.int64(C),
                           segments=np.int64(len(np.unique(pred))), match=np.str_(match),
                           kl_threshold=np.float64(kl_threshold), eval_size=np.str_(eval_size),
                           pred_fit=np.str_(pred_fit))

    settings = run_settings(segmenter, dataset, "unsupervised")
    settings.update(match=match, kl_threshold=float(kl_threshold), eval_size=eval_size, pred_fit=pred_fit)
    if not _run(segmenter, dataset, out_dir, settings, score, save_predictions=save_predictions, progress=progress,
                overwrite=overwrite, desc="unsupervised") or not merge:
        return None
    return merge_unsupervised(out_dir, dataset, match=match, kl_threshold=kl_threshold, eval_size=eval_size,
                              pred_fit=pred_fit)


def merge_unsupervised(out_dir: str, dataset: SegDataset, *, match: str = "row", kl_threshold: float = 0.1,
                       eval_size: str = "paper", pred_fit: str = "resize") -> Dict:
    """Sum the per-image TP / FP / FN of ``dataset``'s samples found in ``out_dir``; write summary.json. Files of
    another run (other classes, matching, threshold or size) are refused, not mixed in."""
    C = len(dataset.classes)
    want = dict(match=match, kl_threshold=float(kl_threshold), eval_size=eval_size, pred_fit=pred_fit)
    run, done, failed, skipped = _gather(out_dir, dataset)
    tp, fp, fn = (np.zeros(C, np.int64) for _ in range(3))
    pixels, seconds, segments = 0, 0.0, 0
    for s, z in done:
        if "tp" not in z:
            raise ResumeError(f"per_image of {s.id} holds no unsupervised counts: use another output folder")
        got = dict(match=str(z["match"]), kl_threshold=float(z["kl_threshold"]), eval_size=str(z["eval_size"]),
                   pred_fit=str(z["pred_fit"]) if "pred_fit" in z else "resize")  # older files: resize
        if got != want:
            raise ResumeError(f"per_image of {s.id} was computed with {got}, this run asks for {want}: use "
                              "another output folder")
        tp += z["tp"]
        fp += z["fp"]
        fn += z["fn"]
        pixels += int(z["pixels"])
        segments += int(z["segments"])
        seconds += float(z["seconds"])
    n = len(done)
    summary = scores_from_counts(tp, fp, fn, pixels, dataset.classes)
    summary.update(protocol="unsupervised", **want, **_run_fields(run, dataset, done, failed, skipped),
                   missing=(skipped + [f["id"] for f in failed])[:20], num_missing=len(skipped) + len(failed),
                   seconds_per_image=seconds / max(n, 1), segments_per_image=segments / max(n, 1), tp=tp.tolist(),
                   fp=fp.tolist(), fn=fn.tolist())
    atomic_write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary
