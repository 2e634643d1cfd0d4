"""Compile the project's Triton kernels ahead of time for Hopper (sm_90), with no GPU.

Run by tests/kernels/test_triton_compiles_for_hopper.py in a subprocess (Triton must be imported
here without TRITON_INTERPRET, which the test process sets), or by hand:

    TRITON_CACHE_DIR=$(mktemp -d) python tests/triton_aot.py [--shard I/N]

Nothing here restates a kernel's arguments. The real code paths launch the kernels and
Triton itself turns each launch into compile arguments:

1. Record. The kernel objects (the conv autotuner, the two masked-MSE JIT functions)
   get a ``run`` that records ``kernel[grid](*args, **kwargs)`` instead of launching.
   The completion network's eval forward then runs with ``backend="triton"`` on small
   CPU tensors (every layer; float32 exact and TF32, float16, bfloat16; both block
   orders, i.e. with and without the post-activation BatchNorm affine; see FORWARDS; and
   the output layer with mmagic's clamp to [-1, 1], "hardtanh", in every precision),
   once more on ``meta`` tensors at a size where M = N*OH*OW of the full- and
   half-resolution layers passes 2^31, and ``glcic_fast.ops.masked_mse`` runs for every
   dtype, mask broadcast, index width and reduction. The only thing bypassed is the
   dispatcher's "can the Triton backend run here" check (it refuses CPU tensors without
   the interpreter).
2. Specialise. For a conv launch, the autotuner's own ``prune_configs`` gives the
   configs it would benchmark on the GPU: the first is compiled for every launch, all of
   them for ``ALL_CONFIGS_LAYERS``. Each (launch, config) goes through
   ``JITFunction.warmup``, Triton's own launch path minus the launch, under a compile-only
   driver that names the target (sm_90) in place of a GPU. A ``jit_cache_hook`` first
   collects Triton's specialisation key (argument types, i32 / i64, 16-byte alignment
   and divisibility, constexpr values, options) without compiling, so identical
   specialisations are compiled once.
3. Compile. ``warmup`` again, for real: front end, TTIR, TTGIR, LLIR, PTX and ptxas to a
   cubin. The shared memory a kernel needs is checked against Hopper's limit (the check
   Triton would make when loading it on the GPU).

Output: JSON lines on stdout, one ``{"event": "case", ...}`` per compiled specialisation
(``ok``, ``error``, ``seconds``, ``shared``, and ``launches``: which layers / calls use it),
framed by a ``start`` and a ``done`` event; or a single ``skip`` event when Triton has no
NVIDIA backend or no usable ptxas. ``--shard I/N`` compiles every N-th specialisation
starting at I (all shards record everything, so they agree on the numbering).
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import traceback

# Triton reads TRITON_INTERPRET when it is imported: this script needs the compiler.
os.environ.pop("TRITON_INTERPRET", None)
assert "triton" not in sys.modules, "import this module in a fresh process"
# By hand from a checkout: the repository root, after the installed packages.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

#: Hopper (H100 / H200), as the GPU machine reports it.
TARGET = GPUTarget("cuda", 90, 32)
#: cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90 (227 KiB): the limit Triton checks
#: when it loads a kernel (CompiledKernel._init_handles).
HOPPER_MAX_SHARED = 232448

#: dtype and tk.ALLOW_TF32 of each precision the network runs in.
PRECISIONS = {
    "fp32-ieee": (torch.float32, False),
    "fp32-tf32": (torch.float32, True),
    "fp16": (torch.float16, None),
    "bf16": (torch.bfloat16, None),
}
#: The recorded network forwards: (bn_after_relu, precision, every config of
#: ALL_CONFIGS_LAYERS?). bn_after_relu=True (GLCIC-PyTorch's conv -> ReLU -> BN) runs layers
#: 1-16 with the post-activation affine, False (the authors' order, BN folded) without.
#: Every layer is compiled with the autotuner's first config in each; to keep the test
#: within its time budget, the authors' order skips exact fp32 (the slowest to compile:
#: FMA, no tensor cores), which GLCIC-PyTorch's order covers, and all configs are
#: compiled for one order only. ``--full`` compiles every order x precision and all
#: configs of ALL_CONFIGS_LAYERS in each.
FORWARDS = (
    (True, "fp32-ieee", True),
    (True, "fp32-tf32", False),
    (True, "fp16", False),
    (True, "bf16", True),
    (False, "fp32-tf32", False),
    (False, "fp16", False),
    (False, "bf16", False),
)
FULL_FORWARDS = tuple((bn, p, True) for bn in (True, False) for p in PRECISIONS)
#: Layers whose every autotune config is compiled (the others: the first pruned config).
#: conv9 stands for the dilated 3x3 256 -> 256 convs that dominate the run time.
ALL_CONFIGS_LAYERS = ("conv9",)
#: Small input of the recorded forwards: every layer's H, W and M divisible by 16, like
#: the usual image sizes (Triton specialises integer arguments on that).
SMALL_SIDE = 64
#: Input side of the forward on meta tensors: M = N * OH * OW (per phase for the deconvs)
#: passes 2^31 in the layers at full and half resolution (flat and per-tap K loops,
#: strides 1 and 2, the transposed conv), which then take M as an i64.
LARGE_SIDE = 4 * (math.isqrt(2 ** 31) // 2 + 4)
#: Side of the masked-MSE calls on meta tensors: 3 * side^2 elements pass 2^31
#: (INDEX_64, numel an i64); a multiple of 256, so the sizes and the count of partial sums
#: are multiples of 16 (the small calls' count is not: both specialisations of it).
LARGE_MSE_SIDE = 256 * (math.isqrt(2 ** 31 // 3) // 256 + 1)


def _emit(**record):
    print(json.dumps(record, default=str), flush=True)


class CompileOnlyDriver:
    """What ``JITFunction.run(..., warmup=True)`` asks of the active driver before it
    compiles: a device, a stream and the target. Nothing is ever loaded or launched."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def _skip_reason():
    try:
        from triton.backends import backends
    except Exception as exc:  # pragma: no cover - very old Triton
        return f"triton.backends did not import: {exc}"
    if "nvidia" not in backends:
        return f"this Triton has no NVIDIA backend (backends: {sorted(backends)})"
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(TARGET.arch).path  # found and run (ptxas --version), or raises
    except Exception as exc:
        return f"no usable ptxas for sm_{TARGET.arch}: {type(exc).__name__}: {exc}"
    if not path or not os.access(path, os.X_OK):
        return f"ptxas not found or not executable: {path!r}"
    return None


# ----------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Launch:
    kernel: object  # the module-level kernel object: an Autotuner or a JITFunction
    args: tuple
    kwargs: dict
    grid: object
    label: str = ""
    all_configs: bool = False
    spec: object = None  # the network layer (architecture.LayerSpec) that launched it


class Recorder:
    """Replaces ``run`` on the given kernel objects (``kernel[grid](...)`` calls
    ``kernel.run(*args, grid=grid, warmup=False, **kwargs)``) with a recording."""

    def __init__(self, kernels):
        self.kernels = kernels
        self.launches = []

    def __enter__(self):
        for k in self.kernels:
            k.run = self._recorder(k)
        return self

    def __exit__(self, *exc):
        for k in self.kernels:
            del k.run  # back to the class's method

    def _recorder(self, kernel):
        def run(*args, grid, warmup, **kwargs):
            self.launches.append(Launch(kernel, args, kwargs, grid))
            return None

        return run

    def take(self):
        out, self.launches = self.launches, []
        return out


@contextlib.contextmanager
def _triton_backend_checks_skipped(dispatch, ops):
    """The dispatcher's ``why_not`` of the Triton backend refuses CPU and meta tensors
    unless the interpreter is on. Here nothing runs, so the check is skipped."""
    saved = {}
    for op in ops:
        impl = dispatch._REGISTRY[op]["triton"]
        saved[op] = impl
        dispatch.register(op, "triton", impl.run, None, automatic=impl.automatic)
    try:
        yield
    finally:
        for op, impl in saved.items():
            dispatch.register(op, "triton", impl.run, impl.why_not, automatic=impl.automatic)


def _wrap_triton_disabled():
    """On meta tensors the Triton custom ops run their fake kernel, the launcher itself;
    with torch's wrap_triton disabled (as the op's real-tensor kernel does) the launch
    then reaches the kernel object instead of being traced."""
    try:
        from torch._library.triton import set_wrap_triton_enabled
    except ImportError:  # older torch: no wrap_triton, the launch is direct anyway
        return contextlib.nullcontext()
    return set_wrap_triton_enabled(False)


def _load_errors():
    from glcic_fast.ops import BACKEND_LOAD_ERRORS

    return BACKEND_LOAD_ERRORS


class _CheckoutKernelsFinder:
    """setup.py installs kernels/ as glcic_fast.kernels. When glcic_fast is imported from
    a source checkout (PYTHONPATH, pytest's root) while another checkout is installed
    in editable mode, that install would map glcic_fast.kernels to the other checkout's
    kernels/: this finder, first on sys.meta_path, maps it to the kernels/ beside the
    glcic_fast imported, so the kernels compiled are the ones under test."""

    def __init__(self, directory):
        self.directory = directory

    def find_spec(self, fullname, path=None, target=None):
        import importlib.machinery
        import importlib.util

        if fullname == "glcic_fast.kernels":
            return importlib.util.spec_from_file_location(
                fullname, os.path.join(self.directory, "__init__.py"), submodule_search_locations=[self.directory])
        if fullname.startswith("glcic_fast.kernels.") and fullname.count(".") == 2:
            return importlib.machinery.PathFinder.find_spec(fullname, [self.directory])
        return None


def _import_kernels():
    import importlib.util

    package = importlib.util.find_spec("glcic_fast")  # located, not imported
    if package is not None and package.origin:
        checkout_kernels = os.path.join(os.path.dirname(os.path.dirname(package.origin)), "kernels")
        if os.path.isfile(os.path.join(checkout_kernels, "__init__.py")):
            sys.meta_path.insert(0, _CheckoutKernelsFinder(checkout_kernels))
    import glcic_fast.ops  # noqa: F401  (imports the kernels and registers the backends it can)
    from glcic_fast.kernels import conv2d_bias_act as tk, masked_mse as mk

    return tk, mk


def _needs_i64(launch):
    return any(isinstance(a, int) and not isinstance(a, bool) and not -2 ** 31 <= a < 2 ** 31 for a in launch.args)


def record_all(tk, mk, forwards=FORWARDS):
    """Every launch the network forwards and the masked-MSE loss make, labelled."""
    from glcic_fast import ops
    from glcic_fast.nn.completion_net import CompletionNet
    from glcic_fast.ops import dispatch

    for module in (tk, mk):
        if module.INTERPRET:
            raise RuntimeError(f"{module.__name__} was imported in interpreter mode")

    launches = []
    conv_kernel = tk._conv_gemm_kernel
    kernels = (conv_kernel, mk._masked_mse_partials_kernel, mk._masked_mse_finish_kernel)
    tf32_saved = tk.ALLOW_TF32
    with Recorder(kernels) as rec, torch.no_grad(), \
            _triton_backend_checks_skipped(dispatch, ("conv2d_bias_act", "conv_transpose2d_bias_act", "masked_mse")):
        try:
            # -- the completion network, every layer -----------------------------------
            def forward(net, x, tag, all_configs, keep=lambda launch: True):
                net(x)
                got = rec.take()
                layers = net.fused_layers(x.dtype, x.device)
                if len(got) != len(layers) or any(g.kernel is not conv_kernel for g in got):
                    raise RuntimeError(f"{tag}: expected one conv launch per layer ({len(layers)}), "
                                       f"recorded {len(got)}")
                for launch, layer in zip(got, layers):
                    spec = layer.spec
                    kind = "deconv" if spec.transposed else "conv"
                    affine = "+post-affine" if layer.post_scale is not None else ""
                    launch.label = (f"{spec.name} ({kind} {spec.in_channels}->{spec.out_channels} "
                                    f"k{spec.kernel_size} s{spec.stride} d{spec.dilation} {layer.activation}"
                                    f"{affine}) {tag} in {tuple(x.shape)}")
                    launch.all_configs = all_configs and spec.name in ALL_CONFIGS_LAYERS
                    launch.spec = spec
                kept = [g for g in got if keep(g)]
                if not kept:
                    raise RuntimeError(f"{tag}: no launch kept")
                launches.extend(kept)
                return kept

            nets = {bn: CompletionNet(bn_after_relu=bn, backend="triton").eval() for bn in (True, False)}
            for bn_after_relu, precision, all_configs in forwards:
                dtype, tk.ALLOW_TF32 = PRECISIONS[precision]
                x = torch.zeros(1, 4, SMALL_SIDE, SMALL_SIDE, dtype=dtype)
                forward(nets[bn_after_relu], x, precision, all_configs)
            # The output layer with mmagic's clamp to [-1, 1] (its nets run the authors' block
            # order), in every precision; its other layers repeat the forwards above.
            clamped = CompletionNet(bn_after_relu=False, output_activation="hardtanh", backend="triton").eval()
            for precision in PRECISIONS:
                dtype, tk.ALLOW_TF32 = PRECISIONS[precision]
                x = torch.zeros(1, 4, SMALL_SIDE, SMALL_SIDE, dtype=dtype)
                forward(clamped, x, f"{precision} hardtanh output", False, keep=lambda launch: not launch.spec.has_bn)
            # M past 2^31: meta tensors, bfloat16, GLCIC-PyTorch's block order; only the
            # launches with an i64 argument (the others repeat the small forward's).
            tk.ALLOW_TF32 = None
            x = torch.empty(1, 4, LARGE_SIDE, LARGE_SIDE, dtype=torch.bfloat16, device="meta")
            with _wrap_triton_disabled():
                kept = forward(nets[True], x, "bf16 M>2^31", False, keep=_needs_i64)
            kinds = {launch.spec.transposed for launch in kept}
            if kinds != {True, False}:
                raise RuntimeError(f"the M>2^31 forward should give i64 launches of both conv kinds, got {kinds}")

            # -- masked MSE: dtype x mask broadcast x index width x reduction ----------
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                tag = str(dtype).split(".")[-1]
                for n, h, w, device in ((1, SMALL_SIDE, SMALL_SIDE, "cpu"),
                                        (1, LARGE_MSE_SIDE, LARGE_MSE_SIDE, "meta")):
                    size = f"{n}x3x{h}x{w}"
                    cases = (("mask NxCxHxW", (n, 3, h, w), torch.contiguous_format),
                             ("mask Nx1xHxW, NCHW pred", (n, 1, h, w), torch.contiguous_format),
                             ("mask Nx1xHxW, channels_last pred", (n, 1, h, w), torch.channels_last))
                    for what, mask_shape, fmt in cases:
                        for reduction in ("mean", "sum"):
                            pred = torch.zeros(n, 3, h, w, dtype=dtype, device=device).contiguous(memory_format=fmt)
                            mask = torch.zeros(mask_shape, dtype=dtype, device=device)
                            ops.masked_mse(pred, pred, mask, reduction, backend="triton")
                            got = rec.take()
                            if len(got) != 2:
                                raise RuntimeError(f"masked_mse: expected 2 launches, recorded {len(got)}")
                            if device == "meta" and not _needs_i64(got[0]):
                                raise RuntimeError(f"masked_mse {size}: expected an i64 element count")
                            for g in got:
                                g.label = f"masked_mse {tag} {what} {size} {device} {reduction}"
                            launches.extend(got)
        finally:
            tk.ALLOW_TF32 = tf32_saved
    return launches


# ----------------------------------------------------------------------------------------
# Specialisation and compilation
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Unit:
    """One specialisation to compile: the JIT function, a launch's arguments and the
    config's keyword arguments, and every launch that needs it."""
    jit: object
    args: tuple
    kwargs: dict
    grid: object
    key: str
    summary: str
    labels: list


def _jit_of(kernel):
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn
    return fn


def _configs_of(launch):
    """The configs the autotuner would benchmark for this launch (its own pruning), or a
    single ``None`` for a plain JIT function."""
    kernel = launch.kernel
    if not isinstance(kernel, triton.runtime.Autotuner):
        return [None]
    kernel.nargs = dict(zip(kernel.arg_names, launch.args))
    try:
        configs = kernel.prune_configs(dict(launch.kwargs))
    finally:
        kernel.nargs = None
    return list(configs) if launch.all_configs else list(configs[:1])


def _summary(jit, compile_info):
    """The kernel's signature as Triton specialised it: ``name:type`` (``%16`` where
    Triton assumes divisibility by 16) or ``name=constexpr value``, and the options."""
    sig = compile_info["signature"]
    consts = compile_info["constants"]
    attrs = (compile_info.get("configs") or [{}])[0]
    names = [p.name for p in jit.params]
    parts = []
    for i, name in enumerate(names):
        if sig.get(name) == "constexpr":
            parts.append(f"{name}={consts.get((i,), consts.get(name))}")
        else:
            divisible = any(a[0] == "tt.divisibility" for a in attrs.get((i,), []))
            parts.append(f"{name}:{sig.get(name)}{'%16' if divisible else ''}")
    opts = f"num_warps={compile_info['num_warps']} num_stages={compile_info['num_stages']}"
    return f"{jit.__name__}({', '.join(parts)}) {opts}"


def specialise(launches):
    """Units in first-seen order, one per Triton specialisation key."""
    seen = {}
    hook_calls = []

    def hook(**kwargs):
        hook_calls.append(kwargs)
        return True  # do not compile (yet)

    knobs = triton.knobs.runtime
    saved = knobs.jit_cache_hook
    knobs.jit_cache_hook = hook
    try:
        for launch in launches:
            jit = _jit_of(launch.kernel)
            for config in _configs_of(launch):
                kwargs = dict(launch.kwargs)
                if config is not None:
                    kwargs.update(config.all_kwargs())
                hook_calls.clear()
                jit.warmup(*launch.args, grid=launch.grid, **kwargs)
                if len(hook_calls) != 1:
                    raise RuntimeError(f"{launch.label}: Triton's cache hook ran {len(hook_calls)} times")
                call = hook_calls[0]
                key = f"{jit.__name__}:{call['key']!r}"
                label = launch.label
                if config is not None:
                    label += " config " + ", ".join(f"{k}={v}" for k, v in config.kwargs.items()) + \
                             f", num_warps={config.num_warps}, num_stages={config.num_stages}"
                if key in seen:
                    seen[key].labels.append(label)
                else:
                    seen[key] = Unit(jit, launch.args, kwargs, launch.grid, key,
                                     _summary(jit, call["compile"]), [label])
    finally:
        knobs.jit_cache_hook = saved
    return list(seen.values())


def compile_unit(unit):
    t0 = time.perf_counter()
    error, shared = None, None
    try:
        kernel = unit.jit.warmup(*unit.args, grid=unit.grid, **unit.kwargs)
        if hasattr(kernel, "result"):  # an async compile future (Triton >= 3.7 under async mode)
            kernel = kernel.result()
        if kernel is None:
            raise RuntimeError("warmup returned no kernel (a jit_cache_hook is still installed?)")
        if "cubin" not in kernel.asm:
            raise RuntimeError(f"no cubin produced (stages: {sorted(kernel.asm)})")
        shared = kernel.metadata.shared
        if shared > HOPPER_MAX_SHARED:
            raise RuntimeError(f"OutOfResources: shared memory, Required: {shared}, "
                               f"Hardware limit: {HOPPER_MAX_SHARED} (sm_90)")
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        if len(text) > 6000:
            text = text[:3000] + "\n[...]\n" + text[-3000:]
        error = text
    return {"ok": error is None, "error": error, "seconds": round(time.perf_counter() - t0, 2), "shared": shared}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shard", default="0/1", help="I/N: compile the specialisations i with i %% N == I")
    parser.add_argument("--list", action="store_true", help="list the specialisations, compile nothing")
    parser.add_argument("--full", action="store_true",
                        help="every block order x precision, all configs of ALL_CONFIGS_LAYERS in each")
    opts = parser.parse_args(argv)
    shard, shards = (int(v) for v in opts.shard.split("/"))

    reason = _skip_reason()
    if reason is not None:
        _emit(event="skip", reason=reason)
        return 0

    from triton.runtime.driver import driver

    driver.set_active(CompileOnlyDriver(TARGET))
    t0 = time.perf_counter()
    tk, mk = _import_kernels()
    launches = record_all(tk, mk, FULL_FORWARDS if opts.full else FORWARDS)
    units = specialise(launches)
    mine = [(i, u) for i, u in enumerate(units) if i % shards == shard]
    _emit(event="start", triton=triton.__version__, torch=torch.__version__, target=repr(TARGET),
          modules=[tk.__file__, mk.__file__], extension_loaded="cpp" not in _load_errors(),
          cache_dir=os.environ.get("TRITON_CACHE_DIR"), launches=len(launches), units=len(units),
          shard=f"{shard}/{shards}", mine=len(mine), record_seconds=round(time.perf_counter() - t0, 2))
    failures = 0
    for i, unit in mine:
        result = {"ok": None, "error": None, "seconds": 0.0, "shared": None} if opts.list else compile_unit(unit)
        failures += result["ok"] is False
        _emit(event="case", index=i, kernel=unit.jit.__name__, summary=unit.summary,
              launches=unit.labels, **result)
    _emit(event="done", shard=f"{shard}/{shards}", compiled=len(mine), failures=failures,
          seconds=round(time.perf_counter() - t0, 2))
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        _emit(event="crash", error=traceback.format_exc())
        sys.exit(2)
