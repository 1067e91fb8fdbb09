// The pieces of the CUDA DropBlock kernel (block_mask_kernel.cu) that other
// block-mask ops reuse: CamDrop (cam_mask_kernel.cu) draws the same seeds,
// filtered by its candidates, and applies its mask with the same pass.
//
// Host functions only (every kernel stays private to block_mask_kernel.cu), so
// no relocatable device code is needed. They live in robustdrop::block_mask_cuda
// so that they can never clash at link time with the CPU kernels' helpers of
// the same names (csrc/cpu/block_mask.h).
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>
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

// Where the apply kernel gets its scale: the backward passes the forward's
// scale; the forward passes the kept count (or nothing when not normalising)
// and a place to store the scale it derives.
struct ScaleSource {
  const float* given;                  // backward: the forward's scale
  const unsigned long long* kept;      // forward: kept bits over the mask planes, or null for scale 1
  unsigned long long kept_multiplier;  // C when one mask plane serves all channels, else 1
  double numel, eps;
  float* store;                        // forward: the 0-d scale output
};

// The current device's multiprocessor count, cached per device.
int multiprocessor_count();

// Blocks for a grid-stride loop over `work_items` items with `threads` threads
// per block: enough to fill the GPU `blocks_per_sm` times over, never more
// than the work needs (at least 1).
unsigned grid_size(int64_t work_items, int threads, int blocks_per_sm);

// Pass 1 (x is not read): writes the bit-packed keep mask (planes, H, row_bytes)
// and, when kept is not null, adds its kept bits to *kept (zero-initialised by
// the caller). filter == nullptr: plain DropBlock, every seed counts (the code
// path without any filter work). Asynchronous on `stream`; `options` gives the
// device for scratch (bs > 64).
void launch_mask(const MaskGeometry& g, uint64_t seed, float gamma, uint8_t* mask, unsigned long long* kept,
                 const at::TensorOptions& options, cudaStream_t stream, const CandidateFilter* filter = nullptr);

// (y, mask, scale) of a forward on an empty x: nothing kept, no launch. The
// mask (N, mask_channels, H, ceil(W/8)) is zeros (non-empty only for coupled
// masks of zero channels); the scale follows the formula with kept = 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_forward(const at::Tensor& x, int64_t mask_channels,
                                                             bool normalize, double eps);

// Pass 2: out = keep ? input * scale : 0 for input (N, C, H, W) and mask
// (N, 1 or C, H, ceil(W/8)), in input's layout (see walkable). In the forward,
// block 0 stores the derived scale to source.store.
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
