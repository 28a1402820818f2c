"""The kernel benchmarks through pytest-benchmark: every implementation of ``seg4diff_fast.bench.IMPLS`` on
every case, side by side.

    pytest benchmarks/test_bench_kernel.py --benchmark-enable                       # CPU: tiny shapes
    SEG4DIFF_BENCH=full pytest benchmarks/test_bench_kernel.py --benchmark-enable   # CUDA: issue 5's whole matrix

(pytest.ini disables benchmarking by default: a plain `pytest` runs each benchmark once as a smoke test.)

Scopes (SEG4DIFF_BENCH): "quick" (default on the CPU: 2 heads, a few hundred tokens), "small" (default on CUDA:
the 1024^2 cases, batch 1; on the CPU the 4-head, 1024-image-token shapes), "full" (CUDA: the whole matrix).
Each benchmark's extra_info holds flops, TFLOP/s at the median, peak memory above the inputs (CUDA), the max
abs error against the float64 reference and the case. pytest-benchmark times with the host clock, so each
timed call ends with a device synchronize; benchmarks/run.py gives the CUDA-event figures of the results file.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from seg4diff_fast import bench as bm

DEVICE = torch.device(os.environ.get("SEG4DIFF_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
SCOPE = os.environ.get("SEG4DIFF_BENCH") or ("small" if DEVICE.type == "cuda" else "quick")


def _cases():
    if DEVICE.type == "cuda":
        cases = bm.gpu_cases()
        if SCOPE != "full":
            cases = [c for c in cases if c.resolution == 1024 and c.batch == 1 and c.n_txt in (154, 512)]
        return cases
    return bm.quick_cases(("float32", "bfloat16")) if SCOPE == "quick" else bm.cpu_cases()


CASES = _cases()


@pytest.fixture(scope="module")
def inputs_cache():
    cache = {}
    yield cache
    cache.clear()


@pytest.mark.parametrize("impl_name", list(bm.IMPLS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.name}-{c.dtype}-b{c.batch}")
def test_kernel(benchmark, inputs_cache, case, impl_name):
    impl = bm.IMPLS[impl_name]
    reason = bm.unsupported_reason(impl, DEVICE, allow_interpret=bool(os.environ.get("SEG4DIFF_BENCH_INTERPRET")))
    if reason:
        pytest.skip(reason)
    if case not in inputs_cache:
        inputs_cache.clear()  # one input set at a time on the device
        inputs_cache[case] = bm.make_inputs(case, DEVICE)
    q, k, v = inputs_cache[case]
    try:
        call, peak, errs = bm.prepare_call(case, impl, q, k, v, DEVICE)
    except torch.OutOfMemoryError:
        pytest.skip("out of memory")
    except RuntimeError as e:
        if "No available kernel" in str(e):
            pytest.skip(str(e).splitlines()[0])
        raise

    def timed():
        call()
        bm.synchronize(DEVICE)

    rounds = 5 if DEVICE.type == "cpu" else 20
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
    # With --benchmark-disable (the repository's pytest.ini) the call runs once, untimed, and stats is None.
    median_s = benchmark.stats.stats.median if benchmark.stats else None
    benchmark.extra_info.update(
        case=case.name, impl=impl_name, dtype=case.dtype, batch=case.batch, n_img=case.n_img, n_txt=case.n_txt,
        heads=case.heads, head_dim=case.head_dim, flops=case.flops,
        tflops=case.flops / median_s / 1e12 if median_s else None,
        peak_mem_bytes=peak, max_abs_err=max(errs.values()), errors=errs,
    )
    assert all(math.isfinite(e) for e in errs.values()), errs
