"""Bad command lines for segment / generate / eval (``--model tiny``): every refusal is ONE line that names the
flag as typed, exit code 2, before the model loads (or, for what needs the model's config, before any compute).
Runtime failures exit 1 (``--debug`` shows the traceback); ignored options say so.

Counted bad inputs: ``len(PRELOAD_CASES) + len(CONFIG_CASES)`` fixed cases, plus the hypothesis draws of
``test_random_bad_values_refused_before_loading`` (``FUZZ_EXAMPLES``), plus the subprocess cases."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import seg4diff_fast.segmentation.segmenter as segmenter_module
from seg4diff_fast.cli import build_parser, main
from test_metrics import make_voc

FUZZ_EXAMPLES = 150


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(d / "img.png")
    Image.fromarray(rng.integers(0, 255, (2, 3, 3), dtype=np.uint8)).save(d / "tiny.png")  # < one token (4 px)
    Image.fromarray(np.array([[0.5, np.nan]], np.float32), mode="F").save(d / "nan.tif")
    (d / "notimage.png").write_text("hello")
    (d / "afile").write_text("x")
    (d / "busy").mkdir()
    (d / "busy" / "mine.txt").write_text("keep me")
    (d / "emptyroot").mkdir()
    (d / "classes150.txt").write_text("\n".join(f"class{k}" for k in range(256)))
    make_voc(d / "voc", n=2, h=12, w=16)
    return d


def _fill(argv, d):
    m = {"IMG": str(d / "img.png"), "TINYIMG": str(d / "tiny.png"), "NANIMG": str(d / "nan.tif"),
         "NOTIMG": str(d / "notimage.png"), "FILE": str(d / "afile"), "UNDERFILE": str(d / "afile" / "sub"),
         "BUSY": str(d / "busy"), "VOC": str(d / "voc"), "EMPTYROOT": str(d / "emptyroot"),
         "OUT": str(d / "out"), "MISSING": str(d / "missing.png"), "C256": str(d / "classes150.txt"),
         "DIR": str(d)}
    return [m.get(a, a) for a in argv]


BASE = {
    "segment": ["segment", "IMG", "--classes", "cat,sky", "--model", "tiny", "--out", "OUT"],
    "generate": ["generate", "a cat", "--classes", "cat", "--model", "tiny", "--out", "OUT"],
    "eval": ["eval", "--dataset", "voc20", "--root", "VOC", "--model", "tiny", "--out", "OUT"],
    "analyze": ["analyze", "--prompt", "a cat", "--classes", "cat", "--model", "tiny", "--out", "OUT"],
}


class _Loaded(Exception):
    pass


@pytest.fixture()
def no_load(monkeypatch):
    def boom(*a, **k):
        raise _Loaded("the model was loaded")

    monkeypatch.setattr(segmenter_module, "load_pipeline", boom)


def _run(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.err


def _assert_one_line_usage(rc, err, flag):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert flag in lines[0], (flag, lines[0])
    assert "Traceback" not in err


# (command, extra argv replacing/adding to BASE, flag the message must name)
PRELOAD_CASES = [
    ("generate", ["--height", "0"], "--height"), ("generate", ["--width", "-8"], "--width"),
    ("generate", ["--height", "1.5"], "--height"), ("generate", ["--gen-steps", "0"], "--gen-steps"),
    ("generate", ["--guidance-scale", "-1"], "--guidance-scale"), ("generate", ["--guidance-scale", "nan"], "--guidance-scale"),
    ("generate", ["--guidance-scale", "inf"], "--guidance-scale"),
    ("eval", ["--limit", "-1"], "--limit"), ("eval", ["--limit", "0"], "--limit"), ("eval", ["--limit", "x"], "--limit"),
    ("segment", ["--size", "0"], "--size"), ("segment", ["--size", "-3"], "--size"), ("segment", ["--size", "big"], "--size"),
    ("segment", ["--steps", "0"], "--steps"), ("segment", ["--steps", "-5"], "--steps"),
    ("segment", ["--timestep-index", "99"], "--timestep-index"), ("segment", ["--timestep-index", "-29"], "--timestep-index"),
    ("segment", ["--steps", "5", "--timestep-index", "5"], "--timestep-index"),
    ("eval", ["--steps", "3", "--timestep-index", "-8"], "--timestep-index"),
    ("segment", ["--layers", "-1"], "--layers"), ("segment", ["--layers", "9,,10"], "--layers"),
    ("segment", ["--layers", "9,9"], "--layers"), ("segment", ["--layers", ""], "--layers"),
    ("segment", ["--seed", "-1"], "--seed"), ("segment", ["--seed", str(2 ** 63)], "--seed"),
    ("segment", ["--prompt-batch", "0"], "--prompt-batch"), ("segment", ["--max-classes-per-prompt", "0"], "--max-classes-per-prompt"),
    ("segment", ["--resize", "stretch"], "--resize"), ("segment", ["--combine", "max"], "--combine"),
    ("segment", ["--dtype", "float64"], "--dtype"), ("segment", ["--family", "sdxl"], "--family"),
    ("segment", ["--vae-tiling", "yes"], "--vae-tiling"), ("segment", ["--heatmap-scale", "log"], "--heatmap-scale"),
    ("eval", ["--protocol", "oracle"], "--protocol"), ("eval", ["--dataset", "coco"], "--dataset"),
    ("eval", ["--split", ""], "--split"),
    ("segment", ["--classes", "cat,,sky"], "--classes"), ("segment", ["--classes", ","], "--classes"),
    ("segment", ["--classes", "cat,Cat"], "--classes"), ("segment", ["--classes", " "], "--classes"),
    ("segment", ["--classes", ",".join(f"c{k}" for k in range(256))], "--classes"),
    ("segment", ["--classes", "x" * 300], "--classes"), ("generate", ["--classes", "cat,CAT"], "--classes"),
    ("segment", ["--classes", None, "--classes-file", "C256"], "--classes-file"),
    ("segment", ["--classes", None, "--classes-file", "MISSING"], "--classes-file"),
    ("segment", ["--classes-file", "C256"], "--classes-file"),  # with --classes: mutually exclusive
    ("segment", ["--classes", None], "--classes"), ("generate", ["--classes", None], "--classes"),
    ("segment", ["--out", "FILE"], "--out"), ("segment", ["--out", "UNDERFILE"], "--out"),
    ("generate", ["--out", "FILE"], "--out"), ("generate", ["--out", "BUSY"], "--out"),
    ("generate", ["--out", "DIR"], "--out"), ("generate", ["--out", "."], "--out"),
    ("generate", ["--out", "/"], "--out"), ("eval", ["--out", "FILE"], "--out"),
    ("eval", ["--root", "MISSING"], "--root"), ("eval", ["--root", "EMPTYROOT"], "--root"),
    ("eval", ["--dataset", "ade150"], "--root"),
    ("segment", ["IMG->MISSING"], "IMAGE"), ("segment", ["IMG->NOTIMG"], "IMAGE"), ("segment", ["IMG->NANIMG"], "IMAGE"),
    ("segment", ["IMG->DIR"], "IMAGE"), ("generate", ["a cat->"], "PROMPT"), ("generate", ["a cat->   "], "PROMPT"),
    ("segment", ["--model", "some/unknown-model"], "--model"),
    ("segment", ["--model", "./no/such/folder"], "--model"), ("segment", ["--model", ""], "--model"),
    ("segment", ["--device", "gpu"], "--device"), ("segment", ["--device", "meta"], "--device"),
    ("segment", ["--device", "cuda:99"], "--device"),
    ("segment", ["--bogus"], "--bogus"),
    ("eval", ["--kl-threshold", "0"], "--kl-threshold"), ("eval", ["--kl-threshold", "nan"], "--kl-threshold"),
    ("eval", ["--average", "mean"], "--average"), ("eval", ["--match", "col"], "--match"),
    ("eval", ["--eval-size", "big"], "--eval-size"), ("eval", ["--pred-fit", "crop"], "--pred-fit"),
    ("eval", ["--unsupervised", "--pred-fit", "top-left-crop", "--eval-size", "input"], "--pred-fit"),
    ("segment", ["--shift-seq-len", "0"], "--shift-seq-len"),
    ("segment", ["--shift-seq-len", "fake"], "--shift-seq-len"), ("segment", ["--vae-pixels", "x"], "--vae-pixels"),
    ("segment", ["--normalize", "softmax"], "--normalize"), ("segment", ["--heads", "sum"], "--heads"),
    ("segment", ["--heads", "-1"], "--heads"), ("eval", ["--heads", "max", "--normalize", "logits"], "--heads"),
    ("segment", ["--tta", "--resize", "pad"], "--tta"), ("generate", ["--tta"], "--tta"),
    ("generate", ["--perturb-layers", "1"], "--perturb-layers"), ("generate", ["--perturb-scale", "nan"], "--perturb-scale"),
    # control characters in a class name: refused before the model runs (a newline failed while drawing the legend)
    ("segment", ["--classes", "cat\ndog,sky"], "--classes"), ("segment", ["--classes", "cat\tdog"], "--classes"),
    ("generate", ["a cat->a cat\u2028dog", "--classes", "cat\u2028dog"], "--classes"),
    ("segment", ["--classes", "cat\udcff"], "--classes"),  # an undecodable argv byte
    # every number and list flag through the CLI's parsers: the message names the flag as typed
    ("generate", ["--perturb-scale", "1", "--perturb-sigma", "-1"], "--perturb-sigma"),
    ("generate", ["--perturb-scale", "1", "--perturb-sigma", "nan"], "--perturb-sigma"),
    ("generate", ["--perturb-scale", "inf"], "--perturb-scale"),
    ("generate", ["--perturb-scale", "1", "--perturb-layers", "1,,2"], "--perturb-layers"),
    ("generate", ["--perturb-scale", "1", "--perturb-layers", "-1"], "--perturb-layers"),
    ("generate", ["--perturb-scale", "1", "--perturb-layers", "1,1"], "--perturb-layers"),
    ("analyze", ["--timestep-indices=,-8"], "--timestep-indices"),
    ("analyze", ["--timestep-indices", "1e1"], "--timestep-indices"),
    ("analyze", ["--timestep-indices", "-8,-8"], "--timestep-indices"),
    ("analyze", ["--timestep-indices", "-8,20"], "--timestep-indices"),  # one timestep of the 28-step schedule
    ("analyze", ["--timestep-indices", "-8,28"], "--timestep-indices"),
    ("analyze", ["--steps", "5", "--timestep-indices", "1,-4"], "--timestep-indices"),
    ("analyze", ["--steps", "3", "--timestep-indices", "-8, -4"], "--timestep-indices"),  # not --timestep-index's -8
    ("analyze", ["--limit", "0"], "--limit"), ("analyze", ["--gen-steps", "-1"], "--gen-steps"),
    ("analyze", ["--head-layer", "-1"], "--head-layer"), ("analyze", ["--head-layer", "1,2"], "--head-layer"),
    ("segment", ["--layers", "9,09"], "--layers"), ("eval", ["--kl-threshold", "-inf"], "--kl-threshold"),
]


def _argv(command, extra):
    """BASE[command] changed by ``extra``: ``"OLD->NEW"`` replaces a positional; a flag and its value replace the
    flag's value in BASE (value None: drop the flag); a flag followed by a flag or nothing is appended alone."""
    argv = list(BASE[command])
    i = 0
    while i < len(extra):
        a = extra[i]
        if "->" in a:
            old, new = a.split("->", 1)
            argv[argv.index(old)] = new
            i += 1
            continue
        has_value = i + 1 < len(extra) and (extra[i + 1] is None or not extra[i + 1].startswith("--"))
        if a in argv:
            j = argv.index(a)
            del argv[j:j + 2]
        if has_value:
            if extra[i + 1] is not None:
                argv += [a, extra[i + 1]]
            i += 2
        else:
            argv.append(a)
            i += 1
    return argv


@pytest.mark.parametrize("command,extra,flag", PRELOAD_CASES)
def test_refused_before_loading(files, no_load, capsys, command, extra, flag):
    rc, err = _run(_fill(_argv(command, extra), files), capsys)
    _assert_one_line_usage(rc, err, flag)


# values no flag accepts, drawn at random
_BAD_INT = st.one_of(st.integers(max_value=0).map(str), st.sampled_from(["", "1.5", "1e3", "two", "0x10", "--"]))
_BAD_TEXT = st.text(min_size=1, max_size=12).filter(lambda s: not s.startswith("-"))
FUZZ_FLAGS = [
    ("generate", "--height", _BAD_INT), ("generate", "--width", _BAD_INT), ("generate", "--gen-steps", _BAD_INT),
    ("eval", "--limit", _BAD_INT), ("segment", "--steps", _BAD_INT), ("segment", "--prompt-batch", _BAD_INT),
    ("segment", "--max-classes-per-prompt", _BAD_INT),
    ("segment", "--seed", st.one_of(st.integers(max_value=-1), st.integers(min_value=2 ** 63)).map(str)),
    ("segment", "--size", st.one_of(st.integers(max_value=0).map(str), _BAD_TEXT.filter(lambda s: s != "native" and not s.strip().lstrip("+").isdigit()))),
    ("segment", "--timestep-index", st.one_of(st.integers(min_value=28), st.integers(max_value=-29)).map(str)),
    ("segment", "--layers", st.one_of(st.integers(max_value=-1).map(str),
                                      st.lists(st.integers(0, 30).map(str), min_size=2).map(lambda l: ",".join(l + l[:1])),
                                      st.sampled_from([",", "9,", ",9", " , "]))),
    ("generate", "--guidance-scale", st.one_of(st.floats(max_value=-1e-9).map(repr), st.sampled_from(["nan", "inf", "-inf", "x"]))),
    ("segment", "--resize", _BAD_TEXT.filter(lambda s: s not in ("square", "aspect", "pad"))),
    ("eval", "--protocol", _BAD_TEXT.filter(lambda s: s not in ("gt", "full"))),
    ("analyze", "--timestep-indices", st.one_of(
        # each list ends with another index of its first timestep (-8 and 20 of 28 steps are one)
        st.lists(st.integers(-28, 27), min_size=1).map(lambda l: ",".join(map(str, l + [l[0] % 28 - 28 * (l[0] >= 0)]))),
        st.sampled_from([",", "-8,", ",-8", "1e1", "-8.0", "0x1", "eight", "-8,,-4"]))),
    ("generate", "--perturb-sigma", st.one_of(st.floats(max_value=-1e-9).map(repr), st.sampled_from(["nan", "x", ""]))),
    ("generate", "--perturb-scale", st.sampled_from(["nan", "inf", "-inf", "x", ""])),
    ("segment", "--classes", st.lists(st.sampled_from(["cat", "", " ", "Cat", "CAT"]), min_size=2).map(",".join)
     .filter(lambda s: any(not p.strip() for p in s.split(",")) or len({p.strip().lower() for p in s.split(",")}) < len(s.split(",")))),
]


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_bad_values_refused_before_loading(files, no_load, capsys, data):
    command, flag, values = data.draw(st.sampled_from(FUZZ_FLAGS))
    value = data.draw(values)
    argv = [a for a in _fill(BASE[command], files)]
    if flag in argv:
        j = argv.index(flag)
        del argv[j:j + 2]
    rc, err = _run(argv + [f"{flag}={value}"], capsys)
    _assert_one_line_usage(rc, err, flag)


# ---------------------------------------------------------------- needs the model's config: after load, before compute
@pytest.fixture()
def no_compute(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("computed before refusing")

    monkeypatch.setattr(segmenter_module.Segmenter, "_encode_image", boom)
    monkeypatch.setattr(segmenter_module, "capture_attention_source", boom)


CONFIG_CASES = [
    ("segment", ["--layers", "99"], "--layers"), ("segment", ["--layers", "transformer_blocks.99"], "--layers"),
    ("segment", ["--layers", "1,99"], "--layers"), ("eval", ["--layers", "4"], "--layers"),
    ("segment", ["--size", "4000"], "--size"), ("segment", ["--size", "2"], "--size"),
    ("segment", ["--size", "native", "--resize", "aspect", "IMG->TINYIMG"], "IMAGE"),
    ("segment", ["--classes", " ".join(f"w{k}" for k in range(40))], "--classes"),  # > one prompt of 77 tokens
    ("generate", ["--height", "6"], "--height"), ("generate", ["--width", "4000"], "--width"),
    ("generate", ["a cat->a dog"], "--classes"),
    ("generate", ["--perturb-scale", "1", "--perturb-layers", "99"], "--perturb-layers"),
    ("segment", ["--heads", "4"], "--heads"), ("eval", ["--heads", "7"], "--heads"),  # the tiny model has 4 heads
]


@pytest.mark.parametrize("command,extra,flag", CONFIG_CASES)
def test_refused_after_config_before_compute(files, no_compute, capsys, command, extra, flag):
    rc, err = _run(_fill(_argv(command, extra), files), capsys)
    _assert_one_line_usage(rc, err, flag)


def test_ignored_options_are_named(files, monkeypatch, capsys):
    monkeypatch.setattr(segmenter_module, "load_pipeline", lambda *a, **k: (_ for _ in ()).throw(_Loaded("stop")))
    rc, err = _run(_fill(BASE["segment"] + ["--family", "flux", "--dtype", "float16"], files), capsys)
    assert "--family is ignored with --model tiny" in err and "--dtype is ignored" in err and rc == 1
    rc, err = _run(_fill(["segment", "IMG", "--unsupervised", "--classes", "cat", "--model", "tiny", "--out", "OUT"],
                         files), capsys)
    assert "--classes is ignored with --unsupervised" in err
    rc, err = _run(_fill(BASE["generate"] + ["--steps", "5"], files), capsys)
    assert "--steps is ignored by generate" in err


def test_runtime_failure_is_one_line_exit_1_and_debug_shows_the_traceback(files, monkeypatch, capsys):
    monkeypatch.setattr(segmenter_module, "load_pipeline", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no GPU\nat all")))
    rc, err = _run(_fill(BASE["segment"], files), capsys)
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "RuntimeError: no GPU at all" in err and "--debug" in err
    rc, err = _run(_fill(BASE["segment"] + ["--debug"], files), capsys)
    assert rc == 1 and "Traceback" in err
    rc, err = _run(["--debug"] + _fill(BASE["segment"], files), capsys)
    assert rc == 1 and "Traceback" in err


def test_every_option_help_shows_its_default():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("segment", "generate", "eval"):
        for action in sub.choices[name]._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            assert action.help and ("default" in action.help or "required" in action.help), (name, action.option_strings)


# ---------------------------------------------------------------- as a user types it
def _cli(args, cwd, env=None):
    return subprocess.run(["seg4diff-fast", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **(env or {})))


def test_typed_commands(files, tmp_path):
    p = _cli(["generate", "a cat", "--classes", "cat", "--model", "tiny", "--height", "0"], tmp_path)
    assert p.returncode == 2 and p.stderr.strip() == ("seg4diff-fast generate: error: argument --height: must be an "
                                                      "integer >= 1, got 0")
    p = _cli(["segment", str(files / "img.png"), "--classes", "cat", "--model", "tiny", "--layers", "99"], tmp_path)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--layers" in p.stderr, p.stderr
    assert not (tmp_path / "seg4diff_out").exists()  # nothing written
    p = _cli(["segment", str(files / "img.png"), "--classes", "cat", "--model", "someone/sd3-not-cached"],
             tmp_path, {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    # exit 1, our own one-line error last (the hub client may log its own warnings above it), no traceback
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and last.startswith("seg4diff-fast segment: error: RuntimeError: ") and "--debug" in last
    assert "Traceback" not in p.stderr and "--model tiny" in last


def test_typed_eval_resume_refused_and_bad_sample_exit_3(files, tmp_path):
    import shutil

    voc = tmp_path / "voc"
    shutil.copytree(files / "voc", voc)
    ids = sorted(os.path.splitext(f)[0] for f in os.listdir(voc / "JPEGImages"))
    (voc / "JPEGImages" / f"{ids[1]}.jpg").write_bytes(b"broken")
    out = tmp_path / "ev"
    base = ["eval", "--dataset", "voc20", "--root", str(voc), "--model", "tiny", "--out", str(out)]
    p = _cli(base, tmp_path)
    assert p.returncode == 3, p.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["counts"] == {"done": 1, "failed": 1, "skipped": 0} and s["failed"][0]["id"] == ids[1]
    p = _cli(base + ["--seed", "1"], tmp_path)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "--out" in p.stderr and "seed" in p.stderr and "--overwrite" in p.stderr
    p = _cli(base + ["--seed", "1", "--overwrite", "--no-predictions"], tmp_path)
    assert p.returncode == 3, p.stderr
    assert json.loads((out / "summary.json").read_text())["settings"]["segmenter"]["protocol"]["seed"] == 1
    assert not (out / "pred").exists()


def test_default_eval_folder_names_the_model():
    from seg4diff_fast.segmentation.commands import _default_eval_out

    args = argparse.Namespace(model="stabilityai/stable-diffusion-3-medium-diffusers", dataset="voc20", protocol="gt")
    assert _default_eval_out(args) == os.path.join("seg4diff_eval",
                                                   "stabilityai--stable-diffusion-3-medium-diffusers_voc20_gt")
    args.model, args.protocol = "tiny", "full"
    assert _default_eval_out(args) == os.path.join("seg4diff_eval", "tiny_voc20_full")


def test_long_class_name_reported_with_its_real_token_count(files, no_compute, capsys):
    from seg4diff_fast.segmentation.tiny import tiny_clip_tokenizer

    name = " ".join(f"w{k}" for k in range(101))
    real = len(tiny_clip_tokenizer()(name, add_special_tokens=False)["input_ids"])
    assert real > 77
    capsys.readouterr()  # transformers' own warning about that long text
    rc, err = _run(_fill(_argv("segment", ["--classes", name, "--no-heatmaps"]), files), capsys)
    _assert_one_line_usage(rc, err, "--classes")
    assert f"is {real} tokens" in err, err


def test_minmax_constant_maps():
    """--combine minmax: a constant map has no range; every class constant (a one-token grid) keeps the raw
    scores (class 0 won every pixel); a constant class among varying ones gets 0; the others span [0, 1]."""
    import torch

    from seg4diff_fast.segmentation.segmenter import _combine

    one_token = torch.tensor([[0.1], [0.3], [0.2]])
    assert _combine(one_token, "minmax").argmax(0).item() == 1
    flat = torch.full((2, 5), 0.25)
    assert torch.equal(_combine(flat, "minmax"), flat)
    mixed = torch.tensor([[0.2, 0.2, 0.2], [0.1, 0.5, 0.3], [1e-3, 3e-3, 2e-3]])
    out = _combine(mixed, "minmax")
    assert torch.equal(out[0], torch.zeros(3))
    half = torch.tensor([0.0, 1.0, 0.5])
    assert torch.allclose(out[1], half) and torch.allclose(out[2], half)


def _python_cli(args, cwd):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-m", "seg4diff_fast.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=root))


def test_typed_late_or_unclear_errors(files, tmp_path):
    """As typed in a shell (``python -m seg4diff_fast.cli`` from the repository root): each refused with exit 2 and
    one line naming the flag, nothing written."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    img, out = str(files / "img.png"), str(tmp_path / "o")
    cases = [
        (["segment", img, "--classes", "cat\ndog", "--model", "tiny", "--out", out], "--classes", "control character"),
        (["analyze", "--prompt", "a cat", "--classes", "cat", "--model", "tiny", "--timestep-indices", "-8,-8",
          "--out", out], "--timestep-indices", "given twice"),
        (["analyze", "--prompt", "a cat", "--classes", "cat", "--model", "tiny", "--timestep-indices", ",-8",
          "--out", out], "--timestep-indices", "empty item"),
        (["analyze", "--prompt", "a cat", "--classes", "cat", "--model", "tiny", "--timestep-indices", "1e1",
          "--out", out], "--timestep-indices", "'1e1'"),
        (["generate", "a cat", "--classes", "cat", "--model", "tiny", "--perturb-scale", "1", "--perturb-sigma", "-1",
          "--out", out], "--perturb-sigma", ">= 0"),
    ]
    for argv, flag, words in cases:
        p = _python_cli(argv, root)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1, (argv, p.stderr)
        assert flag in lines[0] and words in lines[0] and "sigma must" not in lines[0], lines[0]
    assert not os.path.exists(out)


def test_typed_minmax_on_a_one_token_grid(tmp_path):
    """A 4x4 image at its own size is one token of the tiny model: minmax keeps the raw winner, not class 0."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).save(tmp_path / "px.png")
    winners = {}
    for how in ("raw", "minmax"):
        p = _python_cli(["segment", str(tmp_path / "px.png"), "--classes", "cat,dog,sky", "--model", "tiny", "--size",
                         "native", "--combine", how, "--no-heatmaps", "--out", str(tmp_path / how)], root)
        assert p.returncode == 0, p.stderr
        summary = json.loads((tmp_path / how / "px" / "summary.json").read_text())
        assert summary["meta"]["geometry"]["grid"] == [1, 1]
        winners[how] = max(summary["pixel_share"], key=summary["pixel_share"].get)
    assert winners["minmax"] == winners["raw"] != "cat", winners


def test_every_number_flag_uses_the_cli_parsers():
    """No subcommand parses a number with a bare int/float (no flag name, NaN and '1e1' accepted); the commands of
    this branch take theirs from seg4diff_fast.cli (bench keeps its own int_range / csv_arg for now)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    ours = ("integer", "integer_or", "number", "integer_list")
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.type is None or not action.option_strings:
                continue
            assert action.type not in (int, float), (name, action.option_strings)
            numeric = isinstance(action.default, (int, float)) and not isinstance(action.default, bool)
            qual = getattr(action.type, "__qualname__", "")
            if name != "bench" and (numeric or qual.split(".")[0] in ours):
                assert action.type.__module__ == "seg4diff_fast.cli" and qual.split(".")[0] in ours, \
                    (name, action.option_strings, qual)
