"""The results file (schema in benchmarks/README.md): rows, the environment header, writing, merging,
validation, and the plain-text table."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .._io import atomic_write_json
from ..attention import _interpreting
from .cases import Case

__all__ = [
    "SCHEMA_VERSION", "STATUSES", "ROW_FIELDS", "REPO_ROOT", "result_row", "environment", "device_slug",
    "results_path", "write_results", "merge_results", "validate_results", "format_bytes", "format_table",
]

SCHEMA_VERSION = 1
STATUSES = ("ok", "oom", "unsupported", "error")
# Fields of every row of a results file, in this order (benchmarks/README.md documents each).
ROW_FIELDS = (
    "suite", "case", "model", "resolution", "impl", "dtype", "batch", "heads", "n_img", "n_txt", "head_dim",
    "median_ms", "p20_ms", "p80_ms", "tflops", "peak_mem_bytes", "max_abs_err", "errors", "status", "note",
)
REPO_ROOT = Path(__file__).resolve().parents[2]


def result_row(case: Case, impl_name: str, suite: str = "kernel", **values) -> Dict:
    row = dict.fromkeys(ROW_FIELDS)
    row.update(
        suite=suite, case=case.name, model=case.model, resolution=case.resolution, impl=impl_name,
        dtype=case.dtype, batch=case.batch, heads=case.heads, n_img=case.n_img, n_txt=case.n_txt,
        head_dim=case.head_dim, note="",
    )
    row.update(values)
    return row



def _git_commit() -> Optional[str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("-dirty" if dirty else "")) or None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> Dict:
    """The header of a results file: what ran, where, when."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cap = torch.cuda.get_device_capability(device)
        extra = {"cuda": torch.version.cuda, "capability": f"{cap[0]}.{cap[1]}",
                 "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory}
    else:
        name = _cpu_name()
        extra = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        extra["load_average"] = [round(x, 2) for x in os.getloadavg()]  # other work on the host at the start
    except OSError:
        pass
    now = _dt.datetime.now(_dt.timezone.utc)
    return dict(
        schema_version=SCHEMA_VERSION, device=name, device_type=device.type, torch=torch.__version__,
        triton=triton_version, diffusers=diffusers_version, python=platform.python_version(),
        commit=_git_commit(), date=now.strftime("%Y-%m-%d"), datetime=now.isoformat(timespec="seconds"),
        triton_interpret=_interpreting(), **extra,
    )


def device_slug(env: Dict) -> str:
    if env["device_type"] != "cuda":
        return env["device_type"]
    name = env["device"].lower().replace("nvidia", "").strip()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-") or "cuda"


def results_path(env: Dict, folder: Path) -> Path:
    """``<folder>/<device>-<date>.json``, e.g. ``cpu-2026-11-25.json`` or ``h100-80gb-hbm3-2026-12-01.json``."""
    return Path(folder) / f"{device_slug(env)}-{env['date']}.json"


def write_results(path: Path, env: Dict, rows: List[Dict], settings: Dict) -> Path:
    doc = dict(env, settings=settings, rows=rows)
    validate_results(doc)
    path = Path(path)
    atomic_write_json(str(path), doc, indent=1)
    return path


def merge_results(docs: Sequence[Dict]) -> Dict:
    """One results document from several runs on the same device (e.g. a matrix split over several calls):
    the first run's header, every run's settings (``settings.previous``), all rows unchanged, in order."""
    if not docs:
        raise ValueError("merge_results: no documents")
    for doc in docs:
        validate_results(doc)
    first = docs[0]
    devices = {(d["device_type"], d["device"]) for d in docs}
    if len(devices) > 1:
        raise ValueError(f"merge_results: runs from different devices {sorted(devices)}")
    merged = dict(first, rows=[r for d in docs for r in d["rows"]])
    merged["settings"] = dict(first["settings"], previous=[d["settings"] for d in docs[1:]])
    validate_results(merged)
    return merged


_HEADER_TYPES = {
    "schema_version": int, "device": str, "device_type": str, "torch": str, "triton": (str, type(None)),
    "commit": (str, type(None)), "date": str, "settings": dict, "rows": list,
}
_NUM = (int, float, type(None))
_ROW_TYPES = {
    "suite": str, "case": str, "model": str, "resolution": (int, type(None)), "impl": str, "dtype": str,
    "batch": int, "heads": int, "n_img": int, "n_txt": int, "head_dim": int, "median_ms": _NUM, "p20_ms": _NUM,
    "p80_ms": _NUM, "tflops": _NUM, "peak_mem_bytes": (int, type(None)), "max_abs_err": _NUM,
    "errors": (dict, type(None)), "status": str, "note": str,
}


def validate_results(doc: Dict) -> None:
    """Raise ValueError unless ``doc`` follows the results schema (benchmarks/README.md)."""
    for key, types in _HEADER_TYPES.items():
        if key not in doc:
            raise ValueError(f"results: missing header field {key!r}")
        if not isinstance(doc[key], types):
            raise ValueError(f"results: header field {key!r} has type {type(doc[key]).__name__}")
    if doc["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"results: schema_version {doc['schema_version']}, expected {SCHEMA_VERSION}")
    for i, row in enumerate(doc["rows"]):
        for key, types in _ROW_TYPES.items():
            if key not in row:
                raise ValueError(f"results row {i}: missing field {key!r}")
            if not isinstance(row[key], types) or isinstance(row[key], bool):
                raise ValueError(f"results row {i}: field {key!r} has type {type(row[key]).__name__}")
        if row["status"] not in STATUSES:
            raise ValueError(f"results row {i}: status {row['status']!r} not in {STATUSES}")
        if row["suite"] not in ("kernel", "e2e"):
            raise ValueError(f"results row {i}: suite {row['suite']!r}")
        if row["status"] == "ok" and row["median_ms"] is None:
            raise ValueError(f"results row {i}: status ok without median_ms")


# ------------------------------------------------------------------------------------------------------------
# Printing.


def format_bytes(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(rows: Sequence[Dict]) -> str:
    """A plain-text table of results rows, one line per row."""
    head = ("case", "dtype", "B", "impl", "status", "median ms", "p20-p80 ms", "TFLOP/s", "peak mem", "max err")
    lines = [
        (r["case"], r["dtype"], str(r["batch"]), r["impl"], r["status"], _fmt(r["median_ms"], ".3f"),
         f"{_fmt(r['p20_ms'], '.3f')}-{_fmt(r['p80_ms'], '.3f')}" if r["median_ms"] is not None else "-",
         _fmt(r["tflops"], ".3g"), format_bytes(r["peak_mem_bytes"]) if r["status"] == "ok" else "-",
         _fmt(r["max_abs_err"], ".1e"))
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    notes = [f"  {r['impl']} ({r['case']}): {r['note']}" for r in rows if r["status"] != "ok" and r["note"]]
    if notes:
        out += ["", "not run:"] + sorted(set(notes))
    return "\n".join(out)

