// kl_distill's fused forward on CUDA, against python/robustdrop/reference/kl_distill.py
// (to float rounding; csrc/cpu/kl_distill_kernel.cpp states the maths).
//
// One thread block per row of the student and teacher logits (N, K), with
// a = s / T, b = t / T, p = softmax(b), q = softmax(a):
//
//   Pass 1 (one read of the row): each thread walks k = tid, tid + blockDim, ...
//     keeping an online max and the sums relative to it,
//       m_s, Z_s = sum e^(a - m_s);  m_t, Z_t = sum e^(b - m_t), W = sum e^(b - m_t) (b - a)
//     (one exponential per element and input: when an element raises the max,
//     the sums are rescaled by e^(m_old - m_new) instead), then the block
//     merges the threads' states with warp shuffles and shared memory, and
//     thread 0 writes KL_row = W / Z_t + (M_s - M_t) + log Z_s - log Z_t.
//   Pass 2 (the row again, from L1/L2): grad_k = e^(a_k - M_s) / (T Z_s) - e^(b_k - M_t) / (T Z_t).
//
// The rows are then reduced as csrc/kl_distill.h says (a torch sum on the
// stream). Rows and gradient are float32 (float64 for float64 logits) and so is the
// maths (expf / exp, not the fast intrinsics). The row stride is free; the
// elements of a row must have unit stride (other layouts are copied first).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "../checks.h"
#include "../kl_distill.h"

namespace robustdrop {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kWarp = 32;
// Elements per thread below which a row gets fewer threads (32 at least).
constexpr int64_t kElementsPerThread = 4;

__device__ __forceinline__ float device_exp(float x) { return expf(x); }
__device__ __forceinline__ double device_exp(double x) { return exp(x); }
__device__ __forceinline__ float device_log(float x) { return logf(x); }
__device__ __forceinline__ double device_log(double x) { return log(x); }

// A softmax normaliser relative to its max: sum of e^(x - max) over the
// elements seen, and, for the teacher, weight = sum e^(b - max) (b - a).
template <typename T>
struct Normaliser {
  T max, sum, weight;

  // Starts at the lowest finite value, so merging never computes inf - inf
  // (infinite logits give NaN, as in the reference).
  __device__ static Normaliser empty() { return {std::numeric_limits<T>::lowest(), T(0), T(0)}; }

  __device__ void add(T x, T weight_term) {
    if (x > max) {
      const T rescale = device_exp(max - x);
      sum = sum * rescale + T(1);
      weight = weight * rescale + weight_term;
      max = x;
    } else {
      const T e = device_exp(x - max);
      sum += e;
      weight += e * weight_term;
    }
  }

  __device__ void merge(const Normaliser& other) {
    const T top = max > other.max ? max : other.max;
    const T mine = device_exp(max - top), theirs = device_exp(other.max - top);
    sum = sum * mine + other.sum * theirs;
    weight = weight * mine + other.weight * theirs;
    max = top;
  }

  __device__ Normaliser shuffled_xor(int offset) const {
    return {__shfl_xor_sync(0xFFFFFFFFu, max, offset), __shfl_xor_sync(0xFFFFFFFFu, sum, offset),
            __shfl_xor_sync(0xFFFFFFFFu, weight, offset)};
  }
};

template <typename T>
__device__ void warp_merge(Normaliser<T>& student, Normaliser<T>& teacher) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    student.merge(student.shuffled_xor(offset));
    teacher.merge(teacher.shuffled_xor(offset));
  }
}

// rows[n] = KL_row and grad[n, :] its gradient for n = blockIdx.x. blockDim.x
// is a multiple of 32, at most kMaxThreads.
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads)
    kl_distill_kernel(const scalar_t* __restrict__ student, const scalar_t* __restrict__ teacher, int64_t s_stride,
                      int64_t t_stride, int64_t K, at::opmath_type<scalar_t> inv_t,
                      at::opmath_type<scalar_t>* __restrict__ rows, at::opmath_type<scalar_t>* __restrict__ grad) {
  using T = at::opmath_type<scalar_t>;
  __shared__ Normaliser<T> partial[2][kMaxThreads / kWarp];
  const int64_t n = blockIdx.x;
  const scalar_t* s_row = student + n * s_stride;
  const scalar_t* t_row = teacher + n * t_stride;
  Normaliser<T> s_norm = Normaliser<T>::empty(), t_norm = Normaliser<T>::empty();
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const T a = static_cast<T>(s_row[k]) * inv_t;
    const T b = static_cast<T>(t_row[k]) * inv_t;
    s_norm.add(a, T(0));
    t_norm.add(b, b - a);
  }
  warp_merge(s_norm, t_norm);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  if (lane == 0) {
    partial[0][warp] = s_norm;
    partial[1][warp] = t_norm;
  }
  __syncthreads();
  if (warp == 0) {
    s_norm = lane < warps ? partial[0][lane] : Normaliser<T>::empty();
    t_norm = lane < warps ? partial[1][lane] : Normaliser<T>::empty();
    warp_merge(s_norm, t_norm);
    if (lane == 0) {
      partial[0][0] = s_norm;
      partial[1][0] = t_norm;
      rows[n] = t_norm.weight / t_norm.sum + (s_norm.max - t_norm.max) +
                (device_log(s_norm.sum) - device_log(t_norm.sum));
    }
  }
  __syncthreads();
  const Normaliser<T> s_total = partial[0][0], t_total = partial[1][0];
  const T coef_s = inv_t / s_total.sum, coef_t = inv_t / t_total.sum;
  T* g_row = grad + n * K;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const T a = static_cast<T>(s_row[k]) * inv_t;
    const T b = static_cast<T>(t_row[k]) * inv_t;
    g_row[k] = device_exp(a - s_total.max) * coef_s - device_exp(b - t_total.max) * coef_t;
  }
}

// Threads for a row of K elements: about kElementsPerThread each, a whole
// number of warps, at most kMaxThreads.
int threads_for(int64_t K) {
  int threads = kWarp;
  while (threads < kMaxThreads && threads * kElementsPerThread < K) threads *= 2;
  return threads;
}

// Rows with unit stride along K; other layouts are made contiguous.
at::Tensor unit_stride_rows(const at::Tensor& x) {
  return (x.size(1) <= 1 || x.stride(1) == 1) ? x : x.contiguous();
}

// The 0-d total of the row losses: torch's own reduction, in an order its launch fixes for the device.
at::Tensor sum_rows(const at::Tensor& rows) { return rows.sum(); }

std::tuple<at::Tensor, at::Tensor> kl_distill_forward_cuda(const at::Tensor& student_logits,
                                                           const at::Tensor& teacher_logits, double temperature,
                                                           c10::string_view reduction_name) {
  check_kl_distill_args(student_logits, teacher_logits, temperature);
  const KlReduction reduction = parse_kl_reduction(reduction_name);
  const c10::cuda::CUDAGuard device_guard(student_logits.device());
  const at::Tensor student = unit_stride_rows(student_logits);
  const at::Tensor teacher = unit_stride_rows(teacher_logits);
  const int64_t N = student.size(0), K = student.size(1);
  const at::ScalarType math_type = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::TensorOptions options = student.options().dtype(math_type);
  at::Tensor grad = at::empty({N, K}, options);
  if (N == 0 || K == 0) return {reduce_kl_rows(at::zeros({N}, options), reduction, K, sum_rows), grad};  // no classes: 0
  TORCH_CHECK_VALUE(N <= std::numeric_limits<int32_t>::max(), "student_logits must have at most 2**31 - 1 rows, got ",
                    N);
  at::Tensor rows = at::empty({N}, options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int threads = threads_for(K);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kl_distill_forward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    kl_distill_kernel<scalar_t><<<static_cast<unsigned>(N), threads, 0, stream>>>(
        student.const_data_ptr<scalar_t>(), teacher.const_data_ptr<scalar_t>(), student.stride(0), teacher.stride(0),
        K, static_cast<opmath_t>(1.0 / temperature), rows.data_ptr<opmath_t>(), grad.data_ptr<opmath_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {reduce_kl_rows(rows, reduction, K, sum_rows), grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(robustdrop, CUDA, m) { m.impl("kl_distill_forward", &kl_distill_forward_cuda); }

}  // namespace robustdrop
