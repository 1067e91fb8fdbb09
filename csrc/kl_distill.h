// kl_distill's reductions, F.kl_div's, shared by the CPU and CUDA kernels and the
// autograd (python/robustdrop/ops/kl_distill.py has the same rules for Triton).
//
// The kernels produce per-row losses KL_row (N,). The loss is "none": the rows;
// "sum": their sum; "batchmean": the sum / N; "mean": the sum / (N*K). Each
// divisor is at least 1, so an empty input gives 0, where F.kl_div divides by 0.
// The backward scales the saved row gradients d KL_row / d s (N, K) by
// d loss / d KL_row: the upstream gradient (N,) for "none", else the upstream
// gradient (0-d) / divisor.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <cstdint>

namespace robustdrop {

enum class KlReduction { kBatchMean, kSum, kMean, kNone };

// The reduction named by the op's `reduction` argument; any other name is a ValueError.
inline KlReduction parse_kl_reduction(c10::string_view reduction) {
  if (reduction == "batchmean") return KlReduction::kBatchMean;
  if (reduction == "sum") return KlReduction::kSum;
  if (reduction == "mean") return KlReduction::kMean;
  if (reduction == "none") return KlReduction::kNone;
  TORCH_CHECK_VALUE(false, "reduction must be one of ('batchmean', 'sum', 'mean', 'none'), got '", reduction, "'");
}

// What the reduction divides the sum of the rows by, for logits (N, K); 0 for "none" (no sum).
// On symbolic sizes, so the autograd's backward keeps them symbolic under torch.compile and
// torch.export; the kernels pass concrete sizes.
inline c10::SymInt kl_reduction_divisor(KlReduction reduction, const c10::SymInt& N, const c10::SymInt& K) {
  switch (reduction) {
    case KlReduction::kBatchMean:
      return N.max(1);
    case KlReduction::kMean:
      return (N * K).max(1);
    case KlReduction::kSum:
      return 1;
    case KlReduction::kNone:
      break;
  }
  return 0;
}

// d loss / d KL_row from the upstream gradient of the loss, for logits (N, K): per row (N, 1)
// for "none", else grad_loss (0-d) / kl_reduction_divisor, one value for every row.
inline at::Tensor kl_row_scale(const at::Tensor& grad_loss, KlReduction reduction, const c10::SymInt& N,
                               const c10::SymInt& K) {
  switch (reduction) {
    case KlReduction::kNone:
      return grad_loss.unsqueeze(-1);
    case KlReduction::kSum:
      return grad_loss;
    case KlReduction::kBatchMean:
    case KlReduction::kMean:
      break;
  }
  return grad_loss.div(c10::Scalar(kl_reduction_divisor(reduction, N, K)));
}

// The loss from the rows (N,) of logits with K classes: (N,) for "none", else 0-d. sum_rows(rows)
// gives their 0-d total, each backend's way (the CPU's in an order the thread count cannot change).
template <typename SumRows>
inline at::Tensor reduce_kl_rows(const at::Tensor& rows, KlReduction reduction, int64_t K, SumRows sum_rows) {
  if (reduction == KlReduction::kNone) return rows;
  at::Tensor total = sum_rows(rows);
  if (reduction == KlReduction::kSum) return total;
  return total.div_(c10::Scalar(kl_reduction_divisor(reduction, rows.size(0), K)));
}

}  // namespace robustdrop
