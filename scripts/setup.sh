#!/usr/bin/env bash
# Installs galcf-hpc and everything its demo and tests need on a fresh CPU machine.
# torch is installed first, pinned to the CPU build this machine type carries, so that
# no dependency resolution can pull a multi-GB CUDA build. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
DS_BUILD_OPS=0 "$PY" -m pip install --quiet -e ".[dev,dali-cuda13,mpich,deepspeed]"
