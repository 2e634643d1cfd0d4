"""This CPU's fp32 FMA peak: the ceiling that report.py quotes the CPU engines against
("of FMA peak").

A tiny C++ kernel, compiled at run time (torch.utils.cpp_extension.load_inline), runs
independent chains of fused multiply-adds on vector registers: 16 chains of
_mm512_fmadd_ps where the CPU has AVX-512F, else 12 chains of _mm256_fmadd_ps (AVX2 and
FMA; 16 ymm registers hold the 12 chains and the two operands), chosen at run time with
__builtin_cpu_supports. Enough chains cover the FMA latency times the number of FMA pipes,
so the loop runs at the pipes' throughput. Each FMA is 2 FLOP per lane (16 fp32 lanes in
a zmm register, 8 in a ymm register).

The kernel runs on torch's thread count (one std::thread each, all at once) and on one
thread; each round's wall time is measured, and the best round is the peak (a shared CPU
only ever slows a round down). extra_info: cpu_fma_peak_gflops (torch's thread count),
threads, isa ("avx512" or "avx2"), cpu_fma_peak_gflops_1thread. Under --benchmark-disable
one short run of each checks the kernel.

    pytest benchmarks/bench_cpu_peak.py --benchmark-only --benchmark-json peak.json
"""

import math
import platform
import shutil
import time

import pytest
import torch

from measure import provenance

#: Wall time of one timed run: long against thread start-up, short enough for CI.
RUN_SECONDS = 0.25
ROUNDS = 5

_SOURCE = r"""
#include <immintrin.h>
#include <cmath>
#include <string>
#include <thread>
#include <vector>

namespace {

// acc = acc * a + b converges (|a| < 1) instead of overflowing or going subnormal, so
// every FMA runs at full speed on normal numbers whatever the iteration count.
__attribute__((target("avx512f"))) float chains_avx512(int64_t iterations) {
  constexpr int kChains = 16;
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(1.0f + c);
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-6f);
  for (int64_t i = 0; i < iterations; ++i) {
#pragma GCC unroll 16
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_fmadd_ps(acc[c], a, b);
  }
  float sum = 0.0f;
  for (int c = 0; c < kChains; ++c) sum += _mm512_reduce_add_ps(acc[c]);
  return sum;
}

__attribute__((target("avx2,fma"))) float chains_avx2(int64_t iterations) {
  constexpr int kChains = 12;
  __m256 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm256_set1_ps(1.0f + c);
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-6f);
  for (int64_t i = 0; i < iterations; ++i) {
#pragma GCC unroll 12
    for (int c = 0; c < kChains; ++c) acc[c] = _mm256_fmadd_ps(acc[c], a, b);
  }
  alignas(32) float lanes[8];
  float sum = 0.0f;
  for (int c = 0; c < kChains; ++c) {
    _mm256_store_ps(lanes, acc[c]);
    for (float lane : lanes) sum += lane;
  }
  return sum;
}

bool has_avx512() { return __builtin_cpu_supports("avx512f"); }
bool has_avx2_fma() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

}  // namespace

std::string fma_isa() {
  return has_avx512() ? "avx512" : has_avx2_fma() ? "avx2" : "";
}

// Runs `iterations` of the chains on each of `threads` threads at once; returns the FLOP
// done (2 per lane per FMA).
double fma_flops(int64_t threads, int64_t iterations) {
  const bool avx512 = has_avx512();
  TORCH_CHECK(avx512 || has_avx2_fma(), "this CPU has neither AVX-512F nor AVX2 with FMA");
  TORCH_CHECK(threads >= 1 && iterations >= 1, "threads and iterations must be positive, got ", threads, " and ",
              iterations);
  std::vector<float> sums(threads);
  std::vector<std::thread> workers;
  for (int64_t t = 0; t < threads; ++t)
    workers.emplace_back([&, t] { sums[t] = avx512 ? chains_avx512(iterations) : chains_avx2(iterations); });
  for (auto& worker : workers) worker.join();
  float total = 0.0f;
  for (float s : sums) total += s;
  TORCH_CHECK(std::isfinite(total), "the FMA chains ended non-finite: ", total);
  const double flop_per_iteration = avx512 ? 16 * 16 * 2 : 12 * 8 * 2;
  return flop_per_iteration * iterations * threads;
}
"""


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"the FMA peak kernel is x86 (AVX-512F or AVX2+FMA); this machine is {platform.machine()}")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler (c++ or g++) on PATH to build the FMA peak kernel")
    from torch.utils.cpp_extension import load_inline

    module = load_inline("glcic_fast_cpu_fma_peak", cpp_sources=_SOURCE, functions=["fma_isa", "fma_flops"],
                         extra_cflags=["-O2"], build_directory=str(tmp_path_factory.mktemp("cpu_peak")),
                         is_python_module=True)
    if not module.fma_isa():
        pytest.skip("this CPU has neither AVX-512F nor AVX2 with FMA")
    return module


def _timed(kernel, threads, iterations, seconds):
    """A call of the kernel that appends its wall time to `seconds`; returns the FLOP done."""
    def run():
        start = time.perf_counter()
        flop = kernel.fma_flops(threads, iterations)
        seconds.append(time.perf_counter() - start)
        return flop
    return run


def _iterations_for(kernel, threads, run_seconds):
    """Iterations for a run of about run_seconds, from a short calibration run (which also
    wakes the cores up)."""
    seconds = []
    iterations = 1_000_000
    _timed(kernel, threads, iterations, seconds)()
    return max(1, int(iterations * run_seconds / seconds[0]))


def _best_gflops(flop, seconds):
    gflops = flop / min(seconds) / 1e9
    assert math.isfinite(gflops) and gflops > 0, f"{flop} FLOP in {min(seconds)} s"
    return gflops


@pytest.mark.benchmark(group="cpu-peak", warmup=False)
def test_cpu_fma_peak(benchmark, kernel):
    threads = torch.get_num_threads()
    disabled = benchmark.disabled
    rounds = 1 if disabled else ROUNDS
    run_seconds = RUN_SECONDS / 5 if disabled else RUN_SECONDS

    single_seconds = []
    single = _timed(kernel, 1, _iterations_for(kernel, 1, run_seconds), single_seconds)
    for _ in range(rounds):
        single_flop = single()

    seconds = []
    flop = benchmark.pedantic(_timed(kernel, threads, _iterations_for(kernel, threads, run_seconds), seconds),
                              rounds=rounds, iterations=1)
    benchmark.extra_info.update(provenance())
    benchmark.extra_info.update({
        "cpu_fma_peak_gflops": _best_gflops(flop, seconds), "threads": threads, "isa": kernel.fma_isa(),
        "cpu_fma_peak_gflops_1thread": _best_gflops(single_flop, single_seconds)})
