"""The compile report's floor: the plainest FlashAttention-2 forward, compiled beside our attention kernels.

Never launched and not a user kernel (no launch wrapper; not in ``seg4diff_fast.kernels``): a yardstick for the
main-loop section of ``seg4diff-fast compile-report``. It computes ``out = softmax(q k^T * scale) v`` for
``[B, H, N, D]`` q/k/v with nothing else: no key mask, no capture, no lse, no ragged block (N is a multiple of
both tiles), one loop over key blocks. Per key block (the log2 domain, the scale folded into one FMA):

    s = q k^T;  m_new = max(m, rowmax(s) * qk_scale);  p = exp2(s * qk_scale - m_new);  alpha = exp2(m - m_new)
    l = l * alpha + rowsum(p);  acc = acc * alpha + p v;  m = m_new

Loads as ours at the same config: tensor descriptors (TMA) when ``USE_TMA``, else pointers (cp.async-pipelined), the
head dim padded to ``BLOCK_D`` with a compile-time column mask when ``HEAD_DIM < BLOCK_D``, row offsets marked
multiples of ``ROW_ALIGN``. ``WARP_SPECIALIZE`` asks Triton for producer / consumer warps on the loop (TMA only).
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["floor_variant", "FLOOR_N"]

# The floor's sequence length: SD3-medium's 4096 image tokens at 1024^2, a multiple of every tile (no ragged block).
FLOOR_N = 4096


@triton.jit
def _rows(base, rows, stride_n, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr):
    """``base[rows, :HEAD_DIM]`` as ``[len(rows), BLOCK_D]`` (padding columns 0)."""
    offs_d = tl.arange(0, BLOCK_D)
    row_off = tl.multiple_of(rows.to(tl.int64) * stride_n, ROW_ALIGN)
    ptrs = base + row_off[:, None] + offs_d[None, :]
    if HEAD_DIM == BLOCK_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _floor_attention_fwd(
    Q, K, V, OUT, stride_b, stride_h, stride_n, H, N,
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr, USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    head = tl.multiple_of((off_bh // H).to(tl.int64) * stride_b + (off_bh % H).to(tl.int64) * stride_h, ROW_ALIGN)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows  [BLOCK_M]
    offs_n = tl.arange(0, BLOCK_N)
    if USE_TMA:
        q_desc = tl.make_tensor_descriptor(Q + head, shape=[N, HEAD_DIM], strides=[stride_n, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        k_desc = tl.make_tensor_descriptor(K + head, shape=[N, HEAD_DIM], strides=[stride_n, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(V + head, shape=[N, HEAD_DIM], strides=[stride_n, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        o_desc = tl.make_tensor_descriptor(OUT + head, shape=[N, HEAD_DIM], strides=[stride_n, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        q = q_desc.load([start_m * BLOCK_M, 0])  # [BLOCK_M, BLOCK_D]
    else:
        q = _rows(Q + head, offs_m, stride_n, HEAD_DIM, BLOCK_D, ROW_ALIGN)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of s * qk_scale
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s * qk_scale - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # running p v
    for start_n in tl.range(0, N, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        if USE_TMA:
            k = k_desc.load([start_n, 0])  # [BLOCK_N, BLOCK_D]
        else:
            k = _rows(K + head, start_n + offs_n, stride_n, HEAD_DIM, BLOCK_D, ROW_ALIGN)
        s = tl.dot(q, k.T, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if USE_TMA:
            v = v_desc.load([start_n, 0])
        else:
            v = _rows(V + head, start_n + offs_n, stride_n, HEAD_DIM, BLOCK_D, ROW_ALIGN)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    o = (acc / l_i[:, None]).to(OUT.dtype.element_ty)
    if USE_TMA:
        o_desc.store([start_m * BLOCK_M, 0], o)
    else:
        offs_d = tl.arange(0, BLOCK_D)
        row_off = tl.multiple_of(offs_m.to(tl.int64) * stride_n, ROW_ALIGN)
        tl.store(OUT + head + row_off[:, None] + offs_d[None, :], o, mask=(offs_d < HEAD_DIM)[None, :])


def floor_variant(target: str, dtype, head_dim: int, block_m: int, block_n: int, num_warps: int, num_stages: int,
                  warp_specialize: bool, use_tma: bool):
    """The floor at one config as a launch on ``target`` compiles it (``kernels/_aot.py``'s ``KernelVariant``):
    contiguous ``[1, 24, FLOOR_N, head_dim]`` q/k/v/out of ``dtype`` (a torch dtype)."""
    from .kernels import _aot, _tuning

    _aot.check_target(target)
    B, H, N, D = 1, 24, FLOOR_N, int(head_dim)
    if N % block_m or N % block_n:
        raise ValueError(f"the floor's N = {N} must be a multiple of the tile {block_m}x{block_n}")
    ptr = _aot.DevicePointer(dtype)
    sb, sh, sn, _ = _aot.contiguous_strides((B, H, N, D))
    args = dict(Q=ptr, K=ptr, V=ptr, OUT=ptr, stride_b=sb, stride_h=sh, stride_n=sn, H=H, N=N,
                qk_scale=D ** -0.5 * 1.4426950408889634, HEAD_DIM=D, BLOCK_D=_tuning.block_d(D),
                ROW_ALIGN=_tuning.strides_row_align(sb, sh, sn), USE_TMA=bool(use_tma),
                DOT_PRECISION=_tuning.dot_precision(dtype), BLOCK_M=block_m, BLOCK_N=block_n,
                WARP_SPECIALIZE=bool(warp_specialize))
    return _aot.launch_variant("floor" + ("-ws" if warp_specialize else ""), _floor_attention_fwd, args,
                               num_warps=num_warps, num_stages=num_stages, block_m=block_m, block_n=block_n,
                               selectable=True, shape=f"[{B}, {H}, {N}, {D}]" + (" TMA" if use_tma else ""))
