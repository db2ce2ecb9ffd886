#!/usr/bin/env bash
# Every GPU measurement the project owes, on one GPU, in one call (under 8 minutes):
#   bash scripts/gpu_check.sh [--out gpu_check_out] [--only CHECK,...] [--dry-run] [--help]
# The logic is benchmarks/gpu_check.py; this wrapper only picks the Python (PYTHON, else the
# repository's .venv/ if there is one, else python3) and runs it from the repository root.
# Exit codes: 0 all checks ran or were skipped with a reason, 1 a check failed or ran out
# of time, 2 no GPU or a usage error. Offline installation: docs/gpu_check.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
