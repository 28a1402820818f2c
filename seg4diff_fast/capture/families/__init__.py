"""The model families capture knows, one module per family or closely related group, each holding its records
(:class:`~.record.Family`, in the module's ``FAMILIES``) and the code where a family truly differs.

A new family is a new module here (or a record in a related family's module): nothing else is edited; ``FAMILIES``
below collects every module's records: the Seg4Diff paper's families first (SD3, Flux), then the other modules in
name order, records in their module's order.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Dict, Tuple

from .record import Family, Layers

__all__ = ["Family", "Layers", "FAMILIES", "MODULES", "by_name"]

_PAPER = ("sd3", "flux")  # the modules of the families Seg4Diff evaluated
MODULES: Dict[str, str] = {}  # family name -> the module of this folder that holds its record


def _collect() -> Tuple[Family, ...]:
    names = sorted((m.name for m in pkgutil.iter_modules(__path__) if m.name != "record"),
                   key=lambda name: (name not in _PAPER, _PAPER.index(name) if name in _PAPER else 0, name))
    records = []
    for name in names:
        found = importlib.import_module(f"{__name__}.{name}").__dict__.get("FAMILIES", ())
        records += found
        MODULES.update({r.family: name for r in found})
    names = [r.family for r in records]
    if len(set(names)) != len(names):
        raise RuntimeError(f"two family records share a name: {sorted(n for n in names if names.count(n) > 1)}")
    return tuple(records)


FAMILIES: Tuple[Family, ...] = _collect()
by_name: Dict[str, Family] = {r.family: r for r in FAMILIES}
