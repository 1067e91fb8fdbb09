#!/usr/bin/env bash
# Sets up, compile-checks the CUDA sources when nvcc is present, runs the whole
# test suite (Triton kernels through the interpreter when there is no GPU), then
# the op tests once more with their compiled backend on the CUDA kernels of
# csrc/cuda, built for the CPU against tests/cuda_emulation: under Address- and
# UndefinedBehaviorSanitizer when the compiler has them, so that a kernel's
# access outside a tensor, a shared array or a thread's stack, a misaligned
# access or an out-of-range shift fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
bash .ci/nvcc_check.sh
"$PY" -m pytest -q tests "$@"

emulation=(env ROBUSTDROP_EMULATE_CUDA=1)
asan=$(c++ -print-file-name=libasan.so)
if [ -f "$asan" ]; then
  # libstdc++ preloaded too, so that ASan finds the C++ runtime's throw.
  emulation+=(ROBUSTDROP_EMULATE_ASAN=1 "LD_PRELOAD=$asan $(c++ -print-file-name=libstdc++.so)"
              ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:abort_on_error=1)
else
  echo "AddressSanitizer not found: the emulated CUDA kernels run without it"
fi
# --capture=sys leaves file descriptor 2 alone: a sanitizer's report reaches the log.
"${emulation[@]}" "$PY" -m pytest -q --capture=sys tests/test_cuda_emulation.py tests/test_philox.py tests/test_block_mask.py \
  tests/test_cam_mask.py tests/test_feature_density.py tests/test_channel_gate.py tests/test_fixed_mask.py \
  tests/test_kl_distill.py tests/test_active_drop_block.py tests/test_random_mask.py tests/test_ews_gates.py
