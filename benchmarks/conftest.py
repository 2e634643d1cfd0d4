"""Fixtures shared by the benchmarks (their plain helpers are in measure.py)."""

import pytest
import torch


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
