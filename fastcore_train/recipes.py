"""fastai's two training entry points, built from this package's parts: :func:`fit_one_cycle`
(the optimizer, the LR finder, :class:`~fastcore_train.schedules.OneCycleLR` with
``preset="fastai"`` and :func:`~fastcore_train.train.fit`) and :func:`fine_tune`
(:mod:`fastcore_train.transfer`'s freezing and discriminative learning rates around two
one-cycle runs). They return the :class:`~fastcore_train.train.History`; every part stays
usable on its own in a hand-written loop.
"""
from __future__ import annotations

import inspect
import logging
import math
import numbers
import os
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from fastcore_train import checkpoint, distributed, schedules, transfer
from fastcore_train.lr_finder import lr_find
from fastcore_train.nn import LabelSmoothingCrossEntropy
from fastcore_train.optim import FusedAdamW
from fastcore_train.train import History, fit

__all__ = ["fit_one_cycle", "fine_tune"]

log = logging.getLogger(__name__)

LR = Union[None, float, slice, Sequence[float]]

# fastai's Learner leaves weight decay off the parameters of these layers and off every bias
# (wd_bn_bias=False, fastai.torch_core.norm_types)
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
               nn.LayerNorm)

# fit arguments the recipes set themselves
_OWN = ("scheduler", "optimizer", "meta")


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_lr(lr_max: LR) -> None:
    if lr_max is None:
        return
    if isinstance(lr_max, slice):
        if lr_max.stop is None or lr_max.step is not None:
            raise ValueError(f"lr_max as a slice is slice(first_group_lr, last_group_lr) or "
                             f"slice(last_group_lr), got {lr_max}")
        _positive("lr_max's stop", lr_max.stop)
        if lr_max.start is not None:
            _positive("lr_max's start", lr_max.start)
    elif isinstance(lr_max, (list, tuple)):
        if not lr_max:
            raise ValueError("lr_max is an empty list")
        for v in lr_max:
            _positive("every lr in lr_max", v)
    else:
        _positive("lr_max (a float, a slice or one lr per group)", lr_max)


def _check_cycle(epochs: Any, div: Any, div_final: Any, pct_start: Any, moms: Any,
                 wd: Any) -> None:
    """The one-cycle arguments, checked before anything is built or changed."""
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    _positive("div", div)
    _positive("div_final", div_final)
    if isinstance(pct_start, bool) or not isinstance(pct_start, numbers.Real) or \
            not 0.0 <= pct_start <= 1.0:
        raise ValueError(f"pct_start must be a number in [0, 1], got {pct_start!r}")
    if moms is not None:
        if not (isinstance(moms, (list, tuple)) and len(moms) == 3 and all(
                isinstance(m, numbers.Real) and not isinstance(m, bool) and 0.0 <= m < 1.0
                for m in moms)):
            raise ValueError(f"moms must be three numbers in [0, 1) (start, middle, end), or "
                             f"None to leave momentum alone; got {moms!r}")
    if isinstance(wd, bool) or not isinstance(wd, numbers.Real) or not \
            (math.isfinite(wd) and wd >= 0):
        raise ValueError(f"wd must be a finite number >= 0, got {wd!r}")


def _check_fit_kwargs(fit_kwargs: dict, who: str, extra: Iterable[str] = ()) -> None:
    """Refuse, before anything changes, what fit would refuse after the recipe has started."""
    own = [k for k in _OWN if k in fit_kwargs]
    if own:
        raise TypeError(f"{who} sets {own} itself; build your own with the parts "
                        "(schedules.OneCycleLR, fit) to choose them")
    known = set(inspect.signature(fit).parameters) | set(extra)
    unknown = sorted(k for k in fit_kwargs if k not in known)
    if unknown:
        raise TypeError(f"{who} got unexpected keyword argument(s) {unknown}")


def _no_decay_ids(model: nn.Module) -> set:
    ids = set()
    for m in model.modules():
        if isinstance(m, _NORM_TYPES):
            ids.update(id(p) for p in m.parameters(recurse=False))
        bias = getattr(m, "bias", None)
        if isinstance(bias, nn.Parameter):
            ids.add(id(bias))
    return ids


def _default_param_groups(model: nn.Module, lr: LR, groups: Optional[Sequence], wd: float,
                          wd_bn_bias: bool) -> list:
    """Param groups for the default optimizer: one per layer group with trainable parameters
    (lr spread as :func:`transfer.discriminative_lrs` does), each split in two when the norm
    layers' parameters and the biases are kept out of weight decay."""
    inner = getattr(model, "module", model)
    if groups is None:
        # a single lr needs no layer groups (and a model without children has none)
        per_group = isinstance(lr, (slice, list, tuple))
        groups = transfer.layer_groups(inner) if per_group else [inner]
    pgs = transfer.discriminative_lrs(inner, lr, groups)
    if not pgs:
        raise ValueError("no parameter of the model is trainable (is it all frozen?)")
    skip = set() if wd_bn_bias else _no_decay_ids(inner)
    out = []
    for pg in pgs:
        decay = [p for p in pg["params"] if id(p) not in skip]
        rest = [p for p in pg["params"] if id(p) in skip]
        out += [{"params": ps, "lr": pg["lr"], "weight_decay": w}
                for ps, w in ((decay, wd), (rest, 0.0)) if ps]
    return out


def _suggested_lr(model, train_loader, loss_fn, optimizer, fit_kwargs, lr_find_kwargs,
                  show: bool) -> tuple[float, dict]:
    kwargs = dict(scaler=fit_kwargs.get("scaler"),
                  accumulation_steps=fit_kwargs.get("grad_accum", 1),
                  progress=fit_kwargs.get("progress", True))
    kwargs.update(lr_find_kwargs or {})
    found = lr_find(model, train_loader, loss_fn, optimizer, **kwargs)
    if found.suggestion is None:
        raise RuntimeError(f"lr_find gave no suggestion ({found!r}); pass lr_max")
    info = {"suggestion": found.suggestion, "suggestions": dict(found.suggestions),
            "stop_reason": found.stop_reason, "steps": len(found.lrs)}
    rule = next(k for k, v in found.suggestions.items() if v == found.suggestion)
    log.info("fit_one_cycle: lr_max=%.3g from lr_find (%s rule, %s)", found.suggestion, rule,
             found.stop_reason)
    if show:
        print(f"fit_one_cycle: lr_max={found.suggestion:.3g} from lr_find ({rule} rule)",
              flush=True)
    return found.suggestion, info


def fit_one_cycle(model: nn.Module, train_loader: Iterable, epochs: int, lr_max: LR = None, *,
                  val_loader: Optional[Iterable] = None, loss_fn: Optional[Callable] = None,
                  optimizer: Optional[torch.optim.Optimizer] = None, div: float = 25.0,
                  div_final: float = 1e5, pct_start: float = 0.25,
                  moms: Optional[Sequence[float]] = (0.95, 0.85, 0.95), wd: float = 1e-2,
                  mixup: Optional[Callable] = None, groups: Optional[Sequence] = None,
                  wd_bn_bias: bool = False, lr_find_kwargs: Optional[dict] = None,
                  **fit_kwargs) -> History:
    """Train ``epochs`` epochs with fastai's one-cycle policy (``Learner.fit_one_cycle``).

    The lr follows fastai's ``combined_cos`` per optimizer step: cosine from
    ``lr_max / div`` up to ``lr_max`` over the first ``pct_start`` of the steps, then cosine down
    to ``lr_max / div_final``; the momentum (SGD) or beta1 (Adam family) goes from ``moms[0]``
    to ``moms[1]`` and back to ``moms[2]`` (``moms=None`` leaves it alone). See
    :class:`~fastcore_train.schedules.OneCycleLR` with ``preset="fastai"``.

    ``lr_max``: a float; a ``slice(first, last)`` (rates spread geometrically over the layer
    groups) or ``slice(last)`` (the last group at ``last``, the others at ``last / 10``); one
    float per group; or ``None``: :func:`~fastcore_train.lr_find` runs first (it leaves the model
    and optimizer as they were) and its suggestion is used; ``History.meta`` records the lr and
    where it came from (``meta["lr_max_from"]``, ``meta["lr_find"]``), and the choice is logged.
    ``lr_find_kwargs`` go to ``lr_find``.

    ``optimizer=None`` builds fastai's: Adam with decoupled weight decay ``wd`` (our
    :class:`~fastcore_train.optim.FusedAdamW`, ``betas=(moms[0], 0.99)``, ``eps=1e-5``), one
    param group per layer group (``groups``, default :func:`transfer.layer_groups` when
    ``lr_max`` varies by group) holding the trainable parameters, and, unless
    ``wd_bn_bias=True``, no weight decay on biases and on BatchNorm/InstanceNorm/LayerNorm
    parameters (fastai's default). A given ``optimizer`` keeps its param groups and weight
    decay (``wd``, ``groups``, ``wd_bn_bias`` do not apply); a slice or list ``lr_max`` is
    spread over its param groups.

    ``loss_fn=None`` is cross-entropy, fused (:class:`~fastcore_train.nn.
    LabelSmoothingCrossEntropy` with no smoothing; it takes :class:`~fastcore_train.Mixup`'s
    targets). Every other keyword (``callbacks``, ``scaler``, ``amp_dtype``, ``grad_accum``,
    ``device``, ``progress``, ``metrics``, ``checkpoint_dir``, ``resume``) goes to
    :func:`~fastcore_train.fit`. Resuming a run whose lr came from the LR finder takes the
    lr from the checkpoint instead of searching again. Returns the History.
    """
    _check_fit_kwargs(fit_kwargs, "fit_one_cycle")
    _check_cycle(epochs, div, div_final, pct_start, moms, wd)
    _check_lr(lr_max)
    if optimizer is not None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if groups is not None:
            raise ValueError("groups applies to the default optimizer; a given optimizer's "
                             "param groups are the groups")
        if moms is not None and not {"momentum", "betas"} & set(optimizer.defaults):
            raise ValueError(f"{type(optimizer).__name__} has neither momentum nor betas to "
                             "cycle; pass moms=None")
    if fit_kwargs.get("resume") and fit_kwargs.get("checkpoint_dir") is None:
        raise ValueError("resume=True needs the checkpoint_dir of the run to resume")
    grad_accum = fit_kwargs.get("grad_accum", 1)
    try:
        steps = schedules.steps_per_epoch(train_loader, grad_accum)
    except TypeError:
        raise TypeError("fit_one_cycle needs a loader with a length: the cycle is planned over "
                        "epochs x batches") from None
    if steps == 0:
        raise ValueError("train_loader is empty")
    if loss_fn is None:
        loss_fn = LabelSmoothingCrossEntropy(0.0)
    show = fit_kwargs.get("progress", True) and distributed.is_main_process()

    saved = None
    if fit_kwargs.get("resume") and fit_kwargs.get("checkpoint_dir") is not None:
        saved = checkpoint.read_checkpoint(fit_kwargs["checkpoint_dir"], mmap=True)
    saved_meta = dict(saved["meta"]) if saved is not None else {}
    # a resumed run continues with the saved lrs (its scheduler state holds them anyway)
    resumed_lrs = saved_meta.get("lr_max")
    finding = lr_max is None and resumed_lrs is None

    if optimizer is None:
        beta1 = moms[0] if moms is not None else 0.9
        # the finder sweeps a uniform lr; its suggestion replaces this one
        build_lr = 1e-3 if lr_max is None else lr_max
        optimizer = FusedAdamW(_default_param_groups(model, build_lr, groups, wd, wd_bn_bias),
                               betas=(beta1, 0.99), eps=1e-5, weight_decay=wd)
        max_lrs = [float(g["lr"]) for g in optimizer.param_groups]
    elif lr_max is not None:
        max_lrs = transfer.group_lrs(lr_max, len(optimizer.param_groups))
    else:
        max_lrs = [float(g["lr"]) for g in optimizer.param_groups]

    if resumed_lrs is not None:
        if len(resumed_lrs) != len(optimizer.param_groups):
            raise ValueError(f"the checkpoint's run had {len(resumed_lrs)} param groups, this "
                             f"one has {len(optimizer.param_groups)}")
        max_lrs, meta = [float(v) for v in resumed_lrs], saved_meta
    else:
        meta = {"recipe": "fit_one_cycle", "lr_max_from": "argument"}
        if finding:
            found, meta["lr_find"] = _suggested_lr(model, train_loader, loss_fn, optimizer,
                                                   fit_kwargs, lr_find_kwargs, show)
            meta["lr_max_from"] = "lr_find"
            # lr_find sweeps the largest group and keeps the others' ratios to it
            top = max(max_lrs)
            max_lrs = [found * (v / top if top > 0 else 1.0) for v in max_lrs]
        meta.update(lr_max=max_lrs, div=float(div), div_final=float(div_final),
                    pct_start=float(pct_start),
                    moms=None if moms is None else [float(m) for m in moms])

    cyc = {} if moms is None else dict(max_momentum=moms[0], base_momentum=moms[1],
                                      final_momentum=moms[2])
    sched = schedules.OneCycleLR(optimizer, max_lrs, total_steps=epochs * steps, preset="fastai",
                                 pct_start=pct_start, div_factor=div, final_div_factor=div_final,
                                 cycle_momentum=moms is not None, **cyc)
    return fit(model, train_loader, epochs=epochs, loss_fn=loss_fn, optimizer=optimizer,
               scheduler=sched, val_loader=val_loader, mixup=mixup, meta=meta, **fit_kwargs)


def fine_tune(model: nn.Module, train_loader: Iterable, epochs: int, base_lr: float = 2e-3, *,
              freeze_epochs: int = 1, lr_mult: float = 100, pct_start: float = 0.3,
              div: float = 5.0, groups: Optional[Sequence] = None, train_bn: bool = True,
              checkpoint_dir=None, resume: bool = False, **kwargs) -> History:
    """Fine-tune a pretrained model as fastai's ``Learner.fine_tune`` does.

    1. Freeze every layer group but the last (the head; ``groups`` defaults to
       :func:`transfer.layer_groups`; BatchNorm layers per ``train_bn``, see
       :func:`transfer.freeze`) and :func:`fit_one_cycle` for ``freeze_epochs`` epochs with
       ``lr_max=slice(base_lr)`` (head at ``base_lr``, trainable parameters of other groups at
       ``base_lr / 10``) and ``pct_start=0.99``.
    2. Halve ``base_lr``, unfreeze everything and :func:`fit_one_cycle` for ``epochs`` epochs
       with ``lr_max=slice(base_lr / lr_mult, base_lr)``, ``pct_start`` and ``div``, with a
       fresh optimizer (fastai clears the optimizer's state when it unfreezes).

    Other keywords (``val_loader``, ``loss_fn``, ``div_final``, ``moms``, ``wd``, ``mixup``,
    ``callbacks``, ``scaler``, ``amp_dtype``, ...) go to both :func:`fit_one_cycle` calls.
    Returns one History: the frozen epochs then the unfrozen ones, numbered on from 0, each row
    with ``"phase"`` (``"frozen"``/``"unfrozen"``); ``meta`` holds each phase's.

    ``checkpoint_dir``: phase 1 checkpoints to ``checkpoint_dir/frozen``, phase 2 to
    ``checkpoint_dir/unfrozen``. With ``resume=True``: if phase 2 has a checkpoint, phase 1 is
    done (its History is read from its checkpoint) and phase 2 continues; otherwise phase 1
    continues (or, complete, only reloads its final state) and phase 2 starts. Under DDP the
    frozen parameters get no gradient: wrap the model with ``find_unused_parameters=True``.
    """
    for bad in ("optimizer", "lr_max", "scheduler", "meta"):
        if bad in kwargs:
            raise TypeError(f"fine_tune sets {bad} itself (one per phase)")
    _positive("base_lr", base_lr)
    _positive("lr_mult", lr_mult)
    if isinstance(freeze_epochs, bool) or not isinstance(freeze_epochs, numbers.Integral) or \
            freeze_epochs < 0:
        raise ValueError(f"freeze_epochs must be an integer >= 0, got {freeze_epochs!r}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs the checkpoint_dir of the run to resume")
    cycle = {k: kwargs[k] for k in ("div_final", "moms", "wd") if k in kwargs}
    _check_cycle(epochs, div, cycle.get("div_final", 1e5), pct_start,
                 cycle.get("moms", (0.95, 0.85, 0.95)), cycle.get("wd", 1e-2))
    _check_fit_kwargs(kwargs, "fine_tune", extra=[
        k for k, p in inspect.signature(fit_one_cycle).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in ("optimizer", "pct_start",
                                                                  "div", "groups")])
    inner = getattr(model, "module", model)
    groups = transfer.layer_groups(inner) if groups is None else list(groups)
    if len(groups) < 2:
        raise ValueError(f"fine_tune needs at least two layer groups (a body to freeze and a "
                         f"head), got {len(groups)}")

    def phase_dir(name):
        return None if checkpoint_dir is None else os.path.join(os.fspath(checkpoint_dir), name)

    frozen_done = None
    if resume and checkpoint.read_checkpoint(phase_dir("unfrozen"), mmap=True) is not None:
        saved = checkpoint.read_checkpoint(phase_dir("frozen"), mmap=True)
        frozen_done = History(saved["history"], saved["meta"]) if saved else History()
    if frozen_done is not None:
        first = frozen_done
    elif freeze_epochs > 0:
        transfer.freeze_to(inner, -1, groups, train_bn=train_bn)
        first = fit_one_cycle(model, train_loader, freeze_epochs, slice(base_lr),
                              pct_start=0.99, groups=groups, checkpoint_dir=phase_dir("frozen"),
                              resume=resume, **kwargs)
    else:
        first = History()
    base_lr = base_lr / 2
    transfer.unfreeze(inner)
    second = fit_one_cycle(model, train_loader, epochs, slice(base_lr / lr_mult, base_lr),
                           pct_start=pct_start, div=div, groups=groups,
                           checkpoint_dir=phase_dir("unfrozen"), resume=resume, **kwargs)
    rows = [dict(r, phase="frozen") for r in first]
    rows += [dict(r, phase="unfrozen", epoch=r["epoch"] + len(first)) for r in second]
    return History(rows, {"recipe": "fine_tune", "frozen": first.meta,
                          "unfrozen": second.meta})
