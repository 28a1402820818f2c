"""Run the benchmark matrix and write ``benchmarks/results/<device>-<date>.json``.

    python benchmarks/run.py                      # the device's matrix: on CUDA the full one of issue 5
    python benchmarks/run.py --quick              # tiny shapes (CI; seconds on a CPU)
    python benchmarks/run.py --suite e2e          # only the end-to-end capture forwards
    python benchmarks/run.py --models flux1-dev --dtypes bfloat16 --append   # a slice, added to today's file
    python benchmarks/run.py --merge part1.json part2.json                    # several runs' files into one

An existing output file is never replaced silently: pass --append (add rows) or --overwrite (replace it).

The implementations, shapes, timing and the results schema are those of ``seg4diff_fast.bench``
(documented in benchmarks/README.md). Rows are written as measured, never edited.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from seg4diff_fast import bench as bm

RESULTS_DIR = Path(__file__).resolve().parent / "results"
E2E_CONFIGS = {"sd3-medium": "sd3_medium", "flux1-dev": "flux1_dev"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bm.one_line_errors(p)
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes: CPU/CI smoke run of the whole suite (default: off)")
    p.add_argument("--device", type=bm.device_arg, default=None, help="cuda, cuda:1 or cpu (default: cuda if available, else cpu)")
    p.add_argument("--suite", choices=("kernel", "e2e", "all"), default="all", help="what to run (default: all)")
    p.add_argument("--models", type=bm.csv_arg(tuple(E2E_CONFIGS)), default="sd3-medium,flux1-dev",
                   help="comma-separated: sd3-medium, flux1-dev (default: both)")
    p.add_argument("--dtypes", type=bm.csv_arg(tuple(bm.DTYPES)), default=None, help="comma-separated (default: bfloat16,float16 on CUDA, "
                   "float32,bfloat16 on CPU)")
    p.add_argument("--batches", type=bm.csv_arg(item=bm.int_range(1)), default=None, help="comma-separated (default: 1,2 on CUDA, 1 on CPU)")
    p.add_argument("--impls", type=bm.csv_arg(tuple(bm.IMPLS)), default=None,
                   help=f"comma-separated subset of: {', '.join(bm.IMPLS)} (default: all)")
    p.add_argument("--e2e-dtype", default="float16", choices=sorted(bm.DTYPES),
                   help="dtype of the e2e forwards on CUDA; the CPU runs float32 (default: float16)")
    p.add_argument("--e2e-resolutions", type=bm.csv_arg(item=bm.int_range(16)), default=None,
                   help="comma-separated pixels (default: the config's list; --quick: 1024 on CUDA, 64 on CPU)")
    p.add_argument("--repeats", type=bm.int_range(1), default=None,
                   help="kernel: interleaved rounds on the CPU (each times every implementation of a case once); "
                        "e2e: timed forwards (default: 10 kernel, 3 e2e; --quick: 3 and 2)")
    p.add_argument("--threads", type=bm.int_range(1), default=None,
                   help="torch CPU threads, recorded in the file (default: torch's choice)")
    p.add_argument("--allow-interpret", action="store_true",
                   help="run the Triton kernel under TRITON_INTERPRET=1; its timings mean nothing (default: off)")
    p.add_argument("--out", default=None, help="output path (default: benchmarks/results/<device>-<date>.json)")
    p.add_argument("--append", action="store_true",
                   help="add the rows to an existing output file, e.g. to split the matrix over several runs "
                        "(default: off)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file; without it (or --append) an existing file is never "
                        "touched (default: off)")
    p.add_argument("--about", default="",
                   help="free text stored in the file's settings: conditions of the run (default: empty)")
    p.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                   help="run nothing: merge these results files of one device into --out, rows unchanged "
                        "(default: off)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: off)")
    args = p.parse_args(argv)
    if args.append and args.overwrite:
        p.error("argument --overwrite: not allowed with --append (add to the file, or replace it: one of them)")
    if args.merge and args.append:
        p.error("argument --append: not allowed with --merge (--merge writes a new file from its inputs)")
    return args


def _refuse_existing(out: Path, args) -> bool:
    """True (after printing why) when ``out`` exists and neither --overwrite nor --append says what to do."""
    if out.exists() and not (args.overwrite or args.append):
        how = "" if args.merge else "--append to add rows to it, "
        print(f"run.py: error: argument --out: {out} already exists; pass {how}--overwrite to replace it, "
              "or --out for another file", file=sys.stderr)
        return True
    if out.is_dir():
        print(f"run.py: error: argument --out: {out} is a folder, expected a file path", file=sys.stderr)
        return True
    return False


def kernel_cases(args, device):
    models = args.models
    if device.type == "cuda":
        dtypes = args.dtypes or ["bfloat16", "float16"]
        batches = args.batches or [1, 2]
        cases = bm.gpu_cases(dtypes, batches, models)
        if args.quick:  # the smallest resolution of each model only
            cases = [c for c in cases if c.resolution == 1024 and c.n_txt in (154, 512)]
        return cases
    dtypes = args.dtypes or ["float32", "bfloat16"]
    if args.quick:
        return bm.quick_cases(dtypes)
    return bm.cpu_cases(dtypes, args.batches or [1])


def e2e_rows(args, device):
    rows = []
    for model in args.models:
        cfg = bm.load_model_config(E2E_CONFIGS[model])
        resolutions = args.e2e_resolutions
        dtype = args.e2e_dtype
        if device.type != "cuda":
            # Full-size models do not run on a CPU in minutes: the same code on a scaled-down architecture.
            cfg = bm.scaled_down_config(cfg)
            resolutions = resolutions or ([64] if args.quick else cfg["resolutions"])
            dtype = "float32"
        elif args.quick:
            resolutions = resolutions or [1024]
        repeats = args.repeats or (2 if args.quick else 3)
        rows += bm.run_e2e(cfg, device, dtype, resolutions, repeats=repeats, progress=not args.no_progress)
    return rows


def merge(args) -> int:
    if args.out and _refuse_existing(Path(args.out), args):  # before reading anything
        return 2
    docs = []
    for path in args.merge:
        with open(path, encoding="utf-8") as f:
            docs.append(json.load(f))
    doc = bm.merge_results(docs)
    out = Path(args.out) if args.out else bm.results_path(doc, RESULTS_DIR)
    if _refuse_existing(out, args):
        return 2
    rows, settings = doc.pop("rows"), doc.pop("settings")
    bm.write_results(out, doc, rows, settings)
    print(f"merged {len(docs)} files, {len(rows)} rows, into {out}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"run.py: error: argument --device: {device} requested but CUDA is not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    env = bm.environment(device)
    rows = []
    impls = args.impls or list(bm.IMPLS)
    out = Path(args.out) if args.out else bm.results_path(env, RESULTS_DIR)
    if _refuse_existing(out, args):  # checked before anything runs
        return 2
    old = None
    if args.append and out.exists():  # read and checked before anything runs, too
        with open(out, encoding="utf-8") as f:
            old = json.load(f)
        bm.validate_results(old)
    if args.suite in ("kernel", "all"):
        repeats = args.repeats or (3 if args.quick else 10)
        cases = kernel_cases(args, device)
        rows += bm.run_cases(cases, impls, device, repeats, args.allow_interpret, progress=not args.no_progress)
    if args.suite in ("e2e", "all"):
        rows += e2e_rows(args, device)

    settings = dict(
        command=shlex.join(["benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)]),
        about=args.about, quick=args.quick, suite=args.suite, repeats=args.repeats,
        timing="triton.testing.do_bench median" if device.type == "cuda" else "time.perf_counter median",
        peak_memory="torch.cuda.max_memory_allocated above the inputs" if device.type == "cuda" else (
            "CPU allocator traffic recorded by torch.profiler, peak above the inputs"),
    )
    if old is not None:
        settings = dict(settings, previous=[old["settings"]] + old["settings"].get("previous", []))
        rows = old["rows"] + rows
    bm.write_results(out, env, rows, settings)
    print(bm.format_table([r for r in rows if r["status"] != "unsupported"]))
    print(f"\nwrote {len(rows)} rows to {out}")
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
