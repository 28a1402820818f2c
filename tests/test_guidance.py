"""Perturbed-I2T guidance (seg4diff_fast.guidance) against float64 full-matrix oracles and plain generation."""
import copy
import math
import types

import pytest
import torch

from seg4diff_fast.guidance import PerturbedI2TGuidance, blur_i2t, perturbed_attention, perturbed_i2t_guidance
from tiny_models import flux_inputs, sd3_inputs, tiny_flux_transformer, tiny_sd3_pipeline, tiny_sd3_transformer


# ---------------------------------------------------------------------------------------------- float64 oracles


def oracle_blur(maps: torch.Tensor, h: int, w: int, sigma: float) -> torch.Tensor:
    """maps ``[..., h*w, T]`` float64 -> the same, each (..., column) blurred over the grid by explicit sums:
    out[y, x] = sum_a sum_b ky[a] kx[b] m[mirror(y + a - r_y), mirror(x + b - r_x)] (SEG: kernel of odd size
    ceil(6 sigma) + 1, its radius capped at half the axis length; reflect without the edge)."""
    if sigma == 0:
        return maps.clone()
    m = maps.reshape(*maps.shape[:-2], h, w, maps.shape[-1])
    if sigma > 9999:
        return m.mean(dim=(-3, -2), keepdim=True).expand_as(m).reshape(maps.shape)

    def kern(n):
        size = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
        while size // 2 > n // 2:  # SEG's cap: radius at most half the axis
            size -= 2
        r = size // 2
        wts = torch.tensor([math.exp(-0.5 * ((i - r) / sigma) ** 2) for i in range(size)], dtype=torch.float64)
        return wts / wts.sum(), r

    def mirror(i, n):
        while i < 0 or i >= n:
            i = -i if i < 0 else 2 * (n - 1) - i
        return i

    ky, ry = kern(h)
    kx, rx = kern(w)
    out = torch.zeros_like(m)
    for y in range(h):
        for x in range(w):
            for a in range(len(ky)):
                for b in range(len(kx)):
                    out[..., y, x, :] += ky[a] * kx[b] * m[..., mirror(y + a - ry, h), mirror(x + b - rx, w), :]
    return out.reshape(maps.shape)


def oracle_perturbed(q, k, v, start, stop, h, w, sigma, renormalize=False):
    """The whole ``[B, H, N, N]`` softmax in float64, its image x text block replaced by the blurred block."""
    q, k, v = (t.double() for t in (q, k, v))
    p = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    n = q.shape[2]
    img = torch.cat([torch.arange(0, start), torch.arange(stop, n)])
    block = p[:, :, img][..., start:stop]
    new = p.clone()
    new[:, :, img, start:stop] = oracle_blur(block, h, w, sigma)
    if renormalize:
        new = new / new.sum(-1, keepdim=True)
    return new @ v


# ---------------------------------------------------------------------------------------------- the blur


@pytest.mark.parametrize("sigma", [0.0, 0.4, 1.0, 2.5, 100.0, float("inf")])
def test_blur_matches_explicit_sums(sigma):
    g = torch.Generator().manual_seed(3)
    h, w = 5, 7  # non-square, odd: the kernel is capped differently per axis at large sigma
    i2t = torch.rand(2, 3, h * w, 4, generator=g, dtype=torch.float64)
    got = blur_i2t(i2t, (h, w), sigma)
    assert got.shape == i2t.shape
    torch.testing.assert_close(got, oracle_blur(i2t, h, w, sigma), rtol=1e-12, atol=1e-14)


def test_blur_kernel_golden_and_identity():
    # sigma 1: SEG's size ceil(6) + 1 = 7 taps; the centre weight of a normalised 7-tap Gaussian is
    # 1 / sum_{i=-3..3} exp(-i^2 / 2) = 0.39905.
    from seg4diff_fast.guidance import gaussian_kernel

    k = gaussian_kernel(1.0, 64)
    assert k.numel() == 7 and abs(float(k[3]) - 0.3990503) < 1e-6 and abs(float(k.sum()) - 1) < 1e-12
    assert gaussian_kernel(10.0, 6).numel() == 7 and gaussian_kernel(10.0, 5).numel() == 5  # radius <= n // 2
    x = torch.rand(1, 2, 12, 3, dtype=torch.float64)
    assert torch.equal(blur_i2t(x, (3, 4), 0.0), x)
    # a column's total over the grid is kept away from the border (one-hot in the middle of a 9x9 grid)
    one = torch.zeros(1, 1, 81, 1, dtype=torch.float64)
    one[0, 0, 40, 0] = 1.0
    assert abs(float(blur_i2t(one, (9, 9), 1.0).sum()) - 1) < 1e-12


def test_bad_arguments():
    with pytest.raises(ValueError, match="sigma"):
        blur_i2t(torch.rand(1, 1, 6, 2), (2, 3), -1.0)
    with pytest.raises(ValueError, match="grid"):
        blur_i2t(torch.rand(1, 1, 6, 2), (2, 4), 1.0)
    tf = tiny_sd3_transformer(num_layers=3)
    with pytest.raises(ValueError, match="scale"):
        PerturbedI2TGuidance(tf, [1], scale=float("nan"), sigma=1.0)
    with pytest.raises(ValueError, match="sigma"):
        PerturbedI2TGuidance(tf, [1], scale=1.0, sigma=float("nan"))
    with pytest.raises(ValueError, match="unknown layer|out of range"):
        PerturbedI2TGuidance(tf, [7], scale=1.0, sigma=1.0)


# ---------------------------------------------------------------------------------------------- the layer


CASES = [(s, r, b, d) for s, r in [(0.7, False), (1.5, True), (float("inf"), False)]
         for b, d in [("torch", torch.float32), ("torch", torch.float16), ("reference", torch.float32)]]
CASES += [(0.7, False, "triton", torch.float32), (1.5, True, "triton", torch.float16)]  # the interpreter is slow


@pytest.mark.parametrize("order", ["image_text", "text_image"])
@pytest.mark.parametrize("sigma,renormalize,backend,dtype", CASES)
def test_perturbed_attention_vs_full_matrix(order, sigma, renormalize, backend, dtype):
    h, w, T = 5, 7, 11
    n = h * w + T
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for _ in range(3))
    q = q * 2
    start, stop = (h * w, n) if order == "image_text" else (0, T)
    got = perturbed_attention(q.to(dtype), k.to(dtype), v.to(dtype), slice(start, stop), (h, w), sigma, renormalize,
                              backend=backend)
    want = oracle_perturbed(q.to(dtype), k.to(dtype), v.to(dtype), start, stop, h, w, sigma, renormalize)
    assert got.dtype == dtype and got.shape == q.shape
    tol = 2e-3 if dtype == torch.float16 else 2e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    # the blur really changes the output (not a test that cannot fail)
    plain = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 4, -1) @ v.double()
    assert (want - plain).abs().max() > 1e-2


def _record_attn(attn):
    """Record the attention module's inputs and output at each call."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append((dict(kwargs, **dict(zip(["hidden_states", "encoder_hidden_states"], args))), output))

    return calls, attn.register_forward_hook(hook, with_kwargs=True)


def test_tiny_sd3_layer_output_equals_float64_formula():
    """The blurred layer inside a real tiny SD3 transformer equals the float64 full-matrix formula computed
    from the layer's own projections."""
    tf = tiny_sd3_transformer(num_layers=3)
    inputs = sd3_inputs(batch=1, height=6, width=5, text_len=7)
    attn = tf.transformer_blocks[1].attn
    calls, hook = _record_attn(attn)
    with perturbed_i2t_guidance(tf, [1], scale=2.0, sigma=1.2):
        tf(**inputs)
    hook.remove()
    assert len(calls) == 2  # plain, then companion
    kw, (img_out, txt_out) = calls[1]
    a = copy.deepcopy(attn).double()
    x, c = kw["hidden_states"].double(), kw["encoder_hidden_states"].double()
    H = a.heads

    def heads(t):
        return t.view(1, -1, H, t.shape[-1] // H).transpose(1, 2)

    q = torch.cat([heads(a.to_q(x)), heads(a.add_q_proj(c))], 2)
    k = torch.cat([heads(a.to_k(x)), heads(a.add_k_proj(c))], 2)
    v = torch.cat([heads(a.to_v(x)), heads(a.add_v_proj(c))], 2)
    n_img = x.shape[1]
    o = oracle_perturbed(q, k, v, n_img, q.shape[2], 6, 5, 1.2).transpose(1, 2).reshape(1, q.shape[2], -1)
    want_img = a.to_out[0](o[:, :n_img])
    want_txt = a.to_add_out(o[:, n_img:])
    torch.testing.assert_close(img_out.double(), want_img, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(txt_out.double(), want_txt, rtol=1e-5, atol=1e-5)
    # and the plain call of the same step is the model's own attention, not perturbed
    assert (calls[0][1][0] - img_out).abs().max() > 1e-3


@pytest.mark.parametrize("family,layer", [("sd3", 1), ("flux", 1), ("flux", 2)],
                         ids=["sd3", "flux_double", "flux_single"])
def test_sigma_zero_companion_equals_plain(family, layer):
    if family == "sd3":
        tf, inputs = tiny_sd3_transformer(num_layers=3), sd3_inputs(batch=2)
    else:
        tf, inputs = tiny_flux_transformer(), flux_inputs(batch=2)
    procs = [b.attn.processor for b in list(tf.transformer_blocks) + list(getattr(tf, "single_transformer_blocks", []))]
    plain = tf(**inputs, return_dict=False)[0]
    with perturbed_i2t_guidance(tf, [layer], scale=1.0, sigma=0.0) as g:
        out = tf(**inputs, return_dict=False)[0]
    delta = g._last_delta  # scale 1: eps - eps^
    assert delta is not None and delta.shape == plain.shape
    assert delta.abs().max() < 1e-5 * plain.abs().max()
    assert torch.allclose(out, plain, rtol=1e-5, atol=1e-5)
    # the same with a real blur moves the prediction
    with perturbed_i2t_guidance(tf, [layer], scale=1.0, sigma=2.0) as g:
        tf(**inputs, return_dict=False)
    assert g._last_delta.abs().max() > 1e-4
    # every processor is the very object it was
    after = [b.attn.processor for b in list(tf.transformer_blocks) + list(getattr(tf, "single_transformer_blocks", []))]
    assert all(a is b for a, b in zip(procs, after))


def test_batched_cfg_rows():
    """Under SD3's batched [uncond, cond] CFG the companion runs on the cond rows only and the same
    s (eps_c - eps^_c) is added to both halves."""
    tf = tiny_sd3_transformer(num_layers=3)
    inputs = sd3_inputs(batch=4)
    pipe = types.SimpleNamespace(transformer=tf, do_classifier_free_guidance=True)
    plain = tf(**inputs, return_dict=False)[0]
    cond = {k: v[2:] for k, v in inputs.items()}
    with perturbed_i2t_guidance(tf, [1], scale=1.0, sigma=1.5):  # no pipe: every row is conditional
        eps_hat = 2 * plain[2:] - tf(**cond, return_dict=False)[0]  # out = eps + (eps - eps^)
    s = 2.5
    seen = []
    hook = tf.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    with perturbed_i2t_guidance(pipe, [1], scale=s, sigma=1.5):
        out = tf(**inputs, return_dict=False)[0]
    hook.remove()
    assert seen == [4, 2]
    delta = s * (plain[2:] - eps_hat)
    torch.testing.assert_close(out, plain + torch.cat([delta, delta]), rtol=1e-5, atol=1e-5)


def _run(pipe, **kw):
    return pipe("a cat on the grass", height=6, width=5, num_inference_steps=2, guidance_scale=5.0,
                max_sequence_length=8, output_type="latent", generator=torch.Generator().manual_seed(0), **kw).images


def test_pipeline_scale_zero_is_plain_generation_and_capture_skips_companion():
    import seg4diff_fast as s4d

    pipe = tiny_sd3_pipeline()
    plain = _run(pipe)
    with perturbed_i2t_guidance(pipe, [0], scale=0.0, sigma=2.0):
        zero = _run(pipe)
    assert torch.equal(zero, plain)
    with perturbed_i2t_guidance(pipe, [0], scale=3.0, sigma=2.0):
        with s4d.capture_attention(pipe, layers=[0, 1], steps="all") as store:
            guided = _run(pipe)
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-4
    assert store.steps_seen == {"transformer_blocks.0": 2, "transformer_blocks.1": 2}  # no companion steps
    assert store.maps["transformer_blocks.0"].shape[1] == 1  # the cond row only


def test_flux_true_cfg_uncond_pass_gets_the_same_correction():
    """FluxPipeline's true CFG: the uncond forward (inside cache_context("uncond")) comes after the cond one
    and gets the correction of its step, so eps_u + g (eps_c - eps_u) moves by exactly s (eps_c - eps^_c)."""
    from tiny_models import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    tf = pipe.transformer
    outs = []
    hook = tf.register_forward_hook(lambda m, a, kw, out: outs.append(out[0].clone()), with_kwargs=True)
    kw = dict(prompt="a cat", negative_prompt="a dog", true_cfg_scale=4.0, height=8, width=8, num_inference_steps=1,
              max_sequence_length=8, output_type="latent", generator=torch.Generator().manual_seed(0))
    edited = []
    with perturbed_i2t_guidance(pipe, [1], scale=2.0, sigma=1.0):
        # a hook registered after the guidance sees the outputs it returns
        hook2 = tf.register_forward_hook(lambda m, a, kw, out: edited.append(out[0].clone()), with_kwargs=True)
        pipe(**kw)
    hook.remove()
    hook2.remove()
    # raw outputs: cond, companion (inside the cond forward's hook), uncond
    assert len(outs) == 3 and len(edited) == 3
    eps_c, eps_hat, eps_u = outs
    delta = 2.0 * (eps_c - eps_hat)
    assert delta.abs().max() > 1e-5
    torch.testing.assert_close(edited[0], eps_hat)  # the companion's own output is not edited
    torch.testing.assert_close(edited[1], eps_c + delta)
    torch.testing.assert_close(edited[2], eps_u + delta)


def _cli(argv):
    """The command line in this process: its exit code (usage errors are 2, through seg4diff_fast.cli.main)."""
    from seg4diff_fast.cli import main

    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_cli_generate_perturb_flags(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    base = ["generate", "a cat on the grass", "--classes", "cat,grass", "--model", "tiny", "--gen-steps", "2",
            "--size", "64", "--layers", "1"]
    images = {}
    for name, extra in [("plain", []), ("zero", ["--perturb-scale", "0"]),
                        ("guided", ["--perturb-scale", "4", "--perturb-sigma", "2", "--perturb-layers", "1"])]:
        assert _cli(base + extra + ["--out", str(tmp_path / name)]) == 0, capsys.readouterr().err
        images[name] = np.asarray(Image.open(tmp_path / name / "image.png"), dtype=np.int16)
    assert np.array_equal(images["zero"], images["plain"])
    assert np.abs(images["guided"] - images["plain"]).max() > 0
    assert _cli(base + ["--perturb-layers", "1", "--out", str(tmp_path / "x")]) == 2
    assert "need --perturb-scale" in capsys.readouterr().err
    assert _cli(base + ["--perturb-scale", "1", "--perturb-sigma", "-1", "--out", str(tmp_path / "x")]) == 2
    assert "sigma" in capsys.readouterr().err


def test_skip_layer_guidance_pass_gets_the_cond_correction():
    """SD3's skip-layer-guidance forward (cond rows, ``skip_layers`` set) comes after the step's guided forward and
    gets its conditional correction, so eps_c - eps_skip is the model's own difference."""
    tf = tiny_sd3_transformer(num_layers=3)
    inputs = sd3_inputs(batch=4)
    cond = {k: v[2:] for k, v in inputs.items()}
    pipe = types.SimpleNamespace(transformer=tf, do_classifier_free_guidance=True)
    skip_plain = tf(**cond, skip_layers=[0], return_dict=False)[0]
    with perturbed_i2t_guidance(pipe, [1], scale=2.0, sigma=1.5) as g:
        with pytest.raises(RuntimeError, match="without the guided"):
            tf(**cond, skip_layers=[0], return_dict=False)
        tf(**inputs, return_dict=False)
        skip = tf(**cond, skip_layers=[0], return_dict=False)[0]
    assert g._cond_delta.shape == skip_plain.shape and g._cond_delta.abs().max() > 1e-5
    torch.testing.assert_close(skip, skip_plain + g._cond_delta)
    # and a whole SD3 pipeline run with skip-layer guidance goes through
    pipe = tiny_sd3_pipeline()
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: calls.append(kw.get("skip_layers") is not None), with_kwargs=True)
    with perturbed_i2t_guidance(pipe, [1], scale=1.0, sigma=1.0):
        out = _run(pipe, skip_guidance_layers=[0], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    hook.remove()
    assert calls == [False, False, False, False, True]  # step 0: guided + companion; step 1: + skip-layer pass
    assert torch.isfinite(out).all()
