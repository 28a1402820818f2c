"""The dot precision of fp32 inputs (``kernels._tuning.dot_precision``) keeps results inside the fp32 tolerances.

Triton's interpreter multiplies fp32 exactly whatever ``input_precision`` says, so the kernel tests cannot see
what a GPU's tensor cores do with fp32 operands. This file emulates it on the CPU, bit for bit where it matters:
a tf32 operand is an fp32 with its 13 low mantissa bits dropped (the tensor core truncates), products of two
tf32 values are exact in fp32, sums accumulate in fp32 (emulated per k-chunk of 8, the mma's K). Triton's
"tf32x3" (the F32DotTC pass) splits each operand ``a`` into ``big = round_to_nearest_tf32(a)`` and
``small = a - big`` and adds ``small_a big_b + big_a small_b + big_a big_b``.

Then attention (``out``) and the joint map (``P``) computed with the emulated dots are held to the float64
oracle at the tolerances every fp32 kernel test uses (``OUT_TOL`` / ``MAP_TOL`` of seg4diff_fast.reference), on fresh
random inputs of the kernel tests' fp32 shapes (odd lengths, D = 72 and 128 included). Plain "tf32" is checked
to fail there: the test can tell a precision that is too coarse.
"""
from __future__ import annotations

import pytest
import torch

from conftest import MAP_TOL, OUT_TOL, random_qkv

from seg4diff_fast.kernels import _tuning

_TF32_DROP = 0x1FFF  # fp32 has 23 mantissa bits, tf32 10: the low 13 are dropped


def _round_tf32(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 to the nearest tf32 (ties away from zero: PTX cvt.rna.tf32.f32); finite inputs."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~_TF32_DROP).view(torch.float32)


def _truncate_tf32(x: torch.Tensor) -> torch.Tensor:
    """What a tensor core reads of an fp32 register given as a tf32 operand: the low 13 mantissa bits dropped."""
    return (x.contiguous().view(torch.int32) & ~_TF32_DROP).view(torch.float32)


def _tf32_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One tensor-core product ``a [.., M, K] @ b [.., K, N]`` of tf32 operands with fp32 accumulation."""
    a, b = _truncate_tf32(a), _truncate_tf32(b)
    acc = torch.zeros(a.shape[:-1] + (b.shape[-1],), dtype=torch.float32)
    for k0 in range(0, a.shape[-1], 8):  # products exact (11 x 11 bits), each k-chunk's sum rounded to fp32
        acc = acc + (a[..., k0:k0 + 8].double() @ b[..., k0:k0 + 8, :].double()).float()
    return acc


def _dot(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """``tl.dot(a, b, input_precision=precision)`` of fp32 ``a`` [.., M, K] and ``b`` [.., K, N], emulated."""
    if precision == "tf32":
        return _tf32_mm(a, b)
    if precision == "tf32x3":
        a_big, b_big = _round_tf32(a), _round_tf32(b)
        return _tf32_mm(a - a_big, b_big) + _tf32_mm(a_big, b - b_big) + _tf32_mm(a_big, b_big)
    raise ValueError(precision)


def _errors(precision: str, b: int, h: int, n: int, d: int, seed: int):
    """Whether emulated ``out`` and ``P`` are within the fp32 tolerances of the float64 oracle."""
    q, k, v = (t.cpu() for t in random_qkv(b, h, n, d, torch.float32, seed))
    scale = d ** -0.5
    p64 = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale, -1)  # [B, H, N, N]
    out64 = p64 @ v.double()
    s = _dot(q, k.transpose(-1, -2), precision) * scale
    p = torch.softmax(s.double(), -1).float()  # the kernels' exp2 / lse are fp32 too: not the point here
    out = _dot(p, v, precision)
    out_atol, out_rtol = OUT_TOL[torch.float32]
    map_atol, map_rtol = MAP_TOL[torch.float32]
    return (torch.allclose(out.double(), out64, atol=out_atol, rtol=out_rtol),
            torch.allclose(p.double(), p64, atol=map_atol, rtol=map_rtol))


SHAPES = [(1, 3, 254, 72, 1), (2, 2, 107, 128, 2), (1, 2, 130, 32, 5), (1, 2, 333, 64, 3)]  # B, H, N, D, seed


def test_fp32_inputs_use_three_tf32_products():
    assert _tuning.dot_precision(torch.float32) == "tf32x3"
    assert _tuning.dot_precision(torch.float16) == _tuning.dot_precision(torch.bfloat16) == "tf32"  # unused


@pytest.mark.parametrize("b,h,n,d,seed", SHAPES, ids=[f"N{s[2]}-D{s[3]}" for s in SHAPES])
def test_fp32_dot_precision_is_within_the_fp32_tolerances(b, h, n, d, seed):
    out_ok, map_ok = _errors(_tuning.dot_precision(torch.float32), b, h, n, d, seed)
    assert out_ok and map_ok


def test_plain_tf32_would_not_be():
    out_ok, map_ok = _errors("tf32", *SHAPES[0])
    assert not out_ok and not map_ok


def test_the_tf32_emulation_drops_13_bits():
    x = torch.tensor([1.0 + 2.0 ** -10, 1.0 + 2.0 ** -11, 1.0 + 2.0 ** -12, -(1.0 + 3 * 2.0 ** -11)])
    assert _truncate_tf32(x).tolist() == [1.0 + 2.0 ** -10, 1.0, 1.0, -(1.0 + 2.0 ** -10)]
    assert _round_tf32(x).tolist() == [1.0 + 2.0 ** -10, 1.0 + 2.0 ** -10, 1.0, -(1.0 + 2.0 ** -9)]
