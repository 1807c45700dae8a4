"""FusedAdamW: torch.optim.AdamW's update in one fused pass, with fp32 master weights."""
from __future__ import annotations

from typing import Optional, Union

import torch

from fastcore_train.ops import optim_step as _ops
from fastcore_train.optim._fused import FusedOptimizer

__all__ = ["FusedAdamW"]


class FusedAdamW(FusedOptimizer):
    """AdamW (decoupled weight decay) with float32 master weights and device-side loss scaling.

    The maths are torch.optim.AdamW's (``amsgrad=False, maximize=False``)::

        p   <- p * (1 - lr * weight_decay)
        m   <- lerp(m, g, 1 - beta1);   v <- beta2 * v + (1 - beta2) * g * g
        p   <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    run in float32 on the master copy of float16/bfloat16 parameters (see ``master_weights``)
    and written back to the parameter in its dtype, in one pass that reads each gradient once
    (after an optional check/norm pass) and never writes it.

    State per parameter: ``step`` (float32 scalar tensor on the parameter's device),
    ``exp_avg``, ``exp_avg_sq`` (float32) and ``master`` for half-precision parameters. For
    float32 parameters a ``state_dict()`` is interchangeable with torch.optim.AdamW's.

    Args:
        params: parameters or param groups; every parameter with a gradient must be on one
            device and be float32, float16 or bfloat16.
        lr: learning rate, a float or a one-element tensor (read on the device).
        betas, eps, weight_decay: as torch.optim.AdamW.
        master_weights: ``None`` = masters for float16/bfloat16 parameters only; ``True`` /
            ``False`` force them on/off.
        max_grad_norm: clip the global gradient norm to this value (``clip_grad_norm_``
            semantics) inside the step; ``None`` disables clipping.
    """

    _buffer_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: Union[float, torch.Tensor] = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, master_weights: Optional[bool] = None,
                 max_grad_norm: Optional[float] = None):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        master_weights=master_weights, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        name = type(self).__name__
        betas = group["betas"]
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise ValueError(f"{name}: betas must be two numbers in [0, 1), got {betas}")
        if not float(group["eps"]) >= 0.0:
            raise ValueError(f"{name}: invalid eps {group['eps']}")
        # keys of a torch.optim.Adam/AdamW checkpoint we cannot honour
        if group.get("amsgrad", False):
            raise ValueError(f"{name} does not support amsgrad=True")
        if not group.get("decoupled_weight_decay", True) and float(group["weight_decay"]) != 0:
            raise ValueError(f"{name} implements decoupled weight decay (AdamW); this group "
                             "uses Adam's L2 penalty (decoupled_weight_decay=False)")

    def _init_state(self, group, p, state):
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for k in self._buffer_keys:
            if k not in state:
                state[k] = self._zeros(p)

    def _update(self, group, params, grads, states, masters, grad_scale, found_inf, sq_norm):
        lr, lr_tensor = self._lr_args(group, params[0].device)
        beta1, beta2 = (float(b) for b in group["betas"])
        _ops.fused_adamw_(
            params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            masters, [s["step"] for s in states], lr=lr, lr_tensor=lr_tensor, beta1=beta1,
            beta2=beta2, eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
            grad_scale=grad_scale, found_inf=found_inf, sq_norm=sq_norm,
            max_grad_norm=float(group["max_grad_norm"] or 0.0))
