"""Large CPU outputs (>= 32 MiB: cross-entropy gradients, fresh mixup/cutmix batches) come from
2 MiB pages, and freed blocks are cached for the next step. A reused block holds the previous
tensor's bytes, so every op must write every element of its output: poisoned blocks check it."""
import os
import random
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
    make()  # the cache keeps blocks of sizes asked for twice: this is the first time
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


# ---- the cache holds what the workload reuses, no more ----------------------------------------

WINDOW = 16  # large allocations (BlockCache::kWindow)


def _stats():
    return _backend._C.cache_stats()


def _block(mib):
    """A large block of `mib` MiB (never touched: no page is faulted in)."""
    return _backend._C._empty_large(mib * MiB)


@pytest.fixture
def fresh_cache(extension):
    _backend.empty_cache()
    for _ in range(2 * WINDOW):  # age out the request history of earlier tests
        _block(40)
    _backend.empty_cache()
    yield
    _backend.empty_cache()


def test_a_size_asked_for_once_is_not_kept(fresh_cache):
    a = _block(64)
    del a
    assert _backend.cached_bytes() == 0


def test_a_training_loop_reuses_its_blocks(fresh_cache):
    """Two outputs per step of fixed sizes: from the third step on every request is a hit."""
    for step in range(6):
        before = _stats()
        grad, batch = _block(96), _block(48)
        after = _stats()
        if step >= 2:
            assert after["hits"] - before["hits"] == 2, f"step {step}"
        del grad, batch
        assert _backend.cached_bytes() <= _stats()["limit_bytes"]
    assert _backend.cached_bytes() == (96 + 48) * MiB


def test_varying_sizes_hold_at_most_twice_the_largest_live_outputs(fresh_cache):
    """Batch sizes drawn at random (CE with 256..4096 rows x 32000 classes is 31..500 MiB):
    cached + in use never exceeds twice the largest set of outputs alive at once."""
    rng = random.Random(0)
    largest_live = 0
    worst = 0
    for _ in range(300):
        sizes = [rng.randint(32, 500), rng.randint(32, 500)]
        live = [_block(m) for m in sizes]
        largest_live = max(largest_live, _stats()["in_use_bytes"])
        held = _stats()["in_use_bytes"] + _stats()["cached_bytes"]
        worst = max(worst, held / largest_live)
        del live
    assert worst <= 2.0, f"held {worst:.2f}x the largest live outputs"
    assert _stats()["hits"] > 0  # it still reuses


def test_blocks_not_reused_within_a_window_are_freed(fresh_cache):
    for _ in range(2):
        b = _block(200)
        del b
    assert _backend.cached_bytes() == 200 * MiB
    for _ in range(WINDOW + 1):  # a workload of another size from now on
        _block(40)
    assert _backend.cached_bytes() <= 40 * MiB


def test_a_forked_child_starts_with_an_empty_cache(fresh_cache):
    for _ in range(2):
        b = _block(100)
        del b
    assert _backend.cached_bytes() == 100 * MiB
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running pytest's teardown
        os.write(w, str(_backend.cached_bytes()).encode())
        os._exit(0)
    os.close(w)
    child = int(os.read(r, 64).decode())
    os.waitpid(pid, 0)
    os.close(r)
    assert child == 0
    assert _backend.cached_bytes() == 100 * MiB  # the parent keeps its own


def test_info_reports_the_cache(extension):
    info = _backend.info()
    assert {"cached_bytes", "cache_limit_bytes"} <= set(info)
