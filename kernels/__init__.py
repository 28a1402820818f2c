"""Triton kernels (installed as ``seg4diff_fast.kernels``): tensors, strides and blocks, no model knowledge.

- ``joint_attention.py``: the fused kernel (attention and capture in one launch);
- ``attention.py``: the attention phase of the split path (``out`` and each row's log-sum-exp);
- ``capture.py``: the capture phase (maps from q, k and lse);
- ``maps_backward.py``: the backward of the joint-normalised maps (dq, dk; flash-style, no N x N);
- ``_tiles.py``: the ``@triton.jit`` helpers all three share; ``_tuning.py``: host-side launch helpers.

``KERNEL_MODULES`` lists the kernel modules; each exposes ``aot_variants(target, dtype, head_dim, capture)``
(see ``_aot.py``), which the compile report (``seg4diff-fast compile-report``) compiles ahead of time.
"""
if __name__ != "seg4diff_fast.kernels":
    # Python started in the repository root (``python -m pytest``, ``python -c``, a notebook) finds this folder
    # as a top-level ``kernels`` before site-packages. That name belongs to another PyPI package (Hugging Face's
    # hub kernels, which transformers and diffusers import): hand the import to the installed one, found on
    # sys.path without this folder's parent, or fail as if this folder were not there. Our kernels are only
    # ever ``seg4diff_fast.kernels`` (setup.py's package_dir; seg4diff_fast/__init__.py in a source checkout).
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _path = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None or _spec.loader is None:
        _sys.modules.pop(__name__, None)
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = _util.module_from_spec(_spec)
    _sys.modules[__name__] = _module  # the import statement returns sys.modules[name], so this one
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        _sys.modules.pop(__name__, None)
        raise
else:
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
