"""The compile report: every kernel x autotune config x target x dtype x head dim x capture mode, compiled
ahead of time for NVIDIA GPUs on a machine without one, and what the compiler made of it.

``seg4diff-fast compile-report [--targets sm80,sm90a,sm100a] [--json FILE] [--quick] [--kernels ...] [--verbose]``

Each kernel module of ``seg4diff_fast.kernels.KERNEL_MODULES`` lists its variants with
``aot_variants(target, dtype, head_dim, capture)`` (interface: ``kernels/_aot.py``). Each variant is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32), options=dict(num_warps, num_stages))``
in a worker process (at most 2, niced), with a fresh Triton cache so that ``compile_s`` is a real compile.
The workers first count the variants of every job (the progress counter's total is the report's row count),
then compile them one variant at a time. One row per variant (``ROW_FIELDS``):

- ``selectable``: the kernel's own autotune prune keeps this config for that launch on that target;
- ``ok`` / ``error``: it compiled to a cubin / the first lines of the compiler's message;
- ``registers``, ``spill_bytes``: per thread, from ptxas' verbose output for the cubin (``Used N registers``,
  ``N bytes spill stores``);
- ``smem_bytes``: shared memory per program, the compiled kernel's own metadata (``metadata.shared``);
- ``main_loop``: how the K/V tiles reach shared memory, from the PTX: ``"tma"`` (``cp.async.bulk.tensor``),
  ``"cp.async"`` (16-byte ``cp.async.cg/ca``: pipelined), ``"sync"`` (neither: plain loads, no overlap);
- ``warp_specialized``: the TTGIR has a ``ttg.warp_specialize`` region (producer / consumer warp groups);
- ``compile_s``: wall seconds of ``triton.compile`` (ptxas included);
- ``compiler_output``: for a variant that did not compile, all the compiler wrote to stdout and stderr (MLIR
  diagnostics and pass reproducers come from C++, on file descriptor 2: they are caught there, not printed on
  the terminal; ``--verbose`` prints them too); None for a variant that compiled;
- ``loops``: the innermost loops of the cubin's SASS (``cuobjdump -sass``) that hold tensor-core instructions
  (``sass_loops.mma_loops``: instructions, tensor-core instructions, instructions per tensor-core instruction,
  ``kind`` ``online-softmax`` / ``exp`` / ``mma``, the mix); None for a variant that did not compile;
- ``floor``: for the modules with an attention main loop (``FLOORED_MODULES``: the attention phase, the fused
  kernel; in ``--quick``, fp16 rows only), the floor (``compile_floor.py``: the plainest FlashAttention-2 forward)
  compiled at the variant's config (target, dtype, head dim, tile, warps, stages, warp specialisation, load path):
  ``{"ok", "error", "loops", "compile_s"}``; None for the other modules.

The table is followed by the main-loop section (``format_loops``): each variant's loops, the floor's beside them.

``capture`` is the capture mode of the launch (``kernels/_aot.py``); for the backward of the maps
(``maps_bwd_dq`` / ``maps_bwd_dk``) it names the maps whose gradients flow back (``i2t-mean``: the head-mean
i2t map over 77 selected columns; ``both-all``: both maps per head; ``none``: no backward launch, no rows).

:func:`row_problems` says what is wrong with a selectable row (the checks CI runs, tests/test_compile_report.py),
the main-loop check included (:func:`main_loop_problems`: at most ``FLOOR_MARGIN`` = 3 % more instructions per
tensor-core instruction than the floor's loop).

Triton's interpreter (``TRITON_INTERPRET=1``) replaces every ``@triton.jit`` function, so nothing here imports a
kernel in the calling process: workers are spawned with ``TRITON_INTERPRET`` removed from their environment.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .bench.command import one_line_errors
from .sass_loops import MIX, mma_loops

__all__ = [
    "ROW_FIELDS", "DTYPES", "HEAD_DIMS", "Job", "plan", "quick_plan", "compile_jobs", "row_problems",
    "format_table", "register_commands", "run",
]

# Fields of every JSON row, in this order.
ROW_FIELDS = (
    "kernel", "target", "dtype", "head_dim", "capture", "block_m", "block_n", "num_warps", "num_stages",
    "selectable", "ok", "error", "registers", "spill_bytes", "smem_bytes", "main_loop", "warp_specialized",
    "compile_s", "compiler_output", "loops", "floor",
)
DTYPES = ("float16", "bfloat16", "float32")
# 64 and 128: SD3 / Flux; 72: not a multiple of 16 (the head-dim mask must not cost the pipelining).
HEAD_DIMS = (64, 128, 72)
MAX_JOBS = 2
# The CI subset (--quick): the two targets the project ships for, the two half types, every head dim, the capture
# mode Seg4Diff runs (which holds the attention main loop too), selectable configs only.
QUICK = dict(targets=("sm80", "sm90a"), dtypes=("float16", "bfloat16"), head_dims=HEAD_DIMS,
             captures=("i2t-mean",), selectable_only=True)
# Narrower for some modules, to keep CI at about two CPU-minutes: the maps' backward (two kernels) in bf16 only
# (training's dtype; fp16 compiles to the same loops) and at D 64 and 72 (72 shares BLOCK_D = 128 with 128 and
# adds the head-dim mask).
QUICK_NARROWER = {"seg4diff_fast.kernels.maps_backward": dict(dtypes=("bfloat16",), head_dims=(64, 72))}
# The attention phase (capture "none") only on sm90a, fp16, D 64: its warp-specialised configs against the floor.
QUICK_NARROWER["seg4diff_fast.kernels.attention"] = dict(targets=("sm90a",), dtypes=("float16",), head_dims=(64,),
                                                         captures=("none",))
# Modules whose rows hold an attention main loop (an online softmax): each variant is compiled beside the floor
# (seg4diff_fast/compile_floor.py) at the same config, and --check holds its main loop to FLOOR_MARGIN of the floor's.
FLOORED_MODULES = ("seg4diff_fast.kernels.attention", "seg4diff_fast.kernels.joint_attention")
FLOOR_MARGIN = 0.03
# The CI subset compiles the floor beside fp16 rows only: bf16 compiles to the same main loops (every row of the
# subset, 2026-12-07) and the floor's compiles were a fifth of the subset's compile time (226 of 1132 s).
QUICK_FLOOR_DTYPES = ("float16",)


# The variants of one kernel module for one (target, dtype, head dim, capture); workers compile them one at a time.
# (module, target, dtype, head_dim, capture, selectable_only, floor: compile the floor beside FLOORED_MODULES' rows)
Job = Tuple[str, str, str, int, str, bool, bool]


def _targets_and_captures():
    """TARGETS and CAPTURE_MODES of kernels/_aot.py (torch + triton only: safe under the interpreter)."""
    from .kernels import _aot

    return _aot.TARGETS, _aot.CAPTURE_MODES


def _modules(kernels: Optional[Sequence[str]]) -> List[str]:
    from .kernels import KERNEL_MODULES

    if not kernels:
        return list(KERNEL_MODULES)
    short = {m.rsplit(".", 1)[-1]: m for m in KERNEL_MODULES}
    unknown = [k for k in kernels if k not in short]
    if unknown:
        raise ValueError(f"--kernels: unknown kernel module(s) {unknown}; expected some of {sorted(short)}")
    return [short[k] for k in kernels]


def plan(
    targets: Sequence[str],
    dtypes: Sequence[str] = DTYPES,
    head_dims: Sequence[int] = HEAD_DIMS,
    captures: Optional[Sequence[str]] = None,
    kernels: Optional[Sequence[str]] = None,
    selectable_only: bool = False,
    floor: bool = True,
) -> List[Job]:
    """The jobs of a report; raises ValueError naming the bad value."""
    all_targets, all_captures = _targets_and_captures()
    for t in targets:
        if t not in all_targets:
            raise ValueError(f"--targets: unknown target {t!r}; expected some of {','.join(all_targets)}")
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"--dtypes: unknown dtype {d!r}; expected some of {','.join(DTYPES)}")
    for h in head_dims:
        if not 1 <= h <= 256:
            raise ValueError(f"--head-dims: {h} is not a head dim the kernels take (1..256)")
    captures = tuple(all_captures) if captures is None else tuple(captures)
    for c in captures:
        if c not in all_captures:
            raise ValueError(f"--captures: unknown capture mode {c!r}; expected some of {','.join(all_captures)}")
    return [(m, t, d, int(h), c, selectable_only, floor)
            for m in _modules(kernels) for t in targets for d in dtypes for h in head_dims for c in captures]


def quick_plan(kernels: Optional[Sequence[str]] = None, targets: Optional[Sequence[str]] = None) -> List[Job]:
    """The CI subset (``--quick``), see ``QUICK``, ``QUICK_NARROWER`` and ``QUICK_FLOOR_DTYPES``."""
    jobs: List[Job] = []
    for module in _modules(kernels):
        q = dict(QUICK, **QUICK_NARROWER.get(module, {}))
        if targets:
            q["targets"] = tuple(targets)
        jobs += [job[:6] + (job[2] in QUICK_FLOOR_DTYPES,) for job in plan(kernels=[module.rsplit(".", 1)[-1]], **q)]
    return jobs


# ------------------------------------------------------------------------------------------------------------
# Worker side: runs in a spawned process whose environment has no TRITON_INTERPRET.

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores")
# 16-byte asynchronous copies global -> shared (cp.async.cg only moves 16 bytes; .ca may move 4, 8 or 16).
_CP_ASYNC_16 = re.compile(r"cp\.async\.(?:cg|ca)\.shared\.global[^;]*?,\s*(?:16|0x10)\s*[,;]")


def _worker_init() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # pragma: no cover - guarded by _pool
        raise RuntimeError("compile-report worker started with TRITON_INTERPRET set")
    with contextlib.suppress(OSError):
        os.nice(max(0, 10 - os.nice(0)))  # niceness 10, not more when the caller is niced already


def _main_loop(ptx: str) -> str:
    if "cp.async.bulk.tensor" in ptx:
        return "tma"
    if _CP_ASYNC_16.search(ptx):
        return "cp.async"
    return "sync"


def _short_error(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = f"{type(e).__name__}: " + " | ".join(lines[:3])
    return text[:400]


@contextlib.contextmanager
def _process_output(text: List[str]):
    """Everything this process writes to stdout and stderr inside the block, Python's and C++'s alike (ptxas -v
    is printed by Python; MLIR diagnostics and reproducers go straight to file descriptor 2), caught in a
    temporary file instead of the terminal; appended to ``text`` when the block ends."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as f, open(f.fileno(), "w", closefd=False, errors="replace") as py:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            with contextlib.redirect_stdout(py), contextlib.redirect_stderr(py):
                yield
        finally:
            py.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            f.seek(0)
            text.append(f.read().decode(errors="replace"))


def _compile_variant(variant, arch: int) -> Dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    row = dict(ok=False, error=None, registers=None, spill_bytes=None, smem_bytes=None, main_loop=None,
               warp_specialized=None, compile_s=None, compiler_output=None, loops=None)
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v output is printed: caught below
    output: List[str] = []
    t0 = time.perf_counter()
    try:
        with _process_output(output):
            kernel = triton.compile(variant.ast_source(), target=GPUTarget("cuda", arch, 32),
                                    options=variant.options())
    except Exception as e:  # noqa: BLE001 - every compiler failure becomes a row
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        row["error"] = _short_error(e)
        row["compiler_output"] = "".join(output)
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    text = "".join(output)
    regs, spill = _PTXAS_REGS.findall(text), _PTXAS_SPILL.findall(text)
    row.update(
        ok=True,
        registers=int(regs[-1]) if regs else None,
        spill_bytes=int(spill[-1]) if spill else None,
        smem_bytes=int(kernel.metadata.shared),
        main_loop=_main_loop(kernel.asm["ptx"]),
        warp_specialized="ttg.warp_specialize" in kernel.asm["ttgir"],
    )
    if regs == [] or spill == []:
        row["error"] = "ptxas -v output not found: registers / spills unknown"
    try:
        row["loops"] = mma_loops(_sass(kernel.asm["cubin"]))
    except (OSError, subprocess.SubprocessError) as e:  # the row stays; its loops are unknown (None), and say why
        row["error"] = f"no SASS (cuobjdump): {_short_error(e)}"
    return row


def _sass(cubin: bytes) -> str:
    """``cuobjdump -sass`` of a cubin (the cuobjdump Triton ships)."""
    from triton import knobs

    with tempfile.TemporaryDirectory(prefix="seg4diff-sass-") as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", path], capture_output=True, text=True,
                              check=True).stdout


@functools.lru_cache(maxsize=None)
def _floor_row(target: str, dtype: str, head_dim: int, block_m: int, block_n: int, num_warps: int, num_stages: int,
               warp_specialize: bool, use_tma: bool) -> Dict:
    """The floor (``compile_floor.py``) compiled at one config: ``{"ok", "error", "loops", "compile_s"}`` (once per
    worker and config: the fused kernel's capture modes and the attention phase share configs)."""
    import torch

    from . import compile_floor
    from .kernels import _aot

    try:
        variant = compile_floor.floor_variant(target, getattr(torch, dtype), head_dim, block_m, block_n, num_warps,
                                              num_stages, warp_specialize, use_tma)
    except Exception as e:  # noqa: BLE001 - a floor that cannot be built is reported, not raised
        return dict(ok=False, error=_short_error(e), loops=None, compile_s=0.0)
    row = _compile_variant(variant, _aot.TARGETS[target].arch)
    return dict(ok=row["ok"], error=row["error"] if not row["ok"] else None, loops=row["loops"],
                compile_s=row["compile_s"])


@functools.lru_cache(maxsize=None)
def _job_variants(job: Job) -> list:
    """The variants of ``job`` that get a row (the selectable ones only, with ``selectable_only``); listed once
    per worker (the variants of one job reach a worker one at a time). Raises what ``aot_variants`` raises."""
    import importlib

    import torch

    module, target, dtype, head_dim, capture, selectable_only, _ = job
    variants = importlib.import_module(module).aot_variants(target, getattr(torch, dtype), head_dim, capture)
    return [v for v in variants if v.selectable or not selectable_only]


def _count_rows(job: Job) -> int:
    """The number of rows of ``job``: one per variant, or one (failed) row when its variants cannot be listed."""
    try:
        return len(_job_variants(job))
    except Exception:  # noqa: BLE001 - _compile_unit makes the row that says why
        return 1


def _compile_unit(unit: Tuple[Job, int]) -> Dict:
    """The row of variant ``index`` of ``job`` (``unit = (job, index)``)."""
    from .kernels import _aot

    job, index = unit
    module, target, dtype, head_dim, capture, _, with_floor = job
    row = dict(kernel=module.rsplit(".", 1)[-1], target=target, dtype=dtype, head_dim=head_dim, capture=capture)
    try:
        v = _job_variants(job)[index]
    except Exception as e:  # noqa: BLE001 - a module that cannot list its variants is one failed row
        row.update(ok=False, error=f"aot_variants: {_short_error(e)}")
    else:
        row.update(kernel=v.kernel, block_m=v.block_m, block_n=v.block_n, num_warps=v.num_warps,
                   num_stages=v.num_stages, selectable=bool(v.selectable))
        row.update(_compile_variant(v, _aot.TARGETS[target].arch))
        if module in FLOORED_MODULES and with_floor and row["ok"]:
            row["floor"] = _floor_row(target, dtype, head_dim, v.block_m, v.block_n, v.num_warps, v.num_stages,
                                      bool(v.constexprs.get("WARP_SPECIALIZE", False)),
                                      bool(v.constexprs.get("USE_TMA", False)))
    return {f: row.get(f) for f in ROW_FIELDS}


# ------------------------------------------------------------------------------------------------------------
# Parent side.


@contextlib.contextmanager
def _worker_environment(cache_dir: str):
    """Environment the spawned workers inherit: no interpreter, a fresh Triton cache, fp fusion as at launch."""
    saved = dict(os.environ)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's launch default; silences its warning
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def compile_jobs(jobs: Sequence[Job], processes: int = MAX_JOBS, progress=None) -> List[Dict]:
    """Compile every variant of every job in ``processes`` (<= 2) spawned, niced workers; rows in job order.

    ``progress(done, total, row)`` is called after each row: ``total`` is the number of rows this returns."""
    processes = max(1, min(int(processes), MAX_JOBS, len(jobs) or 1))
    cache_dir = tempfile.mkdtemp(prefix="seg4diff-compile-report-")
    rows: List[Dict] = []
    try:
        ctx = multiprocessing.get_context("spawn")
        with _worker_environment(cache_dir):
            # multiprocessing.Pool starts its workers here, inside the cleaned environment.
            pool = ctx.Pool(processes, initializer=_worker_init)
        with pool:
            counts = pool.map(_count_rows, jobs)
            units = [(job, i) for job, n in zip(jobs, counts) for i in range(n)]
            for row in pool.imap(_compile_unit, units):
                rows.append(row)
                if progress is not None:
                    progress(len(rows), len(units), row)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return rows


def row_problems(row: Dict, max_shared_memory: Optional[int] = None) -> List[str]:
    """What is wrong with a compiled variant, as CI judges a selectable config: it must compile, not spill,
    fit the target's shared memory, pipeline its loads (TMA or cp.async) and, beside the floor, keep its attention
    main loop within 3 % of the floor's (``main_loop_problems``)."""
    if max_shared_memory is None:
        max_shared_memory = _targets_and_captures()[0][row["target"]].max_shared_memory
    if not row["ok"]:
        return [f"does not compile: {row['error']}"]
    problems = []
    if row["spill_bytes"] is None:
        problems.append("spills unknown (ptxas -v output not parsed)")
    elif row["spill_bytes"] > 0:
        problems.append(f"spills {row['spill_bytes']} bytes")
    if row["smem_bytes"] > max_shared_memory:
        problems.append(f"needs {row['smem_bytes']} B of shared memory > {max_shared_memory}")
    if row["main_loop"] == "sync":
        problems.append("loads synchronously (no cp.async / TMA)")
    return problems + main_loop_problems(row)


def _softmax_loops(loops) -> List[Dict]:
    return [loop for loop in loops or () if loop["kind"] == "online-softmax"]


def _paired_loops(row: Dict) -> List[Tuple[Dict, Dict]]:
    """Our loops paired with the floor's of the same kind, in address order, for each kind the floor has: its
    online-softmax loops (one per consumer partition when warp-specialised), or, where no floor loop holds both the
    softmax and the tensor-core instructions (sm100a's warp specialisation issues the MMAs from a partition of their
    own), its ``mma`` loops. Raises ValueError when the counts differ."""
    floor = row["floor"]["loops"] or []
    pairs = []
    for kind in sorted({loop["kind"] for loop in floor}):
        ours = [loop for loop in row["loops"] or () if loop["kind"] == kind]
        theirs = [loop for loop in floor if loop["kind"] == kind]
        if len(ours) != len(theirs):
            raise ValueError(f"{len(ours)} {kind} main loops, the floor has {len(theirs)}")
        pairs += list(zip(ours, theirs))
    return pairs


def main_loop_problems(row: Dict) -> List[str]:
    """The main-loop check of a row compiled beside the floor (``row["floor"]`` not None): each of our loops of a
    kind the floor has (the attention main loop; a warp-specialised kernel has one per consumer partition, in address
    order; see ``_paired_loops``) may have at most ``FLOOR_MARGIN`` more instructions per tensor-core instruction
    than the floor's loop at the same position. Rows without a floor: none."""
    floor = row.get("floor")
    if floor is None or not row["ok"]:
        return []
    if not floor["ok"]:
        return [f"main loop not judged: the floor does not compile ({floor['error']})"]
    if not floor["loops"]:
        return ["main loop not judged: no loop with tensor-core instructions in the floor's SASS"]
    if not _softmax_loops(row["loops"]) and _softmax_loops(floor["loops"]):
        return ["no attention main loop (online softmax with tensor-core instructions) found in the SASS"]
    try:
        pairs = _paired_loops(row)
    except ValueError as e:
        return [str(e)]
    problems = []
    for a, b in pairs:
        excess = (a["instructions"] / a["mma"]) / (b["instructions"] / b["mma"]) - 1
        if excess > FLOOR_MARGIN:
            problems.append(f"main loop {a['start']}: {a['instructions']} instructions per {a['mma']} tensor-core "
                            f"({a['per_mma']}), {100 * excess:.1f} % over the floor's {b['instructions']} per "
                            f"{b['mma']} ({b['per_mma']})")
    return problems


def row_label(row: Dict) -> str:
    """``joint_attention sm90a float16 D=128 i2t-mean 128x64 w4 s3``: one variant, in words."""
    return (f"{row['kernel']} {row['target']} {row['dtype']} D={row['head_dim']} {row['capture']} "
            f"{row['block_m']}x{row['block_n']} w{row['num_warps']} s{row['num_stages']}")


_COLUMNS = (  # header, field, width
    ("kernel", "kernel", 16), ("target", "target", 6), ("dtype", "dtype", 8), ("D", "head_dim", 3),
    ("capture", "capture", 8), ("tile", None, 7), ("w", "num_warps", 1), ("s", "num_stages", 1),
    ("sel", "selectable", 3), ("regs", "registers", 4), ("spill", "spill_bytes", 5), ("smem", "smem_bytes", 6),
    ("loop", "main_loop", 8), ("ws", "warp_specialized", 3), ("sec", "compile_s", 5), ("check", None, 0),
)


def _cell(row: Dict, field: Optional[str], header: str) -> str:
    if header == "tile":
        return f"{row['block_m']}x{row['block_n']}" if row["block_m"] is not None else "-"
    if header == "check":
        if not row["ok"]:
            return "FAIL " + (row["error"] or "")[:90]
        problems = row_problems(row)
        return ("" if row["selectable"] else "(not selectable) ") + ("; ".join(problems) if problems else "ok")
    value = row[field]
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if field == "dtype":
        return {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(value, value)
    return str(value)


def format_table(rows: Iterable[Dict]) -> str:
    lines = ["  ".join(f"{h:<{w}}" if w else h for h, _, w in _COLUMNS)]
    for row in rows:
        lines.append("  ".join(f"{_cell(row, f, h):<{w}}" if w else _cell(row, f, h) for h, f, w in _COLUMNS))
    return "\n".join(lines)


_MIX_HEADERS = {"ex2": "EX2", "ffma": "FFMA", "fmul": "FMUL", "fadd": "FADD", "fmnmx": "MNMX", "select": "sel",
                "compare": "cmp", "barrier": "bar", "ldst": "ld/st", "convert": "cvt", "other": "other"}


def format_loops(rows: Iterable[Dict]) -> str:
    """The main-loop section: per compiled variant, each innermost SASS loop holding tensor-core instructions
    (``sass_loops.mma_loops``) with its instruction count, tensor-core instructions, instructions per tensor-core
    instruction and mix; under a variant compiled beside the floor, the floor's loops (``floor`` lines) and, on
    each of our attention main loops, how far it is over the floor's (``vs floor``)."""
    mix = [name for name, _ in MIX] + ["other"]
    head = (f"{'variant':<58}  {'loop':<7}  {'kind':<14}  {'instr':>5}  {'mma':>4}  {'i/mma':>6}  {'vs floor':>8}  "
            + "  ".join(f"{_MIX_HEADERS[m]:>5}" for m in mix))
    lines = [head]

    def line(label, i, loop, versus):
        return (f"{label:<58}  {loop['start']:<7}  {loop['kind']:<14}  {loop['instructions']:>5}  {loop['mma']:>4}  "
                f"{loop['per_mma']:>6}  {versus:>8}  " + "  ".join(f"{loop['mix'][m]:>5}" for m in mix))

    for row in rows:
        if not row["ok"] or row["loops"] is None:
            continue
        label = row_label(row) + ("" if row["selectable"] else " (n.s.)")
        floor = row.get("floor")
        try:
            pairs = {id(a): b for a, b in _paired_loops(row)} if floor and floor["ok"] else {}
        except ValueError:
            pairs = {}
        if not row["loops"]:
            lines.append(f"{label:<58}  (no loop with tensor-core instructions)")
        for i, loop in enumerate(row["loops"]):
            versus = ""
            if id(loop) in pairs:
                b = pairs[id(loop)]
                versus = f"{100 * ((loop['instructions'] / loop['mma']) / (b['instructions'] / b['mma']) - 1):+.1f}%"
            lines.append(line(label if i == 0 else "", i, loop, versus))
        if floor is not None:
            if not floor["ok"]:
                lines.append(f"{'  floor':<58}  does not compile: {floor['error']}")
            for loop in floor["loops"] or ():
                lines.append(line("  floor" + ("-ws" if row["warp_specialized"] else ""), 0, loop, ""))
    return "\n".join(lines)


def _csv(value: str, flag: str) -> List[str]:
    items = [x.strip() for x in value.split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{flag} needs at least one comma-separated value")
    return items


def register_commands(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compile-report",
        help="compile every kernel config ahead of time for sm80/sm90a/sm100a (no GPU needed) and report "
             "registers, spills, shared memory, load pipelining and the main loops' SASS beside a floor kernel's",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--targets", default="sm80,sm90a,sm100a",
                   help="comma-separated targets: sm80, sm90a, sm100a (default: all three; --quick: sm80,sm90a)")
    p.add_argument("--dtypes", default=",".join(DTYPES),
                   help=f"comma-separated input dtypes (default: {','.join(DTYPES)})")
    p.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)),
                   help=f"comma-separated head dims (default: {','.join(map(str, HEAD_DIMS))})")
    p.add_argument("--captures", default=None,
                   help="comma-separated capture modes: none, i2t-mean, both-all (default: all three)")
    p.add_argument("--kernels", nargs="+", default=None, metavar="MODULE",
                   help="kernel modules to compile, e.g. joint_attention (default: every module of "
                        "seg4diff_fast.kernels.KERNEL_MODULES)")
    p.add_argument("--quick", action="store_true",
                   help="the CI subset: sm80,sm90a x fp16,bf16 x D 64,128,72 x i2t-mean, selectable configs "
                        "only; the maps' backward in bf16 at D 64,72 only; the attention phase on sm90a in fp16 at "
                        "D 64; the floor beside fp16 rows only (default: off)")
    p.add_argument("--selectable-only", action="store_true",
                   help="skip configs the autotune prune drops (default: off)")
    from .cli import integer

    p.add_argument("--jobs", type=integer(1, MAX_JOBS), default=MAX_JOBS,
                   help=f"worker processes, 1..{MAX_JOBS} (default: {MAX_JOBS})")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="also write the rows as JSON to FILE, rewritten after each compiled variant so that an "
                        "interrupted report keeps its rows; a variant that does not compile keeps the compiler's "
                        "output there (compiler_output) (default: none)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when a selectable config fails the CI checks: compiles, no spill, fits shared "
                        "memory, pipelined loads, and an attention main loop (attention phase, fused kernel) at most "
                        "3 %% over the floor's instructions per tensor-core instruction (default: off)")
    p.add_argument("--verbose", action="store_true",
                   help="also print to stderr what the compiler wrote for each variant that does not compile (MLIR "
                        "diagnostics, pass reproducers; some configs are expected to fail); without it only the "
                        "progress counter goes to stderr (default: off)")
    one_line_errors(p)
    p.set_defaults(func=run, _parser=p)
    return p


def _jobs_from_args(args) -> List[Job]:
    targets = _csv(args.targets, "--targets")
    kernels = args.kernels
    if args.quick:
        fixed = [flag for flag, given in (("--dtypes", args.dtypes != ",".join(DTYPES)),
                                          ("--head-dims", args.head_dims != ",".join(map(str, HEAD_DIMS))),
                                          ("--captures", args.captures is not None)) if given]
        if fixed:
            raise ValueError(f"{fixed[0]}: not allowed with --quick (the CI subset fixes it; only --targets and "
                             "--kernels narrow it)")
        explicit_targets = args.targets != "sm80,sm90a,sm100a"
        return quick_plan(kernels=kernels, targets=targets if explicit_targets else None)
    head_dims = []
    for h in _csv(args.head_dims, "--head-dims"):
        if not h.isdigit():
            raise ValueError(f"--head-dims: {h!r} is not a positive integer")
        head_dims.append(int(h))
    return plan(targets, _csv(args.dtypes, "--dtypes"), head_dims,
                None if args.captures is None else _csv(args.captures, "--captures"), kernels,
                selectable_only=args.selectable_only)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def run(args) -> int:
    parser = getattr(args, "_parser", None)
    try:
        if not 1 <= args.jobs <= MAX_JOBS:
            raise ValueError(f"--jobs: expected 1..{MAX_JOBS}, got {args.jobs}")
        jobs = _jobs_from_args(args)
        if args.json and os.path.isdir(args.json):
            raise ValueError(f"--json: {args.json} is a folder, expected a file name")
    except (ValueError, argparse.ArgumentTypeError) as e:
        if parser is None:
            raise
        parser.error(str(e))  # one line, exit code 2

    from ._io import atomic_write_json

    t0 = time.perf_counter()
    done_rows: List[Dict] = []

    def progress(done, total, row):
        if args.verbose and row["compiler_output"]:
            print(f"\r{row_label(row)}: {row['error']}\n{row['compiler_output'].rstrip()}", file=sys.stderr)
        print(f"\r[{done}/{total} variants] {time.perf_counter() - t0:6.1f} s", end="", file=sys.stderr, flush=True)
        done_rows.append(row)
        if args.json:  # rewritten whole after each variant: an interrupted report keeps what it compiled
            atomic_write_json(args.json, done_rows)

    # SIGTERM ends the run like Ctrl-C: the pool's workers are terminated and the temporary cache removed.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if _main_thread() else None
    try:
        rows = compile_jobs(jobs, args.jobs, progress=progress)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(file=sys.stderr)
    print(format_table(rows))
    print("\nMain loops: the innermost SASS loops with tensor-core instructions (instructions, tensor-core ones, "
          "instructions per tensor-core one, the mix); attention main loops beside the floor's "
          f"(--check: at most {100 * FLOOR_MARGIN:.0f} % over)")
    print(format_loops(rows))
    failing = [r for r in rows if r["selectable"] and row_problems(r)]
    print(f"\n{len(rows)} variants in {time.perf_counter() - t0:.1f} s; {sum(r['ok'] for r in rows)} compiled; "
          f"{len(failing)} selectable variants fail a CI check")
    if args.json:
        atomic_write_json(args.json, rows)
        print(f"wrote {args.json}")
    return 1 if args.check and failing else 0
