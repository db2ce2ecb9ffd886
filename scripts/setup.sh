#!/usr/bin/env bash
# Installs galcf-hpc and everything its demo and tests need on a fresh CPU machine.
# torch is installed first, pinned to the CPU build this machine type carries, so that
# no dependency resolution can pull a multi-GB CUDA build. Idempotent.
#
# A distribution's own Python (Debian 12, Ubuntu 24.04: PEP 668 "externally managed")
# refuses pip installs outside a virtual environment: then everything goes into .venv/ of
# the repository, and `. scripts/activate` (as in the README's commands) puts it on PATH.
# A pyenv, conda or already active virtual-environment Python is used as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if "$PY" -c 'import os, sys, sysconfig
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(0 if managed and sys.prefix == sys.base_prefix else 1)'; then
  if [ ! -x .venv/bin/python ]; then
    echo "setup.sh: $(command -v "$PY") is a distribution Python (PEP 668): installing into .venv/" >&2
    "$PY" -m venv .venv || {
      echo "setup.sh: could not create .venv/ (Debian/Ubuntu: apt-get install python3-venv, then rerun)" >&2
      exit 1
    }
  fi
  PY=.venv/bin/python
  "$PY" -m pip install --quiet --upgrade pip
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
DS_BUILD_OPS=0 "$PY" -m pip install --quiet -e ".[dev,dali-cuda13,mpich,deepspeed]"
