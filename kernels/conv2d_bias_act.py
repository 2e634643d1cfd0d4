"""The Triton kernel of glcic_fast.ops.conv2d_bias_act and conv_transpose2d_bias_act, and
its launcher.

One implicit-GEMM kernel over NHWC (channels_last) tensors computes, for every layer of the
completion net,

    y = act(conv(x, w) + bias)  [* post_scale + post_shift]  -> cast to x's dtype

(act: none, relu, sigmoid, or hardtanh = clamp to [-1, 1])

with fp32 accumulation and the whole epilogue fused (no intermediate tensor).

GEMM view. Rows (M) are output pixels n*OH*OW + oh*OW + ow, columns (N) output channels,
the reduction (K) runs over (kh, kw, cin) in that order. The weight is repacked into a
dense [KH*KW*Cin, Cout] matrix (``pack_conv_weight``; the caller keeps the packed weight
for as long as the weight is unchanged), so a K slice of it is a plain 2-d tile. Two ways
to walk K, chosen at compile time:

* per tap (Cin a multiple of BLOCK_K: every layer but the first): the loop runs over
  (tap, channel block); the A tile is BLOCK_M pixels x BLOCK_K contiguous channels of one
  shifted input pixel, zero where the tap falls in the padding.
* flat (Cin not a multiple of BLOCK_K: the 5x5 conv on 4 channels): K = 25*4 = 100 is walked
  in BLOCK_K >= 16 slices, each element's (kh, kw, cin) recovered by div/mod and masked past
  K: the padding of K costs 12 of 112 columns rather than 12 of every 16.

Transposed convolutions (GLCIC's 4x4, stride 2, padding 1 deconvs) are never zero-stuffed:
output pixels oh = s*q + a (phase a in [0, s)) receive only the taps kh = r + s*j with
r = (a + p) mod s, reading input row q + (a + p) // s - j. Each of the s*s phases is thus a
dense ceil(K/s) x ceil(K/s) convolution (2x2 for the GLCIC deconvs) with its own slice of
the repacked weight (``pack_conv_transpose_weight``); one launch covers all phases
(phase = grid axis 1).

Output channels are masked (Cout = 3 for the last layer runs in a BLOCK_N >= 32 tile).
Pixel offsets are int64 from the row index on: batch * H * W * C, and even one image's
H * W, may pass 2^31.
"""

import contextlib
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import INTERPRET

#: None: follow torch (torch.backends.cuda.matmul.allow_tf32 / fp32_precision == "tf32");
#: True / False: force TF32 on / off for fp32 inputs. The default torch setting is off, so
#: fp32 is computed exactly (input_precision="ieee").
ALLOW_TF32: Optional[bool] = None

#: The input dtypes the kernel computes.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ACT_CODES = {"none": 0, "relu": 1, "sigmoid": 2, "hardtanh": 3}


# --------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------

def _hopper_configs():
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 32, 4, 4),
        (128, 256, 32, 8, 4),
        (64, 256, 64, 8, 3),
        (128, 32, 64, 4, 4),  # narrow outputs (Cout = 3 / 32)
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


def _interpreter_configs():
    # The interpreter runs one program at a time in numpy: few, large programs are fastest.
    return [triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=1)]


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles much wider than Cout, those whose pipeline would not fit in shared memory,
    and for exact fp32 (FMA, no tensor cores: the accumulator tile lives in registers)
    tiles over 128 x 128, which spill and are the slowest to compile."""
    c_out = named_args["C_out"]
    itemsize = named_args["x_ptr"].dtype.itemsize
    fma = named_args.get("INPUT_PRECISION", kwargs.get("INPUT_PRECISION")) == "ieee"
    cap_n = max(32, triton.next_power_of_2(c_out))
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        smem = c.num_stages * (bm * bk + bk * bn) * itemsize
        if bn <= cap_n and smem <= 200 * 1024 and not (fma and bm * bn > 128 * 128):
            kept.append(c)
    if not kept:  # always leave the smallest tile
        kept = [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]
    return kept


def _configs():
    if INTERPRET:
        return _interpreter_configs()
    if os.environ.get("GLCIC_FAST_TRITON_AUTOTUNE", "1") == "0":
        # One sound config and no tuning: parity tests over many shapes then compile once
        # per specialisation instead of once per config and shape.
        return _hopper_configs()[:1]
    return _hopper_configs()


def _autotune_bench_options():
    """A shorter benchmark per config than Triton's default (25 ms warm-up, 100 ms of
    repetitions): a layer call takes 0.05 to 50 ms, so 5 + 25 ms still time at least one
    whole call after warm-up, and tuning the ~14 distinct layer shapes of one image size
    costs seconds, not minutes. Older Triton without ``do_bench``: its default."""
    import inspect

    if INTERPRET or "do_bench" not in inspect.signature(triton.autotune).parameters:
        return {}

    def do_bench(kernel_call, quantiles):
        return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)

    return {"do_bench": do_bench}


@triton.autotune(
    configs=_configs(),
    key=["M", "H", "W", "C_out", "C_IN", "KH", "KW", "STRIDE", "PAD", "DIL", "TRANSPOSED"],
    prune_configs_by=None if INTERPRET else {"early_config_prune": _prune_configs},
    **_autotune_bench_options(),
)
@triton.jit
def _conv_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, out_ptr,
    M, H, W, OH, OW, QH, QW, C_out,
    C_IN: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    STRIDE: tl.constexpr, PAD: tl.constexpr, DIL: tl.constexpr, TRANSPOSED: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_AFFINE: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """x: [N, H, W, C_IN] dense; w: [PHASES, KH*KW*C_IN, C_out] dense; out: [N, OH, OW, C_out].

    Conv: QH = OH, QW = OW, M = N*OH*OW, tap (kh, kw) reads x[oh*STRIDE - PAD + kh*DIL, ...].
    Transposed (KH = KW = taps per phase, STRIDE = s, PAD = p): phase (a, b) = program_id(1),
    row q of the phase is output row s*q + a and tap j reads input row q + (a + p)//s - j.
    """
    pid = tl.program_id(0)
    phase = tl.program_id(1)
    num_n = tl.cdiv(C_out, BLOCK_N)
    pid_n = pid % num_n          # n fastest: neighbouring programs share the A tile in L2
    pid_m = pid // num_n

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < C_out

    qw = (offs_m % QW).to(tl.int32)
    t = offs_m // QW
    qh = (t % QH).to(tl.int32)
    nb = t // QH                                      # int64 batch index
    x_row = nb * H * W * C_IN                         # int64 base of each pixel's image

    if TRANSPOSED:
        a = phase // STRIDE
        b = phase % STRIDE
        ih0 = qh + (a + PAD) // STRIDE
        iw0 = qw + (b + PAD) // STRIDE
        step = -1
        oh = qh * STRIDE + a
        ow = qw * STRIDE + b
        row_ok = m_mask & (oh < OH) & (ow < OW)
        out_row = (nb * OH + oh) * OW + ow            # int64
        w_base = w_ptr + phase * (KH * KW * C_IN) * C_out
    else:
        ih0 = qh * STRIDE - PAD
        iw0 = qw * STRIDE - PAD
        step = DIL
        row_ok = m_mask
        out_row = offs_m
        w_base = w_ptr

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if C_IN % BLOCK_K == 0:
        # Per tap: K = (tap, channel block); A rows are contiguous channel runs.
        CB: tl.constexpr = C_IN // BLOCK_K
        for it in range(0, KH * KW * CB):
            tap = it // CB
            c0 = (it - tap * CB) * BLOCK_K
            kh = tap // KW
            kw = tap - kh * KW
            ih = ih0 + kh * step
            iw = iw0 + kw * step
            ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            pix = x_row + (ih.to(tl.int64) * W + iw) * C_IN + c0
            a_tile = tl.load(x_ptr + pix[:, None] + offs_k[None, :], mask=ok[:, None], other=0.0)
            w_rows = it * BLOCK_K + offs_k
            b_tile = tl.load(w_base + w_rows[:, None] * C_out + offs_n[None, :],
                             mask=n_mask[None, :], other=0.0)
            if UPCAST:
                a_tile = a_tile.to(tl.float32)
                b_tile = b_tile.to(tl.float32)
            acc = tl.dot(a_tile, b_tile, acc, input_precision=INPUT_PRECISION, out_dtype=tl.float32)
    else:
        # Flat: K = KH*KW*C_IN walked in BLOCK_K slices, (kh, kw, c) recovered per element.
        K_TOTAL: tl.constexpr = KH * KW * C_IN
        for k0 in range(0, K_TOTAL, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < K_TOTAL
            c = kk % C_IN
            tap = kk // C_IN
            kh = tap // KW
            kw = tap - kh * KW
            ih = ih0[:, None] + (kh * step)[None, :]
            iw = iw0[:, None] + (kw * step)[None, :]
            ok = (row_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
            pix = x_row[:, None] + (ih.to(tl.int64) * W + iw) * C_IN + c[None, :]
            a_tile = tl.load(x_ptr + pix, mask=ok, other=0.0)
            b_tile = tl.load(w_base + kk[:, None] * C_out + offs_n[None, :],
                             mask=k_ok[:, None] & n_mask[None, :], other=0.0)
            if UPCAST:
                a_tile = a_tile.to(tl.float32)
                b_tile = b_tile.to(tl.float32)
            acc = tl.dot(a_tile, b_tile, acc, input_precision=INPUT_PRECISION, out_dtype=tl.float32)

    # Epilogue, all in fp32: + bias, activation, per-channel affine, one rounding to the output dtype.
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    if ACT == 1:
        acc = tl.maximum(acc, 0.0)
    elif ACT == 2:
        acc = 1.0 / (1.0 + tl.exp(-acc))
    elif ACT == 3:  # hardtanh: clamp to [-1, 1]
        acc = tl.minimum(tl.maximum(acc, -1.0), 1.0)
    if HAS_AFFINE:
        scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc * scale[None, :] + shift[None, :]
    out_ptrs = out_ptr + out_row[:, None] * C_out + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_mask[None, :])


# --------------------------------------------------------------------------------------
# Weight repacking
# --------------------------------------------------------------------------------------

def pack_conv_weight(weight):
    """(Cout, Cin, KH, KW) -> [1, KH*KW*Cin, Cout], row (kh*KW + kw)*Cin + c."""
    c_out, c_in, kh, kw = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(1, kh * kw * c_in, c_out).contiguous()


def pack_conv_transpose_weight(weight, stride, padding):
    """(Cin, Cout, K, K) -> [s*s, T*T*Cin, Cout], T = ceil(K/s): phase (a, b), tap (jh, jw)
    holds w[:, :, rh + s*jh, rw + s*jw] with r = (a + p) mod s (zero where that passes K)."""
    c_in, c_out, k, _ = weight.shape
    s = stride
    taps = -(-k // s)
    if taps * s != k:
        weight = torch.nn.functional.pad(weight, (0, taps * s - k, 0, taps * s - k))
    # kh = j*s + r  ->  [Cin, Cout, jh, rh, jw, rw] -> [rh, rw, jh, jw, Cin, Cout]
    w6 = weight.reshape(c_in, c_out, taps, s, taps, s).permute(3, 5, 2, 4, 0, 1)
    perm = [(a + padding) % s for a in range(s)]
    phases = [w6[rh, rw] for rh in perm for rw in perm]  # phase a*s + b
    return torch.stack(phases).reshape(s * s, taps * taps * c_in, c_out).contiguous()


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------

def _tf32_enabled():
    if ALLOW_TF32 is not None:
        return bool(ALLOW_TF32)
    matmul = torch.backends.cuda.matmul
    if getattr(matmul, "fp32_precision", None) == "tf32":
        return True
    return bool(matmul.allow_tf32)


def launch(x, packed_weight, bias, post_scale, post_shift, out, *, transposed, kernel_size, stride,
           padding, dilation, activation):
    """act(conv(x, w) + bias) [* post_scale + post_shift] into ``out``, which is returned.

    x: N x Cin x H x W in any memory format (read channels_last); packed_weight:
    ``pack_conv_weight(w)``, or ``pack_conv_transpose_weight(w, stride, padding)`` when
    ``transposed`` (then dilation must be 1); bias, post_scale, post_shift: Cout values or
    None; out: N x Cout x OH x OW, channels_last-contiguous, x's dtype and device. The
    kernel computes the output pixels out's OH x OW holds (the caller sizes it by the conv
    arithmetic) and reads no input pixel outside x."""
    n, c_in, h, w = x.shape
    c_out = packed_weight.shape[2]
    if out.shape[:2] != (n, c_out) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must be {x.dtype} ({n}, {c_out}, OH, OW) on {x.device}, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")
    if not out.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("out must be contiguous in channels_last memory format")
    if transposed and dilation != 1:
        raise ValueError("the Triton transposed convolution supports dilation 1 only")
    oh, ow = out.shape[2], out.shape[3]
    phases = stride * stride if transposed else 1
    taps = -(-kernel_size // stride) if transposed else kernel_size
    qh, qw = (-(-oh // stride), -(-ow // stride)) if transposed else (oh, ow)
    m = n * qh * qw
    if m == 0 or c_out == 0 or out.numel() == 0:
        return out
    x = x.contiguous(memory_format=torch.channels_last)
    bias, post_scale, post_shift = (t.contiguous() if t is not None else None
                                    for t in (bias, post_scale, post_shift))
    dummy = packed_weight  # never read when the matching flag is off
    fp32 = x.dtype == torch.float32
    precision = "ieee" if fp32 and not _tf32_enabled() else "tf32"
    upcast = INTERPRET and x.dtype == torch.bfloat16  # the interpreter's dot reads bf16 as integers

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(c_out, meta["BLOCK_N"]), phases)

    # wrap_triton makes the launch traceable inside a torch.library.triton_op (see
    # glcic_fast/ops/conv2d_bias_act.py). Not under the interpreter: there the op is an opaque
    # custom_op, and older torch (2.11; 2.14 returns such a kernel unwrapped) wraps an
    # autotuner over an InterpretedFunction too, whose launch then fails in torch's wrapper
    # (AttributeError: 'function' object has no attribute 'fn').
    wrap = None if INTERPRET else getattr(torch.library, "wrap_triton", None)
    kernel = wrap(_conv_gemm_kernel) if wrap is not None else _conv_gemm_kernel
    # Triton launches on the current CUDA device, whatever device the tensors are on.
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](
            x, packed_weight,
            bias if bias is not None else dummy,
            post_scale if post_scale is not None else dummy,
            post_shift if post_shift is not None else dummy,
            out,
            m, h, w, oh, ow, qh, qw, c_out,
            c_in, taps, taps, stride, padding, dilation, transposed,
            bias is not None, _ACT_CODES[activation], post_scale is not None,
            upcast, precision,
        )
    return out
