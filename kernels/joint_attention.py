"""Fused joint attention with text-image probability capture (one Triton kernel family, one launch).

One launch computes, for q, k, v of shape ``[B, H, N, D]``,

    out = softmax(q k^T * scale) v                      (FlashAttention-style, never materialising P)

and the text-image sub-blocks of P = softmax(q k^T * scale) (normalised over ALL N keys):

    i2t[b, h, i, j] = P[b, h, img_i, text_start + text_index[j]]     [B, H, N_img, T]   (or [B, N_img, T])
    t2i[b, h, j, i] = P[b, h, text_start + text_index[j], img_i]     [B, H, T, N_img]   (or [B, T, N_img])

Text tokens are the contiguous positions ``[text_start, text_stop)``; the image tokens are every other
position, in sequence order: position p is image row ``p`` if ``p < text_start`` else ``p - T_full``.

Key bias (optional fp32 ``[B, N]``, ``HAS_MASK``): added to the scaled scores of every row before the softmax
(``-inf`` = masked key); masked key columns of both maps are 0, and a row with no unmasked key has out 0 and
maps 0 (its lse is ``+inf``, see ``_tiles.finish_lse2``).

Grid: one program per (query block of BLOCK_M rows, b * G + head group); a group holds H / G heads
(G = H for heads "all"; for the mean, fewer groups, see ``capture.head_groups``, except fp32 on the pointer
path at D > 64: ``_one_head_per_program``).
  1. For each head of the group (``_tiles.attend_all_keys``): the ragged last key block alone with its mask, then
     the online-softmax loop over the full key blocks, no mask; Q/K/V/O through tensor descriptors (TMA) on sm90+,
     cp.async pointers otherwise; out = acc / l; the row's base-2 lse goes to a scratch ``[B, H, N]``.
  2. Capture loops (only for captured maps, only for query blocks that hold the needed rows): for each block
     of the needed key columns (text columns for i2t, image columns for t2i) and each head of the group,
     recompute the scores and ``exp2(s * qk_scale - lse2)`` (or the scaled logits). ``heads_mean`` sums the
     group's heads in registers and writes one fp32 partial per group, which the wrapper adds in a fixed
     order: no atomics, the same bits on every run.
The full N x N matrix never exists: at most one BLOCK_M x BLOCK_N tile per program. t2i rows live in the
few query blocks that hold text; the split path (``attention.py`` + ``capture.py``) spreads that work.

This file knows tensors, strides and blocks, nothing about models.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _tuning
from ._tiles import (LOG2E, attend_all_keys, finish_lse2, finish_out, head_map_tile, head_offset,
                     head_sources, image_to_position, key_bias, store_head_out, store_map, text_positions)
from .capture import head_groups

__all__ = ["joint_attention_fwd"]


# --------------------------------------------------------------------------------------------------------
# Autotune configs: (BLOCK_M, BLOCK_N, num_warps, num_stages); the first is the pinned config
# (SEG4DIFF_AUTOTUNE=0). _prune says why a config is dropped for a launch.
# --------------------------------------------------------------------------------------------------------
_GPU_CONFIGS = [
    (64, 64, 4, 2),
    (128, 64, 8, 3),
    (128, 128, 8, 3),  # Hopper, d <= 128
    (64, 64, 4, 3),
    (64, 32, 4, 2),  # d = 256 on Ampere
    (32, 32, 4, 2),  # small N fallback
]
# fp32 inputs (tf32x3 dots: two halves of every operand in registers) take only these tiles, per BLOCK_D:
# the ones with no spill in every capture mode (compile report, Triton 3.9). BLOCK_D 64: none on sm90a and
# sm80 (32 x 16 spills 128 B on sm80). 128: none on sm90a; on sm80's pointer path every tile tried spilled while the
# ragged key block came after the main loop (16 x 32 x 8 warps 80-268 B, 16 x 16 x 8 warps 96-188 B, 16 x 32 x 4
# warps 176-404 B: q's halves stayed live across the loop for it); with the ragged block first
# (_tiles.attend_all_keys) and one head per program for a mean (_one_head_per_program), 16 x 32 x 8 warps spills
# nothing and its loop is at or under the floor's (8.0-8.2 instructions per HMMA).
_GPU_CONFIGS_FP32 = {
    64: [(16, 32, 4, 2)],
    128: [(16, 32, 8, 2)],
}


def _one_head_per_program(elsize: int, tma: bool, head_dim: int) -> bool:
    """Whether a head mean must put one head in each program (G = H groups, H fp32 partials): fp32 on the pointer
    path at D > 64. With four heads per program the 16 x 32 x 8-warp tile kept two registers spilled across the
    attention loop (8-16 B, compile report, Triton 3.9, sm80) while q was re-read per key block; with q held and the
    ragged key block first (``_tiles.attend_all_keys``) it spills nothing in i2t-mean but needs all 255 registers
    (one head: 195-245), so one head per program stays."""
    return elsize == 4 and not tma and head_dim > 64


def _all_gpu_configs():
    """The autotune list: the 2-byte tiles, then the fp32-only ones (``_tuning.dtype_rule`` sorts them)."""
    fp32 = [t for tiles in _GPU_CONFIGS_FP32.values() for t in tiles if t not in _GPU_CONFIGS]
    return _GPU_CONFIGS + list(dict.fromkeys(fp32))


def _configs():
    gpu = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
           for bm, bn, w, s in _all_gpu_configs()]
    interp = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return _tuning.config_list(gpu, interp)


def _prune_configs(configs, named_args, max_shared_memory=None, arch=None, **kwargs):
    """Drop configs that cannot run well for this launch (see ``_tuning.prune``); d > 128 keeps BLOCK_M <= 64
    (a 128 x 256 fp32 accumulator per program spills registers); with capture, the tiles the compile report
    shows spilling (128x128 everywhere, above 64x32 on the pointer path); the small-N fallback 32x32 when N > 32 with
    capture on TMA targets, and on sm100 in every mode (it spills there without capture)."""
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    tma = kwargs.get("USE_TMA", named_args.get("USE_TMA"))
    capture = any(kwargs.get(f, named_args.get(f, False)) for f in ("CAPTURE_I2T", "CAPTURE_T2I"))

    q = named_args["Q"]
    arch_of_q = _tuning.device_arch(getattr(q, "device", None), arch)

    def extra(cfg):
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        why = _tuning.dtype_rule((bm, bn, cfg.num_warps, cfg.num_stages), q.element_size(),
                                 _tuning.block_d(head_dim), _GPU_CONFIGS, _GPU_CONFIGS_FP32)
        if why:
            return why
        if q.element_size() == 4:
            return ""  # the fp32 tiles are chosen by the compile report, capture modes included
        if capture and arch_of_q >= 100 and head_dim > 64 and (bm, bn) != (64, 32):
            return "sm100: tiles above 64x32 spill with capture at D > 64 (116-208 B)"
        if head_dim > 128 and bm > 64:
            return f"a {bm}x{head_dim} fp32 accumulator per program spills registers"
        # compile report (Triton 3.9, SD3 1024^2 launch): the capture loops' registers on top of the attention
        if capture and bm * bn >= 128 * 128:
            return "128x128 tiles spill with capture (sm90a: 344-668 B at D = 64 to 128)"
        if capture and not tma and bm * bn > 64 * 32:
            return "tiles above 64x32 spill with capture on the pointer path (sm80: 28-588 B)"
        if bm == 32 and named_args["N"] > 32 and ((capture and tma) or arch_of_q >= 100):
            return ("32x32 is the fallback for N <= 32 (at D = 64 it spills 12 B with capture on sm90a, and 8 B "
                    "without capture on sm100a, at 96 registers)")
        return ""

    return _tuning.prune(configs, n=named_args["N"], head_dim=head_dim, elsize=q.element_size(),
                         tma=kwargs.get("USE_TMA", named_args.get("USE_TMA")), device=getattr(q, "device", None), extra=extra,
                         max_smem=max_shared_memory)


# --------------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------------
@triton.autotune(
    configs=_configs(),
    key=["N", "HEAD_DIM", "USE_TMA", "CAPTURE_I2T", "CAPTURE_T2I", "HEADS_MEAN", "HEADS_PER_PROGRAM", "NORMALIZE",
         "HAS_MASK"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _joint_attention_fwd_kernel(
    Q, K, V, OUT, LSE2, I2T, T2I, TEXT_INDEX, TEXT_INV, KEY_BIAS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_ib, stride_ihg, stride_ir,  # i2t: batch, head (heads "all") or group (mean partials), row
    stride_tb, stride_thg, stride_tr,  # t2i: same
    stride_mb,  # key bias [B, N] fp32: batch stride (unit stride along N); KEY_BIAS, stride_mb None without one
    H, N, text_start, text_stop, N_img, T,
    qk_scale,  # softmax scale * log2(e)
    scale,
    out_scale,  # 1 / H for heads_mean, else 1
    CAPTURE_I2T: tl.constexpr, CAPTURE_T2I: tl.constexpr, HEADS_MEAN: tl.constexpr,
    HEADS_PER_PROGRAM: tl.constexpr, HAS_INDEX: tl.constexpr, NORMALIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr, USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    n_groups = H // HEADS_PER_PROGRAM
    off_b = (pid_bg // n_groups).to(tl.int64)
    group = pid_bg % n_groups
    t_full = text_stop - text_start
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query positions of this block  [BLOCK_M]
    row_ok = offs_m < N
    if HAS_MASK:
        bias_row = KEY_BIAS + off_b * stride_mb  # this sample's fp32 key bias  [N]
    else:
        bias_row = KEY_BIAS  # None: never read

    # ---- 1. attention for each head of the group ----------------------------------------------------
    # disable_licm: nothing is hoisted out of the head loop. With the hoist (the per-batch offsets of q, k, v, out, lse
    # among others) the kernel used uniform registers up to UR77 (UR51 with one head per program), and on sm100a ptxas
    # (Triton 3.9) kept the attention loop's pipeline counters in vector registers, moved back (R2UR) 12 times per key
    # block: with 4 heads per program (the i2t-mean launch) 307 instructions per 8 UTC MMAs at 128x64 w8 D = 64 and 280
    # per 10 at 64x32 w4 D = 128, 3.4 and 4.9 % over the floor; without, 295 and 267, as with one head per program
    # (compile report). On sm90a the 4-warp loops take 8-15 more instructions without the hoist and the 8-warp ones 2-7
    # fewer, all within 0.6 % of the floor (docs/01-kernels.md, main loops). Only with TMA (sm90a / sm100a): on the
    # pointer path (sm80) the loop without the hoist spilled 8 B at 64x32 w4 D = 64 with i2t-mean (168 registers);
    # with it, none.
    for hh in tl.range(HEADS_PER_PROGRAM, disable_licm=USE_TMA):
        off_h = (group * HEADS_PER_PROGRAM + hh).to(tl.int64)
        q_base = Q + head_offset(off_b, off_h, stride_qb, stride_qh, ROW_ALIGN)
        k_base = K + head_offset(off_b, off_h, stride_kb, stride_kh, ROW_ALIGN)
        v_base = V + head_offset(off_b, off_h, stride_vb, stride_vh, ROW_ALIGN)
        q, k_src, v_src = head_sources(q_base, k_base, v_base, start_m, offs_m, row_ok, N, stride_qn, stride_kn,
                                        stride_vn, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, USE_TMA, ROW_ALIGN)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        acc, l_i, m_i = attend_all_keys(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, N, qk_scale, bias_row,
                                        HEAD_DIM, BLOCK_D, BLOCK_N, USE_TMA, DOT_PRECISION, ROW_ALIGN, HAS_MASK)
        o = finish_out(acc, l_i, HAS_MASK)
        o_base = OUT + head_offset(off_b, off_h, stride_ob, stride_oh, ROW_ALIGN)
        store_head_out(o_base, o, start_m, offs_m, row_ok, N, stride_on, HEAD_DIM, BLOCK_D, BLOCK_M, USE_TMA,
                       ROW_ALIGN)
        # Base-2 lse of the row's scaled scores, read back by the capture loops below  [BLOCK_M]
        tl.store(LSE2 + (off_b * H + off_h) * N + offs_m, finish_lse2(l_i, m_i, HAS_MASK), mask=row_ok)
    if CAPTURE_I2T or CAPTURE_T2I:
        tl.debug_barrier()  # the lse stores above are read back with another thread layout

    block_lo = start_m * BLOCK_M
    block_hi = block_lo + BLOCK_M

    # ---- 2a. i2t: image query rows x (selected) text key columns ---------------------------------------
    if CAPTURE_I2T:
        # The block holds image rows iff it starts before the text or reaches past text_stop < N.
        has_img = (block_lo < text_start) | ((block_hi > text_stop) & (text_stop < N))
        if has_img:
            is_img = row_ok & ((offs_m < text_start) | (offs_m >= text_stop))
            img_row = tl.where(offs_m < text_start, offs_m, offs_m - t_full)  # position -> image row
            _capture_loop(I2T, stride_ib, stride_ihg, stride_ir, img_row, is_img, T, True, Q, K, LSE2, TEXT_INDEX,
                          bias_row, off_b, group, H, N, offs_m, row_ok, text_start, t_full, stride_qb, stride_qh,
                          stride_qn, stride_kb, stride_kh, stride_kn, qk_scale, scale, out_scale, HEADS_MEAN,
                          HEADS_PER_PROGRAM, HAS_INDEX, NORMALIZE, HEAD_DIM, BLOCK_D, ROW_ALIGN, DOT_PRECISION,
                          HAS_MASK, BLOCK_M, BLOCK_N)

    # ---- 2b. t2i: (selected) text query rows x image key columns ---------------------------------------
    if CAPTURE_T2I:
        has_txt = (block_lo < text_stop) & (block_hi > text_start)
        if has_txt:
            is_txt = row_ok & (offs_m >= text_start) & (offs_m < text_stop)
            if HAS_INDEX:
                # TEXT_INV[t] = output row of text position text_start + t, or -1 when not selected.
                out_row = tl.load(TEXT_INV + (offs_m - text_start), mask=is_txt, other=-1)
            else:
                out_row = tl.where(is_txt, offs_m - text_start, -1)
            _capture_loop(T2I, stride_tb, stride_thg, stride_tr, out_row, out_row >= 0, N_img, False, Q, K, LSE2,
                          TEXT_INDEX, bias_row, off_b, group, H, N, offs_m, row_ok, text_start, t_full, stride_qb,
                          stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, qk_scale, scale, out_scale,
                          HEADS_MEAN, HEADS_PER_PROGRAM, HAS_INDEX, NORMALIZE, HEAD_DIM, BLOCK_D, ROW_ALIGN,
                          DOT_PRECISION, HAS_MASK, BLOCK_M, BLOCK_N)


@triton.jit
def _capture_loop(MAP, stride_b, stride_hg, stride_r, out_row, out_ok, n_cols, COLS_ARE_TEXT: tl.constexpr,
                  Q, K, LSE2, TEXT_INDEX, bias_row, off_b, group, H, N, offs_m, row_ok, text_start, t_full,
                  stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, qk_scale, scale, out_scale,
                  HEADS_MEAN: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr, HAS_INDEX: tl.constexpr,
                  NORMALIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One map of this program's query rows ``offs_m`` [BLOCK_M] (i2t or t2i: the two capture loops of the fused
    kernel are this one): for each block of its ``n_cols`` key columns (text columns, selected through
    TEXT_INDEX, when COLS_ARE_TEXT, else image columns) and each head of the group, the tile of ``head_map_tile``
    from the row's base-2 lse in LSE2 ``[B, H, N]``, stored at ``MAP[b, head or group, out_row, column]`` for the
    rows with ``out_ok`` (strides ``stride_b``, ``stride_hg``, ``stride_r``; unit column stride), or summed over the
    group's heads (HEADS_MEAN, times ``out_scale``)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_c in range(0, n_cols, BLOCK_N):
        col = start_c + offs_n  # map column  [BLOCK_N]
        col_ok = col < n_cols
        if COLS_ARE_TEXT:
            kpos = text_positions(col, col_ok, text_start, TEXT_INDEX, HAS_INDEX)
        else:
            kpos = image_to_position(col, text_start, t_full)
        if HAS_MASK:
            col_bias = key_bias(bias_row, kpos, col_ok, True)  # the columns' key bias  [BLOCK_N]
        else:
            col_bias = kpos  # never read
        tile_sum = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for hh in range(HEADS_PER_PROGRAM):
            off_h = (group * HEADS_PER_PROGRAM + hh).to(tl.int64)
            tile = head_map_tile(Q + head_offset(off_b, off_h, stride_qb, stride_qh, ROW_ALIGN),
                                 K + head_offset(off_b, off_h, stride_kb, stride_kh, ROW_ALIGN),
                                 LSE2 + (off_b * H + off_h) * N, offs_m, row_ok, kpos, col_ok, stride_qn, stride_kn,
                                 1.0, qk_scale, scale, col_bias, NORMALIZE, HEAD_DIM, BLOCK_D, ROW_ALIGN, DOT_PRECISION,
                                 HAS_MASK)  # [BLOCK_M, BLOCK_N]
            if HEADS_MEAN:
                tile_sum += tile
            else:
                store_map(MAP + off_b * stride_b + off_h * stride_hg, tile, out_row, out_ok, col, col_ok, stride_r)
        if HEADS_MEAN:
            store_map(MAP + off_b * stride_b + group.to(tl.int64) * stride_hg, tile_sum * out_scale, out_row, out_ok,
                      col, col_ok, stride_r)


# --------------------------------------------------------------------------------------------------------
# Launch wrapper
# --------------------------------------------------------------------------------------------------------
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
    normalize: str = "joint",
    key_bias: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    i2t: Optional[torch.Tensor] = None,
    t2i: Optional[torch.Tensor] = None,
    groups: Optional[int] = None,
    tma: Optional[bool] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Joint attention over ``[B, H, N, D]`` q/k/v (any strides, unit stride in the last dim) and, in the
    same launch, the text-image maps.

    Returns ``(out, i2t [B, (H,) N_img, T] or None, t2i [B, (H,) T, N_img] or None)``: ``out`` with the
    strides of ``torch.empty_like(q)``, maps contiguous in ``map_dtype``. ``normalize``: ``"joint"`` (P over
    all N keys) or ``"logits"`` (scaled scores); ``"text"`` is served by the split kernels
    (``capture.capture_maps``). ``key_bias``: None or float32 ``[B, N]``, added to the scaled scores (``-inf`` = masked
    key: probability 0, map columns 0; a row with no unmasked key has out 0 and maps 0). ``out``/``i2t``/``t2i``
    buffers, when given (exact shape and dtype,
    contiguous maps), are written into. ``groups``: head groups of the mean (a divisor of H; default
    ``capture.head_groups``, or H for fp32 on the pointer path at D > 64: ``_one_head_per_program``).
    ``tma``: force/forbid the tensor-descriptor path (None: sm90+ when aligned).
    Inputs are assumed validated by the caller (seg4diff_fast.attention).
    """
    if normalize not in ("joint", "logits"):
        raise ValueError(f"the fused kernel takes normalize 'joint' or 'logits', got {normalize!r}; "
                         "'text' needs the split kernels (kernels.capture.capture_maps)")
    B, H, N, D = q.shape
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "unit stride in the head dim"
    device = q.device
    t_full = text_stop - text_start
    n_img = N - t_full
    T = t_full if text_index is None else int(text_index.numel())
    if out is None:
        out = torch.empty_like(q)
    if tma is None:
        tma = _tuning.use_tma(q, k, v, out)
    if tma and device.type == "cuda":
        _tuning.ensure_tma_allocator()

    capture = capture_i2t or capture_t2i
    if heads_mean and capture:
        if groups is not None:
            n_groups = groups
        elif _one_head_per_program(q.element_size(), tma, D):
            n_groups = H
        else:
            n_groups = head_groups(H, triton.cdiv(N, 128) * B)
        if H % n_groups:
            raise ValueError(f"groups={n_groups} must divide the number of heads H={H}")
    else:
        n_groups = H
    partial = heads_mean and n_groups > 1
    lead = (B,) if heads_mean else (B, H)

    def buffers(shape, given, wanted):
        """(kernel target, returned map): fp32 partials [G, *shape] for a mean over several groups."""
        if not wanted:
            return None, None
        final = given if given is not None else torch.empty(shape, dtype=map_dtype, device=device)
        if partial:
            return torch.empty((n_groups,) + shape, dtype=torch.float32, device=device), final
        return final, final

    i2t_k, i2t_out = buffers(lead + (n_img, T), i2t, capture_i2t)
    t2i_k, t2i_out = buffers(lead + (T, n_img), t2i, capture_t2i)

    def map_strides(t):
        """(batch, head-or-group, row) strides of a map target; the column stride is 1."""
        if t is None:
            return 0, 0, 0
        if partial:  # [G, B, rows, cols]
            return t.stride(1), t.stride(0), t.stride(2)
        if heads_mean:  # [B, rows, cols]
            return t.stride(0), 0, t.stride(1)
        return t.stride(0), t.stride(1), t.stride(2)

    has_index = text_index is not None
    if has_index:
        text_index32 = text_index.to(device=device, dtype=torch.int32)
        # inverse map: text position (relative to text_start) -> output row j, -1 when not selected  [T_full]
        text_inv = torch.full((t_full,), -1, dtype=torch.int32, device=device)
        text_inv[text_index32.long()] = torch.arange(T, dtype=torch.int32, device=device)
    else:
        text_index32 = text_inv = out  # never read (HAS_INDEX=False)
    lse2 = torch.empty((B, H, N), dtype=torch.float32, device=device)  # scratch: base-2 lse of each row
    dot_precision = _tuning.dot_precision(q.dtype)  # fp32: tf32x3 (fp32-level accuracy on the tensor cores)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]), B * n_groups)

    bias32, stride_mb = _tuning.key_bias_args(key_bias)
    _joint_attention_fwd_kernel[grid](
        q, k, v, out, lse2,
        i2t_k if i2t_k is not None else lse2, t2i_k if t2i_k is not None else lse2,
        text_index32, text_inv, bias32,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *map_strides(i2t_k), *map_strides(t2i_k),
        stride_mb,
        H, N, text_start, text_stop, n_img, T,
        float(scale) * LOG2E, float(scale), 1.0 / H if heads_mean else 1.0,
        CAPTURE_I2T=bool(capture_i2t), CAPTURE_T2I=bool(capture_t2i), HEADS_MEAN=bool(heads_mean),
        HEADS_PER_PROGRAM=H // n_groups, HAS_INDEX=has_index, NORMALIZE=normalize,
        HEAD_DIM=D, BLOCK_D=_tuning.block_d(D), ROW_ALIGN=_tuning.row_align(q, k, v, out), USE_TMA=bool(tma),
        DOT_PRECISION=dot_precision, HAS_MASK=key_bias is not None,
    )

    for target, final in ((i2t_k, i2t_out), (t2i_k, t2i_out)):
        if target is not None and target is not final:
            total = target[0].clone()
            for g in range(1, n_groups):  # fixed order: the same bits on every run
                total += target[g]
            final.copy_(total)
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
    """Every GPU config of the fused kernel as a launch on ``target`` compiles it: SD3-medium at 1024^2,
    contiguous ``[1, 24, 4250, head_dim]``, text at ``[4096, 4250)``; tensor descriptors on sm90a / sm100a.
    "i2t-mean" selects the 77 CLIP columns and sums 4 heads per program (6 groups, fp32 partials);
    "both-all" writes both maps per head. ``selectable``: this file's prune with the target's shared memory."""
    from . import _aot

    tgt = _aot.check_target(target)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return []
    capture_i2t, capture_t2i, heads_mean, has_index = _aot.parse_capture(capture)
    B, H, N, D, text_start, text_stop, n_img, T = _aot.sd3_launch(head_dim, has_index)
    tma = tgt.arch >= 90
    hpp = 4 if heads_mean and not _one_head_per_program(dtype.itemsize, tma, head_dim) else 1
    ptr = _aot.DevicePointer(dtype)
    lse = _aot.DevicePointer(torch.float32)
    maps = _aot.DevicePointer(torch.float32 if heads_mean else torch.float16)
    index = _aot.DevicePointer(torch.int32) if has_index else ptr
    sb, sh, sn, _ = _aot.contiguous_strides((B, H, N, D))
    lead = (H // hpp, B) if heads_mean else (B, H)  # mean: fp32 partials [G, B, rows, cols]

    def map_strides(rows, cols):
        st = _aot.contiguous_strides(lead + (rows, cols))
        return (st[1], st[0], st[2]) if heads_mean else (st[0], st[1], st[2])

    ib, ihg, ir = map_strides(n_img, T)
    tb, thg, tr = map_strides(T, n_img)
    args = dict(Q=ptr, K=ptr, V=ptr, OUT=ptr, LSE2=lse, I2T=maps if capture_i2t else lse,
                T2I=maps if capture_t2i else lse, TEXT_INDEX=index, TEXT_INV=index, KEY_BIAS=None, stride_mb=None,
                stride_qb=sb, stride_qh=sh, stride_qn=sn, stride_kb=sb, stride_kh=sh, stride_kn=sn,
                stride_vb=sb, stride_vh=sh, stride_vn=sn, stride_ob=sb, stride_oh=sh, stride_on=sn,
                stride_ib=ib, stride_ihg=ihg, stride_ir=ir, stride_tb=tb, stride_thg=thg, stride_tr=tr,
                H=H, N=N, text_start=text_start, text_stop=text_stop, N_img=n_img, T=T,
                qk_scale=D ** -0.5 * LOG2E, scale=D ** -0.5, out_scale=1.0 / H if heads_mean else 1.0,
                CAPTURE_I2T=capture_i2t, CAPTURE_T2I=capture_t2i, HEADS_MEAN=heads_mean, HEADS_PER_PROGRAM=hpp,
                HAS_INDEX=has_index, NORMALIZE="joint", HEAD_DIM=D, BLOCK_D=_tuning.block_d(D),
                ROW_ALIGN=_tuning.strides_row_align(sb, sh, sn), USE_TMA=tma,
                DOT_PRECISION=_tuning.dot_precision(dtype), HAS_MASK=False)
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
               for bm, bn, w, s in _all_gpu_configs()]
    kept = _prune_configs(configs, {"N": N, "Q": ptr}, max_shared_memory=tgt.max_shared_memory, arch=tgt.arch, HEAD_DIM=D,
                          USE_TMA=tma, CAPTURE_I2T=capture_i2t, CAPTURE_T2I=capture_t2i)
    shape = f"[{B}, {H}, {N}, {D}] text [{text_start}, {text_stop}) T={T}" + (" TMA" if tma else "")
    return [_aot.launch_variant("joint_attention", _joint_attention_fwd_kernel, dict(args, **c.kwargs),
                                num_warps=c.num_warps, num_stages=c.num_stages, block_m=c.kwargs["BLOCK_M"],
                                block_n=c.kwargs["BLOCK_N"], selectable=c in kept, shape=shape)
            for c in configs]
