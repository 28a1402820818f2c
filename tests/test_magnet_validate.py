"""MAGNET's validation as the official training executes it (``seg4diff_fast.magnet.validate``): each piece against
a float64 numpy re-statement of the official code (``Seg4DiffTrainer.forward`` in eval mode, ``att2mask``,
``mask_merge``, ``HungarianMatcher``, ``sem_seg_postprocess``, ``ImageList.from_tensors``, detectron2's
``SemSegEvaluator``), the whole validation on the tiny SD3 against the same re-statements, and the training loop
validating on a small fake VOC folder. CPU."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from seg4diff_fast.magnet.criterion import MaskAlignmentLoss
from seg4diff_fast.magnet.validate import (OFFICIAL_KL_THRESHOLD, OFFICIAL_POWER, OFFICIAL_TIMESTEP_INDEX,
                                           official_canvas, official_merge, official_prediction, official_prompt,
                                           official_validation)
from seg4diff_fast.segmentation.datasets import COCO_OBJECT_CLASSES, open_dataset
from seg4diff_fast.segmentation.images import resize_8bit

from test_metrics import make_voc

COCO_THINGS = COCO_OBJECT_CLASSES[1:]  # the first 80 names of the official datasets/coco.json, in its order


# ------------------------------------------------------------------ float64 numpy re-statements of the official code
def _att2mask_merge64(i2t, grid, kl_threshold, power):
    """``att2mask`` on ``[B, l, 4096, 77]`` (min / max over dim 2, the pixels; + 1e-6; ** p), the layer mean, the
    ``[77, 64, 64]`` rearrange, then ``mask_merge``: softmax over the pixels, for each unmatched anchor the
    symmetric KL ``sum(x log(x / Y)) / 2 - sum(Y log(x / Y)) / 2`` to every map, ``kl < threshold`` (already
    matched maps included) averaged."""
    att = np.asarray(i2t, np.float64)
    att = att - att.min(0, keepdims=True)
    att = att / (att.max(0, keepdims=True) + 1e-6)
    att = att ** power
    flat = att.T  # [T, h * w]
    e = np.exp(flat - flat.max(1, keepdims=True))
    probs = e / e.sum(1, keepdims=True)
    matched, out = set(), []
    for i in range(len(probs)):
        if i in matched:
            continue
        matched.add(i)
        q = np.log(probs[i])[None] - np.log(probs)
        kl = (probs[i][None] * q).sum(1) / 2 - (probs * q).sum(1) / 2
        mask = kl < kl_threshold
        matched.update(np.nonzero(mask)[0].tolist())
        out.append(probs[mask].mean(0))
    return np.stack(out).reshape(len(out), *grid)


def _nearest_down64(masks, size):
    """F.interpolate(mode="nearest"): source index floor(dst * in / out)."""
    h, w = masks.shape[-2:]
    ri = np.floor(np.arange(size[0]) * (h / size[0])).astype(int)
    ci = np.floor(np.arange(size[1]) * (w / size[1])).astype(int)
    return masks[:, ri][:, :, ci]


def _bilinear64(x, size):
    """F.interpolate(mode="bilinear", align_corners=False) of ``[C, h, w]``."""
    def axis(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0
    r0, r1, lr = axis(x.shape[1], size[0])
    c0, c1, lc = axis(x.shape[2], size[1])
    top = x[:, r0][:, :, c0] * (1 - lc) + x[:, r0][:, :, c1] * lc
    bot = x[:, r1][:, :, c0] * (1 - lc) + x[:, r1][:, :, c1] * lc
    return top * (1 - lr)[None, :, None] + bot * lr[None, :, None]


def _official_prediction64(merged, label, idxs, num_classes, out_size):
    """The matcher (``batch_sigmoid_focal_loss`` with ``prob = inputs``, alpha 0.25, gamma 2, / hw;
    ``batch_dice_loss``; C = 0.02 focal + 1.0 dice; linear_sum_assignment), ``_outputs_tgt[:, tgt] = _outputs[:,
    src]``, ``mask_pred_results[:, idxs] = ...`` (0 elsewhere), ``sem_seg_postprocess`` (crop: nothing; bilinear to
    the image) and the evaluator's argmax."""
    from scipy.optimize import linear_sum_assignment

    x = merged.reshape(len(merged), -1)
    tgt = _nearest_down64(np.stack([label == c for c in idxs]).astype(np.float64), merged.shape[-2:])
    tgt = tgt.reshape(len(idxs), -1)
    hw = x.shape[1]
    bce_pos, bce_neg = np.log1p(np.exp(-x)), np.log1p(np.exp(x))
    focal_pos = (1 - x) ** 2 * bce_pos * 0.25 / hw
    focal_neg = x ** 2 * bce_neg * 0.75 / hw
    cost_mask = focal_pos @ tgt.T + focal_neg @ (1 - tgt).T
    s = 1 / (1 + np.exp(-x))
    cost_dice = 1 - (2 * s @ tgt.T + 1) / (s.sum(1)[:, None] + tgt.sum(1)[None, :] + 1)
    src, dst = linear_sum_assignment(0.02 * cost_mask + 1.0 * cost_dice)
    outputs_tgt = np.zeros((len(idxs), *merged.shape[-2:]))
    for a, b in zip(src, dst):
        outputs_tgt[b] = merged[a]
    scores = np.zeros((num_classes, *merged.shape[-2:]))
    scores[np.asarray(idxs)] = outputs_tgt
    return _bilinear64(scores, out_size).argmax(0)


def _semseg_miou64(pairs, num_classes, ignore=255):
    """detectron2's SemSegEvaluator: a (C + 1)^2 confusion with the ignore label as class C; IoU of the classes
    with ground truth, their mean x 100."""
    conf = np.zeros((num_classes + 1, num_classes + 1), np.int64)
    for pred, gt in pairs:
        gt = gt.copy()
        gt[gt == ignore] = num_classes
        conf += np.bincount((num_classes + 1) * pred.reshape(-1) + gt.reshape(-1),
                            minlength=conf.size).reshape(conf.shape)
    tp = conf.diagonal()[:-1].astype(float)
    pos_gt = conf[:-1, :-1].sum(0).astype(float)
    pos_pred = conf[:-1, :-1].sum(1).astype(float)
    valid = np.logical_and(pos_gt > 0, pos_gt + pos_pred - tp > 0)
    return float((tp[valid] / (pos_gt + pos_pred - tp)[valid]).sum() / valid.sum() * 100)


# ------------------------------------------------------------------ the pieces
def test_canvas_is_the_resize_then_imagelist_zero_padding():
    """A 375 x 500 VOC image: 640 x 853 after the 640-pixel shortest edge, then zeros to 640 x 1280
    (``ImageList.from_tensors(images, 640)``); a portrait one pads its height."""
    g = torch.Generator().manual_seed(0)
    for (h, w), want in [((375, 500), (640, 1280)), ((500, 333), (1280, 640)), ((640, 640), (640, 640))]:
        px = torch.rand(3, h, w, generator=g)
        canvas = official_canvas(px, 640)
        resized = resize_8bit(px).numpy()
        ref = np.zeros((3, *want))
        ref[:, :resized.shape[1], :resized.shape[2]] = resized
        assert tuple(canvas.shape[-2:]) == want
        np.testing.assert_array_equal(canvas.numpy(), ref)
    assert tuple(official_canvas(torch.rand(3, 375, 500), 32).shape[-2:]) == (640, 864)
    with pytest.raises(ValueError, match="size_divisibility"):
        official_canvas(torch.rand(3, 8, 8), 0)


def test_prompt_is_the_training_names_at_the_validation_ids():
    """``" ".join([self.train_class_texts[i] for i in idx])``: VOC aeroplane (0), bird (2) and person (14) are
    prompted with COCO's names 0, 2 and 14: "person car bird"."""
    assert official_prompt(COCO_THINGS, [0, 2, 14]) == "person car bird"
    assert official_prompt(COCO_THINGS, []) == ""
    with pytest.raises(ValueError, match=r"\[20\]"):
        official_prompt(COCO_THINGS[:20], [3, 20])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merge_equals_the_official_att2mask_and_mask_merge(seed):
    """Pre-softmax maps with near-duplicate columns, so that groups form at 0.01: the merged maps equal the float64
    re-statement, and some columns merged."""
    rng = np.random.default_rng(seed)
    h, w, T = 6, 5, 12
    base = rng.normal(size=(h * w, 4)) * 3
    i2t = base[:, rng.integers(0, 4, T)] + rng.normal(size=(h * w, T)) * 0.05
    got, groups = official_merge(torch.from_numpy(i2t).float(), (h, w), OFFICIAL_KL_THRESHOLD, OFFICIAL_POWER)
    ref = _att2mask_merge64(torch.from_numpy(i2t).float().double().numpy(), (h, w), OFFICIAL_KL_THRESHOLD,
                            OFFICIAL_POWER)
    assert 1 < got.shape[0] < T and got.shape == ref.shape
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-6, atol=1e-12)
    assert sorted({c for g in groups for c in g}) == list(range(T))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_prediction_equals_the_official_matcher_and_postprocess(seed):
    """Merged maps (fewer or more than the classes), a label with three of five classes at another size: the class
    map equals the re-statement pixel for pixel."""
    rng = np.random.default_rng(seed)
    h, w = 8, 8
    M = [2, 4, 3, 5][seed]
    logits = rng.normal(size=(M, h * w)) * 2
    merged = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # distributions, as mask_merge gives
    merged = merged.reshape(M, h, w)
    label = np.full((20, 27), 255, np.int64)
    label[:, :9], label[:10, 9:] = 1, 3
    label[10:, 18:] = 4
    idxs = [1, 3, 4]
    got = official_prediction(torch.from_numpy(merged).float(), label, idxs, 5, (30, 41), MaskAlignmentLoss())
    ref = _official_prediction64(torch.from_numpy(merged).float().double().numpy(), label, idxs, 5, (30, 41))
    assert got.shape == (30, 41)
    np.testing.assert_array_equal(got, ref)
    assert set(np.unique(got)) <= set(idxs)


# ------------------------------------------------------------------ the whole validation, tiny SD3
@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    make_voc(root, n=3, h=12, w=16)  # cat (voc20 7) left, dog (11) / horse (12) top right, border ignored
    return str(root)


def test_validation_on_the_tiny_model_equals_the_official_composition(voc, tmp_path):
    """official_validation's mIoU is the SemSegEvaluator mIoU of the re-stated pipeline, fed with the Segmenter's
    pre-softmax head-mean maps of the canvas at timesteps[-14] under the prompt of COCO names at the VOC ids
    present: VOC cat (7) is prompted "truck", dog (11) "stop sign", horse (12) "parking meter"."""
    from seg4diff_fast.segmentation import Segmenter
    from seg4diff_fast.segmentation.evaluate import _nearest, gt_classes
    from seg4diff_fast.segmentation.images import load_image, paper_resize_shape

    torch.set_num_threads(1)
    seg = Segmenter.from_pretrained("tiny", size=32, seed=3)
    ds = open_dataset("voc20", voc)
    summary = official_validation(seg, ds, str(tmp_path / "val"), COCO_THINGS, MaskAlignmentLoss(),
                                  size_divisibility=640)
    vseg = seg._with(dict(normalize="logits", heads="mean", timestep_index=-14, resize="square"))
    pairs, prompts = [], []
    for s in ds.samples:
        gt = ds.load_label(s)
        present = gt_classes(gt)
        prompts.append(" ".join(COCO_THINGS[c] for c in present))
        canvas = official_canvas(load_image(s.image), 640)
        geom = vseg.geometry(*canvas.shape[-2:])
        with torch.no_grad():
            i2t, meta = vseg._i2t_for_image(canvas, geom, [prompts[-1]], None, s.id)
        assert meta["timestep_index"] == OFFICIAL_TIMESTEP_INDEX
        merged = _att2mask_merge64(i2t[0].double().numpy(), geom.grid, 0.01, 2.0)
        label = _nearest(gt, paper_resize_shape(*gt.shape))
        pairs.append((_official_prediction64(merged, label, present, 20, gt.shape), gt))
    assert prompts[0] == "truck stop sign" and prompts[1] == "truck parking meter"
    assert summary["mIoU"] == pytest.approx(_semseg_miou64(pairs, 20), abs=1e-9)
    run = json.load(open(tmp_path / "val" / "run.json"))["settings"]
    assert run["validation"] == "magnet-official" and run["kl_threshold"] == 0.01 and run["power"] == 2.0
    assert (run["segmenter"]["protocol"]["normalize"], run["segmenter"]["protocol"]["timestep_index"]) == \
        ("logits", -14)
    with pytest.raises(ValueError, match="training names"):
        official_validation(seg, ds, str(tmp_path / "v2"), COCO_THINGS[:5], MaskAlignmentLoss())


# ------------------------------------------------------------------ the training loop
def test_train_validates_as_the_official_run_and_keeps_the_best(voc, tmp_path):
    """The default validation of ``train`` on a fake VOC folder: every val_every steps, summary settings of the
    official validation, OUT/best/ is the best mIoU's LoRA, and that mIoU is what official_validation gives the
    kept LoRA in a fresh Segmenter; the training classes must name every VOC id."""
    import importlib.util
    from pathlib import Path

    from safetensors.torch import load_file

    from seg4diff_fast.magnet.train import ConfigError, TrainConfig, apply_lora, train
    from seg4diff_fast.segmentation import Segmenter

    spec = importlib.util.spec_from_file_location("magnet_planted", Path(__file__).resolve().parents[1] /
                                                  "benchmarks" / "magnet_planted.py")
    planted = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(planted)
    torch.set_num_threads(1)
    data = planted.make_planted(str(tmp_path / "train"), 4, 0, "coco")
    names = open(Path(data) / "classes.txt").read().split("\n")
    names = [n for n in names if n]
    base = dict(model="tiny", data_root=data, size=32, short_edge=40, crop_size=40, size_divisibility=32,
                batch_size=2, steps=2, warmup_steps=1, max_grad_norm=1.0, num_workers=0, progress=False,
                checkpoint_every=0, val_root=voc, val_every=1, lr=1e-2)
    with pytest.raises(ConfigError, match="training names") as e:  # the planted names cannot prompt VOC's 20 ids
        train(TrainConfig(output_dir=str(tmp_path / "few"), **base))
    assert e.value.field == "val_protocol"
    (Path(data) / "classes.txt").write_text("\n".join(names + COCO_THINGS[len(names):20]) + "\n")
    out = tmp_path / "out"
    cfg = TrainConfig(output_dir=str(out), **base)
    assert cfg.val_protocol == "official" and cfg.val_dataset == "voc20"
    result = train(cfg)
    val = result["val"]
    assert [v["step"] for v in val] == [1, 2]
    top = max(val, key=lambda v: v["mIoU"])
    assert result["best"] == dict(step=top["step"], mIoU=top["mIoU"])
    run = json.load(open(out / "val" / "step-000001" / "run.json"))["settings"]
    assert run["validation"] == "magnet-official" and run["size_divisibility"] == 32
    assert run["train_classes"][:len(names)] == names and len(run["train_classes"]) == 20
    a, b = load_file(out / "pytorch_lora_weights.safetensors"), load_file(out / "best" /
                                                                          "pytorch_lora_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    seg = apply_lora(Segmenter.from_pretrained("tiny", size=32, seed=cfg.seed, layers=(2,)), str(out))
    again = official_validation(seg, open_dataset("voc20", voc), str(tmp_path / "again"),
                                names + COCO_THINGS[len(names):20], MaskAlignmentLoss(), size_divisibility=32)
    assert again["mIoU"] == pytest.approx(top["mIoU"], abs=1e-9)
    assert not math.isnan(top["mIoU"])
    # the paper's Table 2 protocol stays an option, at its own threshold
    res = train(TrainConfig(output_dir=str(tmp_path / "unsup"), **dict(base, steps=1, val_protocol="unsupervised")))
    run = json.load(open(tmp_path / "unsup" / "val" / "step-000001" / "run.json"))["settings"]
    assert [v["step"] for v in res["val"]] == [1] and run["protocol"] == "unsupervised" and run["kl_threshold"] == 0.1
