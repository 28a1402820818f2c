"""Families captured through the dispatcher interception (seg4diff_fast/capture/dispatch.py): the tiny
random-weight transformers of CogView4, CogView3-Plus, CogVideoX, ConsisID, HiDream, Qwen-Image, Ovis-Image and
LongCat-Image (configs like diffusers' own tests) and their inputs, the interception's own tests, and what register
refuses. The output and maps of every family against the default processor and the float64 oracle:
test_capture_family_records.py.
"""
from __future__ import annotations

import os
import sys
import threading

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import tiny_models as tm  # noqa: E402
from test_capture import spy  # noqa: E402

from seg4diff_fast.capture import AttentionStore, capture_attention, register  # noqa: E402


def tiny_cogview4():
    from diffusers import CogView4Transformer2DModel

    torch.manual_seed(0)
    return CogView4Transformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=4, out_channels=4,
        text_embed_dim=8, time_embed_dim=8, condition_dim=4,
    ).eval()


def cogview4_inputs(batch=2, height=10, width=6, text_len=7):
    g = torch.Generator().manual_seed(1)
    size = torch.tensor([height * 8, width * 8]).repeat(batch, 1)
    return dict(
        hidden_states=torch.randn(batch, 4, height, width, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, 8, generator=g),
        timestep=torch.tensor([500.0] * batch), original_size=size, target_size=size,
        crop_coords=torch.zeros(batch, 2),
    )


def tiny_cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=8, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8,
    ).eval()


def cogvideox_inputs(batch=2, frames=3, height=8, width=6):
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(batch, frames, 4, height, width, generator=g),
        encoder_hidden_states=torch.randn(batch, 8, 8, generator=g),  # max_text_seq_length tokens
        timestep=torch.tensor([500] * batch),
    )


def tiny_cogview3plus():
    from diffusers import CogView3PlusTransformer2DModel

    torch.manual_seed(0)
    return CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=2, out_channels=4,
        text_embed_dim=8, time_embed_dim=8, condition_dim=2, pos_embed_max_size=8, sample_size=8,
    ).eval()


def tiny_consisid():
    from diffusers import ConsisIDTransformer3DModel

    torch.manual_seed(0)
    return ConsisIDTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=8, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8, cross_attn_interval=1, is_kps=False,
        is_train_face=True, cross_attn_dim_head=1, cross_attn_num_heads=1, LFE_id_dim=2, LFE_vit_dim=2,
        LFE_depth=5, LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=1, LFE_num_querie=1, LFE_output_dim=10,
        LFE_ff_mult=1, LFE_num_scale=1,
    ).eval()


def consisid_inputs():
    return dict(cogvideox_inputs(), id_vit_hidden=[torch.ones(2, 2, 2)], id_cond=torch.ones(2, 2))


def tiny_hidream():
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(0)
    return HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2, num_activated_experts=2,
        axes_dims_rope=(4, 2, 2), max_resolution=(16, 16), llama_layers=(0, 1), force_inference_output=True,
    ).eval()


def hidream_inputs(batch=2, height=10, width=10, t5_len=7, llama_len=5):
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(batch, 4, height, width, generator=g),
        encoder_hidden_states_t5=torch.randn(batch, t5_len, 8, generator=g),
        encoder_hidden_states_llama3=torch.randn(2, batch, llama_len, 4, generator=g),  # [llama layers, B, L, D]
        pooled_embeds=torch.randn(batch, 8, generator=g),
        timesteps=torch.tensor([500] * batch),
    )


def tiny_qwenimage():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    ).eval()


def qwenimage_inputs(batch=2, shapes=((5, 3),), text_len=7):
    """Packed latents of the generated image then (Edit) the condition images; ``img_shapes`` as the pipelines
    pass it: per sample a list of ``(frames, h, w)``."""
    g = torch.Generator().manual_seed(1)
    n = sum(h * w for h, w in shapes)
    return dict(
        hidden_states=torch.randn(batch, n, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, 16, generator=g),
        timestep=torch.full((batch,), 0.5),
        img_shapes=[[(1, h, w) for h, w in shapes]] * batch,
    )


def tiny_flux_style(name):
    """Ovis-Image / LongCat-Image: Flux-style transformers (configs of diffusers' tests)."""
    import diffusers

    torch.manual_seed(0)
    extra = {"pooled_projection_dim": 32} if name == "LongCatImageTransformer2DModel" else {"out_channels": 4}
    return getattr(diffusers, name)(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 4, 8), **extra,
    ).eval()


def flux_style_inputs(guidance=False, **sizes):
    """``tm.flux_inputs(**sizes)`` (height, width, text_len) without pooled projections."""
    inputs = {k: v for k, v in tm.flux_inputs(**sizes).items() if k != "pooled_projections"}
    return dict(inputs, guidance=torch.full((2,), 3.5)) if guidance else inputs


def with_reference(inputs, column0, ref_h, ref_w, channels):
    """Kontext / Flux.2 editing: reference-image tokens appended after the generated image's, their ids with
    ``column0`` in column 0 (Kontext: 1, Flux.2: t = 10)."""
    g = torch.Generator().manual_seed(2)
    ref_ids = torch.zeros(ref_h, ref_w, inputs["img_ids"].shape[-1])
    ref_ids[..., 0] = column0
    ref_ids[..., 1] = torch.arange(ref_h)[:, None]
    ref_ids[..., 2] = torch.arange(ref_w)[None, :]
    batch = inputs["hidden_states"].shape[0]
    return dict(
        inputs,
        hidden_states=torch.cat([inputs["hidden_states"], torch.randn(batch, ref_h * ref_w, channels, generator=g)], 1),
        img_ids=torch.cat([inputs["img_ids"], ref_ids.reshape(-1, ref_ids.shape[-1])]),
    )


def test_interception_is_per_layer_per_model_and_patches_nothing_global():
    import diffusers.models.attention_dispatch as dispatch_module
    import diffusers.models.transformers.transformer_flux as flux_module

    a, b = tm.tiny_flux_transformer(), tm.tiny_flux_transformer(seed=1)
    inputs = tm.flux_inputs()
    with torch.no_grad():
        ref_b = b(**inputs).sample
    with capture_attention(a, ["transformer_blocks.0"], steps="all", map_dtype=torch.float32, backend="torch") as store:
        assert flux_module.dispatch_attention_fn is dispatch_module.dispatch_attention_fn
        outs = []
        with torch.no_grad():
            thread = threading.Thread(target=lambda: outs.append(b(**inputs).sample))  # another model, another thread
            thread.start()
            a(**inputs)
            thread.join()
            outs.append(b(**inputs).sample)  # the same class, this thread
    assert store.steps_seen == {"transformer_blocks.0": 1}  # b's forwards (either thread) were not recorded
    for out in outs:  # b ran its own attention (close, not equal: concurrent threads may split CPU reductions)
        torch.testing.assert_close(out, ref_b)
    assert type(a.transformer_blocks[0].attn.processor).__name__ == "FluxAttnProcessor"  # restored


def test_removed_capture_leaves_no_module_behind():
    """The capture class of a processor class (shared by its layers, and by other models that run it) and the module
    holding its globals live while a capture processor of it does."""
    import gc

    torch._dynamo.reset()  # compiled code of earlier tests holds their capture processors' classes
    gc.collect()
    transformer = tm.tiny_flux_transformer()
    handle = register(transformer, [0, 2], backend="torch")
    # the two layers (a double- and a single-stream block) run FluxAttnProcessor: one capture class, one module
    double, single = transformer.transformer_blocks[0], transformer.single_transformer_blocks[0]
    assert type(double.attn.processor) is type(single.attn.processor)
    module = type(double.attn.processor).__call__.__module__
    assert module.startswith("seg4diff_fast.capture.dispatch._capture") and module in sys.modules
    handle.remove()
    gc.collect()
    assert module not in sys.modules


class UnknownTransformer2DModel(torch.nn.Module):
    """A transformer class capture has no adapter for."""


def test_an_unknown_transformer_is_refused_naming_the_supported_ones():
    with pytest.raises(TypeError, match="does not know UnknownTransformer2DModel; supported transformers: .*Chroma"):
        register(UnknownTransformer2DModel(), [0])


def test_parallelism_is_refused():
    transformer = tm.tiny_flux_transformer()
    transformer._parallel_config = object()  # what enable_parallelism() records on the model
    with pytest.raises(ValueError, match="parallelism"):
        register(transformer, [0])
    assert type(transformer.transformer_blocks[0].attn.processor).__name__ == "FluxAttnProcessor"


def _cache_configs():
    from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

    return {
        "first_block_cache": FirstBlockCacheConfig(threshold=0.2),
        "taylorseer": TaylorSeerCacheConfig(),
        "pyramid_attention_broadcast": PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 500
        ),
    }


@pytest.mark.parametrize("name", ["first_block_cache", "taylorseer", "pyramid_attention_broadcast"])
def test_block_skipping_caches_are_refused(name):
    transformer = tm.tiny_flux_transformer()
    transformer.enable_cache(_cache_configs()[name])
    with pytest.raises(ValueError, match="hooks that may skip blocks or reuse"):
        register(transformer, [0])
    transformer.disable_cache()
    register(transformer, [0]).remove()  # without the cache: accepted


@pytest.mark.parametrize("steps", ["mean", "all", {0, 2}])
def test_store_records_the_timestep_of_every_kept_step(steps):
    transformer = tm.tiny_flux_transformer()
    with capture_attention(transformer, [0], steps=steps, backend="torch") as store, torch.no_grad():
        for t in (0.9, 0.6, 0.3):
            transformer(**dict(tm.flux_inputs(), timestep=torch.full((2,), t)))
    expected = {"mean": [0.9, 0.6, 0.3], "all": [0.9, 0.6, 0.3]}.get(steps if isinstance(steps, str) else "", [0.9, 0.3])
    assert store.timesteps["transformer_blocks.0"] == pytest.approx(expected)


def test_timesteps_survive_save_and_load(tmp_path):
    transformer = tm.tiny_flux_transformer()
    with capture_attention(transformer, [0], backend="torch") as store, torch.no_grad():
        transformer(**tm.flux_inputs())
    store.save(str(tmp_path / "maps.safetensors"))
    loaded = AttentionStore.load(str(tmp_path / "maps.safetensors"))
    assert loaded.timesteps == store.timesteps == {"transformer_blocks.0": [pytest.approx(0.5)]}


def test_torch_compile_adds_no_graph_break_for_an_sdpa_family():
    """The F module seen by CogView4's intercepted processor is a module of its own: dynamo traces through it."""
    from test_capture import _graph_breaks

    transformer, inputs = tiny_cogview4(), cogview4_inputs()
    with torch.no_grad():
        base, _ = _graph_breaks(transformer, inputs)
        with capture_attention(transformer, [0, 1], backend="torch"):
            with_capture, reasons = _graph_breaks(transformer, inputs)
    assert with_capture == base, reasons


def test_a_forward_that_is_not_a_step_runs_the_users_attention():
    """Under cache_context("uncond") (Flux's true-CFG pass) the captured layer calls diffusers' dispatcher with
    the user's backend (seen by the SDPA spy through the native backend) and records nothing."""
    transformer = tm.tiny_flux_transformer()
    inputs = tm.flux_inputs()
    attn = transformer.transformer_blocks[0].attn
    with torch.no_grad(), spy(attn) as ref:
        out_ref = transformer(**inputs).sample
    with capture_attention(transformer, [0], backend="torch") as store, torch.no_grad(), spy(attn) as got:
        with transformer.cache_context("uncond"):
            out = transformer(**inputs).sample
    assert "qkv" in got and not store.maps
    assert torch.equal(out, out_ref)


def test_a_processor_that_does_not_call_attention_itself_is_refused():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    from seg4diff_fast.capture import CaptureSite
    from seg4diff_fast.capture.dispatch import intercepting_processor

    class Indirect(FluxAttnProcessor):  # attention reached through the parent's __call__, not its own code
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    with pytest.raises(ValueError, match="'blocks.0' runs Indirect, whose __call__ calls neither dispatch_attention_fn"):
        intercepting_processor(Indirect(), CaptureSite(None, "blocks.0"), text_at="start")
