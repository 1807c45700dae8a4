#!/usr/bin/env bash
# Installs fastcore_train the ways users do, each from a fresh venv, and checks the result:
#   1. sdist (isolated build: no torch there) -- it must hold every source (.cu included)
#   2. a wheel built from that sdist against the torch of .venv (--no-build-isolation)
#   3. that wheel in a fresh venv with the same torch: kernels in use, every op == reference
#   4. plain `pip install <sdist>` (build isolation): reference ops and one warning naming
#      `fastcore-train build`
#   5. FASTCORE_TRAIN_JIT=1 in two processes at once: one real build into the cache, both use it;
#      `fastcore-train build` then has nothing to do
# Uses .venv from `make test` (torch $TORCH_SPEC) to build the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
WORK=$(mktemp -d /tmp/ft-install.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export MAX_JOBS=${MAX_JOBS:-2}
stamp() { date +%s; }
say() { echo "install_check: $*"; }
# pip's notes about the local package index's missing folders are noise here
quiet_pip() { "$@" 2> >(grep -v "^WARNING: Location" >&2); }

t=$(stamp)
quiet_pip "$PY" -m pip install -q build
"$PY" -m build --sdist -o "$WORK/dist" . >"$WORK/sdist.log" 2>&1 || { cat "$WORK/sdist.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/*.tar.gz)
tar tzf "$SDIST" >"$WORK/sdist.txt"
for f in csrc/ops.cpp csrc/cuda/cross_entropy.cu csrc/cuda/optim.cu csrc/cuda/mixup.cu \
         csrc/cpu/kernels/vec_io.h LICENSE README.md tests/test_install.py; do
  grep -q "/$f\$" "$WORK/sdist.txt" || { say "sdist lacks $f"; exit 1; }
done
say "1. sdist OK ($(du -k "$SDIST" | cut -f1) KB, $(( $(stamp) - t )) s)"

t=$(stamp)
quiet_pip "$PY" -m pip wheel -q --no-build-isolation --no-deps "$SDIST" -w "$WORK/dist"
WHEEL=$(ls "$WORK"/dist/*.whl)
"$PY" - "$WHEEL" <<'PY'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
names = {i.filename: i.file_size for i in z.infolist()}
so = [n for n in names if n.startswith("fastcore_train/_C")]
assert so, "the wheel has no _C"
assert names[so[0]] < 5 * 2**20, f"_C is {names[so[0]] / 2**20:.1f} MB (debug info?)"
assert any(n.startswith("fastcore_train/_csrc/cuda/") for n in names), "no CUDA sources"
assert any(n.endswith("licenses/LICENSE") for n in names), "no LICENSE"
print(f"install_check: wheel has _C of {names[so[0]] / 2**20:.2f} MB")
PY
say "2. wheel OK ($(du -k "$WHEEL" | cut -f1) KB, built in $(( $(stamp) - t )) s)"

t=$(stamp)
python3 -m venv "$WORK/venv"
V=$WORK/venv/bin
quiet_pip "$V/pip" install -q "$TORCH_SPEC"
quiet_pip "$V/pip" install -q "$WHEEL"
cd "$WORK"   # never import the source tree
"$V/python" "$ROOT/.ci/install_smoke.py"
"$V/fastcore-train" info | tee "$WORK/info.txt"
grep -q "^built against *torch $("$V/python" -c 'import torch; print(torch.__version__)')" \
  "$WORK/info.txt" || { say "info lacks 'built against torch'"; exit 1; }
say "3. wheel in a fresh venv OK ($(( $(stamp) - t )) s with the venv)"

t=$(stamp)
quiet_pip "$V/pip" install -q --force-reinstall --no-deps "$SDIST"
"$V/python" -W always -c "import fastcore_train as ft; assert ft.backend() == 'reference'" \
  2>"$WORK/warn.txt"
grep -q "fastcore-train build" "$WORK/warn.txt" || { cat "$WORK/warn.txt"; exit 1; }
[[ $(grep -c "ExtensionUnavailableWarning" "$WORK/warn.txt") == 1 ]] || { cat "$WORK/warn.txt"; exit 1; }
say "4. pip install <sdist> with build isolation: reference ops + one warning ($(( $(stamp) - t )) s)"

t=$(stamp)
export TORCH_EXTENSIONS_DIR=$WORK/ext
probe='import fastcore_train as ft; assert ft.backend() == "extension", ft.backend_reason()'
FASTCORE_TRAIN_JIT=1 "$V/python" -c "$probe" >"$WORK/jit1.log" 2>&1 &
p1=$!
sleep 2
FASTCORE_TRAIN_JIT=1 "$V/python" -c "$probe" >"$WORK/jit2.log" 2>&1 &
p2=$!
wait $p1 || { cat "$WORK/jit1.log"; exit 1; }
wait $p2 || { cat "$WORK/jit2.log"; exit 1; }
n=$(cat "$WORK"/jit*.log | grep -c "building the kernels for torch" || true)
[[ $n == 1 ]] || { say "expected one build, saw $n"; cat "$WORK"/jit*.log; exit 1; }
grep -q "waiting for process" "$WORK/jit2.log" || { cat "$WORK/jit2.log"; exit 1; }
"$V/python" "$ROOT/.ci/install_smoke.py"
"$V/fastcore-train" build | grep -q "already built and in use"
say "5. JIT build at import (two processes, one build) OK ($(( $(stamp) - t )) s)"
