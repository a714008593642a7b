#!/usr/bin/env bash
# The one-shot GPU check (issue 23; docs/gpu-check.md). On a GPU machine, from the repository root:
#
#     bash benchmarks/gpu_check.sh                      # every stage, ~6-8 minutes on an H100
#     bash benchmarks/gpu_check.sh --device cpu --tiny  # the same pipeline on a CPU (a dry run)
#
#     bash benchmarks/gpu_check.sh --fetch-wheels       # HERE, before: the pure-Python packages the GPU
#                                                       # image lacks, as wheels in ./.whl (carry it)
#
# Other arguments go to benchmarks/gpu_check.py (--stages, --budget-s, --out). Outputs in $OUT when
# set, else ./gpu_out. Python wheels in ./.whl (see docs/gpu-check.md) are installed first, without
# network, into a private folder; a package that is still missing is named and its checks SKIPPED.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
# what the GPU image lacks (/work/.library/device/KINDS.md lists what it has): BackPACK for the exact
# curvature diagonals, Cockpit for the side-by-side timing, and what they need beyond the image
WHEELS="backpack-for-pytorch==1.7.1 unfoldNd==0.2.3 cockpit-for-pytorch==1.0.2 json-tricks==3.17.3"
if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p .whl
  exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl $WHEELS
fi
OUT_DIR="${OUT:-$ROOT/gpu_out}"
prev=""
for a in "$@"; do  # an explicit --out wins, for the log too
  case "$a" in --out=*) OUT_DIR="${a#--out=}" ;; esac
  [ "$prev" = "--out" ] && OUT_DIR="$a"
  prev="$a"
done
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
PY="$(command -v python3 || command -v python)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export CUBLAS_WORKSPACE_CONFIG=:4096:8   # deterministic cuBLAS (set before CUDA starts)
{
  echo "[$(date -u +%H:%M:%S)] gpu_check.sh in $ROOT, python $PY, output $OUT_DIR"
  if [ -z "$PY" ]; then echo "MISSING: no python3 on PATH"; exit 2; fi
  if ls .whl/*.whl >/dev/null 2>&1; then
    SITE="${TMPDIR:-/tmp}/gpu_check_site"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
      export PYTHONPATH="$PYTHONPATH:$SITE"
      echo "installed from .whl: $(ls .whl | tr '\n' ' ')"
    else
      echo "MISSING: the wheels in .whl did not install; carrying on without them"
    fi
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    || echo "no nvidia-smi on PATH"
  "$PY" "$ROOT/benchmarks/gpu_check.py" --out "$OUT_DIR" "$@"
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
