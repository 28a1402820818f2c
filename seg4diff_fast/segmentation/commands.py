"""The ``segment``, ``generate`` and ``eval`` subcommands; ``seg4diff_fast.cli`` calls :func:`register_commands`.

Order of checks, so that a typo costs a second and never a model load or a half-written folder:
1. argparse: every value's type and range (``--height 0``, ``--steps 0``, ``--limit -1``, ``--layers -1`` ...);
2. before the model loads: class names (empty, duplicate, more than 255 for a palette PNG, too long for a file
   name), images (readable, finite, real range), the dataset, the output folder (not a file, writable, not a
   folder of other files), the protocol settings that need no model (``--timestep-index`` against ``--steps``);
3. right after the model is built (config known), before any compute: layers the model has, sizes against its
   positional limit and patch, images smaller than one token, class names that do not fit one prompt, an
   ``eval`` output folder that holds results of other settings.
Each refusal is a :class:`~seg4diff_fast.cli.UsageError`: one line naming the flag, exit code 2.
"""
from __future__ import annotations

import argparse
import io
import os
import re
import sys
from typing import Dict, List, Optional

import numpy as np

from ..cli import UsageError, integer, integer_list, integer_or, number

__all__ = ["register_commands", "write_result", "RESULT_FILES"]

from .protocol import PROTOCOLS  # noqa: E402  (no torch: the parser stays fast to build)

DEFAULT_MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"
FAMILIES = list(PROTOCOLS)
MAX_CLASSES = 255  # palette PNG ids 0..254; 255 is the ignore value of the datasets
NAME_MAX = 255  # bytes of one file name on common filesystems
# what a result folder holds; an existing folder holding anything else is never replaced
RESULT_FILES = {"labels.png", "overlay.png", "heatmaps", "summary.json", "image.png"}

# protocol fields generate does not use (it denoises for --gen-steps and reads every step)
GENERATE_IGNORES = {"num_inference_steps": "--steps", "timestep_index": "--timestep-index", "resize": "--resize",
                    "max_classes_per_prompt": "--max-classes-per-prompt", "prompt_batch": "--prompt-batch"}
# Protocol / Segmenter field -> the flag that sets it
FLAGS = {"layers": "--layers", "num_inference_steps": "--steps", "timestep_index": "--timestep-index",
         "size": "--size", "resize": "--resize", "seed": "--seed", "combine": "--combine",
         "max_classes_per_prompt": "--max-classes-per-prompt", "prompt_batch": "--prompt-batch",
         "family": "--family", "classes": "--classes", "height": "--height", "width": "--width",
         "guidance_scale": "--guidance-scale", "prompt": "PROMPT", "image": "IMAGE", "normalize": "--normalize",
         "heads": "--heads", "norm_before_merge": "--norm-before-merge", "tta": "--tta"}


# ---------------------------------------------------------------------------------------------- value types
# numbers and lists: the CLI's one set of parsers (seg4diff_fast.cli.integer, number, integer_list, integer_or)
_size = integer_or("native", 1, "a number of pixels")
_shift_seq_len = integer_or("real", 1, "a positive integer")
_layers = integer_list(lo=0, names=True, what="layer indices or module names")


def _heads(text: str):
    """``--heads``: mean, max, keep, or a head index >= 0."""
    if text in ("mean", "max", "keep"):
        return text
    try:
        return integer(0)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"not mean, max, keep or a head index >= 0: {text!r}") from None


def _device(text: str) -> str:
    import torch

    try:
        d = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (cpu, cuda, cuda:1, mps, ...)") from None
    if d.type not in ("cpu", "cuda", "mps", "xpu"):
        raise argparse.ArgumentTypeError(f"cannot run on {d.type!r} devices; use cpu, cuda, cuda:N, mps or xpu")
    backend = getattr(torch, d.type, None) if d.type != "cpu" else None
    if d.type == "mps":
        backend = getattr(torch.backends, "mps", None)
    if backend is not None and not backend.is_available():
        raise argparse.ArgumentTypeError(f"{d.type} is not available on this machine")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA devices")
    return text


def _model(text: str) -> str:
    # a hub id is "owner/name"; what looks like a path must be a folder that exists
    if text.startswith((".", "/", "~")) or os.sep + os.sep in text or text.count("/") > 1:
        path = os.path.expanduser(text)
        if not os.path.isdir(path):
            raise argparse.ArgumentTypeError(f"no model folder {text!r} (a hub id is 'owner/name'; 'tiny' for a "
                                             "smoke test)")
        return path
    if not text.strip():
        raise argparse.ArgumentTypeError("empty model name")
    return text


def _lora_path(text: str) -> str:
    path = os.path.expanduser(text)
    if not os.path.exists(path):
        raise argparse.ArgumentTypeError(f"no LoRA file or folder {text!r}")
    return path


def _text(what: str):
    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{what} is empty")
        return text

    return parse


# ---------------------------------------------------------------------------------------------- checks
def _note(args, message: str) -> None:
    print(f"seg4diff-fast {args.command}: note: {message}", file=sys.stderr)


def _usage(e, flags: Dict[str, str] = FLAGS, image: Optional[str] = None) -> UsageError:
    """A ProtocolError -> a UsageError naming the flag (or the image)."""
    field = getattr(e, "field", None)
    if field == "image" and image is not None:
        return UsageError(f"IMAGE {image!r}: {e.reason}")
    if field in flags:
        return UsageError(f"{flags[field]}: {e.reason}")
    return UsageError(str(e))


def _heatmap_name(k: int, name: str) -> str:
    return f"{k:03d}_{''.join(ch if ch.isalnum() else '_' for ch in name)}.png"


def _parse_classes(args) -> Optional[List[str]]:
    from .._io import read_lines
    from .tokens import check_class_names

    names, flag = None, "--classes"
    if getattr(args, "classes_file", None) is not None:
        flag = "--classes-file"
        path = args.classes_file
        if not os.path.isfile(path):
            raise UsageError(f"--classes-file: {path!r} is not a file")
        try:
            names = read_lines(path, "--classes-file")  # as users save it: a byte-order mark, CRLF
        except OSError as e:
            raise UsageError(f"--classes-file: cannot read {path!r} ({e})") from None
        except ValueError as e:
            raise UsageError(str(e)) from None
    elif getattr(args, "classes", None) is not None:
        names = args.classes.split(",")
    if names is None:
        return None
    try:
        names = check_class_names(names, flag)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    if len(names) > MAX_CLASSES:
        raise UsageError(f"{flag}: {len(names)} classes; a label PNG holds at most {MAX_CLASSES} (ids 0..254)")
    if not getattr(args, "no_heatmaps", True):
        for k, n in enumerate(names):
            if len(_heatmap_name(k, n).encode("utf-8")) > NAME_MAX:
                raise UsageError(f"{flag}: the class name {n[:40]!r}... ({len(n)} characters) is too long for a "
                                 "heatmap file name; shorten it or pass --no-heatmaps")
    return names


def _check_heatmaps_possible(args) -> None:
    if getattr(args, "no_heatmaps", True):
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        from .._optional import is_missing
        if not is_missing(e, "matplotlib"):
            raise  # installed but broken: its own error is the cause to show
        raise UsageError("--no-heatmaps: heatmaps need matplotlib (pip install matplotlib, or the [diffusers] "
                         "extra); install it or pass --no-heatmaps") from None


def _check_result_folder(path: str, flag: str = "--out") -> None:
    """``path`` will be written whole by :func:`write_result`: it must be new, empty, or a result folder."""
    from .._io import check_writable_folder

    try:
        check_writable_folder(path, flag)
    except ValueError as e:
        raise UsageError(str(e)) from None
    here = os.path.abspath(os.getcwd())
    if here == os.path.abspath(path) or here.startswith(os.path.abspath(path).rstrip(os.sep) + os.sep):
        raise UsageError(f"{flag}: {path!r} holds the current folder; a result folder is replaced whole: give a "
                         "new folder")
    if os.path.isdir(path):
        other = sorted(set(os.listdir(path)) - RESULT_FILES)
        if other:
            raise UsageError(f"{flag}: {path!r} holds other files ({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}); "
                             "a result folder is replaced whole: give a new or empty folder")


def _family(args) -> str:
    from .protocol import family_of
    from .segmenter import TINY_MODELS

    if args.model in TINY_MODELS:
        return TINY_MODELS[args.model]
    if args.family:
        return args.family
    try:
        return family_of(args.model)
    except ValueError:
        raise UsageError(f"--model: cannot tell the model family of {args.model!r}; pass --family (one of "
                         f"{', '.join(FAMILIES)})") from None


def _overrides(args) -> dict:
    """Protocol settings given on the command line, checked against each other (no model needed)."""
    from .protocol import PROTOCOLS, ProtocolError, check_protocol
    from .segmenter import TINY_MODELS

    o = {}
    for k in ("layers", "timestep_index", "num_inference_steps", "resize", "seed", "combine",
              "max_classes_per_prompt", "prompt_batch", "vae_pixels", "normalize", "heads"):
        if getattr(args, "command", None) == "generate" and k in GENERATE_IGNORES:
            continue  # _ignored says so
        v = getattr(args, k, None)
        if v is not None:
            o[k] = v
    if args.size is not None:
        o["size"] = None if args.size == "native" else args.size  # Protocol.size None: the input's own size
    if args.shift_seq_len is not None:
        o["shift_seq_len"] = None if args.shift_seq_len == "real" else args.shift_seq_len
    for k in ("norm_before_merge", "tta"):  # store_true flags: set only when given
        if getattr(args, k, False):
            o[k] = True
    if o.get("tta") and (getattr(args, "command", None) == "generate" or getattr(args, "unsupervised", False)
                         or getattr(args, "video", False)):
        raise UsageError("--tta: test-time augmentation is for segment and eval of images into classes, as in the "
                         "official code (not generate, --unsupervised or --video)")
    if o.get("norm_before_merge") and getattr(args, "unsupervised", False):
        raise UsageError("--norm-before-merge: the unsupervised mode has no class merge (it normalises every pixel "
                         "across the token columns)")
    base = PROTOCOLS[_family(args)]
    if args.model in TINY_MODELS:
        base = base.replace(size=128)
    try:
        check_protocol(base.replace(**o))
    except ProtocolError as e:
        raise _usage(e) from None
    except ValueError as e:  # Protocol's own checks
        raise UsageError(str(e)) from None
    return o


def _ignored(args) -> None:
    """Say which options this combination ignores."""
    from .segmenter import TINY_MODELS

    if args.model in TINY_MODELS:
        if args.family is not None:
            _note(args, f"--family is ignored with --model {args.model} (its family is {TINY_MODELS[args.model]})")
        if args.dtype is not None:
            _note(args, f"--dtype is ignored with --model {args.model} (tiny models run in float32)")
    if args.command == "segment" and args.unsupervised:
        for flag, v in (("--classes", args.classes), ("--classes-file", args.classes_file),
                        ("--combine", args.combine), ("--max-classes-per-prompt", args.max_classes_per_prompt)):
            if v is not None:
                _note(args, f"{flag} is ignored with --unsupervised")
    if args.command == "eval":
        if args.unsupervised:
            for flag, v, default in (("--protocol", args.protocol, "gt"), ("--average", args.average, "gt"),
                                     ("--combine", args.combine, None),
                                     ("--max-classes-per-prompt", args.max_classes_per_prompt, None)):
                if v != default:
                    _note(args, f"{flag} is ignored with --unsupervised")
        else:
            for flag, v, default in (("--match", args.match, "row"), ("--kl-threshold", args.kl_threshold, 0.1),
                                     ("--eval-size", args.eval_size, "paper"),
                                     ("--pred-fit", args.pred_fit, "resize")):
                if v != default:
                    _note(args, f"{flag} is ignored without --unsupervised")
    if args.command == "generate":
        for field, flag in GENERATE_IGNORES.items():
            if getattr(args, field) is not None:
                _note(args, f"{flag} is ignored by generate (it denoises for --gen-steps and reads every step)")
        if args.size is not None and args.height is not None and args.width is not None:
            _note(args, "--size is ignored when --height and --width are given")


def _build(args, overrides):
    import torch

    from .protocol import ProtocolError
    from .segmenter import Segmenter

    device = args.device
    if device is None:  # under `accelerate launch` each process takes its own GPU
        device = "cuda:" + os.environ.get("LOCAL_RANK", "0") if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype else None  # None: float16 (SD3) / bfloat16 (Flux) on GPU
    try:
        seg = Segmenter.from_pretrained(args.model, torch_dtype=dtype, device=device, family=args.family,
                                        progress=True, vae_tiling=args.vae_tiling, **overrides)
    except ProtocolError as e:
        raise _usage(e) from None
    if args.lora:  # named in seg.model_name, so eval's resume fingerprint tells the adapted model from the base
        from ..magnet.train import apply_lora

        try:
            apply_lora(seg, args.lora, attn_mlp=getattr(args, "attn_mlp", "off"),
                       learnable_tokens=getattr(args, "learnable_tokens", True))
        except FileNotFoundError as e:
            raise UsageError(f"--attn-mlp: {e}") from None
    elif getattr(args, "attn_mlp", "off") != "off":
        raise UsageError("--attn-mlp: the head is saved beside a LoRA: give --lora too")
    return seg


# ---------------------------------------------------------------------------------------------- writing
def _png(im) -> bytes:
    b = io.BytesIO()
    im.save(b, format="PNG")
    return b.getvalue()


def _pil_rgb(pixels):
    """``[3, H, W]`` float in [0, 1] (load_image) -> 8-bit RGB PIL image for the overlay."""
    from PIL import Image

    arr = (pixels.permute(1, 2, 0).numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _frame_result(res, i: int):
    """Frame ``i`` of a :meth:`Segmenter.segment_video` result as an image result (labels ``[H, W]``, scores
    ``[C, H, W]``); its meta says which latent frame it came from (``latent_frame``: the token frame, which is the
    latent frame but for CogVideoX 1.5, whose token frames pair latent frames)."""
    from .segmenter import SegmentationResult

    meta = dict(res.meta, frame=i, latent_frame=res.meta["frame_of"][i])
    return SegmentationResult(res.labels[i], None if res.scores is None else res.scores[i], res.classes, meta)


def write_result(out_dir: str, image, res, heatmaps: bool = True, heatmap_scale: str = "per-class",
                 extra: Optional[dict] = None, files: Optional[Dict[str, bytes]] = None, replace: bool = True) -> dict:
    """Write ``labels.png`` (palette, pixel value = class id), ``overlay.png`` (with legend), ``heatmaps/*.png``
    (``heatmap_scale``: ``"per-class"``, each map on its own range, or ``"shared"``, one range for all),
    ``summary.json`` (and ``files``: more name -> bytes) into ``out_dir``, whole or not at all: the folder is
    built beside it and renamed into place (an existing result folder is replaced; with ``replace=False``
    ``FileExistsError``, the folder kept). Returns the summary."""
    from .._io import atomic_folder
    from .visualize import heatmap, label_png_bytes, overlay

    if heatmap_scale not in ("per-class", "shared"):
        raise ValueError(f"heatmap_scale must be 'per-class' or 'shared', not {heatmap_scale!r}")
    labels = np.asarray(res.labels)
    counts = np.bincount(labels.reshape(-1), minlength=len(res.classes))[: len(res.classes)]
    blobs = dict(files or {})
    blobs["labels.png"] = label_png_bytes(labels)
    blobs["overlay.png"] = _png(overlay(image, labels, res.classes))
    names = []
    if heatmaps and res.scores is not None:
        scores = res.scores.numpy() if hasattr(res.scores, "numpy") else np.asarray(res.scores)
        lo, hi = (float(scores.min()), float(scores.max())) if heatmap_scale == "shared" else (None, None)
        for k, name in enumerate(res.classes):
            fn = _heatmap_name(k, name)
            blobs[os.path.join("heatmaps", fn)] = _png(heatmap(scores[k], name, vmin=lo, vmax=hi))
            names.append(fn)
    summary = {
        "classes": list(res.classes),
        "pixel_share": {n: float(c / max(labels.size, 1)) for n, c in zip(res.classes, counts)},
        "size": list(labels.shape),
        "files": {"labels": "labels.png", "overlay": "overlay.png", "heatmaps": names,
                  "heatmap_scale": heatmap_scale if names else None},
        **(extra or {}),
        "meta": _jsonable(res.meta),
    }
    with atomic_folder(out_dir, replace=replace) as tmp:
        for rel, data in blobs.items():
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            with open(os.path.join(tmp, rel), "wb") as f:  # plain open: modes follow the umask
                f.write(data)
        with open(os.path.join(tmp, "summary.json"), "w") as f:
            import json

            f.write(json.dumps(summary, indent=2) + "\n")
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


def _short(summary: dict, top: int = 3) -> str:
    """``cat 52%, sky 30%, grass 11% +4 more``."""
    shares = sorted(((v, n) for n, v in summary["pixel_share"].items() if v > 0), reverse=True)
    text = ", ".join(f"{n[:24]} {100 * v:.0f}%" for v, n in shares[:top])
    return text + (f" +{len(shares) - top} more" if len(shares) > top else "")


def _folder_key(name: str) -> str:
    """Names a filesystem may take for the same folder: case-insensitive ones (macOS, Windows) and NFC / NFD
    spellings (macOS) are one name here, so that results never collide on any of them."""
    import unicodedata

    return unicodedata.normalize("NFC", name).casefold()


def _stems(paths: List[str]) -> List[str]:
    """One result folder name per input, unique for any set of inputs: the file's stem, or for a stem already
    taken (the same name in two folders, ``IMG.png`` beside ``img.png``: names equal up to case or Unicode
    normalisation count as the same) the stem with the smallest ``_N`` suffix that no input's own stem and no
    earlier name takes (``a/img.png b/img.png c/img_1.png`` -> ``img``, ``img_2``, ``img_1``)."""
    stems = [os.path.splitext(os.path.basename(os.path.normpath(p)))[0] or "image" for p in paths]
    taken = {_folder_key(s) for s in stems}  # every input's own stem is reserved for the first input that has it
    out, used = [], set()
    for s in stems:
        name, n = s, 0
        while _folder_key(name) in used or (n and _folder_key(name) in taken):
            n += 1
            name = f"{s}_{n}"
        used.add(_folder_key(name))
        out.append(name)
    return out


# ---------------------------------------------------------------------------------------------- commands
def cmd_segment(args) -> int:
    from tqdm.auto import tqdm

    from .._io import clean_temporaries
    from .images import frame_paths, load_frames, load_image
    from .protocol import ProtocolError

    classes = _parse_classes(args)
    if classes is None and not args.unsupervised:
        raise UsageError("--classes is required (e.g. --classes 'cat,grass,sky'), or pass --unsupervised")
    if args.video and args.unsupervised:
        raise UsageError("--unsupervised works on images; --video segments videos into --classes")
    overrides = _overrides(args)
    sizes = []
    for p in args.images:  # unreadable or bad images fail here, before the model loads
        try:
            px = load_frames(p, "IMAGE") if args.video else load_image(p, "IMAGE")
            sizes.append(tuple(px.shape[-2:]))
        except (ValueError, FileNotFoundError, TypeError, ImportError) as e:  # ImportError: PyAV, the video extra
            raise UsageError(str(e)) from None
    stems = _stems(args.images)
    _check_result_folder(args.out)
    for stem in stems:
        _check_result_folder(os.path.join(args.out, stem))
    _check_heatmaps_possible(args)
    _ignored(args)

    seg = _build(args, overrides)
    if seg.spec.video != args.video:
        raise UsageError(f"--video is for video families (cogvideox, hunyuanvideo, hunyuanvideo15), and a video family needs --video; the model's "
                         f"family is {seg.protocol.family}")
    for p, (h, w) in zip(args.images, sizes):  # model-dependent checks, before any compute
        try:
            seg.geometry(h, w)
        except ProtocolError as e:
            raise _usage(e, image=p) from None
    if classes is not None and not args.unsupervised:
        try:
            seg.pack_classes(classes)
        except ValueError as e:
            raise UsageError(f"{'--classes-file' if args.classes_file else '--classes'}: {e}") from None

    clean_temporaries(args.out, recursive=False)  # folders half-built by a killed run
    bar = tqdm(list(zip(args.images, stems)), desc="segment", disable=len(args.images) < 2)
    for path, stem in bar:
        out_dir = os.path.join(args.out, stem)
        if args.video:  # one folder per frame, each whole or not at all
            px = load_frames(path, "IMAGE")  # [F, 3, H, W]: a folder of frames or a decoded video file
            res = seg.segment_video(px, classes)
            if os.path.isdir(path):  # each frame file: its stem, its path
                paths = frame_paths(path, "IMAGE")
                names, sources = _stems(paths), [os.path.abspath(f) for f in paths]
            else:  # a video file: the frame's number
                names = [f"{i:05d}" for i in range(px.shape[0])]
                sources = [os.path.abspath(path)] * px.shape[0]
            for i, (fstem, source) in enumerate(zip(names, sources)):
                write_result(os.path.join(out_dir, fstem), _pil_rgb(px[i]), _frame_result(res, i),
                             not args.no_heatmaps, args.heatmap_scale,
                             extra={"image": source, "frame": i, "settings": seg.settings()}, replace=False)
            tqdm.write(f"{path} -> {out_dir}: {len(names)} frames")
            continue
        res = seg.segment_unsupervised(path) if args.unsupervised else seg.segment(path, classes)
        # --out was new or empty: a folder of this name now is another run's result (two runs into one --out)
        summary = write_result(out_dir, _pil_rgb(load_image(path)), res, not args.no_heatmaps, args.heatmap_scale,
                               extra={"image": os.path.abspath(path), "settings": seg.settings()}, replace=False)
        tqdm.write(f"{path} -> {out_dir}: {_short(summary)}")
        peak = res.meta.get("peak_memory_bytes")
        if peak:
            tqdm.write(f"  peak GPU memory {peak / 2**30:.2f} GiB")
    return 0


def cmd_generate(args) -> int:
    import contextlib

    from .. import guidance
    from .._io import clean_temporaries
    from .protocol import ProtocolError

    classes = _parse_classes(args)
    if classes is None:
        raise UsageError("--classes is required: the names, each occurring in the prompt")
    overrides = _overrides(args)
    try:
        perturb = guidance.parse_arguments(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    _check_result_folder(args.out)
    # the result folder found now is replaced; one that appears while this runs (another run) is kept
    replace = os.path.isdir(args.out) and bool(os.listdir(args.out))
    _check_heatmaps_possible(args)
    _ignored(args)
    seg = _build(args, overrides)
    clean_temporaries(os.path.dirname(os.path.abspath(args.out)), recursive=False)
    with contextlib.ExitStack() as stack:
        if perturb is not None:  # installing the guidance resolves its layers: before any compute
            perturb["layers"] = perturb["layers"] or list(seg.protocol.layers)
            try:
                stack.enter_context(guidance.perturbed_i2t_guidance(seg.pipe, **perturb))
            except (ValueError, TypeError) as e:
                raise UsageError(f"--perturb-layers: {e}") from None
        try:  # generate() checks prompt, classes, height, width, steps before it computes anything
            res = seg.generate(args.prompt, classes, height=args.height, width=args.width,
                               num_inference_steps=args.gen_steps, guidance_scale=args.guidance_scale, seed=args.seed)
        except ProtocolError as e:
            raise _usage(e, dict(FLAGS, num_inference_steps="--gen-steps")) from None
    summary = write_result(args.out, res.image, res, not args.no_heatmaps, args.heatmap_scale,
                           extra={"prompt": args.prompt, "settings": seg.settings()},
                           files={"image.png": _png(res.image)}, replace=replace)
    print(f"generated {os.path.join(args.out, 'image.png')}: {_short(summary)}")
    return 0


def _default_eval_out(args) -> str:
    model = os.path.basename(os.path.normpath(args.model)) if os.path.isdir(args.model) else args.model
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model.replace("/", "--")).strip("-.") or "model"
    kind = "unsupervised" if getattr(args, "unsupervised", False) else args.protocol
    return os.path.join("seg4diff_eval", f"{slug}_{args.dataset}_{kind}")


def cmd_eval(args) -> int:
    from .._io import check_writable_folder
    from .datasets import open_dataset
    from .evaluate import ResumeError, evaluate, evaluate_unsupervised
    from .tokens import check_class_names

    overrides = _overrides(args)
    try:
        ds = open_dataset(args.dataset, args.root, args.split, args.limit)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise UsageError(f"--root: {e}") from None
    if len(ds) == 0:
        raise UsageError(f"--root: no samples found for {args.dataset} under {args.root!r} (split {args.split!r})")
    try:
        check_class_names(ds.classes, "the dataset's classes")
    except (ValueError, TypeError) as e:
        raise UsageError(f"--root: {e}") from None
    if not args.unsupervised:
        from .evaluate import _check_prompt_names

        try:
            _check_prompt_names(ds)
        except ValueError as e:
            raise UsageError(f"--dataset: {e}") from None
    if args.unsupervised and args.pred_fit != "resize" and args.eval_size != "paper":
        raise UsageError(f"--pred-fit {args.pred_fit} brings the prediction to the paper's size: it needs --eval-size "
                         "paper")
    if len(ds.classes) > MAX_CLASSES and not args.no_predictions:
        raise UsageError(f"--no-predictions: the dataset has {len(ds.classes)} classes, more than a prediction PNG "
                         f"holds ({MAX_CLASSES}); pass --no-predictions")
    out = args.out or _default_eval_out(args)
    try:
        check_writable_folder(out, "--out")
    except ValueError as e:
        raise UsageError(str(e)) from None
    _ignored(args)

    seg = _build(args, overrides)
    seg.progress = False
    seg.return_scores = False  # evaluation needs the labels only
    kind = "unsupervised" if args.unsupervised else args.protocol
    try:
        if args.unsupervised:
            summary = evaluate_unsupervised(seg, ds, out, match=args.match, kl_threshold=args.kl_threshold,
                                            eval_size=args.eval_size, pred_fit=args.pred_fit,
                                            save_predictions=not args.no_predictions,
                                            overwrite=args.overwrite)
        else:
            summary = evaluate(seg, ds, out, protocol=args.protocol, save_predictions=not args.no_predictions,
                               average=args.average, overwrite=args.overwrite)
    except ResumeError as e:
        raise UsageError(f"--out: {e} (--overwrite)") from None
    if summary is None:  # not the main process of a data-parallel run
        return 0
    c = summary["counts"]
    print(f"{ds.name} [{kind}]: mIoU {summary['mIoU']:.2f}, pixel accuracy {summary['pixel_accuracy']:.2f}; "
          f"{c['done']} done, {c['failed']} failed, {c['skipped']} skipped -> {os.path.join(out, 'summary.json')}")
    return 3 if c["failed"] or c["skipped"] else 0


# ---------------------------------------------------------------------------------------------- parsers
def _common(p: argparse.ArgumentParser):
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the traceback of a failure (default: one line)")


def _model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model and protocol (defaults: the paper's, per family)")
    g.add_argument("--model", default=DEFAULT_MODEL, type=_model,
                   help="hub id or local folder; 'tiny' (SD3), 'tiny-sd3.5', 'tiny-flux', 'tiny-qwenimage', "
                        "'tiny-cogview4', 'tiny-chroma', 'tiny-cogvideox' (and the other tiny-<family>) build a tiny "
                        "random pipeline offline: a smoke test of the installation, its masks mean nothing "
                        "(default: %(default)s)")
    g.add_argument("--family", choices=FAMILIES,
                   help="model family (default: from the model id; ignored with the tiny models). sd3, sd3.5, flux "
                        "(Flux.1 and Kontext) run the paper's protocol; the others run ours (middle joint block, see "
                        "docs/03-segmentation.md, Families); cogvideox, hunyuanvideo and hunyuanvideo15 are video "
                        "families (--video)")
    g.add_argument("--lora", type=_lora_path,
                   help="LoRA to apply: a file or folder written by `seg4diff-fast train`, a checkpoint folder, or the "
                        "paper's lora_weights.pth (default: none)")
    g.add_argument("--attn-mlp", choices=("off", "grid", "ovss"), default="off",
                   help="the residual map head that train saves beside the LoRA (attn_mlp.safetensors): grid applies "
                        "it as trained (each column's map on the latent grid, with the residual); ovss as the "
                        "official Seg4DiffOVSS does when USE_ATTN_MLP is set (the conv stack without the residual over "
                        "the image-token x text-column matrix); off: the official evaluations, which never apply it "
                        "(default: %(default)s)")
    g.add_argument("--no-learnable-tokens", dest="learnable_tokens", action="store_false",
                   help="ignore the learnable prompt tokens saved beside the LoRA (prompt_tokens.safetensors, from "
                        "train --learnable-tokens) and encode the prompts (default: the tokens are used when there)")
    g.add_argument("--device", type=_device, help="cuda, cuda:1, cpu (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                   help="weights dtype (default on a GPU: float16 for SD3 / SD3.5, bfloat16 for the other families; "
                        "float32 on the CPU)")
    g.add_argument("--layers", type=_layers,
                   help="expert layer(s), comma-separated indices >= 0 or module names, or 'middle' (default: SD3, "
                        "SD3.5 9; Flux 12; the other families and the tiny models their middle joint block)")
    g.add_argument("--timestep-index", type=integer(),
                   help="noise at timesteps[i] of the schedule, -steps <= i < steps (default: -8)")
    g.add_argument("--steps", type=integer(1), dest="num_inference_steps",
                   help="length of the schedule the noise level is read from (default: 28; Flux, CogView3-Plus, CogVideoX, LongCat-Image, HunyuanImage, HunyuanVideo (1.0, 1.5) 50)")
    g.add_argument("--size", type=_size,
                   help="working size in pixels, or 'native' for the input's own size (default: 1024; the video families 480; "
                        "128 for the tiny models)")
    g.add_argument("--resize", choices=["paper", "square", "aspect", "pad"],
                   help="paper (shortest edge 640, then squashed to --size, as the paper's code), square, aspect (keep "
                        "the aspect ratio), pad (default: paper; the video families square)")
    g.add_argument("--seed", type=integer(0, 2 ** 63 - 1), help="noise seed (default: 0)")
    g.add_argument("--combine", choices=["raw", "minmax"],
                   help="class scores across prompts: raw probabilities or min-max per class (default: raw)")
    g.add_argument("--max-classes-per-prompt", type=integer(1),
                   help="classes per prompt at most (default: as many as fit in the text length)")
    g.add_argument("--prompt-batch", type=integer(1),
                   help="prompts of one image per transformer batch (default: 8; 1 for Qwen-Image and CogView4, whose "
                        "text length varies per prompt)")
    g.add_argument("--vae-tiling", choices=["auto", "on", "off"], default="auto",
                   help="tile the VAE: auto tiles above 2048 px (default: %(default)s)")
    g.add_argument("--shift-seq-len", type=_shift_seq_len,
                   help="token count of the timestep shift of flow-matching families, an integer or 'real' for the "
                        "image's token count (default: Flux 16, the paper's code; the others as their pipeline: "
                        "the image's tokens, HiDream its maximum; ignored by SD3 and the DDPM-style families)")
    g.add_argument("--normalize", choices=["joint", "text", "logits"],
                   help="the captured maps: joint, the model's softmax over all keys (the official SOFTMAX: True); "
                        "text, a softmax over the read text columns only (SOFTMAX_I2T_ONLY); logits, the scaled "
                        "scores q.k/sqrt(d) (SOFTMAX: False) (default: joint)")
    g.add_argument("--heads", type=_heads, metavar="mean|max|keep|N",
                   help="heads to one map: mean; max (the official MAX_HEAD; needs a softmax); keep (KEEP_HEAD: the "
                        "heads side by side, column h*T+t: a class then reads head 0's columns, as the official "
                        "code; with --unsupervised every head's token maps are candidates); or a head index N "
                        "(MODEL.HEAD) (default: mean)")
    g.add_argument("--norm-before-merge", action="store_true",
                   help="min-max normalise every token column over the pixels before a class's columns are "
                        "averaged (the official NORM_BEFORE_MERGE) (default: off, as eval_ovss.yaml)")
    g.add_argument("--tta", action="store_true",
                   help="test-time augmentation as the official TEST.AUG: shortest edge 400, 500, ..., 1200 (longest "
                        "at most 4000), each plain and flipped, the 18 views' scores averaged: 18 forwards per image; "
                        "segment and eval only, with --resize paper (default: off)")
    g.add_argument("--vae-pixels", choices=["signed", "unit"],
                   help="pixels given to the VAE: signed [-1, 1], unit [0, 1] (default: signed; unit for Flux, as the "
                        "paper's code)")


def _picture_args(p: argparse.ArgumentParser):
    p.add_argument("--no-heatmaps", action="store_true", help="do not write heatmaps/ (default: write them)")
    p.add_argument("--heatmap-scale", choices=["per-class", "shared"], default="per-class",
                   help="per-class: each heatmap on its own range; shared: one range for all classes, so that "
                        "heatmaps compare (default: %(default)s)")


def register_commands(subparsers) -> None:
    """Add ``segment``, ``generate`` and ``eval`` to an argparse subparsers object."""
    p = subparsers.add_parser("segment", help="segment images into named classes",
                              description="Seg4Diff open-vocabulary segmentation of IMAGE... into --classes. Writes, "
                                          "per image, OUT/<stem>/labels.png (palette PNG, pixel value = class id; <stem> the "
                                          "file's name without extension, with the smallest free _N when another "
                                          "input has that name, also up to case), "
                                          "overlay.png (colours + legend), heatmaps/NNN_<class>.png, summary.json; "
                                          "each folder whole or not at all.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any PIL format and bit depth); with --video, "
                                                               "videos: folders of frame images or video files "
                                                               "(animated GIF / WebP / PNG; MP4, WebM, MKV, MOV, AVI, "
                                                               "... with the video extra: pip install "
                                                               "'seg4diff-fast[video]')")
    cls = p.add_mutually_exclusive_group()
    cls.add_argument("--classes", help="comma-separated class names, e.g. 'cat,grass,sky' (default: none; required "
                                       "unless --classes-file or --unsupervised)")
    cls.add_argument("--classes-file", help="a UTF-8 file with one class name per line (default: none)")
    p.add_argument("--unsupervised", action="store_true",
                   help="the paper's unsupervised mode: no classes, segments of the empty prompt (default: off)")
    p.add_argument("--video", action="store_true",
                   help="each IMAGE is a video, a folder of frames (sorted by name) or a video file, segmented in one "
                        "forward by a video family (cogvideox, hunyuanvideo, hunyuanvideo15); writes "
                        "OUT/<folder or file stem>/<frame>/ per frame, <frame> the frame file's stem or the frame's "
                        "number 00000, 00001, ... of a video file (default: off)")
    p.add_argument("--out", default="seg4diff_out", help="output folder (default: %(default)s)")
    _picture_args(p)
    _model_args(p)
    _common(p)
    p.set_defaults(func=cmd_segment, command="segment")

    p = subparsers.add_parser("generate", help="generate an image and the masks of what it generated",
                              description="Generate from PROMPT, read the attention of --classes (each named in the "
                                          "prompt) over the denoising steps. Writes OUT/image.png, labels.png, "
                                          "overlay.png, heatmaps/, summary.json, whole or not at all.")
    p.add_argument("prompt", metavar="PROMPT", type=_text("PROMPT"), help="the text prompt")
    p.add_argument("--classes", help="comma-separated names, each occurring in the prompt (default: none; required)")
    p.add_argument("--height", type=integer(1),
                   help="image height, a multiple of the model's patch (default: --size, else 1024; 128 tiny)")
    p.add_argument("--width", type=integer(1),
                   help="image width, a multiple of the model's patch (default: --size, else 1024; 128 tiny)")
    p.add_argument("--gen-steps", type=integer(1), help="denoising steps (default: 28)")
    p.add_argument("--guidance-scale", type=number(lo=0),
                   help="classifier-free guidance scale (default: 7.5 SD3 / SD3.5, the paper's; 3.5 Flux)")
    p.add_argument("--out", default="seg4diff_generate", help="output folder (default: %(default)s)")
    _picture_args(p)
    _model_args(p)
    from ..guidance import add_arguments as add_guidance_arguments

    add_guidance_arguments(p)
    _common(p)
    p.set_defaults(func=cmd_generate, command="generate", classes_file=None)

    p = subparsers.add_parser("eval", help="mIoU on a segmentation dataset",
                              description="Evaluate on a dataset folder. Writes OUT/run.json (the settings), "
                                          "OUT/per_image/<id>.npz as it goes (a rerun with the same settings resumes; "
                                          "other settings are refused), OUT/failed/<id>.json, OUT/pred/<id>.png and "
                                          "OUT/summary.json. Several runs may share OUT (each sample is claimed "
                                          "once). Exit 3 when samples failed or were left to another run. Data "
                                          "parallel with `accelerate launch -m seg4diff_fast.cli eval ...`.")
    p.add_argument("--dataset", required=True,
                   choices=["voc20", "voc21", "voc20b", "coco_object", "coco_object_bg", "context59", "context59_bg",
                            "context459", "ade150", "ade847", "cityscapes", "coco_stuff27", "folder"],
                   help="(required) Table 1 (open vocabulary): voc20 coco_object context59 ade150 cityscapes; Table 2 "
                        "(--unsupervised): voc21 context59_bg coco_object_bg coco_stuff27 cityscapes ade150; also the "
                        "paper's voc20b context459 ade847 (the last two: more than 255 classes, so --no-predictions)")
    p.add_argument("--root", required=True, help="dataset folder in its standard layout (required)")
    p.add_argument("--split", default="val", type=_text("--split"), help="split (default: %(default)s)")
    p.add_argument("--protocol", choices=["gt", "full"], default="gt",
                   help="gt: prompt with the classes present in the ground truth (the paper's, comparable with its "
                        "table); full: every class of the dataset (what a user has) (default: %(default)s)")
    p.add_argument("--limit", type=integer(1), help="first N samples only (default: all)")
    p.add_argument("--out", help="output folder (default: seg4diff_eval/<model>_<dataset>_<protocol or "
                                 "unsupervised>)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the results in --out first, e.g. of other settings (default: off, resume)")
    p.add_argument("--no-predictions", action="store_true", help="do not write pred/<id>.png (default: write them)")
    p.add_argument("--average", choices=["gt", "union"], default="gt",
                   help="mIoU over classes with ground-truth pixels (gt: detectron2, the paper) or in ground truth "
                        "or prediction (union: mmseg) (default: %(default)s)")
    p.add_argument("--unsupervised", action="store_true",
                   help="the paper's unsupervised evaluation (Table 2): segments of the empty prompt matched to the "
                        "ground-truth classes by the Hungarian algorithm (default: off)")
    p.add_argument("--match", choices=["row", "image"], default="row",
                   help="--unsupervised: one matching per image row (what the paper's code executes) or per image "
                        "(DiffSeg's protocol) (default: %(default)s)")
    p.add_argument("--kl-threshold", type=number(above=0), default=0.1,
                   help="--unsupervised: symmetric-KL merging threshold (default: %(default)s, the paper's code)")
    p.add_argument("--eval-size", choices=["paper", "input"], default="paper",
                   help="--unsupervised: score at the 640-shortest-edge size (paper) or the label's own size "
                        "(default: %(default)s)")
    p.add_argument("--pred-fit", choices=["resize", "top-left-crop"], default="resize",
                   help="--unsupervised --eval-size paper: bring the prediction to that size by resizing it, aligned "
                        "with the label (resize), or as the paper's code does, its top-left crop (top-left-crop: on "
                        "Cityscapes the top-left 640x1280 of the 1024x2048 prediction against the whole label "
                        "resized) (default: %(default)s)")
    _model_args(p)
    _common(p)
    p.set_defaults(func=cmd_eval, command="eval")
