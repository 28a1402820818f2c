"""MAGNET folder datasets: coco (class-id PNGs) and sa1b (binary PNG folders / npz), prompts, token spans, errors."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from seg4diff_fast.magnet.data import MaskCaptionDataset, collate_masks, short_caption, token_groups


def _image(path, h, w, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _coco(root, captions=True):
    os.makedirs(root / "images")
    os.makedirs(root / "masks")
    (root / "classes.txt").write_text("cat\ngrass\nsky\ntree\n")
    lab = np.full((12, 16), 255, np.uint8)
    lab[:6] = 2  # sky
    lab[6:, :8] = 0  # cat
    lab[6:, 8:] = 1  # grass
    lab[6:8, 14:] = 255
    _image(root / "images" / "a.jpg", 12, 16, 0)
    Image.fromarray(lab).save(root / "masks" / "a.png")
    _image(root / "images" / "b.png", 12, 16, 1)
    Image.fromarray(np.full((12, 16), 255, np.uint8)).save(root / "masks" / "b.png")  # all ignored
    if captions:
        (root / "captions.json").write_text(json.dumps({
            "a": "A Cat sits on the grass. The sky is blue. It is noon.", "b": ["nothing here"]}))
    return root


def test_coco_sample(tmp_path):
    ds = MaskCaptionDataset(_coco(tmp_path), kind="coco", transform="squash", size=8, hflip=0.0)
    assert len(ds) == 2 and ds.ids == ["a", "b"]
    s = ds[0]
    assert s["image"].shape == (3, 8, 8) and s["image"].dtype == torch.float32
    assert -1 <= s["image"].min() and s["image"].max() <= 1
    assert s["masks"].dtype == torch.bool and s["masks"].shape == (3, 8, 8)
    assert s["class_ids"].tolist() == [0, 1, 2] and s["class_names"] == ["cat", "grass", "sky"]
    assert s["prompt"] == "cat grass sky"  # the paper's COCO prompt: names present, joined with spaces
    assert [s["prompt"][a:b] for a, b in s["spans"]] == ["cat", "grass", "sky"]
    # masks follow the label map resized nearest: top half sky, bottom-left cat
    assert s["masks"][2, :4].all() and not s["masks"][2, 4:].any() and s["masks"][0, 4:, :4].all()
    assert not (s["masks"][0] & s["masks"][1]).any()
    empty = ds[1]
    assert empty["masks"].shape == (0, 8, 8) and empty["prompt"] == "" and empty["spans"] == []


def test_coco_caption_prompt_and_spans(tmp_path):
    ds = MaskCaptionDataset(_coco(tmp_path), kind="coco", transform="squash", size=8, prompt="caption", hflip=0.0)
    s = ds[0]
    assert s["prompt"] == "A Cat sits on the grass. The sky is blue."  # two sentences (SHORT_CAPTION)
    # every occurrence of each name (segmentation.tokens.name_spans): a list of spans per mask
    assert [[s["prompt"][a:b] for a, b in sp] for sp in s["spans"]] == [["Cat"], ["grass"], ["sky"]]
    assert ds[1]["prompt"] == "nothing here"
    long = MaskCaptionDataset(tmp_path, kind="coco", transform="squash", size=8, prompt="caption", short_captions=False,
                              hflip=0.0)
    assert long[0]["prompt"].endswith("It is noon.")


def test_short_caption():
    assert short_caption("One. Two. Three.") == "One. Two."
    assert short_caption("Only one sentence") == "Only one sentence"


def _sa1b(root, npz_for_b=True):
    os.makedirs(root / "images")
    os.makedirs(root / "masks" / "a")
    _image(root / "images" / "a.jpg", 20, 20, 0)
    big = np.zeros((20, 20), np.uint8)
    big[:10] = 255
    small = np.zeros((20, 20), np.uint8)
    small[15:, 15:] = 1
    tiny = np.zeros((20, 20), np.uint8)
    tiny[0, 0] = 1  # 0.25 % of the image: below min_area
    Image.fromarray(small).save(root / "masks" / "a" / "0.png")
    Image.fromarray(big).save(root / "masks" / "a" / "1.png")
    Image.fromarray(tiny).save(root / "masks" / "a" / "2.png")
    _image(root / "images" / "b.jpg", 20, 20, 1)
    m = np.zeros((2, 20, 20), bool)
    m[0, :, :5] = True
    m[1, :, 5:] = True
    np.savez_compressed(root / "masks" / "b.npz", masks=m)
    (root / "captions.json").write_text(json.dumps({"a": "a photo. of things. more.", "b": "stuff"}))
    return root


def test_sa1b_sample_sorted_filtered_and_npz(tmp_path):
    ds = MaskCaptionDataset(_sa1b(tmp_path), kind="sa1b", transform="squash", size=10, hflip=0.0)
    s = ds[0]
    assert s["prompt"] == "a photo. of things." and s["class_names"] == [] and s["class_ids"].numel() == 0
    assert s["masks"].shape == (2, 10, 10)  # the tiny mask dropped
    assert s["masks"][0].sum() == 50 and s["masks"][1].sum() < 50  # largest first
    assert s["spans"] == [None, None]
    b = ds[1]
    assert b["masks"].shape == (2, 10, 10) and b["masks"].sum((1, 2)).tolist() == [80, 20]  # npz order reversed by area
    capped = MaskCaptionDataset(tmp_path, kind="sa1b", transform="squash", size=10, hflip=0.0, max_masks=1)
    assert capped[0]["masks"].shape[0] == 1 and capped[0]["masks"][0].sum() == 50


def test_hflip_flips_image_and_masks_together(tmp_path):
    _coco(tmp_path)
    plain = MaskCaptionDataset(tmp_path, kind="coco", transform="squash", size=8, hflip=0.0)[0]
    flipped = MaskCaptionDataset(tmp_path, kind="coco", transform="squash", size=8, hflip=1.0)[0]
    torch.testing.assert_close(flipped["image"], plain["image"].flip(-1))
    assert torch.equal(flipped["masks"], plain["masks"].flip(-1))


def test_collate_and_token_groups(tmp_path):
    from seg4diff_fast.segmentation.tiny import tiny_clip_tokenizer

    ds = MaskCaptionDataset(_coco(tmp_path), kind="coco", transform="squash", size=8, hflip=0.0)
    batch = collate_masks([ds[0], ds[1]])
    assert batch["images"].shape == (2, 3, 8, 8) and [m.shape[0] for m in batch["masks"]] == [3, 0]
    tok = tiny_clip_tokenizer()
    groups = token_groups(tok, batch["prompts"], batch["spans"], max_length=16)
    ids = tok(batch["prompts"][0], padding="max_length", max_length=16)["input_ids"]
    assert groups[1] == []
    assert [tok.decode([ids[c] for c in g]).strip() for g in groups[0]] == ["cat", "grass", "sky"]
    assert all(g and min(g) >= 1 for g in groups[0])  # position 0 is BOS
    # a None span (class not in the caption) gets no column
    assert token_groups(tok, ["cat sky"], [[(0, 3), None]], 16) == [[[1], []]]


def test_errors_name_the_file(tmp_path):
    _coco(tmp_path)
    os.remove(tmp_path / "masks" / "b.png")
    ds = MaskCaptionDataset(tmp_path, kind="coco", transform="squash", size=8)
    with pytest.raises(FileNotFoundError, match="b.png"):
        ds[1]
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "masks" / "b.png")
    with pytest.raises(ValueError, match=r"b\.png is 5x5, its image is 16x12"):
        ds[1]
    (tmp_path / "masks" / "b.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="b.png"):
        ds[1]
    Image.fromarray(np.full((12, 16), 9, np.uint8)).save(tmp_path / "masks" / "b.png")
    with pytest.raises(ValueError, match=r"class ids \[9\]"):
        ds[1]
    (tmp_path / "captions.json").write_text("{broken")
    with pytest.raises(ValueError, match="captions.json"):
        MaskCaptionDataset(tmp_path, kind="coco", prompt="caption")
    (tmp_path / "captions.json").write_text(json.dumps({"a": "x"}))
    with pytest.raises(ValueError, match="no caption for 1 images"):  # all images kept: b has no caption
        MaskCaptionDataset(tmp_path, kind="coco", prompt="caption", captioned_only=False)
    # the default (the paper's coco_2017_train_subset): only the images the captions file lists
    assert MaskCaptionDataset(tmp_path, kind="coco", prompt="caption").ids == ["a"]
    os.remove(tmp_path / "classes.txt")
    with pytest.raises(FileNotFoundError, match="classes.txt"):
        MaskCaptionDataset(tmp_path, kind="coco")


def test_sa1b_errors(tmp_path):
    _sa1b(tmp_path)
    np.savez(tmp_path / "masks" / "b.npz", other=np.zeros(3))
    ds = MaskCaptionDataset(tmp_path, kind="sa1b", transform="squash", size=10)
    with pytest.raises(ValueError, match="b.npz"):
        ds[1]
    os.remove(tmp_path / "masks" / "b.npz")
    with pytest.raises(FileNotFoundError, match="masks of image .*b.jpg"):
        ds[1]
    with pytest.raises(ValueError, match="sa1b layout has none"):
        MaskCaptionDataset(tmp_path, kind="sa1b", prompt="classes")


def _official_reference(image: np.ndarray, label: np.ndarray, u: float, flip: bool, short=1024, crop=1024, div=640):
    """The paper's mapper + model, re-stated step by step (detectron2 ResizeShortestEdge, FixedSizeCrop(pad=False),
    RandomFlip, F.pad to SIZE_DIVISIBILITY with negative amounts, x / 255, F.interpolate to 1024, 2 x - 1), float64
    where it computes."""
    import torch.nn.functional as F

    h, w = label.shape
    scale = short * 1.0 / min(h, w)
    newh, neww = (short, scale * w) if h < w else (scale * h, short)
    neww, newh = int(neww + 0.5), int(newh + 0.5)
    img = np.asarray(Image.fromarray(image).resize((neww, newh), Image.BILINEAR))
    # the mapper reads the label as float64 (astype("double")), so detectron2 resizes it with torch, not PIL
    lab = F.interpolate(torch.from_numpy(label.astype("double"))[None, None], (newh, neww), mode="nearest")[0, 0]
    lab = lab.numpy()
    off = np.round(np.maximum(np.subtract((newh, neww), (crop, crop)), 0) * u).astype(int)
    img, lab = img[off[0]:off[0] + crop, off[1]:off[1] + crop], lab[off[0]:off[0] + crop, off[1]:off[1] + crop]
    if flip:
        img, lab = img[:, ::-1], lab[:, ::-1]
    t = torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1)))
    pad = [0, div - t.shape[-1], 0, div - t.shape[-2]]
    t = F.pad(t, pad, value=128)
    lab = F.pad(torch.as_tensor(lab.copy()).long(), pad, value=255)  # astype("long") then F.pad
    x = F.interpolate(t[None].double() / 255.0, size=(1024, 1024), mode="bilinear", align_corners=False)[0]
    return 2 * x - 1, lab


@pytest.mark.parametrize("hw,seed", [((700, 1100), 123), ((1300, 800), 5)])
def test_official_transform_matches_the_papers_mapper(tmp_path, hw, seed):
    """The default image geometry is the paper's executed one: shortest edge 1024, random 1024 crop, flip, the
    top-left 640 x 640 (negative padding), squashed to 1024; masks stay at 640. Compared with a float64
    re-statement on the same random draws."""
    h, w = hw
    os.makedirs(tmp_path / "images")
    os.makedirs(tmp_path / "masks")
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = np.full((h, w), 255, np.uint8)
    label[: h // 3] = 0
    label[h // 3:, : w // 2] = 1
    label[-h // 5:, -w // 5:] = 2  # bottom-right: cut away by the top-left 640 crop
    Image.fromarray(image).save(tmp_path / "images" / "x.png")
    Image.fromarray(label).save(tmp_path / "masks" / "x.png")
    ds = MaskCaptionDataset(tmp_path, kind="coco", size=1024, hflip=0.5)
    torch.manual_seed(seed)
    s = ds[0]
    torch.manual_seed(seed)
    u, f = float(torch.rand(())), float(torch.rand(()))
    ref_img, ref_lab = _official_reference(image, label, u, f < 0.5)
    assert s["image"].shape == (3, 1024, 1024) and s["masks"].shape[1:] == (640, 640)
    assert torch.allclose(s["image"].double(), ref_img, atol=1e-5)
    ids = [int(c) for c in torch.unique(ref_lab) if c != 255]
    assert s["class_ids"].tolist() == ids and 2 not in ids  # classes present after the crop only
    assert torch.equal(s["masks"], torch.stack([ref_lab == c for c in ids]))
    squash = MaskCaptionDataset(tmp_path, kind="coco", size=64, hflip=0.0, transform="squash")[0]
    assert squash["masks"].shape == (3, 64, 64)  # the paper's text: the whole image, every class
