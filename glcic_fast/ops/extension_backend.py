"""The C++ extension's backends, both in glcic_fast._C: "cpp" (the CPU twins) and "cuda"
(the CUDA kernels, present when the extension was built with its CUDA sources).

Importing glcic_fast._C registers its operators with torch (torch.ops.glcic_fast.*). This
module registers them with the dispatcher and gives each a fake kernel, which says what
the outputs look like without computing them, so that torch.compile can trace the op.
"""

import torch

from glcic_fast import _C  # noqa: F401  (loading the library registers torch.ops.glcic_fast.*)

from . import dispatch
from .masked_mse import dense_memory_format

_HAS_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("glcic_fast::masked_mse_fwd", "CUDA")


@torch.library.register_fake("glcic_fast::masked_mse_fwd")
def _masked_mse_fwd_fake(pred, target, mask, mean):
    scalar = pred.new_empty((), dtype=torch.float32)
    grad = torch.empty_like(pred, memory_format=dense_memory_format(pred))
    return scalar, grad, torch.empty_like(scalar)


def _masked_mse_fwd(pred, target, mask, mean):
    return torch.ops.glcic_fast.masked_mse_fwd(pred, target, mask, mean)


def _cpp_why_not(pred, *args):
    if pred.device.type != "cpu":
        return f"the C++ twins run CPU tensors, these are on {pred.device}"
    return None


def _cuda_why_not(pred, *args):
    if not _HAS_CUDA_KERNELS:
        return ("glcic_fast._C was built without its CUDA sources (a torch without CUDA, no nvcc "
                "found, or GLCIC_FAST_NO_CUDA=1 at build time)")
    if pred.device.type != "cuda":
        return f"the CUDA kernels run CUDA tensors, these are on {pred.device}"
    return None


dispatch.register("masked_mse", "cpp", _masked_mse_fwd, _cpp_why_not)
dispatch.register("masked_mse", "cuda", _masked_mse_fwd, _cuda_why_not)
