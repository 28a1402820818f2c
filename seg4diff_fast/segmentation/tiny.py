"""Tiny random-weight pipelines of every family, built offline (no download): a smoke test of the installation.

``seg4diff-fast segment --model tiny`` and the tests use these. What a family's tiny pipelines are is its record's
``segment.tiny`` (a :class:`~seg4diff_fast.capture.families.record.Tiny` per name, :func:`tiny_models`): the pipeline
class, the transformer config, the scheduler, the VAE, and the family's code for its text components; the one
builder that reads it, :func:`tiny_pipeline`, and the stand-ins the families share (tokenizers, text encoders, a
small VAE, chat templates) are here. The weights are random, so the masks they give mean nothing; what they check is
that every part runs: tokenizers with offsets, text encoders, VAE, transformer, capture, grids, upsampling and the
writers.

The tokenizers are real ``CLIPTokenizer`` / ``T5Tokenizer`` objects built from a small in-memory vocabulary:
a byte-level alphabet (every text tokenises) plus whole-word tokens for a few words (``TINY_WORDS``), so that
those words are one token and any other word is several, as in the real vocabularies; ``tiny_bpe_tokenizer`` is a
byte-level BPE standing in for the LLM tokenizers.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["TINY_WORDS", "TINY_CHAT_TEMPLATE", "TINY_MISTRAL_TEMPLATE", "tiny_clip_tokenizer", "tiny_t5_tokenizer",
           "tiny_bpe_tokenizer", "tiny_clip", "tiny_t5", "tiny_qwen25_vl", "tiny_pipeline", "tiny_models",
           "tiny_sd3_pipeline", "tiny_flux_pipeline"]

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


def tiny_t5(tok):
    """A tiny T5 encoder (2 layers, d_model 32) for ``tok``."""
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


def tiny_qwen25_vl(tok, num_layers: int):
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


#: a Qwen3-style chat template (one turn per message; the generation prompt with an empty think block)
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


#: a Mistral-3-style chat template (BOS, the system message, the user turn; message content a string or a list of
#: typed parts, as Flux2Pipeline's ``format_input`` builds them)
TINY_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set text = m['content'] if m['content'] is string else "
    "m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]{% else %}[INST]{{ text }}[/INST]"
    "{% endif %}{% endfor %}"
)


def tiny_models() -> Dict[str, Tuple[str, str, object]]:
    """``{name: (protocol key, family, Tiny)}``: every tiny pipeline the family records name (``segment.tiny``, a
    :class:`~seg4diff_fast.capture.families.record.Tiny`), in record order."""
    from ..capture.families import FAMILIES
    from ..capture.families.record import Tiny

    out: Dict[str, Tuple[str, str, object]] = {}
    for record in FAMILIES:
        seg = record.segment
        for name, spec in ({} if seg is None else seg.tiny).items():
            if name in out:
                raise RuntimeError(f"two family records name the tiny pipeline {name!r}")
            if not isinstance(spec, Tiny):
                raise RuntimeError(f"family record {record.family!r}: its tiny pipeline {name!r} is not a Tiny "
                                   f"(got {type(spec).__name__})")
            protocol = name if name in (record.family, *seg.variants) else record.family
            out[name] = (protocol, record.family, spec)
    return out


def tiny_pipeline(family: str = "sd3", seed: int = 0, dtype=torch.float32, max_length: Optional[int] = None,
                  **transformer):
    """The tiny pipeline ``family`` (a name of :func:`tiny_models`: ``"sd3"``, ``"sd3.5"``, ``"flux"``,
    ``"flux2-dev"``, ``"cogvideox1.5"``, ...), built from its family record's ``Tiny``: ``torch.manual_seed(seed)``,
    then, in the ``Tiny``'s order, its ``parts(max_length)`` (text encoders, tokenizers), its VAE and its transformer
    (the record's class, the ``Tiny`` config with ``transformer`` overrides: ``num_layers=1``, ``patch_size=1``;
    ``vae_blocks`` goes to the small VAE); then the pipeline, ``after(pipe, max_length)``; modules in eval mode, cast
    to ``dtype``.
    ``max_length``: the text length (tokenizers or the pipeline's padding; the record's default when None)."""
    import diffusers

    from ..capture.families import by_name
    from ..capture.families.record import resolve

    models = tiny_models()
    if family not in models:
        raise ValueError(f"tiny pipelines exist for {', '.join(map(repr, models))}, not {family!r}")
    _, name, spec = models[family]
    vae_blocks = transformer.pop("vae_blocks", None)
    if vae_blocks is not None and callable(spec.vae):
        raise ValueError(f"tiny pipeline {family!r} has a VAE of its own: vae_blocks does not apply")
    n = spec.max_length if max_length is None else max_length
    build = {
        "parts": lambda: spec.parts(n),
        "vae": lambda: spec.vae() if callable(spec.vae) else _tiny_vae(**spec.vae, **(
            {} if vae_blocks is None else {"blocks": vae_blocks})),
        "transformer": lambda: resolve(by_name[name].transformers[0])(**{**spec.transformer, **transformer}),
    }
    torch.manual_seed(seed)
    made = {step: build[step]() for step in spec.order}  # the order draws the random weights
    scheduler, config = spec.scheduler
    pipe = getattr(diffusers, spec.pipeline)(scheduler=getattr(diffusers, scheduler)(**config), vae=made["vae"],
                                             transformer=made["transformer"], **made["parts"])
    if spec.after is not None:
        spec.after(pipe, n)
    return _eval(pipe if dtype == torch.float32 else pipe.to(dtype=dtype))


def tiny_sd3_pipeline(sd35: bool = False, **options):
    """``tiny_pipeline("sd3.5" if sd35 else "sd3", **options)``: SD3 with CLIP-L/G stand-ins, no T5 (as the paper
    loads SD3), 4 px per image token (``patch_size=1, vae_blocks=1``: one image token per pixel)."""
    return tiny_pipeline("sd3.5" if sd35 else "sd3", **options)


def tiny_flux_pipeline(**options):
    """``tiny_pipeline("flux", **options)``: Flux.1 with CLIP (pooled) + T5 stand-ins, 4 px per image token (2 with
    ``vae_blocks=1``), no guidance embedding; call it with ``max_sequence_length=max_length``."""
    return tiny_pipeline("flux", **options)


def tiny_clip(tok, projection: bool = True, **config):
    """A tiny CLIP text encoder for ``tok`` (with the projection: ``CLIPTextModelWithProjection``)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(_clip_text_config(tok, projection, **config))
