#!/usr/bin/env bash
# Installs what robustdrop needs and builds its extension; safe to run again.
# Uses the torch already installed; with none, installs torch==2.13.0 (the CPU
# build on CPU-only machines). Install a CUDA torch first to get CUDA kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
missing=()
# onnxscript and onnxruntime: the ONNX export tests (torch.onnx.export and running its program).
for module in ninja pytest numpy matplotlib triton onnxscript onnxruntime; do
  "$PY" -c "import $module" 2>/dev/null || missing+=("$module")
done
# scikit-learn (the robustness experiment's digits) imports as sklearn.
"$PY" -c "import sklearn" 2>/dev/null || missing+=("scikit-learn")
if [ ${#missing[@]} -gt 0 ]; then
  "$PY" -m pip install --quiet "${missing[@]}"
fi
"$PY" -m pip install --quiet --no-build-isolation -e .
