"""The public ``joint_attention`` API against the float64 reference, on every backend this machine runs.

Without CUDA the "triton" backend runs through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET),
which has no bfloat16 arithmetic: joint_attention runs the kernel on float32 copies of bfloat16 inputs there. Inputs are fresh random normals (scaled so the softmax is far from uniform), never zeros.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, MAP_TOL, OUT_TOL
from conftest import random_qkv as _inputs
from seg4diff_fast import AttentionMaps, joint_attention
from seg4diff_fast.reference import reference_joint_attention


BACKENDS = ["torch", "triton", "triton-split", "sdpa", "reference"]


def _text_slice(order, n, n_text):
    return slice(0, n_text) if order == "flux" else slice(n - n_text, n)


def _check(q, k, v, text_slice, capture, heads, text_index, map_dtype, backend, scale=None):
    out, maps = joint_attention(
        q, k, v, text_slice, capture=capture, heads=heads, text_index=text_index, map_dtype=map_dtype,
        scale=scale, backend=backend,
    )
    ref_out, ref_i2t, ref_t2i = reference_joint_attention(
        q, k, v, text_slice.start, text_slice.stop, capture=capture, heads=heads, text_index=text_index, scale=scale,
    )
    assert isinstance(maps, AttentionMaps)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    atol, rtol = OUT_TOL[q.dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    for got, ref in ((maps.i2t, ref_i2t), (maps.t2i, ref_t2i)):
        if ref is None:
            assert got is None
            continue
        assert got.dtype == map_dtype and got.shape == ref.shape and not got.requires_grad
        atol, rtol = MAP_TOL[map_dtype]
        torch.testing.assert_close(got.double(), ref, atol=atol, rtol=rtol)
    return out, maps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "order,capture,heads,indexed",
    list(itertools.product(["sd3", "flux"], ["i2t", "t2i", "both", None], ["mean", "all"], [False, True])),
)
def test_every_combination(backend, order, capture, heads, indexed):
    b, h, n_text, n_img, d = 2, 3, 37, 100, 16
    q, k, v = _inputs(b, h, n_text + n_img, d, torch.float32, seed=1)
    text_index = torch.tensor([5, 0, 36, 12], device=DEVICE) if indexed else None
    _check(q, k, v, _text_slice(order, n_text + n_img, n_text), capture, heads, text_index, torch.float32, backend)


SIZES = [  # (B, H, N_txt, N_img, D)
    (1, 1, 1, 16, 8),
    (2, 2, 7, 100, 16),
    (1, 3, 77, 256, 64),
    (1, 2, 154, 100, 128),
    (1, 1, 333, 250, 64),
    (1, 2, 77, 129, 72),
]


@pytest.mark.parametrize("backend", ["torch", "triton", "triton-split"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("order", ["sd3", "flux"])
def test_sizes_and_head_dims(backend, size, order):
    b, h, n_text, n_img, d = size
    n = n_text + n_img
    q, k, v = _inputs(b, h, n, d, torch.float32, seed=n + d)
    _check(q, k, v, _text_slice(order, n, n_text), "both", "all", None, torch.float32, backend)


DTYPE_CASES = [
    # (backend, input dtype, map dtype). Triton's interpreter has no bf16 arithmetic: joint_attention runs the
    # kernel on float32 copies there, so bf16 inputs are tested on every backend, on the CPU too.
    ("torch", torch.float16, torch.float16),
    ("torch", torch.bfloat16, torch.bfloat16),
    ("torch", torch.float32, torch.bfloat16),
    ("triton", torch.float16, torch.float16),
    ("triton", torch.float16, torch.float32),
    ("triton", torch.float32, torch.bfloat16),
    ("triton", torch.bfloat16, torch.bfloat16),
    ("triton", torch.bfloat16, torch.float16),
]


@pytest.mark.parametrize("backend,dtype,map_dtype", DTYPE_CASES, ids=str)
@pytest.mark.parametrize("order", ["sd3", "flux"])
@pytest.mark.parametrize("heads", ["mean", "all"])
def test_dtypes(backend, dtype, map_dtype, order, heads):
    b, h, n_text, n_img, d = 2, 2, 77, 150, 64
    n = n_text + n_img
    q, k, v = _inputs(b, h, n, d, dtype, seed=7, layout="bnhd")
    text_index = torch.arange(0, 77, 3, device=DEVICE)
    _check(q, k, v, _text_slice(order, n, n_text), "both", heads, text_index, map_dtype, backend)


@pytest.mark.parametrize("backend", ["torch", "triton", "triton-split", "sdpa"])
def test_strided_views_and_custom_scale(backend):
    # A [B, N, H, D] tensor seen as [B, H, N, D] (Flux's layout), plus a q sliced out of a fused qkv tensor.
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(1, 90, 3, 2, 32, generator=g).to(DEVICE)  # [B, N, 3, H, D]
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    _check(q, k, v, slice(0, 13), "both", "all", None, torch.float32, backend, scale=0.3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_repeated_text_index(backend):
    q, k, v = _inputs(1, 2, 60, 16, torch.float32, seed=4)
    text_index = torch.tensor([3, 3, 0, 9, 3], device=DEVICE)
    _, maps = _check(q, k, v, slice(50, 60), "both", "mean", text_index, torch.float32, backend)
    torch.testing.assert_close(maps.i2t[..., 0], maps.i2t[..., 4])
    torch.testing.assert_close(maps.t2i[:, 1], maps.t2i[:, 4])


def test_row_sums_are_shares_of_the_joint_softmax():
    # i2t rows sum to the text share of each image row: below 1 and equal to 1 minus the image share.
    q, k, v = _inputs(1, 2, 80, 16, torch.float32, seed=5)
    _, maps = joint_attention(q, k, v, slice(60, 80), capture="i2t", heads="all", map_dtype=torch.float32, backend="torch")
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) * 16 ** -0.5, dim=-1)
    text_share = p[:, :, :60, 60:].sum(-1)
    torch.testing.assert_close(maps.i2t.double().sum(-1), text_share, atol=1e-6, rtol=1e-5)
    assert (maps.i2t.sum(-1) < 1).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_in_nan_out(backend):
    q, k, v = _inputs(1, 1, 40, 16, torch.float32, seed=6)
    q[0, 0, 5, 3] = float("nan")  # one query row: that row's output and maps are NaN, like SDPA
    out, maps = joint_attention(q, k, v, slice(30, 40), capture="i2t", heads="all", map_dtype=torch.float32, backend=backend)
    sdpa = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out.isnan(), sdpa.isnan())
    assert maps.i2t[0, 0, 5].isnan().all() and not maps.i2t[0, 0, 6:].isnan().any()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradient_matches_autograd_through_the_reference(backend):
    q, k, v = (t.requires_grad_(True) for t in _inputs(1, 2, 30, 8, torch.float32, seed=8))
    out, maps = joint_attention(q, k, v, slice(0, 9), capture="both", heads="mean", backend=backend)
    assert out.requires_grad and maps.i2t.requires_grad  # maps' gradients: tests/test_trainable_maps.py
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref_out = reference_joint_attention(qd, kd, vd, 0, 9, capture=None)[0]
    want = torch.autograd.grad(ref_out, (qd, kd, vd), grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:Input #.*double precision")
def test_gradcheck_torch_backend_float32():
    # Finite differences on a tiny float32 problem (float64 is not an input dtype of the kernel).
    q, k, v = (t.requires_grad_(True) for t in _inputs(1, 1, 6, 4, torch.float32, seed=9))
    fn = lambda q, k, v: joint_attention(q, k, v, (0, 2), capture="i2t", backend="torch")[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-2, atol=5e-3, rtol=5e-3)


def test_torch_compile_keeps_one_graph():
    q, k, v = _inputs(1, 2, 40, 8, torch.float32, seed=10)
    fn = lambda q, k, v: joint_attention(q, k, v, slice(0, 7), capture="both", backend="torch")  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, maps = compiled(q, k, v)
    ref_out, ref_maps = fn(q, k, v)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(maps.i2t, ref_maps.i2t)
    torch.testing.assert_close(maps.t2i, ref_maps.t2i)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa-fused", "sdpa-fallback"])
def test_torch_backend_chunks_and_out_sources(monkeypatch, fused):
    # Tiny chunks (results must not depend on where row blocks fall), with out from SDPA's fused kernel called
    # directly and from F.scaled_dot_product_attention, which devices without one use.
    import seg4diff_fast.attention as attention

    monkeypatch.setattr(attention, "_TORCH_CHUNK_BYTES", 2 * 3 * 90 * 4 * 7)  # 7 rows of N scores a chunk
    if not fused:
        monkeypatch.setattr(attention, "sdpa_with_lse", lambda *args: None)
    q, k, v = _inputs(2, 3, 90, 8, torch.float32, seed=11)
    _check(q, k, v, slice(0, 20), "both", "all", torch.tensor([19, 2, 7], device=DEVICE), torch.float32, "torch")
    _check(q, k, v, slice(70, 90), "both", "mean", None, torch.float32, "torch")
    _check(q, k, v, slice(70, 90), "t2i", "mean", None, torch.float16, "torch")


# ----------------------------------------------------------------------------------------------------------
# Bad input: a clear exception naming the argument, before any launch.


def _good(**over):
    q, k, v = _inputs(1, 2, 30, 8, torch.float32, seed=0)
    args = dict(q=q, k=k, v=v, text_slice=slice(0, 5))
    args.update(over)
    return args


def _call(args):
    args = dict(args)
    return joint_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("text_slice"), **args)


BAD = [
    ("q not a tensor", dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    ("3-D", dict(q=torch.randn(2, 30, 8)), ValueError, "q must be 4-D"),
    ("shapes differ", dict(k=torch.randn(1, 2, 31, 8)), ValueError, "same shape"),
    ("dtypes differ", dict(k=torch.randn(1, 2, 30, 8, dtype=torch.float16)), TypeError, "same dtype"),
    ("float64", dict(q=torch.randn(1, 2, 30, 8, dtype=torch.float64)), TypeError, "q must be float16, bfloat16 or float32"),
    ("int", dict(v=torch.ones(1, 2, 30, 8, dtype=torch.int32)), TypeError, "v must be float16"),
    ("last stride", dict(q=torch.randn(1, 2, 8, 30).transpose(-1, -2)), ValueError, "unit stride"),
    ("head dim", dict(q=torch.randn(1, 1, 30, 300), k=torch.randn(1, 1, 30, 300), v=torch.randn(1, 1, 30, 300)), ValueError, "head dim D=300"),
    ("empty slice", dict(text_slice=slice(3, 3)), ValueError, "non-empty"),
    ("slice past end", dict(text_slice=slice(20, 40)), ValueError, "inside the joint sequence"),
    ("negative start", dict(text_slice=(-5, 30)), ValueError, "0 <= start"),
    ("step", dict(text_slice=slice(0, 10, 2)), ValueError, "no step"),
    ("middle", dict(text_slice=slice(5, 10)), ValueError, "must touch the start"),
    ("all text", dict(text_slice=slice(0, 30)), ValueError, "no image tokens"),
    ("slice type", dict(text_slice="0:5"), TypeError, "text_slice must be a slice"),
    ("float bound", dict(text_slice=(0.0, 5)), TypeError, "text_slice start must be an int"),
    ("index range", dict(text_index=torch.tensor([0, 5])), ValueError, "0 <= i < 5"),
    ("index negative", dict(text_index=torch.tensor([-1])), ValueError, "text_index values"),
    ("index float", dict(text_index=torch.tensor([0.0])), TypeError, "integer dtype"),
    ("index 2-D", dict(text_index=torch.tensor([[0]])), ValueError, "text_index must be 1-D"),
    ("index empty", dict(text_index=torch.tensor([], dtype=torch.long)), ValueError, "at least one"),
    ("index list", dict(text_index=[0, 1]), TypeError, "text_index must be a 1-D integer tensor"),
    ("capture", dict(capture="img"), ValueError, "capture must be one of"),
    ("heads", dict(heads="sum"), ValueError, "heads must be one of"),
    ("backend", dict(backend="cuda"), ValueError, "backend must be one of"),
    ("normalize", dict(normalize="softmax"), ValueError, "normalize must be one of"),
    ("map dtype", dict(map_dtype=torch.float64), ValueError, "map_dtype must be"),
    ("scale", dict(scale=-1.0), ValueError, "scale must be a positive"),
]


@pytest.mark.parametrize("over,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(_good(**over))


def test_bad_devices():
    if not torch.cuda.is_available():
        meta = torch.empty(1, 2, 30, 8, device="meta")
        with pytest.raises(ValueError, match="same device"):
            _call(_good(k=meta))
        with pytest.raises(ValueError, match="text_index must be on the device"):
            _call(_good(text_index=torch.tensor([0], device="meta")))
    else:
        with pytest.raises(ValueError, match="same device"):
            _call(_good(k=torch.randn(1, 2, 30, 8, device="cuda")))


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        _call(_good(backend="triton"))


def test_auto_backend_on_cpu_is_sdpa(monkeypatch):
    import seg4diff_fast.attention as attention

    # SDPA's CPU flash kernel, then the capture in torch (tests/test_sdpa_cpu.py tests it and the fallback)
    assert attention._resolve_backend("auto", torch.device("cpu")) == "sdpa"
