"""Run the benchmark matrix and write ``benchmarks/results/<device>-<date>.json``.

    python benchmarks/run.py                      # the device's matrix: on CUDA the full one of issue 5
    python benchmarks/run.py --quick              # tiny shapes (CI; seconds on a CPU)
    python benchmarks/run.py --suite e2e          # only the end-to-end capture forwards
    python benchmarks/run.py --models flux1-dev --dtypes bfloat16 --append   # a slice, added to today's file
    python benchmarks/run.py --merge part1.json part2.json                    # several runs' files into one

The implementations, shapes, timing and the results schema are those of ``seg4diff_fast.benchmark``
(documented in benchmarks/README.md). Rows are written as measured, never edited.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from seg4diff_fast import benchmark as bm

RESULTS_DIR = Path(__file__).resolve().parent / "results"
E2E_CONFIGS = {"sd3-medium": "sd3_medium", "flux1-dev": "flux1_dev"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes: CPU/CI smoke run of the whole suite")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available)")
    p.add_argument("--suite", choices=("kernel", "e2e", "all"), default="all")
    p.add_argument("--models", default="sd3-medium,flux1-dev", help="comma-separated: sd3-medium, flux1-dev")
    p.add_argument("--dtypes", default=None, help="comma-separated (default: bfloat16,float16 on CUDA, "
                   "float32,bfloat16 on CPU)")
    p.add_argument("--batches", default=None, help="comma-separated (default: 1,2 on CUDA, 1 on CPU)")
    p.add_argument("--impls", default=None, help=f"comma-separated subset of: {', '.join(bm.IMPLS)}")
    p.add_argument("--e2e-dtype", default="float16", choices=sorted(bm.DTYPES))
    p.add_argument("--e2e-resolutions", default=None, help="comma-separated pixels (default: the config's list)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls on CPU / per e2e forward")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (recorded in the file)")
    p.add_argument("--allow-interpret", action="store_true", help="run the Triton kernel under TRITON_INTERPRET=1")
    p.add_argument("--out", default=None, help="output path (default: benchmarks/results/<device>-<date>.json)")
    p.add_argument("--append", action="store_true",
                   help="add the rows to an existing output file (e.g. to split the matrix over several runs)")
    p.add_argument("--about", default="", help="free text stored in the file's settings (conditions of the run)")
    p.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                   help="run nothing: merge these results files of one device into --out (rows unchanged)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _csv(text, cast=str):
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def kernel_cases(args, device):
    models = _csv(args.models)
    if device.type == "cuda":
        dtypes = _csv(args.dtypes) if args.dtypes else ["bfloat16", "float16"]
        batches = _csv(args.batches, int) if args.batches else [1, 2]
        cases = bm.gpu_cases(dtypes, batches, models)
        if args.quick:  # the smallest resolution of each model only
            cases = [c for c in cases if c.resolution == 1024 and c.n_txt in (154, 512)]
        return cases
    dtypes = _csv(args.dtypes) if args.dtypes else ["float32", "bfloat16"]
    if args.quick:
        return bm.quick_cases(dtypes)
    return bm.cpu_cases(dtypes, _csv(args.batches, int) if args.batches else [1])


def e2e_rows(args, device):
    rows = []
    for model in _csv(args.models):
        cfg = bm.load_model_config(E2E_CONFIGS[model])
        resolutions = _csv(args.e2e_resolutions, int) if args.e2e_resolutions else None
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
    docs = []
    for path in args.merge:
        with open(path, encoding="utf-8") as f:
            docs.append(json.load(f))
    doc = bm.merge_results(docs)
    out = Path(args.out) if args.out else bm.results_path(doc, RESULTS_DIR)
    rows, settings = doc.pop("rows"), doc.pop("settings")
    bm.write_results(out, doc, rows, settings)
    print(f"merged {len(docs)} files, {len(rows)} rows, into {out}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    env = bm.environment(device)
    rows = []
    impls = _csv(args.impls) if args.impls else list(bm.IMPLS)
    unknown = [n for n in impls if n not in bm.IMPLS]
    if unknown:
        print(f"run.py: unknown implementation(s) {unknown}", file=sys.stderr)
        return 2
    if args.suite in ("kernel", "all"):
        repeats = args.repeats or (3 if args.quick else 10)
        cases = kernel_cases(args, device)
        rows += bm.run_cases(cases, impls, device, repeats, args.allow_interpret, progress=not args.no_progress)
    if args.suite in ("e2e", "all"):
        rows += e2e_rows(args, device)

    out = Path(args.out) if args.out else bm.results_path(env, RESULTS_DIR)
    settings = dict(
        command=shlex.join(["benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)]),
        about=args.about, quick=args.quick, suite=args.suite, repeats=args.repeats,
        timing="triton.testing.do_bench median" if device.type == "cuda" else "time.perf_counter median",
        peak_memory="torch.cuda.max_memory_allocated above the inputs" if device.type == "cuda" else "n/a on CPU",
    )
    if args.append and out.exists():
        with open(out, encoding="utf-8") as f:
            old = json.load(f)
        bm.validate_results(old)
        settings = dict(settings, previous=[old["settings"]] + old["settings"].get("previous", []))
        rows = old["rows"] + rows
    bm.write_results(out, env, rows, settings)
    print(bm.format_table([r for r in rows if r["status"] != "unsupported"]))
    print(f"\nwrote {len(rows)} rows to {out}")
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
