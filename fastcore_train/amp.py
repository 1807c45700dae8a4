"""Dynamic loss scaling whose scale, growth tracker and found-inf flags stay on the device.

:class:`LossScaler` has the surface of ``torch.amp.GradScaler`` (``scale``, ``unscale_``,
``step``, ``update``, ``get_scale``, ``state_dict``, ``load_state_dict``) and produces the same
sequence of scales. What ``step(optimizer)`` does depends on the optimizer:

* **FusedAdamW / FusedSGD** (:class:`fastcore_train.optim.FusedOptimizer`): the scale and a
  fresh found-inf flag go to the fused step. Its first pass checks every gradient for inf/NaN
  (and computes the clipping norm in the same read); its update pass unscales on the fly and
  skips itself on the device when the flag is set. The gradients are never written (``.grad``
  keeps the scaled values) and the host never waits for the device.
* **Optimizers declaring** ``_step_supports_amp_scaling`` (torch's ``fused=True`` Adam, AdamW,
  SGD): the gradients are unscaled in place and checked in one pass
  (``torch._amp_foreach_non_finite_check_and_unscale_``); the optimizer receives the flag as
  ``found_inf`` and skips on the device. No sync either.
* **Any other optimizer**: the same unscale pass, then one host read of the flag to decide
  whether to call ``optimizer.step()`` -- exactly what ``torch.amp.GradScaler`` does. Skipping an
  arbitrary optimizer's step without that read would require a copy of all its state; on a CPU
  the read is free, on a GPU it waits for the backward pass to finish.

``unscale_(optimizer)`` always unscales ``.grad`` in place (for gradient inspection or custom
clipping); a later ``step`` then reuses its flag and does not unscale again.
"""
from __future__ import annotations

import enum
from collections import defaultdict
from typing import Any, Iterable, Optional, Union

import torch

from fastcore_train.optim import FusedOptimizer

__all__ = ["LossScaler"]


class _Stage(enum.Enum):
    READY = 0
    UNSCALED = 1
    STEPPED = 2


def _new_state() -> dict:
    return {"stage": _Stage.READY, "found_inf": {}}


class LossScaler:
    """Dynamic loss scaling, device-resident, with ``torch.amp.GradScaler``'s interface.

    The scale starts at ``init_scale``; a step whose gradients contain inf/NaN is skipped and
    multiplies it by ``backoff_factor``; ``growth_interval`` consecutive clean steps multiply it
    by ``growth_factor``. ``enabled=False`` makes every method a pass-through.

    Typical use::

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

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000,
                 enabled: bool = True) -> None:
        if isinstance(init_scale, str):  # GradScaler("cuda", ...) habits
            raise TypeError(f"LossScaler takes no device argument (got {init_scale!r} as "
                            "init_scale): the scale lives on the device of the first loss it "
                            "scales")
        if not growth_factor > 1.0:
            raise ValueError(f"LossScaler: growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"LossScaler: backoff_factor must be in (0, 1), got {backoff_factor}")
        if int(growth_interval) != growth_interval or growth_interval < 1:
            raise ValueError(f"LossScaler: growth_interval must be a positive integer, got "
                             f"{growth_interval}")
        self._enabled = bool(enabled)
        self._init_scale = float(init_scale)
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = int(growth_interval)
        self._init_growth_tracker = 0
        self._scale: Optional[torch.Tensor] = None           # float32 scalar, on the device
        self._growth_tracker: Optional[torch.Tensor] = None  # int32 scalar, on the device
        self._per_optimizer: dict = defaultdict(_new_state)

    # ---- scaling -------------------------------------------------------------------------------

    def _lazy_init(self, device: torch.device) -> None:
        self._scale = torch.full((), self._init_scale, dtype=torch.float32, device=device)
        self._growth_tracker = torch.full((), self._init_growth_tracker, dtype=torch.int32,
                                          device=device)

    def _require_scale(self, what: str) -> torch.Tensor:
        if self._scale is None:
            raise RuntimeError(f"LossScaler: {what} before any scale(loss); call "
                               "scaler.scale(loss).backward() earlier in the iteration")
        return self._scale

    def scale(self, outputs: Union[torch.Tensor, Iterable]) -> Any:
        """``outputs`` (a tensor or a nested list/tuple of tensors) times the current scale."""
        if not self._enabled:
            return outputs
        if isinstance(outputs, torch.Tensor):
            if self._scale is None:
                self._lazy_init(outputs.device)
            return outputs * self._scale.to(device=outputs.device, non_blocking=True)
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        raise TypeError("LossScaler.scale: outputs must be a tensor or a list/tuple of tensors")

    @property
    def scale_tensor(self) -> Optional[torch.Tensor]:
        """The scale as a device tensor (no sync), or None before the first ``scale``."""
        return self._scale

    def get_scale(self) -> float:
        """The current scale as a Python float. This reads the device (a sync on a GPU)."""
        if not self._enabled:
            return 1.0
        return self._init_scale if self._scale is None else float(self._scale.item())

    def is_enabled(self) -> bool:
        return self._enabled

    # ---- unscale / step / update ---------------------------------------------------------------

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divides the optimizer's gradients by the scale in place and records whether any is
        inf/NaN (one pass, no sync). At most once per optimizer between two ``update()``."""
        if not self._enabled:
            return
        scale = self._require_scale("unscale_")
        state = self._per_optimizer[id(optimizer)]
        if state["stage"] is _Stage.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the "
                               "last update().")
        if state["stage"] is _Stage.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        # the reciprocal in float64, as GradScaler does (exact for powers of two anyway)
        inv_scale = scale.double().reciprocal().float()
        by_device: dict = defaultdict(lambda: defaultdict(list))
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    g = p.grad
                    if g is None:
                        continue
                    if g.is_sparse:
                        if g.dtype == torch.float16:
                            p.grad = g = g.coalesce()
                        g = g._values()
                    by_device[g.device][g.dtype].append(g)
            found = {}
            for device, per_dtype in by_device.items():
                found[device] = torch.zeros((), dtype=torch.float32, device=device)
                inv = inv_scale.to(device, non_blocking=True)
                for grads in per_dtype.values():
                    torch._amp_foreach_non_finite_check_and_unscale_(grads, found[device], inv)
        state["found_inf"] = found
        state["stage"] = _Stage.UNSCALED

    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs):
        """Steps ``optimizer`` unless its gradients hold inf/NaN (see the module docstring for
        how each kind of optimizer skips). Returns what ``optimizer.step`` returns (None when
        the step is fused or skipped)."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not supported if LossScaler is enabled.")
        scale = self._require_scale("step")
        state = self._per_optimizer[id(optimizer)]
        if state["stage"] is _Stage.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")

        retval = None
        if isinstance(optimizer, FusedOptimizer):
            device = self._grad_device(optimizer, scale.device)
            if state["stage"] is _Stage.READY:
                found = torch.zeros((), dtype=torch.float32, device=device)
                optimizer._fused_step(grad_scale=scale.to(device, non_blocking=True),
                                      found_inf=found, check_finite=True)
                state["found_inf"] = {device: found}
            else:
                optimizer._fused_step(grad_scale=None,
                                      found_inf=self._combined(state, device),
                                      check_finite=False)
        else:
            if state["stage"] is _Stage.READY:
                self.unscale_(optimizer)
            if not state["found_inf"]:
                raise RuntimeError("LossScaler: the optimizer has no gradients to step with.")
            if getattr(optimizer, "_step_supports_amp_scaling", False):
                optimizer.grad_scale = None  # already unscaled
                optimizer.found_inf = self._combined(state, scale.device)
                try:
                    retval = optimizer.step(*args, **kwargs)
                finally:
                    del optimizer.grad_scale
                    del optimizer.found_inf
            elif not float(sum(f.item() for f in state["found_inf"].values())):
                # one host read per step: the only way to skip an arbitrary optimizer without
                # a copy of its state (torch.amp.GradScaler does the same)
                retval = optimizer.step(*args, **kwargs)
        state["stage"] = _Stage.STEPPED
        return retval

    @staticmethod
    def _grad_device(optimizer, default: torch.device) -> torch.device:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    return p.device
        return default

    @staticmethod
    def _combined(state: dict, device: torch.device) -> torch.Tensor:
        flags = [f.to(device, non_blocking=True) for f in state["found_inf"].values()]
        if not flags:
            return torch.zeros((), dtype=torch.float32, device=device)
        total = flags[0]
        for f in flags[1:]:
            total = total + f
        return total

    def update(self, new_scale: Optional[Union[float, torch.Tensor]] = None) -> None:
        """Backs the scale off if any optimizer step of this iteration was skipped, grows it
        after ``growth_interval`` clean steps (``torch._amp_update_scale_``, on the device), or
        sets it to ``new_scale``. Call once per iteration, after every ``step``."""
        if not self._enabled:
            return
        scale = self._require_scale("update")
        if new_scale is not None:
            if isinstance(new_scale, torch.Tensor):
                if new_scale.numel() != 1 or new_scale.requires_grad:
                    raise ValueError("LossScaler.update: new_scale must be a float or a "
                                     "one-element tensor that does not require grad")
                scale.copy_(new_scale.reshape(()))
            else:
                scale.fill_(float(new_scale))
        else:
            flags = [f.to(scale.device, non_blocking=True)
                     for st in self._per_optimizer.values() for f in st["found_inf"].values()]
            if not flags:
                raise RuntimeError("LossScaler.update: no optimizer step was recorded since "
                                   "the last update()")
            found = flags[0]
            for f in flags[1:]:
                found = found + f
            torch._amp_update_scale_(scale, self._growth_tracker, found, self._growth_factor,
                                     self._backoff_factor, self._growth_interval)
        self._per_optimizer = defaultdict(_new_state)

    # ---- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The same keys as ``torch.amp.GradScaler.state_dict()``, so checkpoints interchange.
        Reads the device once (call it at checkpoint time, after ``update()``)."""
        if not self._enabled:
            return {}
        tracker = (self._init_growth_tracker if self._growth_tracker is None
                   else int(self._growth_tracker.item()))
        return {"scale": self.get_scale(), "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
                "_growth_tracker": tracker}

    def load_state_dict(self, state_dict: dict) -> None:
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise RuntimeError("LossScaler.load_state_dict: the state dict is empty, possibly "
                               "saved from a disabled scaler")
        self._init_scale = float(state_dict["scale"])
        self._growth_factor = float(state_dict["growth_factor"])
        self._backoff_factor = float(state_dict["backoff_factor"])
        self._growth_interval = int(state_dict["growth_interval"])
        self._init_growth_tracker = int(state_dict["_growth_tracker"])
        if self._scale is not None:
            self._scale.fill_(self._init_scale)
        if self._growth_tracker is not None:
            self._growth_tracker.fill_(self._init_growth_tracker)
