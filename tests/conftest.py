import glob
import hashlib
import os
import tempfile


def _compile_cache_dir():
    """torch.compile's on-disk cache is keyed by torch's version and the graph, not by a custom
    op's fake kernel: a graph compiled before an op's output shapes changed would be reused.
    The tests get a cache of their own per version of the ops (csrc/ and fastcore_train/ops/)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(root, "csrc", "**", "*"), recursive=True)
                       + glob.glob(os.path.join(root, "fastcore_train", "ops", "*.py"))):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                h.update(f.read())
    return os.path.join(tempfile.gettempdir(), f"torchinductor_fastcore_train_{h.hexdigest()[:12]}")


os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _compile_cache_dir())

import pytest  # noqa: E402
import torch  # noqa: E402

from fastcore_train import _backend  # noqa: E402

BACKENDS = ["extension", "reference"] if _backend.extension_loaded() else ["reference"]

# Tolerances per dtype for comparisons with an fp32/fp64 reference (atol, rtol).
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs a test once per available backend (the compiled extension and the reference)."""
    with _backend.use_backend(request.param):
        yield request.param


@pytest.fixture
def extension():
    if not _backend.extension_loaded():
        pytest.skip("fastcore_train._C is not built")
    with _backend.use_backend("extension"):
        yield


def _cuda_ok():
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_ok():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    info = _backend.info()
    return (f"fastcore_train backend: {info['backend']} ({info['reason']}); "
            f"cpu kernels: {info.get('cpu_kernels', '-')}; torch {torch.__version__}; "
            f"threads {torch.get_num_threads()}")
