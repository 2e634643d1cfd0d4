"""Fixtures shared by the test files (the Triton interpreter switch is in ../conftest.py)."""

import pytest
import torch


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
