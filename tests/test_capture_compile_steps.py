"""Under torch.compile, steps outside a set of ``steps`` compute no maps.

The capture site reads a per-layer Python bool "is the next step kept" (``store._NextStep``) that the
``record_maps`` op updates at run time; dynamo guards on it, so a captured region has two graphs (kept / not
kept) and the guard picks one at each call. The spy is a dynamo backend that hands each graph to inductor's
``compile_fx`` (the default backend's compiler) and logs, at RUN time, which graph ran and whether that graph
holds the ``seg4diff_fast::joint_attention`` op (the maps) at all. Tiny random-weight transformers, CPU, torch
backend, float32; the maps are compared with an eager capture of the same inputs (tests/test_capture.py ties
those to the float64 reference).
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

# family -> (transformer, inputs(seed, timestep), captured layers: one joint layer, and for Flux a single-stream one)
FAMILIES = {
    "sd3": (lambda: tm.tiny_sd3_transformer(num_layers=2),
            lambda s, t: dict(tm.sd3_inputs(seed=s), timestep=torch.full((2,), t)), [0, 1]),
    "flux": (lambda: tm.tiny_flux_transformer(num_layers=1, num_single_layers=1),
             lambda s, t: dict(tm.flux_inputs(seed=s), timestep=torch.full((2,), t / 1000)), [0, 1]),
}
STEPS = 5
TIMESTEPS = [900.0, 700.0, 500.0, 300.0, 100.0]


class GraphSpy:
    """A dynamo backend: inductor's ``compile_fx`` on each graph dynamo gives it. ``graphs[i]``: whether graph
    ``i`` calls ``seg4diff_fast::joint_attention`` (computes maps); ``records[i]``: whether it calls
    ``seg4diff_fast::record_maps`` (holds a captured layer); ``ran``: the graph indices in the order they RAN
    (appended by the compiled callable itself, not at compile time)."""

    def __init__(self):
        self.graphs = []
        self.records = []
        self.ran = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        index = len(self.graphs)
        # every graph of the module: checkpointed regions are subgraphs (higher_order.tag_activation_checkpoint)
        targets = [str(n.target) for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes
                   if n.op == "call_function"]
        self.graphs.append(any("seg4diff_fast.joint_attention" in t for t in targets))
        self.records.append(any("seg4diff_fast.record_maps" in t for t in targets))
        compiled = compile_fx(gm, example_inputs)

        def run(*args):
            self.ran.append(index)
            return compiled(*args)

        run._boxed_call = getattr(compiled, "_boxed_call", False)  # dynamo calls a boxed graph with one list
        return run

    def maps_per_call(self):
        """Whether each graph run so far computed maps."""
        return [self.graphs[i] for i in self.ran]


def _store(steps):
    return AttentionStore(capture="both", heads="all", steps=steps, batch="all", map_dtype=torch.float32,
                          backend="torch")


def _inputs(family):
    inputs = FAMILIES[family][1]
    return [inputs(seed, t) for seed, t in zip(range(1, STEPS + 1), TIMESTEPS)]


def _eager(family, transformer, layers, steps):
    with capture_attention(transformer, layers, store=_store(steps)) as store, torch.no_grad():
        outs = [transformer(**x).sample for x in _inputs(family)]
    return store, outs


def _assert_same(store, eager):
    assert store.steps_seen == eager.steps_seen and store.kept_steps == eager.kept_steps
    assert store.timesteps == eager.timesteps and store.grid == eager.grid
    for kind in ("i2t", "t2i"):
        assert set(getattr(store, kind)) == set(getattr(eager, kind))
        for layer, m in getattr(eager, kind).items():
            torch.testing.assert_close(getattr(store, kind)[layer], m, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family,steps", [("sd3", {1, 3}), ("flux", {1, 3}), ("flux", {0}), ("flux", "all"),
                                          ("sd3", "mean")])
def test_inductor_computes_maps_only_at_kept_steps_with_two_graphs(family, steps):
    """fullgraph, inductor, two captured layers, 5 steps: the graph that ran computed maps at the kept steps only;
    two graphs for a set of steps (one per kind of step), one for "all" / "mean"; outputs and maps equal eager
    capture's."""
    from torch._dynamo.utils import counters

    build, _, layers = FAMILIES[family]
    transformer = build()
    eager, ref = _eager(family, transformer, layers, steps)
    torch._dynamo.reset()
    counters.clear()
    spy = GraphSpy()
    with capture_attention(transformer, layers, store=_store(steps)) as store, torch.no_grad():
        compiled = torch.compile(transformer, backend=spy, fullgraph=True)
        outs = [compiled(**x).sample for x in _inputs(family)]
    kept = [isinstance(steps, str) or s in steps for s in range(STEPS)]
    assert spy.maps_per_call() == kept, (spy.graphs, spy.ran)
    assert len(spy.graphs) == counters["stats"]["unique_graphs"] == len(set(kept)), dict(counters["stats"])
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    _assert_same(store, eager)


def _break_before(module):
    """A graph break just before ``module`` runs (a forward pre-hook that dynamo cannot trace through)."""
    return module.register_forward_pre_hook(lambda *args: torch._dynamo.graph_break())


def test_graph_break_between_captured_layers_in_place_compile_and_reset_between_runs(caplog):
    """The default fullgraph=False with a graph break between the two captured layers (Flux's double- and
    single-stream blocks), ``transformer.compile()`` in place, and a second run of 5 steps after
    ``store.reset()``: at every step each captured region's graph computes maps iff the step is kept. The
    region after the break is guarded by its own layer's flag, which the first layer's record op (already run
    in this forward) has not touched. Two graphs per region, none added by the second run, and dynamo warns of
    no recompile limit even at recompile_limit=2. (In place, diffusers' blocks compile as frames of their own.)"""
    import logging

    from torch._dynamo.utils import counters

    build, _, layers = FAMILIES["flux"]
    transformer = build()
    steps = {1, 3}
    eager, ref = _eager("flux", transformer, layers, steps)
    torch._dynamo.reset()
    counters.clear()
    spy = GraphSpy()
    hook = _break_before(transformer.single_transformer_blocks[0])
    try:
        store = _store(steps)
        with register(transformer, layers, store=store), torch.no_grad(), \
                torch._dynamo.config.patch(recompile_limit=2), caplog.at_level(logging.WARNING):
            transformer.compile(backend=spy)
            per_run = []
            for run in range(2):
                per_step, outs = [], []
                for x in _inputs("flux"):
                    start = len(spy.ran)
                    outs.append(transformer(**x).sample)
                    per_step.append([spy.graphs[i] for i in spy.ran[start:]])
                per_run.append((per_step, outs))
                if run == 0:
                    _assert_same(store, eager)
                    store.reset()
    finally:
        hook.remove()
        transformer._compiled_call_impl = None  # undo transformer.compile() (nn.Module keeps it on the instance)
    for per_step, outs in per_run:
        for step, ran in enumerate(per_step):
            # the graphs of one step: the part with the double-stream layer, then the part with the single one
            with_maps = [m for m in ran if m]
            assert len(with_maps) == (2 if step in steps else 0), (step, ran, spy.graphs)
        for a, b in zip(outs, ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    _assert_same(store, eager)
    # the two captured regions have two graphs each (kept, not kept); the graphs around them one each
    assert sum(spy.graphs) == 2 and sum(spy.records) == 4, (spy.graphs, spy.records)
    assert counters["stats"]["unique_graphs"] == len(spy.graphs)
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage() or "cache_size" in r.getMessage()]


def test_removed_handle_is_not_used_by_the_compiled_graph():
    """Compile with a capture, remove the handle: the next calls (same compiled module) run the model's own
    processors (outputs equal the plain model's), record nothing into the old store, and a new registration on
    the same compiled module records its own kept steps only."""
    build, _, layers = FAMILIES["sd3"]
    transformer = build()
    xs = _inputs("sd3")
    with torch.no_grad():
        plain = [transformer(**x).sample for x in xs]
    eager, _ = _eager("sd3", transformer, layers, {1})
    torch._dynamo.reset()
    spy = GraphSpy()
    compiled = torch.compile(transformer, backend=spy)
    with torch.no_grad():
        old = _store({0, 1})
        with register(compiled, layers, store=old):
            compiled(**xs[0])
        assert old.kept_steps == {f"transformer_blocks.{i}": [0] for i in layers}
        start = len(spy.ran)
        outs = [compiled(**x).sample for x in xs]
        assert not any(spy.graphs[i] for i in spy.ran[start:])  # no graph with maps ran after remove()
        assert old.steps_seen == {f"transformer_blocks.{i}": 1 for i in layers}
        for a, b in zip(outs, plain):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        with capture_attention(compiled, layers, store=_store({1})) as new:
            for x in xs:
                compiled(**x)
    _assert_same(new, eager)


def test_gradient_checkpointing_under_compile_records_kept_steps_once():
    """Training forwards with gradient checkpointing, compiled (inductor): the backward recomputes inside the
    compiled graph and records nothing; maps at the kept steps only, as eager capture's; the gradients are those
    of the plain model (no capture, no checkpointing)."""
    build, _, layers = FAMILIES["flux"]
    transformer = build().train()
    xs = _inputs("flux")

    def grads(fn, x):
        transformer.zero_grad()
        fn(**x).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}

    plain = [grads(transformer, x) for x in xs]
    eager, _ = _eager("flux", transformer, layers, {1, 3})
    transformer.enable_gradient_checkpointing()
    torch._dynamo.reset()
    spy = GraphSpy()
    with capture_attention(transformer, layers, store=_store({1, 3})) as store:
        compiled = torch.compile(transformer, backend=spy)
        checkpointed = [grads(compiled, x) for x in xs]
    assert spy.maps_per_call() == [False, True, False, True, False], (spy.graphs, spy.ran)
    assert len(spy.graphs) == 2
    _assert_same(store, eager)
    for got, want in zip(checkpointed, plain):
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4)
