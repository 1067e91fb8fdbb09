// Feature-density dropout (FDD) on CUDA (DESIGN.md 4.3): robustdrop::feature_density,
// feature_density_forward and channel_mask_backward, against
// python/robustdrop/reference/feature_density.py and the CPU kernel
// (csrc/cpu/feature_density_kernel.cpp), which share csrc/lanczos.h.
//
// Shapes: x (N, C, H, W) with D = H*W, or x (N, F) (F as C, D = 1, no PCA);
// m = min(C, D); G = grids**dims cells. Every sample is handled in the same
// launches (no per-sample host loop) and nothing waits on the host: whether a
// sample is degenerate, how many Lanczos steps it takes and how many axes it
// has are all decided and read on the device.
//
// The maths, per sample: Xc = X (C, D) minus its mean over the channels, where
// X = s_n float32(x[n]) and s_n = lanczos::magnitude_scale(max |x[n]|), the
// power of two that brings that max into [1, 2) (exact: the cells do not
// change with it, and no product overflows or underflows whatever |x|); M = Xc
// Xc^T (C < D, the Gram side) or Xc^T Xc (C >= D, the covariance side), m x m;
// the top `dims` eigenpairs (theta_r, y_r) of M by Lanczos (csrc/lanczos.h);
// the coordinates f (C, dims): on the Gram side sign_r sqrt(theta_r) y_r, on
// the covariance side sign_r Xc y_r, where sign_r makes the largest-magnitude
// component of the axis in R^D (Xc^T y_r, or y_r) positive; equal-width bins
// per axis between the coordinates' min and max; cell = sum_r b_r grids**r.
// The forward then drops channel c iff uniform(seed, n*C + c) < p32[cell]
// (csrc/philox.h) and applies the mask.
//
// Launches of a 4-D forward with D > 0, in order, all on the current stream:
//   sample_scale_kernel    one block of 256 threads per sample (grid-stride):
//                          s_n from the block max of |float32(x)| (N,) float32.
//                          It reads x once more: the scale must be known before
//                          the centring's channel sums (a float32 sum of
//                          |x| ~ 1e37 overflows).
//   centre_kernel          grid-stride over (sample, 32-position tile); 256
//                          threads = 32 lanes x 8 channel slices. Reads x
//                          (contiguous or channels_last, any float dtype)
//                          through a 32 x 32 shared tile loaded along x's
//                          contiguous dimension and scaled by s_n, twice: sweep 1 sums the
//                          tile's 32 columns over every channel (the mean),
//                          sweep 2 writes Xc (N, C, D) and the tile's centred
//                          and uncentred sums of squares (double) to
//                          tile_sums (N, tiles, 2). Xc is stored in float64:
//                          its values are the float32 differences, exactly.
//   at::bmm (cuBLAS DGEMM) M (N, m, m) in float64 from Xc. float64 products of
//                          float32 values are exact, no TF32 setting applies,
//                          and autocast never casts float64 tensors.
//   lanczos_kernel         one block of 256 threads per sample. The trace and
//                          energy are the sums of the sample's tile_sums; a
//                          degenerate sample (trace not finite as float32, or
//                          trace <= 1e-10 energy) gets 0 axes and returns.
//                          Else Lanczos with full re-orthogonalisation: the
//                          basis Q (N, m, m) float32 in global scratch, the
//                          vectors q, w (float32) and Q^T w (double) plus
//                          thread 0's tridiagonal arrays (alpha, beta, 3 x m
//                          eigenvectors, 4m work) in shared memory when they
//                          fit (88m bytes <= 44 KiB, m <= 512), else in global
//                          scratch (N, 11m) doubles. Matrix-vector products
//                          and Q^T w take one warp per row (coalesced rows,
//                          double sums); dots are fixed-order block
//                          reductions; thread 0 runs lanczos.h's stopping rule
//                          and tridiagonal_top_eigenpairs and broadcasts the
//                          decision through shared memory. Writes the present
//                          axes' unit Ritz vectors (N, 3, m), theta (N, 3) and
//                          the number of present axes (N,).
//   gram_axes_kernel       (Gram side) one thread per (sample, position):
//                          w_r = Xc^T y_r (N, 3, D) float32, only to orient.
//   covariance_coordinates_kernel  (covariance side) one warp per (sample,
//                          channel): the unoriented f[c, r] = Xc[c] . y_r.
//   bin_channels_kernel    one block of 256 threads per sample: orientation
//                          (block argmax of |axis|), coordinates, per-axis
//                          min/max, bins (each axis scaled by a power of two
//                          first, so hi - lo cannot overflow), cell (N, C) and counts (N, G)
//                          (global atomics on the zeroed row), then (forward)
//                          the per-cell p32 in three rounded double steps, the
//                          Philox draw per channel, the packed keep mask
//                          (N, ceil(C/8)) (one thread per byte) and the scale.
//   apply_channel_mask_kernel  grid-stride, up to 16-byte vectors:
//                          y = keep ? x * s : 0 in x's layout.
// 2-D x: bin_channels_kernel on float32(x) (a sample with a non-finite value
// puts every channel in cell 0), then the apply. D == 0: bin_channels_kernel
// alone (every channel in cell 0); y is empty. N == 0 or C == 0: no launch.
//
// Passes over x-sized data: x is read four times (the scale, the two sweeps of
// the centring, the second usually from L2 since a tile's channels were just
// read, and the apply) and y written once; Xc (float64, 2x the size of float32 x) is
// written once, read by the GEMM and once more by the orientation or
// projection kernel. The PCA needs every channel of a sample before any can be
// binned, and the apply needs the mask, so x cannot be read fewer times.
// channel_mask_backward is the apply alone on grad_y.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../checks.h"
#include "../feature_density.h"
#include "../lanczos.h"
#include "../philox.h"
#include "block_mask.cuh"  // grid_size

namespace robustdrop {
namespace {

using lanczos::kMaxDims;

// ---------------------------------------------------------------------------
// Device code
// ---------------------------------------------------------------------------

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int kTile = 32;  // channels x positions of a centring tile
constexpr int kCentreThreads = 256;
constexpr int kCentreSlices = kCentreThreads / kWarp;
constexpr int kLanczosThreads = 256;
constexpr int kProjectThreads = 256;
constexpr int kBinThreads = 256;
constexpr int kApplyThreads = 256;
// Dynamic shared memory for one sample's Lanczos workspace: under the 48 KiB a
// block gets without opting in, leaving room for the kernel's static shared data.
constexpr int64_t kSharedWorkspaceBytes = 44 * 1024;

static_assert(kCentreThreads % kWarp == 0 && kLanczosThreads % kWarp == 0 && kBinThreads % kWarp == 0,
              "block reductions take whole warps");
static_assert(kTile == kWarp, "a centring tile row is one warp wide");

// ---- Reductions ---------------------------------------------------------------

struct Sum {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

struct Min {
  __device__ __forceinline__ float operator()(float a, float b) const { return fminf(a, b); }
};

struct Max {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

struct LargerCount {
  __device__ __forceinline__ long long operator()(long long a, long long b) const { return a > b ? a : b; }
};

// A component of largest magnitude seen so far and its index.
struct AbsMax {
  float magnitude;
  long long index;
};

// The larger magnitude; of equal ones, the lower index.
struct LargerMagnitude {
  __device__ __forceinline__ AbsMax operator()(AbsMax a, AbsMax b) const {
    return (b.magnitude > a.magnitude || (b.magnitude == a.magnitude && b.index < a.index)) ? b : a;
  }
};

template <typename T>
__device__ __forceinline__ T shuffle_xor(T value, int offset) {
  return __shfl_xor_sync(kFullMask, value, offset);
}

__device__ __forceinline__ AbsMax shuffle_xor(AbsMax value, int offset) {
  value.magnitude = __shfl_xor_sync(kFullMask, value.magnitude, offset);
  value.index = __shfl_xor_sync(kFullMask, value.index, offset);
  return value;
}

// The warp's values combined; lane 0's result is the one used. All 32 lanes
// must call it.
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T value, Op op) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value = op(value, shuffle_xor(value, offset));
  return value;
}

// The block's values combined in a fixed order (warps, then warp results in
// warp order), so equal inputs give equal bits; every thread gets the result.
// All threads of the block must call it; it synchronises the block twice, so
// calls may follow each other directly.
template <typename T, typename Op>
__device__ T block_reduce(T value, Op op) {
  __shared__ T warp_results[kWarp];
  const int lane = static_cast<int>(threadIdx.x) % kWarp, warp = static_cast<int>(threadIdx.x) / kWarp;
  const int warps = static_cast<int>(blockDim.x) / kWarp;
  value = warp_reduce(value, op);
  if (lane == 0) warp_results[warp] = value;
  __syncthreads();
  T total = warp_results[0];
  for (int w = 1; w < warps; ++w) total = op(total, warp_results[w]);
  __syncthreads();  // warp_results is rewritten by the next call
  return total;
}

// ---- Centring (N, C, D) -------------------------------------------------------

// scales[n] = lanczos::magnitude_scale(max |float32(x[n])|) for every sample:
// the C * D values of a sample are one contiguous block in both layouts.
// fmaxf passes NaN over (such a sample is degenerate anyway).
template <typename scalar_t>
__global__ void __launch_bounds__(kCentreThreads)
    sample_scale_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t values, float* __restrict__ scales) {
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const scalar_t* sample = x + n * values;
    float largest = 0.0f;
    for (int64_t i = threadIdx.x; i < values; i += blockDim.x) {
      largest = fmaxf(largest, fabsf(static_cast<float>(sample[i])));
    }
    largest = block_reduce(largest, Max());
    if (threadIdx.x == 0) scales[n] = lanczos::magnitude_scale(largest);
  }
}

// tile[k][l] = scale * float32(x[n, c0 + k, position d0 + l]) for k, l < 32 (0
// outside the sample), loaded with the lanes along x's contiguous dimension:
// positions for contiguous x, channels for channels_last. The padding column
// keeps the transposed stores free of bank conflicts.
template <typename scalar_t, bool kChannelsLast>
__device__ __forceinline__ void load_tile(const scalar_t* __restrict__ sample, float scale, int64_t C, int64_t D,
                                          int64_t c0, int64_t d0, float (*tile)[kTile + 1]) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp, slice = static_cast<int>(threadIdx.x) / kWarp;
  for (int k = slice; k < kTile; k += kCentreSlices) {
    if constexpr (kChannelsLast) {
      const int64_t c = c0 + lane, d = d0 + k;
      tile[lane][k] = (c < C && d < D) ? __fmul_rn(static_cast<float>(sample[d * C + c]), scale) : 0.0f;
    } else {
      const int64_t c = c0 + k, d = d0 + lane;
      tile[k][lane] = (c < C && d < D) ? __fmul_rn(static_cast<float>(sample[c * D + d]), scale) : 0.0f;
    }
  }
}

// For each tile t = (sample n, positions d0 .. d0 + 31), with X = scales[n] *
// float32(x[n]): mean[d] = (sum over channels of X) / C in float32 (slice s adds channels s, s + 8, ...
// in order, then the slices are added in order); centred[n, c, d] =
// X - mean[d], stored as float64; tile_sums[t] = (sum of centred**2,
// sum of X**2), both accumulated in float64.
template <typename scalar_t, bool kChannelsLast>
__global__ void __launch_bounds__(kCentreThreads)
    centre_kernel(const scalar_t* __restrict__ x, const float* __restrict__ scales, int64_t N, int64_t C, int64_t D,
                  int64_t position_tiles, double* __restrict__ centred, double* __restrict__ tile_sums) {
  __shared__ float tile[kTile][kTile + 1];
  __shared__ float slice_sums[kCentreSlices][kTile];
  __shared__ float mean[kTile];
  const int lane = static_cast<int>(threadIdx.x) % kWarp, slice = static_cast<int>(threadIdx.x) / kWarp;
  for (int64_t t = blockIdx.x; t < N * position_tiles; t += gridDim.x) {
    const int64_t n = t / position_tiles;
    const int64_t d0 = (t - n * position_tiles) * kTile;
    const scalar_t* sample = x + n * C * D;
    const float scale = scales[n];

    // Sweep 1: the column sums (entries outside the sample are 0 and add nothing).
    float sum = 0.0f;
    for (int64_t c0 = 0; c0 < C; c0 += kTile) {
      load_tile<scalar_t, kChannelsLast>(sample, scale, C, D, c0, d0, tile);
      __syncthreads();
      for (int k = slice; k < kTile; k += kCentreSlices) sum += tile[k][lane];
      __syncthreads();  // the next chunk overwrites tile
    }
    slice_sums[slice][lane] = sum;
    __syncthreads();
    if (slice == 0) {
      float total = slice_sums[0][lane];
      for (int s = 1; s < kCentreSlices; ++s) total += slice_sums[s][lane];
      mean[lane] = total / static_cast<float>(C);
    }
    __syncthreads();

    // Sweep 2: centre, store, and sum the squares.
    const int64_t d = d0 + lane;
    double squares = 0.0, energy = 0.0;
    for (int64_t c0 = 0; c0 < C; c0 += kTile) {
      load_tile<scalar_t, kChannelsLast>(sample, scale, C, D, c0, d0, tile);
      __syncthreads();
      for (int k = slice; k < kTile; k += kCentreSlices) {
        const int64_t c = c0 + k;
        if (c < C && d < D) {
          const float value = tile[k][lane];
          const float centred_value = value - mean[lane];
          centred[(n * C + c) * D + d] = centred_value;
          squares += static_cast<double>(centred_value) * centred_value;
          energy += static_cast<double>(value) * value;
        }
      }
      __syncthreads();  // the next chunk overwrites tile
    }
    // block_reduce synchronises, so the next tile cannot rewrite slice_sums or
    // mean while a thread still reads them.
    const double tile_squares = block_reduce(squares, Sum());
    const double tile_energy = block_reduce(energy, Sum());
    if (threadIdx.x == 0) {
      tile_sums[2 * t] = tile_squares;
      tile_sums[2 * t + 1] = tile_energy;
    }
  }
}

// ---- Lanczos, one block per sample ------------------------------------------------

// Doubles of one sample's Lanczos workspace: projections, alpha, beta (m
// each), kMaxDims eigenvectors of T (m each), 4m of solver work, then q and w
// as 2m floats (m doubles).
__host__ __device__ __forceinline__ int64_t workspace_doubles(int64_t m) { return (3 + kMaxDims + 4 + 1) * m; }

struct LanczosWorkspace {
  double* projections;  // m: Q^T w, later one unnormalised Ritz vector
  double* alpha;        // m: diagonal of T
  double* beta;         // m: off-diagonal of T (beta[j] is the norm of step j's residual)
  double* vectors;      // kMaxDims * m: top eigenvectors of T_j, each of length j
  double* work;         // 4m: tridiagonal_top_eigenpairs' work
  float* q;             // m: the current basis vector q_j
  float* w;             // m: the residual
};

__device__ __forceinline__ LanczosWorkspace carve_workspace(double* base, int64_t m) {
  LanczosWorkspace ws;
  ws.projections = base;
  ws.alpha = base + m;
  ws.beta = base + 2 * m;
  ws.vectors = base + 3 * m;
  ws.work = base + (3 + kMaxDims) * m;
  ws.q = reinterpret_cast<float*>(base + (3 + kMaxDims + 4) * m);
  ws.w = ws.q + m;
  return ws;
}

// What thread 0 decides after a step, read by the whole block.
struct LanczosDecision {
  double theta[kMaxDims];  // top eigenvalues of T_j, descending
  int pairs;               // how many of them (min(j, dims))
  int steps;               // j
  int stop;
};

struct LanczosProblem {
  const double* matrices;   // (N, m, m) symmetric PSD
  const double* tile_sums;  // (N, tiles, 2): centred and uncentred sums of squares
  int64_t tiles, m;
  int dims;
  float* basis;             // (N, m, m): q_1 .. q_m as rows
  double* workspace;        // (N, workspace_doubles(m)), or null: the workspace is in shared memory
  float* ritz;              // (N, kMaxDims, m): unit Ritz vectors y_r of the present axes
  double* theta;            // (N, kMaxDims): their eigenvalues
  int32_t* axes;            // (N,): number of present axes, 0 for a degenerate sample
};

// No principal axes: the centred sum of squares is not finite in float32, or
// at most kDegenerateTolerance of the uncentred one (NaN or Inf in the map,
// channels equal up to float32 rounding, C == 1, all zeros).
__device__ __forceinline__ bool sample_degenerate(double trace, double energy) {
  return !isfinite(static_cast<float>(trace)) || !(trace > lanczos::kDegenerateTolerance * energy);
}

// q = q_1 = s / ||s|| for lanczos.h's start vector s, also stored as basis row 0.
__device__ void start_vector(float* q, float* basis, int64_t m) {
  double local = 0.0;
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
    const double s = lanczos::start_component(i);
    local += s * s;
  }
  // > 0: component 0 alone is about 0.118.
  const double norm2 = block_reduce(local, Sum());
  const float inverse_norm = static_cast<float>(1.0 / sqrt(norm2));
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
    const float value = lanczos::start_component(i) * inverse_norm;
    q[i] = value;
    basis[i] = value;
  }
  __syncthreads();
}

// w = float32(M q), each row's dot product in double by one warp (lanes along
// the row, so reads of M are coalesced).
__device__ void multiply_matrix(const double* __restrict__ matrix, const float* q, float* w, int64_t m) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  for (int64_t i = warp; i < m; i += warps) {
    const double* row = matrix + i * m;
    double sum = 0.0;
    for (int64_t k = lane; k < m; k += kWarp) sum += row[k] * static_cast<double>(q[k]);
    sum = warp_reduce(sum, Sum());
    if (lane == 0) w[i] = static_cast<float>(sum);
  }
}

// a . b in double, every thread gets it (fixed order).
__device__ double block_dot(const float* a, const float* b, int64_t m) {
  double local = 0.0;
  for (int64_t k = threadIdx.x; k < m; k += blockDim.x) local += static_cast<double>(a[k]) * b[k];
  return block_reduce(local, Sum());
}

// w -= alpha_j q_j + beta_{j-1} q_{j-1} in float32 (q_{j-1} is basis row j - 1).
__device__ void subtract_neighbours(const LanczosWorkspace& ws, const float* basis, int64_t j, double alpha,
                                    int64_t m) {
  const float a = static_cast<float>(alpha);
  const float b = j > 0 ? static_cast<float>(ws.beta[j - 1]) : 0.0f;
  const float* previous = j > 0 ? basis + (j - 1) * m : nullptr;
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
    ws.w[i] -= a * ws.q[i] + (previous != nullptr ? b * previous[i] : 0.0f);
  }
}

// w -= Q (Q^T w) for the first `rows` basis rows: h = Q^T w in double (one
// warp per row), then each thread updates its components of w in row order
// (float32). w must be complete on entry; it is complete on return.
__device__ void reorthogonalize(const float* basis, int64_t rows, int64_t m, float* w, double* h) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  for (int64_t i = warp; i < rows; i += warps) {
    const float* q = basis + i * m;
    double sum = 0.0;
    for (int64_t k = lane; k < m; k += kWarp) sum += static_cast<double>(q[k]) * w[k];
    sum = warp_reduce(sum, Sum());
    if (lane == 0) h[i] = sum;
  }
  __syncthreads();
  for (int64_t k = threadIdx.x; k < m; k += blockDim.x) {
    float value = w[k];
    for (int64_t i = 0; i < rows; ++i) value -= static_cast<float>(h[i]) * basis[i * m + k];
    w[k] = value;
  }
  __syncthreads();  // h and w are read by every thread next
}

// Thread 0, after step j (0-based) with alpha_j = alpha and ||w|| = beta:
// records them and applies lanczos.h's stopping rule.
__device__ void decide_after_step(const LanczosWorkspace& ws, int64_t j, int64_t m, int dims, double alpha,
                                  double beta, double trace, LanczosDecision& decision) {
  ws.alpha[j] = alpha;
  ws.beta[j] = beta;
  const int steps = static_cast<int>(j + 1);
  const bool exhausted = beta <= lanczos::kExhaustedTolerance * trace;
  bool stop = false;
  if (exhausted || lanczos::check_after_step(steps, static_cast<int>(m), dims)) {
    decision.pairs =
        lanczos::tridiagonal_top_eigenpairs(ws.alpha, ws.beta, steps, dims, decision.theta, ws.vectors, ws.work);
    const bool converged =
        steps >= dims && lanczos::ritz_pairs_converged(beta, decision.theta, ws.vectors, steps, decision.pairs);
    stop = exhausted || converged || steps == m;
  }
  decision.steps = steps;
  decision.stop = stop ? 1 : 0;
}

// q = q_{j+1} = w / beta (beta > kExhaustedTolerance * trace > 0 when Lanczos
// goes on), also stored as basis row `row`.
__device__ void next_basis_vector(const LanczosWorkspace& ws, float* basis, int64_t row, double beta, int64_t m) {
  const float inverse_beta = static_cast<float>(1.0 / beta);
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
    const float value = ws.w[i] * inverse_beta;
    ws.q[i] = value;
    basis[row * m + i] = value;
  }
}

// Leading axes whose eigenvalue is above kAbsentAxisTolerance of the largest.
__device__ __forceinline__ int present_axes(const double* theta, int pairs) {
  int present = 0;
  while (present < pairs && theta[0] > 0.0 && theta[present] > lanczos::kAbsentAxisTolerance * theta[0]) ++present;
  return present;
}

// y_r = Q s_r normalised, float32, for r < present: the sum in double over
// the basis rows (coalesced along the row), one Ritz vector at a time in
// ws.projections (each thread touches only its own components).
__device__ void write_ritz_vectors(const LanczosWorkspace& ws, const float* basis, int64_t m,
                                   int steps, int present, float* ritz) {
  for (int r = 0; r < present; ++r) {
    const double* s = ws.vectors + static_cast<int64_t>(r) * steps;
    double local = 0.0;
    for (int64_t k = threadIdx.x; k < m; k += blockDim.x) {
      double sum = 0.0;
      for (int i = 0; i < steps; ++i) sum += s[i] * static_cast<double>(basis[i * m + k]);
      ws.projections[k] = sum;
      local += sum * sum;
    }
    const double length2 = block_reduce(local, Sum());
    const double inverse_length = length2 > 0.0 ? 1.0 / sqrt(length2) : 0.0;
    for (int64_t k = threadIdx.x; k < m; k += blockDim.x) {
      ritz[r * m + k] = static_cast<float>(ws.projections[k] * inverse_length);
    }
  }
}

// One block per sample: the top `dims` eigenpairs of its M (csrc/lanczos.h).
// Every branch that skips a __syncthreads depends only on values every thread
// holds alike (block_reduce results, the shared decision).
__global__ void __launch_bounds__(kLanczosThreads) lanczos_kernel(LanczosProblem p) {
  extern __shared__ double shared_workspace[];
  __shared__ LanczosDecision decision;
  const int64_t n = blockIdx.x, m = p.m;

  double squares = 0.0, energy = 0.0;
  for (int64_t t = threadIdx.x; t < p.tiles; t += blockDim.x) {
    squares += p.tile_sums[2 * (n * p.tiles + t)];
    energy += p.tile_sums[2 * (n * p.tiles + t) + 1];
  }
  const double trace = block_reduce(squares, Sum());
  const double total_energy = block_reduce(energy, Sum());
  if (sample_degenerate(trace, total_energy)) {
    if (threadIdx.x == 0) p.axes[n] = 0;
    return;
  }

  const LanczosWorkspace ws =
      carve_workspace(p.workspace != nullptr ? p.workspace + n * workspace_doubles(m) : shared_workspace, m);
  const double* matrix = p.matrices + n * m * m;
  float* basis = p.basis + n * m * m;
  if (threadIdx.x == 0) decision.pairs = 0;
  start_vector(ws.q, basis, m);
  for (int64_t j = 0; j < m; ++j) {
    multiply_matrix(matrix, ws.q, ws.w, m);
    __syncthreads();
    const double alpha = block_dot(ws.q, ws.w, m);
    subtract_neighbours(ws, basis, j, alpha, m);
    __syncthreads();
    reorthogonalize(basis, j + 1, m, ws.w, ws.projections);
    reorthogonalize(basis, j + 1, m, ws.w, ws.projections);
    const double beta = sqrt(block_dot(ws.w, ws.w, m));
    if (threadIdx.x == 0) decide_after_step(ws, j, m, p.dims, alpha, beta, trace, decision);
    __syncthreads();
    if (decision.stop) break;
    next_basis_vector(ws, basis, j + 1, beta, m);
    __syncthreads();
  }

  const int present = present_axes(decision.theta, decision.pairs);
  write_ritz_vectors(ws, basis, m, decision.steps, present, p.ritz + n * kMaxDims * m);
  if (threadIdx.x == 0) {
    p.axes[n] = present;
    for (int r = 0; r < present; ++r) p.theta[n * kMaxDims + r] = decision.theta[r];
  }
}

// ---- The axes in R^D ----------------------------------------------------------------

// Gram side (m = C): axis_values[n, r, d] = (Xc^T y_r)[d] for the present
// axes, one thread per (sample, position); reads of Xc are coalesced along d.
__global__ void __launch_bounds__(kProjectThreads)
    gram_axes_kernel(const double* __restrict__ centred, const float* __restrict__ ritz,
                     const int32_t* __restrict__ axes, int64_t N, int64_t C, int64_t D,
                     float* __restrict__ axis_values) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < N * D;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t n = idx / D, d = idx - n * D;
    const int present = axes[n];
    if (present == 0) continue;
    const double* column = centred + n * C * D + d;
    const float* y = ritz + n * kMaxDims * C;
    double sum[kMaxDims] = {0.0, 0.0, 0.0};
    for (int64_t c = 0; c < C; ++c) {
      const double value = column[c * D];
#pragma unroll
      for (int r = 0; r < kMaxDims; ++r) {
        if (r < present) sum[r] += static_cast<double>(y[r * C + c]) * value;
      }
    }
#pragma unroll
    for (int r = 0; r < kMaxDims; ++r) {
      if (r < present) axis_values[(n * kMaxDims + r) * D + d] = static_cast<float>(sum[r]);
    }
  }
}

// Covariance side (m = D): coordinates[n, c, r] = Xc[n, c] . y_r (not yet
// oriented) for the present axes, one warp per (sample, channel), lanes along
// the row. The skip is uniform over a warp (one sample per warp).
__global__ void __launch_bounds__(kProjectThreads)
    covariance_coordinates_kernel(const double* __restrict__ centred, const float* __restrict__ ritz,
                                  const int32_t* __restrict__ axes, int64_t N, int64_t C, int64_t D,
                                  float* __restrict__ coordinates) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t warps_per_block = blockDim.x / kWarp;
  const int64_t total_warps = warps_per_block * gridDim.x;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / kWarp; item < N * C;
       item += total_warps) {
    const int64_t n = item / C;
    const int present = axes[n];
    if (present == 0) continue;
    const double* row = centred + item * D;
    const float* y = ritz + n * kMaxDims * D;
    double sum[kMaxDims] = {0.0, 0.0, 0.0};
    for (int64_t d = lane; d < D; d += kWarp) {
      const double value = row[d];
#pragma unroll
      for (int r = 0; r < kMaxDims; ++r) {
        if (r < present) sum[r] += value * static_cast<double>(y[r * D + d]);
      }
    }
#pragma unroll
    for (int r = 0; r < kMaxDims; ++r) sum[r] = warp_reduce(sum[r], Sum());
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < kMaxDims; ++r) {
        if (r < present) coordinates[item * kMaxDims + r] = static_cast<float>(sum[r]);
      }
    }
  }
}

// ---- Binning and the drop, one block per sample --------------------------------------

struct BinningProblem {
  int64_t C, D, m, cells;
  int dims, grids;
  const float* features;    // (N, C) float32 for 2-D x, else null
  const int32_t* axes;      // (N,) present axes; null when no PCA ran (D == 0): no axes
  const double* theta;      // (N, kMaxDims)
  const float* ritz;        // (N, kMaxDims, m)
  const float* gram_axes;   // Gram side: (N, kMaxDims, D) Xc^T y_r; null on the covariance side
  float* coordinates;       // (N, C, kMaxDims): in, the covariance side's raw projections; out, f
  int64_t* cell;            // (N, C)
  int64_t* counts;          // (N, cells), zero on entry
};

struct DropProblem {
  uint8_t* mask;            // (N, row_bytes) keep bits; null: cells and counts only
  float* scale;             // (N, C) with rescale, else null
  int64_t row_bytes;
  uint64_t seed;
  double kappa, alpha;
};

// Number of axes with coordinates: 2-D x has one, unless a value of the sample
// is not finite; 4-D x has its present principal axes. All threads must call it.
__device__ int sample_axes(const BinningProblem& p, int64_t n) {
  if (p.features != nullptr) {
    bool finite = true;
    for (int64_t c = threadIdx.x; c < p.C; c += blockDim.x) finite = finite && isfinite(p.features[n * p.C + c]);
    return __syncthreads_and(finite) ? 1 : 0;
  }
  return p.axes != nullptr ? p.axes[n] : 0;
}

// +1 or -1: the sign of v's component of largest magnitude, ties to the lowest
// index. Every thread gets it; all threads must call it.
__device__ float orientation_sign(const float* v, int64_t length) {
  AbsMax best{-1.0f, LLONG_MAX};
  for (int64_t i = threadIdx.x; i < length; i += blockDim.x) {
    const float magnitude = fabsf(v[i]);
    if (magnitude > best.magnitude) best = AbsMax{magnitude, static_cast<long long>(i)};  // i ascends: ties keep the first
  }
  best = block_reduce(best, LargerMagnitude());
  return (best.index < length && v[best.index] < 0.0f) ? -1.0f : 1.0f;
}

// f[c, r] for this thread's channels (c = threadIdx.x + k * blockDim.x), 0 on
// absent axes.
__device__ void write_coordinates(const BinningProblem& p, int64_t n, int present, const float* sign) {
  for (int64_t c = threadIdx.x; c < p.C; c += blockDim.x) {
    float* f = p.coordinates + (n * p.C + c) * kMaxDims;
    for (int r = 0; r < p.dims; ++r) {
      float value = 0.0f;
      if (r < present) {
        if (p.features != nullptr) {
          value = p.features[n * p.C + c];
        } else if (p.gram_axes != nullptr) {
          const float length = static_cast<float>(sqrt(p.theta[n * kMaxDims + r])) * sign[r];
          value = length * p.ritz[(n * kMaxDims + r) * p.m + c];
        } else {
          value = sign[r] * f[r];
        }
      }
      f[r] = value;
    }
  }
}

// The bin of coordinate f on an axis spanning [lo, hi] (float32, no
// contraction), all three scaled by the power of two that brings
// max(|lo|, |hi|) into [1, 2) (exact): hi - lo cannot overflow, nor the width underflow.
__device__ __forceinline__ int64_t axis_bin(float f, float lo, float hi, int grids) {
  if (!(hi > lo)) return 0;
  const float scale = lanczos::magnitude_scale(fmaxf(fabsf(lo), fabsf(hi)));
  lo = __fmul_rn(lo, scale);
  hi = __fmul_rn(hi, scale);
  const float width = __fdiv_rn(__fsub_rn(hi, lo), static_cast<float>(grids));
  const float position = floorf(__fdiv_rn(__fsub_rn(__fmul_rn(f, scale), lo), width));
  if (position >= static_cast<float>(grids - 1)) return grids - 1;
  return position > 0.0f ? static_cast<int64_t>(position) : 0;
}

// cell[n, c] = sum_r b_r * grids**r for this thread's channels, and
// counts[n, cell] += 1. lo, hi: each axis' range over the sample.
__device__ void assign_cells(const BinningProblem& p, int64_t n, const float* lo, const float* hi) {
  for (int64_t c = threadIdx.x; c < p.C; c += blockDim.x) {
    const float* f = p.coordinates + (n * p.C + c) * kMaxDims;
    int64_t cell = 0, stride = 1;
    for (int r = 0; r < p.dims; ++r) {
      cell += axis_bin(f[r], lo[r], hi[r], p.grids) * stride;
      stride *= p.grids;
    }
    p.cell[n * p.C + c] = cell;
    atomicAdd(reinterpret_cast<unsigned long long*>(p.counts + n * p.cells + cell), 1ull);
  }
}

// float32(clamp(kappa * count / largest + alpha, 0, 1)), three rounded double steps.
__device__ __forceinline__ float drop_probability(int64_t count, int64_t largest, double kappa, double alpha) {
  double t = __dmul_rn(kappa, static_cast<double>(count));
  t = __ddiv_rn(t, static_cast<double>(largest));
  t = __dadd_rn(t, alpha);
  return static_cast<float>(fmin(fmax(t, 0.0), 1.0));
}

// The keep bits of sample n (one thread per mask byte, pad bits 0) and, with
// rescale, its scale. Needs every count of the sample.
__device__ void draw_channel_mask(const BinningProblem& p, const DropProblem& drop, int64_t n) {
  const int64_t* counts = p.counts + n * p.cells;
  const int64_t* cell = p.cell + n * p.C;
  long long local = 0;
  for (int64_t c = threadIdx.x; c < p.C; c += blockDim.x) local = local > counts[cell[c]] ? local : counts[cell[c]];
  const long long most = block_reduce(local, LargerCount());
  const int64_t largest = most > 1 ? most : 1;
  for (int64_t byte = threadIdx.x; byte < drop.row_bytes; byte += blockDim.x) {
    uint32_t bits = 0u;
    for (int q = 0; q < 8; ++q) {
      const int64_t c = byte * 8 + q;
      if (c >= p.C) break;
      const float p32 = drop_probability(counts[cell[c]], largest, drop.kappa, drop.alpha);
      const bool keep = !(philox_uniform(drop.seed, static_cast<uint64_t>(n * p.C + c)) < p32);
      bits |= (keep ? 1u : 0u) << q;
      if (drop.scale != nullptr) {
        // keep implies p32 < 1 (uniforms are < 1), so 1 - p32 > 0.
        drop.scale[n * p.C + c] =
            keep ? static_cast<float>(__ddiv_rn(1.0, __dsub_rn(1.0, static_cast<double>(p32)))) : 0.0f;
      }
    }
    drop.mask[n * drop.row_bytes + byte] = static_cast<uint8_t>(bits);
  }
}

// One block per sample: orientation, coordinates, bins, cell and counts, then
// (drop.mask != null) the mask and scale. Each thread reads back only the
// coordinates it wrote; counts are read after a barrier.
__global__ void __launch_bounds__(kBinThreads) bin_channels_kernel(BinningProblem p, DropProblem drop) {
  const int64_t n = blockIdx.x;
  const int present = sample_axes(p, n);
  float sign[kMaxDims] = {1.0f, 1.0f, 1.0f};
  if (p.features == nullptr) {
    for (int r = 0; r < present; ++r) {
      const float* axis = p.gram_axes != nullptr ? p.gram_axes + (n * kMaxDims + r) * p.D
                                                 : p.ritz + (n * kMaxDims + r) * p.m;  // m == D here
      sign[r] = orientation_sign(axis, p.D);
    }
  }
  write_coordinates(p, n, present, sign);

  float lo[kMaxDims], hi[kMaxDims];
  for (int r = 0; r < p.dims; ++r) {
    float local_lo = INFINITY, local_hi = -INFINITY;
    for (int64_t c = threadIdx.x; c < p.C; c += blockDim.x) {
      const float f = p.coordinates[(n * p.C + c) * kMaxDims + r];
      local_lo = fminf(local_lo, f);
      local_hi = fmaxf(local_hi, f);
    }
    lo[r] = block_reduce(local_lo, Min());
    hi[r] = block_reduce(local_hi, Max());
  }
  assign_cells(p, n, lo, hi);
  if (drop.mask == nullptr) return;
  __syncthreads();  // every channel's count and cell of the sample are in
  draw_channel_mask(p, drop, n);
}

// ---- Apply ------------------------------------------------------------------------

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

struct ChannelMask {
  const uint8_t* bits;  // (N, row_bytes)
  const float* scale;   // (N, C), or one value
  bool per_channel;
  int64_t row_bytes;
};

__device__ __forceinline__ bool channel_kept(const ChannelMask& mask, uint64_t n, uint64_t c) {
  return (mask.bits[n * mask.row_bytes + (c >> 3)] >> (c & 7)) & 1u;
}

__device__ __forceinline__ float channel_scale(const ChannelMask& mask, uint64_t n, uint64_t c, uint64_t C) {
  return mask.per_channel ? mask.scale[n * C + c] : mask.scale[0];
}

// out = keep(n, c) ? in * s(n, c) : 0 over (N, C, positions) elements, kVec
// (<= 16 bytes) per thread and step. kChannelInner: channels are the
// contiguous dimension (channels_last, or 2-D with positions 1) and kVec
// divides C; else positions are and kVec divides them. The product is taken
// in opmath (float, double for double) and rounded once; a select, so NaN and
// Inf never reach dropped channels. A 0-d scale of exactly 1 (FDD without
// rescale, EWS's gates) multiplies nothing: kept values keep their bits, NaN
// payloads included, as the reference's select does.
template <typename scalar_t, int kVec, bool kChannelInner, typename index_t>
__global__ void __launch_bounds__(kApplyThreads)
    apply_channel_mask_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, ChannelMask mask,
                              index_t channels, index_t positions, index_t vectors) {
  using opmath_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, kVec>;
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  const bool unscaled = !mask.per_channel && mask.scale[0] == 1.0f;
  for (index_t v = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < vectors; v += stride) {
    const index_t e = v * kVec;
    const pack_t x = *reinterpret_cast<const pack_t*>(in + e);
    pack_t y;
    if constexpr (kChannelInner) {
      const index_t pixel = e / channels, c0 = e - pixel * channels, n = pixel / positions;
#pragma unroll
      for (int q = 0; q < kVec; ++q) {
        const index_t c = c0 + q;
        const opmath_t s = static_cast<opmath_t>(channel_scale(mask, n, c, channels));
        const scalar_t kept = unscaled ? x.v[q] : static_cast<scalar_t>(static_cast<opmath_t>(x.v[q]) * s);
        y.v[q] = channel_kept(mask, n, c) ? kept : scalar_t(0);
      }
    } else {
      const index_t plane = e / positions, n = plane / channels, c = plane - n * channels;
      const bool keep = channel_kept(mask, n, c);
      const opmath_t s = static_cast<opmath_t>(channel_scale(mask, n, c, channels));
#pragma unroll
      for (int q = 0; q < kVec; ++q) {
        const scalar_t kept = unscaled ? x.v[q] : static_cast<scalar_t>(static_cast<opmath_t>(x.v[q]) * s);
        y.v[q] = keep ? kept : scalar_t(0);
      }
    }
    *reinterpret_cast<pack_t*>(out + e) = y;
  }
}

// ---------------------------------------------------------------------------
// Host launchers
// ---------------------------------------------------------------------------

using block_mask_cuda::grid_size;


// Scratch of the PCA, alive until every kernel that reads it is enqueued.
struct PcaBuffers {
  at::Tensor scales, centred, tile_sums, matrices, basis, workspace, ritz, theta, axes, gram_axes;
};

// The samples' scales (N,), Xc (N, C, D) float64 and tile_sums (N, tiles, 2)
// from x (walkable 4-D).
void launch_centre(const at::Tensor& x, const DensityShape& s, PcaBuffers& b, cudaStream_t stream) {
  const int64_t tiles = (s.D + kTile - 1) / kTile;
  b.scales = at::empty({s.N}, x.options().dtype(at::kFloat));
  b.centred = at::empty({s.N, s.C, s.D}, x.options().dtype(at::kDouble));
  b.tile_sums = at::empty({s.N, tiles, 2}, x.options().dtype(at::kDouble));
  const bool channels_last = is_channels_last_4d(x);
  const unsigned scale_blocks = grid_size(s.N * kCentreThreads, kCentreThreads, 8);
  const unsigned blocks = grid_size(s.N * tiles * kCentreThreads, kCentreThreads, 8);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "feature_density_centre_cuda", [&] {
    const scalar_t* data = x.data_ptr<scalar_t>();
    float* scales = b.scales.data_ptr<float>();
    sample_scale_kernel<scalar_t><<<scale_blocks, kCentreThreads, 0, stream>>>(data, s.N, s.C * s.D, scales);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (channels_last) {
      centre_kernel<scalar_t, true><<<blocks, kCentreThreads, 0, stream>>>(
          data, scales, s.N, s.C, s.D, tiles, b.centred.data_ptr<double>(), b.tile_sums.data_ptr<double>());
    } else {
      centre_kernel<scalar_t, false><<<blocks, kCentreThreads, 0, stream>>>(
          data, scales, s.N, s.C, s.D, tiles, b.centred.data_ptr<double>(), b.tile_sums.data_ptr<double>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Ritz vectors, theta and present axes of every sample from M.
void launch_lanczos(const DensityShape& s, PcaBuffers& b, cudaStream_t stream) {
  const int64_t m = s.m;
  const at::TensorOptions options = b.centred.options();
  const int64_t workspace_bytes = workspace_doubles(m) * static_cast<int64_t>(sizeof(double));
  const bool in_shared = workspace_bytes <= kSharedWorkspaceBytes;
  b.basis = at::empty({s.N, m, m}, options.dtype(at::kFloat));
  b.ritz = at::empty({s.N, kMaxDims, m}, options.dtype(at::kFloat));
  b.theta = at::empty({s.N, kMaxDims}, options.dtype(at::kDouble));
  b.axes = at::empty({s.N}, options.dtype(at::kInt));
  if (!in_shared) b.workspace = at::empty({s.N, workspace_doubles(m)}, options.dtype(at::kDouble));
  const LanczosProblem problem{b.matrices.data_ptr<double>(),
                               b.tile_sums.data_ptr<double>(),
                               b.tile_sums.size(1),
                               m,
                               s.dims,
                               b.basis.data_ptr<float>(),
                               in_shared ? nullptr : b.workspace.data_ptr<double>(),
                               b.ritz.data_ptr<float>(),
                               b.theta.data_ptr<double>(),
                               b.axes.data_ptr<int32_t>()};
  lanczos_kernel<<<static_cast<unsigned>(s.N), kLanczosThreads, in_shared ? static_cast<size_t>(workspace_bytes) : 0,
                   stream>>>(problem);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The PCA of a 4-D x with N, C, D > 0: fills the binning problem's axes,
// theta, Ritz vectors and, per side, the Gram axes or the raw coordinates.
void launch_principal_axes(const at::Tensor& x, const DensityShape& s, PcaBuffers& b, BinningProblem& problem,
                           cudaStream_t stream) {
  launch_centre(x, s, b, stream);
  // Both sides in float64 (see the header): the current stream, no TF32.
  const at::Tensor centred_t = b.centred.transpose(1, 2);
  b.matrices = (s.C < s.D ? at::bmm(b.centred, centred_t) : at::bmm(centred_t, b.centred)).contiguous();
  launch_lanczos(s, b, stream);
  problem.axes = b.axes.data_ptr<int32_t>();
  problem.theta = b.theta.data_ptr<double>();
  problem.ritz = b.ritz.data_ptr<float>();
  if (s.C < s.D) {
    b.gram_axes = at::empty({s.N, kMaxDims, s.D}, b.centred.options().dtype(at::kFloat));
    gram_axes_kernel<<<grid_size(s.N * s.D, kProjectThreads, 8), kProjectThreads, 0, stream>>>(
        b.centred.data_ptr<double>(), b.ritz.data_ptr<float>(), b.axes.data_ptr<int32_t>(), s.N, s.C, s.D,
        b.gram_axes.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    problem.gram_axes = b.gram_axes.data_ptr<float>();
  } else {
    covariance_coordinates_kernel<<<grid_size(s.N * s.C * kWarp, kProjectThreads, 8), kProjectThreads, 0, stream>>>(
        b.centred.data_ptr<double>(), b.ritz.data_ptr<float>(), b.axes.data_ptr<int32_t>(), s.N, s.C, s.D,
        problem.coordinates);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// cell (N, C) and counts (N, G, zero on entry) of every sample; with
// drop.mask, also the keep mask and (drop.scale) the scale.
void launch_feature_density(const at::Tensor& input, const DensityShape& s, at::Tensor& cell, at::Tensor& counts,
                            const DropProblem& drop, cudaStream_t stream) {
  if (s.N == 0 || s.C == 0) return;  // counts stay 0; nothing to draw
  TORCH_CHECK(s.N <= std::numeric_limits<int32_t>::max(), "feature_density: at most 2**31 - 1 samples, got ", s.N);
  at::Tensor coordinates = at::empty({s.N, s.C, kMaxDims}, input.options().dtype(at::kFloat));
  BinningProblem problem{s.C,    s.D,     s.m,     s.cells, s.dims, s.grids, nullptr,
                         nullptr, nullptr, nullptr, nullptr, coordinates.data_ptr<float>(),
                         cell.data_ptr<int64_t>(), counts.data_ptr<int64_t>()};
  at::Tensor features;
  PcaBuffers buffers;
  if (s.features) {
    features = input.to(at::kFloat).contiguous();
    problem.features = features.data_ptr<float>();
  } else if (s.D > 0) {
    launch_principal_axes(walkable(input), s, buffers, problem, stream);
  }  // D == 0: no axes, every channel in cell 0
  bin_channels_kernel<<<static_cast<unsigned>(s.N), kBinThreads, 0, stream>>>(problem, drop);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The widest vector (16 bytes at most) that divides `inner` and fits both pointers' alignment.
int vector_width(const at::Tensor& in, const at::Tensor& out, int64_t inner) {
  const int64_t elem = in.element_size();
  int vec = static_cast<int>(16 / elem);
  auto aligned = [&](const void* p) { return reinterpret_cast<uintptr_t>(p) % (vec * elem) == 0; };
  while (vec > 1 && (inner % vec != 0 || !aligned(in.data_ptr()) || !aligned(out.data_ptr()))) vec /= 2;
  return vec;
}

template <typename scalar_t, typename index_t>
void launch_apply(const at::Tensor& in, at::Tensor& out, const ChannelMask& mask, bool channel_inner,
                  cudaStream_t stream) {
  const int64_t C = in.size(1), positions = in.dim() == 4 ? in.size(2) * in.size(3) : 1;
  const int vec = vector_width(in, out, channel_inner ? C : positions);
  auto launch = [&](auto vec_constant) {
    constexpr int kVec = decltype(vec_constant)::value;
    if constexpr (kVec * sizeof(scalar_t) <= 16) {
      const int64_t vectors = in.numel() / kVec;
      const unsigned blocks = grid_size(vectors, kApplyThreads, 16);
      if (channel_inner) {
        apply_channel_mask_kernel<scalar_t, kVec, true, index_t><<<blocks, kApplyThreads, 0, stream>>>(
            in.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), mask, static_cast<index_t>(C),
            static_cast<index_t>(positions), static_cast<index_t>(vectors));
      } else {
        apply_channel_mask_kernel<scalar_t, kVec, false, index_t><<<blocks, kApplyThreads, 0, stream>>>(
            in.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), mask, static_cast<index_t>(C),
            static_cast<index_t>(positions), static_cast<index_t>(vectors));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  };
  block_mask_cuda::with_vector_width(vec, launch);
}

// out = keep ? input * scale : 0 per channel, for input (N, C, H, W) (in its
// walkable layout) or (N, C); mask (N, ceil(C/8)); scale one value or (N, C).
at::Tensor apply_channel_mask(const at::Tensor& input, const at::Tensor& mask, const at::Tensor& scale,
                              cudaStream_t stream) {
  const at::Tensor in = input.dim() == 4 ? walkable(input) : input.contiguous();
  at::Tensor out = at::empty_like(in);
  if (in.numel() == 0) return out;
  const at::Tensor bits = mask.contiguous();
  const at::Tensor scale_values = scale.contiguous();
  // A one-element scale is one value for every channel, whatever its shape.
  const ChannelMask channel_mask{bits.data_ptr<uint8_t>(), scale_values.data_ptr<float>(), scale_values.numel() != 1,
                                 bits.size(1)};
  const bool channel_inner = in.dim() == 2 || is_channels_last_4d(in);
  const bool small = in.numel() <= std::numeric_limits<int32_t>::max();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "channel_mask_apply_cuda", [&] {
    if (small) {
      launch_apply<scalar_t, uint32_t>(in, out, channel_mask, channel_inner, stream);
    } else {
      launch_apply<scalar_t, uint64_t>(in, out, channel_mask, channel_inner, stream);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> feature_density_cuda(const at::Tensor& x, int64_t dims, int64_t grids) {
  check_feature_density_args(x, dims, grids);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const DensityShape s = density_shape(x, dims, grids);
  at::Tensor cell = at::empty({s.N, s.C}, x.options().dtype(at::kLong));
  at::Tensor counts = at::zeros({s.N, s.cells}, x.options().dtype(at::kLong));
  launch_feature_density(x, s, cell, counts, DropProblem{nullptr, nullptr, 0, 0, 0.0, 0.0}, stream);
  return {cell, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> feature_density_forward_cuda(const at::Tensor& x, int64_t dims,
                                                                             int64_t grids, int64_t seed,
                                                                             double kappa, double alpha,
                                                                             bool rescale) {
  check_feature_density_forward_args(x, dims, grids, kappa, alpha);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const DensityShape s = density_shape(x, dims, grids);
  const at::TensorOptions options = x.options();
  at::Tensor cell = at::empty({s.N, s.C}, options.dtype(at::kLong));
  at::Tensor counts = at::zeros({s.N, s.cells}, options.dtype(at::kLong));
  at::Tensor mask = at::empty({s.N, mask_row_bytes(s.C)}, options.dtype(at::kByte));
  at::Tensor scale = rescale ? at::empty({s.N, s.C}, options.dtype(at::kFloat)) : at::ones({}, options.dtype(at::kFloat));
  const DropProblem drop{mask.data_ptr<uint8_t>(), rescale ? scale.data_ptr<float>() : nullptr, mask.size(1),
                         static_cast<uint64_t>(seed), kappa, alpha};
  launch_feature_density(x, s, cell, counts, drop, stream);
  at::Tensor y = apply_channel_mask(x, mask, scale, stream);
  return {y, mask, scale};
}

at::Tensor channel_mask_backward_cuda(const at::Tensor& grad_y, const at::Tensor& mask, const at::Tensor& scale) {
  check_channel_mask_backward_args(grad_y, mask, scale);
  const c10::cuda::CUDAGuard device_guard(grad_y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // The scale stays on the device: the kernel reads it, the host never does.
  return apply_channel_mask(grad_y, mask, scale, stream);
}

}  // namespace

TORCH_LIBRARY_IMPL(robustdrop, CUDA, m) {
  m.impl("feature_density", &feature_density_cuda);
  m.impl("feature_density_forward", &feature_density_forward_cuda);
  m.impl("channel_mask_backward", &channel_mask_backward_cuda);
}

}  // namespace robustdrop
