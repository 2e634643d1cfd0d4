"""The torch backend: the fastest plain-PyTorch way to run each fused op.

One convolution call with the bias folded in, on channels_last tensors (oneDNN on the CPU,
cuDNN on the GPU run NHWC natively), then the activation and the affine applied in place
so that no extra activation-sized tensor is allocated. In place is only safe when autograd
is not recording; otherwise the same formula runs out of place.
"""

import torch
import torch.nn.functional as F

from glcic_fast.ops import dispatch


def _position_independent_sigmoid_(y):
    """``y.sigmoid_()`` whose value for an element does not depend on where it lies.

    PyTorch's CPU sigmoid runs vector code on most of each thread's chunk and scalar code
    on the rest, and the two can differ in the last bit: a pixel's value would then depend
    on the tensor's size and the thread count, and crops or tiles of an image would not
    reproduce the whole image bit for bit. An output with a stride of 2 sends every element
    through the scalar loop. (CUDA computes each element alike: nothing to do there.)"""
    if y.device.type != "cpu":
        return y.sigmoid_()
    n, c, h, w = y.shape
    scalar_out = torch.empty(2 * y.numel(), dtype=y.dtype)[::2].view(n, h, w, c).permute(0, 3, 1, 2)
    torch.sigmoid(y, out=scalar_out)
    return y.copy_(scalar_out)


def _epilogue(y, activation, post_scale, post_shift):
    recording = torch.is_grad_enabled() and y.requires_grad
    if activation == "relu":
        y = F.relu(y) if recording else y.relu_()
    elif activation == "sigmoid":
        y = torch.sigmoid(y) if recording else _position_independent_sigmoid_(y)
    if post_scale is not None:
        shape = (1, -1, 1, 1)
        if recording:
            y = torch.addcmul(post_shift.view(shape), y, post_scale.view(shape))
        else:
            y = y.mul_(post_scale.view(shape)).add_(post_shift.view(shape))
    return y


def conv2d(x, weight, bias, stride, padding, dilation, activation, post_scale, post_shift):
    x = x.contiguous(memory_format=torch.channels_last)
    y = F.conv2d(x, weight, bias, stride, padding, dilation)
    return _epilogue(y, activation, post_scale, post_shift)


def conv_transpose2d(x, weight, bias, stride, padding, dilation, activation, post_scale, post_shift):
    x = x.contiguous(memory_format=torch.channels_last)
    y = F.conv_transpose2d(x, weight, bias, stride, padding, 0, 1, dilation)
    return _epilogue(y, activation, post_scale, post_shift)


def _always(*args, **kwargs):
    return None


dispatch.register("conv2d_bias_act", "torch", conv2d, _always)
dispatch.register("conv_transpose2d_bias_act", "torch", conv_transpose2d, _always)
