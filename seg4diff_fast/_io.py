"""Writing files and folders whole or not at all: a temporary name beside the target, then a rename; and reading
the text files users give us (class lists, captions, JSON) as they save them.

A crash leaves either the old file (folder) or the new one, never half of one. Used by every writer of the package
(maps, segmentation outputs, evaluation results, benchmark results).

- Modes: what is written gets the mode a plain ``open(path, "w")`` / ``os.makedirs`` would give, ``0o666`` /
  ``0o777`` minus the umask (``tempfile`` alone would leave ``0o600`` / ``0o700``).
- Temporary names are ``.tmp-<host>-<pid>-...``: :func:`clean_temporaries` removes those left by a process of
  this host that is no longer alive (a crash, a kill), and never those of a live writer.
- Text users save (:func:`read_text`, :func:`read_lines`, :func:`read_json`): UTF-8 with or without a byte-order
  mark (Windows Notepad writes one), UTF-16 with its mark, and any line ending (``\\n``, ``\\r\\n``, ``\\r``).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
from contextlib import contextmanager

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_folder", "clean_temporaries", "current_umask",
           "check_writable_folder", "pid_alive", "read_text", "read_lines", "read_json", "HOST"]

HOST = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"
_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _umask_lock:  # elsewhere: set and restore (a short window in which the umask is 0o022)
        old = os.umask(0o022)
        os.umask(old)
    return old


def _tmp_prefix() -> str:
    return f".tmp-{HOST}-{os.getpid()}-"


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` (creating its folder) through a temporary file and ``os.replace``."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=_tmp_prefix(), suffix="-" + os.path.basename(path)[:80])
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
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


@contextmanager
def atomic_folder(path: str, replace: bool = True):
    """Build a folder whole or not at all: yields a temporary folder beside ``path``; on success it takes
    ``path``'s place (an existing ``path`` is replaced; with ``replace=False`` a non-empty ``path`` that exists by
    then, e.g. written meanwhile by another process, is kept and ``FileExistsError`` raised), on any error it is
    removed and ``path`` is untouched.

    Replacing an existing folder takes two renames (old -> ``.tmp-...-old``, new -> ``path``); a crash between
    them leaves the old folder under its temporary name (removed by :func:`clean_temporaries`) and no ``path``:
    never a mix of old and new files."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path} exists and is not a folder")
    tmp = tempfile.mkdtemp(dir=parent, prefix=_tmp_prefix(), suffix="-" + os.path.basename(path)[:80])
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
        if not replace and os.path.isdir(path) and os.listdir(path):  # an empty folder holds nothing to lose
            raise FileExistsError(f"{path} exists (written by another run meanwhile?): kept, this result not written")
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=_tmp_prefix(), suffix="-old")
            os.rename(path, os.path.join(old, "x"))
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)  # onto a folder made meanwhile: fails unless that one is empty (nothing lost)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (a process of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_temporaries(folder: str, recursive: bool = True) -> int:
    """Remove ``.tmp-<host>-<pid>-*`` files and folders under ``folder`` left by dead processes of this host.
    Returns how many were removed."""
    removed = 0
    if not os.path.isdir(folder):
        return 0
    prefix = f".tmp-{HOST}-"
    for root, dirs, files in os.walk(folder):
        for name in list(dirs) + files:
            if not name.startswith(prefix):
                continue
            pid = name[len(prefix):].split("-", 1)[0]
            if not pid.isdigit() or pid_alive(int(pid)):
                continue
            full = os.path.join(root, name)
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full, ignore_errors=True)
                dirs.remove(name)
            else:
                try:
                    os.unlink(full)
                except FileNotFoundError:
                    pass
            removed += 1
        if not recursive:
            break
    return removed


def check_writable_folder(path: str, argument: str = "--out") -> None:
    """Raise ``ValueError`` naming ``argument`` when ``path`` cannot be an output folder: it is a file, a parent
    is a file, or the nearest existing ancestor is not writable. Leaves nothing behind: writability is tried with a
    temporary folder made and removed there (``os.access`` says yes to root, also where the file system refuses:
    /proc, a root-squashed NFS share)."""
    p = os.path.abspath(path)
    if os.path.exists(p) and not os.path.isdir(p):
        raise ValueError(f"{argument}: {path!r} is a file, not a folder")
    probe = p
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ValueError(f"{argument}: cannot create {path!r}: {probe!r} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{argument}: cannot write in {probe!r} (permission denied)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=_tmp_prefix() + "probe-", dir=probe))
    except OSError as e:
        raise ValueError(f"{argument}: cannot write in {probe!r} ({e.strerror or e})") from None


def read_text(path: str, argument: str = "file") -> str:
    """The text of ``path`` as a user saved it: UTF-8 (a leading byte-order mark dropped) or UTF-16 with its mark;
    line endings ``\\r\\n`` and ``\\r`` read as ``\\n``. ``ValueError`` naming ``argument`` and the file when it is
    not such text (undecodable, or holding NUL characters: binary, or UTF-16 without its mark);
    ``FileNotFoundError`` when it does not exist."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{argument}: no such file {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"{argument}: {path!r} is a folder, not a text file")
    with open(path, "rb") as f:
        raw = f.read()
    encoding = "utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"  # each drops its mark
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise ValueError(f"{argument}: cannot read {path!r} as UTF-8 or UTF-16 text ({e})") from None
    if "\x00" in text:  # UTF-16 without its mark decodes as UTF-8 with a NUL after each letter
        raise ValueError(f"{argument}: {path!r} holds NUL characters: not a text file, or UTF-16 without a "
                         "byte-order mark (save it as UTF-8)")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_lines(path: str, argument: str = "file", ids: bool = False) -> list:
    """The non-empty lines of :func:`read_text`, each stripped of surrounding whitespace (one name a line).

    ``ids=True``: the line numbers are ids (a class list whose label values are line numbers): a blank line before
    the last name, which would shift every later id, and a file of no names are refused (``ValueError``);
    blank lines after the last name are dropped."""
    lines = [line.strip() for line in read_text(path, argument).split("\n")]
    names = [line for line in lines if line]
    if ids:
        if not names:
            raise ValueError(f"{argument}: {path!r} holds no names")
        blank = next((i for i, line in enumerate(lines) if not line), len(lines))
        last = max(i for i, line in enumerate(lines) if line)
        if blank < last:
            raise ValueError(f"{argument}: line {blank + 1} of {path!r} is blank; the names' line numbers are their "
                             "ids (label values), so a blank line would shift every later name: remove it, or name "
                             "the unused id")
    return names


def read_json(path: str, argument: str = "file"):
    """The JSON document of ``path`` (read by :func:`read_text`); ``ValueError`` naming ``argument`` and the file
    when it is empty, cut or not JSON."""
    text = read_text(path, argument)
    try:
        return json.loads(text)
    except ValueError as e:
        what = "is empty" if not text.strip() else f"is not valid JSON ({e})"
        raise ValueError(f"{argument}: {path!r} {what}") from None
