"""Capture under what users do to a model: torch.compile with inductor, gradient checkpointing, processors swapped
after register(), strict text_index, files that are not what AttentionStore.load expects.

Tiny random-weight SD3 / SD3.5 / Flux / Flux2 / CogView4 transformers on the CPU, torch backend; every map is compared
with the maps of a plain eager run of the same model and inputs (tests/test_capture.py ties those to the
float64 reference).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import tiny_models as tm  # noqa: E402

from seg4diff_fast.capture import AttentionStore, capture_attention, register  # noqa: E402

def _cogview4():
    """CogView4 as tests/test_capture_families.py builds it: a family captured by intercepting the
    F.scaled_dot_product_attention call of diffusers' own processor (capture/dispatch.py)."""
    from test_capture_families import tiny_cogview4

    return tiny_cogview4()


def _cogview4_inputs(seed: int = 1, text_len: int = 7):
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([10 * 8, 6 * 8]).repeat(2, 1)
    return dict(
        hidden_states=torch.randn(2, 4, 10, 6, generator=g), encoder_hidden_states=torch.randn(2, text_len, 8, generator=g),
        timestep=torch.tensor([500.0, 500.0]), original_size=size, target_size=size, crop_coords=torch.zeros(2, 2),
    )


# family -> (transformer with one block of each kind, inputs builder, every capturable layer)
FAMILIES = {
    "cogview4": (_cogview4, _cogview4_inputs, [0, 1]),
    "sd3": (lambda: tm.tiny_sd3_transformer(num_layers=2), tm.sd3_inputs, [0, 1]),
    "sd35": (lambda: tm.tiny_sd3_transformer(sd35=True, num_layers=2), tm.sd3_inputs, [0, 1]),
    "flux": (lambda: tm.tiny_flux_transformer(num_layers=1, num_single_layers=1), tm.flux_inputs, [0, 1]),
    "flux2": (lambda: tm.tiny_flux2_transformer(num_layers=1, num_single_layers=1), tm.flux2_inputs, [0, 1]),
}


def _store(**over):
    opts = dict(capture="both", heads="all", steps="all", batch="all", map_dtype=torch.float32, backend="torch")
    opts.update(over)
    return AttentionStore(**opts)


def _eager_maps(transformer, layers, xs, **store_options):
    with capture_attention(transformer, layers, store=_store(**store_options)) as store, torch.no_grad():
        outs = [transformer(**x).sample for x in xs]
    return store, outs


# ---------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("family", ["sd3", "sd35", "flux", "flux2"])  # flux, flux2: the dispatcher interception
def test_inductor_compile_with_capture_three_steps_one_graph(family):
    """inductor (the default backend) checks the real strides of the custom op's outputs against its fake:
    Flux's transposed [B, N, H, D] views used to fail there. Three steps, fullgraph, one graph: no recompile
    when the store fills after the first call, none per step."""
    from torch._dynamo.utils import counters

    build, inputs, layers = FAMILIES[family]
    transformer = build()
    xs = [inputs(seed=s) for s in range(3)]
    options = dict(capture="i2t", heads="mean", steps="mean", batch="all", text_index=[0, 3, 3])
    eager, ref = _eager_maps(transformer, layers, xs, **options)
    torch._dynamo.reset()
    counters.clear()
    with capture_attention(transformer, layers, store=_store(**options)) as store, torch.no_grad():
        compiled = torch.compile(transformer, fullgraph=True)  # inductor; any graph break raises
        outs = [compiled(**x).sample for x in xs]
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert store.steps_seen == eager.steps_seen and set(store.steps_seen.values()) == {3}
    assert store.grid == eager.grid
    for layer, m in eager.maps.items():
        torch.testing.assert_close(store.maps[layer], m, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family,steps", [("flux", "all"), ("flux", {0, 2}), ("cogview4", "all")])
def test_compile_keeps_one_graph_when_every_step_is_kept(family, steps):
    """steps="all" / a set count steps in Python: the record op runs outside the graph, so no recompile per step
    (a set: one graph per kind of step, kept or not, tests/test_capture_compile_steps.py). The grid (Flux:
    position ids, CogView4: ints) and the timestep tensor cross the op too."""
    from torch._dynamo.utils import counters

    build, inputs, layers = FAMILIES[family]
    transformer = build()
    xs = [inputs(seed=s) for s in range(4)]
    eager, _ = _eager_maps(transformer, layers, xs, steps=steps)
    torch._dynamo.reset()
    counters.clear()
    with capture_attention(transformer, layers, store=_store(steps=steps)) as store, torch.no_grad():
        compiled = torch.compile(transformer, backend="aot_eager", fullgraph=True)
        for x in xs:
            compiled(**x)
    assert counters["stats"]["unique_graphs"] == (1 if steps == "all" else 2)
    assert store.kept_steps == eager.kept_steps and store.steps_seen == eager.steps_seen
    assert store.grid == eager.grid and store.timesteps == eager.timesteps and eager.timesteps
    for kind in ("i2t", "t2i"):
        for layer, m in getattr(eager, kind).items():
            torch.testing.assert_close(getattr(store, kind)[layer], m)


# ---------------------------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradient_checkpointing_records_each_forward_once(family, monkeypatch):
    from seg4diff_fast.capture import base

    calls = []
    original = base.joint_attention
    monkeypatch.setattr(base, "joint_attention", lambda *a, **k: calls.append(k["capture"]) or original(*a, **k))
    build, inputs, layers = FAMILIES[family]
    transformer = build().train()
    x1 = inputs(seed=1)
    eager, _ = _eager_maps(transformer, layers, [x1])

    def grads():
        return {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}

    # the gradients with checkpointing are those without it: the recomputation gives the same attention output
    with capture_attention(transformer, layers, store=_store()):
        transformer.zero_grad()
        transformer(**x1).sample.square().mean().backward()
        plain = grads()
    transformer.enable_gradient_checkpointing()
    try:
        with capture_attention(transformer, layers, store=_store()) as store:
            transformer.zero_grad()
            transformer(**x1).sample.square().mean().backward()  # the backward re-runs every block
            checkpointed = grads()
        # every captured attention ran twice (forward, recomputation in the backward); one step was recorded
        assert calls[-2 * len(layers):] == ["both"] * len(layers) + [None] * len(layers)
        assert set(store.steps_seen.values()) == {1}, store.steps_seen
        for kind in ("i2t", "t2i"):
            for layer, m in getattr(eager, kind).items():
                torch.testing.assert_close(getattr(store, kind)[layer], m, atol=1e-6, rtol=1e-5)
        assert plain.keys() == checkpointed.keys()
        for name, g in plain.items():
            torch.testing.assert_close(checkpointed[name], g, atol=1e-5, rtol=1e-4)

        # two forwards with different text lengths, then the backward of the first: the recomputation must not
        # read the second forward's context (a split at the wrong text length) nor record a third step
        x2 = inputs(seed=2, text_len=11)
        with capture_attention(transformer, layers, store=_store(steps={0})) as store:
            out1 = transformer(**x1).sample
            transformer(**x2)
            out1.sum().backward()
        assert set(store.steps_seen.values()) == {2} and all(v == [0] for v in store.kept_steps.values())
        for layer, m in eager.i2t.items():
            torch.testing.assert_close(store.i2t[layer], m, atol=1e-6, rtol=1e-5)  # T = 7, the first forward's
    finally:
        transformer.disable_gradient_checkpointing()


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("policy", [dict(steps={1}), dict(batch=[1])])
def test_gradient_checkpointing_with_steps_or_rows_not_kept(family, policy):
    """A step outside ``steps`` or rows outside ``batch`` ran the user's attention in the forward while the
    recomputation runs joint_attention: torch.utils.checkpoint refused the backward ("a different number of
    tensors was saved"). With checkpointing every row goes through joint_attention: each backward works, the
    gradients are those without checkpointing and the kept maps those of eager capture."""
    build, inputs, layers = FAMILIES[family]
    transformer = build().train()
    xs = [inputs(seed=1), inputs(seed=2)]
    eager, _ = _eager_maps(transformer, layers, xs, **policy)

    def run():
        grads = []
        with capture_attention(transformer, layers, store=_store(**policy)) as store:
            for x in xs:
                transformer.zero_grad()
                transformer(**x).sample.square().mean().backward()
                grads.append({n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None})
        return store, grads

    _, plain = run()
    transformer.enable_gradient_checkpointing()
    try:
        store, checkpointed = run()
    finally:
        transformer.disable_gradient_checkpointing()
    for g_plain, g_ckpt in zip(plain, checkpointed):
        assert g_plain.keys() == g_ckpt.keys()
        for name, g in g_plain.items():
            torch.testing.assert_close(g_ckpt[name], g, atol=1e-5, rtol=1e-4)
    assert store.kept_steps == eager.kept_steps
    for kind in ("i2t", "t2i"):
        for layer, m in getattr(eager, kind).items():
            torch.testing.assert_close(getattr(store, kind)[layer], m, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- swapped processors
@pytest.mark.parametrize("family,swap", [("sd3", "set_attn_processor"), ("sd3", "fuse_qkv_projections"),
                                         ("flux", "set_attn_processor"), ("cogview4", "set_attn_processor")])
def test_processor_swapped_after_register_is_refused_at_the_next_forward(family, swap):
    build, inputs, layers = FAMILIES[family]
    transformer = build()
    handle = register(transformer, layers, backend="torch")
    if swap == "fuse_qkv_projections":
        transformer.fuse_qkv_projections()  # SD3: replaces every processor by FusedJointAttnProcessor2_0
    elif family == "sd3":
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        transformer.set_attn_processor(JointAttnProcessor2_0())
    elif family == "cogview4":
        from diffusers.models.transformers.transformer_cogview4 import CogView4AttnProcessor

        for block in transformer.transformer_blocks:  # no set_attn_processor on this model: per layer
            block.attn1.set_processor(CogView4AttnProcessor())
    else:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        transformer.set_attn_processor(FluxAttnProcessor())
    with pytest.raises(RuntimeError, match=r"capture of 'transformer_blocks.0' was dropped: its processor was replaced "
                                           r"by \w+ after register\(\).*handle.remove\(\)"):
        with torch.no_grad():
            transformer(**inputs())
    assert not handle.store.maps
    with pytest.warns(UserWarning, match="was replaced while the capture was registered"):
        handle.remove()
    with torch.no_grad():
        transformer(**inputs())  # removed: the model runs as the user left it


def test_flux_fuse_qkv_projections_after_register_keeps_capturing():
    """Flux's fuse_qkv_projections fuses the projection weights and keeps the processors (they read
    attn.fused_projections): the capture goes on, with the same output and maps."""
    build, inputs, layers = FAMILIES["flux"]
    transformer = build()
    eager, ref = _eager_maps(transformer, layers, [inputs()])
    with capture_attention(transformer, layers, store=_store()) as store, torch.no_grad():
        transformer.fuse_qkv_projections()
        out = transformer(**inputs()).sample
    assert transformer.transformer_blocks[0].attn.fused_projections
    torch.testing.assert_close(out, ref[0], atol=1e-5, rtol=1e-5)
    for layer, m in eager.i2t.items():
        torch.testing.assert_close(store.i2t[layer], m, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rebuilding_a_capture_processor_with_type_proc_says_why(family):
    build, _, layers = FAMILIES[family]
    transformer = build()
    with capture_attention(transformer, layers, backend="torch"):
        procs = {type(m.processor) for m in transformer.modules()  # CogView4 has no attn_processors
                 if type(getattr(m, "processor", None)).__module__.startswith("seg4diff")}
        assert procs
        for cls in procs:
            with pytest.raises(TypeError, match=rf"{cls.__name__} is a seg4diff_fast capture processor: register\(\) "
                                                r"creates it.*IP-adapter.*handle.remove\(\) before load_ip_adapter"):
                cls()


def test_flux_ip_adapter_loader_meets_a_capture_processor():
    """diffusers' own Flux IP-adapter conversion rebuilds single-stream processors with type(proc)()."""
    transformer = tm.tiny_flux_transformer(num_layers=1, num_single_layers=1)
    inner, cross = transformer.inner_dim, transformer.config.joint_attention_dim
    state = {
        "image_proj": {"proj.weight": torch.zeros(4 * 32, 8)},
        "ip_adapter": {f"0.to_{kv}_ip.{w}": torch.zeros((inner, cross) if w == "weight" else (inner,))
                       for kv in "kv" for w in ("weight", "bias")},
    }
    with capture_attention(transformer, ["single_transformer_blocks.0"], backend="torch"):
        with pytest.raises(TypeError, match="CaptureFluxAttnProcessor is a seg4diff_fast capture processor"):
            transformer._convert_ip_adapter_attn_to_diffusers([state], low_cpu_mem_usage=False)


# ---------------------------------------------------------------------------------------------- text_index
BAD_TEXT_INDEX = [
    ([0.7, 1.9], TypeError, "text_index must hold ints.*0.7"),
    ([[0, 1], [2]], TypeError, "text_index must hold ints"),
    ([True, 1], TypeError, "text_index must hold ints.*True"),
    ([0, "1"], TypeError, "text_index must hold ints"),
    ([-1, 2], ValueError, "text_index positions must be >= 0"),
    ([], ValueError, "at least one text column"),
    (range(0), ValueError, "at least one text column"),
    (torch.tensor([[0, 1]]), ValueError, "text_index must be 1-D"),
    (torch.tensor([0.5]), TypeError, "integer dtype, got torch.float32"),
    (torch.tensor([True]), TypeError, "integer dtype, got torch.bool"),
    (np.array([1.0, 2.0]), TypeError, "integer dtype, got torch.float64"),
    (np.array([[1], [2]]), ValueError, "1-D"),
    ("012", TypeError, "text_index must be a 1-D sequence"),
    (5, TypeError, "text_index must be a 1-D sequence"),
    ({0, 1}, TypeError, "text_index must be a 1-D sequence"),
]


@pytest.mark.parametrize("text_index,exc,match", BAD_TEXT_INDEX, ids=[repr(b[0])[:30] for b in BAD_TEXT_INDEX])
def test_text_index_is_strict_at_construction(text_index, exc, match):
    with pytest.raises(exc, match=match):
        AttentionStore(text_index=text_index)


@pytest.mark.parametrize("good", [[3, 0, 3], (1,), range(2, 5), torch.tensor([4, 1], dtype=torch.int32),
                                  np.array([0, 6]), [np.int64(2)]])
def test_text_index_accepts_integer_sequences(good):
    store = AttentionStore(text_index=good)
    assert store.text_index.dtype == torch.long and store.text_index.tolist() == [int(i) for i in good]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_text_index_past_the_text_is_refused_before_the_forward(family):
    build, inputs, layers = FAMILIES[family]
    transformer = build()
    x = inputs()  # 6 or 7 text tokens
    text_len = x["encoder_hidden_states"].shape[1]
    with capture_attention(transformer, layers, text_index=[0, text_len], backend="torch") as store, torch.no_grad():
        with pytest.raises(ValueError, match=rf"text_index has position {text_len}, but this forward's text block has "
                                             rf"{text_len} tokens"):
            transformer(**x)
        assert not store.maps and not store.steps_seen
    with capture_attention(transformer, layers, text_index=[text_len - 1], backend="torch") as store, torch.no_grad():
        transformer(**x)
    assert all(m.shape[-1] == 1 for m in store.maps.values())


# ---------------------------------------------------------------------------------------------- load
def _saved(tmp_path):
    transformer = tm.tiny_sd3_transformer(num_layers=1)
    with capture_attention(transformer, [0], steps="all", backend="torch") as store, torch.no_grad():
        transformer(**tm.sd3_inputs())
    path = str(tmp_path / "maps.safetensors")
    store.save(path)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["seg4diff_fast"])
    return path, tensors, meta


def _rewrite(path, tensors, meta):
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=None if meta is None else {"seg4diff_fast": meta if isinstance(meta, str)
                                                                   else json.dumps(meta)})


BAD_FILES = {
    "bad JSON": (lambda t, m: (t, "{not json"), "metadata is not valid JSON"),
    "JSON list": (lambda t, m: (t, "[1, 2]"), "must be a JSON object, got list"),
    "missing keys": (lambda t, m: (t, {k: v for k, v in m.items() if k not in ("grid", "map_dtype")}),
                     r"lacks \['grid', 'map_dtype'\]"),
    "other format": (lambda t, m: (t, {**m, "format": "something/2"}), "unknown format 'something/2'"),
    "unknown dtype": (lambda t, m: (t, {**m, "map_dtype": "float8"}), "unknown map_dtype 'float8'"),
    "wrong type": (lambda t, m: (t, {**m, "grid": [6, 5]}), "metadata 'grid' has the wrong type"),
    "bad timesteps": (lambda t, m: (t, {**m, "timesteps": [0.5]}), "metadata 'timesteps' has the wrong type"),
    "bad option": (lambda t, m: (t, {**m, "capture": "everything"}), "bad seg4diff_fast metadata: capture must be"),
    "bad text_index": (lambda t, m: (t, {**m, "text_index": [0.5]}), "bad seg4diff_fast metadata: text_index"),
    "no metadata": (lambda t, m: (t, None), "has no seg4diff_fast metadata"),
    "tensor name": (lambda t, m: ({**t, "weights": torch.zeros(2)}, m), "tensor 'weights' is not a map"),
    "int tensor": (lambda t, m: ({k: v.int() for k, v in t.items()}, m), "expected a floating-point map"),
    "NaN tensor": (lambda t, m: ({k: v.index_fill(-1, torch.tensor([1]), float("nan")) for k, v in t.items()}, m),
                   r"tensor 'i2t/transformer_blocks.0' holds NaN or inf"),
    "inf tensor": (lambda t, m: ({k: v.index_fill(-1, torch.tensor([0]), float("inf")) for k, v in t.items()}, m),
                   r"tensor 'i2t/transformer_blocks.0' holds NaN or inf"),
    "missing tensor": (lambda t, m: ({"t2i/transformer_blocks.0": next(iter(t.values()))}, m),
                       r"lists layers \['transformer_blocks.0'\] that have no i2t tensor"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_load_says_what_is_wrong_with_the_file(tmp_path, case):
    path, tensors, meta = _saved(tmp_path)
    change, match = BAD_FILES[case]
    _rewrite(path, *change(tensors, meta))
    with pytest.raises(ValueError, match=match):
        AttentionStore.load(path)


def test_load_refuses_folders_missing_files_and_other_formats(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder"):
        AttentionStore.load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such file"):
        AttentionStore.load(str(tmp_path / "nothing.safetensors"))
    for name, data in (("image.png", b"\x89PNG\r\n\x1a\n" + bytes(64)), ("empty.safetensors", b""),
                       ("text.safetensors", b"hello world, not tensors")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="is not a readable safetensors file"):
            AttentionStore.load(str(tmp_path / name))


def test_a_loaded_store_cannot_be_registered(tmp_path):
    path, _, _ = _saved(tmp_path)
    loaded = AttentionStore.load(path)
    assert loaded.loaded and loaded.maps
    transformer = tm.tiny_sd3_transformer(num_layers=1)
    before = dict(transformer.attn_processors)
    with pytest.raises(ValueError, match=r"loaded from a file \(AttentionStore.load\) and is read-only"):
        register(transformer, [0], store=loaded)
    assert all(transformer.attn_processors[k] is p for k, p in before.items()) and not transformer._forward_pre_hooks
    with pytest.raises(TypeError, match="store must be an AttentionStore"):
        register(transformer, [0], store={"maps": 1})
