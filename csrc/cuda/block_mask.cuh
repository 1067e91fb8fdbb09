// The pieces of the CUDA DropBlock kernel (block_mask_kernel.cu) that other
// mask ops reuse: CamDrop (cam_mask_kernel.cu) draws the same seeds, filtered
// by its candidates, and applies its mask with the same pass; the fixed mask
// (fixed_mask_kernel.cu) applies its one mask for the whole batch with it.
//
// Host functions only (every kernel stays private to block_mask_kernel.cu), so
// no relocatable device code is needed. They live in robustdrop::block_mask_cuda
// so that they can never clash at link time with the CPU kernels' helpers of
// the same names (csrc/cpu/block_mask.h).
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <tuple>

namespace robustdrop {
namespace block_mask_cuda {

// The seed grid and mask of one call.
struct MaskGeometry {
  int64_t planes;                   // N * Cm mask planes
  int64_t height, width, block;     // H, W, bs
  int64_t seed_height, seed_width;  // Hs = H - bs + 1, Ws = W - bs + 1
  int64_t row_bytes;                // ceil(W / 8)
};

// CamDrop's candidates: a seed at (plane p = n * C + c, i, j) counts only if
// channel[p] and spatial[n * H * W + i * W + j] are both nonzero. Both arrays
// are uint8 flags (0 or 1) on the mask's device: channel (N, C), spatial
// (N, H * W) (the position of a seed is its block's top-left corner on the
// H x W map). Seeds are only drawn where they can count, so a non-candidate
// channel costs no Philox work at all.
struct CandidateFilter {
  const uint8_t* spatial;  // (N, H * W)
  const uint8_t* channel;  // (N, C)
  int64_t channels;        // C: mask plane p belongs to sample p / C
};

// The seed probability of each mask plane: gamma everywhere, or, when
// per_sample is given (block_mask_forward's sample_gamma), per_sample[n] for
// the planes of sample n = p / planes_per_sample. The values stay on the
// device: the kernels read them, the host never waits for them.
struct SeedRate {
  float gamma;
  const float* per_sample;    // (N,) float32 on the mask's device, or null
  int64_t planes_per_sample;  // Cm

  static SeedRate uniform(float gamma) { return {gamma, nullptr, 1}; }

  // The rate of a forward op's (gamma, sample_gamma): gamma, or sample_gamma's
  // (N,) float32 values for planes_per_sample planes each. `values` receives
  // sample_gamma made contiguous, which must outlive the launches.
  static SeedRate of(double gamma, const std::optional<at::Tensor>& sample_gamma, int64_t planes_per_sample,
                     at::Tensor& values) {
    if (!sample_gamma.has_value()) return uniform(static_cast<float>(gamma));
    values = sample_gamma->contiguous();
    return {static_cast<float>(gamma), values.data_ptr<float>(), planes_per_sample};
  }
};

// Where pass 1 adds its kept bits: one counter per normalisation group, group
// k holding planes k * planes_per_group .. (k + 1) * planes_per_group - 1.
struct KeptCounter {
  unsigned long long* total;  // (G,) counters zeroed by the caller, or null: nothing to count
  int64_t planes_per_group;   // Cm * N / G (every plane when G == 1)
};

// Where the apply kernel gets its scale. Make one with the factories below.
struct ScaleSource {
  const float* given;                  // the scale values, or null: derive one from kept
  int64_t samples_per_value;           // sample n's scale is given[n / samples_per_value]
  const unsigned long long* kept;      // kept bits over every mask plane, or null for scale 1
  unsigned long long kept_multiplier;  // C when one mask plane serves all channels, else 1
  double numel, eps;
  float* store;                        // where block 0 stores the derived scale, or null
  bool multiply;                       // false: out = keep ? in : 0, a pure select

  // The forward of one normalisation group: every thread derives
  // numel / (eps + kept * kept_multiplier) from the device count (1 when kept
  // is null), so the host never waits for it, and block 0 stores it.
  static ScaleSource from_count(const unsigned long long* kept, unsigned long long kept_multiplier, double numel,
                                double eps, float* store) {
    return {nullptr, std::numeric_limits<int64_t>::max(), kept, kept_multiplier, numel, eps, store, true};
  }
  // Scale values already on the device (the backward, or a forward of G > 1
  // groups): one value, or one per samples_per_value consecutive samples.
  static ScaleSource from_values(const float* values, int64_t samples_per_value) {
    return {values, samples_per_value, nullptr, 1, 0.0, 0.0, nullptr, true};
  }
  // No scale at all (the fixed mask): kept values are copied, not multiplied by
  // 1, so every value, NaN payloads included, passes bit for bit.
  static ScaleSource none() {
    return {nullptr, std::numeric_limits<int64_t>::max(), nullptr, 1, 0.0, 0.0, nullptr, false};
  }
};

// The current device's multiprocessor count, cached per device.
int multiprocessor_count();

// Blocks for a grid-stride loop over `work_items` items with `threads` threads
// per block: enough to fill the GPU `blocks_per_sm` times over, never more
// than the work needs (at least 1).
unsigned grid_size(int64_t work_items, int threads, int blocks_per_sm);

// Pass 1 (x is not read): writes the bit-packed keep mask (planes, H, row_bytes)
// from the seeds uniform(seed, flat index) < the plane's rate and adds its kept
// bits to the counter of each plane's group (when kept.total is not null).
// filter == nullptr: plain DropBlock, every seed counts (the code path without
// any filter work). Asynchronous on `stream`; `options` gives the device for
// scratch (bs > 64).
void launch_mask(const MaskGeometry& g, uint64_t seed, const SeedRate& rate, uint8_t* mask, const KeptCounter& kept,
                 const at::TensorOptions& options, cudaStream_t stream, const CandidateFilter* filter = nullptr);

// (y, mask, scale) of a forward on an empty x: nothing kept, no launch. The
// mask (N, mask_channels, H, ceil(W/8)) is zeros (non-empty only for coupled
// masks of zero channels); the scale follows the formula with kept = 0 for
// each of the groups (0-d for one group, else (groups,)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_forward(const at::Tensor& x, int64_t mask_channels,
                                                             bool normalize, double eps, int64_t groups = 1);

// Pass 2: out = keep ? input * scale : 0 for input (N, C, H, W) contiguous or
// channels_last and mask (N, 1 or C, H, ceil(W/8)), or (C, H, ceil(W/8)) for
// one mask shared by every sample. out has input's sizes and strides and may
// be input itself (an in-place apply). When the source derives the scale,
// block 0 stores it to source.store.
void apply_mask_into(const at::Tensor& input, const at::Tensor& mask, const ScaleSource& source, at::Tensor& out,
                     cudaStream_t stream);

// apply_mask_into a new tensor in input's layout (see walkable).
at::Tensor apply_mask(const at::Tensor& input, const at::Tensor& mask, const ScaleSource& source,
                      cudaStream_t stream);

// Calls launch(std::integral_constant<int, V>{}) with the vector width V in
// {8, 4, 2, 1} that vec names (1 for anything else): one instantiation per width.
template <typename Launch>
void with_vector_width(int vec, Launch&& launch) {
  switch (vec) {
    case 8: launch(std::integral_constant<int, 8>{}); break;
    case 4: launch(std::integral_constant<int, 4>{}); break;
    case 2: launch(std::integral_constant<int, 2>{}); break;
    default: launch(std::integral_constant<int, 1>{}); break;
  }
}

}  // namespace block_mask_cuda
}  // namespace robustdrop
