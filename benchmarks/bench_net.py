"""Whole-network inference: how fast is glcic_fast on this machine, and is it right?

On a GPU: 512^2, 1024^2, 2048^2 (4096^2 where memory allows), batch 1 and 8, for
  - the reference in eager fp32 NCHW (what users run today),
  - the reference in eager bf16 channels_last,
  - torch.compile(mode="max-autotune") of the reference with BN folded, bf16 channels_last,
  - glcic_fast in bf16 with the dispatcher's choice ("auto"), with "torch" and "triton" for
    every layer, and "cuda": glcic_fast._C's conv for the 3x3 256 -> 256 layers (conv5 to
    conv12, the only ones it covers), the dispatcher's choice for the others,
  - torch.compile of glcic_fast's net with Inductor's freezing, bf16, at 1024^2 only.
On the CPU: 512^2 and 1024^2, batch 1, fp32: the reference vs glcic_fast with the
dispatcher's choice ("auto": the Winograd kernel, backend "cpp", for the 3x3 stride-1
layers it covers), with "torch" (oneDNN) for every layer, and torch.compile of glcic_fast's
net (Inductor, with and without freezing).

Every result's extra_info carries the device and versions, ms per megapixel, TFLOP/s and
its fraction of the measured bf16 GEMM ceiling, and the max difference to the fp32
reference on the same input (a fast result that is wrong is not a result).

    pytest benchmarks/bench_net.py --benchmark-only
"""

import gc

import pytest
import torch

from glcic_fast import CompletionNet, ops
from glcic_fast.ops import dispatch
from glcic_fast.inference.export import FoldedNet
from glcic_fast.nn.architecture import completion_macs
from glcic_fast.nn.reference import ReferenceCompletionNet

from measure import provenance, synchronized

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
#: The block order timed: the authors' (conv -> BN -> ReLU, BN folded into the conv), the
#: order of the README's table. GLCIC-PyTorch's keeps BN as an affine after the ReLU.
BN_AFTER_RELU = False

if CUDA:
    SHAPES = [(b, s) for s in (512, 1024, 2048, 4096) for b in (1, 8)]
    VARIANTS = ["reference-fp32-nchw", "reference-bf16-cl", "compile-max-autotune-folded-bf16"] + \
               [f"glcic_fast-{b}-bf16" for b in ("auto", "torch", "triton", "cuda", "compiled+freezing")]
else:
    SHAPES = [(1, 512), (1, 1024)]
    VARIANTS = ["reference-fp32-nchw", "glcic_fast-auto-fp32", "glcic_fast-torch-fp32", "glcic_fast-compiled-fp32",
                "glcic_fast-compiled+freezing-fp32"]

# GPU memory per input pixel that a shape needs, with margin: used only to skip shapes that
# cannot fit on the GPU at hand. Every variant's shape also runs the eager fp32 reference
# (for the max difference), whose peak is a full-resolution layer's conv, BN and ReLU
# outputs alive at once: 3 x 64 channels x 4 bytes = 768 B per pixel, plus the input,
# the kept output and cuDNN's workspace. 1200 B: batch 8 at 2048^2 (40 GB) and batch 1 at
# 4096^2 (20 GB) run on an 80 GB GPU, batch 8 at 4096^2 (161 GB) is skipped.
_BYTES_PER_PIXEL = 1200
#: The CUDA conv's layers (3x3, 256 -> 256, stride 1, padding == dilation) by dilation.
_CUDA_CONV_DILATIONS = (1, 2, 4, 8, 16)


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    return CompletionNet(BN_AFTER_RELU).state_dict()


def _build(variant, state):
    """(callable taking the fp32 NCHW input, input preparation) for a variant."""
    if variant.startswith("reference") or variant.startswith("compile"):
        ref = ReferenceCompletionNet(BN_AFTER_RELU).to(DEVICE)
        ref.load_state_dict(state)
        ref.eval()
        if variant == "reference-fp32-nchw":
            return ref, lambda x: x
        if variant == "reference-bf16-cl":
            ref = ref.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
            return ref, lambda x: x.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
        net = CompletionNet(BN_AFTER_RELU).to(DEVICE)
        net.load_state_dict(state)
        net.eval()
        folded = FoldedNet(net, torch.bfloat16, DEVICE).to(memory_format=torch.channels_last)
        # A fresh Dynamo state and static shapes: the second batch size must be compiled
        # for its own shape, not recompiled with a dynamic batch dimension (Dynamo's
        # automatic dynamic shapes after a guard failure), which is a different program.
        torch._dynamo.reset()
        return torch.compile(folded, mode="max-autotune", dynamic=False), \
            lambda x: x.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    _, backend, dtype = variant.split("-")
    if backend.startswith("compiled"):  # torch.compile of the net itself (one graph), by Inductor
        net, prepare = _build(f"glcic_fast-auto-{dtype}", state)
        return _compiled(net, freezing=backend.endswith("+freezing")), prepare
    # "cuda" names no backend on the net: the tuning table (see _prefer_cuda_conv) steers
    # the layers the CUDA conv covers to it, and the dispatcher picks for the others.
    net = CompletionNet(BN_AFTER_RELU, backend=None if backend in ("auto", "cuda") else backend).to(DEVICE)
    net.load_state_dict(state)
    net.eval()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    return net, lambda x: x.to(dtype=dtype)


def _compiled(net, freezing):
    """torch.compile(net); with Inductor's freezing, which folds what depends on the weights
    alone (the BatchNorm fold, the Winograd weight transforms) into constants at compile time
    instead of computing it every call. Freezing is a compile-time setting: every call runs
    under it, the first compiles."""
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True, dynamic=False)
    if not freezing:
        return compiled
    import torch._inductor.config as inductor_config

    def run(x):
        with inductor_config.patch(freezing=True):
            return compiled(x)
    return run


def _skip_reason(variant, batch, size):
    if variant.startswith("compile") and size != 1024:
        # max-autotune compiles for minutes per shape: measured where the targets are set.
        return "torch.compile(max-autotune) is measured at 1024^2 only"
    if CUDA and "compiled" in variant and size != 1024:  # a compile per shape: one shape on the GPU
        return "torch.compile of glcic_fast's net is measured at 1024^2 only on the GPU"
    if CUDA:
        # Memory the caching allocator holds but does not use (earlier shapes and
        # variants) counts as free: empty the cache first, then ask the driver.
        gc.collect()
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info()
        if batch * size * size * _BYTES_PER_PIXEL > free:
            return f"{batch} x {size}^2 does not fit in the {free / 2**30:.0f} GiB free on this GPU"
    if variant.startswith("glcic_fast-") and variant.split("-")[1] in ("triton", "cuda"):
        backend = variant.split("-")[1]
        channels = 256 if backend == "cuda" else 4  # the CUDA conv covers 256 -> 256 only
        x = torch.empty(1, channels, 8, 8, device=DEVICE, dtype=torch.bfloat16)
        w = torch.empty(channels, channels, 3, 3, device=DEVICE, dtype=torch.bfloat16)
        chosen, skipped = ops.explain("conv2d_bias_act", x.device, x, w, None, 1, 1, 1, "relu", None, None, backend=backend)
        if chosen is None:
            return f"backend {backend} cannot run here: {'; '.join(skipped)}"
    return None


def _prefer_cuda_conv(monkeypatch):
    """The dispatcher's tuning table, naming the CUDA conv for the layers it covers (bf16)."""
    table = {op: dict(keys) for op, keys in dispatch._tuning_table().items()}
    for d in _CUDA_CONV_DILATIONS:
        table.setdefault("conv2d_bias_act", {})[f"conv:256:256:k3:s1:d{d}:bfloat16"] = "cuda"
    monkeypatch.setattr(dispatch, "_TUNING", table)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch, size", SHAPES, ids=[f"b{b}-{s}" for b, s in SHAPES])
def test_net_inference(benchmark, monkeypatch, weights, bf16_gemm_tflops, variant, batch, size):
    reason = _skip_reason(variant, batch, size)
    if reason:
        pytest.skip(reason)
    benchmark.group = f"net-{DEVICE}-b{batch}-{size}"
    if variant.startswith("glcic_fast-cuda"):
        _prefer_cuda_conv(monkeypatch)
    model, prepare = _build(variant, weights)
    x32, want = _input_and_reference_output(weights, batch, size)
    x = prepare(x32)
    max_diff = _timed_and_checked(benchmark, variant, model, x, want, rounds=5 if CUDA else 2,
                                  warmup_rounds=2 if CUDA else 1)
    info = provenance()
    info.update({"variant": variant, "batch": batch, "size": size, "max_abs_diff_to_fp32_reference": max_diff})
    if isinstance(model, CompletionNet):  # which backend ran each layer ("conv1: triton (passed over: ...)")
        info["backends"] = {name: chosen for name, (chosen, _) in model.layer_backends(x[:1, :, :64, :64]).items()}
    if benchmark.stats is not None:  # None under --benchmark-disable
        seconds = benchmark.stats.stats.median
        tflops = 2 * completion_macs(size, size) * batch / seconds / 1e12
        info.update({"ms_per_megapixel": seconds * 1e3 / (batch * size * size / 2**20), "tflops": tflops,
                     "bf16_gemm_ceiling_tflops": bf16_gemm_tflops,
                     "fraction_of_bf16_gemm_ceiling": None if bf16_gemm_tflops is None else tflops / bf16_gemm_tflops})
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("made", ["normally", "under-inference-mode"])
def test_net_with_inference_tensor_weights(benchmark, weights, made):
    """A net built and loaded under inference_mode holds inference tensors, which have no
    version counter: the fold must still be reused (against a copy of the weights) rather
    than redone, with every layer's weight repacked, on each call. Side by side with the
    same net built normally, at batch 1 x 512^2 in the dispatcher's choice."""
    benchmark.group = f"net-{DEVICE}-inference-tensor-weights"
    dtype = "bf16" if CUDA else "fp32"
    with torch.inference_mode(made == "under-inference-mode"):
        model, prepare = _build(f"glcic_fast-auto-{dtype}", weights)
    assert any(p.is_inference() for p in model.parameters()) == (made == "under-inference-mode")
    x32, want = _input_and_reference_output(weights, 1, 512)
    x = prepare(x32)
    max_diff = _timed_and_checked(benchmark, f"a net made {made}", model, x, want, rounds=5 if CUDA else 3,
                                  warmup_rounds=1)
    info = provenance()
    info.update({"weights_made": made, "max_abs_diff_to_fp32_reference": max_diff})
    benchmark.extra_info.update(info)


def _timed_and_checked(benchmark, name, model, x, want, rounds, warmup_rounds):
    """Times ``model(x)`` under inference_mode and returns the max abs difference of its
    output to the fp32 reference's ``want``, checked against x's dtype's tolerance (a fast
    result that is wrong is not a result)."""
    with torch.inference_mode():
        max_diff = (model(x).float() - want).abs().max().item()
        benchmark.pedantic(synchronized(model), args=(x,), rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
    tolerance = 1e-4 if x.dtype == torch.float32 else 5e-2
    assert max_diff <= tolerance, f"{name} differs from the fp32 reference by {max_diff} (tolerance {tolerance})"
    return max_diff


_REFERENCE_OUTPUTS = {}


def _input_and_reference_output(weights, batch, size):
    """The fp32 input and the fp32 eager reference's output, computed once per shape."""
    if (batch, size) not in _REFERENCE_OUTPUTS:
        _REFERENCE_OUTPUTS.clear()  # keep one shape's tensors alive at a time
        x32 = torch.rand(batch, 4, size, size, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        reference = ReferenceCompletionNet(BN_AFTER_RELU).to(DEVICE)
        reference.load_state_dict(weights)
        with torch.inference_mode():
            _REFERENCE_OUTPUTS[(batch, size)] = (x32, reference.eval()(x32).float())
    return _REFERENCE_OUTPUTS[(batch, size)]
