#!/usr/bin/env bash
# Sets up, compile-checks the CUDA sources when nvcc is present, and runs the
# whole test suite (Triton kernels through the interpreter when there is no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
bash .ci/nvcc_check.sh
"$PY" -m pytest -q tests "$@"
