"""glcic_fast.ops.conv2d_bias_act and conv_transpose2d_bias_act on every backend
(glcic_fast/ops/conv2d_bias_act.py).

* The parity matrix: backend ("torch", "cpp", "triton", "cuda") x dtype x each layer of the
  completion net, against F.conv2d / F.conv_transpose2d + bias + activation + affine in
  float64. A backend that cannot run a case is skipped with the dispatcher's reason (on a
  machine without a GPU: "cuda" always, "triton" unless in Triton's CPU interpreter, which
  conftest.py turns on; "cpp", the CPU Winograd kernel, for the layers it does not cover:
  its own tests are in test_winograd.py). Everywhere the layers run scaled down in channels and size, keeping
  each layer's kernel, stride, padding and dilation, the first conv's 4 input channels (K =
  100, not a multiple of the K block) and the last conv's 3 outputs; on a GPU also at their
  real channel counts. The kernels write into a NaN-poisoned output, so an element they
  leave unwritten fails the test.
* The Triton kernel (kernels/conv2d_bias_act.py): shapes beyond the net's, layouts, the
  weight packing and its cache, the dispatcher's refusals, TF32, a tensor and an image past
  2^31 elements (the latter on a sparse file, no GPU needed).
* The CUDA kernel (glcic_fast::conv3x3_bias_act, csrc/ops/cuda/conv2d_bias_act*), which
  covers the 3x3, 256 -> 256, stride 1, padding == dilation layers: on a GPU every dilation
  of the net x every epilogue, the dispatcher's choice, odd layouts and alignments, a tensor
  past 2^31 elements; on the CPU the weight packing and its cache, the fake kernel, and the
  dispatcher's refusals with their reasons.
* torch.compile and torch.export keep the fused ops.
"""

import contextlib
import importlib
import os
import subprocess
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F

from glcic_fast import ops
from glcic_fast.nn.architecture import COMPLETION_LAYERS, OUTPUT_ACTIVATIONS
from glcic_fast.ops import dispatch
from glcic_fast.ops.weight_cache import PackedWeightCache

import helpers
from helpers import WINOGRAD_REL_TOL, call_targets, compile_recording_graphs, conv64, epilogue64, fused_conv_reference

# The module, not the function that glcic_fast.ops exports under the same name.
conv = importlib.import_module("glcic_fast.ops.conv2d_bias_act")
tk = conv._triton  # glcic_fast.kernels.conv2d_bias_act, None where Triton did not load

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
needs_triton = pytest.mark.skipif(tk is None, reason=ops.BACKEND_LOAD_ERRORS.get("triton", ""))
needs_extension = pytest.mark.skipif(not conv._extension.LOADED, reason=ops.BACKEND_LOAD_ERRORS.get("cuda", ""))

BACKENDS = ("torch", "cpp", "triton", "cuda")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
C = 256  # the CUDA kernel's channels
DILATIONS = (1, 2, 4, 8, 16)  # those of the net's 3x3 256 -> 256 layers


# ------------------------------------------------------------------------------- helpers

def _scaled(c):
    """Channel count of a scaled-down layer: 4 in and 3 out kept, others / 8 (at least 16)."""
    return c if c in (3, 4) else max(16, c // 8)


def _activations(spec):
    """The activations a layer runs: ReLU, or for the output layer each of OUTPUT_ACTIVATIONS
    (the paper's sigmoid, mmagic's clamp to [-1, 1])."""
    return (spec.activation,) if spec.has_bn else OUTPUT_ACTIVATIONS


def _layer_cases():
    """One scaled-down case for each distinct (kind, kernel, stride, padding, dilation,
    channels, activation) of the completion net; on a GPU, every layer at full size too."""
    seen, cases = set(), []
    for spec in COMPLETION_LAYERS:
        for activation in _activations(spec):
            key = (spec.transposed, spec.kernel_size, spec.stride, spec.padding, spec.dilation,
                   _scaled(spec.in_channels), _scaled(spec.out_channels), activation)
            if key not in seen:
                seen.add(key)
                cases.append(pytest.param(spec, activation, False,
                                          id=f"{spec.name}-{'x'.join(map(str, key[5:7]))}-{activation}"))
    cases += [pytest.param(spec, activation, True, id=f"{spec.name}-full-{activation}", marks=needs_cuda)
              for spec in COMPLETION_LAYERS for activation in _activations(spec)]
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


def _ulp(ref, dtype):
    """One unit in the last place of ``dtype`` at |ref| (float64 tensor)."""
    fi = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(fi.tiny)))) * fi.eps


def _assert_close(y, ref, dtype, *, one_rounding=True, rel_tol=None):
    """Within ``rel_tol`` (default REL_TOL[dtype]) of the largest |ref|; with ``one_rounding`` (a fused kernel: the fp32
    result rounded once to dtype), also within 1 ulp of dtype per element, plus fp32
    accumulation noise (the interpreter rounds fp32 -> bf16 toward zero: up to 1 ulp)."""
    assert not torch.isnan(y).any(), "NaN in the output: an element was left unwritten (or computed as NaN)"
    y64 = y.detach().double().to(ref.device)
    assert y64.shape == ref.shape
    scale = ref.abs().max().clamp_min(1e-30)
    rel = ((y64 - ref).abs().max() / scale).item()
    rel_tol = REL_TOL[dtype] if rel_tol is None else rel_tol
    assert rel <= rel_tol, f"{dtype}: max |y - ref| / max |ref| = {rel:.3g} > {rel_tol}"
    if one_rounding and dtype != torch.float32:
        bad = (y64 - ref).abs() > _ulp(ref, dtype) + 1e-5 * scale
        assert not bad.any(), (f"{int(bad.sum())} elements off by more than 1 ulp, e.g. y={y64[bad][:4].tolist()} "
                               f"ref={ref[bad][:4].tolist()}")


def _poisoned(shape, x):
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    return out.fill_(float("nan"))


def _triton_poisoned(transposed, x, w, b, stride, padding, dilation, activation, scale, shift):
    """The Triton launcher (the weight packed through the cache) into a NaN-poisoned output."""
    out = _poisoned(conv._empty_output(x, w, stride, padding, dilation, transposed).shape, x)
    y = tk.launch(x, conv._triton_packed_weight(w, transposed, stride, padding), b, scale, shift, out,
                  transposed=transposed, kernel_size=w.shape[2], stride=stride, padding=padding,
                  dilation=dilation, activation=activation)
    assert y is out
    return y


def _conv3x3_poisoned(x, w, b, dilation, activation, scale, shift):
    """The CUDA kernel into a NaN-poisoned output."""
    out = _poisoned(x.shape, x)
    y = conv._conv3x3(x, w, b, dilation, activation, scale, shift, out=out)
    assert y is out
    return y


@contextlib.contextmanager
def _exact_fp32_convs():
    """cuDNN convolves fp32 in TF32 unless told not to: the torch backend's fp32 is then
    not the exact fp32 conv the parity tolerance is for."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


# ------------------------------------------------------------------------------- the parity matrix

@pytest.mark.parametrize("spec,activation,full", _layer_cases())
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_parity(backend, dtype, spec, activation, full):
    """Every layer of the net, with its own activation (the output layer with each output
    activation), BN as the post affine where the layer has one; batch 2, odd H x W scaled down, at full size the activation size a 256 x 256 input
    gives it. The kernels ("triton", "cuda") round once, so each element is within 1 ulp;
    "torch" rounds after the conv, the activation and each affine step: the relative
    tolerance only."""
    if full:
        cin, cout = spec.in_channels, spec.out_channels
        side = {1: 256, 2: 256, 3: 128, 4: 128, 13: 64, 14: 128, 15: 128, 16: 256, 17: 256}.get(spec.index, 64)
        size = (side, side)
    else:
        cin, cout = _scaled(spec.in_channels), _scaled(spec.out_channels)
        size = (19, 21) if spec.dilation >= 8 else (11, 13)  # let the widest taps land inside
    x, w, b, scale, shift = _make((spec.transposed, cin, cout, spec.kernel_size), dtype,
                                  affine=spec.has_bn, size=size, seed=spec.index)
    args = (spec.stride, spec.padding, spec.dilation, activation, scale, shift)
    op_name = "conv_transpose2d_bias_act" if spec.transposed else "conv2d_bias_act"
    with torch.no_grad(), _exact_fp32_convs():
        chosen, skipped = ops.explain(op_name, x.device, x, w, b, *args, backend=backend)
        if chosen is None:
            # Only the CUDA and the Winograd kernels may pass a case by (they cover some layers):
            # torch and Triton (where it loads) run every layer, and a refusal of theirs is a failure.
            assert backend in ("cuda", "cpp") or (backend == "triton" and tk is None), skipped
            pytest.skip("; ".join(skipped))
        if backend == "triton":
            y = _triton_poisoned(spec.transposed, x, w, b, *args)
        elif backend == "cuda":
            y = _conv3x3_poisoned(x, w, b, spec.dilation, activation, scale, shift)
        else:
            op = ops.conv_transpose2d_bias_act if spec.transposed else ops.conv2d_bias_act
            y = op(x, w, b, stride=spec.stride, padding=spec.padding, dilation=spec.dilation,
                   activation=activation, post_scale=scale, post_shift=shift, backend=backend)
        if CUDA:
            torch.cuda.synchronize()
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    _assert_close(y, fused_conv_reference(spec.transposed, x, w, b, *args), dtype, one_rounding=backend != "torch",
                  rel_tol=WINOGRAD_REL_TOL[4] if backend == "cpp" else None)


@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("activation", conv.ACTIVATIONS)
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "deconv"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_epilogue_variants_through_the_op(backend, transposed, activation, affine):
    """The public ops with the backend named: every activation, with and without the
    affine, NCHW-contiguous input (converted), channels_last output in x's dtype. (The CUDA
    kernel's: test_conv3x3_dilations_and_epilogues_on_gpu.)"""
    dtype = torch.float32
    if transposed:
        k, stride, padding, dilation, cin, cout = 4, 2, 1, 1, 32, 16
    else:
        k, stride, padding, dilation, cin, cout = 3, 1, 2, 2, 16, 24
    x, w, b, scale, shift = _make((transposed, cin, cout, k), dtype, affine=affine, size=(9, 7))
    op = ops.conv_transpose2d_bias_act if transposed else ops.conv2d_bias_act
    with torch.no_grad(), _exact_fp32_convs():
        y = op(x, w, b, stride=stride, padding=padding, dilation=dilation, activation=activation,
               post_scale=scale, post_shift=shift, backend=backend)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    _assert_close(y, fused_conv_reference(transposed, x, w, b, stride, padding, dilation, activation, scale, shift), dtype)


# ------------------------------------------------------------------------------- Triton kernel

@needs_triton
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
def test_triton_generic_shapes(case, dtype):
    """Beyond the GLCIC layers: several channel / output blocks, K slices that cross taps,
    other strides, dilations, paddings, and transposed kernels not divisible by the stride."""
    transposed, cin, cout, k, stride, padding, dilation, size = case
    x, w, b, scale, shift = _make((transposed, cin, cout, k), dtype, affine=True, size=size, n=3)
    args = (stride, padding, dilation, "relu", scale, shift)
    with torch.no_grad():
        y = _triton_poisoned(transposed, x, w, b, *args)
    _assert_close(y, fused_conv_reference(transposed, x, w, b, *args), dtype)


@needs_triton
def test_triton_non_contiguous_and_channels_last_inputs():
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
            _assert_close(y, fused_conv_reference(False, xv, w, b, 1, 1, 1, "relu", scale, shift), torch.float32)
        wt = torch.randn(16, 8, 4, 4, device=DEVICE)                      # deconv on a crop
        y = ops.conv_transpose2d_bias_act(views["strided-nchw"], wt, None, stride=2,
                                          padding=1, activation="none", backend="triton")
        _assert_close(y, fused_conv_reference(True, views["strided-nchw"], wt, None, 2, 1, 1, "none", None, None),
                      torch.float32)


@needs_triton
def test_triton_no_bias_and_empty_batch():
    x, w, _, _, _ = _make((False, 16, 16, 3), torch.float16, affine=False, size=(5, 6))
    with torch.no_grad():
        y = _triton_poisoned(False, x, w, None, 1, 1, 1, "sigmoid", None, None)
        _assert_close(y, fused_conv_reference(False, x, w, None, 1, 1, 1, "sigmoid", None, None), torch.float16)
        y0 = ops.conv2d_bias_act(x[:0], w, None, padding=1, backend="triton")
    assert y0.shape == (0, 16, 5, 6)


@needs_triton
def test_triton_weight_is_repacked_once_and_again_after_an_update():
    x, w, b, _, _ = _make((False, 16, 16, 3), torch.float32, affine=False, size=(6, 6))
    conv._PACKED.clear()
    packed = conv._triton_packed_weight(w, False, 1, 1)
    assert conv._triton_packed_weight(w, False, 1, 1) is packed, "a repeated call repacked the weight"
    assert len(conv._PACKED) == 1
    with torch.no_grad():
        y1 = ops.conv2d_bias_act(x, w, b, padding=1, backend="triton")
        assert len(conv._PACKED) == 1 and conv._triton_packed_weight(w, False, 1, 1) is packed, \
            "the op did not use the cached repack"
        w.mul_(-1.0)                                     # in place: bumps w._version
        assert conv._triton_packed_weight(w, False, 1, 1) is not packed
        y2 = ops.conv2d_bias_act(x, w, b, padding=1, backend="triton")
    _assert_close(y2, fused_conv_reference(False, x, w, b, 1, 1, 1, "relu", None, None), torch.float32)
    assert not torch.equal(y1, y2)
    del w
    assert len(conv._PACKED) == 0, "the entry of a freed weight was kept"


@needs_triton
def test_triton_deconv_packing_is_the_phase_decomposition():
    """Phase (a, b), tap (jh, jw) of the packed deconv weight is w[:, :, r + 2*jh, r' + 2*jw]
    with r = (a + 1) % 2 for GLCIC's k=4, s=2, p=1."""
    w = torch.randn(3, 5, 4, 4)
    packed = tk.pack_conv_transpose_weight(w, 2, 1).view(2, 2, 2, 2, 3, 5)  # a, b, jh, jw, cin, cout
    for a in range(2):
        for b in range(2):
            for jh in range(2):
                for jw in range(2):
                    kh, kw = (a + 1) % 2 + 2 * jh, (b + 1) % 2 + 2 * jw
                    assert torch.equal(packed[a, b, jh, jw], w[:, :, kh, kw])


@needs_triton
def test_triton_named_backend_refuses_with_the_reason():
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
    wt = torch.randn(16, 8, 4, 4, device=DEVICE)
    with pytest.raises(ops.BackendUnavailable, match="dilation"):
        ops.conv_transpose2d_bias_act(x, wt, None, stride=2, padding=1, dilation=2, backend="triton")
    # the automatic order never picks the interpreter on the CPU
    name, _ = ops.explain("conv2d_bias_act", x.device, x, w, b, 1, 1, 1, "relu", None, None)
    assert name != "triton" or CUDA


@needs_triton
def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    x, w, b, _, _ = _make((False, 16, 16, 3), torch.float32, affine=False, size=(6, 6), device="cpu")
    monkeypatch.setattr(tk, "INTERPRET", False)
    for op, weight in ((ops.conv2d_bias_act, w), (ops.conv_transpose2d_bias_act, w.transpose(0, 1))):
        with pytest.raises(ops.BackendUnavailable, match="CUDA tensors"):
            op(x, weight, b, padding=1, backend="triton")


def test_triton_on_cpu_without_interpreter_in_a_fresh_process():
    """The real thing: triton imported without TRITON_INTERPRET, CPU tensors, triton named."""
    if CUDA:
        pytest.skip("with a GPU the interpreter is off anyway; covered by the monkeypatched test")
    root = helpers.REPO
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    code = (
        "import torch\n"
        "from glcic_fast import ops\n"
        "assert 'triton' in ops.available_backends('conv2d_bias_act'), ops.BACKEND_LOAD_ERRORS\n"
        "x = torch.randn(1, 4, 8, 8); w = torch.randn(8, 4, 3, 3)\n"
        "try:\n    ops.conv2d_bias_act(x, w, None, padding=1, backend='triton')\n"
        "except ops.BackendUnavailable as e:\n    print('REFUSED', e)\n"
        "else:\n    print('RAN')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "REFUSED" in res.stdout and "CUDA tensors" in res.stdout, res.stdout + res.stderr[-2000:]


def test_import_on_a_machine_without_gpu_skips_inductor():
    """Where the Triton ops cannot run (no GPU, no interpreter) they are not defined:
    torch.library.triton_op would import Inductor, about 1 s of every CLI command."""
    if CUDA:
        pytest.skip("with a GPU the Triton ops are defined at import, Inductor with them")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [helpers.REPO, env.get("PYTHONPATH")]))
    code = ("import sys, glcic_fast\n"
            "from glcic_fast import ops\n"
            "print('triton' in ops.available_backends('conv2d_bias_act'), 'torch._inductor' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=helpers.REPO, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    triton_backend, inductor_loaded = res.stdout.split()
    assert inductor_loaded == "False", "import glcic_fast loaded torch._inductor"
    assert triton_backend == str(tk is not None), "the triton backend is no longer registered: it should be, its check saying why it cannot run"


@needs_triton
def test_triton_fake_kernels_give_channels_last_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, 16, 9, 11))
        w = mode.from_tensor(torch.randn(32, 16, 3, 3))
        wt = mode.from_tensor(torch.randn(16, 8, 4, 4))
        y = torch.ops.glcic_fast.triton_conv2d_bias_act(x, w, None, None, None, 2, 1, 1, "relu")
        z = torch.ops.glcic_fast.triton_conv_transpose2d_bias_act(x, wt, None, None, None, 2, 1, 1, "none")
    assert y.shape == (2, 32, 5, 6) and y.is_contiguous(memory_format=torch.channels_last)
    assert z.shape == (2, 8, 18, 22) and z.is_contiguous(memory_format=torch.channels_last)


def _sparse_channels_last(path, c, h, w, dtype):
    """A 1 x c x h x w channels_last tensor over a sparse file: its size costs neither
    memory nor disk, only the pages written to hold data."""
    numel = c * h * w
    subprocess.run(["truncate", "-s", str(numel * torch.finfo(dtype).bits // 8), str(path)], check=True)
    flat = torch.from_file(str(path), shared=True, size=numel, dtype=dtype)
    return flat.view(1, h, w, c).permute(0, 3, 1, 2)


@needs_triton
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("c_in", [1, 32], ids=["flat-K", "per-tap-K"])
def test_triton_one_image_of_more_than_2_31_pixels(tmp_path, device, c_in):
    """One image of 65537 x 65537 pixels, a 1x1 conv of stride 65536: the 2 x 2 output reads
    pixels (0, 0), (0, S), (S, 0) and (S, S), S = 65536. Pixel (S, 0) is S * 65537 = 2^32 + S
    from the image's start: computed in int32, its row offset wraps to S (and (S, S)'s to
    2S), so the kernel would read pixel (0, S) (and a zero) in their place, within the image
    rather than outside it. With 1 input channel the K loop is the flat one, with 32 (a
    multiple of the interpreter's BLOCK_K) the per-tap one; on a GPU only the former fits."""
    s = 65536
    side = s + 1
    dtype = torch.float32 if c_in == 1 else torch.float16
    if device == "cuda":
        if c_in != 1:
            pytest.skip(f"1 x {c_in} x {side} x {side} would not fit in GPU memory")
        if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
            pytest.skip("needs a GPU with at least 24 GiB")
        x = torch.zeros(1, c_in, side, side, dtype=dtype, device=device)
    else:
        x = _sparse_channels_last(tmp_path / "x.bin", c_in, side, side, dtype)
    w = torch.ones(1, c_in, 1, 1, dtype=dtype, device=device)
    bias = torch.full((1,), 0.5, dtype=dtype, device=device)
    chosen, skipped = ops.explain("conv2d_bias_act", x.device, x, w, bias, s, 0, 1, "none", None, None,
                                  backend="triton")
    if chosen is None:
        pytest.skip("; ".join(skipped))
    values = {(0, 0): 1.0, (0, s): 2.0, (s, 0): 3.0, (s, s): 4.0}
    for (i, j), v in values.items():
        x[0, :, i, j] = v
    assert x.is_contiguous(memory_format=torch.channels_last)  # the launcher reads it in place
    with torch.no_grad():
        y = ops.conv2d_bias_act(x, w, bias, stride=s, activation="none", backend="triton")
    # Each output is the sum over the channels of the one pixel it reads, plus the bias.
    expected = torch.tensor([[c_in * v + 0.5 for (i, j), v in values.items() if i == row] for row in (0, s)])
    assert y.shape == (1, 1, 2, 2)
    assert torch.equal(y[0, 0].cpu().float(), expected), y[0, 0].tolist()


@needs_cuda
@needs_triton
def test_triton_more_than_2_31_elements_on_gpu():
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
        y = ops.conv2d_bias_act(x, weight, bias, padding=1, activation="relu", backend="triton")
        last = F.conv2d(x[-1:].float(), weight.float(), bias.float(), 1, 1, 1).relu()
    torch.cuda.synchronize()
    err = ((y[-1:].float() - last).abs().max() / last.abs().max()).item()
    assert err <= 1e-2, err
    assert not torch.isnan(y[-1]).any()


@needs_cuda
@needs_triton
def test_triton_tf32_only_when_asked_on_gpu(monkeypatch):
    x, w, b, _, _ = _make((False, 256, 256, 3), torch.float32, affine=False, size=(64, 64))
    ref = fused_conv_reference(False, x, w, b, 1, 1, 1, "relu", None, None)
    monkeypatch.setattr(tk, "ALLOW_TF32", None)
    # Not monkeypatch: torch.backends.cuda.matmul has no attribute of its own to put back.
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            exact = ops.conv2d_bias_act(x, w, b, padding=1, activation="relu", backend="triton")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    _assert_close(exact, ref, torch.float32)                        # ieee: rel err <= 1e-5
    monkeypatch.setattr(tk, "ALLOW_TF32", True)
    with torch.no_grad():
        tf32 = ops.conv2d_bias_act(x, w, b, padding=1, activation="relu", backend="triton")
    rel = ((tf32.double() - ref).abs().max() / ref.abs().max()).item()
    assert 1e-6 < rel < 1e-2, f"TF32 result: rel err {rel:.3g} (expected TF32-sized, not exact)"


# ------------------------------------------------------------------------------- CUDA kernel

_CONV3X3_REFERENCE = {}


def _conv3x3_inputs_and_conv(dtype, n, dilation):
    """Inputs and their float64 conv + bias, computed once per (dtype, batch, dilation)."""
    key = (dtype, n, dilation)
    if key not in _CONV3X3_REFERENCE:
        _CONV3X3_REFERENCE.clear()  # keep one: the parametrization below varies the epilogue fastest
        x, w, b, scale, shift = _make((False, C, C, 3), dtype, affine=True, n=n, size=(37, 53), seed=dilation)
        _CONV3X3_REFERENCE[key] = (x, w, b, scale, shift, conv64(False, x, w, b, 1, dilation, dilation))
    return _CONV3X3_REFERENCE[key]


@needs_cuda
@needs_extension
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("activation", conv.ACTIVATIONS)
@pytest.mark.parametrize("n", [1, 3], ids=["batch1", "batch3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("dilation", DILATIONS, ids=[f"d{d}" for d in DILATIONS])
def test_conv3x3_dilations_and_epilogues_on_gpu(dilation, dtype, n, activation, affine):
    """37 x 53 (M = 1961 or 5883 pixels: partial tiles; at d16 most taps are padding), into
    a NaN-poisoned output."""
    x, w, b, scale, shift, conv64 = _conv3x3_inputs_and_conv(dtype, n, dilation)
    if not affine:
        scale = shift = None
    with torch.no_grad():
        y = _conv3x3_poisoned(x, w, b, dilation, activation, scale, shift)
    _assert_close(y, epilogue64(conv64, activation, scale, shift), dtype)


@needs_cuda
@needs_extension
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_conv3x3_public_op_picks_cuda_and_matches(dtype, monkeypatch):
    """Where the tuning table names "cuda" for the net's dilated layers the automatic choice
    takes it (without a table it does not: see below); the op takes an NCHW-contiguous
    input and returns channels_last."""
    name = str(dtype).split(".")[-1]
    monkeypatch.setattr(dispatch, "_TUNING", {"conv2d_bias_act": {
        f"conv:{C}:{C}:k3:s1:d{d}:{name}": "cuda" for d in DILATIONS}})
    x, w, b, scale, shift = _make((False, C, C, 3), dtype, affine=True, n=2, size=(19, 24))
    for dilation in DILATIONS:
        args = (x, w, b, 1, dilation, dilation, "relu", scale, shift)
        with torch.no_grad():
            chosen, skipped = ops.explain("conv2d_bias_act", x.device, *args)
            assert chosen == "cuda", skipped
            y = ops.conv2d_bias_act(x, w, b, padding=dilation, dilation=dilation, activation="relu",
                                    post_scale=scale, post_shift=shift)
        assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
        _assert_close(y, fused_conv_reference(False, x, w, b, 1, dilation, dilation, "relu", scale, shift), dtype)


@needs_cuda
@needs_extension
def test_conv3x3_without_a_tuning_table_the_automatic_choice_is_not_cuda(monkeypatch):
    monkeypatch.setattr(dispatch, "_TUNING", {})
    x, w, b, scale, shift = _make((False, C, C, 3), torch.bfloat16, affine=True, n=1, size=(8, 8))
    chosen, skipped = ops.explain("conv2d_bias_act", x.device, x, w, b, 1, 2, 2, "relu", scale, shift)
    assert chosen != "cuda" and any(s.startswith("cuda: ") and "tuning table" in s for s in skipped), skipped


@needs_cuda
@needs_extension
def test_conv3x3_dispatcher_passes_over_cuda_for_other_layers_on_gpu(monkeypatch):
    monkeypatch.setattr(dispatch, "_TUNING", {})
    x = torch.randn(1, 128, 16, 16, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(128, 128, 3, 3, device="cuda", dtype=torch.bfloat16)
    chosen, skipped = ops.explain("conv2d_bias_act", x.device, x, w, None, 1, 1, 1, "relu", None, None)
    assert chosen != "cuda" and any(s.startswith("cuda: ") and "256 input" in s for s in skipped), skipped
    x32, w32 = torch.randn(1, C, 8, 8, device="cuda"), torch.randn(C, C, 3, 3, device="cuda")
    chosen, skipped = ops.explain("conv2d_bias_act", x32.device, x32, w32, None, 1, 1, 1, "relu", None, None)
    assert chosen != "cuda" and any("float32" in s for s in skipped), skipped
    with pytest.raises(ops.BackendUnavailable, match="float32"):
        ops.conv2d_bias_act(x32, w32, None, padding=1, backend="cuda")


@needs_cuda
@needs_extension
def test_conv3x3_layouts_alignment_and_empty_batch():
    """A cropped (non-contiguous) input, an input and an output at odd addresses (the
    binding then goes through aligned copies), no bias, an empty batch."""
    dtype = torch.bfloat16
    x, w, _, _, _ = _make((False, C, C, 3), dtype, n=2, size=(21, 30), affine=False)
    ref = lambda xv: fused_conv_reference(False, xv, w, None, 1, 2, 2, "sigmoid", None, None)
    with torch.no_grad():
        crop = x[:, :, 2:19, 3:29]
        _assert_close(conv._conv3x3(crop, w, None, 2, "sigmoid"), ref(crop), dtype)
        # x at an address 2 bytes past a 16-byte boundary, channels_last
        flat = torch.empty(x.numel() + 1, device="cuda", dtype=dtype)
        x_odd = flat[1:].view(2, 21, 30, C).permute(0, 3, 1, 2)
        x_odd.copy_(x)
        assert x_odd.data_ptr() % 16 != 0 and x_odd.is_contiguous(memory_format=torch.channels_last)
        _assert_close(conv._conv3x3(x_odd, w, None, 2, "sigmoid"), ref(x), dtype)
        # out likewise
        flat_out = torch.full((x.numel() + 1,), float("nan"), device="cuda", dtype=dtype)
        out_odd = flat_out[1:].view(2, 21, 30, C).permute(0, 3, 1, 2)
        y = conv._conv3x3(x, w, None, 2, "sigmoid", out=out_odd)
        assert y is out_odd and torch.isnan(flat_out[0])
        _assert_close(y, ref(x), dtype)
        y0 = conv._conv3x3(x[:0], w, None, 2, "sigmoid")
    assert y0.shape == (0, C, 21, 30)


@needs_cuda
@needs_extension
def test_conv3x3_out_must_not_alias_the_input():
    x, w, b, _, _ = _make((False, C, C, 3), torch.float16, n=1, size=(8, 8), affine=False)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), pytest.raises(RuntimeError, match="single memory location"):
        conv._conv3x3(x, w, b, 1, "relu", out=x)


@needs_cuda
@needs_extension
def test_conv3x3_repeatable_bit_for_bit():
    x, w, b, scale, shift = _make((False, C, C, 3), torch.bfloat16, affine=True, n=2, size=(33, 35))
    with torch.no_grad():
        y1 = conv._conv3x3(x, w, b, 4, "relu", scale, shift)
        y2 = conv._conv3x3(x, w, b, 4, "relu", scale, shift)
    assert torch.equal(y1, y2)


@needs_cuda
@needs_extension
def test_conv3x3_more_than_2_31_elements_on_gpu():
    """N * H * W * 256 past 2^31: the bottom rows of the image (offsets past int32) are checked
    against a conv of the image's bottom strip (its top rows lack their halo, and are not
    compared)."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with at least 24 GiB")
    h = w_ = 2900
    dilation = 16
    assert h * w_ * C > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.empty(1, C, h, w_, device="cuda", dtype=torch.bfloat16, memory_format=torch.channels_last)
    x.normal_(generator=g)
    weight = (torch.randn(C, C, 3, 3, device="cuda", generator=g) * 0.03).to(torch.bfloat16)
    bias = (torch.randn(C, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    with torch.no_grad():
        y = conv._conv3x3(x, weight, bias, dilation, "none")
        strip = x[:, :, h - 3 * dilation - 8:, :]
        ref = F.conv2d(strip.double(), weight.double(), bias.double(), 1, dilation, dilation)[:, :, -8:, :]
        got = y[:, :, -8:, :].double()
    torch.cuda.synchronize()
    assert not torch.isnan(got).any()
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-2, err


@needs_extension
def test_conv3x3_weight_packing_layout():
    w = torch.randn(C, C, 3, 3)
    packed = conv.pack_conv3x3_weight(w)
    assert packed.shape == (C, 9 * C) and packed.is_contiguous()
    view = packed.view(C, 3, 3, C)  # cout, kh, kw, cin
    for kh in range(3):
        for kw in range(3):
            assert torch.equal(view[:, kh, kw, :], w[:, :, kh, kw])
    w_cl = w.contiguous(memory_format=torch.channels_last)
    packed_cl = conv.pack_conv3x3_weight(w_cl)
    assert packed_cl.data_ptr() == w_cl.data_ptr(), "a channels_last weight is packed without a copy"
    assert torch.equal(packed_cl, packed)


@needs_extension
def test_conv3x3_weight_is_packed_once_and_again_after_an_update():
    w = torch.randn(C, C, 3, 3)
    conv._PACKED.clear()
    packed = conv._conv3x3_packed_weight(w)
    assert conv._conv3x3_packed_weight(w) is packed and len(conv._PACKED) == 1
    if tk is not None:  # one cache, one entry per layout of the weight
        triton_packed = conv._triton_packed_weight(w, False, 1, 1)
        assert len(conv._PACKED) == 2 and conv._conv3x3_packed_weight(w) is packed
        assert torch.equal(triton_packed, tk.pack_conv_weight(w))
        del triton_packed
    with torch.no_grad():
        w.mul_(-1.0)  # bumps w._version
    repacked = conv._conv3x3_packed_weight(w)
    assert repacked is not packed and torch.equal(repacked, conv.pack_conv3x3_weight(w))
    del w, packed, repacked
    assert len(conv._PACKED) == 0, "the entry of a freed weight was kept"
    with torch.inference_mode():
        wi = torch.randn(C, C, 3, 3)
        conv._conv3x3_packed_weight(wi)
    assert len(conv._PACKED) == 0, "an inference tensor (no version counter) was cached"


def test_weight_cache_evicts_the_least_recently_used_and_keeps_no_view_of_a_weight():
    """At most ``size`` entries, the least recently used dropped first. A packing that is a
    view of the weight (a channels_last weight for the CUDA kernel) is not kept: the entry
    would keep the weight alive through the view, and its death, when the entry is dropped,
    would run the cache's forget callback under the cache's own lock (a deadlock)."""
    cache = PackedWeightCache(2)
    weights = [torch.randn(8, 4, 3, 3) for _ in range(3)]
    packed = [cache.get(w, conv.pack_conv3x3_weight) for w in weights[:2]]
    assert cache.get(weights[0], conv.pack_conv3x3_weight) is packed[0]  # weights[1] is now the oldest
    cache.get(weights[2], conv.pack_conv3x3_weight)
    assert len(cache) == 2
    assert cache.get(weights[0], conv.pack_conv3x3_weight) is packed[0]
    assert cache.get(weights[1], conv.pack_conv3x3_weight) is not packed[1], "the oldest entry was kept"
    cache.clear()
    assert len(cache) == 0
    w_cl = torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    view = cache.get(w_cl, conv.pack_conv3x3_weight)
    assert view.data_ptr() == w_cl.data_ptr() and len(cache) == 0
    freed = weakref.ref(w_cl)
    del w_cl
    assert freed() is not None, "the view returned keeps its weight, as any view does"
    del view
    assert freed() is None


@needs_extension
def test_conv3x3_fake_kernel_gives_a_channels_last_output():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, C, 9, 11, dtype=torch.float16))
        packed = mode.from_tensor(torch.randn(C, 9 * C, dtype=torch.float16))
        y = torch.ops.glcic_fast.conv3x3_bias_act(x, packed, None, 4, "relu", None, None)
    assert y.shape == (2, C, 9, 11) and y.dtype == torch.float16
    assert y.is_contiguous(memory_format=torch.channels_last)


def _cuda_refusal(x, w, **kwargs):
    with pytest.raises(ops.BackendUnavailable) as info:
        ops.conv2d_bias_act(x, w, None, backend="cuda", **kwargs)
    message = str(info.value)
    assert "cuda: " in message
    return message


@needs_extension
def test_conv3x3_refuses_cpu_tensors_with_the_reason():
    x, w, _, _, _ = _make((False, C, C, 3), torch.bfloat16, size=(6, 6), affine=False, device="cpu")
    message = _cuda_refusal(x, w, padding=2, dilation=2)
    if conv._HAS_CONV3X3_CUDA:
        assert "runs CUDA tensors, these are on cpu" in message
        assert "3x3" not in message and "dtype" not in message and "autograd" not in message, message
    else:
        assert "built without its CUDA sources" in message


@needs_extension
@pytest.mark.parametrize("case", [
    pytest.param(dict(cin=128, cout=256, k=3, stride=1, padding=1, dilation=1), id="cin128"),
    pytest.param(dict(cin=256, cout=128, k=3, stride=1, padding=1, dilation=1), id="cout128"),
    pytest.param(dict(cin=256, cout=256, k=5, stride=1, padding=2, dilation=1), id="5x5"),
    pytest.param(dict(cin=256, cout=256, k=3, stride=2, padding=1, dilation=1), id="stride2"),
    pytest.param(dict(cin=256, cout=256, k=3, stride=1, padding=1, dilation=2), id="padding-ne-dilation"),
    pytest.param(dict(cin=256, cout=256, k=3, stride=1, padding=0, dilation=1), id="no-padding"),
])
def test_conv3x3_refuses_other_shapes_with_the_reason(case):
    x = torch.randn(1, case["cin"], 12, 12, dtype=torch.float16)
    w = torch.randn(case["cout"], case["cin"], case["k"], case["k"], dtype=torch.float16)
    message = _cuda_refusal(x, w, stride=case["stride"], padding=case["padding"], dilation=case["dilation"])
    assert "covers only 3x3 convs with 256 input and 256 output channels, stride 1 and padding == dilation" in message
    assert f"stride {case['stride']}, padding {case['padding']}, dilation {case['dilation']}" in message


@needs_extension
def test_conv3x3_refuses_other_dtypes_and_autograd_with_the_reason():
    x, w, _, _, _ = _make((False, C, C, 3), torch.float32, size=(6, 6), affine=False, device="cpu")
    message = _cuda_refusal(x, w, padding=1)
    assert "dtype torch.float32 is not supported" in message and "float16 and bfloat16" in message
    xh, wh = x.half(), w.half().requires_grad_()
    assert "autograd is recording" in _cuda_refusal(xh, wh, padding=1)
    with torch.no_grad():
        assert "autograd" not in _cuda_refusal(xh, wh, padding=1)


def test_automatic_choice_on_cpu_never_is_cuda():
    x, w, _, _, _ = _make((False, C, C, 3), torch.bfloat16, size=(6, 6), affine=False, device="cpu")
    chosen, skipped = ops.explain("conv2d_bias_act", x.device, x, w, None, 1, 1, 1, "relu", None, None)
    assert chosen in ("cpp", "torch") and not any(s.startswith("cuda") for s in skipped)


@needs_extension
def test_conv3x3_op_and_its_overloads_are_registered():
    assert hasattr(torch.ops.glcic_fast, "conv3x3_bias_act")
    assert hasattr(torch.ops.glcic_fast.conv3x3_bias_act, "out")
    assert "cuda" in ops.available_backends("conv2d_bias_act")
    if not CUDA:
        assert torch.ops.glcic_fast.conv3x3_bias_act_sm_version(0) == 0


@needs_extension
def test_conv3x3_gpu_reasons_name_the_architecture(monkeypatch):
    """The per-GPU checks, with the capability faked (no GPU needed)."""
    monkeypatch.setattr(conv, "_CONV3X3_GPU_REASONS", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5))
    reason = conv._conv3x3_gpu_reason(torch.device("cuda", 0))
    assert reason is not None and "sm_75" in reason and "sm_80 or newer" in reason
    if not CUDA:  # no GPU: the library reports no kernel image for device 0
        monkeypatch.setattr(conv, "_CONV3X3_GPU_REASONS", {})
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
        reason = conv._conv3x3_gpu_reason(torch.device("cuda", 0))
        assert reason is not None and "no kernel image" in reason and "TORCH_CUDA_ARCH_LIST including 9.0" in reason


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
    return [t.removesuffix(".default") for t in call_targets(graph)]


@needs_triton
def test_torch_compile_keeps_the_triton_ops():
    """torch.compile (Dynamo, full graph) of a model calling the public ops through the
    dispatcher: the graph holds the two custom ops and nothing else."""
    model = _TwoLayers().to(DEVICE)
    x = torch.randn(2, 4, 7, 9, device=DEVICE)
    with torch.no_grad():
        eager = model(x)
        try:
            compiled_model, graphs = compile_recording_graphs(model)
            out = compiled_model(x)
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


@needs_triton
def test_torch_export_keeps_the_triton_ops():
    model = _TwoLayers().to(DEVICE)
    x = torch.randn(1, 4, 6, 6, device=DEVICE)
    with torch.no_grad():
        ep = torch.export.export(model, (x,))
        targets = _op_targets(ep.graph_module.graph)
        assert targets == ["glcic_fast.triton_conv2d_bias_act",
                           "glcic_fast.triton_conv_transpose2d_bias_act"], targets
        torch.testing.assert_close(ep.module()(x), model(x))


@needs_cuda
@needs_triton
def test_inductor_compiles_the_triton_ops_on_gpu():
    import torch._inductor.config as inductor_config

    model = _TwoLayers().cuda()
    x = torch.randn(2, 4, 64, 64, device="cuda")
    # A handful of kernels: compiled in this process, without starting a pool of compile workers.
    with torch.no_grad(), inductor_config.patch(compile_threads=1):
        torch.testing.assert_close(torch.compile(model)(x), model(x))


@needs_cuda
@needs_extension
def test_torch_compile_keeps_the_cuda_op(monkeypatch):
    # The automatic choice takes the CUDA conv only where the tuning table names it.
    monkeypatch.setattr(dispatch, "_TUNING", {"conv2d_bias_act": {"conv:256:256:k3:s1:d2:bfloat16": "cuda"}})
    x, w, b, _, _ = _make((False, C, C, 3), torch.bfloat16, n=1, size=(12, 10), affine=False)
    fn = lambda x: ops.conv2d_bias_act(x, w, b, padding=2, dilation=2, activation="relu")
    with torch.no_grad():
        eager = fn(x)
        compiled_fn, graphs = compile_recording_graphs(fn)
        out = compiled_fn(x)
    targets = [t for g in graphs for t in call_targets(g.graph)]
    assert any("glcic_fast.conv3x3_bias_act" in t for t in targets), targets
    torch.testing.assert_close(out, eager)
