"""The test suite's device axis (conftest.py): CUDA parameters carry the ``cuda`` mark, inputs
reach a device in their own layout, and the child-process check of device-side asserts can
fail. These run without a GPU, so that the CUDA half of the suite is known to be sound before
a GPU runs it. And one CUDA-only property of every op: it runs on the current stream."""
import importlib

import pytest
import torch
import torch.nn as nn

import conftest
import fastcore_train as ft
from conftest import (DEVICES, TOL, DeviceAsserts, cpu_and_cuda, device_context, on_device,
                      to_cpu, to_device)
from fastcore_train.nn import MixedTarget
from fastcore_train.optim import FusedAdamW


def test_the_cuda_parameter_has_the_cuda_mark():
    assert [p.values[0] for p in DEVICES] == ["cpu", "cuda"]
    assert [[m.name for m in p.marks] for p in cpu_and_cuda()] == [[], ["cuda"]]


@pytest.mark.parametrize("layout", ["transposed", "row_slice", "offset", "channels_last",
                                    "expanded"])
def test_on_device_keeps_strides_and_offset(layout):
    """.to() makes a tensor with gaps contiguous and drops the storage offset; on_device keeps
    both, so strided and misaligned inputs reach the kernels as they are (checked on the meta
    device, which computes layouts without a GPU)."""
    base = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32)
    t = {"transposed": base[:20].view(4, 5).t(),
         "row_slice": base[:40].view(4, 10)[:, 1:6],
         "offset": base[1:21].view(4, 5),
         "channels_last": base.view(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
         "expanded": base[:5].view(1, 5).expand(3, 5)}[layout]
    for device in ("cpu", "meta"):
        d = on_device(t, device)
        assert d.device.type == device
        assert (d.shape, d.stride(), d.storage_offset()) == (t.shape, t.stride(),
                                                             t.storage_offset())
    assert torch.equal(on_device(t, "cpu"), t)


def test_to_device_and_back():
    lam = torch.rand(3)
    target = MixedTarget(torch.arange(3), torch.arange(3).flip(0), lam)
    moved = to_device({"t": target, "n": 0.5, "meta": torch.empty(2, device="meta")}, "cpu")
    assert isinstance(moved["t"], MixedTarget) and moved["t"].lam is lam and moved["n"] == 0.5
    assert moved["meta"].device.type == "meta"  # left where it is on purpose
    assert to_cpu([lam, (lam,)])[1][0] is lam


def test_device_asserts_pass_only_on_a_device_side_assert():
    """A child that fails on the host fails the check, with its error; so does one that runs
    to the end, and only the end of a device-side assert (torch's RuntimeError at the sync)
    passes. (Those two outputs are given here rather than run: each child costs `make test`
    a second or two of importing torch.)"""
    runner = DeviceAsserts(env={})  # whichever backend is there: the snippets need no kernel
    real = {"host error": "ft.ops.mixup(torch.ones(2, 3), torch.tensor([0, 0]), 0.5)"}
    with pytest.raises(AssertionError, match="(?s)failed without a device-side assert.*"
                                             "perm is not a permutation"):
        runner.expect(real, "host error")
    given = {"assert": "", "clean": ""}
    runner._results[("", "assert")] = (1, "RuntimeError: CUDA error: device-side assert "
                                          "triggered\n")
    runner._results[("", "clean")] = (0, conftest._NO_ASSERT + "\n")
    runner.expect(given, "assert")
    with pytest.raises(AssertionError, match="ran to the end without a device-side assert"):
        runner.expect(given, "clean")
    with pytest.raises(KeyError):
        runner.expect(given, "not in the batch")


@pytest.mark.parametrize("module", ["test_cross_entropy", "test_mixup", "test_bce",
                                    "test_normalize_mixup"])
def test_device_assert_snippets_are_the_bad_cases(module):
    """Each snippet the CUDA children run is a bad call: on the CPU the same code raises the
    error that names the value (so on CUDA it reaches the device with that bad value)."""
    mod = importlib.import_module(module)
    assert mod.CUDA_ASSERTS
    scope = {"torch": torch, "ft": importlib.import_module("fastcore_train")}
    exec(mod.CUDA_ASSERTS_PRELUDE, scope)
    for key, snippet in mod.CUDA_ASSERTS.items():
        with pytest.raises((IndexError, ValueError)):
            exec(snippet.replace("'cuda'", "'cpu'"), dict(scope))
        assert "'cuda'" in snippet, key


def test_a_build_without_cuda_kernels_is_not_tested_as_cuda(monkeypatch):
    """With a GPU but a CPU-only extension, CUDA tensors would run the reference and prove
    nothing about the kernels: the CUDA tests fail, saying so."""
    from fastcore_train import _backend
    if not _backend.extension_loaded():
        assert conftest.cuda_kernels_missing() is None  # the reference alone: nothing missing
        return
    monkeypatch.setattr(_backend._C, "compiled_with_cuda", lambda: False, raising=False)
    assert "without CUDA kernels" in conftest.cuda_kernels_missing()
    monkeypatch.setattr(_backend._C, "compiled_with_cuda", lambda: True, raising=False)
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastcore_train::mixup", "CUDA"):
        assert "no CUDA kernel for cross_entropy, " in conftest.cuda_kernels_missing()
    # every op the suite names is an op of the extension
    for op in conftest.CUDA_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastcore_train::{op}", "CPU")


def _every_op(logits, y, imgs, perm, grad):
    """Cross-entropy forward and backward, mixup, cutmix and a FusedAdamW step (clipped: both
    of its passes) on the given tensors; their results."""
    x = logits.detach().requires_grad_(True)
    loss = ft.ops.cross_entropy(x, y, label_smoothing=0.1, reduction="none")
    loss.sum().backward()
    mixed = ft.ops.mixup(imgs, perm, 0.3)
    cut, _ = ft.ops.cutmix(imgs, perm, (2, 9, 3, 12))
    p = nn.Parameter(torch.zeros(grad.shape, device=grad.device))
    p.grad = grad
    FusedAdamW([p], lr=0.1, max_grad_norm=1.0).step()
    return [loss.detach(), x.grad, mixed, cut, p.detach()]


@pytest.mark.cuda
def test_kernels_run_on_the_current_stream(extension):
    """Every op launches its kernels on the current stream, as torch's ops do (a kernel on the
    default stream raced under torch.compile in pytorch/extension-cpp). On a side stream held
    back by a sleep of ~0.1 s, the inputs are written after the sleep: an op on the current
    stream reads them, one on the default stream would run at once and read the zeros there
    before. (Ops on the current stream give the right answer whatever the timing.)"""
    g = torch.Generator().manual_seed(0)
    src = [torch.randn(64, 1000, generator=g), torch.randint(0, 1000, (64,), generator=g),
           torch.randn(8, 3, 16, 16, generator=g), torch.randperm(8, generator=g),
           torch.randn(4096, generator=g)]
    want = _every_op(*src)
    with device_context("cuda"):
        on_gpu = [t.cuda() for t in src]
        inputs = [torch.zeros_like(t) for t in on_gpu]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(200_000_000)  # GPU clock cycles
            for dst, t in zip(inputs, on_gpu):
                dst.copy_(t)
            got = _every_op(*inputs)
        side.synchronize()
        got = to_cpu(got)
    atol, rtol = TOL[torch.float32]
    for a, b in zip(got[:4], want[:4]):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    torch.testing.assert_close(got[4], want[4], atol=1e-6, rtol=1e-5)
    assert got[4].abs().min() > 0  # the step did move every weight
