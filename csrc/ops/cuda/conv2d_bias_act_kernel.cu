// Implicit-GEMM 3x3 convolution, 256 -> 256 channels, stride 1, padding == dilation, on
// tensor cores (mma.sync m16n8k16, fp32 accumulation) over NHWC bf16 / fp16 tensors, with
// the fused epilogue of glcic_fast.ops.conv2d_bias_act:
//
//   out = act(conv(x, w) + bias) [* post_scale + post_shift]   in fp32, one rounding at the end
//
// GEMM view: M = N*H*W output pixels (rows), N = 256 output channels (columns), K = 9 taps x
// 256 input channels, walked as 36 steps of (tap, 64-channel block). The weight is packed
// [cout][kh][kw][cin], so a K step of it is a dense 128 x 64 tile, like the activation tile:
// both operands are "K-major" and ldmatrix (no transpose) gives the mma fragments of both.
//
// One block: 128 pixels x 128 output channels (grid = 2 column blocks per row block, the two
// neighbours sharing their activation tile in L2), 8 warps of 64 x 32, 3-stage cp.async
// pipeline of 16 KiB + 16 KiB tiles (96 KiB, two blocks per SM). Tile rows are 128 bytes,
// eight 16-byte chunks stored XOR-swizzled (chunk ^ row % 8): the eight rows an ldmatrix
// phase reads, and the eight chunks a cp.async phase writes, then fall in distinct banks.
// Taps outside the image (the zero padding) and rows past M are zero-filled by cp.async with
// a source size of 0, which reads nothing. The epilogue stages the tile in shared memory
// (rows padded by 16 bytes) and writes it with coalesced 16-byte stores.
//
// Offsets into x and out are int64 (N*H*W*256 passes 2^31 at 8.4 Mpx); H, W and the
// dilation are below 2^30, so the int32 row / column arithmetic of a tap cannot overflow.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "ops/cuda/conv2d_bias_act_kernel.h"

namespace glcic_fast {
namespace gpu {

namespace {

constexpr int kC = kConv3x3Channels;  // input and output channels
constexpr int kK = kConv3x3K;         // 9 * 256
constexpr int kBlockM = 128;          // output pixels per block
constexpr int kBlockN = 128;          // output channels per block
constexpr int kBlockK = 64;           // input channels per pipeline step (of one tap)
constexpr int kStages = 3;
constexpr int kThreads = 256;
constexpr int kBlocksPerSM = 2;
constexpr int kWarpsN = 4;                           // warps side by side along N
constexpr int kWarpM = 64;                           // rows of a warp's tile
constexpr int kWarpN = 32;                           // columns of a warp's tile
constexpr int kMmaM = kWarpM / 16;                   // m16 tiles per warp: 4
constexpr int kMmaN = kWarpN / 8;                    // n8 tiles per warp: 4
constexpr int kChannelBlocks = kC / kBlockK;         // 4
constexpr int kSteps = 9 * kChannelBlocks;           // 36 K steps
constexpr int kRowBytes = kBlockK * 2;               // 128: one tile row
constexpr int kChunksPerRow = kRowBytes / 16;        // 8
constexpr int kRowsPerPass = kThreads / kChunksPerRow;  // 32 rows per 16-byte load by every thread
constexpr int kLoadPasses = kBlockM / kRowsPerPass;     // 4
constexpr int kTileBytes = kBlockM * kRowBytes;         // 16 KiB
constexpr int kStageBytes = 2 * kTileBytes;             // A tile, then B tile
constexpr int kPipelineBytes = kStages * kStageBytes;   // 96 KiB
constexpr int kOutStride = kBlockN + 8;                 // staged output row, elements (+16 bytes)
constexpr int kOutChunks = kBlockN * 2 / 16;            // 16-byte chunks of a staged row: 16
constexpr int kOutRowsPerPass = kThreads / kOutChunks;  // 16
constexpr int kOutBytes = kBlockM * kOutStride * 2;
constexpr int kSmemBytes = kPipelineBytes > kOutBytes ? kPipelineBytes : kOutBytes;
// Rows past M get this output row: with |tap offset| <= dilation < 2^30 it stays negative,
// so every tap of the row is out of the image and zero-filled.
constexpr int kInvalidRow = -(1 << 30) - 1;
constexpr int kMaxExtent = 1 << 30;  // H, W and dilation are below this

static_assert(kBlockM == kBlockN, "the A and B tiles share one load mapping");
static_assert(kBlockM == 2 * kWarpM && kBlockN == kWarpsN * kWarpN && kThreads == 32 * 2 * kWarpsN,
              "8 warps, 2 x 4, tile the block");
static_assert(kC % kBlockN == 0 && kC % kBlockK == 0, "the channel blocks divide 256");
static_assert(kChunksPerRow == 8, "the swizzle XORs the chunk with row % 8");
static_assert(kBlockM % kOutRowsPerPass == 0, "the output passes cover the tile");

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled 128 x 64 tile.
__device__ __forceinline__ uint32_t tile_offset(int row, int chunk) {
  return static_cast<uint32_t>(row * kRowBytes + ((chunk ^ (row & 7)) << 4));
}

// ---- PTX wrappers (sm_80+) -------------------------------------------------------------

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// 16 bytes global -> shared, asynchronously; zeros (and no global read) when !fill.
__device__ __forceinline__ void cp_async_16(void* shared, const void* global, bool fill) {
  const int source_bytes = fill ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(shared)), "l"(global),
               "r"(source_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Four 8 x 8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, and thread t
// receives, of each matrix, the elements (t / 4, 2 (t % 4)) and (t / 4, 2 (t % 4) + 1).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* shared) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(shared))
               : "memory");
}

// d += a (16 x 16, row-major fragment) * b (16 x 8, column-major fragment), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

__device__ __forceinline__ void store_global_16(void* global, uint4 value) { *static_cast<uint4*>(global) = value; }

// ---- end of the PTX wrappers ------------------------------------------------------------

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Two floats rounded to T, the first in the low half (the lower address).
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __half) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __nv_bfloat16) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// The fused epilogue of one accumulator, all in fp32 (IEEE division and expf: the build
// does not use fast math).
__device__ __forceinline__ float epilogue(float v, float bias, int activation, bool affine, float scale,
                                          float shift) {
  v += bias;
  if (activation == static_cast<int>(Conv3x3Activation::kRelu)) {
    v = fmaxf(v, 0.f);
  } else if (activation == static_cast<int>(Conv3x3Activation::kSigmoid)) {
    v = 1.f / (1.f + expf(-v));
  } else if (activation == static_cast<int>(Conv3x3Activation::kHardtanh)) {
    v = fminf(fmaxf(v, -1.f), 1.f);
  }
  if (affine) v = v * scale + shift;
  return v;
}

// Output row (oh, ow) of pixel m < pixels; 32-bit division when every pixel index fits.
__device__ __forceinline__ void split_pixel(int64_t m, int64_t pixels, int height, int width, int& oh, int& ow) {
  if (pixels <= 0xffffffffll) {
    const uint32_t m32 = static_cast<uint32_t>(m);
    const uint32_t row = m32 / static_cast<uint32_t>(width);
    ow = static_cast<int>(m32 - row * static_cast<uint32_t>(width));
    oh = static_cast<int>(row % static_cast<uint32_t>(height));
  } else {
    const int64_t row = m / width;
    ow = static_cast<int>(m - row * width);
    oh = static_cast<int>(row % height);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM)
    conv3x3_bias_act_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                            const T* __restrict__ post_scale, const T* __restrict__ post_shift, T* __restrict__ out,
                            int64_t pixels, int height, int width, int dilation, int activation) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // never launched: the host asks conv3x3_kernel_sm_version first
#else
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x / (kC / kBlockN)) * kBlockM;
  const int n0 = static_cast<int>(blockIdx.x % (kC / kBlockN)) * kBlockN;

  // -- what this thread loads: chunk `load_chunk` of tile rows load_row + 32 p, p < 4 --------
  const int load_chunk = tid % kChunksPerRow;
  const int load_row = tid / kChunksPerRow;
  const uint32_t load_dst = tile_offset(load_row, load_chunk);  // + p * 32 rows: same swizzle
  int64_t a_offset[kLoadPasses];  // element offset of the row's pixel (and chunk) in x
  int a_oh[kLoadPasses];
  int a_ow[kLoadPasses];
#pragma unroll
  for (int p = 0; p < kLoadPasses; ++p) {
    const int64_t m = m0 + load_row + p * kRowsPerPass;
    if (m < pixels) {
      split_pixel(m, pixels, height, width, a_oh[p], a_ow[p]);
      a_offset[p] = m * kC + load_chunk * 8;
    } else {
      a_oh[p] = kInvalidRow;
      a_ow[p] = 0;
      a_offset[p] = 0;
    }
  }
  const T* b_src = w + static_cast<int64_t>(n0 + load_row) * kK + load_chunk * 8;

  // Issues the loads of K step `step` (tap step / 4, channels 64 (step % 4) ...) into `stage`.
  auto load_step = [&](int step, int stage) {
    unsigned char* a_tile = smem + stage * kStageBytes;
    unsigned char* b_tile = a_tile + kTileBytes;
    const int tap = step / kChannelBlocks;
    const int channel0 = (step % kChannelBlocks) * kBlockK;
    const int kh = tap / 3;
    const int dh = (kh - 1) * dilation;
    const int dw = (tap - 3 * kh - 1) * dilation;
    const int64_t shift = (static_cast<int64_t>(dh) * width + dw) * kC + channel0;
#pragma unroll
    for (int p = 0; p < kLoadPasses; ++p) {
      const int ih = a_oh[p] + dh;
      const int iw = a_ow[p] + dw;
      const bool inside = static_cast<unsigned>(ih) < static_cast<unsigned>(height) &&
                          static_cast<unsigned>(iw) < static_cast<unsigned>(width);
      const T* src = inside ? x + a_offset[p] + shift : x;
      cp_async_16(a_tile + load_dst + p * kRowsPerPass * kRowBytes, src, inside);
    }
#pragma unroll
    for (int p = 0; p < kLoadPasses; ++p) {
      cp_async_16(b_tile + load_dst + p * kRowsPerPass * kRowBytes,
                  b_src + static_cast<int64_t>(p * kRowsPerPass) * kK + step * kBlockK, true);
    }
  };

  // -- what this thread multiplies ----------------------------------------------------------
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int warp_m = warp / kWarpsN;
  const int warp_n = warp % kWarpsN;
  // ldmatrix row addresses. A (m16 x k16 = matrices rows 0-7 / 8-15 x k 0-7 / 8-15, in the
  // order of the a0..a3 fragment registers): lane -> row lane % 16, chunk lane / 16.
  // B (two n8 x k16 tiles = n 0-7 x k 0-7, n 0-7 x k 8-15, n 8-15 x k 0-7, n 8-15 x k 8-15,
  // i.e. b0, b1 of the first n8 tile, then of the second): lane -> row lane % 8 + 8 (lane / 16),
  // chunk (lane / 8) % 2. Both rows are = lane (mod 8), so the swizzle XORs with lane % 8.
  const int a_ld_row = warp_m * kWarpM + (lane % 16);
  const int a_ld_chunk = lane / 16;
  const int b_ld_row = warp_n * kWarpN + (lane % 8) + 8 * (lane / 16);
  const int b_ld_chunk = (lane / 8) % 2;

  float acc[kMmaM][kMmaN][4];
#pragma unroll
  for (int i = 0; i < kMmaM; ++i)
#pragma unroll
    for (int j = 0; j < kMmaN; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  auto compute_step = [&](int stage) {
    const unsigned char* a_tile = smem + stage * kStageBytes;
    const unsigned char* b_tile = a_tile + kTileBytes;
#pragma unroll
    for (int kk = 0; kk < kBlockK / 16; ++kk) {
      uint32_t b[kMmaN][2];
#pragma unroll
      for (int nj = 0; nj < kMmaN / 2; ++nj) {
        uint32_t r[4];
        ldmatrix_x4(r, b_tile + tile_offset(b_ld_row + nj * 16, b_ld_chunk + 2 * kk));
        b[2 * nj][0] = r[0];
        b[2 * nj][1] = r[1];
        b[2 * nj + 1][0] = r[2];
        b[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < kMmaM; ++mi) {
        uint32_t a[4];
        ldmatrix_x4(a, a_tile + tile_offset(a_ld_row + mi * 16, a_ld_chunk + 2 * kk));
#pragma unroll
        for (int ni = 0; ni < kMmaN; ++ni) mma_16816<T>(acc[mi][ni], a, b[ni]);
      }
    }
  };

  // -- the pipeline: kStages - 1 steps in flight while one is multiplied --------------------
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    load_step(s, s);
    cp_async_commit();
  }
#pragma unroll 1
  for (int step = 0; step < kSteps; ++step) {
    // Groups committed so far: steps 0 .. step + kStages - 2. Allowing kStages - 2 in flight
    // completes step `step`; the barrier publishes it to every thread and ends every warp's
    // reads of step - 1, whose stage the next load overwrites.
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = step + kStages - 1;
    if (next < kSteps) load_step(next, next % kStages);
    cp_async_commit();  // possibly empty: keeps the group count uniform
    compute_step(step % kStages);
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the pipeline's shared memory

  // -- epilogue: fp32 -> staged tile of T in shared memory -> 16-byte stores -----------------
  // Accumulator e of mma tile (mi, ni) is row (lane / 4) + 8 (e / 2), column 2 (lane % 4) + e % 2.
  T* staged = reinterpret_cast<T*>(smem);
  const bool affine = post_scale != nullptr;
#pragma unroll
  for (int ni = 0; ni < kMmaN; ++ni) {
    const int col = warp_n * kWarpN + ni * 8 + 2 * (lane % 4);
    const int channel = n0 + col;
    float bias0 = 0.f, bias1 = 0.f, scale0 = 1.f, scale1 = 1.f, shift0 = 0.f, shift1 = 0.f;
    if (bias != nullptr) {
      bias0 = to_float(bias[channel]);
      bias1 = to_float(bias[channel + 1]);
    }
    if (affine) {
      scale0 = to_float(post_scale[channel]);
      scale1 = to_float(post_scale[channel + 1]);
      shift0 = to_float(post_shift[channel]);
      shift1 = to_float(post_shift[channel + 1]);
    }
#pragma unroll
    for (int mi = 0; mi < kMmaM; ++mi) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = warp_m * kWarpM + mi * 16 + lane / 4 + 8 * half;
        const float v0 = epilogue(acc[mi][ni][2 * half], bias0, activation, affine, scale0, shift0);
        const float v1 = epilogue(acc[mi][ni][2 * half + 1], bias1, activation, affine, scale1, shift1);
        *reinterpret_cast<uint32_t*>(staged + row * kOutStride + col) = pack2(v0, v1, T{});
      }
    }
  }
  __syncthreads();
  const int out_chunk = tid % kOutChunks;
#pragma unroll
  for (int p = 0; p < kBlockM / kOutRowsPerPass; ++p) {
    const int row = tid / kOutChunks + p * kOutRowsPerPass;
    const int64_t m = m0 + row;
    if (m < pixels) {
      const uint4 value = *reinterpret_cast<const uint4*>(staged + row * kOutStride + out_chunk * 8);
      store_global_16(out + m * kC + n0 + out_chunk * 8, value);
    }
  }
#endif
}

template <typename T>
cudaError_t launch_typed(const Conv3x3Problem& p, cudaStream_t stream) {
  const auto kernel = conv3x3_bias_act_kernel<T>;
  // More than 48 KiB of dynamic shared memory must be asked for, once per device.
  static std::atomic<uint64_t> configured{0};
  int device = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error != cudaSuccess) return error;
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (bit == 0 || !(configured.load(std::memory_order_acquire) & bit)) {
    error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (error != cudaSuccess) return error;
    configured.fetch_or(bit, std::memory_order_release);
  }
  const int64_t pixels = p.batch * p.height * p.width;
  const int64_t blocks = (pixels + kBlockM - 1) / kBlockM * (kC / kBlockN);
  kernel<<<static_cast<unsigned>(blocks), kThreads, kSmemBytes, stream>>>(
      static_cast<const T*>(p.x), static_cast<const T*>(p.weight), static_cast<const T*>(p.bias),
      static_cast<const T*>(p.post_scale), static_cast<const T*>(p.post_shift), static_cast<T*>(p.out), pixels,
      static_cast<int>(p.height), static_cast<int>(p.width), static_cast<int>(p.dilation),
      static_cast<int>(p.activation));
  return cudaGetLastError();
}

bool aligned16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

}  // namespace

const char* conv3x3_problem_error(const Conv3x3Problem& p) {
  if (p.dtype != Conv3x3Dtype::kFloat16 && p.dtype != Conv3x3Dtype::kBFloat16) return "the dtype must be fp16 or bf16";
  if (p.activation != Conv3x3Activation::kNone && p.activation != Conv3x3Activation::kRelu &&
      p.activation != Conv3x3Activation::kSigmoid && p.activation != Conv3x3Activation::kHardtanh) {
    return "unknown activation";
  }
  if (p.batch < 0 || p.height < 0 || p.width < 0) return "negative sizes";
  if (p.height >= kMaxExtent || p.width >= kMaxExtent) return "H and W must be below 2^30";
  if (p.dilation < 1 || p.dilation >= kMaxExtent) return "the dilation must be in [1, 2^30)";
  if (p.batch > 0 && p.height > 0 && p.width > 0) {
    if (p.batch > (int64_t{1} << 62) / p.height / p.width) return "too many pixels";
    const int64_t pixels = p.batch * p.height * p.width;
    if ((pixels + kBlockM - 1) / kBlockM * (kC / kBlockN) > 0x7fffffffll) {
      return "too many pixels for one launch (N*H*W must be below 2^37)";
    }
  }
  if (!aligned16(p.x) || !aligned16(p.weight) || !aligned16(p.out)) {
    return "x, the packed weight and out must be 16-byte aligned";
  }
  if ((p.post_scale == nullptr) != (p.post_shift == nullptr)) return "post_scale and post_shift go together";
  return nullptr;
}

cudaError_t launch_conv3x3_bias_act(const Conv3x3Problem& problem, cudaStream_t stream) {
  if (conv3x3_problem_error(problem) != nullptr) return cudaErrorInvalidValue;
  if (problem.batch == 0 || problem.height == 0 || problem.width == 0) return cudaSuccess;
  return problem.dtype == Conv3x3Dtype::kBFloat16 ? launch_typed<__nv_bfloat16>(problem, stream)
                                                  : launch_typed<__half>(problem, stream);
}

int conv3x3_kernel_sm_version(int device) {
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess) return 0;
  if (device != previous && cudaSetDevice(device) != cudaSuccess) return 0;
  cudaFuncAttributes attributes{};
  const cudaError_t error = cudaFuncGetAttributes(&attributes, conv3x3_bias_act_kernel<__nv_bfloat16>);
  if (device != previous) cudaSetDevice(previous);
  if (error != cudaSuccess) {
    cudaGetLastError();  // not sticky, but do not leave it for the next launch check
    return 0;
  }
  // The image must come from sm_80+ code: one from older PTX holds only the __trap() stub.
  return attributes.ptxVersion >= 80 && attributes.binaryVersion >= 80 ? attributes.binaryVersion : 0;
}

}  // namespace gpu
}  // namespace glcic_fast
