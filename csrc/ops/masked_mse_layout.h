// How glcic_fast::masked_mse_fwd's kernels map a mask element onto pred elements. Free of
// ATen and CUDA headers so that the CPU code and the CUDA kernel (.cu) can both include it.
#pragma once

namespace glcic_fast {

// pred is dense N x C x H x W, either NCHW-contiguous or channels_last; i is a flat offset
// into its memory. The mask is dense too.
enum class MaskBroadcast : int {
  // The mask has pred's shape and memory layout: pred element i has weight mask[i].
  kNone,
  // N x 1 x H x W mask, NCHW pred (C > 1): weight mask[(i / (C * H * W)) * H * W + i % (H * W)].
  kPlanar,
  // N x 1 x H x W mask, channels_last pred (C > 1): weight mask[i / C].
  kInterleaved,
};

}  // namespace glcic_fast
