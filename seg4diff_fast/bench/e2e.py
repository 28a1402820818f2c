"""End to end: one capture forward of a full-size transformer with random weights, and the VAE encode."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .._io import read_json
from .cases import DTYPES, Case, tokens
from .measure import failure_status, free_memory, peak_memory, progress_bar, time_events
from .results import REPO_ROOT, result_row

__all__ = [
    "CONFIG_DIR", "E2E_PATHS", "CAPTURE_BACKENDS", "load_model_config", "scaled_down_config", "build_transformer",
    "build_vae", "transformer_inputs", "run_e2e",
]

CONFIG_DIR = REPO_ROOT / "benchmarks" / "configs"


def load_model_config(name_or_path: str) -> Dict:
    """A model config of ``benchmarks/configs`` by name (``sd3_medium``, ``flux1_dev``) or a path to one."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.json"
    return read_json(str(path), "model config")  # as users save it (a byte-order mark, CRLF)


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
                cfg["text_tokens"], tokens(resolution), cfg["family"] != "sd3", dtype)


E2E_PATHS = ("vae-encode", "plain", "ours", "full-map")
# The capture backend of each e2e path that captures at the expert layer: ours (what backend="auto" runs) and
# Seg4Diff's own path (reference.full_map_attention, in the model dtype).
CAPTURE_BACKENDS = {"ours": "auto", "full-map": "full-map"}


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
    (no capture), a forward with our capture at the expert layer ("ours") and with Seg4Diff's own path there
    ("full-map": capture backend "full-map", i.e. ``reference.full_map_attention``, the function the kernel
    benchmark's "full-map" row times: the explicit ``[B, H, N, N]`` softmax in the model dtype, its image x text
    block averaged over heads, then SDPA again for the layer's output). Time and peak memory above the weights and
    inputs; an OOM is a row with status "oom", so the largest resolution that fits is read off the rows."""
    tdtype = DTYPES[dtype]
    resolutions = list(resolutions or cfg["resolutions"])
    from ..capture import capture_attention

    layer = cfg["expert_layer"]
    rows: List[Dict] = []
    bar = progress_bar(total=len(resolutions) * len(paths), enabled=progress)

    def record(case, path, fn, note=""):
        failure = None
        try:
            with torch.no_grad():
                fn()  # warm-up
                _, peak = peak_memory(fn, device)
                med, p20, p80 = time_events(fn, device, repeats)
        except (torch.OutOfMemoryError, RuntimeError, NotImplementedError, ValueError, TypeError) as e:
            failure = failure_status(e)
        if failure:
            status = "error" if failure[0] == "unsupported" else failure[0]
            rows.append(result_row(case, path, suite="e2e", status=status, note=failure[1]))
        else:
            rows.append(result_row(case, path, suite="e2e", median_ms=med, p20_ms=p20, p80_ms=p80,
                             peak_mem_bytes=peak, status="ok", note=note))
        free_memory(device)
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
                failure = failure_status(e)
            if failure:
                rows.append(result_row(case, "vae-encode", suite="e2e", status="oom", note=failure[1]))
                bar.update(1)
            else:
                record(case, "vae-encode", lambda: vae.encode(image).latent_dist.mean)
            del image
            free_memory(device)
        del vae
        free_memory(device)

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
            failure = failure_status(e)
        if failure:
            for path in forward_paths:
                rows.append(result_row(case, path, suite="e2e", status="oom", note=failure[1]))
                bar.update(1)
            free_memory(device)
            continue
        for path in forward_paths:
            bar.set_description(f"{case.name} {path}")
            if path == "plain":
                record(case, path, lambda: transformer(**inputs))
                continue
            with capture_attention(transformer, layers=[layer], capture="i2t", heads="mean",
                                   backend=CAPTURE_BACKENDS[path]):
                record(case, path, lambda: transformer(**inputs), note=f"capture at layer {layer}")
        del inputs
        free_memory(device)
    del transformer
    free_memory(device)
    bar.close()
    return rows

