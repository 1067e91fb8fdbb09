// DropBlock on the CPU (DESIGN.md 4.1).
//
// Pass 1 (mask): per (n, c) plane, draw the seed grid from the shared RNG,
// dilate it by a bs x bs window with two running window sums (rows, then
// columns), and write the keep bits; the kept count is summed on the way.
// x is not read. Pass 2 (apply): y = keep ? x * scale : 0, one read of x and
// one write of y. The backward is pass 2 again on grad_y.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "../philox.h"
#include "block_mask.h"
#include "philox_cpu.h"

namespace robustdrop {
namespace {

// Packs 8 keep bytes (each 0 or 1, element 0 first) into one mask byte, bit b
// for element b: the multiply gathers every byte's low bit into the top byte.
inline uint8_t pack_eight(const uint8_t* keep) {
  uint64_t lanes;
  std::memcpy(&lanes, keep, 8);
  return static_cast<uint8_t>((lanes * 0x0102040810204080ull) >> 56);
}

}  // namespace

PlaneGeometry plane_geometry(int64_t height, int64_t width, int64_t block) {
  return {height, width, block, height - block + 1, width - block + 1, mask_row_bytes(width)};
}

int64_t build_plane_mask(uint64_t seed, uint32_t folded_cut, int64_t plane, const PlaneGeometry& g,
                         uint8_t* mask_plane, PlaneScratch& scratch, const uint8_t* allowed) {
  const int64_t seeds_per_plane = g.seed_height * g.seed_width;
  uint8_t* seeds = scratch.seeds.data();
  bernoulli_bytes(seed, static_cast<uint64_t>(plane * seeds_per_plane), seeds_per_plane, folded_cut, seeds);
  if (allowed != nullptr) {
    for (int64_t i = 0; i < g.seed_height; ++i) {
      for (int64_t j = 0; j < g.seed_width; ++j) seeds[i * g.seed_width + j] &= allowed[i * g.width + j];
    }
  }
  // row_hits[i][w]: seeds in row i at columns w-bs+1 .. w (a running window sum).
  for (int64_t i = 0; i < g.seed_height; ++i) {
    const uint8_t* seed_row = seeds + i * g.seed_width;
    int32_t* hit_row = scratch.row_hits.data() + i * g.width;
    int32_t window = 0;
    for (int64_t w = 0; w < g.width; ++w) {
      if (w < g.seed_width) window += seed_row[w];
      if (w - g.block >= 0) window -= seed_row[w - g.block];
      hit_row[w] = window;
    }
  }
  // column_hits[w] at output row h: row_hits summed over rows h-bs+1 .. h.
  int32_t* column_hits = scratch.column_hits.data();
  uint8_t* keep = scratch.keep.data();
  std::fill(column_hits, column_hits + g.width, 0);
  int64_t kept = 0;
  for (int64_t h = 0; h < g.height; ++h) {
    if (h < g.seed_height) {
      const int32_t* add = scratch.row_hits.data() + h * g.width;
      for (int64_t w = 0; w < g.width; ++w) column_hits[w] += add[w];
    }
    if (h - g.block >= 0) {
      const int32_t* sub = scratch.row_hits.data() + (h - g.block) * g.width;
      for (int64_t w = 0; w < g.width; ++w) column_hits[w] -= sub[w];
    }
    int32_t row_kept = 0;
    for (int64_t w = 0; w < g.width; ++w) {
      keep[w] = column_hits[w] == 0;
      row_kept += keep[w];
    }
    kept += row_kept;
    uint8_t* mask_row = mask_plane + h * g.row_bytes;
    for (int64_t byte = 0; byte < g.row_bytes; ++byte) mask_row[byte] = pack_eight(keep + 8 * byte);
  }
  return kept;
}

void fill_kept_plane(const PlaneGeometry& g, uint8_t* mask_plane) {
  // Whole bytes of ones, then the last byte's W % 8 low bits (padding bits stay 0).
  for (int64_t byte = 0; byte < g.row_bytes; ++byte) {
    const int64_t bits = std::min<int64_t>(8, g.width - 8 * byte);
    mask_plane[byte] = static_cast<uint8_t>((1u << bits) - 1u);
  }
  for (int64_t h = 1; h < g.height; ++h) std::memcpy(mask_plane + h * g.row_bytes, mask_plane, g.row_bytes);
}

float normalized_scale(int64_t numel, int64_t kept, bool normalize, double eps) {
  return normalize ? static_cast<float>(static_cast<double>(numel) / (eps + static_cast<double>(kept))) : 1.0f;
}

namespace {

// Fills mask (planes, H, row_bytes) and returns the kept count over those planes.
int64_t build_mask(uint64_t seed, float gamma, const PlaneGeometry& g, int64_t planes, uint8_t* mask) {
  const uint32_t folded_cut = folded_threshold(gamma);
  std::atomic<int64_t> kept{0};
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    PlaneScratch scratch(g);
    int64_t local = 0;
    for (int64_t p = begin; p < end; ++p) {
      local += build_plane_mask(seed, folded_cut, p, g, mask + p * g.height * g.row_bytes, scratch);
    }
    kept += local;
  });
  return kept.load();
}

// Elements scaled per batch of rows in the contiguous apply.
constexpr int64_t kApplyBatch = 4096;

inline bool mask_bit(const uint8_t* mask_row, int64_t w) { return (mask_row[w >> 3] >> (w & 7)) & 1; }

// The 8 keep bytes (0 or 1, bit 0 first) of every mask byte value.
struct UnpackTable {
  uint64_t lanes[256];
  UnpackTable() {
    for (int value = 0; value < 256; ++value) {
      uint64_t bytes = 0;
      for (int b = 0; b < 8; ++b) bytes |= static_cast<uint64_t>((value >> b) & 1) << (8 * b);
      lanes[value] = bytes;
    }
  }
};

// keep[w] = bit w of the packed row, for w < 8 * row_bytes.
inline void unpack_row(const uint8_t* mask_row, int64_t row_bytes, uint8_t* keep) {
  static const UnpackTable table;
  for (int64_t byte = 0; byte < row_bytes; ++byte) std::memcpy(keep + 8 * byte, &table.lanes[mask_row[byte]], 8);
}

// dst[w] = keep[w] ? src[w] * scale : 0 for one row. A select, not a multiply
// by 0 or 1, so NaN and Inf never reach dropped positions; __restrict lets the
// compiler vectorise it.
template <typename scalar_t, typename opmath_t>
void scale_row(const scalar_t* __restrict src, scalar_t* __restrict dst, const uint8_t* __restrict keep,
               int64_t length, opmath_t scale) {
  for (int64_t w = 0; w < length; ++w) {
    const opmath_t scaled = static_cast<opmath_t>(src[w]) * scale;
    dst[w] = static_cast<scalar_t>(keep[w] ? scaled : opmath_t(0));
  }
}

// out = keep ? in * scale : 0 over an (N, C, H, W) tensor that is contiguous
// or channels_last (out has in's layout); mask is (N, Cm, H, row_bytes).
template <typename scalar_t>
void apply_mask(const at::Tensor& in, const at::Tensor& mask, float scale, at::Tensor& out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t N = in.size(0), C = in.size(1), H = in.size(2), W = in.size(3);
  const int64_t mask_channels = mask.size(1), row_bytes = mask.size(3);
  const scalar_t* in_ptr = in.data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const uint8_t* mask_ptr = mask.data_ptr<uint8_t>();
  const opmath_t s = static_cast<opmath_t>(scale);
  auto mask_row = [&](int64_t n, int64_t c, int64_t h) {
    return mask_ptr + ((n * mask_channels + (mask_channels == 1 ? 0 : c)) * H + h) * row_bytes;
  };
  if (!is_channels_last_4d(in)) {
    // Rows of x are consecutive in memory, so a batch of them is scaled in one
    // long loop: short maps (W = 7 or 14) would otherwise pay a loop per row.
    const int64_t batch_rows = std::max<int64_t>(1, kApplyBatch / std::max<int64_t>(W, 1));
    at::parallel_for(0, N * C * H, std::max<int64_t>(1, 32768 / std::max<int64_t>(W, 1)), [&](int64_t begin, int64_t end) {
      // Each row's keep bytes start W after the previous row's; unpacking writes
      // up to 7 bytes past a row, which the next row overwrites, or the slack.
      std::vector<uint8_t> keep(batch_rows * W + 8 * row_bytes);
      for (int64_t first = begin; first < end; first += batch_rows) {
        const int64_t rows = std::min(batch_rows, end - first);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row = first + r, h = row % H, c = (row / H) % C, n = row / (H * C);
          unpack_row(mask_row(n, c, h), row_bytes, keep.data() + r * W);
        }
        scale_row(in_ptr + first * W, out_ptr + first * W, keep.data(), rows * W, s);
      }
    });
  } else {
    at::parallel_for(0, N * H, std::max<int64_t>(1, 32768 / std::max<int64_t>(W * C, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t h = row % H, n = row / H;
        for (int64_t w = 0; w < W; ++w) {
          const scalar_t* src = in_ptr + (row * W + w) * C;
          scalar_t* dst = out_ptr + (row * W + w) * C;
          for (int64_t c = 0; c < C; ++c) {
            dst[c] = mask_bit(mask_row(n, c, h), w) ? static_cast<scalar_t>(static_cast<opmath_t>(src[c]) * s)
                                                    : scalar_t(0);
          }
        }
      }
    });
  }
}

}  // namespace

at::Tensor apply_mask_dispatch(const at::Tensor& input, const at::Tensor& mask, float scale) {
  const at::Tensor in = walkable(input);
  at::Tensor out = at::empty_like(in);
  if (in.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "block_mask_apply_cpu",
                                  [&] { apply_mask<scalar_t>(in, mask.contiguous(), scale, out); });
  return out;
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_mask_forward_cpu(const at::Tensor& x, int64_t seed, double gamma,
                                                                       int64_t block_size, bool couple_channels,
                                                                       bool normalize, double eps) {
  check_block_mask_forward_args(x, gamma, block_size, eps);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t mask_channels = couple_channels ? 1 : C;
  // An empty x keeps nothing: its mask (non-empty when only C is 0 and channels are coupled) is zeros.
  at::Tensor mask = at::empty({N, mask_channels, H, mask_row_bytes(W)}, x.options().dtype(at::kByte));
  int64_t kept = 0;
  if (x.numel() == 0) {
    mask.zero_();
  } else {
    const PlaneGeometry g = plane_geometry(H, W, block_size);
    kept = build_mask(static_cast<uint64_t>(seed), static_cast<float>(gamma), g, N * mask_channels,
                      mask.data_ptr<uint8_t>());
    if (couple_channels) kept *= C;
  }
  const float scale = normalized_scale(x.numel(), kept, normalize, eps);
  at::Tensor y = apply_mask_dispatch(x, mask, scale);
  return {y, mask, at::scalar_tensor(scale, x.options().dtype(at::kFloat))};
}

at::Tensor block_mask_backward_cpu(const at::Tensor& grad_y, const at::Tensor& mask, const at::Tensor& scale) {
  check_block_mask_backward_args(grad_y, mask, scale);
  return apply_mask_dispatch(grad_y, mask, scale.item<float>());
}

}  // namespace

TORCH_LIBRARY_IMPL(robustdrop, CPU, m) {
  m.impl("block_mask_forward", &block_mask_forward_cpu);
  m.impl("block_mask_backward", &block_mask_backward_cpu);
}

}  // namespace robustdrop
