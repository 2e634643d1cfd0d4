"""Fused ops, one module each, named after the op: conv2d_bias_act.py (``conv2d_bias_act``,
``conv_transpose2d_bias_act``) and masked_mse.py (``masked_mse``). Each op checks its
arguments and runs on the backend the dispatcher picks (dispatch.py).

The torch backend is always there. The Triton kernels (glcic_fast.kernels) and the C++ /
CUDA extension (glcic_fast._C) give their backends when they load; when one cannot (no
Triton, extension not built), the reason is kept in ``BACKEND_LOAD_ERRORS`` and the
dispatcher falls back to what is there.
"""

from glcic_fast.ops.conv2d_bias_act import conv2d_bias_act, conv_transpose2d_bias_act
from glcic_fast.ops.dispatch import BACKENDS, BackendUnavailable, available_backends, explain
from glcic_fast.ops.dispatch import LOAD_ERRORS as BACKEND_LOAD_ERRORS
from glcic_fast.ops.masked_mse import masked_mse

__all__ = ["conv2d_bias_act", "conv_transpose2d_bias_act", "masked_mse", "explain", "available_backends",
           "BackendUnavailable", "BACKENDS", "BACKEND_LOAD_ERRORS"]
