"""The Seg4Diff protocol: image + class names -> masks; metrics; datasets.

Public names: :class:`Segmenter`, :class:`SegmentationResult`, :func:`evaluate`, :func:`open_dataset`,
:class:`Protocol` / :data:`PROTOCOLS` (per-family defaults), :func:`confusion_matrix`,
:func:`scores_from_confusion`, :func:`tiny_pipeline`. Heavy imports (diffusers) happen on use.
"""
from .datasets import DATASETS, SegDataset, open_dataset
from .evaluate import evaluate, merge_results
from .metrics import IGNORE_INDEX, confusion_matrix, scores_from_confusion
from .protocol import PROTOCOLS, Protocol
from .segmenter import ForwardBatch, SegmentationResult, Segmenter
from .tiny import tiny_flux_pipeline, tiny_pipeline, tiny_sd3_pipeline

__all__ = ["Segmenter", "SegmentationResult", "ForwardBatch", "evaluate", "merge_results", "open_dataset",
           "SegDataset", "DATASETS", "Protocol", "PROTOCOLS", "confusion_matrix", "scores_from_confusion",
           "IGNORE_INDEX", "tiny_pipeline", "tiny_sd3_pipeline", "tiny_flux_pipeline"]
