"""Pictures of a segmentation: palette label PNG, colour overlay with a legend, per-class heatmaps."""
from __future__ import annotations

import io
from typing import List, Optional, Sequence

import numpy as np

__all__ = ["palette", "label_png_bytes", "label_image", "overlay", "heatmap"]


def palette(n: int = 256) -> np.ndarray:
    """Pascal VOC's bit-interleaved palette: ``[n, 3]`` uint8; class k has colour k (255: white, ignore)."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for k in range(n):
        c, r, g, b = k, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[k] = (r, g, b)
    if n > 255:
        pal[255] = (255, 255, 255)
    return pal


def _colour(k: int) -> tuple:
    # class 0 is black in the VOC palette (its background); shift by one for pictures so that no class is black
    return tuple(int(v) for v in palette()[(k + 1) % 255])


def label_image(labels: np.ndarray):
    """``[H, W]`` ids 0..255 -> palette-mode PIL image whose pixel values are the ids (readable back exactly)."""
    from PIL import Image

    lab = np.asarray(labels)
    if lab.min(initial=0) < 0 or lab.max(initial=0) > 255:
        raise ValueError("a palette PNG holds ids 0..255; more than 255 classes need another format (e.g. .npy)")
    im = Image.fromarray(lab.astype(np.uint8), mode="P")
    im.putpalette(palette().reshape(-1).tolist())
    return im


def label_png_bytes(labels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    label_image(labels).save(buf, format="PNG")
    return buf.getvalue()


def overlay(image, labels: np.ndarray, classes: Sequence[str], alpha: float = 0.5, legend: bool = True):
    """Input image blended with class colours, and a legend (colour, name, share of pixels) on the right."""
    from PIL import Image, ImageDraw, ImageFont

    lab = np.asarray(labels)
    base = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)
    if base.shape[:2] != lab.shape:
        raise ValueError(f"image {base.shape[:2]} and labels {lab.shape} differ in size")
    colours = np.array([_colour(k) for k in range(len(classes))] + [(0, 0, 0)], dtype=np.float32)
    col = colours[np.clip(lab, 0, len(classes))]
    out = Image.fromarray((base * (1 - alpha) + col * alpha).clip(0, 255).astype(np.uint8))
    if not legend:
        return out
    font = ImageFont.load_default()
    present = [k for k in range(len(classes)) if (lab == k).any()]
    row = 14
    width = 12 + max([len(f"{classes[k]} 100.0%") for k in present] + [8]) * 7
    H = max(out.height, row * len(present) + 8)
    canvas = Image.new("RGB", (out.width + width, H), (255, 255, 255))
    canvas.paste(out, (0, 0))
    d = ImageDraw.Draw(canvas)
    for i, k in enumerate(present):
        y = 4 + i * row
        d.rectangle([out.width + 4, y, out.width + 14, y + 10], fill=_colour(k))
        d.text((out.width + 18, y - 1), f"{classes[k]} {100 * (lab == k).mean():.1f}%", fill=(0, 0, 0), font=font)
    return canvas


def heatmap(scores: np.ndarray, vmin: Optional[float] = None, vmax: Optional[float] = None):
    """``[H, W]`` float scores -> viridis RGB PIL image, scaled to [vmin, vmax] (default: the map's own range)."""
    from PIL import Image

    s = np.asarray(scores, dtype=np.float32)
    lo = float(s.min()) if vmin is None else vmin
    hi = float(s.max()) if vmax is None else vmax
    x = np.clip((s - lo) / (hi - lo + 1e-12), 0, 1)
    try:
        from matplotlib import colormaps

        rgb = (colormaps["viridis"](x)[..., :3] * 255).astype(np.uint8)
    except Exception:  # matplotlib is optional: grey levels
        rgb = np.repeat((x * 255).astype(np.uint8)[..., None], 3, axis=2)
    return Image.fromarray(rgb)
