"""Shared ``@triton.jit`` building blocks of the attention, capture and fused kernels (one copy of each).

Conventions shared by every kernel of ``seg4diff_fast.kernels``:

- Scores are raw dot products ``s = q . k`` ([rows, cols], fp32). The softmax runs in the log2 domain with
  the scale folded into the exponent: ``exp(scale * s - lse) = exp2(s * qk_scale - lse2)`` with
  ``qk_scale = scale * log2(e)`` and ``lse2 = lse * log2(e)``: one FMA per score in the attention loop, no
  separate multiply. A map entry recomputed from a stored lse2 (``map_tile``) rounds the product first, as the
  row max inside lse2 was rounded, so that a row's largest score cancels exactly at any scale (see
  ``ROUNDED_PRODUCT``). The attention loop's own FMA leaves the rounding error r of the scaled row max
  (``|r| <= 2^-25 * |m|``) in ``p = exp2(r)`` of the largest score, as FlashAttention's does: ``out`` and lse carry it
  consistently while ``exp2(r)`` stays finite, i.e. while ``|scale * q.k| < ~1e9`` (on a GPU; the interpreter
  never contracts).
- Head dims: ``HEAD_DIM`` (the real D) and ``BLOCK_D`` (the next power of two >= 16) are both compile-time
  constants. When they are equal there is no head-dim mask at all; otherwise the mask ``d < HEAD_DIM``
  compares with a constant, so the compiler still sees contiguous runs of 8+ elements and pipelines the
  loads (cp.async / TMA) for D = 72 or 40 as for D = 64.
- Row masks only where a block can be ragged (``MASK_ROWS`` constexpr): the attention main loop runs over
  full key blocks unmasked and the last, ragged key block is peeled out, before it (``attend_all_keys``).
- Key biases (``HAS_MASK`` constexpr; without one the compiled code is what it was): one fp32 ``[B, N]`` row per
  sample, ADDED to the scaled scores before the softmax (SDPA's additive ``attn_mask``; ``-inf`` = the key is
  masked; a boolean mask arrives as 0 / ``-inf``), read through ``key_bias``. In the log2 domain the score a
  row's softmax sees is ``s * qk_scale + bias * log2(e)`` (``biased_scores2``). The host makes every bias whose
  base-2 value overflows (below about -2.36e38, e.g. ``torch.finfo(torch.float32).min``) ``-inf`` first
  (``seg4diff_fast.attention``), so that "masked" means ``bias == -inf`` everywhere. Masked scores are ``-inf``
  before the running max; a row whose keys so far are all masked keeps ``m_i = -inf`` and is guarded
  (FlashAttention-style: exponents against 0 instead of ``-inf``, so no ``-inf - -inf`` NaN). A row with no
  unmasked key at all ends with ``l_i == 0``: its output is 0 (SDPA's) and its lse ``+inf``, so that every
  probability ``exp2(s - lse)`` recomputed from it (capture, backward) is 0 (``finish_out``, ``finish_lse2``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._tuning import INTERPRET

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)  (host side: folded into qk_scale)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): log(x) = log2(x) * LN2  (used inside kernels)
LOG2E_K = tl.constexpr(LOG2E)  # log2(e) inside kernels (a key bias is in natural units)
# Compiled for a GPU, Triton contracts ``s * qk_scale - lse2`` into one FMA (the product unrounded); the row max of
# the attention loop is a rounded product, ``max(s) * qk_scale``. ROUNDED_PRODUCT makes map_tile round the product
# too (PTX ``mul.rn.f32``: an explicit rounding mode is never contracted; libdevice's ``__nv_fmul_rn`` is, as LLVM
# turns it into a plain fmul). The interpreter (numpy) never contracts and runs no inline PTX.
ROUNDED_PRODUCT = tl.constexpr(not INTERPRET)


@triton.jit
def head_offset(off_b, off_h, stride_b, stride_h, ROW_ALIGN: tl.constexpr):
    """Element offset (int64) of head ``(off_b, off_h)``, marked a multiple of ROW_ALIGN: a power of two
    that divides every stride, checked by the launch wrapper (``_tuning.row_align``). Triton's launch
    specialisation only marks integers divisible by 16, so without the hint a D = 72 tensor (row stride 72)
    looks unaligned and every row load falls back to 2-byte accesses (no cp.async, many address registers)."""
    off = off_b.to(tl.int64) * stride_b + off_h.to(tl.int64) * stride_h
    if ROW_ALIGN > 1:
        off = tl.multiple_of(off, ROW_ALIGN)
    return off


@triton.jit
def load_rows(base, rows, row_ok, stride_row, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              MASK_ROWS: tl.constexpr, ROW_ALIGN: tl.constexpr, CACHE: tl.constexpr = ""):
    """Tile ``base[rows, :HEAD_DIM]`` as ``[len(rows), BLOCK_D]``; masked rows and padding columns are 0.

    ``rows`` [R] int row indices (any order: gathers work), ``row_ok`` [R] bool (read only if MASK_ROWS);
    ROW_ALIGN: a power of two dividing ``stride_row`` (see head_offset); CACHE: ``tl.load``'s cache_modifier
    (a second load of a tile with another modifier is not merged with the first).
    """
    offs_d = tl.arange(0, BLOCK_D)
    row_off = rows.to(tl.int64) * stride_row  # [R]
    if ROW_ALIGN > 1:
        row_off = tl.multiple_of(row_off, ROW_ALIGN)  # 16-byte rows: vector loads (see head_offset)
    ptrs = base + row_off[:, None] + offs_d[None, :]
    if HEAD_DIM == BLOCK_D:
        if MASK_ROWS:
            tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0, cache_modifier=CACHE)
        else:
            tile = tl.load(ptrs, cache_modifier=CACHE)
    else:
        d_ok = offs_d < HEAD_DIM  # compile-time pattern: runs of HEAD_DIM valid columns
        if MASK_ROWS:
            tile = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0, cache_modifier=CACHE)
        else:
            tile = tl.load(ptrs, mask=d_ok[None, :], other=0.0, cache_modifier=CACHE)
    return tile


@triton.jit
def head_sources(q_base, k_base, v_base, start_m, offs_m, row_ok, N, stride_qn, stride_kn, stride_vn,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 USE_TMA: tl.constexpr, ROW_ALIGN: tl.constexpr):
    """The Q tile ``[BLOCK_M, BLOCK_D]`` of query block ``start_m`` of one (b, h), and where its K and V tiles
    come from (what ``attend_keys`` takes): with USE_TMA, tensor descriptors (one 2-D ``[N, HEAD_DIM]`` view
    per (b, h): out-of-range rows / columns read as 0 and are not written); else the base pointers."""
    if USE_TMA:
        q_desc = tl.make_tensor_descriptor(q_base, shape=[N, HEAD_DIM], strides=[stride_qn, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        k_src = tl.make_tensor_descriptor(k_base, shape=[N, HEAD_DIM], strides=[stride_kn, 1],
                                          block_shape=[BLOCK_N, BLOCK_D])
        v_src = tl.make_tensor_descriptor(v_base, shape=[N, HEAD_DIM], strides=[stride_vn, 1],
                                          block_shape=[BLOCK_N, BLOCK_D])
        q = q_desc.load([start_m * BLOCK_M, 0])
    else:
        k_src = k_base
        v_src = v_base
        q = load_rows(q_base, offs_m, row_ok, stride_qn, HEAD_DIM, BLOCK_D, True, ROW_ALIGN)  # [BM, BD]
    return q, k_src, v_src


@triton.jit
def store_head_out(o_base, o, start_m, offs_m, row_ok, N, stride_on, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, USE_TMA: tl.constexpr, ROW_ALIGN: tl.constexpr):
    """Store the out tile ``o`` ``[BLOCK_M, BLOCK_D]`` (fp32) of query block ``start_m`` of one (b, h) into
    ``o_base[offs_m, :HEAD_DIM]`` (the dtype of ``o_base``), rows past N skipped. With USE_TMA through a tensor
    descriptor, as ``head_sources`` loads: besides the TMA store, a kernel with four descriptors (q, k, v, o: 512 B
    of global scratch per program) keeps their addresses in uniform registers on sm90a; with three (384 B), ptxas
    (Triton 3.9) built them in vector registers and moved them back (``R2UR``) before every K / V load of the
    main loop: 10-11 more instructions per key block of the fused kernel (compile report, 128x64 w8)."""
    if USE_TMA:
        o_desc = tl.make_tensor_descriptor(o_base, shape=[N, HEAD_DIM], strides=[stride_on, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        o_desc.store([start_m * BLOCK_M, 0], o.to(o_base.dtype.element_ty))
    else:
        store_rows(o_base, o, offs_m, row_ok, stride_on, HEAD_DIM, BLOCK_D, True, ROW_ALIGN)


@triton.jit
def store_rows(base, tile, rows, row_ok, stride_row, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               MASK_ROWS: tl.constexpr, ROW_ALIGN: tl.constexpr):
    """Store ``tile`` [R, BLOCK_D] into ``base[rows, :HEAD_DIM]`` (the dtype of ``base``), skipping masked rows."""
    offs_d = tl.arange(0, BLOCK_D)
    row_off = rows.to(tl.int64) * stride_row  # [R]
    if ROW_ALIGN > 1:
        row_off = tl.multiple_of(row_off, ROW_ALIGN)  # 16-byte rows: vector loads (see head_offset)
    ptrs = base + row_off[:, None] + offs_d[None, :]
    tile = tile.to(base.dtype.element_ty)
    if HEAD_DIM == BLOCK_D:
        if MASK_ROWS:
            tl.store(ptrs, tile, mask=row_ok[:, None])
        else:
            tl.store(ptrs, tile)
    else:
        d_ok = offs_d < HEAD_DIM
        if MASK_ROWS:
            tl.store(ptrs, tile, mask=row_ok[:, None] & d_ok[None, :])
        else:
            tl.store(ptrs, tile, mask=d_ok[None, :])


@triton.jit
def key_bias(bias_row, pos, pos_ok, MASK_POS: tl.constexpr):
    """The additive key bias [C] fp32 (natural units, ``-inf`` = masked) of the keys at sequence positions ``pos``
    [C]: ``bias_row`` points at the sample's fp32 ``[N]`` bias row. Positions with ``pos_ok`` False (read only if
    MASK_POS) get ``-inf`` (no key there)."""
    if MASK_POS:
        return tl.load(bias_row + pos, mask=pos_ok, other=float("-inf"))
    return tl.load(bias_row + pos)


@triton.jit
def biased_scores2(s, qk_scale, bias):
    """The base-2 scores the softmax sees, ``s * qk_scale + bias * log2(e)`` [R, C], from raw dot products ``s``
    [R, C] and the columns' key bias [C] (``key_bias``): ``-inf`` in masked columns. One FMA per score."""
    return s * qk_scale + (bias * LOG2E_K)[None, :]


@triton.jit
def key_block(src, start_n, N, stride_n, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
              MASK_ROWS: tl.constexpr, USE_TMA: tl.constexpr, ROW_ALIGN: tl.constexpr):
    """Key (or value) rows ``start_n + [0, BLOCK_N)`` of one (b, h) as ``[BLOCK_N, BLOCK_D]``; rows >= N (read only
    if MASK_ROWS) and columns >= HEAD_DIM are 0. ``src``: a tensor descriptor (USE_TMA) or the (b, h)'s base pointer.

    Pointers: the block's first row as one scalar offset (``start_n * stride_n``, uniform registers) plus per-thread
    row offsets that do not change between blocks (hoisted out of the loop): 2 adds per row and block. Offsets
    ``(start_n + r) * stride_n`` recomputed per row and block, K and V apart, made the sm80 128-row loops 3.3-5.1 %
    longer than the floor's (compile report, Triton 3.9, fp16 D = 128, 128 x 64 x 8 warps: 561 instructions per 128
    HMMA against the floor's 534; 528 with the scalar block offset)."""
    if USE_TMA:
        tile = src.load([start_n, 0])  # rows >= N and cols >= HEAD_DIM are zero-filled
    else:
        block_off = start_n.to(tl.int64) * stride_n
        if ROW_ALIGN > 1:
            block_off = tl.multiple_of(block_off, ROW_ALIGN)
        rows = tl.arange(0, BLOCK_N)
        tile = load_rows(src + block_off, rows, start_n + rows < N, stride_n, HEAD_DIM, BLOCK_D, MASK_ROWS, ROW_ALIGN)
    return tile


@triton.jit
def attend_block(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, start_n, N, qk_scale, bias_row,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASK_COLS: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  ROW_ALIGN: tl.constexpr, HAS_MASK: tl.constexpr):
    """One key block (keys ``start_n + [0, BLOCK_N)``) of the online softmax: see attend_keys. Called alone
    for the peeled ragged block (straight-line code before the main loop, ``attend_all_keys``)."""
    cols = start_n + tl.arange(0, BLOCK_N)
    k = key_block(k_src, start_n, N, stride_kn, HEAD_DIM, BLOCK_D, BLOCK_N, MASK_COLS, USE_TMA, ROW_ALIGN)
    s = tl.dot(q, k.T, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N] raw scores
    if HAS_MASK:
        bias = key_bias(bias_row, cols, cols < N, MASK_COLS)  # [BLOCK_N]; columns >= N are -inf (masked)
        s = biased_scores2(s, qk_scale, bias)  # base-2 scores, bias included  [BLOCK_M, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with every key so far masked have m_new = -inf: exponents against 0 there (no -inf - -inf).
        # p of an unmasked key still uses m_new, so a row whose unmasked logits are all -inf is NaN (0/0) as
        # without a bias (and a NaN bias makes its row NaN, as in SDPA); masked keys are exactly 0.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.where((bias != float("-inf"))[None, :], tl.math.exp2(s - m_new[:, None]), 0.0)
        alpha = tl.math.exp2(m_i - m_use)
    else:
        if MASK_COLS:
            s = tl.where((cols < N)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = key_block(v_src, start_n, N, stride_vn, HEAD_DIM, BLOCK_D, BLOCK_N, MASK_COLS, USE_TMA, ROW_ALIGN)
    # p in v's dtype for the tensor-core dot (fp32 inputs stay fp32), accumulate in fp32.
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def attend_keys(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, lo, hi, N, qk_scale, bias_row,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                MASK_COLS: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
                DOT_PRECISION: tl.constexpr, ROW_ALIGN: tl.constexpr, HAS_MASK: tl.constexpr):
    """Online softmax of the query tile ``q`` [BLOCK_M, BLOCK_D] over key blocks ``[lo, hi)`` (step BLOCK_N).

    State (log2 domain, scaled): ``m_i`` [BLOCK_M] running max of ``s * qk_scale``, ``l_i`` [BLOCK_M] running
    sum of ``exp2(s * qk_scale - m_i)``, ``acc`` [BLOCK_M, BLOCK_D] fp32 running ``P V``. Per block:

        m_new = max(m_i, rowmax(s) * qk_scale)        (qk_scale > 0, so the max commutes with the scale)
        p     = exp2(s * qk_scale - m_new)             (one FMA per score)
        l_i   = l_i * exp2(m_i - m_new) + rowsum(p);   acc = acc * exp2(m_i - m_new) + p V

    ``k_src`` / ``v_src``: tensor descriptors of this (b, h)'s ``[N, HEAD_DIM]`` keys/values when USE_TMA,
    else base pointers (rows ``stride_kn`` / ``stride_vn`` apart). MASK_COLS: only for the one ragged block
    (columns >= N get -inf) on every block of the loop: for loops that must contain the ragged block.
    HAS_MASK: ``bias_row`` points at the sample's fp32 ``[N]`` key bias, added to the scaled scores (``-inf`` =
    masked; see the module docstring for rows with no unmasked key).
    """
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc, l_i, m_i = attend_block(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, start_n, N, qk_scale,
                                     bias_row, HEAD_DIM, BLOCK_D, BLOCK_N, MASK_COLS, USE_TMA, DOT_PRECISION,
                                     ROW_ALIGN, HAS_MASK)
    return acc, l_i, m_i


@triton.jit
def attend_all_keys(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, N, qk_scale, bias_row,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, ROW_ALIGN: tl.constexpr, HAS_MASK: tl.constexpr):
    """``attend_keys`` over all N keys, not warp-specialised: the ragged last key block (``N % BLOCK_N != 0``) first,
    alone with its column mask, then the full key blocks in a loop without a mask (the online softmax does not
    depend on the order of the blocks).

    First, not after the loop: a block after the loop keeps what it needs live across it. With fp32 the tf32x3
    halves of q (each warp 16 whole rows: 128 registers at BLOCK_D = 128) spilled there (compile report, Triton 3.9,
    sm80: 64 B at 16 x 16 x 8 warps, 144 B at 16 x 32 x 8 warps; none first); fp16 at D = 128, 128 x 64 x 8 warps
    needs 201 registers with the block first, 255 after."""
    n_full = (N // BLOCK_N) * BLOCK_N
    if n_full < N:
        acc, l_i, m_i = attend_block(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, n_full, N, qk_scale,
                                     bias_row, HEAD_DIM, BLOCK_D, BLOCK_N, True, USE_TMA, DOT_PRECISION,
                                     ROW_ALIGN, HAS_MASK)
    acc, l_i, m_i = attend_keys(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, 0, n_full, N, qk_scale,
                                bias_row, HEAD_DIM, BLOCK_D, BLOCK_N, False, USE_TMA, False, DOT_PRECISION,
                                ROW_ALIGN, HAS_MASK)
    return acc, l_i, m_i


@triton.jit
def finish_out(acc, l_i, HAS_MASK: tl.constexpr):
    """The online softmax's output tile ``acc / l_i`` [BLOCK_M, BLOCK_D] fp32. HAS_MASK: a row with no valid key
    (``l_i == 0``) gets 0 (see the module docstring)."""
    if HAS_MASK:
        return acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    return acc / l_i[:, None]


@triton.jit
def finish_lse2(l_i, m_i, HAS_MASK: tl.constexpr):
    """The row's base-2 log-sum-exp of its scaled scores [BLOCK_M]. HAS_MASK: ``+inf`` for a row with no valid
    key (``l_i == 0``), so that every probability ``exp2(s - lse2)`` recomputed from it is 0."""
    if HAS_MASK:
        return tl.where(l_i == 0.0, float("inf"), m_i + tl.math.log2(l_i))
    return m_i + tl.math.log2(l_i)


@triton.jit
def map_tile(q, k, lse2, qk_scale, scale, bias, NORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
             HAS_MASK: tl.constexpr):
    """One captured tile from query rows ``q`` [R, BLOCK_D] and key columns ``k`` [C, BLOCK_D], fp32 [R, C].

    NORMALIZE "joint" / "text": ``exp2(s * qk_scale (+ bias * log2 e) - lse2)`` with ``lse2`` [R] the row's base-2
    log-sum-exp of the biased scaled scores over the normalising keys (all N keys for "joint", the captured
    block's columns for "text"); "logits": ``s * scale (+ bias)`` (``lse2`` unused). HAS_MASK: ``bias`` [C] is the
    columns' key bias (``key_bias``); masked columns (``-inf``) are exactly 0 in every normalisation.
    """
    s = tl.dot(q, k.T, input_precision=DOT_PRECISION)
    if HAS_MASK:
        if NORMALIZE == "logits":
            tile = s * scale + bias[None, :]
        else:
            tile = tl.math.exp2(biased_scores2(s, qk_scale, bias) - lse2[:, None])
        tile = tl.where((bias == float("-inf"))[None, :], 0.0, tile)  # also where lse2 is NaN (no NaN leaks in)
    else:
        if NORMALIZE == "logits":
            tile = s * scale
        elif ROUNDED_PRODUCT:
            # The largest score of a row must cancel its lse2 exactly. lse2 = m + log2(l) with m the ROUNDED product
            # max(s) * qk_scale; an FMA would leave the product's rounding error r (up to 2^-25 * |m|) in the
            # exponent: exp2(r), 1e-2 off at scale 1e4, inf at 1e10, in a one-hot row whose map must be exactly 1.
            prod = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [s, tl.zeros_like(s) + qk_scale],
                                             dtype=tl.float32, is_pure=True, pack=1)
            tile = tl.math.exp2(prod - lse2[:, None])
        else:
            tile = tl.math.exp2(s * qk_scale - lse2[:, None])
    return tile


@triton.jit
def block_lse2(q, k_base, cols_pos, col_ok, stride_kn, qk_scale, bias,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, ROW_ALIGN: tl.constexpr,
               HAS_MASK: tl.constexpr):
    """Base-2 log-sum-exp [R] of the scaled scores of the query tile ``q`` [R, BLOCK_D] over the key columns
    ``cols_pos`` [C] (sequence positions, ``col_ok`` [C] marks real ones): one block of a two-pass "text"
    normalisation. HAS_MASK: ``bias`` [C] is the columns' key bias (``key_bias``, ``-inf`` where ``col_ok`` is
    False), added to the scores; a block may hold no unmasked column (m = -inf): l is 0 there, not NaN.
    Returns ``(m, l)``: max and sum of ``exp2(score - m)``; combine with merge_lse2."""
    k = load_rows(k_base, cols_pos, col_ok, stride_kn, HEAD_DIM, BLOCK_D, True, ROW_ALIGN)
    s = tl.dot(q, k.T, input_precision=DOT_PRECISION)
    if HAS_MASK:
        s = biased_scores2(s, qk_scale, bias)
        m = tl.max(s, 1)
        l = tl.sum(tl.math.exp2(s - tl.where(m == float("-inf"), 0.0, m)[:, None]), 1)
    else:
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m = tl.max(s, 1) * qk_scale
        l = tl.sum(tl.math.exp2(s * qk_scale - m[:, None]), 1)
    return m, l


@triton.jit
def merge_lse2(m_a, l_a, m_b, l_b, HAS_MASK: tl.constexpr):
    """Merge two partial (max, sum) pairs of base-2 exponentials: (m, l) of the union. HAS_MASK: both may be
    empty (m = -inf, l = 0): the union is empty too, not NaN."""
    m = tl.maximum(m_a, m_b)
    if HAS_MASK:
        m_use = tl.where(m == float("-inf"), 0.0, m)
        return m, l_a * tl.math.exp2(m_a - m_use) + l_b * tl.math.exp2(m_b - m_use)
    return m, l_a * tl.math.exp2(m_a - m) + l_b * tl.math.exp2(m_b - m)


@triton.jit
def image_to_position(i, text_start, t_full):
    """Sequence position of image row ``i`` (every position outside ``[text_start, text_start + t_full)``)."""
    return tl.where(i < text_start, i, i + t_full)


@triton.jit
def text_positions(j, j_ok, text_start, TEXT_INDEX, HAS_INDEX: tl.constexpr):
    """Sequence positions [C] of map text columns ``j`` [C]: ``text_start + TEXT_INDEX[j]`` (selected columns,
    int32 ``[T]``) or ``text_start + j``; columns with ``j_ok`` False read no index (position ``text_start``)."""
    if HAS_INDEX:
        return text_start + tl.load(TEXT_INDEX + j, mask=j_ok, other=0).to(tl.int32)
    return text_start + j


@triton.jit
def head_map_tile(q_base, k_base, lse_base, row_pos, row_ok, col_pos, col_ok, stride_qn, stride_kn, lse_mul,
                  qk_scale, scale, col_bias, NORMALIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  ROW_ALIGN: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_MASK: tl.constexpr):
    """One head's captured tile [R, C] fp32 (``map_tile``) of the query rows at sequence positions ``row_pos`` [R]
    x the key columns at ``col_pos`` [C] (``row_ok`` / ``col_ok`` mark real ones): the i2t and t2i tiles of the
    capture kernel and of the fused kernel's capture loops alike. ``lse_base + row_pos`` holds the rows' lse,
    ``* lse_mul`` makes it base 2 (not read for "logits"); ``col_bias`` [C]: the columns' key bias (HAS_MASK)."""
    q = load_rows(q_base, row_pos, row_ok, stride_qn, HEAD_DIM, BLOCK_D, True, ROW_ALIGN)  # [R, BLOCK_D]
    k = load_rows(k_base, col_pos, col_ok, stride_kn, HEAD_DIM, BLOCK_D, True, ROW_ALIGN)  # [C, BLOCK_D]
    if NORMALIZE == "logits":
        lse2 = tl.zeros([row_pos.shape[0]], dtype=tl.float32)
    else:
        lse2 = tl.load(lse_base + row_pos, mask=row_ok, other=0.0) * lse_mul
    return map_tile(q, k, lse2, qk_scale, scale, col_bias, NORMALIZE, DOT_PRECISION, HAS_MASK)


@triton.jit
def store_map(base, tile, rows, row_ok, cols, col_ok, stride_row):
    """Store fp32 ``tile`` [R, C] at ``base[rows, cols]`` (unit column stride) in the dtype of ``base``."""
    ptrs = base + rows[:, None].to(tl.int64) * stride_row + cols[None, :]
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
