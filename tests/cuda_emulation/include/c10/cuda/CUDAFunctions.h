// Stands in for c10/cuda/CUDAFunctions.h in the emulated build: one device, 0.
#pragma once
#include <c10/core/Device.h>

#include "../../cuda_runtime.h"

#ifndef C10_COMPILE_TIME_MAX_GPUS
#define C10_COMPILE_TIME_MAX_GPUS 16
#endif

namespace c10 {
namespace cuda {
inline DeviceIndex current_device() { return 0; }
}  // namespace cuda
}  // namespace c10
