"""Test setup: without CUDA, Triton kernels run through Triton's interpreter.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is decorated, so before seg4diff_fast's
kernels are imported; conftest.py is imported by pytest before the test modules.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Tolerances vs the float64 reference, as (atol, rtol): one definition, in the library (see its comment).
from seg4diff_fast.reference import MAP_TOL, OUT_TOL  # noqa: E402,F401


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


@pytest.fixture(autouse=True)
def fresh_auto_state(monkeypatch, tmp_path):
    """Every test: a cache folder of its own (no backend table saved by `seg4diff-fast check --save` on this
    machine changes what backend="auto" picks) and no auto choice or self-test remembered from another test."""
    from seg4diff_fast import selfcheck

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(selfcheck, "_STATE", {})
    monkeypatch.setattr(selfcheck, "_SELF_TESTS", {})
