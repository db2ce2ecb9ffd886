#!/usr/bin/env bash
# Downloads (and builds, where PyPI has no wheel) every wheel that a GPU machine with Python
# 3.12, a CUDA 13 build of torch, numpy, scipy, h5py, pyyaml, pillow and jinja2 but NO
# network needs to run `bash scripts/gpu_check.sh` (docs/gpu_check.md):
#
#   bash scripts/gpu_wheels.sh DIR            # all groups
#   bash scripts/gpu_wheels.sh DIR base dali  # only some: base | synth | dali | deepspeed | tests
#
# Groups (versions pinned to the ones checked with this package, FACTS.md):
#   base       galcf-hpc itself (built from this checkout) and FrEIA (an sdist on PyPI: built here)
#   synth      GalSim and what it imports (LSSTDESC.Coord, future, astropy, pyerfa, astropy-iers-data)
#   dali       nvidia-dali-cuda130 2.4.0 and the wheels it requires: nvimgcodec (with its [all]
#              extra: nvjpeg, nvjpeg2k, nvtiff, nvcomp), astunparse, gast, optree, nvtx, makefun,
#              libcst  (~270 MB: carry it in parts, docs/gpu_check.md)
#   deepspeed  deepspeed 0.19.8 (PyPI has only an sdist: built here into a py3-none-any wheel
#              with DS_BUILD_OPS=0, which needs torch importable here), hjson, pydantic 2 and its
#              parts, typing-extensions
#   tests      webdataset and braceexpand (the test suite's reference reader of the shards)
#
# Everything else they require (numpy, packaging, six, wheel, pyyaml, psutil, py-cpuinfo,
# einops, msgpack, ninja, tqdm, pybind11, setuptools, torch) is already on such a machine;
# on another one, `pip install --no-index --find-links DIR ...` names what is missing.
# Wheels are fetched for CPython 3.12 on x86-64 Linux (manylinux), whatever this machine is.
set -euo pipefail
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  usage
  exit 0
fi
if [ $# -lt 1 ]; then
  usage >&2
  exit 2
fi
DIR=$1
shift
GROUPS_WANTED=${*:-base synth dali deepspeed tests}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
PYVER=${GPU_WHEELS_PYTHON:-3.12}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)

download() {  # binary wheels for the GPU machine, no dependency resolution (all listed here)
  "$PY" -m pip download --quiet --only-binary=:all: --no-deps --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DIR" "$@"
}

build() {  # pure-Python projects that PyPI has as an sdist only (FrEIA 0.2): a py3-none-any wheel
  "$PY" -m pip wheel --quiet --no-deps --no-build-isolation --no-binary "${1%%==*}" -w "$DIR" "$1"
}

for group in $GROUPS_WANTED; do
  echo "gpu_wheels: $group" >&2
  case $group in
    base)
      "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DIR" "$ROOT"
      ls "$DIR"/[Ff][Rr][Ee][Ii][Aa]-0.2-*.whl >/dev/null 2>&1 || build FrEIA==0.2
      ;;
    synth)
      download galsim==2.8.5 LSSTDESC.Coord==1.3.1 future==1.0.0 astropy==8.0.2 pyerfa==2.0.1.5 \
        astropy-iers-data==0.2026.11.2.0.34.55
      ;;
    dali)
      download nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16 \
        nvidia-nvjpeg==13.3.2.43 nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82 \
        astunparse==1.6.3 gast==0.7.0 optree==0.20.0 nvtx==0.2.17 makefun==1.16.0 libcst==1.9.0
      ;;
    deepspeed)
      download hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \
        typing-inspection==0.4.2 typing-extensions==4.15.0
      if ! ls "$DIR"/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
        # sdist only on PyPI; its setup.py imports torch, so build without isolation (no CUDA
        # build of torch is pulled) and without compiled ops (DeepSpeed JIT-builds what it needs)
        "$PY" -c "import torch" 2>/dev/null || {
          echo "gpu_wheels: building the deepspeed wheel needs torch importable by $PY" >&2
          exit 1
        }
        DS_BUILD_OPS=0 build deepspeed==0.19.8
      fi
      ;;
    tests)
      download webdataset==1.0.2 braceexpand==0.1.7
      ;;
    *)
      echo "gpu_wheels: unknown group '$group' (base, synth, dali, deepspeed, tests)" >&2
      exit 2
      ;;
  esac
done
ls -l "$DIR"
du -sh "$DIR"
