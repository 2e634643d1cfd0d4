"""Choosing the Winograd tile: the whole net on the CPU with F(m x m, 3 x 3) for m = 2, 4, 6
(glcic_fast.ops.winograd.TILE) against direct convolution ("torch": oneDNN) for every layer,
at 512 x 512, batch 1, fp32, with the bundled demo weights on the astronaut photo; each
result records its max difference to the float64 run of the same net, and the relative
error (max |error| / max |output|) of one random 256 -> 256 layer at dilations 1 and 4.

    pytest benchmarks/bench_winograd_tile.py --benchmark-only

(CPU only: the kernel is the C++ extension's CPU backend.)
"""

import pytest
import torch
import torch.nn.functional as F

import glcic_fast
from glcic_fast.imageio import read_rgb
from glcic_fast.inference.bench import DEMO_WEIGHTS, EXAMPLE_IMAGE, EXAMPLE_MASK
from glcic_fast.inference.masks import hole_mask
from glcic_fast.ops import available_backends, winograd

from measure import provenance

pytestmark = pytest.mark.skipif("cpp" not in available_backends("conv2d_bias_act"),
                                reason="the CPU Winograd kernel needs glcic_fast._C (backend cpp)")

VARIANTS = ["torch"] + [f"winograd-m{m}" for m in sorted(winograd.POINTS)]


@pytest.fixture(scope="module")
def net_and_input():
    net = glcic_fast.load(DEMO_WEIGHTS).eval()
    image = read_rgb(EXAMPLE_IMAGE)
    hole = (hole_mask(*image.shape[-2:], EXAMPLE_MASK, image=EXAMPLE_IMAGE) > 0.5).float()
    x = net.prepare_input(image[None], hole[None])
    exact = glcic_fast.load(DEMO_WEIGHTS).double().eval()
    exact.backend = "torch"
    with torch.inference_mode():
        return net, x, exact(x.double())


def _layer_rel_err():
    """max |y - y64| / max |y64| of a random 256 -> 256 3x3 layer (He-scaled weights) on a
    64 x 64 input, through the dispatcher, at dilations 1 and 4."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 256, 64, 64, generator=g)
    w = torch.randn(256, 256, 3, 3, generator=g) * (2 / 2304) ** 0.5
    b = torch.randn(256, generator=g) * 0.1
    errors = []
    for d in (1, 4):
        y = glcic_fast.ops.conv2d_bias_act(x, w, b, padding=d, dilation=d, activation="none")
        exact = F.conv2d(x.double(), w.double(), b.double(), padding=d, dilation=d)
        errors.append(((y.double() - exact).abs().max() / exact.abs().max()).item())
    return max(errors)


@pytest.mark.parametrize("variant", VARIANTS)
def test_winograd_tile(benchmark, monkeypatch, net_and_input, variant):
    net, x, want = net_and_input
    if variant == "torch":
        monkeypatch.setattr(net, "backend", "torch")
        monkeypatch.setenv("GLCIC_FAST_BACKEND", "torch")  # for the single layer
    else:
        monkeypatch.setattr(winograd, "TILE", int(variant.removeprefix("winograd-m")))
    benchmark.group = "winograd-tile-cpu-b1-512"
    with torch.inference_mode():
        layer_rel_err = _layer_rel_err()
        max_diff = (net(x).double() - want).abs().max().item()
        benchmark.pedantic(net, args=(x,), rounds=5, iterations=1, warmup_rounds=1)
    assert max_diff <= 1e-4, f"{variant} differs from float64 by {max_diff}"
    benchmark.extra_info.update({**provenance(), "variant": variant, "max_abs_diff_to_float64": max_diff,
                                 "layer_rel_err": layer_rel_err})
