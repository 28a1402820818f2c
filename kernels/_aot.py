"""Ahead-of-time compilation interface: what each kernel module hands to the compile report.

A kernel module exposes

    aot_variants(target: str, dtype: torch.dtype, head_dim: int, capture: str) -> list[KernelVariant]

one :class:`KernelVariant` per (kernel, autotune config) that a launch with that target, input dtype, head
dim and capture mode could run. ``seg4diff_fast.compile_report`` compiles each one with
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
options=dict(num_warps=..., num_stages=...))`` on a machine without a GPU, and reads registers, spills,
shared memory and the shape of the main loop from what the compiler produced.

Launch realism: the argument types and specialisation attributes of a variant are computed by Triton's own
launch-time specialisation (``native_specialize_impl``, what ``JITFunction.run`` calls) on representative
argument values: :class:`DevicePointer` stand-ins for tensors (16-byte aligned, as every PyTorch allocation
is), and the real integer values (strides, N, ...) of a representative shape. So an integer gets
``tt.divisibility=16`` exactly when a real launch would give it, an integer equal to 1 becomes a constant, and
``triton.heuristics`` values are computed by the kernel's own heuristics.

Capture modes (``CAPTURE_MODES``): what the kernel is asked to write beside ``out``.

- ``"none"``: attention only (``out``; the main loop alone);
- ``"i2t-mean"``: Seg4Diff's own setting: image x text probabilities averaged over heads, restricted to
  selected text columns (``text_index``);
- ``"both-all"``: both maps (i2t and t2i), per head, every text column: the most code and registers.

For a backward kernel (``maps_backward.py``) the mode names the maps whose gradients flow back (``"none"``: no
map, no backward launch, no variant).

A module lists, for each mode, the kernels a launch in that mode runs: a kernel that the mode does not launch
is left out (a capture-only kernel has no variant under ``"none"``); a kernel whose code does not depend on
the mode (an attention phase that writes ``out`` and lse only) is listed under ``"none"`` alone, so that it is
compiled once, not once per mode. A dtype or head dim the kernel does not take gives an empty list.
``selectable`` must be the kernel's own autotune prune for that launch with the target's shared memory
(``TARGETS[target].max_shared_memory``), not a copy of its rules.

This module imports only torch and triton (kernels/ knows nothing of models or diffusers).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Tuple

import torch
import triton

__all__ = [
    "KernelVariant",
    "DevicePointer",
    "Target",
    "TARGETS",
    "CAPTURE_MODES",
    "parse_capture",
    "sd3_launch",
    "jit_function",
    "launch_variant",
    "contiguous_strides",
    "check_target",
]

CAPTURE_MODES = ("none", "i2t-mean", "both-all")


@dataclass(frozen=True)
class Target:
    """A compilation target: ``arch`` for ``GPUTarget("cuda", arch, 32)`` and the per-block shared memory
    the hardware lets one program opt into (bytes; ``cudaDevAttrMaxSharedMemoryPerBlockOptin``)."""

    name: str
    arch: int
    max_shared_memory: int


# A100 (sm_80): 163 KiB; H100 (sm_90a) and B200 (sm_100a): 227 KiB.
TARGETS: Dict[str, Target] = {
    "sm80": Target("sm80", 80, 166912),
    "sm90a": Target("sm90a", 90, 232448),
    "sm100a": Target("sm100a", 100, 232448),
}


def parse_capture(capture: str) -> Tuple[bool, bool, bool, bool]:
    """``capture`` mode -> ``(capture_i2t, capture_t2i, heads_mean, has_text_index)``."""
    table = {
        "none": (False, False, False, False),
        "i2t-mean": (True, False, True, True),
        "both-all": (True, True, False, False),
    }
    if capture not in table:
        raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {capture!r}")
    return table[capture]


def sd3_launch(head_dim: int, has_index: bool = False) -> Tuple[int, int, int, int, int, int, int, int]:
    """The launch every ``aot_variants`` compiles: SD3-medium at 1024^2, ``[B, H, N, D] = [1, 24, 4250,
    head_dim]``, 4096 image tokens then 154 text tokens. Returns ``(B, H, N, D, text_start, text_stop, n_img, T)``
    with ``T`` the 77 selected CLIP columns when ``has_index``, else the whole text block."""
    B, H, N, D = 1, 24, 4250, int(head_dim)
    text_start, text_stop = 4096, 4250
    n_img, T = N - (text_stop - text_start), 77 if has_index else text_stop - text_start
    return B, H, N, D, text_start, text_stop, n_img, T


class DevicePointer:
    """Stand-in for a CUDA tensor argument at specialisation time: a dtype and a 16-byte aligned address
    (PyTorch's caching allocator aligns every block to at least 512 bytes, and the kernels' tensors are
    whole allocations or 16-byte aligned views). It can also be the base of a host-side
    ``triton.tools.tensor_descriptor.TensorDescriptor`` (TMA): Triton specialises that as
    ``tensordesc<fp16[BLOCK_M, BLOCK_D]>``."""

    def __init__(self, dtype: torch.dtype, address: int = 1 << 20):
        self.dtype = dtype
        self._address = address

    def data_ptr(self) -> int:
        return self._address

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


@dataclass
class KernelVariant:
    """One kernel x autotune config, specialised for one launch shape: everything ``triton.compile`` needs.

    ``signature`` maps every argument name to its Triton type (``"*fp16"``, ``"i32"``, ``"constexpr"``...);
    ``constexprs`` maps constexpr names to values (block sizes and flags); ``attrs`` maps argument-index
    tuples to specialisation attributes (``[["tt.divisibility", 16]]``) in ``ASTSource``'s format.
    ``selectable`` is True when the kernel's own autotune prune keeps this config for this shape and target.
    ``shape`` says in words which launch the values come from.
    """

    kernel: str
    fn: Any  # triton.runtime.jit.JITFunction
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    attrs: Dict[Tuple[int, ...], list]
    num_warps: int
    num_stages: int
    block_m: int
    block_n: int
    selectable: bool
    shape: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    def ast_source(self):
        from triton.compiler import ASTSource

        return ASTSource(self.fn, self.signature, self.constexprs, self.attrs)

    def options(self) -> Dict[str, int]:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


def jit_function(kernel) -> "triton.runtime.jit.JITFunction":
    """The ``JITFunction`` under ``triton.autotune`` / ``triton.heuristics`` wrappers."""
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        if not hasattr(fn, "fn"):
            raise TypeError(
                f"{kernel!r} is not a Triton JIT function (is TRITON_INTERPRET=1 set? the interpreter replaces "
                "every @triton.jit function; ahead-of-time compilation needs it unset before kernels are imported)"
            )
        fn = fn.fn
    return fn


def _heuristics(kernel, args: Dict[str, Any]) -> Dict[str, Any]:
    """Apply every ``triton.heuristics`` wrapper of ``kernel`` (outermost first, as at launch) to ``args``."""
    args = dict(args)
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        values = getattr(fn, "values", None)  # triton.runtime.autotuner.Heuristics
        if isinstance(values, dict):
            for name, rule in values.items():
                args[name] = rule(args)
        fn = fn.fn
    return args


def launch_variant(
    kernel_name: str,
    kernel,
    args: Mapping[str, Any],
    *,
    num_warps: int,
    num_stages: int,
    block_m: int,
    block_n: int,
    selectable: bool,
    shape: str = "",
) -> KernelVariant:
    """Build the variant a launch of ``kernel`` (a ``@triton.jit`` function, possibly under autotune /
    heuristics) with the argument values ``args`` would compile.

    ``args`` holds every kernel argument by name: :class:`DevicePointer` (or tensors) for pointers, ints and
    floats for scalars, and the constexpr values (config block sizes included); heuristics-computed
    constexprs are filled in here by the kernel's own heuristics.
    """
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    fn = jit_function(kernel)
    args = _heuristics(kernel, args)
    missing = [p.name for p in fn.params if p.name not in args]
    if missing:
        raise ValueError(f"launch_variant({kernel_name!r}): no value for kernel arguments {missing}")
    signature: Dict[str, str] = {}
    constexprs: Dict[str, Any] = {}
    attrs: Dict[Tuple[int, ...], list] = {}
    for i, p in enumerate(fn.params):
        value = args[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
            continue
        # Triton's own launch-time specialisation: (type, "D" if divisible by 16 / 16-byte aligned).
        ty, spec = native_specialize_impl(
            CUDABackend, value, p.is_const, not p.do_not_specialize, not p.do_not_specialize_on_alignment
        )
        signature[p.name] = ty
        if ty == "constexpr":  # an integer equal to 1 (or None): specialised into the code as a constant
            constexprs[p.name] = spec
        elif isinstance(spec, str):
            parsed = CUDABackend.parse_attr(spec)
            if parsed:
                attrs[(i,)] = parsed
    return KernelVariant(
        kernel=kernel_name,
        fn=fn,
        signature=signature,
        constexprs=constexprs,
        attrs=attrs,
        num_warps=num_warps,
        num_stages=num_stages,
        block_m=block_m,
        block_n=block_n,
        selectable=selectable,
        shape=shape,
    )


def contiguous_strides(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """Element strides of a contiguous tensor of ``shape``."""
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def check_target(target: str) -> Target:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {tuple(TARGETS)}, got {target!r}")
    return TARGETS[target]

