"""``seg4diff-fast segment / generate / eval`` end to end with ``--model tiny``; outputs opened and checked.

The attention is read by ``seg4diff_fast.capture`` from the tiny models' real forwards.
"""
import json
import os

import numpy as np
import pytest
from PIL import Image

from seg4diff_fast.cli import main


def run(argv):
    """The command line in this process: its exit code (argparse's errors exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    paths = []
    for name, (h, w) in [("wide.png", (40, 72)), ("tall.jpg", (60, 36))]:
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / name)
        paths.append(str(d / name))
    return paths


def test_segment_tiny_writes_everything(tmp_path, images, capsys):
    out = tmp_path / "out"
    rc = run(["segment", *images, "--classes", "cat, grass ,sky", "--model", "tiny", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    for path, stem in zip(images, ["wide", "tall"]):
        w, h = Image.open(path).size
        d = out / stem
        lab_im = Image.open(d / "labels.png")
        assert lab_im.mode == "P" and lab_im.size == (w, h)
        lab = np.array(lab_im)
        assert lab.max() < 3
        ov = Image.open(d / "overlay.png")
        assert ov.height >= h and ov.width > w  # legend on the right
        heat = sorted(os.listdir(d / "heatmaps"))
        assert heat == ["000_cat.png", "001_grass.png", "002_sky.png"]
        hw, hh = Image.open(d / "heatmaps" / heat[0]).size
        assert hw > w and hh > h  # the map at the input's size, a title above it, a colour bar beside it
        summary = json.loads((d / "summary.json").read_text())
        assert summary["classes"] == ["cat", "grass", "sky"]
        assert sum(summary["pixel_share"].values()) == pytest.approx(1.0)
        assert summary["meta"]["prompts"] == ["cat grass sky"]
        assert not [f for f in os.listdir(d) if f.startswith(".tmp")]


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3.5"])
def test_segment_tiny_other_families(tmp_path, images, model):
    rc = run(["segment", images[1], "--classes", "cat,traffic light", "--model", model, "--size", "native",
              "--out", str(tmp_path)])
    assert rc == 0
    assert np.array(Image.open(tmp_path / "tall" / "labels.png")).shape == (60, 36)


def test_segment_unsupervised_tiny(tmp_path, images):
    assert run(["segment", images[0], "--unsupervised", "--model", "tiny", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "wide" / "summary.json").read_text())["classes"][0] == "segment 0"


@pytest.mark.parametrize("model", ["tiny", "tiny-flux"])
def test_generate_tiny(tmp_path, model):
    rc = run(["generate", "a cat on the grass", "--classes", "cat,grass", "--model", model, "--gen-steps", "2",
              "--height", "64", "--width", "96", "--out", str(tmp_path)])
    assert rc == 0
    assert Image.open(tmp_path / "image.png").size == (96, 64)
    assert np.array(Image.open(tmp_path / "labels.png")).shape == (64, 96)


def test_eval_tiny_voc(tmp_path):
    from test_metrics import make_voc

    make_voc(tmp_path / "voc", n=2, h=24, w=32)
    out = tmp_path / "ev"
    rc = run(["eval", "--dataset", "voc20", "--root", str(tmp_path / "voc"), "--model", "tiny", "--out", str(out),
              "--protocol", "full", "--max-classes-per-prompt", "7"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["num_images"] == 2 and len(s["confusion"]) == 20 and 0 <= s["mIoU"] <= 100
    assert s["counts"] == {"done": 2, "failed": 0, "skipped": 0} and s["model"] == "tiny"


@pytest.mark.parametrize("argv,message", [
    (["segment", "IMG", "--model", "tiny"], "--classes is required"),
    (["segment", "IMG", "--classes", "cat,,sky", "--model", "tiny"], "empty names"),
    (["segment", "IMG", "--classes", "cat,Cat", "--model", "tiny"], "duplicate"),
    (["segment", "MISSING", "--classes", "cat", "--model", "tiny"], "no such file"),
    (["segment", "BAD", "--classes", "cat", "--model", "tiny"], "cannot read"),
    (["eval", "--dataset", "voc20", "--root", "MISSING", "--model", "tiny"], "not a folder"),
])
def test_cli_bad_input(tmp_path, images, argv, message, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a jpeg")
    argv = [{"IMG": images[0], "MISSING": str(tmp_path / "nope.jpg"), "BAD": str(bad)}.get(a, a) for a in argv]
    assert run(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_model_offline_says_what_to_do(tmp_path, images, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    rc = run(["segment", images[0], "--classes", "cat", "--model", "stabilityai/stable-diffusion-3-medium-diffusers"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "--model tiny" in err


def test_segment_video_frames_folder(tmp_path, capsys):
    """--video: a folder of frames -> one result folder per frame (labels at the frame's size, its latent frame)."""
    frames = tmp_path / "clip"
    frames.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (30, 44, 3), dtype=np.uint8)).save(frames / f"f{i:02d}.png")
    out = tmp_path / "out"
    rc = run(["segment", str(frames), "--video", "--classes", "cat,sky", "--model", "tiny-cogvideox", "--size", "32",
              "--out", str(out), "--no-heatmaps"])
    assert rc == 0, capsys.readouterr().err
    got = sorted(os.listdir(out / "clip"))
    assert got == [f"f{i:02d}" for i in range(6)]
    for i, name in enumerate(got):
        lab = Image.open(out / "clip" / name / "labels.png")
        assert lab.size == (44, 30) and np.array(lab).max() < 2
        summary = json.loads((out / "clip" / name / "summary.json").read_text())
        assert summary["frame"] == i and summary["meta"]["latent_frame"] == (0 if i == 0 else (i - 1) // 4 + 1)


def test_segment_video_flag_needs_a_video_family(tmp_path, images, capsys):
    frames = tmp_path / "clip"
    frames.mkdir()
    Image.open(images[0]).save(frames / "a.png")
    rc = run(["segment", str(frames), "--video", "--classes", "cat", "--model", "tiny", "--out", str(tmp_path / "o")])
    assert rc == 2 and "--video" in capsys.readouterr().err
    rc = run(["segment", images[0], "--classes", "cat", "--model", "tiny-cogvideox", "--out", str(tmp_path / "o")])
    assert rc == 2 and "--video" in capsys.readouterr().err


def test_segment_tiny_qwenimage(tmp_path, images, capsys):
    rc = run(["segment", images[0], "--classes", "cat,traffic light", "--model", "tiny-qwenimage", "--size", "32",
              "--out", str(tmp_path / "out"), "--no-heatmaps"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "wide" / "summary.json").read_text())
    assert summary["settings"]["family"] == "qwenimage" and summary["settings"]["protocol"]["layers"] == [1]


def test_result_folder_names_unique_for_any_inputs():
    """``segment``'s folder per input: the stem, or the stem with the smallest free ``_N``; names equal up to case
    or Unicode normalisation count as one (case-insensitive filesystems: macOS, Windows)."""
    import itertools
    import random
    import unicodedata

    from seg4diff_fast.segmentation.commands import _folder_key, _stems

    assert _stems(["a/img.png", "b/img.png", "c/img_1.png"]) == ["img", "img_2", "img_1"]
    assert _stems(["IMG.png", "img.jpg"]) == ["IMG", "img_1"]
    nfd = unicodedata.normalize("NFD", "caf\u00e9")
    assert _stems(["caf\u00e9.png", nfd + ".png"]) == ["caf\u00e9", nfd + "_1"]
    assert _stems(["frames/", "x/.png"]) == ["frames", ".png"]  # a folder given with a trailing slash keeps its name
    rng = random.Random(0)
    words = ["img", "IMG", "img_1", "Img_1", "img_2", "img_1_1", "x", "x_1"]
    for _ in range(300):
        paths = [f"d{i}/{rng.choice(words)}.{rng.choice(['png', 'jpg'])}" for i in range(rng.randint(1, 7))]
        names = _stems(paths)
        assert len({_folder_key(n) for n in names}) == len(names), (paths, names)
        for p, n in zip(paths, names):  # each name is its input's stem, or that stem with a suffix
            stem = os.path.splitext(os.path.basename(p))[0]
            assert n == stem or (n.startswith(stem + "_") and n[len(stem) + 1:].isdigit())
        # an input whose own stem is unique keeps it
        for p, n in zip(paths, names):
            stem = os.path.splitext(os.path.basename(p))[0]
            if sum(_folder_key(os.path.splitext(os.path.basename(q))[0]) == _folder_key(stem) for q in paths) == 1:
                assert n == stem
    assert list(itertools.islice(_stems(["a/x.png"] * 4), 4)) == ["x", "x_1", "x_2", "x_3"]


def test_segment_typed_same_names_in_other_folders(tmp_path):
    """As typed in a shell: ``a/img.png b/img.png c/img_1.png`` gave img, img_1, img_1 (one result replaced)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rng = np.random.default_rng(1)
    paths = []
    for rel in ["a/img.png", "b/img.png", "c/img_1.png", "d/IMG.png"]:
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(tmp_path / rel)
        paths.append(str(tmp_path / rel))
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "seg4diff_fast.cli", "segment", *paths, "--classes", "cat,dog",
                        "--model", "tiny", "--no-heatmaps", "--out", str(out)], cwd=root, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHONPATH=root))
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(out)) == ["IMG_3", "img", "img_1", "img_2"]
    sources = {d: json.loads((out / d / "summary.json").read_text())["image"] for d in os.listdir(out)}
    assert sources == {"img": paths[0], "img_2": paths[1], "img_1": paths[2], "IMG_3": paths[3]}


def test_a_result_written_meanwhile_by_another_run_is_kept(tmp_path, images, capsys, monkeypatch):
    """Two segment runs at once into one --out, each with an image named wide.png: both checked an empty --out,
    and the one that finished last replaced the other's result, both exit 0 (hostile round, issue 19). Now the
    result found in place is kept and the later run fails naming it."""
    from seg4diff_fast.segmentation.segmenter import Segmenter

    out = tmp_path / "out"
    real = Segmenter.segment

    def other_run_finishes_first(self, *args, **kwargs):
        res = real(self, *args, **kwargs)
        os.makedirs(out / "wide")
        (out / "wide" / "summary.json").write_text('{"image": "the other run\'s"}')
        return res

    monkeypatch.setattr(Segmenter, "segment", other_run_finishes_first)
    rc = run(["segment", images[0], "--classes", "cat,sky", "--model", "tiny", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "wide exists (written by another run meanwhile?): kept, this result not written" in err, err
    assert os.listdir(out / "wide") == ["summary.json"]
    assert json.loads((out / "wide" / "summary.json").read_text()) == {"image": "the other run's"}
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]


def test_generate_keeps_a_result_written_meanwhile_by_another_run(tmp_path, capsys, monkeypatch):
    """Two generate runs at once into one --out: the later one replaced the other's image and labels, both exit 0
    (hostile round, issue 19). A result folder there when the run starts is still replaced (a rerun)."""
    from seg4diff_fast.segmentation.segmenter import Segmenter

    out = tmp_path / "out"
    argv = ["generate", "a cat", "--classes", "cat", "--model", "tiny", "--gen-steps", "1", "--height", "16",
            "--width", "16", "--no-heatmaps", "--out", str(out)]
    real = Segmenter.generate

    def other_run_finishes_first(self, *args, **kwargs):
        res = real(self, *args, **kwargs)
        os.makedirs(out, exist_ok=True)
        (out / "summary.json").write_text('{"prompt": "the other run\'s"}')
        return res

    monkeypatch.setattr(Segmenter, "generate", other_run_finishes_first)
    rc = run(argv)
    err = capsys.readouterr().err
    assert rc == 1 and "exists (written by another run meanwhile?): kept, this result not written" in err, err
    assert json.loads((out / "summary.json").read_text()) == {"prompt": "the other run's"}
    monkeypatch.setattr(Segmenter, "generate", real)
    assert run(argv) == 0  # there when the run started: a rerun replaces it
    assert json.loads((out / "summary.json").read_text())["prompt"] == "a cat"
