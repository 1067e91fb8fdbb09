// Autograd of kl_distill's forward (EWS): the forward returns the reduced loss and
// the per-row gradient d KL_row / d s; the backward scales that saved gradient by
// d loss / d KL_row (csrc/kl_distill.h) and casts it to the student's dtype. One
// autograd node for the whole loss, reduction included. The teacher, the
// temperature and the reduction get no gradient, and there is no double backward
// (the saved gradient is a constant).
#include "mask_autograd.h"

#include <torch/library.h>

#include "../kl_distill.h"

namespace robustdrop::autograd {
namespace {

using KlOutputs = std::tuple<at::Tensor, at::Tensor>;

KlOutputs call_kl_distill_forward(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                                  c10::string_view reduction) {
  static const auto op = op_handle<KlOutputs(const at::Tensor&, const at::Tensor&, double, c10::string_view)>(
      "robustdrop::kl_distill_forward");
  return op.call(student, teacher, temperature, reduction);
}

class KlDistillForward : public torch::autograd::Function<KlDistillForward> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                               double temperature, c10::string_view reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, grad] = call_kl_distill_forward(student, teacher, temperature, reduction);
    ctx->save_for_backward({grad});
    ctx->mark_non_differentiable({grad});
    ctx->set_materialize_grads(false);  // no (N, K) zeros for the unused gradient of `grad`
    ctx->saved_data["student_dtype"] = student.scalar_type();
    // The op has checked the reduction; 0 stands for "none".
    ctx->saved_data["divisor"] = kl_reduction_divisor(parse_kl_reduction(reduction), student.size(0),
                                                      student.size(1));
    return {loss, grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_loss = grads[0];
    if (!grad_loss.defined() || !ctx->needs_input_grad(0)) {
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "kl_distill does not support double backward (create_graph=True through the loss); "
                "use backend='reference' for second derivatives");
    const auto saved = ctx->get_saved_variables();
    const auto dtype = ctx->saved_data["student_dtype"].toScalarType();
    const int64_t divisor = ctx->saved_data["divisor"].toInt();
    // d loss / d KL_row: the upstream gradient of each row for "none", else one value for every row.
    const at::Tensor row_scale = divisor == 0   ? grad_loss.unsqueeze(-1)
                                 : divisor == 1 ? grad_loss
                                                : grad_loss.div(static_cast<double>(divisor));
    return {saved[0].mul(row_scale).to(dtype), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

KlOutputs kl_distill_forward_autograd(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                                      c10::string_view reduction) {
  auto outputs = KlDistillForward::apply(student, teacher, temperature, reduction);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(robustdrop, Autograd, m) { m.impl("kl_distill_forward", &kl_distill_forward_autograd); }

}  // namespace robustdrop::autograd
