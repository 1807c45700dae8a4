"""CutMix paste (Yun et al. 2019, "CutMix: Regularization Strategy to Train Strong Classifiers
with Localizable Features"), fused: the box of x[perm[i]] replaces the same box of x[i].

Definition, for a box (y0, y1, x0, x1) per sample (or one for the batch) of an HxW image::

    out[i, :, h, w] = x[perm[i], :, h, w]   if y0_i <= h < y1_i and x0_i <= w < x1_i
                      x[i, :, h, w]         otherwise
    lam_i = 1 - (y1_i - y0_i) * (x1_i - x0_i) / (H * W)     # the share of x[i] left

Gradient: ``d x[j] = g[j]`` outside box_j, plus ``g[i]`` inside box_i for ``perm[i] = j``.

Out of place, one pass writes every element once, reading it from x[i] or x[perm[i]] (no copy
followed by a paste). In place (``out=x``, ``perm`` an involution), only the box regions of
each pair are read and written.
"""
from __future__ import annotations

import operator
from typing import Optional, Sequence, Tuple, Union

import torch

from fastcore_train import _backend
from fastcore_train.ops.mixup import (_check_blend_inputs, _check_no_grad_out, _check_out,
                                      _fake_like, _same_tensor, call_op, check_perm_values,
                                      memory_format_of)

__all__ = ["cutmix", "cutmix_reference"]

Box = Union[Sequence[int], torch.Tensor]
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_BOX_NAMES = ("y0", "y1", "x0", "x1")


def cutmix(x: torch.Tensor, perm: torch.Tensor, box: Box, *,
           out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Union[float, torch.Tensor]]:
    """Pastes the box region of ``x[perm]`` into ``x``; returns ``(out, lam)``.

    Args:
        x: (B, C, H, W) float32, float16, bfloat16 or float64 (contiguous or channels_last;
            other layouts are copied first). The result has x's memory format.
        perm: (B,) int64 permutation of ``range(B)`` on x's device.
        box: ``(y0, y1, x0, x1)`` for the whole batch, or a (B, 4) integer tensor of per-sample
            boxes on x's device. The values are pixel indices, integers as for slicing
            (a float, NaN or None is a TypeError, never truncated). Boxes must lie in the
            image (``0 <= y0 <= y1 <= H``, ``0 <= x0 <= x1 <= W``); an empty box pastes
            nothing.
        out: where to write the result; ``out=x`` works in place and needs ``perm`` to be an
            involution. As for torch's ``out=``: no autograd (no argument, ``out`` included, may
            require grad with grad mode on), and ``out``'s version counter is bumped.

    Returns:
        The mixed batch and ``lam = 1 - box_area / image_area``: a float for a batch box, a (B,)
        float32 tensor for per-sample boxes. It is the weight of the original label.
    """
    boxes, box_list = _check_args(x, perm, box)
    inplace = out is not None and _same_tensor(out, x)
    if out is not None:
        if not inplace:
            _check_out("cutmix", x, out)
        _check_no_grad_out("cutmix", x, None, out)
    if _backend.use_extension("cutmix", x):
        lam = _lam(x, boxes, box_list)
        ops = torch.ops.fastcore_train
        if out is None:
            return call_op(ops.cutmix.default, x, perm, boxes, box_list), lam
        # the C++ ops bump out's version counter, as torch's out= ops do
        if inplace:
            ops.cutmix_.default(x, perm, boxes, box_list)
        else:
            ops.cutmix.out(x, perm, boxes, box_list, out)
        return out, lam
    return cutmix_reference(x, perm, box, out=out)


def cutmix_reference(x: torch.Tensor, perm: torch.Tensor, box: Box, *,
                     out: Optional[torch.Tensor] = None):
    """The pure-torch definition of :func:`cutmix`: test oracle, fallback, baseline."""
    boxes, box_list = _check_args(x, perm, box)
    inplace = out is not None and _same_tensor(out, x)
    if out is not None and not inplace:
        _check_out("cutmix", x, out)
    if out is not None:
        _check_no_grad_out("cutmix", x, None, out)
    _check_box_values(x, boxes)
    check_perm_values("cutmix", perm, involution=inplace)
    y = _reference(x, perm, boxes, box_list)
    lam = _lam(x, boxes, box_list)
    if out is None:
        return y, lam
    out.copy_(y)  # one write, one version bump, as torch's out= ops
    return out, lam


# ---------------------------------------------------------------------------------------------
# argument checks: the same messages (and exception types) as csrc/common/mixup_checks.h

def _box_message(what: str, b, H: int, W: int, op: str = "cutmix") -> str:
    return (f"{op}: {what} (y0, y1, x0, x1) = ({b[0]}, {b[1]}, {b[2]}, {b[3]}) is outside the "
            f"{H}x{W} image (need 0 <= y0 <= y1 <= {H} and 0 <= x0 <= x1 <= {W})")


def _box_ok(b, H: int, W: int) -> bool:
    return 0 <= b[0] <= b[1] <= H and 0 <= b[2] <= b[3] <= W


def _check_args(x, perm, box):
    """Returns (per-sample boxes tensor or None, batch box as a list of 4 ints or [])."""
    _check_blend_inputs("cutmix", x, perm)
    if x.dim() != 4:
        raise ValueError(f"cutmix: x must be 4-D (B, C, H, W), got {x.dim()}-D")
    return _check_box("cutmix", x, box)


def _check_box(op: str, x, box):
    """A batch box or per-sample boxes of 4-D x, without reading a tensor's values (shared
    with normalize_cutmix). Returns (boxes tensor or None, batch box as 4 ints or [])."""
    B, _, H, W = x.shape
    if isinstance(box, torch.Tensor):
        if box.dtype not in _INT_DTYPES:
            raise TypeError(f"{op}: boxes must be an integer tensor, got {box.dtype}")
        if box.dim() != 2 or box.shape[0] != B or box.shape[1] != 4:
            raise ValueError(f"{op}: boxes must have shape ({B}, 4), got {list(box.shape)}")
        if box.device != x.device:
            raise ValueError(f"{op}: boxes is on {box.device} but x is on {x.device}")
        return box, []
    try:
        box_list = list(box)
    except TypeError:
        raise TypeError(f"{op}: box must be 4 ints (y0, y1, x0, x1) or a (B, 4) integer tensor, "
                        f"got {type(box).__name__}") from None
    if len(box_list) != 4:
        raise ValueError(f"{op}: box must be 4 ints (y0, y1, x0, x1), got {len(box_list)}")
    for k, v in enumerate(box_list):
        # The box values are slice indices (x[..., y0:y1, x0:x1]), and, as for a slice, anything
        # without __index__ (a float, even 2.0, NaN, None) is refused rather than truncated.
        try:
            box_list[k] = operator.index(v)
        except TypeError:
            raise TypeError(f"{op}: box values must be integers (pixel indices), got "
                            f"{_BOX_NAMES[k]} = {v!r} ({type(v).__name__})") from None
    if not _box_ok(box_list, H, W):
        raise ValueError(_box_message("box", box_list, H, W, op))
    return None, box_list


def _check_box_values(x, boxes, op: str = "cutmix") -> None:
    """Per-sample boxes inside the image (syncs on CUDA; skipped while torch.compile traces)."""
    if boxes is None or torch.compiler.is_compiling():
        return
    H, W = x.shape[2], x.shape[3]
    for i, b in enumerate(boxes.detach().cpu().tolist()):
        if not _box_ok(b, H, W):
            raise ValueError(_box_message(f"box of sample {i}", b, H, W, op))


def _lam(x, boxes, box_list):
    H, W = x.shape[2], x.shape[3]
    area = H * W
    if boxes is None:
        y0, y1, x0, x1 = box_list
        return 1.0 - (y1 - y0) * (x1 - x0) / area if area else 1.0
    y0, y1, x0, x1 = boxes.to(torch.int64).unbind(1)  # one op, not four Python indexings
    cut = ((y1 - y0) * (x1 - x0)).to(torch.float32)
    return 1.0 - cut / area if area else torch.ones_like(cut)


# ---------------------------------------------------------------------------------------------
# the reference

def _box_mask(x, boxes, box_list):
    """(B or 1, 1, H, W) bool mask of the pasted region."""
    H, W = x.shape[2], x.shape[3]
    ys = torch.arange(H, device=x.device)
    xs = torch.arange(W, device=x.device)
    if boxes is None:
        y0, y1, x0, x1 = box_list
        my = ((ys >= y0) & (ys < y1))[None, :]
        mx = ((xs >= x0) & (xs < x1))[None, :]
    else:
        b = boxes.to(torch.int64)
        my = (ys[None, :] >= b[:, 0:1]) & (ys[None, :] < b[:, 1:2])
        mx = (xs[None, :] >= b[:, 2:3]) & (xs[None, :] < b[:, 3:4])
    return (my[:, :, None] & mx[:, None, :])[:, None]


def _reference(x, perm, boxes, box_list):
    y = torch.where(_box_mask(x, boxes, box_list), x[perm], x)
    return y.contiguous(memory_format=memory_format_of(x))


# ---------------------------------------------------------------------------------------------
# torch.library registrations (fake kernels and autograd), only when the extension loaded.

def _register():
    def fake_checks(x, perm, boxes):
        torch._check(x.dim() == 4, lambda: "cutmix: x must be 4-D (B, C, H, W)")
        torch._check(perm.dim() == 1 and perm.shape[0] == x.shape[0],
                     lambda: "cutmix: perm must match the batch of x")
        if boxes is not None:
            torch._check(boxes.dim() == 2 and boxes.shape[0] == x.shape[0],
                         lambda: "cutmix: boxes must have shape (B, 4)")

    @torch.library.register_fake("fastcore_train::cutmix")
    def _(x, perm, boxes, box):
        fake_checks(x, perm, boxes)
        return _fake_like(x)

    @torch.library.register_fake("fastcore_train::cutmix.out")
    def _(x, perm, boxes, box, out):
        fake_checks(x, perm, boxes)

    @torch.library.register_fake("fastcore_train::cutmix_")
    def _(x, perm, boxes, box):
        fake_checks(x, perm, boxes)

    @torch.library.register_fake("fastcore_train::cutmix_backward")
    def _(grad, perm, boxes, box):
        fake_checks(grad, perm, boxes)
        return _fake_like(grad)

    def setup_context(ctx, inputs, output):
        x, perm, boxes, box = inputs
        ctx.box = box
        ctx.save_for_backward(perm, boxes)

    def backward(ctx, grad):
        perm, boxes = ctx.saved_tensors
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.fastcore_train.cutmix_backward(grad, perm, boxes, ctx.box)
        return gx, None, None, None

    torch.library.register_autograd("fastcore_train::cutmix", backward,
                                    setup_context=setup_context)


if _backend.extension_loaded():
    try:
        _register()
    except Exception as e:  # pragma: no cover - depends on the torch build
        import warnings
        warnings.warn(f"fastcore_train: could not register cutmix with torch.library: {e}",
                      RuntimeWarning)
