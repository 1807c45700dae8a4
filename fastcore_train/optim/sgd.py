"""FusedSGD: torch.optim.SGD's update in one fused pass, with fp32 master weights."""
from __future__ import annotations

from typing import Optional, Union

import torch

from fastcore_train.ops import optim_step as _ops
from fastcore_train.optim._fused import FusedOptimizer, _number

__all__ = ["FusedSGD"]


class FusedSGD(FusedOptimizer):
    """SGD with momentum (optionally dampened or Nesterov), float32 master weights and
    device-side loss scaling.

    Same signature and defaults as ``torch.optim.SGD`` (``momentum=0``), plus
    ``master_weights`` and ``max_grad_norm``. The maths are torch.optim.SGD's::

        g <- -g if maximize else g
        d <- g + weight_decay * p
        b <- d                                      at the buffer's first step
        b <- momentum * b + (1 - dampening) * d     after
        d <- d + momentum * b if nesterov else b
        p <- p - lr * d

    run in float32 on the master copy of float16/bfloat16 parameters and written back in the
    parameter's dtype. State per parameter: ``momentum_buffer`` (float32, when momentum != 0),
    with ``dampening != 0`` also ``step`` (a float32 scalar counting the buffer's steps: the
    first step, decided on the device, must not dampen, whether or not an overflow skipped an
    earlier one), and ``master``. For float32 parameters a ``state_dict()`` is interchangeable
    with torch.optim.SGD's (which ignores ``step``; a buffer loaded without it counts as
    started).

    Args:
        params: parameters, named parameters or param groups (one device; float32, float16 or
            bfloat16, checked here).
        lr: learning rate, a float or a one-element tensor (read on the device).
        momentum, dampening, weight_decay, nesterov, maximize: as torch.optim.SGD.
        foreach, fused: accepted and ignored (the step is always this fused one).
        differentiable: only ``False`` (``True`` is refused here).
        master_weights, max_grad_norm, ema_decay, ema_warmup: see
            :class:`fastcore_train.optim.FusedAdamW`.
    """

    _buffer_keys = ("momentum_buffer",)
    _torch_name = "SGD"

    def __init__(self, params, lr: Union[float, torch.Tensor] = 1e-3, momentum: float = 0,
                 dampening: float = 0, weight_decay: Union[float, torch.Tensor] = 0,
                 nesterov: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, differentiable: bool = False,
                 fused: Optional[bool] = None, master_weights: Optional[bool] = None,
                 max_grad_norm: Optional[float] = None, ema_decay: Optional[float] = None,
                 ema_warmup: bool = False):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach,
                        differentiable=differentiable, fused=fused,
                        master_weights=master_weights, max_grad_norm=max_grad_norm,
                        ema_decay=ema_decay, ema_warmup=ema_warmup)
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        name = type(self).__name__
        momentum = _number(name, "momentum", group["momentum"], tensor_ok=False)
        if not momentum >= 0.0:
            raise ValueError(f"{name}: invalid momentum {group['momentum']}")
        dampening = _number(name, "dampening", group.get("dampening", 0.0), tensor_ok=False)
        if group["nesterov"] and not (momentum > 0.0 and dampening == 0.0):
            raise ValueError(f"{name}: nesterov needs momentum > 0 and dampening 0 (as in "
                             "torch.optim.SGD)")

    def _init_state(self, group, p, state):
        if float(group["momentum"]) == 0.0:
            return
        counted = float(group["dampening"]) != 0.0
        if state.get("momentum_buffer") is None:
            # without a step count, zeros == torch's "first step copies d" (dampening 0)
            state["momentum_buffer"] = self._zeros(p)
            if counted:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        elif counted and "step" not in state:
            # a buffer from a checkpoint without a count (torch.optim.SGD's) has started
            state["step"] = torch.ones((), dtype=torch.float32, device=p.device)
        if not counted:
            state.pop("step", None)  # only kept while it is kept up to date

    def _update(self, group, params, grads, states, masters, grad_scale, found_inf, sq_norm):
        lr, lr_tensor = self._lr_args(group, params[0].device)
        momentum = float(group["momentum"])
        dampening = float(group["dampening"])
        buffers = [s["momentum_buffer"] for s in states] if momentum != 0.0 else []
        steps = [s["step"] for s in states] if momentum != 0.0 and dampening != 0.0 else []
        _ops.fused_sgd_(
            params, grads, buffers, masters, lr=lr, lr_tensor=lr_tensor, momentum=momentum,
            dampening=dampening, steps=steps, nesterov=bool(group["nesterov"]),
            maximize=bool(group["maximize"]), weight_decay=float(group["weight_decay"]),
            grad_scale=grad_scale, found_inf=found_inf, sq_norm=sq_norm,
            max_grad_norm=float(group["max_grad_norm"] or 0.0),
            **self._ema_args(group, states))
