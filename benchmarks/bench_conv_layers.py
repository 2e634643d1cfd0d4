"""Per-layer speed of the completion net's fused convs: Triton kernels, the CUDA kernel and
the torch backend.

Every layer of the completion net (glcic_fast.nn.architecture) on the activations a 1024x1024
input gives it, bf16, channels_last, batch 1 and 8; backend "triton" (kernels/conv2d_bias_act.py),
backend "cuda" (glcic_fast._C's tensor-core kernel, only for the 3x3 256 -> 256 stride-1
layers: the others are skipped with the dispatcher's reason) and backend "torch" (cuDNN,
channels_last input and weight). extra_info holds the device and versions, the layer, the op and its
dispatcher tuning key, milliseconds (CUDA events), TFLOP/s and its fraction of the measured
bf16 GEMM ceiling. CUDA only: skipped without a GPU. benchmarks/make_tuning_table.py turns
the JSON into the dispatcher's tuning table.

    pytest benchmarks/bench_conv_layers.py --benchmark-group-by=group
"""

import pytest
import torch

from glcic_fast import ops
from glcic_fast.nn.architecture import layer_macs

from measure import layer_sides, provenance, synchronized
from make_tuning_table import tuning_key

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

IMAGE = 1024


LAYERS = layer_sides(IMAGE)


def _cuda_ms(fn, iters=10):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("spec,size,out", [pytest.param(s, n, o, id=f"{s.name}-{n}px") for s, n, o in LAYERS])
def test_conv_layer(benchmark, bf16_gemm_tflops, spec, size, out, batch, backend):
    dtype, dev = torch.bfloat16, "cuda"
    g = torch.Generator(device=dev).manual_seed(spec.index)
    x = torch.randn(batch, spec.in_channels, size, size, device=dev, generator=g).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    fan_in = spec.in_channels * spec.kernel_size ** 2
    w = (torch.randn(*spec.weight_shape, device=dev, generator=g) * (2.0 / fan_in) ** 0.5).to(dtype)
    w = w.contiguous(memory_format=torch.channels_last)
    b = torch.randn(spec.out_channels, device=dev, generator=g).to(dtype) * 0.1
    scale = shift = None
    if spec.has_bn:
        scale = torch.rand(spec.out_channels, device=dev, generator=g).to(dtype) + 0.5
        shift = torch.randn(spec.out_channels, device=dev, generator=g).to(dtype) * 0.1
    op = ops.conv_transpose2d_bias_act if spec.transposed else ops.conv2d_bias_act
    op_name = "conv_transpose2d_bias_act" if spec.transposed else "conv2d_bias_act"
    kwargs = dict(stride=spec.stride, padding=spec.padding, dilation=spec.dilation,
                  activation=spec.activation, post_scale=scale, post_shift=shift, backend=backend)
    with torch.no_grad():
        chosen, skipped = ops.explain(op_name, x.device, x, w, b, spec.stride, spec.padding, spec.dilation,
                                      spec.activation, scale, shift, backend=backend)
    if chosen is None:
        pytest.skip("; ".join(skipped))

    def run():
        return op(x, w, b, **kwargs)

    with torch.no_grad():
        for _ in range(3):  # autotuning, cuDNN heuristics, weight repacking
            y = run()
        torch.cuda.synchronize()
        ms = _cuda_ms(run)

        benchmark.group = f"{spec.name}-{size}px-b{batch}"
        flops = 2 * batch * layer_macs(spec, out, out)
        tflops = flops / (ms * 1e-3) / 1e12
        benchmark.extra_info.update(provenance())
        benchmark.extra_info.update({
            "layer": spec.name, "backend": backend, "batch": batch, "input_hw": size,
            "dtype": "bf16", "op": op_name,
            "tuning_key": tuning_key(spec.transposed, spec.in_channels, spec.out_channels, spec.kernel_size,
                                     spec.stride, spec.dilation, str(dtype).split(".")[-1]),
            "out_shape": list(y.shape), "gflop": flops / 1e9,
            "ms_cuda_events": ms, "tflops": tflops,
            "fraction_of_bf16_gemm": tflops / bf16_gemm_tflops if bf16_gemm_tflops else None,
        })
        benchmark.pedantic(synchronized(run), rounds=20, iterations=1, warmup_rounds=2)
    assert not torch.isnan(y).any()
