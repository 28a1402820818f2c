"""HiDream-I1: ``HiDreamImageTransformer2DModel``, ``double_stream_blocks.{i}`` then ``single_stream_blocks.{j}``
(attention ``.block.attn1``, ``HiDreamAttnProcessor``, SDPA), ``[image, text]`` in both kinds of block. The text of
every block is ``[T5, Llama (last listed layer), Llama (this block's layer)]``: ``T5 + 2 * L`` tokens, the same in
every block. Non-square latents are padded to ``max_seq`` image tokens (their keys zeroed by the processor, as the
model does); the grid ``(H / p, W / p)`` keeps the real image's rows only.
"""
from __future__ import annotations

from .record import Family, Layers, MIDDLE, Segment, latent_grid

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


HIDREAM = Family(
    family="hidream", title="HiDream-I1", transformers=("diffusers.HiDreamImageTransformer2DModel",),
    processors=("diffusers.models.transformers.transformer_hidream_image.HiDreamAttnProcessor",),
    blocks=(Layers("double_stream_blocks.{i}.block.attn1"), Layers("single_stream_blocks.{i}.block.attn1", "single")),
    text_at="end", cfg_batched=True,  # HiDreamImagePipeline batches [uncond, cond] in one forward
    read=_read, grid_text="`(H/p, W/p)`",
    segment=Segment(pipelines=("HiDreamImagePipeline",), layer=MIDDLE, model_ids=("hidream",),
                    settings=dict(tokenizer="tokenizer_3", drop_t5=False, t5_tokens=128, generate_guidance_scale=5.0),
                    max_side=_max_side, schedule=_schedule, encode=_encode, forward=_forward,
                    generate_size_error=_generate_size_error,
                    tiny={"hidream": ("tiny_hidream_pipeline", {})}),
)
FAMILIES = (HIDREAM,)
