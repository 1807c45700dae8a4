"""Large CPU outputs (>= 32 MiB: cross-entropy gradients, fresh mixup/cutmix batches) come from
2 MiB pages, and freed blocks are cached for the next step. A reused block holds the previous
tensor's bytes, so every op must write every element of its output: poisoned blocks check it."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastcore_train as ft
from fastcore_train import _backend

ROWS, COLS = 512, 16384  # 32 MiB of float32: the smallest size that takes the large path
MiB = 1 << 20


def _poisoned(make):
    """Runs ``make`` twice; the first output is filled with NaN and freed before the second
    call. Returns the second output and whether it reused the first one's memory."""
    _backend.empty_cache()
    first = make()
    ptr = first.data_ptr()
    first.fill_(float("nan"))
    del first
    assert _backend.cached_bytes() >= ROWS * COLS * 4
    second = make()
    return second, second.data_ptr() == ptr


def test_cross_entropy_grad_reuses_a_poisoned_block(extension):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, COLS, generator=g)
    y = torch.randint(0, COLS, (ROWS,), generator=g)
    y[::7] = -100  # ignored rows: their gradient rows must be written as zeros too

    def grad():
        xr = x.clone().requires_grad_(True)
        ft.ops.cross_entropy(xr, y, label_smoothing=0.1).backward()
        return xr.grad

    out, reused = _poisoned(grad)
    assert reused
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(xr, y, label_smoothing=0.1).backward()
    torch.testing.assert_close(out, xr.grad, atol=1e-7, rtol=1e-4)
    assert (out[::7] == 0).all()


@pytest.mark.parametrize("op", ["mixup", "cutmix"])
def test_fresh_mixup_outputs_reuse_a_poisoned_block(extension, op):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, ROWS, COLS // 16, generator=g)  # 32 MiB, NCHW
    perm = torch.randperm(8, generator=g)
    if op == "mixup":
        def make():
            return ft.ops.mixup(x, perm, 0.3)
        with _backend.use_backend("reference"):
            ref = ft.ops.mixup(x, perm, 0.3)
    else:
        box = (10, 200, 100, 900)

        def make():
            return ft.ops.cutmix(x, perm, box)[0]
        with _backend.use_backend("reference"):
            ref = ft.ops.cutmix(x, perm, box)[0]
    out, reused = _poisoned(make)
    assert reused
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)  # the blend may use an FMA


def test_empty_cache_frees_blocks_not_in_use(extension):
    _backend.empty_cache()
    a = ft.ops.mixup(torch.ones(8, ROWS, COLS // 8), torch.arange(8), 0.5)
    b = ft.ops.mixup(torch.ones(8, ROWS, COLS // 8), torch.arange(8), 0.5)
    assert _backend.cached_bytes() == 0  # both in use
    del a
    assert _backend.cached_bytes() == ROWS * COLS * 4
    assert ft.empty_cache() == ROWS * COLS * 4
    assert _backend.cached_bytes() == 0
    del b
    assert _backend.cached_bytes() == ROWS * COLS * 4
    ft.empty_cache()


def test_cache_limit_zero_disables_it(extension):
    code = ("import torch, fastcore_train as ft\n"
            "from fastcore_train import _backend\n"
            "a = ft.ops.mixup(torch.ones(8, 1024, 1024), torch.arange(8), 0.5)\n"
            "del a\n"
            "print(_backend.cached_bytes())\n")
    env = dict(os.environ, FASTCORE_TRAIN_CACHE_MB="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "0"
