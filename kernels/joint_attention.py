"""Fused joint attention with text-image probability capture (one Triton kernel family).

One launch computes, for q, k, v of shape ``[B, H, N, D]``,

    out = softmax(q k^T * scale) v                      (FlashAttention-style, never materialising P)

and streams the text-image sub-blocks of P = softmax(q k^T * scale) (normalised over ALL N keys):

    i2t[b, h, i, j] = P[b, h, img_i, text_start + text_index[j]]     [B, H, N_img, T]   (or [B, N_img, T])
    t2i[b, h, j, i] = P[b, h, text_start + text_index[j], img_i]     [B, H, T, N_img]   (or [B, T, N_img])

Text tokens are the contiguous positions ``[text_start, text_stop)``; the image tokens are every other
position, in sequence order: position p is image row ``p`` if ``p < text_start`` else ``p - T_full``.

Grid: one program per (query block of BLOCK_M rows, b * H + h).
  1. Online-softmax loop over all key blocks: running max m, running sum l, fp32 accumulator acc.
     out = acc / l; lse = m + log2(l) (log2 domain, log2(e) folded into the scale).
  2. Capture loops (only for captured maps, only for query blocks that hold the needed rows): recompute
     the scores of the needed key columns (text columns for i2t, image columns for t2i) and write
     p = exp2(s - lse) in the map dtype. With ``heads_mean`` the tile is atomically added, times 1/H,
     into a zeroed fp32 buffer that the wrapper converts to the map dtype once at the end.
The full N x N matrix never exists: at most one BLOCK_M x BLOCK_N tile per program.

This file knows tensors, strides and blocks, nothing about models.
"""
from __future__ import annotations

import logging
import math
import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["joint_attention_fwd"]

_log = logging.getLogger(__name__)

# Triton's numpy interpreter: one program at a time, so a single small fixed config and no autotuning.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# SEG4DIFF_AUTOTUNE=0 pins one GPU config (64 x 64, 4 warps, 2 stages) instead of autotuning: for test runs
# on a GPU, where autotuning every test shape would compile and time every config for each one.
_AUTOTUNE = os.environ.get("SEG4DIFF_AUTOTUNE", "1") != "0"

_LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))


# --------------------------------------------------------------------------------------------------------
# Autotune configs.
# Ampere (sm80, 164 KiB smem/SM opt-in) and Hopper (sm90, 227 KiB) both like 128 x 64 tiles with 4-8 warps
# for d <= 128; d = 256 needs smaller tiles to fit K/V stages in shared memory. The prune function drops
# what cannot fit or would be wasted (see _prune_configs).
# --------------------------------------------------------------------------------------------------------
def _gpu_configs() -> List[triton.Config]:
    cfgs = []
    for bm, bn, warps, stages in [
        (128, 64, 4, 3),
        (128, 64, 8, 3),
        (128, 128, 8, 3),  # Hopper, d <= 128
        (64, 64, 4, 3),
        (64, 64, 4, 2),
        (64, 32, 4, 2),  # d = 256 on Ampere
        (32, 32, 4, 2),  # small N fallback
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages))
    return cfgs


def _pinned_gpu_configs() -> List[triton.Config]:
    return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)]


def _interpreter_configs() -> List[triton.Config]:
    return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]


def _max_shared_memory() -> int:
    try:
        dev = torch.cuda.current_device()
        return triton.runtime.driver.active.utils.get_device_properties(dev)["max_shared_mem"]
    except Exception:  # pragma: no cover - no driver: assume Ampere's 164 KiB
        return 166912


def _prune_configs(configs, named_args, max_shared_memory=None, **kwargs):
    """Drop configs that cannot run well for this launch; log why each one is dropped.

    ``max_shared_memory`` (bytes) defaults to the current device's; ahead-of-time compilation
    (``aot_variants``) passes the target's.

    - shared memory: Q tile + num_stages x (K tile + V tile) must fit (element size of q's dtype);
    - waste: a BLOCK_M or BLOCK_N above next_power_of_2(N) only computes padding;
    - d = 256 with BLOCK_M = 128 spills registers (fp32 accumulator of 128 x 256 per program).
    Always keeps at least the smallest config.
    """
    n = named_args["N"]
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    elsize = named_args["Q"].element_size()
    smem = _max_shared_memory() if max_shared_memory is None else max_shared_memory
    kept = []
    for cfg in configs:
        bm, bn, st = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], max(cfg.num_stages, 1)
        need = (bm * block_d + st * 2 * bn * block_d) * elsize
        if need > smem:
            _log.debug("drop %s: needs %d B of shared memory > %d", cfg, need, smem)
        elif bm > max(32, triton.next_power_of_2(n)) or bn > max(32, triton.next_power_of_2(n)):
            _log.debug("drop %s: tile larger than next_power_of_2(N=%d)", cfg, n)
        elif block_d >= 256 and bm > 64:
            _log.debug("drop %s: a %dx256 fp32 accumulator per program spills registers", cfg, bm)
        else:
            kept.append(cfg)
    if not kept:
        kept = [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return kept


# --------------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------------
@triton.autotune(
    configs=_interpreter_configs() if _INTERPRET else _gpu_configs() if _AUTOTUNE else _pinned_gpu_configs(),
    key=["N", "BLOCK_D", "CAPTURE_I2T", "CAPTURE_T2I", "HEADS_MEAN"],  # + dtypes of all tensor args (Triton adds them)
    prune_configs_by={"early_config_prune": _prune_configs},
    # heads_mean accumulates with atomics: every benchmark run must start from zero (the autotuner also
    # zeroes once more before the real launch). Zeroing a plain-store map is harmless (fully overwritten).
    reset_to_zero=["I2T", "T2I"],
)
@triton.heuristics({"EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0})
@triton.jit
def _joint_attention_fwd_kernel(
    Q, K, V, OUT, I2T, T2I, TEXT_INDEX, TEXT_INV,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    H, N, D, text_start, text_stop, N_img, T,
    qk_scale,  # softmax scale * log2(e)
    inv_heads,  # 1 / H, for heads_mean
    CAPTURE_I2T: tl.constexpr, CAPTURE_T2I: tl.constexpr, HEADS_MEAN: tl.constexpr, HAS_INDEX: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    t_full = text_stop - text_start

    # Base pointers of this (b, h); int64 so that B*H*N*D > 2^31 does not overflow.
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    o_base = OUT + off_b * stride_ob + off_h * stride_oh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query positions of this block  [BLOCK_M]
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)  # head dim padded to a power of two >= 16; masked loads give zeros
    mask_m = offs_m < N
    mask_d = offs_d < D

    # Q tile [BLOCK_M, BLOCK_D]; padding rows/cols are 0 (scores 0: finite, never NaN, never stored).
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    # ---- 1. online softmax over all N keys (log2 domain) ---------------------------------------------
    # s2 = (q k^T) * scale * log2(e);   m_new = max(m, rowmax(s2));   p = 2^(s2 - m_new)
    # l   <- l * 2^(m - m_new) + rowsum(p);   acc <- acc * 2^(m - m_new) + p v
    # Every key block has >= 1 valid column, so m is finite after the first block (unless inputs are
    # inf/NaN, which then propagate as in SDPA) and l >= 1 for every row, padding rows included.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None],
                     mask=mask_n[None, :] & mask_d[:, None], other=0.0)  # K^T tile [BLOCK_D, BLOCK_N]
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N] fp32
        if not EVEN_N:
            s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # V tile [BLOCK_N, BLOCK_D]
        # p in v's dtype for the tensor-core dot (fp32 stays fp32), accumulate in fp32.
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    o = acc / l_i[:, None]
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :], o.to(OUT.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    lse = m_i + tl.math.log2(l_i)  # log2 of the row's full normaliser, in scaled units  [BLOCK_M]

    block_lo = start_m * BLOCK_M
    block_hi = block_lo + BLOCK_M

    # ---- 2a. i2t: image query rows x (selected) text key columns ---------------------------------------
    if CAPTURE_I2T:
        # The block holds image rows iff it starts before the text or reaches past text_stop < N.
        has_img = (block_lo < text_start) | ((block_hi > text_stop) & (text_stop < N))
        if has_img:
            is_img = mask_m & ((offs_m < text_start) | (offs_m >= text_stop))
            img_row = tl.where(offs_m < text_start, offs_m, offs_m - t_full)  # position -> image row
            if HEADS_MEAN:
                map_base = I2T + off_b * N_img * T
            else:
                map_base = I2T + off_bh.to(tl.int64) * N_img * T
            for start_j in range(0, T, BLOCK_N):
                j = start_j + offs_n  # output column  [BLOCK_N]
                mask_j = j < T
                if HAS_INDEX:
                    kpos = text_start + tl.load(TEXT_INDEX + j, mask=mask_j, other=0).to(tl.int32)
                else:
                    kpos = text_start + j
                kt = tl.load(k_base + kpos[None, :] * stride_kn + offs_d[:, None],
                             mask=mask_j[None, :] & mask_d[:, None], other=0.0)
                s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
                p = tl.math.exp2(s - lse[:, None])  # P = exp(s - lse), normalised over all N keys
                ptrs = map_base + img_row[:, None] * T + j[None, :]
                mask = is_img[:, None] & mask_j[None, :]
                if HEADS_MEAN:
                    tl.atomic_add(ptrs, p * inv_heads, mask=mask, sem="relaxed")
                else:
                    tl.store(ptrs, p.to(I2T.dtype.element_ty), mask=mask)

    # ---- 2b. t2i: (selected) text query rows x image key columns ---------------------------------------
    if CAPTURE_T2I:
        has_txt = (block_lo < text_stop) & (block_hi > text_start)
        if has_txt:
            is_txt = mask_m & (offs_m >= text_start) & (offs_m < text_stop)
            if HAS_INDEX:
                # TEXT_INV[t] = output row of text position text_start + t, or -1 when not selected.
                out_row = tl.load(TEXT_INV + (offs_m - text_start), mask=is_txt, other=-1)
            else:
                out_row = tl.where(is_txt, offs_m - text_start, -1)
            if HEADS_MEAN:
                map_base = T2I + off_b * T * N_img
            else:
                map_base = T2I + off_bh.to(tl.int64) * T * N_img
            for start_i in range(0, N_img, BLOCK_N):
                i = start_i + offs_n  # image column  [BLOCK_N]
                mask_i = i < N_img
                kpos = tl.where(i < text_start, i, i + t_full)  # image row -> sequence position
                kt = tl.load(k_base + kpos[None, :] * stride_kn + offs_d[:, None],
                             mask=mask_i[None, :] & mask_d[:, None], other=0.0)
                s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
                p = tl.math.exp2(s - lse[:, None])
                ptrs = map_base + out_row[:, None] * N_img + i[None, :]
                mask = (out_row >= 0)[:, None] & mask_i[None, :]
                if HEADS_MEAN:
                    tl.atomic_add(ptrs, p * inv_heads, mask=mask, sem="relaxed")
                else:
                    tl.store(ptrs, p.to(T2I.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------
# Launch wrapper
# --------------------------------------------------------------------------------------------------------
def _map_buffers(shape, map_dtype, heads_mean, given, device):
    """Return (kernel_target, final): the buffer the kernel writes and the map returned to the caller.

    heads_mean accumulates in fp32 with atomics, so the kernel target is zeroed fp32; when map_dtype is not
    fp32 it is a scratch buffer converted once into ``final`` after the launch.
    """
    final = given if given is not None else torch.empty(shape, dtype=map_dtype, device=device)
    if not heads_mean:
        return final, final
    if map_dtype == torch.float32:
        final.zero_()
        return final, final
    return torch.zeros(shape, dtype=torch.float32, device=device), final


def joint_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_start: int,
    text_stop: int,
    *,
    capture_i2t: bool,
    capture_t2i: bool,
    heads_mean: bool,
    text_index: Optional[torch.Tensor],
    map_dtype: torch.dtype,
    scale: float,
    out: Optional[torch.Tensor] = None,
    i2t: Optional[torch.Tensor] = None,
    t2i: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Joint attention over ``[B, H, N, D]`` q/k/v (any strides, unit stride in the last dim) and, in the
    same launch, the text-image probability maps.

    Returns ``(out [B, H, N, D] in q.dtype, i2t [B, (H,) N_img, T] or None, t2i [B, (H,) T, N_img] or None)``
    with maps in ``map_dtype``. ``out``/``i2t``/``t2i`` buffers, when given (exact shape and dtype,
    contiguous), are written into. Inputs are assumed validated by the caller (seg4diff_fast.attention).
    """
    B, H, N, D = q.shape
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "unit stride in the head dim"
    device = q.device
    t_full = text_stop - text_start
    n_img = N - t_full
    T = t_full if text_index is None else int(text_index.numel())

    if out is None:
        out = torch.empty((B, H, N, D), dtype=q.dtype, device=device)

    i2t_k = i2t_out = t2i_k = t2i_out = None
    if capture_i2t:
        shape = (B, n_img, T) if heads_mean else (B, H, n_img, T)
        i2t_k, i2t_out = _map_buffers(shape, map_dtype, heads_mean, i2t, device)
    if capture_t2i:
        shape = (B, T, n_img) if heads_mean else (B, H, T, n_img)
        t2i_k, t2i_out = _map_buffers(shape, map_dtype, heads_mean, t2i, device)

    has_index = text_index is not None
    if has_index:
        text_index32 = text_index.to(device=device, dtype=torch.int32)
        # inverse map: text position (relative to text_start) -> output row j, -1 when not selected  [T_full]
        text_inv = torch.full((t_full,), -1, dtype=torch.int32, device=device)
        text_inv[text_index32.long()] = torch.arange(T, dtype=torch.int32, device=device)
    else:
        text_index32 = text_inv = out  # never read (HAS_INDEX=False)

    block_d = max(16, triton.next_power_of_2(D))
    # fp32 inputs: exact fp32 products ("ieee"), not tf32 (tf32 would cost ~1e-3 relative error).
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]), B * H)

    if B * H > 0 and N > 0:
        _joint_attention_fwd_kernel[grid](
            q, k, v, out,
            i2t_k if i2t_k is not None else out,
            t2i_k if t2i_k is not None else out,
            text_index32, text_inv,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            H, N, D, text_start, text_stop, n_img, T,
            float(scale) * _LOG2E, 1.0 / H,
            CAPTURE_I2T=bool(capture_i2t), CAPTURE_T2I=bool(capture_t2i), HEADS_MEAN=bool(heads_mean),
            HAS_INDEX=has_index, BLOCK_D=block_d, DOT_PRECISION=dot_precision,
        )

    if i2t_out is not None and i2t_k is not i2t_out:
        i2t_out.copy_(i2t_k)  # fp32 head-mean accumulator -> map_dtype, once
    if t2i_out is not None and t2i_k is not t2i_out:
        t2i_out.copy_(t2i_k)
    return out, i2t_out, t2i_out


# --------------------------------------------------------------------------------------------------------
# Benchmark (GPU): `python -m seg4diff_fast.kernels.joint_attention` prints TFLOP/s beside SDPA's.
# --------------------------------------------------------------------------------------------------------
def _bench():  # pragma: no cover - needs a GPU
    from triton.testing import do_bench

    cases = [  # (name, B, H, N, D, text_start, text_stop, dtype)
        ("sd3 1024^2 (154 text)", 1, 24, 4250, 64, 4096, 4250, torch.float16),
        ("sd3 2048^2 (333 text)", 1, 24, 16717, 64, 16384, 16717, torch.float16),
        ("flux 1024^2 (512 text)", 1, 24, 4608, 128, 0, 512, torch.bfloat16),
    ]
    print(f"{'case':28s} {'capture':>14s} {'ms':>8s} {'TFLOP/s':>8s}   sdpa ms")
    for name, b, h, n, d, ts, te, dtype in cases:
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype) for _ in range(3))
        flops = 4.0 * b * h * n * n * d
        sdpa_ms = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        for cap, mean in [((False, False), False), ((True, False), True), ((True, True), False)]:
            label = ("i2t" if cap[0] else "") + ("+t2i" if cap[1] else "") + (" mean" if mean else "") or "none"
            fn = lambda: joint_attention_fwd(  # noqa: E731
                q, k, v, ts, te, capture_i2t=cap[0], capture_t2i=cap[1], heads_mean=mean, text_index=None,
                map_dtype=torch.float16, scale=d ** -0.5)
            ms = do_bench(fn)
            print(f"{name:28s} {label:>14s} {ms:8.3f} {flops / ms * 1e-9:8.1f}   {sdpa_ms:.3f}")


if __name__ == "__main__":  # pragma: no cover
    _bench()


# --------------------------------------------------------------------------------------------------------
# Ahead-of-time variants for the compile report (seg4diff_fast.compile_report; interface in kernels/_aot.py).
# --------------------------------------------------------------------------------------------------------
def aot_variants(target: str, dtype: torch.dtype, head_dim: int, capture: str):
    """Every autotune config of the fused kernel, specialised as a launch on ``target`` would be.

    The launch: SD3-medium at 1024^2 with CLIP text, ``q, k, v`` contiguous ``[1, 24, 4250, head_dim]`` in
    ``dtype``, text at the end (positions ``[4096, 4250)``); ``capture`` as in ``_aot.CAPTURE_MODES``
    (``"i2t-mean"`` selects the 77 CLIP columns, like Seg4Diff; maps in the default float16). ``selectable``
    is this file's own prune (``_prune_configs``) with the target's shared memory.
    Returns ``list[KernelVariant]``; empty for a dtype the kernel does not take.
    """
    from . import _aot

    tgt = _aot.check_target(target)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return []
    capture_i2t, capture_t2i, heads_mean, has_index = _aot.parse_capture(capture)
    B, H, N, D = 1, 24, 4250, int(head_dim)
    text_start, text_stop = 4096, 4250
    t_full = text_stop - text_start
    n_img = N - t_full
    T = 77 if has_index else t_full
    block_d = max(16, triton.next_power_of_2(D))
    qkv = _aot.DevicePointer(dtype)
    # What joint_attention_fwd passes: heads_mean accumulates in a float32 buffer; per-head maps are written
    # in map_dtype (float16 by default); an unused pointer slot gets `out`.
    map_ptr = _aot.DevicePointer(torch.float32 if heads_mean else torch.float16)
    index_ptr = _aot.DevicePointer(torch.int32) if has_index else qkv
    sb, sh, sn, _ = _aot.contiguous_strides((B, H, N, D))
    args = dict(
        Q=qkv, K=qkv, V=qkv, OUT=qkv,
        I2T=map_ptr if capture_i2t else qkv, T2I=map_ptr if capture_t2i else qkv,
        TEXT_INDEX=index_ptr, TEXT_INV=index_ptr,
        stride_qb=sb, stride_qh=sh, stride_qn=sn, stride_kb=sb, stride_kh=sh, stride_kn=sn,
        stride_vb=sb, stride_vh=sh, stride_vn=sn, stride_ob=sb, stride_oh=sh, stride_on=sn,
        H=H, N=N, D=D, text_start=text_start, text_stop=text_stop, N_img=n_img, T=T,
        qk_scale=D ** -0.5 * _LOG2E, inv_heads=1.0 / H,
        CAPTURE_I2T=capture_i2t, CAPTURE_T2I=capture_t2i, HEADS_MEAN=heads_mean, HAS_INDEX=has_index,
        BLOCK_D=block_d, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )
    configs = _gpu_configs()
    kept = _prune_configs(configs, {"N": N, "Q": qkv}, max_shared_memory=tgt.max_shared_memory,
                          BLOCK_D=block_d)
    shape = f"[{B}, {H}, {N}, {D}] text [{text_start}, {text_stop}) T={T}"
    variants = []
    for cfg in configs:
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        variants.append(_aot.launch_variant(
            "joint_attention", _joint_attention_fwd_kernel, dict(args, BLOCK_M=bm, BLOCK_N=bn),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, block_m=bm, block_n=bn,
            selectable=cfg in kept, shape=shape))
    return variants
