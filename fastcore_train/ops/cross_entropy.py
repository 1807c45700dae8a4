"""Label-smoothed cross-entropy, one or two targets (mixup), fused forward and backward.

Definitions (torch's, for one target; ``q`` are the soft targets, never materialised)::

    q(y)    = (1 - eps) * onehot(y) + eps / C
    q       = lam * q(target) + (1 - lam) * q(target_b)          # two-target (mixup) form
    loss_i  = lse_i - (1 - eps) * (lam * z[i, a] + (1 - lam) * z[i, b]) - eps / C * sum_j z[i, j]
    dloss_i / dz[i, j] = softmax(z_i)_j - q_ij

Every backend computes it from differences with the row max m (lse = m + L with
L = log(sum_j exp(z_j - m)))::

    loss_i  = L_i + (1 - eps) * (m_i - z_t) - eps / C * sum_j (z[i, j] - m_i)

so the precision is float32's relative to the spread of a row, not to its offset (lse rounded to
float32 loses L once |m| >> 1). The compiled kernel saves only m and L per row; backward
recomputes the softmax as exp((z - m) - L). A row with a NaN or +inf logit, or only -inf ones,
gets a NaN loss and gradient, as torch's log_softmax gives. A row is ignored (zero loss and
gradient, whatever its logits, left out of the mean) when ``target`` or ``target_b`` equals
``ignore_index``.
"""
from __future__ import annotations

import numbers
import operator
from typing import Optional, Union

import torch

from fastcore_train import _backend

__all__ = ["cross_entropy", "cross_entropy_reference"]

_REDUCTIONS = ("mean", "sum", "none")
_REDUCTION_CODE = {"none": 0, "mean": 1, "sum": 2}  # torch's at::Reduction, the op's argument
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INDEX_DTYPES = (torch.long, torch.uint8)  # exactly the class-index dtypes F.cross_entropy takes

Lam = Union[None, float, torch.Tensor]


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, label_smoothing: float = 0.0,
                  ignore_index: int = -100, reduction: str = "mean",
                  target_b: Optional[torch.Tensor] = None, lam: Lam = None) -> torch.Tensor:
    """Cross-entropy of ``logits`` (B, C) against class indices, with label smoothing.

    Equals ``F.cross_entropy(logits, target, label_smoothing=..., ignore_index=...,
    reduction=...)`` for one target (int64 or uint8 class indices, as torch takes). With
    ``target_b`` and ``lam`` (a float or a (B,) tensor of per-sample weights, which gets its
    gradient when it requires one) it is the soft-target cross-entropy against
    ``lam * q(target) + (1 - lam) * q(target_b)`` -- mixup's loss -- without building a (B, C)
    target. The loss is float32 (float64 for float64 logits) whatever the logits dtype; the
    gradient has the logits dtype. Double backward works (through the reference's formula).
    """
    lam_t, lam_s, eps, ignore_index = _check_args(logits, target, target_b, lam,
                                                  label_smoothing, ignore_index, reduction)
    if _backend.use_extension("cross_entropy", logits):
        args = (logits, target, target_b, lam_t, lam_s, eps, ignore_index,
                _REDUCTION_CODE[reduction])
        if _eager_autograd(logits, lam_t):
            loss, _ = _CrossEntropyFunction.apply(*args)
        else:
            loss, _ = torch.ops.fastcore_train.cross_entropy(*args)
        return loss
    return _reference(logits, target, target_b, lam_t, lam_s, eps, ignore_index, reduction)


def cross_entropy_reference(logits: torch.Tensor, target: torch.Tensor, *,
                            label_smoothing: float = 0.0, ignore_index: int = -100,
                            reduction: str = "mean", target_b: Optional[torch.Tensor] = None,
                            lam: Lam = None) -> torch.Tensor:
    """The pure-torch definition of :func:`cross_entropy`: test oracle, fallback, baseline."""
    lam_t, lam_s, eps, ignore_index = _check_args(logits, target, target_b, lam,
                                                  label_smoothing, ignore_index, reduction)
    return _reference(logits, target, target_b, lam_t, lam_s, eps, ignore_index, reduction)


def _reference(logits, target, target_b, lam_t, lam_s, eps, ignore_index, reduction,
               check=True):
    target, target_b = _long(target), _long(target_b)
    rows = _reference_rows(logits, target, target_b, lam_t, lam_s, eps, ignore_index, check)
    return _reduce(rows, target, target_b, ignore_index, reduction)


def _long(t):
    """uint8 class indices as int64 (compared with ignore_index as torch does: by value, where
    a uint8 tensor would wrap -100 to 156)."""
    return t if t is None or t.dtype == torch.long else t.long()


# ---------------------------------------------------------------------------------------------
# argument checks: the same messages as csrc/common/cross_entropy_checks.h

def _as_float(value, name, who="cross_entropy"):
    """``value`` as a Python float where torch's float arguments take it (a real number or a
    0-d real tensor); anything else (None, a string, ...) is a TypeError, as in torch."""
    if type(value) is float:  # the usual case, ahead of the slower ABC check
        return value
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex():
        return float(value)
    raise TypeError(f"{who}: {name} must be a float, not {type(value).__name__}")


def _as_int64(value, name, who="cross_entropy"):
    """``value`` as a Python int where torch's int arguments take it (an int, a numpy integer,
    a one-element integer tensor; not a bool or a float: torch raises TypeError rather than
    truncate), in int64's range (ValueError otherwise, as torch)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{who}: {name} must be an int, not {type(value).__name__}") from None
    if not -2**63 <= v < 2**63:
        raise ValueError(f"{who}: {name} must fit in int64 (a 64-bit signed integer), got {v}")
    return v


def _check_args(logits, target, target_b, lam, label_smoothing, ignore_index, reduction):
    """Checks the arguments; returns (lam tensor or None, lam float, label_smoothing as a float,
    ignore_index as an int)."""
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        hint = (" (for mixup targets pass target_b and lam, or an ft.MixedTarget to "
                "LabelSmoothingCrossEntropy)" if isinstance(target, (tuple, list)) else "")
        raise TypeError(f"cross_entropy: logits and target must be tensors, got "
                        f"{type(logits).__name__} and {type(target).__name__}{hint}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    eps = _as_float(label_smoothing, "label_smoothing")
    ignore_index = _as_int64(ignore_index, "ignore_index")
    if logits.dim() != 2:
        raise ValueError(f"cross_entropy: logits must be 2-D (batch, classes), got {logits.dim()}-D")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError("cross_entropy: logits must be float32, float16, bfloat16 or float64, "
                        f"got {logits.dtype}")
    B = logits.shape[0]
    for name, t in (("target", target), ("target_b", target_b)):
        if t is None:
            continue
        if t.dtype not in _INDEX_DTYPES:
            hint = (" (probability targets are not supported; for mixup pass target_b and lam)"
                    if t.is_floating_point() else "")
            raise TypeError(f"cross_entropy: {name} must be int64 (torch.long) class indices, "
                            f"got {t.dtype}{hint}")
        if t.dim() != 1 or t.shape[0] != B:
            raise ValueError(f"cross_entropy: {name} must have shape ({B},) to match logits, "
                             f"got {list(t.shape)}")
        if t.device != logits.device:
            raise ValueError(f"cross_entropy: {name} is on {t.device} but logits is on "
                             f"{logits.device}")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if (target_b is None) != (lam is None):
        raise ValueError("cross_entropy: target_b and lam must be given together")
    if lam is None:
        return None, 1.0, eps, ignore_index
    if isinstance(lam, torch.Tensor):
        if not lam.is_floating_point():
            raise TypeError(f"cross_entropy: lam must be a float tensor, got {lam.dtype}")
        if lam.device != logits.device:
            raise ValueError(f"cross_entropy: lam is on {lam.device} but logits is on "
                             f"{logits.device}")
        if lam.dim() == 0:
            lam = lam.expand(B)
        if lam.dim() != 1 or lam.shape[0] != B:
            raise ValueError(f"cross_entropy: lam must have shape ({B},) to match logits, "
                             f"got {list(lam.shape)}")
        return lam, 1.0, eps, ignore_index
    lam = _as_float(lam, "lam")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"cross_entropy: lam must be in [0, 1], got {lam}")
    return None, lam, eps, ignore_index


def _check_values(target, target_b, lam_t, classes, ignore_index):
    """Data-dependent checks of the reference (the kernels do theirs in C++)."""
    if torch.compiler.is_compiling():
        return
    for t in (target, target_b):
        if t is None or t.numel() == 0:
            continue
        bad = (t != ignore_index) & ((t < 0) | (t >= classes))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise IndexError(f"cross_entropy: target {int(t[i])} is out of range for {classes} "
                             f"classes (row {i})")
    if lam_t is not None and lam_t.numel() > 0:
        bad = ~((lam_t >= 0) & (lam_t <= 1))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"cross_entropy: lam must be in [0, 1], got {float(lam_t[i])} "
                             f"(row {i})")


def _ignored(target, target_b, ignore_index):
    ignored = target == ignore_index
    if target_b is not None:
        ignored = ignored | (target_b == ignore_index)
    return ignored


def _reduce(rows, target, target_b, ignore_index, reduction):
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    # torch's mean: over the rows that are not ignored (NaN when there are none)
    valid = (~_ignored(target, target_b, ignore_index)).sum()
    return rows.sum() / valid


# ---------------------------------------------------------------------------------------------
# the reference

def _acc_dtype(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _reference_rows(logits, target, target_b, lam_t, lam_s, eps, ignore_index, check=True):
    """Per-row losses (int64 targets), differentiable any number of times."""
    C = logits.shape[1]
    if check:
        _check_values(target, target_b, lam_t, C, ignore_index)
    ignored = _ignored(target, target_b, ignore_index)
    # Ignored rows count for nothing whatever their logits: zeroed before any maths, so that
    # a NaN there cannot leak into the gradient through 0 * NaN.
    z = logits.to(_acc_dtype(logits)).masked_fill(ignored[:, None], 0.0)
    if C == 0:  # every row is ignored (any target is out of range)
        return z.sum(1)
    # Differences with the row max, as the kernels compute (see the module docstring). The max
    # is a constant to autograd: the loss does not depend on it, so every derivative is exact.
    # A NaN or infinite max makes every d (and so the loss and gradient) NaN, as torch gives.
    m = z.detach().amax(1)
    d = z - m[:, None]
    a = target.masked_fill(ignored, 0)
    da = m - z.gather(1, a[:, None])[:, 0]
    if target_b is None:
        dt = da
    else:
        b = target_b.masked_fill(ignored, 0)
        db = m - z.gather(1, b[:, None])[:, 0]
        lam = lam_t.to(z.dtype) if lam_t is not None else lam_s
        # a row whose two targets agree is one target: m - z_a itself (lam*da + (1-lam)*da
        # is NaN for z_a = -inf and lam in {0, 1})
        dt = torch.where(a == b, da, lam * da + (1.0 - lam) * db)
    rows = torch.logsumexp(d, dim=1) + (1.0 - eps) * dt
    if eps != 0:  # without smoothing a -inf (masked) logit must not give 0*-inf
        rows = rows - (eps / C) * d.sum(dim=1)
    return rows.masked_fill(ignored, 0.0)


# ---------------------------------------------------------------------------------------------
# Autograd of the compiled op, shared by the eager autograd.Function and the torch.library
# registration. First order: the backward kernel for the logits, a closed form for lam.
# Under create_graph (double backward) the kernel's output would be a dead end for autograd,
# so the gradient is taken through the reference's formula instead, which autograd can
# differentiate again.

_REDUCTION_NAME = {code: name for name, code in _REDUCTION_CODE.items()}


def _setup_context(ctx, inputs, output):
    logits, target, target_b, lam, lam_scalar, label_smoothing, ignore_index, reduction = inputs
    _, stats = output
    ctx.save_for_backward(logits, target, target_b, lam, stats)
    ctx.lam_scalar = lam_scalar
    ctx.label_smoothing = label_smoothing
    ctx.ignore_index = ignore_index
    ctx.reduction = reduction


def _backward(ctx, grad_loss, _grad_stats):
    logits, target, target_b, lam, stats = ctx.saved_tensors
    need_x, need_lam = ctx.needs_input_grad[0], lam is not None and ctx.needs_input_grad[3]
    if torch.is_grad_enabled():  # create_graph=True
        grad, grad_lam = _differentiable_backward(ctx, grad_loss, logits, target, target_b, lam,
                                                  need_x, need_lam)
    else:
        grad = grad_lam = None
        if need_x:
            grad = torch.ops.fastcore_train.cross_entropy_backward(
                grad_loss, logits, target, target_b, lam, ctx.lam_scalar, stats,
                ctx.label_smoothing, ctx.ignore_index, ctx.reduction)
        if need_lam:
            grad_lam = _lam_grad(ctx, grad_loss, logits, target, target_b, lam, stats)
    return grad, None, None, grad_lam, None, None, None, None


def _lam_grad(ctx, grad_loss, logits, target, target_b, lam, stats):
    """d loss / d lam_i = (1-eps) * ((m - z_a) - (m - z_b)) = CE_a,i - CE_b,i for rows not
    ignored whose targets differ (0 otherwise: a row with a == b does not depend on lam),
    times grad_loss (divided by the number of rows not ignored for the mean). NaN for a row
    whose loss is NaN, as lam * CE_a + (1 - lam) * CE_b gives."""
    target, target_b = _long(target), _long(target_b)
    ignored = _ignored(target, target_b, ctx.ignore_index)
    mixed = ~ignored & (target != target_b)
    if logits.shape[1] == 0:
        return torch.zeros_like(lam)
    m = stats[:, 0]
    za = logits.gather(1, target.masked_fill(~mixed, 0)[:, None])[:, 0].to(m.dtype)
    zb = logits.gather(1, target_b.masked_fill(~mixed, 0)[:, None])[:, 0].to(m.dtype)
    g = grad_loss.to(m.dtype)
    if ctx.reduction == _REDUCTION_CODE["mean"]:
        g = g / (~ignored).sum()
    dlam = (1.0 - ctx.label_smoothing) * ((m - za) - (m - zb))
    return torch.where(mixed, g * dlam, 0.0).to(lam.dtype)


def _differentiable_backward(ctx, grad_loss, logits, target, target_b, lam, need_x, need_lam):
    inputs = [t for t, need in ((logits, need_x), (lam, need_lam)) if need]
    if not inputs:
        return None, None
    with torch.enable_grad():
        loss = _reference(logits, target, target_b, lam, ctx.lam_scalar, ctx.label_smoothing,
                          ctx.ignore_index, _REDUCTION_NAME[ctx.reduction], check=False)
        grads = torch.autograd.grad(loss, inputs, grad_loss, create_graph=True,
                                    allow_unused=True, materialize_grads=True)
    grads = iter(grads)
    return (next(grads) if need_x else None), (next(grads) if need_lam else None)


class _CrossEntropyFunction(torch.autograd.Function):
    """Eager autograd of the compiled op, with the same setup and backward as its torch.library
    registration below. The generic wrapper behind ``register_autograd`` costs ~20 us of Python
    per forward, a new-style Function (``setup_context``) ~35 us and this one ~5 us, against a
    ~45 us kernel on a 256x1000 batch. torch.compile and direct ``torch.ops`` calls use the
    registration."""

    @staticmethod
    def forward(ctx, *args):
        out = torch.ops.fastcore_train.cross_entropy(*args)
        _setup_context(ctx, args, out)
        ctx.mark_non_differentiable(out[1])
        return out

    backward = staticmethod(_backward)


def _eager_autograd(logits, lam) -> bool:
    return ((logits.requires_grad or (lam is not None and lam.requires_grad))
            and torch.is_grad_enabled() and not torch.compiler.is_compiling())


# ---------------------------------------------------------------------------------------------
# torch.library registrations for the compiled op: fake kernel (torch.compile) and autograd.
# Only when the extension loaded; a failure here must never break `import fastcore_train`.

def _register():
    lib = "fastcore_train::cross_entropy"

    @torch.library.register_fake(lib)
    def _(logits, target, target_b, lam, lam_scalar, label_smoothing, ignore_index, reduction):
        torch._check(logits.dim() == 2, lambda: "cross_entropy: logits must be 2-D")
        torch._check(target.shape[0] == logits.shape[0],
                     lambda: "cross_entropy: target must match logits' batch")
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        B = logits.shape[0]
        loss_shape = (B,) if reduction == 0 else ()
        return logits.new_empty(loss_shape, dtype=acc), logits.new_empty((B, 2), dtype=acc)

    @torch.library.register_fake("fastcore_train::cross_entropy_backward")
    def _(grad_loss, logits, target, target_b, lam, lam_scalar, stats, label_smoothing,
          ignore_index, reduction):
        return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)

    torch.library.register_autograd(lib, _backward, setup_context=_setup_context)


if _backend.extension_loaded():
    try:
        _register()
    except Exception as e:  # pragma: no cover - depends on the torch build
        import warnings
        warnings.warn(f"fastcore_train: could not register cross_entropy with torch.library: {e}",
                      RuntimeWarning)
