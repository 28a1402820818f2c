"""Tests of the fused joint-attention kernel (kernels/joint_attention.py) against the float64 oracle.

Without CUDA the kernel runs in Triton's numpy interpreter (TRITON_INTERPRET=1, set by conftest.py before triton is
imported): shapes stay small (a few hundred tokens, 1-3 heads) but odd, so that query blocks straddle the
text/image boundary and every length is a non-multiple of the 32-wide interpreter tiles. The interpreter
has no bf16 arithmetic, so bf16 *inputs* are tested only on CUDA; bf16 *maps* (storage only) run everywhere.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, MAP_TOL, OUT_TOL, random_qkv as _inputs
from seg4diff_fast.kernels import joint_attention_fwd
from seg4diff_fast.reference import reference_joint_attention

CUDA = DEVICE.type == "cuda"

CAPTURES = {"i2t": (True, False), "t2i": (False, True), "both": (True, True), None: (False, False)}


def _text_index(t_full, t, seed):
    """An unsorted unique subset of t of the t_full text positions."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randperm(t_full, generator=g)[:t].to(DEVICE)


def _check(q, k, v, text_start, text_stop, *, capture="both", heads="all", text_index=None,
           map_dtype=torch.float32, poison=True):
    """Launch with NaN-poisoned buffers (or none), compare everything with the float64 oracle."""
    b, h, n, d = q.shape
    scale = d ** -0.5
    cap_i2t, cap_t2i = CAPTURES[capture]
    mean = heads == "mean"
    t_full = text_stop - text_start
    t = t_full if text_index is None else len(text_index)
    n_img = n - t_full
    bufs = {}
    if poison:
        bufs["out"] = torch.full((b, h, n, d), float("nan"), dtype=q.dtype, device=DEVICE)
        if cap_i2t:
            shape = (b, n_img, t) if mean else (b, h, n_img, t)
            bufs["i2t"] = torch.full(shape, float("nan"), dtype=map_dtype, device=DEVICE)
        if cap_t2i:
            shape = (b, t, n_img) if mean else (b, h, t, n_img)
            bufs["t2i"] = torch.full(shape, float("nan"), dtype=map_dtype, device=DEVICE)
    out, i2t, t2i = joint_attention_fwd(
        q, k, v, text_start, text_stop, capture_i2t=cap_i2t, capture_t2i=cap_t2i, heads_mean=mean,
        text_index=text_index, map_dtype=map_dtype, scale=scale, **bufs)
    ref_out, ref_i2t, ref_t2i = reference_joint_attention(
        q, k, v, text_start, text_stop, capture=capture, heads=heads, text_index=text_index, scale=scale)

    assert out.dtype == q.dtype and out.shape == (b, h, n, d) and out.is_contiguous()
    if poison:
        assert out.data_ptr() == bufs["out"].data_ptr()
    atol, rtol = OUT_TOL[q.dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)  # NaN left over fails here
    errs = {"out": (out.double() - ref_out).abs().max().item()}
    for name, got, ref, cap in (("i2t", i2t, ref_i2t, cap_i2t), ("t2i", t2i, ref_t2i, cap_t2i)):
        if not cap:
            assert got is None
            continue
        assert got.dtype == map_dtype and got.shape == ref.shape and got.is_contiguous()
        if poison:
            assert got.data_ptr() == bufs[name].data_ptr()
        atol, rtol = MAP_TOL[map_dtype]
        torch.testing.assert_close(got.double(), ref, atol=atol, rtol=rtol)
        errs[name] = (got.double() - ref).abs().max().item()
    return errs


# ---- full cartesian: capture x heads x text_index x order, at one small odd shape ------------------------
@pytest.mark.parametrize("order", ["text_first", "text_last"])
@pytest.mark.parametrize("use_index", [False, True])
@pytest.mark.parametrize("heads", ["all", "mean"])
@pytest.mark.parametrize("capture", ["i2t", "t2i", "both", None])
def test_capture_matrix(capture, heads, use_index, order):
    n_img, t_full = 100, 37
    q, k, v = _inputs(2, 2, n_img + t_full, 16, torch.float16, seed=1)
    ts, te = (0, t_full) if order == "text_first" else (n_img, n_img + t_full)
    idx = _text_index(t_full, 11, seed=2) if use_index else None
    _check(q, k, v, ts, te, capture=capture, heads=heads, text_index=idx)


# ---- sweeps of sizes, head dims and dtypes at fewer combinations ----------------------------------------
# (B, H, N_img, T_full, D, order, dtype, heads, text_index size or None, map_dtype)
SWEEP = [
    (1, 1, 16, 1, 8, "text_last", torch.float16, "all", None, torch.float32),
    (1, 2, 16, 1, 1, "text_first", torch.float32, "mean", None, torch.float32),
    (2, 1, 100, 7, 64, "text_first", torch.float16, "mean", 3, torch.float16),
    (1, 2, 256, 77, 128, "text_last", torch.float16, "all", None, torch.float16),
    (1, 3, 100, 154, 72, "text_first", torch.float32, "mean", 77, torch.float32),
    (1, 1, 250, 333, 40, "text_last", torch.float16, "all", 77, torch.float32),
    (2, 2, 100, 7, 128, "text_last", torch.float32, "all", None, torch.bfloat16),
    (1, 1, 48, 20, 256, "text_first", torch.float16, "mean", None, torch.float16),
    (1, 2, 64, 32, 96, "text_last", torch.float32, "all", 5, torch.float16),  # lengths multiples of 32
    (1, 1, 1024, 77, 64, "text_last", torch.float16, "mean", 20, torch.float16),  # 35 query blocks
]


@pytest.mark.parametrize("b,h,n_img,t_full,d,order,dtype,heads,n_index,map_dtype", SWEEP)
def test_sweep(b, h, n_img, t_full, d, order, dtype, heads, n_index, map_dtype):
    q, k, v = _inputs(b, h, n_img + t_full, d, dtype, seed=n_img + t_full + d)
    ts, te = (0, t_full) if order == "text_first" else (n_img, n_img + t_full)
    idx = None if n_index is None else _text_index(t_full, n_index, seed=d)
    _check(q, k, v, ts, te, capture="both", heads=heads, text_index=idx, map_dtype=map_dtype)


@pytest.mark.parametrize("map_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads", ["all", "mean"])
def test_map_dtypes(map_dtype, heads):
    q, k, v = _inputs(1, 2, 130, 32, torch.float32, seed=5)
    _check(q, k, v, 0, 30, capture="both", heads=heads, map_dtype=map_dtype)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_text_index_dtypes(index_dtype):
    q, k, v = _inputs(1, 1, 90, 16, torch.float16, seed=6)
    idx = torch.tensor([12, 0, 7, 19], dtype=index_dtype, device=DEVICE)
    _check(q, k, v, 70, 90, capture="both", text_index=idx)


@pytest.mark.parametrize("order", ["text_first", "text_last"])
def test_strided_bnhd_input(order):
    """[B, N, H, D] tensors viewed as [B, H, N, D] (what Flux holds): no copy, all strides honoured."""
    q, k, v = _inputs(2, 3, 120, 64, torch.float16, seed=7, layout="bnhd")
    assert not q.is_contiguous()
    ts, te = (0, 25) if order == "text_first" else (95, 120)
    _check(q, k, v, ts, te, capture="both", heads="mean")


def test_strided_fused_qkv():
    """q, k, v as slices of one fused [B, N, 3, H, D] projection: batch/head/token strides all unusual."""
    g = torch.Generator().manual_seed(8)
    qkv = torch.randn(2, 101, 3, 2, 16, generator=g).to(DEVICE, torch.float16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    _check(q * 2, k, v, 0, 13, capture="both")


def test_allocates_without_buffers():
    q, k, v = _inputs(1, 2, 75, 8, torch.float16, seed=9)
    _check(q, k, v, 0, 9, capture="both", heads="mean", map_dtype=torch.float16, poison=False)
    _check(q, k, v, 0, 9, capture="i2t", heads="all", map_dtype=torch.float32, poison=False)


@pytest.mark.skipif(not CUDA, reason="bf16 arithmetic is not supported by the Triton interpreter")
@pytest.mark.parametrize("d", [64, 128])
def test_bf16_inputs(d):
    q, k, v = _inputs(2, 3, 300, d, torch.bfloat16, seed=10)
    _check(q, k, v, 0, 77, capture="both", heads="mean", map_dtype=torch.bfloat16)
    _check(q, k, v, 223, 300, capture="both", heads="all", map_dtype=torch.float32)


@pytest.mark.skipif(not CUDA, reason="too slow for the interpreter")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sd3_size(dtype):
    """SD3-medium at 1024^2: 4096 image tokens + 154 text tokens, d = 64."""
    q, k, v = _inputs(1, 4, 4250, 64, dtype, seed=11)
    idx = torch.arange(77, device=DEVICE)
    _check(q, k, v, 4096, 4250, capture="i2t", heads="mean", text_index=idx, map_dtype=torch.float32)


@pytest.mark.parametrize("where", ["q_row", "k_row", "v_row"])
def test_nan_inputs(where):
    """NaN in -> NaN out exactly where SDPA gives NaN; no crash, no NaN leaking elsewhere."""
    q, k, v = _inputs(1, 2, 70, 16, torch.float32, seed=12)
    t = {"q_row": q, "k_row": k, "v_row": v}[where].clone()
    t[0, 1, 40, 3] = float("nan")
    q, k, v = (t if where == w else x for w, x in (("q_row", q), ("k_row", k), ("v_row", v)))
    out, i2t, t2i = joint_attention_fwd(q, k, v, 0, 20, capture_i2t=True, capture_t2i=True, heads_mean=False,
                                        text_index=None, map_dtype=torch.float32, scale=0.25)
    ref = F.scaled_dot_product_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), scale=0.25)
    assert torch.equal(out.isnan().cpu(), ref.isnan())
    assert not out[0, 0].isnan().any()  # the other head is untouched
    if where == "q_row":
        assert out[0, 1, 40].isnan().all() and not out[0, 1, :40].isnan().any()
        assert i2t[0, 1, 40 - 20].isnan().all() and not i2t[0, 1, :20].isnan().any()


@pytest.mark.parametrize("head_dim", [16, 64, 72, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("tma", [False, True])
def test_gpu_config_prune(head_dim, dtype, tma):
    """The GPU autotune lists (fused and attention kernels) always keep a config that fits shared memory;
    d > 128 keeps BLOCK_M <= 64; warp-specialised configs only on the TMA path."""
    import triton

    from seg4diff_fast.kernels import _tuning
    from seg4diff_fast.kernels import attention as att
    from seg4diff_fast.kernels import joint_attention as ja

    q = torch.empty(1, 1, 1, 1, dtype=dtype)
    lists = [
        (ja._prune_configs, [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                             for bm, bn, w, st in ja._GPU_CONFIGS]),
        (att._prune, [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "WARP_SPECIALIZE": ws}, num_warps=w, num_stages=st)
                      for bm, bn, w, st, ws in att._GPU_CONFIGS]),
    ]
    for prune, configs in lists:
        for n in (77, 4250):
            kept = prune(configs, {"N": n, "Q": q}, HEAD_DIM=head_dim, USE_TMA=tma)
            assert kept
            for cfg in kept:
                bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
                assert max(bm, bn) <= max(32, 2 ** (n - 1).bit_length())
                assert _tuning.smem_bytes(bm, bn, _tuning.block_d(head_dim), cfg.num_stages, q.element_size(), tma,
                                          cfg.kwargs.get("WARP_SPECIALIZE", False)) <= 166912 or len(kept) == 1
                if head_dim > 128:
                    assert bm <= 64
                if not tma:
                    assert not cfg.kwargs.get("WARP_SPECIALIZE", False)
