"""Triton kernels (installed as ``seg4diff_fast.kernels``): tensors, strides and blocks, no model knowledge."""
