"""HiDream-I1: ``HiDreamImageTransformer2DModel``, ``double_stream_blocks.{i}`` then ``single_stream_blocks.{j}``
(attention ``.block.attn1``, ``HiDreamAttnProcessor``, SDPA), ``[image, text]`` in both kinds of block. The text of
every block is ``[T5, Llama (last listed layer), Llama (this block's layer)]``: ``T5 + 2 * L`` tokens, the same in
every block. Non-square latents are padded to ``max_seq`` image tokens (their keys zeroed by the processor, as the
model does); the grid ``(H / p, W / p)`` keeps the real image's rows only.
"""
from __future__ import annotations

from .record import Family, Layers, Segment, Tiny, latent_grid

__all__ = ["HIDREAM", "FAMILIES"]


def _read(transformer, bound: dict):
    hidden_states = bound["hidden_states"]  # [B, C, H, W] latent (pre-patchified input: refused below)
    if hidden_states.ndim != 4:
        raise ValueError(
            "capture on HiDream needs the latent as [B, C, H, W] (hidden_states), got a pre-patchified "
            f"{tuple(hidden_states.shape)}"
        )
    llama = bound["encoder_hidden_states_llama3"]  # [layers, B, L, D] (or a list of [B, L, D])
    text_len = bound["encoder_hidden_states_t5"].shape[1] + 2 * llama[0].shape[-2]
    return text_len, latent_grid(transformer, hidden_states), hidden_states.shape[0]


# segmentation (the record's Segment code): four text encoders (CLIP-L, CLIP-G pooled; T5; Llama 3.1 per-block hidden
# states); the columns read are the T5 part's (tokenizer_3), fixed length: the first max_sequence_length. Latent
# (z - shift) * scale (as SD3); flow-matching schedule shifted by calculate_shift(max_seq), the transformer's maximum
# token count, as its pipeline (not the image's).
def _max_side(pipe, patch):
    from ...segmentation.families import vae_scale

    return int(pipe.transformer.config.max_resolution[0]) * vae_scale(pipe)


def _schedule(pipe, sched, z, protocol):
    from diffusers.pipelines.hidream_image.pipeline_hidream_image import calculate_shift

    mu = calculate_shift(protocol.shift_seq_len or pipe.transformer.max_seq)
    sched.set_timesteps(protocol.num_inference_steps, device=z.device, mu=mu)
    return sched.timesteps


def _encode(pipe, prompts, protocol, device):
    t5, _, llama, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device=device, do_classifier_free_guidance=False,
                                                    max_sequence_length=protocol.t5_tokens)
    return dict(encoder_hidden_states_t5=t5, encoder_hidden_states_llama3=llama, pooled_embeds=pooled)


def _forward(pipe, lat, t, enc, protocol):
    B = lat.shape[0]
    return pipe.transformer(hidden_states=lat, timesteps=t.expand(B).to(lat.device), return_dict=False, **enc)


def _generate_size_error(pipe, height, width):
    area = (pipe.default_sample_size * pipe.vae_scale_factor) ** 2
    if height * width != area:  # its pipeline rescales every request to this area
        return (f"HiDream's pipeline generates {area} pixels (rescaling any other request): height x width must be "
                f"{area}")
    return None


# tiny pipeline (the record's Tiny code): CLIP-L / CLIP-G stand-ins (128 positions: the pipeline pads CLIP to 128),
# T5 and Llama (2 layers, hidden 16, eager attention: the pipeline asks for attentions) stand-ins, a 2-level VAE,
# patch 2
def _tiny_parts(max_length):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ...segmentation.tiny import tiny_bpe_tokenizer, tiny_clip, tiny_clip_tokenizer, tiny_t5, tiny_t5_tokenizer

    tok, tok2 = tiny_clip_tokenizer(model_max_length=128), tiny_clip_tokenizer(model_max_length=128)
    te = tiny_clip(tok, projection_dim=4, positions=128)
    te2 = tiny_clip(tok2, projection_dim=4, positions=128)
    tok3 = tiny_t5_tokenizer(model_max_length=128)
    te3 = tiny_t5(tok3)
    tok4 = tiny_bpe_tokenizer(model_max_length=128)
    te4 = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok4), hidden_size=16, intermediate_size=16,
                                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                       pad_token_id=tok4.pad_token_id, bos_token_id=None, eos_token_id=None,
                                       attn_implementation="eager"))
    return dict(text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=te3,
                tokenizer_3=tok3, text_encoder_4=te4, tokenizer_4=tok4)


def _tiny_after(pipe, max_length):
    pipe.default_sample_size = 16  # its pipeline generates (default_sample_size * vae_scale_factor)^2 pixels: 32^2


_TINY = Tiny(pipeline="HiDreamImagePipeline", parts=_tiny_parts, vae=dict(latent_channels=4), after=_tiny_after,
             transformer=dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2,
                              attention_head_dim=8, num_attention_heads=4, caption_channels=[32, 16], text_emb_dim=8,
                              num_routed_experts=2, num_activated_experts=2, axes_dims_rope=(4, 2, 2),
                              max_resolution=(32, 32), llama_layers=(0, 1, 0, 1), force_inference_output=True))


HIDREAM = Family(
    family="hidream", title="HiDream-I1", transformers=("diffusers.HiDreamImageTransformer2DModel",),
    processors=("diffusers.models.transformers.transformer_hidream_image.HiDreamAttnProcessor",),
    blocks=(Layers("double_stream_blocks.{i}.block.attn1"), Layers("single_stream_blocks.{i}.block.attn1", "single")),
    text_at="end", cfg_batched=True,  # HiDreamImagePipeline batches [uncond, cond] in one forward
    read=_read, grid_text="`(H/p, W/p)`",
    segment=Segment(pipelines=("HiDreamImagePipeline",), model_ids=("hidream",),
                    settings=dict(tokenizer="tokenizer_3", drop_t5=False, t5_tokens=128, generate_guidance_scale=5.0),
                    columns="T5 part (first 77 of 128)",
                    max_side=_max_side, schedule=_schedule, encode=_encode, forward=_forward,
                    generate_size_error=_generate_size_error,
                    tiny={"hidream": _TINY}),
)
FAMILIES = (HIDREAM,)
