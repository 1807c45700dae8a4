"""Fused label-smoothed cross-entropy vs torch eager and torch.compile (same process).

Bytes counted: forward reads the logits once; forward+backward reads them twice and writes the
gradient once (the physical minimum for a loss that saves no (B, C) activations).
"""
import pytest
import torch
import torch.nn.functional as F

import fastcore_train as ft
from conftest import record, run

SHAPES = [(256, 1000), (4096, 1000), (1024, 32000), (8192, 32000)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EPS = 0.1


def _eager(x, y):
    return F.cross_entropy(x, y, label_smoothing=EPS)


_compiled = {}


def _compile_fn(key):
    if key not in _compiled:
        _compiled[key] = torch.compile(_eager, dynamic=False)
    return _compiled[key]


def _impl(name, key):
    if name == "fastcore_train":
        return lambda x, y: ft.ops.cross_entropy(x, y, label_smoothing=EPS)
    if name == "eager":
        return _eager
    return _compile_fn(key)


@pytest.mark.parametrize("impl", ["fastcore_train", "eager", "compile"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_cross_entropy(benchmark, shape, dtype, mode, impl):
    B, C = shape
    dt = DTYPES[dtype]
    torch.manual_seed(0)
    x = torch.randn(B, C).to(dt)
    y = torch.randint(0, C, (B,))
    fn = _impl(impl, (shape, dtype, mode))
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(x, y)
        nbytes = B * C * x.element_size()
    else:
        x.requires_grad_(True)

        def step():
            x.grad = None
            fn(x, y).backward()
        nbytes = 3 * B * C * x.element_size()
    rounds = 3 if B * C >= 8192 * 32000 else 7
    run(benchmark, step, rounds=rounds, warmup=2)
    record(benchmark, op="cross_entropy", case=f"{mode} {B}x{C} {dtype}", impl=impl,
           nbytes=nbytes)
