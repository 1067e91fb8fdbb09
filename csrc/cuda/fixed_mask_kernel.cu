// Random Mask's apply on CUDA (DESIGN.md 4.4): y = keep[c, h, w] ? x : 0 with
// one packed keep mask (C, H, ceil(W/8)) for every sample, bit-identical to
// csrc/cpu/fixed_mask_kernel.cpp. It is the block mask's apply pass
// (block_mask.cuh) with a mask that does not advance with n and no scale: kept
// values are copied, not multiplied, so every value passes bit for bit and
// NaN or Inf never reach a dropped position. Out of place or written back into x.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "../checks.h"
#include "block_mask.cuh"

namespace robustdrop {
namespace {

using block_mask_cuda::apply_mask;
using block_mask_cuda::apply_mask_into;
using block_mask_cuda::ScaleSource;

at::Tensor fixed_mask_apply_cuda(const at::Tensor& x, const at::Tensor& mask) {
  check_fixed_mask_args(x, mask);
  const c10::cuda::CUDAGuard device_guard(x.device());
  return apply_mask(x, mask, ScaleSource::none(), c10::cuda::getCurrentCUDAStream());
}

void fixed_mask_apply_in_place_cuda(at::Tensor& x, const at::Tensor& mask) {
  check_fixed_mask_args(x, mask);
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard device_guard(x.device());
  // Layouts the kernel does not walk are masked in a contiguous copy, written back.
  at::Tensor target = walkable(x);
  apply_mask_into(target, mask, ScaleSource::none(), target, c10::cuda::getCurrentCUDAStream());
  if (!target.is_same(x)) x.copy_(target);
}

}  // namespace

TORCH_LIBRARY_IMPL(robustdrop, CUDA, m) {
  m.impl("fixed_mask_apply", &fixed_mask_apply_cuda);
  m.impl("fixed_mask_apply_", &fixed_mask_apply_in_place_cuda);
}

}  // namespace robustdrop
