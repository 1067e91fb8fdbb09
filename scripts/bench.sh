#!/usr/bin/env bash
# Sets up and runs the benchmark suite: a table on stdout, CSV and PNG in bench_out/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
"$PY" -m robustdrop bench "$@"
