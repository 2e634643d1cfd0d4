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
// CUDA only (sm_80+): there is no CPU kernel.
#include <torch/library.h>

#ifdef WITH_CUDA
#include "ops/cuda/conv2d_bias_act_kernel.h"
#endif

namespace glcic_fast {

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
}

}  // namespace glcic_fast
