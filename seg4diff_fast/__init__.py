"""seg4diff-fast: text-image attention from MM-DiT models (SD3, SD3.5, Flux), fused, and Seg4Diff segmentation.

- :func:`joint_attention`: joint attention that also returns its text-image probabilities (fused Triton kernel).
- :func:`register` / :func:`capture_attention` / :class:`AttentionStore`: capture those maps from a diffusers pipeline
  (the subpackage :mod:`seg4diff_fast.capture` holds one adapter per model family).
- :class:`Segmenter` / :func:`evaluate`: Seg4Diff open-vocabulary segmentation and its evaluation.
- :func:`check`: verify and time every attention backend on this device (``seg4diff-fast check``).

``seg4diff_fast.capture(...)``, the context manager's old name, still works and warns (DeprecationWarning).
``seg4diff_fast.check`` is the function; its module is ``seg4diff_fast.selfcheck``.
"""
from . import _source_tree  # noqa: F401  (first: in a source checkout, kernels/ is seg4diff_fast.kernels)
from .attention import AttentionMaps, joint_attention
from .capture import AttentionStore, CaptureHandle, capture_attention, layer_names, register
from .reference import reference_joint_attention
from .selfcheck import check
from .segmentation import (
    PROTOCOLS,
    Protocol,
    SegmentationResult,
    Segmenter,
    confusion_matrix,
    evaluate,
    open_dataset,
    scores_from_confusion,
    tiny_pipeline,
)

__version__ = "0.1.0"

__all__ = [
    "joint_attention",
    "AttentionMaps",
    "reference_joint_attention",
    "check",
    "AttentionStore",
    "CaptureHandle",
    "register",
    "capture_attention",
    "layer_names",
    "Segmenter",
    "SegmentationResult",
    "evaluate",
    "open_dataset",
    "Protocol",
    "PROTOCOLS",
    "confusion_matrix",
    "scores_from_confusion",
    "tiny_pipeline",
    "__version__",
]
