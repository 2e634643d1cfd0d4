"""The C++ extension's backends, both in glcic_fast._C: "cpp" (the CPU twins) and "cuda"
(the CUDA kernels, present when the extension was built with its CUDA sources).

Importing glcic_fast._C registers its operators with torch (torch.ops.glcic_fast.*). This
module registers them with the dispatcher (masked_mse: "cpp" and "cuda"; conv2d_bias_act:
"cuda", the tensor-core kernel of the 3x3, 256 -> 256, stride 1, padding == dilation
layers) and gives each a fake kernel, which says what the outputs look like without
computing them, so that torch.compile can trace the op.
"""

import torch

from glcic_fast import _C  # noqa: F401  (loading the library registers torch.ops.glcic_fast.*)

from glcic_fast.ops import dispatch
from glcic_fast.ops.masked_mse import dense_memory_format
from glcic_fast.ops.weight_cache import PackedWeightCache

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


# --------------------------------------------------------------------------------------
# conv3x3_bias_act: backend "cuda" of conv2d_bias_act for the 3x3, 256 -> 256, stride 1,
# padding == dilation layers (tensor-core implicit GEMM, csrc/ops/cuda/conv3x3_bias_act*)
# --------------------------------------------------------------------------------------

_CONV3X3_CHANNELS = 256
_CONV3X3_DTYPES = (torch.float16, torch.bfloat16)
_CONV3X3_MAX_EXTENT = 2 ** 30  # H, W and the dilation are below this (int32 tap arithmetic)
_HAS_CONV3X3_CUDA = torch._C._dispatch_has_kernel_for_dispatch_key("glcic_fast::conv3x3_bias_act", "CUDA")


@torch.library.register_fake("glcic_fast::conv3x3_bias_act")
def _conv3x3_bias_act_fake(x, packed_weight, bias, dilation, activation, post_scale, post_shift):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def pack_conv3x3_weight(weight: torch.Tensor) -> torch.Tensor:
    """(256, 256, 3, 3) -> the kernel's dense 256 x 2304 matrix, row cout = [kh][kw][cin].
    A channels_last weight is already laid out so: then this is a view, not a copy."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()


_CONV3X3_WEIGHTS = PackedWeightCache(64)
clear_conv3x3_weight_cache = _CONV3X3_WEIGHTS.clear


def _packed_conv3x3_weight(weight: torch.Tensor) -> torch.Tensor:
    """pack_conv3x3_weight(weight), packed once per (storage, version, dtype, layout)."""
    return _CONV3X3_WEIGHTS.get(weight, pack_conv3x3_weight)


def _conv3x3_cache_len():
    return len(_CONV3X3_WEIGHTS)


_CONV3X3_GPU_REASONS = {}  # CUDA device index -> why the kernel cannot run there, or None


def _conv3x3_gpu_reason(device: torch.device):
    """Why the kernel cannot run on this GPU (before sm_80, or no kernel image in the
    library for it), or None; asked once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CONV3X3_GPU_REASONS:
        major, minor = torch.cuda.get_device_capability(index)
        reason = None
        if major < 8:
            reason = (f"cuda:{index} is sm_{major}{minor}; the CUDA conv kernel needs sm_80 or newer "
                      "(cp.async, ldmatrix, bf16 mma.sync)")
        elif torch.ops.glcic_fast.conv3x3_bias_act_sm_version(index) == 0:
            reason = (f"glcic_fast._C holds no kernel image for cuda:{index} (sm_{major}{minor}): rebuild it "
                      f"with TORCH_CUDA_ARCH_LIST including {major}.{minor}")
        _CONV3X3_GPU_REASONS[index] = reason
    return _CONV3X3_GPU_REASONS[index]


def _conv3x3_cuda_why_not(x, weight, bias, stride, padding, dilation, activation, post_scale, post_shift):
    """Every reason the CUDA conv kernel cannot run these arguments, or None."""
    reasons = []
    if not _HAS_CONV3X3_CUDA:
        reasons.append("glcic_fast._C was built without its CUDA sources (a torch without CUDA, no nvcc "
                       "found, or GLCIC_FAST_NO_CUDA=1 at build time)")
    if x.device.type != "cuda":
        reasons.append(f"the CUDA conv kernel runs CUDA tensors, these are on {x.device}")
    c = _CONV3X3_CHANNELS
    if tuple(weight.shape) != (c, c, 3, 3) or stride != 1 or padding != dilation or dilation < 1:
        reasons.append(f"the CUDA conv kernel covers only 3x3 convs with {c} input and {c} output channels, "
                       f"stride 1 and padding == dilation >= 1; this one has weight {tuple(weight.shape)} "
                       f"(Cout, Cin, kH, kW), stride {stride}, padding {padding}, dilation {dilation}")
    elif dilation >= _CONV3X3_MAX_EXTENT or max(x.shape[2:]) >= _CONV3X3_MAX_EXTENT:
        reasons.append("H, W and the dilation must be below 2^30 for the CUDA conv kernel")
    if x.dtype not in _CONV3X3_DTYPES:
        reasons.append(f"dtype {x.dtype} is not supported by the CUDA conv kernel (float16 and bfloat16 are: "
                       "it runs on tensor cores)")
    tensors = (x, weight, bias, post_scale, post_shift)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        reasons.append("autograd is recording and the CUDA conv kernel has no backward")
    # Not while torch.compile traces (the op's binding checks the GPU again when it runs).
    if x.device.type == "cuda" and _HAS_CONV3X3_CUDA and not torch.compiler.is_compiling():
        gpu_reason = _conv3x3_gpu_reason(x.device)
        if gpu_reason is not None:
            reasons.append(gpu_reason)
    return "; ".join(reasons) or None


def launch_conv3x3(x, weight, bias, dilation, activation, post_scale=None, post_shift=None, out=None):
    """act(conv2d(x, weight, padding=dilation, dilation=dilation) + bias) [* post_scale + post_shift]
    with the CUDA kernel, weight (256, 256, 3, 3) packed through the cache; into ``out``
    (channels_last, x's shape and dtype) when given, else into a new channels_last tensor."""
    packed = _packed_conv3x3_weight(weight)
    if out is None:
        return torch.ops.glcic_fast.conv3x3_bias_act(x, packed, bias, dilation, activation, post_scale, post_shift)
    return torch.ops.glcic_fast.conv3x3_bias_act.out(x, packed, bias, dilation, activation, post_scale,
                                                     post_shift, out=out)


def _run_conv3x3(x, weight, bias, stride, padding, dilation, activation, post_scale, post_shift):
    return launch_conv3x3(x, weight, bias, dilation, activation, post_scale, post_shift)


# Not in the automatic choice until a GPU run's tuning table shows it fastest (and the
# parity tests it ran with passed); named explicitly, it runs wherever why_not allows.
dispatch.register("conv2d_bias_act", "cuda", _run_conv3x3, _conv3x3_cuda_why_not, automatic=False)
