"""Every reader of user files reads them as users save them (issue 19): text with a byte-order mark or CRLF
(--classes-file, the folder dataset's classes.txt, VOC image lists, MAGNET's classes and captions), images with an
EXIF orientation (segment, eval datasets with their labels, MAGNET training data, video frames), and two images of
one id refused, never one dropped silently."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from seg4diff_fast.magnet.data import MaskCaptionDataset
from seg4diff_fast.segmentation.datasets import open_dataset
from seg4diff_fast.segmentation.evaluate import evaluate
from seg4diff_fast.segmentation.images import load_frames, load_image
from test_metrics import make_voc

BOM = "\ufeff"


def _exif(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _sideways_jpeg(path, stored):
    """``stored`` ``[h, w, 3]`` uint8 saved as a JPEG whose EXIF says "rotate 90 degrees clockwise to view"
    (orientation 6, how phones store a portrait photo): viewed, it is ``[w, h]``. Returns the decoded stored
    pixels turned as a viewer turns them."""
    Image.fromarray(stored).save(path, quality=95, exif=_exif(6))
    with Image.open(path) as im:  # PIL does not turn by itself
        assert im.size == (stored.shape[1], stored.shape[0])
        return np.rot90(np.asarray(im.convert("RGB")), k=-1)  # 90 degrees clockwise


# -- text files -------------------------------------------------------------------------------------------------

def test_classes_file_with_a_byte_order_mark(tmp_path):
    from seg4diff_fast.segmentation.commands import _parse_classes

    path = tmp_path / "classes.txt"
    path.write_bytes((BOM + "cat\r\ntraffic light\r\n\r\n").encode())
    args = argparse.Namespace(classes_file=str(path), classes=None, no_heatmaps=True)
    assert _parse_classes(args) == ["cat", "traffic light"]


def test_folder_dataset_classes_and_voc_list_with_a_byte_order_mark(tmp_path):
    root = tmp_path / "data"
    os.makedirs(root / "images")
    os.makedirs(root / "labels")
    (root / "classes.txt").write_bytes((BOM + "cat\r\ndog\r\n").encode())
    Image.new("RGB", (4, 4)).save(root / "images" / "a.png")
    Image.new("L", (4, 4)).save(root / "labels" / "a.png")
    ds = open_dataset("folder", str(root))
    assert ds.classes == ["cat", "dog"] and ds.prompt_names == ["cat", "dog"]
    ids = make_voc(tmp_path / "voc", n=2)
    lst = tmp_path / "voc" / "ImageSets" / "Segmentation" / "val.txt"
    lst.write_bytes((BOM + "\r\n".join(ids) + "\r\n").encode())
    voc = open_dataset("voc20", str(tmp_path / "voc"))
    assert [s.id for s in voc.samples] == ids and all(os.path.exists(s.image) for s in voc.samples)


def test_magnet_classes_and_captions_with_a_byte_order_mark(tmp_path):
    os.makedirs(tmp_path / "images")
    os.makedirs(tmp_path / "masks")
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "masks" / "a.png")
    (tmp_path / "classes.txt").write_bytes((BOM + "cat\r\ndog\r\n").encode())
    (tmp_path / "captions.json").write_bytes((BOM + json.dumps({"a": "a cat. here."}) + "\r\n").encode())
    ds = MaskCaptionDataset(str(tmp_path), kind="coco", size=8, prompt="caption", hflip=0.0)
    assert ds.classes == ["cat", "dog"]
    s = ds[0]
    assert s["class_names"] == ["cat"] and s["prompt"] == "a cat. here." and s["spans"] == [[(2, 5)]]  # every occurrence per mask
    (tmp_path / "classes.json").write_bytes((BOM + json.dumps(["cat", "dog"])).encode("utf-8"))
    assert MaskCaptionDataset(str(tmp_path), kind="coco", size=8, hflip=0.0).classes == ["cat", "dog"]


def test_model_config_with_a_byte_order_mark(tmp_path):
    from seg4diff_fast.bench.e2e import CONFIG_DIR, load_model_config

    saved = (CONFIG_DIR / "sd3_medium.json").read_text(encoding="utf-8")
    (tmp_path / "mine.json").write_bytes((BOM + saved.replace("\n", "\r\n")).encode())
    assert load_model_config(str(tmp_path / "mine.json")) == json.loads(saved)


# -- EXIF orientation -------------------------------------------------------------------------------------------

def test_segment_reads_a_phone_photo_upright(tmp_path):
    from seg4diff_fast.segmentation.images import image_size

    stored = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    stored[:4] = 255  # a white band at the stored top: the right side once turned
    viewed = _sideways_jpeg(tmp_path / "phone.jpg", stored)
    px = load_image(str(tmp_path / "phone.jpg"))
    assert px.shape == (3, 20, 12) and image_size(str(tmp_path / "phone.jpg")) == (20, 12)
    torch.testing.assert_close(px, torch.from_numpy(viewed.astype(np.float32) / 255).permute(2, 0, 1))
    assert px[:, :, -4:].min() > 0.9  # the band on the right
    with Image.open(tmp_path / "phone.jpg") as im:  # a PIL image handed in as it was opened: turned the same
        torch.testing.assert_close(load_image(im), px)


def test_video_frames_are_read_upright(tmp_path):
    stored = np.random.default_rng(1).integers(0, 256, (8, 16, 3), dtype=np.uint8)
    os.makedirs(tmp_path / "frames")
    viewed = _sideways_jpeg(tmp_path / "frames" / "0001.jpg", stored)
    _sideways_jpeg(tmp_path / "frames" / "0002.jpg", stored)
    frames = load_frames(str(tmp_path / "frames"))
    assert frames.shape == (2, 3, 16, 8)
    torch.testing.assert_close(frames[0], torch.from_numpy(viewed.astype(np.float32) / 255).permute(2, 0, 1))
    # a still PNG read as a video of one frame (PIL's video reader), its EXIF says "mirrored"
    Image.fromarray(stored).save(tmp_path / "still.png", exif=_exif(2))
    one = load_frames(str(tmp_path / "still.png"))
    torch.testing.assert_close(one[0], torch.from_numpy(stored[:, ::-1].astype(np.float32) / 255).permute(2, 0, 1))


class UprightSegmenter:
    """Predicts class 0 on the left half and the last class on the right half of the image as load_image reads it
    (as the real Segmenter does)."""

    def __init__(self):
        self.calls = 0

    def segment(self, image, classes, noise_key=None):
        self.calls += 1
        h, w = load_image(image).shape[-2:]
        lab = np.zeros((h, w), np.int64)
        lab[:, w // 2:] = len(classes) - 1

        class R:
            labels = lab

        return R()


def test_eval_scores_a_phone_photo_against_its_upright_label(tmp_path):
    root = tmp_path / "data"
    os.makedirs(root / "images")
    os.makedirs(root / "labels")
    (root / "classes.txt").write_text("cat\ndog\n")
    _sideways_jpeg(root / "images" / "a.jpg", np.zeros((12, 20, 3), np.uint8))  # viewed: 20 high, 12 wide
    lab = np.zeros((20, 12), np.uint8)
    lab[:, 6:] = 1  # the label is drawn on the photo as it is viewed
    Image.fromarray(lab).save(root / "labels" / "a.png")
    ds = open_dataset("folder", str(root))
    assert ds.load_label(ds[0]).shape == (20, 12)
    seg = UprightSegmenter()
    s = evaluate(seg, ds, str(tmp_path / "out"), progress=False)
    assert s["counts"] == {"done": 1, "failed": 0, "skipped": 0} and s["mIoU"] == pytest.approx(100.0)


def test_magnet_training_image_and_mask_upright(tmp_path):
    os.makedirs(tmp_path / "images")
    os.makedirs(tmp_path / "masks")
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    stored = np.zeros((8, 16, 3), np.uint8)
    stored[:, 8:] = 255  # stored: white right half -> viewed (turned clockwise): white bottom half
    _sideways_jpeg(tmp_path / "images" / "a.jpg", stored)
    mask = np.zeros((16, 8), np.uint8)
    mask[8:] = 1  # drawn on the viewed photo: dog = the white bottom half
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    s = MaskCaptionDataset(str(tmp_path), kind="coco", transform="squash", size=8, hflip=0.0)[0]
    assert s["class_names"] == ["cat", "dog"]
    white = s["image"].mean(0) > 0
    assert white[5:].all() and not white[:3].any()  # image upright: bottom white
    assert s["masks"][1][4:].all() and not s["masks"][1][:4].any()  # its mask: the bottom half


# -- two images of one id ---------------------------------------------------------------------------------------

def test_two_images_of_one_id_are_refused(tmp_path):
    root = tmp_path / "data"
    os.makedirs(root / "images")
    os.makedirs(root / "labels")
    (root / "classes.txt").write_text("cat\n")
    for name in ("x.png", "x.jpg", "y.png"):
        Image.new("RGB", (4, 4)).save(root / "images" / name)
    for name in ("x.png", "y.png"):
        Image.new("L", (4, 4)).save(root / "labels" / name)
    (root / "images" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"x\.jpg.* and .*x\.png.* have the same name 'x'"):
        open_dataset("folder", str(root))
    os.unlink(root / "images" / "x.jpg")
    assert [s.id for s in open_dataset("folder", str(root)).samples] == ["x", "y"]  # notes.txt is no image
    ade = tmp_path / "ADEChallengeData2016"
    os.makedirs(ade / "images" / "validation")
    os.makedirs(ade / "annotations" / "validation")
    for name in ("a.jpg", "a.JPG"):
        Image.new("RGB", (4, 4)).save(ade / "images" / "validation" / name, format="JPEG")
    with pytest.raises(ValueError, match=r"a\.JPG.* and .*a\.jpg"):
        open_dataset("ade150", str(tmp_path))
    os.makedirs(tmp_path / "m" / "images")
    os.makedirs(tmp_path / "m" / "masks")
    Image.new("RGB", (4, 4)).save(tmp_path / "m" / "images" / "z.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "m" / "images" / "z.jpeg")
    with pytest.raises(ValueError, match=r"z\.jpeg.* and .*z\.png"):
        MaskCaptionDataset(str(tmp_path / "m"), kind="sa1b")


# -- class lists whose line numbers are ids, images without labels (hostile round, issue 19) --------------------

def _folder_data(root, classes="cat\ndog\nsky\n", labelled=("a", "b")):
    os.makedirs(root / "images")
    os.makedirs(root / "labels")
    (root / "classes.txt").write_text(classes)
    for stem in ("a", "b"):
        Image.new("RGB", (8, 8)).save(root / "images" / f"{stem}.png")
        if stem in labelled:
            Image.new("L", (8, 8)).save(root / "labels" / f"{stem}.png")
    return root


def test_an_image_without_its_label_is_refused_not_dropped(tmp_path):
    """It was left out of the evaluation silently: the mIoU of fewer images than the folder holds, exit 0."""
    root = _folder_data(tmp_path / "data", labelled=("a",))
    with pytest.raises(ValueError, match=r"1 image\(s\) of .* have no label labels/<name>\.png: b\.png"):
        open_dataset("folder", str(root))
    Image.new("L", (8, 8)).save(root / "labels" / "b.png")
    assert [s.id for s in open_dataset("folder", str(root)).samples] == ["a", "b"]


@pytest.mark.parametrize("reader", ["folder", "magnet"])
def test_a_blank_line_between_class_names_is_refused(tmp_path, reader):
    """The line number of a class name is its label value: a blank line dropped silently shifted every later class
    (label 2 read as the third line's name); blank lines after the last name (and CRLF) are fine, no name is refused."""
    root = _folder_data(tmp_path / "data")
    if reader == "magnet":
        os.rename(root / "labels", root / "masks")

    def classes():
        return (open_dataset("folder", str(root)).classes if reader == "folder"
                else MaskCaptionDataset(str(root), kind="coco").classes)

    (root / "classes.txt").write_bytes(b"cat\r\ndog\r\nsky\r\n\r\n\n")
    assert classes() == ["cat", "dog", "sky"]
    for text, message in (("cat\n\ndog\nsky\n", "line 2 .* is blank"), ("\ncat\ndog\n", "line 1 .* is blank"),
                          ("\n \n", "holds no names"), ("", "holds no names")):
        (root / "classes.txt").write_text(text)
        with pytest.raises(ValueError, match="classes.txt: .*" + message):
            classes()
