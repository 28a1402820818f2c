"""Seg4Diff open-vocabulary segmentation: image + class names -> per-class scores and a label map.

The chain, per image (shapes for SD3-medium at the paper's 1024^2):

  pixels [3, H, W] -> resize/pad to the working size [3, Hw, Ww] (Geometry) -> VAE posterior mean, shift,
  scale -> latent z [1, 16, 128, 128] -> noised once, z_t = scheduler.scale_noise(z, t, noise) at
  t = timesteps[-8] of 28 -> one transformer forward per batch of prompts (no CFG) -> i2t at the expert
  layer(s), normalised as ``protocol.normalize``, heads averaged (``protocol.heads``) [P, N_img=4096, T=77]
  -> (``norm_before_merge``: each column min-max over the pixels) -> class score = mean of its token columns
  [C, 64, 64] -> bilinear to the input size [C, H, W] (through the working size when it was padded) -> argmax.
  ``protocol.tta``: the official test-time augmentation around all of it (:meth:`Segmenter._segment_tta`).

The attention source is a seam: ``attention_source(batch) -> i2t [B, N_img, T]`` where ``batch`` is a
:class:`ForwardBatch`. The default reads it with ``seg4diff_fast.capture`` while ``batch.run()`` does the
forward, normalised and reduced over heads as ``batch.normalize`` and ``batch.heads`` say; tests plant their own.
"""
from __future__ import annotations

import copy
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..capture.families import by_name
from .images import PAPER_MAX_EDGE, PAPER_SHORT_EDGE, Geometry, load_frames, load_image, plan_geometry, resize_8bit
from .families import SegFamily, family_spec
from .protocol import (PROTOCOLS, Protocol, ProtocolError, check_protocol, family_of, image_seed, protocol_for,
                       resolve_middle)
from .tiny import tiny_models
from .tokens import PromptColumns, check_class_names, name_key, name_spans, pack_prompts

__all__ = ["Segmenter", "SegmentationResult", "ForwardBatch", "capture_attention_source", "TINY_MODELS"]

#: ``--model`` name -> protocol key of every tiny pipeline the family records name (``segment.tiny``: ``tiny-<name>``,
#: ``_`` as ``-``), and ``tiny``, SD3's
TINY_MODELS = {"tiny": "sd3", **{"tiny-" + name.replace("_", "-"): m[0] for name, m in tiny_models().items()}}
#: tiny models whose :func:`~seg4diff_fast.segmentation.tiny.tiny_pipeline` name is not their protocol key
TINY_PIPELINES = {"tiny-" + name.replace("_", "-"): name for name, m in tiny_models().items() if name != m[0]}


@dataclass
class SegmentationResult:
    """``labels``: ``[H, W]`` int64 class ids at the input's size; ``scores``: ``[C, H, W]`` float32 per-class
    scores (mean attention probability of the class's tokens, upsampled); ``classes``: the names, id order.
    For a list of images ``labels`` and ``scores`` are lists; index the result for one image's result."""

    labels: object
    scores: object
    classes: List[str]
    meta: object = field(default_factory=dict)
    image: object = None  # the generated image (generate) or None

    def __len__(self):
        return len(self.labels) if isinstance(self.labels, list) else 1

    def __getitem__(self, i) -> "SegmentationResult":
        if not isinstance(self.labels, list):
            if i in (0, -1):
                return self
            raise IndexError(i)
        img = self.image[i] if isinstance(self.image, list) else self.image
        return SegmentationResult(self.labels[i], None if self.scores is None else self.scores[i], self.classes,
                                  self.meta[i], img)


@dataclass
class ForwardBatch:
    """What the attention source sees for one transformer forward (or one generation).

    ``prompts``: B strings; ``text_index``: ``[T]`` int64 text columns to keep (positions of the read
    tokenizer's padded sequence); ``grid``: (h, w) image tokens; ``latents``: the noised latents or None;
    ``run()``: does the forward (or the whole generation); ``layers``: the expert layer(s)."""

    prompts: List[str]
    text_index: torch.Tensor
    grid: tuple
    layers: tuple
    run: Callable[[], object]
    transformer: object
    latents: Optional[torch.Tensor] = None
    family: str = "sd3"
    steps: str = "mean"
    output: object = None
    #: the forward's output is not needed: the source may stop it after the last expert layer
    stop_after_layers: bool = False
    #: ``Protocol.heads`` and ``Protocol.normalize``: how the maps are reduced over heads and normalised
    heads: object = "mean"
    normalize: str = "joint"


class _ExpertLayersDone(Exception):
    """Raised after the last expert layer of a forward whose output is not needed (``stop_after_layers``)."""


def capture_attention_source(batch: ForwardBatch) -> torch.Tensor:
    """Default source: ``seg4diff_fast.capture`` around ``batch.run()``; maps of several layers are averaged.

    With ``batch.stop_after_layers`` (``segment``: only the maps matter) the forward stops right after the last
    expert layer, so the blocks after it never run: at SD3's block 9, 10 of 24 blocks run.

    Returns i2t ``[B, N_img, T]`` float32 (steps mean, conditional batch; normalised as ``batch.normalize``, heads
    reduced as ``batch.heads`` by :func:`reduce_heads`, per layer before the layers are averaged, as the official
    processor caches each layer's reduced map; ``heads="keep"``: ``[B, N_img, H * T]``).
    """
    from seg4diff_fast.capture import layer_names, register

    device = next(batch.transformer.parameters()).device
    handle = register(batch.transformer, layers=list(batch.layers), capture="i2t",
                      heads="mean" if batch.heads == "mean" else "all", normalize=batch.normalize,
                      text_index=batch.text_index.to(device), map_dtype=torch.float32, steps=batch.steps,
                      batch="cond")
    stop = None
    try:
        if batch.stop_after_layers:
            order = layer_names(handle.transformer)
            last = max(handle.layers, key=order.index)  # the expert layer that runs last

            def done(module, args, output):
                raise _ExpertLayersDone

            stop = handle.transformer.get_submodule(last).register_forward_hook(done)
        try:
            batch.output = batch.run()
        except _ExpertLayersDone:
            batch.output = None
    finally:
        if stop is not None:
            stop.remove()
        handle.remove()
    store = handle.store
    maps = list(store.maps.values())
    if not maps:
        raise RuntimeError(f"no attention was captured at layers {batch.layers}")
    for g in store.grid.values():
        if tuple(g) != tuple(batch.grid):
            raise RuntimeError(f"captured grid {tuple(g)} differs from the expected {batch.grid}")
    return torch.stack([reduce_heads(m.float(), batch.heads) for m in maps]).mean(0)


def reduce_heads(maps: torch.Tensor, heads) -> torch.Tensor:
    """Maps of one layer -> one map per text column, as ``Protocol.heads`` says (the official processor's
    ``MAX_HEAD`` / ``KEEP_HEAD`` / ``MODEL.HEAD``). ``maps``: ``[B, N_img, T]`` (already head-averaged) when
    ``heads == "mean"``, else ``[B, H, N_img, T]``. ``"max"``: the largest over the heads; an int: that head;
    ``"keep"``: the heads side by side, ``[B, N_img, H * T]``, column ``h * T + t`` (the official
    ``rearrange("b h d t -> b d (h t)")``)."""
    if heads == "mean":
        return maps
    if maps.dim() != 4:
        raise ValueError(f"heads={heads!r} needs per-head maps [B, H, N_img, T], got shape {tuple(maps.shape)}")
    if heads == "max":
        return maps.amax(dim=1)
    if heads == "keep":
        B, H, N, T = maps.shape
        return maps.permute(0, 2, 1, 3).reshape(B, N, H * T)
    if heads >= maps.shape[1]:
        raise ProtocolError("heads", f"head {heads} does not exist: the layer has {maps.shape[1]} heads (0 .. "
                                     f"{maps.shape[1] - 1})")
    return maps[:, heads]


def norm_before_merge(i2t: torch.Tensor) -> torch.Tensor:
    """``[..., N_img, T]`` -> the same with every text column min-max normalised over the image tokens, the official
    ``NORM_BEFORE_MERGE`` (``x -= x.min(dim=0)``; ``x /= x.max(dim=0) + 1e-6`` on the ``[4096, 77]`` maps of one
    prompt, before a class's columns are averaged)."""
    x = i2t - i2t.amin(dim=-2, keepdim=True)
    return x / (x.amax(dim=-2, keepdim=True) + 1e-6)


def _combine(scores: torch.Tensor, how: str) -> torch.Tensor:
    """scores ``[C, N_img]``. ``raw``: attention probabilities as they are (the paper; several prompts of one
    image share its keys, so probabilities of a class stay comparable across prompts up to the prompt's own
    softmax normaliser). ``minmax``: each class rescaled to [0, 1] over the pixels (the paper's
    NORM_AFTER_MERGE option), which removes that normaliser and each class's overall attention level.

    A constant map (its range at most 1e-6 of its level: every class on a one-token grid, a blank image) has no
    range to rescale. If every class's map is constant the scores stay raw: the classes' attention levels are all
    there is to compare (minmax would make them all 0, and class 0 win every pixel). A constant class among classes
    whose maps vary gets 0: it has no spatial evidence for any pixel."""
    if how == "raw":
        return scores
    if how == "minmax":
        lo = scores.min(dim=1, keepdim=True).values
        hi = scores.max(dim=1, keepdim=True).values
        span = hi - lo
        flat = span <= 1e-6 * torch.maximum(hi.abs(), lo.abs())  # [C, 1]; an all-zero map is flat too
        if bool(flat.all()):
            return scores
        return torch.where(flat, torch.zeros_like(scores), (scores - lo) / torch.where(flat, 1.0, span))
    raise ValueError(f"combine must be 'raw' or 'minmax', not {how!r}")


def upsample_scores(grid_scores: torch.Tensor, geom: Geometry, chunk: int = 16, keep_scores: bool = True):
    """``[C, h, w]`` grid scores -> (``[C, H, W]`` float32 CPU scores, ``[H, W]`` int64 labels) at the input size.

    Without padding, one bilinear resize from the grid to the input size (the paper: its 64x64 maps go straight
    to the image's size through detectron2's sem_seg_postprocess). With padding: bilinear to the working size,
    crop the padding, bilinear to the input size. Classes go in chunks so that 150 classes at 3072^2 do not
    hold 150 full-size maps on the device at once; it runs on ``grid_scores``' device. ``keep_scores=False``
    returns ``None`` for the scores (150 float32 maps at 3072^2 are 5.6 GB of host memory).

    Scores that hold NaN or inf are refused (``FloatingPointError``, naming the classes): an argmax over them would
    give confident labels of nothing (every pixel the first class)."""
    C = grid_scores.shape[0]
    finite = torch.isfinite(grid_scores).flatten(1).all(1)  # [C]; one reduction, read once per image
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        raise FloatingPointError(
            f"the scores of {len(bad)} of {C} classes (index {bad[:10]}{' ...' if len(bad) > 10 else ''}) hold NaN "
            "or inf: the attention maps they come from were not finite (float16 overflow in the model, e.g. Flux in "
            "float16: run in bfloat16 or float32; or non-finite latents or weights); no labels are given"
        )
    H, W = geom.input
    hc, wc = geom.content
    dev = grid_scores.device
    scores = torch.empty(C, H, W, dtype=torch.float32) if keep_scores else None
    best = torch.full((H, W), -float("inf"), device=dev)
    labels = torch.zeros(H, W, dtype=torch.int64, device=dev)
    for c0 in range(0, C, chunk):
        g = grid_scores[c0:c0 + chunk].float()[None]
        if (hc, wc) == tuple(geom.working):
            up = F.interpolate(g, size=(H, W), mode="bilinear", align_corners=False)
        else:
            up = F.interpolate(g, size=geom.working, mode="bilinear", align_corners=False)[:, :, :hc, :wc]
            up = F.interpolate(up, size=(H, W), mode="bilinear", align_corners=False)
        up = up[0]
        if keep_scores:
            scores[c0:c0 + chunk] = up.cpu()
        m, a = up.max(dim=0)
        better = m > best
        best = torch.where(better, m, best)
        labels = torch.where(better, a + c0, labels)
    return scores, labels.cpu()


def _locked(method):
    """Run ``method`` under the Segmenter's lock: one pipeline cannot run two captures at once."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


class Segmenter:
    """Seg4Diff segmentation with one diffusers pipeline: SD3, SD3.5, Flux.1 (and Kontext), Qwen-Image, CogView4
    (images), CogVideoX, HunyuanVideo and HunyuanVideo 1.5 (videos, :meth:`segment_video`). What differs per family
    is its description (:mod:`seg4diff_fast.segmentation.families`), ``self.spec``.

    ``Segmenter(pipe, family=None, attention_source=None, progress=False, **protocol_overrides)``; the
    overrides are the fields of :class:`Protocol` (``layers``, ``timestep_index``, ``num_inference_steps``,
    ``size``, ``resize``, ``seed``, ``combine``, ``max_classes_per_prompt``, ``prompt_batch``, ``normalize``, ``heads``,
    ``norm_before_merge``, ``tta``, ...). Settings no
    model can run, layers the model does not have and sizes past its positional limit raise
    :class:`~seg4diff_fast.segmentation.protocol.ProtocolError` (a ``ValueError``) here, before any compute.

    Threads: ``segment``, ``segment_unsupervised`` and ``generate`` hold one lock per Segmenter (shared with
    the copies that per-call overrides make), because a capture swaps the pipeline's attention processors for
    the duration of a forward. Calls from several threads are safe and run one after the other; for parallel
    work use one Segmenter (one pipeline) per thread or per device.
    """

    def __init__(self, pipe, *, family: Optional[str] = None, attention_source=None, progress: bool = False,
                 vae_tiling: str = "auto", **overrides):
        self.pipe = pipe
        self.family_name = family or family_of(pipe)
        proto = protocol_for(pipe, self.family_name)
        if "layers" in overrides and overrides["layers"] is not None:
            layers = overrides["layers"]
            overrides["layers"] = tuple(layers) if isinstance(layers, (list, tuple)) else (layers,)
        self.protocol: Protocol = resolve_middle(proto.replace(**overrides), self.transformer)
        self.spec: SegFamily = family_spec(self.protocol.family)
        self._lock = threading.RLock()
        self.model_name = str(getattr(getattr(pipe, "config", None), "_name_or_path", "") or type(pipe).__name__)
        self.attention_source = attention_source or capture_attention_source
        self.progress = progress
        if vae_tiling not in ("auto", "on", "off"):
            raise ValueError(f"vae_tiling must be 'auto', 'on' or 'off', not {vae_tiling!r}")
        self.vae_tiling = vae_tiling
        self.return_scores = True  # False: result.scores is None (saves host memory at high resolution)
        self.tokenizer = getattr(pipe, self.protocol.tokenizer)
        from transformers import ProcessorMixin

        if isinstance(self.tokenizer, ProcessorMixin):  # Flux.2 [dev]'s Mistral processor: its text tokenizer
            self.tokenizer = self.tokenizer.tokenizer
        if self.tokenizer is None:
            raise ValueError(f"the pipeline has no {self.protocol.tokenizer}: its tokens are the columns Seg4Diff reads")
        self._check(self.protocol)

    def _check(self, p: Protocol) -> None:
        """Refuse ``p`` where this model cannot run it (:class:`ProtocolError`), before any compute."""
        from seg4diff_fast.capture.handle import _adapter_for, _resolve_layers

        check_protocol(p)
        try:
            specs = _resolve_layers(_adapter_for(self.transformer), self.transformer, list(p.layers))
        except (ValueError, TypeError) as e:
            raise ProtocolError("layers", str(e)) from None
        if not isinstance(p.heads, str):  # one head: it must exist in every expert layer
            for spec in specs:
                n = getattr(spec.attn, "heads", None)
                if isinstance(n, int) and p.heads >= n:
                    raise ProtocolError("heads", f"head {p.heads} does not exist: layer {spec.name} has {n} heads "
                                                 f"(0 .. {n - 1})")
        if p.size is not None and p.size < self.patch:
            raise ProtocolError("size", f"{p.size} pixels is below one image token ({self.patch} pixels)")
        if p.size is not None and self.max_side is not None and p.resize in ("paper", "square", "pad") \
                and math.ceil(p.size / self.patch) * self.patch > self.max_side:
            raise ProtocolError("size", f"{p.size} pixels exceeds the model's positional limit of {self.max_side} "
                                        "pixels per side")

    def settings(self) -> dict:
        """Everything of this Segmenter that changes a result: model, family, dtype, the protocol, VAE tiling.
        (``prompt_batch`` and ``tokens_per_batch`` only group the same forwards into batches and are left out.)"""
        import dataclasses

        proto = {k: v for k, v in dataclasses.asdict(self.protocol).items()
                 if k not in ("prompt_batch", "tokens_per_batch")}
        proto["layers"] = list(self.protocol.layers)
        return dict(model=self.model_name, family=self.family_name, dtype=str(self.dtype).replace("torch.", ""),
                    protocol=proto, vae_tiling=self.vae_tiling)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model: str, *, torch_dtype=None, device=None, family: Optional[str] = None,
                        local_files_only: Optional[bool] = None, **kwargs) -> "Segmenter":
        """Load ``model`` (a hub id or folder) for its family; ``"tiny"``, ``"tiny-flux"``, ``"tiny-<family>"``
        (:data:`TINY_MODELS`) build a tiny random pipeline offline (a smoke test, not a segmenter). SD3 is loaded
        without T5 as in the paper; families other than SD3 and Flux load the pipeline class their
        ``model_index.json`` names."""
        pipe = load_pipeline(model, torch_dtype=torch_dtype, device=device, family=family,
                             local_files_only=local_files_only)
        if model in TINY_MODELS:  # its family is fixed: a `family` argument is ignored (the CLI says so)
            family = TINY_MODELS[model]
            kwargs.setdefault("size", 128)  # the tiny transformers' positions stop at 256 pixels
        seg = cls(pipe, family=family, **kwargs)
        seg.model_name = model
        return seg

    # ------------------------------------------------------------------ model facts
    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def device(self):
        return next(self.transformer.parameters()).device

    @property
    def dtype(self):
        return next(self.transformer.parameters()).dtype

    @property
    def patch(self) -> int:
        """Pixels per image token side (SD3: 8 * patch_size 2; Flux, Qwen-Image: 8 * 2x2 packing)."""
        return self.spec.patch(self.pipe)

    @property
    def max_side(self) -> Optional[int]:
        """The positional limit in pixels per side (SD3: ``pos_embed_max_size * patch``), None where there is none."""
        return self.spec.max_side(self.pipe)

    def _columns(self, prompt: str, spans) -> List[List[int]]:
        """Text columns of character ``spans`` of ``prompt`` in the text block the transformer sees."""
        return self.spec.text_layout(self.pipe, self.tokenizer, prompt, spans, self.protocol)[0]

    def _text_index(self, prompt: str) -> torch.Tensor:
        """``[T]`` the text columns a forward of ``prompt`` keeps: the first ``max_sequence_length`` of a fixed-length
        text block, or every token of a variable-length one."""
        n = self.spec.text_layout(self.pipe, self.tokenizer, prompt, [], self.protocol)[1]
        return torch.arange(self.protocol.max_sequence_length if n is None else n)

    def pack_classes(self, names: List[str]) -> List[PromptColumns]:
        """Class names -> the prompts that hold them and each class's text columns, where this family's pipeline
        puts the tokens (chat template, dropped prefix, padding): what :meth:`segment` runs. Use it, not
        :func:`~seg4diff_fast.segmentation.tokens.pack_prompts` on the bare tokenizer, with :meth:`_i2t_for_image`
        and ``text_index=None``."""
        return pack_prompts(self.tokenizer, names, self.protocol.max_sequence_length,
                            max_classes=self.protocol.max_classes_per_prompt, columns=self._columns)

    def geometry(self, height: int, width: int) -> Geometry:
        p = self.protocol
        return plan_geometry(height, width, self.patch, p.size, p.resize, self.max_side)

    # ------------------------------------------------------------------ public API
    @_locked
    @torch.no_grad()
    def segment(self, image, classes: Sequence[str], *, noise_key=None, **overrides) -> SegmentationResult:
        """Segment one image (or a list) into ``classes``. Returns a :class:`SegmentationResult`.

        ``noise_key``: what the image's noise seed is derived from, with ``seed`` (:func:`image_seed`): a dataset id
        (``eval`` passes the sample id), or one key per image of a list; default: the image's index (0 for one)."""
        names = check_class_names(classes)
        seg = self._with(overrides)
        seg._need_video(False)
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        if not images:
            raise ValueError("image: the list of images is empty")
        keys = _noise_keys(noise_key, len(images), single)
        pixels = [load_image(im, f"image[{i}]" if not single else "image") for i, im in enumerate(images)]
        geoms = [seg.geometry(*px.shape[-2:]) for px in pixels]
        packs = seg.pack_classes(names)
        out = [seg._segment_one(px, g, packs, names, k)
               for px, g, k in seg._progress(list(zip(pixels, geoms, keys)), "segment")]
        return _collect(out, names, single)

    @_locked
    @torch.no_grad()
    def segment_video(self, frames, classes: Sequence[str], *, noise_key=0, **overrides) -> SegmentationResult:
        """Segment a video (video families: CogVideoX 1.0 / 1.5, HunyuanVideo, HunyuanVideo 1.5) into ``classes``: all
        frames in ONE forward, as the model sees a video. ``frames``: a folder of frame images (sorted by name), a video
        file (animated GIF / WebP / PNG; MP4, WebM, ... with the ``video`` extra), a list of images, an ``[F, H, W,
        3]`` array or an ``[F, 3, H, W]`` tensor (:func:`~seg4diff_fast.segmentation.images.load_frames`).

        Returns a :class:`SegmentationResult` with ``labels`` ``[F, H, W]`` int64 and ``scores`` ``[F, C, H, W]``
        float32, one per input frame. The VAE compresses time (all four: 4x; input frame 0 is latent frame 0,
        latent frame ``j >= 1`` holds input frames ``4j - 3 .. 4j``; CogVideoX 1.5's patch embedding then pairs latent
        frames into one token frame), so the maps exist per token frame; every input frame gets the maps of the token
        frame it is encoded in (``meta["frame_of"]``), upsampled bilinearly in space. A frame count the model cannot
        take (not ``1 + 4k``; CogVideoX 1.5: also an even latent count) is padded by repeating the last frame; the
        padded frames are dropped from the result. ``noise_key``: as :meth:`segment` (one key for the whole video)."""
        names = check_class_names(classes)
        seg = self._with(overrides)
        seg._need_video(True)
        px = load_frames(frames)  # [F, 3, H, W]
        n = px.shape[0]
        padded = seg.spec.padded_frames(seg.pipe, n)  # 1 + k j frames filling whole temporal patches
        if padded != n:
            px = torch.cat([px, px[-1:].expand(padded - n, *px.shape[1:])])
        geom = seg.geometry(*px.shape[-2:])
        packs = seg.pack_classes(names)
        seg._refuse_tta("segment_video")
        i2t, meta = seg._i2t_for_image(px, geom, [pk.prompt for pk in packs], None, noise_key)
        if seg.protocol.norm_before_merge:
            i2t = norm_before_merge(i2t)
        frames_lat, h, w = meta["grid"]
        if frames_lat != seg.spec.frame_of(seg.pipe, padded - 1) + 1:
            raise RuntimeError(f"the transformer saw {frames_lat} token frames of {padded} frames; the pipeline's "
                               f"vae_scale_factor_temporal {seg.pipe.vae_scale_factor_temporal} and the temporal patch "
                               f"say {seg.spec.frame_of(seg.pipe, padded - 1) + 1}")
        cols = [i2t[kk][:, c].float().mean(-1) for kk, pk in enumerate(packs) for c in pk.columns]
        grid_scores = _combine(torch.stack(cols), seg.protocol.combine).reshape(len(cols), frames_lat, h, w)
        per_latent = [upsample_scores(grid_scores[:, j], geom, keep_scores=seg.return_scores)
                      for j in range(frames_lat)]
        frame_of = [seg.spec.frame_of(seg.pipe, i) for i in range(n)]
        labels = np.stack([per_latent[j][1].numpy() for j in frame_of])  # [F, H, W]
        scores = torch.stack([per_latent[j][0] for j in frame_of]) if seg.return_scores else None  # [F, C, H, W]
        meta.update(frames=n, padded_frames=padded - n, frame_of=frame_of, prompts=[pk.prompt for pk in packs],
                    columns=[pk.columns for pk in packs])
        return SegmentationResult(labels, scores, list(names), meta)

    def _need_video(self, video: bool) -> None:
        if self.spec.video and not video:
            raise ProtocolError("family", f"{self.protocol.family} is a video family: use segment_video(frames, ...)")
        if video and not self.spec.video:
            raise ProtocolError("family", f"{self.protocol.family} is an image family: segment_video needs a video "
                                          "family (cogvideox, hunyuanvideo, hunyuanvideo15)")

    @_locked
    @torch.no_grad()
    def segment_unsupervised(self, image, kl_threshold: float = 0.1, *, noise_key=None,
                             **overrides) -> SegmentationResult:
        """The paper's unsupervised mode, as its code executes it (``seg4diff_model_unsup.py``): empty prompt,
        the i2t maps of all 77 text columns; each *pixel* min-max normalised across the 77 columns (the second
        ``att2mask`` definition overrides the first, and on the ``[B, HW, 77]`` tensor its ``dim=2`` is the token
        axis); then :func:`merge_maps` (softmax over the pixels, greedy symmetric-KL merging below
        ``kl_threshold``, 0.1 hard-coded in their model); argmax over the merged maps. Classes are ``segment k``.
        ``noise_key``: as :meth:`segment`."""
        seg = self._with(overrides)
        seg._need_video(False)
        seg._refuse_tta("segment_unsupervised")
        if seg.protocol.norm_before_merge:
            raise ProtocolError("norm_before_merge", "the unsupervised mode min-max normalises every pixel across the "
                                                     "token columns (its own step, as the official code); it has no "
                                                     "class merge to normalise before")
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        keys = _noise_keys(noise_key, len(images), single)
        pixels = [load_image(im, "image") for im in images]
        results = []
        for px, key in seg._progress(list(zip(pixels, keys)), "segment_unsupervised"):
            g = seg.geometry(*px.shape[-2:])
            i2t, meta = seg._i2t_for_image(px, g, [""], None, key)
            T = i2t.shape[-1]
            maps = unsupervised_maps(i2t[0]).T.reshape(T, *g.grid)  # [T, h, w]
            merged, groups = merge_maps(maps, kl_threshold)
            scores, labels = upsample_scores(merged, g)
            meta.update(groups=groups, kl_threshold=kl_threshold)
            results.append((labels, scores, meta))
        names = [f"segment {k}" for k in range(max(r[1].shape[0] for r in results))]
        return _collect(results, names, single)

    @_locked
    @torch.no_grad()
    def generate(self, prompt: str, classes: Sequence[str], *, height: Optional[int] = None,
                 width: Optional[int] = None, num_inference_steps: Optional[int] = None,
                 guidance_scale: Optional[float] = None, seed: Optional[int] = None, **pipe_kwargs) -> SegmentationResult:
        """Generate an image from ``prompt`` and segment it into ``classes``, each of which must occur in the
        prompt: its columns are its tokens in the prompt, at every occurrence, found by
        :func:`~seg4diff_fast.segmentation.tokens.name_spans` (whole words, any case; a longer name takes its words
        first: with ``"traffic light"`` and ``"light"``, ``"light"`` reads only the ``light`` that is not part of
        ``traffic light``). Maps are averaged over all denoising steps (conditional branch of CFG).
        ``result.image`` is the PIL image. Maps, scores or an image that hold NaN or inf (float16 overflow, a guidance
        scale whose latents overflow) raise ``FloatingPointError`` (the maps': naming the layer and step where they
        first appear), never labels."""
        names = check_class_names(classes)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ProtocolError("prompt", "give a non-empty text prompt")
        spans = name_spans(prompt, names)  # every occurrence; longer names first, a word to one class at most
        for n, sp in zip(names, spans):
            if not sp:
                inside = [o for o in names if o is not n and len(name_key(o)) > len(name_key(n))
                          and name_spans(o, [n])[0]]
                where = (f" only inside the longer class name{'s' if len(inside) > 1 else ''} {inside}, whose words "
                         "are that class's" if inside and name_spans(prompt, [n])[0] else "")
                raise ProtocolError("classes", f"{n!r} does not occur in the prompt {prompt!r}{where}; generate reads "
                                               "the class's own tokens in the prompt, so every class must be named in "
                                               "it")
        p = self.protocol
        if self.spec.video:
            raise ProtocolError("family", f"generate makes images; {p.family} is a video family")
        self._refuse_tta("generate")
        cols = self._columns(prompt, spans)
        lost = [n for n, c in zip(names, cols) if not c]
        if lost:
            raise ProtocolError("classes", f"{lost} fall after the {p.max_sequence_length}-token limit of the prompt "
                                           "(or are made of characters the tokenizer drops)")
        size = p.size or 1024
        height = size if height is None else height
        width = size if width is None else width
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1 or v % self.patch:
                raise ProtocolError(name, f"must be a positive multiple of {self.patch} pixels, got {v!r}")
            if self.max_side is not None and v > self.max_side:
                raise ProtocolError(name, f"{v} exceeds the model's positional limit of {self.max_side} pixels")
        why = self.spec.generate_size_error(self.pipe, height, width)
        if why:
            raise ProtocolError("height", why)
        geom = plan_geometry(height, width, self.patch, None, "square", self.max_side)
        steps = p.generate_steps if num_inference_steps is None else num_inference_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ProtocolError("num_inference_steps", f"must be an integer >= 1, got {steps!r}")
        gs = p.generate_guidance_scale if guidance_scale is None else guidance_scale
        if not isinstance(gs, (int, float)) or not math.isfinite(gs) or gs < 0:
            raise ProtocolError("guidance_scale", f"must be a finite number >= 0, got {gs!r}")
        gen = torch.Generator(device="cpu").manual_seed(p.seed if seed is None else seed)
        kwargs = dict(prompt=prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=gs,
                      generator=gen, output_type="np", **pipe_kwargs)
        kwargs.update(self.spec.generate_kwargs(self.pipe, pipe_kwargs, height, width))
        kwargs = self.spec.generate_call(self.pipe, kwargs)
        t0 = time.perf_counter()
        self._reset_peak()
        batch = ForwardBatch([prompt], self._text_index(prompt), geom.grid, p.layers,
                             lambda: self.pipe(**kwargs), self.transformer, None, p.family, steps="mean",
                             heads=p.heads, normalize=p.normalize)
        i2t = self.attention_source(batch)  # [B, N_img, T] (heads="keep": H * T)
        if p.norm_before_merge:
            i2t = norm_before_merge(i2t)
        out = batch.output
        image = None
        if out is not None and hasattr(out, "images"):
            pixels = np.asarray(out.images[0])  # [H, W, 3] float in [0, 1]: checked before it becomes 8-bit
            if not np.isfinite(pixels).all():  # (finite maps, e.g. the VAE overflowed: a black PIL image otherwise)
                raise FloatingPointError("the generated image holds NaN or inf (the VAE decode or the last step's "
                                         "latents overflowed: float16? run in bfloat16 or float32); no labels given")
            from diffusers.image_processor import VaeImageProcessor

            image = VaeImageProcessor.numpy_to_pil(pixels[None])[0]  # what output_type="pil" gives
        grid_scores = torch.stack([i2t[0][:, c].float().mean(-1) for c in cols]).reshape(len(names), *geom.grid)
        scores, labels = upsample_scores(_combine(grid_scores.flatten(1), p.combine).reshape_as(grid_scores), geom)
        meta = dict(prompt=prompt, columns=cols, grid=geom.grid, layers=list(p.layers), steps=steps,
                    guidance_scale=kwargs.get("guidance_scale"),  # None where the pipeline takes none (its guider's)
                    seconds=time.perf_counter() - t0, peak_memory_bytes=self._peak())
        return SegmentationResult(labels.numpy(), scores, names, meta, image)

    # ------------------------------------------------------------------ internals
    def _with(self, overrides) -> "Segmenter":
        if not overrides:
            return self
        s = copy.copy(self)
        if "layers" in overrides and overrides["layers"] is not None and not isinstance(overrides["layers"], (list, tuple)):
            overrides["layers"] = (overrides["layers"],)
        if "layers" in overrides and overrides["layers"] is not None:
            overrides["layers"] = tuple(overrides["layers"])
        s.protocol = resolve_middle(self.protocol.replace(**overrides), self.transformer)
        s._check(s.protocol)
        return s

    def _progress(self, items, desc):
        if self.progress and len(items) > 1:
            from tqdm.auto import tqdm

            return tqdm(items, desc=desc)
        return items

    def _reset_peak(self):
        if torch.cuda.is_available() and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _peak(self):
        if torch.cuda.is_available() and self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return None

    def _refuse_tta(self, what: str) -> None:
        if self.protocol.tta:
            raise ProtocolError("tta", f"test-time augmentation is for segment (and eval), as in the official code; "
                                       f"{what} has none")

    def _segment_one(self, px: torch.Tensor, geom: Geometry, packs: List[PromptColumns], names: List[str], key=0):
        prompts = [pk.prompt for pk in packs]
        if not self.protocol.tta:
            i2t, meta = self._i2t_for_image(px, geom, prompts, None, key)
            up, labels = self.labels_from_i2t(i2t, geom, packs, keep_scores=self.return_scores)
        else:
            up, labels, meta = self._segment_tta(px, geom, packs, key)
        meta["peak_memory_bytes"] = self._peak()
        meta.update(prompts=[pk.prompt for pk in packs], columns=[pk.columns for pk in packs])
        return labels, up, meta

    def _segment_tta(self, px: torch.Tensor, geom: Geometry, packs: List[PromptColumns], key=0):
        """The official test-time augmentation (detectron2's ``DatasetMapperTTA`` + ``SemanticSegmentorWithTTA``):
        the image as the model gets it (shortest edge 640) resized again to each shortest edge of
        :data:`~seg4diff_fast.segmentation.protocol.TTA_MIN_SIZES` (longest at most ``TTA_MAX_SIZE``), each plain
        and flipped left-right, then squashed to the working size as usual; each view's scores at the input size
        (a flipped view's flipped back) are averaged, and the labels are the argmax of the mean. Every view draws
        its own noise (the official code draws fresh noise per forward): from
        ``image_seed(seed, "<key>/tta/<size>/<0|1>")``.
        Returns (``[C, H, W]`` float32 mean scores or None, ``[H, W]`` int64 labels, meta)."""
        from .protocol import TTA_MIN_SIZES

        prompts = [pk.prompt for pk in packs]
        total, meta, n = None, None, 0
        for size in TTA_MIN_SIZES:
            for flip in (False, True):
                i2t, m = self._i2t_for_image(px, geom, prompts, None, f"{key}/tta/{size}/{int(flip)}",
                                             view=(size, flip))
                scores, _ = self.labels_from_i2t(i2t, geom, packs, keep_scores=True)  # [C, H, W]
                if flip:
                    scores = scores.flip(-1)
                total = scores if total is None else total + scores
                seconds = m["seconds"] + (meta["seconds"] if meta else 0.0)
                meta = meta or m
                meta["seconds"] = seconds  # all views' forwards
                n += 1
        mean = total / n
        meta.update(tta=dict(min_sizes=list(TTA_MIN_SIZES), flip=True, views=n))
        return (mean if self.return_scores else None), mean.argmax(0), meta

    def labels_from_i2t(self, i2t: torch.Tensor, geom: Geometry, packs: List[PromptColumns], keep_scores: bool = True):
        """The maps of one image's prompts -> its segmentation: ``i2t`` ``[P, N_img, T]`` (prompt ``k`` is
        ``packs[k]``) -> (``[C, H, W]`` float32 scores or None, ``[H, W]`` int64 labels), classes in pack order.
        With ``protocol.norm_before_merge`` each column is first min-max normalised over the pixels
        (:func:`norm_before_merge`). A class's score is the mean of its token columns, combined across prompts as
        ``protocol.combine``."""
        if self.protocol.norm_before_merge:
            i2t = norm_before_merge(i2t)
        cols = []
        for k, pk in enumerate(packs):
            for c in pk.columns:
                cols.append(i2t[k][:, c].float().mean(-1))  # [N_img]
        scores = _combine(torch.stack(cols), self.protocol.combine)  # [C, N_img]
        grid_scores = scores.reshape(len(cols), *geom.grid)
        return upsample_scores(grid_scores, geom, keep_scores=keep_scores)

    def _i2t_for_image(self, px: torch.Tensor, geom: Geometry, prompts: List[str],
                       text_index: Optional[torch.Tensor] = None, noise_key=0, view=None):
        """One image ``[3, H, W]`` (video family: frames ``[F, 3, H, W]``), several prompts -> i2t ``[P, N_img, T]``
        float32 and a meta dict. The image's noise comes from ``image_seed(seed, noise_key)``, the same for all its
        prompts. ``text_index``: ``[T]`` text columns to keep, None: the family's (:meth:`_text_index`; prompts
        whose text blocks differ in length are padded with zero columns to the longest). Video:
        ``N_img = F_t * h * w``, token frames first (``meta["grid"]`` is ``(F_t, h, w)``; ``F_t`` = the latent frames
        ``F'`` over the temporal patch, 1 but for CogVideoX 1.5). ``view``: a test-time augmentation view
        ``(shortest edge, flip)`` (:meth:`_encode_image`), None: the image itself."""
        p = self.protocol
        t0 = time.perf_counter()
        self._reset_peak()
        z = self._encode_image(px, geom, view)  # [1, c, h, w]; video [1, F', c, h, w]
        # video: token frames = latent frames / the temporal patch (CogVideoX 1.5 pairs latent frames)
        grid = tuple(geom.grid) if not self.spec.video else (z.shape[1] // self.spec.temporal_patch(self.pipe),
                                                              *geom.grid)
        sched = copy.deepcopy(self.pipe.scheduler)
        timesteps = self._timesteps(sched, z)
        try:
            t = timesteps[p.timestep_index]
        except IndexError:
            raise ValueError(f"timestep_index={p.timestep_index} is outside the {len(timesteps)}-step schedule") from None
        noise_seed = image_seed(p.seed, noise_key)
        gen = torch.Generator(device="cpu").manual_seed(noise_seed)
        noise = torch.randn(z.shape, generator=gen, dtype=torch.float32).to(z.device, z.dtype)
        zt = self.spec.add_noise(sched, z, t, noise)
        outs = []
        n_img = math.prod(grid)
        # prompts per forward: at most prompt_batch, and at most tokens_per_batch image tokens in the batch, so
        # that a 3072^2 SD3 image (36864 tokens) or a 4096^2 Flux image runs one prompt at a time; one prompt per
        # forward where the text length varies per prompt (a batch would need a key mask)
        per = max(1, min(p.prompt_batch, p.tokens_per_batch // n_img)) if self.spec.batch_prompts else 1
        for s in range(0, len(prompts), per):
            chunk = prompts[s:s + per]
            lat = zt.expand(len(chunk), *zt.shape[1:]).to(self.dtype)
            run = self._forward_fn(lat, t, chunk)
            index = text_index if text_index is not None else self._text_index(chunk[0])
            batch = ForwardBatch(chunk, index, grid, p.layers, run, self.transformer, lat, p.family,
                                 stop_after_layers=True, heads=p.heads, normalize=p.normalize)
            i2t = self.attention_source(batch)
            if i2t.shape[0] != len(chunk) or i2t.shape[1] != n_img:
                raise RuntimeError(f"attention source gave {tuple(i2t.shape)}, expected [{len(chunk)}, {n_img}, T]")
            outs.append(i2t.float())
        T = max(o.shape[-1] for o in outs)
        outs = [F.pad(o, (0, T - o.shape[-1])) for o in outs]
        meta = dict(geometry=dict(input=geom.input, content=geom.content, working=geom.working, grid=geom.grid),
                    layers=list(p.layers), timestep=float(t), timestep_index=p.timestep_index,
                    num_inference_steps=p.num_inference_steps, seed=p.seed, noise_seed=noise_seed,
                    seconds=time.perf_counter() - t0, peak_memory_bytes=self._peak())
        if self.spec.video:
            meta["grid"] = grid
        return torch.cat(outs), meta

    def _encode_image(self, px: torch.Tensor, geom: Geometry, view=None) -> torch.Tensor:
        """``px`` ``[3, H, W]`` in [0, 1] (video: ``[F, 3, H, W]``) -> the clean latent of the family
        (``[1, c, h, w]``; video ``[1, F', c, h, w]``), through the working geometry. ``view``: ``(short, flip)``, a
        test-time augmentation view (resize ``"paper"``): after the shortest-edge-640 resize, the image is resized
        again to shortest edge ``short`` (longest at most ``TTA_MAX_SIZE``, 8-bit rounded: detectron2's
        ResizeShortestEdge in ``DatasetMapperTTA``), then flipped left-right if ``flip``, then squashed."""
        vae = self.pipe.vae
        p = self.protocol
        hc, wc = geom.content
        x = px if self.spec.video else px[None]  # frames ride in the batch dimension while resized
        if p.resize == "paper" and p.size is not None:
            # the paper's first resize (detectron2's ResizeShortestEdge on the uint8 image), then the squash below
            x = resize_8bit(x, PAPER_SHORT_EDGE, PAPER_MAX_EDGE)
            if view is not None:
                from .protocol import TTA_MAX_SIZE

                x = resize_8bit(x, view[0], TTA_MAX_SIZE)
                if view[1]:
                    x = x.flip(-1)
        if (hc, wc) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(hc, wc), mode="bilinear", align_corners=False, antialias=False)
        if (hc, wc) != geom.working:  # pad bottom/right with edge pixels; those tokens are cropped later
            x = F.pad(x, (0, geom.working[1] - wc, 0, geom.working[0] - hc), mode="replicate")
        # the VAE was trained on [-1, 1]; the paper's Flux code hands it [0, 1] (vae_pixels="unit")
        x = (2.0 * x - 1.0 if p.vae_pixels == "signed" else x).to(self.device, vae.dtype)
        if self.spec.video:
            x = x.permute(1, 0, 2, 3)[None]  # [1, 3, F, H, W]
        tiled = self.vae_tiling == "on" or (self.vae_tiling == "auto" and max(geom.working) > 2048)
        was = getattr(vae, "use_tiling", False)
        if tiled and hasattr(vae, "enable_tiling"):
            vae.enable_tiling()
        try:
            return self.spec.latents(self.pipe, x)
        finally:
            if tiled and not was and hasattr(vae, "disable_tiling"):
                vae.disable_tiling()

    def _timesteps(self, sched, z: torch.Tensor) -> torch.Tensor:
        """The schedule the family's pipeline builds (``protocol.num_inference_steps`` steps) for latent ``z``."""
        return self.spec.timesteps(self.pipe, sched, z, self.protocol)

    def _forward_fn(self, lat: torch.Tensor, t: torch.Tensor, prompts: List[str]):
        """``lat`` ``[B, ...]`` noised latents, one prompt per row -> a callable running one conditional forward."""

        def run():
            enc = self.spec.encode_prompts(self.pipe, prompts, self.protocol)
            return self.spec.forward(self.pipe, lat, t, enc, self.protocol)

        return run


def _noise_keys(noise_key, n: int, single: bool) -> list:
    """One noise key per image: the given key (one image) or keys (a list), else the images' indices."""
    if noise_key is None:
        return list(range(n))
    if single:
        return [noise_key]
    if not isinstance(noise_key, (list, tuple)) or len(noise_key) != n:
        raise ValueError(f"noise_key: give one key per image ({n}), got {noise_key!r}")
    return list(noise_key)


def unsupervised_maps(i2t: torch.Tensor) -> torch.Tensor:
    """``[N_img, T]`` i2t maps of one image -> ``[N_img, T]``: every pixel (row) min-max normalised across the T
    text columns, as the paper's ``att2mask`` executes (``att -= att.min(dim=2)``; ``att /= att.max(dim=2) +
    1e-6`` on ``[B, HW, 77]``; ``OUTPUT_POWER`` 1.0 in its eval_unsup.yaml, so no power)."""
    att = i2t.double()
    att = att - att.min(dim=1, keepdim=True).values
    return att / (att.max(dim=1, keepdim=True).values + 1e-6)


def merge_maps(maps: torch.Tensor, kl_threshold: float):
    """The paper's unsupervised merge. ``maps`` ``[N, h, w]`` -> (``[M, h, w]`` merged maps, groups of indices).

    Each map becomes a distribution over pixels by a softmax; going through the maps in order, an unmatched
    map is an anchor and every map whose symmetric KL divergence to it, ``(KL(a|b) + KL(b|a)) / 2``, is below
    the threshold joins its group (including ones already grouped, as in their code); a group's map is the
    mean of its distributions."""
    N = maps.shape[0]
    prob = torch.softmax(maps.reshape(N, -1).double(), dim=-1)
    logp = prob.log()
    matched = set()
    merged, groups = [], []
    for i in range(N):
        if i in matched:
            continue
        q = (logp[i][None] - logp)  # [N, HW]
        kl = (prob[i][None] * q).sum(-1) / 2 - (prob * q).sum(-1) / 2
        members = torch.nonzero(kl < kl_threshold).flatten().tolist()
        if i not in members:
            members = [i] + members
        matched.update(members)
        merged.append(prob[members].mean(0))
        groups.append(members)
    return torch.stack(merged).reshape(len(merged), *maps.shape[1:]).float(), groups


def _collect(results, names, single) -> SegmentationResult:
    labels = [r[0].numpy() if isinstance(r[0], torch.Tensor) else r[0] for r in results]
    scores = [r[1] for r in results]
    metas = [r[2] for r in results]
    if single:
        return SegmentationResult(labels[0], scores[0], list(names), metas[0])
    return SegmentationResult(labels, scores, list(names), metas)


def load_pipeline(model: str, *, torch_dtype=None, device=None, family: Optional[str] = None,
                  local_files_only: Optional[bool] = None):
    """Load a diffusers pipeline with clear errors for what users meet: no network, gated models, no weights."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if model in TINY_MODELS:
        from .tiny import tiny_pipeline

        pipe = tiny_pipeline(TINY_PIPELINES.get(model, TINY_MODELS[model]))
        return pipe.to(device)
    fam = family or family_of(model)
    if fam not in PROTOCOLS:
        raise ValueError(f"family must be one of {sorted(PROTOCOLS)}, not {fam!r}")
    seg = by_name[PROTOCOLS[fam].family].segment  # its record: the loader, the parts left out, the GPU dtype
    if torch_dtype is None:  # the paper runs SD3 in float16; Flux and the other families are released in bfloat16
        torch_dtype = getattr(torch, seg.dtype) if str(device).startswith("cuda") else torch.float32
    try:
        import diffusers

        cls = getattr(diffusers, seg.loader or "DiffusionPipeline")  # None: the one model_index.json names
        extra = dict.fromkeys(seg.load_without)
        # `dtype=`: diffusers 0.42 reads it (and deprecates `torch_dtype`, to be removed in 1.0); older releases
        # ignore it and load float32, hence setup.py's diffusers>=0.42 (tested: a saved tiny pipeline loads float16)
        pipe = cls.from_pretrained(model, dtype=torch_dtype, local_files_only=local_files_only, **extra)
    except Exception as e:  # hub errors are many classes; name what the user should do
        from .._optional import import_failure

        cause = import_failure(e)
        if cause is not None:  # a library failed to import (not the hub, not the model): its own error, unguessed
            raise RuntimeError(f"loading {model!r} failed while importing a library: {cause}") from e
        text = f"{type(e).__name__}: {e}"
        low = text.lower()
        if "gated" in low or "401" in low or "403" in low or "access" in low:
            hint = (f"{model} is gated: accept its licence on https://huggingface.co/{model} and log in with "
                    "`huggingface-cli login` (or set HF_TOKEN)")
        elif "offline" in low or "connection" in low or "local" in low or "resolve" in low or "cannot find" in low:
            hint = (f"{model} is not in the local cache and the hub cannot be reached: download it once with network "
                    "access, pass a local folder, or try `--model tiny` (a tiny random pipeline, for a smoke test)")
        else:
            hint = f"could not load {model!r}; pass a diffusers folder or hub id, or `--model tiny` for a smoke test"
        raise RuntimeError(f"{hint}\n  ({text.splitlines()[0][:300]})") from e
    return pipe.to(device)
