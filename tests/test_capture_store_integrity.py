"""The store never returns a silently wrong result (issue 19): maps that hold NaN or inf, a set of steps reused
across generations, steps that never occur, steps of another size or grid, caches enabled after register(),
Flux.2's KV-cache extract mode.

Tiny random-weight transformers on the CPU, torch backend, float32.
"""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import tiny_models as tm  # noqa: E402

from seg4diff_fast.capture import AttentionStore, capture_attention, register  # noqa: E402
from test_capture_families import _cache_configs  # noqa: E402

# family -> (transformer, inputs(height, width, seed, timestep), captured layers: the second block, then a later one)
FAMILIES = {
    "sd3": (lambda: tm.tiny_sd3_transformer(num_layers=3),
            lambda h=6, w=5, seed=1, t=500.0: dict(tm.sd3_inputs(height=h, width=w, seed=seed),
                                                   timestep=torch.full((2,), t)),
            ["transformer_blocks.1", "transformer_blocks.2"]),
    "flux": (lambda: tm.tiny_flux_transformer(num_layers=2, num_single_layers=1),
             lambda h=5, w=6, seed=1, t=500.0: dict(tm.flux_inputs(height=h, width=w, seed=seed),
                                                    timestep=torch.full((2,), t / 1000)),
             ["transformer_blocks.1", "single_transformer_blocks.0"]),
    "flux2": (lambda: tm.tiny_flux2_transformer(num_layers=2, num_single_layers=1),
              lambda h=4, w=5, seed=1, t=500.0: dict(tm.flux2_inputs(height=h, width=w, seed=seed),
                                                     timestep=torch.full((2,), t / 1000)),
              ["transformer_blocks.1", "single_transformer_blocks.0"]),
}
STEPS = ["mean", "all", frozenset({0, 1, 2})]


def _store(steps="all", **over):
    return AttentionStore(**dict(dict(capture="both", steps=steps, batch="all", map_dtype=torch.float32,
                                      backend="torch"), **over))


def _poison(transformer, value: float) -> None:
    """Fill the query projection of the first block with ``value``: every later attention is NaN."""
    with torch.no_grad():
        transformer.transformer_blocks[0].attn.to_q.weight.fill_(value)


# ---------------------------------------------------------------------------------------------- non-finite maps
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("steps", STEPS, ids=str)
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_maps_are_refused_naming_the_layer_and_step(family, steps, value, tmp_path):
    """The model turns NaN at the third step (weights poisoned between forwards, as fp16 overflow does at some
    step): reading or saving the maps says which layer and step, instead of NaN maps or an argmax over them."""
    build, inputs, layers = FAMILIES[family]
    transformer = build()
    with capture_attention(transformer, layers, store=_store(steps)) as store, torch.no_grad():
        for i, t in enumerate((900.0, 600.0, 300.0)):
            if i == 2:
                _poison(transformer, value)
            transformer(**inputs(t=t))
    first = layers[0]  # both layers are NaN from step 2 on: the earlier one in the forward is named
    scale = 1 if family == "sd3" else 1000
    message = rf"the captured i2t maps of layer '{first}' hold NaN or inf from its step 2 \(timestep {300 / scale:g}\)"
    for read in (lambda: store.maps, lambda: store.i2t, lambda: store.t2i, lambda: store.save(str(tmp_path / "m.st"))):
        with pytest.raises(FloatingPointError, match=message):
            read()
    assert not os.listdir(tmp_path)  # nothing written
    assert "layers=" in repr(store)  # repr does not read the maps


def test_finite_maps_read_as_before_and_reset_forgets_a_non_finite_step():
    build, inputs, layers = FAMILIES["flux"]
    transformer = build()
    store = _store("mean")
    with capture_attention(transformer, layers, store=store), torch.no_grad():
        transformer(**inputs())
        clean = {k: v.clone() for k, v in store.maps.items()}
        saved = transformer.transformer_blocks[0].attn.to_q.weight.clone()
        _poison(transformer, float("nan"))
        transformer(**inputs())
        with pytest.raises(FloatingPointError, match="step 1"):
            store.maps
        store.reset()
        with torch.no_grad():
            transformer.transformer_blocks[0].attn.to_q.weight.copy_(saved)
        transformer(**inputs())
    for layer, m in store.maps.items():
        torch.testing.assert_close(m, clean[layer])


# ---------------------------------------------------------------------------------------------- generations
def _generation(transformer, inputs, timesteps, seed):
    for t in timesteps:
        transformer(**inputs(seed=seed, t=t))


@pytest.mark.parametrize("timesteps", [(900.0, 600.0, 300.0), (100.0, 400.0, 700.0)], ids=["down", "up"])
def test_a_set_of_steps_refuses_the_maps_of_a_second_generation(timesteps):
    """steps={0} over two generations used to return the first generation's step 0 (the count ran on). Time runs
    down (SD3, Flux) or up (Lumina2, Z-Image): either way the timesteps going back is a new generation."""
    build, inputs, layers = FAMILIES["flux"]
    transformer = build()
    with capture_attention(transformer, layers, store=_store({0})) as store, torch.no_grad():
        _generation(transformer, inputs, timesteps, seed=1)
        first = {k: v.clone() for k, v in store.maps.items()}
        _generation(transformer, inputs, timesteps, seed=2)
        with pytest.raises(RuntimeError, match=r"'transformer_blocks.1': the timesteps went back at its step 3 \(6 "
                                               r"steps seen\): this store saw a second generation.*store.reset\(\)"):
            store.maps
        store.reset()  # what the message says: the next generation counts from 0
        _generation(transformer, inputs, timesteps, seed=2)
        second = store.maps
    with capture_attention(transformer, layers, store=_store({0})) as fresh, torch.no_grad():
        _generation(transformer, inputs, timesteps, seed=2)
    for layer, m in fresh.maps.items():
        torch.testing.assert_close(second[layer], m)
        assert not torch.equal(first[layer], m)


def test_repeated_timesteps_of_one_generation_are_not_a_new_one():
    """Second-order schedulers (Heun) evaluate a timestep twice; calls at one timestep (segment's forwards) neither."""
    build, inputs, layers = FAMILIES["flux"]
    transformer = build()
    with capture_attention(transformer, layers, store=_store({0, 3})) as store, torch.no_grad():
        _generation(transformer, inputs, (900.0, 600.0, 600.0, 300.0, 300.0), seed=1)
    assert all(s == [0, 3] for s in store.kept_steps.values()) and store.maps
    with capture_attention(transformer, layers, store=_store({0, 2})) as store, torch.no_grad():
        _generation(transformer, inputs, (500.0, 500.0, 500.0), seed=1)
    assert all(v.shape[0] == 2 for v in store.maps.values())


def test_a_set_of_steps_over_two_pipeline_calls_is_refused():
    """The real case: one store, two calls of a tiny SD3 pipeline."""
    pipe = tm.tiny_sd3_pipeline()
    store = AttentionStore(steps={0}, backend="torch", map_dtype=torch.float32)
    with capture_attention(pipe, [1], store=store):
        for prompt in ("a cat", "a dog on a sofa"):
            pipe(prompt, num_inference_steps=3, height=8, width=8, max_sequence_length=8, output_type="latent",
                 generator=torch.Generator().manual_seed(0))
        with pytest.raises(RuntimeError, match="second generation"):
            store.maps


def test_steps_that_never_occur_are_reported():
    """steps={5, 100} on a 3-step run used to give {} silently; steps={1, 5}: the maps of step 1 and a warning."""
    build, inputs, layers = FAMILIES["flux"]
    transformer = build()
    with capture_attention(transformer, layers, store=_store({5, 100})) as store, torch.no_grad():
        _generation(transformer, inputs, (900.0, 600.0, 300.0), seed=1)
    with pytest.raises(ValueError, match=r"ran 3 steps \(0..2\): none of steps=\[5, 100\] occurred"):
        store.maps
    with capture_attention(transformer, layers, store=_store({1, 5})) as store, torch.no_grad():
        _generation(transformer, inputs, (900.0, 600.0, 300.0), seed=1)
    with pytest.warns(UserWarning, match=r"steps \[5\] of steps=\[1, 5\] never occurred"):
        maps = store.maps
    assert all(m.shape[0] == 1 for m in maps.values())
    with capture_attention(transformer, layers, store=_store({0, 2})) as store, torch.no_grad():
        _generation(transformer, inputs, (900.0, 600.0, 300.0), seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all(m.shape[0] == 2 for m in store.maps.values())


# ---------------------------------------------------------------------------------------------- sizes
@pytest.mark.filterwarnings("ignore:.*never occurred")
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("steps", STEPS, ids=str)
def test_a_second_image_size_is_refused_at_record_time(family, steps):
    """Two sizes in one store: "all" and a set used to fail later, on read, with a raw torch.stack error."""
    build, inputs, layers = FAMILIES[family]
    transformer = build()
    with capture_attention(transformer, layers, store=_store(steps)) as store, torch.no_grad():
        transformer(**inputs(t=900.0))
        # SD3's grid is ints, checked first; Flux's comes from position ids, read later: the maps' size says it
        with pytest.raises(ValueError, match=rf"layer '{layers[0]}': (this step's image grid \(3, 4\) differs from "
                                             r"the grid \(6, 5\)|a i2t map of shape .* cannot join the maps of shape .*"
                                             r"another resolution).*store.reset\(\)"):
            transformer(**inputs(h=3, w=4, t=600.0))
        assert store.steps_seen == {layer: 1 for layer in layers}
        for layer, m in store.maps.items():  # the first size's maps are intact
            assert m.shape[-2] == (30 if family != "flux2" else 20)


@pytest.mark.parametrize("steps", STEPS, ids=str)
def test_the_same_token_count_on_another_grid_is_refused(steps):
    """6x5 then 5x6 image tokens: the maps have the same size and would mix two layouts under one grid. SD3's grid
    is ints: refused at record time; Flux's comes from position ids, compared on the device: refused on read."""
    build, inputs, layers = FAMILIES["sd3"]
    transformer = build()
    with capture_attention(transformer, layers, store=_store(steps)) as store, torch.no_grad():
        transformer(**inputs(h=6, w=5, t=900.0))
        with pytest.raises(ValueError, match=r"this step's image grid \(5, 6\) differs from the grid \(6, 5\)"):
            transformer(**inputs(h=5, w=6, t=600.0))
    assert set(store.grid.values()) == {(6, 5)}
    build, inputs, layers = FAMILIES["flux"]
    transformer = build()
    with capture_attention(transformer, layers, store=_store(steps)) as store, torch.no_grad():
        transformer(**inputs(h=6, w=5, t=900.0))
        transformer(**inputs(h=5, w=6, t=600.0))
        for read in (lambda: store.maps, lambda: store.save(os.devnull)):
            with pytest.raises(ValueError, match=rf"'{layers[0]}': the image position ids \(img_ids\) differ between "
                                                 r"the steps this store holds"):
                read()
        store.reset()
        transformer(**inputs(h=5, w=6, t=600.0))
        transformer(**inputs(h=5, w=6, t=300.0))
    assert set(store.grid.values()) == {(5, 6)} and store.maps


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("name", ["first_block_cache", "taylorseer", "pyramid_attention_broadcast"])
def test_a_cache_enabled_after_register_is_refused_at_the_next_forward(name):
    build, inputs, layers = FAMILIES["flux"]
    transformer = build()
    handle = register(transformer, layers, store=_store())
    with torch.no_grad():
        transformer(**inputs())
    transformer.enable_cache(_cache_configs()[name])
    with pytest.raises(ValueError, match=r"hooks that may skip blocks or reuse their outputs .* after register\(\)"):
        with torch.no_grad(), transformer.cache_context("cond"):
            transformer(**inputs(t=400.0))
    assert handle.store.steps_seen == {layer: 1 for layer in layers}
    transformer.disable_cache()
    with torch.no_grad():
        transformer(**inputs(t=300.0))  # without the cache: captured again
    assert handle.store.steps_seen == {layer: 2 for layer in layers}
    handle.remove()


@pytest.mark.parametrize("fullgraph", [False, True])
def test_a_cache_enabled_after_register_is_refused_under_torch_compile(fullgraph):
    """The check runs in the traced pre-hook: the cache's hooks make dynamo trace again, and the check refuses (under
    fullgraph dynamo reports our error as its own, with our message)."""
    from diffusers import FirstBlockCacheConfig

    build, inputs, layers = FAMILIES["flux"]
    transformer = build()
    torch._dynamo.reset()
    with capture_attention(transformer, layers, store=_store()) as store, torch.no_grad():
        compiled = torch.compile(transformer, backend="aot_eager", fullgraph=fullgraph)
        compiled(**inputs())
        transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
        with pytest.raises(Exception, match=r"capture refuses a FluxTransformer2DModel with diffusers hooks"):
            with transformer.cache_context("cond"):
                compiled(**inputs(t=400.0))
        assert store.steps_seen == {layer: 1 for layer in layers}
    transformer.disable_cache()


def test_parallelism_enabled_after_register_is_refused_at_the_next_forward():
    build, inputs, layers = FAMILIES["flux"]
    transformer = build()
    handle = register(transformer, layers, store=_store())
    transformer._parallel_config = object()  # what enable_parallelism() records on the model
    with pytest.raises(ValueError, match=r"parallelism enabled after register\(\)"), torch.no_grad():
        transformer(**inputs())
    assert not handle.store.steps_seen
    handle.remove()


def _flux2_extract_inputs(n_ref_h=2, n_ref_w=3):
    """A Flux.2 KV-extract forward: ``[references, generated image]`` tokens, the references' ids at t=10."""
    x = FAMILIES["flux2"][1]()
    ref_ids = tm._ids(n_ref_h, n_ref_w, 4)
    ref_ids[:, 0] = 10
    n_ref = n_ref_h * n_ref_w
    ref = torch.randn(2, n_ref, x["hidden_states"].shape[-1], generator=torch.Generator().manual_seed(3))
    return dict(x, hidden_states=torch.cat([ref, x["hidden_states"]], 1), img_ids=torch.cat([ref_ids, x["img_ids"]]),
                kv_cache_mode="extract", num_ref_tokens=n_ref)


def test_flux2_kv_cache_extract_is_refused():
    """The reference tokens come first in extract mode: the store read their rows and grid (2x3) as the image's."""
    build, inputs, layers = FAMILIES["flux2"]
    transformer = build()
    with torch.no_grad():
        transformer(**_flux2_extract_inputs())  # diffusers runs it
        with capture_attention(transformer, layers, store=_store()) as store:
            with pytest.raises(ValueError, match=r"kv_cache_mode='extract' puts 6 reference-image tokens before the "
                                                 r"generated image"):
                transformer(**_flux2_extract_inputs())
            assert not store.steps_seen
            transformer(**inputs())  # a forward without the cache: captured
    assert set(store.grid.values()) == {(4, 5)}
