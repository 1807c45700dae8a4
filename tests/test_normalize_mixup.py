"""Fused uint8 normalize + mixup/cutmix (ft.ops.normalize_mixup, ft.ops.normalize_cutmix):
parity with the eager composition a user writes, ``a = (x.float() - mean) / std`` then
``lam * a + (1 - lam) * a[perm]`` (or the cutmix paste), over layouts, odd shapes, out dtypes
and lam kinds; out=; bad input from both backends; torch.library and torch.compile; the Mixup
module with mean/std. Tests that take ``device`` run on the CPU and, with a GPU, on CUDA."""
import pytest
import torch

import fastcore_train as ft
from fastcore_train import _backend
from fastcore_train.mixup import Mixup, flip_perm
from fastcore_train.nn import LabelSmoothingCrossEntropy

from conftest import BACKENDS, DEVICES, device_context, on_device, to_device

OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(0, 3, 4, 5), (1, 3, 5, 7), (5, 3, 7, 5), (4, 1, 3, 7), (3, 4, 6, 9), (2, 3, 33, 17)]
LAYOUTS = ["contiguous", "channels_last", "batch_slice", "spatial_slice"]
ISAS = ["default", "avx2", "avx512"]


def _images(shape, layout="contiguous", seed=0, device="cpu"):
    """A uint8 batch with every value 0..255 present, the same on every device, in ``layout``."""
    g = torch.Generator().manual_seed(seed)

    def rand(s):
        return torch.randint(0, 256, s, generator=g, dtype=torch.uint8)

    if layout == "batch_slice":  # every other sample of a bigger batch: samples stay dense
        return on_device(rand((2 * shape[0],) + tuple(shape[1:]))[::2], device)
    if layout == "spatial_slice":  # a crop of the last dimension: samples are not dense
        big = rand(tuple(shape[:-1]) + (shape[-1] + 3,))
        return on_device(big[..., 1:shape[-1] + 1], device)
    x = rand(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return on_device(x, device)


def _stats(C, seed=3):
    """timm-like per-channel statistics on the 0-255 scale (not round numbers)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(C, generator=g) * 100 + 80, torch.rand(C, generator=g) * 30 + 50


def _perm(B, seed=1):
    return torch.randperm(B, generator=torch.Generator().manual_seed(seed))


def _eager_norm(x, mean, std):
    """As a user writes it."""
    C = x.shape[1]
    return (x.float() - mean.view(1, C, 1, 1)) / std.view(1, C, 1, 1)


def _eager_mixup(x, perm, lam, mean, std, out_dtype):
    a = _eager_norm(x, mean, std)
    if perm is None:
        return a.to(out_dtype)
    if isinstance(lam, torch.Tensor):
        lam = lam.float().view(-1, 1, 1, 1)
    return (lam * a + (1 - lam) * a[perm]).to(out_dtype)


def _eager_cutmix(x, perm, boxes, mean, std, out_dtype):
    a = _eager_norm(x, mean, std)
    y = a.clone()
    for i in range(x.shape[0]):
        y0, y1, x0, x1 = boxes[i] if isinstance(boxes, torch.Tensor) else boxes
        y[i, :, y0:y1, x0:x1] = a[perm[i], :, y0:y1, x0:x1]
    return y.to(out_dtype)


def _assert_same(actual, expected, device):
    """Bit for bit on the CPU (the kernel does torch's float32 operations). On CUDA the kernel
    does them too (correctly rounded division, no FMA), but the check allows one rounding of
    the output dtype, in case a GPU math library differs."""
    actual = actual.cpu()
    assert actual.dtype == expected.dtype
    if device == "cpu":
        torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    else:
        torch.testing.assert_close(actual, expected, atol=1e-6,
                                   rtol=torch.finfo(actual.dtype).eps)


def _format_of(x):
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _sample_boxes(B, H, W, seed=4):
    g = torch.Generator().manual_seed(seed)
    y0 = torch.randint(0, H + 1, (B,), generator=g)
    x0 = torch.randint(0, W + 1, (B,), generator=g)
    y1 = y0 + (torch.rand(B, generator=g) * (H - y0 + 1)).long().clamp(max=H - y0)
    x1 = x0 + (torch.rand(B, generator=g) * (W - x0 + 1)).long().clamp(max=W - x0)
    return torch.stack([y0, y1, x0, x1], 1)


# ---------------------------------------------------------------------------------------------
# parity

@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("lam_kind", ["float", "tensor", "none"])
def test_normalize_mixup_matches_eager(backend, device, out_dtype, shape, layout, lam_kind):
    x = _images(shape, layout, device=device)
    B, C = shape[0], shape[1]
    mean, std = _stats(C)
    perm = None if lam_kind == "none" else _perm(B)
    lam = torch.rand(B, generator=torch.Generator().manual_seed(2)) if lam_kind == "tensor" else 0.3
    got = ft.ops.normalize_mixup(x, to_device(perm, device), to_device(lam, device),
                                 mean.to(device), std.to(device), out_dtype=out_dtype)
    assert got.device == x.device and got.shape == x.shape and not got.requires_grad
    want = _eager_mixup(x.cpu(), perm, lam, mean, std, out_dtype)
    _assert_same(got, want, device)
    if B > 0:
        assert got.is_contiguous(memory_format=_format_of(x.cpu()))


@pytest.mark.parametrize("lam", [0.0, 1.0, 0.5, 1 / 3])
def test_normalize_mixup_lam_edges(backend, device, lam):
    x = _images((6, 3, 5, 8), device=device)
    mean, std = _stats(3)
    perm = _perm(6)
    got = ft.ops.normalize_mixup(x, perm.to(device), lam, mean.to(device), std.to(device))
    _assert_same(got, _eager_mixup(x.cpu(), perm, lam, mean, std, torch.float32), device)


def test_normalize_mixup_takes_sequences_and_0d_lam(backend, device):
    x = _images((4, 3, 5, 6), device=device)
    mean, std = _stats(3)
    perm = _perm(4)
    got = ft.ops.normalize_mixup(x, perm.to(device), torch.tensor(0.25, device=device),
                                 mean.tolist(), std.tolist())
    _assert_same(got, _eager_mixup(x.cpu(), perm, torch.full((4,), 0.25), mean, std,
                                   torch.float32), device)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("box_kind", ["batch", "per_sample", "empty", "full"])
def test_normalize_cutmix_matches_eager(backend, device, out_dtype, shape, layout, box_kind):
    x = _images(shape, layout, device=device)
    B, C, H, W = shape
    mean, std = _stats(C)
    perm = _perm(B)
    box = {"batch": (1, H - 1, W // 3, W), "empty": (2, 2, 0, W), "full": (0, H, 0, W),
           "per_sample": _sample_boxes(B, H, W)}[box_kind]
    got, lam = ft.ops.normalize_cutmix(x, perm.to(device), to_device(box, device),
                                       mean.to(device), std.to(device), out_dtype=out_dtype)
    want = _eager_cutmix(x.cpu(), perm, box, mean, std, out_dtype)
    _assert_same(got, want, device)
    # lam as ft.ops.cutmix returns it, for the same box
    _, lam_ref = ft.ops.cutmix(torch.zeros(shape), perm, box)
    if isinstance(lam_ref, torch.Tensor):
        torch.testing.assert_close(lam.cpu(), lam_ref, atol=0, rtol=0)
    else:
        assert lam == lam_ref
    if B > 0:
        assert got.is_contiguous(memory_format=_format_of(x.cpu()))


def test_normalize_cutmix_without_perm_normalizes(backend, device):
    x = _images((3, 3, 4, 5), "channels_last", device=device)
    mean, std = _stats(3)
    got, lam = ft.ops.normalize_cutmix(x, None, (0, 2, 0, 2), mean.to(device), std.to(device))
    assert lam == 1.0
    _assert_same(got, _eager_norm(x.cpu(), mean, std), device)


def test_normalize_mixup_extreme_stats(backend, device):
    """Tiny and huge std, negative std, mean beyond 0..255: the same float32 results as eager,
    infinities included."""
    x = _images((3, 4, 5, 6), device=device)
    mean = torch.tensor([0.0, 255.0, -1e3, 3e38])
    std = torch.tensor([1e-30, -2.5, 1e30, 1e-3])
    perm = _perm(3)
    got = ft.ops.normalize_mixup(x, perm.to(device), 0.7, mean.to(device), std.to(device))
    want = _eager_mixup(x.cpu(), perm, 0.7, mean, std, torch.float32)
    torch.testing.assert_close(got.cpu(), want, atol=0, rtol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# out=

@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("out_layout", ["contiguous", "channels_last", "slice"])
@pytest.mark.parametrize("op", ["mixup", "cutmix"])
def test_out(backend, device, x_layout, out_layout, op):
    x = _images((5, 3, 6, 7), x_layout, device=device)
    mean, std = _stats(3)
    perm = _perm(5)
    dt = torch.bfloat16
    if out_layout == "slice":  # samples not dense: written through a temporary
        big = torch.zeros(5, 3, 6, 9, dtype=dt, device=device)
        out = big[..., 1:8]
    else:
        out = torch.zeros(5, 3, 6, 7, dtype=dt, device=device)
        if out_layout == "channels_last":
            out = out.contiguous(memory_format=torch.channels_last)
    v = out._version
    if op == "mixup":
        ret = ft.ops.normalize_mixup(x, perm.to(device), 0.4, mean.to(device), std.to(device),
                                     out_dtype=dt, out=out)
        want = _eager_mixup(x.cpu(), perm, 0.4, mean, std, dt)
    else:
        ret, _ = ft.ops.normalize_cutmix(x, perm.to(device), (1, 4, 2, 6), mean.to(device),
                                         std.to(device), out_dtype=dt, out=out)
        want = _eager_cutmix(x.cpu(), perm, (1, 4, 2, 6), mean, std, dt)
    assert ret is out and out._version > v
    _assert_same(out, want, device)
    if out_layout == "slice":  # the columns around the view are untouched
        assert not big[..., 0].any() and not big[..., 8].any()


def test_out_with_grad_refused_like_torch(backend):
    x = _images((2, 3, 4, 4))
    mean, std = _stats(3)
    out = torch.zeros(2, 3, 4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"normalize_mixup\(\): functions with out=\.\.\. "
                                           "arguments don't support automatic differentiation"):
        ft.ops.normalize_mixup(x, None, 1.0, mean, std, out=out)
    assert out._version == 0


def test_no_autograd(backend):
    """uint8 cannot require grad; mean and std are constants: the result never requires grad."""
    x = _images((2, 3, 4, 4))
    mean, std = _stats(3)
    y = ft.ops.normalize_mixup(x, _perm(2), 0.5, mean.requires_grad_(), std.requires_grad_())
    assert not y.requires_grad and y.grad_fn is None


# ---------------------------------------------------------------------------------------------
# bad input: the same exception type and message from both backends, on every device. Values
# only the device sees on CUDA (perm, a lam tensor, per-sample boxes, mean/std) are device-side
# asserts there, run in a child process. "{x_device}" in a message is x's device.

def _x():
    return torch.randint(0, 256, (4, 3, 5, 6), dtype=torch.uint8)


P = torch.tensor([3, 2, 1, 0])
M, S = torch.tensor([120.0, 110.0, 100.0]), torch.tensor([60.0, 55.0, 50.0])
NM = "normalize_mixup"
NC = "normalize_cutmix"

BAD = {
    # (op, make -> (x, perm, lam_or_box, mean, std), kwargs, exception, message)
    "x float": (NM, lambda: (_x().float(), P, 0.5, M, S), {}, TypeError,
                f"{NM}: x must be uint8 (an image batch as loaded), got torch.float32; a float "
                "batch is mixed by ft.ops.mixup"),
    "x float cutmix": (NC, lambda: (_x().half(), P, (0, 1, 0, 1), M, S), {}, TypeError,
                       f"{NC}: x must be uint8 (an image batch as loaded), got torch.float16; a "
                       "float batch is mixed by ft.ops.cutmix"),
    "x int32": (NM, lambda: (_x().int(), P, 0.5, M, S), {}, TypeError,
                f"{NM}: x must be uint8 (an image batch as loaded), got torch.int32"),
    "x 3-D": (NM, lambda: (_x()[0], P[:3], 0.5, M, S), {}, ValueError,
              f"{NM}: x must be 4-D (B, C, H, W), got 3-D"),
    "x 5-D cutmix": (NC, lambda: (_x()[None], P[:1], (0, 1, 0, 1), M, S), {}, ValueError,
                     f"{NC}: x must be 4-D (B, C, H, W), got 5-D"),
    "out_dtype int": (NM, lambda: (_x(), P, 0.5, M, S), {"out_dtype": torch.int32}, TypeError,
                      f"{NM}: out_dtype must be torch.float32, torch.bfloat16 or torch.float16, "
                      "got torch.int32"),
    "out_dtype float64": (NC, lambda: (_x(), P, (0, 1, 0, 1), M, S),
                          {"out_dtype": torch.float64}, TypeError,
                          f"{NC}: out_dtype must be torch.float32, torch.bfloat16 or "
                          "torch.float16, got torch.float64"),
    "perm int32": (NM, lambda: (_x(), P.int(), 0.5, M, S), {}, TypeError,
                   f"{NM}: perm must be int64 (torch.long), got torch.int32"),
    "perm shape": (NM, lambda: (_x(), P[:3], 0.5, M, S), {}, ValueError,
                   f"{NM}: perm must have shape (4,) to match the batch of x, got [3]"),
    "perm on meta": (NM, lambda: (_x(), P.to("meta"), 0.5, M, S), {}, ValueError,
                     f"{NM}: perm is on meta but x is on {{x_device}}"),
    "perm too large": (NM, lambda: (_x(), torch.tensor([0, 1, 4, 2]), 0.5, M, S), {}, IndexError,
                       f"{NM}: perm[2] = 4 is out of range for a batch of 4"),
    "perm negative": (NC, lambda: (_x(), torch.tensor([0, -1, 2, 3]), (0, 1, 0, 1), M, S), {},
                      IndexError, f"{NC}: perm[1] = -1 is out of range for a batch of 4"),
    "perm repeats": (NM, lambda: (_x(), torch.tensor([0, 2, 2, 1]), 0.5, M, S), {}, ValueError,
                     f"{NM}: perm is not a permutation: 2 appears twice (perm[1] and perm[2])"),
    "lam 1.5": (NM, lambda: (_x(), P, 1.5, M, S), {}, ValueError,
                f"{NM}: lam must be in [0, 1], got 1.5"),
    "lam nan": (NM, lambda: (_x(), P, float("nan"), M, S), {}, ValueError,
                f"{NM}: lam must be in [0, 1], got nan"),
    "lam inf": (NM, lambda: (_x(), P, float("inf"), M, S), {}, ValueError,
                f"{NM}: lam must be in [0, 1], got inf"),
    "lam str": (NM, lambda: (_x(), P, "0.3", M, S), {}, TypeError,
                f"{NM}: lam must be a float or a tensor, got str"),
    "lam int tensor": (NM, lambda: (_x(), P, torch.tensor([1, 0, 1, 0]), M, S), {}, TypeError,
                       f"{NM}: lam must be a float tensor, got torch.int64"),
    "lam shape": (NM, lambda: (_x(), P, torch.rand(3), M, S), {}, ValueError,
                  f"{NM}: lam must have shape (4,) to match the batch of x, got [3]"),
    "lam tensor 2": (NM, lambda: (_x(), P, torch.tensor([0.5, 0.2, 2.0, 0.1]), M, S), {},
                     ValueError, f"{NM}: lam must be in [0, 1], got 2 (row 2)"),
    "lam tensor nan": (NM, lambda: (_x(), P, torch.tensor([0.5, float("nan"), 0.3, 0.1]), M, S),
                       {}, ValueError, f"{NM}: lam must be in [0, 1], got nan (row 1)"),
    "mean float64": (NM, lambda: (_x(), P, 0.5, M.double(), S), {}, TypeError,
                     f"{NM}: mean must be a float32 tensor, got torch.float64"),
    "std int": (NC, lambda: (_x(), P, (0, 1, 0, 1), M, S.long()), {}, TypeError,
                f"{NC}: std must be a float32 tensor, got torch.int64"),
    "mean length": (NM, lambda: (_x(), P, 0.5, M[:2], S), {}, ValueError,
                    f"{NM}: mean must have shape (3,) (one value per channel of x), got [2]"),
    "std 2-D": (NM, lambda: (_x(), P, 0.5, M, S[None]), {}, ValueError,
                f"{NM}: std must have shape (3,) (one value per channel of x), got [1, 3]"),
    "mean on meta": (NM, lambda: (_x(), P, 0.5, M.to("meta"), S), {}, ValueError,
                     f"{NM}: mean is on meta but x is on {{x_device}}"),
    "mean list too short": (NM, lambda: (_x(), P, 0.5, [1.0, 2.0], S), {}, ValueError,
                            f"{NM}: mean must have shape (3,) (one value per channel of x), "
                            "got [2]"),
    "std None": (NM, lambda: (_x(), P, 0.5, M, None), {}, TypeError,
                 f"{NM}: std must be a float32 tensor or a sequence of numbers, got NoneType"),
    "std zero": (NM, lambda: (_x(), P, 0.5, M, torch.tensor([60.0, 0.0, 50.0])), {}, ValueError,
                 f"{NM}: std[1] = 0; std must be finite and non-zero"),
    "std zero, no perm": (NM, lambda: (_x(), None, 1.0, M, torch.tensor([0.0, 1.0, 1.0])), {},
                          ValueError, f"{NM}: std[0] = 0; std must be finite and non-zero"),
    "std inf": (NC, lambda: (_x(), P, (0, 1, 0, 1), M, torch.tensor([60.0, 1.0, float("inf")])),
                {}, ValueError, f"{NC}: std[2] = inf; std must be finite and non-zero"),
    "mean nan": (NM, lambda: (_x(), P, 0.5, torch.tensor([1.0, float("nan"), 2.0]), S), {},
                 ValueError, f"{NM}: mean[1] = nan is not finite"),
    "box 3 values": (NC, lambda: (_x(), P, (0, 1, 0), M, S), {}, ValueError,
                     f"{NC}: box must be 4 ints (y0, y1, x0, x1), got 3"),
    "box float": (NC, lambda: (_x(), P, (0, 1.0, 0, 1), M, S), {}, TypeError,
                  f"{NC}: box values must be integers (pixel indices), got y1 = 1.0 (float)"),
    "box outside": (NC, lambda: (_x(), P, (0, 6, 0, 1), M, S), {}, ValueError,
                    f"{NC}: box (y0, y1, x0, x1) = (0, 6, 0, 1) is outside the 5x6 image "
                    "(need 0 <= y0 <= y1 <= 5 and 0 <= x0 <= x1 <= 6)"),
    "box reversed": (NC, lambda: (_x(), P, (0, 1, 4, 2), M, S), {}, ValueError,
                     f"{NC}: box (y0, y1, x0, x1) = (0, 1, 4, 2) is outside the 5x6 image "
                     "(need 0 <= y0 <= y1 <= 5 and 0 <= x0 <= x1 <= 6)"),
    "boxes float": (NC, lambda: (_x(), P, torch.zeros(4, 4), M, S), {}, TypeError,
                    f"{NC}: boxes must be an integer tensor, got torch.float32"),
    "boxes shape": (NC, lambda: (_x(), P, torch.zeros(4, 3, dtype=torch.long), M, S), {},
                    ValueError, f"{NC}: boxes must have shape (4, 4), got [4, 3]"),
    "boxes outside": (NC, lambda: (_x(), P, torch.tensor([[0, 1, 0, 1]] * 3 + [[0, 1, 0, 7]]),
                                   M, S), {}, ValueError,
                      f"{NC}: box of sample 3 (y0, y1, x0, x1) = (0, 1, 0, 7) is outside the 5x6 "
                      "image (need 0 <= y0 <= y1 <= 5 and 0 <= x0 <= x1 <= 6)"),
    "out shape": (NM, lambda: (_x(), P, 0.5, M, S), {"out": torch.empty(4, 3, 5)}, ValueError,
                  f"{NM}: out must have the shape of x, [4, 3, 5, 6], got [4, 3, 5]"),
    "out dtype": (NM, lambda: (_x(), P, 0.5, M, S),
                  {"out": torch.empty(4, 3, 5, 6, dtype=torch.float16)}, TypeError,
                  f"{NM}: out must have dtype torch.float32 (out_dtype), got torch.float16"),
    "out dtype cutmix": (NC, lambda: (_x(), P, (0, 1, 0, 1), M, S),
                         {"out": torch.empty(4, 3, 5, 6), "out_dtype": torch.bfloat16},
                         TypeError, f"{NC}: out must have dtype torch.bfloat16 (out_dtype), "
                                    "got torch.float32"),
    "out on meta": (NM, lambda: (_x(), P, 0.5, M, S),
                    {"out": torch.empty(4, 3, 5, 6, device="meta")}, ValueError,
                    f"{NM}: out is on meta but x is on {{x_device}}"),
    "out list": (NM, lambda: (_x(), P, 0.5, M, S), {"out": [1.0]}, TypeError,
                 f"{NM}: out must be a tensor, got list"),
    "out aliases x": (NM, lambda: (_x(), P, 0.5, M, S), {"out": "x"}, ValueError,
                      f"{NM}: out overlaps x; pass a tensor that shares no memory with x"),
    "out aliases x, cutmix": (NC, lambda: (_x(), P, (0, 1, 0, 1), M, S), {"out": "x"},
                              ValueError, f"{NC}: out overlaps x; pass a tensor that shares no "
                                          "memory with x"),
}
DEVICE_SIDE = {"perm too large", "perm negative", "perm repeats", "lam tensor 2",
               "lam tensor nan", "std zero", "std zero, no perm", "std inf", "mean nan",
               "boxes outside"}


def call_bad(name, device):
    """Runs BAD[name] on ``device`` (also the code of the child processes on CUDA)."""
    op, make, kw, _, _ = BAD[name]
    x, perm, arg, mean, std = to_device(make(), device)
    kw = dict(kw)
    if kw.get("out") == "x":  # float32 out over x's memory
        kw["out"] = torch.empty(0, dtype=torch.float32, device=x.device).set_(
            x.untyped_storage(), 0, x.shape, (0, 0, 0, 0))
    else:
        kw = to_device(kw, device)
    fn = ft.ops.normalize_mixup if op == NM else ft.ops.normalize_cutmix
    fn(x, perm, arg, mean, std, **kw)


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(backend, device, device_asserts, name):
    if device == "cuda" and backend == "extension" and name in DEVICE_SIDE:
        device_asserts.expect(CUDA_ASSERTS, name, prelude=CUDA_ASSERTS_PRELUDE)
        return
    _, _, _, exc, msg = BAD[name]
    with pytest.raises(exc) as info:
        call_bad(name, device)
    x_device = str(torch.empty(0, device=device).device)  # "cuda:0", not "cuda"
    assert str(info.value).split("\n")[0] == msg.replace("{x_device}", x_device)


CUDA_ASSERTS_PRELUDE = "import test_normalize_mixup as T"
CUDA_ASSERTS = {name: f"T.call_bad({name!r}, 'cuda')" for name in sorted(DEVICE_SIDE)}


def test_op_checks_direct_call(extension):
    """The compiled ops check what the Python layer checks (a direct torch.ops call)."""
    ops = torch.ops.fastcore_train
    x = _x()
    with pytest.raises(TypeError, match="x must be uint8"):
        ops.normalize_mixup(x.float(), P, None, 0.5, M, S, torch.float32)
    with pytest.raises(ValueError, match=r"std\[1\] = 0; std must be finite and non-zero"):
        ops.normalize_mixup(x, None, None, 1.0, M, torch.tensor([1.0, 0.0, 1.0]), torch.float32)
    with pytest.raises(IndexError, match=r"perm\[2\] = 7 is out of range"):
        ops.normalize_cutmix(x, torch.tensor([0, 1, 7, 2]), None, [0, 1, 0, 1], M, S,
                             torch.float32)
    with pytest.raises(TypeError, match="out_dtype must be"):
        ops.normalize_mixup(x, P, None, 0.5, M, S, torch.int64)
    with pytest.raises(ValueError, match="box must be 4 ints"):
        ops.normalize_cutmix(x, P, None, [0, 1], M, S, torch.float32)


# ---------------------------------------------------------------------------------------------
# torch.library and torch.compile

def test_opcheck(extension, device):
    ops = torch.ops.fastcore_train
    x = _images((6, 3, 5, 4), device=device)
    perm = _perm(6).to(device)
    lam = torch.rand(6, generator=torch.Generator().manual_seed(0)).to(device)
    boxes = _sample_boxes(6, 5, 4).to(device)
    mean, std = to_device(_stats(3), device)
    xl = x.contiguous(memory_format=torch.channels_last)
    for dt in OUT_DTYPES:
        torch.library.opcheck(ops.normalize_mixup.default, (x, perm, None, 0.3, mean, std, dt))
    torch.library.opcheck(ops.normalize_mixup.default, (xl, perm, lam, 0.0, mean, std,
                                                        torch.bfloat16))
    torch.library.opcheck(ops.normalize_mixup.default, (x, None, None, 1.0, mean, std,
                                                        torch.float32))
    torch.library.opcheck(ops.normalize_mixup.out,
                          (x, perm, lam, 0.0, mean, std, torch.float32,
                           torch.empty(x.shape, device=device)))
    torch.library.opcheck(ops.normalize_cutmix.default,
                          (x, perm, None, [1, 3, 0, 2], mean, std, torch.float32))
    torch.library.opcheck(ops.normalize_cutmix.default,
                          (xl, perm, boxes, [], mean, std, torch.float16))
    torch.library.opcheck(ops.normalize_cutmix.out,
                          (x, perm, boxes, [], mean, std, torch.bfloat16,
                           torch.empty(x.shape, dtype=torch.bfloat16, device=device)))


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_torch_compile_fullgraph(extension, device, fresh_dynamo):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 4 * 5, 7)).to(device)
    loss_fn = LabelSmoothingCrossEntropy(0.1)
    mean, std = to_device(_stats(3), device)

    def step(x, y, perm, lam, boxes):
        xm = ft.ops.normalize_mixup(x, perm, lam, mean, std)
        xc, lam_c = ft.ops.normalize_cutmix(x, perm, boxes, mean, std, out_dtype=torch.bfloat16)
        xe = ft.ops.normalize_mixup(x, None, 1.0, mean, std)
        out = torch.empty(x.shape, device=x.device)
        ft.ops.normalize_mixup(x, perm, 0.3, mean, std, out=out)
        loss = loss_fn(model(xm + xc.float() + xe + out), ft.nn.MixedTarget(y, y[perm], lam_c))
        return loss, xm, xc, xe, out

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    x = _images((8, 3, 6, 7))
    y = torch.randint(0, 7, (8,), generator=g)
    perm, lam, boxes = _perm(8), torch.rand(8, generator=g), _sample_boxes(8, 6, 7)
    args = to_device((x, y, perm, lam, boxes), device)
    got = compiled(*args)
    want = step(*args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# every CPU build, and the streaming-store path

def _isa_or_skip(isa):
    C_ = _backend._C
    if ISAS.index(isa) > ISAS.index(C_.best_cpu_capability()):
        pytest.skip(f"CPU lacks {isa}")
    return C_


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_every_cpu_build(extension, isa, layout):
    C_ = _isa_or_skip(isa)
    x = _images((5, 3, 7, 37), layout)  # rows of 37 and 111 elements: vector loops and tails
    x4 = _images((3, 4, 5, 9), layout)
    mean, std = _stats(3)
    m4, s4 = _stats(4)
    perm, lam = _perm(5), torch.rand(5, generator=torch.Generator().manual_seed(0))
    boxes = _sample_boxes(5, 7, 37)
    try:
        C_._set_cpu_capability(isa)
        got = {dt: ft.ops.normalize_mixup(x, perm, lam, mean, std, out_dtype=dt)
               for dt in OUT_DTYPES}
        got_s = ft.ops.normalize_mixup(x, perm, 0.3, mean, std)
        got_n = ft.ops.normalize_mixup(x4, None, 1.0, m4, s4, out_dtype=torch.bfloat16)
        got_c, _ = ft.ops.normalize_cutmix(x, perm, boxes, mean, std, out_dtype=torch.float16)
    finally:
        C_._set_cpu_capability("")
    for dt, y in got.items():
        _assert_same(y, _eager_mixup(x, perm, lam, mean, std, dt), "cpu")
    _assert_same(got_s, _eager_mixup(x, perm, 0.3, mean, std, torch.float32), "cpu")
    _assert_same(got_n, _eager_norm(x4, m4, s4).bfloat16(), "cpu")
    _assert_same(got_c, _eager_cutmix(x, perm, boxes, mean, std, torch.float16), "cpu")


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_output_streaming_stores(extension, isa, out_dtype, layout):
    """Outputs past the last-level cache take the streaming-store path; an out= one element
    off the vector alignment exercises its scalar head."""
    C_ = _isa_or_skip(isa)
    B = 60 if out_dtype == torch.float32 else 120  # > 32 MiB of output
    x = _images((B, 3, 224, 224), layout)
    mean, std = _stats(3)
    perm = _perm(B)
    buf = torch.empty(x.numel() + 1, dtype=out_dtype)
    out = buf[1:].view(x.shape)
    if layout == "channels_last":
        out = buf[1:].view(B, 224, 224, 3).permute(0, 3, 1, 2)
    try:
        C_._set_cpu_capability(isa)
        got = ft.ops.normalize_mixup(x, perm, 0.3, mean, std, out_dtype=out_dtype)
        ft.ops.normalize_mixup(x, perm, 0.3, mean, std, out_dtype=out_dtype, out=out)
        got_c, _ = ft.ops.normalize_cutmix(x, perm, (10, 200, 3, 221), mean, std,
                                           out_dtype=out_dtype)
    finally:
        C_._set_cpu_capability("")
    want = _eager_mixup(x, perm, 0.3, mean, std, out_dtype)
    _assert_same(got, want, "cpu")
    _assert_same(out, want, "cpu")
    _assert_same(got_c, _eager_cutmix(x, perm, (10, 200, 3, 221), mean, std, out_dtype), "cpu")


# ---------------------------------------------------------------------------------------------
# the Mixup module with mean/std

MEAN255 = [0.485 * 255, 0.456 * 255, 0.406 * 255]  # timm's IMAGENET_DEFAULT_MEAN * 255
STD255 = [0.229 * 255, 0.224 * 255, 0.225 * 255]
KINDS = {"mixup": dict(alpha=0.4), "cutmix": dict(alpha=0.0, cutmix_alpha=1.0),
         "both": dict(alpha=0.8, cutmix_alpha=1.0)}


def _timm_normalize(x):
    """timm's loader: x.float().sub_(mean).div_(std) with (1, C, 1, 1) statistics."""
    mean = torch.tensor(MEAN255).view(1, 3, 1, 1).to(x.device)
    std = torch.tensor(STD255).view(1, 3, 1, 1).to(x.device)
    return x.float().sub_(mean).div_(std)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_mixup_module_uint8_equals_normalize_then_mix(backend, device, mode, kind, layout):
    """Mixup(mean, std) on the uint8 batch = timm's normalization followed by Mixup() on the
    float batch, with the same draws (the same generator seed)."""
    fused = Mixup(mode=mode, prob=0.8, mean=MEAN255, std=STD255,
                  generator=torch.Generator().manual_seed(5), **KINDS[kind])
    plain = Mixup(mode=mode, prob=0.8, generator=torch.Generator().manual_seed(5), **KINDS[kind])
    y = torch.arange(6, device=device)
    for step in range(4):
        x = _images((6, 3, 8, 9), layout, seed=step, device=device)
        xm, t = fused(x, y)
        xr, tr = plain(_timm_normalize(x), y)
        assert xm.dtype == torch.float32
        assert xm.is_contiguous(memory_format=_format_of(x.cpu()))
        # mixup's float blend rounds once (an FMA), the fused op as torch's eager (two products)
        torch.testing.assert_close(xm, xr, atol=2e-6, rtol=2e-6)
        assert torch.equal(t.y_b, tr.y_b)
        if isinstance(t.lam, torch.Tensor):
            torch.testing.assert_close(t.lam, tr.lam)
        else:
            assert t.lam == tr.lam


def test_mixup_module_eval_and_dtype(backend, device):
    mix = Mixup(alpha=0.4, mean=MEAN255, std=STD255, out_dtype=torch.bfloat16)
    x = _images((4, 3, 5, 5), "channels_last", device=device)
    y = torch.arange(4, device=device)
    xm, _ = mix(x, y)
    assert xm.dtype == torch.bfloat16
    mix.eval()
    xe, t = mix(x, y)
    assert t.lam == 1.0 and torch.equal(t.y_b, y)
    _assert_same(xe, _eager_norm(x.cpu(), torch.tensor(MEAN255), torch.tensor(STD255))
                 .bfloat16(), device)
    assert "mean=" in repr(mix)


def test_mixup_module_with_stats_refuses(backend):
    x = _images((2, 3, 4, 4))
    with pytest.raises(TypeError, match="with mean/std the batch must be uint8"):
        Mixup(mean=MEAN255, std=STD255)(x.float(), torch.arange(2))
    with pytest.raises(TypeError, match="x must be float32"):  # today's behaviour without stats
        Mixup()(x, torch.arange(2))
    with pytest.raises(ValueError, match="mean and std go together"):
        Mixup(mean=MEAN255)
    with pytest.raises(ValueError, match="inplace=True cannot be combined with mean/std"):
        Mixup(mean=MEAN255, std=STD255, inplace=True)
    with pytest.raises(ValueError, match="finite and std non-zero"):
        Mixup(mean=MEAN255, std=[1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="same length"):
        Mixup(mean=MEAN255, std=[1.0, 2.0])
    with pytest.raises(ValueError, match="out_dtype must be"):
        Mixup(mean=MEAN255, std=STD255, out_dtype=torch.float64)


def _compile_cases():
    out = []
    for device in DEVICES:
        name = device.values[0]
        if "extension" in BACKENDS:
            out += [pytest.param("extension", name, k, marks=device.marks) for k in KINDS]
        if name == "cpu":
            out.append(pytest.param("reference", name, "both"))
    return out


@pytest.mark.parametrize("backend_name,device,kind", _compile_cases())
def test_mixup_module_compiled_fullgraph(backend_name, device, kind, fresh_dynamo):
    """A compiled fullgraph step with Mixup(mean, std) on a uint8 batch: no graph break, and the
    batch is the normalized mix its MixedTarget describes."""
    with device_context(device), _backend.use_backend(backend_name):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                                    torch.nn.Linear(4 * 4 * 5, 6)).to(device)
        loss_fn = LabelSmoothingCrossEntropy(0.1)
        mix = Mixup(mean=MEAN255, std=STD255, **KINDS[kind])

        def step(x, y):
            xm, t = mix(x, y)
            return loss_fn(model(xm), t), xm, t

        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        x = _images((6, 3, 6, 7), device=device)
        y = torch.arange(6, device=device)
        loss, xm, t = compiled(x, y)
        loss.backward()
        assert torch.isfinite(loss) and xm.dtype == torch.float32
        a = _timm_normalize(x)
        perm = flip_perm(6).to(device)
        if kind == "mixup":  # lam * a + (1 - lam) * a[perm]
            torch.testing.assert_close(xm, t.lam * a + (1 - t.lam) * a[perm], atol=1e-5,
                                       rtol=1e-5)
        else:  # every pixel is a's or a[perm]'s (a cut, or a blend with lam 1 or 0)
            own = torch.isclose(xm, a, atol=1e-5) | torch.isclose(xm, a[perm], atol=1e-5)
            if kind == "cutmix":
                assert bool(own.all())


def test_mixup_out_dtype_needs_mean_and_std():
    """out_dtype only applies to uint8 batches normalized in the fused op: without mean/std a
    silently ignored out_dtype would hand back a batch of another dtype than asked for."""
    with pytest.raises(ValueError, match="out_dtype applies to uint8 batches"):
        ft.Mixup(alpha=0.8, out_dtype=torch.bfloat16)
    ft.Mixup(alpha=0.8, out_dtype=torch.float32)  # the default, accepted
    mix = ft.Mixup(alpha=0.8, mean=[1.0, 2.0, 3.0], std=[1.0, 1.0, 1.0], out_dtype=torch.bfloat16)
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    assert mix(x, torch.arange(4))[0].dtype == torch.bfloat16
