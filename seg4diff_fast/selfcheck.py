"""``seg4diff-fast check`` / :func:`check`: is every backend correct and fast on THIS device? And the measured
``backend="auto"`` that its saved table gives, with the first-use guard of the Triton kernels.

The check: for the shapes of a model family (``bench.cases``) or one given shape, each dtype, every backend
available on the device (CUDA: ``triton``, ``triton-split``, ``sdpa``, ``torch``; CPU: ``sdpa`` (SDPA's CPU flash
kernel, the capture in torch) and ``torch``, and the Triton ones through Triton's interpreter with
``interpret=True``, at a reduced shape) and every capture mode the
package uses (:data:`CAPTURE_MODES`), it runs :func:`~seg4diff_fast.attention.joint_attention` and compares

- ``out`` with SDPA's output in the same dtype (every element), tolerance ``2 x OUT_TOL[dtype]`` (both are within
  ``OUT_TOL`` of the float64 result), and
- the maps with a float64 recomputation of sampled query rows against all keys (:func:`_sampled_map_errors`; the
  definition of ``seg4diff_fast.reference``), tolerance ``MAP_TOL[float32]`` (the maps are float32, as the
  segmenter stores them);

then times it (``bench.measure.time_fn``: CUDA events through ``triton.testing.do_bench``, or ``perf_counter``
on the CPU; medians, warm-up excluded) against SDPA without capture, and records its peak memory
(``bench.measure.peak_memory``). One row per (case, dtype, mode, backend); a verdict line sums them up.

The table (``save=True``): ``$XDG_CACHE_HOME/seg4diff-fast/auto-<device>.json`` (default ``~/.cache``), with the
device name and the torch and triton versions. ``backend="auto"`` (:func:`auto_backend`) reads it and picks, for
the call's dtype, head dim and capture mode, the fastest backend that passed every row of that key; a table of
other versions (an upgrade), or no row for the key, leaves the built-in rule (``attention._auto_backend``).

The first-use guard: the first time in a process that ``auto`` would run a Triton backend on a (device, dtype,
head dim, capture mode) that the table has not verified, a small self-test (:func:`_self_test`, one call on a
49-token problem) compares it with the ``torch`` backend; on an exception or a mismatch ``auto`` takes the next
backend (``triton``/``triton-split`` -> ``sdpa`` -> ``torch``) and warns once, naming the failure and this
command. An explicitly named backend never falls back. Under ``torch.compile`` tracing, ``auto`` reuses the
choice an eager call made for the key (no file is read and no self-test runs while tracing); without one, the
built-in rule.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .reference import MAP_TOL, OUT_TOL, image_positions

__all__ = ["check", "CaptureMode", "CAPTURE_MODES", "MODELS", "mode_key", "auto_backend", "table_path",
           "load_table", "register_commands"]

TABLE_VERSION = 1


@dataclass(frozen=True)
class CaptureMode:
    """One way the package calls ``joint_attention`` (``normalize="joint"``, float32 maps)."""

    name: str
    capture: Optional[str]
    heads: str
    text_columns: Optional[int]  # keep the first min(this, T // 2) text columns (text_index), None: all
    used_by: str


CAPTURE_MODES = (
    CaptureMode("i2t-mean", "i2t", "mean", 77, "segment / eval: i2t, heads mean, the 77 CLIP columns"),
    CaptureMode("both-all", "both", "all", None, "analyze: i2t and t2i of every head"),
    CaptureMode("none", None, "mean", None, "plain attention (layers recomputed without maps)"),
)
_MODES = {m.name: m for m in CAPTURE_MODES}
# --model -> (bench.cases name on CUDA, CPU-sized name): SD3-medium (24 heads, D 64, 154 text after 4096 image
# tokens at 1024^2) and Flux.1-dev (24 heads, D 128, 512 text before 4096 image tokens).
MODELS = {"sd3": ("sd3-medium", "sd3-like"), "flux": ("flux1-dev", "flux-like")}
DEVICE_BACKENDS = {"cuda": ("triton", "triton-split", "sdpa", "torch"), "cpu": ("sdpa", "torch")}
_TRITON = ("triton", "triton-split")  # the backends that need the interpreter on the CPU
# What auto takes when a Triton backend fails its self-test, in order.
FALLBACK = {"triton": ("sdpa", "torch"), "triton-split": ("sdpa", "torch"), "sdpa": ("torch",)}
# The reduced shape of the interpreter (--interpret on the CPU): one head, 19 text + 45 image tokens.
INTERPRET_SHAPE = dict(batch=1, heads=1, n_txt=19, n_img=45)
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def mode_key(capture: Optional[str], heads: str, normalize: str = "joint") -> str:
    """The capture-mode key of a ``joint_attention`` call in the table: ``"none"``, ``"i2t-mean"``, ... (with
    ``-text`` / ``-logits`` for those normalisations, which ``check`` does not measure)."""
    if capture is None:
        return "none"
    return f"{capture}-{heads}" + ("" if normalize == "joint" else f"-{normalize}")


# --------------------------------------------------------------------------------------------------------
# Errors against the oracle


def _spread(n: int, k: int) -> torch.Tensor:
    """At most ``k`` evenly spread indices of ``range(n)``, first and last included."""
    return torch.linspace(0, n - 1, min(k, n)).round().long().unique()


def _within(got: torch.Tensor, ref: torch.Tensor, tol: Tuple[float, float]) -> Tuple[float, bool]:
    """(max abs error, whether every element is within atol + rtol |ref|); NaN anywhere fails."""
    diff = (got.double() - ref.double()).abs()
    ok = bool((diff <= tol[0] + tol[1] * ref.double().abs()).all())
    return float(diff.max()), ok


def _sampled_map_errors(q, k, text_start, text_stop, mode: CaptureMode, text_index, maps, rows: int = 24):
    """``(max abs error, ok)`` of the maps of ``mode`` (i2t ``[B, (H,) N_img, T]``, t2i ``[B, (H,) T, N_img]``)
    against a float64 recomputation of at most ``rows`` query rows of each map (all heads, all keys: the joint
    softmax of ``seg4diff_fast.reference``), tolerance ``MAP_TOL`` of the maps' dtype. ``(0.0, True)`` without
    maps."""
    n = q.shape[2]
    txt = torch.arange(text_start, text_stop, device=q.device)
    txt = txt if text_index is None else txt[text_index]
    img = image_positions(n, text_start, text_stop, device=q.device)
    scale = q.shape[-1] ** -0.5
    kt = k.double().transpose(-1, -2)  # [B, H, D, N]
    worst, ok = 0.0, True
    for got, q_pos, k_pos in ((maps.i2t, img, txt), (maps.t2i, txt, img)):
        if got is None:
            continue
        local = _spread(q_pos.numel(), rows).to(q.device)
        p = torch.softmax(torch.matmul(q[:, :, q_pos[local]].double() * scale, kt), dim=-1)[..., k_pos]
        ref = p.mean(dim=1) if mode.heads == "mean" else p  # [B, (H,) R, C]
        err, good = _within(got[..., local, :], ref, MAP_TOL[got.dtype])
        worst, ok = max(worst, err), ok and good
    return worst, ok


def _text_index(mode: CaptureMode, n_txt: int, device) -> Optional[torch.Tensor]:
    if mode.text_columns is None:
        return None
    return torch.arange(min(mode.text_columns, max(1, n_txt // 2)), device=device)


def _run_mode(q, k, v, text_range, mode: CaptureMode, backend: str):
    from .attention import joint_attention

    t0, t1 = text_range
    return joint_attention(q, k, v, slice(t0, t1), capture=mode.capture, heads=mode.heads,
                           text_index=_text_index(mode, t1 - t0, q.device), map_dtype=torch.float32, backend=backend)


def _errors(q, k, v, text_range, mode, result, sdpa_out) -> Dict:
    """``{"err_out", "err_maps", "ok"}`` of one result ``(out, AttentionMaps)``."""
    out, maps = result
    err_out, ok_out = _within(out, sdpa_out, tuple(2 * t for t in OUT_TOL[q.dtype]))
    err_maps, ok_maps = _sampled_map_errors(q, k, *text_range, mode, _text_index(mode, text_range[1] - text_range[0],
                                                                                    q.device), maps)
    return dict(err_out=err_out, err_maps=err_maps if mode.capture else None, ok=ok_out and ok_maps)


# --------------------------------------------------------------------------------------------------------
# The check


_DEVICE_NAMES: Dict[str, str] = {}


def _device_name(device: torch.device) -> str:
    """The key of a device's table: the GPU's name, or ``cpu: <processor name>`` (looked up once per process)."""
    name = _DEVICE_NAMES.get(str(device))
    if name is None:
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
        else:
            from .bench.results import _cpu_name

            name = f"{device.type}: {_cpu_name()}"
        _DEVICE_NAMES[str(device)] = name
    return name


def _driver_version() -> Optional[str]:
    if not torch.cuda.is_available():
        return None
    import subprocess

    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else None


def _cases(models: Sequence[str], shape: Optional[Sequence[int]], device: torch.device, interpret: bool):
    """The shapes to check (``bench.cases.Case``, dtype filled in later): the model's 1024^2 case on CUDA, its
    tiny CI one on the CPU (``quick_cases``), or ``shape``; with ``interpret`` (and no ``shape``) reduced to
    :data:`INTERPRET_SHAPE`."""
    from .bench.cases import Case, gpu_cases, quick_cases

    if shape is not None:
        b, h, n, d, t0, t1 = shape
        cases = [Case("custom", None, b, h, d, t1 - t0, n - (t1 - t0), t0 == 0)]
    elif device.type == "cuda":
        pool = gpu_cases(dtypes=("float16",), batches=(1,), models=[MODELS[m][0] for m in models])
        # the 1024^2 case of each model with its first text length (SD3: 154, the Seg4Diff protocol)
        cases = [next(c for c in pool if c.model == MODELS[m][0] and c.resolution == 1024) for m in models]
    else:
        pool = quick_cases()  # CI's tiny shapes: the CPU run takes seconds
        cases = [next(c for c in pool if c.model == MODELS[m][1]) for m in models]
    if interpret and shape is None:
        cases = [Case(c.model, None, head_dim=c.head_dim, text_first=c.text_first, **INTERPRET_SHAPE)
                 for c in cases]
    return cases


def default_dtypes(device: torch.device) -> List[str]:
    """CUDA: float16, bfloat16, float32; the CPU: float32 (its usual dtype; ask for the others)."""
    return ["float16", "bfloat16", "float32"] if device.type == "cuda" else ["float32"]


def _resolve_args(device, model, shape, dtypes, backends, modes, interpret, repeats, json_path):
    """The arguments of :func:`check` with their defaults filled in, checked before any work: ``(device, models,
    dtypes, backends, modes, repeats)``; ValueError naming the argument."""
    from .attention import _interpreting, resolve_text_slice
    from .bench.cases import DTYPES

    try:
        device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}") from None
    models = [model] if isinstance(model, str) else list(model)
    if device.type in DEVICE_BACKENDS:
        dtypes = list(dtypes) if dtypes else default_dtypes(device)
        backends = list(backends) if backends else list(DEVICE_BACKENDS[device.type] + (_TRITON if interpret else ()))
    modes = list(modes) if modes else list(_MODES)
    repeats = 5 if repeats is None else repeats
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device} requested but CUDA is not available on this machine; use cpu")
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise ValueError(f"model must be some of {', '.join(MODELS)}, got {list(models)}")
    if shape is not None:
        if len(shape) != 6 or any(isinstance(x, bool) or not isinstance(x, int) for x in shape):
            raise ValueError(f"shape must be 6 integers B,H,N,D,text_start,text_stop, got {shape!r}")
        b, h, n, d, t0, t1 = shape
        if min(b, h, n) < 1 or not 1 <= d <= 256:
            raise ValueError(f"shape: expected B, H, N >= 1 and 1 <= D <= 256, got {tuple(shape)}")
        try:
            resolve_text_slice((t0, t1), n)
        except (TypeError, ValueError) as e:
            raise ValueError(f"shape: {e}") from None
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise ValueError(f"dtypes must be some of {', '.join(DTYPES)}, got {list(dtypes)}")
    available = DEVICE_BACKENDS[device.type] + (_TRITON if interpret else ())
    bad = [b for b in backends if b not in available]
    if bad or not backends:
        raise ValueError(f"backends on {device.type}{' with interpret' if interpret else ''} must be some of "
                         f"{', '.join(available)}, got {list(backends)}")
    bad = [m for m in modes if m not in _MODES]
    if bad or not modes:
        raise ValueError(f"modes must be some of {', '.join(_MODES)}, got {list(modes)}")
    if interpret and (device.type != "cpu" or not _interpreting()):
        raise ValueError("interpret runs the Triton kernels through Triton's interpreter on the CPU: it needs "
                         "device cpu and TRITON_INTERPRET=1 set before seg4diff_fast is imported")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    if json_path is not None and os.path.isdir(json_path):
        raise ValueError(f"json_path: {json_path} is a folder, expected a file path")
    return device, models, dtypes, backends, modes, repeats


def check(
    model: Union[str, Sequence[str]] = "sd3",
    *,
    shape: Optional[Sequence[int]] = None,
    dtypes: Optional[Sequence[str]] = None,
    backends: Optional[Sequence[str]] = None,
    modes: Optional[Sequence[str]] = None,
    device: Optional[str] = None,
    interpret: bool = False,
    repeats: Optional[int] = None,
    save: bool = False,
    json_path: Optional[str] = None,
    verbose: bool = True,
) -> Dict:
    """Check and time every backend on this device; print the table and the verdict (``verbose``).

    Args:
        model: ``"sd3"``, ``"flux"`` or a list of them (their shapes: ``bench.cases``); ignored with ``shape``.
        shape: ``(B, H, N, D, text_start, text_stop)``, one custom shape instead.
        dtypes: names (``"float16"``, ``"bfloat16"``, ``"float32"``); default :func:`default_dtypes`.
        backends: default every backend available on the device (see the module docstring).
        modes: names of :data:`CAPTURE_MODES` (default all).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (default CUDA when available).
        interpret: on the CPU with ``TRITON_INTERPRET=1``: the Triton backends too, at :data:`INTERPRET_SHAPE`.
        repeats: timed calls on the CPU (default 5; CUDA: ``do_bench``'s own count).
        save: write the table that ``backend="auto"`` reads (:func:`table_path`), merged with the rows of other
            keys of a table of the same versions.
        json_path: write ``{"env", "settings", "rows", "verdict"}`` there (atomically).

    Returns ``{"env": ..., "rows": [...], "verdict": str, "ok": bool}``; a row has ``case``, ``batch``, ``heads``,
    ``n``, ``head_dim``, ``text_start``, ``text_stop``, ``backend``, ``dtype``, ``mode``, ``status`` (``ok``,
    ``mismatch``, ``error``, ``unsupported``, ``oom``), ``ok``, ``err_out``, ``err_maps``, ``tol_out``,
    ``tol_maps``, ``median_ms``, ``sdpa_ms``, ``ratio`` (median / SDPA's), ``peak_mb`` and ``note``.
    """
    from .bench.cases import DTYPES
    from .bench.measure import failure_status, free_memory, make_inputs, peak_memory, synchronize, time_fn
    from .bench.results import environment

    device, models, dtypes, backends, modes, repeats = _resolve_args(device, model, shape, dtypes, backends, modes,
                                                                     interpret, repeats, json_path)

    env = dict(environment(device), driver=_driver_version(), device_key=_device_name(device))
    rows = []
    for case in _cases(models, shape, device, interpret):
        for dtype_name in dtypes:
            case_d = replace(case, dtype=dtype_name)
            q, k, v = make_inputs(case_d, device)
            text_range = case_d.text_range
            sdpa_out = F.scaled_dot_product_attention(q, k, v)
            sdpa_ms = time_fn(lambda: F.scaled_dot_product_attention(q, k, v), device, repeats)[0]
            base = dict(case=case_d.name, batch=case_d.batch, heads=case_d.heads, n=case_d.n,
                        head_dim=case_d.head_dim, text_start=text_range[0], text_stop=text_range[1], dtype=dtype_name)
            for mode_name in modes:
                mode = _MODES[mode_name]
                for backend in backends:
                    row = dict(base, backend=backend, mode=mode_name, status="ok", ok=False, err_out=None,
                               err_maps=None, tol_out=[2 * t for t in OUT_TOL[DTYPES[dtype_name]]],
                               tol_maps=list(MAP_TOL[torch.float32]) if mode.capture else None, median_ms=None,
                               sdpa_ms=sdpa_ms, ratio=None, peak_mb=None, note="")
                    failure = None
                    try:
                        def call():
                            return _run_mode(q, k, v, text_range, mode, backend)

                        call()  # compile / autotune / launch: kept out of the figures
                        synchronize(device)
                        result, peak = peak_memory(call, device)
                        row.update(_errors(q, k, v, text_range, mode, result, sdpa_out))
                        del result
                        row["median_ms"] = time_fn(call, device, repeats, warmup=False)[0]
                    except Exception as e:  # noqa: BLE001  (a row per failure: compile, launch, OOM, ...)
                        failure = failure_status(e)
                    if failure:
                        free_memory(device)
                        row.update(status=failure[0], ok=False, note=failure[1])
                    else:
                        row.update(ratio=row["median_ms"] / sdpa_ms if sdpa_ms else None,
                                   peak_mb=None if peak is None else peak / 2**20)
                        if not row["ok"]:
                            row.update(status="mismatch", note="error above the tolerance")
                    rows.append(row)
            del q, k, v, sdpa_out
            free_memory(device)
    verdict, ok = _verdict(rows, env["device"])
    report = dict(env=env, rows=rows, verdict=verdict, ok=ok)
    if verbose:
        print(f"seg4diff-fast check on {env['device']} ({device.type}), torch {env['torch']}, triton {env['triton']}"
              + (f", driver {env['driver']}" if env["driver"] else ""))
        if interpret:
            print("TRITON_INTERPRET=1: Triton kernels through the interpreter at a reduced shape; their times say "
                  "nothing about GPU speed")
        print(format_table(rows))
        print(verdict)
    if json_path is not None:
        from ._io import atomic_write_json

        settings = dict(models=models, shape=None if shape is None else list(shape), dtypes=dtypes,
                        backends=backends, modes=modes, interpret=interpret, repeats=repeats)
        atomic_write_json(json_path, dict(env=env, settings=settings, rows=rows, verdict=verdict, ok=ok))
        if verbose:
            print(f"wrote {json_path}")
    if save:
        path = save_table(env, rows)
        if verbose:
            print(f"saved the table that backend='auto' reads: {path}")
    return report


def _verdict(rows: List[Dict], device_name: str) -> Tuple[str, bool]:
    failed = [r for r in rows if r["status"] in ("mismatch", "error")]
    passed = [r for r in rows if r["ok"]]
    if failed:
        what = "; ".join(f"{r['backend']} {r['dtype']} {r['mode']}: {r['status']} ({r['note']})" for r in failed[:6])
        more = f"; and {len(failed) - 6} more" if len(failed) > 6 else ""
        return (f"verdict: FAIL on {device_name}: {len(failed)} of {len(rows)} rows failed: {what}{more}. "
                "backend='auto' avoids them once the table is saved (seg4diff-fast check --save)"), False
    best = {}
    for r in passed:
        key = (r["dtype"], r["mode"])
        if key not in best or r["median_ms"] < best[key]["median_ms"]:
            best[key] = r
    fastest = ", ".join(f"{d} {m}: {r['backend']} ({r['ratio']:.2f}x SDPA)" for (d, m), r in best.items())
    skipped = len(rows) - len(passed)
    return (f"verdict: OK on {device_name}: {len(passed)} of {len(rows)} rows pass"
            + (f" ({skipped} not run: unsupported or out of memory)" if skipped else "")
            + (f"; fastest: {fastest}" if fastest else "")), True


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def format_table(rows: List[Dict]) -> str:
    """The plain-text table: case, backend, dtype, mode, ok, max error out / maps, median ms, ratio, peak MB."""
    head = ("case", "backend", "dtype", "mode", "ok", "err out", "err maps", "ms", "x SDPA", "peak MB")
    lines = [head]
    for r in rows:
        lines.append((r["case"], r["backend"], r["dtype"], r["mode"], "yes" if r["ok"] else r["status"],
                      _fmt(r["err_out"], ".1e"), _fmt(r["err_maps"], ".1e"), _fmt(r["median_ms"], ".3g"),
                      _fmt(r["ratio"], ".2f"), _fmt(r["peak_mb"], ".1f")))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


# --------------------------------------------------------------------------------------------------------
# The saved table and backend="auto"


def table_path(device_key: str) -> str:
    """``$XDG_CACHE_HOME/seg4diff-fast/auto-<device>.json`` (``XDG_CACHE_HOME`` default ``~/.cache``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    slug = "".join(c if c.isalnum() else "-" for c in device_key.lower()).strip("-")[:80] or "device"
    return os.path.join(root, "seg4diff-fast", f"auto-{slug}.json")


def _versions() -> Dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(torch=torch.__version__, triton=triton_version)


def load_table(device_key: str) -> Optional[Dict]:
    """The saved table of this device, or None: no file, an unreadable one (a warning), or a stale one (other torch
    or triton versions, or another device under the same file name)."""
    path = table_path(device_key)
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        table = e
    fields = ("backend", "dtype", "head_dim", "mode", "ok", "median_ms")
    if not isinstance(table, dict) or not isinstance(table.get("rows"), list) or not all(
            isinstance(r, dict) and all(f in r for f in fields) for r in table["rows"]):
        what = table if isinstance(table, Exception) else "not a table of seg4diff-fast check"
        warnings.warn(f"seg4diff_fast: ignoring the unreadable backend table {path} ({what}); run `seg4diff-fast "
                      "check --save` to write it again")
        return None
    if table.get("version") != TABLE_VERSION or table.get("device") != device_key:
        return None
    if {k: table.get(k) for k in ("torch", "triton")} != _versions():
        return None
    return table


def save_table(env: Dict, rows: List[Dict]) -> str:
    """Write the table of ``rows`` for ``env``'s device; rows of other (dtype, head dim, mode) keys of a current
    table are kept. Returns the path."""
    from ._io import atomic_write_json

    key = env["device_key"]
    new_keys = {(r["dtype"], r["head_dim"], r["mode"]) for r in rows}
    old = load_table(key)
    kept = [r for r in (old or {}).get("rows", []) if (r["dtype"], r["head_dim"], r["mode"]) not in new_keys]
    path = table_path(key)
    atomic_write_json(path, dict(version=TABLE_VERSION, device=key, **_versions(), rows=kept + rows))
    _STATE.clear()  # choices made from the old table (or the rule) are made again
    return path


def _builtin_rule(device: torch.device, dtype: torch.dtype) -> str:
    """The rule without a table (``attention._auto_backend(..., measured=False)``). Tests replace it to pretend
    that the device is a GPU (the rule then names a Triton backend, which the guard tests first)."""
    from .attention import _auto_backend

    return _auto_backend(device, dtype, measured=False)


def _runnable(device: torch.device) -> Tuple[str, ...]:
    """The backends a table may name for ``device`` in this process: every one on CUDA; on the CPU ``sdpa`` and
    ``torch``, and the Triton ones only under ``TRITON_INTERPRET=1`` (a table saved by ``check --interpret``)."""
    from .attention import _interpreting

    if device.type == "cuda" or _interpreting():
        return DEVICE_BACKENDS["cuda"]
    return DEVICE_BACKENDS.get(device.type, ())


def _table_choice(table: Dict, dtype: str, head_dim: int, mode: str, runnable: Sequence[str]):
    """``(backend, verified)``: the fastest of ``runnable`` that passed every row of the key (its medians summed
    over the key's shapes), or None; and the set of those that passed them all."""
    rows = [r for r in table.get("rows", []) if (r["dtype"], r["head_dim"], r["mode"]) == (dtype, head_dim, mode)
            and r["backend"] in runnable]
    total: Dict[str, float] = {}
    failed = set()
    for r in rows:
        if r.get("ok") and r.get("median_ms") is not None:
            total[r["backend"]] = total.get(r["backend"], 0.0) + r["median_ms"]
        else:
            failed.add(r["backend"])
    passed = {b: t for b, t in total.items() if b not in failed}
    return (min(passed, key=passed.get) if passed else None), set(passed)


# Per process: {(device, dtype, head dim, mode): (table path, backend)} (choices of auto, guard included), and
# {(device, dtype, head dim, mode, backend): failure or None} (self-test results).
_STATE: Dict = {}
_SELF_TESTS: Dict = {}


def _self_test(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int, mode: str) -> Optional[str]:
    """One small call of ``backend`` against the ``torch`` backend (1 x 2 heads x (40 image + 9 text tokens)):
    None if it matches (``out`` within 2 x OUT_TOL, maps within 2 x MAP_TOL[float32]), else the failure in words
    (the exception, or the error and the tolerance)."""
    from .attention import joint_attention

    capture, heads = (None, "mean") if mode == "none" else mode.split("-")[:2]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 49, head_dim, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    kwargs = dict(capture=capture, heads=heads, map_dtype=torch.float32)
    if len(mode.split("-")) > 2:
        kwargs["normalize"] = mode.split("-")[2]
    try:
        out, maps = joint_attention(q, k, v, slice(40, 49), backend=backend, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001  (compile error, launch error, ...: that is what is tested)
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    ref_out, ref_maps = joint_attention(q, k, v, slice(40, 49), backend="torch", **kwargs)
    checks = [("out", out, ref_out, tuple(2 * t for t in OUT_TOL[dtype]))]
    checks += [(name, getattr(maps, name), getattr(ref_maps, name), tuple(2 * t for t in MAP_TOL[torch.float32]))
               for name in ("i2t", "t2i") if getattr(ref_maps, name) is not None]
    for name, got, ref, tol in checks:
        if got is None or got.shape != ref.shape:
            return f"mismatch: {name} has shape {None if got is None else tuple(got.shape)}, expected {tuple(ref.shape)}"
        err, ok = _within(got, ref, tol)
        if not ok:
            return f"mismatch: {name} differs from the torch backend by {err:.3g} (tolerance {tol[0]:g} + {tol[1]:g}|x|)"
    return None


def auto_backend(device: torch.device, dtype: torch.dtype, head_dim: Optional[int], mode: Optional[str]) -> str:
    """``backend="auto"`` for a call on ``device`` in ``dtype`` with head dim ``head_dim`` and capture mode ``mode``
    (:func:`mode_key`): the fastest backend that passed in this device's saved table, else the built-in rule
    (``attention._auto_backend(..., measured=False)``); a Triton backend that the table has not verified passes
    the first-use self-test first, or the next one is taken, with one warning."""
    from .attention import _runs_triton

    memo_key = (str(device), dtype, head_dim, mode)
    if torch.compiler.is_compiling():  # no file, no self-test inside a traced graph
        return _STATE.get(memo_key, (None, _builtin_rule(device, dtype)))[1]
    device_key = _device_name(device)
    path = table_path(device_key)
    memo = _STATE.get(memo_key)
    if memo is not None and memo[0] == path:
        return memo[1]
    choice, verified = None, set()
    if head_dim is not None and mode is not None:
        table = load_table(device_key)
        if table is not None:
            choice, verified = _table_choice(table, _DTYPE_NAMES[dtype], head_dim, mode, _runnable(device))
    if choice is None:
        choice = _builtin_rule(device, dtype)
    failures = []
    while (choice in FALLBACK and _runs_triton(choice, device) and choice not in verified and head_dim is not None
           and mode is not None):
        test_key = (device_key, dtype, head_dim, mode, choice)
        if test_key not in _SELF_TESTS:
            _SELF_TESTS[test_key] = _self_test(choice, device, dtype, head_dim, mode)
        if _SELF_TESTS[test_key] is None:
            break
        failures.append(f"'{choice}' ({_SELF_TESTS[test_key]})")
        choice = FALLBACK[choice][0]
    if failures:
        warnings.warn(
            f"seg4diff_fast: backend='auto' on {device_key} ({_DTYPE_NAMES[dtype]}, head dim {head_dim}, capture "
            f"{mode}): the first-use self-test of {', then '.join(failures)} failed; using '{choice}' instead. Run "
            "`seg4diff-fast check` to see which backends are correct and fast on this device (and `check --save` to "
            "let auto use its table)", RuntimeWarning, stacklevel=4)
    _STATE[memo_key] = (path, choice)
    return choice


# --------------------------------------------------------------------------------------------------------
# The command


def _shape_arg(text: str) -> List[int]:
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = None
    if values is None or len(values) != 6:
        raise argparse.ArgumentTypeError(f"expected 6 comma-separated integers B,H,N,D,text_start,text_stop, "
                                         f"got {text!r}")
    return values


def register_commands(subparsers) -> argparse.ArgumentParser:
    from .bench.command import csv_arg, device_arg, one_line_errors
    from .cli import integer

    p = subparsers.add_parser(
        "check",
        help="verify and time every attention backend on this device (run it first on a new GPU)",
        description=(
            "Runs joint_attention on every backend available on this device (CUDA: triton, triton-split, sdpa, "
            "torch; CPU: sdpa, torch, and the Triton ones through the interpreter with --interpret), for each dtype "
            f"and capture mode ({', '.join(m.name + ' = ' + m.used_by for m in CAPTURE_MODES)}), on a model family's "
            "shape; compares out with SDPA (tolerance 2 x OUT_TOL of the dtype) and the maps with a float64 "
            "recomputation of sampled rows (MAP_TOL of float32), times it (CUDA events / perf_counter, medians, "
            "warm-up excluded) against SDPA without capture, records peak memory, and prints one table and a "
            "verdict. Exit code 1 if any backend fails."
        ),
    )
    one_line_errors(p)
    p.add_argument("--model", type=csv_arg(tuple(MODELS)), default=["sd3"],
                   help="model families whose shapes to check, comma-separated: sd3 (24 heads, D 64, 154 text "
                        "tokens after the image), flux (24 heads, D 128, 512 text tokens first); 1024^2 on CUDA, "
                        "CI's tiny shapes on the CPU (sd3: 2 x 2 heads x (256 + 154), flux: 2 heads x (77 + 300)) "
                        "(default: sd3)")
    p.add_argument("--shape", type=_shape_arg, default=None,
                   help="one custom shape B,H,N,D,text_start,text_stop instead of --model's (default: none)")
    p.add_argument("--dtypes", type=csv_arg(("float16", "bfloat16", "float32")), default=None,
                   help="comma-separated (default: float16,bfloat16,float32 on CUDA; float32 on the CPU)")
    p.add_argument("--backends", type=csv_arg(("triton", "triton-split", "sdpa", "torch")), default=None,
                   help="comma-separated (default: every backend available on the device)")
    p.add_argument("--modes", type=csv_arg(tuple(_MODES)), default=None,
                   help=f"capture modes, comma-separated (default: {','.join(_MODES)})")
    p.add_argument("--device", type=device_arg, default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--interpret", action="store_true",
                   help="on the CPU with TRITON_INTERPRET=1: the Triton backends too, through the interpreter, at "
                        "a reduced shape (1 head, 19 text + 45 image tokens); a correctness run, not a timing one (default: off)")
    p.add_argument("--repeats", type=integer(1), default=5,
                   help="timed calls per row on the CPU, after the warm-up; CUDA uses triton's do_bench "
                        "(default: 5)")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="also write the raw rows with the device, driver, torch/triton versions and commit (default: none)")
    p.add_argument("--save", action="store_true",
                   help="save the table that backend='auto' reads, under $XDG_CACHE_HOME/seg4diff-fast/ "
                        "(XDG_CACHE_HOME default ~/.cache), keyed by device name and torch/triton versions (default: off)")
    p.set_defaults(func=_run_command)
    return p


def _run_command(args) -> int:
    from .cli import UsageError

    kwargs = dict(shape=args.shape, dtypes=args.dtypes, backends=args.backends, modes=args.modes,
                  device=None if args.device is None else str(args.device), interpret=args.interpret,
                  repeats=args.repeats, json_path=args.json)
    try:
        _resolve_args(model=args.model, **kwargs)
    except ValueError as e:  # the message starts with the argument's name
        name = str(e).split(" ")[0].rstrip(":")
        flag = {"json_path": "--json", "model": "--model"}.get(name, "--" + name)
        raise UsageError(f"argument {flag}: {e}") from None
    report = check(args.model, save=args.save, **kwargs)
    sys.stdout.flush()
    return 0 if report["ok"] else 1
