#!/usr/bin/env bash
# Sets up, compile-checks the CUDA sources when nvcc is present, runs the whole
# test suite (Triton kernels through the interpreter when there is no GPU), then
# the op tests once more with their compiled backend on the CUDA kernels of
# csrc/cuda, built for the CPU against tests/cuda_emulation.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
bash .ci/nvcc_check.sh
"$PY" -m pytest -q tests "$@"
ROBUSTDROP_EMULATE_CUDA=1 "$PY" -m pytest -q tests/test_philox.py tests/test_block_mask.py \
  tests/test_cam_mask.py tests/test_feature_density.py tests/test_channel_gate.py tests/test_fixed_mask.py \
  tests/test_kl_distill.py tests/test_active_drop_block.py tests/test_random_mask.py tests/test_ews_gates.py \
  tests/test_cuda_emulation.py
