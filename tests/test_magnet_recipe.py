"""MAGNET's recipe as the official code executes it (cvlab-kaist/Seg4Diff at bb500ca): the defaults, detectron2's
WarmupCosineLR, the FM_WEIGHT <= 0 freeze, caption dropout, the best checkpoint of the official validation, and
the residual map head saved beside the LoRA and applied at inference. CPU, the tiny random SD3."""
import importlib.util
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from seg4diff_fast.magnet.criterion import ResidualMapHead
from seg4diff_fast.magnet.train import (MapHeadSource, TrainConfig, apply_lora, freeze_lora_from, mask_normaliser,
                                        train, warmup_cosine)

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("magnet_planted", ROOT / "benchmarks" / "magnet_planted.py")
planted = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(planted)


def test_defaults_are_what_the_official_code_executes():
    c = TrainConfig()
    assert c.lr == 1e-4  # BACKBONE_MULTIPLIER never applied (root module name '')
    assert c.batch_size * c.grad_accum == 8  # GRADIENT_ACCUMULATION_STEPS never read
    assert (c.image_transform, c.short_edge, c.crop_size, c.size_divisibility, c.size) == \
        ("official", 1024, 1024, 640, 1024)
    assert (c.lr_scheduler, c.warmup_steps, c.warmup_factor, c.steps) == ("warmup_cosine", 500, 0.01, 3000)
    assert (c.val_protocol, c.val_dataset, c.val_every, c.keep) == ("official", "voc20", 250, "best")
    assert c.val_kl_threshold is None and c.cost_thresh is None  # official: KL_THRESHOLD 0.01; COST_THRESH None
    assert not c.val_at_start  # detectron2's EvalHook first runs at EVAL_PERIOD
    assert c.num_masks == "auto" and c.captioned_only and c.caption_dropout == 0.0 and c.attn_mlp


def _fvcore_warmup_cosine(k: int, max_iter: int, warmup_iters: int, factor: float) -> float:
    """detectron2 build_lr_scheduler("WarmupCosineLR") re-stated in float64: LRMultiplier at last_epoch k calls
    WarmupParamScheduler(CosineParamScheduler(1, 0), factor, warmup_iters / max_iter, "linear")(k / max_iter), a
    CompositeParamScheduler of LinearParamScheduler(factor * cos(0), cos(w)) "rescaled" on [0, w) and the cosine
    "fixed" on [w, 1)."""
    where, w = k / max_iter, warmup_iters / max_iter
    cos = lambda x: 0 + 0.5 * (1 - 0) * (1 + math.cos(math.pi * x))  # noqa: E731 CosineParamScheduler(1, 0)
    if where < w:
        start, end = factor * cos(0.0), cos(w)
        return end * (where / w) + start * (1 - where / w)  # LinearParamScheduler
    return cos(where)


def test_warmup_cosine_is_detectron2s():
    for k in [0, 1, 250, 499, 500, 501, 1500, 2999, 3000]:
        assert warmup_cosine(k / 3000, 500 / 3000, 0.01) == pytest.approx(_fvcore_warmup_cosine(k, 3000, 500, 0.01),
                                                                          rel=1e-12, abs=1e-15)
    assert warmup_cosine(0.0, 500 / 3000, 0.01) == pytest.approx(0.01)  # the warm-up starts at 1 % of the LR


def test_mask_normaliser_per_process_or_all_reduced():
    """process (the official COCO path): the loss divides by this process's own matched count (None: the criterion's
    default, tested in test_magnet_loss); all (its SA-1B path): by the mean over processes, here 2 processes holding
    3 and 7 matched masks."""
    counts = {0: 3.0, 1: 7.0}
    mean = lambda x: torch.tensor(sum(counts.values()) / len(counts))  # noqa: E731 what all-reduce / world gives
    assert mask_normaliser(3, "process", 2, mean) is None
    assert mask_normaliser(3, "all", 2, mean) == 5.0
    assert mask_normaliser(3, "all", 1, mean) is None
    with pytest.raises(ValueError, match="mode"):
        mask_normaliser(3, "auto", 2, mean)


def test_fm_weight_zero_freezes_the_lora_from_the_mask_layer():
    from seg4diff_fast.magnet.lora import add_lora, lora_config
    from seg4diff_fast.segmentation.tiny import tiny_pipeline

    t = tiny_pipeline("sd3").transformer
    add_lora(t, lora_config(4))
    kept = freeze_lora_from(t, 2)
    for name, p in t.named_parameters():
        if "lora_" in name:
            block = int(name.split(".")[1])
            assert p.requires_grad == (block < 2), name  # the official `int(name.split('.')[1]) >= 9`
    assert kept and all(p.requires_grad for p in kept)


@pytest.mark.parametrize("mode", ["grid", "ovss"])
def test_map_head_at_inference_matches_the_official_formula(mode):
    """grid: the training model's ``_outputs + attn_mlp(_outputs)`` on each column's [h, w] map; ovss: the OVSS
    model's ``attn_mlp(rearrange(i2t, "b l n t -> (b l) 1 n t"))``, no residual. Float64 re-statements."""
    torch.manual_seed(0)
    head = ResidualMapHead(width=8)
    B, h, w, T = 2, 4, 5, 7
    i2t = torch.randn(B, h * w, T)
    src = MapHeadSource(lambda batch: i2t, head, mode)
    out = src(SimpleNamespace(grid=(h, w)))
    convs = [m for m in head.layers if isinstance(m, torch.nn.Conv2d)]

    def stack(x):  # conv3x3 -> relu -> conv3x3 -> relu -> conv3x3, float64
        for j, c in enumerate(convs):
            x = F.conv2d(x, c.weight.double(), c.bias.double(), padding=1)
            x = x.relu() if j < 2 else x
        return x

    x = i2t.double()
    if mode == "ovss":
        ref = stack(x[:, None])[:, 0]
    else:
        maps = x.permute(0, 2, 1).reshape(B * T, 1, h, w)
        ref = (maps + stack(maps)).reshape(B, T, h * w).permute(0, 2, 1)
    assert out.shape == (B, h * w, T)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    return (planted.make_planted(str(root / "train"), 8, 0, "coco"),
            planted.make_planted(str(root / "val"), 3, 1, "folder"))


def _cfg(data, out, **kw):
    train_root, val_root = data
    base = dict(model="tiny", data_root=train_root, output_dir=str(out), size=32, short_edge=40, crop_size=40,
                size_divisibility=32, batch_size=2, steps=2, warmup_steps=1, max_grad_norm=1.0, num_workers=0,
                progress=False, checkpoint_every=0, val_root=val_root, val_dataset="folder", val_every=1,
                lr=1e-2)
    base.update(kw)
    return TrainConfig(**base)


def test_recipe_run_keeps_the_best_lora_and_its_head(data, tmp_path, capsys):
    """The default recipe on tiny sizes: the official validation every step, OUT/best/ holds the best one's LoRA and
    map head, and OUT's LoRA and head are those; the logged LR is detectron2's WarmupCosineLR; the head applies at
    inference (grid and ovss) and names itself in the Segmenter's settings."""
    from safetensors.torch import load_file

    from seg4diff_fast.segmentation import Segmenter

    cfg = _cfg(data, tmp_path / "out")
    result = train(cfg)
    out = tmp_path / "out"
    best = json.load(open(out / "best" / "best.json"))
    val = result["val"]
    assert [v["step"] for v in val] == [1, 2]
    top = max(val, key=lambda v: v["mIoU"])  # the first of equal ones, as BestCheckpointer's strict '>'
    assert best == dict(step=top["step"], mIoU=top["mIoU"]) and result["best"] == best
    for name in ("pytorch_lora_weights.safetensors", "attn_mlp.safetensors"):
        a, b = load_file(out / name), load_file(out / "best" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    lrs = [r["lr"] for r in rows if "lr" in r]
    # the LR logged after step k is the one the scheduler set for step k + 1
    assert lrs == pytest.approx([cfg.lr * _fvcore_warmup_cosine(k, 2, 1, 0.01) for k in (1, 2)], rel=1e-9)
    seg = Segmenter.from_pretrained("tiny", size=32)
    for mode in ("grid", "ovss"):
        s = apply_lora(Segmenter.from_pretrained("tiny", size=32), str(out), attn_mlp=mode)
        assert isinstance(s.attention_source, MapHeadSource) and s.settings()["model"].endswith(f"+attn_mlp:{mode}")
    assert not isinstance(apply_lora(seg, str(out)).attention_source, MapHeadSource)  # off: the official default
    with pytest.raises(FileNotFoundError, match="attn_mlp"):
        apply_lora(Segmenter.from_pretrained("tiny", size=32), str(tmp_path), attn_mlp="grid")  # no head there
    # the command line: eval --lora OUT --attn-mlp grid is the API's apply_lora(..., attn_mlp="grid")
    from seg4diff_fast.cli import main
    from seg4diff_fast.segmentation.datasets import open_dataset
    from seg4diff_fast.segmentation.evaluate import evaluate

    argv = ["eval", "--dataset", "folder", "--root", data[1], "--model", "tiny", "--size", "32", "--no-predictions",
            "--lora", str(out), "--attn-mlp", "grid", "--out", str(tmp_path / "cli")]
    assert main(argv) == 0
    cli = json.load(open(tmp_path / "cli" / "summary.json"))
    api = evaluate(apply_lora(Segmenter.from_pretrained("tiny", size=32), str(out), attn_mlp="grid"),
                   open_dataset("folder", data[1]), str(tmp_path / "api"), save_predictions=False, progress=False)
    assert cli["mIoU"] == pytest.approx(api["mIoU"], abs=1e-9)
    assert "+attn_mlp:grid" in json.load(open(tmp_path / "cli" / "run.json"))["settings"]["segmenter"]["model"]
    assert main(argv[:10] + ["--attn-mlp", "grid", "--out", str(tmp_path / "x")]) == 2  # no --lora: a usage error
    err = capsys.readouterr().err.strip().splitlines()
    assert "--attn-mlp" in err[-1] and "--lora" in err[-1], err


def test_caption_dropout_and_fm_weight_zero(data, tmp_path):
    """caption_dropout 1: every micro-batch's prompt is '' (the official ``prompt = ""``), so token candidates find no
    class columns and no mask is matched; fm_weight 0 leaves the LoRA of blocks >= the mask layer (the tiny model's
    2) at their initial values."""
    from safetensors.torch import load_file

    res = train(_cfg(data, tmp_path / "drop", caption_dropout=1.0, val_root=None))
    rows = [json.loads(line) for line in open(tmp_path / "drop" / "metrics.jsonl")]
    assert all(r["matched"] == 0 for r in rows)
    train(_cfg(data, tmp_path / "keep", val_root=None))
    rows = [json.loads(line) for line in open(tmp_path / "keep" / "metrics.jsonl")]
    assert all(r["matched"] > 0 for r in rows)
    res = train(_cfg(data, tmp_path / "nofm", fm_weight=0.0, val_root=None))
    lora = load_file(res["lora"])
    for k, v in lora.items():
        if "lora_B" in k:
            block = int(k.split(".")[2])
            assert torch.equal(v, torch.zeros_like(v)) == (block >= 2), k


def test_prompt_tokens_are_the_official_ones():
    """The official init (``encode_prompt("")``, diffusers' default 256 T5 positions: 77 + 256 tokens) and forward
    (``encoder_hidden_states=self.prompt_tokens``, a 2-D ``[L, D]`` tensor the blocks broadcast over the batch, and
    the empty prompt's pooled embeddings), re-run in float64 beside ours on the tiny SD3."""
    from seg4diff_fast.magnet.prompt_tokens import PromptTokens
    from seg4diff_fast.segmentation.tiny import tiny_pipeline

    pipe = tiny_pipeline("sd3")
    tok = PromptTokens.from_pipeline(pipe)
    pe, _, pooled, _ = pipe.encode_prompt(prompt="", prompt_2=None, prompt_3=None, do_classifier_free_guidance=False)
    assert tok.embeds.shape == (1, 77 + 256, pe.shape[-1]) and torch.equal(tok.embeds, pe.float())
    assert torch.equal(tok.pooled, pooled.float())
    t = pipe.transformer.double()
    torch.manual_seed(0)
    lat = torch.randn(2, t.config.in_channels, 8, 8, dtype=torch.float64)
    ts = torch.tensor([500.0, 500.0], dtype=torch.float64)
    official = t(hidden_states=lat, timestep=ts, encoder_hidden_states=pe[0].double(),
                 pooled_projections=pooled.double(), return_dict=False)[0]
    ours = t(hidden_states=lat, timestep=ts, return_dict=False, **tok(2, torch.float64))[0]
    torch.testing.assert_close(ours, official, rtol=1e-12, atol=1e-12)


def test_learnable_tokens_train_alone_and_segment_uses_them(data, tmp_path):
    """train --learnable-tokens: only the tokens change (the official optimizer takes parameters named prompt_tokens
    only; the LoRA keeps B = 0, the map head its init); they are saved beside the LoRA, and apply_lora feeds them
    to the transformer for every prompt (unless learnable_tokens=False). The training's validation runs with the
    tokens too (the official backbone feeds them whenever USE_LEARNABLE_TOKENS): its best mIoU is the official
    validation's of the saved tokens in a fresh Segmenter."""
    from safetensors.torch import load_file

    from seg4diff_fast.magnet.criterion import MaskAlignmentLoss
    from seg4diff_fast.magnet.prompt_tokens import PromptTokens, PromptTokensFamily
    from seg4diff_fast.magnet.validate import official_validation
    from seg4diff_fast.segmentation import Segmenter
    from seg4diff_fast.segmentation.datasets import open_dataset
    from seg4diff_fast.segmentation.tiny import tiny_pipeline

    res = train(_cfg(data, tmp_path / "tok", learnable_tokens=True))
    out = tmp_path / "tok"
    names = [n for n in open(os.path.join(data[0], "classes.txt")).read().split("\n") if n]
    again = official_validation(apply_lora(Segmenter.from_pretrained("tiny", size=32), str(out)),
                                open_dataset("folder", data[1]), str(tmp_path / "again"), names, MaskAlignmentLoss(),
                                size_divisibility=32)
    assert again["mIoU"] == pytest.approx(res["best"]["mIoU"], abs=1e-9)
    lora = load_file(res["lora"])
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in lora.items() if "lora_B" in k)
    saved = load_file(out / "prompt_tokens.safetensors")
    init = PromptTokens.from_pipeline(tiny_pipeline("sd3"))
    assert saved["embeds"].shape == init.embeds.shape and not torch.equal(saved["embeds"], init.embeds)
    assert torch.equal(saved["pooled"], init.pooled)
    seg = apply_lora(Segmenter.from_pretrained("tiny", size=32), str(out))
    assert isinstance(seg.spec, PromptTokensFamily) and seg.settings()["model"].endswith("+prompt_tokens")
    enc = seg.spec.encode_prompts(seg.pipe, ["cat dog", "grass"], seg.protocol)
    assert enc["encoder_hidden_states"].shape[:2] == (2, 333)
    assert torch.equal(enc["encoder_hidden_states"][1].float(), saved["embeds"][0])
    image = os.path.join(data[1], "images", sorted(os.listdir(os.path.join(data[1], "images")))[0])
    assert seg.segment(image, ["cat", "dog", "grass"]).labels.shape
    plain = apply_lora(Segmenter.from_pretrained("tiny", size=32), str(out), learnable_tokens=False)
    assert not isinstance(plain.spec, PromptTokensFamily)
