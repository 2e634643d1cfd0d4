"""Test helpers: completion networks with random weights *and* random BN statistics
(fresh BN layers are the identity, which would hide folding mistakes)."""

import os

import torch

from glcic_fast.nn.architecture import COMPLETION_LAYERS
from glcic_fast.nn.completion_net import CompletionNet
from glcic_fast.nn.weights import save


#: The repository root (tests run from any folder).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for spec in COMPLETION_LAYERS:
            conv = getattr(net, spec.name)
            fan_in = conv.weight[0].numel() if not spec.transposed else spec.in_channels * spec.kernel_size ** 2 // 4
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
            if spec.has_bn:
                bn = getattr(net, f"bn{spec.index}")
                n = spec.out_channels
                bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(n, generator=g) * 0.2)
                mean = torch.randn(n, generator=g) * 0.2
                # After a ReLU (conv -> ReLU -> BN) a BN only learns running means >= 0.
                bn.running_mean.copy_(mean.abs() if net.bn_after_relu else mean)
                bn.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
    return net


def random_image_and_mask(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 3, h, w, generator=g)
    mask = torch.zeros(n, 1, h, w)
    for i in range(n):
        y0, x0 = int(torch.randint(0, h // 2, (1,), generator=g)), int(torch.randint(0, w // 2, (1,), generator=g))
        mask[i, :, y0:y0 + h // 3 + 1, x0:x0 + w // 3 + 1] = 1
    return image, mask


def saved_random_net(folder, seed=0, **kwargs):
    """(net, path): a CompletionNet(**kwargs) in eval mode with random weights and BN
    statistics, saved as ``folder``/net.safetensors."""
    net = randomize(CompletionNet(**kwargs), seed=seed).eval()
    path = os.path.join(folder, "net.safetensors")
    save(net, path)
    return net, path
