"""Backward of the joint-normalised text-image maps: gradients w.r.t. q and k, flash-style (no N x N).

For one (b, h), with S = q k^T * scale ``[N, N]`` (never stored), P = softmax(S) over all N keys and
lse_i = log sum_l exp(S_il), a captured map entry is M_ik = P_ik = exp(S_ik - lse_i). Given G, the gradient of
the loss w.r.t. the captured entries (scattered onto ``[N, N]`` positions, 0 off the captured blocks):

    dL/dS_il = sum_k G_ik dP_ik/dS_il = sum_k G_ik P_ik (delta_kl - P_il) = P_il (G_il - c_i),
    c_i      = sum_k G_ik P_ik                                       (over row i's captured columns)

so every key of a captured row gets a gradient (through the lse), not only the captured columns. Rows of
i2t are image queries and rows of t2i text queries: disjoint, so each row has one c. Then

    dq_i = scale * sum_l dS_il k_l          dk_l = scale * sum_i dS_il q_i

Two launches, like FlashAttention-2's backward split by the reduction axis:

  1. ``_maps_bwd_dq_kernel``, one program per (query block, b*H + h), only for blocks that hold map rows:
     one online pass over all keys gives the row's lse and c together (c accumulates sum G 2^(s - m) with
     the same rescaling as the normaliser l, then c = c / l); a second pass gives dq. Stores lse, c, dq.
  2. ``_maps_bwd_dk_kernel``, one program per (key block, b*H + h): loops over the query blocks that hold
     map rows (their ranges computed before the loop, ``_map_row_blocks``, so that its loads pipeline),
     recomputes P from q, k and the stored lse, and accumulates dk.

Both recompute dS = P (G - c) with one helper (``_ds_tile``). The head dim is a compile-time constant
(``HEAD_DIM``, padded to ``BLOCK_D``; rows through ``_tiles.load_rows``), so D = 72 loads pipeline too.

Key bias (optional fp32 ``[B, N]``, ``HAS_MASK``): added to S before the softmax (a constant: the formulas above
hold with the biased S); P_il = 0 for masked keys l (bias ``-inf``), so dS_il = 0 there; a row with no unmasked
key has lse ``+inf``, c = 0 and dS = 0 (its maps are the constant 0).

Heads mean: the gradient of each head's map is G / H (grad maps read with head stride 0). Text columns
selected by ``text_index`` (unique) are found through its inverse ``TEXT_INV`` (text position -> map column,
-1 when not kept). Everything is computed in float32 (log2 domain, log2(e) folded into the scale); q, k are
read with any strides. This file knows tensors, strides and blocks, nothing about models.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _tuning
from ._tiles import biased_scores2, head_offset, key_bias, load_rows, store_rows

__all__ = ["joint_maps_backward"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634


def _configs() -> List[triton.Config]:
    # The interpreter runs one program at a time: one small config. On a GPU a short list around the
    # forward's tiles; every launch overwrites its outputs, so autotuning needs no reset.
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
        for bm, bn, w, st in [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2),
                              (16, 16, 8, 2)]  # the last: fp32 inputs at D > 64 (_NO_SPILL)
    ]


# The tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) with no register spill in either kernel, per (input element
# size, BLOCK_D) (compile report, Triton 3.9, sm90a; fp32 inputs take tf32x3 dots: two halves of each operand).
_NO_SPILL = {
    (2, 64): [(64, 32, 4, 2)],  # dq: 64 x 64 and 128 x 64 spill 40 B on sm80, 32 x 32 4 B on sm90a
    (2, 128): [(32, 32, 4, 2)],  # dq at D = 72: 64 x 32 4 B with both maps, 64 x 64 36 B, 128 x 64 440 B
    (4, 64): [(16, 16, 8, 2)],  # dq 64 x 32: 260-644 B on sm80, 32 x 32: 12 B on sm90a; dk 64 x 64: 64 B
    (4, 128): [(16, 16, 8, 2)],  # 32 x 32: 512-676 B with both maps; 16 x 32: dk 8 B; 16 x 16 x 4 warps: dq 4 B
}


def _prune(configs, named_args, **kwargs):
    """Drop tiles larger than the sequence (padding only), 128-row tiles at d = 256 (register spills) and the
    tiles that spill for this input dtype and BLOCK_D (``_NO_SPILL``); keep at least the smallest."""
    n = named_args["N"]
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    no_spill = _NO_SPILL.get((named_args["Q"].element_size(), block_d))
    cap = max(32, triton.next_power_of_2(n))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap and c.kwargs["BLOCK_N"] <= cap
            and not (block_d >= 256 and c.kwargs["BLOCK_M"] > 64)
            and (no_spill is None or (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in no_spill)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


@triton.jit
def _has_map_rows(lo, hi, text_start, text_stop, N, CAPTURE_I2T: tl.constexpr, CAPTURE_T2I: tl.constexpr):
    """Whether query positions [lo, hi) hold rows of a captured map (image rows for i2t, text rows for t2i)."""
    has = lo < 0  # False
    if CAPTURE_I2T:
        has = has | (lo < text_start) | ((hi > text_stop) & (text_stop < N))
    if CAPTURE_T2I:
        has = has | ((lo < text_stop) & (hi > text_start))
    return has


@triton.jit
def _grad_tile(gi_base, gt_base, TEXT_INV, rows, cols, mask_rows, mask_cols, text_start, text_stop, N_img, T,
               CAPTURE_I2T: tl.constexpr, CAPTURE_T2I: tl.constexpr, HAS_INDEX: tl.constexpr):
    """G at query positions ``rows`` [BLOCK_M] x key positions ``cols`` [BLOCK_N]: the incoming gradient of the
    captured map entry there, 0 where no map covers (row, col). fp32 ``[BLOCK_M, BLOCK_N]``."""
    t_full = text_stop - text_start
    row_txt = mask_rows & (rows >= text_start) & (rows < text_stop)
    col_txt = mask_cols & (cols >= text_start) & (cols < text_stop)
    row_img = mask_rows & ((rows < text_start) | (rows >= text_stop))
    col_img = mask_cols & ((cols < text_start) | (cols >= text_stop))
    g = tl.zeros([rows.shape[0], cols.shape[0]], dtype=tl.float32)
    if CAPTURE_I2T:  # image query rows x kept text key columns: G_i2t[img_row, map column]
        img_row = tl.where(rows < text_start, rows, rows - t_full)
        if HAS_INDEX:
            j = tl.load(TEXT_INV + (cols - text_start), mask=col_txt, other=-1)
        else:
            j = tl.where(col_txt, cols - text_start, -1)
        m = row_img[:, None] & (j >= 0)[None, :]
        g += tl.load(gi_base + img_row[:, None] * T + j[None, :], mask=m, other=0.0)
    if CAPTURE_T2I:  # kept text query rows x image key columns: G_t2i[map row, img_col]
        if HAS_INDEX:
            j = tl.load(TEXT_INV + (rows - text_start), mask=row_txt, other=-1)
        else:
            j = tl.where(row_txt, rows - text_start, -1)
        img_col = tl.where(cols < text_start, cols, cols - t_full)
        m = (j >= 0)[:, None] & col_img[None, :]
        g += tl.load(gt_base + j[:, None] * N_img + img_col[None, :], mask=m, other=0.0)
    return g


@triton.jit
def _map_row_blocks(text_start, text_stop, N, BLOCK_M: tl.constexpr, CAPTURE_I2T: tl.constexpr,
                    CAPTURE_T2I: tl.constexpr):
    """The query blocks (of BLOCK_M rows) that hold rows of a captured map, exactly those ``_has_map_rows`` accepts,
    as two ranges of whole blocks: ``(lo1, n1, lo2, n2)``, block ``b < n1`` starts at ``lo1 + b * BLOCK_M``, block
    ``n1 + b`` at ``lo2 + b * BLOCK_M``. Image rows are ``[0, text_start)`` and ``[text_stop, N)`` (both ranges for
    i2t; one block holding both ends is counted once), text rows ``[text_start, text_stop)`` (t2i); both maps
    cover every row. Computed before the dk loop, so that the loop carries no branch around its loads (which
    stopped cp.async / TMA pipelining)."""
    if CAPTURE_I2T and CAPTURE_T2I:
        lo1 = text_start * 0
        n1 = tl.cdiv(N, BLOCK_M)
        lo2 = N
        n2 = n1 * 0
    elif CAPTURE_I2T:
        lo1 = text_start * 0
        n1 = tl.cdiv(text_start, BLOCK_M)
        lo2 = tl.where(text_stop < N, tl.maximum((text_stop // BLOCK_M) * BLOCK_M, n1 * BLOCK_M), N)
        n2 = tl.cdiv(N - lo2, BLOCK_M)
    else:
        lo1 = (text_start // BLOCK_M) * BLOCK_M
        n1 = tl.where(text_stop > text_start, tl.cdiv(text_stop - lo1, BLOCK_M), 0)
        lo2 = N
        n2 = n1 * 0
    return lo1, n1, lo2, n2


@triton.autotune(configs=_configs(), key=["N", "HEAD_DIM", "CAPTURE_I2T", "CAPTURE_T2I", "HEADS_MEAN", "HAS_MASK"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _maps_bwd_dq_kernel(
    Q, K, G_I2T, G_T2I, TEXT_INV, DQ, LSE, C, KEY_BIAS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_gb, stride_gh,  # of the contiguous grad maps [B, (H,) ., .]; stride_gh = 0 with heads mean
    stride_mb,  # key bias [B, N] fp32: batch stride (unit stride along N); KEY_BIAS, stride_mb None without one
    H, N, text_start, text_stop, N_img, T,
    qk_scale,  # softmax scale * log2(e)
    sm_scale,  # softmax scale
    g_scale,  # 1 / H for heads mean, else 1
    CAPTURE_I2T: tl.constexpr, CAPTURE_T2I: tl.constexpr, HEADS_MEAN: tl.constexpr, HAS_INDEX: tl.constexpr,
    HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    lo = start_m * BLOCK_M
    if _has_map_rows(lo, lo + BLOCK_M, text_start, text_stop, N, CAPTURE_I2T, CAPTURE_T2I):
        q_base = Q + head_offset(off_b, off_h, stride_qb, stride_qh, ROW_ALIGN)
        k_base = K + head_offset(off_b, off_h, stride_kb, stride_kh, ROW_ALIGN)
        gi_base = G_I2T + off_b * stride_gb + off_h * stride_gh
        gt_base = G_T2I + off_b * stride_gb + off_h * stride_gh
        if HAS_MASK:
            bias_row = KEY_BIAS + off_b * stride_mb  # this sample's fp32 key bias  [N]
        else:
            bias_row = KEY_BIAS  # None: never read
        rows = lo + tl.arange(0, BLOCK_M)  # query positions  [BLOCK_M]
        offs_n = tl.arange(0, BLOCK_N)
        mask_m = rows < N
        q = load_rows(q_base, rows, mask_m, stride_qn, HEAD_DIM, BLOCK_D, True, ROW_ALIGN)  # [BLOCK_M, BLOCK_D]

        # ---- pass 1: lse and c together (log2 domain) -------------------------------------------------
        # m_new = max(m, rowmax(s2)); alpha = 2^(m - m_new); p~ = 2^(s2 - m_new)
        # l <- l alpha + sum p~;   cl <- cl alpha + sum G p~;   finally lse2 = m + log2 l, c = cl / l.
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        cl_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start_n in range(0, N, BLOCK_N):
            cols = start_n + offs_n
            mask_n = cols < N
            k = load_rows(k_base, cols, mask_n, stride_kn, HEAD_DIM, BLOCK_D, True, ROW_ALIGN)  # [BLOCK_N, BLOCK_D]
            if HAS_MASK:
                bias = key_bias(bias_row, cols, mask_n, True)  # [BLOCK_N]; columns >= N are -inf (masked)
                s = biased_scores2(tl.dot(q, k.T, input_precision=DOT_PRECISION), qk_scale, bias)
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # every key so far masked: no -inf - -inf
                alpha = tl.math.exp2(m_i - m_use)
                p = tl.math.exp2(s - m_use[:, None])
            else:
                s = tl.dot(q, k.T, input_precision=DOT_PRECISION) * qk_scale
                s = tl.where(mask_n[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.math.exp2(m_i - m_new)
                p = tl.math.exp2(s - m_new[:, None])
            g = _grad_tile(gi_base, gt_base, TEXT_INV, rows, cols, mask_m, mask_n, text_start, text_stop, N_img, T,
                           CAPTURE_I2T, CAPTURE_T2I, HAS_INDEX)
            l_i = l_i * alpha + tl.sum(p, 1)
            cl_i = cl_i * alpha + tl.sum(p * g, 1)
            m_i = m_new
        if HAS_MASK:  # a row with no valid key (l = 0): lse +inf and c = 0, so its dS is 0
            empty = l_i == 0.0
            lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_i))
            c = tl.where(empty, 0.0, cl_i / l_i) * g_scale
        else:
            lse = m_i + tl.math.log2(l_i)  # [BLOCK_M]
            c = cl_i / l_i * g_scale  # c_i = sum_k G_ik P_ik, with G the per-head gradient  [BLOCK_M]

        # ---- pass 2: dq = scale * sum_l P_il (G_il - c_i) k_l -------------------------------------------
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, N, BLOCK_N):
            cols = start_n + offs_n
            mask_n = cols < N
            k = load_rows(k_base, cols, mask_n, stride_kn, HEAD_DIM, BLOCK_D, True, ROW_ALIGN)
            ds = _ds_tile(q, k, lse, c, qk_scale, g_scale, bias_row, gi_base, gt_base, TEXT_INV, rows, cols, mask_m,
                          mask_n, text_start, text_stop, N_img, T, CAPTURE_I2T, CAPTURE_T2I, HAS_INDEX, HAS_MASK,
                          True, DOT_PRECISION)
            dq = tl.dot(ds.to(q.dtype), k, dq, input_precision=DOT_PRECISION)

        out_off = off_bh.to(tl.int64) * N
        tl.store(LSE + out_off + rows, lse, mask=mask_m)
        tl.store(C + out_off + rows, c, mask=mask_m)
        store_rows(DQ + out_off * HEAD_DIM, dq * sm_scale, rows, mask_m, HEAD_DIM, HEAD_DIM, BLOCK_D, True, 1)


@triton.jit
def _ds_tile(q, k, lse, c, qk_scale, g_scale, bias_row, gi_base, gt_base, TEXT_INV, rows, cols, mask_m, mask_n,
             text_start, text_stop, N_img, T, CAPTURE_I2T: tl.constexpr, CAPTURE_T2I: tl.constexpr,
             HAS_INDEX: tl.constexpr, HAS_MASK: tl.constexpr, MASK_COLS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dS = P (G - c) [R, C] of query rows ``q`` [R, BLOCK_D] (positions ``rows``) x key columns ``k`` [C, BLOCK_D]
    (positions ``cols``), the score recompute both backward kernels share: P = 2^(s * qk_scale (+ bias) - lse)
    from the rows' base-2 ``lse`` [R], 0 in masked columns and, with HAS_MASK or MASK_COLS, in columns >= N
    (``mask_n`` False; without, their k rows are 0: P there is finite, but not 0); ``c`` [R] already scaled by
    g_scale."""
    s = tl.dot(q, k.T, input_precision=DOT_PRECISION)
    if HAS_MASK:  # masked keys (bias -inf) and columns >= N: P = 0 (rows with no unmasked key have lse +inf)
        bias = key_bias(bias_row, cols, mask_n, True)
        p = tl.where((bias == float("-inf"))[None, :], 0.0, tl.math.exp2(biased_scores2(s, qk_scale, bias) -
                                                                          lse[:, None]))
    elif MASK_COLS:
        p = tl.where(mask_n[None, :], tl.math.exp2(s * qk_scale - lse[:, None]), 0.0)
    else:
        p = tl.math.exp2(s * qk_scale - lse[:, None])
    g = _grad_tile(gi_base, gt_base, TEXT_INV, rows, cols, mask_m, mask_n, text_start, text_stop, N_img, T,
                   CAPTURE_I2T, CAPTURE_T2I, HAS_INDEX)
    return p * (g * g_scale - c[:, None])


@triton.autotune(configs=_configs(), key=["N", "HEAD_DIM", "CAPTURE_I2T", "CAPTURE_T2I", "HEADS_MEAN", "HAS_MASK"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _maps_bwd_dk_kernel(
    Q, K, G_I2T, G_T2I, TEXT_INV, DK, LSE, C, KEY_BIAS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_gb, stride_gh,  # of the contiguous grad maps [B, (H,) ., .]; stride_gh = 0 with heads mean
    stride_mb,  # key bias [B, N] fp32: batch stride (unit stride along N); KEY_BIAS, stride_mb None without one
    H, N, text_start, text_stop, N_img, T,
    qk_scale, sm_scale, g_scale,
    CAPTURE_I2T: tl.constexpr, CAPTURE_T2I: tl.constexpr, HEADS_MEAN: tl.constexpr, HAS_INDEX: tl.constexpr,
    HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    q_base = Q + head_offset(off_b, off_h, stride_qb, stride_qh, ROW_ALIGN)
    k_base = K + head_offset(off_b, off_h, stride_kb, stride_kh, ROW_ALIGN)
    gi_base = G_I2T + off_b * stride_gb + off_h * stride_gh
    gt_base = G_T2I + off_b * stride_gb + off_h * stride_gh
    if HAS_MASK:
        bias_row = KEY_BIAS + off_b * stride_mb  # this sample's fp32 key bias  [N]
    else:
        bias_row = KEY_BIAS  # None: never read
    row_off = off_bh.to(tl.int64) * N  # into LSE and C  [B * H, N]

    cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)  # key positions of this program  [BLOCK_N]
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = cols < N
    k = load_rows(k_base, cols, mask_n, stride_kn, HEAD_DIM, BLOCK_D, True, ROW_ALIGN)  # [BLOCK_N, BLOCK_D]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Only the query blocks that hold map rows, the ones the dq kernel wrote lse and c for: one loop over their
    # (at most two) ranges, bounds computed here, so that the loop's loads pipeline.
    lo1, n1, lo2, n2 = _map_row_blocks(text_start, text_stop, N, BLOCK_M, CAPTURE_I2T, CAPTURE_T2I)
    for blk in range(0, n1 + n2):
        lo = tl.where(blk < n1, lo1 + blk * BLOCK_M, lo2 + (blk - n1) * BLOCK_M)
        rows = lo + offs_m
        mask_m = rows < N
        q = load_rows(q_base, rows, mask_m, stride_qn, HEAD_DIM, BLOCK_D, True, ROW_ALIGN)  # [BLOCK_M, BLOCK_D]
        if Q.dtype.element_ty == tl.float32:
            # tf32x3 dots want fp32 q in two shared-memory layouts (A operand of S, B operand of dK): a tile with
            # both uses is not pipelined (compile report: a synchronous loop on every target); one load per use is.
            q_b = load_rows(q_base, rows, mask_m, stride_qn, HEAD_DIM, BLOCK_D, True, ROW_ALIGN, ".ca")
        else:
            q_b = q
        lse = tl.load(LSE + row_off + rows, mask=mask_m, other=0.0)
        c = tl.load(C + row_off + rows, mask=mask_m, other=0.0)
        # padded rows: q = 0, so their (finite) dS adds nothing; padded columns are never stored
        ds = _ds_tile(q, k, lse, c, qk_scale, g_scale, bias_row, gi_base, gt_base, TEXT_INV, rows, cols, mask_m,
                      mask_n, text_start, text_stop, N_img, T, CAPTURE_I2T, CAPTURE_T2I, HAS_INDEX, HAS_MASK,
                      False, DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q_b, dk, input_precision=DOT_PRECISION)
    store_rows(DK + row_off * HEAD_DIM, dk * sm_scale, cols, mask_n, HEAD_DIM, HEAD_DIM, BLOCK_D, True, 1)


def joint_maps_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    grad_i2t: Optional[torch.Tensor],
    grad_t2i: Optional[torch.Tensor],
    text_start: int,
    text_stop: int,
    *,
    heads_mean: bool,
    text_index: Optional[torch.Tensor],
    scale: float,
    key_bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. q and k of the joint-normalised maps, given the maps' incoming gradients.

    Args:
        q, k: ``[B, H, N, D]`` (float16/bfloat16/float32, unit stride in the last dim).
        grad_i2t: None or ``[B, (H,) N_img, T]`` (the head axis absent with ``heads_mean``), any float dtype.
        grad_t2i: None or ``[B, (H,) T, N_img]``.
        text_start, text_stop: the text block ``[text_start, text_stop)`` of the sequence.
        heads_mean: whether the maps were averaged over heads.
        text_index: None or the UNIQUE kept text positions ``[T]`` inside the text block.
        scale: softmax scale.
        key_bias: None or float32 ``[B, N]`` (the forward's key bias, ``-inf`` = masked).

    Returns ``(dq, dk)``: float32 ``[B, H, N, D]``, contiguous. Inputs are assumed validated by the caller.
    """
    B, H, N, D = q.shape
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "unit stride in the head dim"
    device = q.device
    t_full = text_stop - text_start
    n_img = N - t_full
    T = t_full if text_index is None else int(text_index.numel())
    dq = torch.zeros(B, H, N, D, dtype=torch.float32, device=device)  # rows of no map keep 0
    dk = torch.empty(B, H, N, D, dtype=torch.float32, device=device)
    if grad_i2t is None and grad_t2i is None:
        return dq, dk.zero_()
    lse = torch.zeros(B, H, N, dtype=torch.float32, device=device)
    c = torch.zeros(B, H, N, dtype=torch.float32, device=device)
    # fp32 contiguous copies of the map gradients (O(N_img * T)): plain offsets, no bf16 loads.
    g_i2t = grad_i2t.float().contiguous() if grad_i2t is not None else dq
    g_t2i = grad_t2i.float().contiguous() if grad_t2i is not None else dq
    has_index = text_index is not None
    if has_index:
        text_inv = torch.full((t_full,), -1, dtype=torch.int32, device=device)
        text_inv[text_index.long()] = torch.arange(T, dtype=torch.int32, device=device)
    else:
        text_inv = lse  # never read (HAS_INDEX=False)
    block_d = max(16, triton.next_power_of_2(D))
    dot_precision = _tuning.dot_precision(q.dtype)  # fp32: tf32x3 (fp32-level accuracy on the tensor cores)
    # Both grad maps hold N_img * T entries per (b, h); with heads mean one map serves every head.
    stride_gh = 0 if heads_mean else n_img * T
    stride_gb = n_img * T * (1 if heads_mean else H)
    # fp32 [B, N] key bias and its batch stride; None, None without one (not kernel parameters then).
    bias32, stride_mb = _tuning.key_bias_args(key_bias)
    args = (
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), stride_gb, stride_gh,
        stride_mb, H, N, text_start, text_stop, n_img, T, float(scale) * _LOG2E, float(scale),
        1.0 / H if heads_mean else 1.0,
    )
    meta = dict(
        CAPTURE_I2T=grad_i2t is not None, CAPTURE_T2I=grad_t2i is not None, HEADS_MEAN=bool(heads_mean),
        HAS_INDEX=has_index, HAS_MASK=key_bias is not None, HEAD_DIM=D, BLOCK_D=block_d,
        ROW_ALIGN=_tuning.row_align(q, k), DOT_PRECISION=dot_precision,
    )
    _maps_bwd_dq_kernel[lambda m: (triton.cdiv(N, m["BLOCK_M"]), B * H)](
        q, k, g_i2t, g_t2i, text_inv, dq, lse, c, bias32, *args, **meta)
    _maps_bwd_dk_kernel[lambda m: (triton.cdiv(N, m["BLOCK_N"]), B * H)](
        q, k, g_i2t, g_t2i, text_inv, dk, lse, c, bias32, *args, **meta)
    return dq, dk


# --------------------------------------------------------------------------------------------------------
# Ahead-of-time variants for the compile report (seg4diff_fast.compile_report; interface in kernels/_aot.py).
# --------------------------------------------------------------------------------------------------------
def aot_variants(target: str, dtype: torch.dtype, head_dim: int, capture: str):
    """Every GPU config of both backward kernels (``maps_bwd_dq``, ``maps_bwd_dk``) as a launch of
    ``joint_maps_backward`` on ``target`` compiles it: SD3-medium at 1024^2, contiguous ``[1, 24, 4250,
    head_dim]`` q and k, text at ``[4096, 4250)``; pointer loads on every target (no tensor descriptors).

    The capture mode names the maps whose gradients flow back: ``"i2t-mean"``: the head-mean i2t map over the
    77 selected CLIP columns (one ``[B, N_img, 77]`` gradient read by every head); ``"both-all"``: both maps
    per head, every text column; ``"none"``: no map, no backward launch (no variant). ``selectable``: this
    file's prune."""
    from . import _aot

    _aot.check_target(target)
    if capture == "none" or dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return []
    capture_i2t, capture_t2i, heads_mean, has_index = _aot.parse_capture(capture)
    B, H, N, D, text_start, text_stop, n_img, T = _aot.sd3_launch(head_dim, has_index)
    ptr = _aot.DevicePointer(dtype)
    f32 = _aot.DevicePointer(torch.float32)  # grad maps (fp32 copies), dq / dk, lse, c
    sb, sh, sn, _ = _aot.contiguous_strides((B, H, N, D))
    block_d = max(16, triton.next_power_of_2(D))
    # as in joint_maps_backward: contiguous grad maps [B, (H,) rows, cols]; head stride 0 for the mean
    stride_gh = 0 if heads_mean else n_img * T
    stride_gb = n_img * T * (1 if heads_mean else H)
    args = dict(Q=ptr, K=ptr, G_I2T=f32, G_T2I=f32, TEXT_INV=_aot.DevicePointer(torch.int32) if has_index else f32,
                LSE=f32, C=f32, KEY_BIAS=None,
                stride_mb=None, stride_qb=sb, stride_qh=sh, stride_qn=sn, stride_kb=sb, stride_kh=sh, stride_kn=sn,
                stride_gb=stride_gb, stride_gh=stride_gh, H=H, N=N, text_start=text_start,
                text_stop=text_stop, N_img=n_img, T=T, qk_scale=D ** -0.5 * _LOG2E, sm_scale=D ** -0.5,
                g_scale=1.0 / H if heads_mean else 1.0, CAPTURE_I2T=capture_i2t, CAPTURE_T2I=capture_t2i,
                HEADS_MEAN=heads_mean, HAS_INDEX=has_index, HAS_MASK=False,
                HEAD_DIM=D, BLOCK_D=block_d, ROW_ALIGN=_tuning.strides_row_align(sb, sh, sn),
                DOT_PRECISION=_tuning.dot_precision(dtype))
    configs = _configs()  # the GPU list: compile-report workers run without TRITON_INTERPRET
    kept = _prune(configs, {"N": N, "Q": ptr}, BLOCK_D=block_d)
    shape = f"[{B}, {H}, {N}, {D}] text [{text_start}, {text_stop}) T={T}"
    return [_aot.launch_variant(name, kernel, dict(args, **{out: f32}, **c.kwargs), num_warps=c.num_warps,
                                num_stages=c.num_stages, block_m=c.kwargs["BLOCK_M"], block_n=c.kwargs["BLOCK_N"],
                                selectable=c in kept, shape=shape)
            for name, kernel, out in (("maps_bwd_dq", _maps_bwd_dq_kernel, "DQ"), ("maps_bwd_dk", _maps_bwd_dk_kernel, "DK"))
            for c in configs]
