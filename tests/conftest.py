"""Test setup: without CUDA, Triton kernels run through Triton's interpreter.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is decorated, so before seg4diff_fast's
kernels are imported; conftest.py is imported by pytest before the test modules.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
