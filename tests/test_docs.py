"""The README and docs/ run as written: every code block, every relative link.

Each fenced block of README.md and docs/*.md has a language: ``python`` and ``bash`` blocks run, on the CPU, in
document order, in one temporary folder per page (``examples/`` and ``benchmarks/`` linked into it, so that the
paths of the pages work as typed); ``text`` blocks are not code. A ``python`` or ``bash`` block that cannot run here
(a GPU, model weights, a dataset, a download, ``pip install``, minutes of work) carries ``<!-- not run: reason -->``
on the line right before its fence, and nothing else is skipped.

- ``python`` blocks of a page run in this process, in one namespace (a page reads as one session).
- ``bash`` blocks run in a subprocess, ``bash -euo pipefail``, with ``seg4diff-fast`` the package's console script
  (this interpreter, this checkout's code) and ``python`` this interpreter.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
LANGUAGES = ("python", "bash", "text")
NOT_RUN = re.compile(r"^<!-- not run: (?P<reason>\S.*?) -->$")
FENCE = re.compile(r"^```(?P<lang>\S*)\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)\)")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_run: Optional[str]  # the reason, when marked

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.lang in ("python", "bash") and self.not_run is None


def blocks(page: Path) -> List[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            i += 1
        if i == len(lines):
            raise AssertionError(f"{page.relative_to(ROOT)}:{start + 1}: a code block is never closed")
        marker = NOT_RUN.match(lines[start - 1].strip()) if start > 0 else None
        found.append(Block(page, start + 1, m.group("lang"), "\n".join(lines[start + 1:i]) + "\n",
                           marker.group("reason") if marker else None))
        i += 1
    return found


def test_pages_exist():
    names = {p.name for p in PAGES[1:]}
    assert {"README.md", "01-kernels.md", "08-reliability.md"} <= names, names
    assert len(PAGES[0].read_text(encoding="utf-8").splitlines()) <= 220, "README.md is a front page (about 200 lines)"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_blocks_are_marked(page):
    """Every block has a language; a ``not run`` marker stands before a python or bash block, nowhere else."""
    text = page.read_text(encoding="utf-8").splitlines()
    marked_lines = {i + 1 for i, l in enumerate(text) if l.strip().startswith("<!-- not run")}
    for b in blocks(page):
        assert b.lang in LANGUAGES, f"{b.where}: a code block's language must be one of {LANGUAGES}, not {b.lang!r}"
        if b.not_run is not None:
            assert b.lang in ("python", "bash"), f"{b.where}: a 'not run' marker before a {b.lang} block"
            marked_lines.discard(b.line - 1)
    assert not marked_lines, f"{page.name}: markers not right before a python or bash block: lines {marked_lines}"


def test_readme_setup_commands():
    """The install and test commands that CI runs are in the README's first screen, exactly."""
    readme = blocks(ROOT / "README.md")
    first = [b for b in readme if b.line <= 60 and b.lang == "bash"]
    commands = [c.strip() for b in first for line in b.code.splitlines() for c in line.split("#")[0].split("&&")]
    assert 'pip install -e ".[diffusers]"' in commands or 'pip install -e ".[test]"' in commands, commands
    assert "python -m pytest -q" in commands, commands


def test_readme_examples_run():
    """The README's Python example and its command line are among the blocks that run (not marked away)."""
    readme = [b for b in blocks(ROOT / "README.md") if b.runs]
    assert any(b.lang == "python" and "Segmenter" in b.code and "cuda" not in b.code for b in readme)
    assert any(b.lang == "bash" and "seg4diff-fast segment examples/scene.png" in b.code for b in readme)


@pytest.fixture
def bin_dir(tmp_path_factory):
    """``seg4diff-fast`` (what pip's console script does, with this checkout's code) and ``python``."""
    d = tmp_path_factory.mktemp("bin")
    script = d / "seg4diff-fast"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom seg4diff_fast.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    python = d / "python"  # a script, not a link: a link outside the virtual environment would leave it
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return d


def _run_bash(block: Block, cwd: Path, bin_dir: Path) -> None:
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (f"{block.where}: exit {proc.returncode}\n{block.code}\nstdout:\n{proc.stdout[-3000:]}"
                                  f"\nstderr:\n{proc.stderr[-3000:]}")


def _run_python(block: Block, namespace: dict) -> None:
    try:
        exec(compile(block.code, block.where, "exec"), namespace)
    except Exception as e:
        raise AssertionError(f"{block.where}: {type(e).__name__}: {e}\n{block.code}") from e


RUNNABLE = [p for p in PAGES if any(b.runs for b in blocks(p))]


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_run(page, tmp_path, monkeypatch, bin_dir):
    """Every unmarked python and bash block of the page runs, in order, and succeeds."""
    for name in ("examples", "benchmarks"):  # the paths the pages name, relative to the repository root
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{page.stem}"}
    for b in blocks(page):
        if not b.runs:
            continue
        if b.lang == "python":
            _run_python(b, namespace)
        else:
            _run_bash(b, tmp_path, bin_dir)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens kept), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set:
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # no headings inside code blocks
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


LINKED = PAGES + [ROOT / "seg4diff_fast" / "segmentation" / "README.md"]


@pytest.mark.parametrize("page", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links(page):
    """Every relative link points to a file of the repository, and an anchor to a heading of that page."""
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    targets = [m.group("target") for m in LINK.finditer(text)]
    assert targets or page.name != "README.md" or page.parent != ROOT, "the README links to docs/"
    for target in targets:
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.relative_to(ROOT)}: link to a missing file: {target}"
        assert ROOT in dest.parents or dest == ROOT, f"{page.relative_to(ROOT)}: link outside the repository: {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{page.relative_to(ROOT)}: no heading for #{anchor} in {dest.name}"


def test_slug():
    assert _slug("Refused, with a message that says what to do") == "refused-with-a-message-that-says-what-to-do"
    assert _slug("The paper's numbers, and the `commands`") == "the-papers-numbers-and-the-commands"


def test_marker_parsing(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(textwrap.dedent("""\
        ```python
        x = 1
        ```
        <!-- not run: needs a GPU -->
        ```bash
        nvidia-smi
        ```
        ```text
        a tree
        ```
        """))
    found = blocks(page)
    assert [(b.lang, b.not_run, b.runs) for b in found] == [("python", None, True), ("bash", "needs a GPU", False),
                                                            ("text", None, False)]
