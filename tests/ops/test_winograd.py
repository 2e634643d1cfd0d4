"""Backend "cpp" of conv2d_bias_act: Winograd F(m x m, 3 x 3) on the CPU
(glcic_fast/ops/winograd.py, csrc/ops/cpu/conv2d_bias_act*).

* The transforms reproduce 3-tap correlation exactly (float64) for every m built.
* Parity against F.conv2d in float64 for every dilation of the net (the dilated layers run
  as their interleaved sub-grids' ordinary convs), odd sizes, batch > 1, every epilogue, on
  every instruction set this CPU runs (AVX-512, AVX2 + FMA, portable), for every m.
* The whole completion net, both block orders, random weights and BN statistics, on a real
  photo: within 1e-4 of the float64 reference.
* The dispatcher takes it on the CPU where it applies and says why where it does not; named,
  it refuses other dtypes, shapes and autograd with the reason; the transformed weight is
  made again when the weight changes; the result does not depend on the thread count;
  torch.compile and torch.export keep the op, and torch.library.opcheck passes.
"""

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import glcic_fast
from glcic_fast import ops
from glcic_fast.ops import winograd

from helpers import WINOGRAD_REL_TOL, call_targets, compile_recording_graphs, fused_conv_reference, randomize
from photos import photo, rect_mask

conv = importlib.import_module("glcic_fast.ops.conv2d_bias_act")

pytestmark = pytest.mark.skipif(not conv._extension.LOADED, reason=ops.BACKEND_LOAD_ERRORS.get("cpp", ""))

DILATIONS = (1, 2, 4, 8, 16)  # those of the net's 3x3 layers
ISAS = ("avx512", "avx2", "portable")


def _isa_refusal(isa):
    """Why the kernel refuses GLCIC_FAST_CPU_ISA=isa on this CPU, or None: the kernel's own
    answer (it asks the CPU, and the OS's support, through __builtin_cpu_supports)."""
    saved = os.environ.get("GLCIC_FAST_CPU_ISA")
    os.environ["GLCIC_FAST_CPU_ISA"] = isa
    try:
        conv.winograd_isa()
        return None
    except RuntimeError as exc:
        return str(exc).splitlines()[0]
    finally:
        if saved is None:
            del os.environ["GLCIC_FAST_CPU_ISA"]
        else:
            os.environ["GLCIC_FAST_CPU_ISA"] = saved


def _runnable_isas():
    return [isa for isa in ISAS if _isa_refusal(isa) is None] if conv._extension.LOADED else []


#: Whether the dispatcher takes the kernel by itself here (not with only its portable code).
AUTOMATIC = conv._extension.LOADED and _runnable_isas()[0] != "portable"
needs_automatic = pytest.mark.skipif(not AUTOMATIC, reason="this CPU has neither AVX-512 nor AVX2 + FMA: the "
                                                            "Winograd kernel is not taken automatically")


def _make(n, cin, cout, h, w, seed=0, affine=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g)
    weight = torch.randn(cout, cin, 3, 3, generator=g) * (2.0 / (cin * 9)) ** 0.5
    bias = torch.randn(cout, generator=g) * 0.1
    scale = (torch.rand(cout, generator=g) + 0.5) if affine else None
    shift = (torch.randn(cout, generator=g) * 0.1) if affine else None
    return x, weight, bias, scale, shift


def _reference(x, weight, bias, dilation, activation, scale, shift):
    return fused_conv_reference(False, x, weight, bias, 1, dilation, dilation, activation, scale, shift)


def _winograd(x, weight, bias, dilation, activation, scale, shift, m=winograd.TILE):
    """The kernel with F(m x m, 3 x 3), called directly."""
    bt, at = winograd.kernel_matrices(m)
    return torch.ops.glcic_fast.conv3x3_winograd_bias_act(x, winograd.transform_weight(weight, m), bt, at, bias,
                                                          dilation, activation, scale, shift)


def _assert_close(y, ref, m):
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    assert y.shape == ref.shape
    assert not torch.isnan(y).any()
    rel = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    tol = WINOGRAD_REL_TOL[m]
    assert rel <= tol, f"F({m}x{m}, 3x3): max |y - ref| / max |ref| = {rel:.3g} > {tol}"


# ------------------------------------------------------------------------------- the transforms

@pytest.mark.parametrize("m", sorted(winograd.POINTS))
def test_transforms_compute_correlation_exactly(m):
    """AT [(G g) .* (BT d)] = the m outputs of correlating d with g, to float64 rounding."""
    at, g_mat, bt = (t.numpy() for t in winograd.matrices(m))
    assert at.shape == (m, m + 2) and g_mat.shape == (m + 2, 3) and bt.shape == (m + 2, m + 2)
    rng = np.random.default_rng(m)
    for _ in range(5):
        d, g = rng.standard_normal(m + 2), rng.standard_normal(3)
        direct = np.array([d[i:i + 3] @ g for i in range(m)])
        np.testing.assert_allclose(at @ ((g_mat @ g) * (bt @ d)), direct, rtol=0, atol=1e-13)


def test_tile_sizes_outside_the_built_ones_are_refused():
    with pytest.raises(ValueError, match="m in"):
        winograd.matrices(3)


# ------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dilation", DILATIONS, ids=[f"d{d}" for d in DILATIONS])
@pytest.mark.parametrize("m", sorted(winograd.POINTS))
def test_parity_per_dilation_instruction_set_and_tile(monkeypatch, isa, dilation, m):
    """Odd sizes (partial tiles, sub-grids of unequal size), batch 3, 32 -> 48 channels (on
    AVX-512: one 32-column micro-kernel panel and the 16-column tail)."""
    refusal = _isa_refusal(isa)
    if refusal is not None:
        pytest.skip(refusal)
    monkeypatch.setenv("GLCIC_FAST_CPU_ISA", isa)
    size = (2 * dilation + 7, 3 * dilation + 5)
    x, weight, bias, _, _ = _make(3, 32, 48, *size, seed=dilation)
    y = _winograd(x, weight, bias, dilation, "none", None, None, m)
    _assert_close(y, _reference(x, weight, bias, dilation, "none", None, None), m)


@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("activation", conv.ACTIVATIONS)
def test_parity_per_epilogue(activation, affine):
    """Through the public op, backend "cpp" named: bias, each activation, the affine."""
    x, weight, bias, scale, shift = _make(2, 16, 32, 13, 11, seed=1, affine=affine)
    with torch.no_grad():
        y = ops.conv2d_bias_act(x, weight, bias, padding=2, dilation=2, activation=activation, post_scale=scale,
                                post_shift=shift, backend="cpp")
    _assert_close(y, _reference(x, weight, bias, 2, activation, scale, shift), winograd.TILE)


@pytest.mark.parametrize("shape", [(1, 256, 64, 64), (2, 128, 37, 29)], ids=["256ch", "128ch-odd"])
def test_parity_at_the_nets_channel_counts(shape):
    n, c, h, w = shape
    x, weight, bias, scale, shift = _make(n, c, c, h, w, seed=c, affine=True)
    for dilation in (1, 4):
        y = _winograd(x, weight, bias, dilation, "relu", scale, shift)
        _assert_close(y, _reference(x, weight, bias, dilation, "relu", scale, shift), winograd.TILE)


def test_relu_keeps_nan_as_torch_does():
    x, weight, bias, _, _ = _make(1, 16, 16, 8, 8)
    x[0, :, 3, 3] = float("nan")
    y = _winograd(x, weight, bias, 1, "relu", None, None)
    expected = F.conv2d(x, weight, bias, padding=1).relu().isnan()
    # NaN spreads through whole tiles in the transformed domain: a superset of torch's.
    assert expected.any() and y.isnan()[expected].all()


def test_result_does_not_depend_on_the_thread_count():
    """The tiles are cut into blocks of a fixed size whatever the thread count."""
    x, weight, bias, _, _ = _make(2, 64, 64, 45, 39, seed=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _winograd(x, weight, bias, 2, "relu", None, None)
        torch.set_num_threads(max(2, threads))
        many = _winograd(x, weight, bias, 2, "relu", None, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


# ------------------------------------------------------------------------------- the network

@needs_automatic
@pytest.mark.parametrize("bn_after_relu", [False, True], ids=["paper-order", "glcic-pytorch-order"])
def test_whole_network_within_1e_4_of_the_float64_reference(bn_after_relu):
    """Random weights and BN statistics, a real photo with a hole, 260 x 196 (odd tile
    counts at every scale): the automatic choice runs the Winograd kernel for every 3x3
    stride-1 layer it covers, and the output stays within 1e-4 of float64."""
    net = randomize(glcic_fast.CompletionNet(bn_after_relu=bn_after_relu), seed=11).eval()
    image = photo("astronaut", 260, 196)
    mask = rect_mask(260, 196, (90, 60, 70, 50))
    x = net.prepare_input(image[None], mask[None])
    chosen = net.layer_backends(x)
    on_winograd = [name for name, (backend, _) in chosen.items() if backend == "cpp"]
    assert on_winograd == ["conv3", "conv5", "conv6", "conv7", "conv8", "conv9", "conv10", "conv11", "conv12",
                           "conv14", "conv16"], chosen
    with torch.inference_mode():
        y = net(x)
        reference = randomize(glcic_fast.CompletionNet(bn_after_relu=bn_after_relu), seed=11).double().eval()
        reference.backend = "torch"
        y64 = reference(x.double())
    err = (y.double() - y64).abs().max().item()
    assert err <= 1e-4, f"max |y - y64| = {err:.3g}"


# ------------------------------------------------------------------------------- the dispatcher

def test_the_kernel_runs_the_best_instruction_set_of_this_cpu(monkeypatch):
    monkeypatch.delenv("GLCIC_FAST_CPU_ISA", raising=False)
    assert conv.winograd_isa() == _runnable_isas()[0]
    assert "portable" in _runnable_isas()


@needs_automatic
def test_automatic_choice_takes_it_where_it_applies():
    x, weight, bias, _, _ = _make(1, 32, 32, 9, 9)
    chosen, skipped = ops.explain("conv2d_bias_act", x.device, x, weight, bias, 1, 2, 2, "relu", None, None)
    assert (chosen, skipped) == ("cpp", [])


def test_portable_code_is_taken_only_when_named(monkeypatch):
    """Asked at each call: GLCIC_FAST_CPU_ISA set after the import counts."""
    x, weight, bias, _, _ = _make(1, 32, 32, 9, 9)
    monkeypatch.setenv("GLCIC_FAST_CPU_ISA", "portable")
    chosen, skipped = ops.explain("conv2d_bias_act", x.device, x, weight, bias, 1, 1, 1, "relu", None, None)
    assert chosen == "torch" and len(skipped) == 1 and "portable code" in skipped[0], skipped
    with torch.no_grad():
        y = ops.conv2d_bias_act(x, weight, bias, padding=1, backend="cpp")
    _assert_close(y, _reference(x, weight, bias, 1, "relu", None, None), winograd.TILE)


@pytest.mark.parametrize("case, reason", [
    (dict(dtype=torch.bfloat16), "dtype torch.bfloat16 is not supported by the Winograd kernel"),
    (dict(k=5), "covers only 3x3 convs"),
    (dict(stride=2), "stride 2"),
    (dict(padding=0), "padding 0, dilation 1"),
    (dict(cout=3), "channels in multiples of 16"),
    (dict(grad=True), "autograd is recording"),
])
def test_named_it_refuses_what_it_cannot_run_with_the_reason(case, reason):
    k, cout = case.get("k", 3), case.get("cout", 16)
    dtype = case.get("dtype", torch.float32)
    x = torch.randn(1, 16, 8, 8, dtype=dtype)
    weight = torch.randn(cout, 16, k, k, dtype=dtype, requires_grad=case.get("grad", False))
    with pytest.raises(ops.BackendUnavailable, match=reason):
        ops.conv2d_bias_act(x, weight, None, stride=case.get("stride", 1), padding=case.get("padding", k // 2),
                            backend="cpp")
    # The automatic choice falls back to torch, quietly.
    ops.conv2d_bias_act(x, weight, None, stride=case.get("stride", 1), padding=case.get("padding", k // 2))


def test_kernel_argument_errors_are_clear():
    x, weight, bias, _, _ = _make(1, 16, 16, 6, 6)
    bt, at = winograd.kernel_matrices(4)
    u = winograd.transform_weight(weight, 4)
    with pytest.raises(ValueError, match="multiple of 16"):
        torch.ops.glcic_fast.conv3x3_winograd_bias_act(x[:, :8], u, bt, at, bias, 1, "relu", None, None)
    with pytest.raises(ValueError, match="activation must be"):
        torch.ops.glcic_fast.conv3x3_winograd_bias_act(x, u, bt, at, bias, 1, "gelu", None, None)
    with pytest.raises(ValueError, match="output_transform must be"):
        torch.ops.glcic_fast.conv3x3_winograd_bias_act(x, u, bt, winograd.kernel_matrices(2)[1], bias, 1, "relu",
                                                       None, None)
    with pytest.raises(ValueError, match="bias must be 16"):
        torch.ops.glcic_fast.conv3x3_winograd_bias_act(x, u, bt, at, bias[:8], 1, "relu", None, None)


def test_an_unknown_instruction_set_is_refused(monkeypatch):
    x, weight, bias, _, _ = _make(1, 16, 16, 6, 6)
    monkeypatch.setenv("GLCIC_FAST_CPU_ISA", "neon")
    with pytest.raises(ValueError, match="GLCIC_FAST_CPU_ISA=neon is not one of avx512, avx2, portable"):
        ops.conv2d_bias_act(x, weight, bias, padding=1)


def test_an_instruction_set_this_cpu_lacks_is_refused(monkeypatch):
    lacking = [isa for isa in ISAS if _isa_refusal(isa) is not None]
    if not lacking:
        pytest.skip("this CPU runs every instruction set the kernel is built for")
    x, weight, bias, _, _ = _make(1, 16, 16, 6, 6)
    monkeypatch.setenv("GLCIC_FAST_CPU_ISA", lacking[0])
    with pytest.raises(RuntimeError, match=f"this CPU does not run {lacking[0]}"):
        _winograd(x, weight, bias, 1, "relu", None, None)


def test_a_bad_instruction_set_name_does_not_break_the_import():
    env = dict(os.environ, GLCIC_FAST_CPU_ISA="neon")
    result = subprocess.run([sys.executable, "-c", "import glcic_fast"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_per_channel_vectors_may_be_strided():
    """The automatic choice takes any vectors the op accepts (the kernel gets them dense)."""
    x, weight, _, _, _ = _make(1, 16, 32, 7, 7)
    bias, scale, shift = (torch.randn(64)[::2] for _ in range(3))
    with torch.no_grad():
        y = ops.conv2d_bias_act(x, weight, bias, padding=1, post_scale=scale, post_shift=shift, backend="cpp")
    _assert_close(y, _reference(x, weight, bias, 1, "relu", scale, shift), winograd.TILE)


def test_the_transformed_weight_is_made_once(monkeypatch):
    calls = []
    transform = winograd.transform_weight
    monkeypatch.setattr(winograd, "transform_weight", lambda *a: calls.append(1) or transform(*a))
    x, weight, bias, _, _ = _make(1, 16, 16, 10, 10, seed=3)
    with torch.no_grad():
        for _ in range(3):
            ops.conv2d_bias_act(x, weight, bias, padding=1, backend="cpp")
    assert len(calls) == 1


def test_a_changed_weight_is_transformed_again():
    x, weight, bias, _, _ = _make(1, 16, 16, 10, 10)
    with torch.no_grad():
        before = ops.conv2d_bias_act(x, weight, bias, padding=1, backend="cpp")
        weight.mul_(-1)  # in place: the cache sees the version counter move
        after = ops.conv2d_bias_act(x, weight, bias, padding=1, backend="cpp")
    _assert_close(after, _reference(x, weight, bias, 1, "relu", None, None), winograd.TILE)
    assert not torch.equal(before, after)


# ------------------------------------------------------------------------------- torch.library

def test_opcheck():
    x, weight, bias, scale, shift = _make(2, 16, 32, 9, 7, affine=True)
    bt, at = winograd.kernel_matrices(4)
    torch.library.opcheck(torch.ops.glcic_fast.conv3x3_winograd_bias_act.default,
                          (x, winograd.transform_weight(weight, 4), bt, at, bias, 2, "relu", scale, shift))


class _DilatedLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        _, weight, bias, _, _ = _make(1, 16, 16, 1, 1, seed=9)
        self.weight, self.bias = torch.nn.Parameter(weight), torch.nn.Parameter(bias)

    def forward(self, x):
        return ops.conv2d_bias_act(x, self.weight, self.bias, padding=4, dilation=4, activation="relu")


def test_torch_compile_and_export_keep_the_op():
    model = _DilatedLayer()
    x = torch.randn(2, 16, 11, 13)
    with torch.no_grad():
        eager = model(x)
        compiled_model, graphs = compile_recording_graphs(model)
        out = compiled_model(x)
        exported = torch.export.export(model, (x,))
    assert any("conv3x3_winograd_bias_act" in t for g in graphs for t in call_targets(g.graph))
    assert any("conv3x3_winograd_bias_act" in t for t in call_targets(exported.graph_module.graph))
    torch.testing.assert_close(out, eager)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), eager)


def test_multiply_count():
    """What the benchmarks report as the multiplies performed: a 128 x 128 map is 32 x 32
    tiles of 4 x 4 at any dilation that divides it into equal sub-grids, 36 multiplies per
    tile and channel pair: 4x fewer than direct convolution's 9 per pixel."""
    for dilation in (1, 2, 4, 8, 16):
        assert winograd.tile_count(128, 128, dilation) == 1024
        assert winograd.multiplies(128, 128, 256, 256, dilation) * 4 == 128 * 128 * 256 * 256 * 9
    # Odd sizes: the sub-grids (7 and 6 rows, 6 and 5 columns at dilation 2) are cut into
    # 2 tiles each per axis, the last ones partial.
    assert winograd.tile_count(13, 11, 2) == 16
    assert winograd.tile_count(8, 8, 16) == 64  # 8 x 8 one-pixel sub-grids


@pytest.mark.parametrize("m", sorted(winograd.POINTS))
def test_traced_weight_transform_depends_on_the_weight_alone(m):
    """Under torch.compile the transform's only input is the weight (G enters as numbers),
    so Inductor's freezing can fold it into a constant instead of running it every call."""
    weight = torch.randn(32, 16, 3, 3)
    compiled_transform, graphs = compile_recording_graphs(winograd.transform_weight)
    out = compiled_transform(weight, m)
    inputs = [n for n in graphs[0].graph.nodes if n.op == "placeholder"]
    assert len(inputs) == 1, f"the traced transform takes {[n.name for n in inputs]}, not just the weight"
    torch.testing.assert_close(out, winograd.transform_weight(weight, m), rtol=0, atol=0)
