"""Metrics against hand-computed confusion matrices; dataset readers on folders made here; resumable evaluation."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from seg4diff_fast.segmentation.datasets import VOC20_CLASSES, open_dataset
from seg4diff_fast.segmentation.evaluate import evaluate
from seg4diff_fast.segmentation.metrics import confusion_matrix, scores_from_confusion
from seg4diff_fast.segmentation.visualize import label_image


def test_confusion_by_hand():
    gt = np.array([[0, 0, 1, 1],
                   [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1],
                     [2, 0, 0, 2]])
    cm = confusion_matrix(pred, gt, 3)
    # rows = ground truth, columns = prediction; the 255 pixel is not counted
    expected = np.array([[1, 1, 0],
                         [0, 2, 1],
                         [1, 0, 1]])
    np.testing.assert_array_equal(cm, expected)
    s = scores_from_confusion(cm, ["a", "b", "c"])
    # IoU a = 1 / (2 + 2 - 1) = 1/3; b = 2 / (3 + 3 - 2) = 1/2; c = 1 / (2 + 2 - 1) = 1/3
    assert s["IoU"]["a"] == pytest.approx(100 / 3)
    assert s["IoU"]["b"] == pytest.approx(50)
    assert s["IoU"]["c"] == pytest.approx(100 / 3)
    assert s["mIoU"] == pytest.approx((100 / 3 + 50 + 100 / 3) / 3)
    assert s["pixel_accuracy"] == pytest.approx(400 / 7)
    assert s["num_pixels"] == 7


def test_absent_class_left_out_of_miou():
    cm = confusion_matrix(np.array([0, 0, 1]), np.array([0, 0, 1]), 3)
    s = scores_from_confusion(cm)
    assert s["IoU"]["2"] is None and s["mIoU"] == pytest.approx(100) and s["num_classes_scored"] == 2


def test_confusion_rejects_bad_labels():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.array([0]), np.array([7]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 3)


def make_voc(root, n=4, h=12, w=16):
    """A VOC 2012 layout: JPEGImages, SegmentationClass (palette PNGs, 0 background, 255 border), val.txt."""
    rng = np.random.default_rng(0)
    os.makedirs(root / "JPEGImages")
    os.makedirs(root / "SegmentationClass")
    os.makedirs(root / "ImageSets" / "Segmentation")
    ids = [f"2007_{i:06d}" for i in range(n)]
    for k, i in enumerate(ids):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        lab = np.zeros((h, w), np.uint8)
        lab[:, : w // 2] = 8  # cat (VOC id 8)
        lab[: h // 2, w // 2:] = 12 + k % 2  # dog or horse
        lab[0, :] = 255  # border
        label_image(lab).save(root / "SegmentationClass" / f"{i}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    return ids


class FakeSegmenter:
    """Predicts by rule: left half -> the first prompt class, right half -> the last; counts calls."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after, self.prompts = 0, fail_after, []

    def segment(self, image, classes, noise_key=None):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        self.calls += 1
        self.prompts.append(list(classes))
        with Image.open(image) as im:
            w, h = im.size
        lab = np.zeros((h, w), np.int64)
        lab[:, w // 2:] = len(classes) - 1

        class R:
            labels = lab

        return R()


def test_voc_reader(tmp_path):
    ids = make_voc(tmp_path / "VOC2012")
    ds = open_dataset("voc20", str(tmp_path))
    assert [s.id for s in ds.samples] == ids and ds.classes == VOC20_CLASSES
    lab = ds.load_label(ds[0])
    assert lab[0, 0] == 255 and lab[5, 0] == VOC20_CLASSES.index("cat") and lab[-1, -1] == 255  # background ignored
    ds21 = open_dataset("voc21", str(tmp_path))
    # the paper's voc21.json: background last (id 20), the 20 classes 0..19 as in voc20
    assert ds21.classes[20] == "background" and ds21.classes[:20] == VOC20_CLASSES
    lab21 = ds21.load_label(ds21[0])
    assert lab21[-1, -1] == 20 and lab21[5, 0] == VOC20_CLASSES.index("cat") and lab21[0, 0] == 255


def test_ade_reader(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    (root / "images" / "validation").mkdir(parents=True)
    (root / "annotations" / "validation").mkdir(parents=True)
    Image.new("RGB", (8, 6)).save(root / "images" / "validation" / "ADE_val_00000001.jpg")
    Image.fromarray(np.array([[0, 1, 150]] * 2, np.uint8)).save(root / "annotations" / "validation" / "ADE_val_00000001.png")
    ds = open_dataset("ade150", str(tmp_path))
    assert len(ds) == 1 and len(ds.classes) == 150
    np.testing.assert_array_equal(ds.load_label(ds[0])[0], [255, 0, 149])


def _expected_cm(ds, protocol):
    C = len(ds.classes)
    total = np.zeros((C, C), np.int64)
    for s in ds.samples:
        gt = ds.load_label(s)
        present = [int(c) for c in np.unique(gt) if c != 255] if protocol == "gt" else list(range(C))
        pred = np.zeros_like(gt)
        pred[:, :] = present[0]
        pred[:, gt.shape[1] // 2:] = present[-1]
        total += confusion_matrix(pred, gt, C)
    return total


@pytest.mark.parametrize("protocol", ["gt", "full"])
def test_evaluate_and_resume(tmp_path, protocol):
    make_voc(tmp_path / "voc", n=5)
    ds = open_dataset("voc20", str(tmp_path / "voc"))
    out = tmp_path / "out"
    crashing = FakeSegmenter(fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        evaluate(crashing, ds, str(out), protocol=protocol, progress=False)
    done = sorted(os.listdir(out / "per_image"))
    assert len(done) == 2 and all(f.endswith(".npz") for f in done)  # no half-written or temp files left
    again = FakeSegmenter()
    summary = evaluate(again, ds, str(out), protocol=protocol, progress=False)
    assert again.calls == 3  # only what was missing
    np.testing.assert_array_equal(np.array(summary["confusion"]), _expected_cm(ds, protocol))
    assert summary["num_images"] == 5 and summary["counts"] == {"done": 5, "failed": 0, "skipped": 0}
    if protocol == "gt":
        assert all(set(p) <= {"cat", "dog", "horse"} for p in again.prompts)
    else:
        assert all(p == VOC20_CLASSES for p in again.prompts)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["mIoU"] == pytest.approx(summary["mIoU"])
    pred = np.array(Image.open(out / "pred" / f"{ds[0].id}.png"))
    assert pred.shape == (12, 16)
    third = FakeSegmenter()
    evaluate(third, ds, str(out), protocol=protocol, progress=False)
    assert third.calls == 0  # nothing computed twice


DIST_SCRIPT = r"""
import sys, json, numpy as np
sys.path.insert(0, sys.argv[3])
from test_metrics import FakeSegmenter
from seg4diff_fast.segmentation.datasets import open_dataset
from seg4diff_fast.segmentation.evaluate import evaluate
ds = open_dataset("voc20", sys.argv[1])
seg = FakeSegmenter()
summary = evaluate(seg, ds, sys.argv[2], protocol="gt", progress=False)
print(json.dumps({"calls": seg.calls, "summary": None if summary is None else summary["num_images"]}))
"""


def test_evaluate_two_processes(tmp_path):
    """Two processes as `accelerate launch` starts them (gloo on CPU): each takes its share, rank 0 merges."""
    import socket
    import subprocess
    import sys

    make_voc(tmp_path / "voc", n=5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="1")
        procs.append(subprocess.Popen([sys.executable, "-c", DIST_SCRIPT, str(tmp_path / "voc"), str(tmp_path / "out"),
                                       os.path.dirname(__file__)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        o, e = p.communicate(timeout=120)
        assert p.returncode == 0, e[-2000:]
        outs.append(json.loads(o.strip().splitlines()[-1]))
    assert [o["calls"] for o in outs] == [3, 2]
    assert outs[0]["summary"] == 5 and outs[1]["summary"] is None
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["num_images"] == 5
