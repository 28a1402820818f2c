"""MAGNET training (``seg4diff_fast.magnet.train``): a planted task it must learn, exact resume after a kill,
the command line, and the trained LoRA in the Segmenter. CPU, the tiny random SD3, 32-pixel images."""
import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seg4diff_fast.cli import build_parser, main
from seg4diff_fast.magnet.train import TrainConfig, latest_checkpoint, train, trainable_maps

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("magnet_planted", ROOT / "benchmarks" / "magnet_planted.py")
planted = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(planted)


@pytest.fixture
def one_thread():
    # the tiny model's ops are microseconds: torch's thread pool only adds contention on a shared CPU (10x here)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def planted_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    return (planted.make_planted(str(root / "train"), 48, 0, "coco"),
            planted.make_planted(str(root / "val"), 16, 1, "folder"))


@pytest.fixture(scope="module")
def planted_run(planted_data, tmp_path_factory):
    """One planted training run shared by the tests that read its result."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_root, val_root = planted_data
        out = str(tmp_path_factory.mktemp("planted_out"))
        cfg = TrainConfig(data_root=train_root, val_root=val_root, output_dir=out, steps=PLANTED_STEPS, val_every=0,
                          checkpoint_every=0, **planted.PLANTED)
        result = train(cfg)
    finally:
        torch.set_num_threads(n)
    return cfg, result


PLANTED_STEPS = 60
PLANTED_MARGIN = 10.0  # mIoU points


def test_planted_task_raises_validation_miou(planted_run):
    cfg, result = planted_run
    val = result["val"]
    assert [v["step"] for v in val] == [0, PLANTED_STEPS]
    start, end = val[0]["mIoU"], val[-1]["mIoU"]
    print(f"planted task: validation mIoU {start:.1f} -> {end:.1f} after {PLANTED_STEPS} steps, "
          f"{result['seconds_per_step']:.3f} s/step")
    assert end >= start + PLANTED_MARGIN, (start, end)
    # the logs and the outputs a user reads
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, PLANTED_STEPS + 1))
    assert all(r["loss"] == pytest.approx(r["fm"] * cfg.fm_weight + cfg.focal_weight * r["focal"]
                                          + cfg.dice_weight * r["dice"], rel=1e-4, abs=1e-5)
               for r in rows if "loss" in r)
    summary = json.load(open(os.path.join(cfg.output_dir, "summary.json")))
    assert summary["val"] == val and summary["candidates"] == "token" and summary["mask_layer"] == 2
    assert os.path.isfile(result["lora"])


def test_trained_lora_loads_into_segmenter(planted_run, planted_data, tmp_path, one_thread):
    """The saved LoRA, loaded into a fresh pipeline, gives the Segmenter exactly the mIoU that training measured
    with its in-memory weights; without it the Segmenter gives the starting mIoU."""
    from seg4diff_fast.magnet.train import apply_lora
    from seg4diff_fast.segmentation import Segmenter, tiny_pipeline
    from seg4diff_fast.segmentation.datasets import open_dataset
    from seg4diff_fast.segmentation.evaluate import evaluate

    cfg, result = planted_run
    val = open_dataset("folder", planted_data[1])

    def miou(seg, name):
        return evaluate(seg, val, str(tmp_path / name), save_predictions=False, progress=False)["mIoU"]

    base = Segmenter(tiny_pipeline("sd3"), size=cfg.size, seed=cfg.seed)
    assert miou(base, "base") == pytest.approx(result["val"][0]["mIoU"], abs=1e-9)
    tuned = apply_lora(Segmenter(tiny_pipeline("sd3"), size=cfg.size, seed=cfg.seed), result["lora"])
    assert miou(tuned, "lora") == pytest.approx(result["val"][-1]["mIoU"], abs=1e-9)
    assert tuned.settings()["model"] != base.settings()["model"]  # an eval's fingerprint tells them apart


def test_eval_cli_takes_the_lora(planted_run, planted_data, tmp_path, one_thread, capsys):
    """`seg4diff-fast eval --lora PATH` evaluates the adapted model: its mIoU is the Python API's with the same
    LoRA applied (and run.json names the LoRA); a missing path is a one-line usage error, exit 2."""
    from seg4diff_fast.cli import main
    from seg4diff_fast.magnet.train import apply_lora
    from seg4diff_fast.segmentation import Segmenter
    from seg4diff_fast.segmentation.datasets import open_dataset
    from seg4diff_fast.segmentation.evaluate import evaluate

    cfg, result = planted_run
    _, val_root = planted_data
    argv = ["eval", "--dataset", "folder", "--root", val_root, "--model", "tiny", "--size", str(cfg.size),
            "--seed", str(cfg.seed), "--no-predictions", "--lora", result["lora"], "--out", str(tmp_path / "cli")]
    assert main(argv) == 0
    cli = json.load(open(tmp_path / "cli" / "summary.json"))
    seg = apply_lora(Segmenter.from_pretrained("tiny", size=cfg.size, seed=cfg.seed), result["lora"])
    api = evaluate(seg, open_dataset("folder", val_root), str(tmp_path / "api"), save_predictions=False,
                   progress=False)
    assert cli["mIoU"] == pytest.approx(api["mIoU"], abs=1e-9)
    assert "+lora:" in json.load(open(tmp_path / "cli" / "run.json"))["settings"]["segmenter"]["model"]
    capsys.readouterr()  # the runs' progress bars
    with pytest.raises(SystemExit) as e:
        main(argv[:-4] + ["--lora", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lora" in err[0] and "missing.safetensors" in err[0], err


def _cli_train(data, out, steps, extra=()):
    train_root, _ = data
    return ["train", "--model", "tiny", "--data-root", train_root, "--output-dir", out, "--size", "32",
            "--steps", str(steps), "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-2", "--warmup-steps", "2",
            "--max-grad-norm", "1", "--num-workers", "1", "--no-progress", "--no-val-at-start", "--hflip", "0.5",
            "--candidates", "token", "--image-transform", "squash", "--lr-scheduler", "cosine", *extra]


def _lora(path):
    from safetensors.torch import load_file

    return load_file(path)


def test_kill_and_resume_is_exact(planted_data, tmp_path, one_thread, capsys):
    """A run killed (SIGKILL) after a checkpoint and resumed with --resume latest ends with the same LoRA, bit for
    bit, and logs the same losses as a run never interrupted."""
    steps, every = 12, 2
    killed = str(tmp_path / "killed")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "seg4diff_fast.cli",
                             *_cli_train(planted_data, killed, steps, ["--checkpoint-every", str(every)])],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while latest_checkpoint(killed) is None and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    at_kill = latest_checkpoint(killed)
    assert at_kill is not None and not os.path.exists(os.path.join(killed, "pytorch_lora_weights.safetensors"))
    resumed_from = int(os.path.basename(at_kill)[5:])
    assert 0 < resumed_from < steps

    # other settings than the checkpoint's are refused (here the learning rate), before anything runs
    assert main(_cli_train(planted_data, killed, steps, ["--resume", "latest", "--lr", "2e-2"])) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(_cli_train(planted_data, killed, steps, ["--checkpoint-every", str(every), "--resume", "latest"])) == 0
    whole = str(tmp_path / "whole")
    assert main(_cli_train(planted_data, whole, steps, ["--checkpoint-every", "0"])) == 0

    a = _lora(os.path.join(killed, "pytorch_lora_weights.safetensors"))
    b = _lora(os.path.join(whole, "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)  # it trained

    def losses(folder):
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            return [(r["step"], r["loss"], r["fm"], r["dice"]) for r in map(json.loads, f) if "loss" in r]

    assert losses(killed) == losses(whole) and len(losses(whole)) == steps
    summary = json.load(open(os.path.join(killed, "summary.json")))
    assert summary["resumed_from"] == at_kill
    assert not [n for n in os.listdir(os.path.join(killed, "checkpoints")) if n.startswith(".tmp-")]


def test_train_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        if isinstance(f.default, bool):
            assert "--no-" + f.name.replace("_", "-") in text
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    for action in sub._actions:  # the CLI's convention: every option says its default
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            assert "default" in action.help or "required" in action.help, action.option_strings
    # and the parser gives back exactly the dataclass' defaults
    from seg4diff_fast.magnet.train import config_from_args

    args = build_parser().parse_args(["train", "--data-root", "somewhere"])
    assert config_from_args(args) == TrainConfig(data_root="somewhere")
    args = build_parser().parse_args(["train", "--data-root", "somewhere", "--cost-thresh", "0.75"])
    assert config_from_args(args).cost_thresh == 0.75 and TrainConfig().cost_thresh is None


@pytest.mark.parametrize("argv, flag", [
    (["--steps", "0"], "--steps"),
    (["--lr", "fast"], "--lr"),
    (["--lora-blocks", "1,x"], "--lora-blocks"),
    (["--candidates", "pixel"], "--candidates"),
    (["--data-root", "/no/such/folder"], "--data-root"),
    (["--val-root", "/no/such/folder"], "--val-root"),
    (["--data-kind", "sa1b", "--candidates", "token"], "--candidates"),
    (["--mixed-precision", "fp16", "--cpu"], "--mixed-precision"),
    (["--resume", "/no/such/checkpoint"], "--resume"),
    (["--focal-weight", "0", "--dice-weight", "0", "--fm-weight", "0"], "--fm-weight"),
    (["--model", "tiny", "--size", "30"], "--size"),
    (["--model", "tiny", "--mask-layer", "9"], "--mask-layer"),
    (["--model", "tiny-flux"], "--model"),
    (["--model", "tiny-qwenimage"], "--model"),
    (["--cost-thresh", "0.5"], "--cost-thresh"),  # coco: token candidates, matched by index (no cost)
    (["--data-kind", "sa1b", "--cost-thresh", "0"], "--cost-thresh"),
    (["--data-kind", "sa1b", "--cost-thresh", "-1"], "--cost-thresh"),
    (["--val-kl-threshold", "0"], "--val-kl-threshold"),
    (["--val-protocol", "gt", "--val-kl-threshold", "0.1"], "--val-kl-threshold"),  # gt merges nothing
])
def test_train_bad_arguments_are_one_line_usage_errors(argv, flag, planted_data, capsys, tmp_path):
    full = ["train", "--data-root", planted_data[0], "--output-dir", str(tmp_path / "o"), "--no-progress"] + argv
    try:
        rc = main(full)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and flag in err, err
    assert not os.path.exists(tmp_path / "o" / "checkpoints")


def test_trainable_maps_gradients_survive_gradient_checkpointing(one_thread):
    """The mask layer's maps keep their graph when the blocks are recomputed in the backward: the LoRA gradients of
    a maps + output loss are the same with and without gradient checkpointing."""
    from seg4diff_fast.magnet.lora import add_lora, lora_config
    from seg4diff_fast.segmentation import tiny_pipeline

    pipe = tiny_pipeline("sd3")
    torch.manual_seed(0)
    params = add_lora(pipe.transformer, lora_config(4))
    with torch.no_grad():
        for p in params:  # B = 0 at init would hide A's gradient
            p.normal_(0, 0.1)
        pe, _, pooled, _ = pipe.encode_prompt(prompt=["a cat", "grass"], prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=False, max_sequence_length=7)
    x = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(1))

    def grads(checkpointing):
        tf = pipe.transformer
        tf.enable_gradient_checkpointing() if checkpointing else tf.disable_gradient_checkpointing()
        tf.zero_grad()
        with trainable_maps(tf, 1, "all", torch.arange(5)) as site:  # open through the backward (recompute)
            out = tf(hidden_states=x, timestep=torch.tensor([300.0, 700.0]), encoder_hidden_states=pe,
                     pooled_projections=pooled, return_dict=False)[0]
            assert site.maps.shape == (2, 4, 24, 5) and site.maps.requires_grad
            (site.maps.square().mean() + out.square().mean()).backward()
        return [p.grad.clone() for p in params]

    plain, recomputed = grads(False), grads(True)
    assert any(g.abs().sum() > 0 for g in plain[:8])  # block 0 and 1 get gradients through the maps
    for g, h in zip(plain, recomputed):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-7)


def test_sa1b_head_candidates_train(planted_data, tmp_path, one_thread):
    """The SA-1B path: class-agnostic masks (one .npz per image), caption prompts, every (head, column) map a
    candidate, Hungarian matching; three steps run, every mask finds a partner, the LoRA moves."""
    import numpy as np
    from PIL import Image

    src = Path(planted_data[0])
    root = tmp_path / "sa1b"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    captions = {}
    for f in sorted(os.listdir(src / "images"))[:8]:
        sid = os.path.splitext(f)[0]
        (root / "images" / f).write_bytes((src / "images" / f).read_bytes())
        label = np.array(Image.open(src / "masks" / f))
        np.savez(root / "masks" / f"{sid}.npz", masks=np.stack([label == 0, label == 1]))
        captions[sid] = "A red square and a blue square. On grey noise. Nothing else."
    (root / "captions.json").write_text(json.dumps(captions))
    cfg = TrainConfig(model="tiny", data_root=str(root), data_kind="sa1b", output_dir=str(tmp_path / "out"), size=32,
                      steps=3, batch_size=2, grad_accum=1, lr=1e-2, warmup_steps=0, max_grad_norm=1.0,
                      checkpoint_every=0, num_workers=0, progress=False, image_transform="squash")
    result = train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["matched"] == 4 for r in rows)  # 2 images x 2 masks
    assert json.load(open(tmp_path / "out" / "summary.json"))["candidates"] == "head"
    lora = _lora(result["lora"])
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in lora.items() if "lora_B" in k)
    # --cost-thresh 1e-3, below every mask's mean cost here: no pair is left, nothing matched, no mask loss; the
    # flow-matching loss still trains
    train(dataclasses.replace(cfg, output_dir=str(tmp_path / "thresh"), steps=1, cost_thresh=1e-3))
    rows = [json.loads(line) for line in open(tmp_path / "thresh" / "metrics.jsonl")]
    assert rows[0]["matched"] == 0 and rows[0]["focal"] == 0 and rows[0]["dice"] == 0 and rows[0]["fm"] > 0


def test_used_output_dir_refused_unless_resume_or_overwrite(planted_data, tmp_path):
    """check() (before any model loads): a non-empty --output-dir is written only to continue its own run or with
    --overwrite, which deletes nothing but a run's own entries."""
    from seg4diff_fast.magnet.train import ConfigError

    out = tmp_path / "out"
    out.mkdir()
    cfg = dict(data_root=planted_data[0], output_dir=str(out), model="tiny")
    (out / ".tmp-host-1-x").mkdir()  # a killed run's temporary: the folder is still unused
    TrainConfig(**cfg).check()
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"old")
    for extra, field, words in [({}, "output_dir", "--resume latest"),
                                ({"resume": "latest"}, "resume", "no checkpoint"),
                                ({"resume": "latest", "overwrite": True}, "overwrite", "give one of them")]:
        with pytest.raises(ConfigError, match=words) as e:
            TrainConfig(**cfg, **extra).check()
        assert e.value.field == field
    TrainConfig(**cfg, overwrite=True).check()
    ck = out / "checkpoints" / "step-000002"
    ck.mkdir(parents=True)
    (ck / "training_state.pt").write_bytes(b"")
    TrainConfig(**cfg, resume="latest").check()
    TrainConfig(**cfg, resume=str(ck)).check()
    other = tmp_path / "other" / "checkpoints" / "step-000001"
    other.mkdir(parents=True)
    (other / "training_state.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="not a checkpoint of --output-dir"):
        TrainConfig(**cfg, resume=str(other)).check()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="notes.txt") as e:
        TrainConfig(**cfg, overwrite=True).check()
    assert e.value.field == "overwrite"


def test_train_typed_into_a_used_folder(planted_data, tmp_path, one_thread, capsys):
    """As typed: a second run into a used --output-dir is refused (its LoRA, summary and checkpoints kept); --resume
    latest with fewer --steps than the checkpoint says so; --overwrite starts over (old checkpoints gone)."""
    out = str(tmp_path / "run")
    assert main(_cli_train(planted_data, out, 2, ["--checkpoint-every", "1"])) == 0
    lora = os.path.join(out, "pytorch_lora_weights.safetensors")
    before = {n: open(os.path.join(out, n), "rb").read() for n in ("pytorch_lora_weights.safetensors", "summary.json",
                                                                   "metrics.jsonl")}
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "seg4diff_fast.cli", *_cli_train(planted_data, out, 3, ["--lr", "5e-2"])],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("seg4diff-fast train: error: --output-dir: ") and "--overwrite" in p.stderr
    assert {n: open(os.path.join(out, n), "rb").read() for n in before} == before
    capsys.readouterr()
    assert main(_cli_train(planted_data, out, 1, ["--checkpoint-every", "1", "--resume", "latest"])) == 2
    err = capsys.readouterr().err
    assert "--steps" in err and "step 2" in err
    assert open(lora, "rb").read() == before["pytorch_lora_weights.safetensors"]
    assert main(_cli_train(planted_data, out, 1, ["--overwrite"])) == 0
    assert not os.path.exists(os.path.join(out, "checkpoints"))  # the old run's checkpoints went with it
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [r["step"] for r in map(json.loads, f)] == [1]
    assert json.load(open(os.path.join(out, "summary.json")))["step"] == 1
