"""Which implementation the fused ops use: the compiled extension (``_C``) or the pure-torch
reference.

The choice is made once at import: ``_C`` when it loads, otherwise the reference with a single
warning saying why. ``FASTCORE_TRAIN_BACKEND=reference`` forces the reference and
``FASTCORE_TRAIN_BACKEND=extension`` makes a missing extension an error. A tensor on a device the
extension was not built for (CUDA tensors with a CPU-only build) falls back to the reference for
that call.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

_C = None
_reason = ""
_forced = os.environ.get("FASTCORE_TRAIN_BACKEND", "").strip().lower()
if _forced not in ("", "extension", "reference"):
    raise ValueError(
        f"FASTCORE_TRAIN_BACKEND must be 'extension' or 'reference', got {_forced!r}")

if _forced == "reference":
    _reason = "forced by FASTCORE_TRAIN_BACKEND=reference"
else:
    try:
        from fastcore_train import _C  # noqa: F811  (importing it registers torch.ops.fastcore_train.*)
        _reason = "compiled extension fastcore_train._C loaded"
    except (ImportError, OSError) as e:  # not built, or built against another torch
        _C = None
        _reason = f"fastcore_train._C could not be loaded ({type(e).__name__}: {e})"
        if _forced == "extension":
            raise ImportError(f"FASTCORE_TRAIN_BACKEND=extension but {_reason}") from e
        warnings.warn(
            f"fastcore_train: using the pure-torch reference ops because {_reason}. "
            "Build the extension with `pip install --no-build-isolation -e .`.",
            RuntimeWarning, stacklevel=2)

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
        d["extension_cuda"] = bool(_C.compiled_with_cuda())
        d["cpu_kernels"] = _C.cpu_capability()
        d["cached_bytes"] = cached_bytes()
    return d
