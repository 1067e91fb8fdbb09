// CamDrop on CUDA (DESIGN.md 4.2): robustdrop::cam_mask_forward, bit-identical
// to python/robustdrop/reference/cam_mask.py (cam_mask_forward) given cam
// values with the margin of DESIGN.md 4.2. The backward is DropBlock's
// block_mask_backward on the returned bit mask.
//
// Passes over x-sized data: two reads of x and one write of y, against
// DropBlock's one read and one write.
//   1. CAM (reads x once): cam[n] = sum_c a[n, c] * x[n, c]. Every channel of
//      a sample must be summed before any of its positions can be ranked, so
//      this read cannot be merged with the apply.
//   2. Selection and mask (x not read): they touch only the N*H*W cam values,
//      the N*C class weights, the candidate flags and the mask bits.
//   3. Apply (reads x once, writes y once): y = keep ? x * scale : 0. The
//      scale is batch-wide (numel / (eps + kept over every mask)), so it is
//      known only after every mask plane has been counted.
// Nothing waits on the host: `guided` is read on the device, the kept count
// stays on the device and the apply derives the scale from it.
//
// Kernels, in launch order, all on the current stream:
//   class_weights_kernel   grid-stride over the N*C pairs (256 threads):
//                          a[n, c] = sum_{j < g} float32(weight[target[n], c*g + j])
//                          in float32, j in order. A device assert guards the
//                          class index; an invalid one is never read (a = 0).
//   cam_nchw_kernel        contiguous x: a block is 32 lanes x 8 channel
//                          slices; a lane owns kVec consecutive positions
//                          (vector loads of up to 16 bytes, coalesced along
//                          H*W), slice s sums channels s, s + 8, ... in float32,
//                          and the 8 partial sums are added in slice order.
//                          Grid-stride over tiles of 32 * kVec positions.
//   cam_channels_last_kernel  channels_last x: a group of G lanes (G a power
//                          of two <= 32, ~ C / kVec) owns one position and
//                          reads its C contiguous values in kVec vectors; the
//                          lanes' sums are combined by an xor-shuffle tree.
//                          Grid-stride over positions, 256 / G per block.
//                          Both CAM kernels reduce every position the same way,
//                          so equal inputs give equal cam values. They exit at
//                          once when guided holds False, and are not launched
//                          when spatial_topk is 0 or H*W (no ranking needed).
//   select_candidates_kernel  one block of 256 threads per (sample, problem),
//                          grid-stride over the 2N tasks (spatial rows of
//                          cam, then channel rows of a): the k-th largest
//                          32-bit ordered key by MSB-first radix select (four
//                          passes of 8-bit histograms in shared memory, each
//                          followed by a block scan over the 256 bins), the
//                          keys cached in shared memory when the row has at
//                          most kMaxCachedKeys values (else re-read from
//                          global/L2). Keys above the k-th are candidates;
//                          among keys equal to it the first ones in index
//                          order are, counted with one block-wide prefix sum
//                          (skipped when all of them are taken). No sort.
//   DropBlock's mask kernels (block_mask.cuh, launch_mask with a
//                          CandidateFilter): the seeds of block_mask_forward
//                          (couple_channels=False), kept only at candidates,
//                          Philox evaluated only where a seed can count;
//                          dilation, bit packing and the kept count.
//   DropBlock's apply kernel (apply_mask): y in x's layout, scale stored.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../checks.h"
#include "block_mask.cuh"

namespace robustdrop {
namespace {

// ---------------------------------------------------------------------------
// Device code
// ---------------------------------------------------------------------------

constexpr int kWeightThreads = 256;
constexpr int kCamThreads = 256;
constexpr int kCamLanes = 32;                         // position lanes of the NCHW kernel
constexpr int kCamSlices = kCamThreads / kCamLanes;  // channel slices of the NCHW kernel
constexpr int kSelectThreads = 256;
constexpr int kRadixBins = 256;  // 8-bit digits; kSelectThreads == kRadixBins: one bin per thread
constexpr int kSelectWarps = kSelectThreads / 32;
// Rows of at most this many values keep their keys in shared memory during
// the selection (40 KiB of dynamic shared memory, under the 48 KiB default).
constexpr int64_t kMaxCachedKeys = 10240;

static_assert(kSelectThreads == kRadixBins, "the bin scan gives every thread one bin");

// True when guided is given and holds False: every position and channel is a candidate.
__device__ __forceinline__ bool unguided(const bool* guided) { return guided != nullptr && !*guided; }

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// ---- a (N, C) ---------------------------------------------------------------

// a[n, c] = sum_{j < g} float32(weight[target[n], c*g + j]), float32 sums in j
// order. weight is (K, g*C) with strides (row_stride, col_stride).
template <typename weight_t>
__global__ void __launch_bounds__(kWeightThreads)
    class_weights_kernel(const weight_t* __restrict__ weight, int64_t classes, int64_t row_stride,
                         int64_t col_stride, const int64_t* __restrict__ target, int64_t target_stride,
                         int64_t samples, int64_t channels, int64_t group, float* __restrict__ a) {
  const int64_t total = samples * channels;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t n = idx / channels, c = idx - n * channels;
    const int64_t t = target[n * target_stride];
    CUDA_KERNEL_ASSERT(0 <= t && t < classes);
    float sum = 0.0f;
    if (0 <= t && t < classes) {  // never read outside weight, even with device asserts compiled out
      const weight_t* row = weight + t * row_stride + c * group * col_stride;
      for (int64_t j = 0; j < group; ++j) sum += static_cast<float>(row[j * col_stride]);
    }
    a[idx] = sum;
  }
}

// ---- cam (N, H*W) --------------------------------------------------------------

// Contiguous x (N, C, H*W): lane l of a tile owns the kVec positions
// e .. e + kVec - 1 of the flattened (N, H*W) map, e = (tile * 32 + l) * kVec
// (kVec divides H*W, so they share one sample); slice s sums channels
// s, s + kCamSlices, ... and partial[s] holds its sums.
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kCamThreads)
    cam_nchw_kernel(const scalar_t* __restrict__ x, const float* __restrict__ a, int64_t channels, int64_t positions,
                    int64_t vectors, const bool* __restrict__ guided, float* __restrict__ cam) {
  if (unguided(guided)) return;
  using pack_t = Pack<scalar_t, kVec>;
  __shared__ float partial[kCamSlices][kCamLanes * kVec];
  const int lane = static_cast<int>(threadIdx.x) % kCamLanes, slice = static_cast<int>(threadIdx.x) / kCamLanes;
  for (int64_t tile = blockIdx.x; tile * kCamLanes < vectors; tile += gridDim.x) {
    const int64_t v = tile * kCamLanes + lane;
    float acc[kVec];
#pragma unroll
    for (int q = 0; q < kVec; ++q) acc[q] = 0.0f;
    if (v < vectors) {
      const int64_t e = v * kVec;
      const int64_t n = e / positions, p = e - n * positions;
      const scalar_t* src = x + n * channels * positions + p;
      const float* w = a + n * channels;
#pragma unroll 4
      for (int64_t c = slice; c < channels; c += kCamSlices) {
        const pack_t vals = *reinterpret_cast<const pack_t*>(src + c * positions);
        const float wc = w[c];
#pragma unroll
        for (int q = 0; q < kVec; ++q) acc[q] += wc * static_cast<float>(vals.v[q]);
      }
    }
#pragma unroll
    for (int q = 0; q < kVec; ++q) partial[slice][lane * kVec + q] = acc[q];
    __syncthreads();
    // partial[s][t] is the sum of slice s for the position tile * 32 * kVec + t.
    for (int t = static_cast<int>(threadIdx.x); t < kCamLanes * kVec; t += static_cast<int>(blockDim.x)) {
      const int64_t out = tile * kCamLanes * kVec + t;
      if (out < vectors * kVec) {
        float sum = partial[0][t];
#pragma unroll
        for (int s = 1; s < kCamSlices; ++s) sum += partial[s][t];
        cam[out] = sum;
      }
    }
    __syncthreads();  // partial is rewritten by the next tile
  }
}

// channels_last x (N, H*W, C): a group of group_lanes lanes (a power of two
// <= 32, aligned in its warp) owns position pos of the flattened (N, H*W)
// map; sub-lane s sums the kVec-vectors s, s + group_lanes, ... of its C
// contiguous values (kVec divides C), then an xor-shuffle tree adds the group.
// The loop bound is uniform over the block, so every lane reaches every shuffle.
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kCamThreads)
    cam_channels_last_kernel(const scalar_t* __restrict__ x, const float* __restrict__ a, int64_t channels,
                             int64_t positions, int64_t total, int group_lanes, const bool* __restrict__ guided,
                             float* __restrict__ cam) {
  if (unguided(guided)) return;
  using pack_t = Pack<scalar_t, kVec>;
  const int sub = static_cast<int>(threadIdx.x) & (group_lanes - 1);
  const int64_t per_block = static_cast<int64_t>(blockDim.x) / group_lanes;
  const int64_t vectors = channels / kVec;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * per_block; first < total;
       first += static_cast<int64_t>(gridDim.x) * per_block) {
    const int64_t pos = first + static_cast<int64_t>(threadIdx.x) / group_lanes;  // n * H*W + h * W + w
    float acc = 0.0f;
    if (pos < total) {
      const pack_t* src = reinterpret_cast<const pack_t*>(x + pos * channels);
      const float* w = a + (pos / positions) * channels;
      for (int64_t v = sub; v < vectors; v += group_lanes) {
        const pack_t vals = src[v];
#pragma unroll
        for (int q = 0; q < kVec; ++q) acc += w[v * kVec + q] * static_cast<float>(vals.v[q]);
      }
    }
    for (int offset = group_lanes / 2; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, offset);
    if (sub == 0 && pos < total) cam[pos] = acc;
  }
}

// ---- Selection ----------------------------------------------------------------

// A uint32 whose order is the float order (contract item 3): -0.0 equals
// +0.0, every NaN is 0xFFFFFFFF, above +inf (0xFF800000).
__device__ __forceinline__ uint32_t ordered_key(float value) {
  uint32_t bits = __float_as_uint(value);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0xFFFFFFFFu;  // NaN
  if ((bits & 0x7FFFFFFFu) == 0u) bits = 0u;                    // -0.0 -> +0.0
  return bits ^ ((bits & 0x80000000u) ? 0xFFFFFFFFu : 0x80000000u);
}

// The flat rows of one top-k problem: values and flags (rows, length).
struct TopkRows {
  const float* values;
  uint8_t* flags;
  int64_t length;
  int64_t k;
};

struct SelectShared {
  uint32_t hist[kRadixBins];
  uint32_t warp_totals[kSelectWarps];
  uint32_t digit, remaining, ties;  // the chosen bin of a radix pass
};

// Inclusive prefix sum of value over the block's threads in thread order.
// Every thread of the block must call it; it synchronises the block.
__device__ __forceinline__ uint32_t block_inclusive_sum(uint32_t value, uint32_t* warp_totals) {
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const uint32_t other = __shfl_up_sync(0xFFFFFFFFu, value, offset);
    if (lane >= offset) value += other;
  }
  if (lane == 31) warp_totals[warp] = value;
  __syncthreads();
  uint32_t base = 0u;
  for (int w = 0; w < warp; ++w) base += warp_totals[w];
  __syncthreads();  // warp_totals may be rewritten by the next call
  return base + value;
}

// The key of values[i], from the shared cache when there is one.
__device__ __forceinline__ uint32_t row_key(const float* values, const uint32_t* cache, int64_t i) {
  return cache != nullptr ? cache[i] : ordered_key(values[i]);
}

// flags[i] = 1 for the k largest values of one row (key descending, ties to
// the lower index), else 0; all 1 when `all`. cache: length uint32 of shared
// memory for the keys, or null to re-read values. Every thread of the block
// calls it with the same arguments.
//
// Radix select, most significant byte first: after the pass over bits
// shift .. shift + 7, prefix holds the top bytes of the k-th largest key and
// `remaining` how many keys sharing those bytes still belong to the top k;
// the keys with larger top bytes (all taken) are no longer counted. After four
// passes prefix is the k-th largest key T: the candidates are every key > T
// and the first `remaining` keys == T in index order.
__device__ void select_row(const float* __restrict__ values, uint8_t* __restrict__ flags, int64_t length, int64_t k,
                           bool all, uint32_t* cache, SelectShared& sh) {
  const int tid = static_cast<int>(threadIdx.x);
  if (all || k <= 0 || k >= length) {
    const uint8_t fill = (all || k > 0) ? 1 : 0;
    for (int64_t i = tid; i < length; i += kSelectThreads) flags[i] = fill;
    return;
  }
  uint32_t prefix = 0u, prefix_mask = 0u, remaining = static_cast<uint32_t>(k), ties = 0u;
  for (int shift = 24; shift >= 0; shift -= 8) {
    sh.hist[tid] = 0u;
    __syncthreads();
    for (int64_t i = tid; i < length; i += kSelectThreads) {
      uint32_t key;
      if (cache == nullptr) {
        key = ordered_key(values[i]);
      } else if (shift == 24) {
        key = ordered_key(values[i]);
        cache[i] = key;
      } else {
        key = cache[i];
      }
      if ((key & prefix_mask) == prefix) atomicAdd(&sh.hist[(key >> shift) & 0xFFu], 1u);
    }
    __syncthreads();
    // Thread t holds bin 255 - t: the scan counts, for each digit d, the keys
    // (under the prefix) whose digit is >= d. Exactly one bin holds the
    // remaining-th largest, since 1 <= remaining <= the keys under the prefix.
    const uint32_t count = sh.hist[kRadixBins - 1 - tid];
    const uint32_t at_or_above = block_inclusive_sum(count, sh.warp_totals);
    const uint32_t above = at_or_above - count;
    if (above < remaining && remaining <= at_or_above) {
      sh.digit = static_cast<uint32_t>(kRadixBins - 1 - tid);
      sh.remaining = remaining - above;
      sh.ties = count;
    }
    __syncthreads();
    prefix |= sh.digit << shift;
    prefix_mask |= 0xFFu << shift;
    remaining = sh.remaining;
    ties = sh.ties;  // after the last pass: the number of keys equal to prefix
  }
  const uint32_t threshold = prefix;
  if (remaining == ties) {  // every key equal to the threshold is taken: no ranking needed
    for (int64_t i = tid; i < length; i += kSelectThreads) flags[i] = row_key(values, cache, i) >= threshold ? 1 : 0;
    return;
  }
  // Ties: thread t ranks the keys equal to the threshold in its contiguous
  // span of indices, after those of threads 0 .. t-1 (one block prefix sum).
  const int64_t span = (length + kSelectThreads - 1) / kSelectThreads;
  const int64_t lo = tid * span < length ? tid * span : length;
  const int64_t hi = lo + span < length ? lo + span : length;
  uint32_t mine = 0u;
  for (int64_t i = lo; i < hi; ++i) mine += row_key(values, cache, i) == threshold ? 1u : 0u;
  uint32_t rank = block_inclusive_sum(mine, sh.warp_totals) - mine;
  for (int64_t i = lo; i < hi; ++i) {
    const uint32_t key = row_key(values, cache, i);
    uint8_t take = key > threshold ? 1 : 0;
    if (key == threshold) {
      take = rank < remaining ? 1 : 0;
      ++rank;
    }
    flags[i] = take;
  }
}

// Tasks 0 .. N-1: the spatial rows (cam, spatial_topk); tasks N .. 2N-1: the
// channel rows (a, channel_topk). Dynamic shared memory: cache_capacity keys;
// a row of at most cache_capacity values is cached there.
__global__ void __launch_bounds__(kSelectThreads)
    select_candidates_kernel(TopkRows spatial, TopkRows channel, int64_t samples, const bool* __restrict__ guided,
                             int64_t cache_capacity) {
  extern __shared__ uint32_t key_cache[];
  __shared__ SelectShared sh;
  const bool all = unguided(guided);
  for (int64_t task = blockIdx.x; task < 2 * samples; task += gridDim.x) {
    const bool spatial_task = task < samples;
    const TopkRows rows = spatial_task ? spatial : channel;
    const int64_t n = spatial_task ? task : task - samples;
    select_row(rows.values + n * rows.length, rows.flags + n * rows.length, rows.length, rows.k, all,
               rows.length <= cache_capacity ? key_cache : nullptr, sh);
    __syncthreads();  // the next task rewrites the cache and sh
  }
}

// ---------------------------------------------------------------------------
// Host launchers
// ---------------------------------------------------------------------------

using block_mask_cuda::apply_mask;
using block_mask_cuda::CandidateFilter;
using block_mask_cuda::grid_size;
using block_mask_cuda::KeptCounter;
using block_mask_cuda::launch_mask;
using block_mask_cuda::MaskGeometry;
using block_mask_cuda::ScaleSource;
using block_mask_cuda::SeedRate;
using block_mask_cuda::empty_forward;

// The widest vector (16 bytes at most) that divides `inner` and fits x's alignment.
int cam_vector_width(const at::Tensor& x, int64_t inner) {
  const int64_t elem = x.element_size();
  int vec = static_cast<int>(16 / elem);
  while (vec > 1 && (inner % vec != 0 || reinterpret_cast<uintptr_t>(x.data_ptr()) % (vec * elem) != 0)) vec /= 2;
  return vec;
}

// cam (N, H*W) float32 from x (walkable) and a (N, C).
template <typename scalar_t>
void launch_cam(const at::Tensor& x, const float* a, const bool* guided, float* cam, cudaStream_t stream) {
  const int64_t N = x.size(0), C = x.size(1), positions = x.size(2) * x.size(3);
  const bool channels_last = is_channels_last_4d(x);
  const int vec = cam_vector_width(x, channels_last ? C : positions);
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  auto launch = [&](auto vec_constant) {
    constexpr int kVec = decltype(vec_constant)::value;
    if constexpr (kVec * sizeof(scalar_t) <= 16) {
      if (channels_last) {
        int group_lanes = 1;  // the smallest power of two >= C / kVec, at most a warp
        while (group_lanes < 32 && group_lanes < C / kVec) group_lanes *= 2;
        const int64_t total = N * positions;
        cam_channels_last_kernel<scalar_t, kVec>
            <<<grid_size(total * group_lanes, kCamThreads, 8), kCamThreads, 0, stream>>>(
                x_ptr, a, C, positions, total, group_lanes, guided, cam);
      } else {
        const int64_t vectors = N * positions / kVec;
        const int64_t tiles = (vectors + kCamLanes - 1) / kCamLanes;
        cam_nchw_kernel<scalar_t, kVec><<<grid_size(tiles * kCamThreads, kCamThreads, 8), kCamThreads, 0, stream>>>(
            x_ptr, a, C, positions, vectors, guided, cam);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  };
  block_mask_cuda::with_vector_width(vec, launch);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cam_mask_forward_cuda(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& target, const std::optional<at::Tensor>& guided,
    int64_t seed, double gamma, int64_t block_size, int64_t spatial_topk, int64_t channel_topk, bool normalize,
    double eps, const std::optional<at::Tensor>& sample_gamma) {
  check_cam_mask_forward_args(input, weight, target, guided, gamma, block_size, spatial_topk, channel_topk, eps);
  check_sample_gamma_args(input, sample_gamma, 1);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3), positions = H * W;
  // Nothing is kept (as block_mask_forward); no launch, no target read.
  if (input.numel() == 0) return empty_forward(input, C, normalize, eps);
  const at::TensorOptions options = input.options();
  at::Tensor mask = at::empty({N, C, H, mask_row_bytes(W)}, options.dtype(at::kByte));
  at::Tensor scale = at::empty({}, options.dtype(at::kFloat));

  const at::Tensor x = walkable(input);
  // One scratch allocation: the kept counter, a (N, C) and cam (N, H*W) in
  // float32, then the spatial (N, H*W) and channel (N, C) candidate flags.
  const int64_t kept_bytes = 8;
  at::Tensor scratch = at::empty({kept_bytes + 4 * N * (C + positions) + N * (positions + C)}, options.dtype(at::kByte));
  uint8_t* base = scratch.data_ptr<uint8_t>();
  auto* kept_ptr = reinterpret_cast<unsigned long long*>(base);
  float* a_ptr = reinterpret_cast<float*>(base + kept_bytes);
  float* cam_ptr = a_ptr + N * C;
  uint8_t* spatial_ptr = reinterpret_cast<uint8_t*>(cam_ptr + N * positions);
  uint8_t* channel_ptr = spatial_ptr + N * positions;
  const bool* guided_ptr = guided.has_value() ? guided->data_ptr<bool>() : nullptr;
  if (normalize) {
    C10_CUDA_CHECK(cudaMemsetAsync(kept_ptr, 0, sizeof(unsigned long long), stream));
  }

  // a (N, C).
  const int64_t group = weight.size(1) / C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "cam_class_weights_cuda", [&] {
    class_weights_kernel<scalar_t><<<grid_size(N * C, kWeightThreads, 8), kWeightThreads, 0, stream>>>(
        weight.data_ptr<scalar_t>(), weight.size(0), weight.stride(0), weight.stride(1), target.data_ptr<int64_t>(),
        target.stride(0), N, C, group, a_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // cam (N, H*W): only ranked when 0 < spatial_topk < H*W.
  if (spatial_topk > 0 && spatial_topk < positions) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cam_activation_map_cuda",
                                    [&] { launch_cam<scalar_t>(x, a_ptr, guided_ptr, cam_ptr, stream); });
  }

  // Candidate flags.
  auto cached_length = [](int64_t length, int64_t k) {
    return (k > 0 && k < length && length <= kMaxCachedKeys) ? length : int64_t{0};
  };
  const int64_t cache_capacity = std::max(cached_length(positions, spatial_topk), cached_length(C, channel_topk));
  const TopkRows spatial_rows{cam_ptr, spatial_ptr, positions, spatial_topk};
  const TopkRows channel_rows{a_ptr, channel_ptr, C, channel_topk};
  select_candidates_kernel<<<grid_size(2 * N * kSelectThreads, kSelectThreads, 4), kSelectThreads,
                             static_cast<size_t>(cache_capacity) * sizeof(uint32_t), stream>>>(
      spatial_rows, channel_rows, N, guided_ptr, cache_capacity);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Mask and count: DropBlock's seeds (couple_channels=False), filtered.
  const MaskGeometry g{N * C, H, W, block_size, H - block_size + 1, W - block_size + 1, mask_row_bytes(W)};
  const CandidateFilter filter{spatial_ptr, channel_ptr, C};
  const KeptCounter counter{normalize ? kept_ptr : nullptr, g.planes};  // one batch-wide count
  at::Tensor sample_rates;  // sample_gamma replaces gamma; the kernels read it on the device
  launch_mask(g, static_cast<uint64_t>(seed), SeedRate::of(gamma, sample_gamma, C, sample_rates),
              mask.data_ptr<uint8_t>(), counter, options, stream, &filter);

  // Apply; the scale is derived on the device from the count.
  const ScaleSource source =
      ScaleSource::from_count(counter.total, 1, static_cast<double>(x.numel()), eps, scale.data_ptr<float>());
  at::Tensor y = apply_mask(x, mask, source, stream);
  return {y, mask, scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(robustdrop, CUDA, m) { m.impl("cam_mask_forward", &cam_mask_forward_cuda); }

}  // namespace robustdrop
