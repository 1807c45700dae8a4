"""Learning-rate scaling, warmup, cyclical and one-cycle schedules.

Every schedule here is a :class:`torch.optim.lr_scheduler.LRScheduler` stepped once per optimizer
step. The values are closed-form in the step index and every parameter of the schedule lives on
the scheduler (not in the optimizer's param groups), so ``state_dict()`` is plain data and
resuming from it is exact even on a freshly built optimizer.

:class:`OneCycleLR` and :class:`CyclicLR` reproduce the lr and momentum (or Adam's beta1)
sequences of their namesakes in ``torch.optim.lr_scheduler`` bit for bit, with two differences:
OneCycleLR holds its final value when stepped past the end (one warning) instead of raising, and
it offers named presets.
"""
from __future__ import annotations

import logging
import math
import numbers
import os
import sys
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.optim.lr_scheduler as _torch_sched
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = [
    "scale_lr",
    "global_batch_size",
    "steps_per_epoch",
    "warmup",
    "WarmupLR",
    "CyclicLR",
    "OneCycleLR",
    "ONE_CYCLE_PRESETS",
]

logger = logging.getLogger(__name__)

FloatOrList = Union[float, Sequence[float]]


# --------------------------------------------------------------------------------------------
# Batch-size arithmetic and LR scaling
# --------------------------------------------------------------------------------------------

def _resolve_world_size(world_size: Optional[int]) -> int:
    if world_size is not None:
        if not isinstance(world_size, numbers.Integral) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        return int(world_size)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def global_batch_size(batch_size: int, accumulation_steps: int = 1,
                      world_size: Optional[int] = None) -> int:
    """Samples per optimizer step: ``batch_size × world_size × accumulation_steps``.

    ``batch_size`` is the per-process micro-batch. ``world_size`` defaults to
    ``torch.distributed.get_world_size()`` when a process group is initialised, else 1.
    """
    batch_size = _positive_int("batch_size", batch_size)
    accumulation_steps = _positive_int("accumulation_steps", accumulation_steps)
    world = _resolve_world_size(world_size)
    total = batch_size * world * accumulation_steps
    logger.info("global batch size = %d (batch) x %d (world size) x %d (accumulation) = %d",
                batch_size, world, accumulation_steps, total)
    return total


# Substrings of optimizer class names. Adaptive methods (Adam family, LAMB, RMSprop, ...) follow
# the square-root rule (Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient
# Algorithms"); SGD-like methods the linear rule (Goyal et al. 2017, "Accurate, Large Minibatch
# SGD"). Adaptive names are tested first so that e.g. "FusedAdamW" never matches an SGD entry.
_SQRT_NAMES = ("adam", "lamb", "adagrad", "adadelta", "rmsprop", "adafactor")
_LINEAR_NAMES = ("sgd", "lars")


def _rule_for(optimizer: Union[Optimizer, type, str, None]) -> str:
    if optimizer is None:
        raise ValueError("scale_lr(rule='auto') needs the optimizer (an instance, a class or a "
                         "name such as 'AdamW'), or pass rule='linear' or rule='sqrt'")
    if isinstance(optimizer, str):
        name = optimizer
    elif isinstance(optimizer, type):
        name = optimizer.__name__
    else:
        name = type(optimizer).__name__
    lowered = name.lower()
    if any(key in lowered for key in _SQRT_NAMES):
        return "sqrt"
    if any(key in lowered for key in _LINEAR_NAMES):
        return "linear"
    # An unknown class: its defaults tell adaptive (betas) from momentum methods.
    defaults = getattr(optimizer, "defaults", None)
    if isinstance(defaults, dict):
        if "betas" in defaults:
            return "sqrt"
        if "momentum" in defaults:
            return "linear"
    raise ValueError(f"scale_lr(rule='auto') cannot tell the scaling rule for optimizer "
                     f"{name!r}; pass rule='linear' (SGD-like) or rule='sqrt' (Adam-like)")


def scale_lr(base_lr: float, global_batch_size: int, base_batch_size: int = 256,
             rule: str = "auto",
             optimizer: Union[Optimizer, type, str, None] = None) -> float:
    """Scale a learning rate tuned at ``base_batch_size`` to ``global_batch_size``.

    ``rule="linear"`` multiplies by ``global / base`` (SGD, Goyal et al. 2017);
    ``rule="sqrt"`` by ``sqrt(global / base)`` (Adam-family, Malladi et al. 2022).
    ``rule="auto"`` picks from ``optimizer``: an optimizer instance, class, or class name
    (``"AdamW"``, ``"sgd"``, ``"FusedAdamW"``). Compute ``global_batch_size`` with
    :func:`global_batch_size`. The calculation is logged at INFO level.
    """
    if not (isinstance(base_lr, numbers.Real) and base_lr > 0 and math.isfinite(base_lr)):
        raise ValueError(f"base_lr must be a positive finite number, got {base_lr!r}")
    global_batch_size = _positive_int("global_batch_size", global_batch_size)
    base_batch_size = _positive_int("base_batch_size", base_batch_size)
    if rule == "auto":
        resolved = _rule_for(optimizer)
    elif rule in ("linear", "sqrt"):
        resolved = rule
    else:
        raise ValueError(f"rule must be 'auto', 'linear' or 'sqrt', got {rule!r}")
    ratio = global_batch_size / base_batch_size
    factor = ratio if resolved == "linear" else math.sqrt(ratio)
    lr = float(base_lr) * factor
    logger.info("scale_lr (%s rule%s): %g x %s(%d / %d) = %g x %.6g = %g",
                resolved, " (auto)" if rule == "auto" else "", base_lr,
                "" if resolved == "linear" else "sqrt", global_batch_size, base_batch_size,
                base_lr, factor, lr)
    return lr


def steps_per_epoch(loader_or_len: Any, accumulation_steps: int = 1,
                    world_size: Optional[int] = None, drop_last: bool = False,
                    batch_size: Optional[int] = None) -> int:
    """Optimizer steps one process takes per epoch.

    ``loader_or_len`` is either

    * a sized loader (e.g. a ``DataLoader``): ``len(loader)`` is already the number of batches
      this process iterates (its own ``drop_last`` and a ``DistributedSampler`` are accounted
      for), so ``world_size`` is not applied again; or
    * an int: the number of *samples* when ``batch_size`` is given, else the number of batches
      of the whole dataset on one process. It is divided over ``world_size`` processes the way
      ``DistributedSampler`` does (padded up, or cut down when ``drop_last``), then into batches.

    Gradient accumulation turns ``accumulation_steps`` batches into one step. ``drop_last``
    says whether incomplete units are dropped — the last shard remainder and partial batch
    (for an int) and the trailing partial accumulation window — or count as one more.
    """
    accumulation_steps = _positive_int("accumulation_steps", accumulation_steps)
    if isinstance(loader_or_len, numbers.Integral) and not isinstance(loader_or_len, bool):
        n = int(loader_or_len)
        if n < 0:
            raise ValueError(f"the dataset length must be >= 0, got {n}")
        world = _resolve_world_size(world_size)
        per_rank = n // world if drop_last else -(-n // world)
        if batch_size is not None:
            batch_size = _positive_int("batch_size", batch_size)
            batches = per_rank // batch_size if drop_last else -(-per_rank // batch_size)
        else:
            batches = per_rank
    else:
        try:
            batches = len(loader_or_len)
        except TypeError:
            raise TypeError("steps_per_epoch needs a sized loader or an int, got "
                            f"{type(loader_or_len).__name__} (an IterableDataset loader has no "
                            "length: pass the number of batches)") from None
        if batch_size is not None:
            raise ValueError("batch_size applies only when loader_or_len is a number of samples")
    steps = batches // accumulation_steps if drop_last else -(-batches // accumulation_steps)
    return steps


# --------------------------------------------------------------------------------------------
# Shared scheduler machinery
# --------------------------------------------------------------------------------------------

def _per_group(name: str, optimizer: Optimizer, value: Any) -> list[float]:
    groups = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != groups:
            raise ValueError(f"{name} has {len(value)} values but the optimizer has {groups} "
                             f"param groups")
        values = list(value)
    else:
        values = [value] * groups
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            v = v.item()
        if not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{name} must be finite numbers, got {v!r}")
        out.append(v)
    return out


def _caller_stacklevel() -> int:
    """``stacklevel`` for warnings.warn that points at the code that stepped the scheduler.

    The depth of torch's LRScheduler.step machinery differs between torch versions, so count
    the frames of this module and torch's scheduler module instead of hard-coding it.
    """
    internal = {os.path.normcase(os.path.abspath(f))
                for f in (__file__, _torch_sched.__file__)}
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.normcase(os.path.abspath(frame.f_code.co_filename)) \
            in internal:
        frame, level = frame.f_back, level + 1
    return level


def _set_group_value(group: dict, key: str, value: float) -> None:
    # Tensor lrs (capturable / compiled optimizers) must be updated in place, not replaced.
    if isinstance(group.get(key), torch.Tensor):
        group[key].fill_(value)
    else:
        group[key] = value


class _ClosedFormScheduler(LRScheduler):
    """Base: lr and momentum are pure functions of the step index (``last_epoch``)."""

    cycle_momentum: bool = False
    use_beta1: bool = False

    def _setup_momentum(self, optimizer: Optimizer, cycle_momentum: bool,
                        base_momentum: FloatOrList, max_momentum: FloatOrList) -> None:
        self.cycle_momentum = bool(cycle_momentum)
        if not self.cycle_momentum:
            return
        if "momentum" not in optimizer.defaults and "betas" not in optimizer.defaults:
            raise ValueError(f"{type(optimizer).__name__} has neither 'momentum' nor 'betas'; "
                             "pass cycle_momentum=False")
        # Adam-family optimizers cycle beta1, like torch's schedulers do.
        self.use_beta1 = "betas" in optimizer.defaults
        self.base_momentums = _per_group("base_momentum", optimizer, base_momentum)
        self.max_momentums = _per_group("max_momentum", optimizer, max_momentum)

    def _values(self, step: int) -> tuple[list[float], Optional[list[float]]]:
        """(lrs, momentums or None) at ``step``; no side effects."""
        raise NotImplementedError

    def _apply_momentum(self, momentums: Optional[list[float]]) -> None:
        if momentums is None:
            return
        for group, m in zip(self.optimizer.param_groups, momentums):
            if self.use_beta1:
                group["betas"] = (m, *group["betas"][1:])
            else:
                group["momentum"] = m

    def _on_step(self, step: int) -> None:
        """Hook for per-step checks (warnings) before the values are computed."""

    def get_lr(self) -> list[float]:
        """The lrs at the current step; also writes the momentum/beta1 (like torch does)."""
        self._on_step(self.last_epoch)
        lrs, momentums = self._values(self.last_epoch)
        self._apply_momentum(momentums)
        return lrs

    def _get_closed_form_lr(self) -> list[float]:
        # Used by the deprecated ``step(epoch)`` path; the closed form is get_lr itself.
        return self.get_lr()

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state: the step count and every schedule parameter."""
        return {k: v for k, v in self.__dict__.items()
                if k != "optimizer" and not callable(v)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the state and write the current lr/momentum into the optimizer's groups.

        Writing them back makes the resume exact even when the optimizer's own state was not
        (or not yet) restored.
        """
        self.__dict__.update(state_dict)
        _, momentums = self._values(self.last_epoch)
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            _set_group_value(group, "lr", float(lr))
        self._apply_momentum(momentums)


# --------------------------------------------------------------------------------------------
# CyclicLR
# --------------------------------------------------------------------------------------------

class CyclicLR(_ClosedFormScheduler):
    """Cyclical learning rates (Smith 2017, arXiv:1506.01186), stepped per optimizer step.

    The lr moves between ``base_lr`` and ``max_lr`` over cycles of ``step_size_up`` rising
    steps and ``step_size_down`` (default: same) falling steps. Policies: ``"triangular"``
    (constant amplitude), ``"triangular2"`` (amplitude halves each cycle), ``"exp_range"``
    (amplitude × ``gamma**step``); or a custom ``scale_fn(x) -> [0, 1]`` evaluated on the cycle
    number or the step (``scale_mode``). Momentum (SGD) or beta1 (Adam family) cycles inversely
    between ``max_momentum`` and ``base_momentum`` when ``cycle_momentum``.

    Arguments mirror :class:`torch.optim.lr_scheduler.CyclicLR`, and so do the values: equal
    arguments give the same lr and momentum at every step. A custom ``scale_fn`` is not part of
    ``state_dict()``; pass it again when rebuilding the scheduler.
    """

    def __init__(self, optimizer: Optimizer, base_lr: FloatOrList, max_lr: FloatOrList,
                 step_size_up: int = 2000, step_size_down: Optional[int] = None,
                 mode: str = "triangular", gamma: float = 1.0,
                 scale_fn: Optional[Callable[[float], float]] = None,
                 scale_mode: str = "cycle", cycle_momentum: bool = True,
                 base_momentum: FloatOrList = 0.8, max_momentum: FloatOrList = 0.9,
                 last_epoch: int = -1) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        if scale_fn is None and mode not in ("triangular", "triangular2", "exp_range"):
            raise ValueError(f"mode must be 'triangular', 'triangular2' or 'exp_range' (or pass "
                             f"scale_fn), got {mode!r}")
        if scale_mode not in ("cycle", "iterations"):
            raise ValueError(f"scale_mode must be 'cycle' or 'iterations', got {scale_mode!r}")
        up = float(step_size_up)
        down = up if step_size_down is None else float(step_size_down)
        if up <= 0 or down < 0:
            raise ValueError(f"step_size_up must be > 0 and step_size_down >= 0, got "
                             f"{step_size_up!r}, {step_size_down!r}")
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma!r}")
        self.cycle_base_lrs = _per_group("base_lr", optimizer, base_lr)
        self.max_lrs = _per_group("max_lr", optimizer, max_lr)
        self.total_size = up + down
        self.step_ratio = up / self.total_size
        self.mode = mode
        self.gamma = float(gamma)
        self._scale_fn_custom = scale_fn
        # The built-in policies fix the scale mode; only a custom scale_fn may choose it.
        if scale_fn is None:
            self.scale_mode = "iterations" if mode == "exp_range" else "cycle"
        else:
            self.scale_mode = scale_mode
        self._setup_momentum(optimizer, cycle_momentum, base_momentum, max_momentum)
        if last_epoch == -1:
            for group, lr in zip(optimizer.param_groups, self.cycle_base_lrs):
                _set_group_value(group, "lr", lr)
                group["initial_lr"] = lr
        super().__init__(optimizer, last_epoch)

    def _scale(self, x: float) -> float:
        if self._scale_fn_custom is not None:
            return self._scale_fn_custom(x)
        if self.mode == "triangular":
            return 1.0
        if self.mode == "triangular2":
            return 1 / 2.0 ** (x - 1)
        return self.gamma ** x

    def _values(self, step: int) -> tuple[list[float], Optional[list[float]]]:
        # Position inside the current cycle as a fraction x in [0, 1); the amplitude factor
        # rises linearly to 1 at x = step_ratio and falls back to 0 at x = 1. The operations
        # are ordered as in torch so the floats agree bit for bit.
        cycle = math.floor(1 + step / self.total_size)
        x = 1.0 + step / self.total_size - cycle
        if x <= self.step_ratio:
            height = x / self.step_ratio
        else:
            height = (x - 1) / (self.step_ratio - 1)
        scale = self._scale(cycle if self.scale_mode == "cycle" else step)
        lrs = [lo + (hi - lo) * height * scale
               for lo, hi in zip(self.cycle_base_lrs, self.max_lrs)]
        momentums = None
        if self.cycle_momentum:
            momentums = [hi - (hi - lo) * height * scale
                         for lo, hi in zip(self.base_momentums, self.max_momentums)]
        return lrs, momentums


# --------------------------------------------------------------------------------------------
# OneCycleLR
# --------------------------------------------------------------------------------------------

#: Named OneCycleLR configurations. "torch" is torch.optim.lr_scheduler.OneCycleLR's defaults;
#: "fastai" is fastai's fit_one_cycle (defaults *and* conventions, see OneCycleLR); "smith"
#: follows Smith (2018, arXiv:1803.09820): a symmetric linear cycle between max_lr/10 and max_lr
#: over 90 % of training, then a linear annihilation phase far below the cycle's low end.
ONE_CYCLE_PRESETS: dict[str, dict[str, Any]] = {
    "torch": dict(pct_start=0.3, div_factor=25.0, final_div_factor=1e4,
                  anneal_strategy="cos", three_phase=False),
    "fastai": dict(pct_start=0.25, div_factor=25.0, final_div_factor=1e5,
                   anneal_strategy="cos", three_phase=False),
    "smith": dict(pct_start=0.45, div_factor=10.0, final_div_factor=1e4,
                  anneal_strategy="linear", three_phase=True),
}


def _anneal_cos(start: float, end: float, frac: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * frac) + 1)


def _anneal_linear(start: float, end: float, frac: float) -> float:
    return (end - start) * frac + start


class OneCycleLR(_ClosedFormScheduler):
    """The 1cycle policy (Smith & Topin 2017, arXiv:1708.07120), stepped per optimizer step.

    The lr warms from ``max_lr / div_factor`` to ``max_lr`` over ``pct_start`` of the
    ``total_steps`` and anneals (``"cos"`` or ``"linear"``) to its final value; momentum (SGD)
    or beta1 (Adam family) moves the other way, ``max_momentum -> base_momentum ->
    final_momentum`` (0.95 -> 0.85 -> 0.95; ``final_momentum`` defaults to ``max_momentum``).
    ``three_phase=True`` anneals back to the start lr over a second ``pct_start`` and then
    down to the final lr.

    ``preset`` ("torch", "fastai", "smith"; see :data:`ONE_CYCLE_PRESETS`) fills
    ``pct_start``, ``div_factor``, ``final_div_factor``, ``anneal_strategy`` and
    ``three_phase``; any of them given explicitly wins. The length is ``total_steps`` or
    ``epochs × steps_per_epoch`` (see :func:`steps_per_epoch`).

    The "torch" and "smith" presets follow torch's conventions: the final lr is
    ``max_lr / div_factor / final_div_factor``, reached at step ``total_steps - 1``, and the lr
    and momentum equal those of :class:`torch.optim.lr_scheduler.OneCycleLR` at every step
    ``0 .. total_steps - 1`` (the steps an optimizer uses). (torch extrapolates the last phase
    at ``total_steps``, which is negative for linear annealing.)

    The "fastai" preset follows fastai's ``fit_one_cycle`` (``combined_cos``): step ``t`` sits
    at position ``pos = t / total_steps``; the first phase covers ``pos < pct_start`` and runs
    from ``max_lr / div_factor`` to ``max_lr``, the second from ``max_lr`` to
    ``max_lr / final_div_factor`` (fastai's ``div_final`` divides ``max_lr`` itself), reached
    at ``pos = 1``, i.e. after the last step. It has two phases (``three_phase`` is refused).

    From ``total_steps`` on the value is held at the final one, and stepping past the point
    where torch raises emits one warning.
    """

    def __init__(self, optimizer: Optimizer, max_lr: FloatOrList,
                 total_steps: Optional[int] = None, epochs: Optional[int] = None,
                 steps_per_epoch: Optional[int] = None, pct_start: Optional[float] = None,
                 anneal_strategy: Optional[str] = None, cycle_momentum: bool = True,
                 base_momentum: FloatOrList = 0.85, max_momentum: FloatOrList = 0.95,
                 div_factor: Optional[float] = None, final_div_factor: Optional[float] = None,
                 three_phase: Optional[bool] = None, last_epoch: int = -1, *,
                 preset: str = "torch",
                 final_momentum: Optional[FloatOrList] = None) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        if preset not in ONE_CYCLE_PRESETS:
            raise ValueError(f"preset must be one of {sorted(ONE_CYCLE_PRESETS)}, got {preset!r}")
        cfg = dict(ONE_CYCLE_PRESETS[preset])
        for key, value in (("pct_start", pct_start), ("div_factor", div_factor),
                           ("final_div_factor", final_div_factor),
                           ("anneal_strategy", anneal_strategy), ("three_phase", three_phase)):
            if value is not None:
                cfg[key] = value
        self.preset = preset

        if total_steps is not None:
            self.total_steps = _positive_int("total_steps", total_steps)
        elif epochs is not None and steps_per_epoch is not None:
            self.total_steps = (_positive_int("epochs", epochs)
                                * _positive_int("steps_per_epoch", steps_per_epoch))
        else:
            raise ValueError("give total_steps, or epochs and steps_per_epoch")

        pct = cfg["pct_start"]
        if not isinstance(pct, numbers.Real) or not 0.0 <= pct <= 1.0:
            raise ValueError(f"pct_start must be a number in [0, 1], got {pct!r}")
        self.three_phase = bool(cfg["three_phase"])
        # fastai's schedule is combined_cos: two phases on the position t / total_steps
        self.convention = "fastai" if preset == "fastai" else "torch"
        if self.three_phase and self.convention == "fastai":
            raise ValueError("preset='fastai' is fastai's two-phase schedule; three_phase needs "
                             "preset='torch' or 'smith'")
        if self.three_phase and pct > 0.5:
            raise ValueError(f"three_phase needs pct_start <= 0.5 (the rise and the fall each "
                             f"take pct_start), got {pct}")
        if cfg["anneal_strategy"] not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got "
                             f"{cfg['anneal_strategy']!r}")
        self.anneal_strategy = cfg["anneal_strategy"]
        div, final_div = float(cfg["div_factor"]), float(cfg["final_div_factor"])
        if not (div > 0 and final_div > 0):
            raise ValueError(f"div_factor and final_div_factor must be > 0, got {div}, "
                             f"{final_div}")
        self.pct_start, self.div_factor, self.final_div_factor = float(pct), div, final_div

        self.max_lrs = _per_group("max_lr", optimizer, max_lr)
        self.initial_lrs = [m / div for m in self.max_lrs]
        # torch divides the start lr by final_div_factor; fastai divides max_lr (div_final)
        self.min_lrs = [(m if self.convention == "fastai" else i) / final_div
                        for m, i in zip(self.max_lrs, self.initial_lrs)]

        # Phases: (end of the phase, lr from, lr to, momentum from, momentum to); the names
        # index the per-group lists. torch's ends are step indices (last step of the phase),
        # computed as torch computes them; fastai's are positions t / total_steps.
        T = self.total_steps
        if self.convention == "fastai":
            self._phases = [
                (float(pct), "initial", "max", "max", "base"),
                (1.0, "max", "min", "base", "final"),
            ]
        elif self.three_phase:
            self._phases = [
                (float(pct * T) - 1, "initial", "max", "max", "base"),
                (float(2 * pct * T) - 2, "max", "initial", "base", "max"),
                (T - 1, "initial", "min", "max", "final"),
            ]
        else:
            self._phases = [
                (float(pct * T) - 1, "initial", "max", "max", "base"),
                (T - 1, "max", "min", "base", "final"),
            ]
        self._warned_past_end = False
        self._setup_momentum(optimizer, cycle_momentum, base_momentum, max_momentum)
        if self.cycle_momentum:
            self.final_momentums = (list(self.max_momentums) if final_momentum is None else
                                    _per_group("final_momentum", optimizer, final_momentum))
        if last_epoch == -1:
            for group, lr in zip(optimizer.param_groups, self.initial_lrs):
                group["initial_lr"] = lr
        super().__init__(optimizer, last_epoch)

    def _lr_list(self, name: str) -> list[float]:
        return {"initial": self.initial_lrs, "max": self.max_lrs, "min": self.min_lrs}[name]

    def _mom_list(self, name: str) -> list[float]:
        if name == "final":  # absent from states saved before final_momentum existed
            return getattr(self, "final_momentums", self.max_momentums)
        return self.max_momentums if name == "max" else self.base_momentums

    def _on_step(self, step: int) -> None:
        # torch accepts last_epoch == total_steps (the step after the last optimizer step) and
        # raises beyond; we keep going at the final value and say so once.
        if step > self.total_steps and not self._warned_past_end:
            self._warned_past_end = True
            warnings.warn(f"OneCycleLR stepped {step} times but total_steps is "
                          f"{self.total_steps}; holding the final learning rate "
                          f"{self._values(step)[0]}", UserWarning,
                          stacklevel=_caller_stacklevel())

    def _values(self, step: int) -> tuple[list[float], Optional[list[float]]]:
        if getattr(self, "convention", "torch") == "fastai":
            # combined_cos: phase i covers pct_i <= pos < pct_{i+1}; pos = 1 is the final value
            where = min(step, self.total_steps) / self.total_steps
            strict = True
        else:
            where = min(step, self.total_steps - 1)
            strict = False
        anneal = _anneal_cos if self.anneal_strategy == "cos" else _anneal_linear
        start = 0.0
        last = len(self._phases) - 1
        for i, (end, lr_a, lr_b, mom_a, mom_b) in enumerate(self._phases):
            if (where < end if strict else where <= end) or i == last:
                span = end - start
                # A zero-length phase (degenerate pct_start/total_steps) is already complete.
                frac = (where - start) / span if span != 0 else 1.0
                break
            start = end
        lrs = [anneal(a, b, frac) for a, b in zip(self._lr_list(lr_a), self._lr_list(lr_b))]
        momentums = None
        if self.cycle_momentum:
            momentums = [anneal(a, b, frac)
                         for a, b in zip(self._mom_list(mom_a), self._mom_list(mom_b))]
        return lrs, momentums


# --------------------------------------------------------------------------------------------
# Warmup
# --------------------------------------------------------------------------------------------

class WarmupLR(LRScheduler):
    """A warmup of ``steps`` optimizer steps in front of another schedule (or a constant lr).

    For step ``t < steps`` the lr is ``target × f(t)``, where ``target`` is the wrapped
    scheduler's first lr (or the optimizer's lr when there is none) and

    * ``mode="linear"``: ``f(t) = s + (1 - s) · t / steps``, default ``s = 1 / (steps + 1)``
      (so the ramp is ``1/(steps+1), 2/(steps+1), …`` and never wastes a step at lr 0);
    * ``mode="exp"``: ``f(t) = s ** (1 - t / steps)``, default ``s = 0.01``, a geometric ramp.

    At ``t = steps`` it hands over: the lr is the wrapped scheduler's step-0 value and every
    later ``step()`` steps the wrapped scheduler, so the composite is the wrapped schedule
    delayed by ``steps``. During the warmup the momentum is whatever the wrapped scheduler set
    at its step 0. ``state_dict()`` carries the wrapped scheduler's state too.
    """

    def __init__(self, optimizer: Optimizer, steps: int, mode: str = "linear",
                 scheduler: Optional[LRScheduler] = None, start_factor: Optional[float] = None,
                 last_epoch: int = -1) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"warmup steps must be an integer >= 0, got {steps!r}")
        if mode not in ("linear", "exp"):
            raise ValueError(f"warmup mode must be 'linear' or 'exp', got {mode!r}")
        if start_factor is None:
            start_factor = 1.0 / (steps + 1) if mode == "linear" else 0.01
        # A geometric ramp cannot start at 0; a linear one can.
        low_ok = start_factor >= 0.0 if mode == "linear" else start_factor > 0.0
        if not (low_ok and start_factor <= 1.0):
            raise ValueError(f"start_factor must be in {'[0' if mode == 'linear' else '(0'}, 1] "
                             f"for mode={mode!r}, got {start_factor!r}")
        if scheduler is not None:
            if not isinstance(scheduler, LRScheduler):
                raise TypeError(f"scheduler must be an LRScheduler, got "
                                f"{type(scheduler).__name__}")
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                raise TypeError("ReduceLROnPlateau is stepped on a metric and cannot be "
                                "wrapped; warm up with warmup(optimizer, steps) and keep the "
                                "plateau scheduler separate")
            if scheduler.optimizer is not optimizer:
                raise ValueError("the wrapped scheduler belongs to a different optimizer")
            if scheduler.last_epoch != 0:
                raise ValueError(f"wrap a freshly built scheduler (its last_epoch is "
                                 f"{scheduler.last_epoch}, expected 0)")
            targets = [float(lr) for lr in scheduler.get_last_lr()]
        else:
            targets = [float(group["lr"]) for group in optimizer.param_groups]
        self.warmup_steps = int(steps)
        self.mode = mode
        self.start_factor = float(start_factor)
        self.target_lrs = targets
        self._scheduler = scheduler
        super().__init__(optimizer, last_epoch)

    @property
    def scheduler(self) -> Optional[LRScheduler]:
        """The wrapped scheduler (None for a warmup to a constant lr)."""
        return self._scheduler

    def _factor(self, t: int) -> float:
        s, n = self.start_factor, self.warmup_steps
        if self.mode == "linear":
            return s + (1.0 - s) * t / n
        return s ** (1.0 - t / n)

    def get_lr(self) -> list[float]:
        """The lrs at the current step, without stepping the wrapped scheduler."""
        t = self.last_epoch
        if t < self.warmup_steps:
            return [lr * self._factor(t) for lr in self.target_lrs]
        if t == self.warmup_steps or self._scheduler is None:
            return list(self.target_lrs)
        return [float(lr) for lr in self._scheduler.get_last_lr()]

    def step(self, epoch: Optional[int] = None) -> None:
        """Advance one optimizer step (warmup, hand-over, then the wrapped scheduler)."""
        if epoch is not None:
            raise TypeError("WarmupLR.step() takes no epoch; call it once per optimizer step")
        self._step_count += 1
        self.last_epoch += 1
        if self.last_epoch > self.warmup_steps and self._scheduler is not None:
            # The wrapped scheduler owns the groups from here; chainable torch schedulers read
            # group["lr"], which the hand-over step left at their own last value.
            self._scheduler.step()
        else:
            for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
                _set_group_value(group, "lr", lr)
        self._last_lr = [group["lr"].clone() if isinstance(group["lr"], torch.Tensor)
                         else group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state of the warmup, with the wrapped scheduler's under ``"scheduler"``."""
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("optimizer", "_scheduler") and not callable(v)}
        state["scheduler"] = None if self._scheduler is None else self._scheduler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load both states and write the current lrs into the optimizer's groups."""
        state = dict(state_dict)
        inner = state.pop("scheduler", None)
        if (inner is None) != (self._scheduler is None):
            raise ValueError("the state was saved with"
                             f"{'out' if inner is None else ''} a wrapped scheduler; rebuild "
                             "the warmup the same way before loading it")
        self.__dict__.update(state)
        if self._scheduler is not None:
            self._scheduler.load_state_dict(inner)
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            _set_group_value(group, "lr", float(lr))


def warmup(scheduler_or_optimizer: Union[LRScheduler, Optimizer, None], steps: int,
           mode: str = "linear", *, optimizer: Optional[Optimizer] = None,
           start_factor: Optional[float] = None) -> WarmupLR:
    """Put a ``steps``-long warmup in front of a schedule; returns a :class:`WarmupLR`.

    ``warmup(OneCycleLR(opt, ...), 500)`` warms up to the one-cycle start lr and then runs the
    one-cycle schedule; ``warmup(opt, 500)`` or ``warmup(None, 500, optimizer=opt)`` warms up to
    the optimizer's current lr and holds it. Build the wrapped scheduler right before (it must
    not have been stepped) and step only the returned scheduler, once per optimizer step. The
    total length is ``steps`` plus the wrapped schedule's length.
    """
    if isinstance(scheduler_or_optimizer, LRScheduler):
        sched = scheduler_or_optimizer
        if optimizer is not None and optimizer is not sched.optimizer:
            raise ValueError("optimizer is not the wrapped scheduler's optimizer")
        return WarmupLR(sched.optimizer, steps, mode, scheduler=sched, start_factor=start_factor)
    if isinstance(scheduler_or_optimizer, Optimizer):
        if optimizer is not None and optimizer is not scheduler_or_optimizer:
            raise ValueError("two different optimizers were given")
        return WarmupLR(scheduler_or_optimizer, steps, mode, start_factor=start_factor)
    if scheduler_or_optimizer is None:
        if optimizer is None:
            raise ValueError("warmup(None, steps) needs optimizer=")
        return WarmupLR(optimizer, steps, mode, start_factor=start_factor)
    raise TypeError(f"warmup expects an LRScheduler, an Optimizer or None, got "
                    f"{type(scheduler_or_optimizer).__name__}")
