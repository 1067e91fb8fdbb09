// Autograd of the compiled ops, registered in C++ under the Autograd key (as
// torchvision registers its ops'), so a forward + backward pays the dispatcher's
// cost and no Python: at small and mid sizes on a GPU the host time of a
// Python autograd wrapper exceeds the kernels' (python/robustdrop/ops/<op>.py
// registers the same formulas in Python for the Triton ops, which are Python ops).
//
// The mask ops share one shape: a forward (x, ...) -> (y, mask, scale) keeps only
// the bit-packed mask and the float32 scale, and its backward is an op
// dx = B(dy, mask, scale) that is linear in dy, so B's own backward is B again.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <tuple>
#include <utility>

namespace robustdrop::autograd {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The typed dispatcher handle of an op, e.g. "robustdrop::block_mask_backward".
template <class Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using MaskOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// A mask backward op B(grad_y, mask, scale) -> grad_x; Name has `static constexpr const char* kName`.
template <class Name>
at::Tensor call_mask_backward(const at::Tensor& grad_y, const at::Tensor& mask, const at::Tensor& scale) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(Name::kName);
  return op.call(grad_y, mask, scale);
}

struct BlockMaskBackwardOp {
  static constexpr const char* kName = "robustdrop::block_mask_backward";
};
struct ChannelMaskBackwardOp {
  static constexpr const char* kName = "robustdrop::channel_mask_backward";
};

// grad_x = B(grad_y, mask, scale); linear in grad_y, so every order of backward is B.
template <class BackwardOp>
class MaskBackward : public torch::autograd::Function<MaskBackward<BackwardOp>> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_y, const at::Tensor& mask,
                            const at::Tensor& scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({mask, scale});
    return call_mask_backward<BackwardOp>(grad_y, mask, scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return {MaskBackward::apply(grads[0], saved[0], saved[1]), at::Tensor(), at::Tensor()};
  }
};

// A forward op (x, args...) -> (y, mask, scale) whose backward is MaskBackward<BackwardOp>.
// ForwardOp has `static MaskOutputs call(x, args...)` and `static constexpr size_t kInputs`
// (x and every other argument). Only x gets a gradient; mask and scale are not differentiable.
template <class ForwardOp, class BackwardOp>
class MaskForward : public torch::autograd::Function<MaskForward<ForwardOp, BackwardOp>> {
 public:
  template <class... Args>
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, Args&&... args) {
    static_assert(1 + sizeof...(Args) == ForwardOp::kInputs, "one gradient slot per input");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mask, scale] = ForwardOp::call(x, std::forward<Args>(args)...);
    ctx->save_for_backward({mask, scale});
    ctx->mark_non_differentiable({mask, scale});
    return {y, mask, scale};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    variable_list grad_inputs(ForwardOp::kInputs);
    if (ctx->needs_input_grad(0)) {
      grad_inputs[0] = MaskBackward<BackwardOp>::apply(grads[0], saved[0], saved[1]);
    }
    return grad_inputs;
  }
};

// The Autograd-key kernel of a mask forward op.
template <class ForwardOp, class BackwardOp, class... Args>
MaskOutputs mask_forward_autograd(const at::Tensor& x, Args... args) {
  auto outputs = MaskForward<ForwardOp, BackwardOp>::apply(x, std::move(args)...);
  return {outputs[0], outputs[1], outputs[2]};
}

// The Autograd-key kernel of a mask backward op.
template <class BackwardOp>
at::Tensor mask_backward_autograd(const at::Tensor& grad_y, const at::Tensor& mask, const at::Tensor& scale) {
  return MaskBackward<BackwardOp>::apply(grad_y, mask, scale);
}

}  // namespace robustdrop::autograd
