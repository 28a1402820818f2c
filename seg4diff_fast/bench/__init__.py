"""Benchmarks of joint attention with text-image capture: shapes, the implementation table, timing, the
end-to-end capture forward, the results file, and the ``seg4diff-fast bench`` command.

One table, :data:`IMPLS`, names every implementation that is timed; the ``bench`` command, ``benchmarks/run.py``
and the pytest-benchmark files in ``benchmarks/`` all take their callables from it.

Every implementation is called as ``fn(q, k, v, text_start, text_stop) -> (out, i2t, t2i)``:

- ``q, k, v``: ``[B, H, N, D]``; the text tokens are positions ``[text_start, text_stop)``, which touch the start
  (Flux order ``[text, image]``) or the end (SD3 order ``[image, text]``) of the joint sequence.
- ``out``: ``[B, H, N, D]``; ``i2t``: ``[B, N_img, T]`` (heads averaged) or ``[B, H, N_img, T]``; ``t2i``:
  ``[B, T, N_img]`` or ``[B, H, T, N_img]``; a map the implementation does not write is ``None``.

Figures per row (see ``benchmarks/README.md`` for the results schema):

- ``median_ms``: on CUDA ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs, warm-up excluded);
  on the CPU ``time.perf_counter`` around each call, after warm-up, in interleaved rounds (each round calls every
  implementation of the case once, the order rotated: :func:`time_interleaved`), so that load from other work
  falls on all of them alike. ``p20_ms``/``p80_ms`` give the spread.
- ``tflops``: ``4 * N^2 * D * H * B / t`` (the two matrix products of attention over the joint sequence;
  the extra work of writing maps is not counted, so capture shows up as a lower rate).
- ``peak_mem_bytes``: on CUDA ``torch.cuda.max_memory_allocated()`` during one call, minus what was allocated
  before it (the inputs): outputs and maps are included. On the CPU every allocation and free of PyTorch's CPU
  allocator during the call, recorded by ``torch.profiler`` and summed in time order: the peak of that sum
  (:func:`peak_memory`; ``None`` only if the profiler recorded no allocation).
- ``max_abs_err``: the largest absolute difference of ``out`` and of each map the implementation writes from the
  float64 reference, on a sample of query rows of every batch entry (all heads).

Modules, one concern each: ``cases`` (shapes), ``impls`` (the implementation table), ``measure`` (timing, memory,
error, one row per case x implementation), ``e2e`` (full-size model forwards), ``results`` (the results file
and its table), ``command`` (``seg4diff-fast bench``). Everything public is re-exported here.
"""
from .cases import DTYPES, Case, cpu_cases, gpu_cases, quick_cases, tokens
from .command import (
    bench_case, check_json_path, csv_arg, device_arg, headline, int_range, main, one_line_errors, register_commands,
    resolve_bench_impls, run,
)
from .e2e import (
    CAPTURE_BACKENDS, CONFIG_DIR, E2E_PATHS, build_transformer, build_vae, load_model_config, run_e2e,
    scaled_down_config, transformer_inputs,
)
from .impls import BACKEND_IMPL, BENCH_DEFAULT_IMPLS, IMPLS, Impl, unsupported_reason
from .measure import (
    failure_status, free_memory, make_inputs, measure_case, peak_memory, prepare_call, progress_bar, quantiles,
    run_case, run_cases, sample_rows, sampled_errors, synchronize, time_events, time_fn, time_interleaved,
)
from .results import (
    REPO_ROOT, ROW_FIELDS, SCHEMA_VERSION, STATUSES, device_slug, environment, format_bytes, format_table,
    merge_results, result_row, results_path, validate_results, write_results,
)

__all__ = [
    "Case", "DTYPES", "gpu_cases", "cpu_cases", "quick_cases", "tokens",
    "Impl", "IMPLS", "BENCH_DEFAULT_IMPLS", "BACKEND_IMPL", "unsupported_reason",
    "synchronize", "time_fn", "time_events", "time_interleaved", "quantiles", "peak_memory", "sample_rows",
    "sampled_errors", "make_inputs", "failure_status", "free_memory", "prepare_call", "run_case", "measure_case",
    "run_cases", "progress_bar",
    "CONFIG_DIR", "E2E_PATHS", "CAPTURE_BACKENDS", "load_model_config", "scaled_down_config", "build_transformer",
    "build_vae", "transformer_inputs", "run_e2e",
    "SCHEMA_VERSION", "STATUSES", "ROW_FIELDS", "REPO_ROOT", "result_row", "environment", "device_slug",
    "results_path", "write_results", "merge_results", "validate_results", "format_bytes", "format_table",
    "bench_case", "resolve_bench_impls", "check_json_path", "headline", "register_commands", "run", "main",
    "one_line_errors", "int_range", "device_arg", "csv_arg",
]
