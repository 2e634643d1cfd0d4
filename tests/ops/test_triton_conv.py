"""Parity of the Triton conv kernels (kernels/conv2d_bias_act.py) with a float64 reference.

Without a GPU the kernels run in Triton's CPU interpreter (conftest.py sets TRITON_INTERPRET=1),
so the layers of the completion net are scaled down in channels and size, keeping each
layer's kernel, stride, padding and dilation, the first conv's 4 input channels (K = 100, not
a multiple of the K block) and the last conv's 3 outputs. Kernel outputs are written into a
NaN-poisoned buffer, so an element the kernel leaves unwritten fails the test.

GPU-only tests (full layer shapes, a tensor past 2^31 elements, TF32) are skipped here.
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from glcic_fast import ops
from glcic_fast.nn.architecture import COMPLETION_LAYERS

import helpers


def _import_backend():
    try:  # installed package
        return importlib.import_module("glcic_fast.kernels.conv2d_bias_act")
    except ImportError:  # source checkout: kernels/ is glcic_fast.kernels only once installed
        return importlib.import_module("kernels.conv2d_bias_act")


tk = _import_backend()

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


# ------------------------------------------------------------------------------- helpers

def _scaled(c):
    """Channel count of a scaled-down layer: 4 in and 3 out kept, others / 8 (at least 16)."""
    return c if c in (3, 4) else max(16, c // 8)


def _distinct_layers():
    """One scaled-down case for each distinct (kind, kernel, stride, padding, dilation,
    channels, activation) of the completion net."""
    seen, cases = set(), []
    for spec in COMPLETION_LAYERS:
        key = (spec.transposed, spec.kernel_size, spec.stride, spec.padding, spec.dilation,
               _scaled(spec.in_channels), _scaled(spec.out_channels), spec.activation)
        if key not in seen:
            seen.add(key)
            cases.append(pytest.param(spec, id=f"{spec.name}-{'x'.join(map(str, key[5:7]))}"))
    return cases


def _make(spec_like, dtype, *, affine, n=2, size=(11, 13), seed=0, device=DEVICE):
    """x, weight, bias, post_scale, post_shift for a layer, in ``dtype``."""
    transposed, cin, cout, k = spec_like
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, *size, generator=g)
    wshape = (cin, cout, k, k) if transposed else (cout, cin, k, k)
    fan_in = cin * k * k
    w = torch.randn(*wshape, generator=g) * (2.0 / fan_in) ** 0.5
    b = torch.randn(cout, generator=g) * 0.1
    scale = shift = None
    if affine:
        scale = torch.rand(cout, generator=g) + 0.5
        shift = torch.randn(cout, generator=g) * 0.1
    return tuple(t.to(device=device, dtype=dtype) if t is not None else None
                 for t in (x, w, b, scale, shift))


def _reference(transposed, x, w, b, stride, padding, dilation, activation, scale, shift):
    """The fused op's formula in float64 on the CPU (from the same dtype-rounded inputs)."""
    d = lambda t: None if t is None else t.detach().to("cpu", torch.float64)
    x, w, b, scale, shift = map(d, (x, w, b, scale, shift))
    if transposed:
        y = F.conv_transpose2d(x, w, b, stride, padding, 0, 1, dilation)
    else:
        y = F.conv2d(x, w, b, stride, padding, dilation)
    if activation == "relu":
        y = y.relu()
    elif activation == "sigmoid":
        y = y.sigmoid()
    if scale is not None:
        y = y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    return y


def _ulp(ref, dtype):
    """One unit in the last place of ``dtype`` at |ref| (float64 tensor)."""
    fi = torch.finfo(dtype)
    mag = ref.abs().clamp_min(fi.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * fi.eps


def _assert_close(y, ref, dtype):
    assert not torch.isnan(y).any(), "NaN in the output: an element was left unwritten (or computed as NaN)"
    y64 = y.detach().to("cpu", torch.float64)
    assert y64.shape == ref.shape
    scale = ref.abs().max().clamp_min(1e-30)
    rel = ((y64 - ref).abs().max() / scale).item()
    assert rel <= REL_TOL[dtype], f"{dtype}: max |y - ref| / max |ref| = {rel:.3g} > {REL_TOL[dtype]}"
    if dtype != torch.float32:
        # Per element: one rounding of the fp32 result to dtype (the interpreter rounds
        # fp32 -> bf16 toward zero: up to 1 ulp) plus fp32 accumulation noise.
        bad = (y64 - ref).abs() > _ulp(ref, dtype) + 1e-5 * scale
        assert not bad.any(), (f"{int(bad.sum())} elements off by more than 1 ulp, e.g. y={y64[bad][:4].tolist()} "
                               f"ref={ref[bad][:4].tolist()}")


def _poisoned_out(x, weight, transposed, stride, padding, dilation):
    n, _, h, w = x.shape
    k = weight.shape[2]
    if transposed:
        cout = weight.shape[1]
        size = lambda s: (s - 1) * stride - 2 * padding + dilation * (k - 1) + 1
    else:
        cout = weight.shape[0]
        size = lambda s: (s + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    out = torch.empty(n, cout, size(h), size(w), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    return out.fill_(float("nan"))


def _launch_poisoned(transposed, x, w, b, stride, padding, dilation, activation, scale, shift):
    out = _poisoned_out(x, w, transposed, stride, padding, dilation)
    launch = tk.launch_conv_transpose2d if transposed else tk.launch_conv2d
    y = launch(x, w, b, stride, padding, dilation, activation, scale, shift, out=out)
    assert y is out
    return y


# ------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("spec", _distinct_layers())
def test_completion_layer_parity(spec, dtype):
    """Every distinct completion-net layer (scaled down), its own activation, BN as the post
    affine where the layer has one; odd H x W, batch 2; into a NaN-poisoned output."""
    cin, cout = _scaled(spec.in_channels), _scaled(spec.out_channels)
    size = (19, 21) if spec.dilation >= 8 else (11, 13)  # let the widest taps land inside
    x, w, b, scale, shift = _make((spec.transposed, cin, cout, spec.kernel_size), dtype,
                                  affine=spec.has_bn, size=size, seed=spec.index)
    args = (spec.stride, spec.padding, spec.dilation, spec.activation, scale, shift)
    with torch.no_grad():
        y = _launch_poisoned(spec.transposed, x, w, b, *args)
    _assert_close(y, _reference(spec.transposed, x, w, b, *args), dtype)


@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("activation", ["relu", "sigmoid", "none"])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "deconv"])
def test_epilogue_variants_through_the_op(transposed, activation, affine):
    """The public ops with backend="triton": every activation, with and without the affine,
    NCHW-contiguous input (converted), channels_last output in x's dtype."""
    dtype = torch.float32
    if transposed:
        k, stride, padding, dilation, cin, cout = 4, 2, 1, 1, 32, 16
    else:
        k, stride, padding, dilation, cin, cout = 3, 1, 2, 2, 16, 24
    x, w, b, scale, shift = _make((transposed, cin, cout, k), dtype, affine=affine, size=(9, 7))
    op = ops.conv_transpose2d_bias_act if transposed else ops.conv2d_bias_act
    with torch.no_grad():
        y = op(x, w, b, stride=stride, padding=padding, dilation=dilation, activation=activation,
               post_scale=scale, post_shift=shift, backend="triton")
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    _assert_close(y, _reference(transposed, x, w, b, stride, padding, dilation, activation, scale, shift), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [
    # (transposed, cin, cout, k, stride, padding, dilation, size)
    pytest.param((False, 64, 80, 3, 1, 1, 1, (10, 9)), id="conv-2cblocks-2nblocks"),
    pytest.param((False, 48, 40, 3, 2, 1, 1, (13, 10)), id="conv-flatK-cin48"),
    pytest.param((False, 4, 16, 5, 3, 0, 2, (17, 15)), id="conv-s3-d2-p0"),
    pytest.param((False, 32, 8, 1, 1, 0, 1, (7, 5)), id="conv-1x1"),
    pytest.param((True, 64, 80, 4, 2, 1, 1, (6, 5)), id="deconv-2cblocks-2nblocks"),
    pytest.param((True, 16, 24, 5, 3, 2, 1, (5, 7)), id="deconv-k5-s3-uneven-phases"),
    pytest.param((True, 16, 16, 3, 1, 1, 1, (6, 7)), id="deconv-s1"),
])
def test_generic_shapes(case, dtype):
    """Beyond the GLCIC layers: several channel / output blocks, K slices that cross taps,
    other strides, dilations, paddings, and transposed kernels not divisible by the stride."""
    transposed, cin, cout, k, stride, padding, dilation, size = case
    x, w, b, scale, shift = _make((transposed, cin, cout, k), dtype, affine=True, size=size, n=3)
    args = (stride, padding, dilation, "relu", scale, shift)
    with torch.no_grad():
        y = _launch_poisoned(transposed, x, w, b, *args)
    _assert_close(y, _reference(transposed, x, w, b, *args), dtype)


def test_non_contiguous_and_channels_last_inputs():
    x, w, b, scale, shift = _make((False, 16, 16, 3), torch.float32, affine=True, size=(14, 16))
    views = {
        "strided-nchw": x[:, :, 1::1, 2:15],                              # a crop: not contiguous
        "channels-last": x.contiguous(memory_format=torch.channels_last),
        "permuted": x.permute(0, 1, 3, 2),                                # transposed H/W
    }
    with torch.no_grad():
        for name, xv in views.items():
            y = ops.conv2d_bias_act(xv, w, b, padding=1, activation="relu", post_scale=scale,
                                    post_shift=shift, backend="triton")
            _assert_close(y, _reference(False, xv, w, b, 1, 1, 1, "relu", scale, shift), torch.float32)
        wt = torch.randn(16, 8, 4, 4)                                     # deconv on a crop
        y = ops.conv_transpose2d_bias_act(views["strided-nchw"], wt, None, stride=2,
                                          padding=1, activation="none", backend="triton")
        _assert_close(y, _reference(True, views["strided-nchw"], wt, None, 2, 1, 1, "none", None, None),
                      torch.float32)


def test_no_bias_and_empty_batch():
    x, w, _, _, _ = _make((False, 16, 16, 3), torch.float16, affine=False, size=(5, 6))
    with torch.no_grad():
        y = _launch_poisoned(False, x, w, None, 1, 1, 1, "sigmoid", None, None)
        _assert_close(y, _reference(False, x, w, None, 1, 1, 1, "sigmoid", None, None), torch.float16)
        y0 = ops.conv2d_bias_act(x[:0], w, None, padding=1, backend="triton")
    assert y0.shape == (0, 16, 5, 6)


# ------------------------------------------------------------------------------- weight cache

def test_weight_is_repacked_once_and_again_after_an_update():
    x, w, b, _, _ = _make((False, 16, 16, 3), torch.float32, affine=False, size=(6, 6))
    tk.clear_weight_cache()
    packed = tk._packed_weight(w, False, 1, 1)
    assert tk._packed_weight(w, False, 1, 1) is packed, "a repeated call repacked the weight"
    assert tk._cache_len() == 1
    with torch.no_grad():
        y1 = ops.conv2d_bias_act(x, w, b, padding=1, backend="triton")
        assert tk._cache_len() == 1 and tk._packed_weight(w, False, 1, 1) is packed, \
            "the op did not use the cached repack"
        w.mul_(-1.0)                                     # in place: bumps w._version
        assert tk._packed_weight(w, False, 1, 1) is not packed
        y2 = ops.conv2d_bias_act(x, w, b, padding=1, backend="triton")
    _assert_close(y2, _reference(False, x, w, b, 1, 1, 1, "relu", None, None), torch.float32)
    assert not torch.equal(y1, y2)
    del w
    assert tk._cache_len() == 0, "the entry of a freed weight was kept"


def test_deconv_packing_is_the_phase_decomposition():
    """Phase (a, b), tap (jh, jw) of the packed deconv weight is w[:, :, r + 2*jh, r' + 2*jw]
    with r = (a + 1) % 2 for GLCIC's k=4, s=2, p=1."""
    w = torch.randn(3, 5, 4, 4)
    packed = tk._pack_deconv_weight(w, 2, 1).view(2, 2, 2, 2, 3, 5)  # a, b, jh, jw, cin, cout
    for a in range(2):
        for b in range(2):
            for jh in range(2):
                for jw in range(2):
                    kh, kw = (a + 1) % 2 + 2 * jh, (b + 1) % 2 + 2 * jw
                    assert torch.equal(packed[a, b, jh, jw], w[:, :, kh, kw])


# ------------------------------------------------------------------------------- dispatcher

def test_named_backend_refuses_with_the_reason():
    x, w, b, _, _ = _make((False, 16, 16, 3), torch.float32, affine=False, size=(6, 6))
    # autograd recording
    wg = w.clone().requires_grad_()
    with pytest.raises(ops.BackendUnavailable, match="autograd"):
        ops.conv2d_bias_act(x, wg, b, padding=1, backend="triton")
    with torch.no_grad():  # not recording: allowed
        ops.conv2d_bias_act(x, wg, b, padding=1, backend="triton")
    # dtype
    with pytest.raises(ops.BackendUnavailable, match="float64"):
        ops.conv2d_bias_act(x.double(), w.double(), b.double(), padding=1, backend="triton")
    # transposed with dilation
    wt = torch.randn(16, 8, 4, 4)
    with pytest.raises(ops.BackendUnavailable, match="dilation"):
        ops.conv_transpose2d_bias_act(x, wt, None, stride=2, padding=1, dilation=2, backend="triton")
    # the automatic order never picks the interpreter on the CPU
    name, _ = ops.explain("conv2d_bias_act", x.device, x, w, b, 1, 1, 1, "relu", None, None)
    assert name != "triton" or CUDA


def test_cpu_without_interpreter_is_refused(monkeypatch):
    x, w, b, _, _ = _make((False, 16, 16, 3), torch.float32, affine=False, size=(6, 6), device="cpu")
    monkeypatch.setattr(tk, "_INTERPRET", False)
    for op, weight in ((ops.conv2d_bias_act, w), (ops.conv_transpose2d_bias_act, w.transpose(0, 1))):
        with pytest.raises(ops.BackendUnavailable, match="CUDA tensors"):
            op(x, weight, b, padding=1, backend="triton")


def test_cpu_without_interpreter_in_a_fresh_process():
    """The real thing: triton imported without TRITON_INTERPRET, CPU tensors, triton named."""
    root = helpers.REPO
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    code = (
        "import importlib, torch\n"
        "from glcic_fast import ops\n"
        "try:\n    importlib.import_module('glcic_fast.kernels.conv2d_bias_act')\n"
        "except ImportError:\n    importlib.import_module('kernels.conv2d_bias_act')\n"
        "x = torch.randn(1, 4, 8, 8); w = torch.randn(8, 4, 3, 3)\n"
        "try:\n    ops.conv2d_bias_act(x, w, None, padding=1, backend='triton')\n"
        "except ops.BackendUnavailable as e:\n    print('REFUSED', e)\n"
        "else:\n    print('RAN')\n"
    )
    if CUDA:
        pytest.skip("with a GPU the interpreter is off anyway; covered by the monkeypatched test")
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "REFUSED" in res.stdout and "CUDA tensors" in res.stdout, res.stdout + res.stderr[-2000:]


# ------------------------------------------------------------------------------- torch.compile / export

class _TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w1 = torch.nn.Parameter(torch.randn(16, 4, 5, 5, generator=g) * 0.1, requires_grad=False)
        self.b1 = torch.nn.Parameter(torch.randn(16, generator=g) * 0.1, requires_grad=False)
        self.w2 = torch.nn.Parameter(torch.randn(16, 8, 4, 4, generator=g) * 0.1, requires_grad=False)

    def forward(self, x):
        y = ops.conv2d_bias_act(x, self.w1, self.b1, padding=2, activation="relu", backend="triton")
        return ops.conv_transpose2d_bias_act(y, self.w2, None, stride=2, padding=1,
                                             activation="sigmoid", backend="triton")


def _op_targets(graph):
    """The functions a graph calls, overload names dropped (Dynamo records the packet)."""
    return [str(n.target).removesuffix(".default") for n in graph.nodes if n.op == "call_function"]


def test_torch_compile_keeps_the_fused_ops():
    """torch.compile (Dynamo, full graph) of a model calling the public ops through the
    dispatcher: the graph holds the two custom ops and nothing else."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = _TwoLayers().to(DEVICE)
    x = torch.randn(2, 4, 7, 9, device=DEVICE)
    with torch.no_grad():
        eager = model(x)
        try:
            out = torch.compile(model, backend=recording_backend, fullgraph=True)(x)
        except RuntimeError as exc:  # pragma: no cover - e.g. Python unsupported by Dynamo
            if "not supported" in str(exc):
                pytest.skip(f"torch.compile cannot run here: {exc}")
            raise
    assert len(graphs) == 1
    targets = _op_targets(graphs[0].graph)
    assert targets == ["glcic_fast.triton_conv2d_bias_act",
                       "glcic_fast.triton_conv_transpose2d_bias_act"], targets
    torch.testing.assert_close(out, eager)
    assert out.shape == (2, 8, 14, 18) and out.is_contiguous(memory_format=torch.channels_last)


def test_torch_export_keeps_the_fused_ops():
    model = _TwoLayers().to(DEVICE)
    x = torch.randn(1, 4, 6, 6, device=DEVICE)
    with torch.no_grad():
        ep = torch.export.export(model, (x,))
        targets = _op_targets(ep.graph_module.graph)
        assert targets == ["glcic_fast.triton_conv2d_bias_act",
                           "glcic_fast.triton_conv_transpose2d_bias_act"], targets
        torch.testing.assert_close(ep.module()(x), model(x))


def test_fake_kernels_give_channels_last_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, 16, 9, 11))
        w = mode.from_tensor(torch.randn(32, 16, 3, 3))
        wt = mode.from_tensor(torch.randn(16, 8, 4, 4))
        y = torch.ops.glcic_fast.triton_conv2d_bias_act(x, w, None, None, None, 2, 1, 1, "relu")
        z = torch.ops.glcic_fast.triton_conv_transpose2d_bias_act(x, wt, None, None, None, 2, 1, 1, "none")
    assert y.shape == (2, 32, 5, 6) and y.is_contiguous(memory_format=torch.channels_last)
    assert z.shape == (2, 8, 18, 22) and z.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------- GPU only

@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in COMPLETION_LAYERS])
def test_full_layer_shapes_on_gpu(spec, dtype):
    """Every layer at its real channel counts, on the activation size a 256x256 input gives it."""
    size = {1: 256, 2: 256, 3: 128, 4: 128, 13: 64, 14: 128, 15: 128, 16: 256, 17: 256}.get(spec.index, 64)
    x, w, b, scale, shift = _make((spec.transposed, spec.in_channels, spec.out_channels, spec.kernel_size),
                                  dtype, affine=spec.has_bn, size=(size, size), n=2, seed=spec.index)
    args = (spec.stride, spec.padding, spec.dilation, spec.activation, scale, shift)
    with torch.no_grad():
        y = _launch_poisoned(spec.transposed, x, w, b, *args)
    torch.cuda.synchronize()
    _assert_close(y, _reference(spec.transposed, x, w, b, *args), dtype)


@needs_cuda
def test_more_than_2_31_elements_on_gpu():
    """batch * H * W * C past 2^31: the last image is checked (its offsets overflow int32)."""
    n, c, h, w = 33, 64, 1024, 1024                               # 2.2e9 elements, 4.4 GB in bf16
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with at least 24 GiB")
    assert n * c * h * w > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.empty(n, c, h, w, device="cuda", dtype=torch.bfloat16, memory_format=torch.channels_last)
    x.normal_(generator=g)
    weight = (torch.randn(c, c, 3, 3, device="cuda", generator=g) * 0.05).to(torch.bfloat16)
    bias = torch.randn(c, device="cuda", generator=g).to(torch.bfloat16) * 0.1
    with torch.no_grad():
        y = tk.launch_conv2d(x, weight, bias, 1, 1, 1, "relu", None, None)
        last = F.conv2d(x[-1:].float(), weight.float(), bias.float(), 1, 1, 1).relu()
    torch.cuda.synchronize()
    err = ((y[-1:].float() - last).abs().max() / last.abs().max()).item()
    assert err <= 1e-2, err
    assert not torch.isnan(y[-1]).any()


@needs_cuda
def test_tf32_only_when_asked_on_gpu(monkeypatch):
    x, w, b, _, _ = _make((False, 256, 256, 3), torch.float32, affine=False, size=(64, 64))
    ref = _reference(False, x, w, b, 1, 1, 1, "relu", None, None)
    monkeypatch.setattr(tk, "ALLOW_TF32", None)
    # Not monkeypatch: torch.backends.cuda.matmul has no attribute of its own to put back.
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            exact = tk.launch_conv2d(x, w, b, 1, 1, 1, "relu", None, None)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    _assert_close(exact, ref, torch.float32)                        # ieee: rel err <= 1e-5
    monkeypatch.setattr(tk, "ALLOW_TF32", True)
    with torch.no_grad():
        tf32 = tk.launch_conv2d(x, w, b, 1, 1, 1, "relu", None, None)
    rel = ((tf32.double().cpu() - ref).abs().max() / ref.abs().max()).item()
    assert 1e-6 < rel < 1e-2, f"TF32 result: rel err {rel:.3g} (expected TF32-sized, not exact)"


@needs_cuda
def test_inductor_compiles_the_triton_ops_on_gpu():
    import torch._inductor.config as inductor_config

    model = _TwoLayers().cuda()
    x = torch.randn(2, 4, 64, 64, device="cuda")
    # A handful of kernels: compiled in this process, without starting a pool of compile workers.
    with torch.no_grad(), inductor_config.patch(compile_threads=1):
        torch.testing.assert_close(torch.compile(model)(x), model(x))
