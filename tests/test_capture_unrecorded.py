"""No cost where nothing is recorded: on steps outside the store's ``steps`` and on batch rows it does not keep,
the captured layer runs the user's own attention (the dispatcher with the user's backend, or SDPA) and
``joint_attention`` computes nothing for them.

Spies: ``joint_attention`` as the capture site calls it (its batch size per call), and the user's attention
during the captured layer's forward: the dispatcher backend the user set (``_native_math``, wrapped in diffusers'
backend registry) for dispatcher families, ``F.scaled_dot_product_attention`` for processors that call SDPA
(SD3's ``JointAttnProcessor2_0``, CogView4). Tiny random-weight transformers, CPU, torch backend, float32.
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
import test_capture_masked as masked  # noqa: E402
import tiny_models as tm  # noqa: E402

from seg4diff_fast.capture import AttentionStore, capture_attention, register  # noqa: E402
from seg4diff_fast.reference import reference_joint_attention  # noqa: E402

# name -> (transformer, inputs(batch, seed, timestep), captured layer, text at, attention call of its processor)
FAMILIES = {
    "sd3": (tm.tiny_sd3_transformer, lambda b, s, t: dict(tm.sd3_inputs(batch=b, seed=s), timestep=torch.full((b,), t)),
            "transformer_blocks.0", "end", "sdpa"),
    "flux_double": (tm.tiny_flux_transformer,
                    lambda b, s, t: dict(tm.flux_inputs(batch=b, seed=s), timestep=torch.full((b,), t / 1000)),
                    "transformer_blocks.1", "start", "dispatch"),
    "flux_single": (tm.tiny_flux_transformer,
                    lambda b, s, t: dict(tm.flux_inputs(batch=b, seed=s), timestep=torch.full((b,), t / 1000)),
                    "single_transformer_blocks.0", "start", "dispatch"),
    "cogview4": (fam.tiny_cogview4,
                 lambda b, s, t: dict(fam.cogview4_inputs(batch=b), hidden_states=torch.randn(b, 4, 10, 6, generator=torch.Generator().manual_seed(s)),
                                      timestep=torch.full((b,), t)),
                 "transformer_blocks.1", "start", "sdpa"),
    # a masked family: the unkept rows get their rows of the key mask
    "hunyuanvideo": (masked.tiny_hunyuanvideo, lambda b, s, t: masked.hunyuanvideo_inputs(b, s, t),
                     "single_transformer_blocks.0", "end", "dispatch"),
    "qwenimage": (fam.tiny_qwenimage,
                  lambda b, s, t: dict(fam.qwenimage_inputs(batch=b), hidden_states=torch.randn(b, 15, 16, generator=torch.Generator().manual_seed(s)),
                                       timestep=torch.full((b,), t / 1000)),
                  "transformer_blocks.1", "start", "dispatch"),
}


def attn_module(transformer, layer):
    module = transformer.get_submodule(layer)
    return getattr(module, "attn", None) or module.attn1


@contextlib.contextmanager
def spies(transformer, layer, call, monkeypatch):
    """``calls["joint"]``: batch size of every joint_attention call of the capture site; ``calls["user"]``: batch
    size of every call of the user's attention made during the captured layer's forward."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    from seg4diff_fast.capture import base

    calls = {"joint": [], "user": []}
    active = [False]
    joint = base.joint_attention
    monkeypatch.setattr(base, "joint_attention", lambda q, *a, **k: calls["joint"].append(q.shape[0]) or joint(q, *a, **k))
    if call == "dispatch":
        name = AttentionBackendName._NATIVE_MATH
        users = _AttentionBackendRegistry._backends[name]

        def counting(**kwargs):  # the registry calls backends with keyword arguments only
            if active[0]:
                calls["user"].append(kwargs["query"].shape[0])
            return users(**kwargs)

        monkeypatch.setitem(_AttentionBackendRegistry._backends, name, counting)
    else:
        sdpa = F.scaled_dot_product_attention

        def counting(q, *args, **kwargs):
            if active[0]:
                calls["user"].append(q.shape[0])
            return sdpa(q, *args, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    attn = attn_module(transformer, layer)
    hooks = [attn.register_forward_pre_hook(lambda *a: active.__setitem__(0, True)),
             attn.register_forward_hook(lambda *a: active.__setitem__(0, False))]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


def _model(name, monkeypatch):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    build, inputs, layer, text_at, call = FAMILIES[name]
    transformer = build()
    if call == "dispatch":
        # set_attention_backend also sets diffusers' global active backend (reset_attention_backend does not
        # restore it): put it back after the test
        monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
        transformer.set_attention_backend("_native_math")  # the user's backend
    return transformer, inputs, layer, text_at, call


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_steps_outside_the_set_run_the_users_attention_and_compute_no_maps(name, monkeypatch):
    transformer, inputs, layer, _, call = _model(name, monkeypatch)
    xs = [inputs(2, seed, t) for seed, t in ((1, 900.0), (2, 600.0), (3, 300.0))]
    with torch.no_grad():
        default = [transformer(**x).sample for x in xs]
    store = AttentionStore(steps={1}, batch="all", map_dtype=torch.float32, backend="torch")
    with register(transformer, [layer], store=store), torch.no_grad(), spies(transformer, layer, call, monkeypatch) as calls:
        per_step = []
        for x in xs:
            out = transformer(**x).sample
            per_step.append((list(calls["joint"]), list(calls["user"])))
            calls["joint"].clear()
            calls["user"].clear()
            per_step[-1] += (out,)
    for step, (joint, user, out) in enumerate(per_step):
        if step == 1:  # kept: the whole batch through joint_attention, the user's attention not called
            assert joint == [2] and user == [], (step, joint, user)
            torch.testing.assert_close(out, default[step], atol=1e-5, rtol=1e-5)
        else:  # not kept: the user's attention only, the very output of the default processor
            assert joint == [] and user == [2], (step, joint, user)
            assert torch.equal(out, default[step])
    assert store.steps_seen == {layer: 3} and store.kept_steps == {layer: [1]}
    assert store.timesteps[layer] == pytest.approx([600.0 if name in ("sd3", "cogview4", "hunyuanvideo") else 0.6])
    assert store.maps[layer].shape[:2] == (1, 2)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_rows_not_kept_run_the_users_attention(name, monkeypatch):
    """Batch of 3, the store keeps rows (2, 0): joint_attention sees those two rows only, the user's attention row
    1; the output equals the default processor's, the maps equal the oracle's, in the store's row order."""
    transformer, inputs, layer, text_at, call = _model(name, monkeypatch)
    x = inputs(3, 1, 500.0)
    attn = attn_module(transformer, layer)
    transformer.reset_attention_backend()  # the reference q, k, v (and mask): the default processor's SDPA call
    with torch.no_grad(), masked.sdpa_spy(attn) as ref:
        default = transformer(**x).sample
    if call == "dispatch":
        transformer.set_attention_backend("_native_math")
    store = AttentionStore(capture="both", heads="all", steps="all", batch=(2, 0), map_dtype=torch.float32,
                           backend="torch")
    with register(transformer, [layer], store=store), torch.no_grad(), spies(transformer, layer, call, monkeypatch) as calls:
        out = transformer(**x).sample
    assert calls["joint"] == [2] and calls["user"] == [1], calls
    err = (out - default).abs().max().item()
    print(f"{name}: rows (2, 0) captured, row 1 the user's: output max abs err {err:.1e}")
    torch.testing.assert_close(out, default, atol=1e-5, rtol=1e-5)
    q, k, v = ref["qkv"]  # [3, H, N, D]
    n = q.shape[2]
    text_len = store.i2t[layer].shape[-1]
    t0, t1 = (0, text_len) if text_at == "start" else (n - text_len, n)
    key_mask = None if ref["mask"] is None else masked.oracle_masks(ref["mask"], q.shape[0], n)[0]
    _, i2t, t2i = reference_joint_attention(q, k, v, t0, t1, capture="both", heads="all", key_mask=key_mask)
    n_img = store.i2t[layer].shape[-2]
    torch.testing.assert_close(store.i2t[layer][0].double(), i2t[[2, 0], :, :n_img], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(store.t2i[layer][0].double(), t2i[[2, 0], ..., :n_img], atol=1e-6, rtol=1e-5)


def test_sd3_pipeline_cfg_captures_the_conditional_half_only(monkeypatch):
    """StableDiffusion3Pipeline batches [uncond, cond]: with batch="cond" joint_attention sees the conditional row,
    SDPA the unconditional one; the images equal those of the pipeline without capture."""
    pipe = tm.tiny_sd3_pipeline()
    kwargs = dict(num_inference_steps=2, guidance_scale=5.0, height=8, width=12, max_sequence_length=8,
                  output_type="pt")
    plain = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    with capture_attention(pipe, [1], steps="all", map_dtype=torch.float32, backend="torch") as store:
        with spies(pipe.transformer, "transformer_blocks.1", "sdpa", monkeypatch) as calls:
            images = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert calls == {"joint": [1, 1], "user": [1, 1]}
    torch.testing.assert_close(images, plain, atol=1e-5, rtol=1e-5)
    assert store.maps["transformer_blocks.1"].shape == (2, 1, 96, 16)


def test_second_forward_on_the_same_latents_is_the_unconditional_pass(monkeypatch):
    """FluxKontextPipeline's true CFG runs the negative prompt as a second forward on the same latents tensor,
    outside any cache_context (as ChromaPipeline, Lumina2Pipeline, Krea2Pipeline, ... do). batch="cond": it is not
    a step and computes no maps (the user's attention runs); the kept maps equal the conditional forwards' of
    batch="all", which records both passes (conditional first). The images equal the pipeline's without capture."""
    from diffusers import FluxKontextPipeline

    from seg4diff_fast.segmentation.tiny import tiny_flux_pipeline

    pipe = FluxKontextPipeline(**tiny_flux_pipeline().components)
    kwargs = dict(negative_prompt="a dog", true_cfg_scale=3.0, num_inference_steps=3, height=16, width=24,
                  max_sequence_length=77, output_type="pt", _auto_resize=False,
                  max_area=16 * 24)
    layer = "transformer_blocks.1"
    plain = pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    with capture_attention(pipe, [layer], steps="all", map_dtype=torch.float32, backend="torch", batch="all") as both:
        pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **kwargs)
    assert both.maps[layer].shape[0] == 6  # 3 steps x (conditional, unconditional)
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    pipe.transformer.set_attention_backend("_native_math")  # the user's backend, counted by the spy
    with capture_attention(pipe, [layer], steps="all", map_dtype=torch.float32, backend="torch") as store:
        with spies(pipe.transformer, layer, "dispatch", monkeypatch) as calls:
            images = pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert calls == {"joint": [1, 1, 1], "user": [1, 1, 1]}  # per step: conditional maps, unconditional user's
    assert store.maps[layer].shape[0] == 3
    torch.testing.assert_close(store.maps[layer], both.maps[layer][0::2], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(both.maps[layer][0::2], both.maps[layer][1::2])  # the passes do differ
    torch.testing.assert_close(store.timesteps[layer], both.timesteps[layer][0::2])
    torch.testing.assert_close(images, plain, atol=1e-5, rtol=1e-5)


def test_second_forward_on_the_same_latents_under_torch_compile():
    """Compiled in place (``transformer.compile``: inductor, fullgraph) the pre-hook is traced inside the compiled
    frame and cannot compare tensor identities: the record_maps op decides at run time (the latents of the site's
    last step, alive, same address and shape). The store keeps the 3 conditional steps, equal to eager capture's;
    without the check it kept 6. ``torch.compile(transformer)``, which runs the pre-hook eagerly, too."""
    from diffusers import FluxKontextPipeline

    from seg4diff_fast.segmentation.tiny import tiny_flux_pipeline

    pipe = FluxKontextPipeline(**tiny_flux_pipeline().components)
    kwargs = dict(negative_prompt="a dog", true_cfg_scale=3.0, num_inference_steps=3, height=16, width=24,
                  max_sequence_length=77, output_type="pt", _auto_resize=False, max_area=16 * 24)
    layer = "transformer_blocks.1"
    with capture_attention(pipe, [layer], steps="all", map_dtype=torch.float32, backend="torch") as eager:
        pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **kwargs)
    torch._dynamo.reset()
    transformer = pipe.transformer
    for in_place in (True, False):
        torch._dynamo.reset()
        with capture_attention(pipe, [layer], steps="all", map_dtype=torch.float32, backend="torch") as store:
            if in_place:
                transformer.compile(fullgraph=True)
            else:
                pipe.transformer = torch.compile(transformer, fullgraph=True)
            try:
                pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **kwargs)
            finally:
                pipe.transformer = transformer
                transformer._compiled_call_impl = None  # undo transformer.compile()
        assert store.maps[layer].shape == eager.maps[layer].shape == (3, 1, 24, 77)
        torch.testing.assert_close(store.maps[layer], eager.maps[layer], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(store.timesteps[layer], eager.timesteps[layer])


def test_repeated_call_on_the_same_latents_and_conditioning_is_a_step():
    """Only other conditioning on the same latents makes a second pass: the same call twice is two steps, the same
    latents with another encoder_hidden_states tensor right after a step is not a step."""
    transformer = tm.tiny_flux_transformer()
    x = dict(tm.flux_inputs(batch=1, seed=0), timestep=torch.full((1,), 0.5))
    other = dict(x, encoder_hidden_states=x["encoder_hidden_states"].clone())
    with capture_attention(transformer, ["transformer_blocks.1"], steps="all", backend="torch") as store, \
            torch.no_grad():
        transformer(**x)
        transformer(**x)
        transformer(**other)
    assert store.steps_seen == {"transformer_blocks.1": 2}
