"""Capture phase of the split path: the text-image maps from q, k and each row's log-sum-exp (one Triton
kernel family).

Given q, k ``[B, H, N, D]`` and lse ``[B, H, N]`` (from ``attention.py`` or torch's SDPA), only the needed
score blocks are recomputed, never the N x N matrix:

    i2t[b, (h,) i, j] = f(s[b, h, img_i, txt_j])      [B, (H,) N_img, T]   image queries x text keys
    t2i[b, (h,) j, i] = f(s[b, h, txt_j, img_i])      [B, (H,) T, N_img]   text queries x image keys

with ``s = q . k`` and ``txt_j = text_start + text_index[j]`` (or ``text_start + j``); image rows are every
position outside ``[text_start, text_stop)`` in sequence order. Normalisations ``f`` (compile-time):

- ``"joint"`` (default): ``exp(scale * s - lse)``, the model's own softmax over all N keys. Given no lse,
  ``_block_lse_kernel`` computes the captured rows' lse over all N keys first, in the capture kernel's own
  arithmetic: a row's largest score then cancels exactly against it. An lse from another kernel (SDPA's) rounds
  the scores differently, an error of about ``2^-24 * |lse|`` in every exponent (1e-2 at ``scale`` 1e4);
- ``"text"``: the softmax restricted to the captured block's columns: each i2t row over the (selected) text
  columns, each t2i row over the image columns. A first kernel (``_block_lse_kernel``) computes those rows'
  log-sum-exp (two-pass: the full row of the block is needed before any entry);
- ``"logits"``: ``scale * s``, the scaled scores.

Key bias (optional fp32 ``[B, N]``, ``HAS_MASK``): added to the scaled scores (``-inf`` = masked key), the
"text" normaliser included; "logits" maps are ``scale * s + bias``. Masked key columns of both maps are 0 in
every normalisation; the "joint" lse must come from attention with the same bias (``attention.py`` or SDPA;
``+inf`` for a row with no unmasked key, which makes its maps 0).

Grid of the capture kernel: (image blocks of BLOCK_I rows, text blocks of BLOCK_T columns, B x head groups),
so the t2i work is spread like the i2t work (no program holds all the text rows). Each program computes the
[BLOCK_I, BLOCK_T] i2t tile and the [BLOCK_T, BLOCK_I] t2i tile of its image x text block for the heads of
its group (``_maps_over_heads``: one loop over the heads for both maps, one per map for fp32 inputs; the loop
pipelines the next head's loads). ``heads_mean`` sums the group's heads in registers (fp32) and writes one fp32
partial per group; the wrapper adds the groups in a fixed order: the mean is deterministic (same bits run to run).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _tuning
from ._tiles import (LOG2E, block_lse2, head_map_tile, head_offset, image_to_position, key_bias, load_rows,
                     merge_lse2, store_map, text_positions)

__all__ = ["capture_maps", "NORMALIZE", "head_groups"]

NORMALIZE = ("joint", "text", "logits")

_GPU_CONFIGS = [  # (BLOCK_I, BLOCK_T, num_warps, num_stages); the first is the pinned config
    (64, 64, 4, 2),
    (128, 64, 8, 2),
    (64, 32, 4, 2),
]
# fp32 inputs (tf32x3 dots: two halves of every operand in registers) take only these, per BLOCK_D: the ones
# with no spill in both capture modes (compile report, Triton 3.9, sm90a; at BLOCK_D = 128 with both maps,
# 16 x 32 tiles spill 1,340 B with 4 warps, 1,148 B with 8).
_GPU_CONFIGS_FP32 = {
    64: [(32, 16, 4, 2)],
    128: [(16, 16, 8, 2)],
}
# Programs wanted per launch before heads are split into more groups (about 4 waves of 132 SMs).
_TARGET_PROGRAMS = 528


def _all_gpu_configs():
    """The autotune list: the 2-byte tiles, then the fp32-only ones (``_tuning.dtype_rule`` sorts them)."""
    fp32 = [t for tiles in _GPU_CONFIGS_FP32.values() for t in tiles if t not in _GPU_CONFIGS]
    return _GPU_CONFIGS + list(dict.fromkeys(fp32))


def _configs():
    gpu = [triton.Config({"BLOCK_I": bi, "BLOCK_T": bt}, num_warps=w, num_stages=s)
           for bi, bt, w, s in _all_gpu_configs()]
    interp = [triton.Config({"BLOCK_I": 32, "BLOCK_T": 16}, num_warps=4, num_stages=1)]
    return _tuning.config_list(gpu, interp)


def _prune(configs, named_args, **kwargs):
    """The tiles for this launch's input dtype (``_tuning.dtype_rule``); with both maps at BLOCK_D = 128, 2-byte
    inputs take 64 x 32 only (compile report, sm80: 64 x 64 spills 8 B, 128 x 64 12-56 B); at least the smallest
    is kept."""
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    elsize = named_args["Q"].element_size()
    both = all(kwargs.get(f, named_args.get(f, False)) for f in ("CAPTURE_I2T", "CAPTURE_T2I"))
    bd = _tuning.block_d(head_dim)

    def keep(c):
        tile = (c.kwargs["BLOCK_I"], c.kwargs["BLOCK_T"], c.num_warps, c.num_stages)
        if _tuning.dtype_rule(tile, elsize, bd, _GPU_CONFIGS, _GPU_CONFIGS_FP32):
            return False
        return not (both and elsize == 2 and bd == 128 and tile != (64, 32, 4, 2))

    kept = [c for c in configs if keep(c)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_I"] * c.kwargs["BLOCK_T"])]


@triton.autotune(configs=_configs(), key=["N_img", "T", "HEAD_DIM", "HEADS_PER_PROGRAM", "CAPTURE_I2T", "CAPTURE_T2I",
                                          "HEADS_MEAN", "NORMALIZE", "HAS_MASK"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _capture_kernel(
    Q, K, LSE, I2T, T2I, TEXT_INDEX, KEY_BIAS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_lb, stride_lh,
    stride_ib, stride_ihg, stride_ir,  # i2t: batch, head (heads "all") or group (mean partials), row
    stride_tb, stride_thg, stride_tr,  # t2i: same
    stride_mb,  # key bias [B, N] fp32: batch stride (unit stride along N); KEY_BIAS, stride_mb None without one
    H, text_start, t_full, N_img, T,
    qk_scale,  # scale * log2(e)
    scale,
    lse_mul,  # log2(e) for a natural-log lse, 1.0 for a base-2 lse
    out_scale,  # 1 / H for the head mean, else 1
    CAPTURE_I2T: tl.constexpr, CAPTURE_T2I: tl.constexpr, HEADS_MEAN: tl.constexpr,
    HEADS_PER_PROGRAM: tl.constexpr, HAS_INDEX: tl.constexpr, NORMALIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_MASK: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_bg = tl.program_id(2)
    n_groups = H // HEADS_PER_PROGRAM
    off_b = (pid_bg // n_groups).to(tl.int64)
    group = pid_bg % n_groups

    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)  # image rows  [BLOCK_I]
    i_ok = i < N_img
    img_pos = image_to_position(i, text_start, t_full)
    j = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # map text columns  [BLOCK_T]
    j_ok = j < T
    txt_pos = text_positions(j, j_ok, text_start, TEXT_INDEX, HAS_INDEX)
    if HAS_MASK:
        # Key bias of this block's text columns (i2t) and image columns (t2i); masked ones (-inf) are 0 in the maps.
        bias_row = KEY_BIAS + off_b * stride_mb
        txt_bias = key_bias(bias_row, txt_pos, j_ok, True)  # [BLOCK_T]
        img_bias = key_bias(bias_row, img_pos, i_ok, True)  # [BLOCK_I]
    else:
        txt_bias = txt_pos  # never read
        img_bias = img_pos  # never read

    # fp32 inputs (tf32x3 dots: two halves of every operand in registers) take one loop over the heads per map, i2t
    # then t2i: with both tiles in one loop their 16x16 8-warp tile at BLOCK_D = 128 held both maps' operands at once
    # and spilled 4 B at 255 registers (sm90a / sm100a; 239 / 0 in two loops). 2-byte inputs keep one loop for both
    # maps: in two, the loops of a head took 13-22 % more instructions than the one loop on sm90a (64x64 D = 64: 479 +
    # 275 against 616, the i2t loop's per-element 2-byte stores surrounded by 66 more register moves), -1 to +27 % on
    # sm100a, -20 to +8 % on sm80 (compile report, Triton 3.9). The two maps share no load: nothing is read twice.
    if DOT_PRECISION == "tf32x3":
        if CAPTURE_I2T:
            _maps_over_heads(I2T, stride_ib, stride_ihg, stride_ir, T2I, stride_tb, stride_thg, stride_tr, i, img_pos,
                             i_ok, img_bias, j, txt_pos, j_ok, txt_bias, Q, K, LSE, off_b, group, stride_qb, stride_qh,
                             stride_qn, stride_kb, stride_kh, stride_kn, stride_lb, stride_lh, lse_mul, qk_scale, scale,
                             out_scale, True, False, HEADS_MEAN, HEADS_PER_PROGRAM, NORMALIZE, HEAD_DIM, BLOCK_D,
                             ROW_ALIGN, DOT_PRECISION, HAS_MASK)
        if CAPTURE_T2I:
            _maps_over_heads(I2T, stride_ib, stride_ihg, stride_ir, T2I, stride_tb, stride_thg, stride_tr, i, img_pos,
                             i_ok, img_bias, j, txt_pos, j_ok, txt_bias, Q, K, LSE, off_b, group, stride_qb, stride_qh,
                             stride_qn, stride_kb, stride_kh, stride_kn, stride_lb, stride_lh, lse_mul, qk_scale, scale,
                             out_scale, False, True, HEADS_MEAN, HEADS_PER_PROGRAM, NORMALIZE, HEAD_DIM, BLOCK_D,
                             ROW_ALIGN, DOT_PRECISION, HAS_MASK)
    else:
        _maps_over_heads(I2T, stride_ib, stride_ihg, stride_ir, T2I, stride_tb, stride_thg, stride_tr, i, img_pos, i_ok,
                         img_bias, j, txt_pos, j_ok, txt_bias, Q, K, LSE, off_b, group, stride_qb, stride_qh, stride_qn,
                         stride_kb, stride_kh, stride_kn, stride_lb, stride_lh, lse_mul, qk_scale, scale, out_scale,
                         CAPTURE_I2T, CAPTURE_T2I, HEADS_MEAN, HEADS_PER_PROGRAM, NORMALIZE, HEAD_DIM, BLOCK_D,
                         ROW_ALIGN, DOT_PRECISION, HAS_MASK)


@triton.jit
def _maps_over_heads(I2T, stride_ib, stride_ihg, stride_ir, T2I, stride_tb, stride_thg, stride_tr, i, img_pos, i_ok,
                     img_bias, j, txt_pos, j_ok, txt_bias, Q, K, LSE, off_b, group, stride_qb, stride_qh, stride_qn,
                     stride_kb, stride_kh, stride_kn, stride_lb, stride_lh, lse_mul, qk_scale, scale, out_scale,
                     MAP_I2T: tl.constexpr, MAP_T2I: tl.constexpr, HEADS_MEAN: tl.constexpr,
                     HEADS_PER_PROGRAM: tl.constexpr, NORMALIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     HAS_MASK: tl.constexpr):
    """One loop over the group's heads for the maps asked (MAP_I2T, MAP_T2I) of this program's image rows ``i``
    [BLOCK_I] (sequence positions ``img_pos``) x map text columns ``j`` [BLOCK_T] (positions ``txt_pos``): per head the
    i2t tile [BLOCK_I, BLOCK_T] and the t2i tile [BLOCK_T, BLOCK_I] of ``head_map_tile``, stored at
    ``I2T[b, head, i, j]`` / ``T2I[b, head, j, i]`` (strides batch, head or group, row; unit column stride), or summed
    over the group's heads in registers (HEADS_MEAN) and stored once, times ``out_scale``, at ``[b, group, ...]``.
    ``txt_bias`` [BLOCK_T] / ``img_bias`` [BLOCK_I]: the key bias of the i2t / t2i columns (HAS_MASK)."""
    acc_i2t = tl.zeros([i.shape[0], j.shape[0]], dtype=tl.float32)
    acc_t2i = tl.zeros([j.shape[0], i.shape[0]], dtype=tl.float32)
    for hh in range(HEADS_PER_PROGRAM):
        off_h = (group * HEADS_PER_PROGRAM + hh).to(tl.int64)
        q_base = Q + head_offset(off_b, off_h, stride_qb, stride_qh, ROW_ALIGN)
        k_base = K + head_offset(off_b, off_h, stride_kb, stride_kh, ROW_ALIGN)
        lse_base = LSE + off_b * stride_lb + off_h * stride_lh
        if MAP_I2T:
            tile = head_map_tile(q_base, k_base, lse_base, img_pos, i_ok, txt_pos, j_ok, stride_qn, stride_kn, lse_mul,
                                 qk_scale, scale, txt_bias, NORMALIZE, HEAD_DIM, BLOCK_D, ROW_ALIGN, DOT_PRECISION,
                                 HAS_MASK)  # [BLOCK_I, BLOCK_T]
            if HEADS_MEAN:
                acc_i2t += tile
            else:
                store_map(I2T + off_b * stride_ib + off_h * stride_ihg, tile, i, i_ok, j, j_ok, stride_ir)
        if MAP_T2I:
            tile = head_map_tile(q_base, k_base, lse_base, txt_pos, j_ok, img_pos, i_ok, stride_qn, stride_kn, lse_mul,
                                 qk_scale, scale, img_bias, NORMALIZE, HEAD_DIM, BLOCK_D, ROW_ALIGN, DOT_PRECISION,
                                 HAS_MASK)  # [BLOCK_T, BLOCK_I]
            if HEADS_MEAN:
                acc_t2i += tile
            else:
                store_map(T2I + off_b * stride_tb + off_h * stride_thg, tile, j, j_ok, i, i_ok, stride_tr)
    if HEADS_MEAN:
        # This group's share of the mean, fp32 partial (or the map itself when there is one group).
        if MAP_I2T:
            store_map(I2T + off_b * stride_ib + group.to(tl.int64) * stride_ihg, acc_i2t * out_scale,
                      i, i_ok, j, j_ok, stride_ir)
        if MAP_T2I:
            store_map(T2I + off_b * stride_tb + group.to(tl.int64) * stride_thg, acc_t2i * out_scale,
                      j, j_ok, i, i_ok, stride_tr)


@triton.jit
def _block_lse_kernel(
    Q, K, LSE2, TEXT_INDEX, KEY_BIAS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_mb,
    H, N, text_start, t_full, N_img, T,
    qk_scale,
    ROWS_ARE_IMAGE: tl.constexpr, HAS_INDEX: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_MASK: tl.constexpr, ALL_KEYS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Base-2 log-sum-exp of ``scale * s`` of each captured row over its block's columns, for "text":
    image rows over the (selected) text columns (ROWS_ARE_IMAGE), text rows over the image columns; with a
    key bias added to the scores (a row with no unmasked column gets -inf; the capture kernel writes 0 in its
    masked columns). ALL_KEYS: over all N keys instead, the "joint" normaliser.
    Writes ``LSE2[b, h, position of the row]`` ([B, H, N] fp32, contiguous). Grid: (row blocks, B * H)."""
    pid_r = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    q_base = Q + head_offset(off_b, off_h, stride_qb, stride_qh, ROW_ALIGN)
    k_base = K + head_offset(off_b, off_h, stride_kb, stride_kh, ROW_ALIGN)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    if ROWS_ARE_IMAGE:
        r_ok = r < N_img
        r_pos = image_to_position(r, text_start, t_full)
        n_cols = T
    else:
        r_ok = r < T
        r_pos = text_positions(r, r_ok, text_start, TEXT_INDEX, HAS_INDEX)
        n_cols = N_img
    if ALL_KEYS:
        n_cols = N
    q = load_rows(q_base, r_pos, r_ok, stride_qn, HEAD_DIM, BLOCK_D, True, ROW_ALIGN)  # [BLOCK_R, BLOCK_D]
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start_c in range(0, n_cols, BLOCK_C):
        c = start_c + tl.arange(0, BLOCK_C)
        c_ok = c < n_cols
        if ALL_KEYS:
            c_pos = c
        elif ROWS_ARE_IMAGE:
            c_pos = text_positions(c, c_ok, text_start, TEXT_INDEX, HAS_INDEX)
        else:
            c_pos = image_to_position(c, text_start, t_full)
        if HAS_MASK:
            c_bias = key_bias(KEY_BIAS + off_b * stride_mb, c_pos, c_ok, True)  # [BLOCK_C], -inf past the block
        else:
            c_bias = c_pos  # never read
        m_b, l_b = block_lse2(q, k_base, c_pos, c_ok, stride_kn, qk_scale, c_bias, HEAD_DIM, BLOCK_D, DOT_PRECISION,
                              ROW_ALIGN, HAS_MASK)
        m, l = merge_lse2(m, l, m_b, l_b, HAS_MASK)
    tl.store(LSE2 + off_bh.to(tl.int64) * N + r_pos, m + tl.math.log2(l), mask=r_ok)


def head_groups(heads: int, programs_per_group: int, target: int = _TARGET_PROGRAMS) -> int:
    """Number of head groups G (a divisor of ``heads``) for a head mean: the fewest groups that give at least
    ``target`` programs (G fp32 partial maps), all heads in one group when one group already does."""
    for g in range(1, heads + 1):
        if heads % g == 0 and programs_per_group * g >= target:
            return g
    return heads


def capture_maps(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: Optional[torch.Tensor],
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
    lse_base: str = "e",
    groups: Optional[int] = None,
    key_bias: Optional[torch.Tensor] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The text-image maps of ``[B, H, N, D]`` q, k (any strides, unit stride in D) without the N x N matrix.

    Args:
        lse: ``[B, H, N]`` float32 (any strides), each row's log-sum-exp of
            ``scale * q . k`` over all N keys: natural log (``lse_base="e"``, SDPA's and ``attention_fwd``'s)
            or base 2 (``lse_base="2"``). Read only for ``normalize="joint"``; None there computes it (a pass
            over the captured rows x N keys, exact against the maps' own rounding; see the module docstring).
        text_start, text_stop: the text block ``[text_start, text_stop)``, touching the start or end.
        text_index: None or 1-D integer tensor of UNIQUE positions inside the text block (T = its length).
        normalize: ``"joint"`` | ``"text"`` | ``"logits"`` (see the module docstring).
        groups: head groups (a divisor of H; default ``head_groups``): each program loops over the H / G heads
            of its group; for the mean, G fp32 partials added in a fixed order.
        key_bias: None or float32 ``[B, N]``, added to the scaled scores (``-inf`` = masked: 0 in the maps, out
            of the "text" normaliser). For "joint", ``lse`` must come from attention with the same bias.

    Returns ``(i2t [B, (H,) N_img, T] or None, t2i [B, (H,) T, N_img] or None)``, contiguous, in map_dtype.
    Inputs are assumed validated (seg4diff_fast.attention).
    """
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if lse_base not in ("e", "2"):
        raise ValueError(f"lse_base must be 'e' or '2', got {lse_base!r}")
    B, H, N, D = q.shape
    device = q.device
    t_full = text_stop - text_start
    n_img = N - t_full
    T = t_full if text_index is None else int(text_index.numel())
    if not (capture_i2t or capture_t2i):
        return None, None
    dot_precision = _tuning.dot_precision(q.dtype)  # fp32: tf32x3 (fp32-level accuracy on the tensor cores)
    bd = _tuning.block_d(D)
    align = _tuning.row_align(q, k)
    has_index = text_index is not None
    index32 = text_index.to(device=device, dtype=torch.int32) if has_index else q  # q: never read
    bias32, stride_mb = _tuning.key_bias_args(key_bias)

    if normalize == "text" or (normalize == "joint" and lse is None):
        # Each captured row's lse (base 2) over its block's columns ("text") or all N keys ("joint"), at the row's
        # sequence position.
        lse = torch.empty((B, H, N), dtype=torch.float32, device=device)
        lse_base = "2"
        block_r, block_c = (32, 16) if _tuning.INTERPRET else (64, 64)
        for rows_are_image, n_rows, wanted in ((True, n_img, capture_i2t), (False, T, capture_t2i)):
            if wanted:
                _block_lse_kernel[(triton.cdiv(n_rows, block_r), B * H)](
                    q, k, lse, index32, bias32,
                    q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), stride_mb,
                    H, N, text_start, t_full, n_img, T, float(scale) * LOG2E,
                    ROWS_ARE_IMAGE=rows_are_image, HAS_INDEX=has_index, HEAD_DIM=D, BLOCK_D=bd, ROW_ALIGN=align,
                    DOT_PRECISION=dot_precision, HAS_MASK=key_bias is not None, ALL_KEYS=normalize == "joint",
                    BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
                )
    elif normalize == "logits":
        lse = q.new_empty((1, 1, 1), dtype=torch.float32)  # never read
    elif lse.stride(-1) != 1:
        lse = lse.contiguous()  # e.g. SDPA's CPU kernel returns [B, N, H]-ordered storage for [B, N, H, D] views

    # Map buffers. heads "all": the maps; mean over G > 1 groups: fp32 partials [G, B, rows, cols].
    lead = (B,) if heads_mean else (B, H)
    i2t_shape, t2i_shape = lead + (n_img, T), lead + (T, n_img)
    blocks = triton.cdiv(n_img, 64) * triton.cdiv(T, 64) * B  # programs per head group at the pinned tiles
    # Heads per program: a loop over the heads of a group pipelines the next head's loads (cp.async), and
    # the mean sums the group in registers; groups are only split until the grid fills the GPU.
    n_groups = head_groups(H, blocks) if groups is None else groups
    if H % n_groups:
        raise ValueError(f"groups={n_groups} must divide the number of heads H={H}")
    per_program = H // n_groups
    partial = heads_mean and n_groups > 1

    def buffer(shape, wanted):
        if not wanted:
            return None
        if partial:
            return torch.empty((n_groups,) + shape, dtype=torch.float32, device=device)
        return torch.empty(shape, dtype=map_dtype, device=device)

    i2t_k, t2i_k = buffer(i2t_shape, capture_i2t), buffer(t2i_shape, capture_t2i)

    def map_strides(t):
        """(batch, head-or-group, row) strides of a map buffer; the column stride is 1."""
        if t is None:
            return 0, 0, 0
        if partial:  # [G, B, rows, cols]
            return t.stride(1), t.stride(0), t.stride(2)
        if heads_mean:  # [B, rows, cols], one group
            return t.stride(0), 0, t.stride(1)
        return t.stride(0), t.stride(1), t.stride(2)  # [B, H, rows, cols]

    def grid(meta):
        return (triton.cdiv(n_img, meta["BLOCK_I"]), triton.cdiv(T, meta["BLOCK_T"]), B * n_groups)

    _capture_kernel[grid](
        q, k, lse, i2t_k if i2t_k is not None else lse, t2i_k if t2i_k is not None else lse, index32, bias32,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        lse.stride(0), lse.stride(1),
        *map_strides(i2t_k), *map_strides(t2i_k), stride_mb,
        H, text_start, t_full, n_img, T,
        float(scale) * LOG2E, float(scale), LOG2E if lse_base == "e" else 1.0, 1.0 / H if heads_mean else 1.0,
        CAPTURE_I2T=bool(capture_i2t), CAPTURE_T2I=bool(capture_t2i), HEADS_MEAN=bool(heads_mean),
        HEADS_PER_PROGRAM=per_program, HAS_INDEX=has_index, NORMALIZE=normalize,
        HEAD_DIM=D, BLOCK_D=bd, ROW_ALIGN=align, DOT_PRECISION=dot_precision, HAS_MASK=key_bias is not None,
    )

    def finish(t, shape):
        if t is None or not partial:
            return t
        total = t[0].clone()
        for g in range(1, n_groups):  # fixed order: the same bits on every run
            total += t[g]
        return total.to(map_dtype)

    return finish(i2t_k, i2t_shape), finish(t2i_k, t2i_shape)


# --------------------------------------------------------------------------------------------------------
# Ahead-of-time variants for the compile report (seg4diff_fast.compile_report; interface in kernels/_aot.py).
# --------------------------------------------------------------------------------------------------------
def aot_variants(target: str, dtype: torch.dtype, head_dim: int, capture: str):
    """Every GPU config of the capture kernel as a launch on ``target`` compiles it: SD3-medium at 1024^2
    (``[1, 24, 4250, head_dim]``, text at ``[4096, 4250)``), "joint" normalisation; "i2t-mean" selects the
    77 CLIP columns, "both-all" writes both maps per head; heads per program as the wrapper picks them
    (``head_groups`` at 64 x 64 tiles). No variant under "none" (nothing to capture)."""
    from . import _aot

    _aot.check_target(target)
    if capture == "none" or dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return []
    capture_i2t, capture_t2i, heads_mean, has_index = _aot.parse_capture(capture)
    B, H, N, D, text_start, text_stop, n_img, T = _aot.sd3_launch(head_dim, has_index)
    ptr = _aot.DevicePointer(dtype)
    maps = _aot.DevicePointer(torch.float16)
    lse = _aot.DevicePointer(torch.float32)
    sb, sh, sn, _ = _aot.contiguous_strides((B, H, N, D))
    lead = (B,) if heads_mean else (B, H)
    ib, ihg, ir = (lambda st: (st[0], 0 if heads_mean else st[1], st[-2]))(_aot.contiguous_strides(lead + (n_img, T)))
    tb, thg, tr = (lambda st: (st[0], 0 if heads_mean else st[1], st[-2]))(_aot.contiguous_strides(lead + (T, n_img)))
    args = dict(Q=ptr, K=ptr, LSE=lse, I2T=maps if capture_i2t else lse, T2I=maps if capture_t2i else lse,
                TEXT_INDEX=_aot.DevicePointer(torch.int32) if has_index else ptr, KEY_BIAS=None, stride_mb=None,
                stride_qb=sb, stride_qh=sh, stride_qn=sn, stride_kb=sb, stride_kh=sh, stride_kn=sn,
                stride_lb=H * N, stride_lh=N, stride_ib=ib, stride_ihg=ihg, stride_ir=ir,
                stride_tb=tb, stride_thg=thg, stride_tr=tr,
                H=H, text_start=text_start, t_full=text_stop - text_start, N_img=n_img, T=T,
                qk_scale=D ** -0.5 * LOG2E, scale=D ** -0.5, lse_mul=LOG2E, out_scale=1.0 / H if heads_mean else 1.0,
                CAPTURE_I2T=capture_i2t, CAPTURE_T2I=capture_t2i, HEADS_MEAN=heads_mean,
                HEADS_PER_PROGRAM=H // head_groups(H, triton.cdiv(n_img, 64) * triton.cdiv(T, 64) * B),
                HAS_INDEX=has_index, NORMALIZE="joint",
                HEAD_DIM=D, BLOCK_D=_tuning.block_d(D), ROW_ALIGN=_tuning.strides_row_align(sb, sh, sn),
                DOT_PRECISION=_tuning.dot_precision(dtype), HAS_MASK=False)
    configs = [triton.Config({"BLOCK_I": bi, "BLOCK_T": bt}, num_warps=w, num_stages=s)
               for bi, bt, w, s in _all_gpu_configs()]
    kept = _prune(configs, {"Q": ptr}, HEAD_DIM=D, CAPTURE_I2T=capture_i2t, CAPTURE_T2I=capture_t2i)
    shape = f"[{B}, {H}, {N}, {D}] text [{text_start}, {text_stop}) T={T}"
    return [_aot.launch_variant("capture", _capture_kernel, dict(args, **c.kwargs), num_warps=c.num_warps,
                                num_stages=c.num_stages, block_m=c.kwargs["BLOCK_I"], block_n=c.kwargs["BLOCK_T"],
                                selectable=c in kept, shape=shape)
            for c in configs]
