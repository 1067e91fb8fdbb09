// Stands in for c10/cuda/CUDAStream.h in the emulated build: launches run at once, in order.
#pragma once
#include <c10/core/Device.h>

#include "CUDAFunctions.h"

namespace c10 {
namespace cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(DeviceIndex = -1) { return {}; }
}  // namespace cuda
}  // namespace c10
