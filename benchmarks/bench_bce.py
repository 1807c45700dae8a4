"""Fused mixup-aware binary cross-entropy vs timm's recipe in torch eager and torch.compile (same
process).

The recipe is timm's BinaryCrossEntropy(smoothing=0.1) on Mixup's targets: dense smoothed one-hot
targets for the batch and for its flip, blended with lam (timm's mixup_target), then
F.binary_cross_entropy_with_logits. ``eager`` and ``compile`` build those targets in every step
as timm does; ``eager, q prebuilt`` takes them ready-made (only the loss is timed), the baseline
most favourable to torch. Ours never builds them. Bytes counted: forward reads the logits once;
forward+backward reads them twice and writes the gradient once.

Run with ``pytest benchmarks/bench_bce.py`` (``make bench`` runs every file here).
"""
import pytest
import torch
import torch.nn.functional as F

import fastcore_train as ft
from fastcore_train import bench
from conftest import record, run, step_for

SMOOTHING = 0.1
LAM = 0.7
SHAPES = [(256, 1000), (1024, 11821)]  # ImageNet-1k; ImageNet-21k-P's 11821 classes
IMPLS = ("fastcore_train", "eager", "eager, q prebuilt", "compile")
_compiled: dict = {}


def timm_mixup_targets(y, num_classes, lam, smoothing, device):
    """timm's mixup_target: smoothed one-hot of y and of y.flip(0), blended with lam."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off

    def one_hot(t):
        return torch.full((t.shape[0], num_classes), off, device=device).scatter_(
            1, t.long().view(-1, 1), on)

    return one_hot(y) * lam + one_hot(y.flip(0)) * (1.0 - lam)


def timm_recipe(x, y):
    q = timm_mixup_targets(y, x.shape[1], LAM, SMOOTHING, x.device)
    return F.binary_cross_entropy_with_logits(x, q)


def _case(shape, dtype, mode, device="cpu"):
    B, C = shape
    device = torch.device(device)
    es = torch.finfo(dtype).bits // 8

    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, C, generator=g).to(device=device, dtype=dtype)
        y = torch.randint(0, C, (B,), generator=g).to(device)
        y_b = y.flip(0)
        q = timm_mixup_targets(y, C, LAM, SMOOTHING, device).to(dtype)
        key = (shape, dtype, mode, device.type)
        if key not in _compiled:  # one compiled graph per case, as a user would have
            bench._allow_recompiles()
            _compiled[key] = torch.compile(timm_recipe, dynamic=False)
        impls = {
            "fastcore_train": lambda a: ft.ops.binary_cross_entropy(
                a, y, target_b=y_b, lam=LAM, label_smoothing=SMOOTHING),
            "eager": lambda a: timm_recipe(a, y),
            "eager, q prebuilt": lambda a: F.binary_cross_entropy_with_logits(a, q),
            "compile": lambda a: _compiled[key](a, y),
        }
        steps = {}
        for name, fn in impls.items():
            if mode == "fwd":
                def step(fn=fn):
                    with torch.no_grad():
                        fn(x)
            else:
                x.requires_grad_(True)

                def step(fn=fn):
                    x.grad = None
                    fn(x).backward()
            steps[name] = bench._synced(step, device)
        return steps

    dname = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    nbytes = B * C * es * (1 if mode == "fwd" else 3)
    rounds = 21 if B * C * es >= 32 << 20 else 101  # medians over many rounds: a noisy VM
    return bench.Case("binary_cross_entropy", f"{mode} {B}x{C} {dname}", nbytes, make,
                      rounds=rounds, impls=IMPLS)


CASES = [_case(shape, dtype, mode) for shape in SHAPES
         for dtype in (torch.float32, torch.bfloat16) for mode in ("fwd", "fwd+bwd")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "-") for c in CASES])
def test_binary_cross_entropy(benchmark, case, impl):
    run(benchmark, step_for(case, impl), rounds=case.rounds)
    record(benchmark, op=case.op, case=case.name, impl=impl, nbytes=case.nbytes)
