"""The ``seg4diff-fast`` command line: ``bench``, ``segment``, ``generate``, ``eval``, ``analyze``, ``train``,
``check``.

Each subcommand lives beside the code it drives: a module's ``register_commands(subparsers)`` adds its
subcommands, each with ``set_defaults(func=...)`` returning an exit code.

Exit codes: 0 done; 1 a runtime failure (one line, ``--debug`` for the traceback); 2 a usage error (one line that
names the flag as typed, always before any model is loaded or, for what needs the model's config, before any
compute); 3 ``eval`` finished but some samples have no result (failed or left to another run; see its
summary.json); 130 interrupted.
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import Optional, Sequence

from . import __version__

# Modules that add subcommands, in the order --help lists them.
_COMMAND_MODULES = (
    "seg4diff_fast.segmentation.commands", "seg4diff_fast.analysis", "seg4diff_fast.bench",
    "seg4diff_fast.compile_report", "seg4diff_fast.magnet.train", "seg4diff_fast.selfcheck",
)


class UsageError(ValueError):
    """A bad command-line value; ``main`` prints it as one line and exits 2. The message names the flag."""


def one_line(text) -> str:
    return " ".join(str(text).split())


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``seg4diff-fast segment: error: argument --steps: ...`` and exit 2
    (argparse's own prints the usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")

    def _get_values(self, action, arg_strings):
        # argparse drops a '--' given as an option's value (`--height=--`) and then stores [] unchecked
        if action.option_strings and action.nargs is None and list(arg_strings) == ["--"]:
            raise argparse.ArgumentError(action, "expected a value, got '--'")
        return super()._get_values(action, arg_strings)


class _DropTorchvisionNotice(logging.Filter):
    # transformers warns once per image processor that torchvision is missing; nothing here uses them
    def filter(self, record):
        return "requires torchvision" not in record.getMessage()


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = Parser(
        prog="seg4diff-fast",
        description=(
            "Fused text-image attention capture for MM-DiT models (SD3, SD3.5, Flux) and Seg4Diff "
            "open-vocabulary segmentation."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure (default: one line)")
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
    logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionNotice())
    prog = f"{parser.prog} {args.command}"
    debug = bool(getattr(args, "debug", False))
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a runtime failure: one line, the traceback with --debug
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (run with --debug for the traceback)"
        print(f"{prog}: error: {type(e).__name__}: {one_line(e)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # `python -m seg4diff_fast.cli`: this file runs as __main__, a second copy of the module; the commands raise
    # seg4diff_fast.cli.UsageError, so the package module's main must catch them (exit code 2, not 1).
    from seg4diff_fast.cli import main as _package_main

    sys.exit(_package_main())
