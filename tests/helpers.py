"""Test helpers: completion networks with random weights *and* random BN statistics
(fresh BN layers are the identity, which would hide folding mistakes)."""

import os

import torch
import torch.nn.functional as F

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


# -- the fused conv op's formula in float64, the oracle of every backend's parity tests -------

#: How far the CPU Winograd kernel (backend "cpp") may be from float64, relative to the
#: largest output, per tile size m: measured on a 256 -> 256 layer (README): m = 2 7.2e-7,
#: m = 4 1.8e-5, m = 6 2.5e-5; about twice that, as each tile's rounding varies with the data.
WINOGRAD_REL_TOL = {2: 2e-6, 4: 4e-5, 6: 6e-5}


def conv64(transposed, x, w, b, stride, padding, dilation):
    """conv + bias in float64 on x's device (cuDNN and ATen run float64 exactly enough),
    from the same dtype-rounded inputs."""
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    if transposed:
        return F.conv_transpose2d(d(x), d(w), d(b), stride, padding, 0, 1, dilation)
    return F.conv2d(d(x), d(w), d(b), stride, padding, dilation)


def epilogue64(y, activation, scale, shift):
    if activation == "relu":
        y = y.relu()
    elif activation == "sigmoid":
        y = y.sigmoid()
    elif activation == "hardtanh":
        y = y.clamp(-1.0, 1.0)
    if scale is not None:
        y = y * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    return y


def fused_conv_reference(transposed, x, w, b, stride, padding, dilation, activation, scale, shift):
    """glcic_fast.ops' fused conv formula in float64."""
    return epilogue64(conv64(transposed, x, w, b, stride, padding, dilation), activation, scale, shift)


def compile_recording_graphs(fn):
    """(``torch.compile(fn, fullgraph=True)``, the list of graphs it compiles) through a
    backend that runs each graph Dynamo hands it as it is and appends it to the list."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(fn, backend=recording_backend, fullgraph=True), graphs


def call_targets(graph):
    """The functions an FX graph calls, as strings ("glcic_fast.conv3x3_bias_act.default")."""
    return [str(n.target) for n in graph.nodes if n.op == "call_function"]
