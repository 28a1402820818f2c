"""Tiny random-weight SD3 and Flux pipelines, built offline (no download): a smoke test of the installation.

``seg4diff-fast segment --model tiny`` and the tests use these. Which builder (and arguments) makes a family's tiny
pipelines is the family record's ``segment.tiny`` (:func:`tiny_models`); the builders and their configs are here.
The weights are random, so the masks they give mean nothing; what they check is that every part runs: tokenizers
with offsets, text encoders, VAE, transformer, capture, grids, upsampling and the writers.

The tokenizers are real ``CLIPTokenizer`` / ``T5Tokenizer`` objects built from a small in-memory vocabulary:
a byte-level alphabet (every text tokenises) plus whole-word tokens for a few words (``TINY_WORDS``), so that
those words are one token and any other word is several, as in the real vocabularies.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

__all__ = ["TINY_WORDS", "tiny_clip_tokenizer", "tiny_t5_tokenizer", "tiny_bpe_tokenizer", "tiny_sd3_pipeline",
           "tiny_flux_pipeline", "tiny_qwenimage_pipeline", "tiny_cogview4_pipeline", "tiny_cogvideox_pipeline",
           "tiny_hidream_pipeline", "tiny_flux2_klein_pipeline", "tiny_flux2_dev_pipeline", "tiny_cogview3plus_pipeline",
           "tiny_ovis_image_pipeline", "tiny_longcat_image_pipeline", "tiny_chroma_pipeline", "tiny_hunyuanimage_pipeline",
           "tiny_hunyuanvideo_pipeline", "tiny_hunyuanvideo15_pipeline", "tiny_pipeline", "tiny_models"]

TINY_WORDS = ("a", "the", "on", "of", "cat", "dog", "grass", "sky", "tree", "road", "car", "person", "food",
              "traffic", "light", "water", "wall", "house", "background")


def _bytes_to_unicode() -> Dict[int, str]:
    # GPT-2 / CLIP byte -> printable unicode table (so that byte-level BPE never meets whitespace or control).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_clip_tokenizer(words=TINY_WORDS, model_max_length: int = 77):
    """A ``CLIPTokenizer`` (BOS ``<|startoftext|>``, EOS = pad = ``<|endoftext|>``) with whole-word merges for ``words``."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: Dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: List[tuple] = []
    for w in words:
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merged = left + right
            rule = (left, right)
            if rule not in merges:
                merges.append(rule)
            vocab.setdefault(merged, len(vocab))
            left = merged
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = model_max_length
    return tok


def tiny_t5_tokenizer(words=TINY_WORDS, model_max_length: int = 77):
    """A ``T5Tokenizer`` (unigram, EOS ``</s>``, no BOS) with whole-word pieces for ``words``."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.-'()/&"]
    vocab += [("▁" + w, -1.0) for w in words]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    tok.model_max_length = model_max_length
    return tok


def _eval(pipe):
    # modules built from configs start in training mode: T5's dropout would make every call differ
    for c in pipe.components.values():
        if isinstance(c, torch.nn.Module):
            c.eval()
    return pipe


def _clip_text_config(tok, projection: bool, projection_dim: int = 32, positions: int = 77):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        hidden_size=32, intermediate_size=37, projection_dim=projection_dim, num_attention_heads=4,
        num_hidden_layers=2, layer_norm_eps=1e-5, vocab_size=len(tok), max_position_embeddings=positions,
        hidden_act="gelu",
    )


def _tiny_t5(tok):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                   decoder_start_token_id=0))


def _tiny_vae(latent_channels: int, blocks: int = 2):
    from diffusers import AutoencoderKL

    # vae_scale_factor = 2 ** (blocks - 1): 2 by default, 1 (no downsampling) with blocks=1
    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,) * blocks, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )


def tiny_sd3_pipeline(num_layers: int = 4, seed: int = 0, dtype=torch.float32, sd35: bool = False,
                      max_length: int = 77, patch_size: int = 2, vae_blocks: int = 2):
    """SD3 pipeline: CLIP-L/G stand-ins, no T5 (as the paper loads SD3), 4 px per image token.

    ``transformer_blocks`` has ``num_layers`` joint blocks (the last is context_pre_only, as in SD3).
    ``sd35``: SD3.5 layout (RMS QK-norm, dual attention in block 0). ``max_length``: tokenizers' length.
    ``patch_size=1, vae_blocks=1``: one image token per pixel (handy for capture tests).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer(model_max_length=max_length)
    tok2 = tiny_clip_tokenizer(model_max_length=max_length)
    te = CLIPTextModelWithProjection(_clip_text_config(tok, True))
    te2 = CLIPTextModelWithProjection(_clip_text_config(tok2, True))
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=patch_size, in_channels=4, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
        out_channels=4, pos_embed_max_size=64, qk_norm="rms_norm" if sd35 else None,
        dual_attention_layers=(0,) if sd35 else (),
    )
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_tiny_vae(4, vae_blocks), text_encoder=te, tokenizer=tok,
        text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=None, tokenizer_3=None, transformer=transformer,
    )
    return _eval(pipe if dtype == torch.float32 else pipe.to(dtype=dtype))


def tiny_flux_pipeline(num_layers: int = 2, num_single_layers: int = 2, seed: int = 0, dtype=torch.float32,
                       max_length: int = 77, vae_blocks: int = 2):
    """Flux pipeline: CLIP (pooled) + T5 stand-ins, 4 px per image token (2 with ``vae_blocks=1``), no guidance
    embedding. ``max_length``: tokenizers' length (call the pipeline with ``max_sequence_length=max_length``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer(model_max_length=max_length)
    tok2 = tiny_t5_tokenizer(model_max_length=max_length)
    te = CLIPTextModel(_clip_text_config(tok, False))
    te2 = _tiny_t5(tok2)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(1, vae_blocks), text_encoder=te, tokenizer=tok,
        text_encoder_2=te2, tokenizer_2=tok2, transformer=transformer,
    )
    return _eval(pipe if dtype == torch.float32 else pipe.to(dtype=dtype))


def tiny_models() -> Dict[str, Tuple[str, str, str, dict]]:
    """``{name: (protocol key, family, builder, kwargs)}``: every tiny pipeline the family records name
    (``segment.tiny``), in record order."""
    from ..capture.families import FAMILIES

    out: Dict[str, Tuple[str, str, str, dict]] = {}
    for record in FAMILIES:
        seg = record.segment
        for name, (builder, kwargs) in ({} if seg is None else seg.tiny).items():
            if name in out:
                raise RuntimeError(f"two family records name the tiny pipeline {name!r}")
            if not (builder.startswith("tiny_") and callable(globals().get(builder))):
                raise RuntimeError(f"family record {record.family!r}: its tiny pipeline {name!r} names {builder!r}, "
                                   "not a tiny_* builder of seg4diff_fast.segmentation.tiny")
            protocol = name if name in (record.family, *seg.variants) else record.family
            out[name] = (protocol, record.family, builder, dict(kwargs))
    return out


def tiny_pipeline(family: str = "sd3", **kwargs):
    """The tiny pipeline ``family`` (a name of :func:`tiny_models`: ``"sd3"``, ``"sd3.5"``, ``"flux"``,
    ``"flux2-dev"``, ``"cogvideox1.5"``, ...), built by the function its family record names."""
    models = tiny_models()
    if family not in models:
        raise ValueError(f"tiny pipelines exist for {', '.join(map(repr, models))}, not {family!r}")
    _, _, builder, fixed = models[family]
    return globals()[builder](**fixed, **kwargs)


def tiny_bpe_tokenizer(words=TINY_WORDS, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                       model_max_length: int = 1024, padding_side: str = "right", prefix=()):
    """A byte-level BPE ``PreTrainedTokenizerFast`` (GPT-2 / Qwen / GLM style: a space belongs to the next word,
    ``Ġcat``) with whole-word merges for ``words`` and the chat ``specials``; pad = eos = the first special.
    Adds the special tokens ``prefix`` before every text (GLM-4: ``[gMASK]<sop>``), none by default (as Qwen2's).
    Stands in for the LLM tokenizers of Qwen-Image, CogView4, HiDream (Llama), Flux.2 [klein] and Ovis-Image."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    table = _bytes_to_unicode()
    vocab: Dict[str, int] = {c: i for i, c in enumerate(table.values())}
    merges: List[tuple] = []
    space = table[ord(" ")]
    for w in words:
        left = w[0]
        for right in list(w[1:]) + [None]:
            if right is None:  # the word after a space: one more merge, "Ġ" + word
                left, right = space, w
            if (left, right) not in merges:
                merges.append((left, right))
            vocab.setdefault(left + right, len(vocab))
            left = left + right
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=True)
    if prefix:
        core.add_special_tokens(list(prefix))
        core.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=True),
            processors.TemplateProcessing(single=" ".join(prefix) + " $A",
                                          special_tokens=[(p, core.token_to_id(p)) for p in prefix]),
        ])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=model_max_length,
                                  padding_side=padding_side, pad_token=specials[0], eos_token=specials[0],
                                  additional_special_tokens=list(specials[1:]))
    return tok


def _tiny_qwen25_vl(tok, num_layers: int):
    """A tiny random Qwen2.5-VL text encoder (hidden 16, 2 heads) for ``tok`` (Qwen-Image, HunyuanImage)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=num_layers, num_attention_heads=2,
                         num_key_value_heads=2, rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default",
                                                               "type": "default"},
                         rope_theta=1000000.0, vocab_size=len(tok), bos_token_id=None, eos_token_id=None),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        hidden_size=16, vocab_size=len(tok), vision_start_token_id=len(tok) - 1, image_token_id=len(tok) - 1,
        video_token_id=len(tok) - 1, bos_token_id=None, eos_token_id=None,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def tiny_qwenimage_pipeline(num_layers: int = 2, seed: int = 0, dtype=torch.float32):
    """Qwen-Image pipeline (configs like diffusers' tests): Qwen2.5-VL text encoder (2 layers, hidden 16), the
    byte-level stand-in tokenizer, a 2-level video VAE (4 latent channels, 2 px per latent), 4 px per token."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    tok = tiny_bpe_tokenizer()
    te = _tiny_qwen25_vl(tok, num_layers=2)
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 1.0])
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=num_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae,
                             text_encoder=te, tokenizer=tok, transformer=transformer)
    # the real system prefix is 34 Qwen tokens; the stand-in tokenizer spends one per byte on it: drop its own count
    prefix = pipe.prompt_template_encode.split("{}")[0]
    pipe.prompt_template_encode_start_idx = len(tok(prefix)["input_ids"])
    return _eval(pipe if dtype == torch.float32 else pipe.to(dtype=dtype))


def tiny_cogview4_pipeline(num_layers: int = 2, seed: int = 0, dtype=torch.float32):
    """CogView4 pipeline: GLM text encoder (2 layers, hidden 32), the byte-level stand-in tokenizer padding on the
    left (as GLM's), a 2-level VAE (2 px per latent, 4 channels), patch 2: 4 px per token."""
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmModel

    torch.manual_seed(seed)
    tok = tiny_bpe_tokenizer(padding_side="left", prefix=("[gMASK]", "<sop>"))
    te = GlmModel(GlmConfig(hidden_size=32, intermediate_size=8, num_hidden_layers=2, num_attention_heads=4,
                            head_dim=8, vocab_size=len(tok), pad_token_id=tok.pad_token_id))
    transformer = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, num_layers=num_layers, attention_head_dim=4, num_attention_heads=4,
        out_channels=4, text_embed_dim=32, time_embed_dim=8, condition_dim=4,
    )
    sched = FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                            use_dynamic_shifting=True, time_shift_type="linear")
    pipe = CogView4Pipeline(tokenizer=tok, text_encoder=te, vae=_tiny_vae(4), transformer=transformer, scheduler=sched)
    return _eval(pipe if dtype == torch.float32 else pipe.to(dtype=dtype))


def tiny_cogvideox_pipeline(num_layers: int = 2, seed: int = 0, dtype=torch.float32, rotary: bool = True,
                            patch_size_t=None):
    """CogVideoX pipeline: T5 stand-in, a 3D VAE that compresses time 4x and space 4x, patch 2 (8 px per token),
    DDIM v-prediction scheduler; ``rotary``: 3D RoPE as CogVideoX-5b (else learned positions as 2b).
    ``patch_size_t=2``: CogVideoX 1.5's layout (temporal patches of 2 latent frames, no patch bias, RoPE)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline
    from diffusers import CogVideoXTransformer3DModel
    torch.manual_seed(seed)
    tok = tiny_t5_tokenizer(model_max_length=226)
    te = _tiny_t5(tok)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 8, 8), latent_channels=4, layers_per_block=1,
        norm_num_groups=2, temporal_compression_ratio=4,
    )
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=32, num_layers=num_layers, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=rotary,
        patch_size_t=patch_size_t, patch_bias=patch_size_t is None,
    )
    pipe = CogVideoXPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler(prediction_type="v_prediction", snr_shift_scale=1.0))
    return _eval(pipe if dtype == torch.float32 else pipe.to(dtype=dtype))


def tiny_hidream_pipeline(num_layers: int = 2, num_single_layers: int = 2, seed: int = 0, dtype=torch.float32):
    """HiDream-I1 pipeline: CLIP-L / CLIP-G stand-ins (128 positions: the pipeline pads CLIP to 128), T5 and Llama
    (2 layers, hidden 16, eager attention: the pipeline asks for attentions) stand-ins, a 2-level VAE, patch 2."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel
    from transformers import CLIPTextModelWithProjection, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok, tok2 = tiny_clip_tokenizer(model_max_length=128), tiny_clip_tokenizer(model_max_length=128)
    te = CLIPTextModelWithProjection(_clip_text_config(tok, True, projection_dim=4, positions=128))
    te2 = CLIPTextModelWithProjection(_clip_text_config(tok2, True, projection_dim=4, positions=128))
    tok3 = tiny_t5_tokenizer(model_max_length=128)
    te3 = _tiny_t5(tok3)
    tok4 = tiny_bpe_tokenizer(model_max_length=128)
    te4 = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok4), hidden_size=16, intermediate_size=16,
                                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                       pad_token_id=tok4.pad_token_id, bos_token_id=None, eos_token_id=None,
                                       attn_implementation="eager"))
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=8, num_attention_heads=4, caption_channels=[32, 16], text_emb_dim=8, num_routed_experts=2,
        num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32),
        llama_layers=tuple(i % 2 for i in range(num_layers + num_single_layers)), force_inference_output=True,
    )
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(4), text_encoder=te, tokenizer=tok,
        text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=tok3, text_encoder_4=te4,
        tokenizer_4=tok4, transformer=transformer,
    )
    pipe.default_sample_size = 16  # its pipeline generates (default_sample_size * vae_scale_factor)^2 pixels: 32^2
    return _eval(pipe if dtype == torch.float32 else pipe.to(dtype=dtype))


#: a Qwen3-style chat template (one turn per message; the generation prompt with an empty think block)
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def tiny_flux2_klein_pipeline(num_layers: int = 1, num_single_layers: int = 2, seed: int = 0, dtype=torch.float32,
                              max_length: int = 64):
    """Flux.2 [klein] pipeline: Qwen3 text encoder stand-in with 27 layers of width 8 (the pipeline stacks hidden
    states 9, 18, 27), the byte-level tokenizer with a Qwen3-style chat template, a 2-level Flux.2 VAE (4 latent
    channels, 2x2 patchified to 16), 4 px per token. Segment it with ``t5_tokens=max_length`` (the pipeline's
    padded text length; 512 for the real model)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from diffusers import Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tok = tiny_bpe_tokenizer(model_max_length=max_length)
    tok.chat_template = TINY_CHAT_TEMPLATE
    te = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=8, intermediate_size=8, num_hidden_layers=27,
                                      num_attention_heads=2, num_key_value_heads=2, head_dim=4,
                                      pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=None))
    vae = AutoencoderKLFlux2(block_out_channels=(4, 4), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                             norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                             mid_block_add_attention=False)
    with torch.no_grad():  # batch-norm statistics that are not the identity
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4], guidance_embeds=False,
    )
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae,
                              text_encoder=te, tokenizer=tok, transformer=transformer)
    return _eval(pipe if dtype == torch.float32 else pipe.to(dtype=dtype))


#: a Mistral-3-style chat template (BOS, the system message, the user turn; message content a string or a list of
#: typed parts, as Flux2Pipeline's ``format_input`` builds them)
TINY_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set text = m['content'] if m['content'] is string else "
    "m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]{% else %}[INST]{{ text }}[/INST]"
    "{% endif %}{% endfor %}"
)


def tiny_flux2_dev_pipeline(num_layers: int = 1, num_single_layers: int = 2, seed: int = 0, dtype=torch.float32):
    """Flux.2 [dev] pipeline (``Flux2Pipeline``; configs like diffusers' test): a Mistral-3 text encoder stand-in
    with 30 layers of width 8 (the pipeline stacks hidden states 10, 20, 30: joint_attention_dim 24), the byte-level
    tokenizer with a Mistral-style chat template (BOS, ``[SYSTEM_PROMPT]``, ``[INST]``) in place of the real
    ``PixtralProcessor`` (which needs torchvision; the pipeline calls the same ``apply_chat_template``), Flux.2
    [klein]'s tiny VAE, a transformer with guidance embedding (as [dev]), 4 px per token."""
    from diffusers import Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    klein = tiny_flux2_klein_pipeline(seed=seed)  # its VAE and scheduler (batch-norm statistics set)
    torch.manual_seed(seed)
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
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4], guidance_embeds=True,
    )
    pipe = Flux2Pipeline(scheduler=klein.scheduler, vae=klein.vae, text_encoder=te, tokenizer=tok,
                         transformer=transformer)
    return _eval(pipe if dtype == torch.float32 else pipe.to(dtype=dtype))


def tiny_cogview3plus_pipeline(num_layers: int = 2, seed: int = 0, dtype=torch.float32):
    """CogView3-Plus pipeline: T5 stand-in (224 tokens), a 2-level VAE, patch 2 (4 px per token, at most 16 tokens
    per side), DDIM v-prediction scheduler."""
    from diffusers import CogVideoXDDIMScheduler, CogView3PlusPipeline, CogView3PlusTransformer2DModel

    torch.manual_seed(seed)
    tok = tiny_t5_tokenizer(model_max_length=224)
    transformer = CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=num_layers, attention_head_dim=4, num_attention_heads=2,
        out_channels=4, text_embed_dim=32, time_embed_dim=8, condition_dim=2, pos_embed_max_size=16, sample_size=16,
    )
    pipe = CogView3PlusPipeline(tokenizer=tok, text_encoder=_tiny_t5(tok), vae=_tiny_vae(4), transformer=transformer,
                                scheduler=CogVideoXDDIMScheduler(prediction_type="v_prediction", snr_shift_scale=1.0))
    return _eval(pipe if dtype == torch.float32 else pipe.to(dtype=dtype))


def tiny_ovis_image_pipeline(num_layers: int = 1, num_single_layers: int = 2, seed: int = 0, dtype=torch.float32):
    """Ovis-Image pipeline: Qwen3 text encoder stand-in (2 layers, hidden 32), the byte-level tokenizer with a
    Qwen3-style chat template, Flux.1's tiny VAE and packing (4 px per token)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, OvisImagePipeline, OvisImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    tok = tiny_bpe_tokenizer()
    tok.chat_template = TINY_CHAT_TEMPLATE
    te = Qwen3Model(Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=None))
    transformer = OvisImageTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8),
    )
    pipe = OvisImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=_tiny_vae(1),
                             text_encoder=te, tokenizer=tok, transformer=transformer)
    # the real template head and system sentence are 28 Qwen tokens; the stand-in spends more: drop its own count
    # (the sentence's trailing space goes with the prompt's first word, "Ġcat", as in Qwen's tokenizer)
    from .families import chat_template

    head = chat_template(tok, add_generation_prompt=True, enable_thinking=False).split("{}")[0] + pipe.system_prompt
    pipe.user_prompt_begin_id = len(tok(head.rstrip(" "), add_special_tokens=False)["input_ids"])
    return _eval(pipe if dtype == torch.float32 else pipe.to(dtype=dtype))


def tiny_longcat_image_pipeline(num_layers: int = 1, num_single_layers: int = 2, seed: int = 0, dtype=torch.float32,
                                max_length: int = 64):
    """LongCat-Image pipeline: Qwen2.5-VL text encoder stand-in (as Qwen-Image's, hidden 16) with the byte-level
    tokenizer, a 2-level VAE with the 16 latent channels the pipeline hard-codes (2 px per latent, 4 px per token),
    a LongCat transformer as small as Flux.1's tiny. ``max_length``: the text length the pipeline pads to
    (``tokenizer_max_length``, 512 for the real model). No ``text_processor`` (only its prompt rewriting, which
    segmentation turns off, uses it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LongCatImagePipeline, LongCatImageTransformer2DModel

    torch.manual_seed(seed)
    tok = tiny_bpe_tokenizer()
    te = _tiny_qwen25_vl(tok, num_layers=2)
    transformer = LongCatImageTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
        axes_dims_rope=[4, 4, 8],
    )
    pipe = LongCatImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
                                vae=_tiny_vae(16), text_encoder=te, tokenizer=tok, text_processor=None,
                                transformer=transformer)
    pipe.tokenizer_max_length = max_length
    return _eval(pipe if dtype == torch.float32 else pipe.to(dtype=dtype))


def tiny_chroma_pipeline(num_layers: int = 2, num_single_layers: int = 2, seed: int = 0, dtype=torch.float32,
                         max_length: int = 512):
    """Chroma pipeline: a T5 stand-in (the pipeline pads to ``max_sequence_length``, 512 by default), Flux.1's tiny
    VAE and packing (4 px per token), a Chroma transformer scaled down as diffusers' own test does."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    tok = tiny_t5_tokenizer(model_max_length=max_length)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8),
        approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1,
    )
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=_tiny_vae(1),
                          text_encoder=_tiny_t5(tok), tokenizer=tok, transformer=transformer)
    return _eval(pipe if dtype == torch.float32 else pipe.to(dtype=dtype))


def tiny_hunyuanimage_pipeline(num_layers: int = 2, num_single_layers: int = 1, seed: int = 0, dtype=torch.float32,
                               max_length: int = 77):
    """HunyuanImage 2.1 pipeline: Qwen2.5-VL text encoder stand-in (as Qwen-Image's) behind the pipeline's chat
    template (its system prefix dropped: the stand-in tokenizer's own count), a real ``ByT5Tokenizer`` (bytes: no
    vocabulary file) and a tiny T5 for the glyph text, a 2-level HunyuanImage VAE (2 px per latent), patch 1x1.
    ``max_length``: the MLLM text length the pipeline pads to (``tokenizer_max_length``, 1000 for the real model;
    77 here to keep the tests small)."""
    from diffusers import AutoencoderKLHunyuanImage, FlowMatchEulerDiscreteScheduler, HunyuanImagePipeline
    from diffusers import HunyuanImageTransformer2DModel
    from transformers import ByT5Tokenizer

    torch.manual_seed(seed)
    tok = tiny_bpe_tokenizer()
    te = _tiny_qwen25_vl(tok, num_layers=3)
    tok2 = ByT5Tokenizer()
    te2 = _tiny_t5(tok2)
    vae = AutoencoderKLHunyuanImage(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                                    layers_per_block=1, spatial_compression_ratio=2, sample_size=32,
                                    scaling_factor=0.75)
    transformer = HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=num_layers,
        num_single_layers=num_single_layers, num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=16,
        text_embed_2_dim=32, rope_axes_dim=(4, 4),
    )
    pipe = HunyuanImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=te,
                                tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2, transformer=transformer)
    prefix = pipe.prompt_template_encode.split("{}")[0]
    pipe.prompt_template_encode_start_idx = len(tok(prefix)["input_ids"])
    pipe.tokenizer_max_length = max_length
    return _eval(pipe if dtype == torch.float32 else pipe.to(dtype=dtype))


def tiny_hunyuanvideo_pipeline(num_layers: int = 2, num_single_layers: int = 1, seed: int = 0, dtype=torch.float32):
    """HunyuanVideo pipeline (configs like diffusers' tests): a Llama text encoder stand-in (3 layers, hidden 16;
    the pipeline reads the third-last hidden state) with the byte-level tokenizer behind the pipeline's own
    template, a CLIP stand-in for the pooled text, a 4-level HunyuanVideo VAE (8 px per latent, time 4x), patch 1.
    ``pipe.prompt_template``: the pipeline's template with ``crop_start`` counted by the stand-in tokenizer (the
    real one's 95 is the real Llama tokenizer's count); the segmentation family and ``generate`` pass it."""
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    from diffusers import HunyuanVideoTransformer3DModel
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    tok = tiny_bpe_tokenizer()
    te = LlamaModel(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=16, num_hidden_layers=3,
                                num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                                bos_token_id=None, eos_token_id=None))
    tok2 = tiny_clip_tokenizer()
    te2 = CLIPTextModel(_clip_text_config(tok2, False))
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True,
    )
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=num_layers,
        num_single_layers=num_single_layers, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=32, rope_axes_dim=(2, 4, 4),
    )
    pipe = HunyuanVideoPipeline(text_encoder=te, tokenizer=tok, transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=te2,
                                tokenizer_2=tok2)
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    pipe.prompt_template = dict(template=template, crop_start=len(tok(template.split("{}")[0])["input_ids"]))
    return _eval(pipe if dtype == torch.float32 else pipe.to(dtype=dtype))


def tiny_hunyuanvideo15_pipeline(num_layers: int = 2, seed: int = 0, dtype=torch.float32, max_length: int = 64,
                                 image_tokens: int = 9):
    """HunyuanVideo 1.5 pipeline (text-to-video; configs like diffusers' test): a Qwen2.5-VL text model stand-in (3
    layers, hidden 16; the pipeline reads the third-last hidden state) with the byte-level tokenizer and a Qwen-style
    chat template, a real ``ByT5Tokenizer`` and a tiny T5 for the glyph text, a 3-level HunyuanVideo 1.5 VAE (8 px per
    latent, time 4x, 4 channels), patch 1. Scaled down like the other tiny pipelines: ``max_length`` MLLM tokens
    (``tokenizer_max_length``, 1000 for the real model), 32 ByT5 tokens (256), ``image_tokens`` image-condition
    tokens (``vision_num_semantic_tokens``, 729); ``prompt_template_encode_start_idx``: the stand-in tokenizer's count
    of the template's head (the real 108 is the real Qwen tokenizer's)."""
    from diffusers import AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline
    from diffusers import HunyuanVideo15Transformer3DModel
    from diffusers.guiders import ClassifierFreeGuidance
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    torch.manual_seed(seed)
    tok = tiny_bpe_tokenizer()
    tok.chat_template = TINY_CHAT_TEMPLATE
    te = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        hidden_size=16, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
        rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}, rope_theta=1000000.0,
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=None))
    tok2 = ByT5Tokenizer()
    te2 = _tiny_t5(tok2)
    vae = AutoencoderKLHunyuanVideo15(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8),
                                      layers_per_block=1, spatial_compression_ratio=8, temporal_compression_ratio=4,
                                      downsample_match_channel=False, upsample_match_channel=False)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=num_layers,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=32,
        image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v",
    )
    pipe = HunyuanVideo15Pipeline(text_encoder=te, tokenizer=tok, transformer=transformer, vae=vae,
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=te2,
                                  tokenizer_2=tok2, guider=ClassifierFreeGuidance(guidance_scale=1.0))
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length, pipe.vision_num_semantic_tokens = max_length, 32, image_tokens
    marker = "\ue000"
    head = tok.apply_chat_template(format_text_input([marker], pipe.system_message)[0], add_generation_prompt=True,
                                   tokenize=False).split(marker)[0]
    pipe.prompt_template_encode_start_idx = len(tok(head, add_special_tokens=False)["input_ids"])
    return _eval(pipe if dtype == torch.float32 else pipe.to(dtype=dtype))
