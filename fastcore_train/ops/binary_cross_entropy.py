"""Binary cross-entropy with logits against label-smoothed one-hot targets, one or two targets
(mixup), fused forward and backward, without building the (B, C) targets.

Definitions (timm's ``BinaryCrossEntropy(smoothing=eps)`` on ``Mixup``'s targets; torch's
``binary_cross_entropy_with_logits`` for the loss)::

    off = eps / C,   on = 1 - eps + off
    q(y)_j  = on if j == y else off
    q       = lam * q(target) + (1 - lam) * q(target_b)                # two-target (mixup) form
    w_ij    = 1 + (pw_j - 1) * q_ij                                     # pw: pos_weight (1 without)
    loss_ij = -(pw_j q_ij log sigmoid(z_ij) + (1 - q_ij) log(1 - sigmoid(z_ij)))
            = (1 - q_ij) z_ij + w_ij softplus(-z_ij)                    # torch's form
    dloss_ij / dz_ij = w_ij sigmoid(z_ij) - pw_j q_ij

With softplus(-z) = max(-z, 0) + log1p(exp(-|z|)) the loss is, in a form where nothing cancels,
``loss = c |z| + w log1p(exp(-|z|))`` with ``c = 1 - q`` for z >= 0 and ``c = pw q`` for z < 0
(for z < 0: (1-q) z - w z = -(pw q) z since 1 - q - w = -pw q). Both terms are >= 0, so the
float32 result keeps its relative precision at any |z|; torch's own form subtracts two numbers of
size |z| for z << 0 (``(1-q) z + w (-z) + ...``). Likewise the gradient is taken as
``(1 - q) - w sigmoid(-z)`` for z >= 0 and ``w sigmoid(z) - pw q`` for z < 0 (sigmoid(z) = 1 -
sigmoid(-z)), so that 1 - q near 0 is not lost against sigmoid(z) near 1.

Every column but the targets has q = off: the kernels sum the row with q = off and add the one or
two target columns apart. ``mean`` is over B x C elements, as timm's BinaryCrossEntropy and torch
reduce; ``none`` gives the (B, C) elementwise loss.

Non-finite logits give torch's values: the loss is NaN at z = -inf (torch's form adds -inf and
+inf) whatever q, +inf at z = +inf (NaN when q = 1) and NaN at NaN; the gradient is finite at
z = +-inf (``1 - q`` and ``-pw q``) and NaN at NaN.

There is no ``ignore_index`` (timm's loss and torch's have none): every target must be a class
index in [0, C).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from fastcore_train import _backend
from fastcore_train.ops.cross_entropy import _as_float, _long

__all__ = ["binary_cross_entropy", "binary_cross_entropy_reference"]

_OP = "binary_cross_entropy"
_REDUCTIONS = ("mean", "sum", "none")
_REDUCTION_CODE = {"none": 0, "mean": 1, "sum": 2}  # torch's at::Reduction, the op's argument
_REDUCTION_NAME = {code: name for name, code in _REDUCTION_CODE.items()}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INDEX_DTYPES = (torch.long, torch.uint8)  # the class-index dtypes F.cross_entropy takes

Lam = Union[None, float, torch.Tensor]


def binary_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *,
                         label_smoothing: float = 0.0, target_b: Optional[torch.Tensor] = None,
                         lam: Lam = None, reduction: str = "mean",
                         pos_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Binary cross-entropy of ``logits`` (B, C) against smoothed one-hot class targets.

    Equals ``F.binary_cross_entropy_with_logits(logits, q, pos_weight=pos_weight,
    reduction=reduction)`` with ``q`` the dense targets timm's ``BinaryCrossEntropy(smoothing=)``
    builds (``off = label_smoothing / C`` everywhere, ``1 - label_smoothing + off`` at the
    target), and with ``target_b`` and ``lam`` (a float, a 0-d or a (B,) tensor, which gets its
    gradient when it requires one) the blend ``lam * q(target) + (1 - lam) * q(target_b)`` that
    timm's ``Mixup`` builds -- without building ``q``. ``target``/``target_b``: int64 or uint8
    class indices in [0, C). ``pos_weight``: one weight per class ((C,), or a shape that
    broadcasts to it), which gets its gradient when it requires one. ``mean`` is over all B x C
    elements; ``none`` returns the (B, C) elementwise loss. The loss is float32 (float64 for
    float64 logits) whatever the logits dtype; the gradient has the logits dtype. Double backward
    works (through the reference's formula).
    """
    lam_t, lam_s, eps, pw = _check_args(logits, target, target_b, lam, label_smoothing,
                                        reduction, pos_weight)
    if _backend.use_extension(_OP, logits):
        args = (logits, target, target_b, lam_t, lam_s, eps, pw, _REDUCTION_CODE[reduction])
        if _eager_autograd(logits, lam_t, pw):
            return _BinaryCrossEntropyFunction.apply(*args)
        return torch.ops.fastcore_train.binary_cross_entropy(*args)
    return _reference(logits, target, target_b, lam_t, lam_s, eps, pw, reduction)


def binary_cross_entropy_reference(logits: torch.Tensor, target: torch.Tensor, *,
                                   label_smoothing: float = 0.0,
                                   target_b: Optional[torch.Tensor] = None, lam: Lam = None,
                                   reduction: str = "mean",
                                   pos_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The pure-torch definition of :func:`binary_cross_entropy`: test oracle and fallback. It
    builds the dense (B, C) targets; the compiled op does not."""
    lam_t, lam_s, eps, pw = _check_args(logits, target, target_b, lam, label_smoothing,
                                        reduction, pos_weight)
    return _reference(logits, target, target_b, lam_t, lam_s, eps, pw, reduction)


# ---------------------------------------------------------------------------------------------
# argument checks: the same messages as csrc/common/bce_checks.h

def _check_args(logits, target, target_b, lam, label_smoothing, reduction, pos_weight):
    """Checks the arguments; returns (lam tensor or None, lam float, label_smoothing as a float,
    pos_weight as a (C,) tensor or None)."""
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        hint = (" (for mixup targets pass target_b and lam, or an ft.MixedTarget to "
                "BinaryCrossEntropy)" if isinstance(target, (tuple, list)) else "")
        raise TypeError(f"{_OP}: logits and target must be tensors, got "
                        f"{type(logits).__name__} and {type(target).__name__}{hint}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{_OP}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    eps = _as_float(label_smoothing, "label_smoothing", _OP)
    if logits.dim() != 2:
        raise ValueError(f"{_OP}: logits must be 2-D (batch, classes), got {logits.dim()}-D")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{_OP}: logits must be float32, float16, bfloat16 or float64, "
                        f"got {logits.dtype}")
    B, C = logits.shape
    for name, t in (("target", target), ("target_b", target_b)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in _INDEX_DTYPES:
            hint = (" (probability targets are not supported: pass class indices, and target_b "
                    "and lam for mixup)" if t.is_floating_point() else "")
            raise TypeError(f"{_OP}: {name} must be int64 or uint8 class indices, got "
                            f"{t.dtype}{hint}")
        if t.dim() != 1 or t.shape[0] != B:
            raise ValueError(f"{_OP}: {name} must have shape ({B},) to match logits, "
                             f"got {list(t.shape)}")
        if t.device != logits.device:
            raise ValueError(f"{_OP}: {name} is on {t.device} but logits is on {logits.device}")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"{_OP}: label_smoothing must be in [0, 1], got {eps:g}")
    pw = _check_pos_weight(pos_weight, logits)
    if (target_b is None) != (lam is None):
        raise ValueError(f"{_OP}: target_b and lam must be given together")
    if lam is None:
        return None, 1.0, eps, pw
    if isinstance(lam, torch.Tensor):
        if not lam.is_floating_point():
            raise TypeError(f"{_OP}: lam must be a float tensor, got {lam.dtype}")
        if lam.device != logits.device:
            raise ValueError(f"{_OP}: lam is on {lam.device} but logits is on {logits.device}")
        if lam.dim() == 0:
            lam = lam.expand(B)
        if lam.dim() != 1 or lam.shape[0] != B:
            raise ValueError(f"{_OP}: lam must have shape ({B},) to match logits, "
                             f"got {list(lam.shape)}")
        return lam, 1.0, eps, pw
    lam = _as_float(lam, "lam", _OP)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"{_OP}: lam must be in [0, 1], got {lam:g}")
    return None, lam, eps, pw


def _check_pos_weight(pos_weight, logits):
    """pos_weight as a (C,) view (a broadcast of (), (1,), (1, C), ...), floating point."""
    if pos_weight is None:
        return None
    if not isinstance(pos_weight, torch.Tensor):
        raise TypeError(f"{_OP}: pos_weight must be a tensor, got {type(pos_weight).__name__}")
    if pos_weight.dtype == torch.bool or pos_weight.is_complex():
        raise TypeError(f"{_OP}: pos_weight must be a real tensor, got {pos_weight.dtype}")
    C = logits.shape[1]
    shape = list(pos_weight.shape)
    # one weight per class: broadcasting against (B, C) must not vary along the batch
    if any(s != 1 for s in shape[:-1]) or (shape and shape[-1] not in (1, C)):
        raise ValueError(f"{_OP}: pos_weight must hold one weight per class, shape ({C},) or a "
                         f"shape that broadcasts to it, got {shape}")
    if pos_weight.device != logits.device:
        raise ValueError(f"{_OP}: pos_weight is on {pos_weight.device} but logits is on "
                         f"{logits.device}")
    if not pos_weight.is_floating_point():  # integer weights, as torch takes them
        pos_weight = pos_weight.to(_acc_dtype(logits))
    return pos_weight.reshape(-1).expand(C)


def _check_values(target, target_b, lam_t, classes):
    """Data-dependent checks of the reference (the kernels do theirs in C++)."""
    if torch.compiler.is_compiling():
        return
    for t in (target, target_b):
        if t is None or t.numel() == 0:
            continue
        bad = (t < 0) | (t >= classes)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise IndexError(f"{_OP}: target {int(t[i])} is out of range for {classes} classes "
                             f"(row {i})")
    if lam_t is not None and lam_t.numel() > 0:
        bad = ~((lam_t >= 0) & (lam_t <= 1))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{_OP}: lam must be in [0, 1], got {float(lam_t[i]):g} (row {i})")


# ---------------------------------------------------------------------------------------------
# the reference

def _acc_dtype(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _soft_targets(target, target_b, lam_t, lam_s, eps, shape, dtype, device):
    """The dense targets timm builds (off everywhere, on at the target; blended for mixup), and
    1 - q built the same way from 1 - off and 1 - on: 1 - q formed after q is rounded to
    float32 would lose most digits of a target's 1 - q ~ eps. A row whose two targets agree
    gets on itself (lam * on + (1 - lam) * on can round off it)."""
    C = shape[1]
    off = eps / C if C else 0.0
    on = 1.0 - eps + off

    def one_hot(t, hot, cold):
        return torch.full(shape, cold, dtype=dtype, device=device).scatter_(1, t[:, None], hot)

    q_a, p_a = one_hot(target, on, off), one_hot(target, 1.0 - on, 1.0 - off)
    if target_b is None:
        return q_a, p_a
    q_b, p_b = one_hot(target_b, on, off), one_hot(target_b, 1.0 - on, 1.0 - off)
    lam = lam_t.to(dtype)[:, None] if lam_t is not None else lam_s
    same = (target == target_b)[:, None]
    return (torch.where(same, q_a, lam * q_a + (1.0 - lam) * q_b),
            torch.where(same, p_a, lam * p_a + (1.0 - lam) * p_b))


def _elementwise(z, q, one_minus_q, pw):
    """loss = c |z| + w log1p(exp(-|z|)) (see the module docstring), differentiable any number
    of times. Each branch is evaluated where it is exact, and exp only ever sees arguments <= 0,
    so the discarded branch overflows neither in value nor in derivative. The z >= 0 branch
    clamps (its derivative is exact at z = 0, where |z|'s would be autograd's sign(0) = 0); the
    other takes -|z|, whose derivative carries a NaN logit's NaN into the gradient, as torch's
    does (a clamp's would be 0 there)."""
    if pw is None:
        w, c_neg = 1.0, q
    else:
        w, c_neg = 1.0 + (pw - 1.0) * q, pw * q
    pos = one_minus_q * z + w * torch.log1p(torch.exp(-z.clamp(min=0)))
    neg = -c_neg * z + w * torch.log1p(torch.exp(-z.abs()))
    loss = torch.where(z >= 0, pos, neg)
    # torch's value at z = -inf is NaN whatever q (its form adds -inf and +inf); added as a
    # constant so that the gradient there stays torch's finite -pw q
    return loss + torch.where(z == float("-inf"), float("nan"), 0.0).to(z.dtype)


def _reference(logits, target, target_b, lam_t, lam_s, eps, pw, reduction, check=True):
    target, target_b = _long(target), _long(target_b)
    if check:
        _check_values(target, target_b, lam_t, logits.shape[1])
    z = logits.to(_acc_dtype(logits))
    q, one_minus_q = _soft_targets(target, target_b, lam_t, lam_s, eps, tuple(z.shape), z.dtype,
                                   z.device)
    loss = _elementwise(z, q, one_minus_q, None if pw is None else pw.to(z.dtype))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.mean()  # over B x C; NaN when empty, as torch


# ---------------------------------------------------------------------------------------------
# Autograd of the compiled op, shared by the eager autograd.Function and the torch.library
# registration. First order: the backward kernel for the logits, closed forms for lam and
# pos_weight. Under create_graph (double backward) the gradient is taken through the
# reference's formula instead, which autograd can differentiate again.

def _setup_context(ctx, inputs, output):
    logits, target, target_b, lam, lam_scalar, label_smoothing, pos_weight, reduction = inputs
    ctx.save_for_backward(logits, target, target_b, lam, pos_weight)
    ctx.lam_scalar = lam_scalar
    ctx.label_smoothing = label_smoothing
    ctx.reduction = reduction


def _backward(ctx, grad_loss):
    logits, target, target_b, lam, pos_weight = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    need_lam = lam is not None and ctx.needs_input_grad[3]
    need_pw = pos_weight is not None and ctx.needs_input_grad[6]
    if torch.is_grad_enabled():  # create_graph=True
        grads = _differentiable_backward(ctx, grad_loss, logits, target, target_b, lam,
                                         pos_weight, need_x, need_lam, need_pw)
    else:
        grads = [None, None, None]
        if need_x:
            grads[0] = torch.ops.fastcore_train.binary_cross_entropy_backward(
                grad_loss, logits, target, target_b, lam, ctx.lam_scalar, ctx.label_smoothing,
                pos_weight, ctx.reduction)
        if need_lam or need_pw:
            g = _grad_per_element(ctx, grad_loss, logits)
            if need_lam:
                grads[1] = _lam_grad(ctx, g, logits, target, target_b, lam, pos_weight)
            if need_pw:
                grads[2] = _pos_weight_grad(ctx, g, logits, target, target_b, lam, pos_weight)
    grad_x, grad_lam, grad_pw = grads
    return grad_x, None, None, grad_lam, None, None, grad_pw, None


def _grad_per_element(ctx, grad_loss, logits):
    """The upstream gradient of each element: (B, C) for reduction none, else one value."""
    acc = _acc_dtype(logits)
    g = grad_loss.to(acc)
    if ctx.reduction == _REDUCTION_CODE["mean"]:
        g = g / logits.numel()
    return g


def _softplus_neg(z):
    """softplus(-z) = max(-z, 0) + log1p(exp(-|z|)), exact at any |z|."""
    return torch.clamp(-z, min=0) + torch.log1p(torch.exp(-z.abs()))


def _lam_grad(ctx, g, logits, target, target_b, lam, pos_weight):
    """dloss/dlam_i = sum_j g_ij dloss_ij/dq_ij dq_ij/dlam_i. dq/dlam is (1 - eps) at column a,
    -(1 - eps) at column b and 0 elsewhere (0 everywhere when a == b), and dloss/dq =
    -z + (pw - 1) softplus(-z) (from loss = (1 - q) z + (1 + (pw - 1) q) softplus(-z))."""
    if logits.numel() == 0:
        return torch.zeros_like(lam)
    acc = _acc_dtype(logits)
    a, b = _long(target), _long(target_b)
    pw = None if pos_weight is None else pos_weight.to(acc)

    def dq(col):
        z = logits.gather(1, col[:, None])[:, 0].to(acc)
        return -z if pw is None else -z + (pw[col] - 1.0) * _softplus_neg(z)

    if g.dim() == 2:
        g_a, g_b = g.gather(1, a[:, None])[:, 0], g.gather(1, b[:, None])[:, 0]
    else:
        g_a = g_b = g
    dlam = (1.0 - ctx.label_smoothing) * (g_a * dq(a) - g_b * dq(b))
    return torch.where(a != b, dlam, 0.0).to(lam.dtype)


def _pos_weight_grad(ctx, g, logits, target, target_b, lam, pos_weight):
    """dloss/dpw_j = sum_i g_ij q_ij softplus(-z_ij): off times a column sum over the batch, plus
    (q - off) at the target columns. One (B, C) temporary, only when pos_weight requires grad."""
    acc = _acc_dtype(logits)
    z = logits.to(acc)
    B, C = z.shape
    eps = ctx.label_smoothing
    off = eps / C if C else 0.0
    sp = _softplus_neg(z)
    g_sp = sp * g
    grad = off * g_sp.sum(0)
    if B:
        a, b = _long(target), _long(target_b)
        if b is None:
            b = a
        if lam is None:
            lam_v = torch.full((B,), ctx.lam_scalar, dtype=acc, device=z.device)
        else:
            lam_v = lam.to(acc)
        same = a == b
        # q - off at the target columns: (1 - eps) for a single target, lam (1 - eps) and
        # (1 - lam) (1 - eps) for two
        extra_a = torch.where(same, 1.0, lam_v) * (1.0 - eps)
        extra_b = torch.where(same, 0.0, 1.0 - lam_v) * (1.0 - eps)
        grad = grad.index_add(0, a, extra_a * g_sp.gather(1, a[:, None])[:, 0])
        grad = grad.index_add(0, b, extra_b * g_sp.gather(1, b[:, None])[:, 0])
    return grad.to(pos_weight.dtype)


def _differentiable_backward(ctx, grad_loss, logits, target, target_b, lam, pos_weight, need_x,
                             need_lam, need_pw):
    wanted = [(logits, need_x), (lam, need_lam), (pos_weight, need_pw)]
    inputs = [t for t, need in wanted if need]
    if not inputs:
        return [None, None, None]
    with torch.enable_grad():
        loss = _reference(logits, target, target_b, lam, ctx.lam_scalar, ctx.label_smoothing,
                          pos_weight, _REDUCTION_NAME[ctx.reduction], check=False)
        grads = iter(torch.autograd.grad(loss, inputs, grad_loss, create_graph=True,
                                         allow_unused=True, materialize_grads=True))
    return [next(grads) if need else None for _, need in wanted]


class _BinaryCrossEntropyFunction(torch.autograd.Function):
    """Eager autograd of the compiled op, with the same setup and backward as its torch.library
    registration below: the generic wrapper behind ``register_autograd`` costs ~20 us of Python
    per call (see cross_entropy.py). torch.compile and direct ``torch.ops`` calls use the
    registration."""

    @staticmethod
    def forward(ctx, *args):
        out = torch.ops.fastcore_train.binary_cross_entropy(*args)
        _setup_context(ctx, args, out)
        return out

    @staticmethod
    def backward(ctx, grad_loss):
        return _backward(ctx, grad_loss)


def _eager_autograd(logits, lam, pos_weight) -> bool:
    wants = (logits.requires_grad or (lam is not None and lam.requires_grad)
             or (pos_weight is not None and pos_weight.requires_grad))
    return wants and torch.is_grad_enabled() and not torch.compiler.is_compiling()


# ---------------------------------------------------------------------------------------------
# torch.library registrations for the compiled op: fake kernel (torch.compile) and autograd.
# Only when the extension loaded; a failure here must never break `import fastcore_train`.

def _register():
    lib = f"fastcore_train::{_OP}"

    @torch.library.register_fake(lib)
    def _(logits, target, target_b, lam, lam_scalar, label_smoothing, pos_weight, reduction):
        torch._check(logits.dim() == 2, lambda: f"{_OP}: logits must be 2-D")
        torch._check(target.shape[0] == logits.shape[0],
                     lambda: f"{_OP}: target must match logits' batch")
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        shape = tuple(logits.shape) if reduction == _REDUCTION_CODE["none"] else ()
        return logits.new_empty(shape, dtype=acc)

    @torch.library.register_fake(f"fastcore_train::{_OP}_backward")
    def _(grad_loss, logits, target, target_b, lam, lam_scalar, label_smoothing, pos_weight,
          reduction):
        return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)

    torch.library.register_autograd(lib, _backward, setup_context=_setup_context)


if _backend.extension_loaded():
    try:
        _register()
    except Exception as e:  # pragma: no cover - depends on the torch build
        import warnings
        warnings.warn(f"fastcore_train: could not register {_OP} with torch.library: {e}",
                      RuntimeWarning)
