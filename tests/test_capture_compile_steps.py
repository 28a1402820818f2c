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

from seg4diff_fast.capture import AttentionStore, capture, register  # noqa: E402

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
    ``i`` calls ``seg4diff_fast::joint_attention`` (computes maps); ``ran``: the graph indices in the order they
    RAN (appended by the compiled callable itself, not at compile time)."""

    def __init__(self):
        self.graphs = []
        self.ran = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        index = len(self.graphs)
        self.graphs.append(any("seg4diff_fast.joint_attention" in str(n.target) for n in gm.graph.nodes
                               if n.op == "call_function"))
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
    with capture(transformer, layers, store=_store(steps)) as store, torch.no_grad():
        outs = [transformer(**x).sample for x in _inputs(family)]
    return store, outs


def _assert_same(store, eager):
    assert store.steps_seen == eager.steps_seen and store.kept_steps == eager.kept_steps
    assert store.timesteps == eager.timesteps and store.grid == eager.grid
    for kind in ("i2t", "t2i"):
        assert set(getattr(store, kind)) == set(getattr(eager, kind))
        for layer, m in getattr(eager, kind).items():
            torch.testing.assert_close(getattr(store, kind)[layer], m, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_inductor_computes_maps_only_at_kept_steps_with_two_graphs(family):
    """fullgraph, inductor, two captured layers, steps={1, 3} over 5 steps: the graph that ran computed maps at
    steps 1 and 3 only; two graphs in all; outputs and maps equal eager capture's."""
    from torch._dynamo.utils import counters

    build, _, layers = FAMILIES[family]
    transformer = build()
    eager, ref = _eager(family, transformer, layers, {1, 3})
    torch._dynamo.reset()
    counters.clear()
    spy = GraphSpy()
    with capture(transformer, layers, store=_store({1, 3})) as store, torch.no_grad():
        compiled = torch.compile(transformer, backend=spy, fullgraph=True)
        outs = [compiled(**x).sample for x in _inputs(family)]
    assert spy.maps_per_call() == [False, True, False, True, False], (spy.graphs, spy.ran)
    assert len(spy.graphs) == 2 and counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    _assert_same(store, eager)
