"""The paper's other datasets (ADE20K-847, Pascal Context 459, VOC20b) read from folders laid out as its
datasets/prepare_*.py scripts write them, and the two places where its evaluation reads a resized label: the classes
prompted under ``gt`` and the unsupervised scoring's top-left crop (issue 20)."""
import os
import sys

import numpy as np
import pytest
from PIL import Image

from seg4diff_fast.segmentation import datasets as D
from seg4diff_fast.segmentation.evaluate import (evaluate, evaluate_unsupervised, fit_prediction, gt_classes,
                                                 run_settings)
from seg4diff_fast.segmentation.images import paper_resize_shape
from seg4diff_fast.segmentation.metrics import hungarian_counts

sys.path.insert(0, os.path.dirname(__file__))
from test_paper_protocol import RuleSegmenter  # noqa: E402  (left half: the first prompted class, right: the last)


def _img(path, h, w, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _tif16(path, arr):
    """A 16-bit TIFF label, as prepare_ade20k_full.py and prepare_pascal_context_459.py save them."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint16)).save(path, "TIFF")


def _png(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)


# ---------------------------------------------------------------- readers
def _ade847(tmp_path, row):
    root = tmp_path / "ADE20K_2021_17_01"
    _img(str(root / "images_detectron2" / "validation" / "ADE_val_00000001.jpg"), 2, len(row))
    _tif16(str(root / "annotations_detectron2" / "validation" / "ADE_val_00000001.tif"), [row] * 2)
    return root


def test_ade847_reader(tmp_path):
    _ade847(tmp_path, [0, 255, 256, 846, 65535, 7])
    ds = D.open_dataset("ade847", str(tmp_path))
    assert ds.classes == D.ADE847_CLASSES and len(ds) == 1 and ds[0].id == "ADE_val_00000001"
    assert ds.ignore_index == 65535 and ds.unscored == ()
    # 16-bit ids read whole: 255 and 846 are classes, 65535 the unlabelled value of the official registration
    assert ds.load_label(ds[0])[0].tolist() == [0, 255, 256, 846, 65535, 7]
    assert D.open_dataset("ade847", str(tmp_path / "ADE20K_2021_17_01")).samples == ds.samples
    with pytest.raises(FileNotFoundError, match="prepare_ade20k_full"):
        D.open_dataset("ade847", str(tmp_path), split="train")


def test_context459_reader(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2010"
    _img(str(voc / "JPEGImages" / "2008_000002.jpg"), 2, 4)
    _tif16(str(voc / "annotations_detectron2" / "pc459_val" / "2008_000002.tif"), [[0, 458, 459, 255]] * 2)
    _png(str(voc / "annotations_detectron2" / "pc59_val" / "2008_000002.png"), [[0, 1, 2, 255]] * 2)  # not read
    ds = D.open_dataset("context459", str(tmp_path / "VOCdevkit"))
    assert ds.classes == D.CONTEXT459_CLASSES and [s.id for s in ds.samples] == ["2008_000002"]
    assert ds.ignore_index == 459 and ds.samples[0].label.endswith(".tif")
    assert ds.load_label(ds[0])[0].tolist() == [0, 458, 459, 255]
    with pytest.raises(FileNotFoundError, match="prepare_pascal_context_459"):
        D.open_dataset("context459", str(tmp_path))


def _voc(tmp_path, rows, prepared=True):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    _img(str(voc / "JPEGImages" / "2007_000001.jpg"), 2, len(rows[0]))
    os.makedirs(voc / "ImageSets" / "Segmentation", exist_ok=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000001\n")
    if prepared:  # prepare_voc.py's annotations_detectron2_bg: 0..19 classes, 20 background, 255 borders
        _png(str(voc / "annotations_detectron2_bg" / "val" / "2007_000001.png"), rows)
    else:  # the raw VOC label: 0 background, 1..20 classes
        _png(str(voc / "SegmentationClass" / "2007_000001.png"), rows)
    return tmp_path / "VOCdevkit"


def test_voc20b_reader(tmp_path):
    root = _voc(tmp_path, [[20, 7, 0, 255]] * 2)
    ds = D.open_dataset("voc20b", str(root))
    assert ds.classes == D.VOC21_CLASSES and ds.prompt_classes == D.VOC20B_CLASSES and ds.ignore_index == 255
    assert ds.load_label(ds[0])[0].tolist() == [20, 7, 0, 255]
    assert ds.prompt_class_ids == list(range(20)) + [20] * 39
    # background is prompted as the 39 background names, each scoring as background (class 20)
    names, ids = ds.prompt_for([7, 20])
    assert names == ["cat"] + D.VOC20B_CLASSES[20:] and ids == [7] + [20] * 39
    raw = _voc(tmp_path / "raw", [[0, 8, 1, 255]] * 2, prepared=False)
    assert D.open_dataset("voc20b", str(raw)).load_label(D.open_dataset("voc20b", str(raw))[0])[0].tolist() == \
        [20, 7, 0, 255]


def test_ignore_value_is_never_a_class(tmp_path):
    with pytest.raises(ValueError, match="ignore_index 255 is a class id"):
        D.SegDataset("x", [], [f"c{k}" for k in range(300)], lambda raw: raw)
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(f"c{k}" for k in range(256)))  # class 255 would be ignored: refused
    with pytest.raises(ValueError, match=r"classes\.txt names 256 classes.*0\.\.254"):
        D.open_dataset("folder", str(root))
    (root / "classes.txt").write_text("\n".join(f"c{k}" for k in range(255)))  # ids 0..254, 255 ignored
    assert len(D.open_dataset("folder", str(root)).classes) == 255


def test_prompt_words_keep_classes_apart():
    # the paper's split("-")[0] would prompt "post-it" as "post" beside the class "post": prompted whole
    words = D.prompt_words(D.ADE847_CLASSES)
    assert words[D.ADE847_CLASSES.index("post-it")] == "post-it" and words[D.ADE847_CLASSES.index("post")] == "post"
    assert words[D.ADE847_CLASSES.index("jersey, t-shirt, tee shirt")] == "jersey, t"  # the paper's words otherwise
    pc = D.prompt_words(D.CONTEXT459_CLASSES)
    assert pc[D.CONTEXT459_CLASSES.index("horse-drawncarriage")] == "horse-drawncarriage"
    assert pc[D.CONTEXT459_CLASSES.index("hot-airballoon")] == "hot"
    assert len(set(words)) == 847 and len(set(pc)) == 459
    # lists without such a pair are prompted as before (COCO-Stuff-27's collisions stay refused)
    for name in ("VOC20_CLASSES", "ADE150_CLASSES", "CONTEXT59_CLASSES", "COCO_OBJECT_CLASSES", "COCO_STUFF27_CLASSES"):
        assert D.prompt_words(getattr(D, name)) == [D.paper_prompt_name(c) for c in getattr(D, name)]


# ---------------------------------------------------------------- evaluation of the new readers
def test_ade847_eval_scores_class_255_and_ignores_65535(tmp_path):
    _ade847(tmp_path, [0, 0, 255, 846, 65535, 846])
    ds = D.open_dataset("ade847", str(tmp_path))
    with pytest.raises(ValueError, match="save_predictions"):  # a palette PNG holds ids 0..254: refused before work
        evaluate(RuleSegmenter(), ds, str(tmp_path / "refused"), progress=False)
    seg = RuleSegmenter()
    s = evaluate(seg, ds, str(tmp_path / "out"), progress=False, save_predictions=False)
    assert seg.prompts == [["wall", D.ADE847_CLASSES[255], D.ADE847_CLASSES[846]]]
    cm = np.array(s["confusion"])
    # left half (3 columns) -> wall, right half -> class 846; the 65535 pixels (2) are not counted
    assert cm.sum() == 10 and cm[0, 0] == 4 and cm[255, 0] == 2 and cm[846, 846] == 4
    assert s["IoU"][D.ADE847_CLASSES[255]] == 0.0


def test_context459_eval_ignores_459(tmp_path):
    voc = tmp_path / "VOC2010"
    _img(str(voc / "JPEGImages" / "a.jpg"), 2, 4)
    _tif16(str(voc / "annotations_detectron2" / "pc459_val" / "a.tif"), [[300, 459, 458, 458]] * 2)
    ds = D.open_dataset("context459", str(tmp_path))
    seg = RuleSegmenter()
    s = evaluate(seg, ds, str(tmp_path / "out"), progress=False, save_predictions=False)
    assert seg.prompts == [[D.CONTEXT459_CLASSES[300], "wool"]]
    cm = np.array(s["confusion"])
    assert cm.sum() == 6 and cm[300, 300] == 2 and cm[458, 458] == 4 and s["mIoU"] == pytest.approx(100.0)


def test_voc20b_eval_folds_background_names(tmp_path):
    root = _voc(tmp_path, [[7, 7, 20, 20]] * 2)
    ds = D.open_dataset("voc20b", str(root))
    seg = RuleSegmenter()
    s = evaluate(seg, ds, str(tmp_path / "gt"), progress=False)
    # gt: cat and the 39 background names; the right half predicted as "wood" (the last name) scores as background
    assert seg.prompts == [["cat"] + D.VOC20B_CLASSES[20:]]
    cm = np.array(s["confusion"])
    assert cm.shape == (21, 21) and cm[7, 7] == 4 and cm[20, 20] == 4 and s["mIoU"] == pytest.approx(100.0)
    full = RuleSegmenter()
    s = evaluate(full, ds, str(tmp_path / "full"), protocol="full", progress=False)
    assert full.prompts == [D.VOC20B_CLASSES]  # every name, VOC's first
    cm = np.array(s["confusion"])
    assert cm[7, 0] == 4 and cm[20, 20] == 4  # left half: aeroplane (class 0), right: wood -> background
    assert run_settings(full, ds, "full")["prompt_classes"] == D.VOC20B_CLASSES


# ---------------------------------------------------------------- gt classes from the resized label
def test_gt_classes_come_from_the_paper_resized_label():
    # 1024x2048 (Cityscapes) -> 640x1280: PIL's nearest neighbour samples source rows / columns 0, 2, 4, 5, 7, ...
    lab = np.zeros((1024, 2048), np.int64)
    lab[1, 1] = 3  # row 1 and column 1 are never sampled: the class vanishes
    lab[2, 2] = 5  # sampled: kept
    lab[1000:, :] = 255
    small = np.asarray(Image.fromarray(lab.astype(np.uint8)).resize((1280, 640), Image.NEAREST))
    assert 3 not in small and 5 in small  # detectron2's resize (PIL, nearest) of the label
    assert gt_classes(lab) == [0, 5]
    # an image that the resize enlarges keeps every class, however small
    tiny = np.zeros((10, 14), np.int64)
    tiny[1, 1] = 3
    assert gt_classes(tiny) == [0, 3]
    # ids above 255 (ADE-847) resize the same way
    wide = lab.copy()
    wide[2, 2], wide[1, 1], wide[1000:] = 846, 700, 65535
    assert gt_classes(wide, 65535) == [0, 846]


def test_gt_protocol_does_not_prompt_a_class_the_resize_removes(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("road\nsign\ncar\n")
    Image.new("RGB", (2048, 1024)).save(root / "images" / "a.png")
    lab = np.zeros((1024, 2048), np.uint8)
    lab[1, 1] = 1  # one pixel of "sign", gone at 640x1280
    lab[:, 1024:] = 2
    _png(str(root / "labels" / "a.png"), lab)
    seg = RuleSegmenter()
    s = evaluate(seg, D.open_dataset("folder", str(root)), str(tmp_path / "out"), progress=False)
    assert seg.prompts == [["road", "car"]]
    cm = np.array(s["confusion"])
    assert cm[1].tolist() == [1, 0, 0]  # its pixel is still scored (as road: it was not prompted)
    assert cm[0, 0] == 1024 * 1024 - 1 and cm[2, 2] == 1024 * 1024


# ---------------------------------------------------------------- unsupervised: the official top-left crop
def test_fit_prediction():
    pred = np.arange(6 * 8).reshape(6, 8)
    np.testing.assert_array_equal(fit_prediction(pred, (3, 4), "top-left-crop"), pred[:3, :4])
    np.testing.assert_array_equal(fit_prediction(pred, (3, 4)), pred[1::2, 1::2])  # nearest: rows 1, 3, 5
    up = np.array([[0, 1], [2, 3]])
    np.testing.assert_array_equal(fit_prediction(up, (4, 4), "top-left-crop"), fit_prediction(up, (4, 4)))
    with pytest.raises(ValueError, match="pred_fit"):
        fit_prediction(pred, (3, 4), "crop")


class HalvesUnsupervised:
    """Segment 0 on the left half of the image, 1 on the right half."""

    def segment_unsupervised(self, image, kl_threshold=0.1, noise_key=None):
        with Image.open(image) as im:
            w, h = im.size
        lab = np.zeros((h, w), np.int64)
        lab[:, w // 2:] = 1

        class R:
            labels = lab

        return R()


def test_cityscapes_top_left_crop_scoring_differs_from_aligned(tmp_path):
    city = tmp_path / "leftImg8bit" / "val" / "aachen"
    city.mkdir(parents=True)
    Image.new("RGB", (2048, 1024)).save(city / "aachen_000000_000019_leftImg8bit.png")
    lab = np.zeros((1024, 2048), np.uint8)
    lab[:, 1024:] = 13  # road on the left, car on the right: what the prediction says
    _png(str(tmp_path / "gtFine" / "val" / "aachen" / "aachen_000000_000019_gtFine_labelTrainIds.png"), lab)
    ds = D.open_dataset("cityscapes", str(tmp_path))
    aligned = evaluate_unsupervised(HalvesUnsupervised(), ds, str(tmp_path / "aligned"), progress=False)
    assert aligned["pred_fit"] == "resize" and aligned["mIoU"] == pytest.approx(100.0)
    crop = evaluate_unsupervised(HalvesUnsupervised(), ds, str(tmp_path / "crop"), pred_fit="top-left-crop",
                                 progress=False)
    # the top-left 640x1280 of the 1024x2048 prediction: columns 0..1023 segment 0, 1024..1279 segment 1, against
    # the label resized whole to 640x1280 (columns 0..639 road, 640..1279 car); each row matches segment 0 to road
    # and 1 to car: road IoU 640 / (640 + 384), car 256 / (256 + 384)
    assert paper_resize_shape(1024, 2048) == (640, 1280)
    assert crop["tp"][0] == 640 * 640 and crop["fp"][0] == 384 * 640 and crop["tp"][13] == 256 * 640
    assert crop["fn"][13] == 384 * 640 and crop["mIoU"] == pytest.approx(100 * (640 / 1024 + 256 / 640) / 2)
    gt = np.zeros((640, 1280), np.int64)
    gt[:, 640:] = 13
    pred = np.zeros((640, 1280), np.int64)
    pred[:, 1024:] = 1
    tp, fp, fn, _ = hungarian_counts(pred, gt, 19, match="row")
    assert crop["tp"] == tp.tolist() and crop["fp"] == fp.tolist() and crop["fn"] == fn.tolist()
    with pytest.raises(ValueError, match="eval_size"):
        evaluate_unsupervised(HalvesUnsupervised(), ds, str(tmp_path / "x"), pred_fit="top-left-crop",
                              eval_size="input", progress=False)
