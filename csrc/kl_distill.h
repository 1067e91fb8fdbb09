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

#include <algorithm>
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
inline int64_t kl_reduction_divisor(KlReduction reduction, int64_t N, int64_t K) {
  switch (reduction) {
    case KlReduction::kBatchMean:
      return std::max<int64_t>(N, 1);
    case KlReduction::kMean:
      return std::max<int64_t>(N * K, 1);
    case KlReduction::kSum:
      return 1;
    case KlReduction::kNone:
      break;
  }
  return 0;
}

// The loss from the rows (N,) of logits with K classes: (N,) for "none", else 0-d.
inline at::Tensor reduce_kl_rows(const at::Tensor& rows, KlReduction reduction, int64_t K) {
  const int64_t divisor = kl_reduction_divisor(reduction, rows.size(0), K);
  if (divisor == 0) return rows;
  at::Tensor total = rows.sum();
  return divisor == 1 ? total : total.div_(static_cast<double>(divisor));
}

}  // namespace robustdrop
