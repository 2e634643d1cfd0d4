"""Fixtures shared by the test files (the Triton interpreter switch is in ../conftest.py)."""

import os
import sys

import pytest
import torch

# The shared helpers (helpers.py, photos.py, t7_writer.py) sit here, above the test folders
# that mirror the package.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def shape_invariant_convs(monkeypatch):
    """Bit-exactness of crops and tiles needs convolutions that compute a pixel the same
    way whatever the tensor's size and the pixel's place in it. oneDNN picks its blocking
    per shape, and the CPU Winograd kernel (backend "cpp") computes a pixel from the tile it
    falls in, counted from the tensor's corner (its rounding mixes the tile's inputs): both
    are switched off here; PyTorch's own CPU convolutions are shape-invariant."""
    monkeypatch.setenv("GLCIC_FAST_BACKEND", "torch")
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled
