// Autograd of DropBlock's ops (DESIGN.md 4.1): one bit per element and the scale
// are saved; the backward is block_mask_backward, itself differentiable.
#include "mask_autograd.h"

#include <torch/library.h>

namespace robustdrop::autograd {
namespace {

struct BlockMaskForwardOp {
  static constexpr size_t kInputs = 9;
  static MaskOutputs call(const at::Tensor& x, c10::SymInt seed, double gamma, int64_t block_size,
                          bool couple_channels, bool normalize, double eps,
                          const std::optional<at::Tensor>& sample_gamma, c10::SymInt normalize_groups) {
    static const auto op =
        op_handle<MaskOutputs(const at::Tensor&, c10::SymInt, double, int64_t, bool, bool, double,
                              const std::optional<at::Tensor>&, c10::SymInt)>("robustdrop::block_mask_forward");
    return op.call(x, std::move(seed), gamma, block_size, couple_channels, normalize, eps, sample_gamma,
                   std::move(normalize_groups));
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(robustdrop, Autograd, m) {
  m.impl("block_mask_forward",
         &mask_forward_autograd<BlockMaskForwardOp, BlockMaskBackwardOp, c10::SymInt, double, int64_t, bool, bool,
                                double, const std::optional<at::Tensor>&, c10::SymInt>);
  m.impl("block_mask_backward", &mask_backward_autograd<BlockMaskBackwardOp>);
}

}  // namespace robustdrop::autograd
