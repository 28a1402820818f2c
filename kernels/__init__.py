"""Triton kernels (installed as ``seg4diff_fast.kernels``): tensors, strides and blocks, no model knowledge."""
from .joint_attention import joint_attention_fwd
from .maps_backward import joint_maps_backward

__all__ = ["joint_attention_fwd", "joint_maps_backward"]
