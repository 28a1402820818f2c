"""Optional dependencies: tell "not installed" (advice: which package or extra to install) from "installed but
broken" (the real error, unchanged: an install hint there would send the user the wrong way)."""
from typing import Optional


def is_missing(error: ImportError, module: str) -> bool:
    """True when ``error`` says that ``module`` itself (or a parent package of it) is not installed; False for any
    other import failure, e.g. an installed package whose own imports fail, which must then be shown as it is."""
    name: Optional[str] = getattr(error, "name", None)
    return isinstance(error, ModuleNotFoundError) and name is not None and (
        module == name or module.startswith(name + "."))


def import_failure(error: BaseException) -> Optional[str]:
    """One line naming the real cause when ``error`` is an import failure, else None. diffusers and transformers
    wrap a failing lazy import in ``RuntimeError("Failed to import X because of the following error (look up to see
    its traceback):\\n<the real error>")``: the real error is its last line (and its ``__cause__``)."""
    chain, seen = [], set()
    e: Optional[BaseException] = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, ImportError) or str(e).startswith("Failed to import "):
            deepest = [x for x in chain if isinstance(x, ImportError)]
            root = deepest[-1] if deepest else e
            lines = [line.strip() for line in str(root).splitlines() if line.strip()]
            return f"{type(root).__name__}: {lines[-1] if lines else repr(root)}"
    return None
