"""Dynamic loss scaling for the fused optimizers: ``torch.amp.GradScaler`` with a fused step.

:class:`LossScaler` is a ``torch.amp.GradScaler`` (code that type-checks or configures one takes
it) and produces the same sequence of scales. It changes only what the fused optimizers need:

* ``step(optimizer)`` with a **FusedAdamW / FusedSGD**
  (:class:`fastcore_train.optim.FusedOptimizer`) hands the optimizer the scale and a fresh
  found-inf flag and calls ``optimizer.step()`` (so step hooks run and LR schedulers count the
  step). The step's first pass checks every gradient for inf/NaN (and computes the clipping
  norm in the same read); its update pass unscales on the fly and skips itself on the device
  when the flag is set. The gradients are never written (``.grad`` keeps the scaled values)
  and the host never waits for the device. GradScaler would first run a separate check pass
  that also rewrites every gradient.
* ``unscale_`` also unscales float16 gradients (GradScaler refuses them): float16 parameters
  with float32 master weights are what the fused optimizers are for, and clipping by hand needs
  their unscaled gradients.
* ``device`` may be left out (``None``): the scale lives on the device of the first loss it
  scales. GradScaler's default is ``"cuda"``, which disables it on a machine without CUDA.

Every other optimizer gets exactly GradScaler's behaviour: optimizers declaring
``_step_supports_amp_scaling`` (torch's ``fused=True`` Adam, AdamW, SGD) receive the flag and
skip on the device; any other one is stepped after one host read of the flag.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch.amp.grad_scaler import OptState

from fastcore_train.optim import FusedOptimizer

__all__ = ["LossScaler"]


class LossScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` whose ``step`` runs the fused optimizers' own check-and-skip.

    Same arguments and defaults as ``torch.amp.GradScaler`` except ``device=None`` (the device
    of the first scaled loss). Typical use::

        scaler = ft.amp.LossScaler()
        opt = ft.optim.FusedAdamW(model.parameters(), lr=1e-3, max_grad_norm=1.0)
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type, dtype=torch.float16):
                loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)     # check + clip + unscale + AdamW + fp16 write-back, no sync
            scaler.update()
    """

    def __init__(self, device: Optional[Union[str, torch.device]] = None,
                 init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000,
                 enabled: bool = True) -> None:
        if device is not None and not isinstance(device, (str, torch.device)):
            raise TypeError(f"LossScaler: the first argument is the device, as in "
                            f"torch.amp.GradScaler(device, init_scale, ...); got {device!r} (pass "
                            "init_scale by keyword)")
        if isinstance(device, torch.device):
            device = device.type
        # "cpu" stands in for "not known yet": GradScaler only compares it with "cuda"
        super().__init__("cpu" if device is None else device, init_scale, growth_factor,
                         backoff_factor, growth_interval, enabled)
        self._device = device

    def _lazy_init_scale_growth_tracker(self, dev: torch.device) -> None:
        if self._device is None:
            self._device = dev.type
        super()._lazy_init_scale_growth_tracker(dev)

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, True)

    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs):
        """GradScaler's ``step``; for a fused optimizer, through its own check-and-skip (see the
        module docstring). Returns what ``optimizer.step`` returns."""
        if not (self._enabled and isinstance(optimizer, FusedOptimizer)):
            return super().step(optimizer, *args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        scale, _ = self._check_scale_growth_tracker("step")
        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        device = next((p.device for g in optimizer.param_groups for p in g["params"]
                       if p.grad is not None), scale.device)
        if state["stage"] is OptState.READY:
            found = torch.zeros((), dtype=torch.float32, device=device)
            state["found_inf_per_device"] = {device: found}
            optimizer.grad_scale = scale.to(device, non_blocking=True)
            optimizer.found_inf = found
            optimizer._found_inf_is_output = True  # the step's check pass sets it
        else:  # unscale_ has unscaled the gradients and recorded the flags
            flags = [f.to(device, non_blocking=True)
                     for f in state["found_inf_per_device"].values()]
            optimizer.grad_scale = None
            optimizer.found_inf = sum(flags[1:], flags[0]) if flags else \
                torch.zeros((), dtype=torch.float32, device=device)
        try:
            retval = optimizer.step(*args, **kwargs)
        finally:
            del optimizer.grad_scale, optimizer.found_inf
            optimizer.__dict__.pop("_found_inf_is_output", None)
        state["stage"] = OptState.STEPPED
        return retval
