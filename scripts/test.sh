#!/usr/bin/env bash
# Sets up, then:
# 1. the whole test suite (Triton kernels through the interpreter when there is
#    no GPU), while the CUDA sources are compile-checked with nvcc for sm_90
#    (.ci/nvcc_check.sh) and the emulated CUDA kernels are built, in the
#    background: the suite runs mostly in one thread and leaves a core idle;
# 2. without a GPU, every Triton kernel the suite launched compiled for sm_90
#    and checked (tests/gpu_compile/compile_triton.py);
# 3. the op tests once more with their compiled backend on the CUDA kernels of
#    csrc/cuda, built for the CPU against tests/cuda_emulation: under Address-
#    and UndefinedBehaviorSanitizer when the compiler has them, so that a
#    kernel's access outside a tensor, a shared array or a thread's stack, a
#    misaligned access or an out-of-range shift fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
mkdir -p build

emulation=(env ROBUSTDROP_EMULATE_CUDA=1)
asan=$(c++ -print-file-name=libasan.so)
if [ -f "$asan" ]; then
  # libstdc++ preloaded too, so that ASan finds the C++ runtime's throw.
  emulation+=(ROBUSTDROP_EMULATE_ASAN=1 "LD_PRELOAD=$asan $(c++ -print-file-name=libstdc++.so)"
              ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:abort_on_error=1)
else
  echo "AddressSanitizer not found: the emulated CUDA kernels run without it"
fi

background_log=build/background_checks.log
(
  bash .ci/nvcc_check.sh
  "${emulation[@]}" "$PY" -c "import sys; sys.path.insert(0, 'tests'); from cuda_emulation import build; build.load()"
  echo "emulated CUDA kernels built"
) > "$background_log" 2>&1 &
background=$!
trap 'kill "$background" 2>/dev/null || true' EXIT

launches=build/triton_launches.json
rm -f "$launches"
ROBUSTDROP_RECORD_TRITON_LAUNCHES="$PWD/$launches" "$PY" -m pytest -q tests "$@"

status=0
wait "$background" || status=$?
echo "---- nvcc compile check and emulated kernels' build ($background_log)"
grep -v "^\[\|^-- \|^gmake\|^Consolidate\|^Scanning\|^Built target" "$background_log" || true
if [ "$status" -ne 0 ]; then
  echo "the nvcc compile check or the emulated kernels' build failed (exit $status)"
  exit "$status"
fi

if [ -f "$launches" ]; then
  "$PY" tests/gpu_compile/compile_triton.py "$launches"
fi

# --capture=sys leaves file descriptor 2 alone: a sanitizer's report reaches the log.
"${emulation[@]}" "$PY" -m pytest -q --capture=sys tests/test_cuda_emulation.py tests/test_philox.py tests/test_block_mask.py \
  tests/test_cam_mask.py tests/test_feature_density.py tests/test_channel_gate.py tests/test_fixed_mask.py \
  tests/test_kl_distill.py tests/test_active_drop_block.py tests/test_random_mask.py tests/test_ews_gates.py
