"""Fused convolution + bias + activation (+ per-channel affine) ops.

Each op validates its arguments, asks the dispatcher which backend runs them, and calls
it. Every backend computes, in the input's dtype with fp32 accumulation:

    y = act(conv(x, weight) + bias)              then, if post_scale is given,
    y = y * post_scale + post_shift              (GLCIC-PyTorch's BN after the ReLU)

and returns y in channels_last memory format.
"""

from typing import Optional

import torch

from glcic_fast.ops import dispatch

ACTIVATIONS = ("relu", "sigmoid", "none")


def _pair_int(value, name):
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name} must be an int or a pair of equal ints, got {value!r}")
        value = value[0]
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def _validate(x, weight, bias, activation, post_scale, post_shift, out_channels, in_channels):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be N x C x H x W, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must have a square 4-d kernel, got shape {tuple(weight.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"x has {x.shape[1]} channels but the weight expects {in_channels}")
    for name, t in (("weight", weight), ("bias", bias), ("post_scale", post_scale), ("post_shift", post_shift)):
        if t is None:
            continue
        if t.device != x.device or t.dtype != x.dtype:
            raise ValueError(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}")
    if bias is not None and bias.shape != (out_channels,):
        raise ValueError(f"bias must have shape ({out_channels},), got {tuple(bias.shape)}")
    if (post_scale is None) != (post_shift is None):
        raise ValueError("post_scale and post_shift go together: give both or neither")
    if post_scale is not None and (post_scale.shape != (out_channels,) or post_shift.shape != (out_channels,)):
        raise ValueError(f"post_scale and post_shift must have shape ({out_channels},)")


def _dispatch(op, transposed, x, weight, bias, stride, padding, dilation, activation, post_scale, post_shift, backend):
    stride, padding, dilation = (_pair_int(v, n) for v, n in ((stride, "stride"), (padding, "padding"), (dilation, "dilation")))
    # Conv weights are (Cout, Cin, k, k); transposed-conv weights are (Cin, Cout, k, k).
    c_in, c_out = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
    _validate(x, weight, bias, activation, post_scale, post_shift, c_out, c_in)
    args = (x, weight, bias, stride, padding, dilation, activation, post_scale, post_shift)
    tuning_key = (f"{'deconv' if transposed else 'conv'}:{c_in}:{c_out}:k{weight.shape[2]}:s{stride}:d{dilation}:"
                  f"{str(x.dtype).split('.')[-1]}")
    _, run = dispatch.resolve(op, x.device, *args, backend=backend, tuning_key=tuning_key)
    return run(*args)


def conv2d_bias_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *,
                    stride=1, padding=0, dilation=1, activation: str = "relu",
                    post_scale: Optional[torch.Tensor] = None, post_shift: Optional[torch.Tensor] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """act(conv2d(x, weight) + bias) [* post_scale + post_shift], weight (Cout, Cin, k, k)."""
    return _dispatch("conv2d_bias_act", False, x, weight, bias, stride, padding, dilation, activation,
                     post_scale, post_shift, backend)


def conv_transpose2d_bias_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *,
                              stride=1, padding=0, dilation=1, activation: str = "relu",
                              post_scale: Optional[torch.Tensor] = None, post_shift: Optional[torch.Tensor] = None,
                              backend: Optional[str] = None) -> torch.Tensor:
    """act(conv_transpose2d(x, weight) + bias) [* post_scale + post_shift], weight (Cin, Cout, k, k),
    no output padding: H_out = (H - 1) * stride - 2 * padding + dilation * (k - 1) + 1."""
    return _dispatch("conv_transpose2d_bias_act", True, x, weight, bias, stride, padding, dilation, activation,
                     post_scale, post_shift, backend)
