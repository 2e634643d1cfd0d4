"""Per-layer speed of the completion net's fused convs on the CPU: the Winograd kernel
(backend "cpp", the 3x3 stride-1 layers it covers; the others are skipped with the
dispatcher's reason) and backend "torch" (oneDNN, channels_last), every layer on the
activations a 1024 x 1024 input gives it (256 x 256 under --benchmark-disable), fp32,
batch 1, the layers' real channel counts. extra_info holds the layer, milliseconds,
effective GFLOP/s (direct convolution's multiply-adds over the time) and achieved GFLOP/s
(the multiply-adds the backend performs: fewer for Winograd).

    pytest benchmarks/bench_conv_layers_cpu.py --benchmark-only
"""

import pytest
import torch

from glcic_fast import ops
from glcic_fast.nn.architecture import COMPLETION_LAYERS, layer_macs

from measure import layer_macs_performed, layer_sides, provenance

IMAGE = 1024


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("spec", COMPLETION_LAYERS, ids=[s.name for s in COMPLETION_LAYERS])
def test_conv_layer_cpu(benchmark, request, spec, backend):
    size = 256 if request.config.getoption("benchmark_disable") else IMAGE
    side, out = next((side, out) for s, side, out in layer_sides(size) if s is spec)
    g = torch.Generator().manual_seed(spec.index)
    x = torch.randn(1, spec.in_channels, side, side, generator=g).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(spec.weight_shape, generator=g) * 0.05).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(spec.out_channels, generator=g) * 0.1
    op_name = "conv_transpose2d_bias_act" if spec.transposed else "conv2d_bias_act"
    args = (spec.stride, spec.padding, spec.dilation, spec.activation, None, None)
    chosen, skipped = ops.explain(op_name, x.device, x, weight, bias, *args, backend=backend)
    if chosen is None:
        pytest.skip("; ".join(skipped))
    op = ops.conv_transpose2d_bias_act if spec.transposed else ops.conv2d_bias_act
    run = lambda: op(x, weight, bias, stride=spec.stride, padding=spec.padding,  # noqa: E731
                     dilation=spec.dilation, activation=spec.activation, backend=backend)
    benchmark.group = f"conv-layers-cpu-{size}"
    with torch.inference_mode():
        benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    direct, performed = layer_macs(spec, out, out), layer_macs_performed(spec, out, out, backend)
    info = {**provenance(), "layer": spec.name, "backend": backend, "size": size}
    if benchmark.stats is not None:  # None under --benchmark-disable
        seconds = benchmark.stats.stats.median
        info.update({"ms": seconds * 1e3, "effective_gflops": 2 * direct / seconds / 1e9,
                     "achieved_gflops": 2 * performed / seconds / 1e9})
    benchmark.extra_info.update(info)
