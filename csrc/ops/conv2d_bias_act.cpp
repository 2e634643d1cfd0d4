// Registration of glcic_fast::conv3x3_bias_act, the CUDA kernel behind backend "cuda" of
// glcic_fast.ops.conv2d_bias_act for the 3x3, 256 -> 256, stride 1, padding == dilation
// layers (the dilated middle of the GLCIC completion net):
//
//   out = act(conv2d(x, w, stride 1, padding = dilation, dilation) + bias) [* post_scale + post_shift]
//
// x: N x 256 x H x W, float16 or bfloat16, CUDA (any layout: it is made channels_last).
// packed_weight: [256 cout][3 kh][3 kw][256 cin] as a dense 256 x 2304 matrix in x's dtype,
//   i.e. weight.permute(0, 2, 3, 1).reshape(256, 2304) (glcic_fast/ops/conv2d_bias_act.py
//   packs and caches it).
// bias, post_scale, post_shift: 256 values in x's dtype or None (post_scale and post_shift
//   together). activation: "relu", "sigmoid", "hardtanh" (clamp to [-1, 1]) or "none".
// Accumulation and the whole epilogue in fp32, one rounding to the dtype; out is
// N x 256 x H x W in channels_last. The .out overload writes a given channels_last tensor.
// CUDA only (sm_80+); the CPU's 3x3 convs have the Winograd kernel below.
//
// Registration of glcic_fast::conv3x3_winograd_bias_act, the CPU kernel behind backend "cpp"
// (csrc/ops/cpu/conv2d_bias_act_kernel.cpp): the 3x3, stride 1, padding == dilation convs
// by Winograd minimal filtering F(m x m, 3 x 3), alpha = m + 2 in {4, 6, 8}:
//
//   out = act(conv2d(x, w, stride 1, padding = dilation, dilation) + bias) [* post_scale + post_shift]
//
// x: N x Cin x H x W float32 (any layout: it is made channels_last); Cin and Cout multiples of 16.
// weight_transformed: G w G^T as float32 (alpha^2, Cout / 16, Cin, 16): element-major, then
//   panels of 16 output channels (glcic_fast/ops/winograd.py transform_weight);
// input_transform: BT (alpha x alpha); output_transform: AT (m x alpha), float32. The matrices
//   and the weight's transform are made once, in float64, by glcic_fast/ops/conv2d_bias_act.py.
// out: N x Cout x H x W float32 in channels_last. conv3x3_winograd_isa() names the instruction
// set the kernel runs (avx512, avx2 or portable; GLCIC_FAST_CPU_ISA picks another).
#include <torch/library.h>

#include <string>

#ifdef WITH_CUDA
#include "ops/cuda/conv2d_bias_act_kernel.h"
#endif

namespace glcic_fast {

namespace winograd {
at::Tensor conv3x3_winograd_bias_act_cpu(const at::Tensor& x, const at::Tensor& weight_transformed,
                                         const at::Tensor& input_transform, const at::Tensor& output_transform,
                                         const c10::optional<at::Tensor>& bias, int64_t dilation,
                                         c10::string_view activation, const c10::optional<at::Tensor>& post_scale,
                                         const c10::optional<at::Tensor>& post_shift);
std::string conv3x3_winograd_isa();
}  // namespace winograd

namespace {

// The SM version of the kernel image that would run on CUDA device `device`, 0 if there is
// none (an extension built without CUDA, or for other architectures, or a GPU before sm_80).
int64_t conv3x3_bias_act_sm_version(int64_t device) {
#ifdef WITH_CUDA
  return gpu::conv3x3_kernel_sm_version(static_cast<int>(device));
#else
  (void)device;
  return 0;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(glcic_fast, m) {
  m.def("conv3x3_bias_act(Tensor x, Tensor packed_weight, Tensor? bias, int dilation, str activation,"
        " Tensor? post_scale, Tensor? post_shift) -> Tensor");
  m.def("conv3x3_bias_act.out(Tensor x, Tensor packed_weight, Tensor? bias, int dilation, str activation,"
        " Tensor? post_scale, Tensor? post_shift, *, Tensor(a!) out) -> Tensor(a!)");
  // No tensor argument: a catch-all kernel, the same with or without the CUDA sources.
  m.def("conv3x3_bias_act_sm_version(int device) -> int", &conv3x3_bias_act_sm_version);
  m.def("conv3x3_winograd_bias_act(Tensor x, Tensor weight_transformed, Tensor input_transform,"
        " Tensor output_transform, Tensor? bias, int dilation, str activation, Tensor? post_scale,"
        " Tensor? post_shift) -> Tensor");
  m.def("conv3x3_winograd_isa() -> str", &winograd::conv3x3_winograd_isa);
}

TORCH_LIBRARY_IMPL(glcic_fast, CPU, m) {
  m.impl("conv3x3_winograd_bias_act", &winograd::conv3x3_winograd_bias_act_cpu);
}

}  // namespace glcic_fast
