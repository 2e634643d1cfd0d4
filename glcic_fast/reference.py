"""Plain-PyTorch reference layers: the parity oracle for every fused kernel.

Kept deliberately obvious: one module per paper layer, applied in order, nothing fused.
State-dict keys are GLCIC-PyTorch's, so a GLCIC-PyTorch checkpoint loads into
``ReferenceCompletionNet(bn_after_relu=True)`` as it is.
"""

import torch
from torch import nn
import torch.nn.functional as F

from .architecture import COMPLETION_LAYERS


def make_conv(spec) -> nn.Module:
    cls = nn.ConvTranspose2d if spec.transposed else nn.Conv2d
    return cls(spec.in_channels, spec.out_channels, spec.kernel_size, stride=spec.stride,
               padding=spec.padding, dilation=spec.dilation)


class ReferenceCompletionNet(nn.Module):
    """C(x, M): N x 4 x H x W -> N x 3 x H x W in (0, 1).

    ``bn_after_relu=False``: conv -> BN -> ReLU (the authors' Torch7 model).
    ``bn_after_relu=True``: conv -> ReLU -> BN (GLCIC-PyTorch).
    """

    def __init__(self, bn_after_relu: bool = False):
        super().__init__()
        self.bn_after_relu = bn_after_relu
        for spec in COMPLETION_LAYERS:
            self.add_module(spec.name, make_conv(spec))
            if spec.has_bn:
                self.add_module(f"bn{spec.index}", nn.BatchNorm2d(spec.out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for spec in COMPLETION_LAYERS:
            x = getattr(self, spec.name)(x)
            if not spec.has_bn:
                return torch.sigmoid(x)
            bn = getattr(self, f"bn{spec.index}")
            x = bn(F.relu(x)) if self.bn_after_relu else F.relu(bn(x))
        raise AssertionError("the layer table ends with the output layer")


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


class ReferenceLocalDiscriminator(_ConvStack):
    """128 x 128 patch -> 1024: five convs (64, 128, 256, 512, 512)."""

    def __init__(self, image_size: int = 128, bn_after_relu: bool = False):
        super().__init__(image_size, (64, 128, 256, 512, 512), "linear6", bn_after_relu)


class ReferenceGlobalDiscriminator(_ConvStack):
    """Whole 256 x 256 image -> 1024: six convs (64, 128, 256, 512, 512, 512)."""

    def __init__(self, image_size: int = 256, bn_after_relu: bool = False):
        super().__init__(image_size, (64, 128, 256, 512, 512, 512), "linear7", bn_after_relu)


class ReferenceContextDiscriminator(nn.Module):
    """Concatenates both 1024-vectors -> 2048 -> 1 -> sigmoid: P(image is real)."""

    def __init__(self, local_size: int = 128, global_size: int = 256, bn_after_relu: bool = False):
        super().__init__()
        self.model_ld = ReferenceLocalDiscriminator(local_size, bn_after_relu)
        self.model_gd = ReferenceGlobalDiscriminator(global_size, bn_after_relu)
        self.linear1 = nn.Linear(2048, 1)

    def forward(self, local_patch, whole_image):
        features = torch.cat([self.model_ld(local_patch), self.model_gd(whole_image)], dim=1)
        return torch.sigmoid(self.linear1(features))
