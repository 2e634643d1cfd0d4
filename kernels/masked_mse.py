"""The Triton kernels of glcic_fast.ops.masked_mse (semantics in glcic_fast/ops/masked_mse.py),
and their launcher.

Two kernels. The first gives each program one tile of BLOCK flat elements of the dense pred
and target: it writes the gradient 2 * mask^2 * (pred - target) and the tile's partial sums
of (mask * (pred - target))^2 and of the weights. The second, one program, adds the partials
in a fixed order and writes the loss and the gradient's scale. No atomics: the result is
bit-identical from call to call.
"""

import torch
import triton
import triton.language as tl

from . import INTERPRET

# The interpreter runs a program as numpy operations on whole blocks, with a Python
# overhead per program: large blocks keep it fast. On a GPU, 4096 elements per program
# are 16 per thread with 8 warps, enough loads in flight per thread.
_BLOCK = 1 << 16 if INTERPRET else 4096
_FINISH_BLOCK = 1024

# How the mask maps onto pred (see csrc/ops/masked_mse_layout.h).
_BROADCAST_NONE, _BROADCAST_PLANAR, _BROADCAST_INTERLEAVED = 0, 1, 2


@triton.jit
def _masked_mse_partials_kernel(pred_ptr, target_ptr, mask_ptr, grad_ptr, partial_loss_ptr, partial_weight_ptr,
                                numel, channels, plane, image,
                                BROADCAST: tl.constexpr, BLOCK: tl.constexpr, INDEX_64: tl.constexpr):
    pid = tl.program_id(0)
    if INDEX_64:
        start = pid.to(tl.int64) * BLOCK
    else:
        start = pid * BLOCK
    offsets = start + tl.arange(0, BLOCK)
    in_range = offsets < numel
    if BROADCAST == 0:
        mask_offsets = offsets
    elif BROADCAST == 1:  # N x 1 x H x W mask, NCHW pred; image = C * H * W, plane = H * W
        mask_offsets = (offsets // image) * plane + offsets % plane
    else:  # N x 1 x H x W mask, channels_last pred
        mask_offsets = offsets // channels
    p = tl.load(pred_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
    w = tl.load(mask_ptr + mask_offsets, mask=in_range, other=0.0).to(tl.float32)
    weighted_diff = w * (p - t)
    tl.store(grad_ptr + offsets, (2.0 * w * weighted_diff).to(grad_ptr.dtype.element_ty), mask=in_range)
    tl.store(partial_loss_ptr + pid, tl.sum(weighted_diff * weighted_diff, axis=0))
    tl.store(partial_weight_ptr + pid, tl.sum(w, axis=0))


@triton.jit
def _masked_mse_finish_kernel(partial_loss_ptr, partial_weight_ptr, num_partials, loss_ptr, grad_scale_ptr,
                              MEAN: tl.constexpr, BLOCK: tl.constexpr):
    loss_acc = tl.zeros([BLOCK], dtype=tl.float32)
    weight_acc = tl.zeros([BLOCK], dtype=tl.float32)
    # A while loop, not range(0, num_partials, BLOCK): Triton 3.6's interpreter turns a
    # runtime range bound into a Python int with int() of a 1-element array, which NumPy >= 2.4
    # refuses (TypeError: only 0-dimensional arrays can be converted to Python scalars).
    first = num_partials * 0
    while first < num_partials:
        offsets = first + tl.arange(0, BLOCK)
        in_range = offsets < num_partials
        loss_acc += tl.load(partial_loss_ptr + offsets, mask=in_range, other=0.0)
        weight_acc += tl.load(partial_weight_ptr + offsets, mask=in_range, other=0.0)
        first += BLOCK
    loss = tl.sum(loss_acc, axis=0)
    weight = tl.sum(weight_acc, axis=0)
    if MEAN:
        any_weight = weight != 0.0
        safe_weight = tl.where(any_weight, weight, 1.0)
        tl.store(loss_ptr, tl.where(any_weight, loss / safe_weight, 0.0))
        tl.store(grad_scale_ptr, tl.where(any_weight, 1.0 / safe_weight, 0.0))
    else:
        tl.store(loss_ptr, loss)
        tl.store(grad_scale_ptr, 1.0)


def launch(pred, target, mask, mean):
    """(loss, grad, grad_scale) of dense pred, target and mask (as glcic_fast.ops.masked_mse
    passes them: one layout, NCHW or channels_last; an N x 1 x H x W mask contiguous)."""
    numel = pred.numel()
    channels, plane = pred.shape[1], pred.shape[2] * pred.shape[3]
    if mask.shape[1] == channels:
        broadcast = _BROADCAST_NONE
    elif pred.is_contiguous():
        broadcast = _BROADCAST_PLANAR
    else:
        broadcast = _BROADCAST_INTERLEAVED
    num_partials = max(1, triton.cdiv(numel, _BLOCK))
    grad = torch.empty_like(pred)
    partials = torch.empty((2, num_partials), dtype=torch.float32, device=pred.device)
    loss = torch.empty((), dtype=torch.float32, device=pred.device)
    grad_scale = torch.empty_like(loss)
    _masked_mse_partials_kernel[(num_partials,)](
        pred, target, mask, grad, partials[0], partials[1], numel, channels, plane, channels * plane,
        BROADCAST=broadcast, BLOCK=_BLOCK, INDEX_64=num_partials * _BLOCK >= 2 ** 31, num_warps=8)
    _masked_mse_finish_kernel[(1,)](partials[0], partials[1], num_partials, loss, grad_scale,
                                    MEAN=mean, BLOCK=_FINISH_BLOCK, num_warps=4)
    return loss, grad, grad_scale
