// Argument checks shared by the CPU and CUDA kernels, so every backend rejects
// bad input with the same message (ValueError / TypeError in Python).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

namespace robustdrop {

inline void check_float_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()),
                   name, " must be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
                   t.scalar_type());
}

inline void check_block_mask_forward_args(const at::Tensor& x, double gamma, int64_t block_size, double eps) {
  check_float_input(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be 4-D (N, C, H, W), got ", x.dim(), " dimensions");
  TORCH_CHECK_VALUE(block_size >= 1, "block_size must be >= 1, got ", block_size);
  TORCH_CHECK_VALUE(x.numel() == 0 || block_size <= std::min(x.size(2), x.size(3)),
                    "block_size must be <= min(H, W) = ", std::min(x.size(2), x.size(3)), ", got ", block_size,
                    " (the Python API clamps it)");
  TORCH_CHECK_VALUE(gamma >= 0.0, "gamma must be >= 0, got ", gamma);
  TORCH_CHECK_VALUE(eps >= 0.0 && std::isfinite(eps), "eps must be finite and >= 0, got ", eps);
}

// The packed mask holds one bit per element, each row padded to a whole byte.
inline int64_t mask_row_bytes(int64_t width) { return (width + 7) / 8; }

// The per-sample seed probabilities (N,) float32 and the normalisation groups
// of block_mask_forward. Values are not read here: that would cost a CUDA
// tensor a synchronisation, and a negative or NaN probability just draws no seeds.
inline void check_sample_gamma_args(const at::Tensor& x, const std::optional<at::Tensor>& sample_gamma,
                                    int64_t normalize_groups) {
  const int64_t N = x.size(0);
  if (sample_gamma.has_value()) {
    TORCH_CHECK_TYPE(sample_gamma->scalar_type() == at::kFloat, "sample_gamma must be float32, got ",
                     sample_gamma->scalar_type());
    TORCH_CHECK_VALUE(sample_gamma->dim() == 1 && sample_gamma->size(0) == N, "sample_gamma must have shape (N,) = (",
                      N, ",), one seed probability per sample, got ", sample_gamma->sizes());
    TORCH_CHECK_VALUE(sample_gamma->device() == x.device(), "sample_gamma must be on x's device ", x.device(),
                      ", got ", sample_gamma->device());
  }
  TORCH_CHECK_VALUE(normalize_groups >= 1 && (N == 0 || N % normalize_groups == 0),
                    "normalize_groups must be >= 1 and divide N = ", N, ", got ", normalize_groups);
}

// How many samples share each value of a block-mask scale: N for one value, N / G
// for a (G,) scale of normalisation groups.
inline int64_t samples_per_scale(int64_t N, const at::Tensor& scale) {
  return scale.numel() <= 1 ? std::max<int64_t>(N, 1) : N / scale.numel();
}

inline void check_block_mask_backward_args(const at::Tensor& grad_y, const at::Tensor& mask, const at::Tensor& scale) {
  check_float_input(grad_y, "grad_y");
  TORCH_CHECK_VALUE(grad_y.dim() == 4, "grad_y must be 4-D (N, C, H, W), got ", grad_y.dim(), " dimensions");
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kByte, "mask must be uint8, got ", mask.scalar_type());
  TORCH_CHECK_VALUE(mask.dim() == 4 && mask.size(0) == grad_y.size(0) &&
                        (mask.size(1) == 1 || mask.size(1) == grad_y.size(1)) && mask.size(2) == grad_y.size(2) &&
                        mask.size(3) == mask_row_bytes(grad_y.size(3)),
                    "mask must have shape (N, 1 or C, H, ceil(W/8)) for grad_y of shape ", grad_y.sizes(),
                    ", got ", mask.sizes());
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kFloat, "scale must be float32, got ", scale.scalar_type());
  const int64_t N = grad_y.size(0);
  TORCH_CHECK_VALUE(scale.numel() == 1 || (scale.dim() == 1 && scale.numel() >= 1 &&
                                           (N == 0 || N % scale.numel() == 0)),
                    "scale must hold one value or have shape (G,) with G dividing N = ", N, ", got ", scale.sizes());
  TORCH_CHECK_VALUE(mask.device() == grad_y.device() && scale.device() == grad_y.device(),
                    "grad_y, mask and scale must be on one device");
}

// Random Mask apply: x (N, C, H, W) and one packed keep mask (C, H, ceil(W/8)) uint8.
inline void check_fixed_mask_args(const at::Tensor& x, const at::Tensor& mask) {
  check_float_input(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be 4-D (N, C, H, W), got ", x.dim(), " dimensions");
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kByte, "mask must be uint8, got ", mask.scalar_type());
  const int64_t C = x.size(1), H = x.size(2), row_bytes = mask_row_bytes(x.size(3));
  TORCH_CHECK_VALUE(mask.dim() == 3 && mask.size(0) == C && mask.size(1) == H && mask.size(2) == row_bytes,
                    "mask must have shape (C, H, ceil(W/8)) = (", C, ", ", H, ", ", row_bytes, ") for x of shape ",
                    x.sizes(), ", got ", mask.sizes());
  TORCH_CHECK_VALUE(mask.device() == x.device(), "mask must be on x's device ", x.device(), ", got ", mask.device());
}

// Shapes, dtypes and devices of CamDrop's inputs (DESIGN.md 4.2). The target
// values are checked by each kernel where it reads them (on the CPU against K;
// on the GPU a device-side assert guards the read), because checking them here
// would cost a CUDA tensor a synchronisation.
constexpr int64_t kMaxCamRow = int64_t{1} << 31;

inline void check_cam_mask_forward_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target,
                                        const std::optional<at::Tensor>& guided, double gamma, int64_t block_size,
                                        int64_t spatial_topk, int64_t channel_topk, double eps) {
  check_block_mask_forward_args(x, gamma, block_size, eps);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK_VALUE(C >= 1, "x must have at least one channel, got shape ", x.sizes());
  // The top-k selections count a row's elements in 32 bits (signed in Triton).
  TORCH_CHECK_VALUE(H * W < kMaxCamRow && C < kMaxCamRow,
                    "x must have fewer than 2**31 positions per map (H*W) and channels (C), got shape ", x.sizes());
  check_float_input(weight, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D (K, C'), the classifier's weight, got ", weight.dim(),
                    " dimensions");
  TORCH_CHECK_VALUE(weight.size(1) >= C && weight.size(1) % C == 0,
                    "weight must have a width C' that is a multiple of x's channels C = ", C, ", got C' = ",
                    weight.size(1));
  TORCH_CHECK_VALUE(N == 0 || weight.size(0) >= 1, "weight must have at least one class (row), got shape ",
                    weight.sizes());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "target must be int64 (torch.long), got ",
                   target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == N, "target must have shape (N,) = (", N,
                    ",), one class index per sample, got ", target.sizes());
  TORCH_CHECK_VALUE(weight.device() == x.device() && target.device() == x.device(),
                    "weight and target must be on x's device ", x.device(), ", got ", weight.device(), " and ",
                    target.device());
  if (guided.has_value()) {
    TORCH_CHECK_TYPE(guided->scalar_type() == at::kBool, "guided must be a bool tensor, got ",
                     guided->scalar_type());
    TORCH_CHECK_VALUE(guided->numel() == 1 && guided->device() == x.device(),
                      "guided must be one bool on x's device");
  }
  TORCH_CHECK_VALUE(spatial_topk >= 0 && spatial_topk <= H * W, "spatial_topk must be in [0, H*W] = [0, ", H * W,
                    "], got ", spatial_topk);
  TORCH_CHECK_VALUE(channel_topk >= 0 && channel_topk <= C, "channel_topk must be in [0, C] = [0, ", C, "], got ",
                    channel_topk);
}

// Feature density (DESIGN.md 4.3): x (N, C, H, W) with dims in {1, 2, 3}, or
// x (N, F) with dims 1; grids >= 1 with at most kMaxDensityCells cells.
constexpr int64_t kMaxDensityCells = 1 << 16;

inline void check_feature_density_args(const at::Tensor& x, int64_t dims, int64_t grids) {
  check_float_input(x, "x");
  TORCH_CHECK_VALUE(dims >= 1 && dims <= 3, "dims must be 1, 2 or 3, got ", dims);
  TORCH_CHECK_VALUE(x.dim() == 4 || x.dim() == 2, "x must be 4-D (N, C, H, W) feature maps or 2-D (N, F) features, got ",
                    x.dim(), " dimensions");
  TORCH_CHECK_VALUE(x.dim() == 4 || dims == 1,
                    "dims must be 1 for 2-D (N, F) features (each value is its own coordinate), got ", dims);
  TORCH_CHECK_VALUE(grids >= 1, "grids must be >= 1, got ", grids);
  int64_t cells = 1;
  for (int64_t r = 0; r < dims; ++r) {
    cells *= grids;
    TORCH_CHECK_VALUE(cells <= kMaxDensityCells, "grids must give at most ", kMaxDensityCells,
                      " cells (grids**dims), got ", grids, "**", dims);
  }
}

inline void check_feature_density_forward_args(const at::Tensor& x, int64_t dims, int64_t grids, double kappa,
                                               double alpha) {
  check_feature_density_args(x, dims, grids);
  TORCH_CHECK_VALUE(std::isfinite(kappa), "kappa must be finite, got ", kappa);
  TORCH_CHECK_VALUE(std::isfinite(alpha), "alpha must be finite, got ", alpha);
}

// grad_y (N, C, H, W) or (N, C); mask (N, ceil(C/8)) uint8; scale one float32
// or (N, C) float32.
inline void check_channel_mask_backward_args(const at::Tensor& grad_y, const at::Tensor& mask,
                                             const at::Tensor& scale) {
  check_float_input(grad_y, "grad_y");
  TORCH_CHECK_VALUE(grad_y.dim() == 4 || grad_y.dim() == 2, "grad_y must be 4-D (N, C, H, W) or 2-D (N, C), got ",
                    grad_y.dim(), " dimensions");
  const int64_t N = grad_y.size(0), C = grad_y.size(1);
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kByte, "mask must be uint8, got ", mask.scalar_type());
  TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == N && mask.size(1) == mask_row_bytes(C),
                    "mask must have shape (N, ceil(C/8)) = (", N, ", ", mask_row_bytes(C), "), got ", mask.sizes());
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kFloat, "scale must be float32, got ", scale.scalar_type());
  TORCH_CHECK_VALUE(scale.numel() == 1 || (scale.dim() == 2 && scale.size(0) == N && scale.size(1) == C),
                    "scale must hold one value or have shape (N, C) = (", N, ", ", C, "), got ", scale.sizes());
  TORCH_CHECK_VALUE(mask.device() == grad_y.device() && scale.device() == grad_y.device(),
                    "grad_y, mask and scale must be on one device");
}

// kl_distill: student and teacher logits (N, K) of one floating dtype on one
// device, and a finite temperature > 0.
inline void check_kl_distill_args(const at::Tensor& student, const at::Tensor& teacher, double temperature) {
  check_float_input(student, "student_logits");
  check_float_input(teacher, "teacher_logits");
  TORCH_CHECK_VALUE(student.dim() == 2, "student_logits must be 2-D (N, K), got ", student.dim(), " dimensions");
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), "teacher_logits must have student_logits' shape ",
                    student.sizes(), ", got ", teacher.sizes());
  TORCH_CHECK_TYPE(teacher.scalar_type() == student.scalar_type(), "teacher_logits must have student_logits' dtype ",
                   student.scalar_type(), ", got ", teacher.scalar_type());
  TORCH_CHECK_VALUE(teacher.device() == student.device(), "teacher_logits must be on student_logits' device ",
                    student.device(), ", got ", teacher.device());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0, "temperature must be a finite number > 0, got ",
                    temperature);
  // The kernels scale the logits by 1 / T in float32 (float64 for float64 logits): it must be finite there.
  const bool wide = student.scalar_type() == at::kDouble;
  const double largest = wide ? std::numeric_limits<double>::max() : std::numeric_limits<float>::max();
  TORCH_CHECK_VALUE(1.0 / temperature <= largest, "temperature must be at least 1 / ", largest, " for ",
                    student.scalar_type(), " logits (the logits are scaled by 1 / temperature in ",
                    wide ? "float64" : "float32", "), got ", temperature);
}

inline void check_philox_args(const at::Tensor& index) {
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "index must be int64, got ", index.scalar_type());
}

// The memory layouts the elementwise kernels walk directly; anything else is
// made contiguous first.
inline bool is_channels_last_4d(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Contiguous or channels_last as given; any other strides are made contiguous.
inline at::Tensor walkable(const at::Tensor& t) {
  return (t.is_contiguous() || is_channels_last_4d(t)) ? t : t.contiguous();
}

}  // namespace robustdrop
