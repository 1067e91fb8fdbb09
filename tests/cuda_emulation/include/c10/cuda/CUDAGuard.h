// Stands in for c10/cuda/CUDAGuard.h in the emulated build: the one device needs no switching.
#pragma once
#include <c10/core/Device.h>

#include "CUDAFunctions.h"

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(Device) {}
  explicit CUDAGuard(DeviceIndex) {}
};
}  // namespace cuda
}  // namespace c10
