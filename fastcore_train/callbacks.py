"""A tiny callback protocol for :func:`fastcore_train.train.fit`, early stopping and checkpoints.

``fit`` calls whichever of these methods a callback has (subclassing :class:`Callback` is
optional)::

    set_optimizer(optimizer)    on_train_begin(model)       on_epoch_begin(epoch)
    on_step_end(step, loss)     on_epoch_end(epoch, logs)   on_train_end(model)

``step`` counts optimizer steps from 1 over the whole run; ``loss`` is the step's detached loss
tensor (call ``.item()`` only when needed: it synchronises with the GPU); ``logs`` is the epoch's
row of the history, e.g. ``{"train_loss": .., "val_loss": .., "val_accuracy": .., "lr": ..}``.
Training ends after the epoch in which a callback sets ``stop_training``; set in
``on_step_end``, it also cuts that epoch short (validation still runs).

A callback with state that a resumed run needs (counters, best values) also has
``state_dict() -> dict`` (plain data: tensors, numbers, strings, containers) and
``load_state_dict(state)``; ``fit(..., checkpoint_dir=...)`` saves it after every epoch, after
``on_epoch_end``, and ``fit(..., resume=True)`` loads it after ``on_train_begin``.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, Optional

import torch

from fastcore_train import checkpoint, distributed

__all__ = ["Callback", "EarlyStopping", "Checkpoint"]

log = logging.getLogger(__name__)


class Callback:
    """Base class with no-op hooks; override the ones you need."""
    stop_training: bool = False

    def set_optimizer(self, optimizer: torch.optim.Optimizer) -> None: ...
    def on_train_begin(self, model: torch.nn.Module) -> None: ...
    def on_epoch_begin(self, epoch: int) -> None: ...
    def on_step_end(self, step: int, loss: torch.Tensor) -> None: ...
    def on_epoch_end(self, epoch: int, logs: Dict[str, float]) -> None: ...
    def on_train_end(self, model: torch.nn.Module) -> None: ...


class _Monitor:
    """Tracks the best value of ``logs[monitor]``; under DDP the value is averaged over ranks
    first, so every rank sees the same number and takes the same decision."""

    def __init__(self, monitor: str, mode: str, min_delta: float):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        self.monitor, self.mode, self.min_delta = monitor, mode, float(min_delta)
        self.reset()

    def reset(self) -> None:
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch: Optional[int] = None

    def value(self, logs: Dict[str, float]) -> float:
        if self.monitor not in logs:
            raise KeyError(f"{type(self).__name__} monitors {self.monitor!r}, which is not among "
                           f"the logged metrics {sorted(logs)} (no val_loader?)")
        v = torch.tensor(float(logs[self.monitor]), dtype=torch.float64)
        return float(distributed.all_reduce_mean(v))

    def improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta


class EarlyStopping(Callback, _Monitor):
    """Stop when ``logs[monitor]`` has not improved by more than ``min_delta`` for ``patience``
    epochs, or at once when it is NaN/inf. With ``restore_best`` the model gets the weights of its
    best epoch back at the end of training (kept on the CPU meanwhile, to spare GPU memory).
    Under DDP the metric is averaged across ranks so all ranks stop at the same epoch.

    Outside :func:`~fastcore_train.train.fit`, call ``on_epoch_end(epoch, {"val_loss": v})`` each
    epoch and stop when ``stop_training`` is set (``on_train_begin(model)`` and
    ``on_train_end(model)`` add the best-weights restore).

    ``optimizer`` (``fit`` passes its own through ``set_optimizer``): after restoring the best
    weights, an optimizer that keeps float32 master weights (``FusedAdamW``/``FusedSGD`` with
    float16/bfloat16 parameters) gets them refreshed from the restored weights
    (``sync_masters_from_params``); otherwise its next step would write the last epoch's
    weights back.
    """

    def __init__(self, monitor: str = "val_loss", mode: str = "min", patience: int = 3,
                 min_delta: float = 0.0, restore_best: bool = True,
                 optimizer: Optional[torch.optim.Optimizer] = None):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        _Monitor.__init__(self, monitor, mode, min_delta)
        self.patience, self.restore_best = patience, restore_best
        self.optimizer = optimizer
        self.on_train_begin(None)

    def set_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer whose master weights follow a restore (``fit`` calls this)."""
        self.optimizer = optimizer

    def on_train_begin(self, model: Optional[torch.nn.Module]) -> None:
        """Start afresh; ``model`` is the one whose best weights are kept (``None``: none)."""
        self.model = model
        self.reset()
        self.wait = 0
        self.best_state: Optional[dict] = None
        self.stop_training = False
        self.stopped_epoch: Optional[int] = None
        self.reason: Optional[str] = None

    def on_epoch_end(self, epoch: int, logs: Dict[str, float]) -> None:
        value = self.value(logs)
        if not math.isfinite(value):
            self._stop(epoch, f"{self.monitor} is {value}")
            return
        if self.improved(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best and self.model is not None:
                self.best_state = {k: v.detach().to("cpu", copy=True)
                                   for k, v in self.model.state_dict().items()}
            return
        self.wait += 1
        if self.wait >= self.patience:
            self._stop(epoch, f"no improvement of {self.monitor} for {self.wait} epochs")

    _STATE = ("best", "best_epoch", "wait", "best_state", "stop_training", "stopped_epoch",
              "reason")

    def state_dict(self) -> dict:
        """The counters, the best value and epoch, the best weights (if kept) and the stop."""
        return {k: getattr(self, k) for k in self._STATE}

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in self._STATE if k not in state]
        if missing:
            raise ValueError(f"EarlyStopping.load_state_dict: the state lacks {missing}")
        for k in self._STATE:
            setattr(self, k, state[k])

    def _stop(self, epoch: int, reason: str) -> None:
        self.stop_training, self.stopped_epoch, self.reason = True, epoch, reason
        if distributed.is_main_process():
            log.info("early stopping at epoch %d: %s (best %s=%.6g at epoch %s)", epoch, reason,
                     self.monitor, self.best, self.best_epoch)

    def on_train_end(self, model: torch.nn.Module) -> None:
        if self.restore_best and self.best_state is not None:
            model.load_state_dict(self.best_state)
            sync = getattr(self.optimizer, "sync_masters_from_params", None)
            if sync is not None:
                sync()


class Checkpoint(Callback, _Monitor):
    """Save ``model.state_dict()`` to ``path`` whenever ``logs[monitor]`` improves, and, with
    ``last_path``, after every epoch. Only rank 0 writes; a DDP wrapper's ``module.`` prefix is
    left out (the inner model is saved). Files are replaced atomically, so a crash mid-write never
    leaves a truncated checkpoint. ``monitor=None`` saves to ``path`` every epoch.
    """

    def __init__(self, path: str, monitor: Optional[str] = "val_loss", mode: str = "min",
                 min_delta: float = 0.0, last_path: Optional[str] = None):
        _Monitor.__init__(self, monitor or "", mode, min_delta)
        self.path, self.last_path, self.use_monitor = path, last_path, monitor is not None

    def on_train_begin(self, model: torch.nn.Module) -> None:
        self.model = getattr(model, "module", model)
        self.reset()

    def on_epoch_end(self, epoch: int, logs: Dict[str, float]) -> None:
        save_best = True
        if self.use_monitor:
            value = self.value(logs)  # every rank takes part in the reduction
            save_best = math.isfinite(value) and self.improved(value)
            if save_best:
                self.best, self.best_epoch = value, epoch
        if distributed.is_main_process():
            if save_best:
                self._save(self.path)
            if self.last_path is not None:
                self._save(self.last_path)

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]

    def _save(self, path: str) -> None:
        checkpoint.atomic_save(self.model.state_dict(), path)
