#!/usr/bin/env bash
# `make gpu-check`: everything only a GPU can prove, in one command sized for a short lease
# (about 8 minutes on one H200): build the CUDA extension for the GPU in the machine (sm_90 on an
# H100/H200) against the machine's torch, run the CUDA tests, then the whole suite, then the GPU
# benchmarks (each op against torch eager, torch.compile and the peers installed there), with the
# device's copy bandwidth measured in the same run. Writes benchmarks/results/cuda.md, and copies
# the report and the logs to $OUT when it is set (the device tool brings those back).
# Without a visible GPU it says so in one line and exits 0.
#
#   GPU_PYTHON      the interpreter whose torch has CUDA (default python3)
#   GPU_CHECK_QUICK=1  the CUDA tests and the headline benchmark cases only
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON:-python3}
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu-check: no CUDA GPU visible to $PY (torch with CUDA and a GPU are needed); nothing to do"
  exit 0
fi
export PYTHONUNBUFFERED=1
RES=benchmarks/results
mkdir -p "$RES"
LOG=$RES/gpu_check.log
: >"$LOG"
say() { echo "gpu-check: $*" | tee -a "$LOG"; }
# Copies what exists so far to $OUT after every stage: a run killed at the device tool's limit
# still brings back the logs of the stages it finished.
save() {
  [[ -n "${OUT:-}" ]] || return 0
  for f in cuda.md gpu_check.log pytest_cuda.log pytest_all.log; do
    [[ -f "$RES/$f" ]] && cp "$RES/$f" "$OUT/"
  done
  return 0
}
status=0
t0=$(date +%s)
"$PY" - <<'PY' | tee -a "$LOG"
import torch
p = torch.cuda.get_device_properties(0)
print(f"gpu-check: {torch.cuda.get_device_name(0)}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
      f"torch {torch.__version__} (CUDA {torch.version.cuda})")
PY

# 1. build, for the GPU in the machine only (a fat binary would triple the nvcc time)
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(0); print(f'{a}.{b}')")
fi
export TORCH_CUDA_ARCH_LIST
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
say "building for sm $TORCH_CUDA_ARCH_LIST with $MAX_JOBS jobs"
if ! timeout 200 "$PY" setup.py -q build_ext --inplace --build-temp build/gpu >>"$LOG" 2>&1; then
  tail -40 "$LOG"
  say "FAILED: the build (log: $LOG)"
  save
  exit 1
fi
"$PY" -c "
import fastcore_train as ft
from fastcore_train import _backend
assert ft.backend() == 'extension', ft.backend_reason()
assert _backend._C.compiled_with_cuda(), 'the extension was built without CUDA'
print('gpu-check: built;', _backend.built_against())" 2>&1 | tee -a "$LOG" || status=1
say "build done in $(( $(date +%s) - t0 )) s"
save

# 2. the CUDA tests, then the whole suite (CPU tests too, under this machine's torch). Several
# pytest workers share the GPU when pytest-xdist is there (the image has it). The stage limits
# add up to under 9 minutes, so one device call of 600 s holds the worst case.
xdist() { "$PY" -c "import xdist" 2>/dev/null && echo "-n $1"; }
t1=$(date +%s)
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests -rfE $(xdist 4) \
  --junitxml="$RES/pytest_cuda.xml" >"$RES/pytest_cuda.log" 2>&1
rc=$?; tail -25 "$RES/pytest_cuda.log"; [[ $rc == 0 ]] || { status=1; say "CUDA tests: exit $rc"; }
say "CUDA tests done in $(( $(date +%s) - t1 )) s"
save
if [[ "${GPU_CHECK_QUICK:-0}" != 1 ]]; then
  t1=$(date +%s)
  timeout 90 "$PY" -m pytest -q -p no:cacheprovider -m "not cuda" tests $(xdist 8) -rfE \
    >"$RES/pytest_all.log" 2>&1
  rc=$?; tail -8 "$RES/pytest_all.log"; [[ $rc == 0 ]] || { status=1; say "whole suite: exit $rc"; }
  say "whole suite done in $(( $(date +%s) - t1 )) s"
  save
fi

# 3. benchmarks, with the copy bandwidth of this run
t1=$(date +%s)
timeout 150 "$PY" benchmarks/gpu_report.py --out "$RES/cuda.md" \
  $([[ "${GPU_CHECK_QUICK:-0}" == 1 ]] && echo --quick) 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}; [[ $rc == 0 ]] || { status=1; say "benchmarks: exit $rc"; }
say "benchmarks done in $(( $(date +%s) - t1 )) s; total $(( $(date +%s) - t0 )) s"
save
exit $status
