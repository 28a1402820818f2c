"""Families whose processors pass attention masks: Qwen-Image (``encoder_hidden_states_mask``), HunyuanImage,
HunyuanVideo (key masks ``[B, 1, 1, N]`` built in forward), HunyuanVideo 1.5 and Chroma (the outer product
``m_i & m_j`` ``[B, 1, N, N]`` of a token mask). Tiny random-weight transformers (configs scaled down from the
models' defaults, as diffusers' own tests do), CPU, torch backend, float32, a batch whose samples have different
text lengths.

The spy on ``F.scaled_dot_product_attention`` (:func:`sdpa_spy`) and the oracle's masks (:func:`oracle_masks`) that
test_capture_family_records.py checks every family with (these families' cases are there), and what is special to
masks: rows not kept, Chroma's and CogView4's float outer products, refused masks, additive key masks, compiled
key masks.
"""
from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import test_capture_families as fam  # noqa: E402
import tiny_models as tm  # noqa: E402
from test_capture import _triton_runs, max_rel  # noqa: E402

from seg4diff_fast.capture import AttentionStore, capture_attention, register  # noqa: E402
from seg4diff_fast.reference import reference_joint_attention  # noqa: E402

LENGTHS = (7, 4)  # valid text tokens of the two samples (the second is padded)


def text_mask(lengths=LENGTHS, total=7):
    """bool ``[B, total]``: the first ``lengths[b]`` tokens of sample b are valid."""
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]


def tiny_hunyuanimage():
    import diffusers

    torch.manual_seed(0)
    return diffusers.HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=16, rope_axes_dim=(4, 4),
    ).eval()


def hunyuanimage_inputs(height=5, width=3, text_len=7):
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 4, height, width, generator=g), timestep=torch.tensor([500.0, 500.0]),
                encoder_hidden_states=torch.randn(2, text_len, 16, generator=g),
                encoder_attention_mask=text_mask((text_len, 4), text_len))


def tiny_hunyuanvideo():
    import diffusers

    torch.manual_seed(0)
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
        guidance_embeds=False, rope_axes_dim=(2, 2, 4),
    ).eval()


def hunyuanvideo_inputs(batch=2, seed=1, timestep=500.0, frames=3, height=4, width=5, text_len=7):
    g = torch.Generator().manual_seed(seed)
    lengths = ((text_len,) + LENGTHS[1:] + (2,))[:batch]  # batch <= 3
    return dict(hidden_states=torch.randn(batch, 4, frames, height, width, generator=g),
                timestep=torch.full((batch,), timestep),
                encoder_hidden_states=torch.randn(batch, text_len, 16, generator=g),
                encoder_attention_mask=text_mask(lengths, text_len),
                pooled_projections=torch.randn(batch, 8, generator=g))


def tiny_hunyuanvideo15():
    import diffusers

    torch.manual_seed(0)
    return diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2, num_refiner_layers=1,
        patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12,
        rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v",
    ).eval()


def hunyuanvideo15_inputs(frames=3, height=4, width=5, text_len=7):
    """Text block ``[5 image-condition tokens (zero: text-to-video, masked), 3 ByT5, 7 MLLM]``."""
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 4, frames, height, width, generator=g),
                timestep=torch.tensor([500.0, 500.0]), encoder_hidden_states=torch.randn(2, text_len, 16, generator=g),
                encoder_attention_mask=text_mask((text_len, 4), text_len),
                encoder_hidden_states_2=torch.randn(2, 3, 8, generator=g),
                encoder_attention_mask_2=text_mask((2, 3), 3), image_embeds=torch.zeros(2, 5, 12))


def tiny_chroma():
    import diffusers

    torch.manual_seed(0)
    return diffusers.ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1,
    ).eval()


def chroma_inputs(dtype=torch.bool, height=5, width=6, text_len=7):
    """Flux-style inputs; ``attention_mask`` ``[B, T + N_img]``: the text mask, then the image tokens (all valid)."""
    inputs = {k: v for k, v in tm.flux_inputs(height=height, width=width, text_len=text_len).items()
              if k != "pooled_projections"}
    mask = torch.cat([text_mask((text_len, 4), text_len), torch.ones(2, height * width, dtype=torch.bool)], dim=1)
    return dict(inputs, attention_mask=mask.to(dtype))


def qwenimage_inputs():
    return dict(fam.qwenimage_inputs(), encoder_hidden_states_mask=text_mask())


# name -> (transformer, inputs, layer, text at, text length, expected grid)
@contextlib.contextmanager
def sdpa_spy(attn_module):
    """What the attention module's processor gives SDPA (``q, k, v`` ``[B, H, N, D]``, ``attn_mask``, ``scale``: the
    last call's; ``calls``: how many), and the module's output."""
    seen = {}
    active = [False]
    sdpa = F.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, scale=None, **kwargs):
        if active[0]:
            seen.update(qkv=tuple(t.detach().clone() for t in (query, key, value)), mask=attn_mask, scale=scale,
                        calls=seen.get("calls", 0) + 1)
        return sdpa(query, key, value, attn_mask=attn_mask, scale=scale, **kwargs)

    def post(mod, args, out):
        active[0] = False
        seen["out"] = tuple(o.detach().clone() for o in out) if isinstance(out, tuple) else out.detach().clone()

    hooks = [attn_module.register_forward_pre_hook(lambda *a: active.__setitem__(0, True)),
             attn_module.register_forward_hook(post)]
    F.scaled_dot_product_attention = recording
    try:
        yield seen
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()


def oracle_masks(mask: torch.Tensor, b: int, n: int):
    """From the mask SDPA was given: ``(key_mask [B, N], query_mask [B, N])``, checked to be a key mask
    ``[B, 1, 1, N]`` or the outer product of one token mask ``[B, 1, N, N]``."""
    assert mask.dtype == torch.bool and mask.shape[:2] == (b, 1), mask.shape
    if mask.shape[2] == 1:
        return mask.reshape(b, n), torch.ones(b, n, dtype=torch.bool)
    diagonal = mask[:, 0].diagonal(dim1=-2, dim2=-1)
    assert torch.equal(mask[:, 0], diagonal[:, :, None] & diagonal[:, None, :])
    return diagonal, diagonal


def test_masked_rows_not_kept_run_the_users_attention_with_their_mask():
    """Rows the store does not keep go to the processor's own call with their rows of the mask."""
    transformer, inputs = tiny_hunyuanvideo(), hunyuanvideo_inputs()
    with torch.no_grad():
        out_ref = transformer(**inputs).sample
    for batch in ((1,), (0,)):
        with capture_attention(transformer, [1], batch=batch, map_dtype=torch.float32, backend="torch") as store, \
                torch.no_grad():
            out = transformer(**inputs).sample
        torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
        assert store.maps["single_transformer_blocks.0"].shape == (1, 60, 7)


@contextlib.contextmanager
def sdpa_calls(attn_module):
    """Every call the attention module's processor makes to SDPA: a list of ``(q, k, v, attn_mask)`` (detached
    copies; q, k, v ``[B, H, N, D]``)."""
    calls, active = [], [False]
    sdpa = F.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, **kwargs):
        if active[0]:
            calls.append(tuple(None if t is None else t.detach().clone() for t in (query, key, value, attn_mask)))
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    hooks = [attn_module.register_forward_pre_hook(lambda *a: active.__setitem__(0, True)),
             attn_module.register_forward_hook(lambda *a: active.__setitem__(0, False))]
    F.scaled_dot_product_attention = recording
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()


def chroma_oracle_i2t(q, k, v, mask, text_len):
    """i2t ``[B, H, N_img, T]`` float64 from what the default processor gave SDPA: q, k, v ``[B, H, N, D]`` and
    ChromaPipeline's float mask ``m_i * m_j`` ``[B, 1, N, N]`` (checked to be that outer product of a 0 / 1 mask).
    Image queries have m_i = 1: their scores get the key bias m_j. The oracle is the float64 reference with that
    key bias, and also SDPA (float64) on the whole mask."""
    b, _, n, _ = q.shape
    m = mask[:, 0].diagonal(dim1=-2, dim2=-1)  # [B, N]
    assert mask.dtype.is_floating_point and ((m == 0) | (m == 1)).all()
    assert torch.equal(mask[:, 0], m[:, :, None] * m[:, None, :])
    assert (m[:, text_len:] == 1).all() and (m[:, :text_len] == 0).any()  # [text, image]; padding present
    out, i2t, _ = reference_joint_attention(q, k, v, 0, text_len, capture="i2t", heads="all", key_mask=m)
    sdpa = F.scaled_dot_product_attention(*(t.double() for t in (q, k, v)), attn_mask=mask.double())
    torch.testing.assert_close(out[:, :, text_len:], sdpa[:, :, text_len:], atol=1e-12, rtol=1e-12)
    return i2t, m


@pytest.mark.parametrize(
    "layer,backend",
    [("transformer_blocks.0", "torch"), ("single_transformer_blocks.0", "torch")]
    + [pytest.param("transformer_blocks.0", "triton",
                    marks=pytest.mark.skipif(not _triton_runs(), reason="no CUDA, no TRITON_INTERPRET"))],
)
def test_chroma_float_mask_is_reproduced_exactly(layer, backend):
    """ChromaPipeline's float 0 / 1 mask: the blocks make m_i * m_j [B, 1, N, N], which SDPA ADDS to the scores.
    Captured: the layer's and the model's output equal the default processor's (padding text queries, m_i = 0,
    see no bias: recomputed), and i2t equals the float64 oracle with the key bias m (the image queries')."""
    transformer, inputs = tiny_chroma(), chroma_inputs(dtype=torch.float32)
    attn = transformer.get_submodule(layer).attn
    with torch.no_grad(), sdpa_spy(attn) as ref:
        out_ref = transformer(**inputs).sample
    store = AttentionStore(capture="i2t", heads="all", map_dtype=torch.float32, steps="all", batch="all",
                           backend=backend)
    with register(transformer, [layer], store=store), torch.no_grad(), sdpa_spy(attn) as got:
        out = transformer(**inputs).sample
    q, k, v = ref["qkv"]
    i2t, m = chroma_oracle_i2t(q, k, v, ref["mask"], 7)
    layer_out = torch.cat([o.flatten() for o in got["out"]]) if isinstance(got["out"], tuple) else got["out"]
    layer_ref = torch.cat([o.flatten() for o in ref["out"]]) if isinstance(ref["out"], tuple) else ref["out"]
    err_layer, err_model = max_rel(layer_out, layer_ref), max_rel(out, out_ref)
    err_i2t = (store.i2t[layer][0].double() - i2t).abs().max().item()
    print(f"chroma float mask {layer} ({backend}): layer out rel err {err_layer:.1e}, model {err_model:.1e}, "
          f"i2t abs err {err_i2t:.1e}")
    assert err_layer <= 1e-5 and err_model <= 1e-5
    torch.testing.assert_close(store.i2t[layer][0].double(), i2t, atol=1e-6, rtol=1e-5)
    assert (store.i2t[layer][0] > 0).all()  # a bias, not a mask: padding columns keep a probability
    # the case holds padding text queries (m_i = 0), whose rows would differ with the key bias on every row
    q_pad = (m[:, :7] == 0)
    assert q_pad.any()


def check_float_outer_product_mask(name, transformer, inputs, mask, text_len):
    """A transformer whose processor turns the text mask ``mask`` ``[B, T]`` (float 0 / 1) into the outer product
    that SDPA adds to the scores, captured at ``transformer_blocks.0`` (``.attn1``, text first): the model output
    equals the default processor's, and i2t the float64 oracle from the q, k, v and mask that processor used."""
    layer = "transformer_blocks.0"
    attn = transformer.get_submodule(layer).attn1
    with torch.no_grad(), sdpa_spy(attn) as ref:
        out_ref = transformer(**inputs, attention_mask=mask).sample
    with capture_attention(transformer, [layer], capture="i2t", heads="all", map_dtype=torch.float32,
                           backend="torch") as store, torch.no_grad():
        out = transformer(**inputs, attention_mask=mask).sample
    q, k, v = ref["qkv"]
    i2t, _ = chroma_oracle_i2t(q, k, v, ref["mask"], text_len)
    print(f"{name} float mask: model rel err {max_rel(out, out_ref):.1e}, "
          f"i2t abs err {(store.maps[layer].double() - i2t).abs().max().item():.1e}")
    assert max_rel(out, out_ref) <= 1e-5
    torch.testing.assert_close(store.maps[layer].double(), i2t, atol=1e-6, rtol=1e-5)


def test_cogview4_text_mask_is_reproduced_exactly():
    """CogView4's processor turns a text mask into the float 0 / 1 outer product [B, 1, N, N] that SDPA adds to the
    scores (its pipeline passes none): the same bias as ChromaPipeline's, captured the same way."""
    mask = torch.ones(2, 7)
    mask[0, 5:] = 0
    check_float_outer_product_mask("cogview4", fam.tiny_cogview4(), fam.cogview4_inputs(), mask, 7)


def test_chroma_float_mask_t2i_of_padding_queries_is_refused():
    transformer = tiny_chroma()
    with capture_attention(transformer, [0], capture="both", backend="torch") as store, torch.no_grad():
        with pytest.raises(ValueError, match="transformer_blocks.0.*padding text queries .*no bias"):
            transformer(**chroma_inputs(dtype=torch.float32))
    assert not store.maps


def test_float_outer_product_that_is_not_a_0_1_token_mask_is_refused():
    transformer = tiny_chroma()
    mask = chroma_inputs(dtype=torch.float32)["attention_mask"] * 0.5  # m_i * m_j of m = 0.5: per-query scale
    inputs = dict(chroma_inputs(), attention_mask=mask)
    with capture_attention(transformer, [0], backend="torch") as store, torch.no_grad():
        with pytest.raises(ValueError, match="transformer_blocks.0.*not a 0 / 1 token mask"):
            transformer(**inputs)
    assert not store.maps


def _tiny_chroma_generation(store_kwargs, backend, prompts):
    """A tiny ChromaPipeline's own generation (2 steps, no CFG, two prompts of different lengths), with capture of
    one double- and one single-stream block when ``store_kwargs`` is given. Returns ``(latents, store, calls)``:
    ``calls`` maps each captured layer to its SDPA calls when capture is off (the default processor's inputs)."""
    from seg4diff_fast.segmentation.tiny import tiny_pipeline

    pipe = tiny_pipeline("chroma", num_layers=1, num_single_layers=1, max_length=24)
    layers = ["transformer_blocks.0", "single_transformer_blocks.0"]
    kwargs = dict(prompt=prompts, height=24, width=20, num_inference_steps=2, guidance_scale=1.0,
                  max_sequence_length=24, output_type="latent", generator=torch.Generator().manual_seed(0))
    if store_kwargs is None:
        with contextlib.ExitStack() as stack:
            calls = {name: stack.enter_context(sdpa_calls(pipe.transformer.get_submodule(name).attn))
                     for name in layers}
            latents = pipe(**kwargs).images
        return latents, None, calls
    with capture_attention(pipe.transformer, layers, backend=backend, **store_kwargs) as store:
        latents = pipe(**kwargs).images
    return latents, store, None


@pytest.mark.parametrize(
    "backend",
    ["torch",
     pytest.param("triton", marks=pytest.mark.skipif(not _triton_runs(), reason="no CUDA, no TRITON_INTERPRET"))],
)
def test_chroma_pipeline_generation_with_capture_equals_without_and_maps_equal_the_oracle(backend):
    """Capture INSIDE ChromaPipeline's own generation: it passes its float 0 / 1 mask, which capture reproduces.
    The generated latents equal those without capture; every step's i2t equals the float64 oracle computed from
    the q, k, v and the float mask that the default processor gave SDPA in the uncaptured run."""
    prompts = ["a cat", "a red dog on grass"]
    ref, _, calls = _tiny_chroma_generation(None, backend, prompts)
    store_kwargs = dict(capture="i2t", heads="all", steps="all", batch="all", map_dtype=torch.float32)
    got, store, _ = _tiny_chroma_generation(store_kwargs, backend, prompts)
    err_latents = max_rel(got, ref)
    errs = []
    for layer, layer_calls in calls.items():
        assert len(layer_calls) == 2  # one call per step (no CFG)
        maps = store.i2t[layer]  # [steps, B, H, N_img, T]
        assert maps.shape[0] == 2
        for step, (q, k, v, mask) in enumerate(layer_calls):
            text_len = maps.shape[-1]
            i2t, m = chroma_oracle_i2t(q, k, v, mask, text_len)
            lengths = (m[:, :text_len] == 1).sum(1).tolist()
            assert lengths[0] != lengths[1], lengths  # the prompts' lengths differ
            errs.append((maps[step].double() - i2t).abs().max().item())
            torch.testing.assert_close(maps[step].double(), i2t, atol=1e-6, rtol=1e-5)
    print(f"ChromaPipeline ({backend}): latents rel err {err_latents:.1e}, i2t max abs err {max(errs):.1e}")
    assert err_latents <= 1e-5


@pytest.mark.parametrize("mask,match", [
    (lambda b, n: torch.ones(b, 2, 1, n, dtype=torch.bool), "differs between heads"),
    (lambda b, n: torch.ones(b, 1, n, n, dtype=torch.bool).tril(), "differs between queries"),
    (lambda b, n: torch.zeros(b, 1, n, n).uniform_(), "not a 0 / 1 token mask"),
    (lambda b, n: torch.ones(b, 1, 1, n + 1, dtype=torch.bool), "expected a key mask"),
    (lambda b, n: torch.ones(b, 1, n, dtype=torch.bool), "expected a key mask"),  # SDPA: [heads, queries, keys]
    (lambda b, n: torch.ones(b, n, dtype=torch.bool), "expected a key mask"),  # SDPA: [queries, keys]
])
def test_masks_that_are_not_key_masks_are_refused(mask, match):
    """Flux's processor passes the attention_mask it is given (joint_attention_kwargs) to the dispatcher: masks
    that vary per query or head, biases and wrong shapes are refused at the call, naming the layer."""
    transformer = tm.tiny_flux_transformer(num_layers=1, num_single_layers=1)
    inputs = tm.flux_inputs()
    with capture_attention(transformer, [0], backend="torch") as store, torch.no_grad():
        with pytest.raises(ValueError, match=f"transformer_blocks.0.*{match}"):
            transformer(**inputs, joint_attention_kwargs={"attention_mask": mask(2, 7 + 30)})
    assert not store.maps


@pytest.mark.parametrize("kind", ["inf", "finfo", "bias"])
def test_additive_key_mask_is_taken(kind):
    """An additive float key mask ``[B, 1, 1, N]`` is a key bias, whatever its values: 0 / -inf (the boolean key
    mask ``== 0``), ``torch.finfo.min`` for the padding (masked too), or a real bias (N(0, 1) values): the output
    equals the default processor's, the maps the float64 oracle with that bias."""
    transformer = tm.tiny_flux_transformer(num_layers=1, num_single_layers=1)
    inputs = tm.flux_inputs()
    bias = torch.zeros(2, 1, 1, 37)
    if kind == "bias":
        bias = torch.randn(2, 1, 1, 37, generator=torch.Generator().manual_seed(5))
    bias[1, ..., 4:7] = float("-inf") if kind != "finfo" else torch.finfo(torch.float32).min  # sample 1: padding
    kwargs = {"attention_mask": bias}
    attn = transformer.get_submodule("transformer_blocks.0").attn
    with torch.no_grad(), sdpa_spy(attn) as ref:
        out_ref = transformer(**inputs, joint_attention_kwargs=kwargs).sample
    with capture_attention(transformer, [0], map_dtype=torch.float32, backend="torch", heads="all") as store, \
            torch.no_grad():
        out = transformer(**inputs, joint_attention_kwargs=kwargs).sample
    assert max_rel(out, out_ref) <= 1e-5
    q, k, v = ref["qkv"]
    _, i2t, _ = reference_joint_attention(q, k, v, 0, 7, capture="i2t", heads="all", key_mask=bias[:, 0, 0])
    maps = store.maps["transformer_blocks.0"]  # [B, H, N_img, T]
    torch.testing.assert_close(maps.double(), i2t, atol=1e-6, rtol=1e-5)
    assert (maps[1, ..., 4:] == 0).all() and (maps[0, ..., 4:] > 0).all()


@pytest.mark.parametrize("build,make_inputs,layer", [(fam.tiny_qwenimage, qwenimage_inputs, "transformer_blocks.1"),
                                                     (tiny_hunyuanvideo, hunyuanvideo_inputs, "transformer_blocks.0")])
def test_torch_compile_keeps_one_graph_with_a_key_mask(build, make_inputs, layer):
    """A boolean [B, 1, 1, N] key mask needs no look at its values: fullgraph, one graph, the eager maps."""
    from torch._dynamo.utils import counters

    transformer, inputs = build(), make_inputs()
    options = dict(capture="both", heads="all", steps="all", map_dtype=torch.float32, backend="torch")
    with capture_attention(transformer, [layer], **options) as eager, torch.no_grad():
        transformer(**inputs)
    torch._dynamo.reset()
    counters.clear()
    with capture_attention(transformer, [layer], **options) as store, torch.no_grad():
        compiled = torch.compile(transformer, backend="aot_eager", fullgraph=True)
        for _ in range(2):
            compiled(**inputs)
    assert counters["stats"]["unique_graphs"] == 1
    for kind in ("i2t", "t2i"):
        torch.testing.assert_close(getattr(store, kind)[layer], getattr(eager, kind)[layer].expand(2, -1, -1, -1, -1))


def test_gradient_checkpointing_recomputes_the_masked_attention():
    """The recomputation in the backward runs the layer's attention with its mask: the gradients equal those
    without checkpointing (an unmasked recomputation would change them)."""
    transformer = tiny_hunyuanvideo15().train()
    inputs = hunyuanvideo15_inputs()

    def grads():
        transformer.zero_grad()
        transformer(**inputs).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}

    with capture_attention(transformer, [0, 1], backend="torch"):
        plain = grads()
        transformer.enable_gradient_checkpointing()
        checkpointed = grads()
    transformer.disable_gradient_checkpointing()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_guider_unconditional_forward_is_not_a_step():
    """HunyuanImage's and HunyuanVideo 1.5's pipelines run diffusers' guider: the unconditional forward runs inside
    cache_context("pred_uncond"): with batch="cond" it is not recorded, and runs the user's attention."""
    transformer, inputs = tiny_hunyuanimage(), hunyuanimage_inputs()
    with torch.no_grad():
        out_ref = transformer(**inputs).sample
    with capture_attention(transformer, [0], backend="torch") as store, torch.no_grad():
        with transformer.cache_context("pred_uncond"):
            out = transformer(**inputs).sample
        assert not store.steps_seen and torch.equal(out, out_ref)
        with transformer.cache_context("pred_cond"):
            transformer(**inputs)
    assert store.steps_seen == {"transformer_blocks.0": 1}
