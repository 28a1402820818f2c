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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # a value that is a list of negative numbers (`--timestep-indices -8,-4`) is a value, not an unknown option,
        # as argparse already takes `-8` (no option of this CLI looks like a number)
        import re

        self._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-\d+(,\s*[-+]?\d+)+$")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")

    def _get_values(self, action, arg_strings):
        # argparse drops a '--' given as an option's value (`--height=--`) and then stores [] unchecked
        if action.option_strings and action.nargs is None and list(arg_strings) == ["--"]:
            raise argparse.ArgumentError(action, "expected a value, got '--'")
        return super()._get_values(action, arg_strings)


# ---------------------------------------------------------------------------------------------- value types
# The one set of argparse ``type`` parsers of every subcommand's numbers and lists: argparse names the flag as typed
# in its error (``argument --perturb-sigma: must be a number >= 0 ..., got '-1'``), before anything is loaded.
def _bounds(lo, hi, above=None) -> str:
    parts = ([f"> {above}"] if above is not None else []) + ([f">= {lo}"] if lo is not None else []) \
        + ([f"<= {hi}"] if hi is not None else [])
    return " and ".join(parts)


def _to_int(text: str, what: str = "an integer") -> int:
    # int(text, 10): no '1e1', '0x10', '1.0'; the text as typed goes into the message
    try:
        return int(text, 10)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def integer(lo: Optional[int] = None, hi: Optional[int] = None):
    """An integer in ``[lo, hi]`` (None: unbounded on that side)."""

    def parse(text: str) -> int:
        v = _to_int(text)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be an integer {_bounds(lo, hi)}, got {v}")
        return v

    return parse


def integer_or(word: str, lo: int = 1, what: str = "an integer"):
    """An integer >= ``lo`` or the keyword ``word`` (returned as it is): ``--size native``, ``--shift-seq-len real``."""

    def parse(text: str):
        if text == word:
            return word
        v = _to_int(text, f"{what} or {word!r}")
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be {what} >= {lo} or {word!r}, got {v}")
        return v

    return parse


def number(lo: Optional[float] = None, hi: Optional[float] = None, above: Optional[float] = None,
           infinite: bool = False):
    """A float in ``[lo, hi]`` (``above``: strictly greater); never NaN; infinite only with ``infinite``."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        bad = v != v or (not infinite and v in (float("inf"), -float("inf"))) or (lo is not None and v < lo) \
            or (hi is not None and v > hi) or (above is not None and v <= above)
        if bad:
            kind = "a number" if infinite else "a finite number"
            rule = _bounds(lo, hi, above)
            raise argparse.ArgumentTypeError(f"must be {kind}{' ' + rule if rule else ''}, got {text!r}")
        return v

    return parse


def integer_list(lo: Optional[int] = None, hi: Optional[int] = None, names: bool = False, what: str = "integers",
                 keyword: Optional[str] = None):
    """Comma-separated integers in ``[lo, hi]`` as a tuple: no empty item, none given twice (``-8,-8`` would compute
    one thing twice). ``names``: an item that is not an integer is kept as a name (``--layers 9,attn``);
    ``keyword``: this word alone is returned as None (``--lora-blocks all``)."""

    def parse(text: str):
        if keyword is not None and text.strip() == keyword:
            return None
        out = []
        for part in text.split(","):
            part = part.strip()
            if not part:
                raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got an empty item in {text!r}")
            try:
                v = int(part, 10)
            except ValueError:
                if not names:
                    raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {part!r} in "
                                                     f"{text!r}") from None
                v = part
            if isinstance(v, int) and ((lo is not None and v < lo) or (hi is not None and v > hi)):
                raise argparse.ArgumentTypeError(f"each of the {what} must be {_bounds(lo, hi)}, got {v}")
            if v in out:
                raise argparse.ArgumentTypeError(f"{v!r} is given twice in {text!r}")
            out.append(v)
        return tuple(out)

    return parse


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
    # `python -m seg4diff_fast.cli` runs this file as __main__, a second copy of the module beside
    # seg4diff_fast.cli, which the commands import: run the canonical one, so that UsageError is one class
    from seg4diff_fast.cli import main as _main

    sys.exit(_main())
