#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu with nvcc for sm_90 without linking (the CMake
# target cuda_compile_check), so the CUDA sources cannot rot on machines with
# nvcc but no GPU, even with a CPU-only torch. Warnings in robustdrop's own
# code fail the check, and so does a fused or approximate float instruction in
# a kernel that must match the reference bit for bit (tests/gpu_compile/ptx.py).
# Skips (exit 0) when nvcc is not on PATH.
#
# Usage: .ci/nvcc_check.sh            (PYTHON=... picks the interpreter with torch)
set -euo pipefail

cd "$(dirname "$0")/.."

if ! command -v nvcc >/dev/null 2>&1; then
  echo "nvcc_check: nvcc not found on PATH; skipped"
  exit 0
fi

python_bin="$(command -v "${PYTHON:-python3}")"
build_dir=build/nvcc_check

# ROBUSTDROP_BUILD_MODULE=OFF: the check needs neither Torch's CMake config nor
# the CUDA libraries, only torch's headers.
cmake -S . -B "$build_dir" \
  -DROBUSTDROP_BUILD_MODULE=OFF \
  -DROBUSTDROP_WERROR=ON \
  -DROBUSTDROP_NVCC="$(command -v nvcc)" \
  -DPython_EXECUTABLE="$python_bin"
cmake --build "$build_dir" --target cuda_compile_check
echo "nvcc_check: all csrc/cuda/*.cu compiled for sm_90"
# Fused multiply-adds and approximate float operations only where DESIGN.md states a tolerance.
"$python_bin" tests/gpu_compile/ptx.py "$build_dir"/cuda_compile_check/*.keep/*.ptx
