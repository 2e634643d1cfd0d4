"""The context discriminator D (SPEC.md section 2), for training only.

``ContextDiscriminator`` is the paper's discriminator, plain PyTorch layers, with the
sizes made configurable and one change for training: ``forward`` returns the *logit*
z, not sigmoid(z). The paper's probability that the image is real is
``sigmoid(z)`` (``probability``); the losses use ``binary_cross_entropy_with_logits``,
which computes -log sigmoid(z) = softplus(-z) without first rounding sigmoid(z) to 0 or
1, so the loss and its gradient stay finite when D is confident.

Module and state-dict keys are GLCIC-PyTorch's (``model_ld.conv1..5``, ``model_ld.bn1..5``,
``model_ld.linear6``; ``model_gd.conv1..6`` + ``linear7`` for places2 or ``conv1..5`` +
``linear6`` for celeba; ``linear1``), so ``load_discriminator`` reads a GLCIC-PyTorch
``model_cd`` checkpoint as it is (with or without the ``module.`` prefix of
nn.DataParallel checkpoints). GLCIC-PyTorch's block order is conv -> ReLU -> BN
(``bn_after_relu=True``); the paper's is conv -> BN -> ReLU.
"""

import os
import re
from typing import Optional, Sequence

import torch
from torch import nn

import torch.nn.functional as F

from glcic_fast.nn.state_dict import strip_module_prefix, unwrap_checkpoint, with_bn_counters

#: Output channels of the k-th 5x5 stride-2 conv (paper: the local trunk uses the first
#: five, the global trunk the first six). Further convs, if asked for, keep 512.
PAPER_CHANNELS = (64, 128, 256, 512, 512, 512)
PAPER_LOCAL_CONVS = 5
PAPER_GLOBAL_CONVS = 6


def default_conv_count(size: int, paper_count: int) -> int:
    """The paper's number of stride-2 convs, reduced until ``size`` is a multiple of
    2**count (the trunk must end on a whole feature map). 256 -> 6 and 128 -> 5 (paper),
    160 -> 5 (GLCIC-PyTorch's celeba global discriminator), 96 -> 5, 32 -> 5, 16 -> 4."""
    if size < 1:
        raise ValueError(f"discriminator input size must be positive, got {size}")
    count = paper_count
    while count > 1 and size % 2 ** count:
        count -= 1
    return count


def _channels(count: int, channels: Sequence[int]):
    channels = tuple(int(c) for c in channels)
    if not channels or any(c < 1 for c in channels):
        raise ValueError(f"channels must be positive integers, got {channels}")
    return channels[:count] + (channels[-1],) * max(0, count - len(channels))


class _ConvStack(nn.Module):
    """Discriminator trunk: 5x5 stride-2 convs with BN and ReLU, then a linear -> 1024."""

    def __init__(self, image_size: int, channels, linear_name: str, bn_after_relu: bool):
        super().__init__()
        self.bn_after_relu = bn_after_relu
        self.n_convs = len(channels)
        cin = 3
        for i, cout in enumerate(channels, start=1):
            self.add_module(f"conv{i}", nn.Conv2d(cin, cout, 5, stride=2, padding=2))
            self.add_module(f"bn{i}", nn.BatchNorm2d(cout))
            cin = cout
        side = image_size // 2 ** len(channels)
        if side < 1 or image_size % 2 ** len(channels):
            raise ValueError(f"image_size {image_size} must be a multiple of {2 ** len(channels)}")
        self.linear_name = linear_name
        self.add_module(linear_name, nn.Linear(cin * side * side, 1024))

    def forward(self, x):
        for i in range(1, self.n_convs + 1):
            x = getattr(self, f"conv{i}")(x)
            bn = getattr(self, f"bn{i}")
            x = bn(F.relu(x)) if self.bn_after_relu else F.relu(bn(x))
        return F.relu(getattr(self, self.linear_name)(x.flatten(1)))


class ContextDiscriminator(nn.Module):
    """D(local patch, whole image) -> logit, N x 1.

    Args:
        local_size: side of the square patch around the hole (paper: 128).
        global_size: side of the whole training image (paper: 256).
        bn_after_relu: False for conv -> BN -> ReLU (paper), True for conv -> ReLU -> BN
            (GLCIC-PyTorch).
        local_convs / global_convs: number of 5x5 stride-2 convs in each trunk; default
            the paper's (5 and 6), reduced for sizes that are not a multiple of 2**count
            (see ``default_conv_count``: 160 gives GLCIC-PyTorch's celeba 5).
        channels: output channels of successive convs (paper: 64, 128, 256, 512, 512, 512);
            narrower values are for tests and experiments.

    ``sigmoid(forward(...))`` is the paper's P(image is real); see ``probability``.
    """

    def __init__(self, local_size: int = 128, global_size: int = 256, bn_after_relu: bool = False, *,
                 local_convs: Optional[int] = None, global_convs: Optional[int] = None,
                 channels: Sequence[int] = PAPER_CHANNELS):
        super().__init__()
        local_convs = default_conv_count(local_size, PAPER_LOCAL_CONVS) if local_convs is None else local_convs
        global_convs = default_conv_count(global_size, PAPER_GLOBAL_CONVS) if global_convs is None else global_convs
        self.local_size, self.global_size, self.bn_after_relu = local_size, global_size, bn_after_relu
        # Linear layer names follow GLCIC-PyTorch: after n convs comes linear{n+1}.
        self.model_ld = _ConvStack(local_size, _channels(local_convs, channels), f"linear{local_convs + 1}",
                                   bn_after_relu)
        self.model_gd = _ConvStack(global_size, _channels(global_convs, channels), f"linear{global_convs + 1}",
                                   bn_after_relu)
        self.linear1 = nn.Linear(2048, 1)

    def extra_repr(self) -> str:
        order = "conv -> ReLU -> BN (GLCIC-PyTorch)" if self.bn_after_relu else "conv -> BN -> ReLU (paper)"
        return (f"local {self.local_size} ({self.model_ld.n_convs} convs), global {self.global_size} "
                f"({self.model_gd.n_convs} convs), block order: {order}; forward returns logits")

    def forward(self, local_patch: torch.Tensor, whole_image: torch.Tensor) -> torch.Tensor:
        """The logit z (N x 1); sigmoid(z) is the paper's probability that the input is real."""
        for name, x, size in (("local patch", local_patch, self.local_size), ("whole image", whole_image,
                                                                              self.global_size)):
            if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (size, size):
                raise ValueError(f"the {name} must be N x 3 x {size} x {size}, got {tuple(x.shape)}")
        features = torch.cat([self.model_ld(local_patch), self.model_gd(whole_image)], dim=1)
        return self.linear1(features)

    def probability(self, local_patch: torch.Tensor, whole_image: torch.Tensor) -> torch.Tensor:
        """P(real) = sigmoid(logit), as the paper's (and GLCIC-PyTorch's) D outputs it."""
        return torch.sigmoid(self(local_patch, whole_image))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also accepts nn.DataParallel's ``module.`` prefix (old GLCIC-PyTorch checkpoints)."""
        return super().load_state_dict(strip_module_prefix(state_dict), strict=strict, assign=assign)


def _trunk_layout(state_dict: dict, prefix: str):
    """(conv count, channels, final feature-map side) of one trunk in a state dict."""
    pattern = re.compile(re.escape(prefix) + r"conv(\d+)\.weight$")
    convs = sorted(int(m.group(1)) for k in state_dict if (m := pattern.match(k)))
    if not convs or convs != list(range(1, len(convs) + 1)):
        raise ValueError(f"no {prefix}conv1..N weights in the discriminator state dict")
    n = len(convs)
    channels = tuple(int(state_dict[f"{prefix}conv{i}.weight"].shape[0]) for i in convs)
    linear = state_dict.get(f"{prefix}linear{n + 1}.weight")
    if linear is None:
        raise ValueError(f"expected {prefix}linear{n + 1}.weight after {n} convs")
    cells = int(linear.shape[1]) // channels[-1]
    side = int(round(cells ** 0.5))
    if side * side * channels[-1] != linear.shape[1]:
        raise ValueError(f"{prefix}linear{n + 1} takes {linear.shape[1]} features: not a square "
                         f"{channels[-1]}-channel map")
    return n, channels, side


def load_discriminator(source, *, bn_after_relu: bool = True, map_location="cpu") -> ContextDiscriminator:
    """A ContextDiscriminator from a GLCIC-PyTorch ``model_cd`` checkpoint (a path, read with
    ``torch.load(weights_only=True)``, or a state dict).

    The trunks' conv counts and the input sizes are read from the tensors (places2: local
    128 / global 256 with 6 global convs; celeba: 96 / 160 with 5). ``bn_after_relu``
    defaults to GLCIC-PyTorch's block order, which the tensors cannot reveal.
    """
    if isinstance(source, (str, os.PathLike)):
        obj = torch.load(os.fspath(source), map_location=map_location, weights_only=True)
        source = unwrap_checkpoint(obj, ("state_dict", "model", "model_cd", "discriminator"))
    if not isinstance(source, dict):
        raise ValueError(f"expected a discriminator state dict, got {type(source).__name__}")
    state = strip_module_prefix(source)
    nl, local_channels, local_side = _trunk_layout(state, "model_ld.")
    ng, global_channels, global_side = _trunk_layout(state, "model_gd.")
    longest = max((local_channels, global_channels), key=len)
    if local_channels != longest[:nl] or global_channels != longest[:ng]:
        raise ValueError(f"local channels {local_channels} and global channels {global_channels} "
                         "are not prefixes of one sequence")
    disc = ContextDiscriminator(local_side * 2 ** nl, global_side * 2 ** ng, bn_after_relu,
                                local_convs=nl, global_convs=ng, channels=longest)
    disc.load_state_dict(with_bn_counters(disc, state))
    return disc
