"""``seg4diff-fast analyze`` (seg4diff_fast.analysis): the per-layer analysis must single out a planted layer,
and its budget and value norms must equal float64 recomputations from the layers' own projections."""
import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from seg4diff_fast.analysis import _resolve_layer, analyze, dataset_items, register_commands
from seg4diff_fast.segmentation import Segmenter, open_dataset, tiny_pipeline
from test_segmentation_planted_model import CLASSES, _planted_image, plant_sd3_layer


def write_folder_dataset(root, img, gt):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(gt.astype(np.uint8)).save(root / "labels" / "a.png")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return open_dataset("folder", str(root))


@torch.no_grad()
def _float64_layer_stats(attn, kw, n_img, prompt_cols):
    """From the attention module's own projections in float64: (i2t share, t2i share, |v| image, text, prompt)."""
    x, c = kw["hidden_states"][0].double(), kw["encoder_hidden_states"][0].double()  # [N_img, D], [T, D]
    a = {n: getattr(attn, n) for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")}
    lin = {n: (lambda m: (lambda t: t @ m.weight.double().T + m.bias.double()))(m) for n, m in a.items()}
    H = attn.heads
    q = torch.cat([lin["to_q"](x), lin["add_q_proj"](c)])
    k = torch.cat([lin["to_k"](x), lin["add_k_proj"](c)])
    N, d = q.shape[0], q.shape[1] // H
    qh, kh = q.view(N, H, d).transpose(0, 1), k.view(N, H, d).transpose(0, 1)
    p = torch.softmax(qh @ kh.transpose(1, 2) / d ** 0.5, -1).mean(0)  # [N, N] head mean
    i2t = p[:n_img, n_img:].sum(-1).mean()
    t2i = p[n_img:, :n_img].sum(-1).mean()
    vi, vt = lin["to_v"](x).norm(dim=-1), lin["add_v_proj"](c).norm(dim=-1)
    return float(i2t), float(t2i), float(vi.mean()), float(vt.mean()), float(vt[prompt_cols].mean())


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    H, W = 48, 80
    img, gt = _planted_image(H, W)
    seg = Segmenter(tiny_pipeline("sd3"), size=None, layers=(1,), timestep_index=-1)
    plant_sd3_layer(seg, img, H, W)
    ds = write_folder_dataset(tmp_path_factory.mktemp("planted"), img, gt)
    return seg, ds


def test_analysis_singles_out_the_planted_layer(planted, tmp_path):
    seg, ds = planted
    tf = seg.transformer
    # record the layers' inputs during the analysis forward at the first timestep index (-1)
    seen = {}
    hooks = [b.attn.register_forward_pre_hook(lambda m, a, kw, i=i: None if i in seen else seen.update({i: kw}),
                                               with_kwargs=True) for i, b in enumerate(tf.transformer_blocks)]
    items = list(dataset_items(seg, ds))
    summary = analyze(seg, items, str(tmp_path), timestep_indices=[-1, -3], head_layer=1, num_classes=len(CLASSES),
                      class_names=CLASSES, progress=False)
    for h in hooks:
        h.remove()
    layers = summary["layers"]
    assert layers == [f"transformer_blocks.{i}" for i in range(4)]
    miou = {l: summary["timesteps"][0]["layers"][l]["mIoU"] for l in layers}
    assert summary["expert_layer"] == "transformer_blocks.1", miou
    assert miou["transformer_blocks.1"] > 85 and miou["transformer_blocks.1"] > max(
        v for l, v in miou.items() if l != "transformer_blocks.1") + 20, miou
    assert summary["timesteps"][1]["timestep_index"] == -3 and len(summary["timesteps"]) == 2
    assert len(summary["heads"]["mIoU"]) == tf.transformer_blocks[1].attn.heads
    # budget and value norms against float64 recomputations from each layer's own projections
    n_img = summary["tokens"]["image"]
    assert n_img == (48 // seg.patch) * (80 // seg.patch)
    prompt_cols = sorted({j for c in items[0].packs[0].columns for j in c})
    for i, l in enumerate(layers):
        got = summary["timesteps"][0]["layers"][l]
        want = _float64_layer_stats(tf.transformer_blocks[i].attn, seen[i], n_img, prompt_cols)
        b, v = got["budget"], got["value_norm"]
        assert b["i2t"] == pytest.approx(want[0], rel=1e-4) and b["t2i"] == pytest.approx(want[1], rel=1e-4)
        assert b["i2i"] + b["i2t"] == pytest.approx(1) and b["t2i"] + b["t2t"] == pytest.approx(1)
        assert sum(b[f"matrix_{k}"] for k in ("i2i", "i2t", "t2i", "t2t")) == pytest.approx(1)
        assert [v["image"], v["text"], v["prompt"]] == pytest.approx(list(want[2:]), rel=1e-4)
    # the files
    on_disk = json.loads((tmp_path / "analysis.json").read_text())
    assert on_disk["expert_layer"] == "transformer_blocks.1"
    for name in ("layers.png", "heads.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size[0] > 100 and im.size[1] > 100


def test_heads_plot_shows_the_expert_layer_found(planted, tmp_path, monkeypatch):
    """heads.png: a row per head of the head layer, their mean, and, when the expert layer the run found (highest
    mIoU) is another layer, a last row with that expert's head-mean maps; the title names both layers; each row
    is labelled with its mIoU and has a colour bar."""
    import seg4diff_fast.analysis as analysis

    seg, ds = planted
    figs = {}
    save = analysis._save
    monkeypatch.setattr(analysis, "_save", lambda fig, path: (figs.__setitem__(path, fig), save(fig, path)))
    items = list(dataset_items(seg, ds))
    heads = seg.transformer.transformer_blocks[1].attn.heads
    shown = {}
    for head_layer in (1, 3):  # the planted expert, another layer
        out = tmp_path / f"head{head_layer}"
        s = analyze(seg, items, str(out), head_layer=head_layer, num_classes=len(CLASSES), class_names=CLASSES,
                    progress=False)
        assert s["expert_layer"] == "transformer_blocks.1" and s["head_layer"] == f"transformer_blocks.{head_layer}"
        fig = figs[str(out / "heads.png")]
        rows = heads + 1 + (head_layer != 1)
        assert len(fig.axes) == rows * len(CLASSES) + rows  # the maps, then a colour bar per row
        grid = np.array(fig.axes[:rows * len(CLASSES)]).reshape(rows, len(CLASSES))
        labels = [row[0].get_ylabel() for row in grid]
        miou = s["timesteps"][0]["layers"]
        assert labels[:heads] == [f"head {h}\nmIoU {m:.1f}" for h, m in enumerate(s["heads"]["mIoU"])]
        assert labels[heads] == f"mean\nmIoU {miou[s['head_layer']]['mIoU']:.1f}"
        shown[head_layer] = [[ax.images[0].get_array() for ax in row] for row in grid]
        title = fig._suptitle.get_text()
        assert f"transformer_blocks.{head_layer} (head layer)" in title
        if head_layer == 1:
            assert "transformer_blocks.1 is the expert layer this run found" in title
        else:
            assert "last row: transformer_blocks.1, the expert layer this run found" in title
            assert labels[-1] == f"expert\nmean\nmIoU {miou['transformer_blocks.1']['mIoU']:.1f}"
    # the last row of the second plot is the expert's head mean: the mean row of the first
    for got, want in zip(shown[3][-1], shown[1][heads]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    assert not np.allclose(shown[3][heads][0], shown[1][heads][0])  # and the head layer's mean is another layer's


def _cli(argv):
    parser = argparse.ArgumentParser(prog="seg4diff-fast")
    register_commands(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_analyze_dataset_and_prompts(tmp_path, capsys):
    H, W = 24, 40
    img, gt = _planted_image(H, W)
    write_folder_dataset(tmp_path / "ds", img, gt)
    out = tmp_path / "out"
    rc = _cli(["analyze", "--model", "tiny", "--dataset", "folder", "--root", str(tmp_path / "ds"), "--out", str(out),
               "--size", "native", "--timestep-indices=-1,-8"])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((out / "analysis.json").read_text())
    assert s["expert_layer"] in s["layers"] and len(s["timesteps"]) == 2
    assert all(0 <= e["layers"][l]["mIoU"] <= 100 for e in s["timesteps"] for l in s["layers"])
    assert "expert layer" in capsys.readouterr().out

    out2 = tmp_path / "gen"
    rc = _cli(["analyze", "--model", "tiny-flux", "--prompt", "a cat on the grass", "--classes", "cat,grass",
               "--gen-steps", "2", "--out", str(out2)])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((out2 / "analysis.json").read_text())
    assert s["expert_layer"] is None and "heads" not in s
    assert s["layers"] == ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                           "single_transformer_blocks.1"]
    for l in s["layers"]:  # double- and single-stream layers both have value norms of every kind
        v = s["timesteps"][0]["layers"][l]["value_norm"]
        assert all(v[k] is not None and v[k] > 0 for k in ("image", "text", "prompt")), (l, v)
    assert (out2 / "heads.png").exists() and (out2 / "layers.png").exists()

    assert _cli(["analyze", "--model", "tiny", "--out", str(tmp_path / "x")]) == 2
    assert "either --dataset" in capsys.readouterr().err


def test_analyze_bad_input(planted):
    seg, ds = planted
    item = next(iter(dataset_items(seg, ds)))
    with pytest.raises(ValueError, match="no images"):
        analyze(seg, [], num_classes=3, progress=False)
    item.gt = None
    with pytest.raises(ValueError, match="no ground truth"):
        analyze(seg, [item], num_classes=3, progress=False)
    with pytest.raises(ValueError, match="protocol"):
        dataset_items(seg, ds, "oracle")
    with pytest.raises(ValueError, match="unknown layer|out of range"):
        analyze(seg, [item], head_layer=9, progress=False)


def test_analyze_without_matplotlib_writes_the_json(planted, tmp_path, monkeypatch):
    import sys

    seg, ds = planted
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        analyze(seg, dataset_items(seg, ds), str(tmp_path), num_classes=3, class_names=CLASSES, progress=False)
    assert json.loads((tmp_path / "analysis.json").read_text())["num_images"] == 1
    assert not (tmp_path / "layers.png").exists()


@pytest.mark.parametrize("family", ["qwenimage", "cogview4"])
def test_analysis_reads_the_family_columns(family, tmp_path):
    """Chat-template / padded-text families (Qwen-Image, CogView4): the analysis reads each class at the columns
    the Segmenter reads it (Segmenter.pack_classes), so its mIoU at the protocol's layer is eval's mIoU."""
    from seg4diff_fast.segmentation.evaluate import evaluate

    img, gt = _planted_image(24, 40)
    ds = write_folder_dataset(tmp_path / "ds", img, gt)
    seg = Segmenter(tiny_pipeline(family), size=None)
    s = analyze(seg, list(dataset_items(seg, ds)), None, num_classes=len(CLASSES), class_names=CLASSES,
                progress=False)
    layer = _resolve_layer(seg, seg.protocol.layers[0])
    got = s["timesteps"][0]["layers"][layer]["mIoU"]
    want = evaluate(seg, ds, str(tmp_path / "ev"), save_predictions=False, progress=False)["mIoU"]
    assert got == pytest.approx(want, abs=1e-9)
