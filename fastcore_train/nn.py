"""Modules over the fused ops."""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from fastcore_train import ops
from fastcore_train.ops.cross_entropy import _as_float, _as_int64

__all__ = ["LabelSmoothingCrossEntropy", "BinaryCrossEntropy", "MixedTarget"]


class MixedTarget(NamedTuple):
    """The targets of a mixed batch: the loss is ``lam * loss(y_a) + (1 - lam) * loss(y_b)``.

    ``lam`` is a float (one weight for the batch) or a (B,) tensor (per-sample mixing); under
    ``torch.compile``, :class:`fastcore_train.Mixup` gives a 0-d tensor for the batch weight.
    """
    y_a: torch.Tensor
    y_b: torch.Tensor
    lam: Union[float, torch.Tensor]


class LabelSmoothingCrossEntropy(torch.nn.Module):
    """Drop-in for ``nn.CrossEntropyLoss(label_smoothing=...)`` on (B, C) logits, fused.

    The target is either class indices (B,) or a :class:`MixedTarget` from
    :class:`fastcore_train.Mixup`; the latter takes the two-target kernel, so mixup with label
    smoothing never builds (B, C) soft targets.
    """

    def __init__(self, smoothing: float = 0.1, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        # torch's exception types (TypeError for a None or a string smoothing, a float
        # ignore_index; ValueError beyond int64), at construction rather than at the first call
        who = type(self).__name__
        smoothing = _as_float(smoothing, "smoothing", who)
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.smoothing = smoothing
        self.ignore_index = _as_int64(ignore_index, "ignore_index", who)
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target) -> torch.Tensor:
        if isinstance(target, MixedTarget):
            return ops.cross_entropy(logits, target.y_a, target_b=target.y_b, lam=target.lam,
                                     label_smoothing=self.smoothing,
                                     ignore_index=self.ignore_index, reduction=self.reduction)
        if isinstance(target, (tuple, list)):
            raise TypeError("LabelSmoothingCrossEntropy: target must be a tensor of class indices "
                            "or an ft.MixedTarget(y_a, y_b, lam), got a "
                            f"{type(target).__name__}")
        return ops.cross_entropy(logits, target, label_smoothing=self.smoothing,
                                 ignore_index=self.ignore_index, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"smoothing={self.smoothing}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}")


class BinaryCrossEntropy(torch.nn.Module):
    """Drop-in for timm's ``BinaryCrossEntropy(smoothing=..., reduction=..., pos_weight=...)`` on
    (B, C) logits and class-index targets, fused.

    The loss is ``F.binary_cross_entropy_with_logits(logits, q, pos_weight=pos_weight,
    reduction=reduction)`` with timm's smoothed targets ``q`` (``off = smoothing / C``, ``on = 1 -
    smoothing + off``). The target is either class indices (B,) or a :class:`MixedTarget` from
    :class:`fastcore_train.Mixup` (``q = lam * q(y_a) + (1 - lam) * q(y_b)``, what timm's
    ``Mixup`` builds); neither builds the (B, C) targets. ``pos_weight`` (one weight per class) is
    a buffer, so ``.to(device)`` moves it.
    """

    def __init__(self, smoothing: float = 0.0, reduction: str = "mean",
                 pos_weight: Optional[torch.Tensor] = None):
        super().__init__()
        # torch's exception types, at construction rather than at the first call
        who = type(self).__name__
        smoothing = _as_float(smoothing, "smoothing", who)
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"{who}: smoothing must be in [0, 1], got {smoothing:g}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"{who}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if pos_weight is not None and not isinstance(pos_weight, torch.Tensor):
            raise TypeError(f"{who}: pos_weight must be a tensor or None, got "
                            f"{type(pos_weight).__name__}")
        self.smoothing = smoothing
        self.reduction = reduction
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, target) -> torch.Tensor:
        kw = dict(label_smoothing=self.smoothing, reduction=self.reduction,
                  pos_weight=self.pos_weight)
        if isinstance(target, MixedTarget):
            return ops.binary_cross_entropy(logits, target.y_a, target_b=target.y_b,
                                            lam=target.lam, **kw)
        if isinstance(target, (tuple, list)):
            raise TypeError("BinaryCrossEntropy: target must be a tensor of class indices or an "
                            f"ft.MixedTarget(y_a, y_b, lam), got a {type(target).__name__}")
        return ops.binary_cross_entropy(logits, target, **kw)

    def extra_repr(self) -> str:
        pw = "None" if self.pos_weight is None else f"tensor of shape {list(self.pos_weight.shape)}"
        return f"smoothing={self.smoothing}, reduction={self.reduction!r}, pos_weight={pw}"
