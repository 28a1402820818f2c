"""Tests of the split path: the attention-phase kernel (kernels/attention.py) and the capture kernel
(kernels/capture.py), through Triton's interpreter on the CPU (TRITON_INTERPRET=1, set by conftest.py), against
the float64 oracle and float64 formulas of the three normalisations. Both load paths of the attention kernel run:
pointers (sm80's cp.async path) and tensor descriptors (sm90's TMA path; device-side descriptors work in the
interpreter). Outputs are NaN-poisoned before every launch; sizes are odd so every block is ragged.
"""
import itertools

import pytest
import torch

from conftest import DEVICE, MAP_TOL, OUT_TOL, random_qkv
from seg4diff_fast.kernels import attention_fwd, capture_maps, joint_attention_fwd
from seg4diff_fast.reference import image_positions, reference_joint_attention


def _order(order, n_img, t_full):
    return (0, t_full) if order == "text_first" else (n_img, n_img + t_full)


def _text_index(t_full, t, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(t_full, generator=g)[:t].to(DEVICE)


# ---- attention phase ------------------------------------------------------------------------------------
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("d,dtype,layout,n", [
    (16, torch.float16, "bhnd", 1 + 77),
    (40, torch.float32, "bnhd", 100 + 33),
    (64, torch.float16, "bnhd", 129),
    (72, torch.float16, "bhnd", 154 + 50),
    (128, torch.float32, "bhnd", 96),  # N a multiple of the 32-row interpreter block: no ragged block
    (128, torch.float32, "bnhd", 77 + 30),  # the ragged key block before the full ones (_tiles.attend_all_keys)
])
def test_attention_phase(d, dtype, layout, n, tma):
    q, k, v = random_qkv(2, 2, n, d, dtype, seed=n + d, layout=layout)
    out = torch.empty_like(q).fill_(float("nan"))
    got, lse = attention_fwd(q, k, v, scale=d ** -0.5, out=out, tma=tma)
    assert got.data_ptr() == out.data_ptr() and got.stride() == torch.empty_like(q).stride()
    ref_out = reference_joint_attention(q, k, v, 0, 1, capture=None)[0]
    atol, rtol = OUT_TOL[dtype]
    torch.testing.assert_close(got.double(), ref_out, atol=atol, rtol=rtol)
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * d ** -0.5
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, n)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)  # natural log


def test_attention_lse_matches_sdpa():
    """The lse convention is SDPA's (natural log of the scaled scores' normaliser)."""
    from seg4diff_fast.attention import sdpa_with_lse

    q, k, v = random_qkv(1, 3, 77, 32, torch.float32, seed=3)
    fused = sdpa_with_lse(q, k, v, 0.2)
    if fused is None:
        pytest.skip("no SDPA kernel with lse on this device")
    _, lse = attention_fwd(q, k, v, scale=0.2)
    torch.testing.assert_close(lse, fused[1].float(), atol=1e-5, rtol=1e-5)


# ---- capture phase --------------------------------------------------------------------------------------
def _f64_maps(q, k, ts, te, text_index, normalize, mean, scale):
    """float64 formula of every normalisation: (i2t [B, (H,) N_img, T], t2i [B, (H,) T, N_img])."""
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    img = image_positions(q.shape[2], ts, te, device=q.device)
    txt = torch.arange(ts, te, device=q.device)
    if text_index is not None:
        txt = txt[text_index.long()]
    maps = []
    for rows, cols in ((img, txt), (txt, img)):
        block = s[:, :, rows][:, :, :, cols]
        if normalize == "joint":
            m = torch.exp(block - torch.logsumexp(s, -1)[:, :, rows, None])
        elif normalize == "text":
            m = torch.softmax(block, -1)  # over the block's own columns
        else:
            m = block
        maps.append(m.mean(1) if mean else m)
    return maps


def _capture(q, k, lse, ts, te, capture, mean, text_index, map_dtype, normalize, groups=None, lse_base="e"):
    return capture_maps(q, k, lse, ts, te, capture_i2t=capture in ("i2t", "both"),
                        capture_t2i=capture in ("t2i", "both"), heads_mean=mean, text_index=text_index,
                        map_dtype=map_dtype, scale=q.shape[-1] ** -0.5, normalize=normalize, lse_base=lse_base,
                        groups=groups)


def _check_maps(got, ref, map_dtype, normalize):
    for g, r in zip(got, ref):
        if g is None:
            continue
        assert g.dtype == map_dtype and g.shape == r.shape and g.is_contiguous()
        atol, rtol = MAP_TOL[map_dtype]
        if normalize == "logits":  # scores of order 10: relative tolerance of the map dtype only
            atol = 1e-5
        torch.testing.assert_close(g.double(), r, atol=atol, rtol=rtol)


@pytest.mark.parametrize("order", ["text_first", "text_last"])
@pytest.mark.parametrize("capture,mean,indexed", list(itertools.product(["i2t", "t2i", "both"], [False, True],
                                                                         [False, True])))
def test_capture_matrix(capture, mean, indexed, order):
    n_img, t_full, d = 100, 37, 16
    q, k, v = random_qkv(2, 2, n_img + t_full, d, torch.float16, seed=1)
    ts, te = _order(order, n_img, t_full)
    idx = _text_index(t_full, 11, seed=2) if indexed else None
    _, lse = attention_fwd(q, k, v, scale=d ** -0.5)
    got = _capture(q, k, lse, ts, te, capture, mean, idx, torch.float32, "joint")
    ref = _f64_maps(q, k, ts, te, idx, "joint", mean, d ** -0.5)
    assert (got[0] is None) == (capture == "t2i") and (got[1] is None) == (capture == "i2t")
    _check_maps(got, ref, torch.float32, "joint")


@pytest.mark.parametrize("normalize", ["joint", "text", "logits"])
@pytest.mark.parametrize("order,mean,indexed", [("text_first", True, True), ("text_last", False, False)])
def test_normalisations(normalize, order, mean, indexed):
    n_img, t_full, d = 77, 154, 40
    q, k, v = random_qkv(1, 3, n_img + t_full, d, torch.float32, seed=4, layout="bnhd")
    ts, te = _order(order, n_img, t_full)
    idx = _text_index(t_full, 33, seed=5) if indexed else None
    _, lse = attention_fwd(q, k, v, scale=d ** -0.5)
    got = _capture(q, k, lse if normalize == "joint" else None, ts, te, "both", mean, idx, torch.float32, normalize)
    _check_maps(got, _f64_maps(q, k, ts, te, idx, normalize, mean, d ** -0.5), torch.float32, normalize)
    if normalize == "text":  # rows of the block sum to 1 over its columns
        sums = got[0].double().sum(-1)
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)


# (B, H, N_img, T_full, D, order, dtype, n_index, map_dtype, groups)
SWEEP = [
    (1, 1, 16, 1, 8, "text_last", torch.float16, None, torch.float32, None),
    (1, 2, 250, 333, 64, "text_last", torch.float16, 77, torch.float16, 1),
    (2, 2, 129, 77, 72, "text_first", torch.float32, None, torch.bfloat16, 2),
    (1, 2, 100, 7, 128, "text_first", torch.float16, 3, torch.float16, None),
]


@pytest.mark.parametrize("b,h,n_img,t_full,d,order,dtype,n_index,map_dtype,groups", SWEEP)
def test_capture_sweep(b, h, n_img, t_full, d, order, dtype, n_index, map_dtype, groups):
    q, k, v = random_qkv(b, h, n_img + t_full, d, dtype, seed=n_img + d)
    ts, te = _order(order, n_img, t_full)
    idx = None if n_index is None else _text_index(t_full, n_index, seed=d)
    _, lse = attention_fwd(q, k, v, scale=d ** -0.5)
    for mean in (False, True):
        got = _capture(q, k, lse, ts, te, "both", mean, idx, map_dtype, "joint", groups=groups if mean else None)
        _check_maps(got, _f64_maps(q, k, ts, te, idx, "joint", mean, d ** -0.5), map_dtype, "joint")


def test_capture_base2_lse():
    """A base-2 lse (the fused kernel's scratch convention) gives the same maps as the natural-log one."""
    q, k, v = random_qkv(1, 2, 90, 16, torch.float32, seed=6)
    _, lse = attention_fwd(q, k, v, scale=0.25)
    a = _capture(q, k, lse, 70, 90, "both", False, None, torch.float32, "joint")
    b = _capture(q, k, lse * 1.4426950408889634, 70, 90, "both", False, None, torch.float32, "joint", lse_base="2")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


# ---- determinism of the head mean -----------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["capture", "fused"])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_head_mean_bit_identical(kernel, groups):
    """Two runs give the same bits (no atomics), and every grouping gives the float64 mean."""
    q, k, v = random_qkv(1, 4, 111, 16, torch.float32, seed=7)
    ts, te = 0, 29
    ref = _f64_maps(q, k, ts, te, None, "joint", True, 0.25)
    runs = []
    for _ in range(2):
        if kernel == "capture":
            _, lse = attention_fwd(q, k, v, scale=0.25)
            maps = capture_maps(q, k, lse, ts, te, capture_i2t=True, capture_t2i=True, heads_mean=True,
                                text_index=None, map_dtype=torch.float32, scale=0.25, groups=groups)
        else:
            _, *maps = joint_attention_fwd(q, k, v, ts, te, capture_i2t=True, capture_t2i=True, heads_mean=True,
                                           text_index=None, map_dtype=torch.float32, scale=0.25, groups=groups)
        runs.append(maps)
        _check_maps(maps, ref, torch.float32, "joint")
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---- the fused kernel's options that the split path shares ----------------------------------------------
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("normalize", ["joint", "logits"])
def test_fused_tma_and_logits(tma, normalize):
    q, k, v = random_qkv(1, 2, 100 + 37, 72, torch.float16, seed=8, layout="bnhd")
    out, i2t, t2i = joint_attention_fwd(q, k, v, 100, 137, capture_i2t=True, capture_t2i=True, heads_mean=True,
                                        text_index=None, map_dtype=torch.float32, scale=72 ** -0.5,
                                        normalize=normalize, tma=tma, groups=1)
    assert out.stride() == torch.empty_like(q).stride()
    atol, rtol = OUT_TOL[torch.float16]
    torch.testing.assert_close(out.double(), reference_joint_attention(q, k, v, 100, 137, capture=None)[0],
                               atol=atol, rtol=rtol)
    _check_maps((i2t, t2i), _f64_maps(q, k, 100, 137, None, normalize, True, 72 ** -0.5), torch.float32, normalize)


def test_fused_rejects_text_normalisation():
    q, k, v = random_qkv(1, 1, 40, 16, torch.float32, seed=9)
    with pytest.raises(ValueError, match="normalize"):
        joint_attention_fwd(q, k, v, 0, 8, capture_i2t=True, capture_t2i=False, heads_mean=False, text_index=None,
                            map_dtype=torch.float32, scale=0.25, normalize="text")


@pytest.mark.parametrize("backend", ["triton", "triton-split", "sdpa", "torch", "reference"])
def test_every_backend_returns_empty_like_strides(backend):
    """Flux passes transposed [B, N, H, D] views: out comes back with torch.empty_like(q)'s strides."""
    from seg4diff_fast import joint_attention

    q, k, v = random_qkv(1, 2, 50, 16, torch.float32, seed=10, layout="bnhd")
    out, _ = joint_attention(q, k, v, slice(0, 10), capture="i2t", backend=backend)
    assert out.stride() == torch.empty_like(q).stride()


@pytest.mark.skipif(DEVICE.type != "cuda", reason="bf16 arithmetic is not supported by the Triton interpreter")
@pytest.mark.parametrize("d", [64, 128])
def test_bf16_split(d):
    q, k, v = random_qkv(2, 3, 4096 + 154, d, torch.bfloat16, seed=11)
    out, lse = attention_fwd(q, k, v, scale=d ** -0.5)
    atol, rtol = OUT_TOL[torch.bfloat16]
    torch.testing.assert_close(out.double(), reference_joint_attention(q, k, v, 0, 1, capture=None)[0],
                               atol=atol, rtol=rtol)
    got = _capture(q, k, lse, 4096, 4250, "both", True, None, torch.bfloat16, "joint")
    _check_maps(got, _f64_maps(q, k, 4096, 4250, None, "joint", True, d ** -0.5), torch.bfloat16, "joint")


@pytest.mark.parametrize("n", [77 + 30, 128])
def test_attention_phase_warp_specialised_variant(monkeypatch, n):
    """The warp-specialised variant (TMA path) through the interpreter: the autotuner is given that single config
    for this test. N = 107: one loop masking every key block (EVEN_N False); N = 128: the unmasked loop."""
    import triton

    from seg4diff_fast.kernels import attention as att

    cfg = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "WARP_SPECIALIZE": True}, num_warps=4, num_stages=1)
    monkeypatch.setattr(att._attention_fwd_kernel, "configs", [cfg])
    monkeypatch.setattr(att._attention_fwd_kernel, "cache", {})
    q, k, v = random_qkv(1, 2, n, 72, torch.float16, seed=12, layout="bnhd")
    out, lse = attention_fwd(q, k, v, scale=72 ** -0.5, tma=True)
    atol, rtol = OUT_TOL[torch.float16]
    torch.testing.assert_close(out.double(), reference_joint_attention(q, k, v, 0, 1, capture=None)[0],
                               atol=atol, rtol=rtol)
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * 72 ** -0.5
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)


def test_attention_phase_warp_specialises_only_without_a_ragged_key_block():
    """Triton 3.9 cannot peel the ragged last key block out of a warp-specialised loop (it masks every block
    there), so the prune keeps the warp-specialised configs for N a multiple of their BLOCK_N only."""
    import triton

    from seg4diff_fast.kernels import _aot
    from seg4diff_fast.kernels import attention as att

    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "WARP_SPECIALIZE": ws}, num_warps=w, num_stages=s)
               for bm, bn, w, s, ws in att._GPU_CONFIGS]
    q = _aot.DevicePointer(torch.float16)

    def ws_kept(n):
        kept = att._prune(configs, {"N": n, "Q": q}, max_shared_memory=232448, HEAD_DIM=128, USE_TMA=True)
        return sorted(c.kwargs["BLOCK_N"] for c in kept if c.kwargs["WARP_SPECIALIZE"])

    assert ws_kept(4250) == []  # SD3 1024^2: ragged for every BLOCK_N
    assert ws_kept(4608) == [64, 128]  # Flux 1024^2
    assert ws_kept(4096 + 64) == [64]
