"""AuraFlow, Lumina2, EasyAnimate, Motif-Video, HunyuanVideo FramePack, PRX, NucleusMoE-Image and Mochi: tiny
random-weight transformers (configs scaled down from the models' defaults, as diffusers' own tests do) and their
inputs, and what is special to these families (image-query families refuse t2i, Motif's decoder blocks, Mochi's
batch of one, ...). The output and maps of every family against the default processor and the float64 oracle:
test_capture_family_records.py.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_capture_masked import sdpa_spy  # noqa: E402

from seg4diff_fast.capture import AttentionStore, register  # noqa: E402


def text_mask(lengths, total):
    """bool ``[B, total]``: the first ``lengths[b]`` tokens of sample b are valid."""
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]


# ---------------------------------------------------------------------------------------------------- AuraFlow
def tiny_auraflow():
    from diffusers import AuraFlowTransformer2DModel

    torch.manual_seed(0)
    return AuraFlowTransformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, out_channels=4, pos_embed_max_size=64,
    ).eval()


def auraflow_inputs(batch=2, height=10, width=6, text_len=7):
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(batch, 4, height, width, generator=g),
                encoder_hidden_states=torch.randn(batch, text_len, 12, generator=g), timestep=torch.tensor([0.5] * batch))


# ---------------------------------------------------------------------------------------------------- Lumina2
LUMINA_TEXT = 9  # encoder_hidden_states tokens (the pipeline pads to max_length; valid tokens first)


def tiny_lumina2():
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(0)
    return Lumina2Transformer2DModel(  # 3 query heads, 1 key-value head: the processor repeats k, v
        sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_refiner_layers=1,
        num_attention_heads=3, num_kv_heads=1, multiple_of=4, axes_dim_rope=(4, 2, 2), axes_lens=(64, 64, 64),
        cap_feat_dim=8,
    ).eval()


def lumina2_inputs(lengths=(7, 4), height=10, width=6):
    g = torch.Generator().manual_seed(1)
    batch = len(lengths)
    return dict(hidden_states=torch.randn(batch, 4, height, width, generator=g),
                encoder_hidden_states=torch.randn(batch, LUMINA_TEXT, 8, generator=g),
                encoder_attention_mask=text_mask(lengths, LUMINA_TEXT), timestep=torch.tensor([0.5] * batch))


# ------------------------------------------------------------------------------------------------- EasyAnimate
def tiny_easyanimate():
    from diffusers import EasyAnimateTransformer3DModel

    torch.manual_seed(0)
    return EasyAnimateTransformer3DModel(  # block 0 MM-DiT (text projected apart), block 1 concatenates first
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=12, text_embed_dim_t5=10, num_layers=2, mmdit_layers=1, patch_size=2, sample_width=16,
        sample_height=16,
    ).eval()


def easyanimate_inputs(batch=2, frames=3, height=8, width=6):
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(batch, 4, frames, height, width, generator=g),
                encoder_hidden_states=torch.randn(batch, 5, 12, generator=g),
                encoder_hidden_states_t5=torch.randn(batch, 4, 10, generator=g), timestep=torch.tensor([500] * batch))


# ------------------------------------------------------------------------------------------------ Motif-Video
def tiny_motif_video(num_decoder_layers=0):
    from diffusers import MotifVideoTransformer3DModel

    torch.manual_seed(0)
    return MotifVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=2,
        num_decoder_layers=num_decoder_layers, patch_size=1, patch_size_t=1, text_embed_dim=16, image_embed_dim=12,
        rope_axes_dim=(2, 2, 4),
    ).eval()


def motif_video_inputs(image=False, frames=3, height=4, width=5, text_len=7):
    """Text ``[3 image_embeds tokens (image=True), 7 prompt tokens]``, the second sample's prompt padded to 4."""
    g = torch.Generator().manual_seed(1)
    extra = {"image_embeds": torch.randn(2, 3, 12, generator=g)} if image else {}
    return dict(hidden_states=torch.randn(2, 4, frames, height, width, generator=g),
                timestep=torch.tensor([500.0, 500.0]), encoder_hidden_states=torch.randn(2, text_len, 16, generator=g),
                encoder_attention_mask=text_mask((text_len, 4), text_len), **extra)


# ----------------------------------------------------------------------------------------- HunyuanVideo FramePack
def tiny_framepack():
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
        guidance_embeds=False, rope_axes_dim=(2, 2, 4), has_image_proj=True, image_proj_dim=12,
        has_clean_x_embedder=True,
    ).eval()


def framepack_inputs(batch=2):
    """Generated latent ``[B, 4, 2, 6, 10]`` (grid (2, 3, 5)); history: 1 clean frame (15 tokens), 2 frames at 2x
    (1 * 2 * 3 = 6 tokens), 4 frames at 4x (1 * 1 * 2 = 2 tokens); text ``[3 image tokens, 7 prompt tokens]``, the
    second sample's prompt padded to 4. (The forward needs all three histories: diffusers 0.42 fails without.)"""
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(batch, 4, 2, 6, 10, generator=g), timestep=torch.full((batch,), 500.0),
                  encoder_hidden_states=torch.randn(batch, 7, 16, generator=g),
                  encoder_attention_mask=text_mask((7, 4, 6)[:batch], 7), pooled_projections=torch.randn(batch, 8, generator=g),
                  image_embeds=torch.randn(batch, 3, 12, generator=g), indices_latents=torch.tensor([5, 6]))
    return dict(
        inputs, latents_clean=torch.randn(batch, 4, 1, 6, 10, generator=g), indices_latents_clean=torch.tensor([0]),
        latents_history_2x=torch.randn(batch, 4, 2, 6, 10, generator=g), indices_latents_history_2x=torch.tensor([1, 2]),
        latents_history_4x=torch.randn(batch, 4, 4, 6, 10, generator=g), indices_latents_history_4x=torch.tensor([1, 2, 3, 4]),
    )


# ----------------------------------------------------------------------------- image queries only: PRX, NucleusMoE
def tiny_prx():
    from diffusers import PRXTransformer2DModel

    torch.manual_seed(0)
    model = PRXTransformer2DModel(in_channels=4, patch_size=2, context_in_dim=12, hidden_size=32, mlp_ratio=2.0,
                                  num_heads=2, depth=2, axes_dim=[8, 8]).eval()
    with torch.no_grad():  # the modulations are zero-initialised (gates 0: attention would not reach the output)
        for block in model.blocks:
            block.modulation.lin.weight.normal_(0.0, 0.2)
    return model


def prx_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 4, 10, 6, generator=g), timestep=torch.tensor([0.5, 0.5]),
                encoder_hidden_states=torch.randn(2, 7, 12, generator=g), attention_mask=text_mask((7, 4), 7))


def tiny_nucleusmoe():
    from diffusers import NucleusMoEImageTransformer2DModel

    torch.manual_seed(0)
    model = NucleusMoEImageTransformer2DModel(  # 4 query heads, 2 key-value heads; block 1 a mixture of 2 experts
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
        num_key_value_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4), mlp_ratio=2.0,
        dense_moe_strategy="leave_first_block_dense", num_experts=2, moe_intermediate_dim=16, capacity_factors=1.0,
    ).eval()
    with torch.no_grad():  # the experts' weights are torch.empty (meant to be loaded): give them values
        for name, param in model.named_parameters():
            if name.endswith(("gate_up_proj", "down_proj")):
                param.normal_(0.0, 0.2)
    return model


def nucleusmoe_inputs(height=5, width=3, text_len=7):
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, height * width, 16, generator=g), img_shapes=[(1, height, width)] * 2,
                encoder_hidden_states=torch.randn(2, text_len, 16, generator=g),
                encoder_hidden_states_mask=text_mask((text_len, 4), text_len), timestep=torch.tensor([0.5, 0.5]))


# ------------------------------------------------------------------------------------------------------ Mochi
def tiny_mochi():
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(0)
    return MochiTransformer3DModel(  # block 1 is the last: context_pre_only
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=4, max_sequence_length=16,
    ).eval()


def mochi_inputs(lengths=(5,)):
    """Latent ``[B, 4, 3, 8, 6]`` (grid (3, 4, 3)), 7 text tokens of which the first ``lengths[b]`` are valid."""
    g = torch.Generator().manual_seed(1)
    batch = len(lengths)
    return dict(hidden_states=torch.randn(batch, 4, 3, 8, 6, generator=g),
                encoder_hidden_states=torch.randn(batch, 7, 16, generator=g), timestep=torch.full((batch,), 500.0),
                encoder_attention_mask=text_mask(lengths, 7))


@pytest.mark.parametrize("build,layer", [(tiny_prx, "blocks.0"), (tiny_nucleusmoe, "transformer_blocks.0")])
@pytest.mark.parametrize("kind", ["t2i", "both"])
def test_image_query_families_refuse_t2i(build, layer, kind):
    """PRX and NucleusMoE attend from the image tokens only: there is no text query, so no t2i map."""
    transformer = build()
    with pytest.raises(ValueError, match=f"'{layer}'.*image queries only.*capture='i2t'"):
        register(transformer, [layer], capture=kind)
    assert not type(transformer.get_submodule(layer).attn if hasattr(transformer.get_submodule(layer), "attn")
                    else transformer.get_submodule(layer).attention).__name__.startswith("Capture")


def test_lumina2_rows_not_kept_run_the_users_attention_in_the_models_order():
    """A store keeping one row: the other goes to the processor's own SDPA call, in the model's token order, with
    its row of the mask; the model's output is unchanged and the kept row's maps are the full batch's."""
    transformer, inputs = tiny_lumina2(), lumina2_inputs()
    with torch.no_grad():
        out_ref = transformer(**inputs).sample
    full = AttentionStore(capture="i2t", heads="all", map_dtype=torch.float32, batch="all", backend="torch")
    with register(transformer, ["layers.1"], store=full), torch.no_grad():
        transformer(**inputs)
    for row in (0, 1):
        store = AttentionStore(capture="i2t", heads="all", map_dtype=torch.float32, batch=(row,), backend="torch")
        with register(transformer, ["layers.1"], store=store), torch.no_grad():
            out = transformer(**inputs).sample
        torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(store.maps["layers.1"], full.maps["layers.1"][row:row + 1], atol=1e-6, rtol=1e-5)


def test_lumina2_refiner_blocks_are_refused_with_the_reason():
    transformer = tiny_lumina2()
    with pytest.raises(ValueError, match="'noise_refiner.0'.*image tokens only"):
        register(transformer, ["noise_refiner.0"])
    with pytest.raises(ValueError, match="'context_refiner.0'.*text tokens only"):
        register(transformer, ["context_refiner.0"])


def test_motif_video_decoder_blocks_are_refused_with_the_reason():
    transformer = tiny_motif_video(num_decoder_layers=1)
    with pytest.raises(ValueError, match="'single_transformer_blocks.1'.*decoder block.*not to the text"):
        register(transformer, ["single_transformer_blocks.1"])
    register(transformer, ["single_transformer_blocks.0"]).remove()


def capture_i2t(transformer, layer, batch):
    from seg4diff_fast.capture import capture_attention

    return capture_attention(transformer, [layer], capture="i2t", heads="all", map_dtype=torch.float32, batch=batch,
                             backend="torch")


def test_image_query_family_forwards_not_recorded_run_the_users_attention():
    """NucleusMoE (image queries, [B, N] key mask): a forward that is not a step calls the dispatcher as the
    processor does (image queries only, the spy sees them) and records nothing; a store keeping one row gives the
    other to the user's attention with its row of the mask; the output is the model's either way."""
    transformer, inputs = tiny_nucleusmoe(), nucleusmoe_inputs()
    attn = transformer.transformer_blocks[1].attn
    with torch.no_grad():
        out_ref = transformer(**inputs).sample
    with capture_i2t(transformer, "transformer_blocks.1", batch="cond") as store, torch.no_grad(), sdpa_spy(attn) as got:
        with transformer.cache_context("uncond"):
            out = transformer(**inputs).sample
    assert not store.maps and got["qkv"][0].shape[2] == 15 and torch.equal(out, out_ref)
    with capture_i2t(transformer, "transformer_blocks.1", batch="all") as full_store, torch.no_grad():
        transformer(**inputs)
    for row in (0, 1):
        with capture_i2t(transformer, "transformer_blocks.1", batch=(row,)) as store, torch.no_grad():
            out = transformer(**inputs).sample
        torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(store.maps["transformer_blocks.1"], full_store.maps["transformer_blocks.1"][row:row + 1])


def test_mochi_batch_of_more_than_one_is_refused_before_the_forward():
    """Mochi's processor attends once per sample: capture serves a batch of one and says so for more."""
    transformer = tiny_mochi()
    with register(transformer, [0], backend="torch") as handle, torch.no_grad():
        with pytest.raises(ValueError, match="Mochi needs a transformer batch of one, got 2.*once per sample"):
            transformer(**mochi_inputs((7, 4)))
    assert not handle.store.maps
