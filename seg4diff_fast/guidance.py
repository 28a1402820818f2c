"""Perturbed-I2T guidance (Seg4Diff, Section 3.3): guide generation away from a prediction whose image-to-text
attention was blurred at chosen layers.

Per denoising forward the guidance runs a *companion* forward on the conditional rows in which the chosen
layers' image-query x text-key probabilities ``P_i2t`` are Gaussian-blurred over the image grid (per head and
per text column), and returns

    eps~ = eps + s * (eps_c - eps^_c)

on every row, ``eps_c`` the conditional prediction and ``eps^_c`` the companion's. Under classifier-free
guidance the same ``s * (eps_c - eps^_c)`` is added to the unconditional and conditional rows, so the
pipeline's ``eps_u + g (eps_c - eps_u)`` becomes ``eps_cfg + s (eps_c - eps^_c)``: SEG's combination
(``noise_pred_text + (cfg - 1)(text - uncond) + seg_scale (text - perturbed)``), whatever ``g``.

Memory: the blurred layer never forms the ``N x N`` matrix. Only the image rows change, by
``out' = out + (P~_i2t - P_i2t) V_text`` per head (``P_i2t`` ``[B, H, N_img, T]`` from
:func:`~seg4diff_fast.attention.joint_attention` with ``capture="i2t", heads="all"``), which is exactly the
attention output with the ``i2t`` block of ``P`` replaced by its blurred copy.

The blur. Seg4Diff's public code (cvlab-kaist/Seg4Diff) does not contain the guidance; the paper cites SEG
(Hong 2024, "Smoothed Energy Guidance"), whose code (SusungHong/SEG-SDXL, ``gaussian_blur_2d``) we follow:
kernel ``exp(-x^2 / (2 sigma^2))`` on ``x = -(k-1)/2 .. (k-1)/2``, normalised to sum 1, size
``k = ceil(6 sigma) + 1``, made odd, its radius capped at half the axis length (SEG's ``min(k, n - (n % 2 - 1))``); reflect
padding (the edge is not repeated); ``sigma > 9999`` is SEG's "infinite blur", the mean over the grid. Ours is
separable and caps the kernel per grid axis (SEG caps one square kernel by the width; equal on square grids).
SEG blurs queries, we blur the probabilities themselves, as the paper describes. ``sigma = 0`` is the identity.
Every text column of the text block is blurred (the paper names the I2T block, not a subset). Rows are not
renormalised by default (the blur moves probability between image rows of one text column, so a row's total
drifts from 1 by the local change); ``renormalize=True`` divides each image row of the layer's output by its
new total ``1 + sum_j (P~ - P)[i, j]``, so that every row is again a distribution.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
from typing import Iterable, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .attention import BACKENDS, joint_attention, resolve_text_slice
from .capture.base import CaptureSite, ForwardContext, ids_grid
from .capture.handle import COMPANION_FORWARD, _CacheContextProbe, _adapter_for, _find_transformer, _resolve_layers

__all__ = ["PerturbedI2TGuidance", "perturbed_i2t_guidance", "blur_i2t", "perturbed_attention", "gaussian_kernel",
           "INFINITE_SIGMA", "COMPANION_CONTEXT"]

INFINITE_SIGMA = 9999.0  # SEG's threshold: a larger sigma is the mean over the grid
COMPANION_CONTEXT = "perturbed_i2t"  # cache_context name of the companion forward (diffusers cache hooks)


def gaussian_kernel(sigma: float, n: int) -> torch.Tensor:
    """SEG's 1-D Gaussian for a grid axis of ``n`` tokens: ``[k]`` float64, sums to 1, ``k`` odd (see module doc)."""
    k = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    k = min(k, n + 1 - n % 2)  # SEG's cap: radius k // 2 at most n // 2 (reflect padding needs < n)
    half = (k - 1) / 2
    x = torch.linspace(-half, half, k, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return pdf / pdf.sum()


def _check_sigma(sigma) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or math.isnan(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a number >= 0 (0: no blur; > {INFINITE_SIGMA:g} or inf: the mean over the "
                         f"grid), got {sigma!r}")
    return float(sigma)


def blur_i2t(i2t: torch.Tensor, grid: Tuple[int, int], sigma: float) -> torch.Tensor:
    """Blur ``i2t`` ``[B, H, N_img, T]`` over the image grid ``(h, w)`` (``N_img = h * w``, row-major), separately
    per batch row, head and text column. Returns a new ``[B, H, N_img, T]`` tensor in ``i2t``'s dtype."""
    sigma = _check_sigma(sigma)
    if i2t.ndim != 4:
        raise ValueError(f"i2t must be [B, H, N_img, T], got shape {tuple(i2t.shape)}")
    h, w = (int(g) for g in grid)
    B, H, n_img, T = i2t.shape
    if h * w != n_img:
        raise ValueError(f"grid {h}x{w} does not hold the {n_img} image tokens of i2t")
    if sigma == 0:
        return i2t.clone()
    maps = i2t.permute(0, 1, 3, 2).reshape(B * H * T, 1, h, w)  # one map per (batch, head, text column)
    if sigma > INFINITE_SIGMA:
        blurred = maps.mean(dim=(-2, -1), keepdim=True).expand_as(maps)
    else:
        blurred = maps
        for axis, n in ((-1, w), (-2, h)):
            kern = gaussian_kernel(sigma, n).to(maps.device, maps.dtype)
            p = kern.numel() // 2
            if p == 0:
                continue
            if axis == -1:
                blurred = F.conv2d(F.pad(blurred, (p, p, 0, 0), mode="reflect"), kern.view(1, 1, 1, -1))
            else:
                blurred = F.conv2d(F.pad(blurred, (0, 0, p, p), mode="reflect"), kern.view(1, 1, -1, 1))
    return blurred.reshape(B, H, T, n_img).permute(0, 1, 3, 2).contiguous()


def perturbed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_slice, grid: Tuple[int, int],
                        sigma: float, renormalize: bool = False, backend: str = "auto") -> torch.Tensor:
    """Joint attention with its I2T block blurred: ``q, k, v`` ``[B, H, N, D]`` -> ``[B, H, N, D]`` like ``q``.

    ``out' = out + (P~_i2t - P_i2t) V_text`` on the image rows (divided by ``1 + rowsum(P~_i2t - P_i2t)`` with
    ``renormalize``); text rows are the plain output. ``P_i2t`` ``[B, H, N_img, T]`` float32 comes from
    :func:`joint_attention` (no ``N x N`` matrix); the correction is computed in float32."""
    out, maps = joint_attention(q, k, v, text_slice, capture="i2t", heads="all", map_dtype=torch.float32,
                                backend=backend)
    start, stop = resolve_text_slice(text_slice, q.shape[2])
    p = maps.i2t  # [B, H, N_img, T]
    dp = blur_i2t(p, grid, sigma) - p
    img = slice(stop, None) if start == 0 else slice(0, start)  # image rows: every position outside the text
    out_img = out[:, :, img].float() + dp @ v[:, :, start:stop].float()  # [B, H, N_img, D]
    if renormalize:
        out_img = out_img / (1.0 + dp.sum(-1, keepdim=True))
    out = out.clone()
    out[:, :, img] = out_img.to(out.dtype)
    return out


class _PerturbSite(CaptureSite):
    """A capture site whose attention is :func:`perturbed_attention`: the family's capture processors (they
    project, norm and rotate q, k, v as the model does) run it in place of :func:`joint_attention`."""

    def attention(self, q, k, v, text_slice, original=None):
        # original (the layer's own attention, for rows a store does not record): unused, every row is blurred
        g = self.handle
        grid = self.context.grid
        grid = ids_grid(grid)() if isinstance(grid, torch.Tensor) else grid  # Flux-style position ids
        return perturbed_attention(q, k, v, text_slice, grid, g.sigma, g.renormalize, g.backend)


def _sample(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


def _with_sample(output, sample: torch.Tensor):
    if isinstance(output, tuple):
        return (sample,) + tuple(output[1:])
    return type(output)(sample=sample)


class PerturbedI2TGuidance:
    """Perturbed-I2T guidance on a diffusers pipeline (or its transformer) while installed.

    Args:
        pipe_or_transformer: an SD3 / SD3.5 / Flux / Flux.2 pipeline or transformer (the families of
            :func:`seg4diff_fast.register`). Give the pipeline under CFG: its ``do_classifier_free_guidance``
            says whether a transformer batch is ``[uncond, cond]``.
        layers: the layers whose I2T attention is blurred (names or indices, as in ``register``).
        scale: ``s`` in ``eps + s (eps_c - eps^_c)``; 0 leaves the prediction unchanged.
        sigma: Gaussian blur in image tokens (SEG's kernel, see the module doc); ``float("inf")``: the mean.
        renormalize: divide each blurred image row by its new total (default False, see the module doc).
        backend: :func:`joint_attention` backend of the blurred layers.

    Use ``with PerturbedI2TGuidance(pipe, [9], scale=3.0, sigma=10.0): pipe(prompt)`` or ``install()`` /
    ``remove()``. Each pipeline forward then runs one more forward, on the conditional rows only. The forwards a
    pipeline runs after the guided one within a step get that step's correction without a companion: Flux's
    true-CFG pass (inside ``cache_context("uncond")``) and SD3's skip-layer-guidance pass (cond rows), so that
    their differences with the guided prediction stay the model's own. A capture registered on the same transformer does not record
    the companion forward (the transformer carries ``capture.handle.COMPANION_FORWARD`` during it); it runs
    inside ``cache_context("perturbed_i2t")`` where the transformer has one (diffusers' cache hooks).
    """

    def __init__(self, pipe_or_transformer, layers: Union[int, str, Iterable[Union[int, str]]], scale: float,
                 sigma: float, renormalize: bool = False, backend: str = "auto"):
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.sigma = _check_sigma(sigma)
        self.scale = float(scale)
        self.renormalize = bool(renormalize)
        self.backend = backend
        self.transformer, self.pipe = _find_transformer(pipe_or_transformer)
        self.adapter = _adapter_for(self.transformer)
        self.specs = _resolve_layers(self.adapter, self.transformer, layers)
        self.layers = [s.name for s in self.specs]
        self.context = ForwardContext()  # read by the sites during the companion forward
        self._params = list(inspect.signature(type(self.transformer).forward).parameters)[1:]
        self._hook = None
        self._in_companion = False
        self._last_delta: Optional[torch.Tensor] = None  # s * (eps_c - eps^_c) of the last guided forward, [B, ...]
        self._cond_delta: Optional[torch.Tensor] = None  # the same for its conditional rows only, [B', ...]

    # ------------------------------------------------------------------ installation
    def install(self) -> "PerturbedI2TGuidance":
        if self._hook is not None:
            raise RuntimeError("this guidance is already installed")
        self._last_delta = self._cond_delta = None
        self._hook = self.transformer.register_forward_hook(self._after_forward, with_kwargs=True)
        _CacheContextProbe.attach(self.transformer)
        return self

    def remove(self) -> None:
        if self._hook is None:
            return
        self._hook.remove()
        self._hook = None
        _CacheContextProbe.detach(self.transformer)

    def __enter__(self) -> "PerturbedI2TGuidance":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    # ------------------------------------------------------------------ per forward
    @contextlib.contextmanager
    def _companion(self):
        """Swap the perturbing processors in (only for the companion forward: the plain forward runs the
        model's own processors untouched) and mark the forward for captures and cache hooks."""
        old = {s.name: s.attn.processor for s in self.specs}
        for s in self.specs:
            site = _PerturbSite(self, s.name)
            cur = old[s.name]
            if isinstance(getattr(cur, "site", None), CaptureSite):  # a capture processor: same projections
                proc = copy.copy(cur)
                proc.site = site
            else:
                proc = self.adapter.make_processor(s, site, cur)
            s.attn.set_processor(proc)
        cache = getattr(self.transformer, "cache_context", None)  # diffusers cache hooks keep per-name state
        self._in_companion = True
        setattr(self.transformer, COMPANION_FORWARD, True)  # captures: not a step
        try:
            with (cache(COMPANION_CONTEXT) if cache is not None else contextlib.nullcontext()):
                yield
        finally:
            self._in_companion = False
            delattr(self.transformer, COMPANION_FORWARD)
            for s in self.specs:
                s.attn.set_processor(old[s.name])

    def _after_forward(self, module, args, kwargs, output):
        if self._in_companion:
            return None
        bound = dict(zip(self._params, args))
        bound.update(kwargs)
        eps = _sample(output)  # [B, ...]
        if self.adapter.skip_forward(bound):
            # SD3's skip-layer-guidance pass (cond rows, after the step's guided forward): it gets the step's
            # correction too, so that its difference with the corrected eps_c stays the model's own
            if self._cond_delta is None or self._cond_delta.shape != eps.shape:
                raise RuntimeError("perturbed-I2T guidance: a skip-layer-guidance forward came without the guided "
                                   "forward of its step before it")
            return _with_sample(output, eps + self._cond_delta)
        if _CacheContextProbe.current(self.transformer) == "uncond":  # Flux true CFG: after the cond forward
            if self._last_delta is None or self._last_delta.shape != eps.shape:
                raise RuntimeError("perturbed-I2T guidance: an unconditional forward came without the conditional "
                                   "forward of its step before it")
            return _with_sample(output, eps + self._last_delta)
        B = eps.shape[0]
        cfg = self.pipe is not None and bool(getattr(self.pipe, "do_classifier_free_guidance", False))
        batched_cfg = cfg and self.adapter.cfg_batched
        if batched_cfg and B % 2:
            raise RuntimeError(f"classifier-free guidance batch of {B} rows is not [uncond, cond]")
        rows = slice(B // 2, B) if batched_cfg else slice(0, B)
        companion = {}
        for name, value in bound.items():
            batched = (isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == B
                       and not (name.endswith("_ids") and value.ndim == 2))  # Flux's [N, 3] position ids
            companion[name] = value[rows] if batched else value
        text_len, grid, _ = self.adapter.read_forward(module, companion)
        self.context = ForwardContext(text_len=text_len, grid=grid)
        with self._companion():
            perturbed = _sample(module(**companion))  # [B', ...]
        self._cond_delta = delta = self.scale * (eps[rows] - perturbed)  # [B', ...]
        if batched_cfg:
            delta = torch.cat([delta, delta])
        self._last_delta = delta  # [B, ...]
        return _with_sample(output, eps + delta)


@contextlib.contextmanager
def perturbed_i2t_guidance(pipe_or_transformer, layers, scale: float, sigma: float, renormalize: bool = False,
                           backend: str = "auto"):
    """``with perturbed_i2t_guidance(pipe, layers=[9], scale=3.0, sigma=10.0): pipe(prompt)``."""
    g = PerturbedI2TGuidance(pipe_or_transformer, layers, scale, sigma, renormalize, backend)
    g.install()
    try:
        yield g
    finally:
        g.remove()


# ---------------------------------------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    """The ``generate`` subcommand's guidance flags (``seg4diff_fast.segmentation.commands`` adds them)."""
    from .cli import integer_list, number

    g = parser.add_argument_group("perturbed-I2T guidance (Seg4Diff Section 3.3; off unless --perturb-scale)")
    g.add_argument("--perturb-scale", type=number(),
                   help="s in eps + s (eps_c - eps^_c), eps^_c the prediction with blurred I2T attention "
                        "(default: none, no guidance)")
    g.add_argument("--perturb-layers", type=integer_list(lo=0, names=True, what="layer indices or module names"),
                   help="layers whose I2T attention is blurred, comma separated ints or names (default: --layers, "
                        "the expert layer)")
    g.add_argument("--perturb-sigma", type=number(lo=0, infinite=True), default=float("inf"),
                   help="Gaussian blur in image tokens; > 9999 or inf: the mean over the grid (default: inf, "
                        "SEG's default)")
    g.add_argument("--perturb-renormalize", action="store_true",
                   help="divide each blurred image row of the attention by its new total (default: off)")


def parse_arguments(args) -> Optional[dict]:
    """``None`` (no guidance) or the keyword arguments of :class:`PerturbedI2TGuidance` but the pipeline, checked
    before any model loads; layers ``None`` means the protocol's expert layers."""
    if args.perturb_scale is None:
        if args.perturb_layers or args.perturb_renormalize:
            raise ValueError("--perturb-layers / --perturb-renormalize need --perturb-scale")
        return None
    # the values were checked by their argparse types (seg4diff_fast.cli.number, integer_list), naming the flags
    layers = list(args.perturb_layers) if args.perturb_layers else None
    return dict(layers=layers, scale=args.perturb_scale, sigma=args.perturb_sigma,
                renormalize=args.perturb_renormalize)
