"""Timing, peak memory and error against the float64 reference; one case x implementation -> one results row."""
from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from .cases import DTYPES, Case
from .impls import IMPLS, Impl, unsupported_reason
from .results import result_row

__all__ = [
    "synchronize", "time_fn", "time_events", "time_interleaved", "quantiles", "peak_memory", "sample_rows",
    "sampled_errors", "make_inputs", "failure_status", "free_memory", "prepare_call", "run_case", "measure_case",
    "run_cases", "progress_bar",
]

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], object], device: torch.device, repeats: int = 10, warmup: bool = True
) -> Tuple[float, float, float]:
    """(median, 20th percentile, 80th percentile) of one call of ``fn`` in milliseconds, warm-up excluded.

    CUDA: ``triton.testing.do_bench`` (CUDA events, 25 ms of warm-up, about 100 ms of timed runs, L2 cache
    flushed before each). CPU: one warm-up call (unless ``warmup`` is False), then ``repeats`` calls timed
    with ``time.perf_counter``.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        p20, p50, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8])
        return float(p50), float(p20), float(p80)
    if warmup:
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return quantiles(times)


def time_events(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> Tuple[float, float, float]:
    """Like :func:`time_fn` for long calls (a whole transformer forward), which the caller has warmed up:
    ``repeats`` calls, each between two CUDA events (CPU: ``perf_counter``)."""
    if device.type != "cuda":
        return time_fn(fn, device, repeats, warmup=False)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(max(1, repeats)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return quantiles(times)


def time_interleaved(calls: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, List[float]]:
    """CPU timing of several calls that are compared with each other: ``repeats`` rounds, each calling every
    one once (``time.perf_counter``, milliseconds), the order rotated by one place each round. Load from other
    work on the machine then falls on all of them alike, round by round, and the per-round ratios of two calls
    stay steady where their separate medians would not. The callers have warmed the calls up. Returns each
    name's times, one per round, in round order. A call that raises is dropped from the rounds; its exception
    is returned in its place."""
    times: Dict[str, list] = {name: [] for name in calls}
    names = list(calls)
    for r in range(max(1, repeats)):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if not isinstance(times[name], list):
                continue
            try:
                t0 = time.perf_counter()
                calls[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
            except (torch.OutOfMemoryError, RuntimeError, NotImplementedError, ValueError, TypeError) as e:
                times[name] = e
    return times


def quantiles(times: Sequence[float]) -> Tuple[float, float, float]:
    """(median, 20th percentile, 80th percentile) of a list of numbers (one number: itself thrice)."""
    times = list(times)
    if len(times) == 1:
        return times[0], times[0], times[0]
    qs = statistics.quantiles(times, n=10, method="inclusive")  # deciles
    return statistics.median(times), qs[1], qs[7]


@contextlib.contextmanager
def _quiet_fd2():
    """Send file descriptor 2 (C++ stderr) to /dev/null for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Callable[[], object], device: torch.device):
    """Run ``fn`` once; return ``(result, bytes)``: the peak memory allocated during the call above what was
    allocated before it (outputs included).

    CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``. CPU: every allocation and
    free of PyTorch's CPU allocator during the call, as recorded by ``torch.profiler`` (``profile_memory=True``),
    summed in time order; the peak of that running sum. None if the profiler recorded no allocation event.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_fd2():  # kineto writes "profiler_start" / "profiler_stop" lines straight to file descriptor 2
        prof.__enter__()
    try:
        result = fn()
    finally:
        with _quiet_fd2():
            prof.__exit__(None, None, None)
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    if not events:
        return result, None
    current = peak = 0
    for _, nbytes in events:  # + allocation, - free
        current += nbytes
        peak = max(peak, current)
    return result, int(peak)


def sample_rows(case: Case, n_img_rows: int = 32, n_txt_rows: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
    """Query positions checked against the reference: evenly spread image rows (first and last included) and
    text rows. Returns two int64 tensors of sequence positions."""
    t0, t1 = case.text_range
    img_pos = torch.cat([torch.arange(0, t0), torch.arange(t1, case.n)])
    txt_pos = torch.arange(t0, t1)

    def spread(pos, k):
        idx = torch.linspace(0, len(pos) - 1, min(k, len(pos))).round().long().unique()
        return pos[idx]

    return spread(img_pos, n_img_rows), spread(txt_pos, n_txt_rows)


def sampled_errors(case: Case, impl: Impl, q, k, v, result, n_img_rows: int = 32, n_txt_rows: int = 16) -> Dict:
    """Max abs error of ``out`` and of each map in ``result`` against a float64 recomputation of the sampled
    query rows, every head, every batch entry: ``{"out": e, "i2t": e, "t2i": e}`` (missing maps left out).

    Per head, the rows' scores against all N keys are computed in float64 (``rows x N`` at a time), so this is
    cheap at any N."""
    out, i2t, t2i = result
    t0, t1 = case.text_range
    img_rows, txt_rows = sample_rows(case, n_img_rows, n_txt_rows)
    rows = torch.cat([img_rows, txt_rows]).to(q.device)
    n_ir = len(img_rows)
    img_first_pos = t1 if t0 == 0 else 0  # sequence position of image token 0
    img_local = (img_rows - img_first_pos).to(q.device)  # rows of i2t
    txt_local = (txt_rows - t0).to(q.device)  # rows of t2i
    img_cols = torch.cat([torch.arange(0, t0), torch.arange(t1, case.n)]).to(q.device)
    scale = case.head_dim ** -0.5
    errs: Dict[str, float] = {"out": 0.0}
    if i2t is not None:
        errs["i2t"] = 0.0
    if t2i is not None:
        errs["t2i"] = 0.0
    for b in range(case.batch):
        ref_out, ref_i2t, ref_t2i = [], [], []
        for h in range(case.heads):
            s = q[b, h, rows].double() @ k[b, h].double().T * scale  # [R, N]
            p = torch.softmax(s, dim=-1)
            ref_out.append(p @ v[b, h].double())  # [R, D]
            ref_i2t.append(p[:n_ir, t0:t1])  # [R_img, T]
            ref_t2i.append(p[n_ir:][:, img_cols])  # [R_txt, N_img]
        ref_out = torch.stack(ref_out)  # [H, R, D]
        errs["out"] = max(errs["out"], (out[b][:, rows].double() - ref_out).abs().max().item())
        for key, got, ref, local in (("i2t", i2t, ref_i2t, img_local), ("t2i", t2i, ref_t2i, txt_local)):
            if got is None:
                continue
            ref = torch.stack(ref)  # [H, R_x, cols]
            if impl.heads == "mean":
                e = (got[b][local].double() - ref.mean(dim=0)).abs().max().item()
            else:
                e = (got[b][:, local].double() - ref).abs().max().item()
            errs[key] = max(errs[key], e)
    return errs


def make_inputs(case: Case, device: torch.device, seed: int = 0):
    """Random ``q, k, v`` ``[B, H, N, D]`` in the case's dtype, standard normal (scores q.k/sqrt(D) ~ N(0, 1))."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (case.batch, case.heads, case.n, case.head_dim)
    return tuple(torch.randn(shape, generator=g, device=device).to(DTYPES[case.dtype]) for _ in range(3))



def _is_no_kernel(e: BaseException) -> bool:
    msg = str(e)
    return "No available kernel" in msg or "not supported" in msg.lower() or "not implemented" in msg.lower()


def failure_status(e: BaseException) -> Tuple[str, str]:
    """(status, note) of an exception raised by an implementation."""
    first_line = (str(e).splitlines() or [""])[0]
    if isinstance(e, torch.OutOfMemoryError):
        return "oom", first_line[:200]
    status = "unsupported" if _is_no_kernel(e) else "error"
    return status, f"{type(e).__name__}: {first_line[:300]}"


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prepare_call(case: Case, impl: Impl, q, k, v, device: torch.device, check: bool = True):
    """Warm ``impl`` up on ``q, k, v`` (compilation and autotuning stay out of the figures), then run it once
    more to measure its peak memory and its errors. Returns ``(call, peak_mem_bytes, errors)``, ``call`` being
    the zero-argument callable to time. Raises what the implementation raises (OOM included)."""
    t0, t1 = case.text_range

    def call():
        return impl.fn(q, k, v, t0, t1)

    call()
    result, peak = peak_memory(call, device)
    errs = sampled_errors(case, impl, q, k, v, result) if check else {}
    del result
    free_memory(device)
    return call, peak, {key: float(val) for key, val in errs.items()}


def run_case(
    case: Case,
    impl_name: str,
    device: torch.device,
    repeats: int = 10,
    allow_interpret: bool = False,
    check: bool = True,
    inputs=None,
) -> Dict:
    """Time one implementation on one case; returns a results row (never raises for OOM or a missing kernel)."""
    return measure_case(case, [impl_name], device, repeats, allow_interpret, check, inputs)[0][0]


def measure_case(
    case: Case,
    impl_names: Sequence[str],
    device: torch.device,
    repeats: int = 10,
    allow_interpret: bool = False,
    check: bool = True,
    inputs=None,
    bar=None,
) -> Tuple[List[Dict], Dict[str, List[float]]]:
    """Every implementation on one case and one input set: each is warmed up and measured (peak memory, error)
    in turn (:func:`prepare_call`), then all are timed: on the CPU together in ``repeats`` interleaved rounds
    (:func:`time_interleaved`), on CUDA one after the other (:func:`time_fn`, do_bench). Returns ``(rows, times)``:
    one results row per name of ``impl_names`` in that order (never raises for OOM or a missing kernel), and
    each timed implementation's per-round times in ms (CPU; empty on CUDA)."""
    bar = bar or _NoBar()
    rows: Dict[str, Dict] = {}
    prepared: Dict[str, tuple] = {}
    for name in impl_names:
        bar.set_description(f"{case.name} {case.dtype} b{case.batch} {name}")
        impl = IMPLS[name]
        reason = unsupported_reason(impl, device, allow_interpret)
        if reason:
            rows[name] = result_row(case, name, status="unsupported", note=reason)
            continue
        if inputs is None:
            inputs = make_inputs(case, device)
        failure = None
        try:
            prepared[name] = prepare_call(case, impl, *inputs, device, check)
        except (torch.OutOfMemoryError, RuntimeError, NotImplementedError, ValueError, TypeError) as e:
            failure = failure_status(e)
        if failure:
            # Freed here, after the except block: the exception's traceback no longer holds the tensors.
            free_memory(device)
            rows[name] = result_row(case, name, status=failure[0], note=failure[1])
    times: Dict[str, List[float]] = {}
    stats: Dict[str, object] = {}
    if device.type == "cuda":
        for name, (call, _, _) in prepared.items():
            try:
                stats[name] = time_fn(call, device, repeats, warmup=False)
            except (torch.OutOfMemoryError, RuntimeError, NotImplementedError, ValueError, TypeError) as e:
                stats[name] = e
    elif prepared:
        bar.set_description(f"{case.name} {case.dtype} b{case.batch}: {repeats} interleaved rounds")
        timed = time_interleaved({name: call for name, (call, _, _) in prepared.items()}, repeats)
        for name, t in timed.items():
            stats[name] = t if isinstance(t, BaseException) else quantiles(t)
            if not isinstance(t, BaseException):
                times[name] = t
    for name, (_, peak, errs) in prepared.items():
        if isinstance(stats[name], BaseException):
            status, note = failure_status(stats[name])
            rows[name] = result_row(case, name, status=status, note=note)
            continue
        med, p20, p80 = stats[name]
        rows[name] = result_row(
            case, name, median_ms=med, p20_ms=p20, p80_ms=p80, tflops=case.flops / (med * 1e-3) / 1e12,
            peak_mem_bytes=peak, max_abs_err=max(errs.values()) if errs else None, errors=errs or None, status="ok",
        )
    del prepared
    free_memory(device)
    for _ in impl_names:
        bar.update(1)
    return [rows[name] for name in impl_names], times


def run_cases(
    cases: Sequence[Case],
    impl_names: Sequence[str],
    device: torch.device,
    repeats: int = 10,
    allow_interpret: bool = False,
    progress: bool = True,
) -> List[Dict]:
    """Every implementation on every case (:func:`measure_case`: one input set per case, shared by the
    implementations; on the CPU timed in interleaved rounds)."""
    rows = []
    bar = progress_bar(total=len(cases) * len(impl_names), enabled=progress)
    for case in cases:
        rows += measure_case(case, impl_names, device, repeats, allow_interpret, bar=bar)[0]
    bar.close()
    return rows


class _NoBar:
    def set_description(self, *_):
        pass

    def update(self, *_):
        pass

    def close(self):
        pass


def progress_bar(total: int, enabled: bool):
    if not enabled or total <= 1:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, file=sys.stderr, leave=False, dynamic_ncols=True)

