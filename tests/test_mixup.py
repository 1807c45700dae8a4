"""Fused mixup and cutmix: parity with the reference and with plain torch over dtypes, layouts
and odd shapes; in-place involutions; gradients; bad input from both backends; torch.library
and torch.compile integration; the Mixup module (reproducibility, equivalence with timm's
soft-target recipe). Tests that take ``device`` run on the CPU and, with a GPU, on CUDA against
the CPU reference."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastcore_train as ft
from fastcore_train import _backend
from fastcore_train.mixup import Mixup, flip_perm, pair_perm, sample_beta
from fastcore_train.nn import LabelSmoothingCrossEntropy, MixedTarget
from fastcore_train.ops.cutmix import cutmix_reference
from fastcore_train.ops.mixup import mixup_reference

from conftest import BACKENDS, DEVICES, TOL, device_context, on_device, to_device

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (B, ...) shapes: empty batch, one sample, odd sizes, 1-D/2-D features, 5-D volumes
SHAPES = [(0, 3, 4, 5), (1, 3, 5, 7), (7, 3, 5, 7), (6, 5, 17, 19), (5,), (4, 33), (3, 2, 3, 4, 5)]
LAYOUTS = ["contiguous", "channels_last", "batch_slice", "spatial_slice"]
CASES = [(shape, layout) for shape in SHAPES for layout in LAYOUTS
         if layout != "channels_last" or len(shape) == 4]


def _make(shape, dtype, layout="contiguous", seed=0, device="cpu"):
    """The same values on every device, in ``layout`` there too."""
    g = torch.Generator().manual_seed(seed)
    if layout == "batch_slice":  # every other sample of a bigger batch: samples stay dense
        big = torch.randn((2 * shape[0],) + tuple(shape[1:]), generator=g).to(dtype)
        return on_device(big[::2], device)
    if layout == "spatial_slice":  # a crop of the last dimension: samples are not dense
        big = torch.randn(tuple(shape[:-1]) + (shape[-1] + 3,), generator=g).to(dtype)
        return on_device(big[..., 1:shape[-1] + 1], device)
    x = torch.randn(shape, generator=g).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return on_device(x, device)


def _random_perm(B, seed=1):
    return torch.randperm(B, generator=torch.Generator().manual_seed(seed))


def _lam(kind, B, seed=2):
    if kind == "float":
        return 0.3
    return torch.rand(B, generator=torch.Generator().manual_seed(seed))


def _plain(x, perm, lam):
    """The one-liner everybody writes, in float64: the ground truth for every dtype."""
    xd = x.double()
    if isinstance(lam, torch.Tensor):
        lam = lam.double().reshape((-1,) + (1,) * (x.dim() - 1))
    return lam * xd + (1 - lam) * xd[perm]


def _assert_close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), atol=atol,
                               rtol=rtol, equal_nan=True)


def _assert_blends_equal(actual, expected, device):
    """Two blends of the same values by the same kernel (in place and out of place): equal on
    the CPU. On CUDA nvcc contracts each a*u + b*w (computed in float32, float64 for float64)
    into one FMA and may fuse either product in the two code paths: the two may differ by the
    rounding of a product (a few float32 ulps of |x| <= 4, absolute) and then, rounded to the
    dtype, by one ulp of the result."""
    if device == "cpu":
        torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    else:
        acc = torch.float64 if actual.dtype == torch.float64 else torch.float32
        torch.testing.assert_close(actual, expected, atol=8 * torch.finfo(acc).eps,
                                   rtol=torch.finfo(actual.dtype).eps)


def _format(x):
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# ---------------------------------------------------------------------------------------------
# mixup

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("lam_kind", ["float", "tensor"])
def test_mixup_matches_formula(backend, device, dtype, shape, layout, lam_kind):
    x = _make(shape, dtype, layout)
    B = shape[0]
    perm, lam = _random_perm(B), _lam(lam_kind, B)
    got = ft.ops.mixup(_make(shape, dtype, layout, device=device), perm.to(device),
                       to_device(lam, device))
    assert got.dtype == dtype and got.shape == x.shape and got.device.type == device
    if layout == "channels_last" and x.numel():
        assert got.is_contiguous(memory_format=torch.channels_last)
    _assert_close(got, _plain(x, perm, lam), dtype)
    # against the CPU reference: one rounding of the same float32 math, at most one ulp apart
    ref = mixup_reference(x, perm, lam)
    assert got.stride() == ref.stride()
    torch.testing.assert_close(got.cpu(), ref, atol=TOL[dtype][0], rtol=TOL[dtype][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("perm_kind", ["flip", "pairs", "pairs_odd"])
@pytest.mark.parametrize("lam_kind", ["float", "tensor"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "batch_slice", "spatial_slice"])
def test_mixup_inplace_involution(backend, device, dtype, perm_kind, lam_kind, layout):
    B = 9 if perm_kind == "pairs_odd" else 8
    x = _make((B, 3, 6, 7), dtype, layout, device=device)
    perm = flip_perm(B) if perm_kind == "flip" else pair_perm(B, torch.Generator().manual_seed(3))
    assert torch.equal(perm[perm], torch.arange(B))
    perm, lam = perm.to(device), to_device(_lam(lam_kind, B), device)
    want = ft.ops.mixup(x, perm, lam)
    ptr, stride = x.data_ptr(), x.stride()
    got = ft.ops.mixup(x, perm, lam, out=x)
    assert got is x and x.data_ptr() == ptr and x.stride() == stride
    _assert_blends_equal(x, want, device)


def test_mixup_inplace_touches_only_the_view(backend, device):
    big = torch.randn(12, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    before = big.clone()
    big = big.to(device)  # (the same tensor on the CPU: before is the copy)
    view = big[2:10]
    ft.ops.mixup(view, flip_perm(8).to(device), 0.25, out=view)
    big = big.cpu()
    assert torch.equal(big[:2], before[:2]) and torch.equal(big[10:], before[10:])
    _assert_close(big[2:10], _plain(before[2:10], flip_perm(8), 0.25), torch.float32)


@pytest.mark.parametrize("out_layout", ["contiguous", "channels_last", "strided"])
def test_mixup_out(backend, device, out_layout):
    x = _make((5, 3, 6, 7), torch.float32, device=device)
    perm, lam = _random_perm(5), _lam("tensor", 5)
    if out_layout == "strided":  # out is not dense per sample: written through a temporary
        out = torch.full((5, 3, 6, 9), 7.0, device=device)[..., 1:8]
    elif out_layout == "channels_last":  # x is not: x is read in out's layout
        out = torch.full_like(x, 7.0, memory_format=torch.channels_last)
    else:
        out = torch.full_like(x, 7.0)
    got = ft.ops.mixup(x, perm.to(device), lam.to(device), out=out)
    assert got is out
    _assert_close(out, _plain(x.cpu(), perm, lam), torch.float32)


def test_mixup_expanded_input(backend, device):
    """A batch expanded from one sample (stride 0) is read fine; in place it is refused by torch."""
    x = torch.randn(1, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    got = ft.ops.mixup(x.to(device).expand(4, 3, 4, 5), flip_perm(4).to(device), 0.6)
    _assert_close(got, _plain(x.expand(4, 3, 4, 5), flip_perm(4), 0.6), torch.float32)


@pytest.mark.parametrize("perm", [[1, 2, 0, 3], [3, 0, 1, 2]])
def test_mixup_inplace_refuses_other_perms(backend, device, device_asserts, perm):
    """Refused before anything is written; on CUDA (where only the device reads perm) with a
    device-side assert, in a child process."""
    if device == "cuda" and backend == "extension":
        device_asserts.expect(CUDA_ASSERTS, f"mixup in place: {perm}",
                              prelude=CUDA_ASSERTS_PRELUDE)
        return
    x = torch.randn(4, 2, 3, device=device)
    before = x.clone()
    with pytest.raises(ValueError, match=r"in place \(out=x\) needs perm to be an involution"):
        ft.ops.mixup(x, torch.tensor(perm, device=device), 0.5, out=x)
    assert torch.equal(x, before)


def test_mixup_nan_inf_propagate_like_torch(backend, device):
    x = torch.randn(4, 8)
    x[1, 2] = float("nan")
    x[2, 3] = float("inf")
    perm = torch.tensor([2, 3, 0, 1])
    for lam in (0.5, 1.0, 0.0):
        got = ft.ops.mixup(x.to(device), perm.to(device), lam).cpu()
        torch.testing.assert_close(got, lam * x + (1 - lam) * x[perm], equal_nan=True)


def test_mixup_gradcheck_float64(backend, device):
    """float64 on every device (the CUDA kernels take float64 too)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 3, 4, dtype=torch.float64, generator=g).to(device).requires_grad_(True)
    lam = torch.rand(6, dtype=torch.float64, generator=g).to(device).requires_grad_(True)
    # not an involution: backward needs the inverse
    perm = torch.tensor([2, 0, 1, 5, 3, 4], device=device)
    torch.autograd.gradcheck(lambda t: ft.ops.mixup(t, perm, 0.3), (x,))
    torch.autograd.gradcheck(lambda t, l: ft.ops.mixup(t, perm, l), (x, lam))
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    torch.autograd.gradcheck(lambda t: ft.ops.mixup(t, perm, lam.detach()), (xc,))


# ---------------------------------------------------------------------------------------------
# cutmix

def _cut_by_slicing(x, perm, boxes):
    """The expected cutmix result, built with slicing one sample at a time."""
    want = x.clone()
    xp = x[perm]
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        want[i, :, y0:y1, x0:x1] = xp[i, :, y0:y1, x0:x1]
    return want


BOXES = [(2, 7, 3, 9), (0, 11, 0, 13), (0, 0, 0, 0), (3, 3, 1, 5), (10, 11, 12, 13), (0, 11, 5, 6)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "batch_slice", "spatial_slice"])
@pytest.mark.parametrize("box", BOXES)
def test_cutmix_matches_slicing(backend, device, dtype, layout, box):
    B, H, W = 5, 11, 13
    x = _make((B, 3, H, W), dtype, layout)
    perm = _random_perm(B)
    got, lam = ft.ops.cutmix(_make((B, 3, H, W), dtype, layout, device=device), perm.to(device),
                             box)
    assert got.device.type == device
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)
    got = got.cpu()
    assert torch.equal(got, _cut_by_slicing(x, perm, [box] * B))
    y0, y1, x0, x1 = box
    assert lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / (H * W))
    assert isinstance(lam, float)
    assert torch.equal(cutmix_reference(x, perm, box)[0], got)


def _sample_boxes(B, H, W, seed=4):
    g = torch.Generator().manual_seed(seed)
    ys = torch.randint(0, H + 1, (B, 2), generator=g).sort(1).values
    xs = torch.randint(0, W + 1, (B, 2), generator=g).sort(1).values
    return torch.cat([ys, xs], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cutmix_per_sample_boxes(backend, device, dtype, layout):
    B, H, W = 7, 9, 10
    x = _make((B, 4, H, W), dtype, layout)
    xd = _make((B, 4, H, W), dtype, layout, device=device)
    perm = _random_perm(B)
    boxes = _sample_boxes(B, H, W)
    got, lam = ft.ops.cutmix(xd, perm.to(device), boxes.to(device))
    assert lam.device == xd.device and lam.dtype == torch.float32 and lam.shape == (B,)
    assert torch.equal(got.cpu(), _cut_by_slicing(x, perm, boxes.tolist()))
    area = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
    torch.testing.assert_close(lam.cpu(), 1 - area.float() / (H * W))
    got32, _ = ft.ops.cutmix(xd, perm.to(device), boxes.int().to(device))
    assert torch.equal(got32, got)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("perm_kind", ["flip", "pairs_odd"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "spatial_slice"])
def test_cutmix_inplace_involution(backend, device, per_sample, perm_kind, layout):
    B, H, W = 9, 8, 10
    x = _make((B, 3, H, W), torch.float32, layout, device=device)
    perm = flip_perm(B) if perm_kind == "flip" else pair_perm(B, torch.Generator().manual_seed(5))
    # per-sample boxes of a pair differ and overlap: the swap must use the original pixels
    box = _sample_boxes(B, H, W, seed=6) if per_sample else (1, 6, 2, 9)
    boxes = box.tolist() if per_sample else [box] * B
    want = _cut_by_slicing(x.cpu(), perm, boxes)
    got, lam = ft.ops.cutmix(x, perm.to(device), to_device(box, device), out=x)
    assert got is x
    assert torch.equal(x.cpu(), want)


@pytest.mark.parametrize("out_layout", ["contiguous", "channels_last", "strided"])
def test_cutmix_out_leaves_x_alone(backend, device, out_layout):
    before = torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    x = before.to(device, copy=True)
    if out_layout == "strided":
        out = torch.empty(4, 2, 6, 8, device=device)[..., 1:7]
    elif out_layout == "channels_last":
        out = torch.empty_like(x, memory_format=torch.channels_last)
    else:
        out = torch.empty_like(x)
    got, _ = ft.ops.cutmix(x, flip_perm(4).to(device), (1, 4, 2, 5), out=out)
    assert got is out and torch.equal(x.cpu(), before)
    assert torch.equal(out.cpu(), _cut_by_slicing(before, flip_perm(4), [(1, 4, 2, 5)] * 4))


def test_cutmix_inplace_refuses_other_perms(backend, device, device_asserts):
    if device == "cuda" and backend == "extension":
        device_asserts.expect(CUDA_ASSERTS, "cutmix in place: [1, 2, 0]",
                              prelude=CUDA_ASSERTS_PRELUDE)
        return
    x = torch.randn(3, 2, 4, 4, device=device)
    before = x.clone()
    with pytest.raises(ValueError, match="involution"):
        ft.ops.cutmix(x, torch.tensor([1, 2, 0], device=device), (0, 2, 0, 2), out=x)
    assert torch.equal(x, before)


def test_cutmix_empty_batch(backend, device):
    x = torch.randn(0, 3, 4, 4, device=device)
    got, lam = ft.ops.cutmix(x, torch.zeros(0, dtype=torch.long, device=device), (0, 2, 0, 2))
    assert got.shape == x.shape and got.device == x.device and lam == pytest.approx(0.75)


def test_cutmix_gradcheck_float64(backend, device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, 5, 4, dtype=torch.float64, generator=g).to(device).requires_grad_(True)
    perm = torch.tensor([2, 0, 1, 5, 3, 4], device=device)
    torch.autograd.gradcheck(lambda t: ft.ops.cutmix(t, perm, (1, 4, 0, 3))[0], (x,))
    boxes = torch.tensor([[0, 2, 0, 2], [1, 5, 1, 4], [0, 0, 0, 0], [0, 5, 0, 4], [2, 3, 1, 2],
                          [1, 2, 2, 3]], device=device)
    torch.autograd.gradcheck(lambda t: ft.ops.cutmix(t, perm, boxes)[0], (x,))
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    torch.autograd.gradcheck(lambda t: ft.ops.cutmix(t, perm, boxes)[0], (xc,))


# ---------------------------------------------------------------------------------------------
# bad input: the same exception type and message from both backends, on every device. The values
# of a perm, a lam tensor or per-sample boxes on CUDA are checked on the device (a device-side
# assert, as torch's own index kernels do: reading them on the host would sync every step), so
# those cases assert there, in a child process. "{x_device}" in a message is x's device.

def _x():
    return torch.randn(4, 3, 5, 6)


P = torch.tensor([3, 2, 1, 0])
BAD_MIXUP = {
    "x int": (lambda: (_x().int(), P, 0.5), {}, TypeError,
              "mixup: x must be float32, float16, bfloat16 or float64, got torch.int32"),
    "x 0-D": (lambda: (torch.tensor(1.0), torch.tensor([0]), 0.5), {}, ValueError,
              "mixup: x must have a batch dimension (at least 1-D), got a 0-D tensor"),
    "perm int32": (lambda: (_x(), P.int(), 0.5), {}, TypeError,
                   "mixup: perm must be int64 (torch.long), got torch.int32"),
    "perm shape": (lambda: (_x(), torch.tensor([0, 1, 2]), 0.5), {}, ValueError,
                   "mixup: perm must have shape (4,) to match the batch of x, got [3]"),
    "perm too large": (lambda: (_x(), torch.tensor([0, 1, 4, 2]), 0.5), {}, IndexError,
                       "mixup: perm[2] = 4 is out of range for a batch of 4"),
    "perm negative": (lambda: (_x(), torch.tensor([0, -1, 2, 3]), 0.5), {}, IndexError,
                      "mixup: perm[1] = -1 is out of range for a batch of 4"),
    "perm repeats": (lambda: (_x(), torch.tensor([0, 2, 2, 1]), 0.5), {}, ValueError,
                     "mixup: perm is not a permutation: 2 appears twice (perm[1] and perm[2])"),
    "perm on meta": (lambda: (_x(), P.to("meta"), 0.5), {}, ValueError,
                     "mixup: perm is on meta but x is on {x_device}"),
    "lam 1.5": (lambda: (_x(), P, 1.5), {}, ValueError, "mixup: lam must be in [0, 1], got 1.5"),
    "lam nan": (lambda: (_x(), P, float("nan")), {}, ValueError,
                "mixup: lam must be in [0, 1], got nan"),
    "lam None": (lambda: (_x(), P, None), {}, TypeError,
                 "mixup: lam must be a float or a tensor, got NoneType"),
    # torch takes no string for a Scalar (torch.mul(x, "0.3") is a TypeError): not parsed
    "lam str": (lambda: (_x(), P, "0.3"), {}, TypeError,
                "mixup: lam must be a float or a tensor, got str"),
    "lam int tensor": (lambda: (_x(), P, torch.tensor([1, 0, 1, 0])), {}, TypeError,
                       "mixup: lam must be a float tensor, got torch.int64"),
    "lam shape": (lambda: (_x(), P, torch.rand(3)), {}, ValueError,
                  "mixup: lam must have shape (4,) to match the batch of x, got [3]"),
    "lam tensor 2": (lambda: (_x(), P, torch.tensor([0.5, 0.2, 2.0, 0.1])), {}, ValueError,
                     "mixup: lam must be in [0, 1], got 2 (row 2)"),
    "lam tensor nan": (lambda: (_x(), P, torch.tensor([0.5, float("nan"), 0.3, 0.1])), {},
                       ValueError, "mixup: lam must be in [0, 1], got nan (row 1)"),
    "lam 0-d tensor": (lambda: (_x(), P, torch.tensor(-0.5)), {}, ValueError,
                       "mixup: lam must be in [0, 1], got -0.5 (row 0)"),
    "lam tensor 2, in place": (lambda: (_x(), P, torch.tensor([0.5, 0.2, 2.0, 0.1])),
                               {"out": "x"}, ValueError,
                               "mixup: lam must be in [0, 1], got 2 (row 2)"),
    "out shape": (lambda: (_x(), P, 0.5), {"out": torch.empty(4, 3, 5)}, ValueError,
                  "mixup: out must have the shape of x, [4, 3, 5, 6], got [4, 3, 5]"),
    "out dtype": (lambda: (_x(), P, 0.5), {"out": torch.empty(4, 3, 5, 6, dtype=torch.float64)},
                  TypeError,
                  "mixup: out must have the dtype of x, torch.float32, got torch.float64"),
}
MIXUP_DEVICE_SIDE = {"perm too large", "perm negative", "perm repeats", "lam tensor 2",
                     "lam tensor nan", "lam 0-d tensor", "lam tensor 2, in place"}


def call_bad_mixup(name, device):
    """Runs BAD_MIXUP[name] on ``device`` (also the code of the child processes on CUDA);
    returns x."""
    make, kw, _, _ = BAD_MIXUP[name]
    x, perm, lam = to_device(make(), device)
    kw = {"out": x} if isinstance(kw.get("out"), str) else to_device(kw, device)  # "x": in place
    ft.ops.mixup(x, perm, lam, **kw)


@pytest.mark.parametrize("name", list(BAD_MIXUP))
def test_mixup_bad_input(backend, device, device_asserts, name):
    if device == "cuda" and backend == "extension" and name in MIXUP_DEVICE_SIDE:
        device_asserts.expect(CUDA_ASSERTS, f"mixup: {name}", prelude=CUDA_ASSERTS_PRELUDE)
        return
    _, _, exc, msg = BAD_MIXUP[name]
    with pytest.raises(exc) as info:
        call_bad_mixup(name, device)
    x_device = str(torch.empty(0, device=device).device)  # "cuda:0", not "cuda"
    assert str(info.value) == msg.replace("{x_device}", x_device)


def test_mixup_out_partially_overlapping(backend, device):
    buf = torch.randn(5, 3, 4, device=device)
    with pytest.raises(ValueError, match="out overlaps x but is not x"):
        ft.ops.mixup(buf[:4], P.to(device), 0.5, out=buf[1:])


BAD_CUTMIX = {
    "x 3-D": (lambda: (torch.randn(4, 3, 5), P, (0, 1, 0, 1)), ValueError,
              "cutmix: x must be 4-D (B, C, H, W), got 3-D"),
    "box of 3": (lambda: (_x(), P, (0, 1, 0)), ValueError,
                 "cutmix: box must be 4 ints (y0, y1, x0, x1), got 3"),
    "box too tall": (lambda: (_x(), P, (0, 6, 0, 2)), ValueError,
                     "cutmix: box (y0, y1, x0, x1) = (0, 6, 0, 2) is outside the 5x6 image "
                     "(need 0 <= y0 <= y1 <= 5 and 0 <= x0 <= x1 <= 6)"),
    "box upside down": (lambda: (_x(), P, (3, 2, 0, 2)), ValueError,
                        "cutmix: box (y0, y1, x0, x1) = (3, 2, 0, 2) is outside the 5x6 image "
                        "(need 0 <= y0 <= y1 <= 5 and 0 <= x0 <= x1 <= 6)"),
    "boxes float": (lambda: (_x(), P, torch.zeros(4, 4)), TypeError,
                    "cutmix: boxes must be an integer tensor, got torch.float32"),
    "boxes shape": (lambda: (_x(), P, torch.zeros(4, 3, dtype=torch.long)), ValueError,
                    "cutmix: boxes must have shape (4, 4), got [4, 3]"),
    "box of a sample outside": (
        lambda: (_x(), P, torch.tensor([[0, 1, 0, 1], [0, 1, 0, 1], [-1, 1, 0, 1], [0, 1, 0, 1]])),
        ValueError, "cutmix: box of sample 2 (y0, y1, x0, x1) = (-1, 1, 0, 1) is outside the 5x6 "
        "image (need 0 <= y0 <= y1 <= 5 and 0 <= x0 <= x1 <= 6)"),
    "perm repeats": (lambda: (_x(), torch.tensor([0, 0, 1, 2]), (0, 1, 0, 1)), ValueError,
                     "cutmix: perm is not a permutation: 0 appears twice (perm[0] and perm[1])"),
    "x int": (lambda: (_x().half().int(), P, (0, 1, 0, 1)), TypeError,
              "cutmix: x must be float32, float16, bfloat16 or float64, got torch.int32"),
}
CUTMIX_DEVICE_SIDE = {"box of a sample outside", "perm repeats"}


def call_bad_cutmix(name, device):
    make, _, _ = BAD_CUTMIX[name]
    ft.ops.cutmix(*to_device(make(), device))


@pytest.mark.parametrize("name", list(BAD_CUTMIX))
def test_cutmix_bad_input(backend, device, device_asserts, name):
    if device == "cuda" and backend == "extension" and name in CUTMIX_DEVICE_SIDE:
        device_asserts.expect(CUDA_ASSERTS, f"cutmix: {name}", prelude=CUDA_ASSERTS_PRELUDE)
        return
    _, exc, msg = BAD_CUTMIX[name]
    with pytest.raises(exc) as info:
        call_bad_cutmix(name, device)
    assert str(info.value) == msg


# Box values are slice indices (x[..., y0:y1, x0:x1]); what torch refuses as a slice index
# (anything without __index__: floats, even whole ones, NaN, a float tensor) is a TypeError.
NON_INDEX_BOX_VALUES = [2.0, 2.5, float("nan"), float("inf"), np.float64(2.0), torch.tensor(2.0),
                        "2"]


@pytest.mark.parametrize("value", NON_INDEX_BOX_VALUES + [None], ids=repr)
def test_cutmix_box_values_must_be_integers(backend, value):
    x = _x()
    if value is not None:  # torch refuses it as a slice index, with a TypeError
        with pytest.raises(TypeError):
            x[:, :, 0:value]
    # None would be an open end in a slice; a box needs both ends
    with pytest.raises(TypeError) as info:
        ft.ops.cutmix(x, P, (0, value, 1, 3))
    assert str(info.value) == ("cutmix: box values must be integers (pixel indices), got "
                               f"y1 = {value!r} ({type(value).__name__})")


@pytest.mark.parametrize("value", [np.int64(2), torch.tensor(2), torch.tensor(2, dtype=torch.int8)],
                         ids=repr)
def test_cutmix_box_accepts_what_slicing_accepts(backend, value):
    x = _x()
    assert torch.equal(x[:, :, 0:value], x[:, :, 0:2])
    got, lam = ft.ops.cutmix(x, P, (0, value, 1, 3))
    want, want_lam = ft.ops.cutmix(x, P, (0, 2, 1, 3))
    assert torch.equal(got, want) and lam == want_lam and type(lam) is float


def test_cutmix_box_not_a_sequence(backend):
    with pytest.raises(TypeError) as info:
        ft.ops.cutmix(_x(), P, 3)
    assert str(info.value) == ("cutmix: box must be 4 ints (y0, y1, x0, x1) or a (B, 4) integer "
                               "tensor, got int")


def test_op_checks_direct_call(extension):
    """The C++ ops check their inputs themselves, with the Python messages, word for word."""
    ops = torch.ops.fastcore_train
    x = _x()
    cases = [
        (lambda: ops.mixup(x, torch.tensor([0, 2, 2, 1]), None, 0.5), ValueError,
         "mixup: perm is not a permutation: 2 appears twice (perm[1] and perm[2])"),
        (lambda: ops.mixup(x, torch.tensor([0, 1, 4, 2]), None, 0.5), IndexError,
         "mixup: perm[2] = 4 is out of range for a batch of 4"),
        (lambda: ops.mixup(x, P.int(), None, 0.5), TypeError,
         "mixup: perm must be int64 (torch.long), got torch.int32"),
        (lambda: ops.mixup(x.int(), P, None, 0.5), TypeError,
         "mixup: x must be float32, float16, bfloat16 or float64, got torch.int32"),
        (lambda: ops.mixup(x, P, None, 1.5), ValueError, "mixup: lam must be in [0, 1], got 1.5"),
        (lambda: ops.mixup(x, P, torch.rand(3), 0.0), ValueError,
         "mixup: lam must have shape (4,) to match the batch of x, got [3]"),
        (lambda: ops.mixup_(x, torch.tensor([1, 2, 0, 3]), None, 0.5), ValueError,
         "mixup: in place (out=x) needs perm to be an involution (perm[perm[i]] == i: a flip or "
         "pair swaps), but perm[0] = 1 and perm[1] = 2"),
        (lambda: ops.mixup.out(x, P, None, 0.5, x), ValueError,
         "mixup: out overlaps x but is not x; pass out=x to work in place, or a non-overlapping "
         "tensor"),
        (lambda: ops.mixup_backward(x, torch.tensor([0, 0, 1, 2]), None, 0.5), ValueError,
         "mixup: perm is not a permutation: 0 appears twice (perm[0] and perm[1])"),
        (lambda: ops.cutmix(x, P, None, [0, 6, 0, 2]), ValueError,
         "cutmix: box (y0, y1, x0, x1) = (0, 6, 0, 2) is outside the 5x6 image "
         "(need 0 <= y0 <= y1 <= 5 and 0 <= x0 <= x1 <= 6)"),
        (lambda: ops.cutmix(x, P, torch.tensor([[0, 1, 0, 1]] * 3 + [[0, 1, 4, 7]]), []),
         ValueError, "cutmix: box of sample 3 (y0, y1, x0, x1) = (0, 1, 4, 7) is outside the "
         "5x6 image (need 0 <= y0 <= y1 <= 5 and 0 <= x0 <= x1 <= 6)"),
        (lambda: ops.cutmix_(x, torch.tensor([1, 2, 0, 3]), None, [0, 1, 0, 1]),
         ValueError, "cutmix: in place (out=x) needs perm to be an involution (perm[perm[i]] == "
         "i: a flip or pair swaps), but perm[0] = 1 and perm[1] = 2"),
    ]
    for call, exc, msg in cases:
        with pytest.raises(exc) as info:
            call()
        assert str(info.value).split("\n")[0] == msg


def test_inplace_refusal_same_from_python(backend):
    x = _x()
    with pytest.raises(ValueError) as info:
        ft.ops.mixup(x, torch.tensor([1, 2, 0, 3]), 0.5, out=x)
    assert str(info.value) == ("mixup: in place (out=x) needs perm to be an involution "
                               "(perm[perm[i]] == i: a flip or pair swaps), but perm[0] = 1 and "
                               "perm[1] = 2")


# ---------------------------------------------------------------------------------------------
# writes in place and through out=: torch's autograd contract (version counters, no autograd)

@pytest.fixture
def fresh_dynamo():
    """Empty dynamo caches: the parametrized compile tests compile the same code objects (the
    step, Mixup.forward) with other settings, past dynamo's recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _backward_after(saved, write):
    """Saves ``saved`` for a backward, runs ``write(saved)``, then the backward. Returns the
    version increase and the backward's error text (None when it ran)."""
    w = torch.ones(saved.shape, dtype=saved.dtype, requires_grad=True)
    loss = (w * saved).sum()
    v = saved._version
    write(saved)
    delta = saved._version - v
    try:
        loss.backward()
    except RuntimeError as e:
        return delta, str(e)
    return delta, None


def _flip_lam(t):
    return torch.rand(t.shape[0], generator=torch.Generator().manual_seed(7))


# (tensor to save, our write, torch's write of the same kind): in place is x.mul_, out= another
# tensor is torch.mul(..., out=)
WRITES = {
    "mixup out=x": (
        lambda: _make((6, 3, 4, 5), torch.float32),
        lambda t: ft.ops.mixup(t, flip_perm(6), 0.3, out=t),
        lambda t: t.mul_(0.3)),
    "mixup out=x, lam tensor, channels_last": (
        lambda: _make((6, 3, 4, 5), torch.float32, "channels_last"),
        lambda t: ft.ops.mixup(t, flip_perm(6), _flip_lam(t), out=t),
        lambda t: t.mul_(0.3)),
    "mixup out=x, not dense (fallback copy)": (
        lambda: _make((6, 3, 4, 5), torch.float32, "spatial_slice"),
        lambda t: ft.ops.mixup(t, flip_perm(6), 0.3, out=t),
        lambda t: t.mul_(0.3)),
    "mixup out=x, a view of the saved batch": (
        lambda: torch.randn(10, 3, 4),
        lambda t: ft.ops.mixup(t[2:8], flip_perm(6), 0.3, out=t[2:8]),
        lambda t: t[2:8].mul_(0.3)),
    "mixup out=buffer": (
        lambda: torch.zeros(6, 3, 4, 5),
        lambda t: ft.ops.mixup(_make((6, 3, 4, 5), torch.float32), _random_perm(6), 0.3, out=t),
        lambda t: torch.mul(_make((6, 3, 4, 5), torch.float32), 0.3, out=t)),
    "mixup out=buffer not dense (fallback copy)": (
        lambda: torch.zeros(6, 3, 4, 7)[..., 1:6],
        lambda t: ft.ops.mixup(_make((6, 3, 4, 5), torch.float32), _random_perm(6), 0.3, out=t),
        lambda t: torch.mul(_make((6, 3, 4, 5), torch.float32), 0.3, out=t)),
    "cutmix out=x": (
        lambda: _make((6, 3, 4, 5), torch.float32),
        lambda t: ft.ops.cutmix(t, flip_perm(6), (1, 3, 0, 4), out=t),
        lambda t: t.mul_(0.3)),
    "cutmix out=x, per-sample boxes, not dense (fallback copy)": (
        lambda: _make((6, 3, 4, 5), torch.float32, "spatial_slice"),
        lambda t: ft.ops.cutmix(t, flip_perm(6), _sample_boxes(6, 4, 5), out=t),
        lambda t: t.mul_(0.3)),
    "cutmix out=buffer": (
        lambda: torch.zeros(6, 3, 4, 5),
        lambda t: ft.ops.cutmix(_make((6, 3, 4, 5), torch.float32), _random_perm(6),
                                _sample_boxes(6, 4, 5), out=t),
        lambda t: torch.mul(_make((6, 3, 4, 5), torch.float32), 0.3, out=t)),
    "Mixup(inplace=True), mixup": (
        lambda: _make((6, 3, 4, 5), torch.float32),
        lambda t: Mixup(alpha=1.0, inplace=True)(t, torch.arange(6)),
        lambda t: t.mul_(0.3)),
    "Mixup(inplace=True), cutmix": (
        lambda: _make((6, 3, 4, 5), torch.float32),
        lambda t: Mixup(alpha=0.0, cutmix_alpha=1.0, inplace=True)(t, torch.arange(6)),
        lambda t: t.mul_(0.3)),
    "Mixup(inplace=True), per-sample cutmix": (
        lambda: _make((6, 3, 4, 5), torch.float32),
        lambda t: Mixup(alpha=0.0, cutmix_alpha=1.0, mode="elem", inplace=True)(
            t, torch.arange(6)),
        lambda t: t.mul_(0.3)),
}


@pytest.mark.parametrize("name", list(WRITES))
def test_writes_bump_the_version_like_torch(backend, name):
    """A backward that saved the written tensor raises torch's "modified by an inplace
    operation" error, word for word as after torch's own in-place / out= write."""
    make, ours, theirs = WRITES[name]
    want_delta, want_error = _backward_after(make(), theirs)
    assert want_error is not None and "modified by an inplace operation" in want_error
    assert _backward_after(make(), ours) == (want_delta, want_error)


def test_refused_write_leaves_the_version(backend):
    x = _x()
    with pytest.raises(ValueError, match="involution"):
        ft.ops.mixup(x, torch.tensor([1, 2, 0, 3]), 0.5, out=x)
    assert x._version == 0


@pytest.mark.parametrize("write", ["mixup out=x", "mixup out=buffer", "Mixup(inplace=True)"])
def test_compiled_writes_bump_the_version_like_torch(backend, write, fresh_dynamo):
    """Under torch.compile the schemas' (a!) make the write visible: the input's version moves
    as it does for torch's own in-place / out= ops compiled the same way."""
    mix = Mixup(alpha=1.0, inplace=True)

    def ours(x, buf):
        if write == "mixup out=x":
            ft.ops.mixup(x, flip_perm(6), 0.3, out=x)
        elif write == "mixup out=buffer":
            ft.ops.mixup(x, flip_perm(6), 0.3, out=buf)
        else:
            mix(x, torch.arange(6))
        return x.sum()

    def theirs(x, buf):
        if write == "mixup out=buffer":
            torch.mul(x, 0.3, out=buf)
        else:
            x.mul_(0.3)
        return x.sum()

    saved_is_buf = write == "mixup out=buffer"
    results = []
    for fn in (theirs, ours):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        x, buf = _make((6, 3, 4, 5), torch.float32), torch.zeros(6, 3, 4, 5)
        results.append(_backward_after(buf if saved_is_buf else x,
                                       lambda t: compiled(x, buf)))
    assert results[0][1] is not None
    assert results[1] == results[0]


def _torch_out_grad_error(op):
    """torch's error for an out= call with an argument that requires grad, named for ``op``."""
    leaf = torch.zeros(3, requires_grad=True)
    with pytest.raises(RuntimeError) as info:
        torch.add(torch.ones(3), torch.ones(3), out=leaf)
    assert str(info.value).startswith("add(): ")
    return op + str(info.value)[len("add"):]


def _out_grad_case(case, op):
    """(call, tensor that must be left alone) for an out= call with something requiring grad."""
    x, out = _x(), torch.zeros(4, 3, 5, 6)
    if case == "out is a leaf that requires grad":
        out.requires_grad_(True)
    elif case == "out=x, x a leaf that requires grad":
        x.requires_grad_(True)
        out = x
    elif case == "x requires grad":
        x.requires_grad_(True)
    if op == "mixup":
        lam = torch.rand(4).requires_grad_(True) if case == "lam requires grad" else 0.5
        return (lambda: ft.ops.mixup(x, flip_perm(4), lam, out=out)), out
    return (lambda: ft.ops.cutmix(x, flip_perm(4), (1, 3, 2, 5), out=out)), out


OUT_GRAD_CASES = ["out is a leaf that requires grad", "out=x, x a leaf that requires grad",
                  "x requires grad", "lam requires grad"]


@pytest.mark.parametrize("op,case", [(op, case) for op in ("mixup", "cutmix")
                                     for case in OUT_GRAD_CASES
                                     if op == "mixup" or case != "lam requires grad"])
def test_out_with_grad_refused_like_torch(backend, op, case):
    call, out = _out_grad_case(case, op)
    before = out.detach().clone()
    with pytest.raises(RuntimeError) as info:
        call()
    assert str(info.value) == _torch_out_grad_error(op)
    assert torch.equal(out.detach(), before) and out._version == 0
    with torch.no_grad():  # as torch's out= functions, allowed without grad mode
        call()
    assert out._version == 1 and not torch.equal(out.detach(), before)


def test_out_with_grad_refused_by_the_cpp_ops(extension):
    """Direct torch.ops calls refuse the same way (csrc/mutating_ops.cpp)."""
    ops = torch.ops.fastcore_train
    leaf = torch.zeros(4, 3, 5, 6, requires_grad=True)
    x = _x()
    for call, op in [(lambda: ops.mixup.out(x, P, None, 0.5, leaf), "mixup"),
                     (lambda: ops.mixup_(leaf, P, None, 0.5), "mixup"),
                     (lambda: ops.mixup.out(x, P, torch.rand(4).requires_grad_(True), 0.0,
                                            torch.zeros(4, 3, 5, 6)), "mixup"),
                     (lambda: ops.cutmix.out(x, P, None, [0, 1, 0, 1], leaf), "cutmix"),
                     (lambda: ops.cutmix_(leaf, P, None, [0, 1, 0, 1]), "cutmix")]:
        with pytest.raises(RuntimeError) as info:
            call()
        assert str(info.value).split("\n")[0] == _torch_out_grad_error(op)
    assert leaf._version == 0 and not leaf.detach().any()


# ---------------------------------------------------------------------------------------------
# torch.library and torch.compile

def test_opcheck(extension, device):
    ops = torch.ops.fastcore_train
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 5, 4, generator=g).to(device)
    perm = torch.tensor([2, 0, 1, 5, 3, 4], device=device)
    inv = flip_perm(6).to(device)
    lam = torch.rand(6, generator=g).to(device)
    boxes = _sample_boxes(6, 5, 4).to(device)
    xg = x.clone().requires_grad_(True)
    torch.library.opcheck(ops.mixup.default, (xg, perm, None, 0.3))
    torch.library.opcheck(ops.mixup.default, (xg, perm, lam.clone().requires_grad_(True), 0.0))
    torch.library.opcheck(ops.mixup.default,
                          (x.contiguous(memory_format=torch.channels_last), perm, lam, 0.0),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.mixup.out, (x, perm, lam, 0.0, torch.empty_like(x)))
    torch.library.opcheck(ops.mixup_.default, (x.clone(), inv, lam, 0.0))
    torch.library.opcheck(ops.mixup_backward.default, (x, perm, lam, 0.0))
    torch.library.opcheck(ops.cutmix.default, (xg, perm, None, [1, 3, 0, 2]))
    torch.library.opcheck(ops.cutmix.default, (xg, perm, boxes, []))
    torch.library.opcheck(ops.cutmix.out, (x, perm, boxes, [], torch.empty_like(x)))
    torch.library.opcheck(ops.cutmix_.default, (x.clone(), inv, boxes, []))
    torch.library.opcheck(ops.cutmix_backward.default, (x, perm, boxes, []))


def test_torch_compile_fullgraph(extension, device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 4 * 5, 7)).to(device)
    loss_fn = LabelSmoothingCrossEntropy(0.1)

    def step(x, y, perm, lam, boxes):
        xm = ft.ops.mixup(x, perm, lam)
        xc, lam_c = ft.ops.cutmix(xm, perm, boxes)
        return loss_fn(model(xc), MixedTarget(y, y[perm], lam_c))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 6, 7, generator=g)
    y = torch.randint(0, 7, (8,), generator=g)
    perm, lam, boxes = _random_perm(8), torch.rand(8, generator=g), _sample_boxes(8, 6, 7)
    x, y, perm, lam, boxes = to_device((x, y, perm, lam, boxes), device)
    xa = x.clone().requires_grad_(True)
    got = compiled(xa, y, perm, lam, boxes)
    got.backward()
    xb = x.clone().requires_grad_(True)
    want = step(xb, y, perm, lam, boxes)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(xa.grad, xb.grad)


def test_torch_compile_inplace(extension, device):
    def blend(x, perm):
        ft.ops.mixup(x, perm, 0.7, out=x)
        return x * 2

    compiled = torch.compile(blend, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0)).to(device)
    want = (0.7 * x + 0.3 * x.flip(0)) * 2
    xc = x.clone()
    got = compiled(xc, flip_perm(6).to(device))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(xc, want / 2)


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_every_cpu_build(extension, isa):
    C_ = _backend._C
    order = ["default", "avx2", "avx512"]
    if order.index(isa) > order.index(C_.best_cpu_capability()):
        pytest.skip(f"CPU lacks {isa}")
    x = _make((5, 3, 7, 9), torch.bfloat16)
    xf = _make((5, 3, 7, 9), torch.float32)
    perm, lam = _random_perm(5), _lam("tensor", 5)
    try:
        C_._set_cpu_capability(isa)
        got = ft.ops.mixup(x, perm, lam)
        gotf = ft.ops.mixup(xf, perm, 0.3)
        xi = xf.clone()
        ft.ops.mixup(xi, flip_perm(5), lam, out=xi)
    finally:
        C_._set_cpu_capability("")
    _assert_close(got, _plain(x, perm, lam), torch.bfloat16)
    _assert_close(gotf, _plain(xf, perm, 0.3), torch.float32)
    _assert_close(xi, _plain(xf, flip_perm(5), lam), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_large_output_streaming_stores(extension, dtype, isa):
    """Outputs past the last-level cache take the streaming-store path; an out= one element off
    the vector alignment exercises its scalar head."""
    C_ = _backend._C
    order = ["default", "avx2", "avx512"]
    if order.index(isa) > order.index(C_.best_cpu_capability()):
        pytest.skip(f"CPU lacks {isa}")
    B = 40 if dtype == torch.float32 else 80  # > 32 MiB of output
    x = torch.randn(B, 3, 224, 224).to(dtype)
    perm, lam = _random_perm(B), _lam("tensor", B)
    buf = torch.empty(x.numel() + 1, dtype=dtype)
    out = buf[1:].view(x.shape)
    try:
        C_._set_cpu_capability(isa)
        got = ft.ops.mixup(x, perm, lam)
        ft.ops.mixup(x, perm, 0.3, out=out)
    finally:
        C_._set_cpu_capability("")
    want = mixup_reference(x, perm, lam)
    torch.testing.assert_close(got, want, atol=TOL[dtype][0], rtol=TOL[dtype][1])
    torch.testing.assert_close(out, mixup_reference(x, perm, 0.3), atol=TOL[dtype][0],
                               rtol=TOL[dtype][1])


# ---------------------------------------------------------------------------------------------
# the Mixup module

def _timm_soft_ce(logits, y_a, y_b, lam, classes, eps):
    """timm's recipe in plain torch: smoothed one-hot targets mixed by lam, soft-target CE."""
    off, on = eps / classes, 1.0 - eps + eps / classes

    def one_hot(y):
        return torch.full((y.shape[0], classes), off, dtype=torch.float64).scatter_(
            1, y[:, None], on)

    lam = lam.double()[:, None] if isinstance(lam, torch.Tensor) else lam
    soft = one_hot(y_a) * lam + one_hot(y_b) * (1 - lam)
    return -(soft * F.log_softmax(logits.double(), dim=1)).sum(1).mean()


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("alphas", [(0.4, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_module_equals_timm_recipe(backend, device, mode, alphas):
    """(On CUDA the module's CPU draws reach the device through pinned memory, asynchronously:
    three calls in a row must each get their own.)"""
    B, classes, eps = 8, 10, 0.1
    mix = Mixup(alpha=alphas[0], cutmix_alpha=alphas[1], mode=mode,
                generator=torch.Generator().manual_seed(11))
    loss_fn = LabelSmoothingCrossEntropy(eps)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(B, 3, 6, 6, generator=g)
        y = torch.randperm(classes, generator=g)[:B]  # distinct, so the pairing shows in y_b
        xm, t_dev = mix(x.to(device), y.to(device))
        assert xm.device.type == device and t_dev.y_b.device.type == device
        t = to_device(t_dev, "cpu")
        perm = flip_perm(B) if mode != "pair" else None
        if perm is not None:  # timm pairs by flip: y_b is y.flip(0)
            assert torch.equal(t.y_b, y.flip(0))
        else:
            assert torch.equal(t.y_b, y[_perm_of(t, y)])
        logits = torch.randn(B, classes, generator=g, dtype=torch.float64).float()
        ours = loss_fn(logits.to(device), t_dev)
        theirs = _timm_soft_ce(logits, t.y_a, t.y_b, t.lam, classes, eps)
        torch.testing.assert_close(ours.cpu().double(), theirs, atol=1e-5, rtol=1e-5)
        if alphas[1] == 0.0:  # mixup only: the batch is lam * x + (1 - lam) * x[perm]
            p = flip_perm(B) if mode != "pair" else _perm_of(t, y)
            _assert_close(xm, _plain(x, p, t.lam), torch.float32)


def _perm_of(t, y):
    """Recovers the pairing from y_b (the test's labels are distinct)."""
    return torch.tensor([int((y == v).nonzero()[0, 0]) for v in t.y_b.tolist()])


def test_mixup_module_pair_mode_is_an_involution():
    mix = Mixup(alpha=1.0, mode="pair", generator=torch.Generator().manual_seed(3))
    for B in (1, 2, 7, 8):
        y = torch.arange(B)
        _, t = mix(torch.randn(B, 4), y)
        perm = t.y_b
        assert torch.equal(perm[perm], y)
        assert int((perm == y).sum()) == B % 2  # odd batch: exactly one sample stays put


def test_mixup_module_reproducible_and_uses_generator():
    x = torch.randn(8, 3, 16, 16)
    y = torch.arange(8)
    outs = []
    for _ in range(2):
        mix = Mixup(alpha=0.4, cutmix_alpha=1.0, mode="elem",
                    generator=torch.Generator().manual_seed(123))
        state = torch.get_rng_state()
        outs.append([mix(x, y) for _ in range(4)])
        assert torch.equal(torch.get_rng_state(), state), "the global RNG must not be used"
    for (xa, ta), (xb, tb) in zip(*outs):
        assert torch.equal(xa, xb) and torch.equal(ta.lam, tb.lam)
    other = Mixup(alpha=0.4, cutmix_alpha=1.0, mode="elem",
                  generator=torch.Generator().manual_seed(124))
    assert not torch.equal(other(x, y)[1].lam, outs[0][0][1].lam)


def test_mixup_module_cutmix_lam_matches_pixels():
    B, H, W = 6, 12, 10
    mix = Mixup(alpha=0.0, cutmix_alpha=1.0, generator=torch.Generator().manual_seed(5))
    x = torch.arange(B, dtype=torch.float32).reshape(B, 1, 1, 1).expand(B, 2, H, W).contiguous()
    for _ in range(5):
        xm, t = mix(x, torch.arange(B))
        # the share of each image's own pixels is lam, boxes clipped to the image
        own = (xm == x).float().mean(dim=(1, 2, 3))
        torch.testing.assert_close(own, torch.full((B,), t.lam), atol=1e-6, rtol=0)


def test_mixup_module_prob_and_eval():
    x, y = torch.randn(4, 3, 5, 5), torch.arange(4)
    mix = Mixup(alpha=1.0, prob=0.0)
    xm, t = mix(x, y)
    assert xm is x and t.lam == 1.0 and torch.equal(t.y_b, y)
    mix = Mixup(alpha=1.0, mode="elem", prob=0.5, generator=torch.Generator().manual_seed(0))
    _, t = mix(x.repeat(8, 1, 1, 1), torch.arange(32))
    assert 0 < int((t.lam == 1).sum()) < 32  # some samples unmixed, some mixed
    mix = Mixup(alpha=1.0).eval()
    xm, t = mix(x, y)
    assert xm is x and t.lam == 1.0


def test_mixup_module_inplace():
    x = torch.randn(6, 3, 5, 5)
    before = x.clone()
    mix = Mixup(alpha=1.0, inplace=True, generator=torch.Generator().manual_seed(0))
    xm, t = mix(x, torch.arange(6))
    assert xm is x
    _assert_close(x, _plain(before, flip_perm(6), t.lam), torch.float32)


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(alpha=0.0, cutmix_alpha=0.0), ValueError, "both 0"),
    (dict(alpha=-1.0), ValueError, "alpha must be >= 0"),
    (dict(alpha=float("nan")), ValueError, "alpha must be a finite number"),
    (dict(prob=1.5), ValueError, "prob must be in"),
    (dict(switch_prob=-0.1), ValueError, "switch_prob must be in"),
    (dict(mode="elementwise"), ValueError, "mode must be one of"),
    (dict(generator=123), TypeError, "torch.Generator"),
])
def test_mixup_module_bad_hyperparameters(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        Mixup(**kw)


def test_mixup_module_cutmix_needs_images():
    with pytest.raises(ValueError, match="cutmix needs a"):
        Mixup(alpha=0.0, cutmix_alpha=1.0)(torch.randn(4, 7), torch.arange(4))


def test_sample_beta_moments():
    s = sample_beta(0.4, (20000,), torch.Generator().manual_seed(0))
    assert 0.0 <= float(s.min()) and float(s.max()) <= 1.0
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1))
    assert abs(float(s.mean()) - 0.5) < 0.01
    assert abs(float(s.var()) - 1 / (4 * 1.8)) < 0.01


def test_mixup_module_cutmix_on_non_images_refused_on_every_call():
    """Refused whatever mixup/cutmix choice is drawn, so a wrong input fails on its first batch."""
    mix = Mixup(alpha=1.0, cutmix_alpha=1.0, generator=torch.Generator().manual_seed(0))
    for _ in range(20):
        with pytest.raises(ValueError, match="cutmix needs a"):
            mix(torch.randn(4, 7), torch.arange(4))


def _recipe_draws(kw, seed, B, H, W, calls):
    """The documented sampling recipe, step by step with the public helpers and tensor ops, from
    a generator seeded like the module's: per call (cut, lam or None when the batch is left
    alone, perm, box or boxes)."""
    g = torch.Generator().manual_seed(seed)
    alpha, cut_alpha = kw.get("alpha", 0.4), kw.get("cutmix_alpha", 0.0)
    prob, mode = kw.get("prob", 1.0), kw.get("mode", "batch")

    def boxes_of(lam):
        ratio = torch.sqrt(1.0 - lam)
        ch, cw = (H * ratio).long(), (W * ratio).long()
        cy = torch.randint(0, H, lam.shape, generator=g)
        cx = torch.randint(0, W, lam.shape, generator=g)
        y0, x0 = cy - ch // 2, cx - cw // 2
        return torch.stack([y0.clamp(0, H), (y0 + ch).clamp(0, H), x0.clamp(0, W),
                            (x0 + cw).clamp(0, W)], dim=-1)

    draws = []
    for _ in range(calls):
        cut = (bool(torch.rand((), generator=g, dtype=torch.float64) < kw.get("switch_prob", 0.5))
               if alpha > 0 and cut_alpha > 0 else cut_alpha > 0)
        a = cut_alpha if cut else alpha
        if mode == "elem":
            lam = sample_beta(a, (B,), g)
            if prob < 1.0:
                keep = torch.rand((B,), generator=g, dtype=torch.float64) < prob
                lam = torch.where(keep, lam, torch.ones_like(lam))
            draws.append((cut, lam, flip_perm(B), boxes_of(lam) if cut else None))
            continue
        if prob < 1.0 and not bool(torch.rand((), generator=g, dtype=torch.float64) < prob):
            draws.append((cut, None, None, None))
            continue
        lam = sample_beta(a, (), g)
        perm = pair_perm(B, g) if mode == "pair" else flip_perm(B)
        draws.append((cut, float(lam), perm, boxes_of(lam).tolist() if cut else None))
    return draws


@pytest.mark.parametrize("kw", [
    dict(alpha=0.4), dict(alpha=0.0, cutmix_alpha=1.0), dict(alpha=0.8, cutmix_alpha=1.0),
    dict(alpha=0.8, cutmix_alpha=1.0, prob=0.6, mode="pair"),
    dict(alpha=0.3, cutmix_alpha=0.7, prob=0.6, mode="elem"),
], ids=str)
def test_mixup_module_draws_follow_the_recipe(backend, device, kw):
    """Eager mode draws exactly what the recipe draws from the generator, call after call, so a
    seed keeps giving the batches it always gave. (On CUDA: the draws, copied to the device
    asynchronously from pinned memory, arrive intact call after call; the batches are compared
    with the ops' results on the same device.)"""
    B, H, W = 7, 9, 11
    x = torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(0)).to(device)
    y = torch.arange(B)
    yd = y.to(device)
    mix = Mixup(generator=torch.Generator().manual_seed(21), **kw)
    for cut, lam, perm, box in _recipe_draws(kw, 21, B, H, W, calls=12):
        xm, t = mix(x, yd)
        if lam is None:  # left alone
            assert xm is x and t.lam == 1.0 and torch.equal(t.y_b.cpu(), y)
            continue
        assert torch.equal(t.y_b.cpu(), y[perm])
        if cut:
            want, want_lam = ft.ops.cutmix(x, perm.to(device), to_device(box, device))
        else:
            want_lam = lam if isinstance(lam, float) else lam.float().to(device)
            want = ft.ops.mixup(x, perm.to(device), want_lam)
        assert torch.equal(xm, want)
        if isinstance(want_lam, float):
            assert type(t.lam) is float and t.lam == want_lam
        else:
            assert t.lam.device == x.device and torch.equal(t.lam, want_lam)


# ---------------------------------------------------------------------------------------------
# the Mixup module under torch.compile

MIX_KINDS = {"mixup": dict(alpha=0.4), "cutmix": dict(alpha=0.0, cutmix_alpha=1.0),
             "both": dict(alpha=0.8, cutmix_alpha=1.0)}


def _step_parts(classes=10, device="cpu"):
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 4 * 5, classes))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(8, 3, 6, 7, generator=g)
    y = torch.randperm(classes, generator=g)[:8]  # distinct, so y_b shows the pairing
    return model.to(device), LabelSmoothingCrossEntropy(0.1), x.to(device), y.to(device)


def _own_share(xm, x):
    """Per sample, the share of elements still x's own (cutmix: lam; random x, no ties)."""
    return (xm == x).double().mean(dim=(1, 2, 3))


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("kind", list(MIX_KINDS))
def test_mixup_module_no_graph_breaks(extension, device, mode, kind, fresh_dynamo):
    model, loss_fn, x, y = _step_parts(device=device)
    for prob, inplace in ((1.0, False), (0.5, True)):
        mix = Mixup(prob=prob, mode=mode, inplace=inplace,
                    generator=torch.Generator().manual_seed(0), **MIX_KINDS[kind])

        def step(x, y):
            xm, t = mix(x, y)
            return loss_fn(model(xm), t)

        explained = torch._dynamo.explain(step)(x.clone(), y)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1


def _compile_cases(cases, reference_subset):
    """(backend, device, *case): every case on the extension on each device, a few on the
    reference on the CPU (compiling is slow; the traced Python is the same and the ops' parity
    is tested above)."""
    out = []
    for device in DEVICES:
        name = device.values[0]
        if "extension" in BACKENDS:
            out += [pytest.param("extension", name, *c, marks=device.marks) for c in cases]
        if name == "cpu":
            out += [pytest.param("reference", name, *c) for c in reference_subset]
    return out


@pytest.mark.parametrize("backend_name,device,mode,kind", _compile_cases(
    [(m, k) for m in ("batch", "pair", "elem") for k in MIX_KINDS],
    [("batch", "mixup"), ("pair", "cutmix"), ("elem", "both")]))
def test_mixup_module_compiled_step(backend_name, device, mode, kind, fresh_dynamo):
    """A compiled fullgraph training step (Mixup, model, loss) runs forward and backward, and
    its batch is the mix its MixedTarget describes."""
    with device_context(device), _backend.use_backend(backend_name):
        _check_compiled_step(mode, kind, device)


def _check_compiled_step(mode, kind, device):
    model, loss_fn, x, y = _step_parts(device=device)
    inplace = mode == "pair"
    mix = Mixup(prob=0.75, mode=mode, inplace=inplace, **MIX_KINDS[kind])

    def step(x, y):
        xm, t = mix(x, y)
        return loss_fn(model(xm), t), xm, t

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    for _ in range(4):
        xin = x.clone()
        loss, xm, t = compiled(xin, y)
        loss.backward()
        assert torch.isfinite(loss)
        assert isinstance(t.lam, torch.Tensor) and t.lam.dtype == torch.float32
        assert t.lam.shape == ((8,) if mode == "elem" else ())
        assert ((t.lam >= 0) & (t.lam <= 1)).all()
        perm = _perm_of(t, y)
        assert torch.equal(perm[perm], torch.arange(8))
        if inplace:
            assert torch.equal(xin, xm)
        lam = t.lam.expand(8)
        assert lam.device == x.device
        cut_ok = torch.allclose(_own_share(xm, x), lam.double(), atol=1e-6, rtol=0)
        mix_ok = torch.allclose(xm, ft.ops.mixup(x, perm.to(device), lam), atol=1e-6, rtol=0)
        assert {"mixup": mix_ok, "cutmix": cut_ok, "both": cut_ok or mix_ok}[kind]
        # the loss is the one of the eager model and loss on that batch and target
        torch.testing.assert_close(loss, loss_fn(model(xm), t))


@pytest.mark.parametrize("backend_name,device,case", _compile_cases(
    [(c,) for c in ("mixup", "cutmix", "both: cutmix drawn", "both: mixup drawn", "pair mixup",
                    "elem mixup", "elem cutmix", "elem both")],
    [("both: mixup drawn",), ("elem both",)]))
def test_mixup_module_compiled_matches_eager(backend_name, device, case, fresh_dynamo):
    """Given the same lam, pairing and boxes, the compiled step's loss and gradients (model and
    input) equal eager mode's fused ops + model + loss."""
    with device_context(device), _backend.use_backend(backend_name):
        _check_compiled_matches_eager(case, device)


def _check_compiled_matches_eager(case, device):
    model, loss_fn, x, y = _step_parts(device=device)
    B, H, W = x.shape[0], x.shape[2], x.shape[3]
    kind = case.split()[-1] if case.startswith("elem") else case.split(":")[0].split()[-1]
    mode = "elem" if case.startswith("elem") else "pair" if case.startswith("pair") else "batch"
    mix = Mixup(mode=mode, **MIX_KINDS[kind])
    g = torch.Generator().manual_seed(5)
    shape = (B,) if mode == "elem" else ()
    perm = pair_perm(B, g) if mode == "pair" else flip_perm(B)
    lam_m = torch.rand(shape, generator=g, dtype=torch.float64) if kind != "cutmix" else None
    boxes = _sample_boxes(B, H, W, seed=3) if mode == "elem" else torch.tensor([1, 5, 2, 6])
    boxes = boxes if kind != "mixup" else None
    use_cut = torch.tensor(case != "both: mixup drawn") if kind == "both" else None
    mix._draw_traced = lambda B, H, W: (perm, use_cut, lam_m, boxes)

    def step(x, y):
        xm, t = mix(x, y)
        return loss_fn(model(xm), t)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xa = x.clone().requires_grad_(True)
    got = compiled(xa, y)
    got.backward()
    got_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    xb = x.clone().requires_grad_(True)
    cut = kind == "cutmix" or case == "both: cutmix drawn" or case == "elem both"
    perm_d = perm.to(device)
    if cut:
        box = boxes.to(device) if mode == "elem" else boxes.tolist()
        xm, lam = ft.ops.cutmix(xb, perm_d, box)
    else:
        lam = lam_m.float().to(device) if mode == "elem" else float(lam_m)
        xm = ft.ops.mixup(xb, perm_d, lam)
    want = loss_fn(model(xm), MixedTarget(y, y[perm_d], lam))
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(xa.grad, xb.grad)
    for a, b in zip(got_grads, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b)


def test_mixup_module_compiled_draws(extension, fresh_dynamo):
    """Under compile the draws come from torch's default generator: repeatable with
    torch.manual_seed, new on every call, and the module's generator is left alone."""
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    mix = Mixup(alpha=1.0, cutmix_alpha=1.0, mode="elem", prob=0.8, generator=g)
    compiled = torch.compile(mix, fullgraph=True, backend="aot_eager")
    x, y = torch.randn(8, 3, 6, 7), torch.arange(8)
    torch.manual_seed(3)
    first = [compiled(x, y) for _ in range(3)]
    torch.manual_seed(3)
    again = [compiled(x, y) for _ in range(3)]
    for (xa, ta), (xb, tb) in zip(first, again):
        assert torch.equal(xa, xb) and torch.equal(ta.lam, tb.lam)
    assert not torch.equal(first[0][1].lam, first[1][1].lam)
    assert torch.equal(g.get_state(), state)


@pytest.mark.slow
def test_mixup_module_compiled_step_inductor(extension, fresh_dynamo):
    """The default compiler: fullgraph, forward and backward, elem mode with both ops and prob."""
    model, loss_fn, x, y = _step_parts()
    mix = Mixup(alpha=0.8, cutmix_alpha=1.0, prob=0.75, mode="elem")

    def step(x, y):
        xm, t = mix(x, y)
        return loss_fn(model(xm), t), xm, t

    compiled = torch.compile(step, fullgraph=True)
    torch.manual_seed(0)
    for _ in range(3):
        loss, xm, t = compiled(x, y)
        loss.backward()
        torch.testing.assert_close(loss, loss_fn(model(xm), t))


# ---------------------------------------------------------------------------------------------
# launch limits, on every device (values, gradients and the in-place form against the CPU
# reference). The CUDA blend walks the samples with the grid's y dimension (at most 65535
# blocks, then each block loops) and the 16-byte vectors of a sample with x (at most 1024
# blocks of 256 threads, then a grid-stride loop); samples that are not 16-byte multiples take
# scalar accesses. Cutmix walks every row of every plane of every sample with y (65535, then a
# loop; NCHW has B * C * H rows, NHWC B * H rows of W * C elements) and the elements of a row
# with x (1024 blocks of 256 threads, then a loop).

MIXUP_LIMITS = {
    "70000 samples of 3": (70000, 3),          # y loops; 12-byte samples: scalar accesses
    "65540 samples of 4": (65540, 4),          # y loops; 16-byte samples: vectors
    "2 samples of 3x600x600": (2, 3, 600, 600),  # x loops: 270000 vectors > 1024 * 256
}


@pytest.mark.parametrize("case", list(MIXUP_LIMITS))
def test_mixup_launch_limits(extension, device, case):
    shape = MIXUP_LIMITS[case]
    B = shape[0]
    g = torch.Generator().manual_seed(0)
    x, grad = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    perm, lam = _random_perm(B), _lam("tensor", B)
    xd = x.to(device, copy=True).requires_grad_(True)
    out = ft.ops.mixup(xd, perm.to(device), lam.to(device))
    out.backward(grad.to(device))  # the backward kernel: the inverse permutation, on the device
    xr = x.clone().requires_grad_(True)
    want = mixup_reference(xr, perm, lam)
    want.backward(grad)
    _assert_close(out.detach(), want.detach(), torch.float32)
    _assert_close(xd.grad, xr.grad, torch.float32)
    xi = x.to(device, copy=True)  # in place: the pairs of a flip, each pair by one thread
    ft.ops.mixup(xi, flip_perm(B).to(device), 0.3, out=xi)
    _assert_close(xi, mixup_reference(x, flip_perm(B), 0.3), torch.float32)


CUTMIX_LIMITS = {
    "66000 rows, NCHW": ((2, 3, 11000, 4), "contiguous"),
    "66000 rows, NHWC": ((2, 2, 33000, 2), "channels_last"),
    "rows of 300000": ((2, 1, 2, 300000), "contiguous"),  # x loops: > 1024 blocks of 256
}


@pytest.mark.parametrize("case", list(CUTMIX_LIMITS))
def test_cutmix_launch_limits(extension, device, case):
    shape, layout = CUTMIX_LIMITS[case]
    B, _, H, W = shape
    x = _make(shape, torch.float32, layout)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    perm = torch.tensor([1, 0])
    boxes = torch.tensor([[H // 10, H - H // 10, 1, W], [H // 2, H, 0, W - 1]])  # overlapping
    xd = _make(shape, torch.float32, layout, device=device).requires_grad_(True)
    out, lam = ft.ops.cutmix(xd, perm.to(device), boxes.to(device))
    out.backward(grad.to(device))
    xr = x.clone().requires_grad_(True)
    want, want_lam = cutmix_reference(xr, perm, boxes)
    want.backward(grad)
    assert torch.equal(out.detach().cpu(), want.detach())
    torch.testing.assert_close(lam.cpu(), want_lam)
    _assert_close(xd.grad, xr.grad, torch.float32)
    box = (H // 4, H - H // 4, 1, W - 1)  # in place: the swap kernel, only the boxes
    xi = _make(shape, torch.float32, layout, device=device)
    ft.ops.cutmix(xi, perm.to(device), box, out=xi)
    assert torch.equal(xi.cpu(), _cut_by_slicing(x, perm, [box] * B))


# Every case above that is a device-side assert on CUDA, as code for its child process (run
# together, the first time one of them is asked for).
CUDA_ASSERTS_PRELUDE = "import test_mixup as T"
CUDA_ASSERTS = {f"mixup: {name}": f"T.call_bad_mixup({name!r}, 'cuda')"
                for name in sorted(MIXUP_DEVICE_SIDE)}
CUDA_ASSERTS.update({f"cutmix: {name}": f"T.call_bad_cutmix({name!r}, 'cuda')"
                     for name in sorted(CUTMIX_DEVICE_SIDE)})
CUDA_ASSERTS.update({
    f"mixup in place: {perm}": f"x = torch.randn(4, 2, 3, device='cuda')\n"
                               f"ft.ops.mixup(x, torch.tensor({perm}, device='cuda'), 0.5, out=x)"
    for perm in ([1, 2, 0, 3], [3, 0, 1, 2])})
CUDA_ASSERTS["cutmix in place: [1, 2, 0]"] = (
    "x = torch.randn(3, 2, 4, 4, device='cuda')\n"
    "ft.ops.cutmix(x, torch.tensor([1, 2, 0], device='cuda'), (0, 2, 0, 2), out=x)")


# ---- a whole CUDA training step never waits for the device (issue 15.2) ------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("alphas", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)],
                         ids=["mixup", "cutmix", "both"])
def test_cuda_training_step_never_syncs(extension, mode, alphas):
    """Mixup -> model -> label-smoothed CE -> LossScaler -> FusedAdamW -> OneCycleLR under
    torch.cuda.set_sync_debug_mode("error"): no op of the step reads the device on the host
    (the perm, lam and box checks run on the device, the CPU draws are copied from pinned
    memory)."""
    from fastcore_train.amp import LossScaler
    from fastcore_train.optim import FusedAdamW
    from fastcore_train.schedules import OneCycleLR

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10)).cuda()
    opt = FusedAdamW(model.parameters(), lr=1e-3, max_grad_norm=1.0)
    sched = OneCycleLR(opt, max_lr=1e-2, total_steps=10)
    scaler = LossScaler()
    mix = Mixup(alpha=alphas[0], cutmix_alpha=alphas[1], mode=mode,
                generator=torch.Generator().manual_seed(0))
    crit = LabelSmoothingCrossEntropy(0.1)
    batches = [(torch.randn(16, 3, 8, 8, device="cuda"),
                torch.randint(0, 10, (16,), device="cuda")) for _ in range(4)]

    def step(x, y):
        xm, t = mix(x, y)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = crit(model(xm).float(), t)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        return loss

    step(*batches[0])  # state, pinned buffers and caches created
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step(x, y) for x, y in batches[1:]]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(v).item() for v in losses)


@pytest.mark.cuda
def test_cuda_bad_perm_is_a_device_assert_without_a_sync(extension):
    """A bad perm on CUDA is caught on the device (no host read); the CPU names the value."""
    x = torch.randn(4, 3, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ft.ops.mixup(x, torch.arange(4, device="cuda"), 0.3)  # a good call does not sync
    finally:
        torch.cuda.set_sync_debug_mode(0)
    with pytest.raises(IndexError, match=r"perm\[0\] = 7 is out of range"):
        ft.ops.mixup(x.cpu(), torch.tensor([7, 1, 2, 3]), 0.3)
