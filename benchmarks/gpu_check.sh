#!/usr/bin/env bash
# The GPU check, sized for a short lease on a machine with an NVIDIA GPU (written for an H100/H200):
# build (or take a prebuilt) CUDA extension, run the test suite on CUDA and compute-sanitizer
# (memcheck, then racecheck) over each op's CUDA tests at the same time, then the benchmarks (float32,
# the model-level ones, bfloat16), all within GPU_CHECK_SECONDS. Every log and table goes to one folder.
#
#   bash benchmarks/gpu_check.sh                    # every stage, in order, within the time budget
#   bash benchmarks/gpu_check.sh build test         # the stages named, in the order given
#   GPU_CHECK_SECONDS=240 bash benchmarks/gpu_check.sh build bench-fp32
#   bash benchmarks/gpu_check.sh prebuild           # on the CPU machine, before the lease (below)
#
# Stages:
#   info          nvidia-smi, nvcc, compute-sanitizer, versions, robustdrop's view of its backends
#   build         the extension with CUDA kernels for sm_90 in place (python/robustdrop/_C*.so): copied
#                 from .gpu_prebuilt/ when that was built from these sources for this Python and torch,
#                 else compiled here; each kernel's registers, shared memory and stack in resources.txt
#   verify        test and sanitize at the same time (both check correctness; neither is timed)
#   test          the whole test suite on CUDA (ROBUSTDROP_TEST_DEVICES=cuda: CI runs the CPU side),
#                 pytest-xdist with GPU_CHECK_WORKERS workers when installed
#   sanitize      compute-sanitizer memcheck, then racecheck, each once over every op's tests on CUDA,
#                 the caching allocator off so every out-of-bounds access leaves its own allocation
#   bench-fp32    python -m robustdrop bench, float32, every op (bench-fp32/bench_cuda.{md,csv,png}); the
#                 torch.compile anchor only with GPU_CHECK_COMPILE=1 (its compiles take minutes)
#   bench-models  bench-subnets (EWS's batched subnets), then bench-steps (Active DropBlock's step)
#   bench-bf16    the op benchmarks in bfloat16
#   prebuild      (no GPU needed) builds .gpu_prebuilt/ for the device image's Python and torch
#                 (PREBUILD_PYTHON_VERSION, default 3.12, or PREBUILD_PYTHON; PREBUILD_TORCH, default
#                 2.11.0, a CUDA build from PyPI installed once into build/gpu_prebuild/venv), so that
#                 `build` takes seconds
#   prebuild-test (no GPU needed, after prebuild) the whole test suite on this machine's CPU under the
#                 prebuild's Python, torch and Triton, the device image's versions: what those versions
#                 break fails here, before the lease (about 20 minutes on 2 cores)
#
# Time: the run stops starting stages GPU_CHECK_SECONDS (default 450; 0: no limit) after it began;
# each stage runs under `timeout` for at most its own cap (STAGE_CAPS below) and what is left, and a
# stage with under MIN_STAGE_SECONDS (20) left is skipped; prebuild has no limit. A stage stopped at
# its limit keeps what it wrote: the tests append each outcome to test_outcomes.txt
# (sanitize-<tool>_outcomes.txt) as they finish, and the benchmarks rewrite their tables after
# each case.
#
# Each stage writes <out>/<stage>.log and appends its status and minutes to <out>/summary.md; the
# run ends by writing <out>/results.md (the summary, test and sanitizer counts, and every benchmark
# table under the device, commit and date: what benchmarks/results/<device>.md records) and exits
# non-zero if any stage failed, was stopped or was skipped. The folder defaults to gpu_check_out/
# (git-ignored).
# On a copy of the checkout without .git, set ROBUSTDROP_GIT_COMMIT so the tables name their commit.
#
# Through the device tool (benchmarks/README.md), with .gpu_prebuilt carried and COMMIT the short hash
# of the checkout (the copy there may have no .git):
#   ROBUSTDROP_GIT_COMMIT=COMMIT bash benchmarks/gpu_check.sh; tar czf $OUT/gpu_check.tgz gpu_check_out; cp gpu_check_out/results.md $OUT/
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT_DIR=${GPU_CHECK_OUT:-gpu_check_out}
WORKERS=${GPU_CHECK_WORKERS:-8}
BUDGET_SECONDS=${GPU_CHECK_SECONDS:-450}
PREBUILT=.gpu_prebuilt
OPS="block_mask cam_mask feature_density fixed_mask channel_gate kl_distill philox"
# Under the sanitizer: no torch.compile (Inductor's own compiles dominate), no statistics over
# many draws, no opcheck (it compiles too) and no reference-backend cases (torch's own kernels).
SANITIZE_SELECTION="not compile and not statistics and not opcheck and not each_channel_is_dropped and not reference]"
ALL_STAGES="info build verify bench-fp32 bench-models bench-bf16"
# The most seconds each stage may take (the budget may leave less).
declare -A STAGE_CAPS=([info]=60 [build]=300 [verify]=210 [test]=210 [sanitize]=210 [bench-fp32]=150
                       [bench-models]=60 [bench-bf16]=90)
MIN_STAGE_SECONDS=20

mkdir -p "$OUT_DIR"
# compute-sanitizer and cuobjdump live in the toolkit's bin, which need not be on the PATH.
[ -d /usr/local/cuda/bin ] && export PATH="$PATH:/usr/local/cuda/bin"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
RUN_START=$(date +%s)
failed=0

# A stage's deadline (epoch seconds; 0: none): the earliest of its cap from now, the end of the run's
# budget and the deadline of the stage it runs inside (verify's test and sanitize).
stage_deadline() {  # STAGE ENCLOSING_DEADLINE
  local cap=${STAGE_CAPS[$1]:-0} deadline=$2 limit
  # prebuild runs on the CPU machine before the lease: no lease budget applies.
  case $1 in prebuild*) echo 0; return ;; esac
  for limit in $([ "$cap" -gt 0 ] && echo $(($(date +%s) + cap))) \
               $([ "$BUDGET_SECONDS" -gt 0 ] && echo $((RUN_START + BUDGET_SECONDS))); do
    if [ "$deadline" -eq 0 ] || [ "$limit" -lt "$deadline" ]; then deadline=$limit; fi
  done
  echo "$deadline"
}

# until_deadline CMD...: CMD under `timeout` until the current stage's deadline (its whole process
# group, xdist workers included), or as is when the stage has none. Exit 124 when stopped.
until_deadline() {
  [ "${STAGE_DEADLINE:-0}" -eq 0 ] && { "$@"; return; }
  local seconds=$((STAGE_DEADLINE - $(date +%s)))
  [ "$seconds" -gt 0 ] || return 124
  timeout --kill-after=10 "$seconds" "$@"
}

have_cuda_extension() {
  until_deadline "$PY" -c "import sys, robustdrop; sys.exit(0 if robustdrop.backends()['cuda'].available else 1)" 2>/dev/null
}

# What a build of the extension depends on: its sources, Python's minor version and torch's version.
# `prebuild` stores it beside the build; `build` takes the prebuilt extension only when it matches.
sources_stamp() {
  local python=$1
  {
    find csrc setup.py -type f | LC_ALL=C sort | xargs sha256sum
    "$python" -c "import sys, torch; print(sys.version_info[:2], torch.__version__, torch.version.cuda)"
  } | sha256sum | cut -d' ' -f1
}

# The commit the tables name: ROBUSTDROP_GIT_COMMIT, else the checkout's.
commit_name() {
  echo "${ROBUSTDROP_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
}

versions() {
  until_deadline "$PY" -c "import torch, triton; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), Triton {triton.__version__}')"
}

# Every command under the stage's deadline: one that hangs must not take the run's remaining time (and
# with it the tar of the results that follows the script).
stage_info() {
  until_deadline nvidia-smi || return 1
  until_deadline nvcc --version || return 1
  until_deadline compute-sanitizer --version || return 1
  versions || return 1
  until_deadline "$PY" -m robustdrop info || return 1
  echo "commit: $(commit_name)"
}

report_backends() {
  until_deadline "$PY" -c "
import robustdrop
status = robustdrop.backends()
for name, s in status.items():
    print(f'{name:10s} {\"available\" if s.available else \"unavailable: \" + s.reason}')
raise SystemExit(0 if status['cuda'].available and status['triton'].available else 1)"
}

take_prebuilt() {
  [ -f "$PREBUILT/STAMP" ] || { echo "no $PREBUILT/: compiling here"; return 1; }
  if [ "$(cat "$PREBUILT/STAMP")" != "$(sources_stamp "$PY")" ]; then
    echo "$PREBUILT/ was built from other sources, or for another Python or torch: compiling here"
    return 1
  fi
  cp "$PREBUILT"/robustdrop/_C*.so python/robustdrop/ || return 1
  echo "took the prebuilt extension from $PREBUILT/"
  report_backends && return 0
  echo "the prebuilt extension does not work here: compiling here"
  rm -f python/robustdrop/_C*.so
  return 1
}

# torch takes CUDA_HOME from nvcc's folder (/usr/local for /usr/local/bin/nvcc), but the toolkit's
# libraries (libcudart, which the extension links) may be elsewhere: CUDA_HOME, unless set, is the
# first of nvcc's resolved folder and /usr/local/cuda that has them.
set_cuda_home() {
  local home
  [ -n "${CUDA_HOME:-}" ] && return
  for home in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")" /usr/local/cuda; do
    if [ -e "$home/lib64/libcudart.so" ]; then export CUDA_HOME=$home; return; fi
  done
}

stage_build() {
  if ! take_prebuilt; then
    set_cuda_home
    FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      until_deadline "$PY" setup.py build_ext --inplace || return
    report_backends || return 1
  fi
  until_deadline cuobjdump --dump-resource-usage python/robustdrop/_C*.so > "$OUT_DIR/resources.txt" || return 1
  echo "kernel resources: $OUT_DIR/resources.txt"
}

# The Python of the device image's minor version (PREBUILD_PYTHON_VERSION, default 3.12): PREBUILD_PYTHON,
# else pythonX.Y on the PATH, else one installed by pyenv.
prebuild_python() {
  local version=${PREBUILD_PYTHON_VERSION:-3.12} candidate candidates
  if [ -n "${PREBUILD_PYTHON:-}" ]; then
    candidates=("$PREBUILD_PYTHON")
  else
    candidates=("python$version")
    command -v pyenv >/dev/null && candidates+=("$(pyenv root)"/versions/"$version".*/bin/python)
  fi
  for candidate in "${candidates[@]}"; do
    if "$candidate" -c "import sys; sys.exit(f'{sys.version_info[0]}.{sys.version_info[1]}' != '$version')" 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "no Python $version found (tried ${candidates[*]}): set PREBUILD_PYTHON" >&2
  return 1
}

stage_prebuild() {
  local venv=build/gpu_prebuild/venv torch_version=${PREBUILD_TORCH:-2.11.0} python
  if [ ! -x "$venv/bin/python" ]; then
    python=$(prebuild_python) || return 1
    "$python" -m venv "$venv" || return 1
  fi
  if ! "$venv/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" 2>/dev/null; then
    "$venv/bin/python" -m pip install --quiet "torch==$torch_version" ninja setuptools numpy || return 1
  fi
  set_cuda_home
  rm -rf "$PREBUILT"
  FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" "$venv/bin/python" setup.py build_ext \
    --build-lib "$PREBUILT" --build-temp build/gpu_prebuild/temp || return 1
  # The host code's debug information is most of the file (33 of 40 MB); the kernels keep their line info.
  strip --strip-debug "$PREBUILT"/robustdrop/_C*.so || return 1
  # The CUDA kernels must have registered; loading needs no GPU.
  "$venv/bin/python" -c "
import glob, sys, torch
torch.ops.load_library(glob.glob('$PREBUILT/robustdrop/_C*.so')[0])
sys.exit(0 if torch._C._dispatch_has_kernel_for_dispatch_key('robustdrop::block_mask_forward', 'CUDA') else 1)" \
    || return 1
  sources_stamp "$venv/bin/python" > "$PREBUILT/STAMP"
  ls -l "$PREBUILT"/robustdrop/
  echo "carry $PREBUILT to the device machine; its build stage takes it while the sources stay as they are"
}

stage_prebuild-test() {
  local venv=build/gpu_prebuild/venv
  if [ ! -f "$PREBUILT/STAMP" ] || [ "$(cat "$PREBUILT/STAMP")" != "$(sources_stamp "$venv/bin/python")" ]; then
    echo "no $PREBUILT/ built from these sources: run the prebuild stage first"
    return 1
  fi
  # The suite's own packages. NumPy under 2.4: Triton 3.6's interpreter, which runs the triton tests on
  # the CPU, turns one-element arrays into Python ints, and NumPy 2.4 refuses that ("only 0-dimensional
  # arrays can be converted to Python scalars"). On a GPU the kernels are compiled and NumPy plays no part.
  "$venv/bin/python" -m pip install --quiet pytest matplotlib scikit-learn onnxscript onnxruntime "numpy<2.4" || return 1
  cp "$PREBUILT"/robustdrop/_C*.so python/robustdrop/ || return 1
  "$venv/bin/python" -c "import torch, triton; print(f'torch {torch.__version__}, Triton {triton.__version__}')"
  "$venv/bin/python" -m pytest -q -p no:cacheprovider -rfEx tests
}

ensure_built() {
  have_cuda_extension || stage_build
}

# run_pytest OUTCOMES ARGS...: pytest on CUDA tensors only, each outcome appended to OUTCOMES.
run_pytest() {
  local outcomes=$1
  shift
  : > "$outcomes"
  ROBUSTDROP_TEST_DEVICES=cuda ROBUSTDROP_TEST_OUTCOMES="$outcomes" "$@" -q -p no:cacheprovider -rfEs
}

stage_test() {
  ensure_built || return 1
  local parallel=()
  if "$PY" -c "import xdist" 2>/dev/null && [ "$WORKERS" -gt 1 ]; then
    parallel=(-n "$WORKERS")
  fi
  # One compile thread per worker: each xdist worker would otherwise start a pool of Inductor
  # compile processes as large as the machine, for the few small graphs of the compile tests.
  TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-1} \
    run_pytest "$OUT_DIR/test_outcomes.txt" until_deadline "$PY" -m pytest \
    --durations=25 "${parallel[@]}" --junitxml="$OUT_DIR/test.xml" tests
}

stage_sanitize() {
  ensure_built || return 1
  local status=0 tool files=()
  for op in $OPS; do files+=("tests/test_$op.py"); done
  for tool in memcheck racecheck; do
    echo "=== compute-sanitizer --tool $tool: ${files[*]}"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_pytest "$OUT_DIR/sanitize-${tool}_outcomes.txt" \
      until_deadline compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 50 \
      "$PY" -m pytest "${files[@]}" -k "$SANITIZE_SELECTION"
    local tool_status=$?
    [ "$tool_status" -ne 0 ] && status=$tool_status
  done
  return $status
}

# test and sanitize side by side, each into its own log; the status of the worse.
stage_verify() {
  local test_status=0 sanitize_status=0
  ensure_built || return 1
  run_stage test &
  local test_pid=$!
  run_stage sanitize > /dev/null
  sanitize_status=$?
  wait "$test_pid" || test_status=$?
  tail -n 30 "$OUT_DIR/sanitize.log"
  [ "$test_status" -ne 0 ] && return "$test_status"
  return "$sanitize_status"
}

bench_ops() {
  ensure_built || return 1
  local compile=--no-compile
  [ "${GPU_CHECK_COMPILE:-0}" = 1 ] && compile=--compile
  until_deadline "$PY" -m robustdrop bench --device cuda --dtype "$1" \
    --repeats "${GPU_CHECK_REPEATS:-50}" --budget "${GPU_CHECK_BUDGET:-2}" $compile --out "$OUT_DIR/bench-$2"
}

stage_bench-fp32() { bench_ops float32 fp32; }
stage_bench-bf16() { bench_ops bfloat16 bf16; }

# bench-subnets first (issue 6's batched-against-sequential target), and bench-steps whatever it gave; the
# stage's status is the worse of the two (124, stopped, over a failure).
stage_bench-models() {
  ensure_built || return 1
  local subnets steps
  until_deadline "$PY" -m robustdrop bench-subnets --device cuda --out "$OUT_DIR/bench-models"
  subnets=$?
  until_deadline "$PY" -m robustdrop bench-steps --device cuda --out "$OUT_DIR/bench-models"
  steps=$?
  if [ "$subnets" -eq 124 ] || [ "$steps" -eq 124 ]; then return 124; fi
  [ "$subnets" -ne 0 ] && return "$subnets"
  return "$steps"
}

record() {  # STAGE STATUS START
  local minutes
  minutes=$(awk -v s="$3" -v e="$(date +%s)" 'BEGIN { printf "%.1f", (e - s) / 60 }')
  echo "| $1 | $2 | $minutes min | $(date -u +%FT%TZ) |" >> "$OUT_DIR/summary.md"
}

run_stage() {
  local stage=$1 start status left
  if ! declare -F "stage_$stage" >/dev/null; then
    echo "unknown stage '$stage'; stages: $ALL_STAGES test sanitize prebuild prebuild-test" >&2
    echo "| $stage | FAILED (unknown stage) | - | $(date -u +%FT%TZ) |" >> "$OUT_DIR/summary.md"
    return 2
  fi
  # Dynamic scope: the stage's commands (and a stage run inside it) see this stage's deadline.
  local enclosing=${STAGE_DEADLINE:-0}
  local STAGE_DEADLINE
  STAGE_DEADLINE=$(stage_deadline "$stage" "$enclosing")
  start=$(date +%s)
  left=$((STAGE_DEADLINE - start))
  if [ "$STAGE_DEADLINE" -gt 0 ] && [ "$left" -lt "$MIN_STAGE_SECONDS" ]; then
    echo "##### $stage: skipped, ${left}s left"
    record "$stage" "SKIPPED (no time left)" "$start"
    return 3
  fi
  echo "##### $stage ($([ "$STAGE_DEADLINE" -gt 0 ] && echo "at most ${left}s" || echo "no time limit"))"
  "stage_$stage" > >(tee "$OUT_DIR/$stage.log") 2>&1
  status=$?
  case $status in
    0) record "$stage" passed "$start" ;;
    124|137) record "$stage" "STOPPED at its time limit" "$start" ;;
    *) record "$stage" "FAILED ($status)" "$start" ;;
  esac
  return $status
}

# results.md: what benchmarks/results/<device>.md records.
write_results() {
  local results=$OUT_DIR/results.md name
  {
    echo "# robustdrop GPU check: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
    echo
    echo "- commit \`$(commit_name)\`, $(date -u +%FT%TZ)"
    echo "- $(versions 2>/dev/null)"
    echo "- \`bash benchmarks/gpu_check.sh $*\` within ${BUDGET_SECONDS}s (0: no limit)"
    echo
    cat "$OUT_DIR/summary.md"
    for name in test sanitize-memcheck sanitize-racecheck; do
      [ -f "$OUT_DIR/${name}_outcomes.txt" ] || continue
      echo
      echo "$name: $(cut -d' ' -f1 "$OUT_DIR/${name}_outcomes.txt" | sort | uniq -c | awk '{print $1, $2}' | paste -sd, - | sed 's/,/, /g')"
      grep -v "^passed \|^skipped " "$OUT_DIR/${name}_outcomes.txt" | head -n 40 | sed 's/^/    /'
    done
    for name in bench-fp32/bench_cuda bench-bf16/bench_cuda bench-models/steps_cuda bench-models/subnets_cuda; do
      [ -f "$OUT_DIR/$name.md" ] || continue
      echo
      echo "## $name"
      echo
      sed 's/^#/###/' "$OUT_DIR/$name.md"  # its headings under this one
    done
  } > "$results"
  echo "wrote $results"
}

if [ ! -s "$OUT_DIR/summary.md" ]; then
  printf '| stage | status | time | finished |\n|---|---|---|---|\n' > "$OUT_DIR/summary.md"
fi
stages=("$@")
[ ${#stages[@]} -eq 0 ] && read -r -a stages <<< "$ALL_STAGES"
for stage in "${stages[@]}"; do
  run_stage "$stage" || failed=1
done
# The prebuild stages run on the CPU machine: alone, they have no GPU results to write.
for stage in "${stages[@]}"; do
  case $stage in
    prebuild*) ;;
    *) write_results "${stages[@]}"; break ;;
  esac
done
cat "$OUT_DIR/summary.md"
exit $failed
