"""Shared by tests/ and benchmarks/.

Without a GPU, Triton kernels run through Triton's CPU interpreter, which must be chosen
before triton is first imported: hence here, before any test module imports glcic_fast.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
