"""FusedSGD: torch.optim.SGD's update in one fused pass, with fp32 master weights."""
from __future__ import annotations

from typing import Optional, Union

import torch

from fastcore_train.ops import optim_step as _ops
from fastcore_train.optim._fused import FusedOptimizer

__all__ = ["FusedSGD"]


class FusedSGD(FusedOptimizer):
    """SGD with momentum (optionally Nesterov), float32 master weights and device-side loss
    scaling.

    The maths are torch.optim.SGD's with ``dampening=0, maximize=False``::

        d <- g + weight_decay * p
        b <- momentum * b + d             (b starts at d, i.e. at zero before the first step)
        d <- d + momentum * b if nesterov else b
        p <- p - lr * d

    run in float32 on the master copy of float16/bfloat16 parameters and written back in the
    parameter's dtype. State per parameter: ``momentum_buffer`` (float32, when momentum != 0)
    and ``master``; for float32 parameters a ``state_dict()`` is interchangeable with
    torch.optim.SGD's.

    Args:
        params: parameters or param groups (one device; float32, float16 or bfloat16).
        lr: learning rate, a float or a one-element tensor (read on the device).
        momentum, nesterov, weight_decay: as torch.optim.SGD (dampening is always 0).
        master_weights, max_grad_norm: see :class:`fastcore_train.optim.FusedAdamW`.
    """

    _buffer_keys = ("momentum_buffer",)

    def __init__(self, params, lr: Union[float, torch.Tensor], momentum: float = 0.9,
                 nesterov: bool = False, weight_decay: float = 0.0,
                 master_weights: Optional[bool] = None, max_grad_norm: Optional[float] = None):
        # dampening is kept in the groups so that a checkpoint loads into torch.optim.SGD
        defaults = dict(lr=lr, momentum=momentum, dampening=0.0, nesterov=nesterov,
                        weight_decay=weight_decay, master_weights=master_weights,
                        max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        name = type(self).__name__
        if not float(group["momentum"]) >= 0.0:
            raise ValueError(f"{name}: invalid momentum {group['momentum']}")
        if float(group.get("dampening", 0.0)) != 0.0:
            raise ValueError(f"{name} does not support dampening, got {group['dampening']}")
        if group["nesterov"] and not float(group["momentum"]) > 0.0:
            raise ValueError(f"{name}: nesterov needs momentum > 0")

    def _init_state(self, group, p, state):
        if float(group["momentum"]) != 0.0 and state.get("momentum_buffer") is None:
            # zeros == torch's "first step copies d" exactly, because dampening is 0
            state["momentum_buffer"] = self._zeros(p)

    def _update(self, group, params, grads, states, masters, grad_scale, found_inf, sq_norm):
        lr, lr_tensor = self._lr_args(group, params[0].device)
        momentum = float(group["momentum"])
        buffers = [s["momentum_buffer"] for s in states] if momentum != 0.0 else []
        _ops.fused_sgd_(
            params, grads, buffers, masters, lr=lr, lr_tensor=lr_tensor, momentum=momentum,
            nesterov=bool(group["nesterov"]), weight_decay=float(group["weight_decay"]),
            grad_scale=grad_scale, found_inf=found_inf, sq_norm=sq_norm,
            max_grad_norm=float(group["max_grad_norm"] or 0.0))
