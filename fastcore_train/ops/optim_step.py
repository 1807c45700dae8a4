"""The fused optimizer step: a gradient statistics pass and the AdamW / SGD update passes.

Three in-place ops, each with a pure-torch reference (test oracle and fallback) and a dispatch
to the compiled kernels (``torch.ops.fastcore_train.*``):

``grad_stats_(grads, found_inf, sq_norm)``
    Pass 1. Reads every gradient once; sets ``found_inf`` to 1 when an element is inf/NaN (it
    never clears it) and adds the sum of squares (float32 accumulation) to ``sq_norm``.

``fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, masters, steps, ...)``
``fused_sgd_(params, grads, momentum_buffers, masters, ...)``
    Pass 2. Each gradient is multiplied by ``1/grad_scale`` and, when ``max_grad_norm > 0``,
    by ``clip_grad_norm_``'s coefficient ``min(1, max_grad_norm / (norm + 1e-6))`` where
    ``norm = sqrt(sq_norm) / grad_scale``, and negated with ``maximize``. The update
    (torch.optim.AdamW's maths with ``amsgrad``, or SGD's with ``dampening``) runs in float32 on
    ``masters`` when given (then written to the params rounded to their dtype), else on the
    params themselves. When ``found_inf`` is non-zero nothing is written, steps included.
    Gradients are never written. SGD's optional ``steps`` count each momentum buffer's steps:
    at 0 the buffer becomes the gradient itself (torch's first step, undampened).

    Both update ops also keep, when given ``emas`` (float32, one per param), the EMA of the
    weights in the same pass: ``ema = lerp(ema, w, 1 - decay_t)`` on the updated float32 weight
    ``w`` (the master's value), torch.optim.swa_utils.get_ema_multi_avg_fn's update. ``ema_steps``
    (float32 scalars) count each EMA's updates: at 0 the EMA becomes ``w`` (AveragedModel's first
    ``update_parameters``), and with ``ema_warmup`` ``decay_t = min(ema_decay, 1 - (1 + n)^(-2/3))``
    at count ``n`` (timm's ModelEmaV3 warmup at its step ``n + 1``). Skipped with the step.

Every tensor an op writes gets its version counter bumped (csrc/optim_inplace.cpp; the
reference writes with in-place torch ops), so autograd sees the writes as it sees torch's.

No op reads a device value on the host: the skip decision, the scale, the clip coefficient,
the learning rate (as ``lr_tensor``) and the bias corrections are all computed on the device.

The argument checks are the same, message for message, as csrc/common/optim_checks.h.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastcore_train import _backend

__all__ = [
    "grad_stats_", "fused_adamw_", "fused_sgd_",
    "grad_stats_reference_", "fused_adamw_reference_", "fused_sgd_reference_",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Tensors = Sequence[torch.Tensor]


# ---------------------------------------------------------------------------------------------
# argument checks: the same messages as csrc/common/optim_checks.h

def _check_lists(op, params, grads, states):
    """``states``: (name, list, optional) triples of float32 state lists."""
    n = len(params)
    if len(grads) != n:
        raise ValueError(f"{op}: got {n} params but {len(grads)} grads")
    for name, ts, optional in states:
        if not (len(ts) == n or (optional and len(ts) == 0)):
            raise ValueError(f"{op}: got {n} params but {len(ts)} {name}")
    if n == 0:
        return
    device = params[0].device

    def check_device(t, name, i):
        if t.device != device:
            raise ValueError(f"{op}: {name}[{i}] is on {t.device} but params[0] is on {device}; "
                             "all tensors must be on one device")

    for i, (p, g) in enumerate(zip(params, grads)):
        if g.layout != torch.strided:
            raise TypeError(f"{op}: grads[{i}] is sparse; fused optimizers need dense gradients")
        if p.dtype not in _DTYPES:
            raise TypeError(f"{op}: params[{i}] must be float32, float16 or bfloat16, got {p.dtype}")
        if g.dtype != p.dtype:
            raise TypeError(f"{op}: grads[{i}] is {g.dtype} but params[{i}] is {p.dtype}")
        if g.shape != p.shape:
            raise ValueError(f"{op}: grads[{i}] has shape {list(g.shape)} but params[{i}] has "
                             f"shape {list(p.shape)}")
        check_device(p, "params", i)
        check_device(g, "grads", i)
        for name, ts, _ in states:
            if len(ts) == 0:
                continue
            t = ts[i]
            if t.dtype != torch.float32:
                raise TypeError(f"{op}: {name}[{i}] must be torch.float32, got {t.dtype}")
            if t.shape != p.shape:
                raise ValueError(f"{op}: {name}[{i}] has shape {list(t.shape)} but params[{i}] "
                                 f"has shape {list(p.shape)}")
            check_device(t, name, i)
    _check_distinct_writes(op, [("params", params)] + [(name, ts) for name, ts, _ in states])


def _check_distinct_writes(op, lists):
    """The tensors an op writes share no memory (a parameter listed twice shares its state):
    the CPU kernel would update it twice, the CUDA kernel from two blocks at once. The same
    walk as the C++ check, so both report the same pair. (Traced tensors have no data pointer:
    the compiled op checks at run time.)"""
    if torch.compiler.is_compiling():
        return
    seen = []
    for name, ts in lists:
        for i, t in enumerate(ts):
            if t.numel() > 0:
                seen.append((t.data_ptr(), len(seen), name, i))
    seen.sort()
    for a, b in zip(seen, seen[1:]):
        if a[3] == b[3] and (a[2], b[2]) == ("params", "masters"):
            continue  # a float32 param that is its own master: the same value written twice
        if a[0] == b[0]:
            raise ValueError(f"{op}: {a[2]}[{a[3]}] and {b[2]}[{b[3]}] are the same memory; each "
                             "parameter needs tensors of its own (is a parameter listed twice?)")


def _check_scalar(op, name, t, device, ref="params[0]"):
    if t is None:
        return
    if t.dtype != torch.float32:
        raise TypeError(f"{op}: {name} must be a torch.float32 tensor, got {t.dtype}")
    if t.numel() != 1:
        raise ValueError(f"{op}: {name} must have one element, got {t.numel()}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref} is on {device}; "
                         "all tensors must be on one device")


def _check_scalars(op, params, lr_tensor, grad_scale, found_inf, sq_norm, max_grad_norm):
    if max_grad_norm > 0 and sq_norm is None:
        raise ValueError(f"{op}: max_grad_norm > 0 needs sq_norm (from grad_stats_)")
    if len(params) == 0:
        return
    device = params[0].device
    for name, t in (("lr_tensor", lr_tensor), ("grad_scale", grad_scale),
                    ("found_inf", found_inf), ("sq_norm", sq_norm)):
        _check_scalar(op, name, t, device)


def _check_grad_stats(op, grads, found_inf, sq_norm):
    if len(grads) == 0:
        return
    device = grads[0].device
    for i, g in enumerate(grads):
        if g.layout != torch.strided:
            raise TypeError(f"{op}: grads[{i}] is sparse; fused optimizers need dense gradients")
        if g.dtype not in _DTYPES:
            raise TypeError(f"{op}: grads[{i}] must be float32, float16 or bfloat16, got {g.dtype}")
        if g.device != device:
            raise ValueError(f"{op}: grads[{i}] is on {g.device} but grads[0] is on {device}; "
                             "all tensors must be on one device")
    _check_scalar(op, "found_inf", found_inf, device, "grads[0]")
    _check_scalar(op, "sq_norm", sq_norm, device, "grads[0]")


def _check_steps(op, params, steps):
    if len(steps) != len(params):
        raise ValueError(f"{op}: got {len(params)} params but {len(steps)} steps")
    for i, s in enumerate(steps):
        _check_scalar(op, f"steps[{i}]", s, params[0].device)
    _check_distinct_writes(op, [("steps", steps)])


def _check_amsgrad(op, max_exp_avg_sqs, amsgrad):
    if not amsgrad and len(max_exp_avg_sqs) != 0:
        raise ValueError(f"{op}: max_exp_avg_sqs must be empty when amsgrad is False, got "
                         f"{len(max_exp_avg_sqs)}")


def _check_ema(op, params, steps, emas, ema_steps, ema_decay):
    if len(emas) == 0:
        if len(ema_steps) != 0:
            raise ValueError(f"{op}: ema_steps must be empty without emas, got {len(ema_steps)}")
        return
    if not 0.0 <= ema_decay <= 1.0:
        raise ValueError(f"{op}: ema_decay must be in [0, 1], got {ema_decay}")
    if len(ema_steps) != len(params):
        raise ValueError(f"{op}: got {len(params)} params but {len(ema_steps)} ema_steps")
    for i, s in enumerate(ema_steps):
        _check_scalar(op, f"ema_steps[{i}]", s, params[0].device)
    _check_distinct_writes(op, [("steps", steps), ("ema_steps", ema_steps)])


def _check_sgd(op, params, buffers, steps, momentum, dampening, nesterov):
    if nesterov and not (momentum > 0 and dampening == 0):
        raise ValueError(f"{op}: nesterov needs momentum > 0 and dampening 0")
    if momentum == 0:
        if len(buffers) != 0:
            raise ValueError(f"{op}: momentum_buffers must be empty when momentum is 0, got "
                             f"{len(buffers)}")
        if len(steps) != 0:
            raise ValueError(f"{op}: steps must be empty when momentum is 0, got {len(steps)}")
    else:
        if len(buffers) != len(params):
            raise ValueError(f"{op}: got {len(params)} params but {len(buffers)} "
                             "momentum_buffers")
        if len(steps) not in (0, len(params)):
            raise ValueError(f"{op}: got {len(params)} params but {len(steps)} steps")
        for i, s in enumerate(steps):
            _check_scalar(op, f"steps[{i}]", s, params[0].device)
        _check_distinct_writes(op, [("steps", steps)])


# ---------------------------------------------------------------------------------------------
# public functional forms: dispatch to the kernels or the reference

def _use_extension(op, tensors):
    return len(tensors) > 0 and _backend.use_extension(op, tensors[0])


def grad_stats_(grads: Tensors, found_inf: Optional[torch.Tensor] = None,
                sq_norm: Optional[torch.Tensor] = None) -> None:
    """Pass 1: flags non-finite gradients in ``found_inf`` and adds their squared norm to
    ``sq_norm`` (both float32, one element, on the gradients' device; either may be None)."""
    grads = list(grads)
    if _use_extension("grad_stats_", grads):
        torch.ops.fastcore_train.grad_stats_(grads, found_inf, sq_norm)
    else:
        grad_stats_reference_(grads, found_inf, sq_norm)


def fused_adamw_(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                 masters: Tensors, steps: Tensors, *, lr: float, beta1: float, beta2: float,
                 eps: float, weight_decay: float, amsgrad: bool = False,
                 max_exp_avg_sqs: Tensors = (), maximize: bool = False,
                 lr_tensor: Optional[torch.Tensor] = None,
                 grad_scale: Optional[torch.Tensor] = None,
                 found_inf: Optional[torch.Tensor] = None,
                 sq_norm: Optional[torch.Tensor] = None, max_grad_norm: float = 0.0,
                 emas: Tensors = (), ema_steps: Tensors = (), ema_decay: float = 0.0,
                 ema_warmup: bool = False) -> None:
    """Pass 2 of AdamW (torch.optim.AdamW's maths) in place; see the module docstring."""
    args = (list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs),
            list(masters), list(steps), float(lr), lr_tensor, float(beta1), float(beta2),
            float(eps), float(weight_decay), bool(amsgrad), bool(maximize), grad_scale,
            found_inf, sq_norm, float(max_grad_norm), list(emas), list(ema_steps),
            float(ema_decay), bool(ema_warmup))
    if _use_extension("fused_adamw_", args[0]):
        torch.ops.fastcore_train.fused_adamw_(*args)
    else:
        fused_adamw_reference_(*args)


def fused_sgd_(params: Tensors, grads: Tensors, momentum_buffers: Tensors, masters: Tensors, *,
               lr: float, momentum: float, nesterov: bool, weight_decay: float,
               dampening: float = 0.0, steps: Tensors = (), maximize: bool = False,
               lr_tensor: Optional[torch.Tensor] = None,
               grad_scale: Optional[torch.Tensor] = None,
               found_inf: Optional[torch.Tensor] = None,
               sq_norm: Optional[torch.Tensor] = None, max_grad_norm: float = 0.0,
               emas: Tensors = (), ema_steps: Tensors = (), ema_decay: float = 0.0,
               ema_warmup: bool = False) -> None:
    """Pass 2 of SGD (torch.optim.SGD's maths) in place; see the module docstring."""
    args = (list(params), list(grads), list(momentum_buffers), list(masters), list(steps),
            float(lr), lr_tensor, float(momentum), float(dampening), bool(nesterov),
            bool(maximize), float(weight_decay), grad_scale, found_inf, sq_norm,
            float(max_grad_norm), list(emas), list(ema_steps), float(ema_decay),
            bool(ema_warmup))
    if _use_extension("fused_sgd_", args[0]):
        torch.ops.fastcore_train.fused_sgd_(*args)
    else:
        fused_sgd_reference_(*args)


# ---------------------------------------------------------------------------------------------
# the reference: plain torch ops, no host-device synchronisation

def grad_stats_reference_(grads, found_inf=None, sq_norm=None):
    _check_grad_stats("grad_stats_", grads, found_inf, sq_norm)
    grads = [g for g in grads if g.numel() > 0]
    if not grads or (found_inf is None and sq_norm is None):
        return
    if found_inf is not None:
        bad = torch.stack([(~torch.isfinite(g)).any() for g in grads]).any()
        found_inf.masked_fill_(bad, 1.0)
    if sq_norm is not None:
        # float32 sums per tensor, added in float64 (the kernels: per chunk)
        sums = torch.stack([g.float().square().sum().double() for g in grads])
        sq_norm.add_(sums.sum().float())


def _grad_multiplier(grad_scale, sq_norm, max_grad_norm):
    """1/scale times the clip coefficient, a float32 0-d tensor (None when 1)."""
    inv = grad_scale.reshape(()).reciprocal() if grad_scale is not None else None
    if max_grad_norm <= 0:
        return inv
    norm = sq_norm.reshape(()).sqrt()
    if inv is not None:
        norm = norm * inv
    coef = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s, NaN propagates
    return coef if inv is None else inv * coef


def _commit(dst, new, skip):
    """dst <- new, or dst unchanged when the 0-d bool `skip` is set (no host sync)."""
    dst.copy_(new if skip is None else torch.where(skip, dst, new.to(dst.dtype)))


def _skip_flag(found_inf):
    return None if found_inf is None else (found_inf.reshape(()) != 0)


def _ema_value(ema, w, count, decay, warmup):
    """The EMA after its update with the new float32 weight ``w`` (see the module docstring):
    ATen's lerp as torch._foreach_lerp_ computes it, the weight 1 - decay_t rounded to float;
    the first update copies."""
    n = count.reshape(())
    if warmup:  # timm's ModelEmaV3 decay, in float64 as timm computes it in Python
        decay_t = (1 - (1 + n.double()) ** (-(2 / 3))).clamp(max=decay)
        new = ema.lerp(w, (1 - decay_t).float())
    else:
        new = ema.lerp(w, 1 - decay)
    return torch.where(n == 0, w, new)


def _update_ema(emas, ema_steps, i, w, decay, warmup, skip):
    if emas:
        _commit(emas[i], _ema_value(emas[i], w, ema_steps[i], decay, warmup), skip)


def fused_adamw_reference_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters,
                           steps, lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad,
                           maximize, grad_scale, found_inf, sq_norm, max_grad_norm, emas=(),
                           ema_steps=(), ema_decay=0.0, ema_warmup=False):
    op = "fused_adamw_"
    _check_amsgrad(op, max_exp_avg_sqs, amsgrad)
    _check_lists(op, params, grads, [("exp_avgs", exp_avgs, False),
                                     ("exp_avg_sqs", exp_avg_sqs, False),
                                     ("max_exp_avg_sqs", max_exp_avg_sqs, not amsgrad),
                                     ("masters", masters, True), ("emas", emas, True)])
    _check_steps(op, params, steps)
    _check_ema(op, params, steps, emas, ema_steps, ema_decay)
    _check_scalars(op, params, lr_tensor, grad_scale, found_inf, sq_norm, max_grad_norm)
    if len(params) == 0:
        return
    mul = _grad_multiplier(grad_scale, sq_norm, max_grad_norm)
    skip = _skip_flag(found_inf)
    lr_v = lr_tensor.reshape(()).double() if lr_tensor is not None else lr
    for i, p in enumerate(params):
        step = steps[i] + 1
        if p.numel() > 0:
            g = grads[i].float()
            if maximize:
                g = -g
            if mul is not None:
                g = g * mul
            w = (masters[i] if masters else p).to(torch.float32, copy=True)
            m = exp_avgs[i].clone()
            v = exp_avg_sqs[i].clone()
            # torch.optim.AdamW's single-tensor maths, bias corrections in float64
            t = step.double()
            bias_correction1 = 1 - beta1 ** t
            bias_correction2_sqrt = (1 - beta2 ** t).sqrt()
            neg_step_size = (-(lr_v / bias_correction1)).float()
            if weight_decay != 0:
                w.mul_(1 - lr_v * weight_decay)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            u = v
            if amsgrad:
                u = torch.maximum(max_exp_avg_sqs[i], v)
                _commit(max_exp_avg_sqs[i], u, skip)
            # float32 sqrt correctly rounded (via float64), as in the kernels; torch's
            # vectorised sqrt may be an ulp off
            denom = (u.double().sqrt().float() / bias_correction2_sqrt.float()).add_(eps)
            w.add_(neg_step_size * m / denom)
            _update_ema(emas, ema_steps, i, w, ema_decay, ema_warmup, skip)
            _commit(exp_avgs[i], m, skip)
            _commit(exp_avg_sqs[i], v, skip)
            if masters:
                _commit(masters[i], w, skip)
            _commit(p, w, skip)
        _commit(steps[i], step, skip)
        if ema_steps:
            _commit(ema_steps[i], ema_steps[i] + 1, skip)


def fused_sgd_reference_(params, grads, momentum_buffers, masters, steps, lr, lr_tensor,
                         momentum, dampening, nesterov, maximize, weight_decay, grad_scale,
                         found_inf, sq_norm, max_grad_norm, emas=(), ema_steps=(),
                         ema_decay=0.0, ema_warmup=False):
    op = "fused_sgd_"
    _check_sgd(op, params, momentum_buffers, steps, momentum, dampening, nesterov)
    _check_lists(op, params, grads, [("momentum_buffers", momentum_buffers, True),
                                     ("masters", masters, True), ("emas", emas, True)])
    _check_ema(op, params, steps, emas, ema_steps, ema_decay)
    _check_scalars(op, params, lr_tensor, grad_scale, found_inf, sq_norm, max_grad_norm)
    if len(params) == 0:
        return
    mul = _grad_multiplier(grad_scale, sq_norm, max_grad_norm)
    skip = _skip_flag(found_inf)
    for i, p in enumerate(params):
        if p.numel() > 0:
            g = grads[i].float()
            if maximize:
                g = -g
            if mul is not None:
                g = g * mul
            w = (masters[i] if masters else p).to(torch.float32, copy=True)
            # torch.optim.SGD's single-tensor maths. Without steps a zero buffer stands for
            # "not yet created", which is exact with dampening 0: 0*momentum + d == d.
            d = g.add(w, alpha=weight_decay) if weight_decay != 0 else g
            if momentum != 0:
                old = momentum_buffers[i]
                buf = old.clone().mul_(momentum).add_(d, alpha=1 - dampening)
                if steps:  # a buffer at step 0 becomes d itself (torch: buf = clone(d))
                    buf = torch.where(steps[i].reshape(()) == 0, d, buf)
                d = d.add(buf, alpha=momentum) if nesterov else buf
                _commit(momentum_buffers[i], buf, skip)
            if lr_tensor is not None:
                w.addcmul_(d, lr_tensor.reshape(()), value=-1)
            else:
                w.add_(d, alpha=-lr)
            _update_ema(emas, ema_steps, i, w, ema_decay, ema_warmup, skip)
            if masters:
                _commit(masters[i], w, skip)
            _commit(p, w, skip)
        if steps:
            _commit(steps[i], steps[i] + 1, skip)
        if ema_steps:
            _commit(ema_steps[i], ema_steps[i] + 1, skip)


# ---------------------------------------------------------------------------------------------
# torch.library registrations for the compiled ops: fake kernels (torch.compile, opcheck).
# Only when the extension loaded; a failure here must never break `import fastcore_train`.

def _register():
    @torch.library.register_fake("fastcore_train::grad_stats_")
    def _(grads, found_inf, sq_norm):
        return None

    @torch.library.register_fake("fastcore_train::fused_adamw_")
    def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps, lr, lr_tensor,
          beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale, found_inf, sq_norm,
          max_grad_norm, emas, ema_steps, ema_decay, ema_warmup):
        torch._check(len(grads) == len(params), lambda: "fused_adamw_: one grad per param")
        return None

    @torch.library.register_fake("fastcore_train::fused_sgd_")
    def _(params, grads, momentum_buffers, masters, steps, lr, lr_tensor, momentum, dampening,
          nesterov, maximize, weight_decay, grad_scale, found_inf, sq_norm, max_grad_norm, emas,
          ema_steps, ema_decay, ema_warmup):
        torch._check(len(grads) == len(params), lambda: "fused_sgd_: one grad per param")
        return None


if _backend.extension_loaded():
    try:
        _register()
    except Exception as e:  # pragma: no cover - depends on the torch build
        import warnings
        warnings.warn(f"fastcore_train: could not register the fused optimizer ops with "
                      f"torch.library: {e}", RuntimeWarning)
