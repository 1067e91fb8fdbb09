// Autograd of kl_distill (EWS). Two ops share it:
//
// - kl_distill_forward(s, t, T, reduction) -> (loss, grad): the kernels' op. Its
//   forward returns the reduced loss and the per-row gradient d KL_row / d s;
//   the backward scales that saved gradient by d loss / d KL_row
//   (csrc/kl_distill.h) and casts it to the student's dtype.
// - kl_distill(s, t, T, reduction) -> loss: the same with the gradient kept
//   private to the autograd node (its kernel, for every backend, is
//   kl_distill_forward's loss). Nothing else can see the saved gradient, so
//   when the backward runs for the last time (the graph is not kept for
//   another) it scales the gradient in place and hands that buffer on as the
//   student's gradient: no new (N, K) buffer, whose pages the CPU often has to
//   fault in and zero first. On the 2-core CPU at 256 x 1000 float32 that was
//   about a quarter of a forward + backward.
//   Saved-tensor hooks active at the forward (which may keep the saved
//   tensor where a user can see it) turn this off.
//
// One autograd node for the whole loss, reduction included. The teacher, the
// temperature and the reduction get no gradient, and there is no double
// backward (the saved gradient is a constant).
#include "mask_autograd.h"

#include <ATen/SavedTensorHooks.h>
#include <torch/csrc/autograd/graph_task.h>
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

// Runs the forward, saves the row gradient and what the backward needs; returns (loss, grad).
KlOutputs kl_forward_and_save(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                              double temperature, c10::string_view reduction) {
  at::AutoDispatchBelowADInplaceOrView guard;
  auto outputs = call_kl_distill_forward(student, teacher, temperature, reduction);
  ctx->save_for_backward({std::get<1>(outputs)});
  ctx->set_materialize_grads(false);  // kl_distill_forward: no (N, K) zeros for the unused gradient of `grad`
  ctx->saved_data["student_dtype"] = student.scalar_type();
  // The op has checked the reduction. Symbolic sizes, not ints: under torch.compile and torch.export
  // an int would fix the batch and class counts of the graph.
  ctx->saved_data["reduction"] = static_cast<int64_t>(parse_kl_reduction(reduction));
  ctx->saved_data["rows"] = student.sym_size(0);
  ctx->saved_data["classes"] = student.sym_size(1);
  return outputs;
}

// The student's gradient from the saved row gradient: grad * d loss / d KL_row, in the student's dtype.
// With in_place, the saved gradient's buffer is scaled and returned.
at::Tensor kl_student_gradient(AutogradContext* ctx, const at::Tensor& grad_loss, bool in_place) {
  TORCH_CHECK(!at::GradMode::is_enabled(),
              "kl_distill does not support double backward (create_graph=True through the loss); "
              "use backend='reference' for second derivatives");
  const auto saved = ctx->get_saved_variables();
  const auto dtype = ctx->saved_data["student_dtype"].toScalarType();
  const auto reduction = static_cast<KlReduction>(ctx->saved_data["reduction"].toInt());
  const at::Tensor row_scale = kl_row_scale(grad_loss, reduction, ctx->saved_data["rows"].toSymInt(),
                                            ctx->saved_data["classes"].toSymInt());
  // The buffer also must not be shared with another tensor (a view of it).
  if (in_place && saved[0].storage().use_count() == 1) return saved[0].mul_(row_scale).to(dtype);
  return saved[0].mul(row_scale).to(dtype);
}

class KlDistillForward : public torch::autograd::Function<KlDistillForward> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                               double temperature, c10::string_view reduction) {
    auto [loss, grad] = kl_forward_and_save(ctx, student, teacher, temperature, reduction);
    ctx->mark_non_differentiable({grad});
    return {loss, grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    // The caller holds the op's `grad` output, the saved buffer: never in place.
    return {kl_student_gradient(ctx, grads[0], /*in_place=*/false), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class KlDistillLoss : public torch::autograd::Function<KlDistillLoss> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                            double temperature, c10::string_view reduction) {
    ctx->saved_data["private"] = !at::SavedTensorDefaultHooks::get_hooks().has_value();
    return std::get<0>(kl_forward_and_save(ctx, student, teacher, temperature, reduction));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    // The engine frees the saved gradient right after this backward unless the graph is kept.
    const bool last_use = !torch::autograd::get_current_graph_task_keep_graph();
    const bool in_place = last_use && ctx->saved_data["private"].toBool();
    return {kl_student_gradient(ctx, grads[0], in_place), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

KlOutputs kl_distill_forward_autograd(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                                      c10::string_view reduction) {
  auto outputs = KlDistillForward::apply(student, teacher, temperature, reduction);
  return {outputs[0], outputs[1]};
}

at::Tensor kl_distill_autograd(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                               c10::string_view reduction) {
  return KlDistillLoss::apply(student, teacher, temperature, reduction);
}

// Below autograd (and under torch.inference_mode), on every device: the forward's loss.
at::Tensor kl_distill_loss(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                           c10::string_view reduction) {
  return std::get<0>(call_kl_distill_forward(student, teacher, temperature, reduction));
}

}  // namespace

TORCH_LIBRARY_IMPL(robustdrop, Autograd, m) {
  m.impl("kl_distill_forward", &kl_distill_forward_autograd);
  m.impl("kl_distill", &kl_distill_autograd);
}

TORCH_LIBRARY_IMPL(robustdrop, CompositeExplicitAutograd, m) { m.impl("kl_distill", &kl_distill_loss); }

}  // namespace robustdrop::autograd
