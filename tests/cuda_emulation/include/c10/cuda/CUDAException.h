// Stands in for c10/cuda/CUDAException.h in the emulated build (see ../../../emulator.h).
#pragma once
#include <c10/util/Exception.h>

#include "../../cuda_runtime.h"

#define C10_CUDA_CHECK(expression)                                                          \
  do {                                                                                      \
    const cudaError_t emulated_status = (expression);                                       \
    TORCH_CHECK(emulated_status == cudaSuccess, "CUDA error: ", cudaGetErrorString(emulated_status)); \
  } while (0)

// A failed emulated launch has already thrown.
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
