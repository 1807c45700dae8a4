"""FusedAdamW: torch.optim.AdamW's update in one fused pass, with fp32 master weights."""
from __future__ import annotations

from typing import Optional, Union

import torch

from fastcore_train.ops import optim_step as _ops
from fastcore_train.optim._fused import FusedOptimizer, _number

__all__ = ["FusedAdamW"]


class FusedAdamW(FusedOptimizer):
    """AdamW (decoupled weight decay) with float32 master weights and device-side loss scaling.

    Same signature and defaults as ``torch.optim.AdamW``, plus ``master_weights`` and
    ``max_grad_norm``. The maths are torch.optim.AdamW's, ``amsgrad`` and ``maximize``
    included::

        g   <- -g if maximize else g
        p   <- p * (1 - lr * weight_decay)
        m   <- lerp(m, g, 1 - beta1);   v <- beta2 * v + (1 - beta2) * g * g
        u   <- (vmax <- max(vmax, v)) if amsgrad else v
        p   <- p - lr / (1 - beta1^t) * m / (sqrt(u) / sqrt(1 - beta2^t) + eps)

    run in float32 on the master copy of float16/bfloat16 parameters (see ``master_weights``)
    and written back to the parameter in its dtype, in one pass that reads each gradient once
    (after an optional check/norm pass) and never writes it.

    State per parameter: ``step`` (float32 scalar tensor on the parameter's device),
    ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` with amsgrad (float32) and ``master`` for
    half-precision parameters. For float32 parameters a ``state_dict()`` is interchangeable
    with torch.optim.AdamW's.

    Args:
        params: parameters, named parameters or param groups; every parameter must be on one
            device and be float32, float16 or bfloat16 (checked here, not at the first step).
        lr: learning rate, a float or a one-element tensor (read on the device).
        betas, eps, weight_decay, amsgrad, maximize: as torch.optim.AdamW. Tensor betas are
            accepted and read on the host at each step.
        foreach, fused: accepted and ignored (the step is always this fused one).
        capturable, differentiable: only ``False`` (``True`` is refused here, naming the
            torch.optim alternative).
        master_weights: ``None`` = masters for float16/bfloat16 parameters only; ``True`` /
            ``False`` force them on/off.
        max_grad_norm: clip the global gradient norm to this value (``clip_grad_norm_``
            semantics) inside the step; ``None`` disables clipping.
        ema_decay, ema_warmup: keep an EMA of the weights (state ``ema``, ``ema_step``),
            updated in the step's pass; see :class:`~fastcore_train.optim._fused.
            FusedOptimizer` and :meth:`ema_weights`. ``None``: no EMA.
    """

    _buffer_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _torch_name = "AdamW"

    def __init__(self, params, lr: Union[float, torch.Tensor] = 1e-3,
                 betas: tuple[Union[float, torch.Tensor], ...] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: Optional[bool] = None,
                 capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, master_weights: Optional[bool] = None,
                 max_grad_norm: Optional[float] = None, ema_decay: Optional[float] = None,
                 ema_warmup: bool = False):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=True, master_weights=master_weights,
                        max_grad_norm=max_grad_norm, ema_decay=ema_decay, ema_warmup=ema_warmup)
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        name = type(self).__name__
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2 or \
                not all(0.0 <= _number(name, "betas", b) < 1.0 for b in betas):
            raise ValueError(f"{name}: betas must be two numbers in [0, 1), got {betas}")
        if not _number(name, "eps", group["eps"], tensor_ok=False) >= 0.0:
            raise ValueError(f"{name}: invalid eps {group['eps']}")
        # a torch.optim.Adam checkpoint's L2 penalty is another algorithm
        if not group.get("decoupled_weight_decay", True) and float(group["weight_decay"]) != 0:
            raise ValueError(f"{name} implements decoupled weight decay (AdamW); this group "
                             "uses Adam's L2 penalty (decoupled_weight_decay=False): use "
                             "torch.optim.Adam")

    def _check_state(self, group, p, state, where):
        need = ["step", "exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
        missing = [k for k in need if k not in state]
        if state and missing:
            raise ValueError(f"{type(self).__name__}.load_state_dict: the state of {where} lacks "
                             f"{missing}" + (" (saved with amsgrad=False?)"
                                             if missing == ["max_exp_avg_sq"] else ""))

    def _init_state(self, group, p, state):
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for k in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ()):
            if k not in state:
                state[k] = self._zeros(p)

    def _update(self, group, params, grads, states, masters, grad_scale, found_inf, sq_norm):
        lr, lr_tensor = self._lr_args(group, params[0].device)
        beta1, beta2 = (float(b) for b in group["betas"])
        amsgrad = bool(group["amsgrad"])
        _ops.fused_adamw_(
            params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            masters, [s["step"] for s in states], lr=lr, lr_tensor=lr_tensor, beta1=beta1,
            beta2=beta2, eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
            amsgrad=amsgrad,
            max_exp_avg_sqs=[s["max_exp_avg_sq"] for s in states] if amsgrad else [],
            maximize=bool(group["maximize"]), grad_scale=grad_scale, found_inf=found_inf,
            sq_norm=sq_norm, max_grad_norm=float(group["max_grad_norm"] or 0.0),
            **self._ema_args(group, states))
