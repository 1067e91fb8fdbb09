// The small, sequential half of FDD's principal axes (DESIGN.md 4.3), shared by
// the CPU and CUDA kernels (host and device code).
//
// Each sample's top `dims` eigenpairs of its m x m symmetric PSD matrix M (the
// channel Gram matrix or the covariance, whichever is smaller) come from
// Lanczos with full re-orthogonalisation. The matrix-vector products are the
// backend's business; this header holds what every backend does the same way:
//   * the start vector, a fixed integer hash so every backend starts alike;
//   * the top eigenpairs of the j x j tridiagonal T_j = tridiag(beta, alpha, beta)
//     in double: eigenvalues by multisection on Sturm counts until each is
//     isolated, then safeguarded Newton; eigenvectors by inverse iteration
//     with a pivoting tridiagonal solve;
//   * the stopping rule. After step j, with beta_j the norm of the next
//     residual and s_r the r-th top eigenvector of T_j, the Ritz pair
//     (theta_r, Q_j s_r) has residual ||M y - theta y|| = beta_j |s_r[j-1]|.
//     Lanczos stops when that is <= kResidualTolerance * theta_0 for every
//     r < dims (checked at the steps check_after_step names), when beta_j <=
//     kExhaustedTolerance * trace(M) (the Krylov space is invariant: M has no
//     more variance to find), or after m steps, where it is exact in exact
//     arithmetic. So it always ends, in at most m steps.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "philox.h"  // ROBUSTDROP_HOST_DEVICE

// Host code inlines every function here, so the CPU kernel's vector clones
// (csrc/cpu/vector_clones.h) build the Sturm and solve loops for their target.
#if defined(__CUDACC__) || defined(__HIPCC__) || !defined(__GNUC__)
#define ROBUSTDROP_LANCZOS_FN ROBUSTDROP_HOST_DEVICE
#else
#define ROBUSTDROP_LANCZOS_FN inline __attribute__((always_inline))
#endif

namespace robustdrop {
namespace lanczos {

constexpr int kMaxDims = 3;
constexpr int kCheckEvery = 4;
constexpr int kFirstCheck = 16;
constexpr double kResidualTolerance = 1e-6;
constexpr float kExhaustedTolerance = 1e-6f;
// An axis whose eigenvalue is at most this fraction of the largest has no
// variance that float32 can resolve: every channel's coordinate on it is 0.
constexpr double kAbsentAxisTolerance = 1e-5;
// A sample whose centred sum of squares is at most this fraction of its
// uncentred one has channels equal up to float32 rounding: no axes at all.
constexpr double kDegenerateTolerance = 1e-10;
constexpr int kInverseIterations = 2;

// The power of two 2**k that brings `largest` (a largest magnitude, >= 0)
// into [1, 2), with k clamped to [-126, 126] so that 2**k is a normal float;
// 1 when largest is 0 or not finite. Multiplying by a power of two is exact,
// and neither the principal axes nor the order of the coordinates on them
// change under a positive scale, so cells are the same with it as without.
// The kernels scale each sample by it before the PCA (at |x| ~ 1e9 the
// float32 ||M q||^2 overflowed, at ~1e-11 it underflowed) and each axis's
// coordinates before binning (hi - lo overflowed for values of both signs
// near FLT_MAX), so the result does not depend on the magnitude of x.
ROBUSTDROP_LANCZOS_FN float magnitude_scale(float largest) {
  if (!(largest > 0.0f) || !(largest <= FLT_MAX)) return 1.0f;
  int exponent;
  frexpf(largest, &exponent);  // largest = f * 2**exponent, f in [0.5, 1)
  const int k = 1 - exponent;
  return ldexpf(1.0f, k < -126 ? -126 : (k > 126 ? 126 : k));
}

// Component i of the (unnormalised) start vector: a multiplicative hash of i
// in [-0.5, 0.5). The all-ones vector would not do: on the Gram side of a
// channel-centred matrix it lies in M's null space.
ROBUSTDROP_LANCZOS_FN float start_component(int64_t i) {
  const uint32_t hash = static_cast<uint32_t>(i + 1) * 0x9E3779B1u;
  return static_cast<float>(hash) / 4294967296.0f - 0.5f;
}

// Shifts tried per eigenvalue in each multisection round: the bracket
// shrinks (kShifts + 1)-fold per round, and the Sturm recurrences of all
// shifts run interleaved, so their divisions overlap.
constexpr int kShifts = 4;
constexpr int kMaxLanes = kMaxDims * kShifts;

// count[l] = number of eigenvalues of T below x[l], for l < lanes.
ROBUSTDROP_LANCZOS_FN void sturm_counts(const double* alpha, const double* beta, int n, const double* x, int lanes,
                                         double pivot_min, int* count) {
  double q[kMaxLanes];
  for (int l = 0; l < lanes; ++l) {
    q[l] = 1.0;
    count[l] = 0;
  }
  for (int i = 0; i < n; ++i) {
    const double coupling = i > 0 ? beta[i - 1] * beta[i - 1] : 0.0;
    for (int l = 0; l < lanes; ++l) {
      double value = (alpha[i] - x[l]) - coupling / q[l];
      value = fabs(value) < pivot_min ? -pivot_min : value;
      count[l] += value < 0.0;
      q[l] = value;
    }
  }
}

// One pass of the LDL^T recurrence at each x[l] that also differentiates it:
// count[l] as sturm_counts gives it, and
//   slope[l] = d/dx log|det(T - x I)| = sum_i q_i'(x) / q_i(x) = sum_k 1 / (x - lambda_k),
// from q_i' = -1 + beta_{i-1}^2 q_{i-1}' / q_{i-1}^2. The Newton step on
// det(T - x I) is then -1 / slope. A pivot clamped to -pivot_min can make the
// slope overflow; the caller treats a slope that is not finite as no step.
ROBUSTDROP_LANCZOS_FN void sturm_counts_and_slopes(const double* alpha, const double* beta, int n, const double* x,
                                                    int lanes, double pivot_min, int* count, double* slope) {
  double q[kMaxDims], ratio_prev[kMaxDims];  // q_{i-1} and q_{i-1}' / q_{i-1}
  for (int l = 0; l < lanes; ++l) {
    q[l] = 1.0;
    ratio_prev[l] = 0.0;
    count[l] = 0;
    slope[l] = 0.0;
  }
  for (int i = 0; i < n; ++i) {
    const double coupling = i > 0 ? beta[i - 1] * beta[i - 1] : 0.0;
    for (int l = 0; l < lanes; ++l) {
      const double pulled = coupling / q[l];
      double value = (alpha[i] - x[l]) - pulled;
      value = fabs(value) < pivot_min ? -pivot_min : value;
      const double derivative = -1.0 + pulled * ratio_prev[l];
      ratio_prev[l] = derivative / value;
      slope[l] += ratio_prev[l];
      count[l] += value < 0.0;
      q[l] = value;
    }
  }
}

// Multisection stops refining eigenvalue r once its bracket is within
// kEigenvalueTolerance of its magnitude, or holds it alone (the Sturm counts
// at its ends are r's index and index + 1), whichever comes first: past that
// point Newton's method converges quadratically where multisection gains a
// fixed factor (kShifts + 1) per round.
constexpr int kMaxRounds = 64;
constexpr double kEigenvalueTolerance = 1e-10;

struct EigenvalueBracket {
  double lo, hi;           // the eigenvalue lies in [lo, hi)
  int lo_count, hi_count;  // eigenvalues of T below lo and below hi
};

ROBUSTDROP_LANCZOS_FN bool bracket_narrow(const EigenvalueBracket& b, double pivot_min) {
  return b.hi - b.lo <= kEigenvalueTolerance * fmax(fabs(b.lo), fabs(b.hi)) + pivot_min;
}

ROBUSTDROP_LANCZOS_FN bool bracket_isolated(const EigenvalueBracket& b, int index) {
  return b.lo_count == index && b.hi_count == index + 1;
}

// Multisection on Sturm counts: each round splits every open bracket at
// kShifts points and keeps the part where the count crosses its index.
ROBUSTDROP_LANCZOS_FN void multisect(const double* alpha, const double* beta, int n, int k, double pivot_min,
                                      EigenvalueBracket* brackets) {
  double x[kMaxLanes];
  int count[kMaxLanes], open[kMaxDims];
  for (int round = 0; round < kMaxRounds; ++round) {
    int opened = 0;
    for (int r = 0; r < k; ++r) {
      const EigenvalueBracket& b = brackets[r];
      if (bracket_narrow(b, pivot_min) || bracket_isolated(b, n - 1 - r)) continue;
      for (int s = 0; s < kShifts; ++s) x[opened * kShifts + s] = b.lo + (b.hi - b.lo) * (s + 1) / (kShifts + 1);
      open[opened++] = r;
    }
    if (opened == 0) return;
    sturm_counts(alpha, beta, n, x, opened * kShifts, pivot_min, count);
    for (int o = 0; o < opened; ++o) {
      EigenvalueBracket& b = brackets[open[o]];
      const int index = n - 1 - open[o];  // the eigenvalue lies where the count first exceeds index
      for (int s = kShifts - 1; s >= 0; --s) {
        if (count[o * kShifts + s] > index) {
          b.hi = x[o * kShifts + s];
          b.hi_count = count[o * kShifts + s];
        }
      }
      for (int s = 0; s < kShifts; ++s) {
        if (count[o * kShifts + s] <= index) {
          b.lo = x[o * kShifts + s];
          b.lo_count = count[o * kShifts + s];
        }
      }
    }
  }
}

// Safeguarded Newton on det(T - x I) for the eigenvalues whose brackets are
// isolated but not yet narrow, all of them interleaved in one recurrence per
// round. Each round's Sturm count at x shrinks the bracket (it stays
// isolated); the Newton point replaces x when it falls inside the bracket and
// the step is at most half the one before, otherwise x goes to the middle.
// So each round either moves x to the middle (which the next round's count
// halves the bracket at) or takes a step at most half the last one, and the
// iterates cannot wander; the rounds are capped at kMaxRounds besides.
// Stopping rule. Write the slope at x as S = 1 / (x - lambda) + R, R the sum
// of 1 / (x - lambda_k) over the other eigenvalues. None of them lies in the
// bracket that isolated lambda on entry, so |R| <= (n - 1) / g with g the
// distance from x to that bracket's ends. When |S| >= 2 (n - 1) / g, then
// |S - R| >= |S| / 2, and the Newton point x - 1 / S is within
// |R| / (|S| |S - R|) <= 2 (n - 1) / (g S^2) of lambda. Refinement ends at the
// Newton point once that bound is within kEigenvalueTolerance of |x|, or at
// the middle of a bracket that has become narrow.
ROBUSTDROP_LANCZOS_FN void newton_refine(const double* alpha, const double* beta, int n, int k, double pivot_min,
                                         EigenvalueBracket* brackets, double* theta) {
  EigenvalueBracket isolated[kMaxDims];
  double x[kMaxDims], previous_step[kMaxDims], slope[kMaxDims];
  int count[kMaxDims], open[kMaxDims];
  bool done[kMaxDims];
  for (int r = 0; r < k; ++r) {
    isolated[r] = brackets[r];
    x[r] = 0.5 * (brackets[r].lo + brackets[r].hi);
    previous_step[r] = brackets[r].hi - brackets[r].lo;
    done[r] = bracket_narrow(brackets[r], pivot_min) || !bracket_isolated(brackets[r], n - 1 - r);
    theta[r] = x[r];
  }
  for (int round = 0; round < kMaxRounds; ++round) {
    int opened = 0;
    double shifts[kMaxDims];
    for (int r = 0; r < k; ++r) {
      if (done[r]) continue;
      shifts[opened] = x[r];
      open[opened++] = r;
    }
    if (opened == 0) return;
    sturm_counts_and_slopes(alpha, beta, n, shifts, opened, pivot_min, count, slope);
    for (int o = 0; o < opened; ++o) {
      const int r = open[o];
      EigenvalueBracket& b = brackets[r];
      if (count[o] <= n - 1 - r) {
        b.lo = x[r];
      } else {
        b.hi = x[r];
      }
      const double step = -1.0 / slope[o];
      const double gap = fmin(x[r] - isolated[r].lo, isolated[r].hi - x[r]);
      const bool usable = fabs(slope[o]) <= DBL_MAX && slope[o] != 0.0;  // finite, so is step
      const bool certain = usable && fabs(slope[o]) * gap >= 2.0 * (n - 1);
      if (certain && 2.0 * (n - 1) * step * step <= (kEigenvalueTolerance * fabs(x[r]) + pivot_min) * gap) {
        theta[r] = fmin(fmax(x[r] + step, b.lo), b.hi);
        done[r] = true;
        continue;
      }
      if (bracket_narrow(b, pivot_min)) {
        theta[r] = 0.5 * (b.lo + b.hi);
        done[r] = true;
        continue;
      }
      const double newton = x[r] + step;
      const bool take = usable && newton > b.lo && newton < b.hi && fabs(step) <= 0.5 * fabs(previous_step[r]);
      const double next = take ? newton : 0.5 * (b.lo + b.hi);
      previous_step[r] = next - x[r];
      x[r] = next;
      theta[r] = next;
    }
  }
}

// The k largest eigenvalues of T in descending order, each within
// kEigenvalueTolerance of its magnitude (or after kMaxRounds rounds of each
// kind): multisection inside the Gershgorin interval [lower, upper] until
// each is isolated, then Newton. That is far finer than anything downstream
// resolves: the value is the shift of inverse iteration, whose vector gains a
// factor |error| / gap per iteration, and the float32 axis length sqrt(theta).
ROBUSTDROP_LANCZOS_FN void top_eigenvalues(const double* alpha, const double* beta, int n, int k, double lower,
                                            double upper, double pivot_min, double* theta) {
  EigenvalueBracket brackets[kMaxDims];
  for (int r = 0; r < k; ++r) brackets[r] = EigenvalueBracket{lower, upper, 0, n};
  multisect(alpha, beta, n, k, pivot_min, brackets);
  newton_refine(alpha, beta, n, k, pivot_min, brackets, theta);
}

// Solves (T - shift I) z = z in place by Gaussian elimination with partial
// pivoting (the second superdiagonal that row swaps create lives in work).
// work holds 4n doubles. Pivots that vanish are replaced by tiny, so a shift
// equal to an eigenvalue gives a huge z in that eigenvector's direction,
// which is what inverse iteration wants.
ROBUSTDROP_LANCZOS_FN void shifted_tridiagonal_solve(const double* alpha, const double* beta, int n, double shift,
                                                      double tiny, double* z, double* work) {
  double* diag = work;
  double* upper = work + n;
  double* upper2 = work + 2 * n;
  double* lower = work + 3 * n;
  for (int i = 0; i < n; ++i) {
    diag[i] = alpha[i] - shift;
    upper[i] = i + 1 < n ? beta[i] : 0.0;
    upper2[i] = 0.0;
    lower[i] = i + 1 < n ? beta[i] : 0.0;
  }
  for (int i = 0; i + 1 < n; ++i) {
    if (fabs(diag[i]) >= fabs(lower[i])) {
      if (fabs(diag[i]) < tiny) diag[i] = tiny;
      const double factor = lower[i] / diag[i];
      diag[i + 1] -= factor * upper[i];
      z[i + 1] -= factor * z[i];
    } else {  // swap rows i and i + 1
      const double factor = diag[i] / lower[i];
      diag[i] = lower[i];
      const double old_diag = diag[i + 1];
      diag[i + 1] = upper[i] - factor * old_diag;
      if (i + 2 < n) {
        upper2[i] = upper[i + 1];
        upper[i + 1] = -factor * upper2[i];
      }
      upper[i] = old_diag;
      const double old_z = z[i];
      z[i] = z[i + 1];
      z[i + 1] = old_z - factor * z[i + 1];
    }
  }
  if (fabs(diag[n - 1]) < tiny) diag[n - 1] = tiny;
  for (int i = n - 1; i >= 0; --i) {
    double value = z[i];
    if (i + 1 < n) value -= upper[i] * z[i + 1];
    if (i + 2 < n) value -= upper2[i] * z[i + 2];
    z[i] = value / diag[i];
  }
}

ROBUSTDROP_LANCZOS_FN void normalize(double* v, int n) {
  double norm = 0.0;
  for (int i = 0; i < n; ++i) norm += v[i] * v[i];
  norm = sqrt(norm);
  if (!(norm > 0.0 && norm <= DBL_MAX)) {  // cannot happen for a finite T; keep the vector defined anyway
    for (int i = 0; i < n; ++i) v[i] = i == 0 ? 1.0 : 0.0;
    return;
  }
  for (int i = 0; i < n; ++i) v[i] /= norm;
}

// The min(n, k) largest eigenpairs of the n x n tridiagonal T (diagonal
// alpha[0..n), off-diagonal beta[0..n-1)): theta[r] in descending order and
// unit eigenvectors vectors[r*n .. r*n + n). work holds 4n doubles. Returns
// the number of pairs. Vectors of (nearly) equal eigenvalues are
// orthogonalised against the ones before them.
ROBUSTDROP_LANCZOS_FN int tridiagonal_top_eigenpairs(const double* alpha, const double* beta, int n, int k,
                                                      double* theta, double* vectors, double* work) {
  double lower = alpha[0], upper = alpha[0], norm = 0.0, max_beta2 = 0.0;
  for (int i = 0; i < n; ++i) {
    const double radius = (i > 0 ? fabs(beta[i - 1]) : 0.0) + (i + 1 < n ? fabs(beta[i]) : 0.0);
    lower = fmin(lower, alpha[i] - radius);
    upper = fmax(upper, alpha[i] + radius);
    norm = fmax(norm, fabs(alpha[i]) + radius);
    if (i + 1 < n) max_beta2 = fmax(max_beta2, beta[i] * beta[i]);
  }
  const double pivot_min = DBL_MIN * fmax(1.0, max_beta2);
  const double tiny = DBL_EPSILON * fmax(norm, DBL_MIN);
  const int pairs = n < k ? n : k;
  top_eigenvalues(alpha, beta, n, pairs, lower, upper, pivot_min, theta);
  for (int r = 0; r < pairs; ++r) {
    double* v = vectors + r * n;
    // Any start finds the vector of a simple eigenvalue. Later pairs start from
    // hashed vectors: from ones again, a multiple eigenvalue (T with a zero
    // off-diagonal, say 5 I) gave every pair the same vector.
    for (int i = 0; i < n; ++i) v[i] = r == 0 ? 1.0 : start_component(static_cast<int64_t>(r) * n + i);
    for (int iteration = 0; iteration < kInverseIterations; ++iteration) {
      shifted_tridiagonal_solve(alpha, beta, n, theta[r], tiny, v, work);
      for (int previous = 0; previous < r; ++previous) {
        const double* u = vectors + previous * n;
        double dot = 0.0;
        for (int i = 0; i < n; ++i) dot += u[i] * v[i];
        for (int i = 0; i < n; ++i) v[i] -= dot * u[i];
      }
      normalize(v, n);
    }
  }
  return pairs;
}

// Whether every one of the `pairs` Ritz pairs has residual beta_j |s_r[n-1]|
// within kResidualTolerance of theta_0 (the stopping rule above).
ROBUSTDROP_LANCZOS_FN bool ritz_pairs_converged(double beta, const double* theta, const double* vectors, int n,
                                                 int pairs) {
  for (int r = 0; r < pairs; ++r) {
    if (beta * fabs(vectors[r * n + n - 1]) > kResidualTolerance * fabs(theta[0])) return false;
  }
  return true;
}

// When Lanczos checks convergence after step j (1-based) of at most m: at
// step m, and from step kFirstCheck (or dims) on every kCheckEvery steps,
// every 2 * kCheckEvery steps past 32 (a check costs O(j) Sturm passes, so
// sparser checks keep its share of the work small as j grows).
ROBUSTDROP_LANCZOS_FN bool check_after_step(int j, int m, int dims) {
  if (j == m) return true;
  if (j < kFirstCheck || j < dims) return false;
  return j % (j < 32 ? kCheckEvery : 2 * kCheckEvery) == 0;
}

}  // namespace lanczos
}  // namespace robustdrop
