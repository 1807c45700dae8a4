"""Which implementation the fused ops use: the compiled extension (``_C``) or the pure-torch
reference.

The choice is made once at import. A build of ``_C`` is used only when it was built against the
running torch (read from the library file before loading it, fastcore_train/_build.py): first the
one in the package (``pip install --no-build-isolation``, ``make``), then the one
``fastcore-train build`` put in torch's extension cache. Without either, the reference is used
with a single one-line warning that says why and how to build the kernels
(``FASTCORE_TRAIN_JIT=1`` builds them right here instead, once, under a file lock).

``FASTCORE_TRAIN_BACKEND=reference`` forces the reference and ``FASTCORE_TRAIN_BACKEND=extension``
makes a missing extension an error. A tensor on a device the extension was not built for (CUDA
tensors with a CPU-only build) falls back to the reference for that call.
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from typing import Optional

import torch

from fastcore_train import _build

_C = None
_C_path: Optional[str] = None
_reason = ""
_forced = os.environ.get("FASTCORE_TRAIN_BACKEND", "").strip().lower()
if _forced not in ("", "extension", "reference"):
    raise ValueError(
        f"FASTCORE_TRAIN_BACKEND must be 'extension' or 'reference', got {_forced!r}")


class ExtensionUnavailableWarning(RuntimeWarning):
    """The compiled kernels could not be used; the pure-torch reference runs instead."""


def _torch_label() -> str:
    return f"torch {torch.__version__}"


def _mismatch(info: Optional[dict]) -> Optional[str]:
    """Why a build with this info must not be loaded into the running torch (None: it may)."""
    if info is None:
        return None  # a build from before the info existed: the import itself must tell
    built = info.get("torch", "unknown")
    if built != torch.__version__:
        return f"it was built against torch {built} but {_torch_label()} is running"
    git = info.get("torch_git", "")
    if git and torch.version.git_version and git != torch.version.git_version:
        return (f"it was built against another build of torch {built} (commit {git[:10]}, "
                f"running {torch.version.git_version[:10]})")
    return None


def _load_file(path: str):
    """Imports the library at ``path`` as fastcore_train._C (registers torch.ops.fastcore_train)."""
    spec = importlib.util.spec_from_file_location("fastcore_train._C", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastcore_train._C"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["fastcore_train._C"]
        raise
    return module


def _candidates():
    """(label, path) of the builds to try, in order; the cache lookup hashes the sources, so it
    runs only when the package's own build is missing or unusable."""
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(here, "_C" + suffix)
        if os.path.isfile(path):
            yield "the package's build", path
            break
    try:
        cached = _build.cached_build()
    except Exception:  # no sources installed, no writable cache: nothing cached then
        cached = None
    if cached:
        yield "the build in torch's extension cache", cached


def _install_note() -> str:
    """How setup.py handled the extension, when it recorded it (wheels and sdists)."""
    try:
        with open(os.path.join(os.path.dirname(__file__), "_install.json")) as f:
            why = json.load(f).get("extension", "")
    except (OSError, ValueError):
        return ""
    return why[len("skipped: "):] if why.startswith("skipped: ") else ""


def _building_now() -> bool:
    """`fastcore-train build` itself: the warning would tell the user to run what they run."""
    return (len(sys.argv) > 1 and sys.argv[1] == "build"
            and os.path.basename(sys.argv[0]).startswith("fastcore-train"))


def _select():
    problems = []
    for label, path in _candidates():
        why = _mismatch(_build.read_build_info(path))
        if why:
            problems.append(f"{label} is unusable: {why}")
            continue
        try:
            return _load_file(path), path, problems
        except (ImportError, OSError) as e:  # a missing symbol: built against another torch
            problems.append(f"{label} could not be loaded ({type(e).__name__}: {e})")
    return None, None, problems


def _unavailable_reason(problems) -> str:
    if problems:
        return "; ".join(problems)
    note = _install_note()
    if note:
        return f"the package was installed without compiled kernels ({note})"
    return f"no compiled kernels are built for {_torch_label()}"


if _forced == "reference":
    _reason = "forced by FASTCORE_TRAIN_BACKEND=reference"
else:
    _C, _C_path, _problems = _select()
    if _C is None and os.environ.get("FASTCORE_TRAIN_JIT") == "1" and not _building_now():
        try:
            _path = _build.jit_build()
            _C, _C_path = _load_file(_path), _path
        except (_build.BuildError, ImportError, OSError) as e:
            _problems.append(f"the JIT build failed: {e}")
    if _C is not None:
        _reason = f"compiled extension loaded from {_C_path}"
    else:
        _reason = _unavailable_reason(_problems)
        if _forced == "extension":
            raise ImportError(f"FASTCORE_TRAIN_BACKEND=extension but {_reason}")
        if not _building_now():
            warnings.warn(
                f"fastcore_train: using the pure-torch reference ops because {_reason}. Build "
                f"the kernels for {_torch_label()} with `fastcore-train build` (a few minutes, "
                "once), or reinstall with `pip install --no-build-isolation fastcore_train`.",
                ExtensionUnavailableWarning, stacklevel=2)

_active = "extension" if _C is not None else "reference"


def backend() -> str:
    """``"extension"`` when the fused kernels are in use, else ``"reference"``."""
    return _active


def backend_reason() -> str:
    """Why :func:`backend` returns what it does."""
    if _C is not None and _active == "reference":
        return "reference selected with fastcore_train._backend.use_backend"
    return _reason


def extension_loaded() -> bool:
    return _C is not None


def set_backend(name: str) -> None:
    """Select ``"extension"`` or ``"reference"`` for subsequent calls (tests, benchmarks)."""
    global _active
    if name not in ("extension", "reference"):
        raise ValueError(f"backend must be 'extension' or 'reference', got {name!r}")
    if name == "extension" and _C is None:
        raise RuntimeError(f"the extension is not available: {_reason}")
    _active = name


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager form of :func:`set_backend`."""
    previous = _active
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def use_extension(op: str, *tensors: torch.Tensor) -> bool:
    """True when ``torch.ops.fastcore_train.<op>`` should run for these tensors."""
    if _active != "extension":
        return False
    device = tensors[0].device.type
    if device == "cpu":
        return True
    # meta/fake tensors (torch.compile) go through the registered fake kernel
    if device == "meta":
        return True
    return _has_kernel(op, device)


_kernel_cache: dict = {}


def _has_kernel(op: str, device: str) -> bool:
    key = (op, device)
    if key not in _kernel_cache:
        dispatch_key = {"cuda": "CUDA"}.get(device)
        _kernel_cache[key] = dispatch_key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
            f"fastcore_train::{op}", dispatch_key)
    return _kernel_cache[key]


def empty_cache() -> int:
    """Frees the large CPU output blocks (>= 32 MiB: cross-entropy gradients, mixed batches)
    that the extension keeps after they are freed, for reuse by the next step without page
    faults. Blocks in use are untouched. Returns the bytes freed (0 without the extension).
    The cache is bounded by ``FASTCORE_TRAIN_CACHE_MB`` (default 1/8 of physical memory)."""
    return int(_C.empty_cache()) if _C is not None else 0


def cached_bytes() -> int:
    """Bytes of large CPU output blocks cached for reuse (see :func:`empty_cache`)."""
    return int(_C.cached_bytes()) if _C is not None else 0


def build_info() -> dict:
    """What the loaded extension was built against (torch, CUDA, CPU ISAs); {} without it."""
    if _C is None:
        return {}
    text = _C.build_info()
    body = text[len(_build.MARKER):text.rfind("|END")] if "|END" in text else ""
    return dict(kv.split("=", 1) for kv in body.split("|") if "=" in kv)


def built_against() -> str:
    """One line: ``torch 2.13.0+cpu, CUDA none, CPU kernels DEFAULT,AVX2,AVX512``."""
    b = build_info()
    if not b:
        return "n/a (extension not loaded)"
    cuda = b.get("cuda", "?")
    if cuda not in ("none", "?"):
        cuda = f"{cuda} (archs {b.get('cuda_archs', '?')})"
    return f"torch {b.get('torch', '?')}, CUDA {cuda}, CPU kernels {b.get('isas', '?')}"


def info() -> dict:
    """Facts for ``fastcore-train info`` and bug reports."""
    d = {
        "backend": backend(),
        "reason": backend_reason(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
    }
    if _C is not None:
        d["extension_path"] = _C_path
        d["built_against"] = built_against()
        d["extension_cuda"] = bool(_C.compiled_with_cuda())
        d["cpu_kernels"] = _C.cpu_capability()
        stats = _C.cache_stats()
        d["cached_bytes"] = stats["cached_bytes"]
        d["cache_limit_bytes"] = stats["limit_bytes"]
        d["cache_hits"] = stats["hits"]
    return d
