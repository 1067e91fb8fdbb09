// The shape of a feature-density problem (DESIGN.md 4.3), shared by the CPU
// and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace robustdrop {

struct DensityShape {
  int64_t N, C, D;  // samples, channels (or features), positions per channel (1 for (N, F))
  int64_t m;        // min(C, D): the side of the matrix whose top eigenvectors give the axes
  int64_t cells;    // grids**dims
  int dims, grids;
  bool features;    // x is (N, F): each value is its own coordinate, no PCA
};

// For x (N, C, H, W) or (N, F) whose arguments check_feature_density_args accepted.
inline DensityShape density_shape(const at::Tensor& x, int64_t dims, int64_t grids) {
  DensityShape s;
  s.N = x.size(0);
  s.C = x.size(1);
  s.features = x.dim() == 2;
  s.D = s.features ? 1 : x.size(2) * x.size(3);
  s.m = std::min(s.C, s.D);
  s.dims = static_cast<int>(dims);
  s.grids = static_cast<int>(grids);
  s.cells = 1;
  for (int r = 0; r < s.dims; ++r) s.cells *= grids;
  return s;
}

}  // namespace robustdrop
