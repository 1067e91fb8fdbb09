// CUDA implementations of the RNG ops (DESIGN.md section 3), used to test
// csrc/philox.h on the device against the known answers and the other backends.
//
//   philox_uniform(index, seed) -> float32 tensor of index's shape: uniform(seed, index)
//   philox_words(index, seed)   -> int64 tensor of index's shape: the uint32 word behind it
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>

#include "../checks.h"
#include "../philox.h"
#include "block_mask.cuh"  // grid_size

namespace robustdrop {
namespace {

constexpr int kThreads = 256;

struct UniformOp {
  __device__ __forceinline__ float operator()(uint64_t seed, uint64_t index) const {
    return philox_uniform(seed, index);
  }
};

struct WordOp {
  __device__ __forceinline__ int64_t operator()(uint64_t seed, uint64_t index) const {
    return static_cast<int64_t>(philox_word(seed, index));
  }
};

// out[k] = op(seed, index[k]) for k < n; indices are taken mod 2**64 like the CPU op.
template <typename OutT, typename Op>
__global__ void __launch_bounds__(kThreads)
    map_indices_kernel(const int64_t* __restrict__ index, OutT* __restrict__ out, int64_t n, uint64_t seed, Op op) {
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    out[k] = op(seed, static_cast<uint64_t>(index[k]));
  }
}

template <typename OutT, typename Op>
at::Tensor map_indices(const at::Tensor& index, int64_t seed, at::ScalarType out_type, Op op) {
  check_philox_args(index);
  const c10::cuda::CUDAGuard device_guard(index.device());
  const at::Tensor idx = index.contiguous();
  at::Tensor out = at::empty(idx.sizes(), idx.options().dtype(out_type));
  const int64_t n = idx.numel();
  if (n == 0) return out;
  map_indices_kernel<<<block_mask_cuda::grid_size(n, kThreads, 16), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      idx.data_ptr<int64_t>(), out.data_ptr<OutT>(), n, static_cast<uint64_t>(seed), op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor philox_uniform_cuda(const at::Tensor& index, int64_t seed) {
  return map_indices<float>(index, seed, at::kFloat, UniformOp{});
}

at::Tensor philox_words_cuda(const at::Tensor& index, int64_t seed) {
  return map_indices<int64_t>(index, seed, at::kLong, WordOp{});
}

}  // namespace

TORCH_LIBRARY_IMPL(robustdrop, CUDA, m) {
  m.impl("philox_uniform", &philox_uniform_cuda);
  m.impl("philox_words", &philox_words_cuda);
}

}  // namespace robustdrop
