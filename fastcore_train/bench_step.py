"""Whole training steps: where the fused ops matter, and by how much.

One step = mixup + model forward/backward + loss + optimizer step, in three recipes on the same
model, data and hyperparameters:

* ``fastcore_train``: ``ft.Mixup`` (in place, flip pairing) -> model ->
  ``ft.nn.LabelSmoothingCrossEntropy`` on the ``MixedTarget`` -> ``FusedAdamW``;
* ``eager``: what timm-style code does today: the batch blended in place with its flip,
  dense smoothed soft targets (B x classes), soft-target cross-entropy on ``log_softmax``,
  ``torch.optim.AdamW(fused=True)``;
* ``compile``: the eager recipe's mixup, targets, model and loss under ``torch.compile``
  (backward and ``AdamW(fused=True)`` as usual);
* ``parts fastcore_train`` / ``parts eager``: what the fused ops replace, timed alone on the
  same shapes -- the blend, the loss forward and backward on ready logits, the optimizer step --
  so that the table shows their share of each recipe's step.

Two models: a small CNN classifier (the model dominates) and an MLP with a 32000-class head
(loss and optimizer state are a large share). Each at 1 and 2 threads on the CPU, and on CUDA
when present.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

import fastcore_train as ft
from fastcore_train.bench import Case, _allow_recompiles, _synced, timm_flip_

__all__ = ["step_cases", "StepCNN", "VocabMLP"]

SMOOTHING = 0.1
LAM = 0.7  # one lam for every step and recipe: the work does not depend on its value
HPARAMS = dict(lr=1e-3, weight_decay=0.05)


class StepCNN(nn.Module):
    """Three conv blocks (3 -> 32 -> 64 -> 128 channels, 3x3, ReLU, 2x2 max-pool) and an MLP head
    (2048 -> 1024 -> classes) on 32x32 images."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        blocks = []
        for cin, cout in ((3, 32), (32, 64), (64, 128)):
            blocks += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.body = nn.Sequential(*blocks, nn.Flatten())
        self.head = nn.Sequential(nn.Linear(128 * 4 * 4, 1024), nn.ReLU(), nn.Linear(1024, classes))

    def forward(self, x):
        return self.head(self.body(x))


class VocabMLP(nn.Module):
    """A 512-feature MLP body (two 1024-wide GELU layers) and a large-vocabulary linear head."""

    def __init__(self, classes: int = 32000, features: int = 512, width: int = 1024):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, width), nn.GELU(), nn.Linear(width, width),
                                  nn.GELU())
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.body(x))


def dense_mixup_targets(y, classes, lam, smoothing):
    """timm's mixup targets, written out: smoothed one-hot of y and of its flip, blended
    (a B x classes tensor)."""
    off = smoothing / classes
    on = 1.0 - smoothing + off
    ya = torch.full((y.shape[0], classes), off, device=y.device).scatter_(1, y[:, None], on)
    yb = torch.full((y.shape[0], classes), off, device=y.device).scatter_(1, y.flip(0)[:, None],
                                                                          on)
    return ya * lam + yb * (1.0 - lam)


def _eager_loss(model, xb, y, lam, classes):
    timm_flip_(xb, lam)  # timm's in-place batch mixup
    target = dense_mixup_targets(y, classes, lam, SMOOTHING)
    logits = model(xb)
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


_compiled: dict = {}


def _step_case(kind: str, threads: int, device: torch.device) -> Case:
    if kind == "cnn":
        batch, classes, shape = 128, 1000, (3, 32, 32)
        make_model = lambda: StepCNN(classes)  # noqa: E731
    else:
        batch, classes, shape = 256, 32000, (512,)
        make_model = lambda: VocabMLP(classes)  # noqa: E731

    def make():
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        x = torch.randn((batch,) + shape, generator=g).to(device)
        y = torch.randint(0, classes, (batch,), generator=g).to(device)
        models = {name: make_model().to(device)
                  for name in ("fastcore_train", "eager", "compile")}
        steps = {}

        # ours
        m = models["fastcore_train"]
        mixup = ft.Mixup(alpha=0.2, mode="batch", inplace=True)
        crit = ft.nn.LabelSmoothingCrossEntropy(SMOOTHING)
        opt = ft.optim.FusedAdamW(m.parameters(), **HPARAMS)

        def ours():
            xb = x.clone()  # a fresh batch from the loader, as in every recipe
            xm, t = mixup(xb, y)
            loss = crit(m(xm), t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        steps["fastcore_train"] = ours

        # eager, timm-style
        me = models["eager"]
        opt_e = torch.optim.AdamW(me.parameters(), **HPARAMS, fused=True)

        def eager():
            loss = _eager_loss(me, x.clone(), y, LAM, classes)
            opt_e.zero_grad(set_to_none=True)
            loss.backward()
            opt_e.step()
        steps["eager"] = eager

        # the eager recipe compiled
        mc = models["compile"]
        opt_c = torch.optim.AdamW(mc.parameters(), **HPARAMS, fused=True)
        key = (kind, device.type)
        if key not in _compiled:
            _allow_recompiles()
            _compiled[key] = torch.compile(_eager_loss, dynamic=False)
        loss_c = _compiled[key]

        def compiled():
            loss = loss_c(mc, x.clone(), y, LAM, classes)
            opt_c.zero_grad(set_to_none=True)
            loss.backward()
            opt_c.step()
        steps["compile"] = compiled

        # What the fused ops replace, timed on their own: the blend, the loss forward and
        # backward on ready logits, the optimizer step (the models above hold gradients after
        # the warm-up). Both on a scratch batch blended in place again and again.
        xs = x.clone()
        logits_o = torch.randn(batch, classes, generator=g).to(device).requires_grad_()
        logits_e = logits_o.detach().clone().requires_grad_()

        def parts_ours():
            xm, t = mixup(xs, y)
            logits_o.grad = None
            crit(logits_o, t).backward()
            opt.step()

        def parts_eager():
            timm_flip_(xs, LAM)
            target = dense_mixup_targets(y, classes, LAM, SMOOTHING)
            logits_e.grad = None
            torch.sum(-target * F.log_softmax(logits_e, dim=-1), dim=-1).mean().backward()
            opt_e.step()

        steps["parts fastcore_train"] = parts_ours
        steps["parts eager"] = parts_eager
        ours()  # gradients and optimizer state exist before any part is timed alone
        eager()
        return {k: _synced(v, device) for k, v in steps.items()}

    params = sum(p.numel() for p in make_model().parameters())
    name = (f"{'cnn' if kind == 'cnn' else 'mlp+head'} {params / 1e6:.1f}M params, batch {batch}, "
            f"{classes} classes, {threads} thread{'s' if threads > 1 else ''}")
    if device.type == "cuda":
        name = name.rsplit(",", 1)[0] + ", cuda"
    return Case("step", name, 0, make, rounds=5 if device.type == "cpu" else 20,
                impls=("fastcore_train", "eager", "compile", "parts fastcore_train", "parts eager"),
                threads=threads)


def step_cases(device, size="full") -> List[Case]:
    device = torch.device(device)
    kinds = ("cnn", "vocab")
    if device.type == "cuda":
        return [_step_case(k, torch.get_num_threads(), device) for k in kinds]
    threads = (1, 2) if size == "full" else (1,)
    return [_step_case(k, t, device) for k in kinds for t in threads]
