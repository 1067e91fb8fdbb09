#!/usr/bin/env bash
# Sets up, then:
# 1. the whole test suite (Triton kernels through the interpreter when there is
#    no GPU), while the CUDA sources are compile-checked with nvcc for sm_90
#    (.ci/nvcc_check.sh) and the emulated CUDA kernels are built, in the
#    background: the suite runs mostly in one thread and leaves a core idle;
# 2. the op tests once more with their compiled backend on the CUDA kernels of
#    csrc/cuda, built for the CPU against tests/cuda_emulation: under Address-
#    and UndefinedBehaviorSanitizer when the compiler has them, so that a
#    kernel's access outside a tensor, a shared array or a thread's stack, a
#    misaligned access or an out-of-range shift fails the run; beside it,
#    without a GPU, every Triton kernel the suite or the benchmark launches
#    is compiled for sm_90 and checked (tests/gpu_compile/compile_triton.py);
# 3. the op tests once more on the C++ CPU kernels built with the same
#    sanitizers (tests/sanitized_cpu), when the compiler has them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
mkdir -p build

# The tests of the compiled ops, run again on the emulated CUDA kernels and on the sanitized CPU kernels.
op_tests=(tests/test_philox.py tests/test_block_mask.py tests/test_cam_mask.py tests/test_feature_density.py
          tests/test_channel_gate.py tests/test_fixed_mask.py tests/test_kl_distill.py
          tests/test_active_drop_block.py tests/test_random_mask.py tests/test_ews_gates.py)
emulation=(env ROBUSTDROP_EMULATE_CUDA=1)
sanitized=()
asan=$(c++ -print-file-name=libasan.so)
if [ -f "$asan" ]; then
  # libstdc++ preloaded too, so that ASan finds the C++ runtime's throw.
  sanitized=(env "LD_PRELOAD=$asan $(c++ -print-file-name=libstdc++.so)"
             ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:abort_on_error=1)
  emulation+=(ROBUSTDROP_EMULATE_ASAN=1 "${sanitized[@]:1}")
else
  echo "AddressSanitizer not found: the emulated CUDA kernels run without it, the sanitized CPU pass not at all"
fi
sanitized_cpu=build/sanitized_cpu

# Background jobs, each with its log; stopped when this script ends early.
background=()
trap 'kill "${background[@]}" 2>/dev/null || true' EXIT
show_and_wait() {  # PID LOG TITLE: waits for a background job, shows its log, fails with it
  local status=0
  wait "$1" || status=$?
  echo "---- $3 ($2)"
  grep -v "^\[\|^-- \|^gmake\|^Consolidate\|^Scanning\|^Built target" "$2" || true
  if [ "$status" -ne 0 ]; then
    echo "$3: failed (exit $status)"
    exit "$status"
  fi
}

# MAX_JOBS=1: one compile at a time, so that the suite keeps a core.
background_log=build/background_checks.log
(
  bash .ci/nvcc_check.sh
  echo "nvcc check done after ${SECONDS} s"
  MAX_JOBS=1 "${emulation[@]}" "$PY" -c "import sys; sys.path.insert(0, 'tests'); from cuda_emulation import build; build.load()"
  echo "emulated CUDA kernels built after ${SECONDS} s"
  if [ ${#sanitized[@]} -gt 0 ]; then
    MAX_JOBS=1 "${sanitized[@]}" "$PY" tests/sanitized_cpu/build.py "$sanitized_cpu"
    echo "sanitized CPU kernels built after ${SECONDS} s"
  fi
) > "$background_log" 2>&1 &
background+=($!)

launches=build/triton_launches.json
rm -f "$launches"
ROBUSTDROP_RECORD_TRITON_LAUNCHES="$PWD/$launches" "$PY" -m pytest -q tests "$@"

show_and_wait "${background[0]}" "$background_log" "nvcc compile check and the emulated kernels' build"

# The Triton kernels' sm_90 build beside the emulated pass, which also runs in one thread: the
# launches the suite made, and those the benchmark makes at its full sizes (recorded, not run).
compile_log=build/compile_triton.log
if [ -f "$launches" ]; then
  { "$PY" tests/gpu_compile/record_bench.py "$launches" && "$PY" tests/gpu_compile/compile_triton.py "$launches"; } \
    > "$compile_log" 2>&1 &
  background+=($!)
fi

# --capture=sys leaves file descriptor 2 alone: a sanitizer's report reaches the log.
"${emulation[@]}" "$PY" -m pytest -q --capture=sys tests/test_cuda_emulation.py "${op_tests[@]}"
# "not triton": those cases run none of the C++ kernels, and the first pass ran them already.
if [ ${#sanitized[@]} -gt 0 ]; then
  # No GPU in this pass: it checks the CPU kernels, and the CUDA runtime does not run under ASan's defaults.
  "${sanitized[@]}" ROBUSTDROP_SANITIZED_CPU=1 CUDA_VISIBLE_DEVICES= PYTHONPATH="$PWD/$sanitized_cpu/python" \
    "$PY" -m pytest -q --capture=sys -k "not triton" tests/test_sanitized_cpu.py tests/test_cpu_threads.py \
    "${op_tests[@]}"
fi
if [ -f "$launches" ]; then
  show_and_wait "${background[1]}" "$compile_log" "Triton kernels compiled for sm_90"
fi
