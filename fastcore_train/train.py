"""A small fit loop: a convenience for the demo and for users who want one, not a framework.

It takes plain torch objects (any loss callable, optimizer, LR scheduler, DataLoader) and adds
what a modern recipe needs around them: per-step LR scheduling, mixup, autocast, loss scaling,
gradient accumulation, callbacks, DDP (through :mod:`fastcore_train.distributed`), a history and
whole-run checkpoints to resume from (through :mod:`fastcore_train.checkpoint`).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from typing import Callable, Dict, Iterable, Mapping, Optional

import torch
from torch import nn

from fastcore_train import checkpoint, distributed

__all__ = ["fit", "evaluate", "History", "accuracy"]

log = logging.getLogger(__name__)


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose arg-max equals the class index in ``target``."""
    if target.is_floating_point():
        raise TypeError("accuracy needs class-index targets; pass metrics={} to fit() for "
                        "regression")
    return (logits.argmax(dim=-1) == target).float().mean()


class History(list):
    """One dict per epoch; ``history["val_loss"]`` gives a column.

    Keys: ``epoch`` (from 0), ``train_loss`` (on the mixed batches when mixup is on), ``val_loss``
    and ``val_<metric>`` (with a ``val_loader``), ``ema_val_loss`` and ``ema_val_<metric>`` (the
    same with the optimizer's EMA weights, with ``fit(ema=True)``), ``lr`` (param group 0's at the epoch's end),
    ``epoch_time_s`` (training and validation) and ``ms_per_step`` (training time per batch).
    ``meta`` is a dict of facts about the run as a whole (e.g. the lr that
    :func:`~fastcore_train.fit_one_cycle` took from the LR finder); it is checkpointed with it.
    """

    def __init__(self, rows=(), meta: Optional[Mapping] = None):
        super().__init__(rows)
        self.meta = dict(meta or {})

    def __getitem__(self, key):
        if isinstance(key, str):
            return [row.get(key) for row in self]
        return super().__getitem__(key)


def _call(callbacks, hook: str, *args) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)


def _to(batch, device: torch.device):
    return [b.to(device, non_blocking=True) if isinstance(b, torch.Tensor) else b for b in batch]


def _acc_dtype(device: torch.device) -> torch.dtype:
    # float64 sums keep epoch means exact to print precision; MPS has no float64
    return torch.float32 if device.type == "mps" else torch.float64


def _autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def _progress_bar(total: Optional[int], enabled: bool, desc: str):
    # no bar in logs and CI (stderr not a terminal): only the per-epoch summary is printed there
    if not enabled or not getattr(sys.stderr, "isatty", lambda: False)():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # optional: without tqdm only the per-epoch summary is printed
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def fit(model: nn.Module, train_loader: Iterable, *, epochs: int, loss_fn: Callable,
        optimizer: torch.optim.Optimizer, scheduler=None, val_loader: Optional[Iterable] = None,
        mixup: Optional[Callable] = None, scaler=None, amp_dtype: Optional[torch.dtype] = None,
        callbacks=(), grad_accum: int = 1, device=None, progress: bool = True,
        metrics: Optional[Mapping[str, Callable]] = None, checkpoint_dir=None,
        resume: bool = False, meta: Optional[Mapping] = None, ema: bool = False) -> History:
    """Train ``model`` for ``epochs`` epochs and return the :class:`History`.

    - Batches are ``(x, y)``; they are moved to ``device`` (default: the model's).
    - ``mixup(x, y) -> (x, y_mixed)`` is applied to training batches; ``y_mixed`` may be anything
      ``loss_fn`` accepts (e.g. :class:`fastcore_train.nn.MixedTarget`).
    - ``amp_dtype`` (e.g. ``torch.bfloat16``) runs forward and loss under ``torch.autocast``.
    - ``scaler`` has the ``torch.amp.GradScaler`` surface (``scale``, ``step``, ``update``).
    - ``grad_accum`` batches are accumulated per optimizer step; ``scheduler.step()`` is called
      after every optimizer step, not every epoch. Under DDP gradients are synchronised only on
      the step's last batch.
    - ``metrics`` maps names to ``fn(logits, y) -> scalar`` computed on ``val_loader``; the
      default is ``{"accuracy": accuracy}``, pass ``{}`` for none.
    - ``callbacks`` follow :mod:`fastcore_train.callbacks`; training stops after the epoch in
      which any of them sets ``stop_training``.
    - ``checkpoint_dir``: after every epoch the whole run is saved to ``checkpoint_dir/last.pt``
      (atomically; see :mod:`fastcore_train.checkpoint`): model, optimizer (master weights
      included), scheduler, scaler, callbacks' state (those with ``state_dict`` /
      ``load_state_dict``), History, epoch and step counts and the RNG states, including the
      ``torch.Generator`` of the loaders, their samplers and ``mixup``. With ``resume=True`` the
      run continues after the saved epoch (from scratch when there is no checkpoint yet, so one
      command serves the first start and every restart): build the model, optimizer, scheduler,
      scaler, loaders, mixup and callbacks as for the first start and call ``fit`` with the same
      arguments; the parameters and History (but its timings) end as in an uninterrupted run. A
      run that had already ended (all epochs, or stopped by a callback) returns its History.
    - ``meta`` is copied into ``History.meta`` (and so into checkpoints).
    - ``ema=True``: validation runs twice, with the model's weights and with the EMA the optimizer
      keeps (``FusedAdamW``/``FusedSGD`` built with ``ema_decay``, through its ``ema_weights()``),
      reported as ``val_*`` and ``ema_val_*``; buffers (BatchNorm statistics) are the model's in
      both. The EMA is optimizer state, so checkpoints carry it.
    Under DDP (a model wrapped by :func:`fastcore_train.distributed.wrap`) losses and metrics are
    averaged over all ranks' samples, and only rank 0 prints and writes checkpoints.
    """
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs the checkpoint_dir of the run to resume")
    if checkpoint_dir is not None and os.path.exists(checkpoint_dir) and \
            not os.path.isdir(checkpoint_dir):
        raise ValueError(f"checkpoint_dir {checkpoint_dir!r} exists and is not a folder")
    if ema and not (hasattr(optimizer, "ema_weights") and any(
            g.get("ema_decay") is not None for g in optimizer.param_groups)):
        raise ValueError("fit(ema=True) needs an optimizer that keeps an EMA of the weights: "
                         "construct FusedAdamW or FusedSGD with ema_decay=... (e.g. 0.9998)")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    metrics = {"accuracy": accuracy} if metrics is None else dict(metrics)
    callbacks = [callbacks] if not isinstance(callbacks, (list, tuple)) else list(callbacks)
    show = progress and distributed.is_main_process()
    history = History(meta=meta)
    global_step, start_epoch, stopped = 0, 0, False
    generators = checkpoint.generators_of(train=train_loader, val=val_loader, mixup=mixup)

    def optimizer_step():
        nonlocal global_step
        global_step += 1
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()

    _call(callbacks, "set_optimizer", optimizer)
    _call(callbacks, "on_train_begin", model)
    if resume:
        run = checkpoint.load_run(checkpoint_dir, model=model, optimizer=optimizer,
                                  scheduler=scheduler, scaler=scaler, callbacks=callbacks,
                                  epochs=epochs, generators=generators)
        where = checkpoint.checkpoint_path(checkpoint_dir)
        if run is None:
            log.info("no checkpoint at %s: starting from scratch", where)
        else:
            history = History(run["history"], {**run["meta"], **history.meta})
            start_epoch, global_step, stopped = run["epoch"] + 1, run["global_step"], \
                run["stopped"]
            log.info("resumed from %s after epoch %d/%d", where, start_epoch, epochs)
            if show:
                print(f"resumed from {where} after epoch {start_epoch}/{epochs}", flush=True)
    elif checkpoint_dir is not None and os.path.exists(checkpoint.checkpoint_path(checkpoint_dir)):
        log.warning("%s will be replaced by this new run (pass resume=True to continue it)",
                    checkpoint.checkpoint_path(checkpoint_dir))
    # a resumed run that had been stopped by a callback trains no further
    for epoch in range(start_epoch, start_epoch if stopped else epochs):
        _call(callbacks, "on_epoch_begin", epoch)
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler reshuffles per epoch
            sampler.set_epoch(epoch)
        model.train()
        n_batches = len(train_loader) if hasattr(train_loader, "__len__") else None
        # DDP: skip the gradient all-reduce on all but the last batch of an accumulation; only
        # when the loader's length is known, so a trailing partial accumulation is still synced.
        no_sync = getattr(model, "no_sync", None) if n_batches is not None else None
        bar = _progress_bar(n_batches, show, f"epoch {epoch + 1}/{epochs}")
        # Loss sums stay on the device: one host sync per epoch instead of one per step.
        loss_sum = torch.zeros((), device=device, dtype=_acc_dtype(device))
        seen = torch.zeros((), device=device, dtype=_acc_dtype(device))
        stop, pending, n_seen_batches = False, False, 0
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(train_loader):
            x, y = _to(batch, device)
            if mixup is not None:
                x, y = mixup(x, y)
            last_micro = (i + 1) % grad_accum == 0 or i + 1 == n_batches
            sync = no_sync is None or last_micro
            with contextlib.nullcontext() if sync else no_sync():
                with _autocast(device, amp_dtype):
                    loss = loss_fn(model(x), y)
                scaled = loss / grad_accum
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            loss_sum += loss.detach().to(loss_sum.dtype) * x.shape[0]
            seen += x.shape[0]
            n_seen_batches += 1
            pending = not last_micro
            if last_micro:
                optimizer_step()
                _call(callbacks, "on_step_end", global_step, loss.detach())
                stop = any(getattr(cb, "stop_training", False) for cb in callbacks)
            if bar is not None:
                bar.update(1)
                if i % 20 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
            if stop:
                break
        if pending:  # a loader without len() ended mid-accumulation
            optimizer_step()
        train_loss = _global_mean(loss_sum, seen)
        train_time = time.perf_counter() - t0
        if bar is not None:
            bar.close()

        logs = {"epoch": epoch, "train_loss": train_loss}
        if val_loader is not None:
            logs.update(evaluate(model, val_loader, loss_fn, metrics=metrics, device=device,
                                 amp_dtype=amp_dtype))
            if ema:
                with optimizer.ema_weights():
                    ema_logs = evaluate(model, val_loader, loss_fn, metrics=metrics,
                                        device=device, amp_dtype=amp_dtype)
                logs.update({f"ema_{k}": v for k, v in ema_logs.items()})
        logs["lr"] = optimizer.param_groups[0]["lr"]
        logs["epoch_time_s"] = time.perf_counter() - t0
        logs["ms_per_step"] = 1000.0 * train_time / max(n_seen_batches, 1)
        history.append(logs)
        if show:
            print(f"epoch {epoch + 1}/{epochs} " + " ".join(
                f"{k}={v:.4g}" for k, v in logs.items() if k != "epoch"), flush=True)
        _call(callbacks, "on_epoch_end", epoch, logs)
        stopped = any(getattr(cb, "stop_training", False) for cb in callbacks)
        if checkpoint_dir is not None:
            checkpoint.save_run(checkpoint_dir, model=model, optimizer=optimizer,
                                scheduler=scheduler, scaler=scaler, callbacks=callbacks,
                                history=history, meta=history.meta, epoch=epoch, epochs=epochs,
                                global_step=global_step, stopped=stopped, generators=generators)
        if stopped:
            break
    _call(callbacks, "on_train_end", model)
    return history


def _global_mean(total: torch.Tensor, count: torch.Tensor) -> float:
    # Sums and counts are reduced separately so unequal shards still give the sample mean.
    both = distributed.all_reduce_sum(torch.stack([total, count]))
    return float(both[0] / both[1]) if both[1] > 0 else math.nan


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, loss_fn: Callable, *,
             metrics: Optional[Mapping[str, Callable]] = None, device=None,
             amp_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """Mean loss and metrics of ``model`` over ``loader`` (in eval mode, without gradients), as
    ``{"val_loss": .., "val_<metric>": ..}``, averaged over samples and, under DDP, over ranks."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    metrics = {"accuracy": accuracy} if metrics is None else dict(metrics)
    model.eval()
    sums = torch.zeros(len(metrics) + 2, device=device, dtype=_acc_dtype(device))  # loss, .., n
    for batch in loader:
        x, y = _to(batch, device)
        with _autocast(device, amp_dtype):
            out = model(x)
            loss = loss_fn(out, y)
        vals = [loss.detach()] + [torch.as_tensor(fn(out, y), device=device)
                                  for fn in metrics.values()]
        sums[:-1] += torch.stack([v.to(sums.dtype) for v in vals]) * x.shape[0]
        sums[-1] += x.shape[0]
    sums = distributed.all_reduce_sum(sums)
    n = float(sums[-1])
    means = [float(s) / n if n else math.nan for s in sums[:-1]]
    return {"val_loss": means[0], **{f"val_{k}": v for k, v in zip(metrics, means[1:])}}
