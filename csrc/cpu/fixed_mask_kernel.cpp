// Random Mask's apply on the CPU (DESIGN.md 4.4): y = keep[c, h, w] ? x : 0 with
// one packed keep mask (C, H, ceil(W/8)) for every sample. It is the block
// mask's apply pass, unscaled (select_mask_into: a kept value keeps its bits,
// NaN payloads included, and the select keeps NaN out of dropped positions),
// with a mask that does not advance with n, out of place or written back into x.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "block_mask.h"

namespace robustdrop {
namespace {

// The view of a (C, H, ceil(W/8)) mask shared by every sample.
PackedMaskView fixed_mask_view(const at::Tensor& mask) {
  return {mask.data_ptr<uint8_t>(), 0, 1, mask.size(1), mask.size(2)};
}

at::Tensor fixed_mask_apply_cpu(const at::Tensor& x, const at::Tensor& mask) {
  check_fixed_mask_args(x, mask);
  const at::Tensor in = walkable(x);
  const at::Tensor bits = mask.contiguous();
  at::Tensor out = at::empty_like(in);
  select_mask_into(in, fixed_mask_view(bits), out);
  return out;
}

void fixed_mask_apply_in_place_cpu(at::Tensor& x, const at::Tensor& mask) {
  check_fixed_mask_args(x, mask);
  const at::Tensor bits = mask.contiguous();
  // Layouts the kernel does not walk are masked in a contiguous copy, written back.
  at::Tensor target = walkable(x);
  select_mask_into(target, fixed_mask_view(bits), target);
  if (!target.is_same(x)) x.copy_(target);
}

}  // namespace

TORCH_LIBRARY_IMPL(robustdrop, CPU, m) {
  m.impl("fixed_mask_apply", &fixed_mask_apply_cpu);
  m.impl("fixed_mask_apply_", &fixed_mask_apply_in_place_cpu);
}

}  // namespace robustdrop
