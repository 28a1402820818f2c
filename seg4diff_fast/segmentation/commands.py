"""The ``segment``, ``generate`` and ``eval`` subcommands; ``seg4diff_fast.cli`` calls :func:`register_commands`.

Every argument is checked before any model is loaded, so that a typo costs a second, not a model load.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import numpy as np

__all__ = ["register_commands", "write_result"]

DEFAULT_MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"


def _parse_classes(args) -> Optional[List[str]]:
    from .tokens import check_class_names

    names = None
    if getattr(args, "classes_file", None):
        if not os.path.exists(args.classes_file):
            raise ValueError(f"--classes-file: no such file {args.classes_file!r}")
        with open(args.classes_file) as f:
            names = [l.strip() for l in f if l.strip()]
    elif getattr(args, "classes", None) is not None:
        names = [c for c in args.classes.split(",")]
    if names is None:
        return None
    return check_class_names(names, "--classes")


def _model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model and protocol (defaults: the paper's, per family)")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id or local folder; 'tiny' (SD3), 'tiny-sd3.5', 'tiny-flux' build a tiny random pipeline offline: a smoke "
                        "test of the installation, its masks mean nothing (default: %(default)s)")
    g.add_argument("--family", choices=["sd3", "sd3.5", "flux"], help="model family (default: from the model id)")
    g.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    g.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                   help="weights dtype (default on GPU: float16 for SD3, bfloat16 for Flux; float32 on CPU)")
    g.add_argument("--layers", help="expert layer(s), comma separated ints or names (SD3, SD3.5: 9; Flux: 12)")
    g.add_argument("--timestep-index", type=int, help="noise at timesteps[i] of the schedule (default -8)")
    g.add_argument("--steps", type=int, dest="num_inference_steps", help="schedule length (default 28; Flux 50)")
    g.add_argument("--size", help="working size in pixels, or 'native' for the input's own size (default 1024)")
    g.add_argument("--resize", choices=["paper", "square", "aspect", "pad"],
                   help="paper (default: shortest edge 640, then squashed to --size), square, aspect, pad")
    g.add_argument("--seed", type=int, help="noise seed (default 0)")
    g.add_argument("--combine", choices=["raw", "minmax"], help="class scores across prompts (default raw)")
    g.add_argument("--max-classes-per-prompt", type=int)
    g.add_argument("--prompt-batch", type=int, help="prompts per transformer batch (default 8)")
    g.add_argument("--vae-tiling", choices=["auto", "on", "off"], default="auto")
    g.add_argument("--shift-seq-len", help="Flux: sequence length of the timestep shift, an int or 'real' for the "
                                           "image's token count (default 16, the paper's code)")
    g.add_argument("--vae-pixels", choices=["signed", "unit"],
                   help="pixels given to the VAE: signed [-1, 1], unit [0, 1] (default: signed; unit for Flux, as "
                        "the paper's code)")


def _overrides(args) -> dict:
    o = {}
    if args.layers:
        o["layers"] = tuple(int(x) if x.strip().lstrip("-").isdigit() else x.strip() for x in args.layers.split(","))
    for k in ("timestep_index", "num_inference_steps", "resize", "seed", "combine", "max_classes_per_prompt",
              "prompt_batch", "vae_pixels"):
        v = getattr(args, k, None)
        if v is not None:
            o[k] = v
    if getattr(args, "shift_seq_len", None) is not None:
        if args.shift_seq_len == "real":
            o["shift_seq_len"] = None
        elif args.shift_seq_len.isdigit() and int(args.shift_seq_len) > 0:
            o["shift_seq_len"] = int(args.shift_seq_len)
        else:
            raise ValueError(f"--shift-seq-len must be a positive int or 'real', not {args.shift_seq_len!r}")
    if args.size is not None:
        if args.size == "native":
            o["size"] = None
        elif args.size.isdigit():
            o["size"] = int(args.size)
        else:
            raise ValueError(f"--size must be a number of pixels or 'native', not {args.size!r}")
    return o


def _build(args, overrides):
    import torch

    from .segmenter import Segmenter

    device = args.device
    if device is None:  # under `accelerate launch` each process takes its own GPU
        device = "cuda:" + os.environ.get("LOCAL_RANK", "0") if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype else None  # None: float16 (SD3) / bfloat16 (Flux) on GPU
    return Segmenter.from_pretrained(args.model, torch_dtype=dtype, device=device, family=args.family,
                                     progress=True, vae_tiling=args.vae_tiling, **overrides)


def write_result(out_dir: str, image, res, heatmaps: bool = True) -> dict:
    """Write ``labels.png`` (palette, pixel value = class id), ``overlay.png`` (with legend), ``heatmaps/*.png``
    and ``summary.json`` into ``out_dir``; every file atomically. Returns the summary."""
    from .._io import atomic_write_bytes, atomic_write_json
    from .visualize import heatmap, label_png_bytes, overlay

    import io

    def png(im):
        b = io.BytesIO()
        im.save(b, format="PNG")
        return b.getvalue()

    labels = np.asarray(res.labels)
    atomic_write_bytes(os.path.join(out_dir, "labels.png"), label_png_bytes(labels))
    atomic_write_bytes(os.path.join(out_dir, "overlay.png"), png(overlay(image, labels, res.classes)))
    files = []
    if heatmaps and res.scores is not None:
        scores = res.scores.numpy() if hasattr(res.scores, "numpy") else np.asarray(res.scores)
        for k, name in enumerate(res.classes):
            fn = f"{k:03d}_{''.join(ch if ch.isalnum() else '_' for ch in name)}.png"
            atomic_write_bytes(os.path.join(out_dir, "heatmaps", fn), png(heatmap(scores[k])))
            files.append(fn)
    summary = {
        "classes": list(res.classes),
        "pixel_share": {n: float((labels == k).mean()) for k, n in enumerate(res.classes)},
        "size": list(labels.shape),
        "files": {"labels": "labels.png", "overlay": "overlay.png", "heatmaps": files},
        "meta": _jsonable(res.meta),
    }
    atomic_write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return x


def _stems(paths: List[str]) -> List[str]:
    out, seen = [], {}
    for p in paths:
        s = os.path.splitext(os.path.basename(p))[0] or "image"
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.append(s if n == 0 else f"{s}_{n}")
    return out


def cmd_segment(args) -> int:
    from PIL import Image

    from .images import load_image

    try:
        classes = _parse_classes(args)
        if classes is None and not args.unsupervised:
            raise ValueError("--classes is required (e.g. --classes 'cat,grass,sky'), or pass --unsupervised")
        overrides = _overrides(args)
        for p in args.images:
            load_image(p, f"image {p!r}")  # unreadable files fail here, before the model loads
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"seg4diff-fast segment: error: {e}", file=sys.stderr)
        return 2
    try:
        seg = _build(args, overrides)
    except (RuntimeError, ValueError) as e:
        print(f"seg4diff-fast segment: error: {e}", file=sys.stderr)
        return 1
    from tqdm.auto import tqdm

    for path, stem in tqdm(list(zip(args.images, _stems(args.images))), desc="segment", disable=len(args.images) < 2):
        res = seg.segment_unsupervised(path) if args.unsupervised else seg.segment(path, classes)
        with Image.open(path) as im:
            summary = write_result(os.path.join(args.out, stem), im.convert("RGB"), res, not args.no_heatmaps)
        shares = ", ".join(f"{n} {100 * v:.1f}%" for n, v in summary["pixel_share"].items() if v > 0)
        print(f"{path}: {shares} -> {os.path.join(args.out, stem)}")
        peak = res.meta.get("peak_memory_bytes")
        if peak:
            print(f"  peak GPU memory {peak / 2**30:.2f} GiB")
    return 0


def cmd_generate(args) -> int:
    import contextlib

    from .. import guidance

    try:
        classes = _parse_classes(args)
        if classes is None:
            raise ValueError("--classes is required: the names, each occurring in the prompt")
        overrides = _overrides(args)
        perturb = guidance.parse_arguments(args)
    except (ValueError, TypeError) as e:
        print(f"seg4diff-fast generate: error: {e}", file=sys.stderr)
        return 2
    try:
        seg = _build(args, overrides)
        guided = contextlib.nullcontext()
        if perturb is not None:
            perturb["layers"] = perturb["layers"] or list(seg.protocol.layers)
            guided = guidance.perturbed_i2t_guidance(seg.pipe, **perturb)
        with guided:
            res = seg.generate(args.prompt, classes, height=args.height, width=args.width,
                               num_inference_steps=args.gen_steps, guidance_scale=args.guidance_scale, seed=args.seed)
    except (RuntimeError, ValueError) as e:
        print(f"seg4diff-fast generate: error: {e}", file=sys.stderr)
        return 1
    from .._io import atomic_write_bytes
    import io

    b = io.BytesIO()
    res.image.save(b, format="PNG")
    atomic_write_bytes(os.path.join(args.out, "image.png"), b.getvalue())
    summary = write_result(args.out, res.image, res, not args.no_heatmaps)
    print(f"generated {args.out}/image.png; " + ", ".join(f"{n} {100 * v:.1f}%" for n, v in summary["pixel_share"].items()))
    return 0


def cmd_eval(args) -> int:
    from .datasets import open_dataset
    from .evaluate import evaluate, evaluate_unsupervised

    try:
        overrides = _overrides(args)
        ds = open_dataset(args.dataset, args.root, args.split, args.limit)
        if len(ds) == 0:
            raise ValueError(f"no samples found for {args.dataset} under {args.root} (split {args.split})")
    except (ValueError, FileNotFoundError) as e:
        print(f"seg4diff-fast eval: error: {e}", file=sys.stderr)
        return 2
    try:
        seg = _build(args, overrides)
    except (RuntimeError, ValueError) as e:
        print(f"seg4diff-fast eval: error: {e}", file=sys.stderr)
        return 1
    seg.progress = False
    seg.return_scores = False  # evaluation needs the labels only
    kind = "unsupervised" if args.unsupervised else args.protocol
    out = args.out or os.path.join("seg4diff_eval", f"{ds.name}_{kind}")
    try:
        if args.unsupervised:
            summary = evaluate_unsupervised(seg, ds, out, match=args.match, kl_threshold=args.kl_threshold,
                                            eval_size=args.eval_size, save_predictions=not args.no_predictions)
        else:
            summary = evaluate(seg, ds, out, protocol=args.protocol, save_predictions=not args.no_predictions,
                               average=args.average)
    except ValueError as e:
        print(f"seg4diff-fast eval: error: {e}", file=sys.stderr)
        return 2
    if summary is not None:
        print(f"{ds.name} [{kind} protocol]: mIoU {summary['mIoU']:.2f}, pixel accuracy "
              f"{summary['pixel_accuracy']:.2f}, {summary['num_images']} images"
              + (f", {summary['num_missing']} missing" if summary["num_missing"] else "")
              + f" -> {os.path.join(out, 'summary.json')}")
    return 0


def register_commands(subparsers) -> None:
    """Add ``segment``, ``generate`` and ``eval`` to an argparse subparsers object."""
    p = subparsers.add_parser("segment", help="segment images into named classes",
                              description="Seg4Diff open-vocabulary segmentation of IMAGE... into --classes. Writes, "
                                          "per image, OUT/<stem>/labels.png (palette PNG, pixel value = class id), "
                                          "overlay.png (colours + legend), heatmaps/NNN_<class>.png, summary.json.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--classes", help="comma-separated class names, e.g. 'cat,grass,sky'")
    p.add_argument("--classes-file", help="a file with one class name per line (e.g. the 150 ADE20K classes)")
    p.add_argument("--unsupervised", action="store_true", help="the paper's unsupervised mode (no classes)")
    p.add_argument("--out", default="seg4diff_out", help="output folder (default: %(default)s)")
    p.add_argument("--no-heatmaps", action="store_true")
    _model_args(p)
    p.set_defaults(func=cmd_segment)

    p = subparsers.add_parser("generate", help="generate an image and the masks of what it generated",
                              description="Generate from PROMPT, read the attention of --classes (each named in the "
                                          "prompt) over the denoising steps. Writes OUT/image.png, labels.png, "
                                          "overlay.png, heatmaps/, summary.json.")
    p.add_argument("prompt")
    p.add_argument("--classes", help="comma-separated names, each occurring in the prompt")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--gen-steps", type=int, help="denoising steps (default 28)")
    p.add_argument("--guidance-scale", type=float, help="CFG scale (default 7.5 SD3/SD3.5, the paper's; 3.5 Flux)")
    p.add_argument("--out", default="seg4diff_generate")
    p.add_argument("--no-heatmaps", action="store_true")
    _model_args(p)
    from ..guidance import add_arguments as add_guidance_arguments

    add_guidance_arguments(p)
    p.set_defaults(func=cmd_generate, classes_file=None)

    p = subparsers.add_parser("eval", help="mIoU on a segmentation dataset",
                              description="Evaluate on a dataset folder. Writes OUT/per_image/<id>.npz as it goes "
                                          "(a rerun resumes), OUT/pred/<id>.png and OUT/summary.json. Data parallel "
                                          "with `accelerate launch -m seg4diff_fast.cli eval ...`.")
    p.add_argument("--dataset", required=True,
                   choices=["voc20", "voc21", "coco_object", "coco_object_bg", "context59", "context59_bg", "ade150",
                            "cityscapes", "coco_stuff27", "folder"],
                   help="Table 1 (open vocabulary): voc20 coco_object context59 ade150 cityscapes; Table 2 "
                        "(--unsupervised): voc21 context59_bg coco_object_bg coco_stuff27 cityscapes ade150")
    p.add_argument("--root", required=True, help="dataset folder in its standard layout")
    p.add_argument("--split", default="val")
    p.add_argument("--protocol", choices=["gt", "full"], default="gt",
                   help="gt: prompt with the classes present in the ground truth (the paper's, comparable with its "
                        "table); full: every class of the dataset (what a user has)")
    p.add_argument("--limit", type=int, help="first N samples only")
    p.add_argument("--out", help="output folder (default: seg4diff_eval/<dataset>_<protocol>)")
    p.add_argument("--no-predictions", action="store_true", help="do not write pred/<id>.png")
    p.add_argument("--average", choices=["gt", "union"], default="gt",
                   help="mIoU over classes with ground-truth pixels (gt: detectron2, the paper) or in ground truth "
                        "or prediction (union: mmseg)")
    p.add_argument("--unsupervised", action="store_true",
                   help="the paper's unsupervised evaluation (Table 2): segments of the empty prompt matched to the "
                        "ground-truth classes by the Hungarian algorithm")
    p.add_argument("--match", choices=["row", "image"], default="row",
                   help="--unsupervised: one matching per image row (what the paper's code executes; default) or "
                        "per image (DiffSeg's protocol)")
    p.add_argument("--kl-threshold", type=float, default=0.1,
                   help="--unsupervised: symmetric-KL merging threshold (default 0.1, the paper's code)")
    p.add_argument("--eval-size", choices=["paper", "input"], default="paper",
                   help="--unsupervised: score at the 640-shortest-edge size (paper) or the label's own size")
    _model_args(p)
    p.set_defaults(func=cmd_eval)
