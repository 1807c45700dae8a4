import concurrent.futures
import contextlib
import glob
import hashlib
import os
import subprocess
import sys
import tempfile
import textwrap


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


# ---------------------------------------------------------------------------------------------
# The device axis (torchvision's cpu_and_cuda()): a test that takes the ``device`` fixture, or is
# parametrized with cpu_and_cuda(), runs on the CPU always and on CUDA when a GPU is visible. The
# CUDA half carries the ``cuda`` mark: ``pytest -m cuda`` selects it, and without a GPU the
# collection hook below skips it. Inputs are made on the CPU (CPU generators, the same values
# on every device), moved to the device, and results come back with .cpu() to be compared with
# the CPU reference.

DEVICES = (pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda))


def cpu_and_cuda():
    """``@pytest.mark.parametrize("device", cpu_and_cuda())`` where a fixture does not fit."""
    return DEVICES


CUDA_OPS = ("cross_entropy", "cross_entropy_backward", "binary_cross_entropy",
            "binary_cross_entropy_backward", "mixup", "mixup.out", "mixup_",
            "mixup_backward", "cutmix", "cutmix.out", "cutmix_", "cutmix_backward",
            "grad_stats_", "fused_adamw_", "fused_sgd_", "normalize_mixup", "normalize_mixup.out",
            "normalize_cutmix", "normalize_cutmix.out")


def cuda_kernels_missing():
    """Why CUDA tensors would silently take the reference with the extension backend (which
    falls back per call for a device without kernels), or None. A GPU run must prove the CUDA
    kernels; FASTCORE_TRAIN_BACKEND=reference tests the reference alone on the GPU."""
    if not _backend.extension_loaded():
        return None
    how = ("so CUDA tensors would run the reference: build with nvcc (make gpu-check) or set "
           "FASTCORE_TRAIN_BACKEND=reference to test the reference alone")
    if not _backend._C.compiled_with_cuda():
        return f"fastcore_train._C was built without CUDA kernels, {how}"
    missing = [op for op in CUDA_OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(
        f"fastcore_train::{op}", "CUDA")]
    if missing:
        return f"fastcore_train._C has no CUDA kernel for {', '.join(missing)}, {how}"
    return None


@contextlib.contextmanager
def device_context(device):
    """Around a test on ``device``: on CUDA, fails when the kernels are missing, seeds the
    device's generator, and synchronises at the end, so that an asynchronous error fails the
    test that caused it."""
    if device == "cuda":
        missing = cuda_kernels_missing()
        if missing:
            pytest.fail(missing)
        torch.cuda.manual_seed_all(0)  # randomness drawn on the device, where a test has any
    yield
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(params=DEVICES)
def device(request):
    """The device of a test's inputs: "cpu", and "cuda" when a GPU is visible."""
    with device_context(request.param):
        yield request.param


def to_device(obj, device):
    """Tensors in ``obj`` (nested tuples, lists and dicts) moved to ``device``; anything else as
    it is. .to() keeps a dense layout (channels_last, a transpose) but not gaps: tests of
    strided inputs build them on the device."""
    if isinstance(obj, torch.Tensor):  # (a meta tensor stays: it is there on purpose)
        return obj if obj.device.type == "meta" else obj.to(device)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple (ft.MixedTarget)
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def to_cpu(obj):
    """Results back on the CPU (nested tuples, lists and dicts), to compare with a reference."""
    return to_device(obj, "cpu")


def loss_and_grad(fn, x, *args, **kw):
    """fn(x, ...) and its gradient w.r.t. x (a reduced loss, or the sum of an unreduced one)."""
    # a new leaf on x's memory (a clone would make a strided x contiguous before fn sees it)
    x = x.detach().requires_grad_(True)
    loss = fn(x, *args, **kw)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), x.grad


def loss_and_grad_on(device, fn, x, *args, **kw):
    """``loss_and_grad`` with x (in its own layout) and every tensor argument on ``device``;
    the loss and gradient come back on the CPU."""
    return to_cpu(loss_and_grad(fn, on_device(x, device), *to_device(args, device),
                                **to_device(kw, device)))


def on_device(t, device):
    """``t`` (a CPU tensor of any layout) on ``device`` with the same strides and storage
    offset: the non-contiguous and misaligned layouts of a test reach the kernels as they are.
    (.to() would make a tensor with gaps contiguous.)"""
    if str(device) == "cpu":
        return t
    n = t.untyped_storage().nbytes() // t.element_size()
    flat = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), 0, (n,), (1,))
    return flat.to(device).as_strided(t.shape, t.stride(), t.storage_offset())


# ---------------------------------------------------------------------------------------------
# Device-side asserts. On CUDA a bad value that only the device sees (an out-of-range target or
# perm, a lam or box outside its range) is a device-side assert, as in torch's own CUDA ops:
# checking it on the host would sync every step. An assert leaves the process's CUDA context
# unusable, so each case runs in a child process; the children of a batch run at once (each
# pays for importing torch and creating a context, a few seconds).

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
_NO_ASSERT = "fastcore_train-test: no device-side assert"
_CHILD = """\
import sys
import torch
import fastcore_train as ft
{prelude}
{snippet}
if torch.cuda.is_available():  # (not on the self-tests of this helper, which run anywhere)
    torch.cuda.synchronize()
print({marker!r})
"""


def _run_child(code, timeout, env_extra):
    env = dict(os.environ, **env_extra,
               PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]))
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return None, f"timed out after {timeout} s; stdout: {e.stdout}; stderr: {e.stderr}"
    return r.returncode, r.stdout + r.stderr


class DeviceAsserts:
    """Runs code that must end in a device-side assert on CUDA, each snippet in a child process.

    ``expect(batch, key)``: ``batch`` maps keys to snippets (code run after ``import torch`` and
    ``import fastcore_train as ft``, with tests/ importable; a snippet builds CUDA tensors and
    calls the op); the first call for a batch runs all of its snippets at once, later calls read
    the results. Passes when the child failed with "device-side assert triggered"; a host-side
    exception, a clean exit or a timeout fails the test with the child's output. The children
    use the extension (FASTCORE_TRAIN_BACKEND=extension: the reference would raise on the host)
    unless ``env`` says otherwise."""

    def __init__(self, env=None):
        self._env = {"FASTCORE_TRAIN_BACKEND": "extension"} if env is None else env
        self._results = {}

    def run(self, snippets, prelude="", timeout=120):
        """{key: (exit code or None, output)} for every snippet, run concurrently."""
        todo = {k: _CHILD.format(prelude=prelude, snippet=textwrap.dedent(v), marker=_NO_ASSERT)
                for k, v in snippets.items()}
        workers = max(1, min(len(todo), os.cpu_count() or 1, 16))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            futures = {k: pool.submit(_run_child, code, timeout, self._env)
                       for k, code in todo.items()}
            return {k: f.result() for k, f in futures.items()}

    def expect(self, batch, key, prelude=""):
        if key not in batch:
            raise KeyError(f"{key!r} is not a snippet of its batch")
        if (prelude, key) not in self._results:
            self._results.update({(prelude, k): r for k, r in self.run(batch, prelude).items()})
        rc, output = self._results[(prelude, key)]
        assert rc is not None, f"{key}: the child {output}"
        assert rc != 0 and _NO_ASSERT not in output, (
            f"{key}: ran to the end without a device-side assert:\n{output[-3000:]}")
        assert "device-side assert triggered" in output, (
            f"{key}: failed without a device-side assert (exit {rc}):\n{output[-3000:]}")


@pytest.fixture(scope="session")
def device_asserts():
    return DeviceAsserts()


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
