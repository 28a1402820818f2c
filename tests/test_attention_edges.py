"""Edges of ``joint_attention`` on every backend this machine runs: non-finite inputs, the strides of ``out``
(the custom op's contract with its fake implementation), bfloat16 through Triton's interpreter.

Each result is compared with the float64 oracle ``seg4diff_fast.reference`` on fresh random inputs.
"""
import pytest
import torch

from conftest import DEVICE, MAP_TOL, OUT_TOL
from conftest import random_qkv as _inputs
from seg4diff_fast import joint_attention
from seg4diff_fast.reference import reference_joint_attention

INTERPRETED = DEVICE.type == "cpu"  # conftest sets TRITON_INTERPRET=1 without CUDA
BACKENDS = ["reference", "torch", "triton", "triton-split", "sdpa"]
TRITON_BACKENDS = ["triton", "triton-split", "sdpa"]  # every backend but torch/reference runs our Triton kernels


def _capture_all(q, k, v, text_slice, backend, heads="all", map_dtype=torch.float32):
    return joint_attention(q, k, v, text_slice, capture="both", heads=heads, map_dtype=map_dtype, backend=backend)


# ---------------------------------------------------------------------------------------------- non-finite
# q and k get one inf, -inf or NaN entry at an image or a text position; the NaN pattern of out, i2t and t2i
# must be the float64 reference's, and every finite value must match it.
PLANTS = [(t, where, value) for t in ("q", "k") for where in ("image", "text")
          for value in (float("inf"), float("-inf"), float("nan"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ["sd3", "flux"])
@pytest.mark.parametrize("heads", ["all", "mean"])
@pytest.mark.parametrize("tensor,where,value", PLANTS, ids=lambda x: str(x))
def test_non_finite_inputs_give_the_reference_nan_pattern(backend, order, heads, tensor, where, value):
    b, h, n_text, n_img, d = 1, 2, 9, 31, 8
    n = n_text + n_img
    q, k, v = _inputs(b, h, n, d, torch.float32, seed=21)
    text = slice(0, n_text) if order == "flux" else slice(n_img, n)
    pos = (text.start + 4) if where == "text" else (n_text + 5 if order == "flux" else 5)
    t = {"q": q, "k": k}[tensor]
    t[0, 1, pos, 3] = value
    ref_out, ref_i2t, ref_t2i = reference_joint_attention(q, k, v, text.start, text.stop, capture="both", heads=heads)
    assert ref_out.isnan().any()  # the plant reaches the output
    out, maps = _capture_all(q, k, v, text, backend, heads=heads)
    for got, ref, tol in ((out, ref_out, OUT_TOL[torch.float32]), (maps.i2t, ref_i2t, MAP_TOL[torch.float32]),
                          (maps.t2i, ref_t2i, MAP_TOL[torch.float32])):
        assert torch.equal(got.isnan(), ref.isnan()), (got.isnan().sum().item(), ref.isnan().sum().item())
        assert not got.isinf().any()
        finite = ~ref.isnan()
        torch.testing.assert_close(got.double()[finite], ref[finite], atol=tol[0], rtol=tol[1])


@pytest.mark.parametrize("backend", ["torch"] + TRITON_BACKENDS)
@pytest.mark.parametrize("capture", ["both", None])
def test_all_minus_inf_row_is_nan_like_the_reference(backend, capture):
    # Every logit of query row 3 is -inf (its q is -inf against keys of one sign): softmax is 0/0 = NaN, where
    # SDPA's fused CPU kernel gives zeros as for a masked row.
    q, k, v = _inputs(1, 1, 30, 4, torch.float32, seed=22)
    k[..., 0] = k[..., 0].abs() + 0.1
    q[0, 0, 3] = torch.tensor([float("-inf"), 0.0, 0.0, 0.0])
    ref = reference_joint_attention(q, k, v, 20, 30, capture=capture, heads="all")
    out, maps = joint_attention(q, k, v, slice(20, 30), capture=capture, heads="all", map_dtype=torch.float32,
                                backend=backend)
    assert ref[0][0, 0, 3].isnan().all() and not ref[0][0, 0, 4:].isnan().any()
    for got, r in zip((out, maps.i2t, maps.t2i), ref):
        assert (got is None) == (r is None)
        if r is not None:
            assert torch.equal(got.isnan(), r.isnan())


def test_torch_backend_sdpa_fallback_nan_pattern(monkeypatch):
    # Devices without a fused SDPA kernel take out from F.scaled_dot_product_attention: the same NaN pattern.
    import seg4diff_fast.attention as attention

    monkeypatch.setattr(attention, "sdpa_with_lse", lambda *args: None)
    q, k, v = _inputs(1, 2, 40, 8, torch.float32, seed=23)
    k[0, 0, 7, 1] = float("inf")
    q[0, 1, 35, 0] = float("nan")
    ref = reference_joint_attention(q, k, v, 30, 40, capture="both", heads="mean")
    out, maps = _capture_all(q, k, v, slice(30, 40), "torch", heads="mean")
    for got, r in zip((out, maps.i2t, maps.t2i), ref):
        assert torch.equal(got.isnan(), r.isnan())


# ---------------------------------------------------------------------------------------------- strides of out
def _layouts():
    g = torch.Generator().manual_seed(24)
    bhnd = tuple(torch.randn(2, 3, 37, 8, generator=g) for _ in range(3))
    bnhd = tuple(torch.randn(2, 37, 3, 8, generator=g).transpose(1, 2) for _ in range(3))  # Flux's views
    fused = torch.randn(2, 37, 3, 3, 8, generator=g)  # [B, N, (q k v), H, D]: q sliced out, not dense
    sliced = tuple(fused[:, :, i].transpose(1, 2) for i in range(3))
    return {"bhnd": bhnd, "bnhd": bnhd, "fused-qkv": sliced}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("capture,normalize", [("both", "joint"), (None, "joint"), ("both", "text"),
                                               ("i2t", "logits")])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd", "fused-qkv"])
def test_out_has_the_strides_of_empty_like_q_and_the_fake_agrees(backend, capture, normalize, layout):
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = (t.to(DEVICE) for t in _layouts()[layout])
    out, _ = joint_attention(q, k, v, slice(0, 7), capture=capture, backend=backend, normalize=normalize)
    assert out.stride() == torch.empty_like(q).stride()
    ref = reference_joint_attention(q, k, v, 0, 7, capture=None)[0]
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fake_out, _ = joint_attention(fq, fk, fv, slice(0, 7), capture=capture, backend=backend, normalize=normalize)
    assert fake_out.stride() == out.stride()


# ---------------------------------------------------------------------------------------------- bf16, interpreter
@pytest.mark.parametrize("backend", TRITON_BACKENDS)
@pytest.mark.parametrize("order", ["sd3", "flux"])
@pytest.mark.parametrize("map_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("heads", ["all", "mean"])
def test_bf16_through_the_triton_backends(backend, order, map_dtype, heads):
    """On the CPU the kernel runs in Triton's interpreter, which has no bf16 arithmetic: joint_attention runs it
    on float32 copies. On CUDA this is the kernel's own bf16 path. Either way: the oracle's answer."""
    b, h, n_text, n_img, d = 2, 2, 13, 70, 16
    n = n_text + n_img
    q, k, v = _inputs(b, h, n, d, torch.bfloat16, seed=25, layout="bnhd")
    text = slice(0, n_text) if order == "flux" else slice(n_img, n)
    index = torch.tensor([0, 12, 5], device=DEVICE)
    out, maps = joint_attention(q, k, v, text, capture="both", heads=heads, text_index=index, map_dtype=map_dtype,
                                backend=backend)
    ref_out, ref_i2t, ref_t2i = reference_joint_attention(q, k, v, text.start, text.stop, capture="both", heads=heads,
                                                          text_index=index)
    assert out.dtype == torch.bfloat16 and out.stride() == torch.empty_like(q).stride()
    torch.testing.assert_close(out.double(), ref_out, atol=OUT_TOL[torch.bfloat16][0], rtol=OUT_TOL[torch.bfloat16][1])
    for got, ref in ((maps.i2t, ref_i2t), (maps.t2i, ref_t2i)):
        assert got.dtype == map_dtype
        torch.testing.assert_close(got.double(), ref, atol=MAP_TOL[map_dtype][0], rtol=MAP_TOL[map_dtype][1])


def test_bf16_through_the_triton_backend_has_gradients():
    q, k, v = (t.requires_grad_(True) for t in _inputs(1, 2, 30, 8, torch.bfloat16, seed=26))
    out, _ = joint_attention(q, k, v, slice(0, 9), capture="i2t", backend="triton")
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref_out = reference_joint_attention(qd, kd, vd, 0, 9, capture=None)[0]
    want = torch.autograd.grad(ref_out, (qd, kd, vd), grad.double())
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.double(), w, atol=5e-2, rtol=5e-2)


# ---------------------------------------------------------------------------------------------- fp16 overflow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reference_backend_in_half_precision_computes_in_float32(dtype):
    # Scores q.k up to about 1e5: beyond float16's 65504 (the reference backend computed its N x N scores in the
    # input dtype: inf, then NaN), while SDPA accumulates in float32 and stays finite. The reference backend now
    # computes in float32 too, so it gives what SDPA and the float64 oracle give; bfloat16 (no overflow there, but
    # 8 mantissa bits for every score and probability) gets the same float32 accuracy.
    q, k, v = _inputs(1, 2, 40, 8, torch.float32, seed=27)
    q, k = (q * 60).to(dtype), (k * 60).to(dtype)
    v = v.to(dtype)
    assert torch.matmul(q, k.transpose(-1, -2)).abs().max() > 65504 or dtype == torch.bfloat16
    ref_out, ref_i2t, ref_t2i = reference_joint_attention(q, k, v, 30, 40, capture="both", heads="all")
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.isfinite(sdpa).all()
    out, maps = _capture_all(q, k, v, slice(30, 40), "reference")
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref_out, atol=OUT_TOL[dtype][0], rtol=OUT_TOL[dtype][1])
    for got, ref in ((maps.i2t, ref_i2t), (maps.t2i, ref_t2i)):
        torch.testing.assert_close(got.double(), ref, atol=MAP_TOL[torch.float32][0], rtol=MAP_TOL[torch.float32][1])


# ---------------------------------------------------------------------------------------------- full-map
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_full_map_backend_is_full_map_attention_in_the_input_dtype(layout):
    # backend="full-map" (what the e2e benchmark's "full-map" path captures through) runs
    # reference.full_map_attention itself, in the input dtype, not a float32 copy: bit for bit its results.
    from seg4diff_fast.reference import full_map_attention

    q, k, v = _inputs(1, 2, 40, 8, torch.float16, seed=3, layout=layout)
    out, maps = joint_attention(q, k, v, slice(30, 40), capture="i2t", heads="mean", map_dtype=torch.float16,
                                backend="full-map")
    want_out, want_i2t = full_map_attention(q, k, v, 30, 40)
    assert out.dtype == torch.float16 and maps.t2i is None
    assert torch.equal(out, want_out) and torch.equal(maps.i2t, want_i2t)
    plain, none = joint_attention(q, k, v, slice(30, 40), capture=None, backend="full-map")
    assert none.i2t is None and torch.equal(plain, torch.nn.functional.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("option,words", [
    ({"capture": "both"}, "capture='both'"), ({"heads": "all"}, "heads='all'"),
    ({"normalize": "text"}, "normalize='text'"), ({"text_index": torch.arange(3)}, "text_index="),
    ({"key_mask": torch.ones(1, 40, dtype=torch.bool)}, "key_mask="),
])
def test_full_map_backend_refuses_what_seg4diff_does_not_compute(option, words):
    from seg4diff_fast.capture import AttentionStore

    q, k, v = _inputs(1, 2, 40, 8, torch.float32, seed=4)
    kwargs = {"capture": "i2t", "heads": "mean", **option}
    with pytest.raises(ValueError, match="backend='full-map'.*" + words.replace("(", r"\(")):
        joint_attention(q, k, v, slice(30, 40), backend="full-map", **kwargs)
    if "key_mask" not in option:  # the store refuses at construction, before any forward
        with pytest.raises(ValueError, match="backend='full-map'.*" + words):
            AttentionStore(backend="full-map", **kwargs)
