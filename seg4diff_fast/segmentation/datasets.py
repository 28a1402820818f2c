"""Readers for segmentation datasets in their standard folder layouts.

Every reader yields :class:`Sample` (id, image path, label path) and maps the stored label values to
``0..C-1`` with 255 ignored:

- ``voc20`` (the paper's VOC20): ``VOCdevkit/VOC2012`` or the folder holding ``JPEGImages``,
  ``SegmentationClass``, ``ImageSets/Segmentation/{split}.txt``; background (0) and borders (255) ignored,
  classes 1..20 -> 0..19.
- ``voc21``: the same with background kept, as the paper's ``voc21.json``: the 20 classes then ``background``
  (class 20). Both also read the paper's prepared layout (``annotations_detectron2/val`` for voc20,
  ``annotations_detectron2_bg/val`` for voc21, from its ``datasets/prepare_voc.py``) when it is there.
- ``ade150``: ``ADEChallengeData2016/images/{training,validation}/*.jpg`` and ``annotations/.../*.png``;
  0 ("other") ignored, 1..150 -> 0..149.
- ``context59``: detectron2's prepared Pascal Context 59 (``JPEGImages`` + ``annotations_detectron2/pc59_{split}``),
  labels already 0..58 with 255 ignored.
- ``context59_bg``: Pascal Context 59 with background (the paper's Table 2): ``annotations_detectron2_bg/pc59_{split}``,
  0 = background, 1..59 = the 59 classes, 255 ignored; classes ``["background"] + CONTEXT59_CLASSES``.
- ``coco_object`` (the paper's Table 1 COCO-Object): ``coco/val2017/*.jpg`` and either the prepared object maps
  ``coco/annotations_object/val2017/*.png`` (0 background, 1..80 objects, 255 ignored) or, derived on the fly,
  COCO-Stuff's detectron2 maps ``coco/annotations_detectron2/val2017`` (train ids 0..79 things -> 1..80, 80..170
  stuff -> 0 background). Classes: the paper's ``coco_object.json`` (``background`` first). As in the paper
  (ignore label 0 of its ``coco_2017_test_object_wo_bg`` set), ``background`` is prompted when present but its
  pixels are not scored (:attr:`SegDataset.unscored`).
- ``coco_object_bg`` (Table 2): the same files with background scored as class 0.
- ``coco_stuff27`` (Table 2): ``coco/val2017`` + ``coco/annotations_27_detectron2/val2017`` (0..26 in the order of the
  paper's ``coco_stuff_27.json``, 255 ignored); that folder is the paper's own preparation (its repository has no
  script for it), so it is read, not derived.
- ``cityscapes``: ``leftImg8bit/{split}/<city>/*_leftImg8bit.png`` and ``gtFine/{split}/<city>/*_gtFine_labelTrainIds.png``
  (made by cityscapesscripts' ``createTrainIdLabelImgs``), 19 classes, 255 ignored.
- ``folder``: any ``images/`` + ``labels/`` pair with the same stems and a ``classes.txt`` (one name a line, the
  line number its id: a blank line between names is refused), labels already 0..C-1 / 255 (e.g. a prepared
  COCO-Stuff). Images are the files of ``images/`` with an image ending (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``,
  ``.tif``, ``.tiff``, ``.webp``); two of one stem (``x.png`` and ``x.jpg``) and an image without its
  ``labels/<stem>.png`` are refused.

Text files (``classes.txt``, image lists) are read as users save them (UTF-8 with or without a byte-order mark,
CRLF: :func:`seg4diff_fast._io.read_lines`); images and labels through
:func:`seg4diff_fast.segmentation.images.read_image` (EXIF orientation applied, as to every image the package reads).

Class names are the paper's ``datasets/*.json`` lists (tests compare them with copies kept as test data); a name
is prompted as the paper's code prompts it (:func:`paper_prompt_name`: the part before the first ``-``), so that
numbers compare.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np

from .._io import read_lines
from .images import FRAME_SUFFIXES as IMAGE_SUFFIXES
from .images import images_by_stem, read_image

__all__ = ["Sample", "SegDataset", "open_dataset", "paper_prompt_name", "VOC20_CLASSES", "VOC21_CLASSES",
           "ADE150_CLASSES", "CONTEXT59_CLASSES", "CITYSCAPES_CLASSES", "COCO_OBJECT_CLASSES", "COCO_STUFF27_CLASSES",
           "DATASETS"]

# Every list below is data copied from the paper's code (cvlab-kaist/Seg4Diff, datasets/<name>.json, commit bb500ca):
# voc20.json, voc21.json, ade150.json (its "bed " carries a trailing space, dropped here: the tokenizer drops it
# too), pc59.json, cityscapes.json, coco_object.json, coco_stuff_27.json.

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
    "sofa", "diningtable", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood"]

CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle"]

# voc21.json: background LAST (id 20), as the paper's prepared annotations_detectron2_bg maps it
VOC21_CLASSES = VOC20_CLASSES + ["background"]

COCO_OBJECT_CLASSES = [
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv",
    "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"]

COCO_STUFF27_CLASSES = [
    "electronic-things", "appliance-things", "food-things", "furniture-things", "indoor-things", "kitchen-things",
    "accessory-things", "animal-things", "outdoor-things", "person-things", "sports-things", "vehicle-things",
    "ceiling-stuff", "rawmaterial-stuff", "plant-stuff", "ground-stuff", "structural-stuff", "textile-stuff",
    "sky-stuff", "water-stuff", "solid-stuff", "building-stuff", "furniture-stuff", "mirror-stuff", "window-stuff",
    "wall-stuff", "food-stuff"]

assert len(ADE150_CLASSES) == 150 and len(CONTEXT59_CLASSES) == 59 and len(VOC20_CLASSES) == 20
assert len(COCO_OBJECT_CLASSES) == 81 and len(COCO_STUFF27_CLASSES) == 27


def paper_prompt_name(name: str) -> str:
    """The words the paper's code prompts for a class name: ``name.split("-")[0]`` (seg4diff_model_ovss.py), so
    ``"food-stuff"`` is prompted as ``"food"``; surrounding whitespace dropped (the tokenizer drops it too). No list
    of Table 1 has a ``-``; COCO-Stuff-27's names (Table 2, unsupervised: never prompted) do."""
    return name.split("-")[0].strip()


@dataclass(frozen=True)
class Sample:
    id: str
    image: str
    label: str


class SegDataset:
    """A list of samples, the class names and the label mapping. ``load_label(s)`` -> ``[H, W]`` int64.

    ``unscored``: class ids that are prompted when present in an image's ground truth but whose pixels are not
    scored (COCO-Object's background in the paper's open-vocabulary protocol: ignore label 0).
    ``prompt_names``: the words each class is prompted with (:func:`paper_prompt_name`)."""

    def __init__(self, name: str, samples: List[Sample], classes: List[str], mapping: Callable[[np.ndarray], np.ndarray],
                 unscored: Sequence[int] = ()):
        self.name, self.samples, self.classes, self._mapping = name, samples, list(classes), mapping
        self.unscored = tuple(int(c) for c in unscored)

    @property
    def prompt_names(self) -> List[str]:
        return [paper_prompt_name(c) for c in self.classes]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i) -> Sample:
        return self.samples[i]

    def load_label(self, sample: Sample) -> np.ndarray:
        # read as every image is (EXIF orientation applied, so that it keeps its image's size); palettes give indices
        raw = np.array(read_image(sample.label, "label"))
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


def _background_last(raw: np.ndarray) -> np.ndarray:
    """Raw VOC -> voc21.json ids: 0 (background) -> 20, k -> k - 1, 255 stays 255."""
    out = raw - 1
    out[raw == 0] = 20
    out[raw == 255] = 255
    return out


def _coco_object_from_stuff(raw: np.ndarray) -> np.ndarray:
    """COCO-Stuff train ids (detectron2's prepared maps: 0..79 things, 80..170 stuff, 255 unlabeled) -> COCO-Object
    ids: things 1..80, stuff 0 (background), 255 stays 255."""
    out = np.full_like(raw, 255)
    out[raw < 80] = raw[raw < 80] + 1
    out[(raw >= 80) & (raw <= 170)] = 0
    return out


def _coco_root(root: str) -> str:
    return os.path.join(root, "coco") if os.path.isdir(os.path.join(root, "coco")) else root


def _stem_samples(img_dir: str, ann_dir: str) -> List[Sample]:
    stems = sorted(os.path.splitext(f)[0] for f in os.listdir(ann_dir) if f.endswith(".png"))
    return [Sample(s, os.path.join(img_dir, s + ".jpg"), os.path.join(ann_dir, s + ".png")) for s in stems]


def _coco_object(root: str, split: str, background: bool) -> SegDataset:
    root = _coco_root(root)
    sub = {"val": "val2017", "train": "train2017"}.get(split, split)
    prepared = os.path.join(root, "annotations_object", sub)
    stuff = os.path.join(root, "annotations_detectron2", sub)
    if os.path.isdir(prepared):
        ann, mapping = prepared, _identity
    elif os.path.isdir(stuff):
        ann, mapping = stuff, _coco_object_from_stuff
    else:
        raise FileNotFoundError(f"COCO-Object layout (coco/{sub} with coco/annotations_object/{sub}, or COCO-Stuff's "
                                f"coco/annotations_detectron2/{sub}): neither {prepared} nor {stuff} found")
    samples = _stem_samples(os.path.join(root, sub), ann)
    if background:
        return SegDataset("coco_object_bg", samples, COCO_OBJECT_CLASSES, mapping)
    return SegDataset("coco_object", samples, COCO_OBJECT_CLASSES, mapping, unscored=(0,))


def _coco_stuff27(root: str, split: str) -> SegDataset:
    root = _coco_root(root)
    sub = {"val": "val2017", "train": "train2017"}.get(split, split)
    ann = os.path.join(root, "annotations_27_detectron2", sub)
    _need(ann, f"COCO-Stuff-27 layout (coco/{sub}, coco/annotations_27_detectron2/{sub} with ids 0..26, 255 ignored)")
    return SegDataset("coco_stuff27", _stem_samples(os.path.join(root, sub), ann), COCO_STUFF27_CLASSES, _identity)


def _need(path: str, what: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: {path} not found")


def _voc(root: str, split: str, background: bool) -> SegDataset:
    if os.path.isdir(os.path.join(root, "VOC2012")):
        root = os.path.join(root, "VOC2012")
    lst = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
    _need(lst, "Pascal VOC 2012 layout (JPEGImages, SegmentationClass, ImageSets/Segmentation)")
    ids = read_lines(lst, "VOC image list")
    # the paper's prepared labels (datasets/prepare_voc.py) when present: already in class ids, background 255
    # (voc20) or 20 (voc21); it skips images whose label is all 255, so those ids are skipped here too
    prepared = os.path.join(root, "annotations_detectron2_bg" if background else "annotations_detectron2", split)
    if os.path.isdir(prepared):
        samples = [Sample(i, os.path.join(root, "JPEGImages", i + ".jpg"), os.path.join(prepared, i + ".png"))
                   for i in ids if os.path.exists(os.path.join(prepared, i + ".png"))]
        mapping = _identity
    else:
        samples = [Sample(i, os.path.join(root, "JPEGImages", i + ".jpg"),
                          os.path.join(root, "SegmentationClass", i + ".png")) for i in ids]
        mapping = _background_last if background else _shift_down
    if background:
        return SegDataset("voc21", samples, VOC21_CLASSES, mapping)
    return SegDataset("voc20", samples, VOC20_CLASSES, mapping)


def _ade(root: str, split: str) -> SegDataset:
    if os.path.isdir(os.path.join(root, "ADEChallengeData2016")):
        root = os.path.join(root, "ADEChallengeData2016")
    sub = {"val": "validation", "train": "training"}.get(split, split)
    img_dir, ann_dir = os.path.join(root, "images", sub), os.path.join(root, "annotations", sub)
    _need(img_dir, "ADE20K layout (ADEChallengeData2016/images/..., annotations/...)")
    exts = images_by_stem(img_dir, (".jpg", ".jpeg", ".png"), "ADE20K images")
    stems = list(exts)
    prepared = os.path.join(root, "annotations_detectron2", sub)  # the paper's prepare_ade20k_150.py: 0..149, 255
    mapping = _shift_down
    if os.path.isdir(prepared):
        ann_dir, mapping = prepared, _identity
    samples = [Sample(s, os.path.join(img_dir, exts[s]), os.path.join(ann_dir, s + ".png")) for s in stems]
    return SegDataset("ade150", samples, ADE150_CLASSES, mapping)


def _context59(root: str, split: str) -> SegDataset:
    if os.path.isdir(os.path.join(root, "VOC2010")):
        root = os.path.join(root, "VOC2010")
    ann = os.path.join(root, "annotations_detectron2", f"pc59_{split}")
    _need(ann, "Pascal Context 59 prepared by detectron2 (JPEGImages, annotations_detectron2/pc59_val)")
    stems = sorted(os.path.splitext(f)[0] for f in os.listdir(ann) if f.endswith(".png"))
    samples = [Sample(s, os.path.join(root, "JPEGImages", s + ".jpg"), os.path.join(ann, s + ".png")) for s in stems]
    return SegDataset("context59", samples, CONTEXT59_CLASSES, _identity)


def _context59_bg(root: str, split: str) -> SegDataset:
    if os.path.isdir(os.path.join(root, "VOC2010")):
        root = os.path.join(root, "VOC2010")
    ann = os.path.join(root, "annotations_detectron2_bg", f"pc59_{split}")
    _need(ann, "Pascal Context 59 with background (JPEGImages, annotations_detectron2_bg/pc59_val: 0 background, "
               "1..59 classes)")
    return SegDataset("context59_bg", _stem_samples(os.path.join(root, "JPEGImages"), ann),
                      ["background"] + CONTEXT59_CLASSES, _identity)


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
    classes = read_lines(names, "classes.txt", ids=True)  # as users save it: a byte-order mark, CRLF
    img_dir, lab_dir = os.path.join(root, "images"), os.path.join(root, "labels")
    _need(img_dir, "generic layout (images/, labels/, classes.txt)")
    files = images_by_stem(img_dir, IMAGE_SUFFIXES, "folder dataset images")
    unlabelled = [files[s] for s in sorted(files) if not os.path.isfile(os.path.join(lab_dir, s + ".png"))]
    if unlabelled:  # never evaluated on fewer images than the folder holds, silently
        raise ValueError(f"folder dataset: {len(unlabelled)} image(s) of {img_dir!r} have no label "
                         f"labels/<name>.png: {', '.join(unlabelled[:3])}{', ...' if len(unlabelled) > 3 else ''}; "
                         "add their labels or move them out of images/")
    samples = [Sample(s, os.path.join(img_dir, files[s]), os.path.join(lab_dir, s + ".png")) for s in sorted(files)]
    return SegDataset(os.path.basename(os.path.normpath(root)), samples, classes, _identity)


DATASETS = {
    "voc20": lambda r, s: _voc(r, s, False),
    "voc21": lambda r, s: _voc(r, s, True),
    "ade150": _ade,
    "context59": _context59,
    "context59_bg": _context59_bg,
    "coco_object": lambda r, s: _coco_object(r, s, False),
    "coco_object_bg": lambda r, s: _coco_object(r, s, True),
    "coco_stuff27": _coco_stuff27,
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
    ds.split = split  # part of an evaluation's settings (evaluate.run_settings), as the root folder is
    ds.root = os.path.realpath(root)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be an integer >= 1 (or None for every sample), got {limit!r}")
        ds.samples = ds.samples[:limit]
    return ds
