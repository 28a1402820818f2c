"""Non-finite attention never becomes confident labels (issue 19): a model that yields NaN (weights poisoned with
inf / NaN, as float16 overflow does on Flux) or a guidance scale whose latents overflow made an all-black image and
"cat 100 %" with exit 0. Segmenter.segment / segment_unsupervised / generate and the CLI now fail with a message that
names the layer and step (the store's check), and any attention source's NaN scores are refused before the argmax.
Tiny random pipelines on the CPU.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from seg4diff_fast.capture import layer_names
from seg4diff_fast.segmentation.segmenter import Segmenter
from seg4diff_fast.segmentation.tiny import tiny_pipeline

IMAGE = np.random.RandomState(3).randint(0, 256, (27, 21, 3), dtype=np.uint8)


def _poisoned(family: str, value: float) -> Segmenter:
    pipe = tiny_pipeline(family)
    with torch.no_grad():
        pipe.transformer.transformer_blocks[0].attn.to_q.weight.fill_(value)
    return Segmenter(pipe, size=32)


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_segment_with_a_model_that_yields_nan_names_the_layer(family, value):
    seg = _poisoned(family, value)
    layer = layer_names(seg.transformer)[seg.protocol.layers[0]]
    with pytest.raises(FloatingPointError, match=rf"maps of layer '{layer}' hold NaN or inf from its step 0"):
        seg.segment(IMAGE, ["cat", "grass"])
    with pytest.raises(FloatingPointError, match=rf"maps of layer '{layer}' hold NaN or inf"):
        seg.segment_unsupervised(IMAGE)


def test_generate_with_a_guidance_scale_that_overflows_names_the_step():
    """SD3's classifier-free guidance at 1e30: the first step's latents overflow, the second step's attention is
    NaN; the result used to be a black image labelled with confidence."""
    seg = Segmenter(tiny_pipeline("sd3"), size=32)
    layer = layer_names(seg.transformer)[seg.protocol.layers[0]]
    with pytest.raises(FloatingPointError, match=rf"maps of layer '{layer}' hold NaN or inf from its step 1 "
                                                 r"\(timestep [\d.]+\)"):
        seg.generate("a cat on the grass", ["cat", "grass"], num_inference_steps=3, guidance_scale=1e30)
    ok = seg.generate("a cat on the grass", ["cat", "grass"], num_inference_steps=2)  # the same Segmenter goes on
    assert torch.isfinite(ok.scores).all()


def test_generate_refuses_a_non_finite_image():
    """Finite maps but a VAE that yields NaN (float16 overflow in the decoder): the image used to be black, with
    labels; the same image as before otherwise (output_type "np", made PIL as diffusers does)."""
    pipe = tiny_pipeline("sd3")
    seg = Segmenter(pipe, size=32)
    ok = seg.generate("a cat on the grass", ["cat", "grass"], num_inference_steps=2)
    reference = pipe("a cat on the grass", height=32, width=32, num_inference_steps=2, output_type="pil",
                     guidance_scale=seg.protocol.generate_guidance_scale,
                     generator=torch.Generator().manual_seed(seg.protocol.seed)).images[0]
    np.testing.assert_array_equal(np.asarray(ok.image), np.asarray(reference))
    with torch.no_grad():
        pipe.vae.decoder.conv_out.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="the generated image holds NaN or inf"):
        seg.generate("a cat on the grass", ["cat", "grass"], num_inference_steps=2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_scores_of_any_attention_source_are_checked_before_the_argmax(bad):
    """A planted source (the Segmenter's seam) whose maps hold NaN / inf in one class's column: refused, with the
    class, instead of labels from an argmax over them."""
    def source(batch):
        n = int(np.prod(batch.grid))
        i2t = torch.rand(len(batch.prompts), n, len(batch.text_index))
        i2t[..., 1:] = bad  # every column but the first: the classes' columns
        batch.output = None
        return i2t

    seg = Segmenter(tiny_pipeline("sd3"), size=32, attention_source=source)
    with pytest.raises(FloatingPointError, match=r"the scores of 2 of 2 classes \(index \[0, 1\]\) hold NaN or inf"):
        seg.segment(IMAGE, ["cat", "grass"])


def test_cli_generate_with_an_overflowing_guidance_scale_fails(tmp_path, capsys):
    from seg4diff_fast.cli import main

    out = tmp_path / "out"
    rc = main(["generate", "a cat on the grass", "--classes", "cat,grass", "--model", "tiny", "--device", "cpu",
               "--gen-steps", "2", "--size", "32", "--guidance-scale", "1e30", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "FloatingPointError" in err and "hold NaN or inf from its step 1" in err, err
    assert not out.exists() or not any(out.rglob("*.png"))
