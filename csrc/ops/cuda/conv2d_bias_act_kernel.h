// Launcher of the implicit-GEMM 3x3 conv kernel behind glcic_fast::conv3x3_bias_act
// (semantics in ops/conv2d_bias_act.cpp). Plain C++ over raw pointers, so that
// conv2d_bias_act_kernel.cu needs no ATen header and compiles fast.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace glcic_fast {
namespace gpu {

// The kernel's fixed channel counts: Cin = Cout = 256 (the dilated middle of the GLCIC net).
constexpr int kConv3x3Channels = 256;
// K of the GEMM: 9 taps x 256 input channels; the packed weight is [256][kConv3x3K].
constexpr int kConv3x3K = 9 * kConv3x3Channels;

enum class Conv3x3Dtype : int { kFloat16, kBFloat16 };
// kHardtanh: clamp to [-1, 1] (the output activation of mmagic's Global&Local generator).
enum class Conv3x3Activation : int { kNone = 0, kRelu = 1, kSigmoid = 2, kHardtanh = 3 };

struct Conv3x3Problem {
  const void* x;           // [N][H][W][256] dense (channels_last), 16-byte aligned
  const void* weight;      // [256 cout][3 kh][3 kw][256 cin] dense, 16-byte aligned
  const void* bias;        // [256] or nullptr
  const void* post_scale;  // [256] or nullptr (then post_shift is nullptr too)
  const void* post_shift;  // [256] or nullptr
  void* out;               // [N][H][W][256] dense, 16-byte aligned, not overlapping x
  Conv3x3Dtype dtype;      // of every tensor above
  Conv3x3Activation activation;
  int64_t batch;           // N
  int64_t height;          // H (the output has the input's size: stride 1, padding == dilation)
  int64_t width;           // W
  int64_t dilation;        // >= 1; the padding equals it
};

// Whether launch_conv3x3_bias_act can take `problem` (shape limits, alignment); nullptr if
// it can, else a sentence saying why not.
const char* conv3x3_problem_error(const Conv3x3Problem& problem);

// out = act(conv(x, w, dilation, padding = dilation) + bias) [* post_scale + post_shift], fp32
// accumulation and epilogue, one rounding to the dtype. Asynchronous on `stream`; returns
// the launch error, if any. The current device must be the tensors' device.
cudaError_t launch_conv3x3_bias_act(const Conv3x3Problem& problem, cudaStream_t stream);

// The SM version (e.g. 90) of the kernel image the driver would run on `device`, or 0 when
// the library holds none that fits it (built for other architectures, or one older than
// sm_80, which the kernel needs for cp.async, ldmatrix and bf16 mma.sync).
int conv3x3_kernel_sm_version(int device);

}  // namespace gpu
}  // namespace glcic_fast
