// The pieces of the CPU DropBlock kernel (block_mask_kernel.cpp) that other
// block-mask ops reuse: CamDrop draws the same seeds, filtered by its
// candidates, and applies its mask with the same pass.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "../checks.h"

namespace robustdrop {

struct PlaneGeometry {
  int64_t height, width, block;     // H, W, bs
  int64_t seed_height, seed_width;  // Hs = H - bs + 1, Ws = W - bs + 1
  int64_t row_bytes;                // ceil(W / 8)
};

PlaneGeometry plane_geometry(int64_t height, int64_t width, int64_t block);

struct PlaneScratch {
  std::vector<uint8_t> seeds;        // (Hs, Ws) seed bits
  std::vector<int32_t> row_hits;     // (Hs, W) seeds in each row's window
  std::vector<int32_t> column_hits;  // (W) seeds in the bs x bs window above the current output row
  std::vector<uint8_t> keep;         // (8 * row_bytes) keep bytes of the current output row, zero-padded

  explicit PlaneScratch(const PlaneGeometry& g)
      : seeds(g.seed_height * g.seed_width), row_hits(g.seed_height * g.width), column_hits(g.width),
        keep(8 * g.row_bytes, 0) {}
};

// Writes the keep bits (H, row_bytes) of seed-grid plane `plane` and returns
// how many elements it keeps. With `allowed` ((H, W) flags, nullptr for none)
// a seed at (i, j) counts only where allowed[i * W + j] is 1.
int64_t build_plane_mask(uint64_t seed, uint32_t folded_cut, int64_t plane, const PlaneGeometry& g,
                         uint8_t* mask_plane, PlaneScratch& scratch, const uint8_t* allowed = nullptr);

// Each sample's folded seed threshold (philox_cpu.h folded_threshold): float32(gamma)
// for all N, or sample_gamma[n] when given ((N,) float32, already checked).
std::vector<uint32_t> sample_cuts(int64_t N, double gamma, const std::optional<at::Tensor>& sample_gamma);

// Writes the keep bits of a plane without seeds (every element kept, padding bits 0).
void fill_kept_plane(const PlaneGeometry& g, uint8_t* mask_plane);

// float32(numel / (eps + kept)) computed in float64, or 1 without normalisation.
float normalized_scale(int64_t numel, int64_t kept, bool normalize, double eps);

// Where the keep bits of row (n, c, h) of an (N, C, H, W) tensor start in a
// packed mask: ((n * sample_planes + c * channel_planes) * height + h) * row_bytes.
// A block mask (N, Cm, H, ceil(W/8)) has sample_planes = Cm and channel_planes 1,
// or 0 when one plane serves every channel; a fixed mask (C, H, ceil(W/8)) shared
// by the batch has sample_planes 0. The view does not own the bytes.
struct PackedMaskView {
  const uint8_t* bits;
  int64_t sample_planes, channel_planes, height, row_bytes;

  const uint8_t* row(int64_t n, int64_t c, int64_t h) const {
    return bits + ((n * sample_planes + c * channel_planes) * height + h) * row_bytes;
  }
};

// The view of a contiguous block mask (N, 1 or C, H, ceil(W/8)).
PackedMaskView block_mask_view(const at::Tensor& mask);

// out = keep ? input * sample_scale[n] : 0 for input (N, C, H, W) contiguous or
// channels_last, with sample_scale of N values; writes into `out`, which has
// input's sizes and strides and may be input itself (an in-place apply).
void apply_mask_into(const at::Tensor& input, const PackedMaskView& mask, const std::vector<float>& sample_scale,
                     at::Tensor& out);

// out = keep ? input : 0, the kept values' bits untouched (NaN payloads
// included); otherwise as apply_mask_into. Random Mask's fixed mask.
void select_mask_into(const at::Tensor& input, const PackedMaskView& mask, at::Tensor& out);

// keep ? input * scale : 0 for input (N, C, H, W) and mask (N, 1 or C, H, ceil(W/8));
// the result has input's layout (contiguous or channels_last).
at::Tensor apply_mask_dispatch(const at::Tensor& input, const at::Tensor& mask, float scale);

}  // namespace robustdrop
