"""The whole CompletionNet on each backend vs the reference graph.

On the CPU the Triton backend runs through Triton's interpreter at a small size; on a GPU
every backend runs at 512 x 512 in fp32 and bf16."""

import contextlib
import os

import pytest
import torch

from glcic_fast import CompletionNet, ops
from glcic_fast.nn.reference import ReferenceCompletionNet

from helpers import call_targets, compile_recording_graphs, randomize

CUDA = torch.cuda.is_available()


@contextlib.contextmanager
def _no_tf32():
    """An fp32 reference: TF32 off in cuDNN and cuBLAS for the block, then as it was (not
    monkeypatch: torch.backends.cuda.matmul has no attribute of its own that it could put
    back, and recent pytest's undo then fails)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _pair(bn_after_relu, backend, device):
    net = randomize(CompletionNet(bn_after_relu, backend=backend), seed=11).to(device).eval()
    ref = ReferenceCompletionNet(bn_after_relu).to(device)
    ref.load_state_dict(net.state_dict())
    return net, ref.eval()


@pytest.mark.skipif(CUDA or os.environ.get("TRITON_INTERPRET") != "1", reason="the CPU check runs Triton's interpreter")
@pytest.mark.parametrize("bn_after_relu", [False, True])
def test_triton_net_on_the_interpreter(bn_after_relu):
    net, ref = _pair(bn_after_relu, "triton", "cpu")
    x = torch.rand(1, 4, 16, 12, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got, want = net(x), ref(x)
    assert (got - want).abs().max().item() <= 1e-4


# bf16: 17 layers, each rounding its output to 8 bits of mantissa; with these random
# weights and BN statistics that moves the sigmoid outputs by about 3e-3 on average and
# by up to about 3e-2 at 512 x 512 (measured with the torch backend in bf16 on the CPU,
# whose convolutions round as cuDNN's do). A wrong tap, dilation or epilogue moves the
# mean by tens of times that.
TOLERANCES = [pytest.param(torch.float32, 1e-4, 1e-5, id="fp32"), pytest.param(torch.bfloat16, 8e-2, 6e-3, id="bf16")]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", [None, "torch", "triton"])  # "cuda" covers only layers 5-12: see below
@pytest.mark.parametrize("dtype, max_tolerance, mean_tolerance", TOLERANCES)
@pytest.mark.parametrize("bn_after_relu", [False, True])
def test_net_on_gpu_512(backend, dtype, max_tolerance, mean_tolerance, bn_after_relu):
    if backend is not None and not ops.available_backends("conv2d_bias_act").count(backend):
        pytest.skip(f"backend {backend} is not available: {ops.BACKEND_LOAD_ERRORS.get(backend, 'not registered')}")
    net, ref = _pair(bn_after_relu, backend, "cuda")
    x = torch.rand(2, 4, 512, 512, generator=torch.Generator().manual_seed(0)).cuda()
    with torch.inference_mode(), _no_tf32():
        want = ref(x)
        got = net(x.to(dtype)).float()
    assert torch.isfinite(got).all()
    diff = (got - want).abs()
    assert diff.max().item() <= max_tolerance and diff.mean().item() <= mean_tolerance, \
        f"max {diff.max().item():.3g} (<= {max_tolerance}), mean {diff.mean().item():.3g} (<= {mean_tolerance})"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("bn_after_relu", [False, True])
def test_torch_compile_of_the_net_on_gpu(bn_after_relu):
    """torch.compile(net) on the GPU in bf16: one graph holding the op of each backend the
    dispatcher chose (Dynamo's view), and Inductor's compiled net within bf16's tolerance
    of the fp32 reference."""
    if "triton" not in ops.available_backends("conv2d_bias_act"):
        pytest.skip(f"no Triton backend: {ops.BACKEND_LOAD_ERRORS.get('triton', 'not registered')}")
    net, ref = _pair(bn_after_relu, None, "cuda")
    x = torch.rand(2, 4, 128, 128, generator=torch.Generator().manual_seed(0)).cuda()
    _, max_tolerance, mean_tolerance = TOLERANCES[1].values
    with torch.no_grad(), _no_tf32():
        want = ref(x)
        recorded, graphs = compile_recording_graphs(net)
        recorded(x.bfloat16())
        assert len(graphs) == 1
        targets = call_targets(graphs[0].graph)
        # Dynamo's graph names the functions called, one per backend the dispatcher chose.
        expected_calls = {"triton": "glcic_fast.triton_conv", "cuda": "glcic_fast.conv3x3_bias_act",
                          "torch": "method conv"}
        for chosen in {chosen for chosen, _ in net.layer_backends(x.bfloat16()).values()}:
            assert any(expected_calls[chosen] in t for t in targets), (chosen, targets)
        torch._dynamo.reset()
        got = torch.compile(net, fullgraph=True)(x.bfloat16()).float()
    diff = (got - want).abs()
    assert diff.max().item() <= max_tolerance and diff.mean().item() <= mean_tolerance, \
        f"max {diff.max().item():.3g} (<= {max_tolerance}), mean {diff.mean().item():.3g} (<= {mean_tolerance})"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_auto_choice_takes_the_cuda_conv_only_where_the_tuning_table_names_it(monkeypatch):
    """The CUDA conv runs only the 3x3 256 -> 256 layers, and the automatic choice takes it
    only where a tuning table measured it fastest; elsewhere the choice falls back."""
    from glcic_fast.ops import dispatch

    if "cuda" not in ops.available_backends("conv2d_bias_act"):
        pytest.skip(f"no CUDA conv in this build: {ops.BACKEND_LOAD_ERRORS.get('cuda', 'not registered')}")
    net = CompletionNet().cuda().eval()
    x = torch.rand(1, 4, 64, 64, device="cuda", dtype=torch.bfloat16)

    def chosen():
        return {name: backend for name, (backend, _) in net.layer_backends(x).items()}

    monkeypatch.setattr(dispatch, "_TUNING", {})
    assert "cuda" not in chosen().values()
    monkeypatch.setattr(dispatch, "_TUNING", {"conv2d_bias_act": {
        f"conv:256:256:k3:s1:d{d}:bfloat16": "cuda" for d in (1, 2, 4, 8, 16)}})
    picks = chosen()
    assert all(picks[f"conv{i}"] == "cuda" for i in range(5, 13)), picks
    assert picks["conv1"] != "cuda" and picks["deconv13"] != "cuda", picks
