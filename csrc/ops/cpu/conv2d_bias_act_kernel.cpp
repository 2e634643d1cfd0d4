// CPU kernel of glcic_fast::conv3x3_winograd_bias_act (schema and semantics in
// ops/conv2d_bias_act.cpp): the 3x3, stride 1, padding == dilation convolutions by Winograd
// minimal filtering F(m x m, 3 x 3), with the bias, activation and affine epilogue fused.
//
// The tiles are cut into blocks small enough that a block's transformed inputs and products
// stay in one core's L2 cache; each thread takes whole blocks (at::parallel_for) and runs
// input transform, alpha^2 GEMMs and output transform on a block before the next, so the
// transformed data never goes out to memory. The code is compiled three times (AVX-512,
// AVX2 + FMA, portable) from conv2d_bias_act_winograd_isa.inc; the best the CPU runs is taken,
// or the one GLCIC_FAST_CPU_ISA names (avx512, avx2, portable), which tests use to run all.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "ops/cpu/conv2d_bias_act_winograd.h"

namespace glcic_fast::winograd {

namespace avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#define WG_VEC __m512
#define WG_WIDTH 16
#define WG_ROWS 12
#define WG_ZERO() _mm512_setzero_ps()
#define WG_SET1(s) _mm512_set1_ps(s)
#define WG_LOAD(p) _mm512_loadu_ps(p)
#define WG_STORE(p, v) _mm512_storeu_ps(p, v)
#define WG_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define WG_ADD(a, b) _mm512_add_ps(a, b)
#define WG_MAX(a, b) _mm512_max_ps(a, b)
#define WG_MIN(a, b) _mm512_min_ps(a, b)
#include "ops/cpu/conv2d_bias_act_winograd_isa.inc"
#pragma GCC pop_options
}  // namespace avx512

namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define WG_VEC __m256
#define WG_WIDTH 8
#define WG_ROWS 6
#define WG_ZERO() _mm256_setzero_ps()
#define WG_SET1(s) _mm256_set1_ps(s)
#define WG_LOAD(p) _mm256_loadu_ps(p)
#define WG_STORE(p, v) _mm256_storeu_ps(p, v)
#define WG_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define WG_ADD(a, b) _mm256_add_ps(a, b)
#define WG_MAX(a, b) _mm256_max_ps(a, b)
#define WG_MIN(a, b) _mm256_min_ps(a, b)
#include "ops/cpu/conv2d_bias_act_winograd_isa.inc"
#pragma GCC pop_options
}  // namespace avx2

namespace portable {
#define WG_VEC float
#define WG_WIDTH 1
#define WG_ROWS 2
#define WG_ZERO() 0.f
#define WG_SET1(s) (s)
#define WG_LOAD(p) (*(p))
#define WG_STORE(p, v) (*(p) = (v))
// Not std::fma: a call into libm per multiply-add (software-emulated where there is no FMA).
#define WG_FMA(a, b, c) ((a) * (b) + (c))
#define WG_ADD(a, b) ((a) + (b))
#define WG_MAX(a, b) ((a) > (b) ? (a) : (b))
#define WG_MIN(a, b) ((a) < (b) ? (a) : (b))
#include "ops/cpu/conv2d_bias_act_winograd_isa.inc"
}  // namespace portable

namespace {

constexpr Kernels kAvx512{"avx512", avx512::kRows, avx512::input_transform, avx512::gemm, avx512::output_transform};
constexpr Kernels kAvx2{"avx2", avx2::kRows, avx2::input_transform, avx2::gemm, avx2::output_transform};
constexpr Kernels kPortable{"portable", portable::kRows, portable::input_transform, portable::gemm,
                            portable::output_transform};

// A block's transformed inputs and products together take about this much (half a Zen 3/4/5
// core's L2, leaving room for the weight panel and the input rows being read), or one
// micro-kernel's rows where that is more: 12 tiles on AVX-512 take 0.9 MB on a 256-channel
// layer. Larger blocks re-read the transformed weights less often but measured slower here.
constexpr int64_t kBlockBytes = 1 << 19;

bool cpu_runs(const Kernels& kernels) {
  if (&kernels == &kAvx512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
                                   __builtin_cpu_supports("fma");
  if (&kernels == &kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return true;
}

// The instruction set GLCIC_FAST_CPU_ISA names (read per call, so a test can switch it), or
// the best this CPU runs.
const Kernels& kernels_for_this_cpu() {
  const char* wanted = std::getenv("GLCIC_FAST_CPU_ISA");
  if (wanted != nullptr && *wanted != '\0') {
    for (const Kernels* k : {&kAvx512, &kAvx2, &kPortable}) {
      if (std::strcmp(wanted, k->name) == 0) {
        TORCH_CHECK(cpu_runs(*k), "GLCIC_FAST_CPU_ISA=", wanted, ": this CPU does not run ", wanted);
        return *k;
      }
    }
    TORCH_CHECK_VALUE(false, "GLCIC_FAST_CPU_ISA=", wanted, " is not one of avx512, avx2, portable");
  }
  for (const Kernels* k : {&kAvx512, &kAvx2})
    if (cpu_runs(*k)) return *k;
  return kPortable;
}

Activation parse_activation(const std::string& name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "sigmoid") return Activation::kSigmoid;
  if (name == "hardtanh") return Activation::kHardtanh;
  TORCH_CHECK_VALUE(name == "none", "conv3x3_winograd_bias_act: activation must be relu, sigmoid, hardtanh or none, got ",
                    name);
  return Activation::kNone;
}

// Every tile of every sub-grid of every image, in memory order of their first pixel's row.
std::vector<Tile> plan_tiles(int64_t batch, int64_t height, int64_t width, int64_t m, int64_t dilation) {
  std::vector<Tile> tiles;
  for (int64_t n = 0; n < batch; ++n)
    for (int64_t band = 0; band < height; band += m * dilation)        // a band of tile rows
      for (int64_t sy = 0; sy < dilation && band + sy < height; ++sy)  // sub-grid row
        for (int64_t block = 0; block < width; block += m * dilation)
          for (int64_t sx = 0; sx < dilation && block + sx < width; ++sx)
            tiles.push_back(Tile{n, band + sy, block + sx});
  return tiles;
}

const float* data_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

void check_vector(const c10::optional<at::Tensor>& t, const char* name, int64_t cout) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == cout &&
                        t->is_contiguous(),
                    "conv3x3_winograd_bias_act: ", name, " must be ", cout, " contiguous float32 values on the CPU");
}

}  // namespace

at::Tensor conv3x3_winograd_bias_act_cpu(const at::Tensor& x, const at::Tensor& weight_transformed,
                                         const at::Tensor& input_transform, const at::Tensor& output_transform,
                                         const c10::optional<at::Tensor>& bias, int64_t dilation,
                                         c10::string_view activation, const c10::optional<at::Tensor>& post_scale,
                                         const c10::optional<at::Tensor>& post_shift) {
  TORCH_CHECK_VALUE(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
                    "conv3x3_winograd_bias_act: x must be a 4-d float32 CPU tensor, got ", x.sizes(), " ",
                    x.scalar_type(), " on ", x.device());
  const int64_t alpha = input_transform.size(0);
  TORCH_CHECK_VALUE(input_transform.dim() == 2 && input_transform.size(1) == alpha &&
                        (alpha == 4 || alpha == 6 || alpha == 8) && input_transform.is_contiguous() &&
                        input_transform.scalar_type() == at::kFloat,
                    "conv3x3_winograd_bias_act: input_transform must be a contiguous float32 alpha x alpha matrix "
                    "with alpha 4, 6 or 8, got ", input_transform.sizes());
  const int64_t m = alpha - 2;
  TORCH_CHECK_VALUE(output_transform.dim() == 2 && output_transform.size(0) == m && output_transform.size(1) == alpha &&
                        output_transform.is_contiguous() && output_transform.scalar_type() == at::kFloat,
                    "conv3x3_winograd_bias_act: output_transform must be a contiguous float32 ", m, " x ", alpha,
                    " matrix, got ", output_transform.sizes());
  const int64_t cin = x.size(1);
  TORCH_CHECK_VALUE(cin % kChannelRun == 0, "conv3x3_winograd_bias_act: input channels must be a multiple of ",
                    kChannelRun, ", got ", cin);
  TORCH_CHECK_VALUE(weight_transformed.dim() == 4 && weight_transformed.size(0) == alpha * alpha &&
                        weight_transformed.size(2) == cin && weight_transformed.size(3) == kChannelRun &&
                        weight_transformed.is_contiguous() && weight_transformed.scalar_type() == at::kFloat,
                    "conv3x3_winograd_bias_act: weight_transformed must be contiguous float32 of shape (", alpha * alpha,
                    ", Cout / ", kChannelRun, ", ", cin, ", ", kChannelRun, "), got ", weight_transformed.sizes());
  const int64_t cout = weight_transformed.size(1) * kChannelRun;
  TORCH_CHECK_VALUE(dilation >= 1, "conv3x3_winograd_bias_act: dilation must be at least 1, got ", dilation);
  check_vector(bias, "bias", cout);
  check_vector(post_scale, "post_scale", cout);
  check_vector(post_shift, "post_shift", cout);
  TORCH_CHECK_VALUE(post_scale.has_value() == post_shift.has_value(),
                    "conv3x3_winograd_bias_act: post_scale and post_shift go together");

  const int64_t batch = x.size(0), height = x.size(2), width = x.size(3);
  const at::Tensor input = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty({batch, cout, height, width}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;

  Problem p;
  p.alpha = static_cast<int>(alpha);
  p.m = static_cast<int>(m);
  p.height = height;
  p.width = width;
  p.cin = cin;
  p.cout = cout;
  p.dilation = dilation;
  p.bt = input_transform.data_ptr<float>();
  p.at = output_transform.data_ptr<float>();
  p.x = input.data_ptr<float>();
  p.u = weight_transformed.data_ptr<float>();
  p.bias = data_or_null(bias);
  p.post_scale = data_or_null(post_scale);
  p.post_shift = data_or_null(post_shift);
  p.activation = parse_activation(std::string(activation));
  p.out = out.data_ptr<float>();

  const Kernels& kernels = kernels_for_this_cpu();
  const std::vector<Tile> tiles = plan_tiles(batch, height, width, m, dilation);
  const int64_t bytes_per_tile = alpha * alpha * (v_row_stride(cin) + cout) * static_cast<int64_t>(sizeof(float));
  const int64_t multiple = kernels.rows_multiple;
  const int64_t block = std::max<int64_t>(multiple, kBlockBytes / bytes_per_tile / multiple * multiple);
  const int64_t blocks = (static_cast<int64_t>(tiles.size()) + block - 1) / block;
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> v(alpha * alpha * block * v_row_stride(cin)), prod(alpha * alpha * block * cout);
    for (int64_t i = first; i < last; ++i) {
      const Tile* start = tiles.data() + i * block;
      const int64_t count = std::min<int64_t>(block, static_cast<int64_t>(tiles.size()) - i * block);
      const int64_t rows = (count + multiple - 1) / multiple * multiple;
      kernels.input_transform(p, start, count, rows, v.data());
      kernels.gemm(p, rows, v.data(), prod.data());
      kernels.output_transform(p, start, count, rows, prod.data());
    }
  });
  return out;
}

std::string conv3x3_winograd_isa() { return kernels_for_this_cpu().name; }

}  // namespace glcic_fast::winograd
