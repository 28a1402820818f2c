"""Writing files whole or not at all: a temporary name in the same folder, then ``os.replace``.

A crash leaves either the old file or the new one, never half of one. Used by every writer of the package
(maps, segmentation outputs, evaluation results, benchmark results).
"""
from __future__ import annotations

import json
import os
import tempfile

__all__ = ["atomic_write_bytes", "atomic_write_json"]


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` (creating its folder) through a temporary file and ``os.replace``."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str, obj, indent: int = 2) -> None:
    """``obj`` as JSON (UTF-8, newline-terminated) through :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode())
