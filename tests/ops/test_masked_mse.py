"""glcic_fast.ops.masked_mse: every backend that can run here against the eager formula in
float64 (loss and gradient), its edge cases, its determinism and its errors.

On a machine without a GPU the Triton kernels run under Triton's interpreter (conftest.py);
the CUDA cases are skipped there and run on a GPU.
"""

import pytest
import torch

from glcic_fast import ops

_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

#: (device, backend) pairs: each backend on the devices it is meant for.
CASES = ([("cpu", b) for b in ("torch", "cpp", "triton")]
         + [pytest.param("cuda", b, marks=_CUDA) for b in ("torch", "triton", "cuda")])
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The loss is an fp32 sum of products of exactly converted inputs: tight for every dtype.
LOSS_RTOL = 1e-5
# The gradient is rounded to pred's dtype twice (by the forward pass, then when backward
# scales it), and Triton's interpreter rounds fp32 -> bf16 toward zero: two ulps allowed.
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2 * 2.0 ** -10, torch.bfloat16: 2 * 2.0 ** -7}


def _grad_atol(dtype, largest):
    # Two ulps of the subnormal range, where small fp16 gradients of a mean land.
    info = torch.finfo(dtype)
    return 1e-6 * largest + 2 * info.smallest_normal * info.eps


def _skip_unless_runs(device, backend, pred, target, mask):
    chosen, skipped = ops.explain("masked_mse", torch.device(device), pred, target, mask, True, backend=backend)
    if chosen is None:
        pytest.skip("; ".join(skipped))


def _inputs(shape, dtype=torch.float32, mask_channels=1, device="cpu", mask_dtype=None, weights="binary", seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(shape, generator=g)
    target = torch.rand(shape, generator=g)
    mask_shape = (shape[0], mask_channels, *shape[2:])
    mask = torch.rand(mask_shape, generator=g)
    if weights == "binary":
        mask = (mask > 0.5).float()
    return (pred.to(device, dtype), target.to(device, dtype), mask.to(device, mask_dtype or dtype))


def _reference(pred, target, mask, reduction):
    """Loss and d loss / d pred of the eager formula, in float64."""
    p = pred.detach().double().requires_grad_(True)
    w = mask.double()
    loss = ((w * (p - target.double())) ** 2).sum()
    if reduction == "mean":
        count = w.expand_as(p).sum()
        loss = loss / count if count != 0 else loss * 0
    loss.backward()
    return loss.detach(), p.grad


def _loss_and_grad(pred, target, mask, reduction, backend):
    pred = pred.detach().requires_grad_(True)
    loss = ops.masked_mse(pred, target, mask, reduction, backend=backend)
    loss.backward()
    return loss.detach(), pred.grad


def _assert_matches_reference(loss, grad, pred, target, mask, reduction):
    want_loss, want_grad = _reference(pred, target, mask, reduction)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == pred.dtype and grad.shape == pred.shape
    torch.testing.assert_close(loss.double(), want_loss, rtol=LOSS_RTOL, atol=1e-12)
    atol = _grad_atol(pred.dtype, want_grad.abs().max().item())
    torch.testing.assert_close(grad.double(), want_grad, rtol=GRAD_RTOL[pred.dtype], atol=atol)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mask_channels", [1, 3], ids=["mask_Nx1", "mask_NxC"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_matches_the_float64_formula(device, backend, dtype, reduction, mask_channels, channels_last):
    pred, target, mask = _inputs((2, 3, 17, 19), dtype, mask_channels, device)
    if channels_last:
        pred, target, mask = (t.contiguous(memory_format=torch.channels_last) for t in (pred, target, mask))
    _skip_unless_runs(device, backend, pred, target, mask)
    loss, grad = _loss_and_grad(pred, target, mask, reduction, backend)
    _assert_matches_reference(loss, grad, pred, target, mask, reduction)
    if channels_last:
        assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype,mask_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float32),
                                              (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)],
                         ids=str)
def test_mask_dtype_is_independent_of_pred_dtype(device, backend, dtype, mask_dtype):
    pred, target, mask = _inputs((2, 3, 9, 12), dtype, 1, device, mask_dtype=mask_dtype)
    _skip_unless_runs(device, backend, pred, target, mask)
    _assert_matches_reference(*_loss_and_grad(pred, target, mask, "mean", backend), pred, target, mask, "mean")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fractional_weights(device, backend, reduction):
    # Weights enter squared in the sum, once in the mean's denominator: sum((w d)^2) / sum(w).
    pred, target, mask = _inputs((2, 3, 10, 14), torch.float32, 1, device, weights="uniform")
    _skip_unless_runs(device, backend, pred, target, mask)
    _assert_matches_reference(*_loss_and_grad(pred, target, mask, reduction, backend),
                              pred, target, mask, reduction)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradcheck(device, backend, reduction):
    # The loss is quadratic in pred, so finite differences are exact up to fp32 rounding.
    pred, target, mask = _inputs((1, 3, 4, 5), torch.float32, 1, device)
    _skip_unless_runs(device, backend, pred, target, mask)
    pred.requires_grad_(True)
    with pytest.warns(UserWarning, match="not a double precision"):
        assert torch.autograd.gradcheck(lambda p: ops.masked_mse(p, target, mask, reduction, backend=backend),
                                        (pred,), eps=1e-2, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("device,backend", CASES)
def test_backward_scales_by_the_incoming_gradient(device, backend):
    pred, target, mask = _inputs((2, 3, 8, 8), torch.float32, 1, device)
    _skip_unless_runs(device, backend, pred, target, mask)
    pred.requires_grad_(True)
    loss = ops.masked_mse(pred, target, mask, backend=backend)
    (grad,) = torch.autograd.grad(loss, pred, grad_outputs=torch.tensor(-2.5, device=device))
    _, want = _reference(pred, target, mask, "mean")
    torch.testing.assert_close(grad.double(), -2.5 * want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empty_mask_gives_zero_loss_and_zero_gradient(device, backend, dtype, reduction):
    pred, target, mask = _inputs((2, 3, 6, 7), dtype, 1, device)
    mask = torch.zeros_like(mask)
    _skip_unless_runs(device, backend, pred, target, mask)
    loss, grad = _loss_and_grad(pred, target, mask, reduction, backend)
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("device,backend", CASES)
def test_empty_batch(device, backend):
    pred, target, mask = _inputs((0, 3, 6, 7), torch.float32, 1, device)
    _skip_unless_runs(device, backend, pred, target, mask)
    loss, grad = _loss_and_grad(pred, target, mask, "mean", backend)
    assert loss.item() == 0.0 and grad.shape == pred.shape


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("case", ["sliced", "transposed", "mixed_layouts", "expanded_mask", "channels_last_full_mask"])
def test_non_contiguous_inputs(device, backend, case):
    base, target, mask = _inputs((2, 3, 12, 26), torch.float32, 1, device)
    pred = base.detach().requires_grad_(True)
    view = pred
    if case == "sliced":  # every other column, mask cropped too
        view, target, mask = pred[..., ::2], target[..., 1::2], mask[..., :13]
    elif case == "transposed":  # H and W swapped: dense, but neither NCHW nor channels_last
        view, target, mask = pred.transpose(2, 3), target.transpose(2, 3), mask.transpose(2, 3)
    elif case == "mixed_layouts":  # channels_last pred, NCHW target
        pred = base.contiguous(memory_format=torch.channels_last).requires_grad_(True)
        view = pred
    elif case == "expanded_mask":  # one mask for the whole batch, broadcast without a copy
        mask = mask[:1].expand(2, 1, 12, 26)
    else:  # full mask in channels_last, pred channels_last
        pred = base.contiguous(memory_format=torch.channels_last).requires_grad_(True)
        view = pred
        mask = mask.expand(2, 3, 12, 26).contiguous(memory_format=torch.channels_last)
    _skip_unless_runs(device, backend, view.detach(), target, mask)
    loss = ops.masked_mse(view, target, mask, backend=backend)
    loss.backward()
    want_loss, want_grad = _reference(view, target, mask, "mean")
    torch.testing.assert_close(loss.double(), want_loss, rtol=LOSS_RTOL, atol=1e-12)
    full_grad = torch.zeros_like(pred, dtype=torch.float64)
    if case == "sliced":
        full_grad[..., ::2] = want_grad
    elif case == "transposed":
        full_grad = want_grad.transpose(2, 3)
    else:
        full_grad = want_grad
    torch.testing.assert_close(pred.grad.double(), full_grad, rtol=1e-5, atol=1e-9)


# 2 x 3 x 150 x 80 = 72,000 elements: several blocks of the C++ twin (32,768 elements, or
# 10,922 whole pixels) and of Triton under the interpreter (65,536), with ragged last ones.
@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 3, 1, 1), (3, 3, 7, 11), (2, 4, 5, 3), (2, 3, 150, 80)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_sizes_that_are_not_multiples_of_the_block(device, backend, shape, channels_last):
    pred, target, mask = _inputs(shape, torch.float16, 1, device)
    if channels_last:
        pred, target = (t.contiguous(memory_format=torch.channels_last) for t in (pred, target))
    _skip_unless_runs(device, backend, pred, target, mask)
    _assert_matches_reference(*_loss_and_grad(pred, target, mask, "mean", backend), pred, target, mask, "mean")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_two_calls_are_bit_identical(device, backend, channels_last):
    pred, target, mask = _inputs((2, 3, 150, 80), torch.bfloat16, 1, device, weights="uniform")
    if channels_last:
        pred, target = (t.contiguous(memory_format=torch.channels_last) for t in (pred, target))
    _skip_unless_runs(device, backend, pred, target, mask)
    first = _loss_and_grad(pred, target, mask, "mean", backend)
    second = _loss_and_grad(pred, target, mask, "mean", backend)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=_CUDA)])
@pytest.mark.parametrize("num_partials", [1, 5, 1025, 3000])
@pytest.mark.parametrize("mean", [False, True], ids=["sum", "mean"])
def test_triton_finish_kernel_adds_every_partial(device, num_partials, mean):
    """The second Triton kernel loops over the partial sums a block at a time: past one block
    (1024) only for inputs of over 4M elements on a GPU, 67M under the interpreter, so it is
    checked directly here. An all-zero weight sum gives 0, not NaN, for "mean"."""
    km = pytest.importorskip("glcic_fast.kernels.masked_mse")
    if device == "cpu" and not km.INTERPRET:
        pytest.skip("Triton runs CPU tensors only under TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(num_partials)
    partial_loss = torch.rand(num_partials, generator=g).to(device)
    for weights in (torch.rand(num_partials, generator=g) * 3, torch.zeros(num_partials)):
        partial_weight = weights.to(device)
        loss = torch.full((), float("nan"), device=device)
        grad_scale = torch.full((), float("nan"), device=device)
        km._masked_mse_finish_kernel[(1,)](partial_loss, partial_weight, num_partials, loss, grad_scale,
                                           MEAN=mean, BLOCK=km._FINISH_BLOCK, num_warps=4)
        loss_sum, weight_sum = partial_loss.double().sum().item(), partial_weight.double().sum().item()
        if not mean:
            expected = (loss_sum, 1.0)
        elif weight_sum == 0:
            expected = (0.0, 0.0)
        else:
            expected = (loss_sum / weight_sum, 1.0 / weight_sum)
        assert loss.item() == pytest.approx(expected[0], rel=1e-5)
        assert grad_scale.item() == pytest.approx(expected[1], rel=1e-5)


def _offset_by_one_element(t):
    """t's values, in t's layout, in a tensor whose data starts one element past an aligned address."""
    channels_last = not t.is_contiguous()
    n, c, h, w = t.shape
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].view(n, h, w, c).permute(0, 3, 1, 2) if channels_last else flat[1:].view(n, c, h, w)
    view.copy_(t)
    return view


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_mode", ["full", "planar", "interleaved"])
@pytest.mark.parametrize("case", ["aligned", "misaligned_pred", "misaligned_mask"])
def test_gpu_vector_and_scalar_paths(backend, dtype, mask_mode, case):
    # 8 x 3 x 256 x 256: several grid-stride iterations per thread; the offsets make the
    # CUDA kernel fall back from 16-byte packs to scalar loads.
    pred, target, mask = _inputs((8, 3, 256, 256), dtype, 3 if mask_mode == "full" else 1, "cuda")
    if mask_mode == "interleaved":
        pred, target = (t.contiguous(memory_format=torch.channels_last) for t in (pred, target))
    if case == "misaligned_pred":
        pred, target = _offset_by_one_element(pred), _offset_by_one_element(target)
    elif case == "misaligned_mask":
        mask = _offset_by_one_element(mask)
    _skip_unless_runs("cuda", backend, pred, target, mask)
    _assert_matches_reference(*_loss_and_grad(pred, target, mask, "mean", backend), pred, target, mask, "mean")


def test_cpp_result_does_not_depend_on_the_thread_count():
    pred, target, mask = _inputs((2, 3, 150, 80), torch.float32, 1, weights="uniform")
    _skip_unless_runs("cpu", "cpp", pred, target, mask)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_loss_and_grad(pred, target, mask, "sum", "cpp"))
    finally:
        torch.set_num_threads(threads)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


def test_backends_agree_with_each_other():
    pred, target, mask = _inputs((2, 3, 40, 30), torch.float32, 1, weights="uniform")
    results = {}
    for backend in ops.available_backends("masked_mse"):
        if ops.explain("masked_mse", pred.device, pred, target, mask, True, backend=backend)[0]:
            results[backend] = _loss_and_grad(pred, target, mask, "mean", backend)
    torch_loss, torch_grad = results.pop("torch")
    for loss, grad in results.values():
        torch.testing.assert_close(loss, torch_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, torch_grad, rtol=1e-6, atol=0)


_BAD_INPUTS = {
    "reduction": (dict(reduction="none"), ValueError, "reduction must be one of"),
    "pred_dims": (dict(pred=torch.rand(3, 4, 5)), ValueError, "pred must be N x C x H x W"),
    "target_shape": (dict(target=torch.rand(2, 3, 4, 6)), ValueError, "target has shape"),
    "mask_channels": (dict(mask=torch.ones(2, 2, 4, 5)), ValueError, "mask must be N x 1 x H x W or N x C x H x W"),
    "mask_size": (dict(mask=torch.ones(2, 1, 5, 4)), ValueError, r"here \(2, 1, 4, 5\)"),
    "mask_batch": (dict(mask=torch.ones(1, 1, 4, 5)), ValueError, "mask must be"),
    "pred_float64": (dict(pred=torch.rand(2, 3, 4, 5, dtype=torch.float64)), TypeError, "got torch.float64"),
    "pred_integer": (dict(pred=torch.ones(2, 3, 4, 5, dtype=torch.int32)), TypeError, "pred must be float32"),
    "target_dtype": (dict(target=torch.rand(2, 3, 4, 5, dtype=torch.float16)), TypeError, "target is torch.float16"),
    "mask_bool": (dict(mask=torch.ones(2, 1, 4, 5, dtype=torch.bool)), TypeError, r"mask.to\(pred.dtype\)"),
    "mask_not_a_tensor": (dict(mask=1.0), TypeError, "mask must be a torch.Tensor"),
    "mask_device": (dict(mask=torch.ones(2, 1, 4, 5, device="meta")), ValueError, "must be on one device"),
    "backend_name": (dict(backend="mps"), ValueError, "unknown backend"),
}


@pytest.mark.parametrize("name", list(_BAD_INPUTS))
def test_bad_inputs_raise_clear_errors(name):
    overrides, error, message = _BAD_INPUTS[name]
    args = dict(pred=torch.rand(2, 3, 4, 5), target=torch.rand(2, 3, 4, 5), mask=torch.ones(2, 1, 4, 5))
    args.update(overrides)
    with pytest.raises(error, match=message):
        ops.masked_mse(**args)


def test_named_backend_that_cannot_run_raises_backend_unavailable():
    pred, target, mask = _inputs((1, 3, 4, 4))
    with pytest.raises(ops.BackendUnavailable, match="cuda: "):
        ops.masked_mse(pred, target, mask, backend="cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    kernels = pytest.importorskip("glcic_fast.kernels.masked_mse")
    monkeypatch.setattr(kernels, "INTERPRET", False)
    pred, target, mask = _inputs((1, 3, 4, 4))
    with pytest.raises(ops.BackendUnavailable, match="TRITON_INTERPRET=1"):
        ops.masked_mse(pred, target, mask, backend="triton")


def test_automatic_choice_on_cpu_is_the_cpp_twin_when_built():
    pred, target, mask = _inputs((1, 3, 4, 4))
    chosen, skipped = ops.explain("masked_mse", pred.device, pred, target, mask, True)
    assert chosen == ("torch" if "cpp" in ops.BACKEND_LOAD_ERRORS else "cpp")


# The C++ operator itself, called without the Python wrapper.

def _extension_op():
    if "cpp" in ops.BACKEND_LOAD_ERRORS:
        pytest.skip(ops.BACKEND_LOAD_ERRORS["cpp"])
    return torch.ops.glcic_fast.masked_mse_fwd


@pytest.mark.parametrize("name,cpp_message", [("target_shape", "target has shape"),
                                               ("mask_channels", "mask must be N x 1 x H x W or N x C x H x W"),
                                               ("pred_float64", "pred must be float32, float16 or bfloat16, got Double"),
                                               ("target_dtype", "target is Half but pred is Float"),
                                               ("mask_bool", r"mask.to\(pred.dtype\)")])
def test_extension_op_checks_its_arguments(name, cpp_message):
    op = _extension_op()
    overrides, error, _ = _BAD_INPUTS[name]
    args = dict(pred=torch.rand(2, 3, 4, 5), target=torch.rand(2, 3, 4, 5), mask=torch.ones(2, 1, 4, 5))
    args.update(overrides)
    with pytest.raises(error, match=cpp_message):
        op(args["pred"], args["target"], args["mask"], True)


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "transposed"])
def test_extension_op_fake_kernel_matches_the_real_one(layout):
    op = _extension_op()
    pred, target, mask = _inputs((2, 3, 6, 5), torch.float16, 1)
    if layout == "nhwc":
        pred = pred.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        pred = pred.transpose(2, 3).contiguous().transpose(2, 3)
    torch.library.opcheck(op.default, (pred, target, mask, True))


def test_compiles_with_torch_compile():
    pred, target, mask = _inputs((2, 3, 8, 10), torch.float32, 1)
    _skip_unless_runs("cpu", "cpp", pred, target, mask)

    def loss(p):
        return ops.masked_mse(p * 1.5, target, mask, backend="cpp")

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (loss, compiled):
        p = pred.detach().requires_grad_(True)
        value = fn(p)
        value.backward()
        results.append((value.detach(), p.grad))
    torch.testing.assert_close(results[1], results[0])
