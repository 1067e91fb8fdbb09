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

#include <algorithm>
#include <optional>
#include <type_traits>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "../philox.h"
#include "block_mask.h"
#include "philox_cpu.h"
#include "vector_clones.h"

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

// Fills mask (planes, H, row_bytes), planes = N * Cm, and returns each sample's
// kept count over its Cm planes. Sample n's seeds fall below folded_cuts[n].
std::vector<int64_t> build_mask(uint64_t seed, const std::vector<uint32_t>& folded_cuts, const PlaneGeometry& g,
                                int64_t planes_per_sample, int64_t planes, uint8_t* mask) {
  std::vector<int64_t> plane_kept(planes);
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    PlaneScratch scratch(g);
    for (int64_t p = begin; p < end; ++p) {
      plane_kept[p] = build_plane_mask(seed, folded_cuts[p / planes_per_sample], p, g,
                                       mask + p * g.height * g.row_bytes, scratch);
    }
  });
  std::vector<int64_t> sample_kept(planes / planes_per_sample, 0);
  for (int64_t p = 0; p < planes; ++p) sample_kept[p / planes_per_sample] += plane_kept[p];
  return sample_kept;
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

// A kept value: x * scale in opmath, rounded once (kScaled); or x itself, its
// bits untouched, NaN payloads included (a fixed mask, which never scales).
template <bool kScaled, typename scalar_t, typename opmath_t>
inline scalar_t kept_value(scalar_t x, opmath_t scale) {
  if constexpr (kScaled) return static_cast<scalar_t>(static_cast<opmath_t>(x) * scale);
  return x;
}

// dst[w] = keep[w] ? kept_value(src[w]) : 0 for one row. A select, not a
// multiply by 0 or 1, so NaN and Inf never reach dropped positions; __restrict
// lets the compiler vectorise it (the product is taken before the select).
template <bool kScaled, typename scalar_t, typename opmath_t>
void scale_row(const scalar_t* __restrict src, scalar_t* __restrict dst, const uint8_t* __restrict keep,
               int64_t length, opmath_t scale) {
  for (int64_t w = 0; w < length; ++w) {
    if constexpr (kScaled) {
      const opmath_t scaled = static_cast<opmath_t>(src[w]) * scale;
      dst[w] = static_cast<scalar_t>(keep[w] ? scaled : opmath_t(0));
    } else {
      dst[w] = keep[w] ? src[w] : scalar_t(0);
    }
  }
}

// scale_row written back into its source: __restrict may not promise that
// source and destination differ.
template <bool kScaled, typename scalar_t, typename opmath_t>
void scale_row_in_place(scalar_t* data, const uint8_t* __restrict keep, int64_t length, opmath_t scale) {
  for (int64_t w = 0; w < length; ++w) {
    if constexpr (kScaled) {
      const opmath_t scaled = static_cast<opmath_t>(data[w]) * scale;
      data[w] = static_cast<scalar_t>(keep[w] ? scaled : opmath_t(0));
    } else {
      data[w] = keep[w] ? data[w] : scalar_t(0);
    }
  }
}

// The keep bits of `rows` consecutive rows of sample n, from row (c, h) on, as
// one bit string without each row's padding bits: rows * W bits into out
// (rows * W / 8 + 1 bytes).
void gather_row_bits(const PackedMaskView& mask, int64_t n, int64_t c, int64_t h, int64_t rows, int64_t W,
                     uint8_t* out) {
  const int64_t whole_bytes = W / 8;
  const int tail = static_cast<int>(W % 8);
  const uint32_t tail_bits = (1u << tail) - 1u;
  uint32_t pending = 0;  // bits not yet written: `fill` of them, fill < 8 between bytes
  int fill = 0;
  // Rows follow each other in the mask, but within one plane only when one plane serves every channel.
  const uint8_t* row = mask.row(n, c, h);
  const int64_t plane_bytes = mask.height * mask.row_bytes;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < whole_bytes; ++b) {
      pending |= static_cast<uint32_t>(row[b]) << fill;
      *out++ = static_cast<uint8_t>(pending);
      pending >>= 8;
    }
    if (tail > 0) {
      pending |= (row[whole_bytes] & tail_bits) << fill;
      fill += tail;
      if (fill >= 8) {
        *out++ = static_cast<uint8_t>(pending);
        pending >>= 8;
        fill -= 8;
      }
    }
    row += mask.row_bytes;
    if (++h == mask.height) {
      h = 0;
      if (mask.channel_planes == 0) row -= plane_bytes;
    }
  }
  if (fill > 0) *out = static_cast<uint8_t>(pending);
}

// dst[i] = bit i of bits ? kept_value(src[i]) : +0.0 for i < length, bit i
// being bit i % 8 of byte i / 8: the apply straight from a packed mask, with no
// keep bytes in between (unpacking them cost more than the apply on 16-wide
// maps). dst may be src (an in-place apply). The eight lanes of a mask byte are
// a GCC vector (vector_clones.h).
template <bool kScaled>
ROBUSTDROP_CLONE_INLINE void apply_by_bits_float(const float* src, float* dst, const uint8_t* __restrict bits,
                                                 int64_t length, float scale) {
  int64_t i = 0;
#if ROBUSTDROP_HAS_FLOAT8
  const Lanes8 lane_bit = {1u, 2u, 4u, 8u, 16u, 32u, 64u, 128u};
  for (; i + 8 <= length; i += 8) {
    Float8 values = load8(src + i);
    if constexpr (kScaled) values = values * scale;
    const Lanes8 bit = lane_bit & static_cast<uint32_t>(bits[i >> 3]);
    const Lanes8 kept = reinterpret_cast<Lanes8>(values) & reinterpret_cast<Lanes8>(bit == lane_bit);
    store8(dst + i, reinterpret_cast<Float8>(kept));
  }
#endif
  for (; i < length; ++i) dst[i] = select_kept(mask_bit(bits, i), kept_value<kScaled>(src[i], scale));
}

ROBUSTDROP_VECTOR_CLONES void scale_by_bits_float(const float* src, float* dst, const uint8_t* __restrict bits,
                                                  int64_t length, float scale) {
  apply_by_bits_float<true>(src, dst, bits, length, scale);
}

ROBUSTDROP_VECTOR_CLONES void select_by_bits_float(const float* src, float* dst, const uint8_t* __restrict bits,
                                                   int64_t length, float scale) {
  apply_by_bits_float<false>(src, dst, bits, length, scale);
}

// The float32 apply from packed bits: scaled, or a plain select.
template <bool kScaled>
void by_bits_float(const float* src, float* dst, const uint8_t* bits, int64_t length, float scale) {
  if constexpr (kScaled) {
    scale_by_bits_float(src, dst, bits, length, scale);
  } else {
    select_by_bits_float(src, dst, bits, length, scale);
  }
}

// A mask shared by every sample (Random Mask's fixed mask), float32 x (N, C, H, W)
// contiguous: the mask's bits are gathered once into one string of C*H*W bits,
// so each sample is one run, split into chunks of whole mask bytes.
template <bool kScaled>
void apply_shared_mask_float(const float* in, float* out, const PackedMaskView& mask,
                             const std::vector<float>& sample_scale, int64_t N, int64_t rows, int64_t W) {
  const int64_t sample_numel = rows * W;
  std::vector<uint8_t> bits(sample_numel / 8 + 1);
  gather_row_bits(mask, 0, 0, 0, rows, W, bits.data());
  constexpr int64_t kChunk = 8 * kApplyBatch;  // a multiple of 8: chunks start on a mask byte
  const int64_t chunks = (sample_numel + kChunk - 1) / kChunk;
  at::parallel_for(0, N * chunks, std::max<int64_t>(1, 32768 / std::min(kChunk, sample_numel)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / chunks, offset = (item % chunks) * kChunk;
      const int64_t index = n * sample_numel + offset;
      by_bits_float<kScaled>(in + index, out + index, bits.data() + offset / 8,
                             std::min(kChunk, sample_numel - offset), sample_scale[n]);
    }
  });
}

// out = keep ? in * scale[n] : 0 (kScaled), or keep ? in : 0, over an
// (N, C, H, W) tensor that is contiguous or channels_last; out has in's layout
// and may be in itself.
template <bool kScaled, typename scalar_t>
void apply_mask(const at::Tensor& in, const PackedMaskView& mask, const std::vector<float>& sample_scale,
                at::Tensor& out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t N = in.size(0), C = in.size(1), H = in.size(2), W = in.size(3);
  const scalar_t* in_ptr = in.data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const bool in_place = in_ptr == out_ptr;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (mask.sample_planes == 0 && !is_channels_last_4d(in)) {
      apply_shared_mask_float<kScaled>(in_ptr, out_ptr, mask, sample_scale, N, C * H, W);
      return;
    }
  }
  if (!is_channels_last_4d(in)) {
    // Rows of x are consecutive in memory, so a batch of them (within one
    // sample, which has one scale) is scaled in one long loop: short maps
    // (W = 7 or 14) would otherwise pay a loop per row.
    const int64_t batch_rows = std::max<int64_t>(1, kApplyBatch / std::max<int64_t>(W, 1));
    const int64_t sample_rows = C * H;
    at::parallel_for(0, N * C * H, std::max<int64_t>(1, 32768 / std::max<int64_t>(W, 1)), [&](int64_t begin, int64_t end) {
      // float32: the rows' mask bits as one string (gather_row_bits); other
      // dtypes: each row's keep bytes, starting W after the previous row's
      // (unpacking writes up to 7 bytes past a row, which the next row
      // overwrites, or the slack).
      std::vector<uint8_t> buffer(std::is_same_v<scalar_t, float> ? batch_rows * W / 8 + 1
                                                                  : batch_rows * W + 8 * mask.row_bytes);
      for (int64_t first = begin; first < end;) {
        const int64_t n = first / sample_rows;
        const int64_t rows = std::min({batch_rows, end - first, (n + 1) * sample_rows - first});
        // (c, h) of the batch's first row, then counted up: a division per row
        // cost more than the row's apply on short maps.
        int64_t c = (first - n * sample_rows) / H, h = (first - n * sample_rows) % H;
        const opmath_t s = static_cast<opmath_t>(sample_scale[n]);
        if constexpr (std::is_same_v<scalar_t, float>) {
          // Rows of whole mask bytes are already one bit string (within a
          // plane when one plane serves every channel); other widths are
          // gathered into one without each row's padding bits.
          const uint8_t* bits = mask.row(n, c, h);
          int64_t run = rows;
          if (W % 8 != 0) {
            gather_row_bits(mask, n, c, h, rows, W, buffer.data());
            bits = buffer.data();
          } else if (mask.channel_planes == 0) {
            run = std::min(rows, H - h);
          }
          by_bits_float<kScaled>(in_ptr + first * W, out_ptr + first * W, bits, run * W, s);
          first += run;
        } else {
          for (int64_t r = 0; r < rows; ++r) {
            unpack_row(mask.row(n, c, h), mask.row_bytes, buffer.data() + r * W);
            if (++h == H) {
              h = 0;
              ++c;
            }
          }
          if (in_place) {
            scale_row_in_place<kScaled>(out_ptr + first * W, buffer.data(), rows * W, s);
          } else {
            scale_row<kScaled>(in_ptr + first * W, out_ptr + first * W, buffer.data(), rows * W, s);
          }
          first += rows;
        }
      }
    });
  } else {
    at::parallel_for(0, N * H, std::max<int64_t>(1, 32768 / std::max<int64_t>(W * C, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t h = row % H, n = row / H;
        const opmath_t s = static_cast<opmath_t>(sample_scale[n]);
        for (int64_t w = 0; w < W; ++w) {
          const scalar_t* src = in_ptr + (row * W + w) * C;
          scalar_t* dst = out_ptr + (row * W + w) * C;
          for (int64_t c = 0; c < C; ++c) {
            dst[c] = mask_bit(mask.row(n, c, h), w) ? kept_value<kScaled>(src[c], s) : scalar_t(0);
          }
        }
      }
    });
  }
}

}  // namespace

PackedMaskView block_mask_view(const at::Tensor& mask) {
  const int64_t mask_channels = mask.size(1);
  return {mask.data_ptr<uint8_t>(), mask_channels, mask_channels == 1 ? 0 : 1, mask.size(2), mask.size(3)};
}

void apply_mask_into(const at::Tensor& input, const PackedMaskView& mask, const std::vector<float>& sample_scale,
                     at::Tensor& out) {
  if (input.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "block_mask_apply_cpu",
                                  [&] { apply_mask<true, scalar_t>(input, mask, sample_scale, out); });
}

void select_mask_into(const at::Tensor& input, const PackedMaskView& mask, at::Tensor& out) {
  if (input.numel() == 0) return;
  const std::vector<float> unused_scale(input.size(0), 1.0f);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fixed_mask_apply_cpu",
                                  [&] { apply_mask<false, scalar_t>(input, mask, unused_scale, out); });
}

namespace {

// y = keep ? x * scale[n] : 0 for a block mask (N, Cm, H, ceil(W/8)).
at::Tensor apply_block_mask(const at::Tensor& input, const at::Tensor& mask, const std::vector<float>& sample_scale) {
  const at::Tensor in = walkable(input);
  const at::Tensor bits = mask.contiguous();
  at::Tensor out = at::empty_like(in);
  apply_mask_into(in, block_mask_view(bits), sample_scale, out);
  return out;
}

// The scale of each of the N samples from a block-mask scale of one value or of
// G groups of N / G consecutive samples.
std::vector<float> per_sample_scale(const at::Tensor& scale, int64_t N) {
  const at::Tensor values = scale.reshape({-1}).contiguous();
  const float* value = values.data_ptr<float>();
  const int64_t per_value = samples_per_scale(N, scale);
  std::vector<float> sample_scale(N);
  for (int64_t n = 0; n < N; ++n) sample_scale[n] = value[n / per_value];
  return sample_scale;
}

}  // namespace

at::Tensor apply_mask_dispatch(const at::Tensor& input, const at::Tensor& mask, float scale) {
  return apply_block_mask(input, mask, std::vector<float>(input.size(0), scale));
}

std::vector<uint32_t> sample_cuts(int64_t N, double gamma, const std::optional<at::Tensor>& sample_gamma) {
  if (!sample_gamma.has_value()) return std::vector<uint32_t>(N, folded_threshold(static_cast<float>(gamma)));
  const at::Tensor values = sample_gamma->contiguous();
  const float* probability = values.data_ptr<float>();
  std::vector<uint32_t> cuts(N);
  for (int64_t n = 0; n < N; ++n) cuts[n] = folded_threshold(probability[n]);
  return cuts;
}

namespace {

// scale_g = float32(numel_g / (eps + kept_g)) for G groups of N / G samples, each
// of numel_g = numel / G elements; or ones without normalisation.
std::vector<float> group_scales(const std::vector<int64_t>& sample_kept, int64_t numel, int64_t groups,
                                bool normalize, double eps) {
  const int64_t per_group = static_cast<int64_t>(sample_kept.size()) / groups;
  std::vector<float> scales(groups);
  for (int64_t g = 0; g < groups; ++g) {
    int64_t kept = 0;
    for (int64_t n = g * per_group; n < (g + 1) * per_group; ++n) kept += sample_kept[n];
    scales[g] = normalized_scale(numel / groups, kept, normalize, eps);
  }
  return scales;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_mask_forward_cpu(
    const at::Tensor& x, int64_t seed, double gamma, int64_t block_size, bool couple_channels, bool normalize,
    double eps, const std::optional<at::Tensor>& sample_gamma, int64_t normalize_groups) {
  check_block_mask_forward_args(x, gamma, block_size, eps);
  check_sample_gamma_args(x, sample_gamma, normalize_groups);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t mask_channels = couple_channels ? 1 : C;
  // An empty x keeps nothing: its mask (non-empty when only C is 0 and channels are coupled) is zeros.
  at::Tensor mask = at::empty({N, mask_channels, H, mask_row_bytes(W)}, x.options().dtype(at::kByte));
  std::vector<int64_t> sample_kept(N, 0);
  if (x.numel() == 0) {
    mask.zero_();
  } else {
    sample_kept = build_mask(static_cast<uint64_t>(seed), sample_cuts(N, gamma, sample_gamma),
                             plane_geometry(H, W, block_size), mask_channels, N * mask_channels,
                             mask.data_ptr<uint8_t>());
    if (couple_channels) {
      for (int64_t& kept : sample_kept) kept *= C;
    }
  }
  std::vector<float> scales = group_scales(sample_kept, x.numel(), normalize_groups, normalize, eps);
  at::Tensor scale = at::from_blob(scales.data(), {normalize_groups}, at::kFloat).clone();
  if (normalize_groups == 1) scale = scale.reshape({});
  at::Tensor y = apply_block_mask(x, mask, per_sample_scale(scale, N));
  return {y, mask, scale};
}

at::Tensor block_mask_backward_cpu(const at::Tensor& grad_y, const at::Tensor& mask, const at::Tensor& scale) {
  check_block_mask_backward_args(grad_y, mask, scale);
  return apply_block_mask(grad_y, mask, per_sample_scale(scale, grad_y.size(0)));
}

}  // namespace

TORCH_LIBRARY_IMPL(robustdrop, CPU, m) {
  m.impl("block_mask_forward", &block_mask_forward_cpu);
  m.impl("block_mask_backward", &block_mask_backward_cpu);
}

}  // namespace robustdrop
