"""The ``seg4diff-fast bench`` command: our capture path against Seg4Diff's full-map path and plain SDPA on one
SD3-like shape; one table with the spread, the speed and peak-memory ratios, and the results file on request."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .._io import check_writable_folder
from ..attention import _interpreting, _resolve_backend
from .cases import DTYPES, Case
from .impls import BACKEND_IMPL, BENCH_DEFAULT_IMPLS, IMPLS, unsupported_reason
from .measure import measure_case, progress_bar, quantiles
from .results import environment, format_table, write_results

__all__ = ["bench_case", "resolve_bench_impls", "check_json_path", "headline", "register_commands", "run", "main",
           "one_line_errors", "int_range", "device_arg", "csv_arg"]

# Default shapes (SD3-like: 154 text tokens after the image, D 64), by device.
CUDA_SHAPE = dict(heads=24, head_dim=64, n_txt=154, n_img=4096, batch=1, dtype="float16")
CUDA_QUICK_SHAPE = dict(CUDA_SHAPE, n_img=1024)
CPU_SHAPE = dict(heads=4, head_dim=64, n_txt=154, n_img=4096, batch=1, dtype="float32")
# --quick on the CPU: 4 heads x (2048 image + 154 text), float32, 1 torch thread, QUICK_REPEATS interleaved rounds.
# On the shared 2-core VM under load (load average 5-15) the median per-round ratio full-map / ours wandered between
# processes from 1.8x to 3.0x at 2 heads x 1024 image tokens, 2.5x to 3.5x at 4 x 1024, 3.5x to 4.3x at 4 x 2048
# (full-map is memory-bound and feels its neighbours' memory traffic; ours is compute-bound): this shape is the
# smallest whose verdict repeated. benchmarks/README.md ("The quick bench's verdict") has the 10-run measurement.
CPU_QUICK_SHAPE = dict(heads=4, head_dim=64, n_txt=154, n_img=2048, batch=1, dtype="float32")
CPU_QUICK_THREADS = 1  # one thread: a parallel op waits for its slowest thread, and a loaded machine delays some
QUICK_REPEATS = 15


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


def resolve_bench_impls(backend: str, impls: Optional[str], device: torch.device,
                        dtype: torch.dtype = torch.float16) -> List[str]:
    """Implementation names for ``--impls`` (``"ours"`` = the ``--backend`` one; ``"auto"`` is what
    ``joint_attention(backend="auto")`` picks for ``dtype`` on ``device``); ValueError for unknown ones."""
    if impls:
        names = [n.strip() for n in impls.split(",") if n.strip()]
    else:
        names = list(BENCH_DEFAULT_IMPLS)
    backend = _resolve_backend(backend, device, dtype) if backend == "auto" else backend
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
                   help=f"a smaller shape, seconds on a CPU (there {QUICK_REPEATS} interleaved rounds, not 10, and "
                        f"{CPU_QUICK_THREADS} torch thread: steadier ratios on a busy machine) (default: off)")
    p.add_argument("--device", type=device_arg, default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="input dtype (default: float16 on CUDA, float32 on the CPU)")
    p.add_argument("--n-img", type=int_range(1), default=None,
                   help=f"image tokens (default: {CUDA_SHAPE['n_img']} on CUDA, {CPU_SHAPE['n_img']} on the CPU; "
                        f"--quick: {CUDA_QUICK_SHAPE['n_img']} on CUDA, {CPU_QUICK_SHAPE['n_img']} on the CPU)")
    p.add_argument("--n-txt", type=int_range(1), default=None,
                   help="text tokens, placed after the image as in SD3 (default: 154)")
    p.add_argument("--heads", type=int_range(1), default=None,
                   help=f"attention heads (default: 24 on CUDA, {CPU_SHAPE['heads']} on the CPU; "
                        f"--quick on the CPU: {CPU_QUICK_SHAPE['heads']})")
    p.add_argument("--head-dim", type=int_range(1, 256), default=None, help="head dim, 1..256 (default: 64)")
    p.add_argument("--batch", type=int_range(1), default=None, help="batch size (default: 1)")
    p.add_argument("--backend", choices=("auto", "triton", "triton-split", "sdpa", "torch"), default="auto",
                   help="what 'ours' is: the fused Triton kernel, the split Triton kernels, SDPA + the capture "
                        "(Triton kernel on CUDA, torch on the CPU), or the chunked torch backend "
                        "(default: auto = what joint_attention(backend='auto') picks: triton on CUDA, sdpa on the "
                        "CPU)")
    p.add_argument("--impls", default=None,
                   help=f"comma-separated implementations; 'ours' = the --backend one (default: "
                        f"{','.join(BENCH_DEFAULT_IMPLS)}). Known: {', '.join(IMPLS)}")
    p.add_argument("--repeats", type=int_range(1), default=None,
                   help="CPU: interleaved rounds, each timing every implementation once; CUDA uses do_bench "
                        f"(default: 10, --quick: {QUICK_REPEATS})")
    p.add_argument("--allow-interpret", action="store_true",
                   help="with TRITON_INTERPRET=1, run the Triton kernel on the CPU: slow, tiny shapes only, "
                        "and its timings say nothing about GPU speed (default: off)")
    p.add_argument("--threads", type=int_range(1), default=None,
                   help="torch CPU threads (default: --quick on the CPU: 1, steadier on a busy machine; "
                        "otherwise torch's choice)")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="also write the results file, schema of benchmarks/; checked before the run, written "
                        "whole or not at all (default: none)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --json file (default: off: an existing file is refused before the run)")
    p.set_defaults(func=run, _parser=p)
    return p


def _usage_error(args, message: str) -> int:
    """A usage error found after parsing: one line, exit code 2."""
    prog = args._parser.prog if getattr(args, "_parser", None) is not None else "seg4diff-fast bench"
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def check_json_path(path: str, overwrite: bool) -> None:
    """Raise ValueError naming ``--json`` unless the results file can be written at ``path`` (its folder exists
    or can be made, and is writable; ``path`` is not a folder, nor an existing file without ``overwrite``).
    Creates nothing: it runs before the benchmark, so that a bad path costs no run."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"argument --json: {path} is a folder, expected a file path")
    if p.exists() and not overwrite:
        raise ValueError(f"argument --json: {path} already exists; pass --overwrite to replace it")
    check_writable_folder(str(p.absolute().parent), "argument --json")


def headline(ours: Dict, full: Dict, times: Dict[str, List[float]]) -> Tuple[str, Dict]:
    """The verdict of a run: ``ours`` (a results row) against the full-map row, speed and peak memory.

    Speed: on the CPU the median of the per-round ratios ``full-map time / ours`` of the interleaved rounds, with
    their p20-p80 (load from other work falls on both calls of a round alike); on CUDA the ratio of the medians,
    the spread from the rows' p20/p80. "faster" / "slower" only when the whole p20-p80 range is on one side of 1.
    Returns ``(line, figures)``."""
    a, b = times.get(ours["impl"]), times.get(full["impl"])
    if a and b:
        ratio, lo, hi = quantiles([f / o for o, f in zip(a, b)])
        spread = f"per-round ratio p20-p80 {lo:.2f}x-{hi:.2f}x over {min(len(a), len(b))} interleaved rounds"
    else:
        ratio = full["median_ms"] / ours["median_ms"]
        lo, hi = full["p20_ms"] / ours["p80_ms"], full["p80_ms"] / ours["p20_ms"]
        spread = f"{lo:.2f}x-{hi:.2f}x from the p20-p80 times"
    if lo > 1:
        verdict = f"{ratio:.1f}x faster than"
    elif hi < 1:
        verdict = f"{1 / ratio:.1f}x slower than"
    else:
        verdict = f"no clear difference in speed ({ratio:.2f}x) from"
    line = f"verdict: {ours['impl']} is {verdict} full-map ({spread})"
    figures = dict(ours=ours["impl"], speed_ratio=ratio, speed_ratio_p20=lo, speed_ratio_p80=hi, memory_ratio=None)
    if full["peak_mem_bytes"] and ours["peak_mem_bytes"]:
        mem = full["peak_mem_bytes"] / ours["peak_mem_bytes"]
        figures["memory_ratio"] = mem
        line += f", {mem:.1f}x less peak memory" if mem >= 1 else f", {1 / mem:.1f}x more peak memory"
    else:
        line += ", peak memory ratio n/a (not measured)"
    return line, figures


def _what_ran(rows: List[Dict], ours: str, backend_note: str, device: torch.device) -> List[str]:
    """For each row that ran, what it is; for each joint_attention backend with no row, why it was not timed."""
    lines = ["what ran:"]
    for r in rows:
        if r["status"] == "ok":
            tag = f" (ours: {backend_note})" if r["impl"] == ours else ""
            lines.append(f"  {r['impl']}{tag}: {IMPLS[r['impl']].description}")
    names = {r["impl"] for r in rows}
    others = [(b, name) for b, name in BACKEND_IMPL.items() if name not in names]
    if others:
        lines.append("other backends, not timed:")
    for backend, name in others:
        reason = unsupported_reason(IMPLS[name], device)
        why = f"skipped, {reason}" if reason else f"not asked for (--backend {backend} or --impls {name} times it)"
        lines.append(f"  {backend} ({name}): {why}")
    return lines


def run(args) -> int:
    device = args.device if isinstance(args.device, torch.device) else torch.device(args.device or _default_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        return _usage_error(args, f"argument --device: {device} requested but CUDA is not available on this "
                                  "machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return _usage_error(args, f"argument --device: {device} does not exist ({torch.cuda.device_count()} "
                                  "CUDA devices)")
    case = bench_case(args, device)
    try:
        impl_names = resolve_bench_impls(args.backend, args.impls, device, DTYPES[case.dtype])
    except ValueError as e:
        return _usage_error(args, f"argument --impls: {e}")
    if args.json:
        try:
            check_json_path(args.json, args.overwrite)
        except ValueError as e:
            return _usage_error(args, str(e))
    threads = args.threads or (CPU_QUICK_THREADS if args.quick and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    repeats = args.repeats if args.repeats is not None else (QUICK_REPEATS if args.quick else 10)
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
        load = env.get("load_average")
        print(f"timing: {repeats} interleaved rounds, each calling every implementation once (order rotated), after "
              f"warm-up; time.perf_counter median (p20-p80 spread); {torch.get_num_threads()} torch thread(s)"
              + (f"; load average {load[0]:.1f}" if load else "") + "; peak memory: CPU allocator traffic "
              "recorded by torch.profiler, above the inputs")
    else:
        print("timing: triton.testing.do_bench median (p20-p80 spread; CUDA events, warm-up excluded); "
              "peak memory: torch.cuda.max_memory_allocated above the inputs")
    bar = progress_bar(total=len(impl_names), enabled=True)
    rows, times = measure_case(case, impl_names, device, repeats, args.allow_interpret, bar=bar)
    bar.close()
    print()
    print(format_table(rows))
    backend = args.backend
    if backend == "auto":
        backend = _resolve_backend("auto", device, DTYPES[case.dtype])
        backend_note = f"backend '{backend}', what backend='auto' picks for {case.dtype} on {device.type}"
    else:
        backend_note = f"--backend {backend}"
    print()
    print("\n".join(_what_ran(rows, BACKEND_IMPL[backend], backend_note, device)))
    full = next((r for r in rows if r["impl"] == "full-map" and r["status"] == "ok"), None)
    ours = next((r for r in rows if r["impl"] == BACKEND_IMPL[backend] and r["status"] == "ok"), None)
    figures = None
    if full and ours:
        line, figures = headline(ours, full, times)
        print("\n" + line)
    elif "full-map" in impl_names:
        missing = " and ".join(name for name, row in ((BACKEND_IMPL[backend], ours), ("full-map", full)) if not row)
        print(f"\nverdict: n/a ({missing} did not run)")
    if args.json:
        settings = dict(command="seg4diff-fast bench", quick=args.quick, repeats=repeats, impls=impl_names,
                        backend=backend, timing="interleaved rounds" if device.type == "cpu" else "do_bench",
                        headline=figures)
        path = write_results(Path(args.json), env, rows, settings)
        print(f"wrote {path}")
    return 1 if any(r["status"] == "error" for r in rows) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m seg4diff_fast.bench ...``: the ``bench`` command without the package CLI."""
    parser = one_line_errors(argparse.ArgumentParser(prog="seg4diff-fast"))
    register_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
