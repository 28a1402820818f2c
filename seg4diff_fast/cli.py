"""The ``seg4diff-fast`` command line: ``bench``, ``segment``, ``generate``, ``eval``.

Each subcommand lives beside the code it drives: a module's ``register_commands(subparsers)`` adds its
subcommands, each with ``set_defaults(func=...)`` returning an exit code.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import __version__

# Modules that add subcommands, in the order --help lists them.
_COMMAND_MODULES = (
    "seg4diff_fast.segmentation.commands", "seg4diff_fast.bench", "seg4diff_fast.compile_report",
)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="seg4diff-fast",
        description=(
            "Fused text-image attention capture for MM-DiT models (SD3, SD3.5, Flux) and Seg4Diff "
            "open-vocabulary segmentation."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register_commands(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
