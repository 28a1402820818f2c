"""Triton kernels (installed as ``seg4diff_fast.kernels``): tensors, strides and blocks, no model knowledge.

``KERNEL_MODULES`` lists the kernel modules; each exposes ``aot_variants(target, dtype, head_dim, capture)``
(see ``_aot.py``), which the compile report (``seg4diff-fast compile-report``) compiles ahead of time.
"""
from .joint_attention import joint_attention_fwd

KERNEL_MODULES = ("seg4diff_fast.kernels.joint_attention",)

__all__ = ["joint_attention_fwd", "KERNEL_MODULES"]
