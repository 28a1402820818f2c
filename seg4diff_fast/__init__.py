"""seg4diff-fast: text-image attention from MM-DiT models (SD3, SD3.5, Flux), fused, and Seg4Diff segmentation."""
from .attention import AttentionMaps, joint_attention
from .reference import reference_joint_attention

__version__ = "0.1.0"

__all__ = ["joint_attention", "AttentionMaps", "reference_joint_attention", "__version__"]
