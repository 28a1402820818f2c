"""An optional feature whose dependency is absent says what to install; one whose dependency is installed but fails to
import shows that real error (never a guess about extras). "Installed but broken" is simulated with a finder that
raises what transformers 5.25 raised from a repository-root shadowed ``kernels``."""
import sys
import types

import numpy as np
import pytest

from seg4diff_fast._optional import import_failure, is_missing

REAL = "cannot import name 'CUDAProperties' from 'kernels' (/somewhere/kernels/__init__.py)"


class _Broken:
    """A sys.meta_path finder under which importing ``name`` fails inside the (installed) package."""

    def __init__(self, name):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            raise ImportError(REAL, name="kernels")
        return None


@pytest.fixture
def broken(monkeypatch):
    def make(name):
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, mod)
        monkeypatch.setattr(sys, "meta_path", [_Broken(name)] + sys.meta_path)
    return make


@pytest.fixture
def missing(monkeypatch):
    def make(name):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` -> ModuleNotFoundError(name=name)
    return make


def test_is_missing():
    assert is_missing(ModuleNotFoundError("x", name="matplotlib"), "matplotlib")
    assert is_missing(ModuleNotFoundError("x", name="matplotlib"), "matplotlib.pyplot")
    assert not is_missing(ModuleNotFoundError("x", name="matplotlib._c_internal_utils"), "matplotlib")
    assert not is_missing(ModuleNotFoundError("x", name="kernels"), "peft")
    assert not is_missing(ImportError(REAL, name="kernels"), "peft")
    assert not is_missing(ImportError("x"), "peft")


def test_import_failure_finds_the_real_cause_in_diffusers_wrapping():
    try:
        try:
            try:
                raise ImportError(REAL)
            except ImportError as e:
                raise RuntimeError("Failed to import diffusers.loaders.peft because of the following error (look up "
                                   f"to see its traceback):\n{e}") from e
        except RuntimeError as e:
            raise RuntimeError("Failed to import diffusers.models.transformers.transformer_flux because of the "
                               f"following error (look up to see its traceback):\n{e}") from e
    except RuntimeError as e:
        assert import_failure(e) == f"ImportError: {REAL}"
    assert import_failure(ValueError("401 gated")) is None


@pytest.mark.parametrize("state", ["missing", "broken"])
def test_heatmaps(state, missing, broken):
    from seg4diff_fast.segmentation.visualize import heatmap

    (missing if state == "missing" else broken)("matplotlib")
    if state == "missing":
        with pytest.raises(RuntimeError, match=r"heatmaps need matplotlib \(pip install matplotlib"):
            heatmap(np.ones((2, 2)))
    else:
        with pytest.raises(ImportError, match="CUDAProperties") as e:
            heatmap(np.ones((2, 2)))
        assert "pip install" not in str(e.value)


@pytest.mark.parametrize("state", ["missing", "broken"])
def test_cli_heatmap_check(state, missing, broken):
    from seg4diff_fast.cli import UsageError
    from seg4diff_fast.segmentation.commands import _check_heatmaps_possible

    (missing if state == "missing" else broken)("matplotlib")
    args = types.SimpleNamespace(no_heatmaps=False)
    if state == "missing":
        with pytest.raises(UsageError, match="--no-heatmaps"):
            _check_heatmaps_possible(args)
    else:
        with pytest.raises(ImportError, match="CUDAProperties"):
            _check_heatmaps_possible(args)


@pytest.mark.parametrize("state", ["missing", "broken"])
def test_video_files(state, missing, broken, tmp_path):
    from seg4diff_fast.segmentation.images import read_video

    (missing if state == "missing" else broken)("av")
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"not decoded: the import comes first")
    with pytest.raises(ImportError) as e:
        read_video(str(path))
    if state == "missing":
        assert "seg4diff-fast[video]" in str(e.value)
    else:
        assert "CUDAProperties" in str(e.value) and "pip install" not in str(e.value)


@pytest.mark.parametrize("state", ["missing", "broken"])
def test_training(state, missing, broken, tmp_path, monkeypatch):
    from seg4diff_fast.magnet import train as train_module

    monkeypatch.setattr(train_module.TrainConfig, "check", lambda self: self)
    (missing if state == "missing" else broken)("peft")
    if state == "missing":
        with pytest.raises(RuntimeError, match=r"\[train\] extra"):
            train_module.train(train_module.TrainConfig())
    else:
        with pytest.raises(ImportError, match="CUDAProperties") as e:
            train_module.train(train_module.TrainConfig())
        assert "extra" not in str(e.value)


def test_pipeline_loading_names_the_import_failure(monkeypatch):
    """diffusers wraps a failing lazy import in a RuntimeError; the loader must show it, not a hub hint."""
    from seg4diff_fast.segmentation.segmenter import load_pipeline

    class Lazy(types.ModuleType):
        def __getattr__(self, name):
            try:
                raise ImportError(REAL)
            except ImportError as e:
                raise RuntimeError(f"Failed to import diffusers.pipelines because of the following error (look up "
                                   f"to see its traceback):\n{e}") from e

    monkeypatch.setitem(sys.modules, "diffusers", Lazy("diffusers"))
    with pytest.raises(RuntimeError) as e:
        load_pipeline("some/sd3-model", family="sd3", device="cpu", local_files_only=True)
    assert "CUDAProperties" in str(e.value) and "hub" not in str(e.value)
