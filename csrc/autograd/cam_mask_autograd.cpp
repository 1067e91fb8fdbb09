// Autograd of CamDrop's forward (DESIGN.md 4.2): the backward is DropBlock's
// (block_mask_backward); no gradient flows through the CAM, the weight or the target.
#include "mask_autograd.h"

#include <torch/library.h>

namespace robustdrop::autograd {
namespace {

struct CamMaskForwardOp {
  static constexpr size_t kInputs = 12;
  static MaskOutputs call(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target,
                          const std::optional<at::Tensor>& guided, c10::SymInt seed, double gamma, int64_t block_size,
                          c10::SymInt spatial_topk, c10::SymInt channel_topk, bool normalize, double eps,
                          const std::optional<at::Tensor>& sample_gamma) {
    static const auto op =
        op_handle<MaskOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                              c10::SymInt, double, int64_t, c10::SymInt, c10::SymInt, bool, double,
                              const std::optional<at::Tensor>&)>("robustdrop::cam_mask_forward");
    return op.call(x, weight, target, guided, std::move(seed), gamma, block_size, std::move(spatial_topk),
                   std::move(channel_topk), normalize, eps, sample_gamma);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(robustdrop, Autograd, m) {
  m.impl("cam_mask_forward",
         &mask_forward_autograd<CamMaskForwardOp, BlockMaskBackwardOp, const at::Tensor&, const at::Tensor&,
                                const std::optional<at::Tensor>&, c10::SymInt, double, int64_t, c10::SymInt,
                                c10::SymInt, bool, double, const std::optional<at::Tensor>&>);
}

}  // namespace robustdrop::autograd
