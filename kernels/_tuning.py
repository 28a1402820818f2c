"""Host-side launch helpers shared by the kernel families: autotune modes, shared-memory model, TMA choice.

Nothing here is traced by Triton; the ``@triton.jit`` helpers live in ``_tiles.py``.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import triton

_log = logging.getLogger("seg4diff_fast.kernels")

# Triton's numpy interpreter: one program at a time, so a single small fixed config and no autotuning.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# SEG4DIFF_AUTOTUNE=0 pins the first config of each GPU list instead of autotuning: for test runs on a GPU,
# where autotuning every test shape would compile and time every config for each one.
AUTOTUNE = os.environ.get("SEG4DIFF_AUTOTUNE", "1") != "0"


def config_list(gpu: List[triton.Config], interpreter: List[triton.Config]) -> List[triton.Config]:
    """The autotune list for this process: the interpreter's, the whole GPU list, or its first entry."""
    if INTERPRET:
        return interpreter
    return gpu if AUTOTUNE else gpu[:1]


def block_d(head_dim: int) -> int:
    """Padded head dim (a compile-time constant): the next power of two >= 16 (tl.arange and tl.dot need it)."""
    return max(16, triton.next_power_of_2(head_dim))


def key_bias_args(key_bias):
    """The kernels' ``(KEY_BIAS, stride_mb)`` arguments: a float32 ``[B, N]`` key bias (added to the scaled scores,
    ``-inf`` = masked; made by ``seg4diff_fast.attention``), contiguous along N (no copy when it already is), and
    its batch stride; or ``(None, None)`` without one. None arguments are compile-time constants to Triton (not
    kernel parameters), so a kernel launched without a bias (``HAS_MASK=False``) has the signature and the code
    it had before key masks."""
    if key_bias is None:
        return None, None
    if key_bias.dtype != torch.float32 or key_bias.dim() != 2:
        raise ValueError(f"key_bias must be a float32 [B, N] tensor, got {key_bias.dtype} {tuple(key_bias.shape)}")
    bias = key_bias if key_bias.stride(-1) == 1 else key_bias.contiguous()
    return bias, bias.stride(0)


def max_shared_memory(device: torch.device) -> int:
    """Opt-in shared memory per block of ``device`` in bytes (Ampere's 166,912 when no driver answers)."""
    try:
        return triton.runtime.driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"]
    except Exception:  # pragma: no cover - no driver (interpreter, ahead-of-time compilation)
        return 166912


def smem_bytes(block_m: int, block_n: int, block_d: int, stages: int, elsize: int, tma: bool,
               warp_specialize: bool = False) -> int:
    """Shared memory of one attention program, an upper bound of what Triton 3.9 allocates.

    The Q tile once, then K and V tiles for each of ``num_stages`` pipeline buffers (cp.async and TMA alike),
    one more K/V pair for warp-specialised loops, and 1 KiB for TMA mbarriers. Checked against the compiler's
    own ``shared`` numbers (sm90a, fp16/bf16; sm80 allocates the same for cp.async):

        config (M, N, warps, stages)   D    compiler          formula
        128 x 64,  4, 3  cp.async      64   65,536            65,536
        128 x 128, 8, 3  cp.async     128   229,376           229,376
        128 x 128, 8, 3  TMA           64   114,744           115,712
        128 x 64,  4, 3  TMA + WS      64   82,616            82,944
        128 x 64,  4, 3  TMA + WS     128   164,536           164,864
    """
    buffers = stages + (1 if warp_specialize else 0)
    return (block_m * block_d + buffers * 2 * block_n * block_d) * elsize + (1024 if tma else 0)


def device_arch(device, arch: int = None) -> int:
    """Compute capability as one number (80, 90, 100) of ``device``; ``arch`` when given (an ahead-of-time
    target); 0 when neither is known (interpreter, CPU)."""
    if arch is not None:
        return arch
    if device is not None and getattr(device, "type", None) == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major * 10 + minor
    return 0


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of every ``tl.dot`` of the kernels for inputs of ``dtype`` (their DOT_PRECISION).

    fp16 / bf16 multiply natively on the tensor cores (the value is not used). fp32 inputs take "tf32x3"
    (Triton's 3xTF32: each operand split into a high and a low tf32 half, three tensor-core products,
    fp32 accumulation): fp32-level accuracy (emulated on the tests' fp32 cases: out 1.2e-6, maps 3.5e-7
    max abs error vs float64, inside OUT_TOL / MAP_TOL; plain "tf32" is 5e-3 / 1e-3, outside them:
    tests/test_dot_precision.py). "ieee" fp32 dots run on the FMA units with each thread holding whole
    operand rows: every fused config spilled 392 B to 77 KB with it (compile report, sm90a / sm100a)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def dtype_rule(tile: Tuple, elsize: int, block_d: int, half: Sequence[Tuple], fp32: Dict[int, Sequence[Tuple]]) -> str:
    """Why a config is not for this input dtype ('' keeps it). ``tile``: the config as its kernel module's
    ``_GPU_CONFIGS`` entry, e.g. ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``. 2-byte inputs run the tiles of ``half``;
    fp32 inputs only those of ``fp32[block_d]``: the tf32x3 dots hold two halves of every operand in
    registers, so only small tiles fit 255 registers without spilling (each kernel's list comes from the
    compile report). ``fp32`` is keyed by the largest BLOCK_D each list serves (64: every BLOCK_D <= 64);
    a BLOCK_D above every key (256) takes the half list."""
    keys = [d for d in sorted(fp32) if d >= block_d]
    if elsize == 4 and keys:
        tiles = fp32[keys[0]]
        return "" if tile in tiles else f"fp32 inputs (tf32x3 dots) take only the tiles {list(tiles)} at BLOCK_D = {block_d}"
    return "" if tile in half else "a tile for fp32 inputs only"


def prune(configs, *, n: int, head_dim: int, elsize: int, tma: bool, device: torch.device,
          extra: Callable[[triton.Config], str] = lambda cfg: "", max_smem: int = None) -> List[triton.Config]:
    """Drop the configs that cannot run well for one launch, logging why; keep at least the smallest.

    - shared memory (``smem_bytes``) above the device's opt-in limit;
    - a BLOCK_M or BLOCK_N above max(32, next_power_of_2(N)): only padding would be computed;
    - ``warp_specialize`` without tensor descriptors (Triton specialises warps only around TMA loads);
    - 4 warps with BLOCK_M >= 64 on the pointer path for D > 64 (spills, per the compile report);
    - ``extra(cfg)``: a kernel's own reason (empty string keeps the config).
    """
    limit = max_shared_memory(device) if max_smem is None else max_smem  # max_smem: an AOT target's
    bd = block_d(head_dim)
    cap = max(32, triton.next_power_of_2(n))
    kept = []
    for cfg in configs:
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        ws = cfg.kwargs.get("WARP_SPECIALIZE", False)
        need = smem_bytes(bm, bn, bd, cfg.num_stages, elsize, tma, ws)
        why = ""
        if need > limit:
            why = f"needs {need} B of shared memory > {limit}"
        elif bm > cap or bn > cap:
            why = f"tile larger than next_power_of_2(N={n})"
        elif ws and not tma:
            why = "warp specialisation needs the tensor-descriptor (TMA) path"
        elif not tma and head_dim > 64 and cfg.num_warps == 4 and bm >= 64:
            # compile report (Triton 3.9, sm80 and sm90a cp.async): 192-728 B of spills at D = 72 / 128
            why = "4 warps spill registers on the pointer (cp.async) path for D > 64"
        else:
            why = extra(cfg)
        if why:
            _log.debug("drop %s: %s", cfg, why)
        else:
            kept.append(cfg)
    if not kept:
        kept = [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))]
    return kept


def use_tma(*tensors: torch.Tensor) -> bool:
    """Whether the tensor-descriptor (TMA) path can serve these ``[B, H, N, D]`` tensors: a CUDA device of
    compute capability >= 9, 16-byte aligned base pointers and 16-byte multiples for every stride but the
    last (TMA's rules). The interpreter runs the descriptor path too (device-side descriptors work there)."""
    t0 = tensors[0]
    if INTERPRET:
        return False
    if t0.device.type != "cuda" or torch.cuda.get_device_capability(t0.device)[0] < 9:
        return False
    for t in tensors:
        es = t.element_size()
        if t.data_ptr() % 16 or any((s * es) % 16 for s in t.stride()[:-1]):
            return False
    return True


def row_align(*tensors: torch.Tensor) -> int:
    """Largest power of two <= 16 that divides every stride but the last of ``tensors`` (in elements) and
    their base addresses (in elements): the kernels' ROW_ALIGN. Triton's launch specialisation only marks
    integers divisible by 16, so the row stride 72 of a D = 72 tensor looked unaligned and every gather fell
    back to 2-byte loads (no cp.async, many address registers); with ``tl.multiple_of(stride, ROW_ALIGN)``
    the compiler sees 16-byte rows again."""
    align = 16
    for t in tensors:
        es = t.element_size()
        for v in list(t.stride()[:-1]) + [t.data_ptr() // es if t.data_ptr() % es == 0 else 1]:
            while align > 1 and v % align:
                align //= 2
    return align


def strides_row_align(*strides: int) -> int:
    """row_align for integer strides alone (ahead-of-time variants, 16-byte aligned base pointers)."""
    align = 16
    for v in strides:
        while align > 1 and v % align:
            align //= 2
    return align


_ALLOCATOR_SET = False


def ensure_tma_allocator() -> None:
    """Device-side tensor descriptors need a global scratch allocator (Triton's rule): install a torch one once."""
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET = True
