"""Image input: load anything a user may hand us, and the geometry between input, working size and patch grid."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

__all__ = ["load_image", "Geometry", "plan_geometry", "paper_resize_shape", "PAPER_SHORT_EDGE", "PAPER_MAX_EDGE"]

#: the paper's test-time resize (detectron2 ResizeShortestEdge with INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST)
PAPER_SHORT_EDGE, PAPER_MAX_EDGE = 640, 2560


def load_image(image, argument: str = "image") -> torch.Tensor:
    """PIL image, path, ``[H, W]`` / ``[H, W, 3|4]`` array, or ``[3, H, W]`` / ``[H, W, 3]`` tensor -> ``[3, H, W]``
    float32 in [0, 1]. Integer inputs are read as 0-255; float inputs must already be in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{argument}: no such file {path!r}")
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{argument}: cannot read {path!r} as an image ({e})") from None
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise ValueError(f"{argument}: an array must be [H, W] or [H, W, 3|4], got shape {arr.shape}")
        arr = arr[:, :, :3]
        t = torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 2:
            t = t.expand(3, *t.shape)
        if t.ndim != 3:
            raise ValueError(f"{argument}: a tensor must be [3, H, W] or [H, W, 3], got shape {tuple(t.shape)}")
        if t.shape[0] not in (1, 3) and t.shape[-1] in (1, 3):
            t = t.permute(2, 0, 1)
        if t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        if t.shape[0] != 3:
            raise ValueError(f"{argument}: a tensor must have 3 channels, got shape {tuple(image.shape)}")
    else:
        raise TypeError(f"{argument}: expected a PIL image, a path, a numpy array or a torch tensor, got {type(image).__name__}")
    if not torch.is_floating_point(t):
        t = t.float() / 255.0
    else:
        t = t.float()
        if t.numel() and (t.min() < -1e-3 or t.max() > 1 + 1e-3):
            raise ValueError(f"{argument}: float pixels must be in [0, 1], got [{t.min():.3g}, {t.max():.3g}]")
    return t.clamp(0, 1).contiguous()


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


def plan_geometry(height: int, width: int, patch: int, size: Optional[int], resize: str,
                  max_side: Optional[int] = None) -> Geometry:
    """Working geometry of one input image.

    ``resize``: ``"square"`` resizes to ``size x size``; ``"paper"`` has the same geometry (its first resize to a
    640-pixel shortest edge, :func:`paper_resize_shape`, is a step of the pixels only); ``"aspect"`` keeps the aspect ratio at about
    ``size^2`` pixels (each side rounded to the patch), ``"pad"`` scales the long side to ``size`` and pads to the
    patch multiple. ``size=None`` works at the input's own size (rounded, or padded with ``"pad"``).
    ``max_side``: the model's positional limit in pixels (SD3: ``pos_embed_max_size * patch``).
    """
    if height < patch or width < patch:
        raise ValueError(
            f"image of {height}x{width} pixels is smaller than one image token ({patch}x{patch} pixels)")
    if size is not None and size < patch:
        raise ValueError(f"size={size} is below one image token ({patch} pixels)")
    if resize not in ("paper", "square", "aspect", "pad"):
        raise ValueError(f"resize must be 'paper', 'square', 'aspect' or 'pad', not {resize!r}")
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
        raise ValueError(
            f"working size {working[0]}x{working[1]} exceeds the model's positional limit of {max_side} pixels "
            f"per side; lower size= (or use a model family without that limit, e.g. Flux)")
    return Geometry((height, width), content, working, patch)
