"""Trainable maps: ``joint_attention(..., normalize=...)`` and its gradients w.r.t. q, k (and v through out).

Every map and every gradient is compared with float64 autograd through ``seg4diff_fast.reference`` (the one
oracle), at odd sizes (37 and 77 text tokens, image counts off every 32/64 block), both token orders, every
normalisation, capture i2t / t2i / both, heads mean / all, text_index unique and with repeats, on every
backend (the Triton ones through Triton's interpreter on the CPU, in float32). A memory
test shows that the torch backend never allocates the ``N x N`` matrix in a training step.
"""
import itertools

import pytest
import torch

from conftest import DEVICE, MAP_TOL, OUT_TOL
from conftest import random_qkv as _inputs
from seg4diff_fast import joint_attention
from seg4diff_fast.reference import additive_key_bias, reference_joint_attention

NORMALIZATIONS = ["joint", "text", "logits"]
# Relative error of a gradient (max abs error / max abs value of the float64 gradient), float32 inputs.
# Measured: at most 2.3e-6 (float32) and 1.0e-3 (float16 inputs and maps) over every case below, every backend.
GRAD_RTOL = {torch.float32: 2e-5, torch.float16: 2e-2}

# (capture, heads, order, text_index kind), cycled so that each backend x normalisation sees every value of
# each axis and every pair of capture x heads x order (text_index rotates over them).
CASES = [
    (capture, heads, order, ("none", "unique", "repeats")[i % 3])
    for i, (capture, heads, order) in enumerate(itertools.product(["i2t", "t2i", "both"], ["mean", "all"], ["sd3", "flux"]))
]


def _text_index(kind, n_text):
    if kind == "none":
        return None
    if kind == "unique":
        return torch.tensor([5, 0, n_text - 1, 12], device=DEVICE)
    return torch.tensor([3, 3, 0, n_text - 1, 3, 8], device=DEVICE)  # repeats: copies of one column


def _grad_check(q, k, v, text_slice, capture, heads, text_index, normalize, backend, map_dtype=torch.float32,
                seed=0, key_mask=None):
    """A random linear loss on out and the maps; returns the max relative error of (maps, dq, dk, dv) against
    float64 autograd through the reference (with the same ``key_mask``), after asserting them within tolerance,
    free of NaN, and (with a key mask) 0 for a fully masked sample, whose out and maps are constants (0)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, maps = joint_attention(*leaves, text_slice, capture=capture, heads=heads, text_index=text_index,
                                map_dtype=map_dtype, backend=backend, normalize=normalize, key_mask=key_mask)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_i2t, ref_t2i = reference_joint_attention(
        *ref_leaves, text_slice.start, text_slice.stop, capture=capture, heads=heads, text_index=text_index,
        normalize=normalize, key_mask=key_mask)
    g = torch.Generator().manual_seed(seed)
    loss = ref_loss = 0
    errs = {}
    for name, got, ref in (("out", out, ref_out), ("i2t", maps.i2t, ref_i2t), ("t2i", maps.t2i, ref_t2i)):
        if ref is None:
            assert got is None
            continue
        assert got.requires_grad and got.shape == ref.shape
        if name != "out":
            atol, rtol = MAP_TOL[map_dtype]
            if normalize == "logits":  # unbounded scores: relative to their size
                atol = rtol * ref.abs().max().item()
            torch.testing.assert_close(got.double(), ref.detach(), atol=atol, rtol=rtol)
            errs[name] = (got.double() - ref).abs().max().item()
        weight = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(DEVICE)
        loss = loss + (got.double() * weight).sum()
        ref_loss = ref_loss + (ref * weight).sum()
    got_grads = torch.autograd.grad(loss, leaves)
    want_grads = torch.autograd.grad(ref_loss, ref_leaves)
    for name, got, want in zip(("dq", "dk", "dv"), got_grads, want_grads):
        assert got.dtype == q.dtype and got.shape == q.shape
        assert not got.isnan().any() and not want.isnan().any(), name
        rel = ((got.double() - want).abs().max() / want.abs().max()).item()
        errs[name] = rel
        assert rel < GRAD_RTOL[q.dtype], (name, rel)
        if key_mask is not None:  # bool or float (additive bias): a sample with every key masked has no gradient
            dead = ~(additive_key_bias(key_mask) != float("-inf")).any(dim=1)
            assert (got[dead] == 0).all(), name
    return errs


# "triton-split" and "sdpa" differ from "triton" in the forward only (same map backward): a third of the cases.
GRID = [
    (backend, normalize) + case
    for backend in ["torch", "triton", "triton-split", "sdpa", "reference"]
    for normalize in NORMALIZATIONS
    for i, case in enumerate(CASES)
    if backend in ("torch", "triton", "reference") or i % 3 == NORMALIZATIONS.index(normalize)
]


@pytest.mark.parametrize("backend,normalize,capture,heads,order,index_kind", GRID)
def test_maps_and_gradients_match_float64_autograd(backend, normalize, capture, heads, order, index_kind):
    b, h, n_text, n_img, d = 2, 2, 37, 70, 16
    n = n_text + n_img
    seed = 100 * NORMALIZATIONS.index(normalize) + CASES.index((capture, heads, order, index_kind))
    q, k, v = _inputs(b, h, n, d, torch.float32, seed=seed)
    text_slice = slice(0, n_text) if order == "flux" else slice(n_img, n)
    _grad_check(q, k, v, text_slice, capture, heads, _text_index(index_kind, n_text), normalize, backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_gradients_at_sd3_like_odd_size(backend, normalize):
    # 77 text tokens, 131 image tokens (off every block), head dim 24 (padded to 32 in the kernel), strided
    # [B, N, H, D] views (Flux's layout).
    b, h, n_text, n_img, d = 1, 3, 77, 131, 24
    n = n_text + n_img
    q, k, v = _inputs(b, h, n, d, torch.float32, seed=21, layout="bnhd")
    _grad_check(q, k, v, slice(n_img, n), "both", "mean", None, normalize, backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("normalize", ["joint", "text"])
def test_gradients_float16_inputs(backend, normalize):
    q, k, v = _inputs(1, 2, 37 + 70, 16, torch.float16, seed=22)
    _grad_check(q, k, v, slice(0, 37), "both", "all", _text_index("repeats", 37), normalize, backend,
                map_dtype=torch.float16)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_map_loss_alone_and_unused_maps(backend):
    # A loss on i2t only (out and t2i unused: their gradients arrive as None): dv is zero, dq/dk match.
    q, k, v = (t.requires_grad_(True) for t in _inputs(1, 2, 50, 8, torch.float32, seed=23))
    _, maps = joint_attention(q, k, v, slice(40, 50), capture="both", heads="mean", map_dtype=torch.float32,
                              backend=backend)
    maps.i2t.sigmoid().sum().backward()
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref_i2t = reference_joint_attention(qd, kd, vd, 40, 50, capture="i2t", heads="mean")[1]
    ref_i2t.sigmoid().sum().backward()
    assert torch.count_nonzero(v.grad) == 0
    torch.testing.assert_close(q.grad.double(), qd.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(k.grad.double(), kd.grad, atol=1e-6, rtol=1e-4)


def test_no_gradient_without_requires_grad():
    q, k, v = _inputs(1, 1, 20, 8, torch.float32, seed=24)
    _, maps = joint_attention(q, k, v, slice(0, 5), capture="both", normalize="text", backend="torch")
    assert not maps.i2t.requires_grad and not maps.t2i.requires_grad


@pytest.mark.filterwarnings("ignore:Input #.*double precision")
@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("heads_mean", [True, False])
def test_gradcheck_float64_torch_op(normalize, heads_mean):
    # Finite differences in float64 on the custom op itself (the public API takes float16/bfloat16/float32;
    # the torch paths compute in float64 for float64 tensors): out, i2t and t2i together, repeated-free
    # text_index in the Flux order.
    g = torch.Generator().manual_seed(25)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_(True)
               for _ in range(3))
    text_index = torch.tensor([2, 0], device=DEVICE)

    def fn(q, k, v):
        return torch.ops.seg4diff_fast.joint_attention(
            q, k, v, 0, 3, True, True, heads_mean, text_index, torch.float64, 0.5, "torch", normalize)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("normalize", ["joint", "logits"])
def test_torch_compile_training_step_is_one_graph(normalize):
    # fullgraph=True fails on any graph break: forward and backward ops are custom ops with fake kernels.
    q, k, v = _inputs(1, 2, 40, 8, torch.float32, seed=26)

    def step(q, k, v):
        out, maps = joint_attention(q, k, v, slice(0, 7), capture="i2t", backend="torch", normalize=normalize,
                                    map_dtype=torch.float32)
        return out.square().mean() + maps.i2t.sigmoid().mean()

    grads = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        fn(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want)


def _largest_allocation(fn) -> int:
    """Bytes of the largest single CPU allocation while fn() runs (torch.profiler, profile_memory)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU allocator profile")
@pytest.mark.parametrize("flash_flag", [True, False], ids=["sdpa-flags-default", "flash-sdp-disabled"])
@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_training_step_never_allocates_n_by_n(monkeypatch, request, normalize, flash_flag):
    # Runs in-process, after whatever earlier tests did. With flash SDP disabled globally
    # (torch.backends.cuda.enable_flash_sdp(False), which also governs the CPU's kernel choice),
    # F.scaled_dot_product_attention takes the math path and holds the [B, H, N, N] probabilities (18,192,000 B
    # forward, 18,576,000 B backward here): the op calls the fused kernel directly. In the full suite the flag
    # was left off this way: diffusers' set_attention_backend("_native_math") (test_capture.py) sets the global
    # active backend, which reset_attention_backend() does not undo, so later Flux forwards run inside
    # sdpa_kernel(MATH); two of them in two threads (test_capture_families.py's interception test) exit their
    # contexts out of order and the last restores "flash off" for the rest of the process.
    flash = torch.backends.cuda.flash_sdp_enabled()
    torch.backends.cuda.enable_flash_sdp(flash_flag)
    request.addfinalizer(lambda: torch.backends.cuda.enable_flash_sdp(flash))
    import seg4diff_fast.attention as attention

    b, h, n, d, n_text = 1, 2, 1500, 16, 77
    n_by_n = b * h * n * n * 4  # one float32 [B, H, N, N] score matrix: 18 MB
    # Measured (N = 1500): our largest allocation is SDPA's CPU flash backward's work buffer, 1 MiB per intra-op
    # thread and independent of N (8 MiB when an earlier test left 8 threads: pinned to 2 here, 2 MiB); our map
    # chunks hold n_by_n / 16 (1.1 MB). The full-matrix path: >= 18 MB.
    monkeypatch.setattr(attention, "_TORCH_CHUNK_BYTES", n_by_n // 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    q, k, v = (t.requires_grad_(True) for t in _inputs(b, h, n, d, torch.float32, seed=27))

    def ours():
        out, maps = joint_attention(q, k, v, slice(n - n_text, n), capture="both", heads="mean",
                                    map_dtype=torch.float32, backend="torch", normalize=normalize)
        (out.square().mean() + maps.i2t.sigmoid().mean() + maps.t2i.mean()).backward()

    def full_matrix():  # the paper's path: autograd through the explicit softmax
        out, i2t, t2i = reference_joint_attention(q, k, v, n - n_text, n, capture="both", heads="mean",
                                                  compute_dtype=None, normalize=normalize)
        (out.square().mean() + i2t.sigmoid().mean() + t2i.mean()).backward()

    assert _largest_allocation(full_matrix) >= n_by_n  # the probe sees an N x N allocation when there is one
    assert _largest_allocation(ours) < n_by_n // 4


@pytest.mark.parametrize("text", [(0, 333), (50, 383), (100, 433)], ids=["text-first", "text-inside", "text-last"])
@pytest.mark.parametrize("capture", ["i2t", "t2i"])
@pytest.mark.parametrize("dtype,d", [(torch.float32, 72), (torch.float16, 64)])
def test_maps_backward_kernels_at_odd_sizes(text, capture, dtype, d):
    # The backward kernels alone against float64 autograd of the joint maps: 333 text tokens, 100 image tokens
    # (off every block), D = 72 (padded to 128) and 64. The dk kernel loops over the query blocks that hold map
    # rows (one or two ranges, a block holding both ends of the image rows counted once).
    from seg4diff_fast.kernels.maps_backward import joint_maps_backward

    text_start, text_stop = text
    n = 433
    q, k, _ = _inputs(1, 1, n, d, dtype, seed=31 + text_start)
    scale = d ** -0.5
    img = torch.tensor([i for i in range(n) if not text_start <= i < text_stop], device=DEVICE)
    txt = torch.arange(text_start, text_stop, device=DEVICE)
    qd, kd = (t.detach().double().requires_grad_(True) for t in (q, k))
    p = torch.softmax(torch.matmul(qd, kd.transpose(-1, -2)) * scale, dim=-1)
    g = torch.Generator().manual_seed(7)
    if capture == "i2t":
        grad = torch.randn(1, 1, len(img), len(txt), generator=g, dtype=torch.float64).to(DEVICE)
        (p[:, :, img][:, :, :, txt] * grad).sum().backward()
        dq, dk = joint_maps_backward(q, k, grad, None, text_start, text_stop, heads_mean=False, text_index=None,
                                     scale=scale)
    else:
        grad = torch.randn(1, 1, len(txt), len(img), generator=g, dtype=torch.float64).to(DEVICE)
        (p[:, :, txt][:, :, :, img] * grad).sum().backward()
        dq, dk = joint_maps_backward(q, k, None, grad, text_start, text_stop, heads_mean=False, text_index=None,
                                     scale=scale)
    for got, want in ((dq, qd.grad), (dk, kd.grad)):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < GRAD_RTOL[dtype], float(err)
