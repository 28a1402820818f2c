"""How Seg4Diff runs on each model family: one small description per family, one Segmenter for all.

Which description runs a family, and its name, ``video`` and ``batch_prompts``, are the family record's
(``segment.description``, :mod:`seg4diff_fast.capture.families`): :data:`SEG_FAMILIES` holds one description per
record with a ``segment``.

A description (:class:`SegFamily`) says, for its pipelines, what the Segmenter cannot know by itself:

- ``latents(pipe, x)``: VAE pixels ``x`` ``[1, 3, H, W]`` (video ``[1, 3, F, H, W]``) -> the clean latent in the
  layout the family's noise and forward take (``[1, C, h, w]``; video ``[1, F', C, h, w]``), with the pipeline's own
  normalisation (shift/scale factors or latents mean/std), posterior mean (deterministic);
- ``timesteps(pipe, sched, z, protocol)`` and ``add_noise(sched, z, t, noise)``: the schedule the pipeline builds and
  how a clean latent is noised to one of its timesteps (flow matching: ``z_t = (1 - s) z + s noise`` through
  ``scale_noise``; CogVideoX / CogView3-Plus: DDPM-style ``add_noise``);
- ``encode_prompts(pipe, prompts, protocol)`` and ``forward(pipe, lat, t, enc, protocol)``: one conditional
  transformer forward through the pipeline's own ``encode_prompt`` and helpers (no classifier-free guidance);
- ``text_layout(pipe, tokenizer, prompt, spans, protocol)``: the text columns of character spans of the prompt
  (per class one ``(start, stop)`` or a list of them; tokens given to classes by
  :func:`~seg4diff_fast.segmentation.tokens.span_columns`, the same rule for every family), as positions of the
  text block the transformer sees (after the pipeline's chat template, the system prefix it drops, its padding),
  and that block's length (all of it is kept); ``None``: a fixed-length block whose prompt starts at column 0
  (CLIP / T5: SD3, Flux.1, CogView3-Plus, HiDream, CogVideoX), of which the first ``max_sequence_length`` columns
  are kept;
- ``patch(pipe)``, ``max_side(pipe)``: pixels per image token side, positional limit.

Variable-length text (Qwen-Image's chat template; CogView4's GLM, padded to the batch's longest) runs one prompt
per forward (the record's ``Segment.batch_prompts`` False): in a batch, prompts of different lengths are padded
(Qwen-Image then passes an attention mask, which capture refuses: key masks not yet; CogView4 shifts every column by
its left padding); with one prompt the text block is exactly its tokens. Fixed-length families (padded text, no mask) batch prompts.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .tokens import phrase_columns, span_columns

__all__ = ["SegFamily", "SEG_FAMILIES", "family_spec", "template_columns", "chat_template"]


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


class SegFamily:
    """Base description: the SD3 family (the paper's model). Subclasses override what differs."""

    def __init__(self, record):
        """The description of ``record`` (a :class:`~seg4diff_fast.capture.families.Family` with a ``segment``):
        ``name`` (the protocol family), ``video`` and ``batch_prompts`` (prompts of one image may share a forward:
        fixed-length text) are the record's."""
        self.name = record.family
        self.video = record.video
        self.batch_prompts = record.segment.batch_prompts

    # -- geometry
    def patch(self, pipe) -> int:
        return _vae_scale(pipe) * int(pipe.transformer.config.patch_size)

    def max_side(self, pipe) -> Optional[int]:
        m = getattr(pipe.transformer.config, "pos_embed_max_size", None)
        return None if m is None else int(m) * self.patch(pipe)

    # -- latents and noise
    def latents(self, pipe, x: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        z = vae.encode(x).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (z - shift) * vae.config.scaling_factor

    def timesteps(self, pipe, sched, z: torch.Tensor, protocol) -> torch.Tensor:
        n = protocol.num_inference_steps
        if getattr(sched.config, "use_dynamic_shifting", False):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            # the image's token count, or the paper's Flux value (its code passes the latent's 16 channels)
            seq = protocol.shift_seq_len or (z.shape[-2] // 2) * (z.shape[-1] // 2)
            mu = calculate_shift(seq, sched.config.get("base_image_seq_len", 256),
                                 sched.config.get("max_image_seq_len", 4096), sched.config.get("base_shift", 0.5),
                                 sched.config.get("max_shift", 1.15))
            sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu, device=z.device)
        else:
            sched.set_timesteps(n, device=z.device)
        return sched.timesteps

    def add_noise(self, sched, z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return sched.scale_noise(z, t.reshape(1).to(z.device), noise)

    # -- text
    def text_layout(self, pipe, tokenizer, prompt: str, spans, protocol) -> Tuple[List[List[int]], Optional[int]]:
        return phrase_columns(tokenizer, prompt, spans, protocol.max_sequence_length), None

    def encode_prompts(self, pipe, prompts: List[str], protocol) -> dict:
        te3 = getattr(pipe, "text_encoder_3", None)
        if protocol.drop_t5 and te3 is not None:  # the paper loads SD3 without T5: 77 zero tokens instead
            pipe.text_encoder_3 = None
        try:
            # max_sequence_length is the T5 part's length (CLIP is always 77): 77 zero vectors in the paper's SD3
            # code, diffusers' default 256 in its SD3.5 code (t5_tokens)
            pe, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                  device=_device(pipe), do_classifier_free_guidance=False,
                                                  max_sequence_length=protocol.t5_tokens)
        finally:
            if te3 is not None:
                pipe.text_encoder_3 = te3
        return dict(encoder_hidden_states=pe, pooled_projections=pooled)

    def forward(self, pipe, lat: torch.Tensor, t: torch.Tensor, enc: dict, protocol):
        B = lat.shape[0]
        return pipe.transformer(hidden_states=lat, timestep=t.expand(B).to(lat.device), return_dict=False, **enc)

    # -- generation
    def generate_kwargs(self, pipe, pipe_kwargs: dict, height: int, width: int) -> dict:
        return dict(max_sequence_length=pipe_kwargs.get("max_sequence_length", 256))

    def generate_call(self, pipe, kwargs: dict) -> dict:
        """The pipeline call's keyword arguments, last edit (after :meth:`generate_kwargs`): as they are."""
        return kwargs

    def generate_size_error(self, pipe, height: int, width: int) -> Optional[str]:
        """Why the pipeline would not generate at ``height x width`` (it picks another size), or None."""
        return None


class FluxFamily(SegFamily):
    """Flux.1 (and Flux.1 Kontext: the same components and helpers; segmentation runs it without a reference
    image, the input image is the noised latent)."""


    def patch(self, pipe) -> int:
        return _vae_scale(pipe) * 2  # 2x2 packing

    def max_side(self, pipe):
        return None

    def encode_prompts(self, pipe, prompts, protocol):
        pe, pooled, txt_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=_device(pipe),
                                                 max_sequence_length=protocol.max_sequence_length)
        return dict(encoder_hidden_states=pe, pooled_projections=pooled, txt_ids=txt_ids)

    def forward(self, pipe, lat, t, enc, protocol):
        tf = pipe.transformer
        B, c, h, w = lat.shape
        packed = pipe._pack_latents(lat, B, c, h, w)
        img_ids = pipe._prepare_latent_image_ids(B, h // 2, w // 2, lat.device, lat.dtype)
        guidance = None
        if getattr(tf.config, "guidance_embeds", False):
            guidance = torch.full((B,), float(protocol.guidance or 3.5), device=lat.device, dtype=torch.float32)
        return tf(hidden_states=packed, timestep=(t / 1000).expand(B).to(lat.device, lat.dtype),
                  guidance=guidance, img_ids=img_ids, return_dict=False, **enc)

    def generate_kwargs(self, pipe, pipe_kwargs, height, width):
        # Kontext's pipeline rescales the request to max_area (default 1024^2): keep the size asked for
        return dict(max_area=height * width) if type(pipe).__name__ == "FluxKontextPipeline" else {}


class QwenImageFamily(SegFamily):
    """Qwen-Image: Qwen2.5-VL text encoder behind a chat template whose system prefix (``drop`` tokens) the pipeline
    drops; the text block is the remaining tokens of ONE prompt (no padding, no mask). Its VAE is a video VAE
    (``[B, 3, 1, H, W]``) normalised with ``latents_mean`` / ``latents_std``; latents packed 2x2 as Flux's;
    flow-matching schedule shifted by the image's token count (as its pipeline)."""


    def patch(self, pipe) -> int:
        return int(pipe.vae_scale_factor) * 2

    def max_side(self, pipe):
        return None

    def latents(self, pipe, x):
        vae = pipe.vae
        z = vae.encode(x[:, :, None]).latent_dist.mean  # [1, C, 1, h, w]
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z.device, z.dtype)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z.device, z.dtype)
        return ((z - mean) / std)[:, :, 0]  # [1, C, h, w]

    def timesteps(self, pipe, sched, z, protocol):
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        n = protocol.num_inference_steps
        seq = protocol.shift_seq_len or (z.shape[-2] // 2) * (z.shape[-1] // 2)
        mu = calculate_shift(seq, sched.config.get("base_image_seq_len", 256),
                             sched.config.get("max_image_seq_len", 4096), sched.config.get("base_shift", 0.5),
                             sched.config.get("max_shift", 1.15))
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu, device=z.device)
        return sched.timesteps

    def text_layout(self, pipe, tokenizer, prompt, spans, protocol):
        return template_columns(tokenizer, pipe.prompt_template_encode, prompt, spans,
                                drop=pipe.prompt_template_encode_start_idx, max_length=pipe.tokenizer_max_length)

    def encode_prompts(self, pipe, prompts, protocol):
        pe, mask = pipe.encode_prompt(prompt=prompts, device=_device(pipe))
        return dict(encoder_hidden_states=pe, encoder_hidden_states_mask=mask)

    def forward(self, pipe, lat, t, enc, protocol):
        tf = pipe.transformer
        B, c, h, w = lat.shape
        packed = pipe._pack_latents(lat, B, c, h, w)
        guidance = None
        if getattr(tf.config, "guidance_embeds", False):
            guidance = torch.full((B,), float(protocol.guidance or 1.0), device=lat.device, dtype=torch.float32)
        return tf(hidden_states=packed, timestep=(t / 1000).expand(B).to(lat.device, lat.dtype), guidance=guidance,
                  img_shapes=[[(1, h // 2, w // 2)]] * B, return_dict=False, **enc)

    def generate_kwargs(self, pipe, pipe_kwargs, height, width):
        return {}


class CogView4Family(SegFamily):
    """CogView4: GLM text encoder; the pipeline tokenises with ``padding="longest"`` and then LEFT-pads the ids to a
    multiple of 16 with the pad token (visible tokens: no mask), so a prompt's columns move right by that padding.
    Latent ``z * scaling_factor`` (its pipeline decodes ``z / scaling_factor``, no shift); schedule: its pipeline's
    ``linspace(1000, 1)`` timesteps as sigmas, shifted by CogView4's own ``calculate_shift`` of the token count."""


    def max_side(self, pipe):
        return None

    def latents(self, pipe, x):
        return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor

    def timesteps(self, pipe, sched, z, protocol):
        from diffusers.pipelines.cogview4.pipeline_cogview4 import calculate_shift

        n = protocol.num_inference_steps
        p = pipe.transformer.config.patch_size
        seq = protocol.shift_seq_len or (z.shape[-2] // p) * (z.shape[-1] // p)
        steps = np.linspace(sched.config.num_train_timesteps, 1.0, n).astype(np.int64).astype(np.float32)
        mu = calculate_shift(seq, sched.config.get("base_image_seq_len", 256), sched.config.get("base_shift", 0.25),
                             sched.config.get("max_shift", 0.75))
        sched.set_timesteps(timesteps=steps, sigmas=steps / sched.config.num_train_timesteps, mu=mu, device=z.device)
        return sched.timesteps

    def text_layout(self, pipe, tokenizer, prompt, spans, protocol):
        columns, n = template_columns(tokenizer, "{}", prompt, spans, max_length=1024)
        pad = (16 - n % 16) % 16  # the pipeline's left padding
        return [[c + pad for c in cols] for cols in columns], n + pad

    def encode_prompts(self, pipe, prompts, protocol):
        pe, _ = pipe.encode_prompt(prompt=prompts, do_classifier_free_guidance=False, device=_device(pipe))
        return dict(encoder_hidden_states=pe)

    def forward(self, pipe, lat, t, enc, protocol):
        B = lat.shape[0]
        vs = _vae_scale(pipe)
        size = torch.tensor([[lat.shape[-2] * vs, lat.shape[-1] * vs]], dtype=enc["encoder_hidden_states"].dtype,
                            device=lat.device).repeat(B, 1)
        return pipe.transformer(hidden_states=lat, timestep=t.expand(B).to(lat.device), original_size=size,
                                target_size=size, crop_coords=torch.zeros_like(size), return_dict=False, **enc)

    def generate_kwargs(self, pipe, pipe_kwargs, height, width):
        return {}


class CogVideoXFamily(SegFamily):
    """CogVideoX (1.0 and 1.5): T5 text (``t5_tokens`` = 226, padded; the first ``max_sequence_length`` columns are
    read), a 3D VAE that compresses time 4x (``F = 1 + 4k`` input frames -> ``1 + k`` latent frames: latent frame 0
    is input frame 0, latent frame ``j >= 1`` covers input frames ``4j - 3 .. 4j``), latents ``[1, F', C, h, w]``
    times ``scaling_factor``; DDPM-style v-prediction schedule (CogVideoX's DDIM/DPM scheduler): ``add_noise`` at
    ``timesteps[timestep_index]``; RoPE from the pipeline's own helper when the transformer uses it.

    CogVideoX 1.5 (``patch_size_t`` = 2): the patch embedding groups latent frames in pairs, so token frame ``u``
    holds latent frames ``2u, 2u + 1`` and ``F'`` must be even. OUR padding: the input is padded with copies of its
    last frame up to the first count whose ``F'`` is a multiple of ``p_t`` (13 frames for 6: ``F'`` = 4); its
    pipeline instead generates extra latent frames at the start and drops them (not possible for a given video)."""


    def max_side(self, pipe):
        return None

    def latents(self, pipe, x):
        z = pipe.vae.encode(x).latent_dist.mean  # [1, C, F', h, w]
        return z.permute(0, 2, 1, 3, 4) * pipe.vae.config.scaling_factor  # [1, F', C, h, w]

    def timesteps(self, pipe, sched, z, protocol):
        sched.set_timesteps(protocol.num_inference_steps, device=z.device)
        return sched.timesteps

    def add_noise(self, sched, z, t, noise):
        return sched.add_noise(z, noise, t.reshape(1).to(z.device))

    def encode_prompts(self, pipe, prompts, protocol):
        pe, _ = pipe.encode_prompt(prompt=prompts, do_classifier_free_guidance=False, device=_device(pipe),
                                   max_sequence_length=protocol.t5_tokens)
        return dict(encoder_hidden_states=pe)

    def forward(self, pipe, lat, t, enc, protocol):
        tf = pipe.transformer
        B, F, _, h, w = lat.shape
        vs = _vae_scale(pipe)
        rope = None
        if tf.config.use_rotary_positional_embeddings:
            rope = pipe._prepare_rotary_positional_embeddings(h * vs, w * vs, F, lat.device)
        return tf(hidden_states=lat, timestep=t.expand(B).to(lat.device), image_rotary_emb=rope, return_dict=False,
                  **enc)

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


class OvisImageFamily(FluxFamily):
    """Ovis-Image: Flux.1's latent, packing and ids; Qwen3 text encoder behind its chat template with a system
    sentence prepended to the prompt, padded to ``t5_tokens + user_prompt_begin_id`` (256 + 28) tokens without
    special tokens, the first ``user_prompt_begin_id`` dropped (the template's head and the system sentence: the
    text block starts at the prompt), no mask (padded embeddings zeroed): fixed length 256, prompts batch. Schedule as
    Qwen-Image's (linspace sigmas shifted by the token count); no pooled text, no guidance."""


    def text_layout(self, pipe, tokenizer, prompt, spans, protocol):
        template = chat_template(tokenizer, add_generation_prompt=True, enable_thinking=False)
        template = template.replace("{}", pipe.system_prompt + "{}")
        drop = pipe.user_prompt_begin_id
        return template_columns(tokenizer, template, prompt, spans, drop=drop, pad_to=protocol.t5_tokens + drop,
                                special_tokens=False)

    def timesteps(self, pipe, sched, z, protocol):
        return QwenImageFamily.timesteps(self, pipe, sched, z, protocol)

    def encode_prompts(self, pipe, prompts, protocol):
        pe, _, text_ids, _ = pipe.encode_prompt(prompt=prompts, do_classifier_free_guidance=False,
                                                device=_device(pipe), max_sequence_length=protocol.t5_tokens)
        return dict(encoder_hidden_states=pe, txt_ids=text_ids)

    def forward(self, pipe, lat, t, enc, protocol):
        B, c, h, w = lat.shape
        img_ids = pipe._prepare_latent_image_ids(B, h // 2, w // 2, lat.device, lat.dtype)
        return pipe.transformer(hidden_states=pipe._pack_latents(lat, B, c, h, w),
                                timestep=(t / 1000).expand(B).to(lat.device, lat.dtype), img_ids=img_ids,
                                return_dict=False, **enc)


class LongCatImageFamily(FluxFamily):
    """LongCat-Image (``LongCatImagePipeline``): Flux.1's latent ``(z - shift) * scale`` and 2x2 packing, its own
    position ids (text ``(0, i, i)``; image ``(1, 512 + r, 512 + c)``), no guidance, no pooled text; schedule: linspace
    sigmas shifted by the image's token count (as Qwen-Image's). Text: Qwen2.5-VL's last hidden state of
    ``[template prefix, prompt, padding, template suffix]`` with the prefix and suffix cut off: the block is the
    prompt's tokens padded to ``tokenizer_max_length`` (512; no mask reaches the transformer: fixed length, prompts
    batch). The pipeline tokenises the prompt PIECEWISE (``split_quotation``): each unquoted piece on its own, each
    quoted piece one character at a time; the columns are found the same way (:meth:`prompt_tokens`)."""


    def latents(self, pipe, x):
        return SegFamily.latents(self, pipe, x)

    def timesteps(self, pipe, sched, z, protocol):
        return QwenImageFamily.timesteps(self, pipe, sched, z, protocol)

    @staticmethod
    def prompt_tokens(tokenizer, prompt: str) -> Tuple[List[int], List[Tuple[int, int]]]:
        """The ids ``LongCatImagePipeline._encode_prompt`` builds for ``prompt`` (before truncation and padding) and
        each one's character span in ``prompt``: pieces of ``split_quotation`` in order (they tile the prompt),
        an unquoted piece tokenised whole, a quoted one character by character (each token spans its character)."""
        from diffusers.pipelines.longcat_image.pipeline_longcat_image import split_quotation

        ids: List[int] = []
        spans: List[Tuple[int, int]] = []
        at = 0
        for piece, quoted in split_quotation(prompt):
            if prompt[at:at + len(piece)] != piece:
                raise ValueError("split_quotation's pieces do not tile the prompt: the columns would be wrong")
            if quoted:
                for i, ch in enumerate(piece):
                    tok = tokenizer(ch, add_special_tokens=False)["input_ids"]
                    ids += tok
                    spans += [(at + i, at + i + 1)] * len(tok)
            else:
                enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
                ids += enc["input_ids"]
                spans += [(at + a, at + b) for a, b in enc["offset_mapping"]]
            at += len(piece)
        return ids, spans

    def text_layout(self, pipe, tokenizer, prompt, spans, protocol):
        n = int(pipe.tokenizer_max_length)
        _, offsets = self.prompt_tokens(tokenizer, prompt)
        offsets = offsets[:n]  # the pipeline truncates to n tokens
        pad = n - len(offsets) if tokenizer.padding_side == "left" else 0
        return [[pos + pad for pos in cols] for cols in span_columns(offsets, spans)], n

    def encode_prompts(self, pipe, prompts, protocol):
        pe, txt_ids = pipe.encode_prompt(prompt=prompts)
        return dict(encoder_hidden_states=pe.to(_device(pipe)), txt_ids=txt_ids.to(_device(pipe)))

    def forward(self, pipe, lat, t, enc, protocol):
        from diffusers.pipelines.longcat_image.pipeline_longcat_image import prepare_pos_ids

        B, c, h, w = lat.shape
        n = int(pipe.tokenizer_max_length)
        img_ids = prepare_pos_ids(modality_id=1, type="image", start=(n, n), height=h // 2, width=w // 2)
        return pipe.transformer(hidden_states=pipe._pack_latents(lat, B, c, h, w),
                                timestep=(t / 1000).expand(B).to(lat.device, lat.dtype), guidance=None,
                                img_ids=img_ids.to(lat.device), return_dict=False, **enc)

    def generate_kwargs(self, pipe, pipe_kwargs, height, width):
        return {}

    def generate_call(self, pipe, kwargs):
        # the pipeline rewrites the prompt with its text encoder by default: the columns are the prompt's as given
        return dict(kwargs, enable_prompt_rewrite=False)


class CogView3PlusFamily(CogView4Family):
    """CogView3-Plus: CogView4's latent and forward (size conditioning), CogVideoX's T5 text (``t5_tokens`` = 224,
    padded; fixed length, prompts batch) and DDPM-style schedule (``add_noise``); positional limit
    ``pos_embed_max_size`` patches per side."""

    max_side = SegFamily.max_side
    text_layout = SegFamily.text_layout
    timesteps = CogVideoXFamily.timesteps
    add_noise = CogVideoXFamily.add_noise
    encode_prompts = CogVideoXFamily.encode_prompts


class HiDreamFamily(SegFamily):
    """HiDream-I1: four text encoders (CLIP-L, CLIP-G pooled; T5; Llama 3.1 per-block hidden states); every block's
    text is ``[T5 (t5_tokens, padded), Llama last layer, Llama this block's layer]`` after the image (text at the
    end). The columns read are the T5 part's (``tokenizer_3``), fixed length: the first ``max_sequence_length``.
    Latent ``(z - shift) * scale`` (as SD3); flow-matching schedule shifted by ``calculate_shift(max_seq)``, the
    transformer's maximum token count, as its pipeline (not the image's)."""


    def max_side(self, pipe):
        return int(pipe.transformer.config.max_resolution[0]) * _vae_scale(pipe)

    def timesteps(self, pipe, sched, z, protocol):
        from diffusers.pipelines.hidream_image.pipeline_hidream_image import calculate_shift

        mu = calculate_shift(protocol.shift_seq_len or pipe.transformer.max_seq)
        sched.set_timesteps(protocol.num_inference_steps, device=z.device, mu=mu)
        return sched.timesteps

    def encode_prompts(self, pipe, prompts, protocol):
        t5, _, llama, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device=_device(pipe),
                                                        do_classifier_free_guidance=False,
                                                        max_sequence_length=protocol.t5_tokens)
        return dict(encoder_hidden_states_t5=t5, encoder_hidden_states_llama3=llama, pooled_embeds=pooled)

    def forward(self, pipe, lat, t, enc, protocol):
        B = lat.shape[0]
        return pipe.transformer(hidden_states=lat, timesteps=t.expand(B).to(lat.device), return_dict=False, **enc)

    def generate_kwargs(self, pipe, pipe_kwargs, height, width):
        return {}

    def generate_size_error(self, pipe, height, width):
        area = (pipe.default_sample_size * pipe.vae_scale_factor) ** 2
        if height * width != area:  # its pipeline rescales every request to this area
            return f"HiDream's pipeline generates {area} pixels (rescaling any other request): height x width must be {area}"
        return None


class Flux2KleinFamily(SegFamily):
    """Flux.2 [klein] (``Flux2KleinPipeline``): Qwen3 text encoder behind its chat template (one user message,
    no thinking), padded to ``max_sequence_length`` tokens (512; no mask reaches the transformer, so every prompt has
    the same text length and prompts batch); the columns are the prompt's positions in that padded sequence. Latent
    through the pipeline's own ``_encode_vae_image`` (posterior mode, 2x2 patchified, batch-norm statistics) ``[1,
    4C, h, w]``, one token per latent pixel; schedule: linspace sigmas shifted by ``compute_empirical_mu`` of the
    token count and the step count, as the pipeline.

    Flux.2 [dev] (``Flux2Pipeline``), the same family (same VAE, packing, ids, schedule and forward; the text block
    is built the same way): Mistral-3 text through its processor's chat template with the pipeline's system message
    (``format_input``: ``[system, user]``), padded / truncated to ``max_sequence_length`` (512), hidden states
    10, 20, 30 stacked per token (one column per token); the prompt's columns are its tokens' positions in that
    padded sequence (the template's BOS counts as a column). Its transformer embeds guidance: ``guidance``
    (default the pipeline's 4.0)."""


    def patch(self, pipe) -> int:
        return int(pipe.vae_scale_factor) * 2

    def max_side(self, pipe):
        return None

    def latents(self, pipe, x):
        return pipe._encode_vae_image(x, generator=None)

    def timesteps(self, pipe, sched, z, protocol):
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        n = protocol.num_inference_steps
        mu = compute_empirical_mu(protocol.shift_seq_len or z.shape[-2] * z.shape[-1], n)
        sigmas = None if getattr(sched.config, "use_flow_sigmas", False) else np.linspace(1.0, 1 / n, n)
        if sigmas is None:
            sched.set_timesteps(n, device=z.device, mu=mu)
        else:
            sched.set_timesteps(sigmas=sigmas, device=z.device, mu=mu)
        return sched.timesteps

    def text_layout(self, pipe, tokenizer, prompt, spans, protocol):
        if type(pipe).__name__ == "Flux2Pipeline":  # [dev]: system + user messages, the processor's template
            from diffusers.pipelines.flux2.pipeline_flux2 import format_input

            marker = "\ue000"
            messages = format_input(prompts=[marker], system_message=pipe.system_message)[0]
            text = pipe.tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
            if text.count(marker) != 1:
                raise ValueError("the processor's chat template does not insert the prompt once, verbatim")
            # a processor lets the tokenizer add its special tokens unless the text starts with BOS; a tokenizer's
            # own apply_chat_template never adds them
            from transformers import ProcessorMixin

            bos = tokenizer.bos_token
            special = isinstance(pipe.tokenizer, ProcessorMixin) and not (bos and text.startswith(bos))
            return template_columns(tokenizer, text.replace(marker, "{}"), prompt, spans, pad_to=protocol.t5_tokens,
                                    special_tokens=special)
        template = chat_template(tokenizer, add_generation_prompt=True, enable_thinking=False)
        return template_columns(tokenizer, template, prompt, spans, pad_to=protocol.t5_tokens)

    def encode_prompts(self, pipe, prompts, protocol):
        pe, text_ids = pipe.encode_prompt(prompt=prompts, device=_device(pipe), max_sequence_length=protocol.t5_tokens)
        return dict(encoder_hidden_states=pe, txt_ids=text_ids)

    def forward(self, pipe, lat, t, enc, protocol):
        B = lat.shape[0]
        guidance = None
        if getattr(pipe.transformer.config, "guidance_embeds", False):  # [dev]: the pipeline's guidance_scale
            guidance = torch.full((B,), float(protocol.guidance or 4.0), device=lat.device, dtype=torch.float32)
        return pipe.transformer(hidden_states=pipe._pack_latents(lat), timestep=(t / 1000).expand(B).to(lat.device, lat.dtype),
                                guidance=guidance, img_ids=pipe._prepare_latent_ids(lat).to(lat.device), return_dict=False,
                                **enc)

    def generate_kwargs(self, pipe, pipe_kwargs, height, width):
        return {}


class ChromaFamily(FluxFamily):
    """Chroma (``ChromaPipeline``): Flux.1's VAE, 2x2 packing, ids and schedule (linspace sigmas shifted by the
    image's token count); one T5 text encoder padded to ``t5_tokens`` (512, the pipeline's default), no pooled text,
    no guidance; the prompt starts at column 0 (fixed length: prompts batch, the first ``max_sequence_length``
    columns are read).

    The mask, the pipeline's: it marks the valid text tokens and the first padding token with 1, the rest of the
    padding with 0, and hands the transformer this FLOAT ``[B, T + N_img]`` mask (image tokens 1); its blocks turn
    it into ``m_i * m_j`` ``[B, 1, N, N]``, which SDPA ADDS to the scores: kept text and image keys get +1, padding
    keys +0 (a bias, not a mask: the padding keeps a probability), and padding text queries see no bias. We pass
    the same float mask, so segmentation runs the model as it was trained, and capture reproduces it exactly
    (``capture.dispatch._key_mask``: the i2t rows are image queries, which see the key bias ``m``)."""


    def encode_prompts(self, pipe, prompts, protocol):
        pe, txt_ids, mask = pipe.encode_prompt(prompt=prompts, device=_device(pipe), do_classifier_free_guidance=False,
                                               max_sequence_length=protocol.t5_tokens)[:3]
        return dict(encoder_hidden_states=pe, txt_ids=txt_ids, text_mask=mask)  # mask [B, T] float 0 / 1

    def forward(self, pipe, lat, t, enc, protocol):
        B, c, h, w = lat.shape
        enc = dict(enc)
        text_mask = enc.pop("text_mask")  # [B, T] float 0 / 1
        # [B, T + N_img]: the text's mask, then 1 for every image token (text first, as the transformer
        # concatenates; what ChromaPipeline._prepare_attention_mask builds)
        ones = torch.ones(B, (h // 2) * (w // 2), dtype=text_mask.dtype, device=lat.device)
        mask = torch.cat([text_mask, ones], dim=1)
        img_ids = pipe._prepare_latent_image_ids(B, h // 2, w // 2, lat.device, lat.dtype)
        return pipe.transformer(hidden_states=pipe._pack_latents(lat, B, c, h, w),
                                timestep=(t / 1000).expand(B).to(lat.device, lat.dtype), img_ids=img_ids,
                                attention_mask=mask, return_dict=False, **enc)

    def generate_kwargs(self, pipe, pipe_kwargs, height, width):
        return dict(max_sequence_length=pipe_kwargs.get("max_sequence_length", 512))


class HunyuanImageFamily(SegFamily):
    """HunyuanImage 2.1 (``HunyuanImagePipeline``): Qwen2.5-VL text behind a chat template whose system prefix
    (``prompt_template_encode_start_idx`` tokens) is dropped, padded to ``tokenizer_max_length`` (1000) with a mask;
    ByT5 for the quoted (glyph) text, padded to ``tokenizer_2_max_length`` (128) with a mask (all zeros when the
    prompt quotes nothing). The transformer reorders its text block to ``[valid ByT5, valid MLLM, padding ByT5,
    padding MLLM]`` and masks the padding (a boolean key mask, which capture passes on): a prompt's column is its
    position among the valid MLLM tokens plus the count of valid ByT5 tokens; the block holds ``1000 + 128``
    columns (all kept; fixed length: prompts batch). Text after the image (``[image, text]``). Latent
    ``z * scaling_factor`` (32 px per latent, patch 1x1); schedule: its pipeline's ``linspace(1, 0, n + 1)[:-1]``
    sigmas through the scheduler's own shift. Distilled checkpoints: guidance embedding ``guidance * 1000``
    (``guidance``, default the pipeline's 3.25) and MeanFlow's ``timestep_r`` (the next timestep of the schedule).
    ``generate``: the pipeline's guider sets classifier-free guidance (its ``__call__`` takes no ``guidance_scale``,
    which is not applied)."""


    def patch(self, pipe) -> int:
        return int(pipe.vae_scale_factor) * int(pipe.transformer.config.patch_size[0])

    def max_side(self, pipe):
        return None

    def latents(self, pipe, x):
        return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor  # [1, C, h, w]

    def timesteps(self, pipe, sched, z, protocol):
        n = protocol.num_inference_steps
        sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, n + 1)[:-1], device=z.device)
        return sched.timesteps

    def _byt5_tokens(self, pipe, prompt: str) -> int:
        """Valid ByT5 tokens of ``prompt``'s glyph text (0 when it quotes nothing): they come first in the block."""
        from diffusers.pipelines.hunyuan_image.pipeline_hunyuanimage import extract_glyph_text

        glyph = extract_glyph_text(prompt)
        if glyph is None or not self._second_text(pipe):
            return 0
        return len(pipe.tokenizer_2(glyph, truncation=True, max_length=pipe.tokenizer_2_max_length)["input_ids"])

    def _second_text(self, pipe) -> bool:
        return getattr(pipe.transformer, "context_embedder_2", None) is not None and pipe.text_encoder_2 is not None

    def text_layout(self, pipe, tokenizer, prompt, spans, protocol):
        columns, _ = template_columns(tokenizer, pipe.prompt_template_encode, prompt, spans,
                                      drop=pipe.prompt_template_encode_start_idx, max_length=pipe.tokenizer_max_length)
        shift = self._byt5_tokens(pipe, prompt)
        n = pipe.tokenizer_max_length + (pipe.tokenizer_2_max_length if self._second_text(pipe) else 0)
        return [[c + shift for c in cols] for cols in columns], n

    def encode_prompts(self, pipe, prompts, protocol):
        pe, mask, pe2, mask2 = pipe.encode_prompt(prompt=prompts, device=_device(pipe), batch_size=len(prompts))
        return dict(encoder_hidden_states=pe, encoder_attention_mask=mask, encoder_hidden_states_2=pe2,
                    encoder_attention_mask_2=mask2)

    def forward(self, pipe, lat, t, enc, protocol):
        import copy

        tf = pipe.transformer
        B = lat.shape[0]
        guidance = timestep_r = None
        if tf.config.guidance_embeds:
            guidance = torch.full((B,), float(protocol.guidance or 3.25) * 1000.0, device=lat.device, dtype=lat.dtype)
        if tf.config.use_meanflow:  # the pipeline's timestep_r: the schedule's next timestep (0 after the last)
            ts = self.timesteps(pipe, copy.deepcopy(pipe.scheduler), lat, protocol)
            i = int((ts - t.to(ts.device)).abs().argmin())
            timestep_r = (ts[i + 1] if i + 1 < len(ts) else torch.zeros(())).expand(B).to(lat.device, lat.dtype)
        enc = {k: v.to(lat.dtype) if k.startswith("encoder_hidden") else v for k, v in enc.items()}
        return tf(hidden_states=lat, timestep=t.expand(B).to(lat.device, lat.dtype), timestep_r=timestep_r,
                  guidance=guidance, return_dict=False, **enc)

    def generate_kwargs(self, pipe, pipe_kwargs, height, width):
        return {}

    def generate_call(self, pipe, kwargs):
        return {k: v for k, v in kwargs.items() if k != "guidance_scale"}  # the guider's, see the class docstring


class HunyuanVideoFamily(SegFamily):
    """HunyuanVideo (``HunyuanVideoPipeline``): Llama text (the third-last hidden state) behind the pipeline's
    template, whose first ``crop_start`` tokens are dropped, padded to ``t5_tokens`` (its ``max_sequence_length``,
    256) with a mask the transformer turns into a boolean key mask (capture passes it on); the prompt's tokens come
    first (right padding), the whole block is kept (fixed length: prompts batch). CLIP's pooled text. Text after the
    video (``[video, text]``). The template: ``pipe.prompt_template`` when set, else the pipeline's default
    (``crop_start`` 95, the real Llama tokenizer's count). A 3D VAE that compresses time 4x (as CogVideoX's: ``F = 1
    + 4k`` frames, ``meta["frame_of"]``), latents ``z * scaling_factor`` ``[1, F', C, h, w]``; schedule: the
    pipeline's ``linspace(1, 0, n + 1)[:-1]`` sigmas through the scheduler's shift; guidance-distilled: guidance
    embedding ``guidance * 1000`` (``guidance``, default the pipeline's 6.0). Temporal patches
    (``patch_size_t > 1``) are refused."""


    def patch(self, pipe) -> int:
        return _vae_scale(pipe) * int(pipe.transformer.config.patch_size)

    max_side = CogVideoXFamily.max_side
    latents = CogVideoXFamily.latents  # [1, F', C, h, w], scaled

    def timesteps(self, pipe, sched, z, protocol):
        return HunyuanImageFamily.timesteps(self, pipe, sched, z, protocol)

    def template(self, pipe) -> dict:
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

        return getattr(pipe, "prompt_template", None) or DEFAULT_PROMPT_TEMPLATE

    def text_layout(self, pipe, tokenizer, prompt, spans, protocol):
        tpl = self.template(pipe)
        if tpl.get("crop_start") is None:
            raise ValueError("prompt_template needs its crop_start (the template's head, in tokens)")
        columns, _ = template_columns(tokenizer, tpl["template"], prompt, spans, drop=tpl["crop_start"],
                                      max_length=protocol.t5_tokens)
        return columns, protocol.t5_tokens

    def encode_prompts(self, pipe, prompts, protocol):
        pe, pooled, mask = pipe.encode_prompt(prompt=prompts, prompt_template=self.template(pipe),
                                              device=_device(pipe), max_sequence_length=protocol.t5_tokens)
        return dict(encoder_hidden_states=pe, encoder_attention_mask=mask, pooled_projections=pooled)

    def forward(self, pipe, lat, t, enc, protocol):
        tf = pipe.transformer
        if int(tf.config.patch_size_t) != 1:
            raise NotImplementedError("HunyuanVideo with temporal patches (patch_size_t > 1) is not supported by "
                                      "segment_video yet")
        B = lat.shape[0]
        guidance = None
        if tf.config.guidance_embeds:
            guidance = torch.full((B,), float(protocol.guidance or 6.0) * 1000.0, device=lat.device, dtype=lat.dtype)
        enc = {k: v.to(lat.dtype) if v.is_floating_point() else v for k, v in enc.items()}
        return tf(hidden_states=lat.permute(0, 2, 1, 3, 4), timestep=t.expand(B).to(lat.device, lat.dtype),
                  guidance=guidance, return_dict=False, **enc)

    latent_frames = CogVideoXFamily.latent_frames
    temporal_patch = CogVideoXFamily.temporal_patch  # refused above 1 in forward
    padded_frames = CogVideoXFamily.padded_frames
    frame_of = CogVideoXFamily.frame_of


class HunyuanVideo15Family(SegFamily):
    """HunyuanVideo 1.5 (``HunyuanVideo15Pipeline``, text-to-video): the transformer's text block is ``[image
    condition (``vision_num_semantic_tokens``, 729), ByT5 (``tokenizer_2_max_length``, 256), MLLM
    (``tokenizer_max_length``, 1000)]`` reordered to valid tokens first (``[valid image, valid ByT5, valid MLLM,
    padding]``) with a key mask; text-to-video passes zero image embeddings, whose tokens are all masked. So a prompt's
    column is its position among the valid MLLM tokens (Qwen2.5-VL's third-last hidden state of the pipeline's chat
    template with its system message, the first ``prompt_template_encode_start_idx`` tokens dropped) plus the count
    of valid ByT5 tokens (its quoted glyph text; 0 when it quotes nothing); the whole block is kept (fixed length:
    prompts batch). Text after the video (``[video, text]``). A 3D VAE that compresses time 4x (as CogVideoX's:
    ``meta["frame_of"]``), latents ``z * scaling_factor`` ``[1, F', C, h, w]``; the forward's input is ``[latent, zero
    condition latent, zero mask]`` (``2C + 1`` channels, as the pipeline's text-to-video); schedule: the pipeline's
    ``linspace(1, 0, n + 1)[:-1]`` sigmas through the scheduler's shift; the timestep unscaled, no guidance embedding
    (the pipeline's guider does classifier-free guidance)."""


    def max_side(self, pipe):
        return None

    latents = CogVideoXFamily.latents  # [1, F', C, h, w], scaled

    def timesteps(self, pipe, sched, z, protocol):
        return HunyuanImageFamily.timesteps(self, pipe, sched, z, protocol)

    def _byt5_tokens(self, pipe, prompt: str) -> int:
        """Valid ByT5 tokens of ``prompt``'s glyph text (0 when it quotes nothing): they come first in the block."""
        from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts

        glyph = extract_glyph_texts(prompt)
        if glyph is None:
            return 0
        return len(pipe.tokenizer_2(glyph, truncation=True, max_length=pipe.tokenizer_2_max_length)["input_ids"])

    def text_layout(self, pipe, tokenizer, prompt, spans, protocol):
        from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input

        marker = "\ue000"
        messages = format_text_input([marker], pipe.system_message)[0]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if text.count(marker) != 1:
            raise ValueError("the tokenizer's chat template does not insert the prompt once, verbatim")
        # valid MLLM tokens in order (either padding side: the transformer takes the valid ones), after the crop
        columns, _ = template_columns(tokenizer, text.replace(marker, "{}"), prompt, spans,
                                      drop=pipe.prompt_template_encode_start_idx, max_length=pipe.tokenizer_max_length,
                                      special_tokens=False)
        shift = self._byt5_tokens(pipe, prompt)  # t2v: no valid image-condition token before them
        n = pipe.vision_num_semantic_tokens + pipe.tokenizer_2_max_length + pipe.tokenizer_max_length
        return [[c + shift for c in cols] for cols in columns], n

    def encode_prompts(self, pipe, prompts, protocol):
        tf = pipe.transformer
        pe, mask, pe2, mask2 = pipe.encode_prompt(prompt=prompts, device=_device(pipe), dtype=tf.dtype,
                                                  batch_size=len(prompts))
        image = torch.zeros(len(prompts), pipe.vision_num_semantic_tokens, tf.config.image_embed_dim,
                            device=_device(pipe), dtype=tf.dtype)  # text-to-video: zero (masked) image condition
        return dict(encoder_hidden_states=pe, encoder_attention_mask=mask, encoder_hidden_states_2=pe2,
                    encoder_attention_mask_2=mask2, image_embeds=image)

    def forward(self, pipe, lat, t, enc, protocol):
        x = lat.permute(0, 2, 1, 3, 4)  # [B, C, F', h, w]
        B, _, F, h, w = x.shape
        cond = torch.zeros_like(x)  # the pipeline's text-to-video condition latents and mask: zeros
        x = torch.cat([x, cond, torch.zeros(B, 1, F, h, w, device=x.device, dtype=x.dtype)], dim=1)
        return pipe.transformer(hidden_states=x, timestep=t.expand(B).to(lat.device, lat.dtype), return_dict=False,
                                **enc)

    latent_frames = CogVideoXFamily.latent_frames
    temporal_patch = CogVideoXFamily.temporal_patch
    padded_frames = CogVideoXFamily.padded_frames
    frame_of = CogVideoXFamily.frame_of


def _descriptions() -> Dict[str, SegFamily]:
    """One description per family record with a ``segment``: the class its ``segment.description`` names."""
    from ..capture.families import FAMILIES
    from ..capture.families.record import resolve

    return {r.family: resolve(r.segment.description)(r) for r in FAMILIES if r.segment is not None}


SEG_FAMILIES: Dict[str, SegFamily] = _descriptions()


def family_spec(name: str) -> SegFamily:
    """The description of protocol family ``name`` (``Protocol.family``)."""
    try:
        return SEG_FAMILIES[name]
    except KeyError:
        raise ValueError(f"no segmentation family {name!r}; known: {sorted(SEG_FAMILIES)}") from None


def _device(pipe):
    return next(pipe.transformer.parameters()).device


def _vae_scale(pipe) -> int:
    v = getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", None)
    return int(v or 2 ** (len(pipe.vae.config.block_out_channels) - 1))
