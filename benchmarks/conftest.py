"""Shared by the benchmarks: the device, provenance for every result, honest CUDA timing."""

import platform

import pytest
import torch


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def provenance() -> dict:
    info = {"device": device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def synchronized(fn):
    """Device work is asynchronous: a timed call must end when the GPU is done."""
    if not torch.cuda.is_available():
        return fn

    def run(*args):
        out = fn(*args)
        torch.cuda.synchronize()
        return out

    return run


@pytest.fixture(scope="session")
def bf16_gemm_tflops():
    """The measured bf16 dense GEMM rate of this GPU (8192^3 through cuBLAS): the ceiling
    that 'fraction of peak' is quoted against. None without a GPU."""
    if not torch.cuda.is_available():
        return None
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n ** 3 / sorted(times)[len(times) // 2] / 1e12
