"""End-to-end benchmarks through pytest-benchmark: one forward of the full-size SD3-medium and Flux.1-dev
transformers (benchmarks/configs, random weights, half precision) with capture at the expert layer, against
the full-map path and a plain forward; plus the VAE encode.

    pytest benchmarks/test_bench_e2e.py --benchmark-enable      # CUDA: full size at 1024^2; CPU: scaled down
    SEG4DIFF_BENCH=full pytest benchmarks/test_bench_e2e.py --benchmark-enable   # CUDA: every resolution

The capture paths capture at the config's expert layer with the backends of
``seg4diff_fast.bench.CAPTURE_BACKENDS`` (ours: "auto"; full-map: "full-map", ``reference.full_map_attention`` in
the model dtype). An out-of-memory forward is skipped as "out of memory": benchmarks/run.py --suite e2e records it
as a row and reports the largest resolution each path fits.
"""
from __future__ import annotations

import os

import pytest
import torch

from seg4diff_fast import bench as bm
from seg4diff_fast.capture import capture_attention

DEVICE = torch.device(os.environ.get("SEG4DIFF_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32
MODELS = ("sd3_medium", "flux1_dev")


def _config(name):
    cfg = bm.load_model_config(name)
    return cfg if DEVICE.type == "cuda" else bm.scaled_down_config(cfg)


def _resolutions(name):
    if DEVICE.type != "cuda":
        return [64]
    # SEG4DIFF_BENCH=full: every resolution of the config; default: 1024^2 only (a plain `pytest` on a GPU).
    return _config(name)["resolutions"] if os.environ.get("SEG4DIFF_BENCH") == "full" else [1024]


PARAMS = [(m, r) for m in MODELS for r in _resolutions(m)]


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name, part):
        if (name, part) not in cache:
            cache.clear()
            torch.cuda.empty_cache() if DEVICE.type == "cuda" else None
            cfg = _config(name)
            build = bm.build_transformer if part == "transformer" else bm.build_vae
            cache[(name, part)] = (cfg, build(cfg, DEVICE, DTYPE))
        return cache[(name, part)]

    yield get
    cache.clear()


def _bench(benchmark, fn):
    def timed():
        with torch.no_grad():
            fn()
        bm.synchronize(DEVICE)

    try:
        timed()  # warm-up; an OOM here skips
    except torch.OutOfMemoryError:
        pytest.skip("out of memory")
    with torch.no_grad():
        _, peak = bm.peak_memory(fn, DEVICE)
    benchmark.pedantic(timed, rounds=3, warmup_rounds=0, iterations=1)
    benchmark.extra_info["peak_mem_bytes"] = peak


@pytest.mark.parametrize("name,resolution", PARAMS)
def test_vae_encode(benchmark, models, name, resolution):
    cfg, vae = models(name, "vae")
    image = torch.rand(1, 3, resolution, resolution, device=DEVICE).mul_(2).sub_(1).to(DTYPE)
    _bench(benchmark, lambda: vae.encode(image).latent_dist.mean)


@pytest.mark.parametrize("path", ["plain", "ours", "full-map"])
@pytest.mark.parametrize("name,resolution", PARAMS)
def test_forward(benchmark, models, name, resolution, path):
    cfg, transformer = models(name, "transformer")
    inputs = bm.transformer_inputs(cfg, resolution, 1, DEVICE, DTYPE)
    benchmark.extra_info.update(model=cfg["model"], resolution=resolution, path=path, layer=cfg["expert_layer"])
    if path == "plain":
        _bench(benchmark, lambda: transformer(**inputs))
        return
    with capture_attention(transformer, layers=[cfg["expert_layer"]], capture="i2t", heads="mean",
                           backend=bm.CAPTURE_BACKENDS[path]) as store:
        _bench(benchmark, lambda: transformer(**inputs))
    assert store.maps, "capture registered but nothing captured"
