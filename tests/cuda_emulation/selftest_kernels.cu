// Kernels that check the emulator itself (tests/test_cuda_emulation.py): that
// it computes what a GPU computes for shuffles, votes and barriers, and that it
// fails what a GPU would hang on or refuse. Built with the emulated library
// only: robustdrop_emulated::emulator_selftest(case, input) -> output.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <map>
#include <string>

namespace {

constexpr unsigned kFullWarp = 0xFFFFFFFFu;

// out[t] = the sum of in over t's warp, by an xor-shuffle tree.
__global__ void warp_sum_kernel(const float* in, float* out) {
  float value = in[threadIdx.x];
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(kFullWarp, value, offset);
  out[threadIdx.x] = value;
}

// out[t] = the inclusive prefix sum of in over t's warp, by shuffles up.
__global__ void warp_scan_kernel(const float* in, float* out) {
  const unsigned lane = threadIdx.x % 32;
  float value = in[threadIdx.x];
  for (unsigned offset = 1; offset < 32; offset *= 2) {
    const float other = __shfl_up_sync(kFullWarp, value, offset);
    if (lane >= offset) value += other;
  }
  out[threadIdx.x] = value;
}

// out[3t .. 3t + 2] = the block's or / and / count of in != 0.
__global__ void votes_kernel(const float* in, float* out) {
  const bool predicate = in[threadIdx.x] != 0.0f;
  out[3 * threadIdx.x] = static_cast<float>(__syncthreads_or(predicate));
  out[3 * threadIdx.x + 1] = static_cast<float>(__syncthreads_and(predicate));
  out[3 * threadIdx.x + 2] = static_cast<float>(__syncthreads_count(predicate));
}

// out[t] = a dynamic shared value never written: what the emulator fills it with.
__global__ void unwritten_shared_kernel(const float*, float* out) {
  extern __shared__ float scratch[];
  out[threadIdx.x] = scratch[threadIdx.x];
}

// Thread t stores in[t] and reads its right neighbour's slot: with the barrier
// the neighbour's value, in every order; without it, a race whose outcome
// depends on the order the threads run in.
template <bool kBarrier>
__global__ void neighbour_kernel(const float* in, float* out) {
  __shared__ float slots[64];
  slots[threadIdx.x] = -1.0f;
  __syncthreads();
  slots[threadIdx.x] = in[threadIdx.x];
  if (kBarrier) __syncthreads();
  out[threadIdx.x] = slots[(threadIdx.x + 1) % blockDim.x];
}

// Half the block waits at one barrier, half at another.
__global__ void divergent_barrier_kernel(const float*, float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Thread 0 returns; the others wait for it at a barrier.
__global__ void early_return_kernel(const float*, float* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// A full-mask shuffle in a block of 48 threads: the second warp has 16 lanes.
__global__ void partial_warp_kernel(const float*, float* out) {
  out[threadIdx.x] = __shfl_xor_sync(kFullWarp, 1.0f, 1);
}

// A shuffle whose mask names half the warp.
__global__ void partial_mask_kernel(const float*, float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000FFFFu, 1.0f, 1);
}

__global__ void device_assert_kernel(const float* in, float* out) {
  CUDA_KERNEL_ASSERT(in[threadIdx.x] >= 0.0f);
  out[threadIdx.x] = in[threadIdx.x];
}

// Thread t reads element t + 1: the last thread reads past the end of the tensor.
__global__ void read_past_end_kernel(const float* in, float* out) { out[threadIdx.x] = in[threadIdx.x + 1]; }

// The last thread reads past the end of a shared array.
__global__ void shared_past_end_kernel(const float*, float* out) {
  __shared__ float slots[32];
  slots[threadIdx.x % 32] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = slots[threadIdx.x + 1];
}

// Each thread loads four floats as one 16-byte vector from in + 1: misaligned.
struct alignas(16) FourFloats {
  float v[4];
};
__global__ void misaligned_load_kernel(const float* in, float* out) {
  out[threadIdx.x] = reinterpret_cast<const FourFloats*>(in + 1)[0].v[threadIdx.x % 4];
}

__global__ void copy_kernel(const float* in, float* out) { out[threadIdx.x] = in[threadIdx.x]; }

// Every self-test kernel has this signature: in and out hold one float per thread
// (three for the votes).
using SelfTestKernel = void (*)(const float*, float*);

struct SelfTestCase {
  SelfTestKernel kernel;
  unsigned blocks = 1;
  unsigned threads = 0;       // 0: one thread per input element
  size_t shared_bytes = 0;    // dynamic shared memory
  int outputs_per_thread = 1;
};

const std::map<std::string, SelfTestCase>& selftest_cases() {
  static const std::map<std::string, SelfTestCase> cases = {
      {"warp_sum", {warp_sum_kernel}},
      {"warp_scan", {warp_scan_kernel}},
      {"votes", {votes_kernel, 1, 0, 0, 3}},
      {"unwritten_shared", {unwritten_shared_kernel, 1, 0, 1024 * sizeof(float)}},
      {"neighbour_synchronised", {neighbour_kernel<true>}},
      {"neighbour_racy", {neighbour_kernel<false>}},
      {"divergent_barrier", {divergent_barrier_kernel}},
      {"early_return", {early_return_kernel}},
      {"partial_warp", {partial_warp_kernel}},
      {"partial_mask", {partial_mask_kernel}},
      {"device_assert", {device_assert_kernel}},
      {"read_past_end", {read_past_end_kernel}},
      {"shared_past_end", {shared_past_end_kernel}},
      {"misaligned_load", {misaligned_load_kernel}},
      // Launches a GPU refuses.
      {"empty_grid", {copy_kernel, 0}},
      {"too_many_threads", {copy_kernel, 1, 2048}},
      {"too_much_shared", {copy_kernel, 1, 0, 64 * 1024}},
  };
  return cases;
}

at::Tensor selftest(const std::string& name, const at::Tensor& input) {
  const auto found = selftest_cases().find(name);
  TORCH_CHECK(found != selftest_cases().end(), "no self-test case named ", name);
  const SelfTestCase& test = found->second;
  const at::Tensor in = input.contiguous();
  at::Tensor out = at::zeros({test.outputs_per_thread * in.numel()}, in.options());
  const unsigned threads = test.threads != 0 ? test.threads : static_cast<unsigned>(in.numel());
  const SelfTestKernel kernel = test.kernel;
  kernel<<<test.blocks, threads, test.shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(in.data_ptr<float>(),
                                                                                       out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(robustdrop_emulated, m) { m.def("emulator_selftest(str name, Tensor input) -> Tensor", &selftest); }
