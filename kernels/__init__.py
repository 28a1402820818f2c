"""Triton kernels (installed as ``seg4diff_fast.kernels``): tensors, strides and blocks, no model knowledge.

- ``joint_attention.py``: the fused kernel (attention and capture in one launch);
- ``attention.py``: the attention phase of the split path (``out`` and each row's log-sum-exp);
- ``capture.py``: the capture phase (maps from q, k and lse);
- ``maps_backward.py``: the backward of the joint-normalised maps (dq, dk; flash-style, no N x N);
- ``_tiles.py``: the ``@triton.jit`` helpers all three share; ``_tuning.py``: host-side launch helpers.

``KERNEL_MODULES`` lists the kernel modules; each exposes ``aot_variants(target, dtype, head_dim, capture)``
(see ``_aot.py``), which the compile report (``seg4diff-fast compile-report``) compiles ahead of time.
"""
from .attention import attention_fwd
from .capture import capture_maps
from .joint_attention import joint_attention_fwd
from .maps_backward import joint_maps_backward

KERNEL_MODULES = (
    "seg4diff_fast.kernels.joint_attention",
    "seg4diff_fast.kernels.attention",
    "seg4diff_fast.kernels.capture",
    "seg4diff_fast.kernels.maps_backward",
)

__all__ = ["joint_attention_fwd", "attention_fwd", "capture_maps", "joint_maps_backward", "KERNEL_MODULES"]
