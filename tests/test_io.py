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


# -- text files as users save them (issue 19: a byte-order mark became part of the first class name) -------------

from seg4diff_fast._io import read_json, read_lines, read_text  # noqa: E402

SAVED = {
    "plain": "cat\ndog\n".encode(),
    "bom": "\ufeffcat\ndog\n".encode(),  # Windows Notepad's "UTF-8"
    "crlf": b"cat\r\ndog\r\n",
    "bom+crlf": "\ufeffcat\r\ndog\r\n".encode(),
    "cr": b"cat\rdog",
    "utf-16": "cat\r\ndog\r\n".encode("utf-16"),  # Notepad's "Unicode": UTF-16 LE with its mark
    "utf-16-be": "\ufeffcat\ndog".encode("utf-16-be"),
}


@pytest.mark.parametrize("kind", SAVED)
def test_text_is_read_as_users_save_it(tmp_path, kind):
    path = tmp_path / "classes.txt"
    path.write_bytes(SAVED[kind])
    assert read_lines(str(path)) == ["cat", "dog"]
    assert read_text(str(path)).replace("\n", "") == "catdog"
    (tmp_path / "x.json").write_bytes(b'\xef\xbb\xbf{"a": ["b"]}\r\n' if kind.startswith("bom") else b'{"a": ["b"]}')
    assert read_json(str(tmp_path / "x.json")) == {"a": ["b"]}


def test_unreadable_text_names_the_file(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"--classes-file: cannot read .*latin1\.txt.* as UTF-8"):
        read_lines(str(tmp_path / "latin1.txt"), "--classes-file")
    for content, what in [(b"", "is empty"), (b'{"a": ', "not valid JSON"), (b"\xef\xbb\xbf", "is empty")]:
        (tmp_path / "cut.json").write_bytes(content)
        with pytest.raises(ValueError, match=rf"captions\.json: .*cut\.json.* {what}"):
            read_json(str(tmp_path / "cut.json"), "captions.json")
    (tmp_path / "u16.txt").write_bytes("cat\ndog\n".encode("utf-16-le"))  # no byte-order mark: NULs in UTF-8
    with pytest.raises(ValueError, match=r"u16\.txt.* holds NUL characters"):
        read_lines(str(tmp_path / "u16.txt"))
    with pytest.raises(FileNotFoundError, match=r"absent\.txt"):
        read_text(str(tmp_path / "absent.txt"))
    with pytest.raises(ValueError, match="is a folder"):
        read_text(str(tmp_path))
