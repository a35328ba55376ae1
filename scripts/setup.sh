#!/usr/bin/env bash
# Create .venv and install lmforge with its test extras.
# With no NVIDIA GPU present, pin the CPU build of torch (a plain `torch` pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q "torch>=2.9"
  else
    python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch>=2.9"
  fi
fi
python -m pip install -q -e ".[${LMFORGE_EXTRAS:-dev}]"
