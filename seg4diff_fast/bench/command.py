"""The ``seg4diff-fast bench`` command: our capture path against Seg4Diff's full-map path and plain SDPA on one
SD3-like shape; one table with the spread, the speed and peak-memory ratios, and the results file on request."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ..attention import _interpreting
from .cases import DTYPES, Case
from .impls import BACKEND_IMPL, BENCH_DEFAULT_IMPLS, IMPLS
from .measure import run_cases
from .results import environment, format_table, write_results

__all__ = ["bench_case", "resolve_bench_impls", "register_commands", "run", "main", "one_line_errors", "int_range",
           "device_arg", "csv_arg"]

# Default shapes (SD3-like: 154 text tokens after the image, D 64), by device.
CUDA_SHAPE = dict(heads=24, head_dim=64, n_txt=154, n_img=4096, batch=1, dtype="float16")
CUDA_QUICK_SHAPE = dict(CUDA_SHAPE, n_img=1024)
CPU_SHAPE = dict(heads=4, head_dim=64, n_txt=154, n_img=1024, batch=1, dtype="float32")
# --quick on the CPU: 2 heads x (1024 image + 154 text), float32. Measured on the project's shared 2-core VM
# (1 torch thread, load average ~6 from other jobs), 3 runs of 3 timed calls per shape, torch-chunked vs full-map:
#   2 x 256:  p20-p80 spread up to 2x the median; full-map/ours 0.97, 1.21, 1.02 (which is faster flips)
#   2 x 1024: spread within ~20 %; ratio 2.92, 2.27, 2.57 (same answer every run); ~2.5 s per run
#   4 x 1024: ratio 2.61, 2.17, 1.72, ~3.3 s;   2 x 2048: ratio 3.25-3.82, spread ~5 %, but ~5 s per run
# so 2 x 1024 is the smallest shape where the comparison repeats.
CPU_QUICK_SHAPE = dict(heads=2, head_dim=64, n_txt=154, n_img=1024, batch=1, dtype="float32")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def bench_case(args, device: torch.device) -> Case:
    """The shape of ``bench``: SD3-like (text last), the options' sizes, or the device's defaults."""
    if device.type == "cuda":
        defaults = CUDA_QUICK_SHAPE if args.quick else CUDA_SHAPE
    else:
        defaults = CPU_QUICK_SHAPE if args.quick else CPU_SHAPE
    val = {k: (getattr(args, k) if getattr(args, k) is not None else d) for k, d in defaults.items()}
    return Case("sd3-like", None, val["batch"], val["heads"], val["head_dim"], val["n_txt"], val["n_img"],
                False, val["dtype"])


def resolve_bench_impls(backend: str, impls: Optional[str], device: torch.device) -> List[str]:
    """Implementation names for ``--impls`` (``"ours"`` = the ``--backend`` one); ValueError for unknown ones."""
    if impls:
        names = [n.strip() for n in impls.split(",") if n.strip()]
    else:
        names = list(BENCH_DEFAULT_IMPLS)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    names = [BACKEND_IMPL[backend] if n == "ours" else n for n in names]
    unknown = [n for n in names if n not in IMPLS]
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; known: {', '.join(IMPLS)}")
    if not names:
        raise ValueError("no implementation given")
    return names


# ------------------------------------------------------------------------------------------------------------
# Usage errors: one line naming the flag, exit code 2 (no usage block, no traceback).


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser.error`` print one line, ``<prog>: error: <message>``, and exit with code 2."""

    def error(message: str):
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    parser.error = error
    return parser


def int_range(lo: int, hi: Optional[int] = None):
    """An argparse ``type``: an integer in ``[lo, hi]`` (no upper bound when ``hi`` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f">= {lo}" if hi is None else f"in {lo}..{hi}"
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {value}")
        return value

    return parse


def device_arg(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return device


def csv_arg(choices: Optional[Sequence[str]] = None, item=str):
    """An argparse ``type``: comma-separated values, each converted by ``item`` (an argparse type) and, when
    ``choices`` is given, one of them."""

    def parse(text: str) -> list:
        values = [x.strip() for x in text.split(",") if x.strip()]
        if not values:
            raise argparse.ArgumentTypeError("expected at least one comma-separated value")
        out = []
        for v in values:
            if choices is not None and v not in choices:
                raise argparse.ArgumentTypeError(f"unknown value {v!r}; expected some of {','.join(choices)}")
            out.append(item(v))
        return out

    return parse


def _shape_text(shape) -> str:
    return (f"{shape['heads']} heads, D {shape['head_dim']}, {shape['n_txt']} text + {shape['n_img']} image "
            f"tokens, batch {shape['batch']}, {shape['dtype']}")


def register_commands(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to a ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "bench",
        help="time joint_attention with capture against the full-map path on this device",
        description=(
            "Times joint_attention (capture i2t, heads mean) against Seg4Diff's full-map path and plain SDPA "
            "on one SD3-like shape, and prints the median time and its p20-p80 spread, TFLOP/s (4 N^2 D H B / t), "
            "peak memory above the inputs (CUDA: the caching allocator's peak; CPU: the CPU allocator's traffic "
            "recorded by torch.profiler), the max abs error against a float64 reference on sampled rows, and "
            "the speed and peak-memory ratios of ours to the full-map path. Default shapes: "
            f"CUDA {_shape_text(CUDA_SHAPE)} (--quick: {CUDA_QUICK_SHAPE['n_img']} image tokens); "
            f"CPU {_shape_text(CPU_SHAPE)} (--quick: {_shape_text(CPU_QUICK_SHAPE)})."
        ),
    )
    one_line_errors(p)
    p.add_argument("--quick", action="store_true",
                   help="smaller shape, fewer repeats: seconds on a CPU (default: off)")
    p.add_argument("--device", type=device_arg, default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="input dtype (default: float16 on CUDA, float32 on the CPU)")
    p.add_argument("--n-img", type=int_range(1), default=None,
                   help="image tokens (default: 4096 on CUDA, 1024 on the CPU; --quick: 1024)")
    p.add_argument("--n-txt", type=int_range(1), default=None,
                   help="text tokens, placed after the image as in SD3 (default: 154)")
    p.add_argument("--heads", type=int_range(1), default=None,
                   help=f"attention heads (default: 24 on CUDA, {CPU_SHAPE['heads']} on the CPU; "
                        f"--quick on the CPU: {CPU_QUICK_SHAPE['heads']})")
    p.add_argument("--head-dim", type=int_range(1, 256), default=None, help="head dim, 1..256 (default: 64)")
    p.add_argument("--batch", type=int_range(1), default=None, help="batch size (default: 1)")
    p.add_argument("--backend", choices=("auto", "triton", "triton-split", "sdpa", "torch"), default="auto",
                   help="what 'ours' is: the fused Triton kernel, the split Triton kernels, SDPA + the capture "
                        "kernel, or the chunked torch backend "
                        "(default: auto = triton on CUDA, torch on the CPU)")
    p.add_argument("--impls", default=None,
                   help=f"comma-separated implementations; 'ours' = the --backend one (default: "
                        f"{','.join(BENCH_DEFAULT_IMPLS)}). Known: {', '.join(IMPLS)}")
    p.add_argument("--repeats", type=int_range(1), default=None,
                   help="timed calls on the CPU; CUDA uses do_bench (default: 10, --quick: 3)")
    p.add_argument("--allow-interpret", action="store_true",
                   help="with TRITON_INTERPRET=1, run the Triton kernel on the CPU: slow, tiny shapes only, "
                        "and its timings say nothing about GPU speed (default: off)")
    p.add_argument("--threads", type=int_range(1), default=None,
                   help="torch CPU threads; 1 gives steadier numbers on a busy machine (default: torch's choice)")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="also write the results file, schema of benchmarks/ (default: none)")
    p.set_defaults(func=run, _parser=p)
    return p


def _usage_error(args, message: str) -> int:
    """A usage error found after parsing: one line, exit code 2."""
    prog = args._parser.prog if getattr(args, "_parser", None) is not None else "seg4diff-fast bench"
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def run(args) -> int:
    device = args.device if isinstance(args.device, torch.device) else torch.device(args.device or _default_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        return _usage_error(args, f"argument --device: {device} requested but CUDA is not available on this "
                                  "machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return _usage_error(args, f"argument --device: {device} does not exist ({torch.cuda.device_count()} "
                                  "CUDA devices)")
    try:
        impl_names = resolve_bench_impls(args.backend, args.impls, device)
    except ValueError as e:
        return _usage_error(args, f"argument --impls: {e}")
    if args.json and Path(args.json).is_dir():
        return _usage_error(args, f"argument --json: {args.json} is a folder, expected a file path")
    if args.threads:
        torch.set_num_threads(args.threads)
    case = bench_case(args, device)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 10)
    env = environment(device)
    print(f"seg4diff-fast bench on {env['device']} ({device.type}), torch {env['torch']}, triton {env['triton']}")
    if _interpreting():
        print("warning: TRITON_INTERPRET=1: Triton kernels run through Triton's numpy interpreter, one program "
              "at a time; their timings say nothing about GPU speed (use them only as a correctness smoke run)",
              file=sys.stderr)
    t0, t1 = case.text_range
    print(f"shape: batch {case.batch}, {case.heads} heads, D {case.head_dim}, {case.n_img} image + {case.n_txt} "
          f"text tokens (text at [{t0}, {t1})), {case.dtype}; {case.flops / 1e9:.3g} GFLOP per call")
    if device.type != "cuda":
        print(f"timing: time.perf_counter median (p20-p80 spread) of {repeats} calls after one warm-up; "
              "peak memory: CPU allocator traffic recorded by torch.profiler, above the inputs")
    else:
        print("timing: triton.testing.do_bench median (p20-p80 spread; CUDA events, warm-up excluded); "
              "peak memory: torch.cuda.max_memory_allocated above the inputs")
    rows = run_cases([case], impl_names, device, repeats, args.allow_interpret, progress=True)
    print()
    print(format_table(rows))
    full = next((r for r in rows if r["impl"] == "full-map" and r["status"] == "ok"), None)
    ours = next((r for r in rows if r["impl"] in BACKEND_IMPL.values() and r["status"] == "ok"), None)
    if full and ours:
        line = f"\n{ours['impl']} vs full-map: {full['median_ms'] / ours['median_ms']:.2f}x the speed"
        if full["peak_mem_bytes"] and ours["peak_mem_bytes"]:
            line += f", {full['peak_mem_bytes'] / ours['peak_mem_bytes']:.1f}x less peak memory"
        else:
            line += ", peak memory ratio n/a (not measured)"
        print(line)
    if args.json:
        settings = dict(command="seg4diff-fast bench", quick=args.quick, repeats=repeats, impls=impl_names)
        path = write_results(Path(args.json), env, rows, settings)
        print(f"wrote {path}")
    return 1 if any(r["status"] == "error" for r in rows) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m seg4diff_fast.bench ...``: the ``bench`` command without the package CLI."""
    parser = one_line_errors(argparse.ArgumentParser(prog="seg4diff-fast"))
    register_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
