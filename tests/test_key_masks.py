"""Key masks in ``joint_attention(..., key_mask=...)`` on every backend, against the float64 oracle.

A boolean ``[B, N]`` key mask (True = the key takes part): masked keys get probability 0 and leave every
normaliser; their map columns are exactly 0; a fully masked sample gives out 0 and maps 0 (SDPA's CPU result).
A float ``[B, N]`` key mask is an additive key bias (SDPA's semantics): fresh N(0, 1) biases with some ``-inf``
(or ``torch.finfo(torch.float32).min``) keys, in float16 / bfloat16 / float32 / float64, at 77 text tokens.
Every backend (the Triton ones through Triton's interpreter on the CPU) is compared with
``seg4diff_fast.reference`` in float64 and ``out`` with torch's own SDPA given the same mask, at odd sizes
(13 text tokens with 37 or 45 image tokens, off every block), both token orders, every normalisation, capture
i2t / t2i / both, heads mean / all, text_index, float16 and float32, masks that differ per sample (text
padding from lengths, random masks on image keys too, a fully masked sample); gradients against float64
autograd through the reference; torch.compile keeps one graph; bad masks are refused before any launch.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, MAP_TOL, OUT_TOL
from conftest import random_qkv as _inputs
from seg4diff_fast import attention as attention_module
from seg4diff_fast.attention import joint_attention, key_mask_from_lengths
from seg4diff_fast.reference import reference_joint_attention
from test_trainable_maps import _grad_check as _trainable_grad_check

BACKENDS = ["triton", "triton-split", "sdpa", "torch", "reference"]
NORMALIZATIONS = ["joint", "text", "logits"]
N_TEXT = 13


def _mask(kind, b, n, text_slice, seed):
    """A bool ``[b, n]`` key mask on DEVICE that differs per sample.

    "lengths": text padding (key_mask_from_lengths), sample 0 keeps 5 text tokens, sample 1 none (its whole text
    block is masked: "text" i2t rows have no valid key); "random": about 30 % of all keys masked, image keys
    too; "dead": sample 0 random, sample 1 fully masked (every key).
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "lengths":
        lengths = torch.tensor([5, 0] + [N_TEXT] * (b - 2))[:b]
        return key_mask_from_lengths(lengths.to(DEVICE), n, text_slice)
    mask = torch.rand(b, n, generator=g) > 0.3
    mask[:, text_slice.start] = True  # at least one valid text key in each live sample
    if kind == "dead":
        mask[1] = False
    return mask.to(DEVICE)


def _text_index(kind):
    if kind is None:
        return None
    if kind == "unique":
        return torch.tensor([4, 0, N_TEXT - 1, 7], device=DEVICE)
    return torch.tensor([3, 3, 0, N_TEXT - 1, 3], device=DEVICE)  # repeats: copies of one column


def _columns(text_slice, n, text_index):
    """Sequence positions ``([T] map text columns, [N_img] image columns)``."""
    txt = torch.arange(text_slice.start, text_slice.stop)
    if text_index is not None:
        txt = txt[text_index.cpu()]
    img = torch.tensor([p for p in range(n) if not text_slice.start <= p < text_slice.stop])
    return txt, img


def _assert_masked_zero(maps, key_mask, text_slice, n, text_index):
    """Masked key columns are exactly 0 in i2t and t2i; a fully masked sample's maps are 0 everywhere."""
    txt, img = _columns(text_slice, n, text_index)
    m = key_mask.cpu()
    for b in range(m.shape[0]):
        if maps.i2t is not None:
            i2t = maps.i2t[b].cpu()  # [(H,) N_img, T]
            assert (i2t[..., ~m[b, txt]] == 0).all()
            if not m[b].any():
                assert (i2t == 0).all()
        if maps.t2i is not None:
            t2i = maps.t2i[b].cpu()  # [(H,) T, N_img]
            assert (t2i[..., ~m[b, img]] == 0).all()
            if not m[b].any():
                assert (t2i == 0).all()


# (capture, heads, order, dtype, mask kind, text_index kind), one list cycled over backend x normalisation.
CASES = [
    ("both", "all", "sd3", torch.float32, "lengths", None),
    ("i2t", "mean", "flux", torch.float16, "random", "unique"),
    ("t2i", "mean", "sd3", torch.float32, "dead", None),
    ("both", "mean", "flux", torch.float16, "dead", "repeats"),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_out_and_maps_match_float64_oracle_and_sdpa(backend, normalize, case):
    capture, heads, order, dtype, mask_kind, index_kind = CASES[case]
    b, h, d = 2, 2, 16
    n_img = 37 if order == "sd3" else 45
    n = n_img + N_TEXT
    seed = 1000 + 10 * NORMALIZATIONS.index(normalize) + case
    q, k, v = _inputs(b, h, n, d, dtype, seed=seed)
    text_slice = slice(n_img, n) if order == "sd3" else slice(0, N_TEXT)
    key_mask = _mask(mask_kind, b, n, text_slice, seed)
    text_index = _text_index(index_kind)
    map_dtype = dtype

    out, maps = joint_attention(q, k, v, text_slice, capture=capture, heads=heads, text_index=text_index,
                                map_dtype=map_dtype, backend=backend, normalize=normalize, key_mask=key_mask)
    ref_out, ref_i2t, ref_t2i = reference_joint_attention(
        q, k, v, text_slice.start, text_slice.stop, capture=capture, heads=heads, text_index=text_index,
        normalize=normalize, key_mask=key_mask)
    # out is SDPA's with the same boolean mask (float64 on the CPU: its math path), and the oracle's.
    sdpa = F.scaled_dot_product_attention(*(t.double() for t in (q, k, v)), attn_mask=key_mask[:, None, None, :])
    torch.testing.assert_close(ref_out, sdpa, atol=1e-12, rtol=1e-12)
    atol, rtol = OUT_TOL[dtype]
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out.double(), sdpa, atol=atol, rtol=rtol)
    for got, ref in ((maps.i2t, ref_i2t), (maps.t2i, ref_t2i)):
        if ref is None:
            assert got is None
            continue
        assert got.shape == ref.shape and got.dtype == map_dtype and not got.isnan().any()
        atol, rtol = MAP_TOL[map_dtype]
        if backend == "reference" and dtype == torch.float16:
            # The "reference" backend computes the whole softmax in float16 (Seg4Diff's own path), not float32:
            # measured max 3.5e-4 abs, 2.2e-3 relative here.
            atol, rtol = 1e-3, 1e-2
        if normalize == "logits":  # unbounded scores: relative to their size
            atol = rtol * ref.abs().max().item()
        torch.testing.assert_close(got.double(), ref, atol=atol, rtol=rtol)
    _assert_masked_zero(maps, key_mask, text_slice, n, text_index)
    if mask_kind == "dead":
        assert (out[1] == 0).all()


def _grad_check(q, k, v, text_slice, capture, heads, normalize, backend, key_mask, map_dtype=torch.float32, seed=0):
    """tests/test_trainable_maps.py's gradient check with a key mask: maps, dq, dk, dv against float64 autograd
    through the reference with the same mask, no NaN, zero gradients for a fully masked sample."""
    return _trainable_grad_check(q, k, v, text_slice, capture, heads, None, normalize, backend, map_dtype=map_dtype,
                                 seed=seed, key_mask=key_mask)


# The Triton backends share the maps' backward ("joint": kernels/maps_backward.py; the other two in torch): the
# split ones are checked on "joint" only.
GRAD_GRID = [(backend, normalize) for backend in ["torch", "triton", "reference"] for normalize in NORMALIZATIONS]
GRAD_GRID += [("triton-split", "joint"), ("sdpa", "joint")]


@pytest.mark.parametrize("backend,normalize", GRAD_GRID)
def test_masked_gradients_match_float64_autograd(backend, normalize):
    b, h, n_img, d = 3, 2, 37, 8
    n = n_img + N_TEXT
    i = GRAD_GRID.index((backend, normalize))
    order = ("sd3", "flux")[i % 2]
    text_slice = slice(n_img, n) if order == "sd3" else slice(0, N_TEXT)
    q, k, v = _inputs(b, h, n, d, torch.float32, seed=2000 + i)
    key_mask = _mask("dead", b, n, text_slice, seed=i)
    key_mask[2] = key_mask_from_lengths(torch.tensor([3], device=DEVICE), n, text_slice)[0]  # padded text
    _grad_check(q, k, v, text_slice, "both", ("mean", "all")[i % 2], normalize, backend, key_mask, seed=i)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masked_gradients_float16_inputs(backend):
    n = 45 + N_TEXT
    q, k, v = _inputs(2, 2, n, 16, torch.float16, seed=2100)
    key_mask = _mask("lengths", 2, n, slice(0, N_TEXT), seed=3)
    _grad_check(q, k, v, slice(0, N_TEXT), "both", "all", "joint", backend, key_mask, map_dtype=torch.float16)


def test_all_true_mask_changes_nothing_and_a_batch_of_one_mask_broadcasts():
    n = 37 + N_TEXT
    q, k, v = _inputs(2, 2, n, 16, torch.float32, seed=2200)
    plain = joint_attention(q, k, v, slice(37, n), capture="both", backend="triton", map_dtype=torch.float32)
    ones = joint_attention(q, k, v, slice(37, n), capture="both", backend="triton", map_dtype=torch.float32,
                           key_mask=torch.ones(2, n, dtype=torch.bool))
    for a, b in zip((plain[0], plain[1].i2t, plain[1].t2i), (ones[0], ones[1].i2t, ones[1].t2i)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    one = _mask("random", 1, n, slice(37, n), seed=4)
    for backend in ("triton", "torch"):
        got = joint_attention(q, k, v, slice(37, n), capture="both", backend=backend, key_mask=one)
        want = joint_attention(q, k, v, slice(37, n), capture="both", backend=backend, key_mask=one.expand(2, n))
        torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
        torch.testing.assert_close(got[1].i2t, want[1].i2t, atol=0, rtol=0)


def test_key_mask_from_lengths():
    lengths = torch.tensor([0, 3, 7])
    for text_slice, n in ((slice(10, 17), 17), (slice(0, 7), 17)):
        mask = key_mask_from_lengths(lengths, n, text_slice)
        assert mask.dtype == torch.bool and mask.shape == (3, n)
        for b, length in enumerate(lengths.tolist()):
            want = torch.ones(n, dtype=torch.bool)
            want[text_slice.start + length:text_slice.stop] = False
            assert torch.equal(mask[b], want)
    with pytest.raises(ValueError, match=r"text_lengths must lie in \[0, 7\]"):
        key_mask_from_lengths(torch.tensor([8]), 17, slice(0, 7))
    with pytest.raises(ValueError, match="text_lengths must lie"):
        key_mask_from_lengths(torch.tensor([-1]), 17, slice(0, 7))
    with pytest.raises(TypeError, match="text_lengths must have an integer dtype"):
        key_mask_from_lengths(torch.tensor([1.0]), 17, slice(0, 7))
    with pytest.raises(ValueError, match="text_lengths must be 1-D"):
        key_mask_from_lengths(torch.tensor([[1]]), 17, slice(0, 7))


@pytest.mark.parametrize("mask,exc,match", [
    (torch.ones(2, 30, dtype=torch.int64), TypeError, r"key_mask must have dtype torch.bool .* or a float dtype"),
    (torch.ones(2, 30, dtype=torch.uint8), TypeError, r"key_mask must have dtype torch.bool"),
    (torch.zeros(2, 30, requires_grad=True), ValueError, r"key_mask requires grad, but the key bias gets no gradient"),
    (torch.zeros(2, 29), ValueError, r"key_mask must have shape \[B, N\] = \[2, 30\]"),
    (torch.ones(2, 29, dtype=torch.bool), ValueError, r"key_mask must have shape \[B, N\] = \[2, 30\]"),
    (torch.ones(3, 30, dtype=torch.bool), ValueError, r"key_mask must have shape"),
    (torch.ones(2, 1, 30, dtype=torch.bool), ValueError, r"key_mask must have shape"),
    (torch.ones(30, dtype=torch.bool), ValueError, r"key_mask must have shape"),
    (torch.ones(2, 30, dtype=torch.bool, device="meta"), ValueError, r"key_mask must be on the device of q"),
    ([[True] * 30] * 2, TypeError, r"key_mask must be a bool or float tensor"),
])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_masks_are_refused_before_any_launch(monkeypatch, backend, mask, exc, match):
    def no_launch(*args, **kwargs):
        raise AssertionError("the op ran")

    monkeypatch.setattr(torch.ops.seg4diff_fast, "joint_attention", no_launch, raising=False)
    q, k, v = _inputs(2, 2, 30, 8, torch.float32, seed=0)
    with pytest.raises(exc, match=match):
        joint_attention(q, k, v, slice(0, 5), backend=backend, key_mask=mask)


def test_torch_compile_masked_training_step_is_one_graph():
    # fullgraph fails on any graph break; inductor checks the custom op's real outputs against its fake ones.
    from torch._dynamo.utils import counters

    n = 33 + N_TEXT
    q, k, v = _inputs(2, 2, n, 8, torch.float32, seed=2300)
    key_mask = _mask("dead", 2, n, slice(0, N_TEXT), seed=5)

    def step(q, k, v, key_mask):
        out, maps = joint_attention(q, k, v, slice(0, N_TEXT), capture="both", backend="torch",
                                    map_dtype=torch.float32, key_mask=key_mask)
        return out.square().mean() + maps.i2t.sigmoid().mean() + maps.t2i.square().mean()

    torch._dynamo.reset()
    counters.clear()
    grads = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        fn(*leaves, key_mask).backward()
        grads.append([t.grad for t in leaves])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_attention_autotune_drops_warp_specialised_configs_with_a_mask():
    # Triton 3.9 cannot warp-specialise the attention loop with the mask's pointer loads (compile error on sm90a):
    # the prune drops those configs for masked launches only; HAS_MASK is in the autotune key.
    import triton

    from seg4diff_fast.kernels import _aot
    from seg4diff_fast.kernels import attention as attention_kernels

    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "WARP_SPECIALIZE": ws}, num_warps=w, num_stages=s)
               for bm, bn, w, s, ws in attention_kernels._GPU_CONFIGS]
    args = {"N": 4608, "Q": _aot.DevicePointer(torch.float16)}  # a multiple of BLOCK_N: WS configs run unmasked
    kept = {flag: attention_kernels._prune(configs, args, max_shared_memory=232448, HEAD_DIM=64, USE_TMA=True,
                                           HAS_MASK=flag) for flag in (False, True)}
    assert any(c.kwargs["WARP_SPECIALIZE"] for c in kept[False])
    assert kept[True] and not any(c.kwargs["WARP_SPECIALIZE"] for c in kept[True])
    assert "HAS_MASK" in attention_kernels._attention_fwd_kernel.keys


# ---- float key masks: additive key biases ------------------------------------------------------------------
T_BIAS = 77  # CLIP's length: off every block size


def _bias(kind, b, n, text_slice, seed, dtype=torch.float32):
    """A float ``[b, n]`` additive key bias on DEVICE that differs per sample: N(0, 1) values, about 25 % of the keys
    masked, image keys too (kind "inf": ``-inf``; "finfo": ``torch.finfo(torch.float32).min``, which counts as
    masked), at least one unmasked text key per sample; "dead": as "inf", and sample 1 has every key masked;
    "chroma": ChromaPipeline's 0 / 1 token mask (text tokens after the first 9 + 1 get 0, the rest 1: nothing is
    masked, the valid keys get +1)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "chroma":
        bias = torch.ones(b, n)
        bias[:, text_slice.start + 10:text_slice.stop] = 0.0
        return bias.to(DEVICE, dtype)
    bias = torch.randn(b, n, generator=g)
    masked = torch.rand(b, n, generator=g) < 0.25
    masked[:, text_slice.start] = False
    bias = bias.masked_fill(masked, torch.finfo(torch.float32).min if kind == "finfo" else float("-inf"))
    if kind == "dead":
        bias[1] = float("-inf")
    return bias.to(DEVICE, dtype)


# (capture, heads, order, dtype, bias kind, bias dtype, text_index kind), cycled over backend x normalisation.
BIAS_CASES = [
    ("both", "all", "sd3", torch.float32, "inf", torch.float32, None),
    ("i2t", "mean", "flux", torch.float16, "finfo", torch.float64, "unique"),
    ("both", "mean", "flux", torch.float32, "dead", torch.float32, None),
    ("t2i", "all", "sd3", torch.float16, "inf", torch.float16, None),
    ("both", "mean", "flux", torch.float32, "chroma", torch.bfloat16, "repeats"),
]


@pytest.mark.parametrize("case", range(len(BIAS_CASES)))
@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float_bias_out_and_maps_match_float64_oracle_and_sdpa(backend, normalize, case):
    capture, heads, order, dtype, kind, bias_dtype, index_kind = BIAS_CASES[case]
    b, h, d = 2, 2, 16
    n_img = 37 if order == "sd3" else 45
    n = n_img + T_BIAS
    seed = 3000 + 10 * NORMALIZATIONS.index(normalize) + case
    q, k, v = _inputs(b, h, n, d, dtype, seed=seed)
    text_slice = slice(n_img, n) if order == "sd3" else slice(0, T_BIAS)
    bias = _bias(kind, b, n, text_slice, seed, bias_dtype)
    text_index = _text_index(index_kind)

    out = torch.full_like(q, float("nan"))  # poisoned: every entry must be written
    out, maps = joint_attention(q, k, v, text_slice, capture=capture, heads=heads, text_index=text_index,
                                map_dtype=dtype, backend=backend, normalize=normalize, key_mask=bias)
    ref_out, ref_i2t, ref_t2i = reference_joint_attention(
        q, k, v, text_slice.start, text_slice.stop, capture=capture, heads=heads, text_index=text_index,
        normalize=normalize, key_mask=bias)
    # The oracle is SDPA (float64 math path) given the same float mask, on every sample with an unmasked key.
    live = [i for i in range(b) if not (kind == "dead" and i == 1)]
    sdpa = F.scaled_dot_product_attention(*(t.double()[live] for t in (q, k, v)),
                                          attn_mask=bias.double()[live][:, None, None, :])
    torch.testing.assert_close(ref_out[live], sdpa, atol=1e-12, rtol=1e-12)
    atol, rtol = OUT_TOL[dtype]
    if backend == "reference" and dtype == torch.float16:
        atol = 1e-2  # the whole softmax and P V in float16 (Seg4Diff's own path): measured 3.3e-3 abs here
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    for got, ref in ((maps.i2t, ref_i2t), (maps.t2i, ref_t2i)):
        if ref is None:
            assert got is None
            continue
        assert got.shape == ref.shape and got.dtype == dtype and not got.isnan().any()
        atol, rtol = MAP_TOL[dtype]
        if backend == "reference" and dtype == torch.float16:
            atol, rtol = 1e-3, 1e-2  # the whole softmax in float16 (see the bool-mask test)
        if normalize == "logits":  # unbounded scores: relative to their size
            atol = rtol * ref.abs().max().item()
        torch.testing.assert_close(got.double(), ref, atol=atol, rtol=rtol)
    if kind != "chroma":
        _assert_masked_zero(maps, bias != float("-inf") if kind != "finfo" else bias > -1e38, text_slice, n,
                            text_index)
    if kind == "dead":
        assert (out[1] == 0).all()


def test_float_bias_of_zeros_and_minus_inf_equals_the_bool_mask():
    # One code path: a bool mask is the bias 0 / -inf; the results are the same bits.
    n = 45 + T_BIAS
    q, k, v = _inputs(2, 2, n, 16, torch.float32, seed=3100)
    mask = _mask("dead", 2, n, slice(0, T_BIAS), seed=6)
    bias = torch.zeros(2, n, device=DEVICE).masked_fill(~mask, float("-inf"))
    for backend in ("triton", "triton-split", "torch"):
        for normalize in NORMALIZATIONS:
            a = joint_attention(q, k, v, slice(0, T_BIAS), capture="both", backend=backend, normalize=normalize,
                                map_dtype=torch.float32, key_mask=mask)
            b = joint_attention(q, k, v, slice(0, T_BIAS), capture="both", backend=backend, normalize=normalize,
                                map_dtype=torch.float32, key_mask=bias)
            for x, y in ((a[0], b[0]), (a[1].i2t, b[1].i2t), (a[1].t2i, b[1].t2i)):
                torch.testing.assert_close(x, y, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["triton", "triton-split", "torch"])
def test_finfo_min_bias_is_masked_and_matches_sdpa_where_a_row_has_an_ordinary_key(backend):
    # torch.finfo(float32).min * log2(e) overflows: such keys are masked (probability exactly 0). SDPA (float32)
    # gives them exp(min + s - max) = 0 too: equal on every sample with another key; a sample whose keys are
    # all finfo.min is 0 here (a fully masked sample), where SDPA averages over them.
    n = 37 + T_BIAS
    text_slice = slice(37, n)
    q, k, v = _inputs(2, 2, n, 16, torch.float32, seed=3200)
    bias = _bias("finfo", 2, n, text_slice, seed=7)
    bias[1] = torch.finfo(torch.float32).min
    out, maps = joint_attention(q, k, v, text_slice, capture="both", backend=backend, map_dtype=torch.float32,
                                key_mask=bias)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :])
    torch.testing.assert_close(out[0], sdpa[0], atol=2e-5, rtol=2e-5)
    assert (out[1] == 0).all() and (maps.i2t[1] == 0).all() and (maps.t2i[1] == 0).all()
    masked = bias[0] == torch.finfo(torch.float32).min
    txt, img = _columns(text_slice, n, None)
    assert masked[txt].any() and masked[img].any()
    assert (maps.i2t[0][..., masked[txt]] == 0).all() and (maps.t2i[0][..., masked[img]] == 0).all()


@pytest.mark.parametrize("backend", ["triton", "triton-split", "torch", "reference"])
def test_nan_bias_makes_the_rows_that_see_it_nan_as_sdpa(backend):
    # Not checked (a device sync): a NaN key bias propagates, as in SDPA; other samples are untouched.
    n = 37 + N_TEXT
    q, k, v = _inputs(2, 2, n, 16, torch.float32, seed=3300)
    bias = torch.zeros(2, n, device=DEVICE)
    bias[1, 5] = float("nan")
    out, maps = joint_attention(q, k, v, slice(37, n), capture="both", backend=backend, map_dtype=torch.float32,
                                key_mask=bias)
    assert F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :])[1].isnan().all()
    assert out[1].isnan().all() and maps.i2t[1].isnan().all()
    assert not out[0].isnan().any() and not maps.i2t[0].isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("bias", [False, True], ids=["bool", "float"])
def test_non_finite_k_and_v_of_masked_keys_are_never_read(backend, normalize, bias):
    # A masked key takes no part: NaN / inf in its rows of k and v (uninitialised padding) change nothing on any
    # backend (torch and sdpa returned NaN for every row; every backend NaN where v held NaN: 0 * NaN in P V), and
    # the gradients are those of the clean inputs, 0 on the masked rows of k and v.
    n = 37 + N_TEXT
    text = slice(37, n)
    q, k, v = _inputs(2, 2, n, 16, torch.float32, seed=3400)
    mask = _mask("random", 2, n, text, seed=3401)
    key_mask = torch.zeros(2, n, device=DEVICE).masked_fill(~mask, float("-inf")) if bias else mask
    masked = (~mask)[:, None, :, None].expand_as(k)  # [B, H, N, D]
    assert masked[:, :, text].any() and masked[:, :, :37].any()  # masked text and image keys
    dirty_k, dirty_v = k.clone(), v.clone()
    plant = torch.tensor([float("nan"), float("inf"), float("-inf")], device=DEVICE)
    dirty_k[masked] = plant.repeat(masked.sum().item() // 3 + 1)[: masked.sum().item()]
    dirty_v[masked] = plant.flip(0).repeat(masked.sum().item() // 3 + 1)[: masked.sum().item()]

    def run(k, v):
        q_, k_, v_ = (t.detach().requires_grad_() for t in (q, k, v))
        out, maps = joint_attention(q_, k_, v_, text, capture="both", heads="all", map_dtype=torch.float32,
                                    backend=backend, normalize=normalize, key_mask=key_mask)
        (out.sum() + maps.i2t.sum() + maps.t2i.sum()).backward()
        return out, maps.i2t, maps.t2i, q_.grad, k_.grad, v_.grad

    clean, dirty = run(k, v), run(dirty_k, dirty_v)
    for want, got in zip(clean, dirty):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert (dirty[4][masked] == 0).all() and (dirty[5][masked] == 0).all()
    ref_out, ref_i2t, _ = reference_joint_attention(q, dirty_k, dirty_v, text.start, text.stop, capture="both",
                                                    normalize=normalize, key_mask=key_mask)
    torch.testing.assert_close(dirty[0].double(), ref_out, atol=OUT_TOL[torch.float32][0],
                               rtol=OUT_TOL[torch.float32][1])
    torch.testing.assert_close(dirty[1].double(), ref_i2t, atol=MAP_TOL[torch.float32][0],
                               rtol=MAP_TOL[torch.float32][1])


BIAS_GRAD_GRID = [(backend, normalize) for backend in ["torch", "triton"] for normalize in NORMALIZATIONS]
BIAS_GRAD_GRID += [("triton-split", "joint"), ("reference", "joint")]


@pytest.mark.parametrize("backend,normalize", BIAS_GRAD_GRID)
def test_float_bias_gradients_match_float64_autograd(backend, normalize):
    b, h, n_img, d = 3, 2, 37, 8
    n = n_img + T_BIAS
    i = BIAS_GRAD_GRID.index((backend, normalize))
    text_slice = slice(n_img, n) if i % 2 else slice(0, T_BIAS)
    q, k, v = _inputs(b, h, n, d, torch.float32, seed=3400 + i)
    bias = _bias("dead", b, n, text_slice, seed=i)
    bias[2] = _bias("chroma", 1, n, text_slice, seed=i)[0]
    _grad_check(q, k, v, text_slice, "both", ("mean", "all")[i % 2], normalize, backend, bias, seed=i)


def test_float_bias_gradients_float16_inputs():
    n = 45 + T_BIAS
    q, k, v = _inputs(2, 2, n, 16, torch.float16, seed=3500)
    bias = _bias("inf", 2, n, slice(0, T_BIAS), seed=8)
    _grad_check(q, k, v, slice(0, T_BIAS), "both", "all", "joint", "triton", bias, map_dtype=torch.float16)


def test_torch_compile_float_bias_training_step_is_one_graph():
    from torch._dynamo.utils import counters

    n = 33 + N_TEXT
    q, k, v = _inputs(2, 2, n, 8, torch.float32, seed=3600)
    bias = _bias("dead", 2, n, slice(0, N_TEXT), seed=9)
    bias[0, 3] = torch.finfo(torch.float32).min

    def step(q, k, v, bias):
        out, maps = joint_attention(q, k, v, slice(0, N_TEXT), capture="both", backend="torch",
                                    map_dtype=torch.float32, normalize="logits", key_mask=bias)
        out2, maps2 = joint_attention(q, k, v, slice(0, N_TEXT), capture="i2t", backend="torch",
                                      map_dtype=torch.float32, key_mask=bias)
        return out.square().mean() + maps.i2t.tanh().mean() + maps.t2i.tanh().mean() + maps2.i2t.sigmoid().mean()

    torch._dynamo.reset()
    counters.clear()
    grads = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        fn(*leaves, bias).backward()
        grads.append([t.grad for t in leaves])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
