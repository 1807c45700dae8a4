#!/usr/bin/env bash
# Builds the CPU extension with ASan + UBSan through CMakeLists.txt and runs the op tests
# against it (extension backend only). Any sanitizer report fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$PWD/.venv/bin/python}
BUILD=build/asan
cmake -S . -B "$BUILD" -DFT_PYTHON="$PY" -DFT_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$BUILD" -j "${MAX_JOBS:-2}"

# A copy of the package whose _C is the sanitized build.
PKG=$BUILD/pkg
rm -rf "$PKG" && mkdir -p "$PKG"
cp -r fastcore_train "$PKG/"
rm -f "$PKG"/fastcore_train/_C*.so
cp "$BUILD"/_C*.so "$PKG/fastcore_train/"

# The ASan runtime must come first in a non-instrumented python.
export LD_PRELOAD="$(g++ -print-file-name=libasan.so):$(g++ -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:halt_on_error=1:detect_odr_violation=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export FASTCORE_TRAIN_BACKEND=extension
# Run from inside the copy: python puts the working directory first on sys.path, and the
# source tree's own fastcore_train (with the regular _C) must not win.
ROOT=$PWD
TESTS=${SANITIZE_TESTS:-tests/test_cross_entropy.py tests/test_optim.py tests/test_amp.py}
cd "$PKG"
"$PY" -c "
from fastcore_train import _backend
assert '/build/asan/' in _backend._C.__file__, _backend._C.__file__
print('sanitize: testing', _backend._C.__file__)"
"$PY" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" -k "not reference" \
  $(for t in $TESTS; do echo "$ROOT/$t"; done) -x
