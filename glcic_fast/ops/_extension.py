"""glcic_fast._C, the C++ / CUDA extension (csrc/), loaded once for the ops with backends in it.

Loading the library registers its operators with torch (torch.ops.glcic_fast.*): the CPU
twins behind backend "cpp" and, when it was built with its CUDA sources, the CUDA kernels
behind backend "cuda". When it does not load (not built: GLCIC_FAST_NO_EXTENSION=1, or
built against another torch), both backends are missing and say why.
"""

import torch

from glcic_fast.ops import dispatch

try:
    from glcic_fast import _C  # noqa: F401  (loading the library registers torch.ops.glcic_fast.*)
except Exception as exc:  # an optional backend must never break the import of the package
    _C = None
    dispatch.record_load_error("glcic_fast._C", exc, "cpp", "cuda")

LOADED = _C is not None

#: Why a "cuda" backend of a loaded library cannot run anything.
NO_CUDA_SOURCES = ("glcic_fast._C was built without its CUDA sources (a torch without CUDA, no nvcc found, "
                   "or GLCIC_FAST_NO_CUDA=1 at build time)")


def has_cuda_kernel(op: str) -> bool:
    """Whether the library registered a CUDA kernel for glcic_fast::<op> (only a build with
    its CUDA sources does)."""
    return LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(f"glcic_fast::{op}", "CUDA")
