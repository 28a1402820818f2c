"""Readers for segmentation datasets in their standard folder layouts.

Every reader yields :class:`Sample` (id, image path, label path) and maps the stored label values to
``0..C-1`` with 255 ignored:

- ``voc20`` (the paper's VOC20): ``VOCdevkit/VOC2012`` or the folder holding ``JPEGImages``,
  ``SegmentationClass``, ``ImageSets/Segmentation/{split}.txt``; background (0) and borders (255) ignored,
  classes 1..20 -> 0..19.
- ``voc21``: the same with background kept as class 0 named ``background``.
- ``ade150``: ``ADEChallengeData2016/images/{training,validation}/*.jpg`` and ``annotations/.../*.png``;
  0 ("other") ignored, 1..150 -> 0..149.
- ``context59``: detectron2's prepared Pascal Context 59 (``JPEGImages`` + ``annotations_detectron2/pc59_{split}``),
  labels already 0..58 with 255 ignored.
- ``cityscapes``: ``leftImg8bit/{split}/<city>/*_leftImg8bit.png`` and ``gtFine/{split}/<city>/*_gtFine_labelTrainIds.png``
  (made by cityscapesscripts' ``createTrainIdLabelImgs``), 19 classes, 255 ignored.
- ``folder``: any ``images/`` + ``labels/`` pair with the same stems and a ``classes.txt`` (one name a line),
  labels already 0..C-1 / 255 (e.g. a prepared COCO-Stuff).

Class names are the ones the paper prompts with (its ``datasets/*.json``), so that numbers compare.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np

__all__ = ["Sample", "SegDataset", "open_dataset", "VOC20_CLASSES", "ADE150_CLASSES", "CONTEXT59_CLASSES",
           "CITYSCAPES_CLASSES", "DATASETS"]

VOC20_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
                 "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]

ADE150_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet", "sidewalk",
    "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water", "painting", "sofa",
    "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book",
    "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight",
    "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator",
    "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier",
    "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag"]

CONTEXT59_CLASSES = [
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building", "bus",
    "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog", "door", "fence",
    "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse",
    "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow",
    "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood"]

CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle"]

assert len(ADE150_CLASSES) == 150 and len(CONTEXT59_CLASSES) == 59 and len(VOC20_CLASSES) == 20


@dataclass(frozen=True)
class Sample:
    id: str
    image: str
    label: str


class SegDataset:
    """A list of samples, the class names and the label mapping. ``load_label(s)`` -> ``[H, W]`` int64."""

    def __init__(self, name: str, samples: List[Sample], classes: List[str], mapping: Callable[[np.ndarray], np.ndarray]):
        self.name, self.samples, self.classes, self._mapping = name, samples, list(classes), mapping

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i) -> Sample:
        return self.samples[i]

    def load_label(self, sample: Sample) -> np.ndarray:
        from PIL import Image

        with Image.open(sample.label) as im:
            raw = np.array(im)  # palette PNGs give indices
        if raw.ndim != 2:
            raise ValueError(f"label {sample.label} is not a single-channel (index or palette) image")
        return self._mapping(raw.astype(np.int64))


def _shift_down(raw: np.ndarray) -> np.ndarray:
    """0 -> 255 (ignored), k -> k - 1, 255 stays 255."""
    out = raw - 1
    out[(raw == 0) | (raw == 255)] = 255
    return out


def _identity(raw: np.ndarray) -> np.ndarray:
    return raw


def _need(path: str, what: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: {path} not found")


def _voc(root: str, split: str, background: bool) -> SegDataset:
    if os.path.isdir(os.path.join(root, "VOC2012")):
        root = os.path.join(root, "VOC2012")
    lst = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
    _need(lst, "Pascal VOC 2012 layout (JPEGImages, SegmentationClass, ImageSets/Segmentation)")
    with open(lst) as f:
        ids = [l.strip() for l in f if l.strip()]
    samples = [Sample(i, os.path.join(root, "JPEGImages", i + ".jpg"), os.path.join(root, "SegmentationClass", i + ".png"))
               for i in ids]
    if background:
        return SegDataset("voc21", samples, ["background"] + VOC20_CLASSES, _identity)
    return SegDataset("voc20", samples, VOC20_CLASSES, _shift_down)


def _ade(root: str, split: str) -> SegDataset:
    if os.path.isdir(os.path.join(root, "ADEChallengeData2016")):
        root = os.path.join(root, "ADEChallengeData2016")
    sub = {"val": "validation", "train": "training"}.get(split, split)
    img_dir, ann_dir = os.path.join(root, "images", sub), os.path.join(root, "annotations", sub)
    _need(img_dir, "ADE20K layout (ADEChallengeData2016/images/..., annotations/...)")
    stems = sorted(os.path.splitext(f)[0] for f in os.listdir(img_dir) if f.lower().endswith((".jpg", ".jpeg", ".png")))
    exts = {os.path.splitext(f)[0]: f for f in os.listdir(img_dir)}
    samples = [Sample(s, os.path.join(img_dir, exts[s]), os.path.join(ann_dir, s + ".png")) for s in stems]
    return SegDataset("ade150", samples, ADE150_CLASSES, _shift_down)


def _context59(root: str, split: str) -> SegDataset:
    if os.path.isdir(os.path.join(root, "VOC2010")):
        root = os.path.join(root, "VOC2010")
    ann = os.path.join(root, "annotations_detectron2", f"pc59_{split}")
    _need(ann, "Pascal Context 59 prepared by detectron2 (JPEGImages, annotations_detectron2/pc59_val)")
    stems = sorted(os.path.splitext(f)[0] for f in os.listdir(ann) if f.endswith(".png"))
    samples = [Sample(s, os.path.join(root, "JPEGImages", s + ".jpg"), os.path.join(ann, s + ".png")) for s in stems]
    return SegDataset("context59", samples, CONTEXT59_CLASSES, _identity)


def _cityscapes(root: str, split: str) -> SegDataset:
    img_root = os.path.join(root, "leftImg8bit", split)
    _need(img_root, "Cityscapes layout (leftImg8bit/val/<city>, gtFine/val/<city> with *_labelTrainIds.png)")
    samples = []
    for city in sorted(os.listdir(img_root)):
        for f in sorted(os.listdir(os.path.join(img_root, city))):
            if f.endswith("_leftImg8bit.png"):
                stem = f[: -len("_leftImg8bit.png")]
                samples.append(Sample(stem, os.path.join(img_root, city, f),
                                      os.path.join(root, "gtFine", split, city, stem + "_gtFine_labelTrainIds.png")))
    return SegDataset("cityscapes", samples, CITYSCAPES_CLASSES, _identity)


def _folder(root: str, split: str) -> SegDataset:
    names = os.path.join(root, "classes.txt")
    _need(names, "generic layout (images/, labels/, classes.txt)")
    with open(names) as f:
        classes = [l.strip() for l in f if l.strip()]
    img_dir, lab_dir = os.path.join(root, "images"), os.path.join(root, "labels")
    files = {os.path.splitext(f)[0]: f for f in os.listdir(img_dir)}
    samples = [Sample(s, os.path.join(img_dir, files[s]), os.path.join(lab_dir, s + ".png")) for s in sorted(files)
               if os.path.exists(os.path.join(lab_dir, s + ".png"))]
    return SegDataset(os.path.basename(os.path.normpath(root)), samples, classes, _identity)


DATASETS = {
    "voc20": lambda r, s: _voc(r, s, False),
    "voc21": lambda r, s: _voc(r, s, True),
    "ade150": _ade,
    "context59": _context59,
    "cityscapes": _cityscapes,
    "folder": _folder,
}


def open_dataset(name: str, root: str, split: str = "val", limit: Optional[int] = None) -> SegDataset:
    """``name`` in :data:`DATASETS`; ``limit`` keeps the first samples (sorted, deterministic)."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, not {name!r}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset root {root!r} is not a folder")
    ds = DATASETS[name](root, split)
    ds.split = split  # part of an evaluation's settings (evaluate.run_settings)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be an integer >= 1 (or None for every sample), got {limit!r}")
        ds.samples = ds.samples[:limit]
    return ds
