"""Fixtures shared by the test files (the Triton interpreter switch is in ../conftest.py)."""

import os
import sys

import pytest
import torch

# The shared helpers (helpers.py, photos.py, t7_writer.py) sit here, above the test folders
# that mirror the package.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def shape_invariant_convs():
    """Bit-exactness of crops and tiles needs convolutions that compute a pixel the same
    way whatever the tensor's size. oneDNN picks its blocking per shape, so it is switched
    off here; PyTorch's own CPU convolutions are shape-invariant."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled
