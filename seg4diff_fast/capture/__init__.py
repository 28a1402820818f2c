"""Diffusers attention processors that capture text-image attention, one adapter per model family.

``register(pipe_or_transformer, layers, store)`` / ``capture(...)`` install them; ``AttentionStore`` holds the
maps. Families: SD3 / SD3.5 (``sd3.py``), Flux.1 (``flux.py``), Flux.2 (``flux2.py``), CogView4 and CogVideoX
(``families.py``); all but SD3 are captured at their processor's attention call (``dispatch.py``); what is
refused and why in ``refusals.py``; the machinery in ``handle.py`` (``register``, ``capture``,
``CaptureHandle``), ``store.py`` and ``base.py``. ``README.md`` here surveys every diffusers transformer.
"""
from .base import CaptureSite, ForwardContext
from .handle import ADAPTERS, CaptureHandle, capture, layer_names, register
from .store import AttentionStore

__all__ = ["AttentionStore", "register", "capture", "CaptureHandle", "layer_names", "ADAPTERS", "CaptureSite", "ForwardContext"]
