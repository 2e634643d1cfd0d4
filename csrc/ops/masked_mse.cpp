// Registration of glcic_fast::masked_mse_fwd (semantics in masked_mse.h) and the argument
// checks its CPU and CUDA implementations share.
#include <torch/library.h>

#include "ops/masked_mse.h"

namespace glcic_fast {

namespace {

bool is_supported_float(at::ScalarType type) {
  return type == at::kFloat || type == at::kHalf || type == at::kBFloat16;
}

}  // namespace

at::MemoryFormat masked_mse_memory_format(const at::Tensor& pred) {
  return !pred.is_contiguous() && pred.is_contiguous(at::MemoryFormat::ChannelsLast)
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

MaskedMseInputs prepare_masked_mse_inputs(const at::Tensor& pred, const at::Tensor& target,
                                          const at::Tensor& mask) {
  TORCH_CHECK_VALUE(pred.dim() == 4, "masked_mse: pred must be N x C x H x W, got shape ", pred.sizes());
  TORCH_CHECK_VALUE(target.sizes() == pred.sizes(), "masked_mse: target has shape ", target.sizes(),
                    " but pred has shape ", pred.sizes());
  const int64_t channels = pred.size(1);
  TORCH_CHECK_VALUE(mask.dim() == 4 && mask.size(0) == pred.size(0) && mask.size(2) == pred.size(2) &&
                        mask.size(3) == pred.size(3) && (mask.size(1) == 1 || mask.size(1) == channels),
                    "masked_mse: mask must be N x 1 x H x W or N x C x H x W for pred of shape ",
                    pred.sizes(), ", got ", mask.sizes());
  TORCH_CHECK_TYPE(is_supported_float(pred.scalar_type()),
                   "masked_mse: pred must be float32, float16 or bfloat16, got ", pred.scalar_type());
  TORCH_CHECK_TYPE(target.scalar_type() == pred.scalar_type(), "masked_mse: target is ",
                   target.scalar_type(), " but pred is ", pred.scalar_type());
  TORCH_CHECK_TYPE(is_supported_float(mask.scalar_type()),
                   "masked_mse: mask must be float32, float16 or bfloat16 weights, got ", mask.scalar_type(),
                   " (convert a bool or integer mask with mask.to(pred.dtype))");
  TORCH_CHECK(target.device() == pred.device() && mask.device() == pred.device(),
              "masked_mse: pred, target and mask must be on one device, got ", pred.device(), ", ",
              target.device(), " and ", mask.device());

  const at::MemoryFormat format = masked_mse_memory_format(pred);
  const bool broadcast = mask.size(1) != channels;
  return MaskedMseInputs{
      pred.contiguous(format),
      target.contiguous(format),
      // A one-channel mask is laid out the same way in both formats.
      broadcast ? mask.contiguous() : mask.contiguous(format),
      !broadcast ? MaskBroadcast::kNone
      : format == at::MemoryFormat::ChannelsLast ? MaskBroadcast::kInterleaved
                                                 : MaskBroadcast::kPlanar,
      channels,
      pred.size(2) * pred.size(3),
  };
}

// A fragment, not TORCH_LIBRARY: every op's registration file adds its own schema to the
// glcic_fast namespace, and only one TORCH_LIBRARY block per namespace may exist.
TORCH_LIBRARY_FRAGMENT(glcic_fast, m) {
  m.def("masked_mse_fwd(Tensor pred, Tensor target, Tensor mask, bool mean)"
        " -> (Tensor loss, Tensor grad, Tensor grad_scale)");
}

TORCH_LIBRARY_IMPL(glcic_fast, CPU, m) {
  m.impl("masked_mse_fwd", &masked_mse_fwd_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(glcic_fast, CUDA, m) {
  m.impl("masked_mse_fwd", &masked_mse_fwd_cuda);
}
#endif

}  // namespace glcic_fast
