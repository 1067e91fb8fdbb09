// Autograd of feature-density dropout (DESIGN.md 4.3): N*C bits (and, with
// rescale, the (N, C) scale) are saved; the backward is channel_mask_backward,
// itself differentiable. No gradient flows through the PCA. feature_density
// (cells and counts, int64) has no gradient and no autograd kernel.
#include "mask_autograd.h"

#include <torch/library.h>

namespace robustdrop::autograd {
namespace {

struct FeatureDensityForwardOp {
  static constexpr size_t kInputs = 7;
  static MaskOutputs call(const at::Tensor& x, int64_t dims, int64_t grids, c10::SymInt seed, double kappa,
                          double alpha, bool rescale) {
    static const auto op =
        op_handle<MaskOutputs(const at::Tensor&, int64_t, int64_t, c10::SymInt, double, double, bool)>(
            "robustdrop::feature_density_forward");
    return op.call(x, dims, grids, std::move(seed), kappa, alpha, rescale);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(robustdrop, Autograd, m) {
  m.impl("feature_density_forward",
         &mask_forward_autograd<FeatureDensityForwardOp, ChannelMaskBackwardOp, int64_t, int64_t, c10::SymInt, double,
                                double, bool>);
  // Also the forward of EWS's channel gate (robustdrop.ews), which is linear and self-adjoint.
  m.impl("channel_mask_backward", &mask_backward_autograd<ChannelMaskBackwardOp>);
}

}  // namespace robustdrop::autograd
