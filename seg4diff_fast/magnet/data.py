"""Training data for MAGNET from folder layouts: COCO-style class masks and SA-1B-style class-agnostic masks.

Layouts (``root`` is the folder given to :class:`MaskCaptionDataset`)::

    coco:  images/<id>.jpg|.jpeg|.png       the images
           masks/<id>.png                   one class id per pixel (0..C-1), 255 = ignored (single channel or palette)
           classes.txt | classes.json       the class names, one a line / a JSON list (the paper trains on
                                            COCO-Stuff's 171 names, its datasets/coco.json, which can be used as is)
           captions.json                    {"<id>": "caption" | ["caption", ...]} (optional with prompt="classes")
    sa1b:  images/<id>.jpg|.jpeg|.png
           masks/<id>/*.png                 one binary PNG per mask (non-zero = inside), or
           masks/<id>.npz                   an array "masks" [M, H, W] (bool or 0/1)
           captions.json                    {"<id>": caption} (required: SA-1B has no class names to prompt)

Images and masks are read through :func:`seg4diff_fast.segmentation.images.read_image` (EXIF orientation applied,
so a phone photo and its mask keep one size); two images of one id (``x.jpg`` and ``x.png``) are refused. Class
lists and captions are read as users save them (a UTF-8 byte-order mark, CRLF: :mod:`seg4diff_fast._io`).

SA-1B ships masks as COCO RLE in JSON; decoding that needs pycocotools, which this package avoids: convert once
(``pycocotools.mask.decode`` -> ``np.savez_compressed(f"masks/{id}.npz", masks=...)``).

What each sample holds, and the paper's code it follows (cvlab-kaist/Seg4Diff at bb500ca):

- image: ``transform="official"`` (default) is what the paper's code executes for its COCO run
  (``mask_former_semantic_dataset_mapper.py`` l. 75-90 and 160-175, ``seg4diff_model_train.py`` l. 264-266):
  detectron2's ``ResizeShortestEdge`` to ``short_edge`` (1024; PIL bilinear, labels torch "nearest"), ``FixedSizeCrop``
  of ``crop_size`` x ``crop_size`` (1024) at a random offset (one uniform draw scales both axes' room, as
  detectron2's), ``RandomFlip`` (horizontal, ``hflip``), then the mapper's "padding" to ``SIZE_DIVISIBILITY``
  (``size_divisibility``, 640): ``F.pad(image, [0, 640 - w, 0, 640 - h])`` with negative amounts, which *crops*
  the top-left 640 x 640 (a smaller crop would be padded: image 128, label 255); the model then squashes that
  to ``size x size`` (``F.interpolate`` bilinear, align_corners False) while the masks stay at 640 x 640 (the
  loss upsamples the candidates to them). So the model sees the top-left 62.5 % of a 1024 crop, stretched by
  1.6. ``transform="squash"``: the whole image squashed to ``size x size`` (bilinear) with its masks (nearest),
  what the paper's text suggests. Pixels to [-1, 1]. Random draws come from torch's global generator, so
  seeding torch (and DataLoader workers) makes them repeatable.
- masks ``[M, m, m]`` bool (``m``: ``size`` squashed, ``size_divisibility`` official). coco: one mask per class
  present after the crop (sorted class ids, 255 dropped), as ``mask_former_semantic_dataset_mapper.py``
  l. 190-200. sa1b: masks below ``min_area`` (0.5 % of the image) dropped, the rest sorted by area, largest first
  (``prepare_targets`` l. 576-587). At most ``max_masks`` (32, ``MODEL.MAX_MASK``) masks: the first ones in that
  order.
- prompt: ``"classes"`` joins the names of the classes present with spaces (``GT_ONLY_PROMPT: True`` in
  ``train_coco.yaml``: the paper's COCO choice, default for coco); ``"caption"`` takes the image's caption
  (default for sa1b), cut to its first two sentences when ``short_caption`` (``SHORT_CAPTION: True``, l. 286-287;
  a list of captions: the first). Captions: ``datasets/captions/train_caption_{coco,sa1b}.json`` in the paper's
  repository (10k images each). coco with ``captioned_only`` (default) and a ``captions.json``: only the images it
  lists are used, as the paper's ``coco_2017_train_subset`` (``register_coco_stuff.py`` l. 254-266) builds its
  training set from the caption file's keys.
- spans: for each mask, the character span ``(start, stop)`` of its class name in the prompt (a caption: the list
  of every occurrence, found by :func:`seg4diff_fast.segmentation.tokens.name_spans`: whole words, any case, a
  longer class name taking its words first), or ``None`` (sa1b; or a class name the caption does not contain).
  :func:`token_groups` turns them into text columns for :func:`seg4diff_fast.magnet.criterion.candidates_from_maps`
  (``mode="token"``).
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import numpy as np
import torch

from .._io import read_json, read_lines
from ..segmentation.images import images_by_stem, read_image

__all__ = ["MaskCaptionDataset", "collate_masks", "token_groups", "short_caption", "official_crop", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def short_caption(caption: str, sentences: int = 2) -> str:
    """The first ``sentences`` sentences of ``caption``, each ended by ``.`` (the paper's ``SHORT_CAPTION``, which
    keeps two; a caption with fewer is kept whole)."""
    parts = [p.strip() for p in caption.split(".") if p.strip()]
    if len(parts) <= sentences:
        return caption.strip()
    return " ".join(p + "." for p in parts[:sentences])


def _load_classes(root: str) -> List[str]:
    txt, js = os.path.join(root, "classes.txt"), os.path.join(root, "classes.json")
    if os.path.isfile(js):
        names = read_json(js, "classes.json")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{js}: expected a JSON list of class names (strings)")
    elif os.path.isfile(txt):
        names = read_lines(txt, "classes.txt", ids=True)  # line numbers are the masks' class ids
    else:
        raise FileNotFoundError(f"coco layout needs the class names: neither {txt} nor {js} found")
    if not names:
        raise ValueError(f"no class names in {js if os.path.isfile(js) else txt}")
    return names


def _load_captions(path: str, required: bool) -> dict:
    if not os.path.isfile(path):
        if required:
            raise FileNotFoundError(f"captions file {path} not found (a JSON object: image id -> caption)")
        return {}
    caps = read_json(path, "captions.json")
    if not isinstance(caps, dict):
        raise ValueError(f"{path}: expected a JSON object mapping image ids to a caption or a list of captions")
    return caps


def official_crop(image, layers: np.ndarray, short_edge: int, crop_size: int, size_divisibility: int,
                  hflip: float, fill: int = 255):
    """The paper's training geometry (module docstring): ``image`` a PIL RGB image, ``layers`` ``[K, H, W]`` uint8
    label maps or masks (torch "nearest", padded with ``fill`` where the crop is smaller than ``size_divisibility``) ->
    (uint8 ``[d, d, 3]``, uint8 ``[K, d, d]``), ``d = size_divisibility``. Draws from torch's global generator:
    the crop offset (one uniform for both axes, detectron2's ``FixedSizeCrop``), then the flip."""
    from PIL import Image

    w, h = image.size
    scale = short_edge / min(h, w)  # detectron2 ResizeShortestEdge.get_output_shape (no max size in the mapper)
    newh, neww = (short_edge, scale * w) if h < w else (scale * h, short_edge)
    newh, neww = int(newh + 0.5), int(neww + 0.5)
    img = np.asarray(image.resize((neww, newh), Image.BILINEAR))  # a uint8 image: detectron2 resizes with PIL
    # the mapper reads labels as float64 (astype("double")), which detectron2 resizes with torch's "nearest" (not
    # PIL's: the two pick different source pixels)
    lay = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(layers)).float()[None],
                                          (newh, neww), mode="nearest")[0].to(torch.uint8).numpy() \
        if len(layers) else np.zeros((0, newh, neww), np.uint8)
    u = float(torch.rand(()))
    top, left = (int(np.round(max(newh - crop_size, 0) * u)), int(np.round(max(neww - crop_size, 0) * u)))
    img, lay = img[top:top + crop_size, left:left + crop_size], lay[:, top:top + crop_size, left:left + crop_size]
    if hflip > 0 and float(torch.rand(())) < hflip:
        img, lay = img[:, ::-1], lay[:, :, ::-1]
    d = size_divisibility  # F.pad(x, [0, d - w, 0, d - h]): a negative amount crops the far side
    out_img = np.full((d, d, 3), 128, np.uint8)
    out_lay = np.full((len(lay), d, d), fill, np.uint8)
    hh, ww = min(d, img.shape[0]), min(d, img.shape[1])
    out_img[:hh, :ww] = img[:hh, :ww]
    out_lay[:, :hh, :ww] = lay[:, :hh, :ww]
    return out_img, out_lay


class MaskCaptionDataset(torch.utils.data.Dataset):
    """Images with masks and a prompt for MAGNET training (layouts and choices in the module docstring).

    ``dataset[i]`` -> dict(image float [3, S, S] in [-1, 1], masks bool [M, m, m] (``m = S`` squashed,
    ``size_divisibility`` official), class_names list[str] (the name of each mask; [] for sa1b), class_ids int64 [M]
    (coco; empty for sa1b), prompt str, spans list of M ``(start, stop)`` (captions: a list of them) or ``None``,
    id str).
    """

    def __init__(self, root: str, kind: str = "coco", size: int = 512, prompt: Optional[str] = None,
                 short_captions: bool = True, max_masks: int = 32, min_area: float = 0.005, hflip: float = 0.5,
                 limit: Optional[int] = None, transform: str = "official", short_edge: int = 1024,
                 crop_size: int = 1024, size_divisibility: int = 640, captioned_only: bool = True):
        if kind not in ("coco", "sa1b"):
            raise ValueError(f"kind must be 'coco' or 'sa1b', got {kind!r}")
        prompt = prompt or ("classes" if kind == "coco" else "caption")
        if prompt not in ("classes", "caption"):
            raise ValueError(f"prompt must be 'classes' or 'caption', got {prompt!r}")
        if kind == "sa1b" and prompt == "classes":
            raise ValueError("prompt='classes' needs class names: the sa1b layout has none (use prompt='caption')")
        if transform not in ("official", "squash"):
            raise ValueError(f"transform must be 'official' or 'squash', got {transform!r}")
        if min(int(size), int(max_masks), int(short_edge), int(crop_size), int(size_divisibility)) < 1 \
                or not 0 <= float(hflip) <= 1:
            raise ValueError(f"size, max_masks, short_edge, crop_size and size_divisibility must be >= 1 and hflip in "
                             f"[0, 1], got {size}, {max_masks}, {short_edge}, {crop_size}, {size_divisibility}, "
                             f"{hflip}")
        self.root, self.kind, self.size, self.prompt = root, kind, int(size), prompt
        self.short_captions, self.max_masks = bool(short_captions), int(max_masks)
        self.min_area, self.hflip = float(min_area), float(hflip)
        self.transform, self.short_edge, self.crop_size = transform, int(short_edge), int(crop_size)
        self.size_divisibility = int(size_divisibility)
        images = os.path.join(root, "images")
        if not os.path.isdir(images):
            raise FileNotFoundError(f"{kind} layout needs an images/ folder: {images} not found")
        self.masks_dir = os.path.join(root, "masks")
        if not os.path.isdir(self.masks_dir):
            raise FileNotFoundError(f"{kind} layout needs a masks/ folder: {self.masks_dir} not found")
        self.images = {stem: os.path.join(images, f)
                       for stem, f in images_by_stem(images, IMAGE_EXTENSIONS, f"{kind} images").items()}
        self.classes = _load_classes(root) if kind == "coco" else []
        captions_path = os.path.join(root, "captions.json")
        self.captions = _load_captions(captions_path, required=prompt == "caption")
        ids = list(self.images)
        if kind == "coco" and captioned_only and os.path.isfile(captions_path):
            ids = [i for i in ids if i in self.captions]  # the paper's coco_2017_train_subset: the caption file's ids
            if not ids:
                raise ValueError(f"{captions_path} lists none of the images in {images}: no training image left "
                                 "(captioned_only keeps only the images it lists)")
        self.ids = ids[: limit if limit is not None else None]
        if not self.ids:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {images}")
        if prompt == "caption":
            missing = [i for i in self.ids if i not in self.captions]
            if missing:
                raise ValueError(f"{captions_path} has no caption for {len(missing)} images, e.g. {missing[:3]}")

    def __len__(self):
        return len(self.ids)

    # -- masks ------------------------------------------------------------------------------------------------
    def _coco_label(self, sid: str, hw) -> np.ndarray:
        """The class-id map ``[1, H, W]`` uint8 of image ``sid``."""
        path = os.path.join(self.masks_dir, sid + ".png")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"mask {path} for image {self.images[sid]} not found")
        label = np.array(read_image(path, "mask"))
        if label.ndim != 2:
            raise ValueError(f"mask {path} must be single-channel class ids (or a palette PNG), got shape {label.shape}")
        if label.shape != hw:
            raise ValueError(f"mask {path} is {label.shape[1]}x{label.shape[0]}, its image is {hw[1]}x{hw[0]}")
        ids = [int(c) for c in np.unique(label) if c != 255]
        bad = [c for c in ids if c >= len(self.classes)]
        if bad:
            raise ValueError(f"mask {path} holds class ids {bad} but there are {len(self.classes)} class names")
        return label.astype(np.uint8)[None]

    def _coco_masks(self, label: np.ndarray):
        """``label`` ``[m, m]`` -> (masks ``[M, m, m]`` bool of the classes present, their ids), at most max_masks."""
        ids = [int(c) for c in np.unique(label) if c != 255][: self.max_masks]
        masks = np.stack([label == c for c in ids]) if ids else np.zeros((0, *label.shape), bool)
        return masks, ids

    def _sa1b_raw(self, sid: str, hw) -> np.ndarray:
        """The image's masks ``[M, H, W]`` uint8 (0 / 255)."""
        folder, npz = os.path.join(self.masks_dir, sid), os.path.join(self.masks_dir, sid + ".npz")
        if os.path.isdir(folder):
            arrays = []
            for f in sorted(os.listdir(folder)):
                if not f.lower().endswith(".png"):
                    continue
                p = os.path.join(folder, f)
                a = np.array(read_image(p, "mask"))
                if a.ndim != 2 or a.shape != hw:
                    raise ValueError(f"mask {p} must be a single-channel {hw[1]}x{hw[0]} image, got shape {a.shape}")
                arrays.append(a != 0)
            raw = np.stack(arrays) if arrays else np.zeros((0, *hw), bool)
        elif os.path.isfile(npz):
            try:
                with np.load(npz) as z:
                    raw = z["masks"]
            except (OSError, ValueError, KeyError) as e:
                raise ValueError(f"cannot read masks from {npz} (expected an array 'masks' [M, H, W]): {e}") from e
            if raw.ndim != 3 or raw.shape[1:] != hw:
                raise ValueError(f"{npz}: 'masks' must be [M, {hw[0]}, {hw[1]}], got {raw.shape}")
            raw = raw != 0
        else:
            raise FileNotFoundError(f"masks of image {self.images[sid]} not found: neither {folder}/ nor {npz}")
        return raw.astype(np.uint8) * 255

    def _sa1b_masks(self, small: np.ndarray):
        """Masks ``[M, m, m]`` (uint8, 255 inside) -> the kept ones: area above min_area, largest first, at most
        max_masks."""
        small = small > 127
        area = small.reshape(len(small), -1).mean(1) if len(small) else np.zeros(0)
        keep = np.nonzero(area > self.min_area)[0]
        keep = keep[np.argsort(-area[keep], kind="stable")][: self.max_masks]
        return small[keep], []

    # -- prompt -------------------------------------------------------------------------------------------------
    def _caption(self, sid: str) -> str:
        cap = self.captions[sid]
        if isinstance(cap, list):
            if not cap or not isinstance(cap[0], str):
                raise ValueError(f"captions.json entry {sid!r} must be a caption or a non-empty list of captions")
            cap = cap[0]
        if not isinstance(cap, str):
            raise ValueError(f"captions.json entry {sid!r} must be a string, got {type(cap).__name__}")
        return short_caption(cap) if self.short_captions else cap

    def _prompt(self, sid: str, names: List[str]):
        if self.prompt == "classes":
            spans, parts, cursor = [], [], 0
            for n in names:
                if parts:
                    parts.append(" ")
                    cursor += 1
                spans.append((cursor, cursor + len(n)))
                parts.append(n)
                cursor += len(n)
            return "".join(parts), spans
        text = self._caption(sid)
        # a class named in the caption: all its occurrences, by the rule of segmentation.tokens.name_spans
        from ..segmentation.tokens import name_spans

        return text, [sp or None for sp in name_spans(text, names)]

    def __getitem__(self, i: int) -> dict:
        sid = self.ids[i]
        from PIL import Image

        im = read_image(self.images[sid], "image").convert("RGB")
        hw = (im.height, im.width)
        layers = self._coco_label(sid, hw) if self.kind == "coco" else self._sa1b_raw(sid, hw)
        if self.transform == "official":
            img, layers = official_crop(im, layers, self.short_edge, self.crop_size, self.size_divisibility,
                                        self.hflip, fill=255 if self.kind == "coco" else 0)
            # the model: x / 255, F.interpolate to size x size (bilinear, align_corners False), then 2 x - 1
            pix = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()[None] / 255.0
            image = torch.nn.functional.interpolate(pix, size=(self.size, self.size), mode="bilinear",
                                                    align_corners=False)[0] * 2.0 - 1.0
        else:
            img = np.asarray(im.resize((self.size, self.size), Image.BILINEAR), dtype=np.float32)
            layers = np.stack([np.asarray(Image.fromarray(l).resize((self.size, self.size), Image.NEAREST))
                               for l in layers]) if len(layers) else np.zeros((0, self.size, self.size), np.uint8)
            image = torch.from_numpy(img).permute(2, 0, 1) / 127.5 - 1.0
            if self.hflip > 0 and float(torch.rand(())) < self.hflip:
                image, layers = image.flip(-1), layers[:, :, ::-1]
        if self.kind == "coco":
            masks, ids = self._coco_masks(layers[0])
        else:
            masks, ids = self._sa1b_masks(layers)
        masks = torch.from_numpy(np.ascontiguousarray(masks))
        names = [self.classes[c] for c in ids]
        prompt, spans = self._prompt(sid, names)
        if self.kind == "sa1b":
            spans = [None] * len(masks)
        return dict(image=image.contiguous(), masks=masks.contiguous(), class_names=names,
                    class_ids=torch.tensor(ids, dtype=torch.long), prompt=prompt, spans=spans, id=sid)


def collate_masks(batch: Sequence[dict]) -> dict:
    """Batch samples: ``images`` [B, 3, S, S]; ``masks``, ``class_names``, ``class_ids``, ``prompts``, ``spans``,
    ``ids``: lists of length B (mask counts differ between images)."""
    if not batch:
        raise ValueError("collate_masks got an empty batch")
    return dict(images=torch.stack([b["image"] for b in batch]), masks=[b["masks"] for b in batch],
                class_names=[b["class_names"] for b in batch], class_ids=[b["class_ids"] for b in batch],
                prompts=[b["prompt"] for b in batch], spans=[b["spans"] for b in batch], ids=[b["id"] for b in batch])


def token_groups(tokenizer, prompts: Sequence[str], spans: Sequence[Sequence], max_length: int = 77):
    """Text columns of each mask: ``groups[b][j]`` = positions (in the tokenizer's padded sequence, the captured
    text columns) of the tokens overlapping ``spans[b][j]``; ``[]`` for a ``None`` span or a name cut off at
    ``max_length`` (that mask then gets no candidate, as in the paper's code). Uses
    :func:`seg4diff_fast.segmentation.tokens.phrase_columns`."""
    from ..segmentation.tokens import phrase_columns

    if len(prompts) != len(spans):
        raise ValueError(f"prompts and spans must have one entry per image, got {len(prompts)} and {len(spans)}")
    out = []
    for p, sp in zip(prompts, spans):
        real = [(k, s) for k, s in enumerate(sp) if s is not None]
        cols = phrase_columns(tokenizer, p, [s for _, s in real], max_length) if real else []
        groups = [[] for _ in sp]
        for (k, _), c in zip(real, cols):
            groups[k] = list(c)
        out.append(groups)
    return out
