"""Fused convolution + bias + activation (+ per-channel affine): ``conv2d_bias_act`` and
``conv_transpose2d_bias_act``, and their backends.

Each op checks its arguments, asks the dispatcher (dispatch.py) which backend runs them, and
calls it. Every backend computes, in the input's dtype with fp32 accumulation:

    y = act(conv(x, weight) + bias)              then, if post_scale is given,
    y = y * post_scale + post_shift              (GLCIC-PyTorch's BN after the ReLU)

with act one of ACTIVATIONS: "relu", "sigmoid" (the paper's output layer), "hardtanh"
(clamp to [-1, 1]: the output layer of mmagic's Global&Local generator, its "clip") or
"none".

and returns y in channels_last memory format. The backends:

* "torch", always there: one F.conv2d / F.conv_transpose2d call with the bias folded in,
  then the epilogue in place.
* "triton", where Triton loads: the implicit-GEMM kernel of kernels/conv2d_bias_act.py
  (glcic_fast.kernels) for every layer of the completion net, as the torch custom ops
  ``glcic_fast::triton_conv2d_bias_act`` and ``glcic_fast::triton_conv_transpose2d_bias_act``
  (torch.compile and torch.export keep them as single fused ops), defined at import where
  they can run (a GPU, or Triton's interpreter) and else at their first call.
* "cpp", where glcic_fast._C loads: ``glcic_fast::conv3x3_winograd_bias_act``, the CPU
  kernel of the 3x3, stride 1, padding == dilation float32 convs (channels multiples of 16)
  by Winograd minimal filtering F(4 x 4, 3 x 3) (winograd.py, csrc/ops/cpu/conv2d_bias_act*),
  AVX-512 or AVX2 + FMA as the CPU has them; the dilated layers are run as the interleaved
  sub-grids' ordinary 3x3 convs.
* "cuda", where glcic_fast._C was built with its CUDA sources: the tensor-core kernel
  ``glcic_fast::conv3x3_bias_act`` (csrc/ops/conv2d_bias_act.cpp, csrc/ops/cuda/conv2d_bias_act*)
  of the 3x3, 256 -> 256, stride 1, padding == dilation layers, taken automatically only
  where the tuning table measured it fastest.

The kernels read the weight in a layout of their own: it is repacked once and reused while
the weight is unchanged (weight_cache.py).
"""

import functools
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from glcic_fast.ops import _extension, dispatch, winograd
from glcic_fast.ops.weight_cache import PackedWeightCache

try:
    from glcic_fast.kernels import conv2d_bias_act as _triton
except Exception as exc:  # no (working) Triton: the ops run on the other backends
    _triton = None
    dispatch.record_load_error("glcic_fast.kernels.conv2d_bias_act", exc, "triton")

ACTIVATIONS = ("relu", "sigmoid", "hardtanh", "none")


# --------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------

def _pair_int(value, name):
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name} must be an int or a pair of equal ints, got {value!r}")
        value = value[0]
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def _validate(x, weight, bias, activation, post_scale, post_shift, out_channels, in_channels):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be N x C x H x W, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must have a square 4-d kernel, got shape {tuple(weight.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"x has {x.shape[1]} channels but the weight expects {in_channels}")
    for name, t in (("weight", weight), ("bias", bias), ("post_scale", post_scale), ("post_shift", post_shift)):
        if t is None:
            continue
        if t.device != x.device or t.dtype != x.dtype:
            raise ValueError(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}")
    if bias is not None and bias.shape != (out_channels,):
        raise ValueError(f"bias must have shape ({out_channels},), got {tuple(bias.shape)}")
    if (post_scale is None) != (post_shift is None):
        raise ValueError("post_scale and post_shift go together: give both or neither")
    if post_scale is not None and (post_scale.shape != (out_channels,) or post_shift.shape != (out_channels,)):
        raise ValueError(f"post_scale and post_shift must have shape ({out_channels},)")


def _dispatch(op, transposed, x, weight, bias, stride, padding, dilation, activation, post_scale, post_shift, backend):
    stride, padding, dilation = (_pair_int(v, n) for v, n in ((stride, "stride"), (padding, "padding"), (dilation, "dilation")))
    # Conv weights are (Cout, Cin, k, k); transposed-conv weights are (Cin, Cout, k, k).
    c_in, c_out = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
    _validate(x, weight, bias, activation, post_scale, post_shift, c_out, c_in)
    args = (x, weight, bias, stride, padding, dilation, activation, post_scale, post_shift)
    tuning_key = (f"{'deconv' if transposed else 'conv'}:{c_in}:{c_out}:k{weight.shape[2]}:s{stride}:d{dilation}:"
                  f"{str(x.dtype).split('.')[-1]}")
    _, run = dispatch.resolve(op, x.device, *args, backend=backend, tuning_key=tuning_key)
    return run(*args)


def conv2d_bias_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *,
                    stride=1, padding=0, dilation=1, activation: str = "relu",
                    post_scale: Optional[torch.Tensor] = None, post_shift: Optional[torch.Tensor] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """act(conv2d(x, weight) + bias) [* post_scale + post_shift], weight (Cout, Cin, k, k).

    backend: None for the dispatcher's choice, or one of "torch", "cpp", "triton", "cuda"
    (BackendUnavailable, with the reason, if it cannot run these arguments)."""
    return _dispatch("conv2d_bias_act", False, x, weight, bias, stride, padding, dilation, activation,
                     post_scale, post_shift, backend)


def conv_transpose2d_bias_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *,
                              stride=1, padding=0, dilation=1, activation: str = "relu",
                              post_scale: Optional[torch.Tensor] = None, post_shift: Optional[torch.Tensor] = None,
                              backend: Optional[str] = None) -> torch.Tensor:
    """act(conv_transpose2d(x, weight) + bias) [* post_scale + post_shift], weight (Cin, Cout, k, k),
    no output padding: H_out = (H - 1) * stride - 2 * padding + dilation * (k - 1) + 1.

    backend: None for the dispatcher's choice, or one of "torch", "triton"."""
    return _dispatch("conv_transpose2d_bias_act", True, x, weight, bias, stride, padding, dilation, activation,
                     post_scale, post_shift, backend)


def _autograd_records(*tensors) -> bool:
    """Whether autograd would record a call on these tensors (None for an absent one): the
    kernels have no backward, only the torch backend does."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _output_size(size, k, stride, padding, dilation, transposed):
    if transposed:
        return (size - 1) * stride - 2 * padding + dilation * (k - 1) + 1
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _empty_output(x, weight, stride, padding, dilation, transposed):
    """The channels_last output of the conv (transposed or not) of x with weight, unwritten."""
    n, _, h, w = x.shape
    k = weight.shape[2]
    c_out = weight.shape[1] if transposed else weight.shape[0]
    size = functools.partial(_output_size, k=k, stride=stride, padding=padding, dilation=dilation,
                             transposed=transposed)
    return torch.empty((n, c_out, size(h), size(w)), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------
# Backend "torch": the fastest plain-PyTorch way. One convolution call with the bias folded
# in, on channels_last tensors (oneDNN on the CPU, cuDNN on the GPU run NHWC natively), then
# the activation and the affine in place, so that no extra activation-sized tensor is
# allocated. In place is only safe when autograd is not recording; otherwise the same
# formula runs out of place.
# --------------------------------------------------------------------------------------

def _position_independent_sigmoid_(y):
    """``y.sigmoid_()`` whose value for an element does not depend on where it lies.

    PyTorch's CPU sigmoid runs vector code on most of each thread's chunk and scalar code
    on the rest, and the two can differ in the last bit: a pixel's value would then depend
    on the tensor's size and the thread count, and crops or tiles of an image would not
    reproduce the whole image bit for bit. An output with a stride of 2 sends every element
    through the scalar loop. (CUDA computes each element alike: nothing to do there. While
    torch.compile or torch.export trace the op, the out= call cannot be traced and plain
    ``sigmoid_`` is recorded: Inductor's code is position-independent by itself, an
    exported program run by eager PyTorch is not, in the last bit.)"""
    if y.device.type != "cpu" or torch.compiler.is_compiling():
        return y.sigmoid_()
    n, c, h, w = y.shape
    scalar_out = torch.empty(2 * y.numel(), dtype=y.dtype)[::2].view(n, h, w, c).permute(0, 3, 1, 2)
    torch.sigmoid(y, out=scalar_out)
    return y.copy_(scalar_out)


def _epilogue(y, activation, post_scale, post_shift):
    recording = torch.is_grad_enabled() and y.requires_grad
    if activation == "relu":
        y = F.relu(y) if recording else y.relu_()
    elif activation == "sigmoid":
        y = torch.sigmoid(y) if recording else _position_independent_sigmoid_(y)
    elif activation == "hardtanh":  # torch.clamp, as mmagic's GLDecoder (its gradient at +-1 too)
        y = torch.clamp(y, -1.0, 1.0) if recording else y.clamp_(-1.0, 1.0)
    if post_scale is not None:
        shape = (1, -1, 1, 1)
        if recording:
            y = torch.addcmul(post_shift.view(shape), y, post_scale.view(shape))
        else:
            y = y.mul_(post_scale.view(shape)).add_(post_shift.view(shape))
    return y


def _torch_conv2d(x, weight, bias, stride, padding, dilation, activation, post_scale, post_shift):
    x = x.contiguous(memory_format=torch.channels_last)
    y = F.conv2d(x, weight, bias, stride, padding, dilation)
    return _epilogue(y, activation, post_scale, post_shift)


def _torch_conv_transpose2d(x, weight, bias, stride, padding, dilation, activation, post_scale, post_shift):
    x = x.contiguous(memory_format=torch.channels_last)
    y = F.conv_transpose2d(x, weight, bias, stride, padding, 0, 1, dilation)
    return _epilogue(y, activation, post_scale, post_shift)


dispatch.register("conv2d_bias_act", "torch", _torch_conv2d)
dispatch.register("conv_transpose2d_bias_act", "torch", _torch_conv_transpose2d)


#: The kernels' repacked weights, for the backends below (a layer runs on one of them).
_PACKED = PackedWeightCache(256)


# --------------------------------------------------------------------------------------
# Backend "triton": kernels/conv2d_bias_act.py, behind a torch custom op per conv kind
# --------------------------------------------------------------------------------------

def _triton_why_not(transposed, x, weight, bias, stride, padding, dilation, activation, post_scale, post_shift):
    if x.device.type != "cuda" and not _triton.INTERPRET:
        return (f"Triton runs on CUDA tensors (x is on {x.device.type}); set TRITON_INTERPRET=1 "
                "before triton is imported to run its kernels in the CPU interpreter")
    if x.dtype not in _triton.DTYPES:
        return f"dtype {x.dtype} is not supported (float32, float16, bfloat16 are)"
    if _autograd_records(x, weight, bias, post_scale, post_shift):
        return "autograd is recording and the Triton kernels have no backward"
    if stride < 1:
        return f"stride {stride} is not supported (it must be at least 1)"
    if dilation < 1:
        return f"dilation {dilation} is not supported (it must be at least 1)"
    if transposed and dilation != 1:
        return f"transposed convolution with dilation {dilation} is not supported (only 1)"
    _, _, h, w = x.shape
    size = functools.partial(_output_size, k=weight.shape[2], stride=stride, padding=padding, dilation=dilation,
                             transposed=transposed)
    if size(h) <= 0 or size(w) <= 0:
        return "the output would be empty (the input is smaller than the kernel)"
    return None


def _triton_packed_weight(weight, transposed, stride, padding):
    """The kernel's layout of ``weight``, repacked once per (storage, version, dtype, layout)."""
    if transposed:
        return _PACKED.get(weight, _triton.pack_conv_transpose_weight, stride, padding)
    return _PACKED.get(weight, _triton.pack_conv_weight)


def _triton_launch(transposed, x, weight, bias, post_scale, post_shift, stride, padding, dilation, activation):
    out = _empty_output(x, weight, stride, padding, dilation, transposed)
    return _triton.launch(x, _triton_packed_weight(weight, transposed, stride, padding), bias, post_scale,
                          post_shift, out, transposed=transposed, kernel_size=weight.shape[2], stride=stride,
                          padding=padding, dilation=dilation, activation=activation)


# The custom ops' kernels (torch.library reads the schema from the annotations).
def _triton_conv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      post_scale: Optional[torch.Tensor], post_shift: Optional[torch.Tensor],
                      stride: int, padding: int, dilation: int, activation: str) -> torch.Tensor:
    return _triton_launch(False, x, weight, bias, post_scale, post_shift, stride, padding, dilation, activation)


def _triton_conv_transpose2d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                post_scale: Optional[torch.Tensor], post_shift: Optional[torch.Tensor],
                                stride: int, padding: int, dilation: int, activation: str) -> torch.Tensor:
    return _triton_launch(True, x, weight, bias, post_scale, post_shift, stride, padding, dilation, activation)


def _define_triton_op(qualname, kernel, transposed):
    if hasattr(torch.library, "triton_op") and not _triton.INTERPRET:
        # Traceable: torch.export keeps the op, Inductor sees (and schedules) the kernel;
        # ``kernel`` doubles as the fake kernel (wrap_triton records instead of launching).
        torch.library.triton_op(qualname, kernel, mutates_args=())
        return
    # Under the interpreter the kernel is a plain Python function that cannot be traced
    # (and torch < 2.6 has no triton_op): an opaque custom op with an explicit fake kernel.
    op = torch.library.custom_op(qualname, kernel, mutates_args=())

    @op.register_fake
    def _fake(x, weight, bias, post_scale, post_shift, stride, padding, dilation, activation):
        return _empty_output(x, weight, stride, padding, dilation, transposed)


_TRITON_OPS = (("glcic_fast::triton_conv2d_bias_act", _triton_conv2d_op, False),
               ("glcic_fast::triton_conv_transpose2d_bias_act", _triton_conv_transpose2d_op, True))
_triton_ops_defined = set()
_triton_ops_lock = threading.Lock()


def _define_triton_ops():
    """Defines the Triton custom ops not defined yet. At import only where they can run (a
    GPU, or the interpreter): torch.library.triton_op imports Inductor to find the kernels a
    function launches, about 1 s of `import glcic_fast` on a machine without a GPU, where
    the dispatcher does not pick them (its check says why). Elsewhere at their first call
    (tests/triton_aot.py runs them on meta tensors to record the launches)."""
    if len(_triton_ops_defined) == len(_TRITON_OPS):  # a global read Dynamo can trace
        return
    with _triton_ops_lock:
        for qualname, kernel, transposed in _TRITON_OPS:
            if qualname not in _triton_ops_defined:
                _define_triton_op(qualname, kernel, transposed)
                _triton_ops_defined.add(qualname)


def _run_triton_conv2d(x, weight, bias, stride, padding, dilation, activation, post_scale, post_shift):
    _define_triton_ops()
    return torch.ops.glcic_fast.triton_conv2d_bias_act(
        x, weight, bias, post_scale, post_shift, stride, padding, dilation, activation)


def _run_triton_conv_transpose2d(x, weight, bias, stride, padding, dilation, activation, post_scale, post_shift):
    _define_triton_ops()
    return torch.ops.glcic_fast.triton_conv_transpose2d_bias_act(
        x, weight, bias, post_scale, post_shift, stride, padding, dilation, activation)


if _triton is not None:
    if _triton.INTERPRET or torch.cuda.is_available():
        _define_triton_ops()
    dispatch.register("conv2d_bias_act", "triton", _run_triton_conv2d, functools.partial(_triton_why_not, False))
    dispatch.register("conv_transpose2d_bias_act", "triton", _run_triton_conv_transpose2d,
                      functools.partial(_triton_why_not, True))


# --------------------------------------------------------------------------------------
# Backend "cuda": glcic_fast::conv3x3_bias_act of glcic_fast._C, the tensor-core implicit
# GEMM of the 3x3, 256 -> 256, stride 1, padding == dilation layers
# --------------------------------------------------------------------------------------

_CONV3X3_CHANNELS = 256
_CONV3X3_DTYPES = (torch.float16, torch.bfloat16)
_CONV3X3_MAX_EXTENT = 2 ** 30  # H, W and the dilation are below this (int32 tap arithmetic)
_HAS_CONV3X3_CUDA = _extension.has_cuda_kernel("conv3x3_bias_act")
_CONV3X3_GPU_REASONS = {}  # CUDA device index -> why the kernel cannot run there, or None


def pack_conv3x3_weight(weight: torch.Tensor) -> torch.Tensor:
    """(256, 256, 3, 3) -> the kernel's dense 256 x 2304 matrix, row cout = [kh][kw][cin].
    A channels_last weight is already laid out so: then this is a view, not a copy."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()


def _conv3x3_gpu_reason(device: torch.device):
    """Why the kernel cannot run on this GPU (before sm_80, or no kernel image in the
    library for it), or None; asked once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CONV3X3_GPU_REASONS:
        major, minor = torch.cuda.get_device_capability(index)
        reason = None
        if major < 8:
            reason = (f"cuda:{index} is sm_{major}{minor}; the CUDA conv kernel needs sm_80 or newer "
                      "(cp.async, ldmatrix, bf16 mma.sync)")
        elif torch.ops.glcic_fast.conv3x3_bias_act_sm_version(index) == 0:
            reason = (f"glcic_fast._C holds no kernel image for cuda:{index} (sm_{major}{minor}): rebuild it "
                      f"with TORCH_CUDA_ARCH_LIST including {major}.{minor}")
        _CONV3X3_GPU_REASONS[index] = reason
    return _CONV3X3_GPU_REASONS[index]


def _conv3x3_why_not(x, weight, bias, stride, padding, dilation, activation, post_scale, post_shift):
    """Every reason the CUDA conv kernel cannot run these arguments, or None."""
    reasons = []
    if not _HAS_CONV3X3_CUDA:
        reasons.append(_extension.NO_CUDA_SOURCES)
    if x.device.type != "cuda":
        reasons.append(f"the CUDA conv kernel runs CUDA tensors, these are on {x.device}")
    c = _CONV3X3_CHANNELS
    if tuple(weight.shape) != (c, c, 3, 3) or stride != 1 or padding != dilation or dilation < 1:
        reasons.append(f"the CUDA conv kernel covers only 3x3 convs with {c} input and {c} output channels, "
                       f"stride 1 and padding == dilation >= 1; this one has weight {tuple(weight.shape)} "
                       f"(Cout, Cin, kH, kW), stride {stride}, padding {padding}, dilation {dilation}")
    elif dilation >= _CONV3X3_MAX_EXTENT or max(x.shape[2:]) >= _CONV3X3_MAX_EXTENT:
        reasons.append("H, W and the dilation must be below 2^30 for the CUDA conv kernel")
    if x.dtype not in _CONV3X3_DTYPES:
        reasons.append(f"dtype {x.dtype} is not supported by the CUDA conv kernel (float16 and bfloat16 are: "
                       "it runs on tensor cores)")
    if _autograd_records(x, weight, bias, post_scale, post_shift):
        reasons.append("autograd is recording and the CUDA conv kernel has no backward")
    # Not while torch.compile traces (the op's binding checks the GPU again when it runs).
    if x.device.type == "cuda" and _HAS_CONV3X3_CUDA and not torch.compiler.is_compiling():
        gpu_reason = _conv3x3_gpu_reason(x.device)
        if gpu_reason is not None:
            reasons.append(gpu_reason)
    return "; ".join(reasons) or None


def _conv3x3_packed_weight(weight):
    """The kernel's layout of ``weight``, repacked once per (storage, version, dtype, layout)."""
    return _PACKED.get(weight, pack_conv3x3_weight)


def _conv3x3(x, weight, bias, dilation, activation, post_scale=None, post_shift=None, out=None):
    """act(conv2d(x, weight, padding=dilation, dilation=dilation) + bias) [* post_scale + post_shift]
    with the CUDA kernel, weight (256, 256, 3, 3) packed through the cache; into ``out``
    (channels_last, x's shape and dtype) when given, else into a new channels_last tensor."""
    packed = _conv3x3_packed_weight(weight)
    if out is None:
        return torch.ops.glcic_fast.conv3x3_bias_act(x, packed, bias, dilation, activation, post_scale, post_shift)
    return torch.ops.glcic_fast.conv3x3_bias_act.out(x, packed, bias, dilation, activation, post_scale,
                                                     post_shift, out=out)


def _run_conv3x3(x, weight, bias, stride, padding, dilation, activation, post_scale, post_shift):
    return _conv3x3(x, weight, bias, dilation, activation, post_scale, post_shift)


if _extension.LOADED:
    @torch.library.register_fake("glcic_fast::conv3x3_bias_act")
    def _conv3x3_fake(x, packed_weight, bias, dilation, activation, post_scale, post_shift):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)

    # Not in the automatic choice until a GPU run's tuning table shows it fastest (and the
    # parity tests it ran with passed); named explicitly, it runs wherever why_not allows.
    dispatch.register("conv2d_bias_act", "cuda", _run_conv3x3, _conv3x3_why_not, automatic=False)


# --------------------------------------------------------------------------------------
# Backend "cpp": glcic_fast::conv3x3_winograd_bias_act of glcic_fast._C, Winograd F(4 x 4, 3 x 3)
# on the CPU for the 3x3, stride 1, padding == dilation layers
# --------------------------------------------------------------------------------------

def _winograd_why_not(x, weight, bias, stride, padding, dilation, activation, post_scale, post_shift):
    """Every reason the CPU Winograd kernel cannot run these arguments, or None."""
    reasons = []
    if x.device.type != "cpu":
        reasons.append(f"the Winograd kernel runs CPU tensors, these are on {x.device}")
    if x.dtype != torch.float32:
        reasons.append(f"dtype {x.dtype} is not supported by the Winograd kernel (float32 is)")
    c_out, c_in = weight.shape[:2]
    if (weight.shape[2] != 3 or stride != 1 or padding != dilation or dilation < 1
            or c_in % winograd.PANEL or c_out % winograd.PANEL):
        reasons.append(f"the Winograd kernel covers only 3x3 convs with stride 1, padding == dilation >= 1 and "
                       f"channels in multiples of {winograd.PANEL}; this one has weight {tuple(weight.shape)} "
                       f"(Cout, Cin, kH, kW), stride {stride}, padding {padding}, dilation {dilation}")
    if _autograd_records(x, weight, bias, post_scale, post_shift):
        reasons.append("autograd is recording and the Winograd kernel has no backward")
    return "; ".join(reasons) or None


def _run_winograd(x, weight, bias, stride, padding, dilation, activation, post_scale, post_shift):
    transformed = _PACKED.get(weight, winograd.transform_weight, winograd.TILE)
    input_transform, output_transform = winograd.kernel_matrices(winograd.TILE)
    # The kernel reads the per-channel vectors densely (a no-op for the net's own).
    bias, post_scale, post_shift = (None if t is None else t.contiguous() for t in (bias, post_scale, post_shift))
    return torch.ops.glcic_fast.conv3x3_winograd_bias_act(x, transformed, input_transform, output_transform, bias,
                                                          dilation, activation, post_scale, post_shift)


def winograd_isa() -> str:
    """The instruction set the CPU Winograd kernel runs now: "avx512", "avx2" or "portable"
    (environment variable GLCIC_FAST_CPU_ISA picks a lesser one; a value it cannot take
    raises ValueError or RuntimeError saying why)."""
    return torch.ops.glcic_fast.conv3x3_winograd_isa()


def _winograd_why_not_automatic():
    """The portable build is several times slower than torch's convolution (README): it runs
    only when named.
    (Not asked while torch.compile traces, which cannot call an op that returns a string.)"""
    if not torch.compiler.is_compiling() and winograd_isa() == "portable":
        return ("the Winograd kernel would run its portable code (the CPU has neither AVX-512 nor AVX2 + FMA, or "
                "GLCIC_FAST_CPU_ISA=portable), far slower than torch's convolution: it runs only when named")
    return None


if _extension.LOADED:
    @torch.library.register_fake("glcic_fast::conv3x3_winograd_bias_act")
    def _winograd_fake(x, weight_transformed, input_transform, output_transform, bias, dilation, activation,
                       post_scale, post_shift):
        n, _, h, w = x.shape
        return torch.empty((n, weight_transformed.shape[1] * winograd.PANEL, h, w), dtype=x.dtype,
                           device=x.device, memory_format=torch.channels_last)

    dispatch.register("conv2d_bias_act", "cpp", _run_winograd, _winograd_why_not,
                      why_not_automatic=_winograd_why_not_automatic)
