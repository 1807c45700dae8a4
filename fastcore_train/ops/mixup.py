"""Mixup blend of a batch with a permutation of itself, fused: one read of each source row and
one write, in place for pair permutations.

Definition (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization")::

    out[i] = lam_i * x[i] + (1 - lam_i) * x[perm[i]]        # lam_i = lam, or lam[i] per sample

Gradients (the blend is linear in x)::

    d x[j] = lam_j * g[j] + (1 - lam_i) * g[i]   with perm[i] = j, i.e. i = inverse(perm)[j]
    d lam_i = sum_k g[i, k] * (x[i, k] - x[perm[i], k])

In place (``out=x``) is allowed when ``perm`` is an involution (``perm[perm[i]] == i``: a flip
of the batch or random pair swaps): the kernel reads each pair (i, perm[i]) once and writes both
rows from those values, with no extra memory. Any other permutation in place is refused, since
some row would be read after it was overwritten.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple, Union

import torch

from fastcore_train import _backend

__all__ = ["mixup", "mixup_reference"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

Lam = Union[float, torch.Tensor]


def mixup(x: torch.Tensor, perm: torch.Tensor, lam: Lam, *,
          out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``lam * x + (1 - lam) * x[perm]`` over the batch (first) dimension of ``x``.

    Args:
        x: (B, ...) float32, float16, bfloat16 or float64, any layout (NCHW, channels_last,
            a slice...). The result has x's memory format.
        perm: (B,) int64 permutation of ``range(B)`` on x's device (checked: on the CPU an
            error names the bad entry; on CUDA a device-side assert, with no host sync).
        lam: a float in [0, 1], or a (B,) float tensor of per-sample weights.
        out: where to write the result. ``out=x`` blends in place and needs ``perm`` to be an
            involution (``perm[perm[i]] == i``). Like torch's ``out=`` arguments, it does not
            support autograd (with grad mode on, no argument, ``out`` included, may require
            grad), and the write bumps ``out``'s version counter, so a backward that saved
            ``out`` before it raises torch's "modified by an inplace operation" error.

    Math is float32 (float64 for float64), rounded once to x's dtype. Gradients flow to x and
    to a tensor lam.
    """
    lam_t, lam_s = _check_args("mixup", x, perm, lam)
    inplace = out is not None and _same_tensor(out, x)
    if out is not None:
        if not inplace:
            _check_out("mixup", x, out)
        _check_no_grad_out("mixup", x, lam_t, out)
    if _backend.use_extension("mixup", x):
        ops = torch.ops.fastcore_train
        if out is None:
            return call_op(ops.mixup.default, x, perm, lam_t, lam_s)
        # the C++ ops bump out's version counter, as torch's out= ops do
        if inplace:
            ops.mixup_.default(x, perm, lam_t, lam_s)
        else:
            ops.mixup.out(x, perm, lam_t, lam_s, out)
        return out
    return mixup_reference(x, perm, lam, out=out)


def mixup_reference(x: torch.Tensor, perm: torch.Tensor, lam: Lam, *,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The pure-torch definition of :func:`mixup`: test oracle, fallback, baseline."""
    lam_t, lam_s = _check_args("mixup", x, perm, lam)
    inplace = out is not None and _same_tensor(out, x)
    if out is not None and not inplace:
        _check_out("mixup", x, out)
    if out is not None:
        _check_no_grad_out("mixup", x, lam_t, out)
    check_perm_values("mixup", perm, involution=inplace)
    check_lam_values("mixup", lam_t)
    y = _reference(x, perm, lam_t, lam_s)
    if out is None:
        return y
    out.copy_(y)  # one write, one version bump, as torch's out= ops
    return out


# ---------------------------------------------------------------------------------------------
# argument checks: the same messages (and exception types) as csrc/common/mixup_checks.h

def _check_blend_inputs(op: str, x, perm) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a tensor, got {type(x).__name__}")
    if not isinstance(perm, torch.Tensor):
        raise TypeError(f"{op}: perm must be a tensor, got {type(perm).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have a batch dimension (at least 1-D), got a 0-D tensor")
    _check_perm(op, x, perm)


def _check_perm(op: str, x, perm, none_ok: bool = False) -> None:
    """perm's type and metadata against x's batch (shared by the blends and normalize_mixup)."""
    if not isinstance(perm, torch.Tensor):
        raise TypeError(f"{op}: perm must be a tensor{' or None' if none_ok else ''}, got "
                        f"{type(perm).__name__}")
    B = x.shape[0]
    if perm.dtype != torch.long:
        raise TypeError(f"{op}: perm must be int64 (torch.long), got {perm.dtype}")
    if perm.dim() != 1 or perm.shape[0] != B:
        raise ValueError(f"{op}: perm must have shape ({B},) to match the batch of x, "
                         f"got {list(perm.shape)}")
    if perm.device != x.device:
        raise ValueError(f"{op}: perm is on {perm.device} but x is on {x.device}")


def _check_lam(op: str, x, lam, values: bool = False) -> Tuple[Optional[torch.Tensor], float]:
    """Returns (lam tensor or None, lam float). ``values``: also read a lam tensor's values (a
    sync on CUDA), as the references do."""
    B = x.shape[0]
    if isinstance(lam, torch.Tensor):
        if not lam.is_floating_point():
            raise TypeError(f"{op}: lam must be a float tensor, got {lam.dtype}")
        if lam.dim() == 0:
            lam = lam.expand(B)
        if lam.dim() != 1 or lam.shape[0] != B:
            raise ValueError(f"{op}: lam must have shape ({B},) to match the batch of x, "
                             f"got {list(lam.shape)}")
        if lam.device != x.device:
            raise ValueError(f"{op}: lam is on {lam.device} but x is on {x.device}")
        if values:
            check_lam_values(op, lam)
        return lam, 0.0
    # A real number as torch takes a Scalar (bool, int, float, numpy); a string is refused,
    # not parsed.
    if not isinstance(lam, numbers.Real):
        raise TypeError(f"{op}: lam must be a float or a tensor, got {type(lam).__name__}")
    lam_s = float(lam)
    if not 0.0 <= lam_s <= 1.0:
        raise ValueError(f"{op}: lam must be in [0, 1], got {lam_s:g}")
    return None, lam_s


def _check_args(op: str, x, perm, lam) -> Tuple[Optional[torch.Tensor], float]:
    """Returns (lam tensor or None, lam float)."""
    _check_blend_inputs(op, x, perm)
    return _check_lam(op, x, lam)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """out=x: the same tensor, or a tensor with x's exact memory (a view with equal strides)."""
    if a is b:
        return True
    if torch.compiler.is_compiling() or not isinstance(a, torch.Tensor):
        return False
    return (a.device == b.device and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride() and a.numel() > 0
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset())


def _span(t: torch.Tensor):
    lo = hi = t.storage_offset()
    for size, stride in zip(t.shape, t.stride()):
        ext = (size - 1) * stride
        if ext >= 0:
            hi += ext
        else:
            lo += ext
    return lo * t.element_size(), (hi + 1) * t.element_size()


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def _check_out(op: str, x: torch.Tensor, out) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{op}: out must be a tensor, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"{op}: out must have the shape of x, {list(x.shape)}, "
                         f"got {list(out.shape)}")
    if out.dtype != x.dtype:
        raise TypeError(f"{op}: out must have the dtype of x, {x.dtype}, got {out.dtype}")
    if out.device != x.device:
        raise ValueError(f"{op}: out is on {out.device} but x is on {x.device}")
    if not torch.compiler.is_compiling() and _overlaps(x, out):
        raise ValueError(f"{op}: out overlaps x but is not x; pass out=x to work in place, "
                         "or a non-overlapping tensor")


def _check_no_grad_out(op: str, x: torch.Tensor, lam_t: Optional[torch.Tensor], out) -> None:
    """torch's rule and words for out= functions: with grad mode on, no argument, out
    included, may require grad (a leaf that requires grad is never written behind autograd's
    back). The C++ ops refuse the same way (csrc/mutating_ops.cpp)."""
    if torch.is_grad_enabled() and (x.requires_grad or out.requires_grad
                                    or (lam_t is not None and lam_t.requires_grad)):
        raise RuntimeError(f"{op}(): functions with out=... arguments don't support automatic "
                           "differentiation, but one of the arguments requires grad.")


def call_op(op, *args):
    """Runs a compiled functional op. With nothing for autograd to record (grad mode off, or
    no argument requiring grad: a data batch) it goes below the Autograd key directly, as the
    Python wrapper that torch.library.register_autograd installs there does itself in that case,
    without that wrapper's cost (several us a call). torch.compile traces the plain call."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled()
                                         and torch._C._any_requires_grad(*args)):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def check_perm_values(op: str, perm: torch.Tensor, *, involution: bool = False) -> None:
    """perm is a permutation of range(B) (and an involution when asked). Syncs on CUDA;
    skipped while torch.compile traces (the compiled op checks at run time)."""
    if torch.compiler.is_compiling() or perm.numel() == 0:
        return
    # The same walk as the C++ check (B ints), so both report the same first problem.
    p = perm.detach().cpu().tolist()
    B = len(p)
    first = [-1] * B
    for i, v in enumerate(p):
        if not 0 <= v < B:
            raise IndexError(f"{op}: perm[{i}] = {v} is out of range for a batch of {B}")
        if first[v] >= 0:
            raise ValueError(f"{op}: perm is not a permutation: {v} appears twice "
                             f"(perm[{first[v]}] and perm[{i}])")
        first[v] = i
    if involution:
        for i, j in enumerate(p):
            if p[j] != i:
                raise ValueError(f"{op}: in place (out=x) needs perm to be an involution "
                                 f"(perm[perm[i]] == i: a flip or pair swaps), but perm[{i}] = "
                                 f"{j} and perm[{j}] = {p[j]}")


def check_lam_values(op: str, lam: Optional[torch.Tensor]) -> None:
    """Every per-sample lam in [0, 1]. Syncs on CUDA; skipped while torch.compile traces."""
    if lam is None or torch.compiler.is_compiling() or lam.numel() == 0:
        return
    bad = ~((lam >= 0) & (lam <= 1))  # NaN is bad too
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: lam must be in [0, 1], got {float(lam[i]):g} (row {i})")


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format of the ops' results: x's, as torch suggests it."""
    from torch._prims_common import suggest_memory_format
    return suggest_memory_format(x)


# ---------------------------------------------------------------------------------------------
# the reference

def _reference(x, perm, lam_t, lam_s):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    if lam_t is None:
        y = lam_s * xf + (1.0 - lam_s) * xf[perm]
    else:
        lam = lam_t.to(acc).reshape((-1,) + (1,) * (x.dim() - 1))
        y = lam * xf + (1.0 - lam) * xf[perm]
    return y.to(x.dtype).contiguous(memory_format=memory_format_of(x))


# ---------------------------------------------------------------------------------------------
# torch.library registrations for the compiled ops: fake kernels (torch.compile) and autograd.
# Only when the extension loaded; a failure here must never break `import fastcore_train`.

def _fake_like(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))


def _register():
    def fake_checks(x, perm, lam):
        torch._check(x.dim() >= 1, lambda: "mixup: x must have a batch dimension")
        torch._check(perm.dim() == 1 and perm.shape[0] == x.shape[0],
                     lambda: "mixup: perm must match the batch of x")
        if lam is not None:
            torch._check(lam.dim() == 1 and lam.shape[0] == x.shape[0],
                         lambda: "mixup: lam must match the batch of x")

    @torch.library.register_fake("fastcore_train::mixup")
    def _(x, perm, lam, lam_scalar):
        fake_checks(x, perm, lam)
        return _fake_like(x)

    @torch.library.register_fake("fastcore_train::mixup.out")
    def _(x, perm, lam, lam_scalar, out):
        fake_checks(x, perm, lam)
        torch._check(out.shape == x.shape, lambda: "mixup: out must have the shape of x")

    @torch.library.register_fake("fastcore_train::mixup_")
    def _(x, perm, lam, lam_scalar):
        fake_checks(x, perm, lam)

    @torch.library.register_fake("fastcore_train::mixup_backward")
    def _(grad, perm, lam, lam_scalar):
        fake_checks(grad, perm, lam)
        return _fake_like(grad)

    def setup_context(ctx, inputs, output):
        x, perm, lam, lam_scalar = inputs
        ctx.lam_scalar = lam_scalar
        # x is only needed for d lam; do not keep activations alive otherwise.
        keep_x = lam is not None and lam.requires_grad
        ctx.save_for_backward(perm, lam, x if keep_x else None)

    def backward(ctx, grad):
        perm, lam, x = ctx.saved_tensors
        gx = glam = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.fastcore_train.mixup_backward(grad, perm, lam, ctx.lam_scalar)
        if lam is not None and ctx.needs_input_grad[2]:
            acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
            prod = grad.to(acc) * (x.to(acc) - x[perm].to(acc))
            glam = prod.sum(dim=list(range(1, prod.dim()))) if prod.dim() > 1 else prod
            glam = glam.to(lam.dtype)
        return gx, None, glam, None

    torch.library.register_autograd("fastcore_train::mixup", backward,
                                    setup_context=setup_context)


if _backend.extension_loaded():
    try:
        _register()
    except Exception as e:  # pragma: no cover - depends on the torch build
        import warnings
        warnings.warn(f"fastcore_train: could not register mixup with torch.library: {e}",
                      RuntimeWarning)
