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
#include <vector>

#include "../checks.h"
#include "../philox.h"

namespace robustdrop {
namespace {

struct PlaneGeometry {
  int64_t height, width, block;   // H, W, bs
  int64_t seed_height, seed_width;  // Hs = H - bs + 1, Ws = W - bs + 1
  int64_t row_bytes;              // ceil(W / 8)
};

// Writes the keep bits of one plane and returns how many elements it keeps.
// seeds (Hs*Ws), row_hits (Hs*W) and column_hits (W) are scratch space.
int64_t build_plane_mask(uint64_t seed, float gamma, int64_t plane, const PlaneGeometry& g, uint8_t* mask_plane,
                         std::vector<uint8_t>& seeds, std::vector<int32_t>& row_hits,
                         std::vector<int32_t>& column_hits) {
  const int64_t seeds_per_plane = g.seed_height * g.seed_width;
  const uint64_t first = static_cast<uint64_t>(plane * seeds_per_plane);
  // One Philox call yields the words of four consecutive indices.
  PhiloxWords words = philox_group(seed, first >> 2);
  for (int64_t k = 0; k < seeds_per_plane; ++k) {
    const uint64_t index = first + static_cast<uint64_t>(k);
    if (k > 0 && (index & 3) == 0) words = philox_group(seed, index >> 2);
    seeds[k] = word_to_uniform(words.w[index & 3]) < gamma;
  }
  // row_hits[i][w]: seeds in row i at columns w-bs+1 .. w (a running window sum).
  for (int64_t i = 0; i < g.seed_height; ++i) {
    const uint8_t* seed_row = seeds.data() + i * g.seed_width;
    int32_t* hit_row = row_hits.data() + i * g.width;
    int32_t window = 0;
    for (int64_t w = 0; w < g.width; ++w) {
      if (w < g.seed_width) window += seed_row[w];
      if (w - g.block >= 0) window -= seed_row[w - g.block];
      hit_row[w] = window;
    }
  }
  // column_hits[w] at output row h: row_hits summed over rows h-bs+1 .. h.
  std::fill(column_hits.begin(), column_hits.end(), 0);
  int64_t kept = 0;
  for (int64_t h = 0; h < g.height; ++h) {
    if (h < g.seed_height) {
      const int32_t* add = row_hits.data() + h * g.width;
      for (int64_t w = 0; w < g.width; ++w) column_hits[w] += add[w];
    }
    if (h - g.block >= 0) {
      const int32_t* sub = row_hits.data() + (h - g.block) * g.width;
      for (int64_t w = 0; w < g.width; ++w) column_hits[w] -= sub[w];
    }
    uint8_t* mask_row = mask_plane + h * g.row_bytes;
    for (int64_t byte = 0; byte < g.row_bytes; ++byte) {
      uint8_t bits = 0;
      const int64_t w_end = std::min<int64_t>(8, g.width - byte * 8);
      for (int64_t b = 0; b < w_end; ++b) bits |= static_cast<uint8_t>(column_hits[byte * 8 + b] == 0) << b;
      mask_row[byte] = bits;
      kept += __builtin_popcount(bits);
    }
  }
  return kept;
}

// Fills mask (planes, H, row_bytes) and returns the kept count over those planes.
int64_t build_mask(uint64_t seed, float gamma, const PlaneGeometry& g, int64_t planes, uint8_t* mask) {
  std::atomic<int64_t> kept{0};
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> seeds(g.seed_height * g.seed_width);
    std::vector<int32_t> row_hits(g.seed_height * g.width);
    std::vector<int32_t> column_hits(g.width);
    int64_t local = 0;
    for (int64_t p = begin; p < end; ++p) {
      local += build_plane_mask(seed, gamma, p, g, mask + p * g.height * g.row_bytes, seeds, row_hits, column_hits);
    }
    kept += local;
  });
  return kept.load();
}

inline bool mask_bit(const uint8_t* mask_row, int64_t w) { return (mask_row[w >> 3] >> (w & 7)) & 1; }

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
    at::parallel_for(0, N * C * H, std::max<int64_t>(1, 32768 / std::max<int64_t>(W, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t h = row % H, c = (row / H) % C, n = row / (H * C);
        const uint8_t* bits = mask_row(n, c, h);
        const scalar_t* src = in_ptr + row * W;
        scalar_t* dst = out_ptr + row * W;
        for (int64_t w = 0; w < W; ++w) {
          dst[w] = mask_bit(bits, w) ? static_cast<scalar_t>(static_cast<opmath_t>(src[w]) * s) : scalar_t(0);
        }
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

// Contiguous or channels_last as given; any other strides are made contiguous.
at::Tensor walkable(const at::Tensor& t) { return (t.is_contiguous() || is_channels_last_4d(t)) ? t : t.contiguous(); }

at::Tensor apply_mask_dispatch(const at::Tensor& input, const at::Tensor& mask, float scale) {
  const at::Tensor in = walkable(input);
  at::Tensor out = at::empty_like(in);
  if (in.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "block_mask_apply_cpu",
                                  [&] { apply_mask<scalar_t>(in, mask.contiguous(), scale, out); });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_mask_forward_cpu(const at::Tensor& x, int64_t seed, double gamma,
                                                                       int64_t block_size, bool couple_channels,
                                                                       bool normalize, double eps) {
  check_block_mask_forward_args(x, gamma, block_size, eps);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t mask_channels = couple_channels ? 1 : C;
  at::Tensor mask = at::empty({N, mask_channels, H, mask_row_bytes(W)}, x.options().dtype(at::kByte));
  int64_t kept = 0;
  if (x.numel() > 0) {
    const PlaneGeometry g{H, W, block_size, H - block_size + 1, W - block_size + 1, mask_row_bytes(W)};
    kept = build_mask(static_cast<uint64_t>(seed), static_cast<float>(gamma), g, N * mask_channels,
                      mask.data_ptr<uint8_t>());
    if (couple_channels) kept *= C;
  }
  const float scale =
      normalize ? static_cast<float>(static_cast<double>(x.numel()) / (eps + static_cast<double>(kept))) : 1.0f;
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
