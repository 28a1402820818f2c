"""Pictures of a segmentation: palette label PNG, colour overlay with a legend, per-class heatmaps."""
from __future__ import annotations

import io
from typing import List, Optional, Sequence

import numpy as np

__all__ = ["palette", "class_colours", "label_png_bytes", "label_image", "overlay", "heatmap", "font_size_for"]


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


def class_colours() -> np.ndarray:
    """``[256, 3]`` uint8: the colour of class k in every picture (label PNGs, overlays, legends, predictions).

    Pascal VOC's palette shifted by one, so that no class is black (VOC's background colour): class k gets VOC
    colour k + 1 (class 254 wraps to black); 255 (ignore) is white."""
    voc = palette(256)
    pal = voc[(np.arange(256) + 1) % 255].copy()
    pal[255] = (255, 255, 255)
    return pal


def _colour(k: int) -> tuple:
    return tuple(int(v) for v in class_colours()[k])


def label_image(labels: np.ndarray):
    """``[H, W]`` ids 0..255 -> palette-mode PIL image whose pixel values are the ids (readable back exactly) and
    whose colours are :func:`class_colours`, the overlay's."""
    from PIL import Image

    lab = np.asarray(labels)
    if lab.min(initial=0) < 0 or lab.max(initial=0) > 255:
        raise ValueError("a palette PNG holds ids 0..255; more than 255 classes need another format (e.g. .npy)")
    im = Image.fromarray(lab.astype(np.uint8), mode="P")
    im.putpalette(class_colours().reshape(-1).tolist())
    return im


def label_png_bytes(labels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    label_image(labels).save(buf, format="PNG")
    return buf.getvalue()


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except TypeError:
        return ImageFont.load_default()


def font_size_for(height: int, width: int) -> int:
    """Legend / title text size for a picture: about 1/28 of its short side, 11 to 40 pixels."""
    return int(min(40, max(11, round(min(height, width) / 28))))


def _ellipsis(text: str, n: int = 32) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _percent(x: float) -> str:
    return f"{100 * x:.1f}%" if x >= 0.001 else "<0.1%"


def overlay(image, labels: np.ndarray, classes: Sequence[str], alpha: float = 0.5, legend: bool = True,
            max_rows: int = 20):
    """Input image blended with class colours, and a legend on the right: colour, name, share of pixels, classes
    sorted by share, at most ``max_rows`` rows (the rest as one "+N more" row). The text is scaled to the image;
    the legend is as tall as the image (taller only for images under about 10 rows of text)."""
    from PIL import Image, ImageDraw

    lab = np.asarray(labels)
    base = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)
    if base.shape[:2] != lab.shape:
        raise ValueError(f"image {base.shape[:2]} and labels {lab.shape} differ in size")
    if len(classes) > 255:
        raise ValueError(f"{len(classes)} classes: pictures hold at most 255 (ids 0..254)")
    colours = class_colours().astype(np.float32)
    col = colours[np.clip(lab, 0, 255)]
    out = Image.fromarray((base * (1 - alpha) + col * alpha).clip(0, 255).astype(np.uint8))
    if not legend:
        return out
    counts = np.bincount(lab.reshape(-1).clip(0, 255), minlength=256)[: len(classes)]
    order = [int(k) for k in np.argsort(-counts, kind="stable") if counts[k] > 0]
    share = counts / max(lab.size, 1)
    fs = font_size_for(*lab.shape)
    font = _font(fs)
    row = int(fs * 1.4)
    pad = max(4, fs // 3)
    rows = max(1, min(max_rows, max(10, (out.height - 2 * pad) // row)))
    shown, rest = (order, []) if len(order) <= rows else (order[: rows - 1], order[rows - 1:])
    lines = [(k, f"{_ellipsis(classes[k])} {_percent(share[k])}") for k in shown]
    if rest:
        lines.append((None, f"+{len(rest)} more ({_percent(share[rest].sum())})"))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max([probe.textlength(t, font=font) for _, t in lines] + [fs * 4])
    width = int(pad * 3 + fs + text_w + pad)
    H = max(out.height, 2 * pad + row * len(lines))
    canvas = Image.new("RGB", (out.width + width, H), (255, 255, 255))
    canvas.paste(out, (0, 0))
    d = ImageDraw.Draw(canvas)
    x0 = out.width + pad
    for i, (k, text) in enumerate(lines):
        y = pad + i * row
        if k is not None:
            d.rectangle([x0, y + (row - fs) // 2, x0 + fs, y + (row - fs) // 2 + fs], fill=_colour(k), outline=(0, 0, 0))
        d.text((x0 + fs + pad, y + row // 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    return canvas


def heatmap(scores: np.ndarray, name: Optional[str] = None, vmin: Optional[float] = None,
            vmax: Optional[float] = None, colourbar: bool = True):
    """``[H, W]`` float scores -> RGB PIL image: the map in viridis at its own size, scaled to [vmin, vmax] (default:
    the map's own range), with ``name`` above it and a colour bar with its values on the right (text scaled to the
    map). Needs matplotlib (the ``[diffusers]`` extra) for the colour map."""
    from PIL import Image, ImageDraw

    try:
        from matplotlib import colormaps
    except ImportError as e:
        from .._optional import is_missing
        if not is_missing(e, "matplotlib"):
            raise  # installed but broken: its own error is the cause to show
        raise RuntimeError("heatmaps need matplotlib (pip install matplotlib, or the [diffusers] extra)") from None
    s = np.asarray(scores, dtype=np.float32)
    lo = float(np.nanmin(s)) if vmin is None else float(vmin)
    hi = float(np.nanmax(s)) if vmax is None else float(vmax)
    cmap = colormaps["viridis"]
    x = np.clip((s - lo) / (hi - lo + 1e-12), 0, 1)
    img = Image.fromarray((cmap(x)[..., :3] * 255).astype(np.uint8))
    if name is None and not colourbar:
        return img
    h, w = s.shape
    fs = font_size_for(h, w)
    font = _font(fs)
    pad = max(4, fs // 3)
    title_h = int(fs * 1.5) if name is not None else 0
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    ticks = [hi, (lo + hi) / 2, lo]
    labels = [f"{v:.3g}" for v in ticks]
    bar_w = max(8, fs)
    extra = (pad * 3 + bar_w + int(max(probe.textlength(t, font=font) for t in labels))) if colourbar else 0
    canvas = Image.new("RGB", (w + extra, h + title_h), (255, 255, 255))
    canvas.paste(img, (0, title_h))
    d = ImageDraw.Draw(canvas)
    if name is not None:
        d.text((pad, title_h // 2), _ellipsis(name, 48), fill=(0, 0, 0), font=font, anchor="lm")
    if colourbar:
        x0 = w + pad
        grad = np.linspace(1, 0, h, dtype=np.float32)[:, None].repeat(bar_w, 1)
        canvas.paste(Image.fromarray((cmap(grad)[..., :3] * 255).astype(np.uint8)), (x0, title_h))
        d.rectangle([x0, title_h, x0 + bar_w - 1, title_h + h - 1], outline=(0, 0, 0))
        for frac, t in zip((0.0, 0.5, 1.0), labels):
            y = title_h + int(round(frac * (h - 1)))
            anchor = "lt" if frac == 0 else ("lb" if frac == 1 else "lm")
            d.line([x0 + bar_w, y, x0 + bar_w + pad // 2, y], fill=(0, 0, 0))
            d.text((x0 + bar_w + pad, y), t, fill=(0, 0, 0), font=font, anchor=anchor)
    return canvas
