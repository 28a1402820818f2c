"""The context manager is ``seg4diff_fast.capture_attention``; ``seg4diff_fast.capture`` is the subpackage (issue 18:
one public name was both). The function's old spellings still work and raise a DeprecationWarning that points at
the caller's line; the new name does not warn; the subpackage's modules import as before."""
from __future__ import annotations

import warnings

import pytest
import torch

import seg4diff_fast
import tiny_models as tm

LAYER = "transformer_blocks.1"


@pytest.fixture(scope="module")
def transformer():
    return tm.tiny_sd3_transformer()


def _maps(transformer, capture_fn) -> torch.Tensor:
    """The layer's i2t maps captured inside ``with capture_fn(...)``; the processors are back afterwards."""
    before = transformer.get_submodule(LAYER).attn.processor
    with capture_fn(transformer, [LAYER], map_dtype=torch.float32, backend="torch") as store, torch.no_grad():
        transformer(**tm.sd3_inputs())
    assert transformer.get_submodule(LAYER).attn.processor is before
    return store.maps[LAYER]


def _one_deprecation(record) -> None:
    got = [w for w in record if issubclass(w.category, DeprecationWarning)]
    assert got, "no DeprecationWarning"
    assert all("seg4diff_fast.capture_attention" in str(w.message) for w in got), [str(w.message) for w in got]
    assert all(w.filename == __file__ for w in got), [w.filename for w in got]  # the caller's line, not ours


def test_new_name_does_not_warn(transformer):
    from seg4diff_fast.capture import capture_attention

    assert capture_attention is seg4diff_fast.capture_attention
    assert "capture_attention" in seg4diff_fast.__all__ and "capture" not in seg4diff_fast.__all__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        maps = _maps(transformer, seg4diff_fast.capture_attention)
    assert maps.shape[-2] == 6 * 5  # the image tokens of sd3_inputs' 6 x 5 grid


def test_old_spellings_warn_and_capture_the_same_maps(transformer):
    want = _maps(transformer, seg4diff_fast.capture_attention)
    with pytest.warns(DeprecationWarning) as record:  # seg4diff_fast.capture(pipe, ...)
        got = _maps(transformer, seg4diff_fast.capture)
    _one_deprecation(record)
    assert torch.equal(got, want)

    from seg4diff_fast import capture  # the subpackage, callable

    with pytest.warns(DeprecationWarning) as record:
        got = _maps(transformer, capture)
    _one_deprecation(record)
    assert torch.equal(got, want)

    with pytest.warns(DeprecationWarning) as record:
        from seg4diff_fast.capture import capture as old_function
    _one_deprecation(record)
    assert old_function is seg4diff_fast.capture_attention


def test_the_subpackage_keeps_its_name():
    import types

    import seg4diff_fast.capture.store
    from seg4diff_fast.capture.handle import register

    assert isinstance(seg4diff_fast.capture, types.ModuleType)
    assert seg4diff_fast.capture.store.AttentionStore is seg4diff_fast.AttentionStore
    assert register is seg4diff_fast.register
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        seg4diff_fast.capture.nope  # noqa: B018
