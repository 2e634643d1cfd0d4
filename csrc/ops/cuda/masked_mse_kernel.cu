// Fused masked MSE on the GPU: one grid-stride pass over pred, target and mask with 16-byte
// vector loads and stores where the pointers allow, then a one-block pass over the per-block
// partial sums. Fixed grid, fixed thread-to-element map and fixed reduction trees: the
// result is bit-identical from call to call on a given GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "ops/cuda/masked_mse_kernel.h"

namespace glcic_fast {
namespace gpu {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// 8 blocks of 256 threads fill an SM (2048 threads on sm_80 and sm_90), which keeps enough
// loads in flight to saturate HBM without unrolling the loop by hand.
constexpr int kBlocksPerMultiprocessor = 8;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Elements of T per 16-byte vector.
template <typename T>
constexpr int kVector = 16 / sizeof(T);

// N values loaded or stored by one vector instruction (two for 32 bytes) when aligned.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// n / d for 0 <= n < 2^63 by a multiply-high, an add and a shift (Granlund and Montgomery,
// PLDI 1994) instead of a 64-bit division, which the GPU runs as a long software routine.
class FastDivider {
 public:
  explicit FastDivider(uint64_t divisor) : divisor_(divisor) {
    while ((uint64_t{1} << shift_) < divisor) ++shift_;
    const unsigned __int128 numerator = static_cast<unsigned __int128>((uint64_t{1} << shift_) - divisor) << 64;
    magic_ = static_cast<uint64_t>(numerator / divisor) + 1;
  }
  __device__ __forceinline__ uint64_t divide(uint64_t n) const { return (__umul64hi(n, magic_) + n) >> shift_; }
  __device__ __forceinline__ uint64_t divisor() const { return divisor_; }

 private:
  uint64_t divisor_;
  uint64_t magic_ = 0;
  unsigned shift_ = 0;
};

// Index into the mask of the weight of pred element i (see MaskBroadcast).
template <MaskBroadcast kBroadcast>
__device__ __forceinline__ uint64_t mask_index(uint64_t i, const FastDivider& channels, const FastDivider& plane) {
  if constexpr (kBroadcast == MaskBroadcast::kNone) {
    return i;
  } else if constexpr (kBroadcast == MaskBroadcast::kInterleaved) {
    return channels.divide(i);
  } else {
    const uint64_t plane_index = plane.divide(i);
    return channels.divide(plane_index) * plane.divisor() + (i - plane_index * plane.divisor());
  }
}

// Weights of the N pred elements from `first` on. kNone and kPlanar read them as one
// aligned pack (the launcher checked alignment, and for kPlanar that H*W is a multiple of
// N, so the N elements lie in one plane); kInterleaved reads one weight per pixel.
template <MaskBroadcast kBroadcast, int N, typename M>
__device__ __forceinline__ void load_weights(const M* __restrict__ mask, uint64_t first, const FastDivider& channels,
                                             const FastDivider& plane, float (&w)[N]) {
  if constexpr (kBroadcast == MaskBroadcast::kInterleaved) {
    uint64_t pixel = channels.divide(first);
    uint64_t channel = first - pixel * channels.divisor();
    float weight = to_float(mask[pixel]);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      w[k] = weight;
      if (k + 1 < N && ++channel == channels.divisor()) {
        channel = 0;
        weight = to_float(mask[++pixel]);
      }
    }
  } else {
    const Pack<M, N> pack = *reinterpret_cast<const Pack<M, N>*>(mask + mask_index<kBroadcast>(first, channels, plane));
#pragma unroll
    for (int k = 0; k < N; ++k) w[k] = to_float(pack.v[k]);
  }
}

// The one formula every backend computes, in fp32.
template <typename T>
__device__ __forceinline__ T accumulate(float p, float t, float w, float& loss, float& weight) {
  const float wd = w * (p - t);
  loss += wd * wd;
  weight += w;
  return from_float<T>(2.f * w * wd);
}

// Sums a and b over the block in a fixed tree; the totals are valid in thread 0.
__device__ __forceinline__ void block_sum(float& a, float& b) {
  __shared__ float warp_sums[2][kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, offset);
    b += __shfl_down_sync(0xffffffffu, b, offset);
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) {
    warp_sums[0][warp] = a;
    warp_sums[1][warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kWarps ? warp_sums[0][lane] : 0.f;
    b = lane < kWarps ? warp_sums[1][lane] : 0.f;
#pragma unroll
    for (int offset = kWarps / 2; offset > 0; offset >>= 1) {
      a += __shfl_down_sync(0xffffffffu, a, offset);
      b += __shfl_down_sync(0xffffffffu, b, offset);
    }
  }
}

template <typename T, typename M, MaskBroadcast kBroadcast>
__global__ void __launch_bounds__(kThreads, kBlocksPerMultiprocessor)
    masked_mse_partials_kernel(const T* __restrict__ pred, const T* __restrict__ target, const M* __restrict__ mask,
                               T* __restrict__ grad, int64_t numel, FastDivider channels, FastDivider plane,
                               bool vectorized, float* __restrict__ partials) {
  constexpr int N = kVector<T>;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  float loss = 0.f;
  float weight = 0.f;
  int64_t scalar_begin = 0;
  if (vectorized) {
    const int64_t packs = numel / N;
    for (int64_t v = thread; v < packs; v += stride) {
      const int64_t first = v * N;
      const Pack<T, N> p = *reinterpret_cast<const Pack<T, N>*>(pred + first);
      const Pack<T, N> t = *reinterpret_cast<const Pack<T, N>*>(target + first);
      float w[N];
      load_weights<kBroadcast>(mask, first, channels, plane, w);
      Pack<T, N> g;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        g.v[k] = accumulate<T>(to_float(p.v[k]), to_float(t.v[k]), w[k], loss, weight);
      }
      *reinterpret_cast<Pack<T, N>*>(grad + first) = g;
    }
    scalar_begin = packs * N;
  }
  // The elements no pack covers: all of them when unaligned, else the last numel % N.
  for (int64_t i = scalar_begin + thread; i < numel; i += stride) {
    const float w = to_float(mask[mask_index<kBroadcast>(i, channels, plane)]);
    grad[i] = accumulate<T>(to_float(pred[i]), to_float(target[i]), w, loss, weight);
  }
  block_sum(loss, weight);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = loss;
    partials[gridDim.x + blockIdx.x] = weight;
  }
}

__global__ void __launch_bounds__(kThreads)
    masked_mse_finish_kernel(const float* __restrict__ partials, int num_partials, bool mean, float* loss_out,
                             float* grad_scale_out) {
  float loss = 0.f;
  float weight = 0.f;
  for (int i = threadIdx.x; i < num_partials; i += kThreads) {
    loss += partials[i];
    weight += partials[num_partials + i];
  }
  block_sum(loss, weight);
  if (threadIdx.x == 0) {
    // Correctly rounded division and reciprocal, whatever --use_fast_math says.
    const bool any_weight = weight != 0.f;
    *loss_out = !mean ? loss : any_weight ? __fdiv_rn(loss, weight) : 0.f;
    *grad_scale_out = !mean ? 1.f : any_weight ? __frcp_rn(weight) : 0.f;
  }
}

bool is_aligned(const void* pointer, uint64_t bytes) { return reinterpret_cast<uintptr_t>(pointer) % bytes == 0; }

template <typename T, typename M, MaskBroadcast kBroadcast>
cudaError_t launch_partials(const MaskedMseProblem& problem, int grid, float* partials, cudaStream_t stream) {
  constexpr int N = kVector<T>;
  const bool mask_packs = kBroadcast == MaskBroadcast::kInterleaved ||
                          (is_aligned(problem.mask, sizeof(Pack<M, N>)) &&
                           (kBroadcast == MaskBroadcast::kNone || problem.plane % N == 0));
  const bool vectorized = mask_packs && is_aligned(problem.pred, 16) && is_aligned(problem.target, 16) &&
                          is_aligned(problem.grad, 16);
  // C or H * W is 0 only when there is no element to divide: any divisor then does.
  const FastDivider channels(problem.channels > 0 ? problem.channels : 1);
  const FastDivider plane(problem.plane > 0 ? problem.plane : 1);
  masked_mse_partials_kernel<T, M, kBroadcast><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(problem.pred), static_cast<const T*>(problem.target), static_cast<const M*>(problem.mask),
      static_cast<T*>(problem.grad), problem.numel, channels, plane, vectorized, partials);
  return cudaGetLastError();
}

// Calls f(T{}) for the CUDA type of a ScalarKind.
template <typename F>
cudaError_t with_scalar_type(ScalarKind kind, F&& f) {
  switch (kind) {
    case ScalarKind::kFloat32:
      return f(float{});
    case ScalarKind::kFloat16:
      return f(__half{});
    case ScalarKind::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

template <typename F>
cudaError_t with_broadcast(MaskBroadcast broadcast, F&& f) {
  switch (broadcast) {
    case MaskBroadcast::kNone:
      return f(std::integral_constant<MaskBroadcast, MaskBroadcast::kNone>{});
    case MaskBroadcast::kPlanar:
      return f(std::integral_constant<MaskBroadcast, MaskBroadcast::kPlanar>{});
    case MaskBroadcast::kInterleaved:
      return f(std::integral_constant<MaskBroadcast, MaskBroadcast::kInterleaved>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int masked_mse_grid_size(const MaskedMseProblem& problem, int multiprocessor_count) {
  const int64_t elements_per_block = static_cast<int64_t>(kThreads) * (problem.value_kind == ScalarKind::kFloat32 ? 4 : 8);
  const int64_t wanted = (problem.numel + elements_per_block - 1) / elements_per_block;
  const int64_t most = static_cast<int64_t>(multiprocessor_count) * kBlocksPerMultiprocessor;
  return static_cast<int>(wanted < 1 ? 1 : wanted < most ? wanted : most);
}

cudaError_t launch_masked_mse(const MaskedMseProblem& problem, int grid, float* partials, float* loss,
                              float* grad_scale, cudaStream_t stream) {
  const cudaError_t error = with_scalar_type(problem.value_kind, [&](auto value_tag) {
    return with_scalar_type(problem.mask_kind, [&](auto mask_tag) {
      return with_broadcast(problem.broadcast, [&](auto broadcast_tag) {
        return launch_partials<decltype(value_tag), decltype(mask_tag), decltype(broadcast_tag)::value>(
            problem, grid, partials, stream);
      });
    });
  });
  if (error != cudaSuccess) return error;
  masked_mse_finish_kernel<<<1, kThreads, 0, stream>>>(partials, grid, problem.mean, loss, grad_scale);
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace glcic_fast
