"""Transfer-learning helpers: freezing, layer groups, new heads, discriminative learning rates,
partial loading of pretrained weights and gradual unfreezing.

A *layer group* is a contiguous slice of a model (body first, head last) that shares a freeze
state and a learning rate. :func:`layer_groups` derives them from the model's children; every
function that takes ``groups`` also accepts your own: a sequence whose items are modules,
parameters, or iterables of either.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = [
    "freeze", "unfreeze", "freeze_to", "layer_groups", "find_head", "replace_head",
    "discriminative_lrs", "group_lrs", "load_pretrained", "LoadReport", "GradualUnfreezer",
]

log = logging.getLogger(__name__)

_BN = nn.modules.batchnorm._BatchNorm
LR = Union[float, slice, Sequence[float]]


# ---------------------------------------------------------------------------------------------
# freezing

def _frozen_bn_train(self: nn.Module, mode: bool = True) -> nn.Module:
    # Installed as an instance attribute on BatchNorm layers frozen with train_bn=False:
    # nn.Module.train() recurses through children by calling child.train(mode), so this keeps
    # them in eval mode (running statistics fixed) across every later model.train().
    return nn.Module.train(self, False)


def _is_pinned(m: nn.Module) -> bool:
    return getattr(m.__dict__.get("train"), "__func__", None) is _frozen_bn_train


def _pin_bn(m: nn.Module) -> None:
    m.train = _frozen_bn_train.__get__(m)
    nn.Module.train(m, False)


def _unpin_bn(m: nn.Module, mode: bool) -> None:
    if _is_pinned(m):
        del m.train
        nn.Module.train(m, mode)


def _flatten(items) -> Tuple[List[nn.Module], List[torch.Tensor]]:
    """Split a module / parameter / nested iterable of them into (modules, parameters)."""
    modules, params = [], []
    stack = [items]
    while stack:
        x = stack.pop()
        if isinstance(x, nn.Module):
            modules.append(x)
            params.extend(x.parameters())
        elif isinstance(x, torch.Tensor):
            params.append(x)
        elif isinstance(x, Iterable) and not isinstance(x, (str, bytes)):
            stack.extend(reversed(list(x)))
        else:
            raise TypeError(f"expected a module, a parameter or an iterable of them, got {type(x)}")
    return modules, params


def _unique(params: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def freeze(model: nn.Module, *, except_=None, train_bn: bool = True) -> nn.Module:
    """Make every parameter of ``model`` untrainable except those in ``except_``.

    ``except_`` is a module, a parameter or an iterable of them; ``None`` means the classifier
    head found by :func:`find_head` (the usual "train the new head only" step), and ``()`` freezes
    everything. BatchNorm layers outside ``except_``: with ``train_bn=True`` their affine
    parameters stay trainable and they normalise with batch statistics in train mode as usual
    (adapting normalisation to the new data is cheap and helps); with
    ``train_bn=False`` they are frozen too and kept in eval mode, so their running statistics
    stay fixed even after ``model.train()``, until :func:`unfreeze` or another ``freeze``.
    Returns ``model``.
    """
    if except_ is None:
        except_ = find_head(model)[2]
    keep_modules, keep_params = _flatten(except_)
    keep = {id(p) for p in keep_params}
    kept_modules = {id(m) for km in keep_modules for m in km.modules()}

    for m in model.modules():
        _unpin_bn(m, model.training)
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    for m in model.modules():
        if isinstance(m, _BN) and id(m) not in kept_modules:
            if train_bn:
                for p in m.parameters(recurse=False):
                    p.requires_grad_(True)
            else:
                _pin_bn(m)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Make every parameter trainable and give frozen BatchNorm layers back their normal
    train/eval behaviour (they take the model's current mode). Returns ``model``."""
    for m in model.modules():
        _unpin_bn(m, model.training)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def layer_groups(model: nn.Module, n: Optional[int] = None) -> List[nn.ModuleList]:
    """Split ``model``'s direct children that own parameters into contiguous layer groups.

    ``n=None`` gives one group per such child. Otherwise the last child (the head, in the usual
    body-then-head layout) is a group of its own and the others are split into ``n - 1`` groups
    of near-equal length. Children without parameters (activations, pooling) belong to no group:
    they have nothing to freeze or to give a learning rate.
    """
    children = [c for c in model.children() if any(True for _ in c.parameters())]
    if not children:
        raise ValueError(f"{type(model).__name__} has no children with parameters to group")
    if n is None:
        return [nn.ModuleList([c]) for c in children]
    if not 1 <= n <= len(children):
        raise ValueError(f"n must be between 1 and the number of children with parameters "
                         f"({len(children)}), got {n}")
    if n == 1:
        return [nn.ModuleList(children)]
    body, k = children[:-1], n - 1
    bounds = [round(i * len(body) / k) for i in range(k + 1)]
    groups = [nn.ModuleList(body[bounds[i]:bounds[i + 1]]) for i in range(k)]
    return groups + [nn.ModuleList(children[-1:])]


def freeze_to(model: nn.Module, n: int, groups: Optional[Sequence] = None, *,
              train_bn: bool = True) -> nn.Module:
    """Freeze ``groups[:n]`` and make ``groups[n:]`` trainable (``n`` may be negative:
    ``freeze_to(model, -1)`` trains the last group only). ``groups`` defaults to
    ``layer_groups(model)``; parameters in no group are frozen. Returns ``model``."""
    groups = layer_groups(model) if groups is None else list(groups)
    return freeze(model, except_=list(groups[n:]) if groups[n:] else (), train_bn=train_bn)


# ---------------------------------------------------------------------------------------------
# heads

def find_head(model: nn.Module) -> Tuple[nn.Module, str, nn.Linear]:
    """Locate the final classifier: ``(parent, attribute name, linear layer)``.

    Looks for an attribute ``fc``, ``classifier`` or ``head`` that is an ``nn.Linear`` or
    contains one (the last one in module order, as in ``nn.Sequential(Dropout, Linear)``);
    failing that, the last ``nn.Linear`` of the whole model.
    """
    for name in ("fc", "classifier", "head"):
        sub = getattr(model, name, None)
        if isinstance(sub, nn.Linear):
            return model, name, sub
        if isinstance(sub, nn.Module):
            found = _last_linear(sub)
            if found is not None:
                return found
    found = _last_linear(model)
    if found is None:
        raise ValueError(f"no nn.Linear head found in {type(model).__name__}; "
                         "pass the layers to keep trainable explicitly")
    return found


def _last_linear(root: nn.Module) -> Optional[Tuple[nn.Module, str, nn.Linear]]:
    found = None
    for parent in root.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                found = (parent, name, child)
    return found


def replace_head(model: nn.Module, num_classes: int) -> nn.Linear:
    """Replace the final classifier (see :func:`find_head`) with a freshly initialised
    ``nn.Linear(in_features, num_classes)`` with the same bias presence, dtype and device.
    Returns the new head (trainable)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    parent, name, old = find_head(model)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None,
                    device=old.weight.device, dtype=old.weight.dtype)
    setattr(parent, name, new)
    return new


# ---------------------------------------------------------------------------------------------
# learning rates

def group_lrs(lr: LR, n: int) -> List[float]:
    """The learning rates of ``n`` groups from a float, a ``slice`` or one float per group, as
    :func:`discriminative_lrs` spreads them."""
    if isinstance(lr, slice):
        if lr.stop is None or lr.step is not None:
            raise ValueError("a learning-rate slice must be slice(first_group_lr, last_group_lr) "
                             "or slice(last_group_lr)")
        hi = float(lr.stop)
        lo = hi / 10 if lr.start is None else float(lr.start)
        if lo <= 0 or hi <= 0:
            raise ValueError(f"learning rates must be positive, got {lr}")
        if n == 1:
            return [hi]
        if lr.start is None:  # fastai's slice(lr): the head at lr, every other group at lr/10
            return [lo] * (n - 1) + [hi]
        return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]
    if isinstance(lr, (int, float)):
        return [float(lr)] * n
    lrs = [float(x) for x in lr]
    if len(lrs) != n:
        raise ValueError(f"got {len(lrs)} learning rates for {n} layer groups")
    return lrs


def discriminative_lrs(model: nn.Module, lr: LR = slice(1e-5, 1e-3),
                       groups: Optional[Sequence] = None) -> List[dict]:
    """Optimizer parameter groups with one learning rate per layer group.

    ``lr`` is a ``slice(first, last)`` (rates spaced geometrically from the first group to the
    last: early layers hold general features and move least), ``slice(last)`` (fastai's: the
    last group at ``last``, all others at ``last / 10``), a float for all groups, or one float
    per group. Only trainable parameters are included; a group with none is left out.
    ``groups`` defaults to ``layer_groups(model)``. Pass the result to any torch optimizer.
    """
    groups = layer_groups(model) if groups is None else list(groups)
    seen: set = set()
    out = []
    for g, rate in zip(groups, group_lrs(lr, len(groups))):
        params = [p for p in _unique(_flatten(g)[1]) if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            out.append({"params": params, "lr": rate})
    return out


# ---------------------------------------------------------------------------------------------
# pretrained weights

@dataclass
class LoadReport:
    """What :func:`load_pretrained` did: ``loaded`` keys, ``mismatched`` as
    ``(key, checkpoint shape, model shape)``, ``missing`` (in the model, not in the checkpoint)
    and ``unexpected`` (in the checkpoint, not in the model)."""
    loaded: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, tuple, tuple]] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)

    @property
    def skipped(self) -> List[str]:
        """Every checkpoint key that was not loaded."""
        return [k for k, _, _ in self.mismatched] + self.unexpected

    def __str__(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors"]
        if self.mismatched:
            parts.append("skipped for shape mismatch: " + ", ".join(
                f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in self.mismatched))
        if self.missing:
            parts.append("missing from checkpoint: " + ", ".join(self.missing))
        if self.unexpected:
            parts.append("unexpected in checkpoint: " + ", ".join(self.unexpected))
        return "; ".join(parts)


def _check_state_dict(state) -> None:
    """A mapping of names to tensors, or one sentence saying what it is instead."""
    if not isinstance(state, Mapping):
        raise TypeError("load_pretrained: expected a state dict (a mapping of parameter names "
                        f"to tensors) or a file path, got {type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not bad:
        return
    if len(bad) == len(state):
        nested = [k for k, v in state.items() if isinstance(v, Mapping)
                  and any(isinstance(t, torch.Tensor) for t in v.values())]
        hint = (f"; the weights look like they are under {nested[0]!r}: pass "
                f"checkpoint[{nested[0]!r}]" if nested else "")
        raise ValueError("load_pretrained: the checkpoint holds no tensors at its top level "
                         f"(keys: {', '.join(map(str, list(state)[:8]))}){hint}")
    raise TypeError(f"load_pretrained: the value of {bad[0]!r} is a "
                    f"{type(state[bad[0]]).__name__}, not a tensor; a state dict maps names "
                    "to tensors")


def load_pretrained(model: nn.Module, state_dict_or_path, skip_mismatched: bool = True, *,
                    optimizer: Optional[torch.optim.Optimizer] = None) -> LoadReport:
    """Load the tensors of a checkpoint that fit ``model`` and report the rest.

    ``state_dict_or_path`` is a state dict or a file saved with ``torch.save`` (read with
    ``weights_only=True``, so no code in it runs). A ``module.`` prefix (from a DDP-wrapped model)
    is stripped when the model's own keys lack it. Tensors whose shape differs (typically the old
    head) are skipped, or raise when ``skip_mismatched=False``. Missing and unexpected keys never
    raise. The report is logged and returned.

    ``optimizer``: an optimizer already built over ``model`` that keeps float32 master weights
    (``FusedAdamW``/``FusedSGD`` with float16/bfloat16 parameters) gets them refreshed from the
    loaded weights (``sync_masters_from_params``), so its next step starts from them.
    """
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        state = torch.load(state_dict_or_path, map_location="cpu", weights_only=True)
    else:
        state = state_dict_or_path
    _check_state_dict(state)
    own = model.state_dict()
    if state and all(k.startswith("module.") for k in state) and \
            not any(k.startswith("module.") for k in own):
        state = {k[len("module."):]: v for k, v in state.items()}

    report = LoadReport()
    to_load = {}
    for k, v in state.items():
        if k not in own:
            report.unexpected.append(k)
        elif tuple(v.shape) != tuple(own[k].shape):
            report.mismatched.append((k, tuple(v.shape), tuple(own[k].shape)))
        else:
            to_load[k] = v
    report.missing = [k for k in own if k not in state]
    if report.mismatched and not skip_mismatched:
        raise RuntimeError(f"shape mismatch loading pretrained weights: {report}")
    model.load_state_dict(to_load, strict=False)
    sync = getattr(optimizer, "sync_masters_from_params", None)
    if sync is not None:
        sync()
    report.loaded = list(to_load)
    clean = not (report.mismatched or report.missing or report.unexpected)
    log.log(logging.INFO if clean else logging.WARNING, "load_pretrained: %s", report)
    return report


# ---------------------------------------------------------------------------------------------
# gradual unfreezing

class GradualUnfreezer:
    """Train the head first, then unfreeze one more layer group per epoch, head backwards.

    On construction only the last group is trainable (plus BatchNorm affine parameters with
    ``train_bn=True``, see :func:`freeze`). Each :meth:`step` (``fit`` calls it through
    :meth:`on_epoch_end`) unfreezes the next group towards the input. Whenever parameters become
    trainable that ``optimizer`` does not hold yet, they are added as a new param group with
    their layer group's learning rate; existing param groups and their state (momentum, Adam
    moments and step counts) are left untouched. So the optimizer may be built over the head
    alone. ``lrs`` follows :func:`discriminative_lrs` (a float, ``slice(first, last)`` or one per
    group); ``None`` uses the optimizer's default ``lr``.

    Note: an LR scheduler created before a param group is added does not schedule that group.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 groups: Optional[Sequence] = None, lrs: Optional[LR] = None, *,
                 train_bn: bool = True):
        self.model, self.optimizer, self.train_bn = model, optimizer, train_bn
        self.groups = layer_groups(model) if groups is None else list(groups)
        self.lrs = group_lrs(optimizer.defaults["lr"] if lrs is None else lrs, len(self.groups))
        self.n_frozen = len(self.groups) - 1
        self._apply()

    def _apply(self) -> None:
        freeze_to(self.model, self.n_frozen, self.groups, train_bn=self.train_bn)
        in_opt = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        for i in reversed(range(len(self.groups))):
            new = [p for p in _unique(_flatten(self.groups[i])[1])
                   if p.requires_grad and id(p) not in in_opt]
            if not new:
                continue
            in_opt.update(id(p) for p in new)
            group = {"params": new, "lr": self.lrs[i]}
            if "initial_lr" in self.optimizer.param_groups[0]:  # keep scheduler bookkeeping valid
                group["initial_lr"] = group["lr"]
            self.optimizer.add_param_group(group)

    def step(self) -> Optional[int]:
        """Unfreeze the next group; returns its index, or ``None`` when all are trainable."""
        if self.n_frozen == 0:
            return None
        self.n_frozen -= 1
        self._apply()
        return self.n_frozen

    def on_epoch_end(self, epoch: int, logs: dict) -> None:
        self.step()

    def state_dict(self) -> dict:
        """How many groups are still frozen (a resumed run unfreezes to the same point)."""
        return {"n_frozen": self.n_frozen}

    def load_state_dict(self, state: dict) -> None:
        """Freeze to the saved point, adding the param groups the optimizer had then; load the
        optimizer's state after this."""
        n = state["n_frozen"]
        if not (isinstance(n, int) and 0 <= n < len(self.groups)):
            raise ValueError(f"GradualUnfreezer.load_state_dict: n_frozen={n!r} is not a frozen "
                             f"count for {len(self.groups)} layer groups")
        self.n_frozen = n
        self._apply()
