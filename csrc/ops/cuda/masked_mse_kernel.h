// Launcher of the fused masked MSE CUDA kernels (semantics in ops/masked_mse.h). Plain C++
// over raw pointers, so that masked_mse_kernel.cu needs no ATen header and compiles fast.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ops/masked_mse_layout.h"

namespace glcic_fast {
namespace gpu {

enum class ScalarKind : int { kFloat32, kFloat16, kBFloat16 };

struct MaskedMseProblem {
  const void* pred;    // dense, numel elements of value_kind
  const void* target;  // pred's dtype and layout
  const void* mask;    // dense, mask_kind, indexed as `broadcast` says
  void* grad;          // output: pred's dtype and layout
  ScalarKind value_kind;
  ScalarKind mask_kind;
  MaskBroadcast broadcast;
  int64_t numel;
  int64_t channels;  // C
  int64_t plane;     // H * W
  bool mean;
};

// Blocks of the first stage on a GPU with this many SMs; the launch needs a workspace of
// 2 * grid floats for their partial sums.
int masked_mse_grid_size(const MaskedMseProblem& problem, int multiprocessor_count);

// Stage 1 (grid blocks) writes grad and one partial (loss, weight) sum per block, without
// atomics; stage 2 (one block) adds the partials in a fixed order and writes the fp32
// scalars *loss and *grad_scale. Both on `stream`; returns the launch error, if any.
cudaError_t launch_masked_mse(const MaskedMseProblem& problem, int grid, float* partials, float* loss,
                              float* grad_scale, cudaStream_t stream);

}  // namespace gpu
}  // namespace glcic_fast
