#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU (written for an H100/H200), build the CUDA
# extension, run the whole test suite with the cuda and triton backends against the reference,
# run compute-sanitizer memcheck and racecheck over each op's CUDA tests, and run the benchmarks
# (float32 and bfloat16, with the torchvision, timm and torch.compile anchors, inputs rotated
# through more than the L2; and the model-level step and subnet benchmarks). Every log and table
# goes to one folder.
#
#   bash benchmarks/gpu_check.sh                    # every stage, in order
#   bash benchmarks/gpu_check.sh build test         # the stages named, in the order given
#   GPU_CHECK_OUT=/tmp/out bash benchmarks/gpu_check.sh sanitize
#
# Stages:
#   info          nvidia-smi, nvcc, compute-sanitizer, robustdrop's view of its backends
#   build         the extension with CUDA kernels for sm_90, in place (python/robustdrop/_C*.so),
#                 and each kernel's registers, shared memory and stack (cuobjdump) in resources.txt
#   test          the whole test suite (pytest-xdist with GPU_CHECK_WORKERS workers when installed)
#   sanitize      memcheck and racecheck over tests/test_<op>.py on CUDA tensors only, with the
#                 caching allocator off so every out-of-bounds access leaves its own allocation
#   bench-fp32    python -m robustdrop bench, float32 (tables: bench-fp32/bench_cuda.{md,csv,png})
#   bench-bf16    the same in bfloat16
#   bench-models  bench-steps (Active DropBlock's step) and bench-subnets (EWS's batched subnets)
#
# Every stage after build finds the extension built (a later stage builds it if it is missing or
# was built without CUDA). Each stage writes <out>/<stage>.log and appends its status and
# minutes to <out>/summary.md; the script exits non-zero if any stage failed, after running the
# rest. The folder defaults to gpu_check_out/ (git-ignored); `tar czf gpu_check.tgz gpu_check_out`
# carries it as one file. On a copy of the checkout without .git, set ROBUSTDROP_GIT_COMMIT so the
# tables name their commit.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-gpu_check_out}
WORKERS=${GPU_CHECK_WORKERS:-4}
OPS="philox block_mask cam_mask feature_density fixed_mask channel_gate kl_distill"
# Under the sanitizer: no torch.compile (Inductor's own compiles dominate), no statistics over
# many draws and no opcheck (it compiles too); every other CUDA test of the op runs.
SANITIZE_SELECTION="not compile and not statistics and not opcheck and not each_channel_is_dropped"
ALL_STAGES="info build test sanitize bench-fp32 bench-bf16 bench-models"

mkdir -p "$OUT"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
failed=0

have_cuda_extension() {
  "$PY" -c "import sys, robustdrop; sys.exit(0 if robustdrop.backends()['cuda'].available else 1)" 2>/dev/null
}

stage_info() {
  nvidia-smi || return 1
  nvcc --version || return 1
  compute-sanitizer --version || return 1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
    || return 1
  "$PY" -m robustdrop info || return 1
  echo "commit: ${ROBUSTDROP_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
}

stage_build() {
  FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PY" setup.py build_ext --inplace || return 1
  "$PY" -c "
import robustdrop
status = robustdrop.backends()
for name, s in status.items():
    print(f'{name:10s} {\"available\" if s.available else \"unavailable: \" + s.reason}')
raise SystemExit(0 if status['cuda'].available and status['triton'].available else 1)" || return 1
  cuobjdump --dump-resource-usage python/robustdrop/_C*.so > "$OUT/resources.txt" || return 1
  echo "kernel resources: $OUT/resources.txt"
}

ensure_built() {
  have_cuda_extension || stage_build
}

stage_test() {
  ensure_built || return 1
  local parallel=()
  if "$PY" -c "import xdist" 2>/dev/null && [ "$WORKERS" -gt 1 ]; then
    parallel=(-n "$WORKERS")
  fi
  "$PY" -m pytest -q -p no:cacheprovider -rfEs --durations=25 "${parallel[@]}" \
    --junitxml="$OUT/test.xml" tests
}

stage_sanitize() {
  ensure_built || return 1
  local status=0 tool op
  for tool in memcheck racecheck; do
    for op in $OPS; do
      echo "=== compute-sanitizer --tool $tool: tests/test_$op.py"
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 ROBUSTDROP_TEST_DEVICES=cuda \
        compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 50 \
        "$PY" -m pytest -q -p no:cacheprovider -x "tests/test_$op.py" -k "$SANITIZE_SELECTION" || status=1
    done
  done
  return $status
}

bench_ops() {
  ensure_built || return 1
  "$PY" -m robustdrop bench --device cuda --dtype "$1" --repeats "${GPU_CHECK_REPEATS:-100}" \
    --budget "${GPU_CHECK_BUDGET:-3}" --out "$OUT/bench-$2"
}

stage_bench-fp32() { bench_ops float32 fp32; }
stage_bench-bf16() { bench_ops bfloat16 bf16; }

stage_bench-models() {
  ensure_built || return 1
  "$PY" -m robustdrop bench-steps --device cuda --out "$OUT/bench-models" || return 1
  "$PY" -m robustdrop bench-subnets --device cuda --out "$OUT/bench-models"
}

run_stage() {
  local stage=$1 start status
  if ! declare -F "stage_$stage" >/dev/null; then
    echo "unknown stage '$stage'; stages: $ALL_STAGES" >&2
    echo "| $stage | FAILED (unknown stage) | - | $(date -u +%FT%TZ) |" >> "$OUT/summary.md"
    return 2
  fi
  echo "##### $stage"
  start=$(date +%s)
  "stage_$stage" > >(tee "$OUT/$stage.log") 2>&1
  status=$?
  local minutes
  minutes=$(awk -v s="$start" -v e="$(date +%s)" 'BEGIN { printf "%.1f", (e - s) / 60 }')
  echo "| $stage | $([ $status -eq 0 ] && echo passed || echo "FAILED ($status)") | $minutes min | $(date -u +%FT%TZ) |" \
    >> "$OUT/summary.md"
  return $status
}

if [ ! -s "$OUT/summary.md" ]; then
  printf '| stage | status | time | finished |\n|---|---|---|---|\n' > "$OUT/summary.md"
fi
stages=("$@")
[ ${#stages[@]} -eq 0 ] && read -r -a stages <<< "$ALL_STAGES"
for stage in "${stages[@]}"; do
  run_stage "$stage" || failed=1
done
cat "$OUT/summary.md"
exit $failed
