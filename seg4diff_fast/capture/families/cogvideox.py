"""CogVideoX (1.0 and 1.5) and ConsisID (``ConsisIDTransformer3DModel``, the same blocks and processor):
``CogVideoXTransformer3DModel``, ``transformer_blocks.{i}.attn1`` with ``CogVideoXAttnProcessor2_0`` (SDPA),
``[text, video]``. Grid ``(frames, H / p, W / p)`` of the latent ``[B, F, C, H, W]``, ``frames = ceil(F / p_t)``
with CogVideoX 1.5's temporal patch ``p_t`` (tokens are frame-major, then row-major).
"""
from __future__ import annotations

from dataclasses import replace

from .record import Family, Layers, Segment, Tiny

__all__ = ["COGVIDEOX", "CONSISID", "FAMILIES", "t5_encode", "tiny_t5_parts", "DDIM_V"]


def _read(transformer, bound: dict):
    hidden_states = bound["hidden_states"]  # [B, F, C, H, W] latent video
    p, p_t = transformer.config.patch_size, getattr(transformer.config, "patch_size_t", None)
    frames = hidden_states.shape[1] if p_t is None else -(-hidden_states.shape[1] // p_t)
    grid = (frames, hidden_states.shape[-2] // p, hidden_states.shape[-1] // p)
    return bound["encoder_hidden_states"].shape[1], grid, hidden_states.shape[0]


# segmentation (the record's Segment code): T5 text (t5_tokens = 226, padded; the first max_sequence_length columns
# are read), a 3D VAE that compresses time 4x (F = 1 + 4k input frames -> 1 + k latent frames: latent frame 0 is
# input frame 0, latent frame j >= 1 covers input frames 4j - 3 .. 4j), latents [1, F', C, h, w] times
# scaling_factor; DDPM-style v-prediction schedule (CogVideoX's DDIM/DPM scheduler): add_noise at
# timesteps[timestep_index]; RoPE from the pipeline's own helper when the transformer uses it.
# CogVideoX 1.5 (patch_size_t = 2): the patch embedding groups latent frames in pairs, so token frame u holds latent
# frames 2u, 2u + 1 and F' must be even. OUR padding: the input is padded with copies of its last frame up to the
# first count whose F' is a multiple of p_t (13 frames for 6: F' = 4); its pipeline instead generates extra latent
# frames at the start and drops them (not possible for a given video).
def t5_encode(pipe, prompts, protocol, device):
    """CogVideoX's (and CogView3-Plus's) prompt encoding: T5 padded to ``t5_tokens``."""
    pe, _ = pipe.encode_prompt(prompt=prompts, do_classifier_free_guidance=False, device=device,
                               max_sequence_length=protocol.t5_tokens)
    return dict(encoder_hidden_states=pe)


def _forward(pipe, lat, t, enc, protocol):
    from ...segmentation.families import vae_scale

    tf = pipe.transformer
    B, F, _, h, w = lat.shape
    vs = vae_scale(pipe)
    rope = None
    if tf.config.use_rotary_positional_embeddings:
        rope = pipe._prepare_rotary_positional_embeddings(h * vs, w * vs, F, lat.device)
    return tf(hidden_states=lat, timestep=t.expand(B).to(lat.device), image_rotary_emb=rope, return_dict=False,
              **enc)


# tiny pipeline (the record's Tiny code): T5 stand-in, a 3D VAE that compresses time 4x and space 4x, patch 2 (8 px
# per token), DDIM v-prediction scheduler, 3D RoPE as CogVideoX-5b (use_rotary_positional_embeddings=False: learned
# positions as 2b). CogVideoX 1.5: temporal patches of 2 latent frames, no patch bias.
def tiny_t5_parts(max_length):
    """One T5 stand-in, its tokenizer ``max_length`` long (CogVideoX 226, CogView3-Plus 224, Chroma 512)."""
    from ...segmentation.tiny import tiny_t5, tiny_t5_tokenizer

    tok = tiny_t5_tokenizer(model_max_length=max_length)
    return dict(tokenizer=tok, text_encoder=tiny_t5(tok))


def _tiny_vae():
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 8, 8), latent_channels=4, layers_per_block=1,
        norm_num_groups=2, temporal_compression_ratio=4,
    )


DDIM_V = ("CogVideoXDDIMScheduler", dict(prediction_type="v_prediction", snr_shift_scale=1.0))
_TINY = Tiny(pipeline="CogVideoXPipeline", parts=tiny_t5_parts, max_length=226, vae=_tiny_vae, scheduler=DDIM_V,
             order=("parts", "vae", "transformer"),
             transformer=dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                              time_embed_dim=2, text_embed_dim=32, num_layers=2, sample_width=16, sample_height=16,
                              sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=226,
                              use_rotary_positional_embeddings=True, patch_size_t=None, patch_bias=True))


COGVIDEOX = Family(
    family="cogvideox", title="CogVideoX 1.0 / 1.5", transformers=("diffusers.CogVideoXTransformer3DModel",),
    processors=("diffusers.models.attention_processor.CogVideoXAttnProcessor2_0",),
    blocks=(Layers("transformer_blocks.{i}.attn1"),), text_at="start",
    cfg_batched=True,  # CogVideoXPipeline batches [uncond, cond] in one forward
    read=_read, grid_text="`(frames, H/p, W/p)`", video=True,
    segment=Segment(pipelines=("CogVideoXPipeline", "CogVideoXVideoToVideoPipeline"), model_ids=("cogvideox",),
                    settings=dict(num_inference_steps=50, size=480, resize="square", t5_tokens=226,
                                  generate_guidance_scale=6.0),
                    columns="T5 (first 77 of 226)",
                    latents="video", noise="ddpm", encode=t5_encode, forward=_forward, generate_tokens=256,
                    tiny={"cogvideox": _TINY, "cogvideox1.5": _TINY.but(patch_size_t=2, patch_bias=False)}),
)
CONSISID = replace(COGVIDEOX, family="consisid", title="ConsisID",
                   transformers=("diffusers.ConsisIDTransformer3DModel",), segment=None)
FAMILIES = (COGVIDEOX, CONSISID)
