"""Files are written whole or not at all (seg4diff_fast._io), by every writer of the package."""
import os

import pytest
import torch

from seg4diff_fast._io import atomic_write_bytes, atomic_write_json
from seg4diff_fast.capture import AttentionStore


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "out.json"
    atomic_write_json(str(path), {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(str(path), b"half")
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert os.listdir(path.parent) == ["out.json"]


def test_store_save_goes_through_the_atomic_writer(tmp_path, monkeypatch):
    store = AttentionStore(capture="i2t", steps="mean", batch="all")
    store._record("transformer_blocks.0", {"i2t": torch.rand(1, 6, 3)}, (2, 3))
    path = tmp_path / "maps.safetensors"
    store.save(str(path))
    before = path.read_bytes()
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        store.save(str(path))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["maps.safetensors"]
    loaded = AttentionStore.load(str(path))
    torch.testing.assert_close(loaded.maps["transformer_blocks.0"], store.maps["transformer_blocks.0"])
