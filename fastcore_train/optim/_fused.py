"""What FusedAdamW and FusedSGD share: parameter gathering and checks, fp32 master weights,
the two-pass step, loss-scaling protocols and checkpoint import.

A step is two passes over the gradients (fastcore_train/ops/optim_step.py):

1. ``grad_stats_`` -- only when needed: a non-finite check when the optimizer is driven by
   :class:`fastcore_train.amp.LossScaler`, and the global squared norm when a group clips.
2. One update op per parameter group (two when the group mixes parameters with and without
   master weights): unscale, clip, update on the float32 master, write the model weight.

The found-inf flag, the scale and the norm stay on the device; the update kernels read them, so
no step ever waits for the device.

State per parameter, in ``self.state`` and so in ``state_dict()``: the subclass's float32
buffers (``exp_avg``/``exp_avg_sq``/``step`` for AdamW, ``momentum_buffer`` for SGD, the same
keys and meaning as torch.optim) and ``master``, the float32 master copy of a float16/bfloat16
parameter. The model's parameter is the master rounded to its dtype after every step.
"""
from __future__ import annotations

import copy
from itertools import chain
from typing import Any, Optional

import torch

from fastcore_train.ops import optim_step as _ops

__all__ = ["FusedOptimizer"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HALF = (torch.float16, torch.bfloat16)


def _device_scalar(x, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=device, dtype=torch.float32)
    return torch.tensor(float(x), dtype=torch.float32, device=device)


class FusedOptimizer(torch.optim.Optimizer):
    """Base of the fused mixed-precision optimizers.

    Group options shared by all of them:

    * ``master_weights`` -- ``None`` (default): a float32 master copy for float16/bfloat16
      parameters and none for float32 ones; ``True``/``False`` force it on/off. Without a
      master, a half-precision parameter is updated in float32 and rounded back every step,
      so updates smaller than half an ulp of the weight are lost.
    * ``max_grad_norm`` -- clip to this global norm (over every gradient of the optimizer,
      unscaled), as ``torch.nn.utils.clip_grad_norm_`` would; ``None`` disables it.

    Works with :class:`fastcore_train.amp.LossScaler` (one check pass fused with the norm, skip
    on device) and with ``torch.amp.GradScaler`` (``_step_supports_amp_scaling``: the scaler
    passes ``grad_scale`` and ``found_inf`` and the kernels unscale and skip on the device).

    The master copy is the reference for the weight once it exists: weights loaded into the model
    after the optimizer has stepped are overwritten by the next step unless the optimizer's
    state is loaded as well (``load_state_dict``), which carries the masters.
    """

    # torch.amp.GradScaler: set grad_scale / found_inf on us and call step() without syncing.
    _step_supports_amp_scaling = True
    # float32 per-element state of the subclass (besides "master")
    _buffer_keys: tuple = ()

    def __init__(self, params, defaults: dict):
        self._check_group(defaults)
        # our hyperparameters (torch adds its own keys to self.defaults on load)
        self._group_defaults = dict(defaults)
        super().__init__(params, defaults)

    # ---- subclass hooks ----------------------------------------------------------------------

    def _check_group(self, group: dict) -> None:
        """Raises on hyperparameters the fused step does not support."""
        name = type(self).__name__
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise ValueError(f"{name}: a tensor lr must have one element, got {lr.numel()}")
        elif not float(lr) >= 0.0:
            raise ValueError(f"{name}: invalid learning rate {lr}")
        if not float(group["weight_decay"]) >= 0.0:
            raise ValueError(f"{name}: invalid weight_decay {group['weight_decay']}")
        mgn = group.get("max_grad_norm")
        if mgn is not None and not float(mgn) > 0.0:
            raise ValueError(f"{name}: max_grad_norm must be None or > 0, got {mgn}")
        if group.get("master_weights") not in (None, True, False):
            raise ValueError(f"{name}: master_weights must be None, True or False, got "
                             f"{group.get('master_weights')!r}")
        if group.get("maximize", False):
            raise ValueError(f"{name} does not support maximize=True")

    def _init_state(self, group: dict, p: torch.Tensor, state: dict) -> None:
        """Adds the missing per-parameter buffers to ``state``."""
        raise NotImplementedError

    def _update(self, group, params, grads, states, masters, grad_scale, found_inf, sq_norm):
        """Runs the update op on one group's parameters (all with masters, or none)."""
        raise NotImplementedError

    # ---- param groups ------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    @staticmethod
    def _wants_master(group: dict, p: torch.Tensor) -> bool:
        mw = group.get("master_weights")
        return p.dtype in _HALF if mw is None else bool(mw)

    @staticmethod
    def _zeros(p: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)

    @staticmethod
    def _lr_args(group: dict, device) -> tuple[float, Optional[torch.Tensor]]:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            return 0.0, lr.detach().to(device=device, dtype=torch.float32)
        return float(lr), None

    def _param_state(self, group: dict, p: torch.Tensor) -> dict:
        state = self.state[p]
        self._init_state(group, p, state)
        want = self._wants_master(group, p)
        if want and "master" not in state:
            state["master"] = p.detach().to(torch.float32, copy=True)
        elif not want and "master" in state:
            del state["master"]
        return state

    # ---- the step ----------------------------------------------------------------------------

    def _gather(self):
        """The parameters with a gradient, per group, after checking them."""
        name = type(self).__name__
        work, device = [], None
        for gi, group in enumerate(self.param_groups):
            params = []
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                where = f"parameter {i} of param group {gi}"
                if g.layout != torch.strided:
                    raise TypeError(f"{name}: {where} has a sparse gradient; fused optimizers "
                                    "need dense gradients")
                if p.dtype not in _DTYPES:
                    raise TypeError(f"{name}: {where} is {p.dtype}; fused optimizers support "
                                    "float32, float16 and bfloat16 parameters")
                if g.dtype != p.dtype:
                    raise TypeError(f"{name}: the gradient of {where} is {g.dtype} but the "
                                    f"parameter is {p.dtype}")
                if device is None:
                    device = p.device
                if p.device != device or g.device != device:
                    other = p.device if p.device != device else g.device
                    raise ValueError(f"{name}: {where} or its gradient is on {other} but other "
                                     f"parameters are on {device}; a fused optimizer steps "
                                     "tensors on one device (use one optimizer per device)")
                params.append(p)
            if params:
                work.append((group, params))
        return work, device

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: Optional[torch.Tensor] = None,
             found_inf: Optional[torch.Tensor] = None):
        """One optimizer step.

        ``grad_scale``: the gradients are scaled by it (they are unscaled on the fly, never
        written). ``found_inf``: skip the step, on the device, when it is non-zero. Both default
        to the attributes that ``torch.amp.GradScaler`` sets on optimizers which declare
        ``_step_supports_amp_scaling``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None and found_inf is None:
            grad_scale = getattr(self, "grad_scale", None)
            found_inf = getattr(self, "found_inf", None)
        self._fused_step(grad_scale=grad_scale, found_inf=found_inf, check_finite=False)
        return loss

    @torch.no_grad()
    def _fused_step(self, grad_scale=None, found_inf=None, check_finite=False) -> None:
        """The step proper. With ``check_finite`` the statistics pass sets ``found_inf`` (a
        float32 scalar on the parameters' device, written in place) when a gradient has an
        inf/NaN, and the update skips on it; otherwise ``found_inf`` is only read."""
        work, device = self._gather()
        if not work:
            return
        if grad_scale is not None:
            grad_scale = _device_scalar(grad_scale, device)
        if found_inf is not None and not check_finite:
            found_inf = _device_scalar(found_inf, device)
        clip = any(group.get("max_grad_norm") is not None for group, _ in work)
        sq_norm = torch.zeros((), dtype=torch.float32, device=device) if clip else None
        if (check_finite and found_inf is not None) or clip:
            grads = [p.grad for _, params in work for p in params]
            _ops.grad_stats_(grads, found_inf if check_finite else None, sq_norm)
        for group, params in work:
            states = [self._param_state(group, p) for p in params]
            for with_master in (True, False):
                idx = [i for i, s in enumerate(states) if ("master" in s) == with_master]
                if not idx:
                    continue
                ps = [params[i] for i in idx]
                ss = [states[i] for i in idx]
                masters = [s["master"] for s in ss] if with_master else []
                self._update(group, ps, [p.grad for p in ps], ss, masters, grad_scale,
                             found_inf, sq_norm if group.get("max_grad_norm") else None)

    # ---- checkpoints -------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a checkpoint of this optimizer or of the matching torch.optim one.

        Unlike torch.optim, state tensors are not cast to the parameter's dtype: buffers and
        master weights stay float32 (a bfloat16 master would defeat its purpose). Every tensor
        is copied, so the loaded optimizer never shares memory with ``state_dict``. A master
        missing from the checkpoint is recreated from the parameter at the next step.
        """
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        for group in self.param_groups:
            for k, v in self._group_defaults.items():  # missing from torch.optim's groups
                group.setdefault(k, v)
            self._check_group(group)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params):
            if pid in saved_state:
                self.state[p] = self._import_state(p, saved_state[pid])

    def _import_state(self, p: torch.Tensor, saved: dict) -> dict:
        name = type(self).__name__
        out: dict[str, Any] = {}
        for k, v in saved.items():
            if k == "step":
                out[k] = torch.as_tensor(v).detach().to(device=p.device, dtype=torch.float32,
                                                         copy=True).reshape(())
            elif k in self._buffer_keys or k == "master":
                if v is None:
                    continue
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError(f"{name}: state {k!r} has shape {list(v.shape)} but its "
                                     f"parameter has shape {list(p.shape)}")
                out[k] = self._zeros(p).copy_(v)
            elif isinstance(v, torch.Tensor):
                out[k] = v.detach().to(device=p.device, copy=True)
            else:
                out[k] = copy.deepcopy(v)
        return out
