"""Image input: load anything a user may hand us, and the geometry between input, working size and patch grid."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

__all__ = ["load_image", "read_image", "upright", "image_size", "images_by_stem", "Geometry", "plan_geometry",
           "paper_resize_shape", "resize_8bit", "PAPER_SHORT_EDGE", "PAPER_MAX_EDGE"]

#: the paper's test-time resize (detectron2 ResizeShortestEdge with INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST)
PAPER_SHORT_EDGE, PAPER_MAX_EDGE = 640, 2560


# PIL modes read as they are stored (their numpy arrays keep the bit depth), not through convert("RGB"),
# which saturates 16-bit and 32-bit integers at 255 and floats at 1/255.
_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def load_image(image, argument: str = "image") -> torch.Tensor:
    """PIL image, path, ``[H, W]`` / ``[H, W, 1|2|3|4]`` array, or ``[1|3, H, W]`` / ``[H, W, 1|3]`` tensor ->
    ``[3, H, W]`` float32 in [0, 1], read by the image's real range:

    - uint8 (and PIL's 8-bit modes: 1, L, LA, P, PA, RGB, RGBA, RGBX, CMYK, YCbCr, HSV, ...): value / 255;
    - uint16 (16-bit PNG / TIFF, PIL ``I;16*``): value / 65535;
    - other integer types (PIL ``I``, int32/int64 arrays): value / 255 when all values are in 0..255, value / 65535
      when in 0..65535; negative or larger values are refused (no bit depth says what they mean);
    - floating types (PIL ``F``, float TIFF, float arrays and tensors): taken as they are, and must lie in [0, 1];
    - bool: 0 or 1.

    NaN or infinite pixels, empty images and LAB images are refused with a ``ValueError`` naming ``argument``.
    A 2nd or 4th channel is alpha and is dropped (the colour under it is kept); one channel is grey. Paths and PIL
    images are turned upright by their EXIF orientation (:func:`upright`), as a viewer shows them.
    """
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        return _to_unit_range(_pil_array(read_image(path, argument), f"{argument} {path!r}"), f"{argument} {path!r}")
    if isinstance(image, Image.Image):
        return _to_unit_range(_pil_array(upright(image), argument), argument)
    if isinstance(image, np.ndarray):
        return _to_unit_range(image, argument)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 3 and t.shape[0] in (1, 3):
            t = t.permute(1, 2, 0)  # [C, H, W] (torch's layout, preferred when ambiguous) -> [H, W, C]
        elif t.ndim == 3 and t.shape[-1] not in (1, 3):
            raise ValueError(f"{argument}: a tensor must be [3, H, W], [1, H, W], [H, W, 3] or [H, W], got shape "
                             f"{tuple(image.shape)}")
        elif t.ndim not in (2, 3):
            raise ValueError(f"{argument}: a tensor must be [3, H, W], [1, H, W], [H, W, 3] or [H, W], got shape "
                             f"{tuple(image.shape)}")
        if t.dtype == torch.bfloat16:
            t = t.float()
        return _to_unit_range(t.numpy(), argument)
    raise TypeError(f"{argument}: expected a PIL image, a path, a numpy array or a torch tensor, got {type(image).__name__}")


#: EXIF tag 0x0112 (Orientation): 1 upright, 2..8 mirrored and / or rotated; 5..8 swap width and height
_ORIENTATION, _SWAPPED = 0x0112, (5, 6, 7, 8)


def _orientation(im) -> int:
    try:
        value = int(im.getexif().get(_ORIENTATION, 1))
    except (TypeError, ValueError, SyntaxError, OSError):  # a broken EXIF block: stored as it is
        return 1
    return value if 1 <= value <= 8 else 1


def upright(im):
    """A PIL image turned as its EXIF orientation says (``ImageOps.exif_transpose``: a phone photo stored sideways
    comes out as it was taken, the tag removed so that it is never applied twice); ``im`` itself when it has no
    such tag. The one place the package applies EXIF orientation: every image it reads goes through here."""
    if _orientation(im) == 1:
        return im
    from PIL import ImageOps

    return ImageOps.exif_transpose(im)


def read_image(path: str, argument: str = "image"):
    """The image file ``path`` as a loaded PIL image (the file closed), upright (:func:`upright`); kept in its stored
    mode. ``FileNotFoundError`` / ``ValueError`` naming ``argument`` and the file when it is missing, a folder or not
    an image PIL reads. Used for every image the package reads: inputs, dataset images and labels, training data."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{argument}: no such file {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"{argument}: {path!r} is a folder, not an image")
    try:
        with Image.open(path) as im:
            im.load()
            out = upright(im)
            return out.copy() if out is im else out
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{argument}: cannot read {path!r} as an image ({type(e).__name__}: {e})") from None


def image_size(path: str, argument: str = "image") -> Tuple[int, int]:
    """``(height, width)`` of the image file ``path`` as :func:`read_image` gives it (EXIF orientation applied), from
    its header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{argument}: no such file {path!r}")
    try:
        with Image.open(path) as im:
            w, h = im.size
            return (w, h) if _orientation(im) in _SWAPPED else (h, w)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{argument}: cannot read {path!r} as an image ({type(e).__name__}: {e})") from None


def images_by_stem(folder: str, suffixes, argument: str = "images") -> dict:
    """``{stem: file name}`` of the files of ``folder`` whose ending (any case) is in ``suffixes``, sorted by stem.
    Two files of one stem (``x.png`` and ``x.jpg``) are one sample id: refused with a ``ValueError`` naming both,
    never one of them silently dropped."""
    out = {}
    for f in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(f)
        if ext.lower() not in suffixes:
            continue
        if stem in out:
            raise ValueError(f"{argument}: {os.path.join(folder, out[stem])!r} and {os.path.join(folder, f)!r} have "
                             f"the same name {stem!r}, so one sample id; keep one of them (or rename the other)")
        out[stem] = f
    return dict(sorted(out.items()))


def _pil_array(im, argument: str) -> np.ndarray:
    """A PIL image -> numpy array at its stored depth: ``[H, W]`` for deep modes, else ``[H, W, 3]`` uint8."""
    if im.mode in _DEEP_MODES:
        return np.asarray(im)
    if im.mode == "LAB":
        raise ValueError(f"{argument}: LAB images are not read (PIL converts them to RGB channel by channel, "
                         "which gives wrong colours); convert it to RGB first")
    try:
        return np.asarray(im.convert("RGB"))
    except ValueError as e:
        raise ValueError(f"{argument}: cannot convert a PIL image of mode {im.mode!r} to RGB ({e})") from None


def _to_unit_range(arr: np.ndarray, argument: str) -> torch.Tensor:
    """``[H, W]`` or ``[H, W, C]`` array (C = 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA) -> ``[3, H, W]`` float32 in
    [0, 1] by the rules of :func:`load_image`."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"{argument}: an image array must be [H, W] or [H, W, 1|2|3|4], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{argument}: the image is empty (shape {arr.shape})")
    arr = arr[:, :, :1] if arr.shape[2] in (1, 2) else arr[:, :, :3]
    kind = arr.dtype.kind
    if kind == "b":
        x = arr.astype(np.float32)
    elif kind in "ui":
        lo, hi = int(arr.min()), int(arr.max())
        if arr.dtype.itemsize == 1 and kind == "u":
            scale = 255.0
        elif arr.dtype.itemsize == 2 and kind == "u":
            scale = 65535.0
        elif lo < 0:
            raise ValueError(f"{argument}: integer pixels must not be negative, got values in [{lo}, {hi}]; "
                             "give uint8 / uint16 values or floats in [0, 1]")
        elif hi <= 255:
            scale = 255.0
        elif hi <= 65535:
            scale = 65535.0
        else:
            raise ValueError(f"{argument}: integer pixels up to {hi} fit neither 8 nor 16 bits; give uint8 / uint16 "
                             "values or floats in [0, 1]")
        x = arr.astype(np.float32) / scale
    elif kind == "f":
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise ValueError(f"{argument}: {bad} pixel values are NaN or infinite")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"{argument}: float pixels must be in [0, 1], got [{lo:.4g}, {hi:.4g}]")
        x = arr.astype(np.float32)
    else:
        raise ValueError(f"{argument}: pixels of dtype {arr.dtype} are not an image")
    if x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).clamp(0, 1).contiguous()


@dataclass(frozen=True)
class Geometry:
    """Input ``(height, width)`` -> content resized to ``content`` -> padded (bottom/right) to ``working``,
    a multiple of ``patch`` pixels -> a ``grid`` of image tokens, row-major."""

    input: Tuple[int, int]
    content: Tuple[int, int]
    working: Tuple[int, int]
    patch: int

    @property
    def grid(self) -> Tuple[int, int]:
        return self.working[0] // self.patch, self.working[1] // self.patch


def _round(x: float, m: int) -> int:
    return max(m, int(round(x / m)) * m)


def paper_resize_shape(height: int, width: int, short: int = PAPER_SHORT_EDGE, max_size: int = PAPER_MAX_EDGE):
    """``(h, w)`` after the paper's first resize: shortest edge ``short``, longest at most ``max_size``, each side
    rounded half up, as detectron2's ``ResizeShortestEdge.get_output_shape`` (500x375 -> 640x853;
    2048x1024 Cityscapes -> 1280x640)."""
    scale = short / min(height, width)
    h, w = height * scale, width * scale
    if max(h, w) > max_size:
        s = max_size / max(h, w)
        h, w = h * s, w * s
    return int(h + 0.5), int(w + 0.5)


def resize_8bit(x: torch.Tensor, short: int = PAPER_SHORT_EDGE, max_size: int = PAPER_MAX_EDGE) -> torch.Tensor:
    """``[..., 3, H, W]`` pixels in [0, 1] -> resized to shortest edge ``short`` (longest at most ``max_size``,
    :func:`paper_resize_shape`) as detectron2's ResizeShortestEdge does on the uint8 image (PIL bilinear, which
    filters when it shrinks, as torch's ``antialias=True`` does), rounded back to 8 bits; unchanged when the size is
    already that."""
    import torch.nn.functional as F

    size = paper_resize_shape(*x.shape[-2:], short, max_size)
    if size == tuple(x.shape[-2:]):
        return x
    lead = x.shape[:-3]
    y = F.interpolate(x.reshape(-1, *x.shape[-3:]), size=size, mode="bilinear", align_corners=False, antialias=True)
    return ((y.clamp(0, 1) * 255).round() / 255).reshape(*lead, *y.shape[-3:])


def plan_geometry(height: int, width: int, patch: int, size: Optional[int], resize: str,
                  max_side: Optional[int] = None) -> Geometry:
    """Working geometry of one input image.

    ``resize``: ``"square"`` resizes to ``size x size``; ``"paper"`` has the same geometry (its first resize to a
    640-pixel shortest edge, :func:`paper_resize_shape`, is a step of the pixels only); ``"aspect"`` keeps the aspect ratio at about
    ``size^2`` pixels (each side rounded to the patch), ``"pad"`` scales the long side to ``size`` and pads to the
    patch multiple. ``size=None`` works at the input's own size (rounded, or padded with ``"pad"``).
    ``max_side``: the model's positional limit in pixels (SD3: ``pos_embed_max_size * patch``).
    """
    from .protocol import ProtocolError

    if height < patch or width < patch:
        raise ProtocolError(
            "image", f"{height}x{width} pixels is smaller than one image token ({patch}x{patch} pixels)")
    if size is not None and size < patch:
        raise ProtocolError("size", f"{size} is below one image token ({patch} pixels)")
    if resize not in ("paper", "square", "aspect", "pad"):
        raise ProtocolError("resize", f"must be 'paper', 'square', 'aspect' or 'pad', not {resize!r}")
    if size is None:
        if resize == "pad":
            content = (height, width)
            working = (math.ceil(height / patch) * patch, math.ceil(width / patch) * patch)
        else:
            content = working = (_round(height, patch), _round(width, patch))
    elif resize in ("square", "paper"):
        s = _round(size, patch)
        content = working = (s, s)
    elif resize == "aspect":
        scale = size / math.sqrt(height * width)
        content = working = (_round(height * scale, patch), _round(width * scale, patch))
    else:
        scale = size / max(height, width)
        content = (max(1, round(height * scale)), max(1, round(width * scale)))
        working = (math.ceil(content[0] / patch) * patch, math.ceil(content[1] / patch) * patch)
    if max_side is not None and max(working) > max_side:
        raise ProtocolError(
            "size", f"the working size {working[0]}x{working[1]} of a {height}x{width} image exceeds the model's "
                    f"positional limit of {max_side} pixels per side; lower the size (or use a model family without "
                    "that limit, e.g. Flux)")
    return Geometry((height, width), content, working, patch)


#: file endings read as frames from a folder
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def frame_paths(folder: str, argument: str = "frames") -> list:
    """The image files of ``folder`` (``FRAME_SUFFIXES``), sorted by name: the frames of a video, in order."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{argument}: no such folder {folder!r}")
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(FRAME_SUFFIXES))
    if not paths:
        raise ValueError(f"{argument}: the folder {folder!r} holds no frames ({', '.join(FRAME_SUFFIXES)} files)")
    return paths


#: video files decoded by PIL (animated GIF, WebP, PNG / APNG; a still one is a video of one frame)
PIL_VIDEO_SUFFIXES = (".gif", ".webp", ".png", ".apng")
#: video files decoded by PyAV (FFmpeg), the optional ``video`` extra: ``pip install "seg4diff-fast[video]"``
AV_VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".ogv", ".flv", ".wmv")


def read_video(path: str, argument: str = "frames") -> list:
    """The frames of the video file ``path``, in order, as a list of ``[H, W, 3]`` uint8 arrays (PyAV) or 8-bit
    arrays of PIL's modes (anything :func:`load_image` reads): animated GIF / WebP / PNG through PIL, every other
    container of ``AV_VIDEO_SUFFIXES`` through PyAV (the first video stream; ``ImportError`` naming the ``video``
    extra when PyAV is missing). A missing file, an unknown ending, a file that does not decode and a video without
    frames raise before anything else is done (``FileNotFoundError`` / ``ValueError`` naming ``argument``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{argument}: no such file {path!r}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in PIL_VIDEO_SUFFIXES:
        from PIL import Image, ImageSequence, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                # each frame as PIL composes it (GIF disposal, APNG blending), copied out before the next seek
                frames = [_pil_array(upright(f), f"{argument} {path!r}") for f in ImageSequence.Iterator(im)]
        except (UnidentifiedImageError, OSError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            raise ValueError(f"{argument}: cannot decode {path!r} as a video ({type(e).__name__}: {e})") from None
    elif suffix in AV_VIDEO_SUFFIXES:
        try:
            import av
        except ImportError as e:
            from .._optional import is_missing
            if not is_missing(e, "av"):
                raise  # installed but broken: its own error is the cause to show
            raise ImportError(f"{argument}: decoding {suffix} files needs PyAV: pip install \"seg4diff-fast[video]\" "
                              "(or extract the frames into a folder, e.g. ffmpeg -i in.mp4 frames/%05d.png)") from None
        try:
            with av.open(path) as container:
                if not container.streams.video:
                    raise ValueError("no video stream")
                frames = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
        except (av.FFmpegError, OSError, ValueError) as e:
            raise ValueError(f"{argument}: cannot decode {path!r} as a video ({type(e).__name__}: {e})") from None
    else:
        raise ValueError(f"{argument}: {path!r} is not a video file this package reads (PIL: "
                         f"{', '.join(PIL_VIDEO_SUFFIXES)}; PyAV: {', '.join(AV_VIDEO_SUFFIXES)}) nor a folder of frames")
    if not frames:
        raise ValueError(f"{argument}: the video {path!r} has no frames")
    return frames


def load_frames(frames, argument: str = "frames") -> torch.Tensor:
    """A video as frames -> ``[F, 3, H, W]`` float32 in [0, 1]: a folder of frame images (sorted by name), a video
    file (:func:`read_video`: animated GIF / WebP / PNG through PIL; MP4, WebM, ... through PyAV, the ``video``
    extra), a list of images (anything :func:`load_image` reads), a ``[F, H, W, 3]`` (or ``[F, H, W]``) array or a
    ``[F, 3, H, W]`` tensor. Every frame must have the first frame's size."""
    if isinstance(frames, (str, os.PathLike)):
        path = os.fspath(frames)
        frames = frame_paths(path, argument) if os.path.isdir(path) else read_video(path, argument)
    elif isinstance(frames, torch.Tensor) and frames.ndim == 4 and frames.shape[1] in (1, 3):
        frames = list(frames)
    elif isinstance(frames, np.ndarray) and frames.ndim in (3, 4):
        frames = list(frames)
    if not isinstance(frames, (list, tuple)):
        raise TypeError(f"{argument}: give a folder of frames, a list of images, an [F, H, W, 3] array or an "
                        f"[F, 3, H, W] tensor, not {type(frames).__name__}")
    if not frames:
        raise ValueError(f"{argument}: no frames")
    out = [load_image(f, f"{argument}[{i}]") for i, f in enumerate(frames)]
    size = tuple(out[0].shape[-2:])
    bad = [i for i, f in enumerate(out) if tuple(f.shape[-2:]) != size]
    if bad:
        raise ValueError(f"{argument}: frames {bad[:5]} differ in size from frame 0 {size}")
    return torch.stack(out)
