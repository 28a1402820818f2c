"""Diffusers attention processors that capture text-image attention, one record per model family.

``register(pipe_or_transformer, layers, store)`` / ``capture_attention(...)`` install them; ``AttentionStore`` holds
the maps. Families: one record each in ``families/`` (``ADAPTERS``: all of them; ``families/record.py``: what a record
holds and the one adapter that reads it); all but SD3 are captured at their processor's attention call
(``dispatch.py``); what is refused and why in ``refusals.py``; the machinery in ``handle.py`` (``register``, ``capture_attention``,
``CaptureHandle``), ``store.py`` and ``base.py``. ``README.md`` here surveys every diffusers transformer.

Deprecated: the context manager was called ``capture``, the name of this subpackage too. The old spellings
``seg4diff_fast.capture(pipe, ...)`` (this module, made callable), ``from seg4diff_fast import capture`` and
``from seg4diff_fast.capture import capture`` still work and warn (DeprecationWarning).
"""
import sys
import types
import warnings

from .base import CaptureSite, ForwardContext
from .handle import ADAPTERS, CaptureHandle, capture_attention, layer_names, register
from .store import AttentionStore

__all__ = ["AttentionStore", "register", "capture_attention", "CaptureHandle", "layer_names", "ADAPTERS",
           "CaptureSite", "ForwardContext"]

_DEPRECATED = ("seg4diff_fast.capture(...) as a function is deprecated: use "
               "seg4diff_fast.capture_attention(...) (the same context manager)")


class _CallableSubpackage(types.ModuleType):
    """This subpackage's class: calling it is the old context-manager spelling ``seg4diff_fast.capture(...)``."""

    def __call__(self, *args, **kwargs):
        warnings.warn(_DEPRECATED, DeprecationWarning, stacklevel=2)
        return capture_attention(*args, **kwargs)


def __getattr__(name: str):
    if name == "capture":  # ``from seg4diff_fast.capture import capture``
        warnings.warn(_DEPRECATED, DeprecationWarning, stacklevel=2)
        return capture_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


sys.modules[__name__].__class__ = _CallableSubpackage
