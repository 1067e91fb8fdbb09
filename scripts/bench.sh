#!/usr/bin/env bash
# Sets up and runs the benchmark suite: the op table (CSV and PNG), the Active DropBlock
# training-step table and the EWS batched-subnet table, on stdout and as CSV and Markdown
# in bench_out/. Arguments go to the op benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
"$PY" -m robustdrop bench "$@"
"$PY" -m robustdrop bench-steps
"$PY" -m robustdrop bench-subnets
