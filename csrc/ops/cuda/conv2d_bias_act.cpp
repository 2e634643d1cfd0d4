// CUDA implementation of glcic_fast::conv3x3_bias_act (semantics in ops/conv2d_bias_act.cpp):
// argument checks, the channels_last output, the current stream here; the kernel in
// conv2d_bias_act_kernel.cu.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "ops/cuda/conv2d_bias_act_kernel.h"

namespace glcic_fast {

namespace {

constexpr int64_t kChannels = gpu::kConv3x3Channels;
constexpr int64_t kK = gpu::kConv3x3K;

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

// Dense in `format` and 16-byte aligned (the kernel's cp.async and vector stores need both).
at::Tensor dense_aligned(const at::Tensor& t, at::MemoryFormat format) {
  at::Tensor dense = t.contiguous(format);
  return aligned16(dense) ? dense : dense.clone(format);
}

gpu::Conv3x3Activation parse_activation(c10::string_view activation) {
  if (activation == "relu") return gpu::Conv3x3Activation::kRelu;
  if (activation == "sigmoid") return gpu::Conv3x3Activation::kSigmoid;
  if (activation == "hardtanh") return gpu::Conv3x3Activation::kHardtanh;
  TORCH_CHECK_VALUE(activation == "none", "conv3x3_bias_act: activation must be relu, sigmoid, hardtanh or none, got ",
                    activation);
  return gpu::Conv3x3Activation::kNone;
}

// A per-output-channel vector (bias, post_scale, post_shift): 256 values in x's dtype on x's
// device, made contiguous; undefined when absent.
at::Tensor channel_vector(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == kChannels, "conv3x3_bias_act: ", name, " must have shape (",
                    kChannels, ",), got ", t->sizes());
  TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), "conv3x3_bias_act: ", name, " is ", t->scalar_type(),
                   " but x is ", x.scalar_type());
  TORCH_CHECK(t->device() == x.device(), "conv3x3_bias_act: ", name, " is on ", t->device(), " but x is on ",
              x.device());
  return t->contiguous();
}

at::Tensor& conv3x3_bias_act_out_cuda(const at::Tensor& x_in, const at::Tensor& packed_weight,
                                      const std::optional<at::Tensor>& bias_in, int64_t dilation,
                                      c10::string_view activation, const std::optional<at::Tensor>& post_scale_in,
                                      const std::optional<at::Tensor>& post_shift_in, at::Tensor& out) {
  TORCH_CHECK_VALUE(x_in.dim() == 4 && x_in.size(1) == kChannels,
                    "conv3x3_bias_act: x must be N x 256 x H x W, got shape ", x_in.sizes());
  TORCH_CHECK(x_in.is_cuda(), "conv3x3_bias_act: x must be a CUDA tensor, got one on ", x_in.device());
  const at::ScalarType dtype = x_in.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16,
                   "conv3x3_bias_act: x must be float16 or bfloat16 (the kernel runs on tensor cores), got ", dtype);
  TORCH_CHECK_VALUE(packed_weight.dim() == 2 && packed_weight.size(0) == kChannels && packed_weight.size(1) == kK,
                    "conv3x3_bias_act: packed_weight must be 256 x 2304 ([cout][kh][kw][cin]), got shape ",
                    packed_weight.sizes());
  TORCH_CHECK_TYPE(packed_weight.scalar_type() == dtype, "conv3x3_bias_act: packed_weight is ",
                   packed_weight.scalar_type(), " but x is ", dtype);
  TORCH_CHECK(packed_weight.device() == x_in.device(), "conv3x3_bias_act: packed_weight is on ",
              packed_weight.device(), " but x is on ", x_in.device());
  TORCH_CHECK_VALUE(dilation >= 1 && dilation < (int64_t{1} << 30),
                    "conv3x3_bias_act: dilation must be in [1, 2^30), got ", dilation);
  const gpu::Conv3x3Activation act = parse_activation(activation);
  const at::Tensor bias = channel_vector(bias_in, "bias", x_in);
  const at::Tensor post_scale = channel_vector(post_scale_in, "post_scale", x_in);
  const at::Tensor post_shift = channel_vector(post_shift_in, "post_shift", x_in);
  TORCH_CHECK_VALUE(post_scale.defined() == post_shift.defined(),
                    "conv3x3_bias_act: post_scale and post_shift go together: give both or neither");
  const int64_t batch = x_in.size(0), height = x_in.size(2), width = x_in.size(3);
  TORCH_CHECK_VALUE(out.sizes() == x_in.sizes(), "conv3x3_bias_act: out must have shape ", x_in.sizes(),
                    " (stride 1, padding == dilation keep H x W), got ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == dtype, "conv3x3_bias_act: out is ", out.scalar_type(), " but x is ", dtype);
  TORCH_CHECK(out.device() == x_in.device(), "conv3x3_bias_act: out is on ", out.device(), " but x is on ",
              x_in.device());
  TORCH_CHECK_VALUE(out.is_contiguous(at::MemoryFormat::ChannelsLast),
                    "conv3x3_bias_act: out must be contiguous in channels_last memory format");

  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(props->major >= 8, "conv3x3_bias_act: the kernel needs an sm_80 or newer GPU (cp.async, ldmatrix, "
              "bf16 mma.sync); ", x_in.device(), " is sm_", props->major, props->minor);
  if (out.numel() == 0) return out;

  at::assert_no_internal_overlap(out);
  at::assert_no_overlap(out, x_in);
  at::assert_no_overlap(out, packed_weight);
  const at::Tensor x = dense_aligned(x_in, at::MemoryFormat::ChannelsLast);
  const at::Tensor weight = dense_aligned(packed_weight, at::MemoryFormat::Contiguous);
  // The kernel stores 16-byte vectors: an unaligned out (a view at an odd offset) gets the
  // result through an aligned temporary.
  at::Tensor target = aligned16(out) ? out : at::empty_like(out, at::MemoryFormat::ChannelsLast);

  const gpu::Conv3x3Problem problem{
      x.const_data_ptr(),
      weight.const_data_ptr(),
      bias.defined() ? bias.const_data_ptr() : nullptr,
      post_scale.defined() ? post_scale.const_data_ptr() : nullptr,
      post_shift.defined() ? post_shift.const_data_ptr() : nullptr,
      target.mutable_data_ptr(),
      dtype == at::kBFloat16 ? gpu::Conv3x3Dtype::kBFloat16 : gpu::Conv3x3Dtype::kFloat16,
      act,
      batch,
      height,
      width,
      dilation,
  };
  const char* problem_error = gpu::conv3x3_problem_error(problem);
  TORCH_CHECK(problem_error == nullptr, "conv3x3_bias_act: ", problem_error, " (x of shape ", x_in.sizes(), ")");
  C10_CUDA_CHECK(gpu::launch_conv3x3_bias_act(problem, at::cuda::getCurrentCUDAStream()));
  if (!target.is_same(out)) out.copy_(target);
  return out;
}

at::Tensor conv3x3_bias_act_cuda(const at::Tensor& x, const at::Tensor& packed_weight,
                                 const std::optional<at::Tensor>& bias, int64_t dilation, c10::string_view activation,
                                 const std::optional<at::Tensor>& post_scale,
                                 const std::optional<at::Tensor>& post_shift) {
  TORCH_CHECK_VALUE(x.dim() == 4, "conv3x3_bias_act: x must be N x 256 x H x W, got shape ", x.sizes());
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
  return conv3x3_bias_act_out_cuda(x, packed_weight, bias, dilation, activation, post_scale, post_shift, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(glcic_fast, CUDA, m) {
  m.impl("conv3x3_bias_act", &conv3x3_bias_act_cuda);
  m.impl("conv3x3_bias_act.out", &conv3x3_bias_act_out_cuda);
}

}  // namespace glcic_fast
