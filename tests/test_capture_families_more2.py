"""AuraFlow and Lumina2 (and the families after them in seg4diff_fast/capture/README.md's table) captured
through the interception of their processors' attention call. Tiny random-weight transformers (configs scaled
down from the models' defaults, as diffusers' own tests do), CPU, float32.

Every case: the captured model's output equals the default processor's, and the maps equal the float64 oracle
(``reference_joint_attention``) applied to the q, k, v, mask and scale that the DEFAULT processor handed to SDPA
(a spy on ``F.scaled_dot_product_attention``; diffusers' native dispatcher backend calls it too), laid out by the
case's own ``oracle_layout`` (written with explicit per-sample slicing, independent of the adapters' code).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_capture import _triton_runs, max_rel  # noqa: E402
from test_capture_masked import sdpa_spy  # noqa: E402

from seg4diff_fast.capture import AttentionStore, register  # noqa: E402
from seg4diff_fast.reference import reference_joint_attention  # noqa: E402


def text_mask(lengths, total):
    """bool ``[B, total]``: the first ``lengths[b]`` tokens of sample b are valid."""
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]


def key_mask_of(mask, b, n):
    """``[B, N]`` bool from the key mask ``[B, 1, 1, N]`` SDPA was given (None: every key)."""
    if mask is None:
        return torch.ones(b, n, dtype=torch.bool)
    assert mask.dtype == torch.bool and mask.shape == (b, 1, 1, n), (mask.dtype, mask.shape)
    return mask.reshape(b, n)


def fixed_layout(text_at, text_len, n_gen):
    """Oracle layout of a sequence whose text block is the same for every sample: q, k, v as given, text
    ``text_len`` tokens at ``text_at``, the first ``n_gen`` image rows kept."""

    def layout(q, k, v, mask):
        b, _, n, _ = q.shape
        t0, t1 = (0, text_len) if text_at == "start" else (n - text_len, n)
        return q, k, v, key_mask_of(mask, b, n), t0, t1, n_gen

    return layout


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


def lumina2_layout(lengths, n_img):
    """Lumina2's sequence is, per sample, ``[c_b text, n_img image, padding]``: the oracle's is
    ``[c_b text, padding, image]`` (one text block ``[0, max c_b)``, its padded columns masked keys)."""

    def layout(q, k, v, mask):
        b, _, n, _ = q.shape
        keys = key_mask_of(mask, b, n)
        pieces = [(slice(0, c), slice(c + n_img, n), slice(c, c + n_img)) for c in lengths]
        order = torch.stack([torch.cat([torch.arange(n)[s] for s in p]) for p in pieces])  # [B, N]
        take = lambda t: torch.stack([t[i][:, order[i]] for i in range(b)])  # noqa: E731
        return take(q), take(k), take(v), torch.stack([keys[i, order[i]] for i in range(b)]), 0, max(lengths), n_img

    return layout


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


def framepack_layout(text_len, n_gen, n_hist):
    """FramePack's ``[history (n_hist), generated (n_gen), text]``: the oracle's is ``[generated, history, text]``,
    whose first n_gen image rows are the generated frames'."""

    def layout(q, k, v, mask):
        b, _, n, _ = q.shape
        order = torch.cat([torch.arange(n_hist, n_hist + n_gen), torch.arange(n_hist), torch.arange(n_hist + n_gen, n)])
        assert n == n_hist + n_gen + text_len
        return q[:, :, order], k[:, :, order], v[:, :, order], key_mask_of(mask, b, n)[:, order], n - text_len, n, n_gen

    return layout


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


def image_queries_layout(text_at, text_len):
    """Queries of the image only (``[B, H, N_img, D]``), keys of the joint sequence: the oracle's joint sequence
    puts random text queries at the text's place (an image row of the softmax does not depend on them)."""

    def layout(q, k, v, mask):
        b, h, n_img, d = q.shape
        assert k.shape[2] == n_img + text_len
        text_q = torch.randn(b, h, text_len, d, generator=torch.Generator().manual_seed(3), dtype=q.dtype)
        joint = torch.cat([text_q, q] if text_at == "start" else [q, text_q], dim=2)
        t0, t1 = (0, text_len) if text_at == "start" else (n_img, n_img + text_len)
        return joint, k, v, key_mask_of(mask, b, k.shape[2]), t0, t1, n_img

    return layout


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


# name -> (transformer, inputs, layer, oracle layout, expected grid)
CASES = {
    "auraflow_joint": (tiny_auraflow, auraflow_inputs, "joint_transformer_blocks.0", fixed_layout("start", 8 + 7, 15),
                       (5, 3)),
    "auraflow_single": (tiny_auraflow, lambda: auraflow_inputs(height=6, width=8), "single_transformer_blocks.0",
                        fixed_layout("start", 8 + 7, 12), (3, 4)),
    "lumina2_padded": (tiny_lumina2, lumina2_inputs, "layers.1", lumina2_layout((7, 4), 15), (5, 3)),
    "lumina2_padded_reversed": (tiny_lumina2, lambda: lumina2_inputs((3, 8)), "layers.0", lumina2_layout((3, 8), 15),
                                (5, 3)),
    "easyanimate_mmdit": (tiny_easyanimate, easyanimate_inputs, "transformer_blocks.0", fixed_layout("start", 9, 36),
                          (3, 4, 3)),
    "easyanimate_concat": (tiny_easyanimate, easyanimate_inputs, "transformer_blocks.1", fixed_layout("start", 9, 36),
                           (3, 4, 3)),
    "motif_video_double": (tiny_motif_video, motif_video_inputs, "transformer_blocks.0", fixed_layout("end", 7, 60),
                           (3, 4, 5)),
    "motif_video_single_i2v": (tiny_motif_video, lambda: motif_video_inputs(image=True), "single_transformer_blocks.1",
                               fixed_layout("end", 10, 60), (3, 4, 5)),
    "framepack_double": (tiny_framepack, framepack_inputs, "transformer_blocks.0", framepack_layout(10, 30, 23),
                         (2, 3, 5)),
    "framepack_single": (tiny_framepack, framepack_inputs, "single_transformer_blocks.0", framepack_layout(10, 30, 23),
                         (2, 3, 5)),
    # a batch of one: the forward cuts the prompt to its 5 valid tokens, no mask
    "framepack_batch1": (tiny_framepack, lambda: dict(framepack_inputs(batch=1), encoder_attention_mask=text_mask((5,), 7)),
                         "single_transformer_blocks.0", framepack_layout(3 + 5, 30, 23), (2, 3, 5)),
    "prx": (tiny_prx, prx_inputs, "blocks.1", image_queries_layout("start", 7), (5, 3)),
    "nucleusmoe_dense": (tiny_nucleusmoe, nucleusmoe_inputs, "transformer_blocks.0", image_queries_layout("end", 7), (5, 3)),
    "nucleusmoe_moe": (tiny_nucleusmoe, nucleusmoe_inputs, "transformer_blocks.1", image_queries_layout("end", 7), (5, 3)),
    # a batch of one: the processor attends to the 5 valid text tokens only
    "mochi": (tiny_mochi, mochi_inputs, "transformer_blocks.0", fixed_layout("end", 5, 36), (3, 4, 3)),
    "mochi_context_pre_only": (tiny_mochi, mochi_inputs, "transformer_blocks.1", fixed_layout("end", 5, 36), (3, 4, 3)),
    "lumina2_equal": (tiny_lumina2, lambda: lumina2_inputs((5, 5)), "layers.0", fixed_layout("start", 5, 15), (5, 3)),
}


@pytest.mark.parametrize(
    "case,backend",
    [(c, "torch") for c in sorted(CASES)]
    + [pytest.param(c, "triton", marks=pytest.mark.skipif(not _triton_runs(), reason="no CUDA, no TRITON_INTERPRET"))
       for c in ("auraflow_single", "lumina2_padded", "easyanimate_concat", "motif_video_single_i2v", "framepack_single", "prx",
                                 "nucleusmoe_moe", "mochi")],
)
def test_family_output_and_maps_equal_default_and_reference(case, backend):
    build, make_inputs, layer, layout, grid = CASES[case]
    transformer, inputs = build(), make_inputs()
    block = transformer.get_submodule(layer)
    attn = getattr(block, "attn", None) or getattr(block, "attention", None) or block.attn1
    with torch.no_grad(), sdpa_spy(attn) as ref:
        out_ref = transformer(**inputs).sample
    assert ref["calls"] == 1
    image_queries = ref["qkv"][0].shape[2] != ref["qkv"][1].shape[2]  # PRX, NucleusMoE: no text queries, no t2i
    kinds = ("i2t",) if image_queries else ("i2t", "t2i")
    store = AttentionStore(capture="i2t" if image_queries else "both", heads="all", map_dtype=torch.float32,
                           steps="all", batch="all", backend=backend)
    with register(transformer, [layer], store=store), torch.no_grad(), sdpa_spy(attn) as got:
        out = transformer(**inputs).sample
    assert "qkv" not in got  # the captured layer's attention ran once, in joint_attention
    q, k, v, key_mask, t0, t1, n_gen = layout(*ref["qkv"], ref["mask"])
    _, i2t, t2i = reference_joint_attention(q, k, v, t0, t1, capture="both", heads="all", key_mask=key_mask,
                                            scale=ref["scale"])
    expected = {"i2t": i2t[..., :n_gen, :], "t2i": t2i[..., :n_gen]}
    err_layer, err_model = max_rel(got["out"], ref["out"]), max_rel(out, out_ref)
    errors = {kind: (getattr(store, kind)[layer][0].double() - expected[kind]).abs().max().item() for kind in kinds}
    print(f"{case} ({backend}): layer output rel. err {err_layer:.1e}, model {err_model:.1e}; max abs err "
          + ", ".join(f"{kind} {e:.1e}" for kind, e in errors.items()))
    assert err_layer <= 1e-5 and err_model <= 1e-5
    assert store.grid[layer] == grid and store.i2t[layer].shape == (1,) + expected["i2t"].shape
    for kind in kinds:
        torch.testing.assert_close(getattr(store, kind)[layer][0].double(), expected[kind], atol=1e-6, rtol=1e-5)
    masked_columns = ~key_mask[:, t0:t1]  # [B, T]: padded text columns of the maps are 0
    assert (store.i2t[layer][0].permute(0, 3, 1, 2)[masked_columns] == 0).all()


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
