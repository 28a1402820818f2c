"""Flux-style families: Flux.1 (dev / schnell / Kontext), Flux.2, Flux.3, Chroma, Ovis-Image, LongCat-Image, Bria 3.x,
Bria FIBO. Captured at their processor's ``dispatch_attention_fn`` call (:mod:`seg4diff_fast.capture.dispatch`).

- Flux.1: ``FluxTransformer2DModel`` with ``FluxAttnProcessor``. Joint sequence ``[text, image]`` (q, k, v after
  QK-norm and RoPE on the joint sequence). Layers: ``transformer_blocks.{i}`` (double-stream, text comes as
  ``encoder_hidden_states``) and ``single_transformer_blocks.{j}`` (single-stream: the block concatenates
  ``[text, image]`` before the processor, which is never told the text length). Integer layers follow Seg4Diff:
  double-stream blocks ``0 .. D-1``, then single-stream block ``j`` is ``D + j`` (``D = 19`` for Flux.1-dev).
  Text length: the forward pre-hook reads ``encoder_hidden_states.shape[1]`` (checked against ``txt_ids``). Grid:
  from ``img_ids`` (row, column of each packed 2x2 patch): the ids cross the ``record_maps`` op and the store
  computes the grid when read. Kontext appends the reference image's tokens after the generated image's
  (``img_ids`` column 0 = 1 for them): the grid is the generated image's, and the store keeps only its rows.
- Flux.2: ``Flux2Transformer2DModel``. Double-stream blocks ``Flux2AttnProcessor`` (as Flux.1); single-stream blocks
  ``Flux2ParallelSelfAttnProcessor`` (one projection gives q, k, v and the MLP input; the transformer concatenates
  ``[text, image]`` once before all of them). ``img_ids`` columns ``(t, h, w, l)``; reference images come after the
  generated image with another ``t``: the store keeps the generated image's rows. The KV-cache processors
  (``Flux2KV*``) are refused, and so is a forward with ``kv_cache_mode="extract"`` and reference tokens.
- Flux.3: ``Flux3Transformer2DModel``: per-mode blocks first (``txt_mode_blocks``, ``mode_blocks.image``,
  ``mode_blocks.image_cond``: each attends within its own tokens, no text-image attention: refused), then
  ``single_transformer_blocks.{j}`` over ``[text, image, reference images]`` (``Flux3AttnProcessor``, no mask).
- Chroma (``ChromaTransformer2DModel``, Flux's ``FluxAttnProcessor``). Its blocks turn ``attention_mask`` ``[B, N]``
  into ``m_i * m_j`` ``[B, 1, N, N]``: a boolean mask is captured as HunyuanVideo 1.5's; the ChromaPipeline passes a
  float 0 / 1 mask, which SDPA adds to the scores as a bias: reproduced exactly (key bias ``m`` for the image and
  kept text queries, no bias for the padding text queries, whose t2i rows are refused; ``dispatch._key_mask``).
- Ovis-Image and LongCat-Image: Flux-style transformers in modules of their own (``OvisImageAttnProcessor``,
  ``LongCatImageAttnProcessor``). Their forwards take no attention mask (the pipelines zero padded text embeddings).
- Bria 3.x (``BriaTransformer2DModel``): ``BriaAttnProcessor`` in both kinds of block, no mask. Bria FIBO
  (``BriaFiboTransformer2DModel``): the text block of every block is ``encoder_hidden_states.shape[1]`` tokens (the
  per-block ``text_encoder_layers`` are concatenated along the channels); double-stream blocks run
  ``BriaFiboAttnProcessor``, single-stream ones ``BriaAttnProcessor``; BriaFiboPipeline passes a boolean key mask
  ``[B, 1, 1, N]`` (``joint_attention_kwargs``) when prompts are padded: captured.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .cogvideox import tiny_t5_parts
from .record import Family, Layers, Segment, Tiny

__all__ = ["FLUX", "FLUX2", "FLUX3", "CHROMA", "OVIS_IMAGE", "LONGCAT_IMAGE", "BRIA", "BRIA_FIBO", "FAMILIES",
           "longcat_prompt_tokens", "embedded_guidance", "packed_forward"]

_T = "diffusers.models.transformers."


def read_flux(transformer, bound: dict):
    hidden_states = bound["hidden_states"]  # [B, N_img, C] packed latent
    encoder_hidden_states = bound.get("encoder_hidden_states")
    txt_ids, img_ids = bound.get("txt_ids"), bound.get("img_ids")
    text_len = None if encoder_hidden_states is None else encoder_hidden_states.shape[1]
    if text_len is not None and txt_ids is not None and txt_ids.shape[-2] != text_len:
        raise ValueError(f"txt_ids has {txt_ids.shape[-2]} positions but encoder_hidden_states {text_len} tokens")
    return text_len, img_ids, hidden_states.shape[0]  # the store computes the grid from img_ids when read


def _read_flux2(transformer, bound: dict):
    """As Flux.1's; a forward with ``kv_cache_mode="extract"`` and reference tokens is refused: its image part is
    ``[references, generated image]`` (the references first, unlike Flux2Pipeline's ``[generated, references]``),
    so the image rows and the grid the store reads would be the references'."""
    if bound.get("kv_cache_mode") == "extract" and bound.get("num_ref_tokens"):
        raise ValueError(
            f"capture on {type(transformer).__name__}: kv_cache_mode='extract' puts {bound['num_ref_tokens']} "
            "reference-image tokens before the generated image ([text, references, image]), so the image rows "
            "capture reads would not be the generated image's; capture forwards without the KV cache "
            "(kv_cache_mode=None, the reference tokens after the image as Flux2Pipeline puts them) or with "
            "kv_cache_mode='cached' only"
        )
    return read_flux(transformer, bound)


def _flux3_mode_blocks(transformer):
    why = "a per-mode block of Flux.3: its attention sees one token mode only (no text-image attention)"
    names = [f"txt_mode_blocks.{i}" for i in range(len(transformer.txt_mode_blocks))]
    names += [f"mode_blocks.{m}.{i}" for m, blocks in transformer.mode_blocks.items() for i in range(len(blocks))]
    return {name: why for name in names}


# ----------------------------------------------------------------------- segmentation (the records' Segment code)
# Flux.1 (and Kontext: the same components and helpers; segmentation runs it without a reference image, the input
# image is the noised latent): latent (z - shift) * scale packed 2x2, the pipeline's schedule, CLIP pooled + T5 text.
def _flux_encode(pipe, prompts, protocol, device):
    pe, pooled, txt_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                             max_sequence_length=protocol.max_sequence_length)
    return dict(encoder_hidden_states=pe, pooled_projections=pooled, txt_ids=txt_ids)


def embedded_guidance(pipe, lat, value, scale: float = 1.0, dtype=torch.float32):
    """The guidance the transformer embeds, ``[B]`` filled with ``value * scale`` (``B = lat.shape[0]``), when its
    config has ``guidance_embeds`` (guidance-distilled checkpoints), else None."""
    if not getattr(pipe.transformer.config, "guidance_embeds", False):
        return None
    return torch.full((lat.shape[0],), float(value) * scale, device=lat.device, dtype=dtype)


def packed_forward(pipe, lat, t, enc, protocol=None, img_ids=None, **extra):
    """One forward of a Flux.1-style pipeline's transformer: ``lat`` ``[B, C, h, w]`` packed 2x2 by the pipeline,
    ``timestep`` ``t / 1000``, ``img_ids`` (default: the pipeline's Flux.1 ids of the ``h/2 x w/2`` grid), ``extra``
    (guidance, mask) and the text arguments ``enc``."""
    B, c, h, w = lat.shape
    if img_ids is None:
        img_ids = pipe._prepare_latent_image_ids(B, h // 2, w // 2, lat.device, lat.dtype)
    return pipe.transformer(hidden_states=pipe._pack_latents(lat, B, c, h, w),
                            timestep=(t / 1000).expand(B).to(lat.device, lat.dtype), img_ids=img_ids,
                            return_dict=False, **extra, **enc)


def _flux_forward(pipe, lat, t, enc, protocol):
    return packed_forward(pipe, lat, t, enc, guidance=embedded_guidance(pipe, lat, protocol.guidance or 3.5))


def _flux_generate(pipe, kwargs):
    # Kontext's pipeline rescales the request to max_area (default 1024^2): keep the size asked for
    if type(pipe).__name__ == "FluxKontextPipeline":
        return dict(kwargs, max_area=kwargs["height"] * kwargs["width"])
    return kwargs


# Flux.2 [klein] (Flux2KleinPipeline): Qwen3 text encoder behind its chat template (one user message, no thinking),
# padded to max_sequence_length tokens (512; no mask reaches the transformer, so every prompt has the same text length
# and prompts batch); the columns are the prompt's positions in that padded sequence. Latent through the pipeline's
# own _encode_vae_image (posterior mode, 2x2 patchified, batch-norm statistics) [1, 4C, h, w], one token per latent
# pixel; schedule: linspace sigmas shifted by compute_empirical_mu of the token count and the step count, as the
# pipeline. Flux.2 [dev] (Flux2Pipeline), the same family (same VAE, packing, ids, schedule and forward; the text
# block is built the same way): Mistral-3 text through its processor's chat template with the pipeline's system
# message (format_input: [system, user]), padded / truncated to max_sequence_length (512), hidden states 10, 20, 30
# stacked per token (one column per token); the prompt's columns are its tokens' positions in that padded sequence
# (the template's BOS counts as a column). Its transformer embeds guidance: guidance (default the pipeline's 4.0).
def _flux2_latents(pipe, x):
    return pipe._encode_vae_image(x, generator=None)


def _flux2_schedule(pipe, sched, z, protocol):
    import numpy as np
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    n = protocol.num_inference_steps
    mu = compute_empirical_mu(protocol.shift_seq_len or z.shape[-2] * z.shape[-1], n)
    if getattr(sched.config, "use_flow_sigmas", False):
        sched.set_timesteps(n, device=z.device, mu=mu)
    else:
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), device=z.device, mu=mu)
    return sched.timesteps


def _flux2_text_layout(pipe, tokenizer, prompt, spans, protocol):
    from ...segmentation.families import chat_template, template_columns

    if type(pipe).__name__ == "Flux2Pipeline":  # [dev]: system + user messages, the processor's template
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input
        from transformers import ProcessorMixin

        marker = "\ue000"
        messages = format_input(prompts=[marker], system_message=pipe.system_message)[0]
        text = pipe.tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
        if text.count(marker) != 1:
            raise ValueError("the processor's chat template does not insert the prompt once, verbatim")
        # a processor lets the tokenizer add its special tokens unless the text starts with BOS; a tokenizer's
        # own apply_chat_template never adds them
        bos = tokenizer.bos_token
        special = isinstance(pipe.tokenizer, ProcessorMixin) and not (bos and text.startswith(bos))
        return template_columns(tokenizer, text.replace(marker, "{}"), prompt, spans, pad_to=protocol.t5_tokens,
                                special_tokens=special)
    template = chat_template(tokenizer, add_generation_prompt=True, enable_thinking=False)
    return template_columns(tokenizer, template, prompt, spans, pad_to=protocol.t5_tokens)


def _flux2_encode(pipe, prompts, protocol, device):
    pe, text_ids = pipe.encode_prompt(prompt=prompts, device=device, max_sequence_length=protocol.t5_tokens)
    return dict(encoder_hidden_states=pe, txt_ids=text_ids)


def _flux2_forward(pipe, lat, t, enc, protocol):
    B = lat.shape[0]
    guidance = embedded_guidance(pipe, lat, protocol.guidance or 4.0)  # [dev]: the pipeline's guidance_scale
    return pipe.transformer(hidden_states=pipe._pack_latents(lat),
                            timestep=(t / 1000).expand(B).to(lat.device, lat.dtype), guidance=guidance,
                            img_ids=pipe._prepare_latent_ids(lat).to(lat.device), return_dict=False, **enc)


# Chroma (ChromaPipeline): Flux.1's VAE, 2x2 packing, ids and schedule; one T5 text encoder padded to t5_tokens (512,
# the pipeline's default), no pooled text, no guidance; the prompt starts at column 0 (fixed length: prompts batch,
# the first max_sequence_length columns are read). The mask, the pipeline's: it marks the valid text tokens and the
# first padding token with 1, the rest of the padding with 0, and hands the transformer this FLOAT [B, T + N_img]
# mask (image tokens 1); its blocks turn it into m_i * m_j [B, 1, N, N], which SDPA ADDS to the scores: kept text and
# image keys get +1, padding keys +0 (a bias, not a mask: the padding keeps a probability), and padding text queries
# see no bias. We pass the same float mask, so segmentation runs the model as it was trained, and capture reproduces
# it exactly (capture.dispatch._key_mask: the i2t rows are image queries, which see the key bias m).
def _chroma_encode(pipe, prompts, protocol, device):
    pe, txt_ids, mask = pipe.encode_prompt(prompt=prompts, device=device, do_classifier_free_guidance=False,
                                           max_sequence_length=protocol.t5_tokens)[:3]
    return dict(encoder_hidden_states=pe, txt_ids=txt_ids, text_mask=mask)  # mask [B, T] float 0 / 1


def _chroma_forward(pipe, lat, t, enc, protocol):
    B, c, h, w = lat.shape
    enc = dict(enc)
    text_mask = enc.pop("text_mask")  # [B, T] float 0 / 1
    # [B, T + N_img]: the text's mask, then 1 for every image token (text first, as the transformer concatenates;
    # what ChromaPipeline._prepare_attention_mask builds)
    ones = torch.ones(B, (h // 2) * (w // 2), dtype=text_mask.dtype, device=lat.device)
    return packed_forward(pipe, lat, t, enc, attention_mask=torch.cat([text_mask, ones], dim=1))


# Ovis-Image: Flux.1's latent, packing and ids; Qwen3 text encoder behind its chat template with a system sentence
# prepended to the prompt, padded to t5_tokens + user_prompt_begin_id (256 + 28) tokens without special tokens, the
# first user_prompt_begin_id dropped (the template's head and the system sentence: the text block starts at the
# prompt), no mask (padded embeddings zeroed): fixed length 256, prompts batch. Schedule as Qwen-Image's; no pooled
# text, no guidance.
def _ovis_text_head(pipe, tokenizer) -> int:
    return int(pipe.user_prompt_begin_id)


def _ovis_text_layout(pipe, tokenizer, prompt, spans, protocol):
    from ...segmentation.families import chat_template, template_columns

    template = chat_template(tokenizer, add_generation_prompt=True, enable_thinking=False)
    template = template.replace("{}", pipe.system_prompt + "{}")
    drop = _ovis_text_head(pipe, tokenizer)
    return template_columns(tokenizer, template, prompt, spans, drop=drop, pad_to=protocol.t5_tokens + drop,
                            special_tokens=False)


def _ovis_encode(pipe, prompts, protocol, device):
    pe, _, text_ids, _ = pipe.encode_prompt(prompt=prompts, do_classifier_free_guidance=False, device=device,
                                            max_sequence_length=protocol.t5_tokens)
    return dict(encoder_hidden_states=pe, txt_ids=text_ids)


# LongCat-Image (LongCatImagePipeline): Flux.1's latent (z - shift) * scale and 2x2 packing, its own position ids
# (text (0, i, i); image (1, 512 + r, 512 + c)), no guidance, no pooled text; schedule as Qwen-Image's. Text:
# Qwen2.5-VL's last hidden state of [template prefix, prompt, padding, template suffix] with the prefix and suffix cut
# off: the block is the prompt's tokens padded to tokenizer_max_length (512; no mask reaches the transformer: fixed
# length, prompts batch). The pipeline tokenises the prompt PIECEWISE (split_quotation): each unquoted piece on its
# own, each quoted piece one character at a time; the columns are found the same way (longcat_prompt_tokens).
def longcat_prompt_tokens(tokenizer, prompt: str):
    """The ids ``LongCatImagePipeline._encode_prompt`` builds for ``prompt`` (before truncation and padding) and each
    one's character span in ``prompt``: pieces of ``split_quotation`` in order (they tile the prompt), an unquoted
    piece tokenised whole, a quoted one character by character (each token spans its character)."""
    from diffusers.pipelines.longcat_image.pipeline_longcat_image import split_quotation

    ids, spans, at = [], [], 0
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


def _longcat_text_layout(pipe, tokenizer, prompt, spans, protocol):
    from ...segmentation.tokens import span_columns

    n = int(pipe.tokenizer_max_length)
    _, offsets = longcat_prompt_tokens(tokenizer, prompt)
    offsets = offsets[:n]  # the pipeline truncates to n tokens
    pad = n - len(offsets) if tokenizer.padding_side == "left" else 0
    return [[pos + pad for pos in cols] for cols in span_columns(offsets, spans)], n


def _longcat_text_head(pipe, tokenizer) -> int:
    # the pipeline's template prefix, tokenised on its own before the prompt's tokens (and cut off after encoding)
    return len(tokenizer(pipe.prompt_template_encode_prefix, add_special_tokens=False)["input_ids"])


def _longcat_encode(pipe, prompts, protocol, device):
    pe, txt_ids = pipe.encode_prompt(prompt=prompts)
    return dict(encoder_hidden_states=pe.to(device), txt_ids=txt_ids.to(device))


def _longcat_forward(pipe, lat, t, enc, protocol):
    from diffusers.pipelines.longcat_image.pipeline_longcat_image import prepare_pos_ids

    n = int(pipe.tokenizer_max_length)
    img_ids = prepare_pos_ids(modality_id=1, type="image", start=(n, n), height=lat.shape[-2] // 2,
                              width=lat.shape[-1] // 2)
    return packed_forward(pipe, lat, t, enc, img_ids=img_ids.to(lat.device), guidance=None)


def _longcat_generate(pipe, kwargs):
    # the pipeline rewrites the prompt with its text encoder by default: the columns are the prompt's as given
    return dict(kwargs, enable_prompt_rewrite=False)


# ------------------------------------------------------------------------ tiny pipelines (the records' Tiny code)
def _tiny_flux_parts(max_length):
    """CLIP (pooled) + T5 stand-ins; call the pipeline with ``max_sequence_length=max_length``."""
    from ...segmentation.tiny import tiny_clip, tiny_clip_tokenizer, tiny_t5, tiny_t5_tokenizer

    tok, tok2 = tiny_clip_tokenizer(model_max_length=max_length), tiny_t5_tokenizer(model_max_length=max_length)
    return dict(text_encoder=tiny_clip(tok, projection=False), tokenizer=tok, text_encoder_2=tiny_t5(tok2),
                tokenizer_2=tok2)


def _tiny_flux2_klein_parts(max_length):
    """Qwen3 stand-in with 27 layers of width 8 (the pipeline stacks hidden states 9, 18, 27), the byte-level
    tokenizer with a Qwen3-style chat template. Segment it with ``t5_tokens=max_length`` (the pipeline's padded text
    length; 512 for the real model)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ...segmentation.tiny import TINY_CHAT_TEMPLATE, tiny_bpe_tokenizer

    tok = tiny_bpe_tokenizer(model_max_length=max_length)
    tok.chat_template = TINY_CHAT_TEMPLATE
    te = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=8, intermediate_size=8, num_hidden_layers=27,
                                      num_attention_heads=2, num_key_value_heads=2, head_dim=4,
                                      pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=None))
    return dict(text_encoder=te, tokenizer=tok)


def _tiny_flux2_vae():
    """A 2-level Flux.2 VAE (4 latent channels, 2x2 patchified to 16) with batch-norm statistics that are not the
    identity."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(block_out_channels=(4, 4), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                             norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                             mid_block_add_attention=False)
    with torch.no_grad():
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def _tiny_flux2_dev_parts(max_length):
    """A Mistral-3 stand-in with 30 layers of width 8 (the pipeline stacks hidden states 10, 20, 30:
    joint_attention_dim 24), the byte-level tokenizer with a Mistral-style chat template (BOS, ``[SYSTEM_PROMPT]``,
    ``[INST]``) in place of the real ``PixtralProcessor`` (which needs torchvision; the pipeline calls the same
    ``apply_chat_template``)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    from ...segmentation.tiny import TINY_MISTRAL_TEMPLATE, tiny_bpe_tokenizer

    tok = tiny_bpe_tokenizer(specials=("</s>", "<s>", "[IMG]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]",
                                       "[/INST]"))
    tok.bos_token = "<s>"
    tok.chat_template = TINY_MISTRAL_TEMPLATE
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    te = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tok), hidden_size=8, intermediate_size=8,
                         num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=2, head_dim=4,
                         max_position_embeddings=1024, sliding_window=None, **ids),
        vision_config=dict(model_type="pixtral", hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=8, image_size=30, patch_size=6, num_channels=3),
        image_token_index=tok.convert_tokens_to_ids("[IMG]"), image_seq_length=4, vision_feature_layer=-1, **ids))
    return dict(text_encoder=te, tokenizer=tok)


def _tiny_ovis_parts(max_length):
    """Qwen3 stand-in (2 layers, hidden 32), the byte-level tokenizer with a Qwen3-style chat template."""
    from transformers import Qwen3Config, Qwen3Model

    from ...segmentation.tiny import TINY_CHAT_TEMPLATE, tiny_bpe_tokenizer

    tok = tiny_bpe_tokenizer()
    tok.chat_template = TINY_CHAT_TEMPLATE
    te = Qwen3Model(Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=None))
    return dict(text_encoder=te, tokenizer=tok)


def _tiny_ovis_after(pipe, max_length):
    # the real template head and system sentence are 28 Qwen tokens; the stand-in spends more: drop its own count
    # (the sentence's trailing space goes with the prompt's first word, "Ġcat", as in Qwen's tokenizer)
    from ...segmentation.families import chat_template

    tok = pipe.tokenizer
    head = chat_template(tok, add_generation_prompt=True, enable_thinking=False).split("{}")[0] + pipe.system_prompt
    pipe.user_prompt_begin_id = len(tok(head.rstrip(" "), add_special_tokens=False)["input_ids"])


def _tiny_longcat_parts(max_length):
    """Qwen2.5-VL stand-in (as Qwen-Image's, hidden 16) with the byte-level tokenizer; no ``text_processor`` (only
    its prompt rewriting, which segmentation turns off, uses it)."""
    from ...segmentation.tiny import tiny_bpe_tokenizer, tiny_qwen25_vl

    tok = tiny_bpe_tokenizer()
    return dict(text_encoder=tiny_qwen25_vl(tok, num_layers=2), tokenizer=tok, text_processor=None)


def _tiny_longcat_after(pipe, max_length):
    pipe.tokenizer_max_length = max_length  # the text length the pipeline pads to (512 for the real model)


_DYNAMIC = ("FlowMatchEulerDiscreteScheduler", dict(use_dynamic_shifting=True))
_FLUX2_TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=256,
                   axes_dims_rope=[4, 4, 4, 4], guidance_embeds=False)
_FLUX1_TINY = dict(patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2,
                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8))
# 4 px per image token (2 with vae_blocks=1), no guidance embedding
_TINY_FLUX = Tiny(pipeline="FluxPipeline", parts=_tiny_flux_parts, max_length=77, vae=dict(latent_channels=1),
                  transformer=dict(_FLUX1_TINY, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]))
# Flux.2 [klein]: 4 px per token; [dev]: the same VAE and scheduler, a transformer with guidance embedding
_TINY_FLUX2 = Tiny(pipeline="Flux2KleinPipeline", parts=_tiny_flux2_klein_parts, max_length=64,
                   vae=_tiny_flux2_vae, scheduler=_DYNAMIC, transformer=_FLUX2_TINY,
                   order=("parts", "vae", "transformer"))
_TINY_FLUX2_DEV = Tiny(pipeline="Flux2Pipeline", parts=_tiny_flux2_dev_parts, vae=_tiny_flux2_vae,
                       scheduler=_DYNAMIC, transformer=dict(_FLUX2_TINY, guidance_embeds=True))
# Chroma: scaled down as diffusers' own test does; the pipeline pads T5 to max_sequence_length (512 by default)
_TINY_CHROMA = Tiny(pipeline="ChromaPipeline", parts=tiny_t5_parts, max_length=512, vae=dict(latent_channels=1),
                    scheduler=_DYNAMIC, order=("transformer", "vae", "parts"),
                    transformer=dict(_FLUX1_TINY, approximator_num_channels=8, approximator_hidden_dim=16,
                                     approximator_layers=1))
_TINY_OVIS = Tiny(pipeline="OvisImagePipeline", parts=_tiny_ovis_parts, vae=dict(latent_channels=1),
                  scheduler=_DYNAMIC, after=_tiny_ovis_after,
                  transformer=dict(_FLUX1_TINY, num_layers=1))
# LongCat: the 16 latent channels the pipeline hard-codes (2 px per latent, 4 px per token)
_TINY_LONGCAT = Tiny(pipeline="LongCatImagePipeline", parts=_tiny_longcat_parts, max_length=64,
                     vae=dict(latent_channels=16), scheduler=_DYNAMIC, after=_tiny_longcat_after,
                     transformer=dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
                                      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                      pooled_projection_dim=16, axes_dims_rope=[4, 4, 8]))


FLUX_LAYERS = (Layers("transformer_blocks.{i}.attn"), Layers("single_transformer_blocks.{i}.attn", "single"))

FLUX = Family(
    family="flux", title="Flux.1 (and Kontext)", transformers=("diffusers.FluxTransformer2DModel",),
    processors=(_T + "transformer_flux.FluxAttnProcessor",), blocks=FLUX_LAYERS, text_at="start",
    cfg_batched=False,  # FluxPipeline's true CFG is a second forward inside cache_context("uncond")
    read=read_flux, grid_text="from `img_ids`",
    # the paper's (segmentation/protocol.py): double block 12, T5 77 tokens, guidance 3.5, its 50-step schedule
    # shifted for 16 tokens, pixels in [0, 1]
    segment=Segment(pipelines=("FluxPipeline", "FluxKontextPipeline"), layer=12, paper=True, model_ids=("flux",),
                    settings=dict(tokenizer="tokenizer_2", guidance=3.5, drop_t5=False, generate_guidance_scale=3.5,
                                  num_inference_steps=50, shift_seq_len=16, vae_pixels="unit"),
                    models="Flux.1-dev, Flux.1 Kontext", loader="FluxPipeline",
                    columns="T5 (77); Kontext without a reference image",
                    packed=True, encode=_flux_encode,
                    forward=_flux_forward, generate=_flux_generate,
                    tiny={"flux": _TINY_FLUX}),
)
FLUX2 = replace(
    FLUX, family="flux2", title="Flux.2", transformers=("diffusers.Flux2Transformer2DModel",),
    processors=(_T + "transformer_flux2.Flux2AttnProcessor",),
    single_processors=(_T + "transformer_flux2.Flux2ParallelSelfAttnProcessor",),
    read=_read_flux2,  # Flux2Pipeline: guidance-distilled, one conditional forward per step
    segment=Segment(pipelines=("Flux2KleinPipeline", "Flux2Pipeline"), model_ids=("flux.2", "flux2"),
                    settings=dict(drop_t5=False, t5_tokens=512, generate_guidance_scale=4.0),
                    models="Flux.2 [klein] / [dev]",
                    columns=("chat-templated Qwen3 ([klein]) or Mistral-3 ([dev]; guidance 4.0) prompt tokens in the "
                             "padded 512"),
                    packed=True, latents=_flux2_latents,
                    schedule=_flux2_schedule, text_layout=_flux2_text_layout, encode=_flux2_encode,
                    forward=_flux2_forward,
                    tiny={"flux2": _TINY_FLUX2, "flux2-dev": _TINY_FLUX2_DEV}),
)
FLUX3 = replace(
    FLUX, family="flux3", title="Flux.3", transformers=("diffusers.Flux3Transformer2DModel",),
    processors=(_T + "transformer_flux3.Flux3AttnProcessor",),
    blocks=(Layers("single_transformer_blocks.{i}.attn", "single"),),
    refused=_flux3_mode_blocks, text="per-mode blocks refused",  # no pipeline in diffusers 0.42
    segment=None,
)
CHROMA = replace(  # ChromaPipeline: the unconditional forward inside cache_context("uncond")
    FLUX, family="chroma", title="Chroma", transformers=("diffusers.ChromaTransformer2DModel",),
    text="`attention_mask`: bool, or the pipeline's float 0 / 1",
    segment=Segment(pipelines=("ChromaPipeline",), model_ids=("chroma",),
                    settings=dict(drop_t5=False, t5_tokens=512, generate_guidance_scale=5.0),
                    columns="T5 (first 77 of 512); the pipeline's float 0 / 1 mask, an additive bias",
                    packed=True, encode=_chroma_encode, forward=_chroma_forward, generate_tokens=512,
                    tiny={"chroma": _TINY_CHROMA}),
)
OVIS_IMAGE = replace(  # OvisImagePipeline: conditional and unconditional forwards one after the other
    FLUX, family="ovis_image", title="Ovis-Image", transformers=("diffusers.OvisImageTransformer2DModel",),
    processors=(_T + "transformer_ovis_image.OvisImageAttnProcessor",),
    segment=Segment(pipelines=("OvisImagePipeline",), model_ids=("ovis-image",),
                    settings=dict(drop_t5=False, t5_tokens=256, generate_guidance_scale=5.0),
                    columns="Qwen3 prompt tokens after the template head and system sentence",
                    packed=True, schedule="token_shift", text_layout=_ovis_text_layout, text_head=_ovis_text_head,
                    encode=_ovis_encode, forward=packed_forward,
                    tiny={"ovis_image": _TINY_OVIS}),
)
LONGCAT_IMAGE = replace(
    FLUX, family="longcat_image", title="LongCat-Image", transformers=("diffusers.LongCatImageTransformer2DModel",),
    processors=(_T + "transformer_longcat_image.LongCatImageAttnProcessor",),
    segment=Segment(pipelines=("LongCatImagePipeline",), model_ids=("longcat-image",),
                    settings=dict(num_inference_steps=50, drop_t5=False, generate_guidance_scale=4.5),
                    columns=("Qwen2.5-VL prompt tokens in the padded 512, tokenised piecewise as the pipeline does; "
                             "prompt rewriting off"),
                    packed=True, schedule="token_shift", text_layout=_longcat_text_layout,
                    text_head=_longcat_text_head,
                    encode=_longcat_encode, forward=_longcat_forward, generate=_longcat_generate,
                    tiny={"longcat_image": _TINY_LONGCAT}),
)
BRIA = replace(
    FLUX, family="bria", title="Bria 3.x", transformers=("diffusers.BriaTransformer2DModel",),
    processors=(_T + "transformer_bria.BriaAttnProcessor",),
    cfg_batched=True,  # BriaPipeline batches [uncond, cond] in one forward
    segment=None,
)
BRIA_FIBO = replace(
    FLUX, family="bria_fibo", title="Bria FIBO", transformers=("diffusers.BriaFiboTransformer2DModel",),
    processors=(_T + "transformer_bria_fibo.BriaFiboAttnProcessor",),
    single_processors=(_T + "transformer_bria.BriaAttnProcessor",),
    # BriaFiboPipeline batches [uncond, cond] but has no do_classifier_free_guidance: batch="cond" keeps every row
    cfg_batched=True, text="the pipeline's boolean key mask", segment=None,
)
FAMILIES = (FLUX, FLUX2, FLUX3, CHROMA, OVIS_IMAGE, LONGCAT_IMAGE, BRIA, BRIA_FIBO)
