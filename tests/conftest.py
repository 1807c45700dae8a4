import os

import pytest
import torch

from fastcore_train import _backend

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
