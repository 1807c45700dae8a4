"""Fused binary cross-entropy with label smoothing and mixup's two targets: parity with torch's
F.binary_cross_entropy_with_logits on the dense targets timm builds (computed in float64),
gradients (logits, lam, pos_weight; double backward), precision at large |logits|, NaN/inf like
torch, bad input, torch.library and torch.compile integration. Tests that take ``device`` run
on the CPU and, with a GPU, on CUDA (conftest's device axis): inputs are made on the CPU and
moved, results compared on the CPU."""
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastcore_train as ft
from fastcore_train import _backend
from fastcore_train.ops.binary_cross_entropy import binary_cross_entropy_reference

from conftest import TOL, on_device, to_cpu, to_device
from conftest import loss_and_grad as _loss_and_grad, loss_and_grad_on as _on

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# odd and unaligned class counts: scalar tails only (1, 7), one vector step and a tail (33),
# many steps, several accumulation blocks (4099, 11821)
SHAPES = [(0, 5), (1, 1), (1, 7), (5, 1), (7, 33), (16, 1000), (3, 4099), (2, 11821)]
REDUCTIONS = ["mean", "sum", "none"]
INF, NAN = float("inf"), float("nan")

bce = ft.ops.binary_cross_entropy


def _logits(B, C, dtype, layout="contiguous", seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed":  # classes not unit-stride
        return torch.randn(C, B, generator=g).mul_(scale).to(dtype).t()
    if layout == "row_slice":  # rows strided (a view into a wider tensor)
        return torch.randn(B, C + 3, generator=g).mul_(scale).to(dtype)[:, 1:C + 1]
    if layout == "offset":  # one element into its storage: no row starts 16-byte aligned
        return torch.randn(B * C + 1, generator=g).mul_(scale).to(dtype)[1:].view(B, C)
    return torch.randn(B, C, generator=g).mul_(scale).to(dtype)


def _targets(B, C, seed=1):
    return torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(seed))


def _one_hot(y, C, on, off, dtype=torch.float64):
    """timm's one_hot: torch.full((B, C), off).scatter_(1, y[:, None], on)."""
    return torch.full((y.shape[0], C), off, dtype=dtype).scatter_(1, y.long()[:, None], on)


def _timm_targets(y, C, eps, y_b=None, lam=None, dtype=torch.float64):
    """The dense targets of timm's BinaryCrossEntropy(smoothing=eps) (one target) and of its
    mixup_target (y1 * lam + y2 * (1 - lam) with y2 the partner's one-hot)."""
    off = eps / C
    on = 1.0 - eps + off
    q = _one_hot(y, C, on, off, dtype)
    if y_b is None:
        return q
    lam = lam.to(dtype)[:, None] if isinstance(lam, torch.Tensor) and lam.dim() else lam
    return q * lam + _one_hot(y_b, C, on, off, dtype) * (1.0 - lam)


def _torch_bce(x, y, *, label_smoothing=0.0, target_b=None, lam=None, reduction="mean",
               pos_weight=None, dtype=torch.float64):
    """torch's own op on timm's dense targets, in float64 by default: the ground truth."""
    q = _timm_targets(y, x.shape[1], label_smoothing, target_b, lam, dtype)
    pw = None if pos_weight is None else pos_weight.to(dtype)
    return F.binary_cross_entropy_with_logits(x.to(dtype), q, pos_weight=pw, reduction=reduction)


def _exact_bce(x, y, *, label_smoothing=0.0, target_b=None, lam=None, reduction="mean",
               pos_weight=None):
    """The definition -(pw q log sigmoid(z) + (1 - q) log sigmoid(-z)) in float64 with torch's
    log_sigmoid: two terms >= 0, so nothing cancels (torch's own form (1 - q) z + w softplus(-z)
    loses the loss of z << 0 against |z| even in float64: -30 + (30 + 9.4e-14) = 9.24e-14)."""
    q = _timm_targets(y, x.shape[1], label_smoothing, target_b, lam)
    z = x.double()
    pw = 1.0 if pos_weight is None else pos_weight.double()
    loss = -(pw * q * F.logsigmoid(z) + (1.0 - q) * F.logsigmoid(-z))
    return {"none": loss, "sum": loss.sum(), "mean": loss.mean()}[reduction]


def _assert_close(actual, expected, dtype, scale=1.0):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol,
                               equal_nan=True)


def _scale(reduction, B, C):
    return max(1.0, B * C if reduction == "sum" else 1.0) ** 0.5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_torch(backend, device, dtype, shape, reduction):
    B, C = shape
    x = _logits(B, C, dtype)
    y = _targets(B, C)
    kw = dict(label_smoothing=0.1, reduction=reduction)
    loss, grad = _on(device, bce, x, y, **kw)
    ref_loss, ref_grad = _loss_and_grad(_torch_bce, x, y, **kw)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == acc and loss.shape == ref_loss.shape
    assert grad.dtype == dtype and grad.shape == x.shape
    _assert_close(loss, ref_loss, dtype, scale=_scale(reduction, B, C))
    _assert_close(grad, ref_grad.to(dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("lam_kind", ["float", "tensor", "zero_d", "same_targets", "lam_0", "lam_1"])
@pytest.mark.parametrize("with_pw", [False, True], ids=["no_pw", "pw"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_two_targets_equal_timm_mixup_targets(backend, device, dtype, lam_kind, with_pw,
                                               reduction):
    B, C = 13, 301
    x = _logits(B, C, dtype)
    y_a = _targets(B, C, seed=2)
    y_b = y_a.flip(0) if lam_kind != "same_targets" else y_a.clone()
    lam = {"tensor": torch.rand(B, generator=torch.Generator().manual_seed(3)),
           "zero_d": torch.tensor(0.37), "lam_0": 0.0, "lam_1": 1.0}.get(lam_kind, 0.37)
    pw = torch.rand(C, generator=torch.Generator().manual_seed(4)) * 4 if with_pw else None
    kw = dict(target_b=y_b, lam=lam, label_smoothing=0.1, reduction=reduction, pos_weight=pw)
    loss, grad = _on(device, bce, x, y_a, **kw)
    ref_loss, ref_grad = _loss_and_grad(_torch_bce, x, y_a, **kw)
    _assert_close(loss, ref_loss, dtype, scale=_scale(reduction, B, C))
    _assert_close(grad, ref_grad.to(dtype), dtype)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("C", [1, 7, 1000, 11821])
def test_smoothing_values_and_class_counts(backend, device, smoothing, C):
    B = 6
    x = _logits(B, C, torch.float32)
    y, y_b = _targets(B, C, seed=1), _targets(B, C, seed=2)
    for kw in ({}, {"target_b": y_b, "lam": 0.25}):
        for reduction in REDUCTIONS:
            got = _on(device, bce, x, y, label_smoothing=smoothing, reduction=reduction, **kw)
            want = _loss_and_grad(_torch_bce, x, y, label_smoothing=smoothing,
                                  reduction=reduction, **kw)
            _assert_close(got[0], want[0], torch.float32, scale=_scale(reduction, B, C))
            _assert_close(got[1], want[1].float(), torch.float32)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("pw_shape", ["C", "scalar", "one", "1xC", "int", "float64"])
def test_pos_weight_like_torch(backend, device, reduction, pw_shape):
    """pos_weight in every shape torch broadcasts to one weight per class, integer weights
    included (as torch takes them)."""
    B, C = 9, 515
    x = _logits(B, C, torch.float32)
    y, y_b = _targets(B, C, seed=3), _targets(B, C, seed=4)
    g = torch.Generator().manual_seed(5)
    pw = {"C": torch.rand(C, generator=g) * 5, "scalar": torch.tensor(3.0),
          "one": torch.tensor([0.5]), "1xC": torch.rand(1, C, generator=g) * 5,
          "int": torch.randint(0, 5, (C,), generator=g),
          "float64": torch.rand(C, generator=g, dtype=torch.float64) * 5}[pw_shape]
    for kw in ({}, {"target_b": y_b, "lam": torch.rand(B, generator=g)}):
        got = _on(device, bce, x, y, label_smoothing=0.2, reduction=reduction,
                  pos_weight=pw, **kw)
        # torch's op with the weight as given (broadcast by torch itself)
        q = _timm_targets(y, C, 0.2, kw.get("target_b"), kw.get("lam"))
        want = _loss_and_grad(lambda t: F.binary_cross_entropy_with_logits(
            t.double(), q, pos_weight=pw.double(), reduction=reduction), x)
        _assert_close(got[0], want[0], torch.float32, scale=_scale(reduction, B, C))
        _assert_close(got[1], want[1].float(), torch.float32)


@pytest.mark.parametrize("layout", ["transposed", "row_slice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous(backend, device, layout, dtype):
    x = _logits(9, 515, dtype, layout=layout)
    assert not x.is_contiguous()
    y, y_b = _targets(9, 515), _targets(9, 515, seed=7)
    for reduction in REDUCTIONS:
        kw = dict(label_smoothing=0.2, target_b=y_b, lam=0.6, reduction=reduction)
        got = _on(device, bce, x, y, **kw)
        want = _loss_and_grad(_torch_bce, x.contiguous(), y, **kw)
        _assert_close(got[0], want[0], dtype, scale=_scale(reduction, 9, 515))
        _assert_close(got[1], want[1].to(dtype), dtype)


def _cpu_builds():
    if not _backend.extension_loaded():
        return []
    order = ["default", "avx2", "avx512"]
    return order[: order.index(_backend._C.best_cpu_capability()) + 1]


def _variants(backend):
    """(label, isa) for every CPU build of the extension, or the reference once."""
    return [(isa, isa) for isa in _cpu_builds()] if backend == "extension" else [("ref", None)]


def _run_on(isa, fn):
    try:
        if isa:
            _backend._C._set_cpu_capability(isa)
        return fn()
    finally:
        if isa:
            _backend._C._set_cpu_capability("")


def test_target_at_every_column(backend):
    """The reduced forward sums each row with q = off and adds the target columns apart; their
    lanes are masked in the vector step that holds them. Targets at every column of a row of 70
    (vector steps of 16 or 32, a scalar tail of 6 or 22), in the same step or apart, equal or
    not, on every CPU build: each row checked on its own."""
    C = 70
    x = _logits(C, C, torch.float32, seed=3)
    y_a = torch.arange(C)
    y_b = (torch.arange(C) * 7 + 3) % C
    y_b[::9] = y_a[::9]  # some rows with a == b
    want = _torch_bce(x, y_a, target_b=y_b, lam=0.3, label_smoothing=0.1, reduction="none")
    want_rows = want.sum(1)
    pw = torch.rand(C, generator=torch.Generator().manual_seed(1)) * 3
    want_pw = _torch_bce(x, y_a, target_b=y_b, lam=0.3, label_smoothing=0.1, reduction="none",
                         pos_weight=pw).sum(1)
    for label, isa in _variants(backend):
        def rows(pos_weight):
            return torch.stack([bce(x[i:i + 1], y_a[i:i + 1], target_b=y_b[i:i + 1], lam=0.3,
                                    label_smoothing=0.1, reduction="sum", pos_weight=pos_weight)
                                for i in range(C)])
        got, got_pw = _run_on(isa, lambda: (rows(None), rows(pw)))
        torch.testing.assert_close(got.double(), want_rows, atol=2e-5, rtol=1e-5, msg=label)
        torch.testing.assert_close(got_pw.double(), want_pw, atol=2e-5, rtol=1e-5, msg=label)


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_cpu_build(extension, isa, dtype):
    """Each per-ISA build gives torch's answer, every path of the kernel (reduced rows,
    elementwise, both backward forms, pos_weight)."""
    order = ["default", "avx2", "avx512"]
    if order.index(isa) > order.index(_backend._C.best_cpu_capability()):
        pytest.skip(f"CPU lacks {isa}")
    B, C = 5, 3001
    x = _logits(B, C, dtype)
    y, y_b, lam = _targets(B, C), _targets(B, C, seed=5), torch.rand(B)
    pw = torch.rand(C) * 3
    for reduction in REDUCTIONS:
        for extra in ({}, {"pos_weight": pw}):
            kw = dict(target_b=y_b, lam=lam, label_smoothing=0.1, reduction=reduction, **extra)
            got = _run_on(isa, lambda: _loss_and_grad(bce, x, y, **kw))
            want = _loss_and_grad(_torch_bce, x, y, **kw)
            _assert_close(got[0], want[0], dtype, scale=_scale(reduction, B, C))
            _assert_close(got[1], want[1].to(dtype), dtype)


def test_empty_batch(backend, device):
    x = torch.zeros(0, 7, device=device, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=device)
    for reduction in REDUCTIONS:
        for kw in ({}, {"target_b": y, "lam": torch.zeros(0, device=device)},
                   {"pos_weight": torch.ones(7, device=device)}):
            got = bce(x, y, label_smoothing=0.1, reduction=reduction, **kw)
            want = F.binary_cross_entropy_with_logits(x, torch.zeros(0, 7, device=device),
                                                      reduction=reduction)
            torch.testing.assert_close(got, want, equal_nan=True)
            (got.sum() if got.dim() else got).backward()
            assert x.grad.shape == (0, 7)
            x.grad = None


def test_uint8_targets_like_int64(backend, device):
    x = _logits(6, 200, torch.float32)
    y, y_b = _targets(6, 200).to(torch.uint8), _targets(6, 200, seed=3).to(torch.uint8)
    for reduction in REDUCTIONS:
        got = _on(device, bce, x, y, target_b=y_b, lam=0.4, label_smoothing=0.1,
                  reduction=reduction)
        want = _on(device, bce, x, y.long(), target_b=y_b.long(), lam=0.4,
                   label_smoothing=0.1, reduction=reduction)
        torch.testing.assert_close(got, want)


def test_extension_matches_reference_tightly(extension):
    x = _logits(64, 11821, torch.float32)
    y, y_b = _targets(64, 11821), _targets(64, 11821, seed=2)
    lam = torch.rand(64)
    pw = torch.rand(11821) * 2
    for reduction in REDUCTIONS:
        kw = dict(target_b=y_b, lam=lam, label_smoothing=0.1, reduction=reduction, pos_weight=pw)
        a, ga = _loss_and_grad(bce, x, y, **kw)
        b, gb = _loss_and_grad(binary_cross_entropy_reference, x, y, **kw)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=2e-6)
        # entries of either sign that can cancel to ~0: a few float32 ulp of the largest ones
        torch.testing.assert_close(ga, gb, atol=4e-7 * float(gb.abs().max()), rtol=2e-6)


# ---------------------------------------------------------------------------------------------
# launch limits and alignment, on every device. The CUDA kernels run one block per row (the
# grid's x dimension: more than 65535 rows must all be written), read each row with 16-byte
# vectors after its misaligned head (C = 50257: rows of 201028 bytes start anywhere; logits one
# element into their storage), and split few long rows across blocks (2 rows of C = 262144,
# and 3 of C = 50257, take several blocks each; the forward's row sums are then merged).

LIMIT_CASES = {
    "65543 rows": (65543, 4, "contiguous"),
    "C=50257, unaligned rows": (3, 50257, "contiguous"),
    "C=50256, aligned rows": (2, 50256, "contiguous"),
    "C=50256, misaligned start": (2, 50256, "offset"),
    "2 long rows": (2, 262144, "contiguous"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(LIMIT_CASES))
def test_launch_limits_and_alignment(extension, device, case, dtype):
    """Every element's loss (reduction none), the row sums (sum: the forward's reduced kernel)
    and the gradient, with two targets, smoothing and pos_weight (every term of the kernels),
    against torch on timm's dense targets in float64."""
    B, C, layout = LIMIT_CASES[case]
    x = _logits(B, C, dtype, layout=layout)
    assert (x.storage_offset() == 1) == (layout == "offset")
    g = torch.Generator().manual_seed(4)
    y, y_b = _targets(B, C), _targets(B, C, seed=3)
    lam, pw = torch.rand(B, generator=g), torch.rand(C, generator=g) * 2
    for reduction in ("none", "sum"):
        kw = dict(target_b=y_b, lam=lam, label_smoothing=0.1, pos_weight=pw, reduction=reduction)
        loss, grad = _on(device, bce, x, y, **kw)
        want_loss, want_grad = _loss_and_grad(_torch_bce, x, y, **kw)
        _assert_close(loss, want_loss, dtype, scale=_scale(reduction, B, C))
        _assert_close(grad, want_grad.to(dtype), dtype)
    # each row's sum on its own (a batch sum could hide one wrong row)
    rows = _on(device, bce, x, y, **dict(kw, reduction="none"))[0].double().sum(1)
    want_rows = _torch_bce(x, y, **dict(kw, reduction="none")).sum(1)
    torch.testing.assert_close(rows, want_rows, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# the module

def test_module_class_indices_and_mixed_target(backend):
    B, C = 8, 10
    x = _logits(B, C, torch.float32)
    y_a, y_b = _targets(B, C, seed=4), _targets(B, C, seed=5)
    crit = ft.nn.BinaryCrossEntropy(smoothing=0.1)
    _assert_close(crit(x, y_a), _torch_bce(x, y_a, label_smoothing=0.1), torch.float32)
    for lam in (0.7, torch.tensor(0.7), torch.rand(B)):
        got = crit(x, ft.MixedTarget(y_a, y_b, lam))
        _assert_close(got, _torch_bce(x, y_a, target_b=y_b, lam=lam, label_smoothing=0.1),
                      torch.float32)
    assert "smoothing=0.1" in repr(crit) and "pos_weight=None" in repr(crit)
    crit = ft.nn.BinaryCrossEntropy(reduction="none", pos_weight=torch.arange(1.0, C + 1))
    assert "pos_weight" in dict(crit.named_buffers())
    _assert_close(crit(x, y_a), _torch_bce(x, y_a, reduction="none",
                                           pos_weight=torch.arange(1.0, C + 1)), torch.float32)
    assert crit.to(torch.float64).pos_weight.dtype == torch.float64
    with pytest.raises(TypeError, match="ft.MixedTarget"):
        crit(x, (y_a, y_b, 0.5))
    with pytest.raises(TypeError, match="probability targets are not supported"):
        crit(x, _timm_targets(y_a, C, 0.1).float())


def test_module_after_mixup_equals_timm_recipe(backend):
    """ft.Mixup -> MixedTarget -> BinaryCrossEntropy gives timm's loss on its dense mixup
    targets (batch mode: y_b is the batch flipped), for every mode's lam."""
    B, C = 16, 1000
    x = torch.randn(B, 3, 8, 8)
    y = _targets(B, C)
    logits = _logits(B, C, torch.float32)
    crit = ft.nn.BinaryCrossEntropy(smoothing=0.1)
    for mode in ("batch", "pair", "elem"):
        mix = ft.Mixup(alpha=0.4, mode=mode, generator=torch.Generator().manual_seed(0))
        _, target = mix(x, y)
        if mode == "batch":
            assert torch.equal(target.y_b, y.flip(0))
        got = _loss_and_grad(crit, logits, target)
        want = _loss_and_grad(_torch_bce, logits, target.y_a, target_b=target.y_b,
                              lam=target.lam, label_smoothing=0.1)
        _assert_close(got[0], want[0], torch.float32)
        _assert_close(got[1], want[1].float(), torch.float32)


@pytest.mark.parametrize("kw,exc,msg", [
    ({"smoothing": 1.5}, ValueError, r"smoothing must be in \[0, 1\], got 1.5"),
    ({"smoothing": None}, TypeError, "smoothing must be a float, not NoneType"),
    ({"smoothing": "0.1"}, TypeError, "smoothing must be a float, not str"),
    ({"reduction": "avg"}, ValueError, "reduction must be"),
    ({"pos_weight": [1.0, 2.0]}, TypeError, "pos_weight must be a tensor or None, got list"),
])
def test_module_refuses_bad_arguments_at_construction(kw, exc, msg):
    with pytest.raises(exc, match="BinaryCrossEntropy: " + msg):
        ft.nn.BinaryCrossEntropy(**kw)


# ---------------------------------------------------------------------------------------------
# numerics: large |logits|, non-finite values

def _errors(got, truth):
    """Largest absolute error, and largest error relative to |truth| where that is a normal
    float32 (denormal results are not held to relative precision: the kernels flush
    exp(z) < FLT_MIN to 0), there at most FLT_MIN absolute."""
    out = []
    for a, b in zip(got, truth):
        a, b = a.double(), b.double()
        d = (a - b).abs()
        normal = b.abs() >= torch.finfo(torch.float32).tiny
        rel = float((d[normal] / b.abs()[normal]).max()) if normal.any() else 0.0
        if (~normal).any():
            rel = max(rel, float(d[~normal].max()) / torch.finfo(torch.float32).tiny * ULP_FLOOR)
        out.append((float(d.max()), rel))
    return out


# Relative error floor: float32 results within a few ulp are exact for this purpose (torch's
# fp32 op is sometimes correct to the last bit where ours is 2 ulp off). 2^-24 is float32's
# unit roundoff, half an ulp of 1.
ULP_FLOOR = 8 * 2.0 ** -24


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("with_pw", [False, True], ids=["no_pw", "pw"])
@pytest.mark.parametrize("case", ["randn3", "scale30", "scale300", "neg_offset", "pos_offset",
                                  "huge"])
def test_precision_against_float64(backend, device, case, with_pw, eps, reduction):
    """float32 logits over every magnitude, against the exact loss (float64, a form without
    cancellation): the elementwise loss within a few ulp of each value -- tiny losses of large
    |z| included, which torch's own form gets to the last digit at targets (exp(-50) for
    z = 50, q = 1) and loses elsewhere (z << 0 with q = off) -- and within twice torch's own
    fp32 error; the gradient's absolute error within twice torch's (or a few ulp); on every
    CPU build, the reference, and the CUDA kernels."""
    g = torch.Generator().manual_seed(11)
    B, C = 8, 1037
    base = torch.randn(B, C, generator=g)
    x = {"randn3": base * 3, "scale30": base * 30, "scale300": base * 300,
         "neg_offset": base * 3 - 60, "pos_offset": base * 3 + 60, "huge": base * 1e30}[case]
    y, y_b = _targets(B, C, seed=2), _targets(B, C, seed=3)
    pw = torch.rand(C, generator=g) * 3 if with_pw else None
    kw = dict(target_b=y_b, lam=torch.rand(B, generator=g), label_smoothing=eps,
              reduction=reduction, pos_weight=pw)
    truth = _loss_and_grad(_exact_bce, x, y, **kw)
    fp32 = _loss_and_grad(_torch_bce, x, y, dtype=torch.float32, **kw)
    (_, t_rel), (tg_abs, _) = _errors(fp32, truth)
    variants = _variants(backend) if device == "cpu" else [(f"{backend} on {device}", None)]
    for label, isa in variants:
        got = _run_on(isa, lambda: _on(device, bce, x, y, **kw))
        (_, l_rel), (g_abs, _) = _errors(got, truth)
        where = (f"{label}: loss rel {l_rel:.3g} (torch {t_rel:.3g}); grad abs {g_abs:.3g} "
                 f"(torch {tg_abs:.3g})")
        assert l_rel <= max(2 * t_rel, ULP_FLOOR), where
        if reduction == "none":
            assert l_rel <= ULP_FLOOR, where
        # gradient entries in [-pw, 1 + pw]: absolute error, as for cross-entropy
        assert g_abs <= max(2 * tg_abs, ULP_FLOOR * (4 if with_pw else 1)), where


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_where_torch_is_exact(backend, dtype):
    """Tiny elementwise losses of large |z|, in the vector body and the scalar tail of a row:
    z = 50 at the target with q = 1 (loss exp(-50), which torch's fp32 op gets right),
    z = -30 elsewhere with q = 0 (log1p(exp(-30))), z = -85 (near float32's smallest normal).
    Where torch's form cancels (z = -100.3 with a smoothed q = off, z = 60 at the target with
    smoothing: (1 - q) z against w softplus(-z)) ours stays exact."""
    C = 70
    x = torch.randn(2, C, generator=torch.Generator().manual_seed(0)).to(dtype)
    cols = [5, 40, 66]  # vector body (both halves of a step on AVX-512) and tail
    for c in cols:
        x[0, c] = -30.0
        x[1, c] = -100.3
    x[0, 3], x[0, 50] = -85.0, 50.0
    y = torch.tensor([50, 60])
    x[1, 60] = 60.0
    truth = _exact_bce(x, y, reduction="none")
    got = bce(x, y, reduction="none")
    picks = [(0, c) for c in cols + [3, 50]]
    rel = [abs(float(got[i, j]) - float(truth[i, j])) / float(truth[i, j]) for i, j in picks]
    assert max(rel) <= ULP_FLOOR, list(zip(picks, rel))
    truth2 = _exact_bce(x, y, label_smoothing=0.01, reduction="none")
    got2 = bce(x, y, label_smoothing=0.01, reduction="none")
    torch2 = _torch_bce(x, y, label_smoothing=0.01, reduction="none", dtype=dtype)
    picks2 = [(1, c) for c in cols + [60]]

    def rel2(t):
        return max(abs(float(t[i, j]) - float(truth2[i, j])) / float(truth2[i, j])
                   for i, j in picks2)

    assert rel2(got2) <= ULP_FLOOR, rel2(got2)
    if dtype == torch.float32:
        assert rel2(torch2) > 1e-5  # a case where torch's own form loses digits (~300 ulp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("two", [False, True], ids=["one_target", "two_targets"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nonfinite_like_torch(backend, device, dtype, eps, two, reduction):
    """NaN, +inf and -inf logits at target columns and elsewhere, in the vector body and in
    the scalar tail: torch's loss (NaN at -inf whatever q, inf at +inf, NaN at NaN) and
    gradient (finite at +-inf: 1 - q and -pw q). For the reduced forms each row is checked
    on its own (a batch's one NaN row would hide the others)."""
    B, C = 9, 75
    x = _logits(B, C, torch.float32)
    y = torch.tensor([3, 3, 3, 40, 40, 70, 72, 5, 1])
    y_b = torch.tensor([9, 9, 9, 41, 40, 71, 2, 6, 2])
    x[0, 3], x[1, 3], x[2, 3] = NAN, INF, -INF           # at the target (vector body)
    x[3, 10], x[4, 50], x[5, 72] = NAN, INF, -INF        # elsewhere, body and tail
    x[6, 72] = INF                                        # at the target, in the tail
    x[7, :] = -INF                                        # a whole row
    x[8, 20] = -INF                                       # elsewhere, alone in its row
    x = x.to(dtype)
    lam = torch.linspace(0, 1, B)
    for pw in (None, torch.rand(C) * 2):
        rows = [slice(None)] if reduction == "none" else [slice(i, i + 1) for i in range(B)]
        for r in rows:
            kw = dict(label_smoothing=eps, reduction=reduction, pos_weight=pw,
                      **({"target_b": y_b[r], "lam": lam[r]} if two else {}))
            got = _on(device, bce, x[r], y[r], **kw)
            want = _loss_and_grad(_torch_bce, x[r], y[r], **kw)
            assert torch.equal(torch.isnan(got[0]), torch.isnan(want[0])), (r, got[0], want[0])
            assert torch.equal(torch.isinf(got[0]), torch.isinf(want[0])), (r, got[0], want[0])
            _assert_close(got[0], want[0], dtype)
            _assert_close(got[1], want[1].to(dtype), dtype)


def test_large_negative_logits_do_not_overflow_the_sum(backend, device):
    """Logits near -FLT_MAX: off * |z| per element is finite and so is torch's row (its form
    subtracts two numbers near 3e38); the kernel's sum of off * relu(-z) must not overflow."""
    x = torch.full((2, 100), -3e38)
    x[:, 50:] = torch.randn(2, 50)
    y = torch.tensor([1, 60])
    got = bce(x.to(device), y.to(device), label_smoothing=0.1, reduction="sum").cpu()
    want = _torch_bce(x, y, label_smoothing=0.1, reduction="sum")
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------
# gradients: lam, pos_weight, double backward

def _torch_formula(x, y, *, label_smoothing=0.0, target_b=None, lam=None, reduction="mean",
                   pos_weight=None):
    """torch's loss as it computes it (aten's binary_cross_entropy_with_logits), written out so
    that autograd can take pos_weight's gradient, which torch's op refuses."""
    if pos_weight is None:
        return _torch_bce(x, y, label_smoothing=label_smoothing, target_b=target_b, lam=lam,
                          reduction=reduction)
    q = _timm_targets(y, x.shape[1], label_smoothing, target_b, lam)
    loss = (1 - q) * x - (1 + (pos_weight - 1) * q) * F.logsigmoid(x)
    return {"none": loss, "sum": loss.sum(), "mean": loss.mean()}[reduction]


def _grads(fn, x, lam=None, pw=None):
    inputs = [t.detach().clone().requires_grad_(True) if t is not None else None
              for t in (x, lam, pw)]
    out = fn(*inputs)
    (out.sum() if out.dim() else out).backward()
    return (out.detach(),) + tuple(t.grad if t is not None else None for t in inputs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_pw", [False, True], ids=["no_pw", "pw"])
@pytest.mark.parametrize("lam_shape", ["rows", "zero_d"])
def test_lam_and_pos_weight_gradients_match_torch(backend, device, reduction, with_pw,
                                                  lam_shape):
    """dloss/dlam and dloss/dpos_weight against torch's autograd: through
    F.binary_cross_entropy_with_logits on the dense targets (which it differentiates w.r.t. the
    target, not w.r.t. pos_weight), with pos_weight through the formula torch documents and
    computes, (1 - q) z - (1 + (pw - 1) q) log_sigmoid(z); rows with a == b included (their
    lam gradient is 0)."""
    B, C = 7, 11
    x = _logits(B, C, torch.float64)
    y_a, y_b = _targets(B, C, seed=4), _targets(B, C, seed=5)
    y_b[3] = y_a[3]
    g = torch.Generator().manual_seed(6)
    lam = torch.rand(B, dtype=torch.float64, generator=g) if lam_shape == "rows" else \
        torch.tensor(0.3, dtype=torch.float64)
    pw = torch.rand(C, dtype=torch.float64, generator=g) * 3 if with_pw else None
    kw = dict(label_smoothing=0.2, reduction=reduction)
    ref = _grads(lambda t, l, p: _torch_formula(t, y_a, target_b=y_b, lam=l, pos_weight=p, **kw),
                 x, lam, pw)
    x, y_a, y_b, lam, pw = to_device((x, y_a, y_b, lam, pw), device)
    ours = to_cpu(_grads(lambda t, l, p: bce(t, y_a, target_b=y_b, lam=l, pos_weight=p, **kw),
                         x, lam, pw))
    for a, b in zip(ours, ref):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b)
    if lam_shape == "rows":
        assert ours[2][3] == 0
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, lam, pw) if t is not None)
    torch.autograd.gradcheck(
        lambda t, l, *p: bce(t, y_a, target_b=y_b, lam=l, pos_weight=p[0] if p else None, **kw),
        inputs)


def test_gradient_dtypes_and_shapes(backend):
    """A float32 lam with float64 logits gets a float32 gradient; a (1, C) pos_weight a (1, C)
    one; lam or pos_weight alone requiring grad works; a float lam has nothing to get."""
    B, C = 5, 6
    x = _logits(B, C, torch.float64)
    y_a, y_b = _targets(B, C, seed=1), _targets(B, C, seed=2)
    lam32 = torch.rand(B, requires_grad=True)
    pw = (torch.rand(1, C) + 0.5).requires_grad_(True)
    bce(x, y_a, target_b=y_b, lam=lam32, pos_weight=pw, reduction="sum").backward()
    assert lam32.grad.dtype == torch.float32 and lam32.grad.shape == (B,)
    assert pw.grad.shape == (1, C) and pw.grad.dtype == torch.float32
    assert not bce(x, y_a, target_b=y_b, lam=0.3).requires_grad


def _second_order_cases():
    y = _targets(6, 9, seed=1)
    y_b = _targets(6, 9, seed=2)
    pw = torch.rand(9, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 2 + 0.1
    return {
        "one": (y, {}),
        "smooth": (y, {"label_smoothing": 0.2}),
        "two_float_lam": (y, {"target_b": y_b, "lam": 0.35, "label_smoothing": 0.1}),
        "pos_weight": (y, {"target_b": y_b, "lam": 0.35, "label_smoothing": 0.1,
                           "pos_weight": pw}),
        "lam_tensor": (y, {"target_b": y_b, "label_smoothing": 0.1}),
        "lam_and_pw_tensors": (y, {"target_b": y_b, "label_smoothing": 0.1}),
    }


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", list(_second_order_cases()))
def test_gradgradcheck(backend, device, case, reduction):
    """Double backward is correct (gradgradcheck in float64 w.r.t. the logits, lam, pos_weight
    and the incoming gradient) for one and two targets, smoothing, every reduction."""
    y, kw = to_device(_second_order_cases()[case], device)
    x = _logits(6, 9, torch.float64).to(device).requires_grad_(True)
    g = torch.Generator().manual_seed(3)
    inputs = [x]
    if case.startswith("lam"):
        inputs.append((torch.rand(6, dtype=torch.float64, generator=g) * 0.8 + 0.1)
                      .to(device).requires_grad_(True))
    if case == "lam_and_pw_tensors":
        inputs.append((torch.rand(9, dtype=torch.float64, generator=g) + 0.5)
                      .to(device).requires_grad_(True))

    def fn(t, *rest):
        extra = {}
        if rest:
            extra["lam"] = rest[0]
        if len(rest) > 1:
            extra["pos_weight"] = rest[1]
        return bce(t, y, reduction=reduction, **kw, **extra)

    torch.autograd.gradgradcheck(fn, tuple(inputs))


@pytest.mark.parametrize("case", ["one", "smooth", "two_float_lam", "pos_weight"])
def test_second_order_matches_torch(backend, case):
    """Gradient penalty (loss + ||dloss/dlogits||^2, backpropagated into a weight) and a
    Hessian-vector product give torch's values."""
    y, kw = _second_order_cases()[case]
    g = torch.Generator().manual_seed(5)
    inp = torch.randn(6, 4, dtype=torch.float64, generator=g)
    w0 = torch.randn(4, 9, dtype=torch.float64, generator=g)
    v = torch.randn(6, 9, dtype=torch.float64, generator=g)
    results = []
    for fn in (lambda t: bce(t, y, **kw), lambda t: _torch_formula(t, y, **kw)):
        w = w0.clone().requires_grad_(True)
        logits = inp @ w
        (gz,) = torch.autograd.grad(fn(logits), logits, create_graph=True)
        (dw,) = torch.autograd.grad(fn(logits) + (gz ** 2).sum(), w)
        x = (inp @ w0).requires_grad_(True)
        (gx,) = torch.autograd.grad(fn(x), x, create_graph=True)
        (hvp,) = torch.autograd.grad((gx * v).sum(), x)
        results.append((dw, hvp))
    (dw, hvp), (rdw, rhvp) = results
    torch.testing.assert_close(dw, rdw)
    torch.testing.assert_close(hvp, rhvp)
    assert hvp.abs().max() > 1e-4  # the check is not vacuous


def test_first_order_backward_stays_on_the_kernel(extension, monkeypatch):
    """Only create_graph takes the differentiable (reference) backward; a plain backward, lam's
    and pos_weight's gradients included, uses the kernel and the closed forms."""
    mod = importlib.import_module("fastcore_train.ops.binary_cross_entropy")

    def fail(*a, **k):
        raise AssertionError("the differentiable backward ran without create_graph")

    monkeypatch.setattr(mod, "_differentiable_backward", fail)
    monkeypatch.setattr(mod, "_reference", fail)
    x = _logits(6, 37, torch.float32).requires_grad_(True)
    y, y_b = _targets(6, 37), _targets(6, 37, seed=3)
    lam, pw = torch.rand(6, requires_grad=True), torch.rand(37, requires_grad=True)
    bce(x, y, target_b=y_b, lam=lam, pos_weight=pw, label_smoothing=0.1).backward()
    assert x.grad is not None and lam.grad is not None and pw.grad is not None
    torch.ops.fastcore_train.binary_cross_entropy(x, y, y_b, lam, 1.0, 0.1, pw, 1).backward()
    with pytest.raises(AssertionError, match="differentiable backward"):
        torch.autograd.grad(bce(x, y), x, create_graph=True)


# ---------------------------------------------------------------------------------------------
# bad input: the same exception type and message from both backends

def _xy():
    return torch.randn(3, 4), torch.tensor([0, 1, 2])


BAD = [
    (lambda: (torch.randn(3, 4, 5), torch.zeros(3, dtype=torch.long)), {}, ValueError,
     "binary_cross_entropy: logits must be 2-D (batch, classes), got 3-D"),
    (lambda: (torch.randn(3, 4).int(), torch.zeros(3, dtype=torch.long)), {}, TypeError,
     "binary_cross_entropy: logits must be float32, float16, bfloat16 or float64, got torch.int32"),
    (lambda: (torch.randn(3, 4), torch.zeros(3, dtype=torch.int32)), {}, TypeError,
     "binary_cross_entropy: target must be int64 or uint8 class indices, got torch.int32"),
    (lambda: (torch.randn(3, 4), torch.rand(3, 4)), {}, TypeError,
     "binary_cross_entropy: target must be int64 or uint8 class indices, got torch.float32 "
     "(probability targets are not supported: pass class indices, and target_b and lam for "
     "mixup)"),
    (lambda: (torch.randn(3, 4), torch.zeros(2, dtype=torch.long)), {}, ValueError,
     "binary_cross_entropy: target must have shape (3,) to match logits, got [2]"),
    (lambda: (torch.randn(3, 4), torch.tensor([0, 4, 1])), {}, IndexError,
     "binary_cross_entropy: target 4 is out of range for 4 classes (row 1)"),
    (lambda: (torch.randn(3, 4), torch.tensor([0, 1, -100])), {}, IndexError,
     "binary_cross_entropy: target -100 is out of range for 4 classes (row 2)"),
    (lambda: (torch.randn(3, 4), torch.tensor([0, 1, 255], dtype=torch.uint8)), {}, IndexError,
     "binary_cross_entropy: target 255 is out of range for 4 classes (row 2)"),
    (_xy, {"target_b": torch.tensor([1, 9, 3]), "lam": 0.5}, IndexError,
     "binary_cross_entropy: target 9 is out of range for 4 classes (row 1)"),
    (_xy, {"label_smoothing": 1.5}, ValueError,
     "binary_cross_entropy: label_smoothing must be in [0, 1], got 1.5"),
    (_xy, {"label_smoothing": -0.1}, ValueError,
     "binary_cross_entropy: label_smoothing must be in [0, 1], got -0.1"),
    (_xy, {"target_b": torch.tensor([1, 2, 3])}, ValueError,
     "binary_cross_entropy: target_b and lam must be given together"),
    (_xy, {"lam": 0.5}, ValueError,
     "binary_cross_entropy: target_b and lam must be given together"),
    (_xy, {"target_b": torch.tensor([1, 2, 3]), "lam": 1.2}, ValueError,
     "binary_cross_entropy: lam must be in [0, 1], got 1.2"),
    (_xy, {"target_b": torch.tensor([1, 2, 3]), "lam": float("nan")}, ValueError,
     "binary_cross_entropy: lam must be in [0, 1], got nan"),
    (_xy, {"target_b": torch.tensor([1, 2, 3]), "lam": torch.tensor([0.5, -0.1, 0.2])},
     ValueError, "binary_cross_entropy: lam must be in [0, 1], got -0.1 (row 1)"),
    (_xy, {"target_b": torch.tensor([1, 2, 3]), "lam": torch.tensor([0, 1, 1])}, TypeError,
     "binary_cross_entropy: lam must be a float tensor, got torch.int64"),
    (_xy, {"target_b": torch.tensor([1, 2, 3]), "lam": torch.rand(2)}, ValueError,
     "binary_cross_entropy: lam must have shape (3,) to match logits, got [2]"),
    (_xy, {"reduction": "avg"}, ValueError,
     "binary_cross_entropy: reduction must be one of ('mean', 'sum', 'none'), got 'avg'"),
    (_xy, {"pos_weight": torch.rand(3, 4)}, ValueError,
     "binary_cross_entropy: pos_weight must hold one weight per class, shape (4,) or a shape "
     "that broadcasts to it, got [3, 4]"),
    (_xy, {"pos_weight": torch.rand(5)}, ValueError,
     "binary_cross_entropy: pos_weight must hold one weight per class, shape (4,) or a shape "
     "that broadcasts to it, got [5]"),
    (_xy, {"pos_weight": torch.ones(4, dtype=torch.bool)}, TypeError,
     "binary_cross_entropy: pos_weight must be a real tensor, got torch.bool"),
    (_xy, {"pos_weight": [1.0, 2.0, 3.0, 4.0]}, TypeError,
     "binary_cross_entropy: pos_weight must be a tensor, got list"),
    (_xy, {"label_smoothing": None}, TypeError,
     "binary_cross_entropy: label_smoothing must be a float, not NoneType"),
    (_xy, {"label_smoothing": "0.1"}, TypeError,
     "binary_cross_entropy: label_smoothing must be a float, not str"),
    (_xy, {"target_b": torch.tensor([1, 2, 3]), "lam": "0.5"}, TypeError,
     "binary_cross_entropy: lam must be a float, not str"),
]


# the cases whose values only the device reads on CUDA (targets in range, a lam tensor in
# [0, 1]): a device-side assert there, as in torch's own CUDA losses, with no host sync
DEVICE_SIDE = {i for i, (_, _, exc, msg) in enumerate(BAD)
               if "out of range" in msg or msg.endswith("(row 1)") and exc is ValueError}


def call_bad_case(i, device):
    """Runs BAD[i] on ``device`` (also the code of the child processes on CUDA)."""
    make, kw, _, _ = BAD[i]
    bce(*to_device(make(), device), **to_device(kw, device))


CUDA_ASSERTS_PRELUDE = "import test_bce as T"
CUDA_ASSERTS = {f"bad: {i}": f"T.call_bad_case({i}, 'cuda')" for i in sorted(DEVICE_SIDE)}


def test_device_side_cases_are_the_value_checks():
    assert len(DEVICE_SIDE) == 5, DEVICE_SIDE  # targets 4, -100, 255, target_b 9, lam -0.1


@pytest.mark.parametrize("i", range(len(BAD)), ids=[str(i) for i in range(len(BAD))])
def test_bad_input(backend, device, device_asserts, i):
    if device == "cuda" and backend == "extension" and i in DEVICE_SIDE:
        device_asserts.expect(CUDA_ASSERTS, f"bad: {i}", prelude=CUDA_ASSERTS_PRELUDE)
        return
    _, _, exc, msg = BAD[i]
    with pytest.raises(exc) as info:
        call_bad_case(i, device)
    assert str(info.value) == msg


def test_tuple_target_gets_a_hint(backend):
    x, y = _xy()
    with pytest.raises(TypeError, match="for mixup targets pass target_b and lam"):
        bce(x, (y, y, 0.5))


def test_op_checks_direct_call(extension):
    """The C++ op checks its inputs itself too (for users of torch.ops), with the same text."""
    op = torch.ops.fastcore_train.binary_cross_entropy
    x = torch.randn(2, 5)
    cases = [
        ((x, torch.tensor([1, 7]), None, None, 1.0, 0.0, None, 1), IndexError,
         "binary_cross_entropy: target 7 is out of range for 5 classes (row 1)"),
        ((x, torch.tensor([1, 2]), torch.tensor([0, 0]), torch.tensor([0.5, 2.0]), 1.0, 0.0,
          None, 1), ValueError, "binary_cross_entropy: lam must be in [0, 1], got 2 (row 1)"),
        ((x, torch.tensor([1, 2]), None, None, 1.0, 0.0, None, 3), ValueError,
         "binary_cross_entropy: reduction must be 0 (none), 1 (mean) or 2 (sum), got 3"),
        ((x, torch.tensor([1, 2]), None, None, 1.0, 0.0, torch.ones(4), 1), ValueError,
         "binary_cross_entropy: pos_weight must have shape (5,) (one weight per class), got [4]"),
        ((x, torch.tensor([1, 2]), None, None, 1.0, 0.0, torch.ones(5, dtype=torch.long), 1),
         TypeError, "binary_cross_entropy: pos_weight must be a float tensor, got torch.int64"),
        ((x, torch.rand(2), None, None, 1.0, 0.0, None, 1), TypeError,
         "binary_cross_entropy: target must be int64 or uint8 class indices, got torch.float32 "
         "(probability targets are not supported: pass class indices, and target_b and lam for "
         "mixup)"),
        ((x, torch.tensor([1, 2]), None, torch.rand(2), 1.0, 0.0, None, 1), ValueError,
         "binary_cross_entropy: target_b and lam must be given together"),
        ((x, torch.tensor([1, 2]), torch.tensor([1, 2]), None, 1.5, 0.0, None, 1), ValueError,
         "binary_cross_entropy: lam must be in [0, 1], got 1.5"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc) as info:
            op(*args)
        assert msg in str(info.value)
    back = torch.ops.fastcore_train.binary_cross_entropy_backward
    with pytest.raises(ValueError, match="grad_loss must have the logits' shape"):
        back(torch.ones(2), x, torch.tensor([1, 2]), None, None, 1.0, 0.0, None, 0)
    with pytest.raises(ValueError, match="grad_loss of a reduced loss must have one element"):
        back(torch.ones(2), x, torch.tensor([1, 2]), None, None, 1.0, 0.0, None, 1)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32,
                                   torch.int64, torch.bool])
def test_index_dtypes(backend, dtype):
    """int64 and uint8 class indices (those F.cross_entropy takes), both targets; the other
    integer dtypes are refused with the same message from both backends."""
    x = _logits(6, 9, torch.float32)
    y, y_b = _targets(6, 9, seed=1), _targets(6, 9, seed=2)
    if dtype not in (torch.uint8, torch.int64):
        with pytest.raises(TypeError, match="target must be int64 or uint8 class indices"):
            bce(x, y.to(dtype))
        with pytest.raises(TypeError, match="target_b must be int64 or uint8 class indices"):
            bce(x, y, target_b=y_b.to(dtype), lam=0.5)
        return
    got = _loss_and_grad(bce, x, y.to(dtype), target_b=y_b.to(dtype), lam=0.5,
                         label_smoothing=0.1)
    want = _loss_and_grad(_torch_bce, x, y, target_b=y_b, lam=0.5, label_smoothing=0.1)
    _assert_close(got[0], want[0], torch.float32)
    _assert_close(got[1], want[1].float(), torch.float32)


@pytest.mark.parametrize("name,value", [("label_smoothing", 1), ("label_smoothing", np.float64(0.1)),
                                        ("label_smoothing", torch.tensor(0.1)), ("lam", 1),
                                        ("lam", np.float32(0.25))])
def test_argument_types_accepted(backend, name, value):
    x, y, y_b = _logits(3, 5, torch.float32), torch.tensor([0, 1, 2]), torch.tensor([4, 3, 2])
    kw = {"target_b": y_b, "lam": 0.5, name: value}
    want_kw = dict(kw, **{name: float(value)})
    _assert_close(bce(x, y, **kw), _torch_bce(x, y, **want_kw), torch.float32)


# ---------------------------------------------------------------------------------------------
# integration with torch.library and torch.compile

def test_opcheck(extension, device):
    x = _logits(6, 37, torch.float32).to(device).requires_grad_(True)
    y, y_b = to_device((_targets(6, 37), _targets(6, 37, seed=3)), device)
    lam, lam_g = torch.rand(6, device=device), torch.rand(6, device=device, requires_grad=True)
    pw = torch.rand(37, device=device) + 0.5
    pw_g = (torch.rand(37, device=device) + 0.5).requires_grad_(True)
    op = torch.ops.fastcore_train.binary_cross_entropy.default
    for reduction in (0, 1, 2):
        torch.library.opcheck(op, (x, y, None, None, 1.0, 0.1, None, reduction))
        torch.library.opcheck(op, (x, y, y_b, lam, 1.0, 0.1, pw, reduction))
        torch.library.opcheck(op, (x, y.to(torch.uint8), y_b.to(torch.uint8), lam_g, 1.0, 0.0,
                                   pw_g, reduction))
        torch.library.opcheck(op, (x.detach().double(), y, y_b, None, 0.3, 0.2, None, reduction))
    back = torch.ops.fastcore_train.binary_cross_entropy_backward.default
    torch.library.opcheck(back, (torch.rand(6, 37, device=device), x.detach(), y, y_b, lam, 1.0,
                                 0.1, pw, 0))
    torch.library.opcheck(back, (torch.rand((), device=device), x.detach(), y, y_b, None, 0.3,
                                 0.1, None, 1))
    torch.library.opcheck(back, (torch.rand((), device=device), x.detach().bfloat16(), y, None,
                                 None, 1.0, 0.1, pw, 2))


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_eager_autograd_matches_registered_autograd(extension, reduction):
    """ft.ops.binary_cross_entropy uses a lean autograd.Function in eager mode; torch.ops
    calls (and torch.compile) use the torch.library registration: same loss, same gradients."""
    x = _logits(6, 37, torch.float32)
    y, y_b = _targets(6, 37), _targets(6, 37, seed=3)
    name = {0: "none", 1: "mean", 2: "sum"}[reduction]
    lam0, pw0 = torch.rand(6), torch.rand(37) + 0.5
    results = []
    for eager in (True, False):
        xr = x.clone().requires_grad_(True)
        lam, pw = lam0.clone().requires_grad_(True), pw0.clone().requires_grad_(True)
        if eager:
            out = bce(xr, y, target_b=y_b, lam=lam, pos_weight=pw, label_smoothing=0.1,
                      reduction=name)
            assert type(out.grad_fn).__name__.startswith("_BinaryCrossEntropyFunction")
        else:
            out = torch.ops.fastcore_train.binary_cross_entropy(xr, y, y_b, lam, 1.0, 0.1, pw,
                                                                reduction)
        (out.sum() if out.dim() else out).backward()
        results.append((out.detach(), xr.grad, lam.grad, pw.grad))
    for a, b in zip(*results):
        assert a is not None and torch.equal(a, b)


def test_torch_compile_fullgraph(extension, device):
    """The op traces under torch.compile(fullgraph=True) with lam and pos_weight requiring grad,
    with eager mode's loss and gradients."""
    model = torch.nn.Linear(16, 11).to(device)

    def step(inp, y, y_b, lam, pw):
        return bce(model(inp), y, target_b=y_b, lam=lam, pos_weight=pw, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    inp = torch.randn(8, 16).to(device)
    y, y_b = to_device((_targets(8, 11), _targets(8, 11, seed=7).to(torch.uint8)), device)
    results = []
    for fn in (compiled, step):
        model.zero_grad()
        lam = torch.rand(8, generator=torch.Generator().manual_seed(0)).to(device)
        lam.requires_grad_(True)
        pw = (torch.rand(11, generator=torch.Generator().manual_seed(1)) + 0.5).to(device)
        pw.requires_grad_(True)
        loss = fn(inp, y, y_b, lam, pw)
        loss.backward()
        results.append((loss.detach(), model.weight.grad.clone(), lam.grad, pw.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_torch_compile_module_and_mixup(extension):
    """A compiled step with ft.Mixup and the module (0-d tensor lam under compile)."""
    model = torch.nn.Linear(12, 10)
    crit = ft.nn.BinaryCrossEntropy(smoothing=0.1, reduction="none")
    mix = ft.Mixup(alpha=0.4)

    def step(x, y):
        xm, target = mix(x, y)
        return crit(model(xm.flatten(1)), target).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x, y = torch.randn(8, 3, 2, 2), _targets(8, 10)
    loss = compiled(x, y)
    loss.backward()
    assert torch.isfinite(loss) and model.weight.grad is not None
