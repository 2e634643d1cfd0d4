"""The plain-PyTorch reference completion network: the parity oracle for every fused kernel.

Kept deliberately obvious: one module per paper layer, applied in order, nothing fused.
State-dict keys are GLCIC-PyTorch's, and so is the default block order, so a
GLCIC-PyTorch checkpoint loads into ``ReferenceCompletionNet(bn_after_relu=True)`` as it is.
"""

import torch
from torch import nn
import torch.nn.functional as F

from glcic_fast.nn.architecture import COMPLETION_LAYERS, OUTPUT_ACTIVATIONS


def make_conv(spec) -> nn.Module:
    cls = nn.ConvTranspose2d if spec.transposed else nn.Conv2d
    return cls(spec.in_channels, spec.out_channels, spec.kernel_size, stride=spec.stride,
               padding=spec.padding, dilation=spec.dilation)


def check_output_activation(value: str) -> str:
    if value not in OUTPUT_ACTIVATIONS:
        raise ValueError(f"output_activation must be one of {OUTPUT_ACTIVATIONS}, got {value!r}")
    return value


class ReferenceCompletionNet(nn.Module):
    """C(x, M): N x 4 x H x W -> N x 3 x H x W in (0, 1) (sigmoid) or [-1, 1] (hardtanh).

    ``bn_after_relu=False`` (default): conv -> BN -> ReLU (the authors' Torch7 model, mmagic's).
    ``bn_after_relu=True``: conv -> ReLU -> BN (GLCIC-PyTorch).
    The oracle takes the order it is given and never infers it (``CompletionNet`` does).
    ``output_activation``: "sigmoid" (default, the paper's) or "hardtanh" (mmagic's clip
    to [-1, 1], ``torch.clamp`` as mmagic applies it).
    """

    def __init__(self, bn_after_relu: bool = False, output_activation: str = "sigmoid"):
        super().__init__()
        self.bn_after_relu = bn_after_relu
        self.output_activation = check_output_activation(output_activation)
        for spec in COMPLETION_LAYERS:
            self.add_module(spec.name, make_conv(spec))
            if spec.has_bn:
                self.add_module(f"bn{spec.index}", nn.BatchNorm2d(spec.out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for spec in COMPLETION_LAYERS:
            x = getattr(self, spec.name)(x)
            if not spec.has_bn:
                if check_output_activation(self.output_activation) == "hardtanh":
                    return torch.clamp(x, -1.0, 1.0)
                return torch.sigmoid(x)
            bn = getattr(self, f"bn{spec.index}")
            x = bn(F.relu(x)) if self.bn_after_relu else F.relu(bn(x))
        raise AssertionError("the layer table ends with the output layer")
