// CUDA implementation of glcic_fast::masked_mse_fwd (semantics in ops/masked_mse.h): checks,
// allocation and the current stream here; the kernels in masked_mse_kernel.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "ops/cuda/masked_mse_kernel.h"
#include "ops/masked_mse.h"

namespace glcic_fast {

namespace {

gpu::ScalarKind scalar_kind(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return gpu::ScalarKind::kFloat32;
    case at::kHalf:
      return gpu::ScalarKind::kFloat16;
    case at::kBFloat16:
      return gpu::ScalarKind::kBFloat16;
    default:
      TORCH_CHECK(false, "masked_mse: unsupported dtype ", type);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_mse_fwd_cuda(const at::Tensor& pred,
                                                                   const at::Tensor& target,
                                                                   const at::Tensor& mask, bool mean) {
  const MaskedMseInputs in = prepare_masked_mse_inputs(pred, target, mask);
  const c10::cuda::CUDAGuard device_guard(in.pred.device());
  at::Tensor grad = at::empty_like(in.pred);
  const auto fp32 = in.pred.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({}, fp32);
  at::Tensor grad_scale = at::empty({}, fp32);
  const gpu::MaskedMseProblem problem{
      in.pred.const_data_ptr(),
      in.target.const_data_ptr(),
      in.mask.const_data_ptr(),
      grad.mutable_data_ptr(),
      scalar_kind(in.pred.scalar_type()),
      scalar_kind(in.mask.scalar_type()),
      in.broadcast,
      in.pred.numel(),
      in.channels,
      in.plane,
      mean,
  };
  const int grid = gpu::masked_mse_grid_size(problem, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  at::Tensor partials = at::empty({2 * static_cast<int64_t>(grid)}, fp32);
  C10_CUDA_CHECK(gpu::launch_masked_mse(problem, grid, partials.mutable_data_ptr<float>(),
                                        loss.mutable_data_ptr<float>(), grad_scale.mutable_data_ptr<float>(),
                                        at::cuda::getCurrentCUDAStream()));
  return {loss, grad, grad_scale};
}

}  // namespace glcic_fast
