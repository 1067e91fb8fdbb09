// DropBlock on CUDA (DESIGN.md 4.1), bit-identical to csrc/cpu/block_mask_kernel.cpp.
//
// Forward: two passes and no host-device synchronisation.
//   Pass 1, mask (x is not read): draw the seed grid (N, Cm, Hs, Ws) with the
//     shared Philox generator, seed iff uniform < gamma, or < sample_gamma[n]
//     read on the device for the planes of sample n; dilate every seed into
//     its bs x bs block, write the bit-packed keep mask (N, Cm, H, ceil(W/8))
//     and add the number of kept bits to the device counter of the plane's
//     normalisation group (G counters of N / G consecutive samples each).
//   Pass 2, apply: y = keep ? x * scale : 0, one read of x and one write of y.
//     One group: every thread derives scale = numel / (eps + kept) from the
//     counter (so the host never waits for the count) and thread 0 of block 0
//     stores it in the 0-d float32 scale output. G > 1 groups: a small kernel
//     first derives the (G,) scales, each from its group's count and numel / G,
//     and the apply reads the scale of each element's group.
// Backward: pass 2 on grad_y with the scale read from the forward's tensor.
// The fixed mask (fixed_mask_kernel.cu) runs pass 2 alone, with one mask for
// every sample and no scale.
//
// Pass 1 has two strategies.
//   Fused tiles (bs <= 64, the usual case): one thread block per tile of up to
//     64 output rows x 64 output columns of one plane (64 / H whole consecutive
//     planes share a tile when H <= 32). The tile's seed region, at most
//     (64 + bs - 1) rows x 128 columns, is drawn into shared memory as bits,
//     dilated along rows with shifts and along columns with ORs, packed into
//     mask bytes and counted: about 3 KiB of shared memory for every shape.
//   Separable (bs > 64): the seed grid as bits in global scratch (each seed
//     drawn once), the row dilation (O(bs / 32) word operations per 32
//     columns), then the column dilation (O(bs) word ORs per 32 columns),
//     the mask and the count. Scratch: two bits per element at most.
//
// Both strategies take an optional candidate filter (CamDrop, block_mask.cuh):
// a seed then counts only at candidate positions of candidate channels, and
// Philox is only evaluated for groups of four indices that hold a candidate
// (tiles with no candidate channel skip the draw). The filter is a template
// parameter, so DropBlock compiles to exactly the unfiltered code. The host
// launchers are shared with cam_mask_kernel.cu through block_mask.cuh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../checks.h"
#include "../philox.h"
#include "block_mask.cuh"

namespace robustdrop {
namespace block_mask_cuda {
namespace {

// ---------------------------------------------------------------------------
// Device code
// ---------------------------------------------------------------------------

constexpr int kMaskThreads = 256;
constexpr int kApplyThreads = 256;
constexpr int kTileRows = 64;       // output rows of a fused tile
constexpr int kTileCols = 64;       // output columns of a fused tile: 8 mask bytes, two words
constexpr int kFusedMaxBlock = 64;  // largest bs the fused kernel takes
// A fused tile's seed region row holds the 128 seed columns w0 - 64 .. w0 + 63
// as bits; bit kRegionLeft is column w0. A block of bs <= 64 reaches back at
// most to column w0 - 63.
constexpr int kRegionWords = 4;
constexpr int kRegionLeft = 64;
constexpr int kMaxRegionRows = kTileRows + kFusedMaxBlock - 1;
static_assert(kTileRows <= kMaskThreads, "a filtered tile gives each of its planes one thread");

template <typename T>
__host__ __device__ __forceinline__ T imin(T a, T b) {
  return a < b ? a : b;
}

template <typename T>
__host__ __device__ __forceinline__ T imax(T a, T b) {
  return a > b ? a : b;
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The low n bits set, for n >= 0 (all 32 when n >= 32).
__host__ __device__ __forceinline__ uint32_t low_bits(int64_t n) { return n >= 32 ? ~0u : (1u << n) - 1u; }

// ---- Bit rows -------------------------------------------------------------
// A bit row is an array of uint32 words; bit b of word k is position 32k + b.

// Positions pos .. pos + 63 of a bit row of num_words words as one uint64
// (bit 0 = position pos); positions outside the row read as 0. pos may be
// negative.
__host__ __device__ __forceinline__ uint64_t load_bits64(const uint32_t* words, int64_t num_words, int64_t pos) {
  const int64_t k = pos >> 5;  // floor(pos / 32), also for negative pos
  const int shift = static_cast<int>(pos & 31);
  auto word = [&](int64_t i) -> uint64_t { return (i >= 0 && i < num_words) ? words[i] : 0u; };
  const uint64_t low = word(k) | (word(k + 1) << 32);
  return shift == 0 ? low : (low >> shift) | (word(k + 2) << (64 - shift));
}

// Sliding-window OR over a bit row, 32 windows at once: bit c (0..31) of the
// result is set iff some position in start + c .. start + c + len - 1 is set.
// Costs O(len / 32) word operations.
__host__ __device__ __forceinline__ uint32_t window_any32(const uint32_t* words, int64_t num_words, int64_t start,
                                                          int64_t len) {
  uint32_t result = 0;
  for (int64_t done = 0; done < len; done += 32) {
    const int part = static_cast<int>(imin<int64_t>(32, len - done));
    uint64_t bits = load_bits64(words, num_words, start + done);
    // Doubling: afterwards bit c holds the OR of bits c .. c + width - 1
    // (c + part - 1 <= 62 stays inside the 64 loaded bits).
    int width = 1;
    while (2 * width <= part) {
      bits |= bits >> width;
      width *= 2;
    }
    if (width < part) bits |= bits >> (part - width);  // [c, c+width) U [c+part-width, c+part) = [c, c+part)
    result |= static_cast<uint32_t>(bits);
  }
  return result;
}

// Writes the keep bits of columns col .. col + 31 of one mask row (bit c of
// word = column col + c; col is a multiple of 32, so the word starts on a byte
// boundary). Only the bytes inside the row (valid_cols columns remain) are
// written; whole words go out as one 32-bit store when aligned.
__device__ __forceinline__ void store_mask_word(uint8_t* dst, uint32_t word, int64_t valid_cols) {
  if (valid_cols >= 32 && (reinterpret_cast<uintptr_t>(dst) & 3) == 0) {
    *reinterpret_cast<uint32_t*>(dst) = word;  // little-endian: byte b holds columns col + 8b ..
    return;
  }
  const int bytes = static_cast<int>(imin<int64_t>(4, (valid_cols + 7) / 8));
  for (int b = 0; b < bytes; ++b) dst[b] = static_cast<uint8_t>(word >> (8 * b));
}

// Adds every thread's kept count into *total with one global atomic per
// block. All threads of the block must call it.
__device__ __forceinline__ void add_block_count(unsigned long long kept, unsigned long long* total) {
  __shared__ unsigned long long block_kept;
  if (threadIdx.x == 0) block_kept = 0;
  __syncthreads();
  if (kept != 0) atomicAdd(&block_kept, kept);
  __syncthreads();
  if (threadIdx.x == 0 && block_kept != 0) atomicAdd(total, block_kept);
}

// A block's kept bits, added to the KeptCounter with few global atomics. The
// block's work comes in batches (a tile, one grid stride of words), each over
// a block-uniform range of planes. While its batches stay in one group the
// threads add to a register, and the block adds the sum with one atomic when
// the group changes and at the end (for G == 1: once, as add_block_count
// alone). A batch over several groups (at a group's edge, or when a group is
// smaller than a tile) adds each word's bits straight to its group's counter.
// Every thread of the block must call begin() and finish().
class BlockKeptCount {
 public:
  __device__ explicit BlockKeptCount(const KeptCounter& counter) : counter_(counter) {}

  // Starts a batch over planes first_plane .. last_plane.
  __device__ void begin(int64_t first_plane, int64_t last_plane) {
    if (counter_.total == nullptr) return;
    const int64_t first = first_plane / counter_.planes_per_group;
    spread_ = first != last_plane / counter_.planes_per_group;
    if (!spread_ && first != group_) {
      finish();
      group_ = first;
    }
  }

  // Adds the kept bits of one word of plane `plane`, within the current batch.
  __device__ void add(int64_t plane, unsigned kept) {
    if (!spread_) {
      kept_ += kept;
    } else if (kept != 0) {
      atomicAdd(counter_.total + plane / counter_.planes_per_group, static_cast<unsigned long long>(kept));
    }
  }

  // Adds the register counts to their group's counter.
  __device__ void finish() {
    if (counter_.total != nullptr && group_ >= 0) add_block_count(kept_, counter_.total + group_);
    kept_ = 0;
  }

 private:
  KeptCounter counter_;
  int64_t group_ = -1;  // the group of the register counts (none yet)
  unsigned long long kept_ = 0;
  bool spread_ = false;  // the current batch spans several groups
};

// ---- Pass 1, fused tiles (bs <= 64) ----------------------------------------

// How the fused kernel cuts the mask into tiles. A tile covers output rows
// h0 .. h0 + rows - 1 and 64 columns from w0 of `planes` consecutive planes
// (several planes only when one tile row spans a whole plane).
struct TilePlan {
  int64_t rows;    // output rows per plane and tile: min(H, 64)
  int64_t planes;  // planes per tile: 64 / rows (more than one when H <= 32)
  int64_t row_tiles, col_tiles, plane_groups;
  int64_t count;   // tiles in all
};

inline TilePlan make_tile_plan(const MaskGeometry& g) {
  TilePlan t;
  t.rows = imin<int64_t>(g.height, kTileRows);
  t.planes = kTileRows / t.rows;
  t.row_tiles = ceil_div(g.height, t.rows);
  t.col_tiles = ceil_div(g.width, kTileCols);
  t.plane_groups = ceil_div(g.planes, t.planes);
  t.count = t.plane_groups * t.row_tiles * t.col_tiles;
  return t;
}

// One tile and the seeds that can drop its elements: output row h is dropped
// by seed rows h - bs + 1 .. h, output column w by seed columns w - bs + 1 .. w.
struct TileRegion {
  int64_t plane0;
  int planes;                 // planes plane0 .. plane0 + planes - 1
  int64_t h0, w0;             // first output row and column
  int rows, cols;             // output rows per plane, output columns (<= 64)
  int64_t i0, j0;             // first seed row and column
  int seed_rows, seed_cols;   // seed rows per plane, seed columns
};

__host__ __device__ inline TileRegion tile_region(const MaskGeometry& g, const TilePlan& t, int64_t tile) {
  TileRegion r;
  const int64_t col_tile = tile % t.col_tiles;
  const int64_t rest = tile / t.col_tiles;
  const int64_t row_tile = rest % t.row_tiles;
  r.plane0 = (rest / t.row_tiles) * t.planes;
  r.planes = static_cast<int>(imin(t.planes, g.planes - r.plane0));
  r.h0 = row_tile * t.rows;
  r.rows = static_cast<int>(imin(t.rows, g.height - r.h0));
  r.w0 = col_tile * kTileCols;
  r.cols = static_cast<int>(imin<int64_t>(kTileCols, g.width - r.w0));
  r.i0 = imax<int64_t>(r.h0 - g.block + 1, 0);
  r.seed_rows = static_cast<int>(imin(r.h0 + r.rows - 1, g.seed_height - 1) - r.i0 + 1);
  r.j0 = imax<int64_t>(r.w0 - g.block + 1, 0);
  r.seed_cols = static_cast<int>(imin(r.w0 + r.cols - 1, g.seed_width - 1) - r.j0 + 1);
  return r;
}

// Sets the bit of every seed (plane, i, j) of the tile's region: region row
// (plane - plane0) * seed_rows + (i - i0), bit kRegionLeft + j - w0. The bits
// must be zero beforehand.
//
// One Philox call yields the uniforms of four consecutive flat indices, so the
// region is walked as runs of consecutive flat indices (one run when it spans
// whole seed rows, else one per region row) and each thread takes one group of
// four indices at a time. Seeds are rare, so the shared atomics are too.
// A seed needs uniform < gamma and, when plane_gamma is not null (a tile over
// samples of different rates, gamma then +inf), uniform < plane_gamma[plane -
// plane0]: the default path tests one register before any division.
// kFiltered (CamDrop): a seed at (plane, i, j) counts only where
// spatial[plane_spatial[plane - plane0] + i * W + j] is set, and never in a
// plane whose plane_spatial entry is -1 (not a candidate channel); a group none
// of whose indices can count is not drawn at all.
template <bool kFiltered>
__device__ void draw_tile_seeds(uint64_t seed, float gamma, const float* plane_gamma, const MaskGeometry& g,
                                const TileRegion& r, const uint8_t* spatial, const int64_t* plane_spatial,
                                uint32_t (*seed_bits)[kRegionWords]) {
  const int64_t plane_seeds = g.seed_height * g.seed_width;
  const bool one_run = r.seed_cols == g.seed_width && (r.planes == 1 || r.seed_rows == g.seed_height);
  const int runs = one_run ? 1 : r.planes * r.seed_rows;
  const int run_length = one_run ? r.planes * r.seed_rows * r.seed_cols : r.seed_cols;
  const int groups_per_run = (run_length + 6) / 4;  // L consecutive indices touch <= floor((L + 6) / 4) groups
  for (int item = threadIdx.x; item < runs * groups_per_run; item += blockDim.x) {
    const int run = item / groups_per_run;
    const int64_t first =
        (r.plane0 + run / r.seed_rows) * plane_seeds + (r.i0 + run % r.seed_rows) * g.seed_width + r.j0;
    const int64_t group = (first >> 2) + item % groups_per_run;
    if (group > ((first + run_length - 1) >> 2)) continue;
    uint32_t allowed = 0xFu;  // bit q: index 4 * group + q may hold a seed
    if constexpr (kFiltered) {
      allowed = 0u;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t offset = group * 4 + q - first;
        if (offset < 0 || offset >= run_length) continue;
        const int row = run + static_cast<int>(offset) / r.seed_cols;  // region row
        const int64_t base = plane_spatial[row / r.seed_rows];
        if (base >= 0 &&
            spatial[base + (r.i0 + row % r.seed_rows) * g.width + r.j0 + static_cast<int>(offset) % r.seed_cols] != 0) {
          allowed |= 1u << q;
        }
      }
      if (allowed == 0u) continue;
    }
    const PhiloxWords words = philox_group(seed, static_cast<uint64_t>(group));
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t offset = group * 4 + q - first;
      const float u = word_to_uniform(words.w[q]);
      if (offset < 0 || offset >= run_length || ((allowed >> q) & 1u) == 0u || !(u < gamma)) continue;
      const int row = run + static_cast<int>(offset) / r.seed_cols;
      if (plane_gamma != nullptr && !(u < plane_gamma[row / r.seed_rows])) continue;
      const int bit = kRegionLeft + static_cast<int>(r.j0 - r.w0) + static_cast<int>(offset) % r.seed_cols;
      atomicOr(&seed_bits[row][bit >> 5], 1u << (bit & 31));
    }
  }
}

// Row dilation: bit c of row_hits[row][half] is set iff region row `row` has a
// seed in columns w - bs + 1 .. w, w = w0 + 32 * half + c.
__device__ void dilate_tile_rows(const MaskGeometry& g, int region_rows, const uint32_t (*seed_bits)[kRegionWords],
                                 uint32_t (*row_hits)[2]) {
  for (int item = threadIdx.x; item < region_rows * 2; item += blockDim.x) {
    const int row = item >> 1, half = item & 1;
    row_hits[row][half] =
        window_any32(seed_bits[row], kRegionWords, kRegionLeft + 32 * half - g.block + 1, g.block);
  }
}

// Column dilation, packing and counting: output row h keeps column w iff no
// seed row h - bs + 1 .. h hits w. Writes the tile's mask bytes and adds
// their kept bits to `kept`.
__device__ void write_tile_mask(const MaskGeometry& g, const TileRegion& r, const uint32_t (*row_hits)[2],
                                uint8_t* mask, BlockKeptCount& kept) {
  for (int item = threadIdx.x; item < r.planes * r.rows * 2; item += blockDim.x) {
    const int out_row = item >> 1, half = item & 1;
    const int64_t col = r.w0 + 32 * half;
    if (col >= g.width) continue;
    const int plane = out_row / r.rows;
    const int64_t h = r.h0 + out_row % r.rows;
    const int first = static_cast<int>(imax<int64_t>(h - g.block + 1, 0) - r.i0);
    const int last = static_cast<int>(imin(h, g.seed_height - 1) - r.i0);
    const uint32_t (*hits)[2] = row_hits + plane * r.seed_rows;
    uint32_t any = 0;
    for (int i = first; i <= last; ++i) any |= hits[i][half];
    const uint32_t keep = ~any & low_bits(g.width - col);
    store_mask_word(mask + ((r.plane0 + plane) * g.height + h) * g.row_bytes + col / 8, keep, g.width - col);
    kept.add(r.plane0 + plane, __popc(keep));
  }
}

// The seed probabilities of one tile for draw_tile_seeds: gamma for all its
// planes, or, when its planes belong to samples of different rates, one per
// tile plane in plane_gamma (shared memory) and gamma = +inf.
struct TileRates {
  float gamma;
  const float* plane_gamma;
};

// Thread t < r.planes writes plane_gamma[t] when the tile needs it; the block
// must synchronise before draw_tile_seeds reads it.
__device__ TileRates tile_rates(const SeedRate& rate, const TileRegion& r, float* plane_gamma) {
  if (rate.per_sample == nullptr) return {rate.gamma, nullptr};
  const int64_t first_sample = r.plane0 / rate.planes_per_sample;
  if (first_sample == (r.plane0 + r.planes - 1) / rate.planes_per_sample) {
    return {rate.per_sample[first_sample], nullptr};
  }
  if (static_cast<int>(threadIdx.x) < r.planes) {
    plane_gamma[threadIdx.x] = rate.per_sample[(r.plane0 + threadIdx.x) / rate.planes_per_sample];
  }
  return {INFINITY, plane_gamma};
}

// Pass 1 for bs <= 64. Grid-strides over the plan's tiles; counter.total may
// be null (no normalisation, nothing to count). filter is read only when kFiltered.
template <bool kFiltered>
__global__ void __launch_bounds__(kMaskThreads)
    fused_mask_kernel(uint64_t seed, SeedRate rate, MaskGeometry g, TilePlan plan, CandidateFilter filter,
                      uint8_t* __restrict__ mask, KeptCounter counter) {
  __shared__ uint32_t seed_bits[kMaxRegionRows][kRegionWords];
  __shared__ uint32_t row_hits[kMaxRegionRows][2];
  // Per tile plane (a tile has at most kTileRows planes): the seed rate when
  // the tile mixes samples of different rates, and, kFiltered, the offset
  // n * H * W of the plane's spatial flags, -1 when its channel is not a candidate.
  __shared__ float plane_gamma[kTileRows];
  __shared__ int64_t plane_spatial[kFiltered ? kTileRows : 1];
  BlockKeptCount kept(counter);
  for (int64_t tile = blockIdx.x; tile < plan.count; tile += gridDim.x) {
    const TileRegion r = tile_region(g, plan, tile);
    const int region_rows = r.planes * r.seed_rows;
    kept.begin(r.plane0, r.plane0 + r.planes - 1);
    for (int k = threadIdx.x; k < region_rows * kRegionWords; k += blockDim.x) {
      seed_bits[k / kRegionWords][k % kRegionWords] = 0;
    }
    const TileRates rates = tile_rates(rate, r, plane_gamma);
    // One thread per plane (r.planes <= kTileRows < blockDim.x). Uniforms are
    // >= 0, so a plane of rate <= 0 or NaN has no seeds, nor, kFiltered, one
    // whose channel is not a candidate: a tile of such planes is not drawn at all.
    bool seeds_possible = false;
    if (static_cast<int>(threadIdx.x) < r.planes) {
      seeds_possible = (rates.plane_gamma != nullptr ? plane_gamma[threadIdx.x] : rates.gamma) > 0.0f;
      if constexpr (kFiltered) {
        const int64_t plane = r.plane0 + threadIdx.x;
        const bool candidate = filter.channel[plane] != 0;
        plane_spatial[threadIdx.x] = candidate ? (plane / filter.channels) * g.height * g.width : -1;
        seeds_possible = seeds_possible && candidate;
      }
    }
    if (__syncthreads_or(seeds_possible)) {
      draw_tile_seeds<kFiltered>(seed, rates.gamma, rates.plane_gamma, g, r, filter.spatial, plane_spatial,
                                 seed_bits);
    }
    __syncthreads();
    dilate_tile_rows(g, region_rows, seed_bits, row_hits);
    __syncthreads();
    write_tile_mask(g, r, row_hits, mask, kept);
    __syncthreads();  // the next tile overwrites seed_bits and row_hits
  }
  kept.finish();
}

// ---- Pass 1, separable (bs > 64) -------------------------------------------

// seed_bits[(p * Hs + i) * seed_words + k] bit b = seed at (p, i, 32k + b).
// One thread per word; a word's 32 flat indices touch at most 9 Philox groups.
// kFiltered: only bits that the filter admits, and only groups holding one are drawn.
template <bool kFiltered>
__global__ void __launch_bounds__(kMaskThreads)
    seed_bits_kernel(uint64_t seed, SeedRate rate, MaskGeometry g, int64_t seed_words, CandidateFilter filter,
                     uint32_t* __restrict__ seed_bits) {
  const int64_t total = g.planes * g.seed_height * seed_words;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t row = idx / seed_words;  // p * Hs + i
    const int64_t col = (idx - row * seed_words) * 32;
    const int count = static_cast<int>(imin<int64_t>(32, g.seed_width - col));
    const int64_t first = row * g.seed_width + col;  // flat index in (N, Cm, Hs, Ws)
    const float gamma =
        rate.per_sample == nullptr ? rate.gamma : rate.per_sample[row / g.seed_height / rate.planes_per_sample];
    if (!(gamma > 0.0f)) {  // uniforms are >= 0: a rate <= 0 or NaN has no seeds
      seed_bits[idx] = 0u;
      continue;
    }
    uint32_t allowed = ~0u;  // bit b: column col + b may hold a seed
    if constexpr (kFiltered) {
      const int64_t plane = row / g.seed_height, i = row - plane * g.seed_height;
      allowed = 0u;
      if (filter.channel[plane] != 0) {
        const uint8_t* flags = filter.spatial + ((plane / filter.channels) * g.height + i) * g.width + col;
        for (int b = 0; b < count; ++b) allowed |= (flags[b] != 0 ? 1u : 0u) << b;
      }
    }
    uint32_t word = 0;
    for (int64_t group = first >> 2; group <= ((first + count - 1) >> 2); ++group) {
      if constexpr (kFiltered) {
        const int64_t low = group * 4 - first;  // the word bit of index 4 * group, in [-3, 31]
        const uint32_t window = low >= 0 ? allowed >> low : allowed << -low;
        if ((window & 0xFu) == 0u) continue;
      }
      const PhiloxWords words = philox_group(seed, static_cast<uint64_t>(group));
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t offset = group * 4 + q - first;
        if (offset >= 0 && offset < count && word_to_uniform(words.w[q]) < gamma) word |= 1u << offset;
      }
    }
    seed_bits[idx] = word & allowed;
  }
}

// Row dilation: row_hits[(p * Hs + i) * out_words + k] bit c is set iff seed
// row (p, i) has a seed in columns w - bs + 1 .. w, w = 32k + c.
__global__ void __launch_bounds__(kMaskThreads)
    row_hits_kernel(MaskGeometry g, int64_t seed_words, int64_t out_words, const uint32_t* __restrict__ seed_bits,
                    uint32_t* __restrict__ row_hits) {
  const int64_t total = g.planes * g.seed_height * out_words;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t row = idx / out_words;
    const int64_t k = idx - row * out_words;
    row_hits[idx] = window_any32(seed_bits + row * seed_words, seed_words, 32 * k - g.block + 1, g.block);
  }
}

// Column dilation, packing and counting: output (p, h) keeps column w iff no
// seed row h - bs + 1 .. h of plane p hits w. The grid-stride loop runs the
// same steps in every thread of a block (BlockKeptCount needs the whole block).
__global__ void __launch_bounds__(kMaskThreads)
    column_mask_kernel(MaskGeometry g, int64_t out_words, const uint32_t* __restrict__ row_hits,
                       uint8_t* __restrict__ mask, KeptCounter counter) {
  const int64_t total = g.planes * g.height * out_words;
  const int64_t plane_words = g.height * out_words;
  BlockKeptCount kept(counter);
  for (int64_t step = static_cast<int64_t>(blockIdx.x) * blockDim.x; step < total;
       step += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    kept.begin(step / plane_words, (imin<int64_t>(step + blockDim.x, total) - 1) / plane_words);
    const int64_t idx = step + threadIdx.x;
    if (idx >= total) continue;
    const int64_t k = idx % out_words;
    const int64_t plane_row = idx / out_words;  // p * H + h
    const int64_t h = plane_row % g.height, p = plane_row / g.height;
    const int64_t col = 32 * k;
    const uint32_t valid = low_bits(g.width - col);
    const uint32_t* hits = row_hits + p * g.seed_height * out_words + k;
    const int64_t last = imin(h, g.seed_height - 1);
    uint32_t any = 0;
    // Stops early once every column is dropped (dense seeds).
    for (int64_t i = imax<int64_t>(h - g.block + 1, 0); i <= last && (any & valid) != valid; ++i) {
      any |= hits[i * out_words];
    }
    const uint32_t keep = ~any & valid;
    store_mask_word(mask + plane_row * g.row_bytes + col / 8, keep, g.width - col);
    kept.add(p, __popc(keep));
  }
  kept.finish();
}

// ---- Pass 2, apply -----------------------------------------------------------

// scale = float32(numel / (eps + kept * multiplier)) in float64, exactly as
// the CPU kernel; 1 without a count (no normalisation).
__device__ __forceinline__ float scale_from_count(const unsigned long long* kept, unsigned long long multiplier,
                                                  double numel, double eps) {
  if (kept == nullptr) return 1.0f;
  return static_cast<float>(numel / (eps + static_cast<double>(*kept * multiplier)));
}

// The scale of a source with one value (the first value of a grouped one).
__device__ __forceinline__ float resolve_scale(const ScaleSource& s) {
  if (s.given != nullptr) return *s.given;
  return scale_from_count(s.kept, s.kept_multiplier, s.numel, s.eps);
}

// scale[k] of each of the groups from its kept count: the forward of G > 1
// normalisation groups, each group holding numel elements.
__global__ void group_scales_kernel(const unsigned long long* __restrict__ kept, unsigned long long multiplier,
                                    double numel, double eps, int64_t groups, float* __restrict__ scale) {
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < groups;
       k += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    scale[k] = scale_from_count(kept == nullptr ? nullptr : kept + k, multiplier, numel, eps);
  }
}

// n / d and n % d by a multiply-high (Granlund and Montgomery), exact for
// 0 <= n < 2**31 and 1 <= d < 2**31: q = (umulhi(n, magic) + n) >> shift.
struct FastDivmod32 {
  using index_t = uint32_t;
  uint32_t divisor, magic, shift;

  explicit FastDivmod32(uint32_t d) : divisor(d), magic(0), shift(0) {
    while ((uint64_t{1} << shift) < d) ++shift;
    magic = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }
  __host__ __device__ __forceinline__ void divmod(uint32_t n, uint32_t& q, uint32_t& r) const {
    q = (mul_hi_u32(n, magic) + n) >> shift;
    r = n - q * divisor;
  }
};

// Plain 64-bit division, for tensors of 2**31 elements or more.
struct Divmod64 {
  using index_t = uint64_t;
  uint64_t divisor;

  explicit Divmod64(uint64_t d) : divisor(d) {}
  __host__ __device__ __forceinline__ void divmod(uint64_t n, uint64_t& q, uint64_t& r) const {
    q = n / divisor;
    r = n - q * divisor;
  }
};

// How an (N, C, H, W) element offset maps to its mask bit and its scale.
// The mask row of (n, c, h) is (n * sample_planes + c * channel_planes) * H + h,
// as PackedMaskView on the CPU: (C, 1) for a mask per sample and channel,
// (1, 0) when one plane per sample serves every channel (coupled), (0, 1) for
// one mask (C, H, ceil(W/8)) shared by every sample (the fixed mask).
template <typename Div>
struct ApplyLayout {
  using index_t = typename Div::index_t;
  Div channels, height, width;  // dividers by C, H and W
  index_t row_bytes;            // ceil(W / 8)
  index_t sample_planes, channel_planes;
  bool own_rows;                // (C, 1): an element's row (n * C + c) * H + h is its mask row
  bool grouped_scale;           // sample n's scale is given[n / samples_per_value]
  Div group_elements;           // samples_per_value * C * H * W, when grouped_scale
};

// Keep bits of the kVec elements at contiguous NCHW offsets e .. e + kVec - 1
// (bit q for e + q). kVec divides W and 8, so they share one mask byte.
template <int kVec, typename Div>
__device__ __forceinline__ uint32_t keep_bits_nchw(const uint8_t* mask, const ApplyLayout<Div>& L,
                                                   typename Div::index_t e) {
  using index_t = typename Div::index_t;
  index_t row, w;  // row = (n * C + c) * H + h
  L.width.divmod(e, row, w);
  index_t mask_row = row;
  if (!L.own_rows) {
    index_t nc, h, n, c;
    L.height.divmod(row, nc, h);
    L.channels.divmod(nc, n, c);
    mask_row = (n * L.sample_planes + c * L.channel_planes) * L.height.divisor + h;
  }
  const uint32_t byte = mask[mask_row * L.row_bytes + (w >> 3)];
  return (byte >> (w & 7)) & ((1u << kVec) - 1u);
}

// Keep bits of the kVec elements at channels_last offsets e .. e + kVec - 1:
// one pixel (n, h, w), channels c .. c + kVec - 1 (kVec divides C).
template <int kVec, typename Div>
__device__ __forceinline__ uint32_t keep_bits_channels_last(const uint8_t* mask, const ApplyLayout<Div>& L,
                                                            typename Div::index_t e) {
  using index_t = typename Div::index_t;
  index_t pixel, c, nh, w;
  L.channels.divmod(e, pixel, c);
  L.width.divmod(pixel, nh, w);  // nh = n * H + h
  const int shift = static_cast<int>(w & 7);
  if (L.channel_planes == 0) {  // coupled: mask plane n (sample_planes 1), row nh, for every channel
    const uint32_t bit = (mask[nh * L.row_bytes + (w >> 3)] >> shift) & 1u;
    return bit ? (1u << kVec) - 1u : 0u;
  }
  index_t n, h;
  L.height.divmod(nh, n, h);
  const index_t plane_bytes = L.height.divisor * L.row_bytes;
  const uint8_t* byte =
      mask + ((n * L.sample_planes + c) * L.height.divisor + h) * L.row_bytes + (w >> 3);
  uint32_t bits = 0;
#pragma unroll
  for (int q = 0; q < kVec; ++q) bits |= ((byte[q * plane_bytes] >> shift) & 1u) << q;
  return bits;
}

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// out = keep ? in * scale : 0 over an (N, C, H, W) tensor, contiguous or
// channels_last (out has in's strides), kVec elements (16 bytes or fewer) per
// thread and step; the kVec elements share one sample, so one scale. The
// product is taken in opmath (float, or double for double) and rounded once,
// as on the CPU; without source.multiply kept values are copied untouched.
// in and out are not __restrict__: the in-place apply passes one pointer twice
// (each element is read once, by the thread that then writes it).
template <typename scalar_t, int kVec, bool kChannelsLast, typename Div>
__global__ void __launch_bounds__(kApplyThreads)
    apply_mask_kernel(const scalar_t* in, scalar_t* out, const uint8_t* __restrict__ mask, ApplyLayout<Div> layout,
                      ScaleSource source, typename Div::index_t vectors) {
  using index_t = typename Div::index_t;
  using opmath_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, kVec>;
  const float scale = resolve_scale(source);
  if (source.store != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *source.store = scale;
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t v = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < vectors; v += stride) {
    const index_t e = v * kVec;
    const uint32_t keep = kChannelsLast ? keep_bits_channels_last<kVec>(mask, layout, e)
                                        : keep_bits_nchw<kVec>(mask, layout, e);
    opmath_t s = static_cast<opmath_t>(scale);
    if (layout.grouped_scale) {
      index_t group, rest;
      layout.group_elements.divmod(e, group, rest);
      s = static_cast<opmath_t>(source.given[group]);
    }
    const pack_t x = *reinterpret_cast<const pack_t*>(in + e);
    pack_t y;
#pragma unroll
    for (int q = 0; q < kVec; ++q) {
      const scalar_t value = source.multiply ? static_cast<scalar_t>(static_cast<opmath_t>(x.v[q]) * s) : x.v[q];
      y.v[q] = ((keep >> q) & 1u) ? value : scalar_t(0);
    }
    *reinterpret_cast<pack_t*>(out + e) = y;
  }
}

// ---------------------------------------------------------------------------
// Host launchers
// ---------------------------------------------------------------------------

// The widest vector (16 bytes at most) that divides the inner dimension the
// vectors walk along (W, or C for channels_last) and fits both pointers'
// alignment.
int vector_width(const at::Tensor& in, const at::Tensor& out, bool channels_last) {
  const int64_t elem = in.element_size();
  const int64_t inner = channels_last ? in.size(1) : in.size(3);
  int vec = static_cast<int>(16 / elem);
  auto aligned = [&](const void* p) { return reinterpret_cast<uintptr_t>(p) % (vec * elem) == 0; };
  while (vec > 1 && (inner % vec != 0 || !aligned(in.data_ptr()) || !aligned(out.data_ptr()))) vec /= 2;
  return vec;
}

// The layout of input (N, C, H, W) for a block mask (N, 1 or C, H, ceil(W/8))
// or a fixed mask (C, H, ceil(W/8)) shared by the batch.
template <typename Div>
ApplyLayout<Div> apply_layout(const at::Tensor& in, const at::Tensor& mask, const ScaleSource& source) {
  using index_t = typename Div::index_t;
  const int64_t N = in.size(0), C = in.size(1), H = in.size(2), W = in.size(3);
  int64_t sample_planes = C, channel_planes = 1;
  if (mask.dim() == 3) {
    sample_planes = 0;
  } else if (mask.size(1) == 1 && C > 1) {
    sample_planes = 1;
    channel_planes = 0;
  }
  const bool grouped_scale = source.given != nullptr && source.samples_per_value < N;
  const int64_t group_elements = grouped_scale ? source.samples_per_value * C * H * W : 1;
  return {Div(static_cast<index_t>(C)),
          Div(static_cast<index_t>(H)),
          Div(static_cast<index_t>(W)),
          static_cast<index_t>(mask.size(-1)),
          static_cast<index_t>(sample_planes),
          static_cast<index_t>(channel_planes),
          sample_planes == C && channel_planes == 1,
          grouped_scale,
          Div(static_cast<index_t>(group_elements))};
}

template <typename scalar_t, int kVec, bool kChannelsLast, typename Div>
void launch_apply(const at::Tensor& in, at::Tensor& out, const at::Tensor& mask, const ScaleSource& source,
                  cudaStream_t stream) {
  const ApplyLayout<Div> layout = apply_layout<Div>(in, mask, source);
  const int64_t vectors = in.numel() / kVec;
  apply_mask_kernel<scalar_t, kVec, kChannelsLast, Div>
      <<<grid_size(vectors, kApplyThreads, 16), kApplyThreads, 0, stream>>>(
          in.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), mask.data_ptr<uint8_t>(), layout, source,
          static_cast<typename Div::index_t>(vectors));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename Div>
void launch_apply_for_layout(const at::Tensor& in, at::Tensor& out, const at::Tensor& mask,
                             const ScaleSource& source, bool channels_last, int vec, cudaStream_t stream) {
  // Only widths of 16 bytes or fewer are instantiated (vector_width never picks more).
  auto launch = [&](auto vec_constant) {
    constexpr int kVec = decltype(vec_constant)::value;
    if constexpr (kVec * sizeof(scalar_t) <= 16) {
      if (channels_last) {
        launch_apply<scalar_t, kVec, true, Div>(in, out, mask, source, stream);
      } else {
        launch_apply<scalar_t, kVec, false, Div>(in, out, mask, source, stream);
      }
    }
  };
  with_vector_width(vec, launch);
}

// Pass 1 with or without the candidate filter (a template parameter of the kernels).
template <bool kFiltered>
void launch_mask_impl(const MaskGeometry& g, uint64_t seed, const SeedRate& rate, uint8_t* mask,
                      const KeptCounter& kept, const at::TensorOptions& options, cudaStream_t stream,
                      const CandidateFilter& filter) {
  if (g.block <= kFusedMaxBlock) {
    const TilePlan plan = make_tile_plan(g);
    fused_mask_kernel<kFiltered><<<grid_size(plan.count * kMaskThreads, kMaskThreads, 8), kMaskThreads, 0, stream>>>(
        seed, rate, g, plan, filter, mask, kept);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t seed_words = ceil_div(g.seed_width, 32), out_words = ceil_div(g.width, 32);
  const int64_t seed_rows = g.planes * g.seed_height;
  at::Tensor seed_bits = at::empty({seed_rows * seed_words}, options.dtype(at::kInt));
  at::Tensor row_hits = at::empty({seed_rows * out_words}, options.dtype(at::kInt));
  auto* seed_bits_ptr = reinterpret_cast<uint32_t*>(seed_bits.data_ptr<int32_t>());
  auto* row_hits_ptr = reinterpret_cast<uint32_t*>(row_hits.data_ptr<int32_t>());
  seed_bits_kernel<kFiltered><<<grid_size(seed_rows * seed_words, kMaskThreads, 8), kMaskThreads, 0, stream>>>(
      seed, rate, g, seed_words, filter, seed_bits_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  row_hits_kernel<<<grid_size(seed_rows * out_words, kMaskThreads, 8), kMaskThreads, 0, stream>>>(
      g, seed_words, out_words, seed_bits_ptr, row_hits_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  column_mask_kernel<<<grid_size(g.planes * g.height * out_words, kMaskThreads, 8), kMaskThreads, 0, stream>>>(
      g, out_words, row_hits_ptr, mask, kept);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Where the forward's apply gets its scale, written to `scale` ((groups,)
// float32, 0-d for one group). One group: the apply kernel derives the value
// from the count and stores it, which saves a launch. G > 1 groups: a small
// kernel derives the G values first and the apply reads them.
ScaleSource forward_scale(const KeptCounter& counter, int64_t groups, int64_t samples,
                          unsigned long long kept_multiplier, double group_numel, double eps, float* scale,
                          cudaStream_t stream) {
  if (groups == 1) return ScaleSource::from_count(counter.total, kept_multiplier, group_numel, eps, scale);
  group_scales_kernel<<<grid_size(groups, kApplyThreads, 1), kApplyThreads, 0, stream>>>(
      counter.total, kept_multiplier, group_numel, eps, groups, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ScaleSource::from_values(scale, samples / groups);
}

}  // namespace

// The current device's multiprocessor count, cached per device: small calls
// are bound by host time, so launches should not query the driver each time.
int multiprocessor_count() {
  static std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> cache{};
  const c10::DeviceIndex device = c10::cuda::current_device();
  int count = cache[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

unsigned grid_size(int64_t work_items, int threads, int blocks_per_sm) {
  const int64_t wanted = ceil_div(std::max<int64_t>(work_items, 1), threads);
  return static_cast<unsigned>(std::min<int64_t>(wanted, static_cast<int64_t>(multiprocessor_count()) * blocks_per_sm));
}

void launch_mask(const MaskGeometry& g, uint64_t seed, const SeedRate& rate, uint8_t* mask, const KeptCounter& kept,
                 const at::TensorOptions& options, cudaStream_t stream, const CandidateFilter* filter) {
  if (filter != nullptr) {
    launch_mask_impl<true>(g, seed, rate, mask, kept, options, stream, *filter);
  } else {
    launch_mask_impl<false>(g, seed, rate, mask, kept, options, stream, CandidateFilter{nullptr, nullptr, 1});
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_forward(const at::Tensor& x, int64_t mask_channels,
                                                             bool normalize, double eps, int64_t groups) {
  at::Tensor mask = at::zeros({x.size(0), mask_channels, x.size(2), mask_row_bytes(x.size(3))},
                              x.options().dtype(at::kByte));
  const float value = static_cast<float>(normalize ? static_cast<double>(x.numel() / groups) / (eps + 0.0) : 1.0);
  const at::TensorOptions options = x.options().dtype(at::kFloat);
  at::Tensor scale = groups == 1 ? at::full({}, value, options) : at::full({groups}, value, options);
  return {at::empty_like(walkable(x)), mask, scale};
}

at::Tensor apply_mask(const at::Tensor& input, const at::Tensor& mask, const ScaleSource& source,
                      cudaStream_t stream) {
  const at::Tensor in = walkable(input);
  at::Tensor out = at::empty_like(in);
  apply_mask_into(in, mask, source, out, stream);
  return out;
}

void apply_mask_into(const at::Tensor& in, const at::Tensor& mask, const ScaleSource& source, at::Tensor& out,
                     cudaStream_t stream) {
  if (in.numel() == 0) return;
  const at::Tensor packed = mask.contiguous();
  const bool channels_last = is_channels_last_4d(in);
  const int vec = vector_width(in, out, channels_last);
  const bool small = in.numel() <= std::numeric_limits<int32_t>::max();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "block_mask_apply_cuda", [&] {
    if (small) {
      launch_apply_for_layout<scalar_t, FastDivmod32>(in, out, packed, source, channels_last, vec, stream);
    } else {
      launch_apply_for_layout<scalar_t, Divmod64>(in, out, packed, source, channels_last, vec, stream);
    }
  });
}

}  // namespace block_mask_cuda

namespace {

using block_mask_cuda::apply_mask;
using block_mask_cuda::empty_forward;
using block_mask_cuda::KeptCounter;
using block_mask_cuda::launch_mask;
using block_mask_cuda::MaskGeometry;
using block_mask_cuda::ScaleSource;
using block_mask_cuda::SeedRate;

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_mask_forward_cuda(
    const at::Tensor& x, int64_t seed, double gamma, int64_t block_size, bool couple_channels, bool normalize,
    double eps, const std::optional<at::Tensor>& sample_gamma, int64_t normalize_groups) {
  check_block_mask_forward_args(x, gamma, block_size, eps);
  check_sample_gamma_args(x, sample_gamma, normalize_groups);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), G = normalize_groups;
  const int64_t mask_channels = couple_channels ? 1 : C;
  if (x.numel() == 0) return empty_forward(x, mask_channels, normalize, eps, G);
  const at::TensorOptions options = x.options();
  at::Tensor mask = at::empty({N, mask_channels, H, mask_row_bytes(W)}, options.dtype(at::kByte));
  at::Tensor scale = G == 1 ? at::empty({}, options.dtype(at::kFloat)) : at::empty({G}, options.dtype(at::kFloat));

  const MaskGeometry g{N * mask_channels, H, W, block_size, H - block_size + 1, W - block_size + 1,
                       mask_row_bytes(W)};
  // sample_gamma replaces gamma; the kernels read it on the device.
  at::Tensor sample_rates;
  const SeedRate rate = SeedRate::of(gamma, sample_gamma, mask_channels, sample_rates);
  // One kept-bit counter per group of N / G samples, only needed to normalise.
  KeptCounter counter{nullptr, N / G * mask_channels};
  at::Tensor kept;
  if (normalize) {
    kept = at::empty({G}, options.dtype(at::kLong));
    counter.total = reinterpret_cast<unsigned long long*>(kept.data_ptr<int64_t>());
    C10_CUDA_CHECK(cudaMemsetAsync(counter.total, 0, G * sizeof(unsigned long long), stream));
  }
  launch_mask(g, static_cast<uint64_t>(seed), rate, mask.data_ptr<uint8_t>(), counter, options, stream);

  const ScaleSource source = block_mask_cuda::forward_scale(
      counter, G, N, static_cast<unsigned long long>(couple_channels ? C : 1), static_cast<double>(x.numel() / G),
      eps, scale.data_ptr<float>(), stream);
  at::Tensor y = apply_mask(x, mask, source, stream);
  return {y, mask, scale};
}

at::Tensor block_mask_backward_cuda(const at::Tensor& grad_y, const at::Tensor& mask, const at::Tensor& scale) {
  check_block_mask_backward_args(grad_y, mask, scale);
  const c10::cuda::CUDAGuard device_guard(grad_y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // The scale stays on the device: the kernel reads it, the host never does.
  const at::Tensor scale_values = scale.contiguous();
  const ScaleSource source =
      ScaleSource::from_values(scale_values.data_ptr<float>(), samples_per_scale(grad_y.size(0), scale));
  return apply_mask(grad_y, mask, source, stream);
}

}  // namespace

TORCH_LIBRARY_IMPL(robustdrop, CUDA, m) {
  m.impl("block_mask_forward", &block_mask_forward_cuda);
  m.impl("block_mask_backward", &block_mask_backward_cuda);
}

}  // namespace robustdrop
