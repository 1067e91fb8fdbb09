// Autograd of Random Mask's apply (DESIGN.md 4.4): y = keep ? x : 0 is linear
// and self-adjoint, so every order of backward is the same op on the packed mask.
// The in-place apply has its autograd in python/robustdrop/ops/fixed_mask.py.
#include "mask_autograd.h"

#include <torch/library.h>

namespace robustdrop::autograd {
namespace {

at::Tensor call_fixed_mask_apply(const at::Tensor& x, const at::Tensor& mask) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&)>("robustdrop::fixed_mask_apply");
  return op.call(x, mask);
}

class FixedMaskApply : public torch::autograd::Function<FixedMaskApply> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({mask});
    return call_fixed_mask_apply(x, mask);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return {FixedMaskApply::apply(grads[0], saved[0]), at::Tensor()};
  }
};

at::Tensor fixed_mask_apply_autograd(const at::Tensor& x, const at::Tensor& mask) {
  return FixedMaskApply::apply(x, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(robustdrop, Autograd, m) { m.impl("fixed_mask_apply", &fixed_mask_apply_autograd); }

}  // namespace robustdrop::autograd
