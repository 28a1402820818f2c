"""MAGNET LoRA: the paper's config, save/load round trip, diffusers' loader, the paper's .pth layout, bad files."""
import os

import pytest
import torch

from seg4diff_fast.magnet.lora import (PAPER_TARGETS, add_lora, load_lora, lora_config, lora_state_dict, read_lora,
                                       save_lora)
from tiny_models import sd3_inputs, tiny_sd3_pipeline, tiny_sd3_transformer


def _trained(rank=4, alpha=None, seed=3):
    """A tiny SD3 transformer with a LoRA whose weights are random (B = 0 at init would make every test pass)."""
    tr = tiny_sd3_transformer()
    params = add_lora(tr, lora_config(rank=rank, alpha=alpha))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return tr


def _out(tr):
    with torch.no_grad():
        return tr(**sd3_inputs()).sample


def test_paper_config_and_trainable_parameters():
    cfg = lora_config()
    assert cfg.r == 16 and cfg.lora_alpha == 16 and cfg.init_lora_weights == "gaussian"
    assert set(cfg.target_modules) == set(PAPER_TARGETS)
    tr = tiny_sd3_transformer()
    params = add_lora(tr, cfg)
    names = [n for n, p in tr.named_parameters() if p.requires_grad]
    assert len(params) == len(names) == 2 * 4 * 2  # 2 blocks x 4 projections x (A, B)
    assert all(".attn.to_" in n and "lora_" in n for n in names)
    assert not any("add_q_proj" in n for n in names)  # the text stream is not adapted
    only9 = lora_config(blocks=[1])
    assert set(only9.target_modules) == {f"transformer_blocks.1.{t}" for t in PAPER_TARGETS}
    with pytest.raises(ValueError, match="blocks"):
        lora_config(blocks="some")


@pytest.mark.parametrize("alpha", [None, 8.0])
def test_round_trip_into_a_fresh_transformer(tmp_path, alpha):
    tr = _trained(alpha=alpha)
    ref = _out(tr)
    assert (ref - _out(tiny_sd3_transformer())).abs().max() > 1e-3  # the LoRA changes the output
    path = save_lora(tr, str(tmp_path / "lora"))
    assert path.endswith("pytorch_lora_weights.safetensors") and os.path.isfile(path)
    fresh = tiny_sd3_transformer()
    load_lora(fresh, str(tmp_path / "lora"))
    torch.testing.assert_close(_out(fresh), ref, rtol=0, atol=1e-6)
    sd, meta = read_lora(path)
    assert meta["r"] == 4 and meta["lora_alpha"] == (4 if alpha is None else alpha)
    # into an existing adapter (resume): values copied
    again = _trained(alpha=alpha, seed=9)
    load_lora(again, path)
    torch.testing.assert_close(_out(again), ref, rtol=0, atol=1e-6)


def test_diffusers_load_lora_weights_reads_our_file(tmp_path):
    tr = _trained(alpha=8.0)  # alpha != rank: must come from the file's metadata
    ref = _out(tr)
    path = save_lora(tr, str(tmp_path / "my_lora.safetensors"))
    pipe = tiny_sd3_pipeline()
    pipe.transformer = tiny_sd3_transformer()  # same base weights as _trained's
    pipe.load_lora_weights(str(tmp_path), weight_name="my_lora.safetensors")
    torch.testing.assert_close(_out(pipe.transformer), ref, rtol=0, atol=1e-6)
    pipe2 = tiny_sd3_pipeline()
    pipe2.transformer = tiny_sd3_transformer()
    load_lora(pipe2, path)
    torch.testing.assert_close(_out(pipe2.transformer), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("wrapped", [True, False])
def test_papers_checkpoint_layout_loads_to_the_same_weights(tmp_path, wrapped):
    """The paper's lora_weights.pth: detectron2 {'model': state_dict} with 'backbone.transformer.' module paths and
    peft's '.default.' adapter name, next to non-LoRA entries (its attn_mlp head, buffers)."""
    tr = _trained()  # rank 4, alpha = rank as the paper
    ref = _out(tr)
    sd = {f"backbone.transformer.{n}": p.detach().clone() for n, p in tr.named_parameters() if "lora_" in n}
    assert any(".lora_A.default.weight" in k for k in sd)
    sd["attn_mlp.attn_score_layer.0.weight"] = torch.randn(64, 1, 3, 3)
    sd["pixel_mean"] = torch.zeros(3, 1, 1)
    torch.save({"model": sd, "iteration": 2999} if wrapped else sd, tmp_path / "lora_weights.pth")
    fresh = tiny_sd3_transformer()
    load_lora(fresh, str(tmp_path / "lora_weights.pth"))
    torch.testing.assert_close(_out(fresh), ref, rtol=0, atol=1e-6)
    ours = lora_state_dict(tr)
    got = lora_state_dict(fresh)
    assert set(got) == set(ours) and all(torch.equal(got[k], ours[k]) for k in ours)
    pipe = tiny_sd3_pipeline()
    pipe.transformer = tiny_sd3_transformer()
    load_lora(pipe, str(tmp_path / "lora_weights.pth"))
    torch.testing.assert_close(_out(pipe.transformer), ref, rtol=0, atol=1e-6)


def test_bad_files_name_the_path(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="broken.safetensors"):
        load_lora(tiny_sd3_transformer(), str(bad))
    pth = tmp_path / "nolora.pth"
    torch.save({"model": {"backbone.transformer.pos_embed.proj.weight": torch.zeros(2)}}, pth)
    with pytest.raises(ValueError, match="nolora.pth: no LoRA weights"):
        load_lora(tiny_sd3_transformer(), str(pth))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_lora(tiny_sd3_transformer(), str(junk))
    with pytest.raises(FileNotFoundError, match="missing"):
        load_lora(tiny_sd3_transformer(), str(tmp_path / "missing.safetensors"))
    # an existing adapter of another rank: shape mismatch named
    path = save_lora(_trained(rank=4), str(tmp_path / "r4"))
    other = tiny_sd3_transformer()
    add_lora(other, lora_config(rank=2))
    with pytest.raises(ValueError, match="r4.*shape"):
        load_lora(other, path)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        save_lora(tiny_sd3_transformer(), str(tmp_path / "x"))
