"""The engines deployers run, side by side with glcic_fast: the same trained weights (the
bundled demo checkpoint) and the same inputs, in one run, at each of SHAPES (batch x size:
1 and 2 images of 512 x 512 and of 1024 x 1024; GLCIC_FAST_BENCH_ENGINE_SHAPES="1x512,2x1024"
picks others). The images are examples/astronaut.png with its mask, resized to the size,
and for the second image of a batch the same mirrored left to right.

On the CPU, float32, every engine on the same number of threads (torch's):
  - eager-reference: the reference PyTorch graph (conv, BN, ReLU), the oracle of every
    max difference below;
  - torch.compile: of FoldedNet (the exported graph: BN folded), default mode;
  - glcic_fast: CompletionNet, the dispatcher's choice per layer;
  - onnxruntime-cpu and openvino-cpu: the file glcic_fast.export_onnx writes, fixed to the
    shape (each engine's best case: its graph optimised for that one shape), in ONNX
    Runtime's CPU provider and OpenVINO's CPU plugin (f32 inference precision).
On a GPU (skipped without one, with the reason): the reference in eager fp32 (cuDNN),
torch.compile(mode="max-autotune") of FoldedNet in fp16, glcic_fast in fp16, and the
fp16 file in ONNX Runtime's TensorRT and CUDA providers (those need onnxruntime-gpu in
place of onnxruntime), input and output bound on the GPU.

The engines run interleaved, round by round (round 0: each engine once, then round 1,
...), so that a change in the machine's load (a shared CPU) falls on all of them alike;
``report.py`` takes each engine's median over the rounds. Each engine's first call (its
warm-up, with its compile or engine build where it has one) is recorded, not timed, as
first_call_s, and is its max-difference check. Under
--benchmark-disable only round 0 runs, at 2 x 512 x 512: it checks every engine's output. Each result records the network's multiply-adds as direct convolution
(direct_macs) and, for glcic_fast, those it performs (macs_performed: fewer where the
Winograd kernel runs); bench_cpu_peak.py measures the CPU's FMA peak for report.py.

    GLCIC_FAST_BENCH_ENGINE_ROUNDS=5 pytest benchmarks/bench_engines.py --benchmark-only \\
        --benchmark-json engines.json && python benchmarks/report.py engines.json
"""

import copy
import functools
import os
import time
import warnings

import cv2
import numpy as np
import pytest
import torch

import glcic_fast
from glcic_fast.imageio import read_rgb
from glcic_fast.inference.bench import DEMO_WEIGHTS, EXAMPLE_IMAGE, EXAMPLE_MASK
from glcic_fast.inference.export import INPUT_NAME, OUTPUT_NAME, FoldedNet, export_onnx
from glcic_fast.inference.masks import hole_mask
from glcic_fast.nn.architecture import completion_macs
from glcic_fast.nn.reference import ReferenceCompletionNet

from measure import macs_performed, provenance, synchronized

ort = pytest.importorskip("onnxruntime", reason="the engines' benchmark needs onnxruntime (the test extra)")
ov = pytest.importorskip("openvino", reason="the engines' benchmark needs openvino (the test extra)")

CUDA = torch.cuda.is_available()
ROUNDS = int(os.environ.get("GLCIC_FAST_BENCH_ENGINE_ROUNDS", "5"))


def _shapes(text):
    """"1x512,2x1024" -> [(1, 512), (2, 1024)]."""
    return [tuple(int(v) for v in part.split("x")) for part in text.split(",") if part.strip()]


#: (batch, size) of the timed runs, and of the output checks under --benchmark-disable.
SHAPES = _shapes(os.environ.get("GLCIC_FAST_BENCH_ENGINE_SHAPES", "1x512,2x512,1x1024,2x1024"))
CHECK_SHAPES = [(2, 512)]
#: engine -> (where it runs, dtype)
ENGINES = {
    "eager-reference-cpu": ("cpu", torch.float32),
    "torch.compile-cpu": ("cpu", torch.float32),
    "glcic_fast-cpu": ("cpu", torch.float32),
    "onnxruntime-cpu": ("cpu", torch.float32),
    "openvino-cpu": ("cpu", torch.float32),
    "eager-reference-cuda": ("cuda", torch.float32),
    "torch.compile-max-autotune-cuda": ("cuda", torch.float16),
    "glcic_fast-cuda": ("cuda", torch.float16),
    "onnxruntime-tensorrt": ("cuda", torch.float16),
    "onnxruntime-cuda": ("cuda", torch.float16),
}
#: What an engine may differ from the fp32 CPU reference by (as bench_net.py): fp32
#: summation order, or half precision, which a GPU's fp32 has too (cuDNN convolutions run
#: in TF32 by default: fp16's 10-bit mantissa).
TOLERANCE = {"cpu": {torch.float32: 1e-4, torch.float16: 5e-2}, "cuda": {torch.float32: 5e-2, torch.float16: 5e-2}}
_ORT_GPU_PROVIDERS = {"onnxruntime-tensorrt": "TensorrtExecutionProvider", "onnxruntime-cuda": "CUDAExecutionProvider"}


class _Setup:
    """The net, and per shape the input, the reference output and the exported files, made once."""

    def __init__(self, folder):
        self.net = glcic_fast.load(DEMO_WEIGHTS).eval()
        self.image = read_rgb(EXAMPLE_IMAGE)
        self.hole = (hole_mask(*self.image.shape[-2:], EXAMPLE_MASK, image=EXAMPLE_IMAGE) > 0.5).float()
        self.folder = folder
        self.inputs, self.files, self.engines = {}, {}, {}

    def input(self, shape):
        """(x, the fp32 CPU reference's output) for (batch, size)."""
        if shape not in self.inputs:
            batch, size = shape
            resize = lambda t, interpolation: torch.from_numpy(cv2.resize(  # noqa: E731
                t.permute(1, 2, 0).numpy(), (size, size), interpolation=interpolation)).reshape(size, size, -1)
            image = resize(self.image, cv2.INTER_AREA).permute(2, 0, 1)
            hole = resize(self.hole, cv2.INTER_NEAREST).permute(2, 0, 1)
            images = torch.stack([image.flip(-1) if i % 2 else image for i in range(batch)])
            holes = torch.stack([hole.flip(-1) if i % 2 else hole for i in range(batch)])
            x = self.net.prepare_input(images, holes)
            with torch.inference_mode():
                self.inputs[shape] = x, self._reference("cpu")(x).numpy()
        return self.inputs[shape]

    def _reference(self, device):
        reference = ReferenceCompletionNet(self.net.bn_after_relu, self.net.output_activation).to(device)
        reference.load_state_dict(self.net.state_dict())
        return reference.eval()

    def onnx_file(self, dtype, shape):
        """The net exported in ``dtype``, fixed to (batch, size)."""
        if (dtype, shape) not in self.files:
            batch, size = shape
            path = str(self.folder / f"glcic-{str(dtype)[6:]}-b{batch}-{size}.onnx")
            export_onnx(self.net, path, dtype=dtype, dynamic=False, shape=(batch, size, size))
            self.files[dtype, shape] = path
        return self.files[dtype, shape]

    def engine(self, name, shape):
        """(run: one inference on the shape's input, info), built on first use. The first
        call (the warm-up, with the compile or engine build where there is one) is timed
        as info["first_call_s"], and its output gives info["max_abs_diff_to_fp32_reference"]."""
        if (name, shape) not in self.engines:
            x, want = self.input(shape)
            run, to_array, first_call = self._build(name, shape)
            start = time.perf_counter()
            out = synchronized(first_call)()
            info = {"first_call_s": time.perf_counter() - start,
                    "max_abs_diff_to_fp32_reference": float(np.abs(to_array(out) - want).max()),
                    "threads": torch.get_num_threads() if ENGINES[name][0] == "cpu" else None,
                    "direct_macs": completion_macs(shape[1], shape[1]) * shape[0]}
            if name.startswith("glcic_fast"):
                info["macs_performed"] = macs_performed(self.net, x.to(ENGINES[name][1]))
            self.engines[name, shape] = run, info
        return self.engines[name, shape]

    def _build(self, name, shape):
        """(run, to_array: run's output as numpy float32, first_call: run's first call)."""
        device, dtype = ENGINES[name]
        threads = torch.get_num_threads()
        x = self.input(shape)[0].to(device, dtype)
        to_array = lambda y: y.float().cpu().numpy()  # noqa: E731 (torch engines' outputs)
        if name.startswith("eager-reference"):
            model = self._reference(device).to(dtype)
            run = lambda: model(x)  # noqa: E731
        elif name.startswith("torch.compile"):
            mode = "max-autotune" if device == "cuda" else "default"
            compiled = torch.compile(FoldedNet(self.net, dtype, device).eval(), mode=mode, dynamic=False)
            run = lambda: compiled(x)  # noqa: E731
            return run, to_array, functools.partial(_without_compile_caches, run)  # the first call compiles
        elif name.startswith("glcic_fast"):
            net = self.net if device == "cpu" else copy.deepcopy(self.net).to(device, dtype)
            run = lambda: net(x)  # noqa: E731
        elif name == "onnxruntime-cpu":
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            session = ort.InferenceSession(self.onnx_file(dtype, shape), options, providers=["CPUExecutionProvider"])
            feed = {INPUT_NAME: x.numpy()}
            run, to_array = (lambda: session.run(None, feed)[0]), np.asarray
        elif name == "openvino-cpu":
            compiled = ov.Core().compile_model(self.onnx_file(dtype, shape), "CPU", {
                "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads})
            request, feed = compiled.create_infer_request(), x.numpy()
            run, to_array = (lambda: request.infer({0: feed})[0]), np.array
        else:
            run = self._onnxruntime_gpu(_ORT_GPU_PROVIDERS[name], x, shape)  # TensorRT builds on the first run
        return run, to_array, run

    def _onnxruntime_gpu(self, provider, x, shape):
        options = {"trt_fp16_enable": True} if provider == "TensorrtExecutionProvider" else {}
        session = ort.InferenceSession(self.onnx_file(x.dtype, shape), providers=[(provider, options)])
        if session.get_providers()[0] != provider:
            raise RuntimeError(f"ONNX Runtime did not take {provider}: {session.get_providers()}")
        out = torch.empty(x.shape[0], 3, *x.shape[2:], dtype=x.dtype, device=x.device)
        binding = session.io_binding()
        binding.bind_input(INPUT_NAME, "cuda", x.device.index or 0, np.float16, tuple(x.shape), x.data_ptr())
        binding.bind_output(OUTPUT_NAME, "cuda", x.device.index or 0, np.float16, tuple(out.shape), out.data_ptr())

        def run():
            session.run_with_iobinding(binding)
            return out

        return run


def _without_compile_caches(run):
    """A torch.compile'd call with Inductor's caches off: the first call then compiles as
    on a fresh machine, not from an earlier run's cache."""
    with torch._inductor.config.patch(force_disable_caches=True), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "dynamo_pgo force disabled", UserWarning)  # as asked here
        return run()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return _Setup(tmp_path_factory.mktemp("engines"))


def _skip_reason(engine):
    device, _ = ENGINES[engine]
    if device == "cuda" and not CUDA:
        return "needs a CUDA GPU (none here)"
    if engine in _ORT_GPU_PROVIDERS and _ORT_GPU_PROVIDERS[engine] not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} here offers {', '.join(ort.get_available_providers())}: "
                f"{_ORT_GPU_PROVIDERS[engine]} needs onnxruntime-gpu (and, for TensorRT, TensorRT's libraries)")
    return None


def pytest_generate_tests(metafunc):
    """Rounds as the outer loop (every shape and engine once per round), then shapes; one
    round at CHECK_SHAPES when timing is disabled (--benchmark-disable): it checks every
    engine's output."""
    disabled = metafunc.config.getoption("benchmark_disable")
    rounds = 1 if disabled else ROUNDS
    shapes = CHECK_SHAPES if disabled else SHAPES
    metafunc.parametrize("round_", range(rounds), ids=[f"round{r}" for r in range(rounds)])
    metafunc.parametrize("shape", shapes, ids=[f"b{b}-{s}" for b, s in shapes])
    metafunc.parametrize("engine", ENGINES)


def test_engine(benchmark, setup, engine, shape, round_):
    reason = _skip_reason(engine)
    if reason:
        pytest.skip(reason)
    device, dtype = ENGINES[engine]
    batch, size = shape
    benchmark.group = f"engines-b{batch}-{size}"
    with torch.inference_mode():
        run, info = setup.engine(engine, shape)
        benchmark.pedantic(synchronized(run), rounds=1, iterations=1)
    max_diff = info["max_abs_diff_to_fp32_reference"]
    assert max_diff <= TOLERANCE[device][dtype], f"{engine} differs from the fp32 reference by {max_diff}"
    extra = provenance()
    extra.update(info)
    extra.update({"engine": engine, "runs_on": device, "dtype": str(dtype)[6:], "batch": batch,
                  "size": size, "round": round_, "weights": setup.net.weights_source,
                  "onnxruntime": ort.__version__, "openvino": ov.get_version()})
    benchmark.extra_info.update(extra)
