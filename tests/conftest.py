"""Test setup: without CUDA, Triton kernels run through Triton's interpreter.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is decorated, so before seg4diff_fast's
kernels are imported; conftest.py is imported by pytest before the test modules.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Tolerances vs the float64 reference, as (atol, rtol).
# out: fp32 accumulation; fp16/bf16 round p to the input dtype before the PV dot and round out once.
# maps: p = exp2(s - lse) is computed in fp32 (relative error ~1e-6), then rounded to map_dtype:
#   fp16 half-ulp 4.9e-4 relative, subnormal spacing 6e-8 below 6e-5; bf16 half-ulp 3.9e-3 relative.
# Measured max errors in the interpreter (CPU, this file's shapes, q*2 so the softmax is peaked):
#   out fp16: abs 9.8e-4 (values up to ~3; rel ~5e-4)      out fp32: abs 3.1e-6
#   maps fp32: abs 5.9e-7 (inputs fp16 or fp32)              maps fp16: abs 2.4e-4 (rel <= 4.9e-4)
#   maps bf16: abs 3.4e-3 (rel <= 3.9e-3)
# One-off check (not in the suite, 137 s in the interpreter): SD3 size N = 4096 + 154, d = 16, fp16 in,
#   fp16 maps, head mean, 77 columns: out 4.8e-4, i2t 3.0e-5, t2i 6.3e-5 abs, within MAP_TOL.
OUT_TOL = {torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2), torch.float32: (2e-5, 2e-5)}
MAP_TOL = {torch.float16: (1e-7, 1e-3), torch.bfloat16: (1e-7, 8e-3), torch.float32: (1e-6, 1e-4)}


def random_qkv(b, h, n, d, dtype, seed, layout="bhnd"):
    """Fresh random q, k, v of logical shape [B, H, N, D] on DEVICE (never zeros; q doubled so the softmax is
    peaked, not uniform). layout "bnhd" gives transposed views of [B, N, H, D] tensors, what Flux holds."""
    g = torch.Generator().manual_seed(seed)
    shape = (b, n, h, d) if layout == "bnhd" else (b, h, n, d)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float32) for _ in range(3))
    q = q * 2.0
    q, k, v = (t.to(device=DEVICE, dtype=dtype) for t in (q, k, v))
    if layout == "bnhd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return q, k, v
