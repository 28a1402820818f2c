"""More capture families (seg4diff_fast/capture/families/): Bria, Bria FIBO, Flux.3, Krea 2, ERNIE-Image, GLM-Image,
JoyImage, JoyImage Edit Plus, Z-Image. Tiny random-weight transformers (configs scaled down from the models'
defaults, as diffusers' own tests do) and their inputs, and what is special to these families (refused layers, GLM's
text mask and KV cache, Z-Image's and JoyImage Edit Plus's refusals, compiled key masks). The output and maps of
every family against the default processor and the float64 oracle: test_capture_family_records.py.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import tiny_models as tm  # noqa: E402
from test_capture_masked import text_mask  # noqa: E402

from seg4diff_fast.capture import capture_attention, register  # noqa: E402


def _randomise_zero_inits(model, std=0.2):
    """Some models zero-initialise their modulation / output layers (the output would be 0 whatever the
    attention computes): random values there, so that the model output tests the captured attention."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def _g(seed=1):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- Bria, FIBO
def tiny_bria():
    from diffusers import BriaTransformer2DModel

    torch.manual_seed(0)
    return BriaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=[4, 4, 8],
    ).eval()


def bria_inputs(**sizes):
    """``tm.flux_inputs(**sizes)`` (default 5 x 6 image, 7 text tokens) without pooled projections."""
    return {k: v for k, v in tm.flux_inputs(**sizes).items() if k != "pooled_projections"}


def tiny_bria_fibo():
    from diffusers import BriaFiboTransformer2DModel

    torch.manual_seed(0)
    return BriaFiboTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=[4, 4, 8], text_encoder_dim=8,
    ).eval()


def bria_fibo_inputs(height=5, width=6, text_len=7, blocks=2):
    """BriaFiboPipeline's key mask: ``joint_attention_kwargs["attention_mask"]`` ``[B, 1, 1, T + N_img]`` bool (the
    second sample's text padded after 4 tokens); ``text_encoder_layers``: one per block."""
    inputs = bria_inputs(height=height, width=width, text_len=text_len)
    layers = [torch.randn(2, text_len, 8, generator=_g(2)) for _ in range(blocks)]
    mask = torch.cat([text_mask((text_len, 4), text_len), torch.ones(2, height * width, dtype=torch.bool)], 1)
    mask = mask[:, None, None, :]
    return dict(inputs, text_encoder_layers=layers, joint_attention_kwargs={"attention_mask": mask})


# ---------------------------------------------------------------------------------------------- Flux.3
def tiny_flux3():
    from diffusers import Flux3Transformer2DModel

    torch.manual_seed(0)
    return Flux3Transformer2DModel(
        in_channels=4, cond_in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, timestep_channels=32, axes_dims_rope=(4, 4, 4, 4),
    ).eval()


def flux3_inputs(reference=False, **sizes):
    """4 x 5 generated image, 6 text tokens (``sizes``: ``tm.flux2_inputs``'s height, width, text_len); with
    ``reference``: a 3 x 3 reference image (ids t = 10)."""
    inputs = {k: v for k, v in tm.flux2_inputs(**sizes).items() if k != "guidance"}
    if reference:
        ref_ids = tm._ids(3, 3, 4)
        ref_ids[:, 0] = 10
        inputs.update(image_cond_hidden_states=torch.randn(2, 9, 4, generator=_g(2)), image_cond_ids=ref_ids)
    return inputs


# ---------------------------------------------------------------------------------------------- Krea 2
def tiny_krea2():
    from diffusers import Krea2Transformer2DModel

    torch.manual_seed(0)
    return _randomise_zero_inits(Krea2Transformer2DModel(
        in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, timestep_embed_dim=16, text_hidden_dim=16, num_text_layers=2,
        text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=32,
        num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6),
    ))


def krea2_inputs(height=5, width=3, text_len=7):
    from diffusers.pipelines.krea2.pipeline_krea2 import Krea2Pipeline

    g = _g()
    return dict(
        hidden_states=torch.randn(2, height * width, 4, generator=g),
        encoder_hidden_states=torch.randn(2, text_len, 2, 16, generator=g), timestep=torch.full((2,), 0.5),
        position_ids=Krea2Pipeline.prepare_position_ids(text_len, height, width, "cpu"),
        encoder_attention_mask=text_mask((text_len, 4), text_len),
    )


# ---------------------------------------------------------------------------------------------- ERNIE-Image
def tiny_ernie_image():
    from diffusers import ErnieImageTransformer2DModel

    torch.manual_seed(0)
    return _randomise_zero_inits(ErnieImageTransformer2DModel(
        hidden_size=32, num_attention_heads=2, num_layers=2, ffn_hidden_size=64, in_channels=4, out_channels=4,
        patch_size=1, text_in_dim=16, rope_axes_dim=(4, 6, 6),
    ))


def ernie_image_inputs(height=5, width=3, text_len=7):
    g = _g()
    return dict(hidden_states=torch.randn(2, 4, height, width, generator=g), timestep=torch.full((2,), 500.0),
                text_bth=torch.randn(2, text_len, 16, generator=g), text_lens=torch.tensor([text_len, 4]))


# ---------------------------------------------------------------------------------------------- GLM-Image
def tiny_glm_image():
    from diffusers import GlmImageTransformer2DModel

    torch.manual_seed(0)
    return GlmImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=8, time_embed_dim=8, condition_dim=4, prior_vq_quantizer_codebook_size=16,
    ).eval()


def glm_image_inputs(batch=2, height=10, width=6, text_len=7):
    g = _g()
    n = (height // 2) * (width // 2)
    return dict(
        hidden_states=torch.randn(batch, 4, height, width, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, 8, generator=g),
        prior_token_id=torch.randint(0, 16, (batch, n), generator=g), prior_token_drop=torch.zeros(batch, n, dtype=torch.bool),
        timestep=torch.full((batch,), 500.0), target_size=torch.tensor([[height * 8, width * 8]] * batch).float(),
        crop_coords=torch.zeros(batch, 2),
    )


# ---------------------------------------------------------------------------------------------- JoyImage
def tiny_joyimage(name="JoyImageEditTransformer3DModel"):
    import diffusers

    torch.manual_seed(0)
    return getattr(diffusers, name)(
        patch_size=[1, 2, 2], in_channels=4, hidden_size=32, num_attention_heads=2, text_dim=16, num_layers=2,
        rope_dim_list=[4, 6, 6],
    ).eval()


def joyimage_inputs(items=0, height=10, width=6, text_len=7):
    """A 10 x 6 latent (grid 5 x 3); ``items`` > 0: ``[B, items, C, 1, H, W]``, the generated image last."""
    g = _g()
    shape = (2, 4, 1, height, width) if not items else (2, items, 4, 1, height, width)
    return dict(hidden_states=torch.randn(*shape, generator=g), timestep=torch.full((2,), 500.0),
                encoder_hidden_states=torch.randn(2, text_len, 16, generator=g))


def joyimage_edit_plus_inputs(height=5, width=3, text_len=7):
    """Patches ``[B, 15 + 12, C, 1, 2, 2]``: the generated 5 x 3 (``height x width``) image, then a 3 x 4 (sample 0)
    or 2 x 3 (sample 1, then 6 padding patches) reference; text lengths 7 (``text_len``) and 4."""
    g = _g()
    n = height * width + 12
    return dict(hidden_states=torch.randn(2, n, 4, 1, 2, 2, generator=g), timestep=torch.full((2,), 500.0),
                encoder_hidden_states=torch.randn(2, text_len, 16, generator=g),
                encoder_hidden_states_mask=text_mask((text_len, 4), text_len).float(),
                shape_list=[[(1, height, width), (1, 3, 4)], [(1, height, width), (1, 2, 3)]])


# ---------------------------------------------------------------------------------------------- Z-Image
def tiny_z_image():
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    return _randomise_zero_inits(ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[256, 32, 32],
    ))


def z_image_inputs(caption_lengths=(7, 40), sizes=((10, 6), (10, 6))):
    """A list of latents ``[C, 1, H, W]`` (10 x 6: 15 image tokens, padded to 32) and captions ``[L, D]`` (7 and 40
    tokens: padded to 32 and 64, so the first sample's caption tail is masked)."""
    g = _g()
    return dict(x=[torch.randn(4, 1, h, w, generator=g) for h, w in sizes], t=torch.full((2,), 0.5),
                cap_feats=[torch.randn(n, 16, generator=g) for n in caption_lengths])


# name -> (transformer, inputs, layer, its attention module's path, text at, text block length, grid, image rows kept)
# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("build,layer,match", [
    (tiny_flux3, "txt_mode_blocks.0", "per-mode block of Flux.3"),
    (tiny_flux3, "mode_blocks.image.0", "per-mode block of Flux.3"),
    (tiny_z_image, "noise_refiner.0", "image tokens only"),
    (tiny_z_image, "context_refiner.0", "caption tokens only"),
])
def test_layers_without_text_image_attention_are_refused(build, layer, match):
    with pytest.raises(ValueError, match=f"layer {layer!r}: .*{match}"):
        register(build(), [layer])


def test_glm_image_text_mask_is_reproduced_exactly():
    """GLM-Image's processor turns a text mask into the float 0 / 1 outer product that SDPA ADDS to the scores (as
    CogView4's and ChromaPipeline's): captured as the key bias of the image queries, the padding text queries
    recomputed without bias. Model output equals the default processor's, i2t the float64 oracle."""
    from test_capture_masked import check_float_outer_product_mask

    check_float_outer_product_mask("glm_image", tiny_glm_image(), glm_image_inputs(), text_mask().float(), 7)


def test_glm_image_kv_cache_writes_are_not_steps_and_reads_are_refused():
    """Image-to-image: the forward that writes a condition image's keys into the KV cache (no text) is not a step
    and runs the layer's own attention; the denoising forward that reads them is refused before any block runs.
    The unconditional forward (mode "skip") is captured."""
    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

    transformer = tiny_glm_image()
    caches = GlmImageKVCache(num_layers=2)
    condition = dict(glm_image_inputs(batch=1, text_len=0), kv_caches=caches)
    with torch.no_grad():
        caches.set_mode("write")
        out_ref = transformer(**condition).sample
        caches.clear()
    with capture_attention(transformer, [1], backend="torch") as store, torch.no_grad():
        caches.set_mode("write")
        out = transformer(**condition).sample
        assert torch.equal(out, out_ref) and not store.steps_seen
        caches.set_mode("read")
        with pytest.raises(ValueError, match="reads the KV cache of condition images"):
            transformer(**glm_image_inputs(), kv_caches=caches)
        caches.set_mode("skip")
        transformer(**glm_image_inputs(), kv_caches=caches)
    assert store.steps_seen == {"transformer_blocks.1": 1}


def test_z_image_refuses_omni_mode_and_mixed_sizes():
    transformer = tiny_z_image()
    with capture_attention(transformer, [0], backend="torch"), torch.no_grad():
        with pytest.raises(ValueError, match="different sizes"):
            transformer(**z_image_inputs(sizes=((10, 6), (6, 10))))
        inputs = z_image_inputs()
        with pytest.raises(ValueError, match="omni mode"):
            transformer(x=[[x] for x in inputs["x"]], t=inputs["t"], cap_feats=[[c] for c in inputs["cap_feats"]])


def test_joyimage_edit_plus_refuses_generated_images_of_different_grids():
    transformer = tiny_joyimage("JoyImageEditPlusTransformer3DModel")
    inputs = dict(joyimage_edit_plus_inputs(), shape_list=[[(1, 5, 3), (1, 3, 4)], [(1, 3, 5), (1, 2, 3)]])
    with capture_attention(transformer, [0], backend="torch"), torch.no_grad():
        with pytest.raises(ValueError, match="different grids"):
            transformer(**inputs)


def test_z_image_timestep_is_recorded():
    """Z-Image's forward calls its timestep ``t``."""
    transformer = tiny_z_image()
    with capture_attention(transformer, [0], steps="all", backend="torch") as store, torch.no_grad():
        for t in (0.25, 0.75):
            transformer(**dict(z_image_inputs(), t=torch.full((2,), t)))
    assert store.timesteps["layers.0"] == [pytest.approx(0.25), pytest.approx(0.75)]


@pytest.mark.parametrize("build,make_inputs,layer", [(tiny_krea2, krea2_inputs, "transformer_blocks.1"),
                                                     (tiny_ernie_image, ernie_image_inputs, "layers.1")])
def test_torch_compile_keeps_one_graph_with_a_key_mask(build, make_inputs, layer):
    """Krea 2's grid crosses the record op as position ids, ERNIE-Image's mask is built in its forward: fullgraph
    (no graph break), no recompilation on the second call, the eager maps. One graph: the capture's forward
    pre-hook, a frame of its own under ``torch.compile(transformer)``, runs eagerly (it compiled a graph of its own
    for Krea 2, whose grid it reads from position ids)."""
    from torch._dynamo.utils import counters

    transformer, inputs = build(), make_inputs()
    options = dict(capture="both", heads="all", steps="all", map_dtype=torch.float32, backend="torch")
    with capture_attention(transformer, [layer], **options) as eager, torch.no_grad():
        transformer(**inputs)
    torch._dynamo.reset()
    counters.clear()
    with capture_attention(transformer, [layer], **options) as store, torch.no_grad():
        compiled = torch.compile(transformer, backend="aot_eager", fullgraph=True)
        compiled(**inputs)
        graphs = counters["stats"]["unique_graphs"]
        compiled(**inputs)
    assert counters["stats"]["unique_graphs"] == graphs == 1
    assert store.grid[layer] == eager.grid[layer]
    for kind in ("i2t", "t2i"):
        torch.testing.assert_close(getattr(store, kind)[layer], getattr(eager, kind)[layer].expand(2, -1, -1, -1, -1))
