"""In a source checkout, the top-level ``kernels/`` folder is ``seg4diff_fast.kernels``.

setup.py installs ``kernels/`` as the subpackage ``seg4diff_fast.kernels`` (``package_dir``); an installed copy, or
an editable install's own finder, needs nothing from here. But Python started in the repository root
(``python -m pytest``, ``python -m seg4diff_fast.cli``, a notebook) imports ``seg4diff_fast`` from that folder,
before any installed copy, and would not find its ``kernels`` subpackage: this module adds a ``sys.meta_path``
finder for that one name. The folder itself never becomes a top-level ``kernels`` module (see
``kernels/__init__.py``): that name is another PyPI package.
"""
import importlib.util
import os
import sys

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_KERNELS = os.path.join(os.path.dirname(_PACKAGE), "kernels")
_NAME = __name__.rpartition(".")[0] + ".kernels"


class SourceTreeKernels:
    """A ``sys.meta_path`` finder for ``seg4diff_fast.kernels`` only; its submodules follow its ``__path__``."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        if fullname != _NAME:
            return None
        return importlib.util.spec_from_file_location(fullname, os.path.join(_KERNELS, "__init__.py"),
                                                      submodule_search_locations=[_KERNELS])


if (not os.path.isdir(os.path.join(_PACKAGE, "kernels")) and os.path.isfile(os.path.join(_KERNELS, "__init__.py"))
        and not any(getattr(f, "__name__", None) == "SourceTreeKernels" for f in sys.meta_path)):
    sys.meta_path.insert(0, SourceTreeKernels)
