// CamDrop on the CPU (DESIGN.md 4.2), bit-identical to
// python/robustdrop/reference/cam_mask.py.
//
// Four steps, two of which read x:
//   1. CAM (reads x once): a[n, c] = the classifier row of target[n] summed
//      over groups of C'/C, then cam[n] = sum_c a[n, c] * x[n, c] in float32.
//      Every channel of a sample must be summed before any of its positions
//      can be ranked, so this read cannot be merged with the apply.
//   2. Selection (N*(H*W + C) values, x not read): per sample, the k-th
//      largest unique key by std::nth_element (linear time, no full sort);
//      a value is a candidate iff its key is at least the k-th.
//   3. Mask (x not read): DropBlock's seeds, drawn only in candidate channels
//      and kept only at candidate positions, dilated, packed and counted;
//      every other channel is an all-keep plane, with no Philox work at all.
//   4. Apply (reads x once, writes y once): DropBlock's pass, after the
//      batch-wide count has fixed the scale.
// The backward is DropBlock's (block_mask_backward) on the saved bit mask.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <optional>
#include <vector>

#include "../checks.h"
#include "../philox.h"
#include "block_mask.h"

namespace robustdrop {
namespace {

// A uint32 whose order is the float order, with -0.0 equal to +0.0 and every
// NaN above +inf (torch.topk's order).
inline uint32_t ordered_key(float value) {
  if (std::isnan(value)) return 0xFFFFFFFFu;
  if (value == 0.0f) value = 0.0f;
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// flags[i] = 1 for the k largest of values[0 .. length), ties to the lower
// index. Each value gets a unique 64-bit key (ordered value, then reversed
// index), so the candidates are exactly the keys >= the k-th largest key.
void topk_flags(const float* values, int64_t length, int64_t k, uint8_t* flags, std::vector<uint64_t>& keys,
                std::vector<uint64_t>& order) {
  if (k <= 0 || k >= length) {
    std::fill(flags, flags + length, static_cast<uint8_t>(k > 0));
    return;
  }
  keys.resize(length);
  for (int64_t i = 0; i < length; ++i) {
    keys[i] = (static_cast<uint64_t>(ordered_key(values[i])) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(i));
  }
  order.assign(keys.begin(), keys.end());
  std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), std::greater<uint64_t>());
  const uint64_t kth = order[k - 1];
  for (int64_t i = 0; i < length; ++i) flags[i] = keys[i] >= kth;
}

// a (N, C) float32: weight[target[n]] summed over consecutive groups of C'/C,
// in group order. Rejects class indices outside [0, K).
std::vector<float> class_channel_weights(const at::Tensor& weight, const at::Tensor& target, int64_t channels) {
  const at::Tensor rows = weight.to(at::kFloat).contiguous();
  const at::Tensor classes = target.contiguous();
  const int64_t N = classes.size(0), K = rows.size(0), width = rows.size(1), group = width / channels;
  const int64_t* class_ptr = classes.data_ptr<int64_t>();
  const float* row_ptr = rows.data_ptr<float>();
  std::vector<float> weights(N * channels);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t t = class_ptr[n];
    TORCH_CHECK_VALUE(t >= 0 && t < K, "target must hold class indices in [0, K) = [0, ", K, "), got ", t,
                      " for sample ", n);
    const float* row = row_ptr + t * width;
    for (int64_t c = 0; c < channels; ++c) {
      float sum = 0.0f;
      for (int64_t j = 0; j < group; ++j) sum += row[c * group + j];
      weights[n * channels + c] = sum;
    }
  }
  return weights;
}

// Positions of one sample summed per task: enough work to amortise a task.
constexpr int64_t kCamChunk = 1024;

// cam (N, H*W) float32 = sum_c a[n, c] * float32(x[n, c]) for x contiguous or channels_last.
template <typename scalar_t>
void class_activation_map(const at::Tensor& x, const std::vector<float>& weights, std::vector<float>& cam) {
  const int64_t N = x.size(0), C = x.size(1), positions = x.size(2) * x.size(3);
  const int64_t chunks = (positions + kCamChunk - 1) / kCamChunk;
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  const bool channels_last = is_channels_last_4d(x);
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks, first = (task % chunks) * kCamChunk;
      const int64_t last = std::min(positions, first + kCamChunk);
      const float* a = weights.data() + n * C;
      float* out = cam.data() + n * positions;
      if (!channels_last) {
        // Channel by channel over a contiguous run of positions: a vectorisable axpy.
        std::fill(out + first, out + last, 0.0f);
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* row = x_ptr + (n * C + c) * positions;
          const float weight = a[c];
          for (int64_t p = first; p < last; ++p) out[p] += weight * static_cast<float>(row[p]);
        }
      } else {
        // Position by position over the contiguous channels: a dot product.
        for (int64_t p = first; p < last; ++p) {
          const scalar_t* column = x_ptr + (n * positions + p) * C;
          float sum = 0.0f;
          for (int64_t c = 0; c < C; ++c) sum += a[c] * static_cast<float>(column[c]);
          out[p] = sum;
        }
      }
    }
  });
}

// Candidate flags of every sample: spatial (N, H*W) and channel (N, C).
void select_candidates(const std::vector<float>& cam, const std::vector<float>& weights, int64_t N, int64_t C,
                       int64_t positions, int64_t spatial_topk, int64_t channel_topk, std::vector<uint8_t>& spatial,
                       std::vector<uint8_t>& channel) {
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> keys, order;
    for (int64_t n = begin; n < end; ++n) {
      topk_flags(cam.data() + n * positions, positions, spatial_topk, spatial.data() + n * positions, keys, order);
      topk_flags(weights.data() + n * C, C, channel_topk, channel.data() + n * C, keys, order);
    }
  });
}

// Fills mask (N, C, H, row_bytes) and returns the kept count. sample_cut[n] is
// sample n's folded seed threshold. spatial and channel are empty when every
// position and channel is a candidate.
int64_t build_cam_mask(uint64_t seed, const std::vector<uint32_t>& sample_cut, const PlaneGeometry& g, int64_t N,
                       int64_t C, const std::vector<uint8_t>& spatial, const std::vector<uint8_t>& channel,
                       uint8_t* mask) {
  const int64_t plane_bytes = g.height * g.row_bytes, positions = g.height * g.width;
  const bool guided = !channel.empty();
  std::atomic<int64_t> kept{0};
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    PlaneScratch scratch(g);
    int64_t local = 0;
    for (int64_t plane = begin; plane < end; ++plane) {
      uint8_t* mask_plane = mask + plane * plane_bytes;
      if (guided && !channel[plane]) {
        fill_kept_plane(g, mask_plane);
        local += positions;
      } else {
        const uint8_t* allowed = guided ? spatial.data() + (plane / C) * positions : nullptr;
        local += build_plane_mask(seed, sample_cut[plane / C], plane, g, mask_plane, scratch, allowed);
      }
    }
    kept += local;
  });
  return kept.load();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cam_mask_forward_cpu(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& target, const std::optional<at::Tensor>& guided,
    int64_t seed, double gamma, int64_t block_size, int64_t spatial_topk, int64_t channel_topk, bool normalize,
    double eps, const std::optional<at::Tensor>& sample_gamma) {
  check_cam_mask_forward_args(input, weight, target, guided, gamma, block_size, spatial_topk, channel_topk, eps);
  check_sample_gamma_args(input, sample_gamma, 1);
  const at::Tensor x = walkable(input);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), positions = H * W;
  const std::vector<float> weights = class_channel_weights(weight, target, C);
  at::Tensor mask = at::empty({N, C, H, mask_row_bytes(W)}, x.options().dtype(at::kByte));
  int64_t kept = 0;
  if (x.numel() == 0) {
    mask.zero_();
  } else {
    std::vector<uint8_t> spatial, channel;  // empty: every position and channel is a candidate
    if (!guided.has_value() || guided->item<bool>()) {
      std::vector<float> cam(N * positions);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cam_mask_cpu",
                                      [&] { class_activation_map<scalar_t>(x, weights, cam); });
      spatial.resize(N * positions);
      channel.resize(N * C);
      select_candidates(cam, weights, N, C, positions, spatial_topk, channel_topk, spatial, channel);
    }
    kept = build_cam_mask(static_cast<uint64_t>(seed), sample_cuts(N, gamma, sample_gamma),
                          plane_geometry(H, W, block_size), N, C, spatial, channel, mask.data_ptr<uint8_t>());
  }
  const float scale = normalized_scale(x.numel(), kept, normalize, eps);
  at::Tensor y = apply_mask_dispatch(x, mask, scale);
  return {y, mask, at::scalar_tensor(scale, x.options().dtype(at::kFloat))};
}

}  // namespace

TORCH_LIBRARY_IMPL(robustdrop, CPU, m) { m.impl("cam_mask_forward", &cam_mask_forward_cpu); }

}  // namespace robustdrop
