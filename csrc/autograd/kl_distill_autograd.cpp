// Autograd of kl_distill's forward (EWS): the forward returns the per-row KL and
// its gradient with respect to the student logits; the backward scales that saved
// gradient by each row's upstream gradient and casts it to the student's dtype.
// The teacher and the temperature get no gradient, and there is no double
// backward (the saved gradient is a constant).
#include "mask_autograd.h"

#include <torch/library.h>

namespace robustdrop::autograd {
namespace {

using KlOutputs = std::tuple<at::Tensor, at::Tensor>;

KlOutputs call_kl_distill_forward(const at::Tensor& student, const at::Tensor& teacher, double temperature) {
  static const auto op = op_handle<KlOutputs(const at::Tensor&, const at::Tensor&, double)>(
      "robustdrop::kl_distill_forward");
  return op.call(student, teacher, temperature);
}

class KlDistillForward : public torch::autograd::Function<KlDistillForward> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                               double temperature) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [rows, grad] = call_kl_distill_forward(student, teacher, temperature);
    ctx->save_for_backward({grad});
    ctx->mark_non_differentiable({grad});
    ctx->set_materialize_grads(false);  // no (N, K) zeros for the unused gradient of `grad`
    ctx->saved_data["student_dtype"] = student.scalar_type();
    return {rows, grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_rows = grads[0];
    if (!grad_rows.defined() || !ctx->needs_input_grad(0)) {
      return {at::Tensor(), at::Tensor(), at::Tensor()};
    }
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "kl_distill does not support double backward (create_graph=True through the loss); "
                "use backend='reference' for second derivatives");
    const auto saved = ctx->get_saved_variables();
    const auto dtype = ctx->saved_data["student_dtype"].toScalarType();
    return {saved[0].mul(grad_rows.unsqueeze(-1)).to(dtype), at::Tensor(), at::Tensor()};
  }
};

KlOutputs kl_distill_forward_autograd(const at::Tensor& student, const at::Tensor& teacher, double temperature) {
  auto outputs = KlDistillForward::apply(student, teacher, temperature);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(robustdrop, Autograd, m) { m.impl("kl_distill_forward", &kl_distill_forward_autograd); }

}  // namespace robustdrop::autograd
