// glcic_fast::masked_mse_fwd(pred, target, mask, mean) -> (loss, grad, grad_scale): in one pass,
//   loss_sum   = sum((mask * (pred - target))^2)          fp32 accumulation
//   grad       = 2 * mask^2 * (pred - target)              d loss_sum / d pred, in pred's dtype
//   weight_sum = sum(mask broadcast to pred's shape)
//   mean:  loss = loss_sum / weight_sum, grad_scale = 1 / weight_sum (both 0 if weight_sum == 0)
//   sum:   loss = loss_sum,              grad_scale = 1
// loss and grad_scale are fp32 scalars; d loss / d pred = grad * grad_scale. The scale is
// returned rather than applied because weight_sum is only known once the pass is over:
// the backward multiplies grad by grad_output * grad_scale, a pass it makes anyway.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "ops/masked_mse_layout.h"

namespace glcic_fast {

// The arguments, checked and in the dense layout the kernels index by flat offset: pred and
// target NCHW-contiguous, or channels_last when pred is (see masked_mse_memory_format).
struct MaskedMseInputs {
  at::Tensor pred;
  at::Tensor target;
  at::Tensor mask;
  MaskBroadcast broadcast;
  int64_t channels;  // C
  int64_t plane;     // H * W
};

// channels_last when pred is channels_last-contiguous and not also NCHW-contiguous, else
// NCHW. grad comes back in this layout (glcic_fast/ops/masked_mse.py mirrors the rule).
at::MemoryFormat masked_mse_memory_format(const at::Tensor& pred);

MaskedMseInputs prepare_masked_mse_inputs(const at::Tensor& pred, const at::Tensor& target,
                                          const at::Tensor& mask);

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_mse_fwd_cpu(const at::Tensor& pred,
                                                                  const at::Tensor& target,
                                                                  const at::Tensor& mask, bool mean);
#ifdef WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_mse_fwd_cuda(const at::Tensor& pred,
                                                                   const at::Tensor& target,
                                                                   const at::Tensor& mask, bool mean);
#endif

}  // namespace glcic_fast
