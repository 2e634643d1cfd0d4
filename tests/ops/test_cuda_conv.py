"""The "cuda" backend of conv2d_bias_act: glcic_fast._C's tensor-core kernel for the 3x3,
256 -> 256, stride 1, padding == dilation layers (csrc/ops/cuda/conv3x3_bias_act*).

On a GPU: parity with a float64 conv for every dilation of the net, bf16 and fp16, batch 1
and 3, odd H x W, every activation, with and without the post affine, written into a
NaN-poisoned output (an element the kernel leaves unwritten fails); the dispatcher's
choice; odd layouts and alignments; a tensor past 2^31 elements.
On the CPU: the weight packing and its cache, the fake kernel, and the dispatcher's
refusals with their reasons.
"""

import pytest
import torch
import torch.nn.functional as F

from glcic_fast import ops
from glcic_fast.ops import dispatch

eb = pytest.importorskip("glcic_fast.ops.extension_backend",
                         reason="glcic_fast._C is not built (GLCIC_FAST_NO_EXTENSION=1?)")

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

C = 256
DILATIONS = (1, 2, 4, 8, 16)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _make(dtype, *, n=1, size=(37, 53), affine=True, seed=0, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, C, *size, generator=g)
    w = torch.randn(C, C, 3, 3, generator=g) * (2.0 / (C * 9)) ** 0.5
    b = torch.randn(C, generator=g) * 0.1
    scale = shift = None
    if affine:
        scale = torch.rand(C, generator=g) + 0.5
        shift = torch.randn(C, generator=g) * 0.1
    return tuple(None if t is None else t.to(device=device, dtype=dtype) for t in (x, w, b, scale, shift))


def _conv64(x, w, b, dilation):
    """conv + bias in float64 (on x's device: cuDNN / ATen run float64 exactly enough)."""
    d = lambda t: None if t is None else t.detach().double()
    return F.conv2d(d(x), d(w), d(b), 1, dilation, dilation)


def _epilogue64(y, activation, scale, shift):
    if activation == "relu":
        y = y.relu()
    elif activation == "sigmoid":
        y = y.sigmoid()
    if scale is not None:
        y = y * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    return y


def _ulp(ref, dtype):
    fi = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(fi.tiny)))) * fi.eps


def _assert_close(y, ref, dtype):
    assert not torch.isnan(y).any(), "NaN in the output: an element was left unwritten (or computed as NaN)"
    y64 = y.detach().double().to(ref.device)
    assert y64.shape == ref.shape
    scale = ref.abs().max().clamp_min(1e-30)
    rel = ((y64 - ref).abs().max() / scale).item()
    assert rel <= 1e-2, f"{dtype}: max |y - ref| / max |ref| = {rel:.3g} > 1e-2"
    # Per element: one rounding of the fp32 result to dtype plus fp32 accumulation noise.
    bad = (y64 - ref).abs() > _ulp(ref, dtype) + 1e-5 * scale
    assert not bad.any(), (f"{int(bad.sum())} elements off by more than 1 ulp, e.g. y={y64[bad][:4].tolist()} "
                           f"ref={ref[bad][:4].tolist()}")


def _poisoned_like(x):
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    return out.fill_(float("nan"))


# ------------------------------------------------------------------------------- GPU parity

_REFERENCE = {}


def _inputs_and_conv(dtype, n, dilation):
    """Inputs and their float64 conv + bias, computed once per (dtype, batch, dilation)."""
    key = (dtype, n, dilation)
    if key not in _REFERENCE:
        _REFERENCE.clear()  # keep one: the parametrization below varies the epilogue fastest
        x, w, b, scale, shift = _make(dtype, n=n, seed=dilation)
        _REFERENCE[key] = (x, w, b, scale, shift, _conv64(x, w, b, dilation))
    return _REFERENCE[key]


@needs_cuda
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("activation", ["relu", "sigmoid", "none"])
@pytest.mark.parametrize("n", [1, 3], ids=["batch1", "batch3"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("dilation", DILATIONS, ids=[f"d{d}" for d in DILATIONS])
def test_parity_with_float64(dilation, dtype, n, activation, affine):
    """37 x 53 (M = 1961 or 5883 pixels: partial tiles; at d16 most taps are padding)."""
    x, w, b, scale, shift, conv = _inputs_and_conv(dtype, n, dilation)
    if not affine:
        scale = shift = None
    out = _poisoned_like(x)
    with torch.no_grad():
        y = eb.launch_conv3x3(x, w, b, dilation, activation, scale, shift, out=out)
    assert y is out
    _assert_close(y, _epilogue64(conv, activation, scale, shift), dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_public_op_picks_cuda_and_matches(dtype, monkeypatch):
    """Where the tuning table names "cuda" for the net's dilated layers the automatic choice
    takes it (without a table it does not: see below); the op takes an NCHW-contiguous
    input and returns channels_last."""
    name = str(dtype).split(".")[-1]
    monkeypatch.setattr(dispatch, "_TUNING", {"conv2d_bias_act": {
        f"conv:{C}:{C}:k3:s1:d{d}:{name}": "cuda" for d in DILATIONS}})
    x, w, b, scale, shift = _make(dtype, n=2, size=(19, 24))
    for dilation in DILATIONS:
        args = (x, w, b, 1, dilation, dilation, "relu", scale, shift)
        with torch.no_grad():
            chosen, skipped = ops.explain("conv2d_bias_act", x.device, *args)
            assert chosen == "cuda", skipped
            y = ops.conv2d_bias_act(x, w, b, padding=dilation, dilation=dilation, activation="relu",
                                    post_scale=scale, post_shift=shift)
        assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
        _assert_close(y, _epilogue64(_conv64(x, w, b, dilation), "relu", scale, shift), dtype)


@needs_cuda
def test_without_a_tuning_table_the_automatic_choice_is_not_cuda(monkeypatch):
    monkeypatch.setattr(dispatch, "_TUNING", {})
    x, w, b, scale, shift = _make(torch.bfloat16, n=1, size=(8, 8))
    chosen, skipped = ops.explain("conv2d_bias_act", x.device, x, w, b, 1, 2, 2, "relu", scale, shift)
    assert chosen != "cuda" and any(s.startswith("cuda: ") and "tuning table" in s for s in skipped), skipped


@needs_cuda
def test_dispatcher_passes_over_cuda_for_other_layers_on_gpu(monkeypatch):
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
def test_layouts_alignment_and_empty_batch():
    """A cropped (non-contiguous) input, an input and an output at odd addresses (the
    binding then goes through aligned copies), no bias, an empty batch."""
    dtype = torch.bfloat16
    x, w, _, _, _ = _make(dtype, n=2, size=(21, 30), affine=False)
    ref = lambda xv: _epilogue64(_conv64(xv, w, None, 2), "sigmoid", None, None)
    with torch.no_grad():
        crop = x[:, :, 2:19, 3:29]
        _assert_close(eb.launch_conv3x3(crop, w, None, 2, "sigmoid"), ref(crop), dtype)
        # x at an address 2 bytes past a 16-byte boundary, channels_last
        flat = torch.empty(x.numel() + 1, device="cuda", dtype=dtype)
        x_odd = flat[1:].view(2, 21, 30, C).permute(0, 3, 1, 2)
        x_odd.copy_(x)
        assert x_odd.data_ptr() % 16 != 0 and x_odd.is_contiguous(memory_format=torch.channels_last)
        _assert_close(eb.launch_conv3x3(x_odd, w, None, 2, "sigmoid"), ref(x), dtype)
        # out likewise
        flat_out = torch.full((x.numel() + 1,), float("nan"), device="cuda", dtype=dtype)
        out_odd = flat_out[1:].view(2, 21, 30, C).permute(0, 3, 1, 2)
        y = eb.launch_conv3x3(x, w, None, 2, "sigmoid", out=out_odd)
        assert y is out_odd and torch.isnan(flat_out[0])
        _assert_close(y, ref(x), dtype)
        y0 = eb.launch_conv3x3(x[:0], w, None, 2, "sigmoid")
    assert y0.shape == (0, C, 21, 30)


@needs_cuda
def test_out_must_not_alias_the_input():
    x, w, b, _, _ = _make(torch.float16, size=(8, 8), affine=False)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), pytest.raises(RuntimeError, match="single memory location"):
        eb.launch_conv3x3(x, w, b, 1, "relu", out=x)


@needs_cuda
def test_repeatable_bit_for_bit():
    x, w, b, scale, shift = _make(torch.bfloat16, n=2, size=(33, 35))
    with torch.no_grad():
        y1 = eb.launch_conv3x3(x, w, b, 4, "relu", scale, shift)
        y2 = eb.launch_conv3x3(x, w, b, 4, "relu", scale, shift)
    assert torch.equal(y1, y2)


@needs_cuda
def test_more_than_2_31_elements_on_gpu():
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
        y = eb.launch_conv3x3(x, weight, bias, dilation, "none")
        strip = x[:, :, h - 3 * dilation - 8:, :]
        ref = F.conv2d(strip.double(), weight.double(), bias.double(), 1, dilation, dilation)[:, :, -8:, :]
        got = y[:, :, -8:, :].double()
    torch.cuda.synchronize()
    assert not torch.isnan(got).any()
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-2, err


@needs_cuda
def test_torch_compile_keeps_the_cuda_op(monkeypatch):
    # The automatic choice takes the CUDA conv only where the tuning table names it.
    monkeypatch.setattr(dispatch, "_TUNING", {"conv2d_bias_act": {"conv:256:256:k3:s1:d2:bfloat16": "cuda"}})
    x, w, b, _, _ = _make(torch.bfloat16, size=(12, 10), affine=False)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    fn = lambda x: ops.conv2d_bias_act(x, w, b, padding=2, dilation=2, activation="relu")
    torch._dynamo.reset()
    with torch.no_grad():
        eager = fn(x)
        out = torch.compile(fn, backend=recording_backend, fullgraph=True)(x)
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("glcic_fast.conv3x3_bias_act" in t for t in targets), targets
    torch.testing.assert_close(out, eager)


# ------------------------------------------------------------------------------- CPU

def test_weight_packing_layout():
    w = torch.randn(C, C, 3, 3)
    packed = eb.pack_conv3x3_weight(w)
    assert packed.shape == (C, 9 * C) and packed.is_contiguous()
    view = packed.view(C, 3, 3, C)  # cout, kh, kw, cin
    for kh in range(3):
        for kw in range(3):
            assert torch.equal(view[:, kh, kw, :], w[:, :, kh, kw])
    w_cl = w.contiguous(memory_format=torch.channels_last)
    packed_cl = eb.pack_conv3x3_weight(w_cl)
    assert packed_cl.data_ptr() == w_cl.data_ptr(), "a channels_last weight is packed without a copy"
    assert torch.equal(packed_cl, packed)


def test_weight_is_packed_once_and_again_after_an_update():
    w = torch.randn(C, C, 3, 3)
    eb.clear_conv3x3_weight_cache()
    packed = eb._packed_conv3x3_weight(w)
    assert eb._packed_conv3x3_weight(w) is packed and eb._conv3x3_cache_len() == 1
    with torch.no_grad():
        w.mul_(-1.0)  # bumps w._version
    repacked = eb._packed_conv3x3_weight(w)
    assert repacked is not packed and torch.equal(repacked, eb.pack_conv3x3_weight(w))
    del w, packed, repacked
    assert eb._conv3x3_cache_len() == 0, "the entry of a freed weight was kept"
    with torch.inference_mode():
        wi = torch.randn(C, C, 3, 3)
        eb._packed_conv3x3_weight(wi)
    assert eb._conv3x3_cache_len() == 0, "an inference tensor (no version counter) was cached"


def test_fake_kernel_gives_a_channels_last_output():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, C, 9, 11, dtype=torch.float16))
        packed = mode.from_tensor(torch.randn(C, 9 * C, dtype=torch.float16))
        y = torch.ops.glcic_fast.conv3x3_bias_act(x, packed, None, 4, "relu", None, None)
    assert y.shape == (2, C, 9, 11) and y.dtype == torch.float16
    assert y.is_contiguous(memory_format=torch.channels_last)


def _refusal(x, w, **kwargs):
    with pytest.raises(ops.BackendUnavailable) as info:
        ops.conv2d_bias_act(x, w, None, backend="cuda", **kwargs)
    message = str(info.value)
    assert "cuda: " in message
    return message


def test_cuda_refuses_cpu_tensors_with_the_reason():
    x, w, _, _, _ = _make(torch.bfloat16, size=(6, 6), affine=False, device="cpu")
    message = _refusal(x, w, padding=2, dilation=2)
    if eb._HAS_CONV3X3_CUDA:
        assert "runs CUDA tensors, these are on cpu" in message
        assert "3x3" not in message and "dtype" not in message and "autograd" not in message, message
    else:
        assert "built without its CUDA sources" in message


@pytest.mark.parametrize("case", [
    pytest.param(dict(cin=128, cout=256, k=3, stride=1, padding=1, dilation=1), id="cin128"),
    pytest.param(dict(cin=256, cout=128, k=3, stride=1, padding=1, dilation=1), id="cout128"),
    pytest.param(dict(cin=256, cout=256, k=5, stride=1, padding=2, dilation=1), id="5x5"),
    pytest.param(dict(cin=256, cout=256, k=3, stride=2, padding=1, dilation=1), id="stride2"),
    pytest.param(dict(cin=256, cout=256, k=3, stride=1, padding=1, dilation=2), id="padding-ne-dilation"),
    pytest.param(dict(cin=256, cout=256, k=3, stride=1, padding=0, dilation=1), id="no-padding"),
])
def test_cuda_refuses_other_shapes_with_the_reason(case):
    x = torch.randn(1, case["cin"], 12, 12, dtype=torch.float16)
    w = torch.randn(case["cout"], case["cin"], case["k"], case["k"], dtype=torch.float16)
    message = _refusal(x, w, stride=case["stride"], padding=case["padding"], dilation=case["dilation"])
    assert "covers only 3x3 convs with 256 input and 256 output channels, stride 1 and padding == dilation" in message
    assert f"stride {case['stride']}, padding {case['padding']}, dilation {case['dilation']}" in message


def test_cuda_refuses_other_dtypes_and_autograd_with_the_reason():
    x, w, _, _, _ = _make(torch.float32, size=(6, 6), affine=False, device="cpu")
    message = _refusal(x, w, padding=1)
    assert "dtype torch.float32 is not supported" in message and "float16 and bfloat16" in message
    xh, wh = x.half(), w.half().requires_grad_()
    assert "autograd is recording" in _refusal(xh, wh, padding=1)
    with torch.no_grad():
        assert "autograd" not in _refusal(xh, wh, padding=1)


def test_automatic_choice_on_cpu_never_is_cuda():
    x, w, _, _, _ = _make(torch.bfloat16, size=(6, 6), affine=False, device="cpu")
    chosen, skipped = ops.explain("conv2d_bias_act", x.device, x, w, None, 1, 1, 1, "relu", None, None)
    assert chosen in ("cpp", "torch") and not any(s.startswith("cuda") for s in skipped)


def test_the_op_and_its_overloads_are_registered():
    assert hasattr(torch.ops.glcic_fast, "conv3x3_bias_act")
    assert hasattr(torch.ops.glcic_fast.conv3x3_bias_act, "out")
    assert "cuda" in ops.available_backends("conv2d_bias_act")
    if not CUDA:
        assert torch.ops.glcic_fast.conv3x3_bias_act_sm_version(0) == 0


def test_gpu_reasons_name_the_architecture(monkeypatch):
    """The per-GPU checks, with the capability faked (no GPU needed)."""
    monkeypatch.setattr(eb, "_CONV3X3_GPU_REASONS", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5))
    reason = eb._conv3x3_gpu_reason(torch.device("cuda", 0))
    assert reason is not None and "sm_75" in reason and "sm_80 or newer" in reason
    if not CUDA:  # no GPU: the library reports no kernel image for device 0
        monkeypatch.setattr(eb, "_CONV3X3_GPU_REASONS", {})
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
        reason = eb._conv3x3_gpu_reason(torch.device("cuda", 0))
        assert reason is not None and "no kernel image" in reason and "TORCH_CUDA_ARCH_LIST including 9.0" in reason
