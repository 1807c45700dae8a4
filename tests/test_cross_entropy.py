"""Fused label-smoothed cross-entropy: parity with torch and with the reference, gradients,
the two-target (mixup) form, bad input, torch.library and torch.compile integration. Tests
that take ``device`` run on the CPU and, with a GPU, on CUDA against the CPU reference."""
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastcore_train as ft
from fastcore_train import _backend
from fastcore_train.ops.cross_entropy import cross_entropy_reference

from conftest import TOL, on_device, to_cpu, to_device
from conftest import loss_and_grad as _loss_and_grad, loss_and_grad_on as _on

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(0, 5), (1, 1), (1, 7), (5, 1), (7, 33), (16, 1000), (3, 4099), (2, 10007)]


def _logits(B, C, dtype, layout="contiguous", seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed":  # classes not unit-stride
        x = torch.randn(C, B, generator=g).mul_(scale).to(dtype).t()
    elif layout == "row_slice":  # rows strided (a view into a wider tensor)
        x = torch.randn(B, C + 3, generator=g).mul_(scale).to(dtype)[:, 1:C + 1]
    elif layout == "offset":  # contiguous, one element into its storage: rows misaligned
        x = torch.randn(B * C + 1, generator=g).mul_(scale).to(dtype)[1:].view(B, C)
    else:
        x = torch.randn(B, C, generator=g).mul_(scale).to(dtype)
    return x


def _targets(B, C, seed=1, ignore_every=0, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (B,), generator=g)
    if ignore_every and B:
        y[::ignore_every] = ignore_index
    return y


def _torch_ce(x, y, **kw):
    """torch's own op, computed in float64 so it serves as the ground truth for every dtype."""
    return F.cross_entropy(x.double(), y, **kw)


def _assert_close(actual, expected, dtype, scale=1.0):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), atol=atol * scale,
                               rtol=rtol, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_torch(backend, device, dtype, shape, reduction):
    B, C = shape
    x = _logits(B, C, dtype)
    y = _targets(B, C, ignore_every=3)
    kw = dict(label_smoothing=0.1, reduction=reduction)
    loss, grad = _on(device, ft.ops.cross_entropy, x, y, **kw)
    ref_loss, ref_grad = _loss_and_grad(_torch_ce, x, y, **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype and grad.shape == x.shape
    if B and reduction == "mean" and bool((y == -100).all()):
        assert torch.isnan(loss) and torch.isnan(ref_loss)
        return
    _assert_close(loss, ref_loss, dtype, scale=max(1.0, B if reduction == "sum" else 1.0))
    _assert_close(grad, ref_grad.to(dtype), dtype)


@pytest.mark.parametrize("layout", ["transposed", "row_slice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous(backend, device, layout, dtype):
    x = _logits(9, 515, dtype, layout=layout)
    assert not x.is_contiguous() and not on_device(x, device).is_contiguous()
    y = _targets(9, 515)
    loss, grad = _on(device, ft.ops.cross_entropy, x, y, label_smoothing=0.2)
    ref_loss, ref_grad = _loss_and_grad(_torch_ce, x.contiguous(), y, label_smoothing=0.2)
    _assert_close(loss, ref_loss, dtype)
    _assert_close(grad, ref_grad.to(dtype), dtype)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_smoothing_and_ignore_index(backend, device, smoothing, ignore_index):
    x = _logits(20, 50, torch.float32)
    y = _targets(20, 50, ignore_every=4, ignore_index=ignore_index)
    kw = dict(label_smoothing=smoothing, ignore_index=ignore_index)
    loss, grad = _on(device, ft.ops.cross_entropy, x, y, **kw)
    ref_loss, ref_grad = _loss_and_grad(_torch_ce, x, y, **kw)
    _assert_close(loss, ref_loss, torch.float32)
    _assert_close(grad, ref_grad.float(), torch.float32)
    assert grad[y == ignore_index].abs().max() == 0


def test_extension_matches_reference_exactly_enough(extension, device):
    """The kernel and the reference (on the CPU) agree far tighter than either does with bf16
    rounding."""
    x = _logits(64, 32000, torch.float32)
    y = _targets(64, 32000, ignore_every=7)
    with _backend.use_backend("extension"):
        a, ga = _on(device, ft.ops.cross_entropy, x, y, label_smoothing=0.1, reduction="none")
    b, gb = _loss_and_grad(cross_entropy_reference, x, y, label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(ga, gb, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("B", [2, 8])
def test_long_rows_online_softmax(backend, device, B):
    """C = 262144 takes several online-softmax chunks on the CPU and the largest CUDA block
    (512 threads of 16-byte vectors, 128 steps each) on a GPU, where B = 8 such rows leave most
    of the GPU idle with one block per row; large offsets test the rescaling."""
    C = 262144
    x = _logits(B, C, torch.float32)
    x[0, : C // 2] += 40.0  # the max moves between chunks
    x[1, C // 2:] -= 40.0
    y = torch.tensor([5, C - 1] + [C // 2 + i for i in range(B - 2)])
    loss, grad = _on(device, ft.ops.cross_entropy, x, y, label_smoothing=0.05)
    ref_loss, ref_grad = _loss_and_grad(_torch_ce, x, y, label_smoothing=0.05)
    _assert_close(loss, ref_loss, torch.float32)
    _assert_close(grad, ref_grad.float(), torch.float32)


def _soft_target_ce(x, y_a, y_b, lam, eps):
    """Mixup + label smoothing the way timm does it: dense soft targets, then soft CE."""
    C = x.shape[1]
    off, on = eps / C, 1.0 - eps + eps / C
    q_a = torch.full((x.shape[0], C), off, dtype=torch.float64).scatter_(1, y_a[:, None], on)
    q_b = torch.full((x.shape[0], C), off, dtype=torch.float64).scatter_(1, y_b[:, None], on)
    lam = lam[:, None].double() if isinstance(lam, torch.Tensor) else lam
    q = lam * q_a + (1 - lam) * q_b
    return -(q * torch.log_softmax(x.double(), dim=1)).sum(1).mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("lam_kind", ["float", "tensor", "same_targets"])
def test_two_target_equals_soft_targets(backend, device, dtype, lam_kind):
    B, C = 13, 301
    x = _logits(B, C, dtype)
    y_a = _targets(B, C, seed=2)
    y_b = y_a.flip(0) if lam_kind != "same_targets" else y_a.clone()
    lam = torch.rand(B, generator=torch.Generator().manual_seed(3)) if lam_kind == "tensor" else 0.37
    loss, grad = _on(device, ft.ops.cross_entropy, x, y_a, target_b=y_b, lam=lam,
                     label_smoothing=0.1)
    ref_loss, ref_grad = _loss_and_grad(_soft_target_ce, x, y_a, y_b, lam, 0.1)
    _assert_close(loss, ref_loss, dtype)
    _assert_close(grad, ref_grad.to(dtype), dtype)


def test_module_accepts_mixed_target(backend, device):
    B, C = 8, 10
    x = _logits(B, C, torch.float32)
    y_a, y_b = _targets(B, C, seed=4), _targets(B, C, seed=5)
    crit = ft.nn.LabelSmoothingCrossEntropy(smoothing=0.1)
    xd, ad, bd = to_device((x, y_a, y_b), device)
    got = crit(xd, ft.MixedTarget(ad, bd, 0.7))
    want = _soft_target_ce(x, y_a, y_b, 0.7, 0.1)
    _assert_close(got, want, torch.float32)
    assert "smoothing=0.1" in repr(crit)
    _assert_close(crit(xd, ad), _torch_ce(x, y_a, label_smoothing=0.1), torch.float32)


@pytest.mark.parametrize("ignore_in", ["a", "b"])
def test_two_target_ignore(backend, device, ignore_in):
    x = _logits(6, 9, torch.float32)
    y_a, y_b = _targets(6, 9, seed=1), _targets(6, 9, seed=2)
    (y_a if ignore_in == "a" else y_b)[2] = -100
    loss, grad = _on(device, ft.ops.cross_entropy, x, y_a, target_b=y_b, lam=0.5,
                     reduction="none")
    assert loss[2] == 0 and grad[2].abs().max() == 0
    mean = ft.ops.cross_entropy(*to_device((x, y_a), device), target_b=y_b.to(device), lam=0.5)
    _assert_close(mean, loss.sum() / 5, torch.float32)


def test_nan_and_inf_propagate_like_torch(backend, device):
    x = _logits(4, 40, torch.float32)
    x[1, 3] = float("nan")
    x[2, 7] = float("inf")
    x[3, :] = float("-inf")
    y = torch.tensor([0, 1, 2, 3])
    loss = ft.ops.cross_entropy(*to_device((x, y), device), reduction="none").cpu()
    ref = F.cross_entropy(x, y, reduction="none")
    torch.testing.assert_close(loss, ref, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale,shift", [(3.0, 85.0), (3.0, -100.0), (3.0, -68.0), (500.0, 0.0),
                                         (1.0, 200.0), (2e4, 0.0)])
def test_extreme_logit_ranges(backend, device, dtype, scale, shift):
    """The CPU forward sums exp(z) unshifted when the row max allows it and falls back to the
    shifted form otherwise: rows on either side of the switch (max near 87 - ln C, below -70,
    huge spreads) must all match torch. One batch mixes ordinary and extreme rows."""
    if dtype == torch.float16 and scale * 4 + abs(shift) > 6e4:
        pytest.skip("beyond float16's range")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 517, generator=g) * 3.0
    x[::2] = torch.randn(4, 517, generator=g) * scale + shift
    x = x.to(dtype)
    y = _targets(8, 517, seed=2)
    loss, grad = _on(device, ft.ops.cross_entropy, x, y, label_smoothing=0.1, reduction="none")
    ref_loss, ref_grad = _loss_and_grad(_torch_ce, x, y, label_smoothing=0.1, reduction="none")
    mag = float(x.double().abs().max())  # absolute errors scale with the logits
    _assert_close(loss, ref_loss, dtype, scale=max(1.0, mag))
    _assert_close(grad, ref_grad.to(dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("mask", [float("-inf"), -1e9, -100.0])
def test_masked_logits_like_torch(backend, device, dtype, eps, mask):
    """Classes masked with -inf or a huge negative value (common ways to restrict the label
    set): without smoothing the loss is finite and the gradient of masked classes is zero, as
    in torch; with smoothing the loss follows torch (+inf for -inf masks: the smoothed target
    puts mass on the masked classes). A row whose target itself is masked has an infinite (or
    huge) loss either way."""
    x = _logits(6, 37, torch.float32)
    x[:, 5:9] = mask
    x[4, 20:] = mask
    y = torch.tensor([0, 1, 2, 36, 3, 5])  # row 5: the target is masked
    x = x.to(dtype)
    loss, grad = _on(device, ft.ops.cross_entropy, x, y, label_smoothing=eps, reduction="none")
    ref_loss, ref_grad = _loss_and_grad(_torch_ce, x.double(), y, label_smoothing=eps,
                                        reduction="none")
    _assert_close(loss, ref_loss, dtype, scale=max(1.0, abs(mask) if mask > -1e30 else 1.0))
    _assert_close(grad[:5], ref_grad[:5].to(dtype), dtype)
    if mask == float("-inf"):
        if eps == 0:
            assert torch.isfinite(loss[:5]).all() and loss[5] == float("inf")
            assert (grad[:5, 5:9] == 0).all()
        else:
            assert (loss == float("inf")).all()


def test_no_classes_all_rows_ignored_like_torch(backend, device):
    """Zero classes: every row must be ignored, each counts 0 and their mean is NaN. (With
    smoothing torch also gives NaN for ignored rows, 0/0 in its smoothing term; ours stay 0.)
    A target that is not ignored is an IndexError on every device: with no classes the CUDA op
    checks on the host (a degenerate case, where a sync costs nothing that matters)."""
    x = torch.zeros(3, 0)
    y = torch.full((3,), -100)
    for reduction in ("none", "sum", "mean"):
        loss = ft.ops.cross_entropy(*to_device((x, y), device), reduction=reduction).cpu()
        ref = F.cross_entropy(x, y, reduction=reduction)
        torch.testing.assert_close(loss, ref, equal_nan=True)
    with pytest.raises(IndexError, match="out of range for 0 classes"):
        ft.ops.cross_entropy(x.to(device), torch.tensor([-100, 0, -100], device=device))


def test_gradcheck_float64(backend, device):
    """float64 on every device (the CUDA kernels dispatch float64 too)."""
    x = _logits(5, 7, torch.float64).to(device).requires_grad_(True)
    y = _targets(5, 7, ignore_every=4).to(device)
    y_b = _targets(5, 7, seed=9).to(device)
    lam = torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
    torch.autograd.gradcheck(lambda t: ft.ops.cross_entropy(t, y, label_smoothing=0.3), (x,))
    torch.autograd.gradcheck(
        lambda t: ft.ops.cross_entropy(t, y, target_b=y_b, lam=lam, label_smoothing=0.2,
                                       reduction="none"), (x,))


# ---------------------------------------------------------------------------------------------
# bad input: the same exception type and message from both backends, on every device. On CUDA
# the kernels check values (targets, a lam tensor) on the device -- a device-side assert, as in
# torch's own CUDA losses, with no host sync -- so those cases assert there, in a child process.

BAD = {
    "3-D logits": (lambda: (torch.randn(3, 4, 5), torch.zeros(3, dtype=torch.long)), {},
                   ValueError, "2-D"),
    "int logits": (lambda: (torch.randn(3, 4).int(), torch.zeros(3, dtype=torch.long)), {},
                   TypeError, "logits must be float32"),
    "int32 target": (lambda: (torch.randn(3, 4), torch.zeros(3, dtype=torch.int32)), {},
                     TypeError, "int64"),
    "target shape": (lambda: (torch.randn(3, 4), torch.zeros(2, dtype=torch.long)), {},
                     ValueError, r"shape \(3,\)"),
    "target too large": (lambda: (torch.randn(3, 4), torch.tensor([0, 4, 1])), {}, IndexError,
                         "target 4 is out of range for 4 classes"),
    "target negative": (lambda: (torch.randn(3, 4), torch.tensor([0, -3, 1])), {}, IndexError,
                        "target -3"),
    "label_smoothing": (lambda: (torch.randn(3, 4), torch.tensor([0, 1, 2])),
                        {"label_smoothing": 1.5}, ValueError, "label_smoothing must be in"),
    "lam float": (lambda: (torch.randn(3, 4), torch.tensor([0, 1, 2])),
                  {"target_b": torch.tensor([1, 2, 3]), "lam": 1.2}, ValueError,
                  "lam must be in"),
    "lam tensor": (lambda: (torch.randn(3, 4), torch.tensor([0, 1, 2])),
                   {"target_b": torch.tensor([1, 2, 3]), "lam": torch.tensor([0.5, -0.1, 0.2])},
                   ValueError, "lam must be in"),
    "target_b without lam": (lambda: (torch.randn(3, 4), torch.tensor([0, 1, 2])),
                             {"target_b": torch.tensor([1, 2, 3])}, ValueError,
                             "given together"),
    "target_b too large": (lambda: (torch.randn(3, 4), torch.tensor([0, 1, 2])),
                           {"target_b": torch.tensor([1, 9, 3]), "lam": 0.5}, IndexError,
                           "target 9"),
    "reduction": (lambda: (torch.randn(3, 4), torch.tensor([0, 1, 2])), {"reduction": "avg"},
                  ValueError, "reduction"),
}
# the cases whose values only the device reads on CUDA
DEVICE_SIDE = {"target too large", "target negative", "lam tensor", "target_b too large"}


def call_bad_case(name, device):
    """Runs BAD[name] on ``device`` (also the code of the child processes on CUDA)."""
    make, kw, _, _ = BAD[name]
    ft.ops.cross_entropy(*to_device(make(), device), **to_device(kw, device))


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(backend, device, device_asserts, name):
    if device == "cuda" and backend == "extension" and name in DEVICE_SIDE:
        device_asserts.expect(CUDA_ASSERTS, f"bad: {name}", prelude=CUDA_ASSERTS_PRELUDE)
        return
    _, _, exc, msg = BAD[name]
    with pytest.raises(exc, match=msg):
        call_bad_case(name, device)


def test_target_dtype_messages_match(extension, device):
    """Probability targets get a hint, with the same text from the C++ check and Python."""
    msg = ("cross_entropy: target must be int64 (torch.long) class indices, got torch.float32 "
           "(probability targets are not supported; for mixup pass target_b and lam)")
    x, y = torch.randn(2, 5, device=device), torch.rand(2, device=device)
    with pytest.raises(TypeError) as info:
        torch.ops.fastcore_train.cross_entropy(x, y, None, None, 1.0, 0.0, -100, 1)
    assert msg in str(info.value)
    with _backend.use_backend("reference"), pytest.raises(TypeError) as info:
        ft.ops.cross_entropy(x, y)
    assert str(info.value) == msg
    with pytest.raises(TypeError, match="int64 \\(torch.long\\) class indices, got torch.int32$"):
        ft.ops.cross_entropy(x, torch.zeros(2, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="ft.MixedTarget"):
        ft.nn.LabelSmoothingCrossEntropy()(x, (y, y, 0.5))
    with pytest.raises(TypeError, match="for mixup targets pass target_b and lam"):
        ft.ops.cross_entropy(x, (y, y, 0.5))


def test_op_checks_direct_call(extension):
    """The C++ op checks its inputs itself too (for users of torch.ops directly)."""
    with pytest.raises(IndexError, match="target 7 is out of range"):
        torch.ops.fastcore_train.cross_entropy(torch.randn(2, 5), torch.tensor([1, 7]), None,
                                               None, 1.0, 0.0, -100, 1)
    with pytest.raises(ValueError, match="lam must be in"):
        torch.ops.fastcore_train.cross_entropy(torch.randn(2, 5), torch.tensor([1, 2]),
                                               torch.tensor([0, 0]), torch.tensor([0.5, 2.0]),
                                               1.0, 0.0, -100, 1)
    with pytest.raises(ValueError, match="reduction must be"):
        torch.ops.fastcore_train.cross_entropy(torch.randn(2, 5), torch.tensor([1, 2]), None,
                                               None, 1.0, 0.0, -100, 3)


# ---------------------------------------------------------------------------------------------
# integration with torch.library and torch.compile

def test_opcheck(extension, device):
    g = torch.Generator().manual_seed(0)
    x = _logits(6, 37, torch.float32).to(device).requires_grad_(True)
    y = _targets(6, 37, ignore_every=5).to(device)
    y_b = _targets(6, 37, seed=3).to(device)
    lam = torch.rand(6, generator=g).to(device)
    lam_g = torch.rand(6, generator=g).to(device).requires_grad_(True)
    for reduction in (0, 1, 2):
        torch.library.opcheck(torch.ops.fastcore_train.cross_entropy.default,
                              (x, y, None, None, 1.0, 0.1, -100, reduction))
        torch.library.opcheck(torch.ops.fastcore_train.cross_entropy.default,
                              (x, y, y_b, lam, 1.0, 0.1, -100, reduction))
        torch.library.opcheck(torch.ops.fastcore_train.cross_entropy.default,
                              (x, y.to(torch.uint8).masked_fill(y < 0, 255), y_b, lam_g, 1.0,
                               0.1, 255, reduction))
    _, stats = torch.ops.fastcore_train.cross_entropy(x.detach(), y, y_b, None, 0.3, 0.1, -100, 0)
    assert stats.shape == (6, 2) and stats.device == x.device
    torch.library.opcheck(torch.ops.fastcore_train.cross_entropy_backward.default,
                          (torch.rand(6, generator=g).to(device), x.detach(), y, y_b, None, 0.3,
                           stats, 0.1, -100, 0))
    torch.library.opcheck(torch.ops.fastcore_train.cross_entropy_backward.default,
                          (torch.rand((), generator=g).to(device), x.detach(), y, y_b, None, 0.3,
                           stats, 0.1, -100, 1))


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_eager_autograd_matches_registered_autograd(extension, device, reduction):
    """ft.ops.cross_entropy uses a lean autograd.Function in eager mode; torch.ops calls (and
    torch.compile) use the torch.library registration. Same loss, same gradient,
    and the fast path is really taken."""
    x = _logits(6, 37, torch.float32).to(device)
    y = _targets(6, 37, ignore_every=5).to(device)
    y_b = _targets(6, 37, seed=3).to(device)
    lam = torch.rand(6, generator=torch.Generator().manual_seed(0)).to(device)
    name = {0: "none", 1: "mean", 2: "sum"}[reduction]
    for extra in ({}, {"target_b": y_b, "lam": lam}, {"target_b": y_b, "lam": 0.3}):
        loss, grad = _loss_and_grad(ft.ops.cross_entropy, x, y, label_smoothing=0.1,
                                    reduction=name, **extra)
        xr = x.clone().requires_grad_(True)
        assert type(ft.ops.cross_entropy(xr, y, **extra).grad_fn).__name__.startswith(
            "_CrossEntropyFunction")
        lam_t = extra.get("lam") if isinstance(extra.get("lam"), torch.Tensor) else None
        lam_s = extra.get("lam", 1.0) if lam_t is None else 1.0
        ref, _ = torch.ops.fastcore_train.cross_entropy(xr, y, extra.get("target_b"), lam_t,
                                                        lam_s, 0.1, -100, reduction)
        (ref.sum() if ref.dim() else ref).backward()
        assert torch.equal(loss, ref.detach()) and torch.equal(grad, xr.grad)
    # lam's gradient, from both paths
    lam_a, lam_b = lam.clone().requires_grad_(True), lam.clone().requires_grad_(True)
    out = ft.ops.cross_entropy(x, y, target_b=y_b, lam=lam_a, reduction=name)
    assert type(out.grad_fn).__name__.startswith("_CrossEntropyFunction")
    (out.sum() if out.dim() else out).backward()
    ref, _ = torch.ops.fastcore_train.cross_entropy(x, y, y_b, lam_b, 1.0, 0.0, -100, reduction)
    (ref.sum() if ref.dim() else ref).backward()
    assert lam_a.grad is not None and torch.equal(lam_a.grad, lam_b.grad)


def test_torch_compile_fullgraph(extension, device):
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 11).to(device)

    def step(inp, y, y_b, lam):
        return ft.ops.cross_entropy(model(inp), y, target_b=y_b, lam=lam, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    inp = torch.randn(8, 16).to(device)
    y, y_b, lam = to_device((_targets(8, 11), _targets(8, 11, seed=7), torch.rand(8)), device)
    got = compiled(inp, y, y_b, lam)
    got.backward()
    g_compiled = model.weight.grad.clone()
    model.weight.grad = None
    want = step(inp, y, y_b, lam)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_compiled, model.weight.grad)


def test_torch_compile_uint8_targets_and_lam_grad(extension, device):
    """uint8 class indices and a lam that requires grad trace through torch.compile too, with
    the gradients of eager mode (the registered autograd computes lam's gradient)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 11).to(device)

    def step(inp, y, y_b, lam):
        return ft.ops.cross_entropy(model(inp), y, target_b=y_b, lam=lam, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    inp = torch.randn(8, 16).to(device)
    y = _targets(8, 11).to(device, torch.uint8)
    y_b = _targets(8, 11, seed=7).to(device, torch.uint8)
    results = []
    for fn in (compiled, step):
        model.zero_grad()
        lam = torch.rand(8, generator=torch.Generator().manual_seed(0)).to(device)
        lam.requires_grad_(True)
        loss = fn(inp, y, y_b, lam)
        loss.backward()
        results.append((loss.detach(), model.weight.grad.clone(), lam.grad))
    (l1, w1, g1), (l2, w2, g2) = results
    assert g1 is not None
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(w1, w2)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_every_cpu_build(extension, isa):
    """Each per-ISA build of the kernel gives the same answer (the CPU may lack some)."""
    C_ = _backend._C
    order = ["default", "avx2", "avx512"]
    if order.index(isa) > order.index(C_.best_cpu_capability()):
        pytest.skip(f"CPU lacks {isa}")
    x = _logits(5, 3001, torch.bfloat16)
    y = _targets(5, 3001)
    try:
        C_._set_cpu_capability(isa)
        assert C_.cpu_capability() == isa
        loss, grad = _loss_and_grad(ft.ops.cross_entropy, x, y, label_smoothing=0.1)
    finally:
        C_._set_cpu_capability("")
    ref_loss, ref_grad = _loss_and_grad(_torch_ce, x, y, label_smoothing=0.1)
    _assert_close(loss, ref_loss, torch.bfloat16)
    _assert_close(grad, ref_grad.bfloat16(), torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# numerics at every magnitude

OFFSETS = [0.0, 50.0, 1e2, 1e4, 1e6, 1e7, 1e8, 1e10, 1e20, 1e30]
# The kernels' vector exp (at::vec exp_u20, the price of their speed) is good to ~3 float32
# ulps of 1; torch's fp32 gradient is sometimes exact to the last bit. A gradient error within
# 4 ulps of 1 therefore passes even where it exceeds twice torch's.
GRAD_FLOOR = 4 * 2.0 ** -24


def _cpu_builds():
    if not _backend.extension_loaded():
        return []
    order = ["default", "avx2", "avx512"]
    return order[: order.index(_backend._C.best_cpu_capability()) + 1]


def _offset_case(offset, two):
    g = torch.Generator().manual_seed(int(offset) % 1000 + 7)
    x = torch.randn(8, 1000, generator=g) * 3 + offset
    y_a = torch.randint(0, 1000, (8,), generator=g)
    y_b = torch.randint(0, 1000, (8,), generator=g)
    lam = torch.rand(8, generator=g)
    return x, y_a, (dict(target_b=y_b, lam=lam) if two else {})


def _float64_truth_and_torch_fp32(x, y_a, kw, eps):
    """The float64 computation of the same float32 logits, and torch's own fp32 op."""
    if kw:
        C = x.shape[1]
        lam = kw["lam"][:, None]
        q = lam * F.one_hot(y_a, C) + (1 - lam) * F.one_hot(kw["target_b"], C)

        def soft(t, dtype):
            return F.cross_entropy(t.to(dtype), q.to(dtype), label_smoothing=eps,
                                   reduction="none")
        truth = _loss_and_grad(soft, x, torch.float64)
        fp32 = _loss_and_grad(soft, x, torch.float32)
    else:
        truth = _loss_and_grad(_torch_ce, x, y_a, label_smoothing=eps, reduction="none")
        fp32 = _loss_and_grad(F.cross_entropy, x, y_a, label_smoothing=eps, reduction="none")
    return truth, fp32


def _max_errors(got, truth):
    return tuple(float((a.double() - b.double()).abs().max()) for a, b in zip(got, truth))


@pytest.mark.parametrize("two", [False, True], ids=["one_target", "two_targets"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("offset", OFFSETS)
def test_precision_at_every_offset(device, offset, eps, two):
    """8x1000 logits randn*3 + offset, float32: loss and gradient within twice torch's own fp32
    error on the CPU (both against a float64 computation) on every CPU build, on the CUDA
    kernel and on the reference on each device. The log-sum-exp stored as one float32 value
    lost everything from offset 1e4 on (loss off by 3.6 at 1e8, gradient rows summing to 0.6
    at 1e7); a plain sum of logits for the smoothing term lost it too (off by 1e22 at 1e30)."""
    x, y_a, kw = _offset_case(offset, two)
    truth, fp32 = _float64_truth_and_torch_fp32(x, y_a, kw, eps)
    torch_loss_err, torch_grad_err = _max_errors(fp32, truth)
    builds = _cpu_builds() if device == "cpu" else [None] if _backend.extension_loaded() else []
    variants = [("reference", None)] + [("extension", isa) for isa in builds]
    for backend_name, isa in variants:
        try:
            if isa:
                _backend._C._set_cpu_capability(isa)
            with _backend.use_backend(backend_name):
                got = _on(device, ft.ops.cross_entropy, x, y_a, label_smoothing=eps,
                          reduction="none", **kw)
        finally:
            if isa:
                _backend._C._set_cpu_capability("")
        loss_err, grad_err = _max_errors(got, truth)
        where = (f"{backend_name} {isa or device}: loss err {loss_err:.3g} grad err "
                 f"{grad_err:.3g}; torch {torch_loss_err:.3g} {torch_grad_err:.3g}")
        assert loss_err <= 2 * torch_loss_err, where
        assert grad_err <= max(2 * torch_grad_err, GRAD_FLOOR), where


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_issue_examples_large_logits(backend, device, eps):
    """Issue 13's cases: logits of 1e8 (log-sum-exp lost in float32) and of 1e38 with smoothing
    (the logit sum overflowed to -inf where torch gives log 4)."""
    for x, y in ((torch.tensor([[1e8, 1e8, 0.0]]), torch.tensor([0])),
                 (torch.full((2, 4), 1e38), torch.tensor([0, 3])),
                 (torch.tensor([[3e38, -3e38, 3e38, 0.0]]), torch.tensor([2]))):
        got = _on(device, ft.ops.cross_entropy, x, y, label_smoothing=eps)
        want = _loss_and_grad(F.cross_entropy, x, y, label_smoothing=eps)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["masked_start", "low_start", "far_max", "top_of_range"])
def test_one_pass_pivot_cases(backend, device, dtype, layout):
    """The CPU forward's one pass works against a pivot (the max of the row's first vector
    step, 0 when that is -inf) when the row max is near it, and redoes the row with the shifted
    form otherwise. Rows on both sides, on every CPU build; on CUDA the same rows test the
    online max (a masked start, the top of float32's range)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1031, generator=g) * 3 + (0.0 if layout == "masked_start" else 1e4)
    if layout == "masked_start":
        x[:, :40] = float("-inf")       # no finite pivot: 0, one pass
    elif layout == "low_start":
        x[:, :40] -= 60.0               # pivot ~55 below the max, still one pass
    elif layout == "far_max":
        x[:, 500] += 200.0              # the max too far above the pivot: the shifted form
    else:
        x[:, :40] = 3e38                # one pass at the top of float32's range
    x = x.to(dtype)
    y = _targets(6, 1031, seed=4)
    want = _loss_and_grad(_torch_ce, x, y, reduction="none")
    for isa in _cpu_builds() if backend == "extension" and device == "cpu" else [None]:
        try:
            if isa:
                _backend._C._set_cpu_capability(isa)
            got = _on(device, ft.ops.cross_entropy, x, y, reduction="none")
        finally:
            if isa:
                _backend._C._set_cpu_capability("")
        _assert_close(got[0], want[0], dtype)
        _assert_close(got[1], want[1].to(dtype), dtype)


# ---------------------------------------------------------------------------------------------
# non-finite rows

INF, NAN = float("inf"), float("nan")
NONFINITE_ROWS = {
    "nan": [0.0, NAN, 1.0, 2.0],
    "nan_at_target": [NAN, 0.0, 1.0, 2.0],
    "pos_inf": [0.0, INF, 1.0, 2.0],
    "pos_inf_at_target": [INF, 0.0, 1.0, 2.0],
    "two_pos_inf": [INF, INF, 1.0, 2.0],
    "all_neg_inf": [-INF] * 4,
    "pos_and_neg_inf": [0.0, INF, -INF, 2.0],
    "nan_and_neg_inf": [0.0, NAN, -INF, 2.0],
}


@pytest.mark.parametrize("two", [False, True], ids=["one_target", "two_targets"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("row", list(NONFINITE_ROWS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_nonfinite_rows_like_torch(backend, device, dtype, row, eps, two):
    """A row with a NaN or +inf logit, or only -inf ones, has a NaN loss and a NaN gradient
    across the row, as F.cross_entropy gives (with probability targets for the two-target
    form); the other rows are untouched. The row goes through every kernel path: short rows
    (scalar tails), long rows (vector body, several online chunks)."""
    for C in (4, 9000):
        x = _logits(3, C, torch.float32)
        x[1, :4] = torch.tensor(NONFINITE_ROWS[row])
        if C > 4 and row == "all_neg_inf":
            x[1] = -INF
        elif C > 4:
            x[1, 5000:5004] = torch.tensor(NONFINITE_ROWS[row])  # also in a later chunk
        x = x.to(dtype)
        y = torch.tensor([1, 0, 2])
        if two:
            y_b, lam = torch.tensor([3, 2, 2]), torch.tensor([0.3, 0.6, 0.5])
            got = _on(device, ft.ops.cross_entropy, x, y, target_b=y_b, lam=lam,
                      label_smoothing=eps, reduction="none")
            q = lam[:, None] * F.one_hot(y, C) + (1 - lam[:, None]) * F.one_hot(y_b, C)
            want = _loss_and_grad(F.cross_entropy, x.double(), q.double(),
                                  label_smoothing=eps, reduction="none")
        else:
            got = _on(device, ft.ops.cross_entropy, x, y, label_smoothing=eps, reduction="none")
            want = _loss_and_grad(_torch_ce, x, y, label_smoothing=eps, reduction="none")
        assert torch.isnan(got[0][1]) and torch.isnan(got[1][1]).all(), (C, got)
        _assert_close(got[0], want[0], dtype)
        _assert_close(got[1], want[1].to(dtype), dtype)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_ignored_rows_count_for_nothing_whatever_their_logits(backend, device, eps):
    """An ignored row gives 0 loss and 0 gradient even with NaN or infinite logits, on both
    backends (F.cross_entropy gives a NaN gradient there: its log_softmax backward multiplies
    the row's zero upstream gradient by NaN). A fully masked padding row does not poison the
    batch."""
    x = _logits(4, 6, torch.float32)
    x[0, 2] = NAN
    x[1, 3] = INF
    x[2] = -INF
    y = torch.tensor([-100, -100, -100, 4])
    loss, grad = _on(device, ft.ops.cross_entropy, x, y, label_smoothing=eps)
    want_loss, want_grad = _loss_and_grad(_torch_ce, x[3:], y[3:], label_smoothing=eps)
    _assert_close(loss, want_loss, torch.float32)
    assert (grad[:3] == 0).all()
    _assert_close(grad[3:], want_grad.float(), torch.float32)


# ---------------------------------------------------------------------------------------------
# class-index dtypes

INDEX_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool]


def _torch_accepts_index_dtype(dtype):
    try:
        F.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]).to(dtype))
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("dtype", INDEX_DTYPES)
def test_index_dtypes_exactly_where_torch_takes_them(backend, device, dtype):
    """Targets of every integer dtype torch accepts (int64 and uint8 in torch 2.13) give the
    int64 result; the others are refused with our message, from both backends. On CUDA the
    result is compared with the int64 result on CUDA (bit for bit: the same kernel) and with
    torch's own op on the CPU."""
    x = _logits(6, 9, torch.float32)
    y = _targets(6, 9, seed=1)
    if not _torch_accepts_index_dtype(dtype):
        x, y = to_device((x, y), device)
        with pytest.raises(TypeError, match=r"target must be int64 \(torch.long\) class indices"):
            ft.ops.cross_entropy(x, y.to(dtype))
        with pytest.raises(TypeError, match="target_b must be int64"):
            ft.ops.cross_entropy(x, y, target_b=y.to(dtype), lam=0.5)
        return
    y_b = _targets(6, 9, seed=2)
    lam = torch.rand(6, generator=torch.Generator().manual_seed(0))
    for kw in ({"label_smoothing": 0.1, "reduction": "none"},
               {"target_b": y_b, "lam": lam, "reduction": "sum"}):
        kw_t = dict(kw, target_b=kw["target_b"].to(dtype)) if "target_b" in kw else kw
        got = _on(device, ft.ops.cross_entropy, x, y.to(dtype), **kw_t)
        want = _on(device, ft.ops.cross_entropy, x, y, **kw)
        torch.testing.assert_close(got, want)
    got = _on(device, ft.ops.cross_entropy, x, y.to(dtype), label_smoothing=0.1)
    want = _loss_and_grad(F.cross_entropy, x, y.to(dtype), label_smoothing=0.1)
    if device == "cpu":
        torch.testing.assert_close(got, want)
    else:  # another device, another summation order: the dtype's tolerance
        _assert_close(got[0], want[0], torch.float32)
        _assert_close(got[1], want[1], torch.float32)


def test_uint8_ignore_index_compares_values_like_torch(backend, device):
    """uint8 targets are compared with ignore_index by value, as torch's NLL does: 255 ignores
    the rows holding 255, and -100 ignores nothing (it is not 156 in disguise). Torch 2.13's
    smoothing term compares in uint8 and drops the smoothing of a 156 row for -100 -- half
    ignored; we follow the int64 semantics there."""
    x = _logits(4, 300, torch.float32)
    y = torch.tensor([0, 255, 156, 7], dtype=torch.uint8)
    for ignore_index in (255, -100, 156):
        for eps in (0.0, 0.1):
            kw = dict(ignore_index=ignore_index, label_smoothing=eps, reduction="none")
            got = _on(device, ft.ops.cross_entropy, x, y, **kw)
            want = _loss_and_grad(_torch_ce, x, y.long(), **kw)
            _assert_close(got[0], want[0], torch.float32)
            _assert_close(got[1], want[1].float(), torch.float32)
            if eps == 0 or ignore_index != -100:
                want_u8 = _loss_and_grad(_torch_ce, x, y, **kw)
                _assert_close(got[0], want_u8[0], torch.float32)
                _assert_close(got[1], want_u8[1].float(), torch.float32)
    crit = ft.nn.LabelSmoothingCrossEntropy(0.1, ignore_index=255)
    _assert_close(crit(*to_device((x, y), device)),
                  _torch_ce(x, y, label_smoothing=0.1, ignore_index=255), torch.float32)


# ---------------------------------------------------------------------------------------------
# gradients: lam, double backward

REDUCTIONS = ["mean", "sum", "none"]


def _torch_two_target(x, y_a, y_b, lam, reduction, **kw):
    """Mixup's loss as torch users write it: lam * CE(y_a) + (1 - lam) * CE(y_b) per row."""
    rows = (lam * F.cross_entropy(x, y_a, reduction="none", **kw)
            + (1 - lam) * F.cross_entropy(x, y_b, reduction="none", **kw))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (y_a != kw.get("ignore_index", -100)).sum()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_lam_tensor_gets_its_gradient(backend, device, reduction):
    """dloss/dlam_i = CE_a,i - CE_b,i, reduced like the loss: against torch's
    lam*CE(a) + (1-lam)*CE(b) (rows 2 and 5 ignored in both targets, row 3 with a == b) and
    gradcheck, in float64 on every device."""
    B, C = 7, 11
    x = _logits(B, C, torch.float64)
    y_a, y_b = _targets(B, C, seed=4), _targets(B, C, seed=5)
    y_b[3] = y_a[3]
    y_a[[2, 5]] = y_b[[2, 5]] = -100
    lam = torch.rand(B, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    x, y_a, y_b, lam = to_device((x, y_a, y_b, lam), device)
    kw = dict(label_smoothing=0.2)
    grads = []
    for fn in (lambda t, l: ft.ops.cross_entropy(t, y_a, target_b=y_b, lam=l,
                                                 reduction=reduction, **kw),
               lambda t, l: _torch_two_target(t, y_a, y_b, l, reduction, **kw)):
        t, l = x.clone().requires_grad_(True), lam.clone().requires_grad_(True)
        out = fn(t, l)
        (out.sum() if out.dim() else out).backward()
        grads.append((out.detach(), t.grad, l.grad))
    (loss, gx, gl), (ref, rgx, rgl) = grads
    assert gl is not None
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gx, rgx)
    torch.testing.assert_close(gl, rgl)
    assert gl[3] == 0 and gl[2] == 0 and gl[5] == 0
    torch.autograd.gradcheck(
        lambda t, l: ft.ops.cross_entropy(t, y_a, target_b=y_b, lam=l, reduction=reduction, **kw),
        (x.clone().requires_grad_(True), lam.clone().requires_grad_(True)))


def test_lam_gradient_shapes_and_dtypes(backend, device):
    """A 0-d lam tensor gets a 0-d gradient (through the broadcast), a float32 lam with float64
    logits a float32 one; lam alone requiring grad works; a float lam has nothing to get."""
    x = _logits(5, 6, torch.float64)
    y_a, y_b = _targets(5, 6, seed=1), _targets(5, 6, seed=2)
    x, y_a, y_b = to_device((x, y_a, y_b), device)
    lam0 = torch.tensor(0.3, dtype=torch.float64, device=device, requires_grad=True)
    ft.ops.cross_entropy(x, y_a, target_b=y_b, lam=lam0).backward()
    lam_ref = torch.tensor(0.3, dtype=torch.float64, device=device, requires_grad=True)
    _torch_two_target(x, y_a, y_b, lam_ref, "mean").backward()
    assert lam0.grad.shape == () and lam0.grad.device == x.device
    torch.testing.assert_close(lam0.grad, lam_ref.grad)
    lam32 = torch.rand(5, generator=torch.Generator().manual_seed(0)).to(device)
    lam32.requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    ft.ops.cross_entropy(xr, y_a, target_b=y_b, lam=lam32, reduction="sum").backward()
    assert lam32.grad.dtype == torch.float32 and xr.grad.dtype == torch.float64
    assert not ft.ops.cross_entropy(x, y_a, target_b=y_b, lam=0.3).requires_grad


def _second_order_cases():
    y = _targets(6, 9, seed=1)
    y_ign = y.clone()
    y_ign[[1, 4]] = 7
    y_b = _targets(6, 9, seed=2)
    return {
        "one": (y, {}),
        "smooth": (y, {"label_smoothing": 0.2}),
        "ignore": (y_ign, {"label_smoothing": 0.1, "ignore_index": 7}),
        "two_float_lam": (y, {"target_b": y_b, "lam": 0.35, "label_smoothing": 0.1}),
        "two_lam_tensor": (y_ign, {"target_b": y_b, "label_smoothing": 0.1, "ignore_index": 7}),
    }


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", list(_second_order_cases()))
def test_gradgradcheck(backend, device, case, reduction):
    """Double backward is correct (gradgradcheck in float64, w.r.t. the logits, lam and the
    incoming gradient) for one and two targets, smoothing, ignore_index, every reduction."""
    y, kw = to_device(_second_order_cases()[case], device)
    x = _logits(6, 9, torch.float64).to(device).requires_grad_(True)
    inputs = [x]
    if case == "two_lam_tensor":
        lam = torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        inputs.append(lam.clamp(0.1, 0.9).to(device).requires_grad_(True))

    def fn(t, *lam):
        extra = {"lam": lam[0]} if lam else {}
        return ft.ops.cross_entropy(t, y, reduction=reduction, **kw, **extra)

    torch.autograd.gradgradcheck(fn, tuple(inputs))


def _torch_second_order_ref(x, y, kw):
    if "target_b" in kw:
        kw = dict(kw)
        y_b, lam = kw.pop("target_b"), kw.pop("lam")
        return _torch_two_target(x, y, y_b, lam, "mean", **kw)
    return F.cross_entropy(x, y, **kw)


@pytest.mark.parametrize("case", ["one", "smooth", "ignore", "two_float_lam"])
def test_second_order_matches_torch(backend, device, case):
    """Gradient penalty (loss + ||dloss/dlogits||^2, backpropagated into a weight), a
    Hessian-vector product and a pure second derivative give F.cross_entropy's values."""
    y, kw = to_device(_second_order_cases()[case], device)
    g = torch.Generator().manual_seed(5)
    inp = torch.randn(6, 4, dtype=torch.float64, generator=g).to(device)
    w0 = torch.randn(4, 9, dtype=torch.float64, generator=g).to(device)
    v = torch.randn(6, 9, dtype=torch.float64, generator=g).to(device)
    results = []
    for fn in (lambda t: ft.ops.cross_entropy(t, y, **kw),
               lambda t: _torch_second_order_ref(t, y, kw)):
        w = w0.clone().requires_grad_(True)
        logits = inp @ w
        loss = fn(logits)
        (gz,) = torch.autograd.grad(loss, logits, create_graph=True)
        (dw,) = torch.autograd.grad(loss + (gz ** 2).sum(), w)  # gradient penalty
        x = (inp @ w0).requires_grad_(True)
        (gx,) = torch.autograd.grad(fn(x), x, create_graph=True)
        (hvp,) = torch.autograd.grad((gx * v).sum(), x)  # Hessian-vector product / pure 2nd
        results.append((dw, hvp))
    (dw, hvp), (rdw, rhvp) = results
    torch.testing.assert_close(dw, rdw)
    torch.testing.assert_close(hvp, rhvp)
    assert hvp.abs().max() > 1e-3  # the check is not vacuous


def test_first_order_backward_stays_on_the_kernel(extension, device, monkeypatch):
    """Only create_graph takes the differentiable (reference) backward; a plain backward of
    either autograd path, lam's gradient included, uses the kernel and the closed form."""
    ce_mod = importlib.import_module("fastcore_train.ops.cross_entropy")

    def fail(*a, **k):
        raise AssertionError("the differentiable backward ran without create_graph")

    monkeypatch.setattr(ce_mod, "_differentiable_backward", fail)
    x = _logits(6, 37, torch.float32).to(device).requires_grad_(True)
    y, y_b, lam = to_device((_targets(6, 37), _targets(6, 37, seed=3), torch.rand(6)), device)
    lam.requires_grad_(True)
    ft.ops.cross_entropy(x, y, target_b=y_b, lam=lam, label_smoothing=0.1).backward()
    torch.ops.fastcore_train.cross_entropy(x, y, y_b, lam, 1.0, 0.1, -100, 1)[0].backward()
    with pytest.raises(AssertionError, match="differentiable backward"):
        torch.autograd.grad(ft.ops.cross_entropy(x, y), x, create_graph=True)


# ---------------------------------------------------------------------------------------------
# argument types: torch's exception types, with a sentence that names the argument

def _torch_exception(**kw):
    try:
        F.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]), **kw)
        return None
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return type(e)


ARG_CASES = [
    ("ignore_index", 2 ** 70, "ignore_index must fit in int64"),
    ("ignore_index", -2 ** 63 - 1, "ignore_index must fit in int64"),
    ("ignore_index", 3.7, "ignore_index must be an int, not float"),
    ("ignore_index", 3.0, "ignore_index must be an int, not float"),
    ("ignore_index", True, "ignore_index must be an int, not bool"),
    ("ignore_index", None, "ignore_index must be an int, not NoneType"),
    ("ignore_index", "3", "ignore_index must be an int, not str"),
    ("ignore_index", torch.tensor(3.0), "ignore_index must be an int, not Tensor"),
    ("label_smoothing", None, "label_smoothing must be a float, not NoneType"),
    ("label_smoothing", "0.1", "label_smoothing must be a float, not str"),
    ("label_smoothing", [0.1], "label_smoothing must be a float, not list"),
    ("label_smoothing", torch.tensor([0.1, 0.2]), "label_smoothing must be a float, not Tensor"),
]
ARG_ACCEPTED = [
    ("ignore_index", 2 ** 63 - 1), ("ignore_index", np.int64(2)), ("ignore_index", torch.tensor(2)),
    ("label_smoothing", 1), ("label_smoothing", np.float64(0.1)),
    ("label_smoothing", torch.tensor(0.1)),
]


@pytest.mark.parametrize("name,value,msg", ARG_CASES)
def test_bad_argument_types_like_torch(backend, name, value, msg):
    """The exception type torch raises for the same value (TypeError for a float, bool or None
    ignore_index -- never truncated --, a None or string label_smoothing; ValueError beyond
    int64), with a sentence naming the argument; the module says it at construction."""
    exc = _torch_exception(**{name: value})
    assert exc in (TypeError, ValueError)
    x, y = torch.randn(3, 5), torch.tensor([0, 1, 2])
    with pytest.raises(exc, match=f"cross_entropy: {msg}"):
        ft.ops.cross_entropy(x, y, **{name: value})
    with pytest.raises(exc, match=f"cross_entropy: {msg}"):
        cross_entropy_reference(x, y, **{name: value})
    module_arg = {"label_smoothing": "smoothing"}.get(name, name)
    with pytest.raises(exc, match="LabelSmoothingCrossEntropy: " +
                       msg.replace("label_smoothing", "smoothing")):
        ft.nn.LabelSmoothingCrossEntropy(**{module_arg: value})


@pytest.mark.parametrize("name,value", ARG_ACCEPTED)
def test_argument_types_torch_accepts(backend, device, name, value):
    """(A tensor argument stays on the CPU, where the argument parser reads it.)"""
    assert _torch_exception(**{name: value}) is None
    x, y = _logits(3, 5, torch.float32), torch.tensor([0, 1, 2])
    xd, yd = to_device((x, y), device)
    _assert_close(ft.ops.cross_entropy(xd, yd, **{name: value}),
                  _torch_ce(x, y, **{name: value}), torch.float32)
    crit = ft.nn.LabelSmoothingCrossEntropy(**{{"label_smoothing": "smoothing"}.get(name, name):
                                               value})
    want = _torch_ce(x, y, label_smoothing=crit.smoothing, ignore_index=crit.ignore_index)
    _assert_close(crit(xd, yd), want, torch.float32)


# ---------------------------------------------------------------------------------------------
# launch limits and alignment, on every device. The CUDA kernels run one block per row (the
# grid's x dimension: more than 65535 rows must all be written), and read 16-byte vectors only
# when every row starts 16-byte aligned: C = 50257 (GPT-2's vocabulary; rows of 201028 bytes in
# float32, 100514 in bfloat16) and logits one element into their storage take the scalar loads,
# C = 50256 the vectors. (C = 262144, one and eight such rows: test_long_rows_online_softmax.)

LIMIT_CASES = {
    "65543 rows": (65543, 4, "contiguous"),
    "C=50257, unaligned rows": (2, 50257, "contiguous"),
    "C=50256, aligned rows": (2, 50256, "contiguous"),
    "C=50256, misaligned start": (2, 50256, "offset"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(LIMIT_CASES))
def test_launch_limits_and_alignment(extension, device, case, dtype):
    """Every row's loss and gradient (reduction="none", two targets and smoothing: every term
    of the kernel) against torch's lam * CE(a) + (1 - lam) * CE(b) in float64."""
    B, C, layout = LIMIT_CASES[case]
    x = _logits(B, C, dtype, layout=layout)
    assert (x.storage_offset() == 1) == (layout == "offset")
    y = _targets(B, C, ignore_every=5)
    y_b = _targets(B, C, seed=3).masked_fill(y == -100, -100)
    lam = torch.rand(B, generator=torch.Generator().manual_seed(4))
    loss, grad = _on(device, ft.ops.cross_entropy, x, y, target_b=y_b, lam=lam,
                     label_smoothing=0.1, reduction="none")
    want_loss, want_grad = _loss_and_grad(
        lambda t: _torch_two_target(t.double(), y, y_b, lam.double(), "none",
                                    label_smoothing=0.1), x)
    _assert_close(loss, want_loss, dtype)
    _assert_close(grad, want_grad.to(dtype), dtype)


# ---- an ignored target does not excuse its partner (issue 15 review of the CUDA kernel) ---------

IGNORED_ROW_CASES = [
    ([7], [-100], [0.5], IndexError, "target 7 is out of range for 5 classes"),
    ([-100], [7], [0.5], IndexError, "target 7 is out of range for 5 classes"),
    ([-100], [0], [2.0], ValueError, r"lam must be in \[0, 1\], got 2"),
]


def call_ignored_row_case(target, target_b, lam, device):
    ft.ops.cross_entropy(torch.randn(1, 5, device=device), torch.tensor(target, device=device),
                         target_b=torch.tensor(target_b, device=device),
                         lam=torch.tensor(lam, device=device))


@pytest.mark.parametrize("target,target_b,lam,exc,msg", IGNORED_ROW_CASES)
def test_ignored_rows_still_check_the_other_target_and_lam(backend, device, device_asserts,
                                                           target, target_b, lam, exc, msg):
    """On the CPU (and with the reference) the error names the value; on CUDA the kernel
    asserts on the device (as it does for any bad target or lam), in a child process."""
    if device == "cuda" and backend == "extension":
        device_asserts.expect(CUDA_ASSERTS, f"ignored row: {target}, {target_b}, {lam}",
                              prelude=CUDA_ASSERTS_PRELUDE)
        return
    with pytest.raises(exc, match=msg):
        call_ignored_row_case(target, target_b, lam, device)


# Every case above that is a device-side assert on CUDA, as code for its child process (run
# together, the first time one of them is asked for).
CUDA_ASSERTS_PRELUDE = "import test_cross_entropy as T"
CUDA_ASSERTS = {f"bad: {name}": f"T.call_bad_case({name!r}, 'cuda')"
                for name in sorted(DEVICE_SIDE)}
CUDA_ASSERTS.update({f"ignored row: {t}, {tb}, {lam}":
                     f"T.call_ignored_row_case({t}, {tb}, {lam}, 'cuda')"
                     for t, tb, lam, _, _ in IGNORED_ROW_CASES})
