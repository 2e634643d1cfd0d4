"""The paper's reconstruction loss, || M (.) (pred - target) ||^2, fused with its gradient.

Every backend computes, in one pass over pred, target and mask, with fp32 accumulation:

    loss_sum   = sum((mask * (pred - target))^2)
    grad       = 2 * mask^2 * (pred - target)       (d loss_sum / d pred, in pred's dtype)
    weight_sum = sum(mask broadcast to pred's shape)

and returns ``(loss, grad, grad_scale)``: for reduction "sum", ``loss = loss_sum`` and
``grad_scale = 1``; for "mean", ``loss = loss_sum / weight_sum`` and ``grad_scale =
1 / weight_sum``, both 0 when the mask is empty (weight_sum == 0). ``loss`` and
``grad_scale`` are fp32 scalars. Forward saves ``grad``; backward returns ``grad *
(grad_output * grad_scale)``. The scale is applied there, not in the pass, because
weight_sum is only known once the pass is over, and backward multiplies by grad_output
anyway.

The reduction is deterministic: blocks of fixed size write partial sums that a second,
small reduction adds in a fixed order (no float atomics).

Backends: "torch" (the eager formula), "cpp" and "cuda" (``glcic_fast::masked_mse_fwd`` of
glcic_fast._C: csrc/ops/masked_mse.cpp, csrc/ops/cpu/masked_mse_kernel.cpp,
csrc/ops/cuda/masked_mse*), "triton" (kernels/masked_mse.py).
"""

from typing import Callable, Optional

import torch

from glcic_fast.ops import _extension, dispatch

try:
    from glcic_fast.kernels import masked_mse as _triton
except Exception as exc:  # no (working) Triton: the op runs on the other backends
    _triton = None
    dispatch.record_load_error("glcic_fast.kernels.masked_mse", exc, "triton")

REDUCTIONS = ("mean", "sum")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dense_memory_format(pred: torch.Tensor) -> torch.memory_format:
    """The layout the backends compute in, and the gradient's: channels_last when pred is
    channels_last-contiguous (and not also NCHW-contiguous), else NCHW. The C++ op uses the
    same rule (csrc/ops/masked_mse.cpp)."""
    if not pred.is_contiguous() and pred.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _validate(pred, target, mask, reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    for name, t in (("pred", pred), ("target", target), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if pred.dim() != 4:
        raise ValueError(f"pred must be N x C x H x W, got shape {tuple(pred.shape)}")
    if target.shape != pred.shape:
        raise ValueError(f"target has shape {tuple(target.shape)} but pred has shape {tuple(pred.shape)}")
    n, c, h, w = pred.shape
    if mask.dim() != 4 or mask.shape[0] != n or mask.shape[2:] != pred.shape[2:] or mask.shape[1] not in (1, c):
        raise ValueError(f"mask must be N x 1 x H x W or N x C x H x W, here ({n}, 1, {h}, {w}) or "
                         f"({n}, {c}, {h}, {w}); got {tuple(mask.shape)}")
    if pred.dtype not in _DTYPES:
        raise TypeError(f"pred must be float32, float16 or bfloat16, got {pred.dtype}")
    if target.dtype != pred.dtype:
        raise TypeError(f"target is {target.dtype} but pred is {pred.dtype}")
    if mask.dtype not in _DTYPES:
        raise TypeError(f"mask must hold float32, float16 or bfloat16 weights, got {mask.dtype} "
                        "(convert a bool or integer mask with mask.to(pred.dtype))")
    if target.device != pred.device or mask.device != pred.device:
        raise ValueError(f"pred, target and mask must be on one device, got {pred.device}, "
                         f"{target.device} and {mask.device}")


def _dense(pred, target, mask):
    """The three tensors in the layout the backends index by flat offset."""
    memory_format = dense_memory_format(pred)
    pred = pred.contiguous(memory_format=memory_format)
    target = target.contiguous(memory_format=memory_format)
    # A one-channel mask is laid out the same way in both formats.
    mask = mask.contiguous(memory_format=memory_format) if mask.shape[1] == pred.shape[1] else mask.contiguous()
    return pred, target, mask


class _MaskedMse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, mask, mean: bool, run: Callable):
        loss, grad, grad_scale = run(pred, target, mask, mean)
        ctx.save_for_backward(grad, grad_scale)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable  # grad is saved as a constant: no double backward
    def backward(ctx, grad_loss):
        grad, grad_scale = ctx.saved_tensors
        return grad * (grad_loss * grad_scale), None, None, None, None


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, reduction: str = "mean",
               backend: Optional[str] = None) -> torch.Tensor:
    """Weighted MSE of the paper (section 3): || mask (.) (pred - target) ||^2.

    Args:
        pred: N x C x H x W, float32, float16 or bfloat16, any strides.
        target: pred's shape and dtype.
        mask: weights, N x 1 x H x W (broadcast over the channels without being copied) or
            N x C x H x W; float32, float16 or bfloat16 (binary in practice: 1 in the hole).
        reduction: "sum", the paper's form, sum((mask * (pred - target))^2); or "mean", that
            sum divided by the number of masked elements counted over the channels, i.e.
            by sum(mask broadcast to pred's shape). An empty mask gives 0 for both, and a
            zero gradient, never NaN.
        backend: None for the dispatcher's choice, or one of "torch", "cpp", "triton",
            "cuda" (BackendUnavailable if it cannot run these tensors).

    Returns:
        The loss as an fp32 scalar tensor, whatever pred's dtype (accumulation is fp32).
        It is differentiable with respect to pred only, with a gradient in pred's dtype
        (and layout: channels_last if pred is); target and mask are constants, and
        receive no gradient even if they require one. With float16 and "mean" over many
        elements the gradient, about 2 (pred - target) / sum(mask), lands in float16's
        subnormal range and loses precision unless the loss is scaled
        (torch.amp.GradScaler), as any such float16 gradient would.
    """
    _validate(pred, target, mask, reduction)
    pred, target, mask = _dense(pred, target, mask)
    mean = reduction == "mean"
    _, run = dispatch.resolve("masked_mse", pred.device, pred, target, mask, mean, backend=backend)
    return _MaskedMse.apply(pred, target, mask, mean, run)


def masked_mse_torch(pred, target, mask, mean):
    """The eager formula: (loss, grad, grad_scale) as described at the top of this module."""
    weighted_diff = (pred.float() - target.float()).mul_(mask)
    loss_sum = weighted_diff.square().sum()
    weight_sum = mask.sum(dtype=torch.float32) * (pred.shape[1] // mask.shape[1])
    grad = weighted_diff.mul_(mask).mul_(2).to(pred.dtype)
    if not mean:
        return loss_sum, grad, torch.ones((), dtype=torch.float32, device=pred.device)
    any_weight = weight_sum != 0
    return (torch.where(any_weight, loss_sum / weight_sum, 0.0), grad,
            torch.where(any_weight, 1.0 / weight_sum, 0.0))


dispatch.register("masked_mse", "torch", masked_mse_torch)


# Backend "triton": kernels/masked_mse.py.

def _triton_why_not(pred, *args):
    if pred.device.type == "cuda" or (pred.device.type == "cpu" and _triton.INTERPRET):
        return None
    return f"the Triton kernels run CUDA tensors (CPU ones under TRITON_INTERPRET=1), these are on {pred.device}"


if _triton is not None:
    dispatch.register("masked_mse", "triton", _triton.launch, _triton_why_not)


# Backends "cpp" and "cuda": glcic_fast::masked_mse_fwd of glcic_fast._C.

def _extension_op(pred, target, mask, mean):
    return torch.ops.glcic_fast.masked_mse_fwd(pred, target, mask, mean)


def _cpp_why_not(pred, *args):
    if pred.device.type != "cpu":
        return f"the C++ twins run CPU tensors, these are on {pred.device}"
    return None


_HAS_CUDA_KERNELS = _extension.has_cuda_kernel("masked_mse_fwd")


def _cuda_why_not(pred, *args):
    if not _HAS_CUDA_KERNELS:
        return _extension.NO_CUDA_SOURCES
    if pred.device.type != "cuda":
        return f"the CUDA kernels run CUDA tensors, these are on {pred.device}"
    return None


if _extension.LOADED:
    @torch.library.register_fake("glcic_fast::masked_mse_fwd")
    def _masked_mse_fwd_fake(pred, target, mask, mean):
        scalar = pred.new_empty((), dtype=torch.float32)
        grad = torch.empty_like(pred, memory_format=dense_memory_format(pred))
        return scalar, grad, torch.empty_like(scalar)

    dispatch.register("masked_mse", "cpp", _extension_op, _cpp_why_not)
    dispatch.register("masked_mse", "cuda", _extension_op, _cuda_why_not)
