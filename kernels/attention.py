"""Attention phase of the split path: ``out`` and each row's log-sum-exp, no maps (one Triton kernel family).

For q, k, v of shape ``[B, H, N, D]`` (any strides, unit stride in D) one launch computes

    out[b, h, i]  = softmax_j(scale * q_i . k_j) v                     [B, H, N, D] in q.dtype
    lse[b, h, i]  = log sum_j exp(scale * q_i . k_j)                   [B, H, N] float32, NATURAL log

i.e. exactly what SDPA's fused kernels return with ``compute_log_sumexp`` (natural log of the normaliser of
the *scaled* scores), so the capture kernel (``capture.py``) takes its lse from here or from torch's SDPA.
``lse_base="2"`` (``LSE_BASE2``) writes the base-2 lse the kernel computes instead, unconverted: the split path
hands that to the capture kernel, whose ``exp2(s * qk_scale - lse2)`` then cancels the row max exactly. A natural
lse converted there and back is rounded twice at the lse's magnitude (an error of about ``2^-24 * |lse|`` in every
probability's exponent: 1e-2 at ``scale`` 1e4, ``inf`` at 1e10).
With a key bias (fp32 ``[B, N]``, ``HAS_MASK``) ``bias[b, j]`` is added to ``scale * q_i . k_j`` (``-inf``: key j
is masked); a row with no unmasked key gets ``out`` 0 and lse ``+inf`` (``_tiles.finish_out``, ``finish_lse2``).

Grid: one program per (query block of BLOCK_M rows, b * H + h). The program streams K/V blocks through the
online softmax of ``_tiles.attend_all_keys`` (log2 domain, scale folded into the exponent's FMA): first the one
ragged last block (``N % BLOCK_N != 0``, true of every SD3 length) alone with the column mask, then every full key
block in a loop without one, so the main loop carries no mask. Two load paths, chosen per launch:

- tensor descriptors (``USE_TMA``, sm90+): Q/K/V/O through ``tl.make_tensor_descriptor`` (TMA on Hopper),
  with ``WARP_SPECIALIZE`` configs (producer warp + consumer warpgroups; the epilogue after the loop is
  the only code outside it, so there is no peeled block: these configs run for N a multiple of BLOCK_N only);
- pointers (sm80, or tensors TMA cannot address): ``cp.async``-pipelined loads.

The head dim is a compile-time constant (``HEAD_DIM``, padded to ``BLOCK_D``), so D = 72 pipelines too.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _tuning
from ._tiles import (LN2, LOG2E, attend_all_keys, attend_keys, finish_lse2, finish_out, head_offset, head_sources,
                     store_head_out)

__all__ = ["attention_fwd"]


# --------------------------------------------------------------------------------------------------------
# Autotune configs: (BLOCK_M, BLOCK_N, num_warps, num_stages, warp_specialize). First entry = pinned config.
# Kept short; `_prune` says why one is dropped for a launch; the compile report (seg4diff-fast
# compile-report) lists registers, spills and shared memory of each on sm80 / sm90a.
# --------------------------------------------------------------------------------------------------------
_GPU_CONFIGS = [
    (128, 64, 4, 3, False),   # sm80 and sm90 workhorse, d <= 128
    (128, 64, 8, 3, False),   # sm80 at D > 64 (4 warps spill there)
    (128, 128, 8, 3, False),  # larger key blocks: fewer softmax rescales
    (128, 64, 4, 3, True),    # Hopper: warp-specialised (TMA only; Triton 3.9 specialises 4-warp loops only)
    (128, 128, 4, 2, True),   # Hopper: warp-specialised, larger key blocks
    (64, 64, 4, 3, False),    # small N, d = 256
    (64, 32, 4, 2, False),    # d = 256 on Ampere's 164 KiB
]
# fp32 inputs (tf32x3 dots: two halves of every operand in registers) take only these, per BLOCK_D and load path:
# the ones with no spill (compile report, Triton 3.9: sm90a for tensor descriptors, sm80 for pointers) whose main
# loop is within 3 % of the floor's. sm80 (pointers): at D = 64 the larger tiles spill 540-868 B (and, measured with
# the ragged key block after the loop, 32 x 16 x 4 warps 24 B, 32 x 32 x 4 warps 144 B); at BLOCK_D = 128 32 x 32
# x 8 warps spills 12 B at D = 72, and 32 x 16 and 16 x 32 x 8 warps spill nothing with the ragged key block before
# the main loop (_tiles.attend_all_keys): 5.6-5.8 and 8.0-8.2 instructions per HMMA, at or under the floor's. No warp
# specialisation: with tf32x3 dots the pass fails ("PassManager::run failed") at BLOCK_D = 128 and in some runs at 64.
_GPU_CONFIGS_FP32 = {
    64: [(128, 64, 8, 3, False), (64, 64, 4, 3, False), (64, 32, 4, 2, False)],
    128: [(16, 32, 4, 2, False)],
}
_GPU_CONFIGS_FP32_POINTERS = {
    64: [(16, 32, 4, 2, False), (32, 32, 8, 2, False)],
    128: [(32, 16, 8, 2, False), (16, 32, 8, 2, False)],
}


def _all_gpu_configs():
    """The autotune list: the 2-byte configs, then the fp32-only ones (``_tuning.dtype_rule`` sorts them)."""
    fp32 = [t for table in (_GPU_CONFIGS_FP32, _GPU_CONFIGS_FP32_POINTERS) for tiles in table.values()
            for t in tiles if t not in _GPU_CONFIGS]
    return _GPU_CONFIGS + list(dict.fromkeys(fp32))


def _configs():
    gpu = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "WARP_SPECIALIZE": ws}, num_warps=w, num_stages=s)
           for bm, bn, w, s, ws in _all_gpu_configs()]
    interp = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "WARP_SPECIALIZE": False}, num_warps=4, num_stages=1)]
    return _tuning.config_list(gpu, interp)


def _prune(configs, named_args, max_shared_memory=None, arch=None, **kwargs):
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    has_mask = kwargs.get("HAS_MASK", named_args.get("HAS_MASK", False))
    tma = kwargs.get("USE_TMA", named_args.get("USE_TMA"))
    q = named_args["Q"]

    def extra(cfg):
        tile = (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages,
                cfg.kwargs["WARP_SPECIALIZE"])
        why = _tuning.dtype_rule(tile, q.element_size(), _tuning.block_d(head_dim), _GPU_CONFIGS,
                                 _GPU_CONFIGS_FP32 if tma else _GPU_CONFIGS_FP32_POINTERS)
        if why:
            return why
        if (q.element_size() == 2 and head_dim > 64 and _tuning.device_arch(getattr(q, "device", None), arch) >= 100
                and cfg.num_warps == 4 and cfg.kwargs["BLOCK_M"] == 128):
            return "sm100: 128-row tiles with 4 warps spill at D > 64 (328-356 B, warp-specialised ones too)"
        if head_dim > 128 and cfg.kwargs["BLOCK_M"] > 64:
            return f"a {cfg.kwargs['BLOCK_M']}x{head_dim} fp32 accumulator per program spills registers"
        if cfg.kwargs["WARP_SPECIALIZE"] and named_args["N"] % cfg.kwargs["BLOCK_N"]:
            # Triton 3.9 warp-specialises a loop only with no tile work around it: the ragged last key block
            # cannot be peeled, so every key block would be masked (sm90a fp16 D = 128, 128 x 64: 391 instructions
            # per 12 HGMMA against 343 unmasked); the other configs peel it.
            return f"warp specialisation only for N a multiple of BLOCK_N (N = {named_args['N']})"
        if has_mask and cfg.kwargs["WARP_SPECIALIZE"]:
            # Triton 3.9's warp specialisation takes only descriptor (TMA) loads in the producer: with the key
            # bias's pointer loads in the loop it fails to compile ("unsupported load type for producer commit").
            return "warp specialisation cannot take the key bias's pointer loads (Triton 3.9 fails to compile)"
        return ""

    return _tuning.prune(configs, n=named_args["N"], head_dim=head_dim, elsize=q.element_size(),
                         tma=tma, device=getattr(q, "device", None), extra=extra,
                         max_smem=max_shared_memory)


@triton.autotune(configs=_configs(), key=["N", "HEAD_DIM", "USE_TMA", "HAS_MASK"],  # + the dtypes of tensor args
                 prune_configs_by={"early_config_prune": _prune})
@triton.heuristics({"EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0})  # no ragged last key block
@triton.jit
def _attention_fwd_kernel(
    Q, K, V, OUT, LSE, KEY_BIAS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_mb,  # key bias [B, N] fp32: batch stride (unit stride along N); KEY_BIAS, stride_mb None without one
    H, N,
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr, USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_MASK: tl.constexpr, LSE_BASE2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, EVEN_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    q_base = Q + head_offset(off_b, off_h, stride_qb, stride_qh, ROW_ALIGN)
    k_base = K + head_offset(off_b, off_h, stride_kb, stride_kh, ROW_ALIGN)
    v_base = V + head_offset(off_b, off_h, stride_vb, stride_vh, ROW_ALIGN)
    o_base = OUT + head_offset(off_b, off_h, stride_ob, stride_oh, ROW_ALIGN)
    if HAS_MASK:
        bias_row = KEY_BIAS + off_b * stride_mb  # this sample's fp32 key bias  [N]
    else:
        bias_row = KEY_BIAS  # None: never read
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query positions  [BLOCK_M]
    row_ok = offs_m < N

    q, k_src, v_src = head_sources(q_base, k_base, v_base, start_m, offs_m, row_ok, N, stride_qn, stride_kn,
                                    stride_vn, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, USE_TMA, ROW_ALIGN)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if WARP_SPECIALIZE:
        # Triton 3.9 splits producer / consumer warps only for a loop with no other tile work around it (a peeled
        # block before or after it, a second loop or a branch inside it breaks the pass): with N a multiple of
        # BLOCK_N (EVEN_N) the loop has no mask; a ragged N masks every key block, which the prune avoids
        # (``_prune`` keeps these configs for EVEN_N launches only).
        acc, l_i, m_i = attend_keys(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, 0, N, N, qk_scale,
                                    bias_row, HEAD_DIM, BLOCK_D, BLOCK_N, not EVEN_N, USE_TMA, True, DOT_PRECISION,
                                    ROW_ALIGN, HAS_MASK)
    else:
        # The ragged last block alone first, then the main loop over full key blocks without a mask.
        acc, l_i, m_i = attend_all_keys(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, N, qk_scale, bias_row,
                                        HEAD_DIM, BLOCK_D, BLOCK_N, USE_TMA, DOT_PRECISION, ROW_ALIGN, HAS_MASK)

    # Epilogue. Rows past N hold 0 scores: finite, never NaN, never stored.
    o = finish_out(acc, l_i, HAS_MASK)
    store_head_out(o_base, o, start_m, offs_m, row_ok, N, stride_on, HEAD_DIM, BLOCK_D, BLOCK_M, USE_TMA, ROW_ALIGN)
    lse = finish_lse2(l_i, m_i, HAS_MASK)  # base-2 log of the row's normaliser of scale * q.k  [BLOCK_M]
    if not LSE_BASE2:
        lse = lse * LN2  # natural log (SDPA's convention)
    tl.store(LSE + off_bh.to(tl.int64) * N + offs_m, lse, mask=row_ok)


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    key_bias: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    tma: Optional[bool] = None,
    lse_base: str = "e",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention over ``[B, H, N, D]`` q/k/v (any strides with unit stride in D; same shape and dtype).

    Returns ``(out, lse)``: ``out`` with the strides of ``torch.empty_like(q)`` (or the given ``out``, same
    shape/dtype), ``lse`` ``[B, H, N]`` float32, natural log of ``sum_j exp(scale * q_i . k_j)`` (SDPA's
    convention; with ``lse_base="2"`` the base-2 log, what the capture kernel cancels exactly). ``key_bias``:
    None or float32 ``[B, N]``, added to the scaled scores (``-inf`` = masked; a row with no unmasked key gets
    out 0 and lse ``+inf``). ``tma``: force (True) or forbid (False) the
    tensor-descriptor path; None picks it on sm90+ when the strides allow (16-byte aligned). Inputs are assumed
    validated (seg4diff_fast.attention).
    """
    if lse_base not in ("e", "2"):
        raise ValueError(f"lse_base must be 'e' or '2', got {lse_base!r}")
    B, H, N, D = q.shape
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    if tma is None:
        tma = _tuning.use_tma(q, k, v, out)
    if tma and q.device.type == "cuda":
        _tuning.ensure_tma_allocator()
    dot_precision = _tuning.dot_precision(q.dtype)  # fp32: tf32x3 (fp32-level accuracy on the tensor cores)
    bias32, stride_mb = _tuning.key_bias_args(key_bias)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]), B * H)

    _attention_fwd_kernel[grid](
        q, k, v, out, lse, bias32,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        stride_mb,
        H, N, float(scale) * LOG2E,
        HEAD_DIM=D, BLOCK_D=_tuning.block_d(D), ROW_ALIGN=_tuning.row_align(q, k, v, out), USE_TMA=bool(tma),
        DOT_PRECISION=dot_precision, HAS_MASK=key_bias is not None, LSE_BASE2=lse_base == "2",
    )
    return out, lse


# --------------------------------------------------------------------------------------------------------
# Ahead-of-time variants for the compile report (seg4diff_fast.compile_report; interface in kernels/_aot.py).
# --------------------------------------------------------------------------------------------------------
def aot_variants(target: str, dtype: torch.dtype, head_dim: int, capture: str):
    """Every GPU config of the attention-phase kernel as a launch on ``target`` compiles it: SD3-medium at
    1024^2, contiguous ``[1, 24, 4250, head_dim]``; the warp-specialised ones, which the prune keeps for N a
    multiple of BLOCK_N only, at Flux's N = 4608 instead; tensor descriptors on sm90a / sm100a, pointers on sm80.
    Listed under capture "none" only (the kernel does not depend on the capture mode)."""
    from . import _aot

    tgt = _aot.check_target(target)
    if capture != "none" or dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return []
    B, H, N, D = _aot.sd3_launch(head_dim)[:4]
    n_even = 4608  # Flux at 1024^2 (4096 image + 512 text tokens): a multiple of every BLOCK_N
    tma = tgt.arch >= 90
    ptr = _aot.DevicePointer(dtype)
    sb, sh, sn, _ = _aot.contiguous_strides((B, H, N, D))
    args = dict(Q=ptr, K=ptr, V=ptr, OUT=ptr, LSE=_aot.DevicePointer(torch.float32),
                KEY_BIAS=None, stride_mb=None,
                stride_qb=sb, stride_qh=sh, stride_qn=sn, stride_kb=sb, stride_kh=sh, stride_kn=sn,
                stride_vb=sb, stride_vh=sh, stride_vn=sn, stride_ob=sb, stride_oh=sh, stride_on=sn,
                H=H, N=N, qk_scale=D ** -0.5 * LOG2E, HEAD_DIM=D, BLOCK_D=_tuning.block_d(D),
                ROW_ALIGN=_tuning.strides_row_align(sb, sh, sn), USE_TMA=tma,
                DOT_PRECISION=_tuning.dot_precision(dtype), HAS_MASK=False, LSE_BASE2=True)
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "WARP_SPECIALIZE": ws}, num_warps=w, num_stages=s)
               for bm, bn, w, s, ws in _all_gpu_configs()]

    def variant(c):
        """Warp-specialised configs run (are selectable) only for N a multiple of BLOCK_N: they compile at n_even."""
        ws = c.kwargs["WARP_SPECIALIZE"]
        n = n_even if ws else N
        st = _aot.contiguous_strides((B, H, n, D))
        strides = dict(stride_qb=st[0], stride_qh=st[1], stride_kb=st[0], stride_kh=st[1], stride_vb=st[0],
                       stride_vh=st[1], stride_ob=st[0], stride_oh=st[1])
        kept = _prune(configs, {"N": n, "Q": ptr}, max_shared_memory=tgt.max_shared_memory, arch=tgt.arch,
                      HEAD_DIM=D, USE_TMA=tma)
        shape = f"[{B}, {H}, {n}, {D}]" + (" TMA" if tma else "")
        return _aot.launch_variant("attention" + ("-ws" if ws else ""), _attention_fwd_kernel,
                                   dict(args, N=n, **strides, **c.kwargs), num_warps=c.num_warps,
                                   num_stages=c.num_stages, block_m=c.kwargs["BLOCK_M"], block_n=c.kwargs["BLOCK_N"],
                                   selectable=c in kept, shape=shape)

    return [variant(c) for c in configs]
