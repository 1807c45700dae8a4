"""The learning-rate range test (Smith 2017, arXiv:1506.01186, section 3.3).

:func:`lr_find` trains for up to ``num_iter`` optimizer steps while raising the lr from
``start_lr`` to ``end_lr``, records a smoothed loss per step, stops once the loss diverges, and
suggests learning rates read off the curve. Everything it touches (model parameters and buffers,
gradients, train/eval modes, optimizer state, scaler state, RNG states) is restored in memory
afterwards — also when the sweep raises — so the caller's training run starts exactly where it
would have without the test. No file is written unless :meth:`LRFinderResult.plot` is called.
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from torch import nn

__all__ = ["lr_find", "LRFinderResult"]

# Points skipped at each end of the curve when looking for the steepest slope: the first steps
# carry the smoother's warm-up noise, the last ones the divergence.
_STEEPEST_SKIP_START = 10
_STEEPEST_SKIP_END = 5


# --------------------------------------------------------------------------------------------
# Result and suggestions
# --------------------------------------------------------------------------------------------

def _suggest_minimum(lrs: np.ndarray, losses: np.ndarray) -> Optional[float]:
    if len(losses) == 0:
        return None
    return float(lrs[int(np.argmin(losses))] / 10.0)


def _suggest_steepest(lrs: np.ndarray, losses: np.ndarray) -> Optional[float]:
    n = len(losses)
    if n < 3:
        return None
    # Skip a fraction of the ends on short curves so that something is left to look at.
    start = min(_STEEPEST_SKIP_START, n // 10)
    stop = n - min(_STEEPEST_SKIP_END, n // 20)
    log_lr = np.log10(lrs)
    if np.any(np.diff(log_lr) <= 0):
        return None
    slope = np.gradient(losses, log_lr)
    idx = start + int(np.argmin(slope[start:stop]))
    return float(lrs[idx])


def _suggest_valley(lrs: np.ndarray, losses: np.ndarray) -> Optional[float]:
    """The lr two thirds of the way down the longest strictly decreasing run of the curve.

    The longest run of consecutive decreases is the main "valley" of the range test. Its top is
    too timid an lr and its bottom sits right before divergence, so we take the first point
    where the run has covered 2/3 of its total loss drop: it lies in the steep part of the
    descent, where training makes the fastest progress while still stable.
    """
    n = len(losses)
    if n < 3:
        return None
    best_start, best_len = 0, 0
    run_start = 0
    for i in range(1, n + 1):
        if i == n or not losses[i] < losses[i - 1]:
            if i - run_start > best_len:
                best_start, best_len = run_start, i - run_start
            run_start = i
    if best_len < 3:
        return None
    top, bottom = best_start, best_start + best_len - 1
    target = losses[top] - (2.0 / 3.0) * (losses[top] - losses[bottom])
    idx = top + int(np.argmax(losses[top:bottom + 1] <= target))
    return float(lrs[idx])


@dataclass
class LRFinderResult:
    """The outcome of :func:`lr_find`.

    ``lrs`` are the learning rates of the recorded steps (for the param group with the largest
    lr; the other groups kept their ratio to it), ``losses`` the bias-corrected smoothed losses,
    ``raw_losses`` the per-step losses. ``suggestions`` maps ``"valley"``, ``"steepest"`` and
    ``"minimum/10"`` to an lr (``None`` when the curve is too short for that rule);
    ``suggestion`` is the valley one, falling back to steepest then minimum/10. ``stop_reason``
    is ``"completed"``, ``"diverged"`` or ``"non-finite loss"``.
    """

    lrs: list[float]
    losses: list[float]
    raw_losses: list[float]
    suggestions: dict[str, Optional[float]] = field(default_factory=dict)
    stop_reason: str = "completed"
    num_iter: int = 0

    @classmethod
    def from_curve(cls, lrs: list[float], losses: list[float], raw_losses: list[float],
                   stop_reason: str = "completed", num_iter: int = 0) -> "LRFinderResult":
        """Build a result and compute its suggestions from a recorded curve."""
        lr_arr = np.asarray(lrs, dtype=np.float64)
        loss_arr = np.asarray(losses, dtype=np.float64)
        suggestions = {
            "valley": _suggest_valley(lr_arr, loss_arr),
            "steepest": _suggest_steepest(lr_arr, loss_arr),
            "minimum/10": _suggest_minimum(lr_arr, loss_arr),
        }
        return cls(list(lrs), list(losses), list(raw_losses), suggestions, stop_reason, num_iter)

    @property
    def suggestion(self) -> Optional[float]:
        """The suggested lr: valley, else steepest, else minimum/10 (None if no curve)."""
        for key in ("valley", "steepest", "minimum/10"):
            if self.suggestions.get(key) is not None:
                return self.suggestions[key]
        return None

    @property
    def diverged(self) -> bool:
        """Whether the sweep stopped early on divergence or a non-finite loss."""
        return self.stop_reason != "completed"

    def __repr__(self) -> str:  # the curve itself is in .lrs / .losses
        span = f"{self.lrs[0]:.1e}..{self.lrs[-1]:.1e}" if self.lrs else "-"
        sugg = ", ".join(f"{k}={v:.2e}" if v is not None else f"{k}=None"
                         for k, v in self.suggestions.items())
        return (f"LRFinderResult({len(self.lrs)} of {self.num_iter} steps over lr {span}, "
                f"{self.stop_reason}; {sugg})")

    def plot(self, path: Any, *, show_raw: bool = True, dpi: int = 100) -> Any:
        """Write a PNG of loss against lr (log scale) with the suggestions marked; returns path.

        Uses matplotlib's Agg canvas directly, so the global pyplot backend is left alone.
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("LRFinderResult.plot needs matplotlib: pip install matplotlib "
                              "(or fastcore_train[demo])") from exc
        if not self.lrs:
            raise ValueError("nothing to plot: the LR finder recorded no step")
        fig = Figure(figsize=(7, 4.5), dpi=dpi)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        if show_raw:
            ax.plot(self.lrs, self.raw_losses, color="0.75", linewidth=0.8, label="loss")
        ax.plot(self.lrs, self.losses, color="C0", linewidth=1.8, label="smoothed loss")
        markers = {"valley": ("C3", "o"), "steepest": ("C2", "^"), "minimum/10": ("C1", "s")}
        lr_arr = np.asarray(self.lrs)
        for name, lr in self.suggestions.items():
            if lr is None:
                continue
            colour, marker = markers.get(name, ("k", "x"))
            # Mark the suggestion on the curve at the nearest recorded lr.
            idx = int(np.argmin(np.abs(np.log(lr_arr) - math.log(lr))))
            ax.axvline(lr, color=colour, linestyle="--", linewidth=0.8)
            ax.plot([lr], [self.losses[idx]], marker=marker, color=colour, markersize=8,
                    linestyle="none", label=f"{name}: {lr:.2e}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        shown = self.losses + (self.raw_losses if show_raw else [])
        finite = [v for v in shown if math.isfinite(v)]
        if finite:
            # Clip the divergence tail (often orders of magnitude up) so the valley stays readable.
            low, first = min(finite), self.losses[0]
            top = max(first, low) + 0.25 * (max(first, low) - low) + 1e-12
            ax.set_ylim(low - 0.05 * (top - low), top)
        ax.set_title(f"LR range test ({self.stop_reason}, {len(self.lrs)} steps)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        fig.savefig(path, format="png")
        return path


# --------------------------------------------------------------------------------------------
# State capture and restore
# --------------------------------------------------------------------------------------------

def _clone_cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


def _has_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor) or (
        isinstance(v, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in v))


def _clone_tensors(v: Any) -> Any:
    """Copies of the tensors in ``v`` (a tensor, or a tuple/list such as betas)."""
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    return [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in v]


def _copy_tensors(dst: Any, src: Any) -> None:
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    else:
        for d, s in zip(dst, src):
            if isinstance(d, torch.Tensor):
                d.copy_(s)


class _Snapshot:
    """Everything lr_find may change, copied so it can be put back bit for bit."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any):
        self.params = [(p, _clone_cpu(p), None if p.grad is None else _clone_cpu(p.grad))
                       for p in model.parameters()]
        # Buffers by owner and name: also the non-persistent ones state_dict() leaves out, and
        # restorable even if a module rebinds the attribute during the sweep.
        self.buffers = []
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    self.buffers.append((module, name, buf, _clone_cpu(buf)))
        self.modes = [(m, m.training) for m in model.modules()]
        # state_dict() returns references to the live state tensors; deepcopy detaches them.
        self.optimizer_state = copy.deepcopy(optimizer.state_dict())
        # Tensor hyperparameters (lr=torch.tensor(...), tensor betas): the sweep fills the lr in
        # place and load_state_dict puts copies in the groups, so the user's objects (which
        # they, or a scheduler, may hold) are put back with their values.
        self.group_tensors = [
            {k: (v, _clone_tensors(v)) for k, v in group.items()
             if k != "params" and _has_tensor(v)}
            for group in optimizer.param_groups]
        self.scaler_state = copy.deepcopy(scaler.state_dict()) if scaler is not None else None
        self.rng_torch = torch.get_rng_state()
        self.rng_cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.rng_python = random.getstate()
        self.rng_numpy = np.random.get_state()

    @torch.no_grad()
    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any) -> None:
        for p, data, grad in self.params:
            p.copy_(data)
            p.grad = None if grad is None else grad.to(p.device)
        for module, name, buf, data in self.buffers:
            buf.copy_(data)
            module._buffers[name] = buf
        for module, training in self.modes:
            module.training = training
        optimizer.load_state_dict(self.optimizer_state)
        for group, saved in zip(optimizer.param_groups, self.group_tensors):
            for key, (original, values) in saved.items():
                _copy_tensors(original, values)
                group[key] = original
        if scaler is not None and self.scaler_state:
            scaler.load_state_dict(self.scaler_state)
        torch.set_rng_state(self.rng_torch)
        if self.rng_cuda is not None:
            torch.cuda.set_rng_state_all(self.rng_cuda)
        random.setstate(self.rng_python)
        np.random.set_state(self.rng_numpy)


# --------------------------------------------------------------------------------------------
# Sweep helpers
# --------------------------------------------------------------------------------------------

def _to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor inside ``obj`` (tuples, namedtuples, lists, dicts) to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple, e.g. MixedTarget
        return type(obj)(*(_to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    if isinstance(obj, dict):
        return type(obj)((k, _to_device(v, device)) for k, v in obj.items())
    return obj


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(f"lr_find expects batches of (x, y), got {type(batch).__name__}"
                    + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))


def _cycle(loader: Iterable) -> Iterator:
    """Endless batches: restart the loader when it runs out (fewer batches than steps)."""
    passes = 0
    while True:
        produced = False
        for batch in loader:
            produced = True
            yield batch
        if not produced:
            if passes == 0:
                raise ValueError("the train loader yielded no batch")
            raise ValueError("the train loader ran out and cannot be restarted (an iterator?); "
                             "pass a re-iterable loader or lower num_iter")
        passes += 1


def _batch_weight(x: Any) -> int:
    if isinstance(x, torch.Tensor) and x.dim() > 0:
        return x.shape[0]
    return 1


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _Progress:
    """tqdm on a terminal when installed, else a line every 10 % on stderr; silent when
    disabled."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.bar, self.done = total, enabled, None, 0
        if not enabled:
            return
        if not _stderr_is_terminal():  # logs, CI: plain lines, not carriage-return fragments
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, desc="lr_find", leave=False)

    def update(self, lr: float, loss: float) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(lr=f"{lr:.2e}", loss=f"{loss:.4g}", refresh=False)
        elif self.done == self.total or self.done % max(1, self.total // 10) == 0:
            print(f"lr_find: {self.done}/{self.total} lr={lr:.2e} loss={loss:.4g}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _distributed() -> Optional[tuple[Any, int]]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_world_size()
    return None


def _mean_across_ranks(value: float, dist_info: Optional[tuple[Any, int]]) -> float:
    if dist_info is None:
        return value
    dist, world = dist_info
    # NCCL reduces only CUDA tensors; other backends take CPU ones. A NaN on one rank becomes
    # NaN everywhere, so every rank takes the same stop decision.
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / world


def _set_lrs(optimizer: torch.optim.Optimizer, lr: float, ratios: list[float]) -> None:
    for group, ratio in zip(optimizer.param_groups, ratios):
        value = lr * ratio
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


# --------------------------------------------------------------------------------------------
# lr_find
# --------------------------------------------------------------------------------------------

def lr_find(model: nn.Module, train_loader: Iterable, loss_fn: Callable[[Any, Any], torch.Tensor],
            optimizer: torch.optim.Optimizer, start_lr: float = 1e-7, end_lr: float = 10,
            num_iter: int = 100, mode: str = "exp", smooth: float = 0.98,
            diverge_factor: float = 4.0, accumulation_steps: int = 1, scaler: Any = None,
            val_loader: Optional[Iterable] = None, progress: bool = True) -> LRFinderResult:
    """Run the LR range test and return the curve with suggested learning rates.

    The lr goes from ``start_lr`` to ``end_lr`` over ``num_iter`` optimizer steps,
    geometrically (``mode="exp"``) or linearly (``"linear"``). With several param groups the
    one with the largest lr follows the sweep and the others keep their ratio to it (a group at
    lr 0, e.g. frozen, stays at 0). Each step trains on ``accumulation_steps`` batches of
    ``(x, y)`` from ``train_loader`` (restarted as often as needed; tensors anywhere inside
    ``x``/``y`` are moved to the model's device) with ``loss_fn(model(x), y)``.

    The loss recorded for a step is the mean training loss of its batches, or with
    ``val_loader`` the loss on the whole validation set after the step (slower, less noisy). It
    is smoothed as ``avg = smooth·avg + (1-smooth)·loss`` and bias-corrected by
    ``1 - smooth**(i+1)``. The sweep stops early when the smoothed loss exceeds
    ``diverge_factor`` × its best value (for a negative best: rises above it by
    ``(diverge_factor - 1) × |best|``), or at a NaN/inf loss. Under ``torch.distributed`` the
    loss is averaged over ranks before smoothing, so every rank stops at the same step.

    ``scaler`` may be a ``torch.amp.GradScaler`` or anything with its surface
    (``scale``/``step``/``update``/``state_dict``/``load_state_dict``).

    Model parameters, buffers, gradients and modes, the optimizer state (lrs included), the
    scaler state and the torch (CPU and CUDA), ``random`` and numpy RNG states are restored in
    memory when it returns or raises. See :class:`LRFinderResult` for the suggestions.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    if mode not in ("exp", "linear"):
        raise ValueError(f"mode must be 'exp' or 'linear', got {mode!r}")
    for name, value in (("start_lr", start_lr), ("end_lr", end_lr)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if start_lr >= end_lr:
        raise ValueError(f"start_lr ({start_lr}) must be smaller than end_lr ({end_lr})")
    if not isinstance(num_iter, int) or isinstance(num_iter, bool) or num_iter < 2:
        raise ValueError(f"num_iter must be an integer >= 2, got {num_iter!r}")
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smooth must be in [0, 1), got {smooth!r}")
    if not diverge_factor > 1.0:
        raise ValueError(f"diverge_factor must be > 1, got {diverge_factor!r}")
    if (not isinstance(accumulation_steps, int) or isinstance(accumulation_steps, bool)
            or accumulation_steps < 1):
        raise ValueError(f"accumulation_steps must be a positive integer, got "
                         f"{accumulation_steps!r}")
    for name, loader in (("train_loader", train_loader), ("val_loader", val_loader)):
        if loader is not None and hasattr(loader, "__len__") and len(loader) == 0:
            raise ValueError(f"{name} is empty")
    if scaler is not None:
        missing = [m for m in ("scale", "step", "update", "state_dict", "load_state_dict")
                   if not callable(getattr(scaler, m, None))]
        if missing:
            raise TypeError(f"scaler lacks the GradScaler method(s) {missing}")

    model_params = {id(p) for p in model.parameters()}
    opt_params = [p for g in optimizer.param_groups for p in g["params"]]
    if not any(id(p) in model_params for p in opt_params):
        raise ValueError("lr_find: none of the optimizer's parameters belong to the model, so the "
                         "sweep could not change it; build the optimizer over model.parameters()")
    if not any(p.requires_grad for p in opt_params if id(p) in model_params):
        raise ValueError("lr_find: no parameter of the optimizer requires grad (is the whole "
                         "model frozen?)")

    base = [float(g["lr"]) for g in optimizer.param_groups]
    ref = max(base) if base else 0.0
    # Keep discriminative lrs' ratios; if every group is at 0, sweep them all alike.
    ratios = [b / ref for b in base] if ref > 0 else [1.0] * len(base)
    if mode == "exp":
        lr_schedule = [start_lr * (end_lr / start_lr) ** (i / (num_iter - 1))
                       for i in range(num_iter)]
    else:
        lr_schedule = [start_lr + (end_lr - start_lr) * i / (num_iter - 1)
                       for i in range(num_iter)]

    dist_info = _distributed()
    show = progress and (dist_info is None or dist_info[0].get_rank() == 0)
    device = _model_device(model)
    snapshot = _Snapshot(model, optimizer, scaler)
    bar = _Progress(num_iter, show)
    lrs: list[float] = []
    losses: list[float] = []
    raw_losses: list[float] = []
    stop_reason = "completed"
    try:
        batches = _cycle(train_loader)
        model.train()
        avg, best = 0.0, math.inf
        for i, lr in enumerate(lr_schedule):
            _set_lrs(optimizer, lr, ratios)
            optimizer.zero_grad(set_to_none=True)
            train_loss = torch.zeros((), dtype=torch.float32, device=device)
            for k in range(accumulation_steps):
                x, y = _split_batch(next(batches))
                x, y = _to_device(x, device), _to_device(y, device)
                # DDP: all-reduce gradients only on the last micro-batch of the step.
                sync_skip = k < accumulation_steps - 1 and hasattr(model, "no_sync")
                with model.no_sync() if sync_skip else contextlib.nullcontext():
                    loss = loss_fn(model(x), y)
                    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                        raise ValueError(
                            "lr_find: loss_fn must return a one-element tensor (a reduced "
                            "loss, e.g. reduction='mean'), got "
                            f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
                    scaled = loss / accumulation_steps
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                train_loss += loss.detach().float() / accumulation_steps
            if val_loader is None:
                value = _mean_across_ranks(train_loss.item(), dist_info)
                if not math.isfinite(value):
                    stop_reason = "non-finite loss"
                    break
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if val_loader is not None:
                value = _mean_across_ranks(_validation_loss(model, val_loader, loss_fn, device),
                                           dist_info)
                if not math.isfinite(value):
                    stop_reason = "non-finite loss"
                    break
            avg = smooth * avg + (1.0 - smooth) * value
            smoothed = avg / (1.0 - smooth ** (i + 1))
            lrs.append(lr)
            losses.append(smoothed)
            raw_losses.append(value)
            bar.update(lr, smoothed)
            # "smoothed > diverge_factor × best", written so that it also means a rise by
            # (diverge_factor - 1) × |best| when losses are negative (e.g. -log-likelihoods).
            if smoothed > best + (diverge_factor - 1.0) * abs(best):
                stop_reason = "diverged"
                break
            best = min(best, smoothed)
    finally:
        bar.close()
        snapshot.restore(model, optimizer, scaler)
    return LRFinderResult.from_curve(lrs, losses, raw_losses, stop_reason, num_iter)


@torch.no_grad()
def _validation_loss(model: nn.Module, loader: Iterable, loss_fn: Callable,
                     device: torch.device) -> float:
    """Sample-weighted mean loss over ``loader`` in eval mode; leaves the model in train mode."""
    model.eval()
    try:
        total, count = 0.0, 0
        for batch in loader:
            x, y = _split_batch(batch)
            x, y = _to_device(x, device), _to_device(y, device)
            n = _batch_weight(x)
            total += loss_fn(model(x), y).float().item() * n
            count += n
        if count == 0:
            raise ValueError("val_loader yielded no batch")
        return total / count
    finally:
        model.train()
