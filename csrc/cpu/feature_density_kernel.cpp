// Feature-density dropout on the CPU (DESIGN.md 4.3), against
// python/robustdrop/reference/feature_density.py.
//
// Shapes: x (N, C, H, W) with D = H*W, or x (N, F) (F as C, D = 1, no PCA);
// m = min(C, D); G = grids**dims cells.
//
// Per sample (parallel over samples), in buffers of the thread that owns it:
//   1. Centre: Xc = X - mean over channels (float32, C x D), X = x[n] times
//      the power of two that brings max |x[n]| into [1, 2) (exact, and the
//      cells do not change with it: csrc/lanczos.h, magnitude_scale), so no
//      product below overflows or underflows whatever the magnitude of x.
//   2. The small matrix M (m x m) by one float32 GEMM: Xc Xc^T (the Gram
//      side) when C < D, else Xc^T Xc (the covariance side).
//   3. Lanczos on M for the top `dims` eigenpairs (csrc/lanczos.h states the
//      stopping rule); orientation and coordinates, which read Xc once more
//      (on the Gram side to form Xc^T y, on the covariance side to project);
//      binning and counts.
//   4. (forward) The per-cell drop probabilities, the Philox Bernoulli per
//      channel, the mask bits and scales, and, for float32 channel-major x,
//      the apply, which reads the sample again while it is still in cache and
//      writes y once; other dtypes and layouts are applied in a pass of their own.
// The PCA needs every channel of a sample before any channel can be binned,
// so x is read twice (the scan for max |x[n]| in step 1 reads it from cache);
// Xc stays in the cache of the thread between steps 1 and 3.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "../feature_density.h"
#include "../lanczos.h"
#include "../philox.h"
#include "philox_cpu.h"
#include "vector_clones.h"

namespace robustdrop {
namespace {

using lanczos::kMaxDims;


// x as float32 (N, C, D), channel-major, the layout the GEMM and the binning read.
at::Tensor channel_rows(const at::Tensor& x, const DensityShape& s) {
  return x.to(at::kFloat).contiguous().view({s.N, s.C, s.D});
}

// ---------------------------------------------------------------- vector helpers

// Inlined into the AVX2 and baseline clones of sample_cells (vector_clones.h).

// a . b in float32 with 32 partial sums: four independent 8-lane
// accumulators, so each add need not wait for the one before it (one
// accumulator made the Gram/covariance products latency-bound), and as
// accurate as the float32 vectors it reads. Lengths below 32 use the first
// accumulator only. The sum of the lanes is taken in a fixed order, so the
// scalar path below gives the same bits.
ROBUSTDROP_CLONE_INLINE float dot(const float* __restrict a, const float* __restrict b, int64_t length) {
  int64_t i = 0;
#if ROBUSTDROP_HAS_FLOAT8
  Float8 acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
  for (; i + 32 <= length; i += 32) {
    acc0 += load8(a + i) * load8(b + i);
    acc1 += load8(a + i + 8) * load8(b + i + 8);
    acc2 += load8(a + i + 16) * load8(b + i + 16);
    acc3 += load8(a + i + 24) * load8(b + i + 24);
  }
  for (; i + 8 <= length; i += 8) acc0 += load8(a + i) * load8(b + i);
  if (length >= 32) acc0 += (acc1 + acc2) + acc3;
  float sum = 0.0f;
  for (; i < length; ++i) sum += a[i] * b[i];
  for (int lane = 0; lane < 8; ++lane) sum += acc0[lane];
  return sum;
#else
  constexpr int kLanes = 32;
  float partial[kLanes] = {};
  for (; i + kLanes <= length; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) partial[lane] += a[i + lane] * b[i + lane];
  }
  for (; i + 8 <= length; i += 8) {
    for (int lane = 0; lane < 8; ++lane) partial[lane] += a[i + lane] * b[i + lane];
  }
  float sum = 0.0f;
  for (; i < length; ++i) sum += a[i] * b[i];
  for (int lane = 0; lane < 8; ++lane) partial[lane] += (partial[lane + 8] + partial[lane + 16]) + partial[lane + 24];
  for (int lane = 0; lane < 8; ++lane) sum += partial[lane];
  return sum;
#endif
}

// y += weight * x.
ROBUSTDROP_CLONE_INLINE void axpy(float weight, const float* __restrict x, float* __restrict y, int64_t length) {
  for (int64_t i = 0; i < length; ++i) y[i] += weight * x[i];
}

#if ROBUSTDROP_HAS_FLOAT8
// add_weighted_rows on y[0 .. 8 * kBlocks): kBlocks independent sums, so each
// add need not wait for the one before it (with one block at a time, a row of
// 512 channels took 16 dependent adds per block).
template <int kBlocks>
ROBUSTDROP_CLONE_INLINE void add_weighted_block(const float* __restrict rows, int64_t stride,
                                                const float* __restrict weights, int64_t count, float* __restrict y) {
  Float8 sum[kBlocks];
  for (int b = 0; b < kBlocks; ++b) sum[b] = load8(y + 8 * b);
  for (int64_t k = 0; k < count; ++k) {
    const float weight = weights[k];
    for (int b = 0; b < kBlocks; ++b) sum[b] += weight * load8(rows + k * stride + 8 * b);
  }
  for (int b = 0; b < kBlocks; ++b) store8(y + 8 * b, sum[b]);
}
#endif

// y[i] += sum over k of weights[k] * rows[k * stride + i], the terms added in
// order of k: the same sums as one axpy per row, but each block of y stays in
// a register across the rows. A chain of axpys on a short y (m = 16 in the
// Lanczos steps) waited on its own stores.
ROBUSTDROP_CLONE_INLINE void add_weighted_rows(const float* __restrict rows, int64_t stride,
                                               const float* __restrict weights, int64_t count, float* __restrict y,
                                               int64_t length) {
  int64_t i = 0;
#if ROBUSTDROP_HAS_FLOAT8
  for (; i + 32 <= length; i += 32) add_weighted_block<4>(rows + i, stride, weights, count, y + i);
  for (; i + 16 <= length; i += 16) add_weighted_block<2>(rows + i, stride, weights, count, y + i);
  for (; i + 8 <= length; i += 8) add_weighted_block<1>(rows + i, stride, weights, count, y + i);
#endif
  for (; i < length; ++i) {
    float sum = y[i];
    for (int64_t k = 0; k < count; ++k) sum += weights[k] * rows[k * stride + i];
    y[i] = sum;
  }
}

// ---------------------------------------------------------------- centre and M

// The centred sample Xc = X - mean over channels in the layout its matrix
// wants: rows of M are dot products of rows of this buffer.
//   Gram side (C < D):        (C, D), M = Xc Xc^T
//   covariance side (C >= D): (D, C), Xc transposed, M = Xc^T Xc
inline bool gram_side(const DensityShape& s) { return s.C < s.D; }

// The smallest and largest of values[0..length), length >= 1, with running
// lanes that each start at values[0] and take a value only when it compares
// below (above) the lane: std::min / std::max's rule, so a NaN is passed over
// unless it is values[0]. Min and max are exact, so the result does not
// depend on how the values are split over lanes, but for the sign of a zero
// (which neither magnitude_scale nor the bins can see). On Float8, four vectors of
// lanes: one vector made each step wait on the compare before it, and GCC
// kept it on the stack inside sample_cells (store-to-load forwarding on every
// step), which made this scan a sixth of the whole density pass at 512 x 16.
ROBUSTDROP_CLONE_INLINE void value_range(const float* values, int64_t length, float& lo, float& hi) {
  lo = hi = values[0];
  int64_t c = 0;
#if ROBUSTDROP_HAS_FLOAT8
  Float8 lo8[4], hi8[4];
  for (int k = 0; k < 4; ++k) lo8[k] = hi8[k] = Float8{} + values[0];
  for (; c + 32 <= length; c += 32) {
    for (int k = 0; k < 4; ++k) {
      const Float8 v = load8(values + c + 8 * k);
      lo8[k] = v < lo8[k] ? v : lo8[k];
      hi8[k] = hi8[k] < v ? v : hi8[k];
    }
  }
  for (int k = 0; k < 4; ++k) {
    for (int lane = 0; lane < 8; ++lane) {
      lo = std::min(lo, lo8[k][lane]);
      hi = std::max(hi, hi8[k][lane]);
    }
  }
#endif
  for (; c < length; ++c) {
    lo = std::min(lo, values[c]);
    hi = std::max(hi, values[c]);
  }
}

// centred (D, C) = scale * transpose of sample (C, D) minus mean (D) from each row.
ROBUSTDROP_CLONE_INLINE void centre_transposed(const float* sample, const float* mean, float scale, int64_t C,
                                               int64_t D, float* centred) {
  int64_t c_blocks = 0, d_blocks = 0;  // the part done in 8 x 8 blocks
#if ROBUSTDROP_HAS_FLOAT8
  c_blocks = C - C % 8;
  d_blocks = D - D % 8;
  for (int64_t c0 = 0; c0 < c_blocks; c0 += 8) {
    for (int64_t d0 = 0; d0 < d_blocks; d0 += 8) {
      Float8 rows[8];
      const Float8 block_mean = load8(mean + d0);
      for (int i = 0; i < 8; ++i) rows[i] = load8(sample + (c0 + i) * D + d0) * scale - block_mean;
      transpose8x8(rows);
      for (int j = 0; j < 8; ++j) store8(centred + (d0 + j) * C + c0, rows[j]);
    }
  }
#endif
  // The rest element by element: columns past the blocks, then rows past them.
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t c = d < d_blocks ? c_blocks : 0; c < C; ++c) centred[d * C + c] = sample[c * D + d] * scale - mean[d];
  }
}

// Writes the centred sample of X = scale * sample and its mean over channels
// (D), scale = magnitude_scale(max |sample|): X is exact, and keeps M and the
// Lanczos products inside float32's range whatever the magnitude of x.
ROBUSTDROP_CLONE_INLINE void centre_sample(const float* sample, const DensityShape& s, float* mean, float* centred) {
  float lo, hi;
  value_range(sample, s.C * s.D, lo, hi);
  const float scale = lanczos::magnitude_scale(std::max(std::fabs(lo), std::fabs(hi)));
  std::fill(mean, mean + s.D, 0.0f);
  int64_t c = 0;
  // Four channels per update: a quarter of the dependent read-add-writes of mean.
  for (; c + 4 <= s.C; c += 4) {
    const float* row = sample + c * s.D;
    for (int64_t d = 0; d < s.D; ++d) {
      mean[d] += (row[d] * scale + row[s.D + d] * scale) + (row[2 * s.D + d] * scale + row[3 * s.D + d] * scale);
    }
  }
  for (; c < s.C; ++c) axpy(scale, sample + c * s.D, mean, s.D);
  for (int64_t d = 0; d < s.D; ++d) mean[d] /= static_cast<float>(s.C);
  if (gram_side(s)) {
    for (c = 0; c < s.C; ++c) {
      for (int64_t d = 0; d < s.D; ++d) centred[c * s.D + d] = sample[c * s.D + d] * scale - mean[d];
    }
  } else {
    centre_transposed(sample, mean, scale, s.C, s.D, centred);
  }
}

// The centred sum of squares, trace(M), or 0 when it is within rounding of
// nothing against the uncentred one, trace(M) + C * |mean|^2
// (lanczos::kDegenerateTolerance): channels equal up to float32 rounding.
// Non-finite when the sample holds NaN or Inf.
ROBUSTDROP_CLONE_INLINE double centred_energy(const float* matrix, const float* mean, const DensityShape& s) {
  const int64_t m = std::min(s.C, s.D);
  double sum = 0.0, mean_energy = 0.0;
  for (int64_t i = 0; i < m; ++i) sum += matrix[i * m + i];
  for (int64_t d = 0; d < s.D; ++d) mean_energy += static_cast<double>(mean[d]) * mean[d];
  if (!std::isfinite(sum) || !std::isfinite(mean_energy)) return NAN;
  const double energy = sum + static_cast<double>(s.C) * mean_energy;
  return sum > lanczos::kDegenerateTolerance * energy ? sum : 0.0;
}

// Below this size M is summed here; above it one GEMM call is faster than its overhead.
constexpr int64_t kGemmMinSize = 64;

// The m x m matrix M of one sample: the Gram matrix of the centred buffer's rows.
ROBUSTDROP_CLONE_INLINE void small_matrix(float* centred, const DensityShape& s, float* matrix) {
  const int64_t m = std::min(s.C, s.D), length = std::max(s.C, s.D);
  if (m >= kGemmMinSize) {
    const at::Tensor rows = at::from_blob(centred, {m, length}, at::kFloat);
    at::Tensor out = at::from_blob(matrix, {m, m}, at::kFloat);
    at::mm_out(out, rows, rows.t());
    return;
  }
  for (int64_t a = 0; a < m; ++a) {
    for (int64_t b = 0; b <= a; ++b) matrix[a * m + b] = dot(centred + a * length, centred + b * length, length);
  }
  for (int64_t a = 0; a < m; ++a) {
    for (int64_t b = 0; b < a; ++b) matrix[b * m + a] = matrix[a * m + b];
  }
}

// ---------------------------------------------------------------- pass 3: axes

// Lanczos state of one sample, reused across the samples of one thread.
struct LanczosScratch {
  std::vector<float> basis;     // (m + 1, m): q_0 .. q_m
  std::vector<float> residual;  // (m)
  std::vector<float> projections;  // (m) Q^T w of the re-orthogonalisation
  std::vector<double> alpha, beta;  // (m) the tridiagonal T
  std::vector<double> vectors;      // (kMaxDims, m) top eigenvectors of T
  std::vector<double> work;         // (4m)
  std::vector<float> ritz;          // (kMaxDims, m) Ritz vectors y_r
  std::vector<double> ritz_sum;     // (m) one Ritz vector before rounding
  double theta[kMaxDims];
  int pairs = 0;

  void resize(int64_t m) {
    basis.assign((m + 1) * m, 0.0f);
    residual.assign(m, 0.0f);
    projections.assign(m, 0.0f);
    alpha.assign(m, 0.0);
    beta.assign(m, 0.0);
    vectors.assign(kMaxDims * m, 0.0);
    work.assign(4 * m, 0.0);
    ritz.assign(kMaxDims * m, 0.0f);
    ritz_sum.assign(m, 0.0);
  }
};

// w -= Q_j (Q_j^T w) with Q_j the first `steps` basis vectors; projections
// holds -Q_j^T w afterwards.
ROBUSTDROP_CLONE_INLINE void reorthogonalize(const float* basis, int64_t steps, int64_t m, float* w, float* projections) {
  for (int64_t i = 0; i < steps; ++i) projections[i] = -dot(basis + i * m, w, m);
  add_weighted_rows(basis, m, projections, steps, w, m);
}

// The top `dims` eigenpairs of the m x m matrix (row-major) into scratch.theta,
// scratch.ritz and scratch.pairs, by the Lanczos iteration of csrc/lanczos.h.
ROBUSTDROP_CLONE_INLINE void top_eigenpairs(const float* matrix, int64_t m, int dims, double trace, LanczosScratch& scratch) {
  float* basis = scratch.basis.data();
  float* w = scratch.residual.data();
  double norm = 0.0;
  for (int64_t i = 0; i < m; ++i) {
    basis[i] = lanczos::start_component(i);
    norm += static_cast<double>(basis[i]) * basis[i];
  }
  const float inverse_norm = static_cast<float>(1.0 / std::sqrt(norm));
  for (int64_t i = 0; i < m; ++i) basis[i] *= inverse_norm;
  int64_t steps = 0;
  int pairs = 0;
  for (int64_t j = 0; j < m; ++j) {
    const float* q = basis + j * m;
    // w = M q as a sum of M's rows (M is symmetric): vector adds, no horizontal sums.
    std::fill(w, w + m, 0.0f);
    add_weighted_rows(matrix, m, q, m, w, m);
    const double a = dot(q, w, m);
    const float previous_beta = j > 0 ? static_cast<float>(scratch.beta[j - 1]) : 0.0f;
    for (int64_t i = 0; i < m; ++i) {
      w[i] -= static_cast<float>(a) * q[i] + (j > 0 ? previous_beta * basis[(j - 1) * m + i] : 0.0f);
    }
    for (int pass = 0; pass < 2; ++pass) reorthogonalize(basis, j + 1, m, w, scratch.projections.data());
    const double b = std::sqrt(static_cast<double>(dot(w, w, m)));
    scratch.alpha[j] = a;
    scratch.beta[j] = b;
    steps = j + 1;
    const bool exhausted = b <= lanczos::kExhaustedTolerance * trace;
    if (exhausted || lanczos::check_after_step(static_cast<int>(steps), static_cast<int>(m), dims)) {
      pairs = lanczos::tridiagonal_top_eigenpairs(scratch.alpha.data(), scratch.beta.data(), static_cast<int>(steps),
                                                  dims, scratch.theta, scratch.vectors.data(), scratch.work.data());
      const bool converged = steps >= dims && lanczos::ritz_pairs_converged(b, scratch.theta, scratch.vectors.data(),
                                                                            static_cast<int>(steps), pairs);
      if (exhausted || converged || steps == m) break;
    }
    const float inverse_beta = static_cast<float>(1.0 / b);
    float* next = basis + (j + 1) * m;
    for (int64_t i = 0; i < m; ++i) next[i] = w[i] * inverse_beta;
  }
  // Ritz vectors y_r = Q s_r, normalised.
  for (int r = 0; r < pairs; ++r) {
    const double* s = scratch.vectors.data() + r * steps;
    float* y = scratch.ritz.data() + r * m;
    double* sum = scratch.ritz_sum.data();
    std::fill(sum, sum + m, 0.0);
    for (int64_t i = 0; i < steps; ++i) {
      const float* q = basis + i * m;
      for (int64_t k = 0; k < m; ++k) sum[k] += s[i] * q[k];
    }
    double length = 0.0;
    for (int64_t k = 0; k < m; ++k) length += sum[k] * sum[k];
    const double inverse_length = length > 0.0 ? 1.0 / std::sqrt(length) : 0.0;
    for (int64_t k = 0; k < m; ++k) y[k] = static_cast<float>(sum[k] * inverse_length);
  }
  scratch.pairs = pairs;
}

// +1 or -1: the sign of the component of largest magnitude (ties to the lower index).
ROBUSTDROP_CLONE_INLINE float orientation(const float* axis, int64_t length) {
  int64_t best = 0;
  for (int64_t i = 1; i < length; ++i) {
    if (std::fabs(axis[i]) > std::fabs(axis[best])) best = i;
  }
  return axis[best] < 0.0f ? -1.0f : 1.0f;
}

// Coordinates f (dims, C) of one non-degenerate sample from its eigenpairs;
// axis holds max(C, D) floats of scratch.
ROBUSTDROP_CLONE_INLINE void principal_coordinates(const float* centred, const DensityShape& s, const LanczosScratch& scratch,
                           float* axis, float* coordinates) {
  std::fill(coordinates, coordinates + s.C * s.dims, 0.0f);
  for (int r = 0; r < scratch.pairs; ++r) {
    const double theta = scratch.theta[r];
    if (!(scratch.theta[0] > 0.0) || !(theta > lanczos::kAbsentAxisTolerance * scratch.theta[0])) break;
    if (gram_side(s)) {
      // y (C) is the coordinate direction; the axis in R^D, Xc^T y / sqrt(theta),
      // is needed only for its orientation.
      const float* y = scratch.ritz.data() + r * s.C;
      std::fill(axis, axis + s.D, 0.0f);
      add_weighted_rows(centred, s.D, y, s.C, axis, s.D);
      const float length = static_cast<float>(std::sqrt(theta)) * orientation(axis, s.D);
      for (int64_t c = 0; c < s.C; ++c) coordinates[r * s.C + c] = length * y[c];
    } else {
      // y (D) is the axis; the coordinates are Xc y, summed over the rows of Xc^T.
      const float* y = scratch.ritz.data() + r * s.D;
      const float sign = orientation(y, s.D);
      std::fill(axis, axis + s.C, 0.0f);
      add_weighted_rows(centred, s.C, y, s.D, axis, s.C);
      for (int64_t c = 0; c < s.C; ++c) coordinates[r * s.C + c] = sign * axis[c];
    }
  }
}

// cell[c] = sum_r b_r * grids**r of coordinates f (dims, C); counts[cell] += 1.
// cells (C) is int32 scratch: the bins of one axis vectorise in int32 lanes.
ROBUSTDROP_CLONE_INLINE void bin_channels(const float* coordinates, const DensityShape& s, int32_t* cells,
                                          int64_t* cell, int64_t* counts) {
  std::fill(cells, cells + s.C, 0);
  int32_t stride = 1;
  const int32_t last = static_cast<int32_t>(s.grids - 1);
  for (int r = 0; r < s.dims; ++r, stride *= static_cast<int32_t>(s.grids)) {
    const float* axis_coordinates = coordinates + r * s.C;
    float lo, hi;
    value_range(axis_coordinates, s.C, lo, hi);
    if (!(hi > lo)) continue;  // every channel in bin 0 on this axis
    // Binned on the axis scaled by a power of two (exact; see magnitude_scale):
    // hi - lo cannot overflow, nor the width underflow.
    const float scale = lanczos::magnitude_scale(std::max(std::fabs(lo), std::fabs(hi)));
    lo *= scale;
    hi *= scale;
    const float width = (hi - lo) / static_cast<float>(s.grids);
    const float last_bin = static_cast<float>(last);
    // floor(position) clamped to [0, last]: clamped by min and max first (NaN,
    // from a zero width, goes to 0), after which truncation is the floor.
    // No branches and no floor call: mispredicted branches on the edge bins
    // and floor (which GCC vectorises only without trapping math) kept this
    // loop scalar.
    for (int64_t c = 0; c < s.C; ++c) {
      const float position = (axis_coordinates[c] * scale - lo) / width;
      cells[c] += static_cast<int32_t>(std::min(last_bin, std::max(0.0f, position))) * stride;
    }
  }
  // C in a local: counts may alias s (both int64), so the loop would reload s.C after every increment.
  const int64_t C = s.C;
  for (int64_t c = 0; c < C; ++c) {
    cell[c] = cells[c];
    counts[cells[c]] += 1;
  }
}

// Elements of x below which splitting samples over threads costs more than it saves.
constexpr int64_t kSamplesWork = 1 << 15;

// Buffers of one thread, reused from sample to sample.
struct SampleScratch {
  std::vector<float> mean, centred, matrix, axis, coordinates;
  std::vector<int32_t> cells;
  LanczosScratch lanczos;

  explicit SampleScratch(const DensityShape& s) : coordinates(s.C * s.dims), cells(s.C) {
    if (s.features || s.D == 0) return;
    const int64_t m = std::min(s.C, s.D);
    mean.resize(s.D);
    axis.resize(std::max(s.C, s.D));
    centred.resize(s.C * s.D);
    matrix.resize(m * m);
    lanczos.resize(m);
  }
};

// One sample's coordinates (dims, C) into scratch.coordinates; false when the
// sample is degenerate (every channel then goes to cell 0).
ROBUSTDROP_CLONE_INLINE bool sample_coordinates(const float* sample, const DensityShape& s, SampleScratch& scratch) {
  float* coordinates = scratch.coordinates.data();
  if (s.features) {
    for (int64_t c = 0; c < s.C; ++c) {
      if (!std::isfinite(sample[c])) return false;
      coordinates[c] = sample[c];
    }
    return true;
  }
  if (s.D == 0) return false;
  centre_sample(sample, s, scratch.mean.data(), scratch.centred.data());
  small_matrix(scratch.centred.data(), s, scratch.matrix.data());
  const double trace = centred_energy(scratch.matrix.data(), scratch.mean.data(), s);
  if (!(trace > 0.0) || !std::isfinite(trace)) return false;
  top_eigenpairs(scratch.matrix.data(), std::min(s.C, s.D), s.dims, trace, scratch.lanczos);
  principal_coordinates(scratch.centred.data(), s, scratch.lanczos, scratch.axis.data(), coordinates);
  return true;
}

// One sample's cell (C) and counts (G, zeroed by the caller). The whole
// per-sample pipeline is one function so that every step is built for AVX2.
ROBUSTDROP_VECTOR_CLONES void sample_cells(const float* sample, const DensityShape& s, SampleScratch& scratch,
                                           int64_t* cell_row, int64_t* counts_row) {
  if (sample_coordinates(sample, s, scratch)) {
    bin_channels(scratch.coordinates.data(), s, scratch.cells.data(), cell_row, counts_row);
  } else {
    std::fill(cell_row, cell_row + s.C, 0);
    counts_row[0] = s.C;
  }
}

// The density of every sample; rows is x as float32 (N, C, D). Sample n's
// cell (C) and counts (G) go to scratch rows of the thread that computes it,
// and after_sample(n, cell_row, counts_row) runs right after, while the sample
// is still in that core's cache: the forward keeps only the mask it draws from
// them, so no (N, C) cell tensor is written to memory and read back.
// Threads take chunks of samples from a shared counter instead of one fixed
// range each, so they finish together although samples differ in work (the
// Lanczos iteration stops after a different number of steps in each; 5% faster
// at 64x128x16x16 on 2 threads) and a thread that falls behind (another process
// on its core) leaves its samples to the others. No result depends on which
// thread computes a sample.
template <typename AfterSample>
void density_cells(const at::Tensor& rows, const DensityShape& s, AfterSample&& after_sample) {
  if (s.N == 0 || s.C == 0) return;
  // Samples per chunk: enough that a small batch (FC features) stays on one thread.
  const int64_t chunk = std::max<int64_t>(1, kSamplesWork / std::max<int64_t>(1, s.C * s.D * s.dims));
  const int64_t chunks = (s.N + chunk - 1) / chunk;
  const float* data = rows.data_ptr<float>();
  std::atomic<int64_t> next_chunk{0};
  // One task per thread; inside another parallel region it runs once, on this thread, and takes every chunk.
  const int64_t tasks = std::min<int64_t>(chunks, at::get_num_threads());
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    SampleScratch scratch(s);
    std::vector<int64_t> cell_row(s.C), counts_row(s.cells);
    for (int64_t k = next_chunk.fetch_add(1); k < chunks; k = next_chunk.fetch_add(1)) {
      for (int64_t n = k * chunk; n < std::min(s.N, (k + 1) * chunk); ++n) {
        std::fill(counts_row.begin(), counts_row.end(), 0);
        sample_cells(data + n * s.C * s.D, s, scratch, cell_row.data(), counts_row.data());
        after_sample(n, cell_row.data(), counts_row.data());
      }
    }
  });
}

// ---------------------------------------------------------------- masks and apply

// float32(clamp(kappa * count / largest + alpha, 0, 1)) in three rounded double steps.
float drop_probability(int64_t count, int64_t largest, double kappa, double alpha) {
  double p = kappa * static_cast<double>(count);
  p = p / static_cast<double>(largest);
  p = p + alpha;
  return static_cast<float>(std::min(std::max(p, 0.0), 1.0));
}

// What a forward call drops with.
struct DropParams {
  uint64_t seed;
  double kappa, alpha;
  bool rescale;
};

// Sample n's keep bits into mask_row (every byte written, padding bits 0) and, with rescale,
// its scale row (C); cell_row (C) and counts_row (G) are its density.
void sample_mask(int64_t n, const int64_t* cell_row, const int64_t* counts_row, const DensityShape& s,
                 const DropParams& drop, uint8_t* mask_row, float* scale_row) {
  thread_local std::vector<float> uniforms, probability;
  uniforms.resize(s.C);
  probability.resize(s.cells);
  uniform_floats(drop.seed, static_cast<uint64_t>(n * s.C), s.C, uniforms.data());
  const int64_t largest = std::max<int64_t>(1, *std::max_element(counts_row, counts_row + s.cells));
  for (int64_t g = 0; g < s.cells; ++g) probability[g] = drop_probability(counts_row[g], largest, drop.kappa, drop.alpha);
  // Branch-free: the keep bits are coin flips, and a branch on each cost
  // more than the rest of this loop. Each byte is put together in a register:
  // or-ing bit by bit into mask_row made every channel wait on the store of
  // the one before it.
  for (int64_t c0 = 0; c0 < s.C; c0 += 8) {
    uint8_t byte = 0;
    for (int64_t c = c0; c < std::min(c0 + 8, s.C); ++c) {
      const uint8_t keep = !(uniforms[c] < probability[cell_row[c]]);
      byte |= static_cast<uint8_t>(keep << (c - c0));
    }
    mask_row[c0 >> 3] = byte;
  }
  if (drop.rescale) {
    for (int64_t c = 0; c < s.C; ++c) {
      const float p = probability[cell_row[c]];
      const uint8_t keep = !(uniforms[c] < p);
      scale_row[c] = select_kept(keep, static_cast<float>(1.0 / (1.0 - static_cast<double>(p))));
    }
  }
}

inline bool channel_kept(const uint8_t* mask_row, int64_t c) { return (mask_row[c >> 3] >> (c & 7)) & 1; }

// keep[c] and factor[c] (C) of one sample from its mask row and its scale:
// scale (C) when per_channel, else one value for every channel.
template <typename opmath_t>
void sample_factors(const uint8_t* mask_row, const float* scale, bool per_channel, int64_t C, uint8_t* keep,
                    opmath_t* factors) {
  for (int64_t c = 0; c < C; ++c) {
    keep[c] = channel_kept(mask_row, c);
    factors[c] = static_cast<opmath_t>(per_channel ? scale[c] : scale[0]);
  }
}

// One sample of the apply, x and y (C, D) channel-major or (D, C) channels
// last: y = keep[c] ? x * factor[c] : 0; or, unscaled (a 0-d scale of exactly
// 1: FDD without rescale, EWS's gates), y = keep[c] ? x : 0 with the kept
// values' bits untouched, NaN payloads included.
template <typename scalar_t, typename opmath_t>
void apply_sample(const scalar_t* x, scalar_t* y, const uint8_t* keep, const opmath_t* factor, int64_t C, int64_t D,
                  bool channels_last, bool unscaled) {
  for (int64_t row = 0; row < (channels_last ? D : C); ++row) {
    for (int64_t col = 0; col < (channels_last ? C : D); ++col) {
      const int64_t c = channels_last ? col : row, i = row * (channels_last ? C : D) + col;
      if (unscaled) {
        y[i] = keep[c] ? x[i] : scalar_t(0);
      } else {
        y[i] = static_cast<scalar_t>(keep[c] ? static_cast<opmath_t>(x[i]) * factor[c] : opmath_t(0));
      }
    }
  }
}

// float32, the common case: one AVX2 clone for the whole sample, so short
// rows (ResNet's 4x4 maps) pay no call per channel.
template <bool kScaled>
ROBUSTDROP_CLONE_INLINE void apply_sample_float_body(const float* __restrict x, float* __restrict y,
                                                     const uint8_t* __restrict keep, const float* __restrict factor,
                                                     int64_t C, int64_t D, bool channels_last) {
  if (channels_last || D == 1) {  // D == 1 (FC features): one vector loop over the channels
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t c = 0; c < C; ++c) {
        y[d * C + c] = select_kept(keep[c], kScaled ? x[d * C + c] * factor[c] : x[d * C + c]);
      }
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    const uint8_t kept = keep[c];
    const float f = factor[c];
    for (int64_t d = 0; d < D; ++d) y[c * D + d] = select_kept(kept, kScaled ? x[c * D + d] * f : x[c * D + d]);
  }
}

ROBUSTDROP_VECTOR_CLONES void apply_sample_float(const float* __restrict x, float* __restrict y,
                                                 const uint8_t* __restrict keep, const float* __restrict factor,
                                                 int64_t C, int64_t D, bool channels_last) {
  apply_sample_float_body<true>(x, y, keep, factor, C, D, channels_last);
}

ROBUSTDROP_VECTOR_CLONES void select_sample_float(const float* __restrict x, float* __restrict y,
                                                  const uint8_t* __restrict keep, const float* __restrict factor,
                                                  int64_t C, int64_t D, bool channels_last) {
  apply_sample_float_body<false>(x, y, keep, factor, C, D, channels_last);
}

template <>
void apply_sample<float, float>(const float* x, float* y, const uint8_t* keep, const float* factor, int64_t C,
                                int64_t D, bool channels_last, bool unscaled) {
  (unscaled ? select_sample_float : apply_sample_float)(x, y, keep, factor, C, D, channels_last);
}

// out = keep(n, c) ? in * scale(n, c) : 0 for in (N, C) or (N, C, H, W),
// contiguous or channels_last (out has in's layout). A select, not a multiply,
// so NaN and Inf never reach dropped channels; a 0-d scale of exactly 1 keeps
// the kept values' bits (no multiply at all).
template <typename scalar_t>
void apply_channel_mask(const at::Tensor& in, const at::Tensor& mask, const at::Tensor& scale, at::Tensor& out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t N = in.size(0), C = in.size(1), D = in.numel() / std::max<int64_t>(1, N * C);
  const bool channels_last = in.dim() == 4 && is_channels_last_4d(in);
  const int64_t row_bytes = mask.size(1);
  const scalar_t* src = in.data_ptr<scalar_t>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  const uint8_t* bits = mask.data_ptr<uint8_t>();
  const float* scale_ptr = scale.data_ptr<float>();
  const bool per_channel = scale.numel() != 1;
  const bool unscaled = !per_channel && scale_ptr[0] == 1.0f;
  at::parallel_for(0, N, std::max<int64_t>(1, 32768 / std::max<int64_t>(C * D, 1)), [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> factors(C);
    std::vector<uint8_t> keep(C);
    for (int64_t n = begin; n < end; ++n) {
      sample_factors(bits + n * row_bytes, per_channel ? scale_ptr + n * C : scale_ptr, per_channel, C, keep.data(),
                     factors.data());
      apply_sample<scalar_t, opmath_t>(src + n * C * D, dst + n * C * D, keep.data(), factors.data(), C, D,
                                       channels_last, unscaled);
    }
  });
}

at::Tensor apply_channel_mask_dispatch(const at::Tensor& input, const at::Tensor& mask, const at::Tensor& scale) {
  const at::Tensor in = input.dim() == 4 ? walkable(input) : input.contiguous();
  at::Tensor out = at::empty_like(in);
  if (in.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "channel_mask_apply_cpu", [&] {
    apply_channel_mask<scalar_t>(in, mask.contiguous(), scale.contiguous(), out);
  });
  return out;
}

// ---------------------------------------------------------------- ops

std::tuple<at::Tensor, at::Tensor> feature_density_cpu(const at::Tensor& x, int64_t dims, int64_t grids) {
  check_feature_density_args(x, dims, grids);
  const DensityShape s = density_shape(x, dims, grids);
  at::Tensor cell = at::empty({s.N, s.C}, x.options().dtype(at::kLong));
  at::Tensor counts = at::zeros({s.N, s.cells}, x.options().dtype(at::kLong));  // zero rows when C = 0
  int64_t* cell_rows = cell.data_ptr<int64_t>();
  int64_t* counts_rows = counts.data_ptr<int64_t>();
  density_cells(channel_rows(x, s), s, [&](int64_t n, const int64_t* cell_row, const int64_t* counts_row) {
    std::copy(cell_row, cell_row + s.C, cell_rows + n * s.C);
    std::copy(counts_row, counts_row + s.cells, counts_rows + n * s.cells);
  });
  return {cell, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> feature_density_forward_cpu(const at::Tensor& x, int64_t dims,
                                                                            int64_t grids, int64_t seed, double kappa,
                                                                            double alpha, bool rescale) {
  check_feature_density_forward_args(x, dims, grids, kappa, alpha);
  const DensityShape s = density_shape(x, dims, grids);
  at::Tensor mask = at::empty({s.N, mask_row_bytes(s.C)}, x.options().dtype(at::kByte));  // sample_mask writes it all
  at::Tensor scale = rescale ? at::empty({s.N, s.C}, x.options().dtype(at::kFloat))
                             : at::ones({}, x.options().dtype(at::kFloat));
  const DropParams drop{static_cast<uint64_t>(seed), kappa, alpha, rescale};
  // float32 channel-major x is the buffer the PCA reads: each sample's apply
  // follows its mask while the sample is still in cache. Other dtypes and
  // layouts are applied in a pass of their own.
  const bool fused = x.scalar_type() == at::kFloat && x.is_contiguous();
  at::Tensor y = fused ? at::empty_like(x) : at::Tensor();
  const int64_t row_bytes = mask.size(1);
  density_cells(channel_rows(x, s), s, [&](int64_t n, const int64_t* cell_row, const int64_t* counts_row) {
    uint8_t* mask_row = mask.data_ptr<uint8_t>() + n * row_bytes;
    float* scale_row = rescale ? scale.data_ptr<float>() + n * s.C : nullptr;
    sample_mask(n, cell_row, counts_row, s, drop, mask_row, scale_row);
    if (!fused) return;
    thread_local std::vector<float> factors;
    thread_local std::vector<uint8_t> keep;
    factors.resize(s.C);
    keep.resize(s.C);
    sample_factors(mask_row, rescale ? scale_row : scale.data_ptr<float>(), rescale, s.C, keep.data(), factors.data());
    apply_sample<float, float>(x.data_ptr<float>() + n * s.C * s.D, y.data_ptr<float>() + n * s.C * s.D,
                               keep.data(), factors.data(), s.C, s.D, false, !rescale);
  });
  if (!fused) y = apply_channel_mask_dispatch(x, mask, scale);
  return {y, mask, scale};
}

at::Tensor channel_mask_backward_cpu(const at::Tensor& grad_y, const at::Tensor& mask, const at::Tensor& scale) {
  check_channel_mask_backward_args(grad_y, mask, scale);
  return apply_channel_mask_dispatch(grad_y, mask, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(robustdrop, CPU, m) {
  m.impl("feature_density", &feature_density_cpu);
  m.impl("feature_density_forward", &feature_density_forward_cpu);
  m.impl("channel_mask_backward", &channel_mask_backward_cpu);
}

}  // namespace robustdrop
