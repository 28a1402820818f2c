"""How Seg4Diff runs on each model family: ONE description (:class:`SegFamily`) that reads the family's record, one
Segmenter for all.

What segmentation knows of a family is its record's ``segment``
(:class:`~seg4diff_fast.capture.families.record.Segment`, in the family's module of
:mod:`seg4diff_fast.capture.families`): the declarative part (pipelines, default layer and
protocol settings, paper or ours, 2x2 packing, which latent normalisation, schedule and noise) and, where a family
truly differs, its code (prompt encoding, the forward, where the prompt's tokens sit in the text block), next to the
record. :data:`SEG_FAMILIES` holds one description per record with a ``segment``.

The description says, for a family's pipelines, what the Segmenter cannot know by itself:

- ``latents(pipe, x)``: VAE pixels ``x`` ``[1, 3, H, W]`` (video ``[1, 3, F, H, W]``) -> the clean latent in the
  layout the family's noise and forward take (``[1, C, h, w]``; video ``[1, F', C, h, w]``), with the pipeline's own
  normalisation (``Segment.latents``: ``"shift_scale"`` ``(z - shift_factor) * scaling_factor``, ``"scale"``
  ``z * scaling_factor``, ``"video"`` a 3D VAE's ``[1, F', C, h, w]`` times ``scaling_factor``, or the family's
  function), posterior mean (deterministic);
- ``timesteps(pipe, sched, z, protocol)`` and ``add_noise(sched, z, t, noise)``: the schedule the pipeline builds
  (``Segment.schedule``: ``"pipeline"`` the scheduler's own, shifted by the token count when its config says
  ``use_dynamic_shifting``, as Flux.1's pipeline; ``"token_shift"`` linspace sigmas always shifted by the token count,
  as Qwen-Image's; or the family's function) and how a clean latent is noised to one of its timesteps
  (``Segment.noise``: ``"flow"`` ``z_t = (1 - s) z + s noise`` through ``scale_noise``; ``"ddpm"``: CogVideoX's
  and CogView3-Plus's ``add_noise``);
- ``encode_prompts(pipe, prompts, protocol)`` and ``forward(pipe, lat, t, enc, protocol)``: one conditional
  transformer forward through the pipeline's own ``encode_prompt`` and helpers (no classifier-free guidance): the
  family's ``Segment.encode`` and ``Segment.forward`` (None: ``transformer(hidden_states=lat, timestep=t, **enc)``);
- ``text_layout(pipe, tokenizer, prompt, spans, protocol)``: the text columns of character spans of the prompt
  (per class one ``(start, stop)`` or a list of them; tokens given to classes by
  :func:`~seg4diff_fast.segmentation.tokens.span_columns`, the same rule for every family), as positions of the
  text block the transformer sees (after the pipeline's chat template, the system prefix it drops, its padding),
  and that block's length (all of it is kept): the family's ``Segment.text_layout``; None: a fixed-length block
  whose prompt starts at column 0 (CLIP / T5: SD3, Flux.1, CogView3-Plus, HiDream, CogVideoX), of which the first
  ``max_sequence_length`` columns are kept; ``text_head(pipe, tokenizer)``: how many of the tokens the text encoder
  is given come before that block (``Segment.text_head``; 0 by default);
- ``patch(pipe)``, ``max_side(pipe)``: pixels per image token side (``Segment.packed``: 2x2 packed latents), the
  positional limit (``pos_embed_max_size`` patches, or the family's ``Segment.max_side``);
- for video families (the record's ``video``): latent frames, temporal patches, padding and each frame's token frame.

Variable-length text (Qwen-Image's chat template; CogView4's GLM, padded to the batch's longest) runs one prompt
per forward (the record's ``Segment.batch_prompts`` False): in a batch, prompts of different lengths are padded
(Qwen-Image then passes an attention mask, which capture refuses: key masks not yet; CogView4 shifts every column by
its left padding); with one prompt the text block is exactly its tokens. Fixed-length families (padded text, no mask)
batch prompts.

The helpers a family's text code shares (:func:`template_columns`, :func:`chat_template`, :func:`device_of`,
:func:`vae_scale`) are here.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .tokens import phrase_columns, span_columns

__all__ = ["SegFamily", "SEG_FAMILIES", "family_spec", "template_columns", "chat_template", "device_of", "vae_scale",
           "token_shift_timesteps"]


def template_columns(tokenizer, template: str, prompt: str, spans: Sequence, drop: int = 0,
                     max_length: Optional[int] = None, pad_to: Optional[int] = None,
                     special_tokens: bool = True) -> Tuple[List[List[int]], int]:
    """Columns of ``spans`` (character spans of ``prompt``) in ``tokenizer(text)[drop:]`` where ``text`` is
    ``template`` with its one ``{}`` replaced by the prompt (verbatim: other braces are kept as they are), and that
    sequence's length: the text block a pipeline builds by formatting a chat template, tokenising it (without
    padding, or ``pad_to`` tokens padded / truncated) and dropping its first ``drop`` tokens (Qwen-Image: the
    system prefix, ``drop=34``). Padding on either side is where the tokenizer puts it. ``special_tokens``: whether
    the pipeline lets the tokenizer add its special tokens.

    A token of the prompt that falls in the dropped part would be lost: raised, as the columns would be wrong."""
    at = template.index("{}")
    text = template[:at] + prompt + template[at + 2:]
    if pad_to is not None:
        enc = tokenizer(text, add_special_tokens=special_tokens, return_offsets_mapping=True, padding="max_length",
                        truncation=True, max_length=pad_to)
    else:
        enc = tokenizer(text, add_special_tokens=special_tokens, return_offsets_mapping=True,
                        truncation=max_length is not None,
                        max_length=None if max_length is None else max_length + drop)
    offsets = enc["offset_mapping"]
    columns = span_columns(offsets, spans, shift=at)
    early = [pos for cols in columns for pos in cols if pos < drop]
    if early:
        raise ValueError(f"the prompt's token at {early[0]} falls in the {drop} tokens the pipeline drops "
                         "(its chat template's prefix): the tokenizer does not match the pipeline")
    return [[pos - drop for pos in cols] for cols in columns], len(offsets) - drop


def chat_template(tokenizer, **options) -> str:
    """The tokenizer's chat template for one user message, rendered with ``{}`` where the message goes (the
    template inserts the message verbatim; a private-use character marks the place)."""
    marker = "\ue000"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False, **options)
    if text.count(marker) != 1:
        raise ValueError("the tokenizer's chat template does not insert the message once, verbatim")
    return text.replace(marker, "{}")


def device_of(pipe) -> torch.device:
    """The device of the pipeline's transformer (where prompts are encoded)."""
    return next(pipe.transformer.parameters()).device


def vae_scale(pipe) -> int:
    """Pixels per latent pixel of the pipeline's VAE."""
    v = getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", None)
    return int(v or 2 ** (len(pipe.vae.config.block_out_channels) - 1))


def token_shift_timesteps(sched, z: torch.Tensor, protocol, tokens: int) -> torch.Tensor:
    """Flow-matching timesteps of Flux.1 / Qwen-Image's pipelines: ``linspace(1, 1/n, n)`` sigmas shifted by
    ``mu = calculate_shift(tokens)`` (``protocol.shift_seq_len`` instead when set: the paper's Flux value)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # = Qwen-Image's

    n = protocol.num_inference_steps
    mu = calculate_shift(protocol.shift_seq_len or tokens, sched.config.get("base_image_seq_len", 256),
                         sched.config.get("max_image_seq_len", 4096), sched.config.get("base_shift", 0.5),
                         sched.config.get("max_shift", 1.15))
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu, device=z.device)
    return sched.timesteps


def _packed_tokens(z: torch.Tensor) -> int:
    return (z.shape[-2] // 2) * (z.shape[-1] // 2)


def _shift_scale(pipe, x):
    vae = pipe.vae
    z = vae.encode(x).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


def _scale(pipe, x):
    return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


def _video(pipe, x):
    z = pipe.vae.encode(x).latent_dist.mean  # [1, C, F', h, w]
    return z.permute(0, 2, 1, 3, 4) * pipe.vae.config.scaling_factor  # [1, F', C, h, w]


def _pipeline_schedule(pipe, sched, z, protocol):
    if getattr(sched.config, "use_dynamic_shifting", False):  # Flux.1: the image's token count, or the paper's value
        return token_shift_timesteps(sched, z, protocol, _packed_tokens(z))
    sched.set_timesteps(protocol.num_inference_steps, device=z.device)
    return sched.timesteps


LATENTS = {"shift_scale": _shift_scale, "scale": _scale, "video": _video}
SCHEDULES = {"pipeline": _pipeline_schedule,
             "token_shift": lambda pipe, sched, z, protocol: token_shift_timesteps(sched, z, protocol,
                                                                                   _packed_tokens(z))}
NOISES = ("flow", "ddpm")


def _named(kind: str, value, table):
    if callable(value):
        return value
    if value not in table:
        raise ValueError(f"Segment.{kind} must be one of {sorted(table)} or a function, got {value!r}")
    return table[value]


class SegFamily:
    """The Seg4Diff description of one family, read from its record (see the module docstring)."""

    def __init__(self, record):
        """The description of ``record`` (a :class:`~seg4diff_fast.capture.families.Family` with a ``segment``):
        ``name`` (the protocol family), ``video`` and ``batch_prompts`` (prompts of one image may share a forward:
        fixed-length text) are the record's."""
        seg = record.segment
        if seg.encode is None:
            raise ValueError(f"family {record.family!r}: its Segment gives no encode (the prompt encoding)")
        if seg.noise not in NOISES:
            raise ValueError(f"family {record.family!r}: Segment.noise must be one of {NOISES}, got {seg.noise!r}")
        self.name = record.family
        self.video = record.video
        self.batch_prompts = seg.batch_prompts
        self.segment = seg
        self._latents = _named("latents", seg.latents, LATENTS)
        self._schedule = _named("schedule", seg.schedule, SCHEDULES)

    # -- geometry
    def patch(self, pipe) -> int:
        """Pixels per image-token side."""
        if self.segment.packed:
            return vae_scale(pipe) * 2  # 2x2 packing
        p = pipe.transformer.config.patch_size
        return vae_scale(pipe) * int(p[0] if isinstance(p, (tuple, list)) else p)

    def max_side(self, pipe) -> Optional[int]:
        """The positional limit in pixels (None: none)."""
        if self.segment.max_side is not None:
            return self.segment.max_side(pipe, self.patch(pipe))
        m = getattr(pipe.transformer.config, "pos_embed_max_size", None)
        return None if m is None else int(m) * self.patch(pipe)

    # -- latents and noise
    def latents(self, pipe, x: torch.Tensor) -> torch.Tensor:
        return self._latents(pipe, x)

    def timesteps(self, pipe, sched, z: torch.Tensor, protocol) -> torch.Tensor:
        return self._schedule(pipe, sched, z, protocol)

    def add_noise(self, sched, z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.segment.noise == "ddpm":
            return sched.add_noise(z, noise, t.reshape(1).to(z.device))
        return sched.scale_noise(z, t.reshape(1).to(z.device), noise)

    # -- text
    def text_layout(self, pipe, tokenizer, prompt: str, spans, protocol) -> Tuple[List[List[int]], Optional[int]]:
        if self.segment.text_layout is not None:
            return self.segment.text_layout(pipe, tokenizer, prompt, spans, protocol)
        return phrase_columns(tokenizer, prompt, spans, protocol.max_sequence_length), None

    def text_head(self, pipe, tokenizer) -> int:
        """How many of the tokens the column text encoder is given precede the transformer's text block (a chat
        template's head the pipeline drops): the family's ``Segment.text_head``, else 0."""
        head = self.segment.text_head
        return 0 if head is None else head(pipe, tokenizer)

    def encode_prompts(self, pipe, prompts: List[str], protocol) -> dict:
        return self.segment.encode(pipe, prompts, protocol, device_of(pipe))

    def forward(self, pipe, lat: torch.Tensor, t: torch.Tensor, enc: dict, protocol):
        if self.segment.forward is not None:
            return self.segment.forward(pipe, lat, t, enc, protocol)
        B = lat.shape[0]
        return pipe.transformer(hidden_states=lat, timestep=t.expand(B).to(lat.device), return_dict=False, **enc)

    # -- generation
    def generate_kwargs(self, pipe, pipe_kwargs: dict, height: int, width: int) -> dict:
        n = self.segment.generate_tokens
        return {} if n is None else dict(max_sequence_length=pipe_kwargs.get("max_sequence_length", n))

    def generate_call(self, pipe, kwargs: dict) -> dict:
        """The pipeline call's keyword arguments, last edit (after :meth:`generate_kwargs`): the family's
        ``Segment.generate``, else as they are."""
        return kwargs if self.segment.generate is None else self.segment.generate(pipe, kwargs)

    def generate_size_error(self, pipe, height: int, width: int) -> Optional[str]:
        """Why the pipeline would not generate at ``height x width`` (it picks another size), or None."""
        check = self.segment.generate_size_error
        return None if check is None else check(pipe, height, width)

    # -- video (3D VAEs that compress time k x: ``F = 1 + k j`` input frames -> ``1 + j`` latent frames)
    def latent_frames(self, pipe, frames: int) -> int:
        return (frames - 1) // int(pipe.vae_scale_factor_temporal) + 1

    def temporal_patch(self, pipe) -> int:
        return int(getattr(pipe.transformer.config, "patch_size_t", None) or 1)

    def padded_frames(self, pipe, frames: int) -> int:
        """The frame count an input of ``frames`` frames is padded to (copies of the last frame): ``1 + k j`` (the
        VAE's temporal factor ``k``) whose ``1 + j`` latent frames fill whole temporal patches."""
        k, p_t = int(pipe.vae_scale_factor_temporal), self.temporal_patch(pipe)
        j = -(-(frames - 1) // k)  # ceil((frames - 1) / k)
        while (1 + j) % p_t:
            j += 1
        return 1 + k * j

    def frame_of(self, pipe, i: int) -> int:
        """The token frame that input frame ``i`` is encoded in: its latent frame (``0`` for frame 0, else
        ``(i - 1) // k + 1``) divided by the temporal patch ``p_t``."""
        k = int(pipe.vae_scale_factor_temporal)
        return (0 if i == 0 else (i - 1) // k + 1) // self.temporal_patch(pipe)


def _descriptions() -> Dict[str, SegFamily]:
    """One description per family record with a ``segment``."""
    from ..capture.families import FAMILIES

    return {r.family: SegFamily(r) for r in FAMILIES if r.segment is not None}


SEG_FAMILIES: Dict[str, SegFamily] = _descriptions()


def family_spec(name: str) -> SegFamily:
    """The description of protocol family ``name`` (``Protocol.family``)."""
    try:
        return SEG_FAMILIES[name]
    except KeyError:
        raise ValueError(f"no segmentation family {name!r}; known: {sorted(SEG_FAMILIES)}") from None
