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
  on the CPU ``time.perf_counter`` around each call after one warm-up call. ``p20_ms``/``p80_ms`` give the spread.
- ``tflops``: ``4 * N^2 * D * H * B / t`` (the two matrix products of attention over the joint sequence;
  the extra work of writing maps is not counted, so capture shows up as a lower rate).
- ``peak_mem_bytes``: on CUDA ``torch.cuda.max_memory_allocated()`` during one call, minus what was allocated
  before it (the inputs): outputs and maps are included. ``None`` on the CPU: not measured there.
- ``max_abs_err``: the largest absolute difference of ``out`` and of each map the implementation writes from the
  float64 reference, on a sample of query rows of every batch entry (all heads).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._io import atomic_write_json
from .attention import _interpreting
from .reference import full_map_attention

__all__ = [
    "Case", "Impl", "IMPLS", "SCHEMA_VERSION", "ROW_FIELDS", "STATUSES",
    "gpu_cases", "cpu_cases", "quick_cases", "prepare_call", "run_case", "run_cases", "time_fn", "sampled_errors",
    "environment", "results_path", "write_results", "validate_results", "merge_results",
    "load_model_config", "scaled_down_config", "build_transformer", "build_vae", "run_e2e", "E2E_PATHS",

    "register_commands", "run",
]

SCHEMA_VERSION = 1
STATUSES = ("ok", "oom", "unsupported", "error")
# Fields of every row of a results file, in this order (benchmarks/README.md documents each).
ROW_FIELDS = (
    "suite", "case", "model", "resolution", "impl", "dtype", "batch", "heads", "n_img", "n_txt", "head_dim",
    "median_ms", "p20_ms", "p80_ms", "tflops", "peak_mem_bytes", "max_abs_err", "errors", "status", "note",
)
REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "benchmarks" / "configs"

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# ------------------------------------------------------------------------------------------------------------
# Shapes.


@dataclass(frozen=True)
class Case:
    """One attention problem: a joint sequence of ``n_txt + n_img`` tokens, ``heads`` heads of ``head_dim``."""

    model: str  # "sd3-medium", "flux1-dev", or a label for a custom shape
    resolution: Optional[int]  # image side in pixels (16 px per image token), None for a custom shape
    batch: int
    heads: int
    head_dim: int
    n_txt: int
    n_img: int
    text_first: bool  # Flux order [text, image]; False: SD3 order [image, text]
    dtype: str = "float16"

    @property
    def n(self) -> int:
        return self.n_txt + self.n_img

    @property
    def text_range(self) -> Tuple[int, int]:
        return (0, self.n_txt) if self.text_first else (self.n_img, self.n)

    @property
    def name(self) -> str:
        where = f"{self.resolution}px" if self.resolution else f"img{self.n_img}"
        return f"{self.model}-{where}-txt{self.n_txt}"

    @property
    def flops(self) -> float:
        """4 * N^2 * D * H * B: QK^T and PV over the joint sequence, 2 flops per multiply-add."""
        return 4.0 * self.n ** 2 * self.head_dim * self.heads * self.batch


def _tokens(resolution: int) -> int:
    # Both families: VAE factor 8, then 2x2 patches (SD3 patch embed, Flux packing): 16 px per token.
    return (resolution // 16) ** 2


def gpu_cases(
    dtypes: Sequence[str] = ("bfloat16", "float16"),
    batches: Sequence[int] = (1, 2),
    models: Sequence[str] = ("sd3-medium", "flux1-dev"),
) -> List[Case]:
    """The full matrix of issue 5: SD3-medium (24 heads, D 64, 154 and 333 text tokens, text last) at
    1024^2, 2048^2, 3072^2 and Flux.1-dev (24 heads, D 128, 512 text tokens, text first) at 1024^2, 2048^2,
    4096^2; batch 1 and 2; bfloat16 and float16."""
    cases = []
    for dtype in dtypes:
        for batch in batches:
            if "sd3-medium" in models:
                for n_txt in (154, 333):
                    for res in (1024, 2048, 3072):
                        cases.append(Case("sd3-medium", res, batch, 24, 64, n_txt, _tokens(res), False, dtype))
            if "flux1-dev" in models:
                for res in (1024, 2048, 4096):
                    cases.append(Case("flux1-dev", res, batch, 24, 128, 512, _tokens(res), True, dtype))
    return cases


def cpu_cases(dtypes: Sequence[str] = ("float32", "bfloat16"), batches: Sequence[int] = (1,)) -> List[Case]:
    """Small CPU shapes with the real text lengths and layouts: SD3-like (4 heads, D 64, 154 text + 1024
    image, text last) and Flux-like (4 heads, D 128, 512 text + 1024 image, text first)."""
    cases = []
    for dtype in dtypes:
        for batch in batches:
            cases.append(Case("sd3-like", None, batch, 4, 64, 154, 1024, False, dtype))
            cases.append(Case("flux-like", None, batch, 4, 128, 512, 1024, True, dtype))
    return cases


def quick_cases(dtypes: Sequence[str] = ("float32",)) -> List[Case]:
    """Tiny shapes for CI: 2 heads, odd lengths, both text layouts, batch 2 for the SD3-like one."""
    cases = []
    for dtype in dtypes:
        cases.append(Case("sd3-like", None, 2, 2, 64, 154, 256, False, dtype))
        cases.append(Case("flux-like", None, 1, 2, 128, 77, 300, True, dtype))
    return cases


# ------------------------------------------------------------------------------------------------------------
# The implementation table.

ImplFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], tuple]


@dataclass(frozen=True)
class Impl:
    name: str
    fn: ImplFn
    capture: Optional[str]  # maps it returns: "i2t", "t2i", "both" or None
    heads: Optional[str]  # "mean" or "all" for its maps
    needs: str  # "" (any device), "cuda", or "triton" (CUDA, or TRITON_INTERPRET=1 when allowed)
    description: str


def _ours(capture: Optional[str], heads: str, backend: str) -> ImplFn:
    def fn(q, k, v, text_start, text_stop):
        from .attention import joint_attention

        out, maps = joint_attention(
            q, k, v, slice(text_start, text_stop), capture=capture, heads=heads, backend=backend
        )
        return out, maps.i2t, maps.t2i

    return fn


def _sdpa(backend: Optional[str]) -> ImplFn:
    def fn(q, k, v, text_start, text_stop):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v), None, None
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([getattr(SDPBackend, backend)]):
            return F.scaled_dot_product_attention(q, k, v), None, None

    return fn


def _full_map(q, k, v, text_start, text_stop):
    out, i2t = full_map_attention(q, k, v, text_start, text_stop)
    return out, i2t, None


def _impl_table() -> Dict[str, Impl]:
    rows = [
        Impl("ours-i2t-mean", _ours("i2t", "mean", "triton"), "i2t", "mean", "triton",
             "fused Triton kernel, capture i2t, maps averaged over heads (Seg4Diff's use)"),
        Impl("ours-both-all", _ours("both", "all", "triton"), "both", "all", "triton",
             "fused Triton kernel, capture i2t and t2i, every head"),
        Impl("ours-nocap", _ours(None, "mean", "triton"), None, None, "triton",
             "fused Triton kernel, no capture (plain attention)"),
        Impl("sdpa-default", _sdpa(None), None, None, "",
             "F.scaled_dot_product_attention, torch's own backend choice (writes no maps)"),
        Impl("sdpa-cudnn", _sdpa("CUDNN_ATTENTION"), None, None, "cuda",
             "SDPA forced to cuDNN attention (writes no maps)"),
        Impl("sdpa-flash", _sdpa("FLASH_ATTENTION"), None, None, "cuda",
             "SDPA forced to FlashAttention (writes no maps)"),
        Impl("full-map", _full_map, "i2t", "mean", "",
             "Seg4Diff's path: explicit [B,H,N,N] softmax in the model dtype, then SDPA again"),
        Impl("torch-chunked", _ours("i2t", "mean", "torch"), "i2t", "mean", "",
             "joint_attention backend='torch': SDPA's fused kernel with its log-sum-exp, then the image x text "
             "block exp(q k^T s - lse) chunked over query rows, capture i2t mean"),
    ]
    return {impl.name: impl for impl in rows}


IMPLS: Dict[str, Impl] = _impl_table()
# What `bench` times by default, "ours" standing for the resolved --backend.
BENCH_DEFAULT_IMPLS = ("ours", "sdpa-default", "full-map")
BACKEND_IMPL = {"triton": "ours-i2t-mean", "torch": "torch-chunked"}


def unsupported_reason(impl: Impl, device: torch.device, allow_interpret: bool = False) -> Optional[str]:
    """Why ``impl`` cannot run on ``device`` (a sentence), or None if it can be tried."""
    if impl.needs == "cuda" and device.type != "cuda":
        return "needs CUDA"
    if impl.needs == "triton" and device.type != "cuda":
        if not (allow_interpret and _interpreting() and device.type == "cpu"):
            return "Triton kernel needs CUDA (TRITON_INTERPRET=1 with --allow-interpret runs it on CPU, tiny shapes)"
    return None


# ------------------------------------------------------------------------------------------------------------
# Timing, memory, error.


def _sync(device: torch.device) -> None:
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
    return _quantiles(times)


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
    return _quantiles(times)


def _quantiles(times: List[float]) -> Tuple[float, float, float]:
    if len(times) == 1:
        return times[0], times[0], times[0]
    qs = statistics.quantiles(times, n=10, method="inclusive")  # deciles
    return statistics.median(times), qs[1], qs[7]


def peak_memory(fn: Callable[[], object], device: torch.device):
    """Run ``fn`` once; return ``(result, bytes)`` with the peak CUDA memory allocated during the call above
    what was allocated before it. On the CPU the bytes are None: not measured."""
    if device.type != "cuda":
        return fn(), None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    return result, int(torch.cuda.max_memory_allocated(device) - base)


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


def _row(case: Case, impl_name: str, suite: str = "kernel", **values) -> Dict:
    row = dict.fromkeys(ROW_FIELDS)
    row.update(
        suite=suite, case=case.name, model=case.model, resolution=case.resolution, impl=impl_name,
        dtype=case.dtype, batch=case.batch, heads=case.heads, n_img=case.n_img, n_txt=case.n_txt,
        head_dim=case.head_dim, note="",
    )
    row.update(values)
    return row


def _is_no_kernel(e: BaseException) -> bool:
    msg = str(e)
    return "No available kernel" in msg or "not supported" in msg.lower() or "not implemented" in msg.lower()


def _failure(e: BaseException) -> Tuple[str, str]:
    """(status, note) of an exception raised by an implementation."""
    first_line = (str(e).splitlines() or [""])[0]
    if isinstance(e, torch.OutOfMemoryError):
        return "oom", first_line[:200]
    status = "unsupported" if _is_no_kernel(e) else "error"
    return status, f"{type(e).__name__}: {first_line[:300]}"


def _free(device: torch.device) -> None:
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
    _free(device)
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
    impl = IMPLS[impl_name]
    reason = unsupported_reason(impl, device, allow_interpret)
    if reason:
        return _row(case, impl_name, status="unsupported", note=reason)
    q, k, v = inputs if inputs is not None else make_inputs(case, device)
    failure = None
    try:
        call, peak, errs = prepare_call(case, impl, q, k, v, device, check)
        med, p20, p80 = time_fn(call, device, repeats, warmup=False)
    except (torch.OutOfMemoryError, RuntimeError, NotImplementedError, ValueError, TypeError) as e:
        failure = _failure(e)
    if failure:
        # Freed here, after the except block: the exception's traceback no longer holds the tensors.
        _free(device)
        return _row(case, impl_name, status=failure[0], note=failure[1])
    return _row(
        case, impl_name, median_ms=med, p20_ms=p20, p80_ms=p80, tflops=case.flops / (med * 1e-3) / 1e12,
        peak_mem_bytes=peak, max_abs_err=max(errs.values()) if errs else None, errors=errs or None, status="ok",
    )


def run_cases(
    cases: Sequence[Case],
    impl_names: Sequence[str],
    device: torch.device,
    repeats: int = 10,
    allow_interpret: bool = False,
    progress: bool = True,
) -> List[Dict]:
    """Every implementation on every case, one input set per case shared by the implementations."""
    rows = []
    bar = _progress(total=len(cases) * len(impl_names), enabled=progress)
    for case in cases:
        inputs = None
        for name in impl_names:
            bar.set_description(f"{case.name} {case.dtype} b{case.batch} {name}")
            if inputs is None and unsupported_reason(IMPLS[name], device, allow_interpret) is None:
                inputs = make_inputs(case, device)
            rows.append(run_case(case, name, device, repeats, allow_interpret, inputs=inputs))
            bar.update(1)
        del inputs
        _free(device)
    bar.close()
    return rows


class _NoBar:
    def set_description(self, *_):
        pass

    def update(self, *_):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled or total <= 1:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, file=sys.stderr, leave=False, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------------------
# End to end: one capture forward of a full-size transformer with random weights, and the VAE encode.


def load_model_config(name_or_path: str) -> Dict:
    """A model config of ``benchmarks/configs`` by name (``sd3_medium``, ``flux1_dev``) or a path to one."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.json"
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def scaled_down_config(cfg: Dict) -> Dict:
    """The same architecture, tiny (2 blocks, 2 heads of 16, small VAE), for CPU tests: every code path of
    the full-size run, in milliseconds. The expert layer becomes block 1."""
    cfg = json.loads(json.dumps(cfg))
    t = cfg["transformer"]
    t.update(num_layers=2, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32,
             pooled_projection_dim=32)
    if cfg["family"] == "sd3":
        t.update(caption_projection_dim=32, sample_size=32, pos_embed_max_size=64)
    else:
        t.update(num_single_layers=1, axes_dims_rope=[4, 6, 6])
    cfg["vae"].update(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                      up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=8)
    cfg.update(model=cfg["model"] + "-tiny", expert_layer=1, text_tokens=min(cfg["text_tokens"], 13),
               resolutions=[64, 128])
    return cfg


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def _init_module(cls, kwargs: Dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    # Parameters are created directly on the device and in the target dtype (no float32 copy on the host,
    # no download); the values are the classes' own random init, which changes neither speed nor memory.
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = cls(**kwargs)
    # Float buffers (SD3's position embedding is made in float32) in the model dtype too, as a torch_dtype
    # load gives them.
    for buf in model.buffers():
        if buf.is_floating_point():
            buf.data = buf.data.to(dtype)
    return model.eval().requires_grad_(False)


def build_transformer(cfg: Dict, device: torch.device, dtype: torch.dtype):
    """The config's transformer (SD3Transformer2DModel or FluxTransformer2DModel) with random weights."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = SD3Transformer2DModel if cfg["family"] == "sd3" else FluxTransformer2DModel
    kwargs = {k: v for k, v in cfg["transformer"].items() if not k.startswith("_")}
    return _init_module(cls, kwargs, device, dtype)


def build_vae(cfg: Dict, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    kwargs = {k: v for k, v in cfg["vae"].items() if not k.startswith("_")}
    return _init_module(AutoencoderKL, kwargs, device, dtype)


def transformer_inputs(cfg: Dict, resolution: int, batch: int, device: torch.device, dtype: torch.dtype) -> Dict:
    """Random inputs of one transformer forward at ``resolution`` (latent = resolution / 8)."""
    t = cfg["transformer"]
    g = torch.Generator(device=device).manual_seed(0)
    lat = resolution // 8
    n_txt = cfg["text_tokens"]

    def randn(*shape):
        return torch.randn(shape, generator=g, device=device).to(dtype)

    if cfg["family"] == "sd3":
        return dict(
            hidden_states=randn(batch, t["in_channels"], lat, lat),
            encoder_hidden_states=randn(batch, n_txt, t["joint_attention_dim"]),
            pooled_projections=randn(batch, t["pooled_projection_dim"]),
            timestep=torch.full((batch,), 500.0, device=device),
            return_dict=False,
        )
    side = lat // 2  # Flux packs 2x2 latent patches into one token of 4 * 16 channels
    img_ids = torch.zeros(side, side, 3, device=device)
    img_ids[..., 1] = torch.arange(side, device=device)[:, None]
    img_ids[..., 2] = torch.arange(side, device=device)[None, :]
    inputs = dict(
        hidden_states=randn(batch, side * side, t["in_channels"]),
        encoder_hidden_states=randn(batch, n_txt, t["joint_attention_dim"]),
        pooled_projections=randn(batch, t["pooled_projection_dim"]),
        timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
        img_ids=img_ids.reshape(-1, 3).to(dtype),
        txt_ids=torch.zeros(n_txt, 3, device=device, dtype=dtype),
        return_dict=False,
    )
    if t.get("guidance_embeds"):
        inputs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
    return inputs


def _e2e_case(cfg: Dict, resolution: int, batch: int, dtype: str) -> Case:
    t = cfg["transformer"]
    return Case(cfg["model"], resolution, batch, t["num_attention_heads"], t["attention_head_dim"],
                cfg["text_tokens"], _tokens(resolution), cfg["family"] != "sd3", dtype)


E2E_PATHS = ("vae-encode", "plain", "ours", "full-map")


def run_e2e(
    cfg: Dict,
    device: torch.device,
    dtype: str = "float16",
    resolutions: Optional[Sequence[int]] = None,
    batch: int = 1,
    repeats: int = 3,
    paths: Sequence[str] = E2E_PATHS,
    progress: bool = True,
) -> List[Dict]:
    """Rows (suite "e2e") for one model config: per resolution, the VAE encode of an image, a plain forward
    (no capture), a forward with our capture at the expert layer ("ours") and with the full-map path
    ("full-map": capture backend "reference", the explicit softmax in the model dtype). Time and peak memory
    above the weights and inputs; an OOM is a row with status "oom", so the largest resolution that fits is
    read off the rows."""
    tdtype = DTYPES[dtype]
    resolutions = list(resolutions or cfg["resolutions"])
    from .capture import capture

    layer = cfg["expert_layer"]
    rows: List[Dict] = []
    bar = _progress(total=len(resolutions) * len(paths), enabled=progress)

    def record(case, path, fn, note=""):
        failure = None
        try:
            with torch.no_grad():
                fn()  # warm-up
                _, peak = peak_memory(fn, device)
                med, p20, p80 = time_events(fn, device, repeats)
        except (torch.OutOfMemoryError, RuntimeError, NotImplementedError, ValueError, TypeError) as e:
            failure = _failure(e)
        if failure:
            status = "error" if failure[0] == "unsupported" else failure[0]
            rows.append(_row(case, path, suite="e2e", status=status, note=failure[1]))
        else:
            rows.append(_row(case, path, suite="e2e", median_ms=med, p20_ms=p20, p80_ms=p80,
                             peak_mem_bytes=peak, status="ok", note=note))
        _free(device)
        bar.update(1)

    if "vae-encode" in paths:
        vae = build_vae(cfg, device, tdtype)
        for res in resolutions:
            case = _e2e_case(cfg, res, batch, dtype)
            bar.set_description(f"{case.name} vae-encode")
            image, failure = None, None
            try:
                image = torch.rand(batch, 3, res, res, device=device).mul_(2).sub_(1).to(tdtype)
            except torch.OutOfMemoryError as e:
                failure = _failure(e)
            if failure:
                rows.append(_row(case, "vae-encode", suite="e2e", status="oom", note=failure[1]))
                bar.update(1)
            else:
                record(case, "vae-encode", lambda: vae.encode(image).latent_dist.mean)
            del image
            _free(device)
        del vae
        _free(device)

    forward_paths = [p for p in paths if p != "vae-encode"]
    if not forward_paths:
        bar.close()
        return rows
    transformer = build_transformer(cfg, device, tdtype)
    for res in resolutions:
        case = _e2e_case(cfg, res, batch, dtype)
        inputs, failure = None, None
        try:
            inputs = transformer_inputs(cfg, res, batch, device, tdtype)
        except torch.OutOfMemoryError as e:
            failure = _failure(e)
        if failure:
            for path in forward_paths:
                rows.append(_row(case, path, suite="e2e", status="oom", note=failure[1]))
                bar.update(1)
            _free(device)
            continue
        for path in forward_paths:
            bar.set_description(f"{case.name} {path}")
            if path == "plain":
                record(case, path, lambda: transformer(**inputs))
                continue
            backend = "auto" if path == "ours" else "reference"  # reference: the full-map path
            with capture(transformer, layers=[layer], capture="i2t", heads="mean", backend=backend):
                record(case, path, lambda: transformer(**inputs), note=f"capture at layer {layer}")
        del inputs
        _free(device)
    del transformer
    _free(device)
    bar.close()
    return rows


# ------------------------------------------------------------------------------------------------------------
# The results file.


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
    head = ("case", "dtype", "B", "impl", "status", "median ms", "TFLOP/s", "peak mem", "max err")
    lines = [
        (r["case"], r["dtype"], str(r["batch"]), r["impl"], r["status"], _fmt(r["median_ms"], ".3f"),
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


# ------------------------------------------------------------------------------------------------------------
# The `bench` command.


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def bench_case(args, device: torch.device) -> Case:
    """The shape of ``bench``: SD3-like (text last), the options' sizes, or defaults for the device."""
    if device.type == "cuda":
        defaults = dict(heads=24, head_dim=64, n_txt=154, n_img=4096, batch=1, dtype="float16")
    elif args.quick:
        defaults = dict(heads=2, head_dim=64, n_txt=154, n_img=256, batch=1, dtype="float32")
    else:
        defaults = dict(heads=4, head_dim=64, n_txt=154, n_img=1024, batch=1, dtype="float32")
    if device.type == "cuda" and args.quick:
        defaults.update(n_img=1024)
    val = {k: (getattr(args, k) if getattr(args, k) is not None else d) for k, d in defaults.items()}
    return Case("sd3-like", None, val["batch"], val["heads"], val["head_dim"], val["n_txt"], val["n_img"],
                False, val["dtype"])


def resolve_bench_impls(backend: str, impls: Optional[str], device: torch.device) -> List[str]:
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
    return names


def register_commands(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to a ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "bench",
        help="time joint_attention with capture against the full-map path on this device",
        description=(
            "Times joint_attention (capture i2t, heads mean) against Seg4Diff's full-map path and plain SDPA "
            "on one SD3-like shape, and prints median time, TFLOP/s (4 N^2 D H B / t), peak memory above the "
            "inputs (CUDA only) and the max abs error against a float64 reference on sampled rows. "
            "Defaults: 24 heads, D 64, 154 text + 4096 image tokens, float16 on CUDA; 4 heads, 154 + 1024, "
            "float32 on the CPU (--quick: 2 heads, 154 + 256)."
        ),
    )
    p.add_argument("--quick", action="store_true", help="smaller shape, fewer repeats (seconds on a CPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--n-img", type=int, default=None, help="image tokens")
    p.add_argument("--n-txt", type=int, default=None, help="text tokens (placed after the image, as in SD3)")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                   help="what 'ours' is: the Triton kernel or the chunked torch backend (auto: triton on CUDA)")
    p.add_argument("--impls", default=None,
                   help=f"comma-separated implementations; 'ours' = the --backend one. Known: {', '.join(IMPLS)}")
    p.add_argument("--repeats", type=int, default=None, help="timed calls on the CPU (CUDA uses do_bench)")
    p.add_argument("--allow-interpret", action="store_true",
                   help="with TRITON_INTERPRET=1, run the Triton kernel on the CPU (slow: tiny shapes only)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 gives steadier numbers on a busy machine")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results file (schema of benchmarks/)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    device = torch.device(args.device or _default_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: CUDA is not available on this machine; use --device cpu", file=sys.stderr)
        return 2
    try:
        impl_names = resolve_bench_impls(args.backend, args.impls, device)
    except ValueError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    case = bench_case(args, device)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 10)
    env = environment(device)
    print(f"seg4diff-fast bench on {env['device']} ({device.type}), torch {env['torch']}, triton {env['triton']}")
    t0, t1 = case.text_range
    print(f"shape: batch {case.batch}, {case.heads} heads, D {case.head_dim}, {case.n_img} image + {case.n_txt} "
          f"text tokens (text at [{t0}, {t1})), {case.dtype}; {case.flops / 1e9:.3g} GFLOP per call")
    if device.type != "cuda":
        print("timing: time.perf_counter median of", repeats, "calls after one warm-up; peak memory: n/a on CPU")
    else:
        print("timing: triton.testing.do_bench median (CUDA events, warm-up excluded)")
    rows = run_cases([case], impl_names, device, repeats, args.allow_interpret, progress=True)
    print()
    print(format_table(rows))
    full = next((r for r in rows if r["impl"] == "full-map" and r["status"] == "ok"), None)
    ours = next((r for r in rows if r["impl"] in BACKEND_IMPL.values() and r["status"] == "ok"), None)
    if full and ours:
        line = f"\n{ours['impl']} vs full-map: {full['median_ms'] / ours['median_ms']:.2f}x the speed"
        if full["peak_mem_bytes"] and ours["peak_mem_bytes"]:
            line += f", {full['peak_mem_bytes'] / ours['peak_mem_bytes']:.1f}x less peak memory"
        print(line)
    if args.json:
        settings = dict(command="seg4diff-fast bench", quick=args.quick, repeats=repeats, impls=impl_names)
        path = write_results(Path(args.json), env, rows, settings)
        print(f"wrote {path}")
    return 1 if any(r["status"] == "error" for r in rows) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m seg4diff_fast.benchmark ...``: the ``bench`` command without the package CLI."""
    parser = argparse.ArgumentParser(prog="seg4diff-fast")
    register_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
