"""The ``"sdpa"`` backend on the CPU: SDPA's CPU flash kernel (``out`` and each row's log-sum-exp), then the capture
phase in torch; what ``backend="auto"`` picks on the CPU. Checked against the float64 reference at odd sizes (333
text tokens, too many for the interpreter but seconds here), both token orders, every input dtype, key masks,
every normalisation and heads mode, repeated text columns, and the gradients of ``out`` and the maps.

No Triton here: these run with or without TRITON_INTERPRET and without the triton package."""
import itertools

import pytest
import torch

import seg4diff_fast.attention as attention
from conftest import MAP_TOL, OUT_TOL
from seg4diff_fast import joint_attention
from seg4diff_fast.attention import key_mask_from_lengths
from seg4diff_fast.reference import reference_joint_attention

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def no_triton(monkeypatch):
    """The CPU path must not need Triton: without the interpreter, as a user runs it, and with any Triton kernel
    call an error."""
    # The kernels are decorated when first imported: that must happen under the interpreter that conftest.py set,
    # or every later Triton test of this process gets compiled (GPU) kernels on CPU tensors.
    import seg4diff_fast.kernels  # noqa: F401

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(attention, "_triton_available", lambda: False)

    def no_kernel(*args, **kwargs):
        raise AssertionError("a Triton kernel was called on the CPU path")

    monkeypatch.setattr(attention, "_split_backend", no_kernel)


def _qkv(b, h, n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    return (q * 2.0).to(dtype), k.to(dtype), v.to(dtype)  # q doubled: a peaked softmax, not a uniform one


def _mask(kind, b, n, text):
    if kind is None:
        return None
    if kind == "lengths":  # padded text: sample 0 keeps 2/3 of its text tokens, sample 1 none
        return key_mask_from_lengths(torch.tensor([(text.stop - text.start) * 2 // 3, 0][:b]), n, text)
    g = torch.Generator().manual_seed(5)
    bias = torch.randn(b, n, generator=g)  # an additive key bias, some keys masked
    return bias.masked_fill(torch.rand(b, n, generator=g) < 0.2, float("-inf"))


def _text(order, n, n_txt):
    return slice(0, n_txt) if order == "flux" else slice(n - n_txt, n)


# 333 text tokens (SD3 with T5), 131 image tokens, head dim 40: no length is a multiple of a block.
B, H, N_TXT, N_IMG, D = 2, 3, 333, 131, 40


# Every normalisation x heads mode x mask in float32, the token order alternating; every dtype x order with the
# model's own normalisation and both masks.
FORWARD_CASES = [
    (["sd3", "flux"][i % 2], torch.float32, normalize, heads, mask)
    for i, (normalize, heads, mask) in enumerate(itertools.product(
        ["joint", "text", "logits"], ["mean", "all"], [None, "lengths", "bias"]))
] + [
    (order, dtype, "joint", heads, mask)
    for order, dtype in itertools.product(["sd3", "flux"], [torch.float32, torch.bfloat16, torch.float16])
    for heads, mask in (("all", "lengths"), ("mean", "bias"))
]


@pytest.mark.parametrize("order,dtype,normalize,heads,mask", FORWARD_CASES, ids=str)
def test_forward_matches_float64_reference(order, dtype, normalize, heads, mask):
    n = N_TXT + N_IMG
    q, k, v = _qkv(B, H, n, D, dtype, seed=n)
    text = _text(order, n, N_TXT)
    key_mask = _mask(mask, B, n, text)
    text_index = torch.tensor([0, 332, 7, 7, 100, 101]) if heads == "all" else None  # a repeat, both ends
    out, maps = joint_attention(q, k, v, text, capture="both", heads=heads, text_index=text_index,
                                map_dtype=torch.float32, normalize=normalize, key_mask=key_mask, backend="sdpa")
    ref_out, ref_i2t, ref_t2i = reference_joint_attention(
        q, k, v, text.start, text.stop, capture="both", heads=heads, text_index=text_index, normalize=normalize,
        key_mask=key_mask)
    assert out.dtype == dtype and maps.i2t.dtype == torch.float32
    atol, rtol = OUT_TOL[dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    # The maps are computed in float32 from the inputs as given (the reference takes the same rounded inputs),
    # the joint ones with the CPU flash kernel's float32 lse.
    atol, rtol = MAP_TOL[torch.float32]
    if normalize == "logits":
        atol = 1e-4  # scores up to ~30 in float32
    torch.testing.assert_close(maps.i2t.double(), ref_i2t, atol=atol, rtol=rtol)
    torch.testing.assert_close(maps.t2i.double(), ref_t2i, atol=atol, rtol=rtol)


@pytest.mark.parametrize("map_dtype", [torch.float16, torch.bfloat16])
def test_low_precision_maps(map_dtype):
    n = N_TXT + N_IMG
    q, k, v = _qkv(1, 2, n, D, torch.bfloat16, seed=3)
    out, maps = joint_attention(q, k, v, (0, N_TXT), capture="i2t", map_dtype=map_dtype, backend="sdpa")
    _, ref, _ = reference_joint_attention(q, k, v, 0, N_TXT, capture="i2t", heads="mean")
    atol, rtol = MAP_TOL[map_dtype]
    assert maps.i2t.dtype == map_dtype
    torch.testing.assert_close(maps.i2t.double(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("order", ["sd3", "flux"])
@pytest.mark.parametrize("normalize,heads,mask", [
    ("joint", "mean", None), ("joint", "all", "lengths"), ("joint", "mean", "bias"),
    ("text", "all", None), ("text", "mean", "bias"), ("logits", "mean", "lengths"), ("logits", "all", None),
], ids=str)
def test_gradients_match_float64_reference(order, normalize, heads, mask):
    n_txt, n_img = 33, 71
    n = n_txt + n_img
    q, k, v = _qkv(2, 2, n, 24, torch.float32, seed=11)
    text = _text(order, n, n_txt)
    key_mask = _mask(mask, 2, n, text)
    g = torch.Generator().manual_seed(12)
    go = torch.randn(q.shape, generator=g)
    grads = {}
    for name in ("sdpa", "reference"):
        leaves = [t.clone().double() if name == "reference" else t.clone() for t in (q, k, v)]
        for t in leaves:
            t.requires_grad_(True)
        if name == "reference":
            out, i2t, t2i = reference_joint_attention(*leaves, text.start, text.stop, capture="both", heads=heads,
                                                      normalize=normalize, key_mask=key_mask)
        else:
            out, maps = joint_attention(*leaves, text, capture="both", heads=heads, map_dtype=torch.float32,
                                        normalize=normalize, key_mask=key_mask, backend="sdpa")
            i2t, t2i = maps.i2t, maps.t2i
        gi = torch.randn(i2t.shape, generator=torch.Generator().manual_seed(13)).to(i2t.dtype)
        gt = torch.randn(t2i.shape, generator=torch.Generator().manual_seed(14)).to(t2i.dtype)
        loss = (out * go.to(out.dtype)).sum() + (i2t * gi).sum() + (t2i * gt).sum()
        grads[name] = torch.autograd.grad(loss, leaves)
    for got, ref in zip(grads["sdpa"], grads["reference"]):
        torch.testing.assert_close(got.double(), ref, atol=2e-4, rtol=1e-4)


def test_auto_picks_sdpa_on_the_cpu_and_runs_the_cpu_flash_kernel(monkeypatch):
    assert attention._resolve_backend("auto", CPU, torch.float32) == "sdpa"
    calls = []
    real = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    class Spy:  # torch.ops.aten is shared: patch the one attribute, restored by monkeypatch
        def __call__(self, *args, **kwargs):
            calls.append(args[0].shape)
            return real(*args, **kwargs)

    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", Spy())
    q, k, v = _qkv(1, 2, 50, 16, torch.float32, seed=0)
    out, maps = joint_attention(q, k, v, (43, 50))  # backend="auto"
    assert calls == [q.shape]
    _, ref, _ = reference_joint_attention(q, k, v, 43, 50, capture="i2t", heads="mean")
    torch.testing.assert_close(maps.i2t.double(), ref, atol=1e-3, rtol=1e-3)  # float16 maps


def test_auto_falls_back_to_torch_without_the_cpu_flash_kernel(monkeypatch):
    monkeypatch.setattr(attention, "_cpu_flash_with_lse", lambda: False)
    assert attention._resolve_backend("auto", CPU, torch.float32) == "torch"
    q, k, v = _qkv(1, 1, 20, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="backend='sdpa' on the CPU needs SDPA's CPU flash kernel"):
        joint_attention(q, k, v, (0, 5), backend="sdpa")
    joint_attention(q, k, v, (0, 5))  # auto: the torch backend


def test_sdpa_never_computes_the_lse_another_way(monkeypatch):
    # The torch backend computes the lse over chunks of rows x N keys where no fused kernel gives it; the sdpa
    # backend is SDPA's kernel or a clear error.
    monkeypatch.setattr(attention, "sdpa_with_lse", lambda *args, **kwargs: None)
    q, k, v = _qkv(1, 1, 20, 8, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="backend='sdpa': no SDPA kernel with log-sum-exp"):
        joint_attention(q, k, v, (0, 5), backend="sdpa")
    out, maps = joint_attention(q, k, v, (0, 5), backend="torch")
    assert maps.i2t.shape == (1, 15, 5)
