"""The paper's protocol, each difference from its code checked against a golden value.

Golden values come from the paper's code read by hand (cvlab-kaist/Seg4Diff): its class lists (copies in
tests/data/paper_classes), its Flux schedule (sigma at timesteps[-8] from the shift formula with 16 tokens), its
detectron2 resize, its unsupervised merging (transcribed line by line in numpy below) and its Hungarian matching
(hand-computed tables).
"""
import argparse
import hashlib
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from seg4diff_fast.segmentation import commands
from seg4diff_fast.segmentation import datasets as D
from seg4diff_fast.segmentation.evaluate import evaluate, evaluate_unsupervised
from seg4diff_fast.segmentation.images import paper_resize_shape
from seg4diff_fast.segmentation.metrics import confusion_matrix, hungarian_counts, scores_from_confusion
from seg4diff_fast.segmentation.protocol import PROTOCOLS, image_seed, protocol_for
from seg4diff_fast.segmentation.segmenter import Segmenter, load_pipeline, merge_maps, unsupervised_maps
from seg4diff_fast.segmentation.tiny import tiny_pipeline
from seg4diff_fast.segmentation.visualize import label_image

PAPER = os.path.join(os.path.dirname(__file__), "data", "paper_classes")


def paper_list(name):
    with open(os.path.join(PAPER, name + ".json")) as f:
        return json.load(f)


# ---------------------------------------------------------------- class lists
@pytest.mark.parametrize("ours,json_name", [
    ("VOC20_CLASSES", "voc20"), ("VOC21_CLASSES", "voc21"), ("CONTEXT59_CLASSES", "pc59"),
    ("ADE150_CLASSES", "ade150"), ("CITYSCAPES_CLASSES", "cityscapes"), ("COCO_OBJECT_CLASSES", "coco_object"),
    ("COCO_STUFF27_CLASSES", "coco_stuff_27"), ("ADE847_CLASSES", "ade847"), ("CONTEXT459_CLASSES", "pc459"),
    ("VOC20B_CLASSES", "voc20b")])
def test_class_lists_equal_the_papers(ours, json_name):
    # equal up to surrounding whitespace: ade150.json's "bed " (a trailing space the tokenizer drops)
    assert getattr(D, ours) == [n.strip() for n in paper_list(json_name)]


def test_pc59_class_49_and_prompt_words():
    assert D.CONTEXT59_CLASSES[49] == "diningtable"
    # the paper's code prompts name.split("-")[0]
    assert D.paper_prompt_name("electronic-things") == "electronic" and D.paper_prompt_name("bed ") == "bed"
    assert D.paper_prompt_name("traffic light") == "traffic light"


# ---------------------------------------------------------------- readers on folders made here
def _img(path, h, w, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _lab(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)


def test_coco_object_readers(tmp_path):
    coco = tmp_path / "coco"
    _img(str(coco / "val2017" / "000000000001.jpg"), 4, 6)
    raw = np.array([[0, 1, 80, 0, 255, 7]] * 4)  # prepared: 0 background, 1..80 objects, 255 ignored
    _lab(str(coco / "annotations_object" / "val2017" / "000000000001.png"), raw)
    ds = D.open_dataset("coco_object", str(tmp_path))
    assert ds.classes == D.COCO_OBJECT_CLASSES and ds.unscored == (0,) and len(ds) == 1
    np.testing.assert_array_equal(ds.load_label(ds[0]), raw)
    bg = D.open_dataset("coco_object_bg", str(coco))
    assert bg.unscored == () and bg.classes[0] == "background"
    # derived from COCO-Stuff's detectron2 maps: things 0..79 -> 1..80, stuff 80..170 -> 0, 255 stays
    (coco / "annotations_object" / "val2017" / "000000000001.png").unlink()
    (coco / "annotations_object" / "val2017").rmdir()
    _lab(str(coco / "annotations_detectron2" / "val2017" / "000000000001.png"), [[0, 79, 80, 170, 255, 5]])
    ds = D.open_dataset("coco_object", str(coco))
    np.testing.assert_array_equal(ds.load_label(ds[0]), [[1, 80, 0, 0, 255, 6]])


def test_coco_stuff27_context59_bg_and_prepared_voc_ade(tmp_path):
    coco = tmp_path / "coco"
    _img(str(coco / "val2017" / "a.jpg"), 3, 3)
    _lab(str(coco / "annotations_27_detectron2" / "val2017" / "a.png"), [[0, 26, 255]] * 3)
    ds = D.open_dataset("coco_stuff27", str(tmp_path))
    assert ds.classes == D.COCO_STUFF27_CLASSES and ds.load_label(ds[0])[0].tolist() == [0, 26, 255]
    assert ds.prompt_names[2] == "food" and ds.prompt_names[26] == "food"

    voc10 = tmp_path / "VOCdevkit" / "VOC2010"
    _img(str(voc10 / "JPEGImages" / "2008_000002.jpg"), 3, 3)
    _lab(str(voc10 / "annotations_detectron2_bg" / "pc59_val" / "2008_000002.png"), [[0, 59, 255]] * 3)
    ds = D.open_dataset("context59_bg", str(tmp_path / "VOCdevkit"))
    assert ds.classes == ["background"] + D.CONTEXT59_CLASSES and ds.load_label(ds[0])[0].tolist() == [0, 59, 255]

    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for i in ("2007_000001", "2007_000002"):
        _img(str(voc / "JPEGImages" / f"{i}.jpg"), 3, 3)
    os.makedirs(voc / "ImageSets" / "Segmentation")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000001\n2007_000002\n")
    # prepare_voc.py: voc20 background 255; voc21 background 20; all-255 images are not written (skipped here)
    _lab(str(voc / "annotations_detectron2" / "val" / "2007_000001.png"), [[255, 7, 0]] * 3)
    _lab(str(voc / "annotations_detectron2_bg" / "val" / "2007_000001.png"), [[20, 7, 0]] * 3)
    for name, row in [("voc20", [255, 7, 0]), ("voc21", [20, 7, 0])]:
        ds = D.open_dataset(name, str(tmp_path / "VOCdevkit"))
        assert [s.id for s in ds.samples] == ["2007_000001"] and ds.load_label(ds[0])[0].tolist() == row

    ade = tmp_path / "ADEChallengeData2016"
    _img(str(ade / "images" / "validation" / "ADE_val_00000001.jpg"), 2, 3)
    _lab(str(ade / "annotations" / "validation" / "ADE_val_00000001.png"), [[0, 1, 150]] * 2)
    _lab(str(ade / "annotations_detectron2" / "validation" / "ADE_val_00000001.png"), [[255, 0, 149]] * 2)
    ds = D.open_dataset("ade150", str(tmp_path))
    assert ds.samples[0].label.endswith(os.path.join("annotations_detectron2", "validation", "ADE_val_00000001.png"))
    assert ds.load_label(ds[0])[0].tolist() == [255, 0, 149]


# ---------------------------------------------------------------- evaluation: COCO-Object background, averaging
class RuleSegmenter:
    """Predicts the first prompted class on the left half, the last on the right; records prompts and keys."""

    def __init__(self):
        self.prompts, self.keys = [], []

    def segment(self, image, classes, noise_key=None):
        self.prompts.append(list(classes))
        self.keys.append(noise_key)
        with Image.open(image) as im:
            w, h = im.size
        lab = np.zeros((h, w), np.int64)
        lab[:, w // 2:] = len(classes) - 1

        class R:
            labels = lab

        return R()


def test_coco_object_background_prompted_not_scored(tmp_path):
    coco = tmp_path / "coco"
    labels = {"a": [[0, 16, 16, 16]] * 2, "b": [[16, 16, 17, 17]] * 2}  # 16 cat, 17 dog
    for k, lab in labels.items():
        _img(str(coco / "val2017" / f"{k}.jpg"), 2, 4)
        _lab(str(coco / "annotations_object" / "val2017" / f"{k}.png"), lab)
    ds = D.open_dataset("coco_object", str(tmp_path))
    seg = RuleSegmenter()
    summary = evaluate(seg, ds, str(tmp_path / "out"), progress=False)
    assert seg.prompts == [["background", "cat"], ["cat", "dog"]]  # background in the prompt when present
    assert seg.keys == ["a", "b"]  # the noise is keyed by the sample id
    cm = np.array(summary["confusion"])
    assert cm[0].sum() == 0  # its pixels are not scored...
    # ...but it is predicted: "a" left half -> background, on one background and one cat column
    assert D.COCO_OBJECT_CLASSES[16:18] == ["cat", "dog"]
    assert cm[16, 0] == 2 and cm[16, 16] == 4 + 4 and cm[17, 17] == 4 and cm.sum() == 14
    # cat IoU 8 / 10, dog 1; background has no ground truth: out of the mean (detectron2's), 0 under "union"
    assert summary["IoU"]["background"] is None and summary["mIoU"] == pytest.approx(90.0)
    assert scores_from_confusion(cm, average="union")["mIoU"] == pytest.approx(60.0)


def test_average_gt_is_detectron2s_union_is_mmsegs():
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])  # class 2 predicted, never in the ground truth
    cm = confusion_matrix(pred, gt, 3)
    # detectron2 SemSegEvaluator: iou_valid = pos_gt > 0 -> classes 0 (1/2) and 1 (1)
    assert scores_from_confusion(cm, average="gt")["mIoU"] == pytest.approx(75.0)
    # mmseg nanmean: class 2 has union 1, IoU 0 -> (1/2 + 1 + 0) / 3
    assert scores_from_confusion(cm, average="union")["mIoU"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="average"):
        scores_from_confusion(cm, average="present")


def test_supervised_eval_refuses_colliding_prompt_words(tmp_path):
    coco = tmp_path / "coco"
    _img(str(coco / "val2017" / "a.jpg"), 2, 2)
    _lab(str(coco / "annotations_27_detectron2" / "val2017" / "a.png"), [[2, 26]] * 2)
    ds = D.open_dataset("coco_stuff27", str(tmp_path))
    with pytest.raises(ValueError, match="collide"):
        evaluate(RuleSegmenter(), ds, str(tmp_path / "out"), progress=False)


# ---------------------------------------------------------------- Hungarian matching, by hand
GT = np.array([[0, 0, 0, 1],
               [0, 0, 1, 1]])
PRED = np.array([[0, 0, 0, 1],
                 [2, 2, 1, 1]])


def test_hungarian_by_hand_image_and_row():
    # per image: hist[class, segment] = [[3, 0, 2], [0, 3, 0]] -> class 0 <- segment 0, class 1 <- segment 1;
    # segment 2 stays unassigned, its 2 pixels are class 0's false negatives
    tp, fp, fn, n = hungarian_counts(PRED, GT, 2, match="image")
    assert tp.tolist() == [3, 3] and fp.tolist() == [0, 0] and fn.tolist() == [2, 0] and n == 8
    # per row (the paper's code): row 0 [[3, 0], [0, 1]]; row 1 [[0, 0, 2], [0, 2, 0]] -> class 0 <- segment 2
    tp, fp, fn, n = hungarian_counts(PRED, GT, 2, match="row")
    assert tp.tolist() == [5, 3] and fp.tolist() == [0, 0] and fn.tolist() == [0, 0] and n == 8
    # a third class, absent: the square assignment hands it segment 2, whose 2 pixels become its false positives
    tp, fp, fn, n = hungarian_counts(PRED, GT, 3, match="image")
    assert tp.tolist() == [3, 3, 0] and fp.tolist() == [0, 0, 2] and fn.tolist() == [2, 0, 0]
    # ignored pixels count nowhere, and a class id >= num_classes is not counted either (as the paper's mask)
    gt = GT.copy()
    gt[0, 0] = 255
    assert hungarian_counts(PRED, gt, 2, match="image")[3] == 7
    with pytest.raises(ValueError, match="match"):
        hungarian_counts(PRED, GT, 2, match="batch")


class RuleUnsupervised:
    """Unsupervised stand-in: segment 0 on the top half, 1 on the bottom, 2 on the right quarter."""

    def __init__(self):
        self.keys = []

    def segment_unsupervised(self, image, kl_threshold=0.1, noise_key=None):
        self.keys.append(noise_key)
        with Image.open(image) as im:
            w, h = im.size
        lab = np.zeros((h, w), np.int64)
        lab[h // 2:] = 1
        lab[:, 3 * w // 4:] = 2

        class R:
            labels = lab

        return R()


@pytest.mark.parametrize("eval_size", ["input", "paper"])
def test_evaluate_unsupervised_matches_direct_counts(tmp_path, eval_size):
    voc = tmp_path / "VOC2012"
    ids = ["2007_000001", "2007_000002", "2007_000003"]
    rng = np.random.default_rng(3)
    os.makedirs(voc / "SegmentationClass")
    for i in ids:
        _img(str(voc / "JPEGImages" / f"{i}.jpg"), 10, 14)
        lab = rng.choice([0, 8, 12, 255], size=(10, 14), p=[0.4, 0.3, 0.25, 0.05]).astype(np.uint8)
        label_image(lab).save(str(voc / "SegmentationClass" / f"{i}.png"))
    os.makedirs(voc / "ImageSets" / "Segmentation")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids))
    ds = D.open_dataset("voc21", str(tmp_path))
    seg = RuleUnsupervised()
    out = tmp_path / "out"
    summary = evaluate_unsupervised(seg, ds, str(out), eval_size=eval_size, progress=False)
    assert seg.keys == ids
    tp = np.zeros(21, np.int64)
    fp, fn, n = tp.copy(), tp.copy(), 0
    for s in ds.samples:
        gt = ds.load_label(s)
        pred = RuleUnsupervised().segment_unsupervised(s.image).labels
        if eval_size == "paper":  # 10x14 -> 640x896, nearest, as detectron2 resizes labels
            h, w = paper_resize_shape(10, 14)
            assert (h, w) == (640, 896)
            gt = np.array(Image.fromarray(gt.astype(np.uint8)).resize((w, h), Image.NEAREST)).astype(np.int64)
            pred = np.array(Image.fromarray(pred.astype(np.uint8)).resize((w, h), Image.NEAREST)).astype(np.int64)
        a, b, c, m = hungarian_counts(pred, gt, 21, match="row")
        tp, fp, fn, n = tp + a, fp + b, fn + c, n + m
    assert summary["tp"] == tp.tolist() and summary["fp"] == fp.tolist() and summary["fn"] == fn.tolist()
    iou = tp / np.maximum(tp + fp + fn, 1)
    valid = (tp + fp + fn) > 0
    assert summary["mIoU"] == pytest.approx(100 * iou[valid].mean())
    assert summary["pixel_accuracy"] == pytest.approx(100 * tp.sum() / n)
    again = RuleUnsupervised()
    evaluate_unsupervised(again, ds, str(out), eval_size=eval_size, progress=False)
    assert again.keys == []  # resumed: nothing computed twice
    with pytest.raises(ValueError, match="other settings"):  # refused before any compute (run.json)
        evaluate_unsupervised(again, ds, str(out), eval_size=eval_size, match="image", progress=False)


# ---------------------------------------------------------------- unsupervised maps and merging
def paper_unsup_numpy(i2t, kl_threshold=0.1):
    """Line-by-line numpy transcription of the paper's Seg4DiffUnsup (the att2mask that is executed, then
    mask_merge with its KL): i2t [HW, 77] -> list of merged [HW] maps and the groups."""
    att = i2t[None].astype(np.float64)  # [B=1, HW, 77]
    att = att - att.min(axis=2, keepdims=True)
    att = att / (att.max(axis=2, keepdims=True) + 1e-6)
    att = att ** 1.0  # OUTPUT_POWER 1.0
    attns = att[0].T  # "b (h w) l -> b l h w", squeeze: [77, HW]
    e = np.exp(attns - attns.max(axis=1, keepdims=True))
    attns = e / e.sum(axis=1, keepdims=True)  # softmax over the flattened pixels
    matched, out, groups = set(), [], []
    for i in range(len(attns)):
        if i in matched:
            continue
        matched.add(i)
        anchor = np.broadcast_to(attns[i], attns.shape)
        q = np.log(anchor) - np.log(attns)
        kl = (anchor * q).sum(1) / 2 - (attns * q).sum(1) / 2
        mask = kl < kl_threshold
        idx = np.nonzero(mask)[0].tolist()
        matched.update(idx)
        out.append(attns[mask].mean(0))
        groups.append(idx)
    return np.stack(out), groups


def test_unsupervised_maps_by_hand():
    i2t = torch.tensor([[1.0, 2.0, 3.0, 5.0],
                        [4.0, 4.0, 0.0, 2.0]])
    got = unsupervised_maps(i2t)
    # each pixel (row) min-max across the 4 text columns, 1e-6 added to the max as in att2mask
    want = torch.tensor([[0, 1 / (4 + 1e-6), 2 / (4 + 1e-6), 4 / (4 + 1e-6)],
                         [4 / (4 + 1e-6), 4 / (4 + 1e-6), 0, 2 / (4 + 1e-6)]], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_unsupervised_merge_equals_the_papers_transcription():
    rng = np.random.default_rng(7)
    hw, T = 36, 77
    # a few underlying regions, tokens attending to one of them, plus noise: merging has something to do
    regions = rng.random((4, hw)) ** 4
    owner = rng.integers(0, 4, T)
    i2t = regions[owner].T * 3 + 0.05 * rng.random((hw, T))
    want, want_groups = paper_unsup_numpy(i2t)
    maps = unsupervised_maps(torch.from_numpy(i2t)).T.reshape(T, 6, 6)
    merged, groups = merge_maps(maps, 0.1)
    assert groups == want_groups and 1 < len(groups) < T
    np.testing.assert_allclose(merged.reshape(len(groups), -1).double().numpy(), want, rtol=1e-5, atol=1e-9)


def test_segment_unsupervised_uses_per_pixel_normalisation():
    pipe = tiny_pipeline("sd3")
    rng = np.random.default_rng(1)
    fixed = {}

    def source(batch):
        n = batch.grid[0] * batch.grid[1]
        if "i2t" not in fixed:
            regions = rng.random((3, n)) ** 3
            fixed["i2t"] = torch.from_numpy(regions[rng.integers(0, 3, 77)].T * 2 + 0.01 * rng.random((n, 77)))
        return fixed["i2t"][None].float()

    seg = Segmenter(pipe, attention_source=source, size=None, resize="square")
    res = seg.segment_unsupervised(torch.rand(3, 32, 48))
    _, want_groups = paper_unsup_numpy(fixed["i2t"].float().double().numpy())
    assert res.meta["groups"] == want_groups


# ---------------------------------------------------------------- defaults: Flux schedule, layers, guidance
def test_flux_defaults_and_sigma():
    from diffusers import FlowMatchEulerDiscreteScheduler

    p = protocol_for("black-forest-labs/FLUX.1-dev")
    assert (p.layers, p.num_inference_steps, p.timestep_index, p.shift_seq_len, p.vae_pixels) == ((12,), 50, -8, 16, "unit")
    assert protocol_for("stabilityai/stable-diffusion-3.5-medium").layers == (9,)
    # Flux.1-dev's scheduler config
    sched = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                                            max_shift=1.15, use_dynamic_shifting=True)
    seg = Segmenter(tiny_pipeline("flux"), family="flux")
    z = torch.zeros(1, 16, 128, 128)  # the latent of a 1024^2 image: 64 x 64 = 4096 tokens
    # the paper: mu from 16 "tokens" = 0.5 + (1.15 - 0.5) / (4096 - 256) * (16 - 256) = 0.459375; timesteps[-8] of
    # 50 is sigma 1 - 42 * 0.98 / 49 = 0.16 before the shift exp(mu) / (exp(mu) + 1 / 0.16 - 1)
    mu = 0.5 + 0.65 / 3840 * (16 - 256)
    want = math.exp(mu) / (math.exp(mu) + 1 / 0.16 - 1)
    assert want == pytest.approx(0.2317, abs=1e-4)
    t = seg._timesteps(sched, z)
    assert len(t) == 50 and float(t[-8]) / 1000 == pytest.approx(want, rel=1e-5)
    # the principled option: the real 4096 tokens (mu = 1.15); 28 steps as the project had: sigma ~0.56
    seg28 = Segmenter(tiny_pipeline("flux"), family="flux", shift_seq_len=None, num_inference_steps=28)
    s = 1 - 20 / 28
    want28 = math.exp(1.15) / (math.exp(1.15) + 1 / s - 1)
    assert float(seg28._timesteps(sched, z)[-8]) / 1000 == pytest.approx(want28, rel=1e-5)
    assert want28 == pytest.approx(0.558, abs=1e-3)


def test_generation_guidance_is_the_papers():
    assert PROTOCOLS["sd3"].generate_guidance_scale == 7.5 and PROTOCOLS["sd3.5"].generate_guidance_scale == 7.5
    assert PROTOCOLS["flux"].generate_guidance_scale == 3.5  # Flux.1-dev's distilled guidance


@pytest.mark.parametrize("family,t5,text_len", [("sd3", 77, 154), ("sd3.5", 256, 333)])
def test_sd3_text_block_length(family, t5, text_len):
    pipe = tiny_pipeline(family)
    seen = {}
    orig = pipe.encode_prompt

    def spy(*a, **kw):
        seen["max_sequence_length"] = kw.get("max_sequence_length")
        return orig(*a, **kw)

    pipe.encode_prompt = spy
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__("text", kw["encoder_hidden_states"].shape[1]), with_kwargs=True)

    def source(batch):
        batch.run()
        return torch.rand(len(batch.prompts), batch.grid[0] * batch.grid[1], len(batch.text_index))

    try:
        Segmenter(pipe, family=family, attention_source=source, size=None).segment(torch.rand(3, 32, 32), ["cat"])
    finally:
        hook.remove()
    assert seen == {"max_sequence_length": t5, "text": text_len}


# ---------------------------------------------------------------- resize and VAE pixels
def _vae_inputs(seg, image):
    seen = []
    vae = seg.pipe.vae
    orig = vae.encode

    def spy(x, *a, **kw):
        seen.append(x.detach().clone())
        return orig(x, *a, **kw)

    vae.encode = spy
    try:
        seg.segment(image, ["cat"])
    finally:
        del vae.encode
    return seen[0]


def test_paper_resize_shape_is_detectron2s():
    assert paper_resize_shape(375, 500) == (640, 853)  # VOC: 500x375 -> shortest edge 640
    assert paper_resize_shape(1024, 2048) == (640, 1280)  # Cityscapes
    assert paper_resize_shape(100, 2000) == (128, 2560)  # the longest edge capped at 2560


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_paper_pixel_path(family):
    pipe = tiny_pipeline(family)
    never = lambda b: torch.rand(len(b.prompts), b.grid[0] * b.grid[1], len(b.text_index))  # noqa: E731
    img = torch.rand(3, 30, 40, generator=torch.Generator().manual_seed(0))
    x = _vae_inputs(Segmenter(pipe, family=family, attention_source=never, size=64), img)
    # shortest edge 640 (30x40 -> 640x853, antialiased bilinear as PIL, 8-bit), then squashed to 64x64
    mid = F.interpolate(img[None], size=(640, 853), mode="bilinear", align_corners=False, antialias=True)
    mid = (mid.clamp(0, 1) * 255).round() / 255
    want = F.interpolate(mid, size=(64, 64), mode="bilinear", align_corners=False)
    if family == "sd3":
        want = 2 * want - 1  # SD3's img_to_latents; the paper's Flux code skips it (vae_pixels="unit")
    torch.testing.assert_close(x, want.to(x.dtype), rtol=0, atol=1e-6)
    direct = _vae_inputs(Segmenter(pipe, family=family, attention_source=never, size=64, resize="square"), img)
    assert (direct - x).abs().max() > 1e-3  # the 640 step is not a no-op
    signed = _vae_inputs(Segmenter(pipe, family=family, attention_source=never, size=64, vae_pixels="signed"), img)
    torch.testing.assert_close(signed, (2 * want - 1 if family == "flux" else want).to(x.dtype), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- noise per image
def test_noise_differs_per_image_and_is_reproducible():
    pipe = tiny_pipeline("sd3")
    lat = []

    def source(batch):
        lat.append(batch.latents[0].clone())
        return torch.rand(len(batch.prompts), batch.grid[0] * batch.grid[1], len(batch.text_index))

    seg = Segmenter(pipe, attention_source=source, size=None)
    img = torch.rand(3, 32, 32)
    seg.segment([img, img], ["cat"])  # the same pixels twice: keys 0 and 1
    assert (lat[0] - lat[1]).abs().max() > 0.1
    seg.segment(img, ["cat"], noise_key="2007_000033")
    seg.segment(img, ["cat"], noise_key="2007_000033")
    seg.segment(img, ["cat"], noise_key="2007_000033", seed=1)
    assert torch.equal(lat[2], lat[3]) and (lat[2] - lat[4]).abs().max() > 0.1
    # the derivation: a stable hash of base seed and key (independent of order and sharding)
    want = int.from_bytes(hashlib.sha256(b"0/2007_000033").digest()[:8], "little") & (2 ** 63 - 1)
    assert image_seed(0, "2007_000033") == want and image_seed(0, 0) != image_seed(0, 1)
    with pytest.raises(ValueError, match="one key per image"):
        seg.segment([img, img], ["cat"], noise_key="x")


# ---------------------------------------------------------------- loading dtype
def test_load_pipeline_dtype_is_in_effect(tmp_path):
    tiny_pipeline("sd3").save_pretrained(str(tmp_path / "tiny"))
    pipe = load_pipeline(str(tmp_path / "tiny"), torch_dtype=torch.float16, device="cpu", family="sd3")
    dtypes = {p.dtype for p in pipe.transformer.parameters()} | {p.dtype for p in pipe.vae.parameters()}
    assert dtypes == {torch.float16}


# ---------------------------------------------------------------- the command line
def test_cli_eval_unsupervised_tiny(tmp_path, capsys):
    voc = tmp_path / "VOC2012"
    os.makedirs(voc / "SegmentationClass")
    os.makedirs(voc / "ImageSets" / "Segmentation")
    for k, i in enumerate(["2007_000001", "2007_000002"]):
        _img(str(voc / "JPEGImages" / f"{i}.jpg"), 20, 28, seed=k)
        lab = np.zeros((20, 28), np.uint8)
        lab[:, 14:] = 8
        label_image(lab).save(str(voc / "SegmentationClass" / f"{i}.png"))
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000001\n2007_000002\n")
    parser = argparse.ArgumentParser(prog="seg4diff-fast")
    commands.register_commands(parser.add_subparsers())
    out = tmp_path / "out"
    args = parser.parse_args(["eval", "--dataset", "voc21", "--root", str(tmp_path), "--unsupervised", "--model",
                              "tiny", "--size", "64", "--out", str(out), "--device", "cpu"])
    assert args.func(args) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == "unsupervised" and summary["match"] == "row" and summary["num_images"] == 2
    # 2 images at the paper's 640x896 evaluation size, no pixel ignored
    assert summary["num_pixels"] == 2 * 640 * 896 and 0 <= summary["mIoU"] <= 100
