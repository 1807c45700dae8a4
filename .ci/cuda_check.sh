#!/usr/bin/env bash
# Compile-checks csrc/cuda/*.cu without a GPU: a separate venv with a CUDA build of torch,
# a build of the extension with nvcc for sm_90 (H100), an import, and a check that every
# operator has a CUDA kernel registered. A .cu that does not compile fails this script.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${CUDA_VENV:-.venv-cuda}
TORCH_CUDA_SPEC=${TORCH_CUDA_SPEC:-torch==2.14.1}
BUILD=${CUDA_BUILD_DIR:-build/cuda}

# The nvcc on PATH may be a wrapper script whose folder is not the toolkit root; CUDA_HOME must
# be the root (it holds lib64/libcudart and include/).
if [[ -z "${CUDA_HOME:-}" ]]; then
  nvcc_path=$(command -v nvcc || true)
  if [[ -z "$nvcc_path" ]]; then echo "cuda_check: nvcc not found" >&2; exit 1; fi
  real=$(grep -o '/[^ ]*/bin/nvcc' "$nvcc_path" | head -1 || true)
  [[ -n "$real" ]] || real=$(readlink -f "$nvcc_path")
  CUDA_HOME=$(dirname "$(dirname "$real")")
fi
export CUDA_HOME
echo "cuda_check: CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -1))"

if [[ ! -f "$VENV/.deps" ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH_CUDA_SPEC" numpy pybind11 ninja "setuptools>=77" wheel
  touch "$VENV/.deps"
fi

# Without a GPU and without TORCH_CUDA_ARCH_LIST, torch's own default crashes (IndexError in
# _get_cuda_arch_flags); the build must pick its documented list instead. Checked without
# compiling for all of them (CI builds sm_90 only, below).
env -u TORCH_CUDA_ARCH_LIST "$VENV/bin/python" - <<'PY'
import importlib.util, os
import torch
from torch.utils.cpp_extension import _get_cuda_arch_flags
spec = importlib.util.spec_from_file_location("b", "fastcore_train/_build.py")
b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
if torch.cuda.is_available():
    print("cuda_check: a GPU is visible; the no-GPU arch default is not exercised here")
else:
    archs = b.cuda_arch_list()
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    flags = _get_cuda_arch_flags()
    assert any("sm_90" in f for f in flags) and any(f.endswith("code=compute_120") for f in flags), flags
    print(f"cuda_check: no GPU, no TORCH_CUDA_ARCH_LIST -> {archs}")
PY

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
PY=$(cd "$VENV" && pwd)/bin/python
rm -rf "$BUILD/lib"
# Its own build-temp: objects built against this torch must never meet the CPU build's.
"$PY" setup.py -q build --build-base "$BUILD" --build-lib "$BUILD/lib" \
  build_ext --build-temp "$BUILD/temp"

# Import the CUDA build (no GPU needed) from outside the source tree.
cd "$BUILD/lib"
"$PY" - <<'PY'
import torch, fastcore_train
from fastcore_train import _backend
assert _backend.extension_loaded(), _backend.backend_reason()
assert _backend._C.compiled_with_cuda(), "extension built without CUDA"
built = _backend.build_info()
assert built["torch"] == torch.__version__ and built["cuda"] == torch.version.cuda, built
assert built["cuda_archs"] == "9.0", built
# every overload (mixup and mixup.out are two operators to the dispatcher)
ops = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("fastcore_train::"))
missing = [op for op in ops
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastcore_train::{op}", "CUDA")]
assert ops, "no fastcore_train operators registered"
assert not missing, f"operators without a CUDA kernel: {missing}"
print(f"cuda_check: OK, CUDA kernels registered for {sorted(ops)}")
PY
