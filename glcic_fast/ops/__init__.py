"""Fused ops, each run by the backend the dispatcher picks (see dispatch.py).

The torch backend is always there. The Triton kernels (glcic_fast.kernels) and the C++ /
CUDA extension (glcic_fast._C) register their backends when they import; when one cannot
(no Triton, extension not built), the reason is kept in ``BACKEND_LOAD_ERRORS`` and the
dispatcher falls back to what is there.
"""

import importlib

from glcic_fast.ops import dispatch, torch_backend  # noqa: F401  (torch_backend registers itself)
from glcic_fast.ops.conv import conv2d_bias_act, conv_transpose2d_bias_act
from glcic_fast.ops.dispatch import BACKENDS, BackendUnavailable, available_backends, explain
from glcic_fast.ops.masked_mse import masked_mse

BACKEND_LOAD_ERRORS = {}


def _load_optional_backend(backend: str, module: str):
    try:
        importlib.import_module(module)
    except Exception as exc:  # an optional backend must never break the import of the package
        BACKEND_LOAD_ERRORS[backend] = f"{module} did not load: {type(exc).__name__}: {exc}"


_load_optional_backend("triton", "glcic_fast.kernels")
_load_optional_backend("cpp", "glcic_fast.ops.extension_backend")
if "cpp" in BACKEND_LOAD_ERRORS:  # the CUDA kernels live in the same library
    BACKEND_LOAD_ERRORS["cuda"] = BACKEND_LOAD_ERRORS["cpp"]
dispatch.set_load_errors(BACKEND_LOAD_ERRORS)

__all__ = ["conv2d_bias_act", "conv_transpose2d_bias_act", "masked_mse", "explain", "available_backends",
           "BackendUnavailable", "BACKENDS", "BACKEND_LOAD_ERRORS"]
