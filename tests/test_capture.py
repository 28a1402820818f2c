"""Capture processors on tiny random-weight SD3 / SD3.5 / Flux / Flux2 transformers (CPU, torch backend).

Every comparison is against diffusers' own default processor on the same input: the captured layer's output
(and the model's), and the maps against ``reference_joint_attention`` (float64) applied to the q, k, v that
the DEFAULT processor handed to SDPA (recorded by a spy on ``F.scaled_dot_product_attention``).
"""
from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import tiny_models as tm  # noqa: E402

from seg4diff_fast.capture import AttentionStore, capture_attention, layer_names, register  # noqa: E402
from seg4diff_fast.reference import reference_joint_attention  # noqa: E402

# family -> (transformer builder, inputs builder, text position: "end" for [image, text], "start" for [text, image])
FAMILIES = {
    "sd3": (lambda: tm.tiny_sd3_transformer(), tm.sd3_inputs, "end"),
    "sd35": (lambda: tm.tiny_sd3_transformer(sd35=True), tm.sd3_inputs, "end"),
    "flux": (lambda: tm.tiny_flux_transformer(), tm.flux_inputs, "start"),
    "flux2": (lambda: tm.tiny_flux2_transformer(), tm.flux2_inputs, "start"),
}
# every layer kind: SD3 joint + context_pre_only last block; SD3.5 dual-attention block (attn) + plain block;
# Flux / Flux2 double-stream and single-stream blocks.
CASES = [
    ("sd3", "transformer_blocks.0"),
    ("sd3", "transformer_blocks.1"),  # context_pre_only
    ("sd35", "transformer_blocks.0"),  # dual attention: attn (joint), attn2 untouched
    ("sd35", "transformer_blocks.1"),
    ("flux", "transformer_blocks.1"),
    ("flux", "single_transformer_blocks.1"),
    ("flux2", "transformer_blocks.0"),
    ("flux2", "single_transformer_blocks.0"),
]

_MODELS = {}


def model(family):
    if family not in _MODELS:
        _MODELS[family] = FAMILIES[family][0]()
    return _MODELS[family]


def attn_of(transformer, name):
    return transformer.get_submodule(name).attn


@contextlib.contextmanager
def spy(attn_module):
    """Record the attention module's output and the q, k, v its processor gives SDPA ([B, H, N, D])."""
    seen = {}
    active = [False]
    sdpa = F.scaled_dot_product_attention

    def fake_sdpa(*args, **kwargs):
        if active[0]:
            names = ("query", "key", "value")
            qkv = list(args[:3]) + [kwargs[n] for n in names[len(args[:3]):]]
            seen["qkv"] = tuple(t.detach().clone() for t in qkv)
        return sdpa(*args, **kwargs)

    def pre(mod, args, kwargs):
        active[0] = True

    def post(mod, args, kwargs, out):
        active[0] = False
        seen["out"] = tuple(o.detach().clone() for o in out) if isinstance(out, tuple) else out.detach().clone()

    hooks = [attn_module.register_forward_pre_hook(pre, with_kwargs=True),
             attn_module.register_forward_hook(post, with_kwargs=True)]
    F.scaled_dot_product_attention = fake_sdpa
    try:
        yield seen
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()


def text_bounds(position, n, text_len):
    return (n - text_len, n) if position == "end" else (0, text_len)


def max_rel(a, b):
    if isinstance(a, tuple):
        return max(max_rel(x, y) for x, y in zip(a, b))
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _triton_runs() -> bool:
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


TRITON_CASES = [("sd3", "transformer_blocks.1"), ("flux", "single_transformer_blocks.1"), ("flux2", "transformer_blocks.0")]


@pytest.mark.parametrize(
    "family,layer,backend",
    [(f, l, "torch") for f, l in CASES]
    + [pytest.param(f, l, "triton", marks=pytest.mark.skipif(not _triton_runs(), reason="no CUDA, no TRITON_INTERPRET"))
       for f, l in TRITON_CASES],
)
def test_output_and_maps_equal_default_and_reference(family, layer, backend):
    transformer = model(family)
    inputs = FAMILIES[family][1]()
    text_len = inputs["encoder_hidden_states"].shape[1]
    attn = attn_of(transformer, layer)
    with torch.no_grad(), spy(attn) as ref:
        out_ref = transformer(**inputs).sample
    store = AttentionStore(capture="both", heads="all", map_dtype=torch.float32, steps="all", batch="all", backend=backend)
    handle = register(transformer, layers=[layer], store=store)
    try:
        with torch.no_grad(), spy(attn) as got:
            out = transformer(**inputs).sample
    finally:
        handle.remove()
    assert "qkv" not in got  # the captured layer never called SDPA: attention ran once, in joint_attention
    assert max_rel(got["out"], ref["out"]) <= 1e-5  # the layer's output, relative to its scale
    assert max_rel(out, out_ref) <= 1e-5  # the whole model
    q, k, v = ref["qkv"]
    t0, t1 = text_bounds(FAMILIES[family][2], q.shape[2], text_len)
    _, i2t, t2i = reference_joint_attention(q, k, v, t0, t1, capture="both", heads="all")
    assert store.i2t[layer].shape == (1,) + i2t.shape
    torch.testing.assert_close(store.i2t[layer][0].double(), i2t, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(store.t2i[layer][0].double(), t2i, atol=1e-6, rtol=1e-5)
    h, w = store.grid[layer]
    assert h * w == i2t.shape[-2]
    expected_grid = inputs["hidden_states"].shape[-2:] if family.startswith("sd3") else None
    if expected_grid is not None:
        assert (h, w) == tuple(expected_grid)
    else:
        assert (h, w) == (int(inputs["img_ids"][:, 1].max()) + 1, int(inputs["img_ids"][:, 2].max()) + 1)


def test_steps_mean_batch_heads_text_index():
    transformer = model("flux")
    layer = "single_transformer_blocks.0"
    inputs = [tm.flux_inputs(seed=s) for s in (1, 2, 3)]
    with capture_attention(transformer, [layer], capture="i2t", heads="all", steps="all", batch="all",
                           map_dtype=torch.float32, backend="torch") as every, torch.no_grad():
        for x in inputs:
            transformer(**x)
    every = every.maps[layer]  # [S=3, B=2, H, N_img, T]
    idx = [0, 3, 3, 6]
    store = AttentionStore(capture="i2t", heads="mean", steps="mean", batch=[1], text_index=idx,
                           map_dtype=torch.float32, backend="torch")
    with capture_attention(transformer, [layer], store=store), torch.no_grad():
        for x in inputs:
            transformer(**x)
    expected = every[:, 1:2].mean(dim=2)[..., idx].mean(dim=0)  # steps mean, row 1, heads mean, columns
    torch.testing.assert_close(store.maps[layer], expected, atol=1e-6, rtol=1e-5)
    assert store.maps[layer].dtype == torch.float32 and store.steps_seen == {layer: 3}
    kept = AttentionStore(capture="i2t", steps={0, 2}, batch="all", map_dtype=torch.float16, backend="torch")
    with capture_attention(transformer, [layer], store=kept), torch.no_grad():
        for x in inputs:
            transformer(**x)
    assert kept.kept_steps == {layer: [0, 2]} and kept.steps_seen == {layer: 3}
    assert kept.maps[layer].dtype == torch.float16
    torch.testing.assert_close(kept.maps[layer].float(), every[[0, 2]].mean(dim=2), atol=1e-3, rtol=1e-3)


def test_remove_restores_the_same_processor_objects_and_integer_layers():
    transformer = model("flux")
    before = dict(transformer.attn_processors)
    handle = register(transformer, layers=[0, 2, 3], steps="all")  # 2 double-stream blocks: 2, 3 are single
    assert handle.layers == ["transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1"]
    assert layer_names(transformer)[2] == "single_transformer_blocks.0"
    changed = {k for k, p in transformer.attn_processors.items() if p is not before[k]}
    assert changed == {"transformer_blocks.0.attn.processor", "single_transformer_blocks.0.attn.processor",
                       "single_transformer_blocks.1.attn.processor"}
    handle.remove()
    after = transformer.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert "cache_context" not in vars(transformer) and not transformer._forward_pre_hooks


def test_errors():
    sd35 = model("sd35")
    with pytest.raises(ValueError, match="unknown layer .*valid layers: transformer_blocks.0, transformer_blocks.1"):
        register(sd35, layers=["transformer_blocks.7"])
    with pytest.raises(ValueError, match="out of range"):
        register(sd35, layers=[5])
    with pytest.raises(ValueError, match="attn2 is image-only"):
        register(sd35, layers=["transformer_blocks.0.attn2"])
    with pytest.raises(TypeError, match="capture does not know Linear; supported transformers: SD3Transformer2DModel"):
        register(torch.nn.Linear(2, 2), layers=[0])
    flux = model("flux")
    handle = register(flux, layers=[1])
    try:
        before = dict(flux.attn_processors)
        with pytest.raises(ValueError, match="already has a capture registered"):
            register(flux, layers=[0, 1])
        assert all(flux.attn_processors[k] is p for k, p in before.items())  # nothing half-installed
        # a single-stream block run on its own: its text length is unknown
    finally:
        handle.remove()
    with capture_attention(flux, ["single_transformer_blocks.0"]):
        block = flux.single_transformer_blocks[0]
        x = torch.randn(1, 9, 32)
        with pytest.raises(RuntimeError, match="text length of this forward is unknown"):
            block.attn(hidden_states=x)
    # capture on an attention with no text
    with capture_attention(sd35, ["transformer_blocks.1"]):
        with pytest.raises(ValueError, match="got no text"):
            sd35.transformer_blocks[1].attn(hidden_states=torch.randn(1, 4, 32))

    class Custom(type(flux.transformer_blocks[0].attn.processor)):
        pass

    old = flux.transformer_blocks[0].attn.processor
    flux.transformer_blocks[0].attn.set_processor(Custom())
    try:
        with pytest.raises(ValueError, match="runs Custom; capture replicates only FluxAttnProcessor"):
            register(flux, layers=[0])
    finally:
        flux.transformer_blocks[0].attn.set_processor(old)
    with pytest.raises(ValueError, match="steps must be"):
        AttentionStore(steps="last")
    with pytest.raises(ValueError, match="batch must be"):
        AttentionStore(batch="uncond")
    with pytest.raises(ValueError, match="capture must be one of"):
        AttentionStore(capture=None)
    with pytest.raises(ValueError, match="heads must be one of"):
        AttentionStore(heads="sum")
    with pytest.raises(ValueError, match="backend must be one of"):
        AttentionStore(backend="cuda")


def test_save_load_round_trip(tmp_path):
    transformer = model("sd3")
    with capture_attention(transformer, [1], capture="both", steps="all", batch="all", backend="torch") as store, \
            torch.no_grad():
        transformer(**tm.sd3_inputs())
        transformer(**tm.sd3_inputs(seed=2))
    path = str(tmp_path / "maps.safetensors")
    store.save(path)
    loaded = AttentionStore.load(path)
    for kind in ("i2t", "t2i"):
        a, b = getattr(store, kind), getattr(loaded, kind)
        assert a.keys() == b.keys() == {"transformer_blocks.1"}
        assert torch.equal(a["transformer_blocks.1"], b["transformer_blocks.1"])
    assert loaded.grid == store.grid == {"transformer_blocks.1": (6, 5)}
    assert loaded.steps_seen == {"transformer_blocks.1": 2} and loaded.kept_steps == store.kept_steps
    assert loaded.text_len == {"transformer_blocks.1": 7}
    assert (loaded.model_class, loaded.capture, loaded.map_dtype, loaded.steps) == (
        "SD3Transformer2DModel", "both", torch.float16, "all")
    mean = AttentionStore(steps="mean", text_index=[0, 2])
    with capture_attention(transformer, [0], store=mean), torch.no_grad():
        transformer(**tm.sd3_inputs())
    mean.save(path)
    again = AttentionStore.load(path)
    assert torch.equal(again.maps["transformer_blocks.0"], mean.maps["transformer_blocks.0"])
    assert again.text_index.tolist() == [0, 2] and again.steps_seen == {"transformer_blocks.0": 1}


def test_sd3_pipeline_cfg_two_steps():
    pipe = tm.tiny_sd3_pipeline()
    kwargs = dict(num_inference_steps=2, guidance_scale=5.0, height=8, width=12, max_sequence_length=8,
                  output_type="pt")
    plain = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    every = AttentionStore(steps="all", batch="all", map_dtype=torch.float32, backend="torch")
    cond = AttentionStore(steps="all", batch="cond", map_dtype=torch.float32, backend="torch")
    h1 = register(pipe, layers=[0], store=every)
    h2 = register(pipe, layers=[1], store=cond)
    images = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    h2.remove()
    h1.remove()
    torch.testing.assert_close(images, plain, atol=1e-5, rtol=1e-5)
    assert every.maps["transformer_blocks.0"].shape == (2, 2, 96, 16)  # [steps, uncond+cond, 8*12, 8 CLIP + 8 T5]
    assert cond.maps["transformer_blocks.1"].shape == (2, 1, 96, 16)  # the conditional half only
    assert cond.grid == {"transformer_blocks.1": (8, 12)} and cond.steps_seen == {"transformer_blocks.1": 2}
    with capture_attention(pipe, [1], steps="all", batch="all", map_dtype=torch.float32, backend="torch") as both:
        pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(cond.maps["transformer_blocks.1"], both.maps["transformer_blocks.1"][:, 1:])
    # no CFG: the whole batch is conditional
    with capture_attention(pipe, [1], steps="mean") as nocfg:
        pipe("a cat", generator=torch.Generator().manual_seed(0), **{**kwargs, "guidance_scale": 1.0})
    assert nocfg.maps["transformer_blocks.1"].shape == (1, 96, 16) and nocfg.steps_seen == {"transformer_blocks.1": 2}


def test_flux_pipeline_true_cfg_two_steps():
    pipe = tm.tiny_flux_pipeline()
    kwargs = dict(negative_prompt="", true_cfg_scale=2.0, num_inference_steps=2, height=8, width=12,
                  max_sequence_length=8, output_type="pt")
    plain = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    cond = AttentionStore(steps="all", map_dtype=torch.float32, backend="torch")
    # two handles on one transformer
    with capture_attention(pipe, [0], store=cond), capture_attention(pipe, [1], store=cond):
        images = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert "cache_context" not in vars(pipe.transformer)
    torch.testing.assert_close(images, plain, atol=1e-5, rtol=1e-5)
    # the uncond pass (cache_context("uncond")) is not a step
    assert cond.steps_seen == {"transformer_blocks.0": 2, "single_transformer_blocks.0": 2}
    assert cond.maps["single_transformer_blocks.0"].shape == (2, 1, 24, 8)  # [steps, B, (8/2)*(12/2), 8 T5 tokens]
    assert cond.grid["single_transformer_blocks.0"] == (4, 6)
    with capture_attention(pipe, [1], steps="all", batch="all", map_dtype=torch.float32, backend="torch") as every:
        pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs)
    assert every.steps_seen == {"single_transformer_blocks.0": 4}  # cond, uncond, cond, uncond
    torch.testing.assert_close(every.maps["single_transformer_blocks.0"][[0, 2]], cond.maps["single_transformer_blocks.0"])


def test_joint_attention_kwargs_reach_other_processors_and_attention_backend():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    transformer = model("flux")
    seen = []

    class Spy(FluxAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None, probe=None):
            seen.append(probe)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    old = transformer.transformer_blocks[1].attn.processor
    transformer.transformer_blocks[1].attn.set_processor(Spy())
    active = _AttentionBackendRegistry._active_backend  # set_attention_backend sets the global one too
    try:
        transformer.set_attention_backend("_native_math")
        inputs = tm.flux_inputs()
        with torch.no_grad():
            ref = transformer(**inputs, joint_attention_kwargs={"probe": 7}).sample
        with capture_attention(transformer, [0, 3], map_dtype=torch.float32, backend="torch") as store, torch.no_grad():
            out = transformer(**inputs, joint_attention_kwargs={"probe": 7}).sample
        assert seen == [7, 7]
        assert max_rel(out, ref) <= 1e-5 and set(store.maps) == {"transformer_blocks.0", "single_transformer_blocks.1"}
        assert transformer.single_transformer_blocks[0].attn.processor._attention_backend == "_native_math"
    finally:
        transformer.transformer_blocks[1].attn.set_processor(old)
        transformer.reset_attention_backend()
        _AttentionBackendRegistry._active_backend = active


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_fused_qkv_projections(family):
    transformer = FAMILIES[family][0]()
    inputs = FAMILIES[family][1]()
    transformer.fuse_qkv_projections()
    with torch.no_grad():
        ref = transformer(**inputs).sample
    with capture_attention(transformer, [0], map_dtype=torch.float32, backend="torch") as store, torch.no_grad():
        out = transformer(**inputs).sample
    assert max_rel(out, ref) <= 1e-5 and store.maps["transformer_blocks.0"].shape[0] == 2


def test_lora_loaded_model():
    peft = pytest.importorskip("peft")
    transformer = tm.tiny_flux_transformer(num_layers=1, num_single_layers=1)
    transformer.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj"]))
    inputs = tm.flux_inputs()
    with spy(transformer.transformer_blocks[0].attn) as ref, torch.no_grad():
        out_ref = transformer(**inputs).sample
    with capture_attention(transformer, [0], capture="i2t", heads="all", steps="all", batch="all",
                           map_dtype=torch.float32, backend="torch") as store, torch.no_grad():
        out = transformer(**inputs).sample
    assert max_rel(out, out_ref) <= 1e-5
    q, k, v = ref["qkv"]
    _, i2t, _ = reference_joint_attention(q, k, v, 0, 7, capture="i2t", heads="all")
    torch.testing.assert_close(store.maps["transformer_blocks.0"][0].double(), i2t, atol=1e-6, rtol=1e-5)


def test_model_cpu_offload():
    pipe = tm.tiny_sd3_pipeline()
    try:
        pipe.enable_model_cpu_offload(device="cpu")
    except Exception as e:  # accelerate refuses an offload to the CPU itself on some versions
        pytest.skip(f"enable_model_cpu_offload(device='cpu') not available here: {e}")
    kwargs = dict(num_inference_steps=2, guidance_scale=5.0, height=8, width=8, max_sequence_length=8, output_type="pt")
    with capture_attention(pipe, [0], steps="mean", backend="torch") as store:
        pipe("a cat", **kwargs)
    assert store.maps["transformer_blocks.0"].shape == (1, 64, 16) and store.steps_seen == {"transformer_blocks.0": 2}


def _graph_breaks(transformer, inputs):
    import torch._dynamo

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(transformer)(**inputs)
    return explanation.graph_break_count, explanation.break_reasons


def test_torch_compile_adds_no_graph_break():
    transformer = tm.tiny_flux_transformer(num_layers=1, num_single_layers=1)
    inputs = tm.flux_inputs()
    with torch.no_grad():
        base, _ = _graph_breaks(transformer, inputs)
        with capture_attention(transformer, [0, 1], backend="torch"):
            with_capture, reasons = _graph_breaks(transformer, inputs)
    assert with_capture == base, reasons


def test_torch_compile_fullgraph_mean_does_not_recompile_per_step():
    from torch._dynamo.utils import counters

    transformer = tm.tiny_flux_transformer(num_layers=1, num_single_layers=1)
    xs = [tm.flux_inputs(seed=s) for s in range(4)]
    eager = AttentionStore(map_dtype=torch.float32, backend="torch")
    with capture_attention(transformer, [0, 1], store=eager), torch.no_grad():
        ref = [transformer(**x).sample for x in xs]
    torch._dynamo.reset()
    counters.clear()
    compiled = AttentionStore(map_dtype=torch.float32, backend="torch")
    with capture_attention(transformer, [0, 1], store=compiled), torch.no_grad():
        fn = torch.compile(transformer, backend="eager", fullgraph=True)  # fullgraph: any graph break raises
        out = [fn(**x).sample for x in xs]
    assert counters["stats"]["unique_graphs"] == 1  # the graph never reads the store: its filling recompiles nothing
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
    for layer in eager.maps:
        torch.testing.assert_close(compiled.maps[layer], eager.maps[layer])
    assert compiled.steps_seen == {"transformer_blocks.0": 4, "single_transformer_blocks.0": 4}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family,layer", CASES)
def test_low_precision_within_sdpa_variation(family, layer, dtype, monkeypatch):
    """fp16 / bf16 models: the kernel's attention output is as close to the float64 result as SDPA's is, and the
    captured layer's output differs from the default's by no more than a few times that."""
    from seg4diff_fast.capture import base

    transformer = FAMILIES[family][0]().to(dtype)
    inputs = {k: v.to(dtype) for k, v in FAMILIES[family][1]().items()}
    attn = attn_of(transformer, layer)
    with torch.no_grad(), spy(attn) as ref:
        transformer(**inputs)
    kernel_out = []
    original = base.joint_attention

    def recording(*args, **kwargs):
        out, maps = original(*args, **kwargs)
        kernel_out.append(out)
        return out, maps

    monkeypatch.setattr(base, "joint_attention", recording)
    with torch.no_grad(), spy(attn) as got, capture_attention(transformer, [layer], backend="torch"):
        transformer(**inputs)
    q, k, v = ref["qkv"]
    exact = reference_joint_attention(q, k, v, 0, 1, capture=None)[0]
    scale = exact.abs().max()
    sdpa_err = ((F.scaled_dot_product_attention(q, k, v).double() - exact).abs().max() / scale).item()
    kernel_err = ((kernel_out[0].double() - exact).abs().max() / scale).item()
    assert kernel_err <= 2 * sdpa_err
    assert max_rel(got["out"], ref["out"]) <= 4 * sdpa_err


def test_remove_warns_when_the_capture_was_replaced():
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    transformer = tm.tiny_sd3_transformer()
    before = dict(transformer.attn_processors)
    handle = register(transformer, [0])
    transformer.set_attn_processor(JointAttnProcessor2_0())  # e.g. what fuse_qkv_projections() does
    with pytest.warns(UserWarning, match="was replaced while the capture was registered"):
        handle.remove()
    assert transformer.transformer_blocks[0].attn.processor is before["transformer_blocks.0.attn.processor"]


def test_sd3_grid_with_patch_size_2_and_register_on_a_compiled_module():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    ).eval()
    inputs = tm.sd3_inputs(batch=1, height=8, width=10)
    compiled = torch.compile(transformer, backend="eager")
    with capture_attention(compiled, [0], backend="torch") as store, torch.no_grad():  # registers on compiled._orig_mod
        compiled(**inputs)
    assert store.grid == {"transformer_blocks.0": (4, 5)}
    assert store.maps["transformer_blocks.0"].shape == (1, 20, 7)
    assert not transformer._forward_pre_hooks
