"""The implementation table :data:`IMPLS`: every implementation that is timed, by name.

Every implementation is called as ``fn(q, k, v, text_start, text_stop) -> (out, i2t, t2i)`` (shapes in the
package docstring, ``seg4diff_fast.bench``). Add a backend by adding one row to ``_impl_table``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from ..attention import _interpreting, _resolve_backend, _runs_triton
from ..reference import full_map_attention

__all__ = ["Impl", "IMPLS", "BENCH_DEFAULT_IMPLS", "BACKEND_IMPL", "unsupported_reason"]

# Why a Triton implementation is not timed on the CPU.
NO_CUDA = ("no CUDA (Triton's interpreter is for tests: TRITON_INTERPRET=1 with --allow-interpret runs it at tiny "
           "shapes, and its timings say nothing about speed)")

ImplFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], tuple]


@dataclass(frozen=True)
class Impl:
    name: str
    fn: ImplFn
    capture: Optional[str]  # maps it returns: "i2t", "t2i", "both" or None
    heads: Optional[str]  # "mean" or "all" for its maps
    needs: str  # "" (any device) or "cuda"; what a joint_attention backend needs is the backend's to say
    description: str
    backend: Optional[str] = None  # the joint_attention backend it calls, if any


def _ours(capture: Optional[str], heads: str, backend: str) -> ImplFn:
    def fn(q, k, v, text_start, text_stop):
        from ..attention import joint_attention

        out, maps = joint_attention(
            q, k, v, slice(text_start, text_stop), capture=capture, heads=heads, backend=backend
        )
        return out, maps.i2t, maps.t2i

    return fn


def _sdpa(backend: Optional[str]) -> ImplFn:
    def fn(q, k, v, text_start, text_stop):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v), None, None
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([getattr(SDPBackend, backend)]):
            return F.scaled_dot_product_attention(q, k, v), None, None

    return fn


def _full_map(q, k, v, text_start, text_stop):
    out, i2t = full_map_attention(q, k, v, text_start, text_stop)
    return out, i2t, None


def _impl_table() -> Dict[str, Impl]:
    kernels = (
        ("ours", "triton", "fused Triton kernel"),
        ("split", "triton-split", "split Triton kernels: attention phase (out + lse; TMA / warp-specialised on "
                                  "sm90), then the capture kernel"),
    )
    variants = (
        ("i2t-mean", "i2t", "mean", "capture i2t, maps averaged over heads (Seg4Diff's use)"),
        ("both-all", "both", "all", "capture i2t and t2i, every head"),
        ("nocap", None, "mean", "no capture (plain attention; for the split path its attention phase alone)"),
    )
    rows = [
        Impl(f"{prefix}-{suffix}", _ours(capture, heads, backend), capture, heads if capture else None, "",
             f"{what}, {how}", backend)
        for prefix, backend, what in kernels for suffix, capture, heads, how in variants
    ] + [
        Impl("sdpa-capture-i2t-mean", _ours("i2t", "mean", "sdpa"), "i2t", "mean", "",
             "joint_attention backend='sdpa': torch's fused SDPA kernel for out (CUDA: cuDNN / flash / efficient, "
             "then the Triton capture kernel, its own lse; CPU: the CPU flash kernel, then the maps in torch, a "
             "softmax over all keys per chunk of image rows), capture i2t, heads mean", "sdpa"),
        Impl("sdpa-default", _sdpa(None), None, None, "",
             "F.scaled_dot_product_attention, torch's own backend choice (writes no maps)"),
        Impl("sdpa-cudnn", _sdpa("CUDNN_ATTENTION"), None, None, "cuda",
             "SDPA forced to cuDNN attention (writes no maps)"),
        Impl("sdpa-flash", _sdpa("FLASH_ATTENTION"), None, None, "cuda",
             "SDPA forced to FlashAttention (writes no maps)"),
        Impl("full-map", _full_map, "i2t", "mean", "",
             "Seg4Diff's path: explicit [B,H,N,N] softmax in the model dtype, then SDPA again"),
        Impl("torch-chunked", _ours("i2t", "mean", "torch"), "i2t", "mean", "",
             "joint_attention backend='torch': SDPA's fused kernel for out, then the maps chunked over query rows "
             "(a softmax over all N keys per chunk of image rows), capture i2t mean", "torch"),
    ]
    return {impl.name: impl for impl in rows}


IMPLS: Dict[str, Impl] = _impl_table()
# What `bench` times by default, "ours" standing for the resolved --backend.
BENCH_DEFAULT_IMPLS = ("ours", "sdpa-default", "full-map")
BACKEND_IMPL = {"triton": "ours-i2t-mean", "triton-split": "split-i2t-mean", "sdpa": "sdpa-capture-i2t-mean",
                "torch": "torch-chunked"}


def unsupported_reason(impl: Impl, device: torch.device, allow_interpret: bool = False) -> Optional[str]:
    """Why ``impl`` cannot run on ``device`` (a sentence), or None if it can be tried. A joint_attention backend
    is asked through ``attention._resolve_backend`` itself (the checks ``joint_attention`` makes); one that would
    launch Triton kernels on the CPU runs only with ``allow_interpret`` under ``TRITON_INTERPRET=1``."""
    if impl.needs == "cuda" and device.type != "cuda":
        return "needs CUDA"
    if impl.backend is None:
        return None
    if _runs_triton(impl.backend, device) and device.type != "cuda":
        if not (allow_interpret and _interpreting() and device.type == "cpu"):
            return NO_CUDA
    try:
        _resolve_backend(impl.backend, device)
    except ValueError as e:
        return str(e)
    return None
