// CPU twin of the fused masked MSE (semantics in ops/masked_mse.h): one pass over pred,
// target and mask writes d loss_sum / d pred and the block's partial sums.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "ops/masked_mse.h"

namespace glcic_fast {

namespace {

// The work is cut into blocks of a fixed size whatever the thread count, and the blocks'
// partial sums are added in block order: the loss is bit-identical from call to call and
// for any torch.get_num_threads().
constexpr int64_t kBlockElements = 1 << 15;
// Independent accumulators: the adds do not wait on one another and the compiler can
// vectorise the lanes of a contiguous run.
constexpr int kLanes = 16;

struct Sums {
  float loss = 0.f;
  float weight = 0.f;

  void add(const Sums& other) {
    loss += other.loss;
    weight += other.weight;
  }
};

struct LaneSums {
  float loss[kLanes] = {};
  float weight[kLanes] = {};

  Sums fold() const {
    Sums sums;
    for (int lane = 0; lane < kLanes; ++lane) {
      sums.loss += loss[lane];
      sums.weight += weight[lane];
    }
    return sums;
  }
};

// The one formula every backend computes, in fp32.
template <typename T>
inline void accumulate(T p, T t, float w, T& g, float& loss, float& weight) {
  const float wd = w * (static_cast<float>(p) - static_cast<float>(t));
  g = static_cast<T>(2.f * w * wd);
  loss += wd * wd;
  weight += w;
}

// n elements whose weights are the n contiguous mask values m[0..n).
template <typename T, typename M>
Sums contiguous_run(const T* p, const T* t, const M* m, T* g, int64_t n) {
  LaneSums lanes;
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) {
      accumulate(p[k + lane], t[k + lane], static_cast<float>(m[k + lane]), g[k + lane], lanes.loss[lane],
                 lanes.weight[lane]);
    }
  }
  for (int lane = 0; k < n; ++k, ++lane) {
    accumulate(p[k], t[k], static_cast<float>(m[k]), g[k], lanes.loss[lane], lanes.weight[lane]);
  }
  return lanes.fold();
}

// Elements [begin, end) of an NCHW pred with an N x 1 x H x W mask: a contiguous run per
// (n, c) plane the range crosses, each against the contiguous mask row of image n.
template <typename T, typename M>
Sums planar_run(const T* p, const T* t, const M* m, T* g, int64_t begin, int64_t end, int64_t channels,
                int64_t plane) {
  Sums sums;
  for (int64_t i = begin; i < end;) {
    const int64_t plane_index = i / plane;
    const int64_t offset = i - plane_index * plane;
    const int64_t length = std::min(plane - offset, end - i);
    sums.add(contiguous_run(p + i, t + i, m + (plane_index / channels) * plane + offset, g + i, length));
    i += length;
  }
  return sums;
}

// `pixels` whole pixels of a channels_last pred with an N x 1 x H x W mask: the C channels
// of pixel k share the weight m[k].
template <typename T, typename M>
Sums interleaved_run(const T* p, const T* t, const M* m, T* g, int64_t pixels, int64_t channels) {
  LaneSums lanes;
  for (int64_t pixel = 0; pixel < pixels; ++pixel) {
    const int lane = static_cast<int>(pixel % kLanes);
    const float w = static_cast<float>(m[pixel]);
    const int64_t first = pixel * channels;
    for (int64_t c = 0; c < channels; ++c) {
      accumulate(p[first + c], t[first + c], w, g[first + c], lanes.loss[lane], lanes.weight[lane]);
    }
  }
  return lanes.fold();
}

template <typename T, typename M>
Sums masked_mse_pass(const MaskedMseInputs& in, at::Tensor& grad) {
  const T* p = in.pred.const_data_ptr<T>();
  const T* t = in.target.const_data_ptr<T>();
  const M* m = in.mask.const_data_ptr<M>();
  T* g = grad.mutable_data_ptr<T>();
  const int64_t numel = in.pred.numel();
  const int64_t channels = in.channels;
  // Interleaved blocks hold whole pixels so that a pixel's channels are never split.
  const bool interleaved = in.broadcast == MaskBroadcast::kInterleaved;
  const int64_t items = interleaved ? numel / channels : numel;
  const int64_t block = interleaved ? std::max<int64_t>(1, kBlockElements / channels) : kBlockElements;
  const int64_t num_blocks = (items + block - 1) / block;

  std::vector<Sums> partials(num_blocks);
  at::parallel_for(0, num_blocks, 1, [&](int64_t first_block, int64_t last_block) {
    for (int64_t b = first_block; b < last_block; ++b) {
      const int64_t begin = b * block;
      const int64_t end = std::min(items, begin + block);
      switch (in.broadcast) {
        case MaskBroadcast::kNone:
          partials[b] = contiguous_run(p + begin, t + begin, m + begin, g + begin, end - begin);
          break;
        case MaskBroadcast::kPlanar:
          partials[b] = planar_run(p, t, m, g, begin, end, channels, in.plane);
          break;
        case MaskBroadcast::kInterleaved:
          partials[b] = interleaved_run(p + begin * channels, t + begin * channels, m + begin,
                                        g + begin * channels, end - begin, channels);
          break;
      }
    }
  });
  Sums total;
  for (const Sums& partial : partials) {
    total.add(partial);
  }
  return total;
}

// Calls f(T{}) for the C++ type of a float32 / float16 / bfloat16 tensor (checked before).
template <typename F>
void with_float_type(at::ScalarType type, F&& f) {
  switch (type) {
    case at::kFloat:
      return f(float{});
    case at::kHalf:
      return f(at::Half{});
    case at::kBFloat16:
      return f(at::BFloat16{});
    default:
      TORCH_CHECK(false, "masked_mse: unsupported dtype ", type);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_mse_fwd_cpu(const at::Tensor& pred,
                                                                  const at::Tensor& target,
                                                                  const at::Tensor& mask, bool mean) {
  const MaskedMseInputs in = prepare_masked_mse_inputs(pred, target, mask);
  at::Tensor grad = at::empty_like(in.pred);
  Sums sums;
  with_float_type(in.pred.scalar_type(), [&](auto value_tag) {
    with_float_type(in.mask.scalar_type(), [&](auto mask_tag) {
      sums = masked_mse_pass<decltype(value_tag), decltype(mask_tag)>(in, grad);
    });
  });
  float loss = sums.loss;
  float grad_scale = 1.f;
  if (mean) {
    const bool any_weight = sums.weight != 0.f;
    loss = any_weight ? sums.loss / sums.weight : 0.f;
    grad_scale = any_weight ? 1.f / sums.weight : 0.f;
  }
  const auto fp32 = in.pred.options().dtype(at::kFloat);
  return {at::scalar_tensor(loss, fp32), grad, at::scalar_tensor(grad_scale, fp32)};
}

}  // namespace glcic_fast
