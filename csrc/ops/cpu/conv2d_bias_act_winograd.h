// The Winograd convolution's shared pieces (conv2d_bias_act_kernel.cpp): what one call
// computes, described once, and the per-instruction-set code's entry points.
//
// F(m x m, 3 x 3) with alpha = m + 2: a tile of m x m output pixels of one image is
//   Y = AT [ sum_cin (G w G^T) .* (BT d BT^T) ] AT^T
// over the alpha x alpha input patch d around it. A conv with dilation D is D^2 ordinary
// 3x3 convs on the interleaved sub-grids {(i + D*y, j + D*x)}: a tile's output pixels and its
// input patch are D apart, so one tile never mixes sub-grids and no copy is interleaved.
#pragma once

#include <cstdint>

namespace glcic_fast::winograd {

enum class Activation { kNone, kRelu, kSigmoid, kHardtanh };

// One call's arguments, read by every tile. Tensors are dense, channels innermost.
struct Problem {
  int alpha = 0;  // m + 2
  int m = 0;
  int64_t height = 0, width = 0, cin = 0, cout = 0, dilation = 1;
  const float* bt = nullptr;  // alpha x alpha input transform
  const float* at = nullptr;  // m x alpha output transform
  const float* x = nullptr;   // N x H x W x cin
  // G w G^T per (cout, cin), in panels of kChannelRun output channels: alpha^2 x
  // (cout / kChannelRun) x cin x kChannelRun, so a micro-kernel's columns are contiguous.
  const float* u = nullptr;
  const float* bias = nullptr;        // cout values or null
  const float* post_scale = nullptr;  // cout values or null (with post_shift)
  const float* post_shift = nullptr;
  Activation activation = Activation::kNone;
  float* out = nullptr;  // N x H x W x cout
};

// A tile: image n, output pixels (oy + D*i, ox + D*j) for i, j < m (those inside the image).
struct Tile {
  int64_t n, oy, ox;
};

// Channels are moved in runs of this many floats (cin and cout are multiples of it).
constexpr int kChannelRun = 16;

// Floats from one row of the transformed inputs v to the next: cin and a run more, so that
// the micro-kernel's rows, read side by side, fall in different L1 sets (rows a multiple of
// 1 KiB apart, as cin = 256 would put them, share a few sets and evict one another).
constexpr int64_t v_row_stride(int64_t cin) { return cin + kChannelRun; }

// One instruction set's code. The transforms and the GEMM work on a block of `count` tiles
// whose transformed inputs v (alpha^2 x rows x v_row_stride(cin)) and products p (alpha^2 x rows x cout)
// fit in a core's cache; rows = count rounded up to a multiple of rows_multiple.
struct Kernels {
  const char* name;
  int rows_multiple;
  void (*input_transform)(const Problem&, const Tile*, int64_t count, int64_t rows, float* v);
  void (*gemm)(const Problem&, int64_t rows, const float* v, float* p);
  void (*output_transform)(const Problem&, const Tile*, int64_t count, int64_t rows, const float* p);
};

}  // namespace glcic_fast::winograd
