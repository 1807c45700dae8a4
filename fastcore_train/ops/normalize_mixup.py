"""Normalize a uint8 image batch and mix it (mixup or cutmix) in one pass: one read of the
uint8 source and one write of the float result, instead of ``x.float()``, a subtraction, a
division and the blend, each a full pass over a 4x larger tensor.

Definition, for a (B, C, H, W) uint8 batch and per-channel ``mean``/``std`` on the 0-255
scale (timm's ``IMAGENET_DEFAULT_MEAN`` times 255)::

    norm(x)[i, c] = (x[i, c].float() - mean[c]) / std[c]
    normalize_mixup:  out[i] = lam_i * norm(x)[i] + (1 - lam_i) * norm(x)[perm[i]]
    normalize_cutmix: out[i] = norm(x)[perm[i]] inside box_i, norm(x)[i] outside

each in float32, then rounded once to ``out_dtype``: the same values, bit for bit on the CPU,
as the eager composition ``a = (x.float() - mean.view(1, C, 1, 1)) / std.view(1, C, 1, 1)``
followed by ``lam * a + (1 - lam) * a[perm]`` (or the cutmix paste). With ``perm=None`` the
batch is only normalized (the eval path).

The CPU kernel looks norm up in a 256-entry table per channel (computed with those float32
operations, so bit-identical), with mixup's weights folded into two tables: an output element
is ``A[x[i]] + B[x[perm[i]]]``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from fastcore_train import _backend
from fastcore_train.ops.cutmix import _check_box, _check_box_values
from fastcore_train.ops.mixup import (_check_lam, _check_no_grad_out, _check_perm, _overlaps,
                                      call_op, check_perm_values, memory_format_of)

__all__ = ["normalize_mixup", "normalize_cutmix", "normalize_mixup_reference",
           "normalize_cutmix_reference"]

_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

Lam = Union[float, torch.Tensor]
Stats = Union[torch.Tensor, Sequence[float]]
Box = Union[Sequence[int], torch.Tensor]


def normalize_mixup(x: torch.Tensor, perm: Optional[torch.Tensor], lam: Lam, mean: Stats,
                    std: Stats, *, out_dtype: torch.dtype = torch.float32,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``lam * norm(x) + (1 - lam) * norm(x[perm])`` of a uint8 batch, ``norm(v) = (v - mean[c])
    / std[c]``, in one pass.

    Args:
        x: (B, C, H, W) uint8, contiguous or channels_last (a loader's NHWC batch permuted to
            NCHW is channels_last); other layouts are copied first. The result has x's memory
            format. A float batch is refused (TypeError): it is mixed by :func:`ft.ops.mixup`.
        perm: (B,) int64 permutation of ``range(B)`` on x's device, or None to normalize only.
        lam: a float in [0, 1], or a (B,) float tensor of per-sample weights (used in float32).
            Not used when ``perm`` is None (pass 1.0).
        mean, std: the C per-channel statistics on the 0-255 scale: float32 tensors of shape
            (C,) on x's device, or sequences of C numbers. ``std`` must be non-zero, both finite.
        out_dtype: torch.float32, torch.bfloat16 or torch.float16.
        out: where to write the result (shape of x, ``out_dtype``, x's device, no memory shared
            with x). Its version counter is bumped, as by torch's ``out=`` ops.

    Not differentiable: a uint8 batch cannot require grad and the result never does (mean and
    std are taken as constants). Math is float32, rounded once to ``out_dtype``.
    """
    op = "normalize_mixup"
    lam_t, lam_s, mean_t, std_t = _check_mixup(x, perm, lam, mean, std, out_dtype, values=False)
    if out is not None:
        _check_out(op, x, out, out_dtype, lam_t)
    if _backend.use_extension(op, x):
        ops = torch.ops.fastcore_train
        if out is None:
            return call_op(ops.normalize_mixup.default, x, perm, lam_t, lam_s, mean_t, std_t,
                           out_dtype)
        ops.normalize_mixup.out(x, perm, lam_t, lam_s, mean_t, std_t, out_dtype, out)
        return out
    return normalize_mixup_reference(x, perm, lam, mean, std, out_dtype=out_dtype, out=out)


def normalize_cutmix(x: torch.Tensor, perm: Optional[torch.Tensor], box: Box, mean: Stats,
                     std: Stats, *, out_dtype: torch.dtype = torch.float32,
                     out: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, Union[float, torch.Tensor]]:
    """Normalizes a uint8 batch and pastes the box region of ``norm(x[perm])`` into
    ``norm(x)``, in one pass; returns ``(out, lam)`` as :func:`ft.ops.cutmix` does.

    Args:
        x, mean, std, out_dtype, out: as for :func:`normalize_mixup`.
        perm: (B,) int64 permutation of ``range(B)`` on x's device; None normalizes only (the
            box is still checked, and lam is 1.0).
        box: ``(y0, y1, x0, x1)`` for the whole batch, or a (B, 4) integer tensor of per-sample
            boxes on x's device: pixel indices as for slicing, inside the image
            (``0 <= y0 <= y1 <= H``, ``0 <= x0 <= x1 <= W``); see :func:`ft.ops.cutmix`.

    Returns:
        The mixed batch and ``lam = 1 - box_area / image_area`` (a float for a batch box, a (B,)
        float32 tensor for per-sample boxes): the weight of the original label.

    Not differentiable (see :func:`normalize_mixup`).
    """
    op = "normalize_cutmix"
    boxes, box_list, mean_t, std_t = _check_cutmix(x, perm, box, mean, std, out_dtype,
                                                   values=False)
    if out is not None:
        _check_out(op, x, out, out_dtype)
    lam = _cut_lam(x, boxes, box_list, perm is None)
    if perm is None:
        return normalize_mixup(x, None, 1.0, mean_t, std_t, out_dtype=out_dtype, out=out), lam
    if _backend.use_extension(op, x):
        ops = torch.ops.fastcore_train
        if out is None:
            return call_op(ops.normalize_cutmix.default, x, perm, boxes, box_list, mean_t, std_t,
                           out_dtype), lam
        ops.normalize_cutmix.out(x, perm, boxes, box_list, mean_t, std_t, out_dtype, out)
        return out, lam
    return normalize_cutmix_reference(x, perm, box, mean, std, out_dtype=out_dtype, out=out)


def normalize_mixup_reference(x: torch.Tensor, perm: Optional[torch.Tensor], lam: Lam,
                              mean: Stats, std: Stats, *, out_dtype: torch.dtype = torch.float32,
                              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The pure-torch definition of :func:`normalize_mixup`, written as a user writes it: test
    oracle, fallback, baseline."""
    # the metadata and out= first, then the values (which may sync on CUDA), as the wrapper
    # and the compiled op check them
    _check_mixup(x, perm, lam, mean, std, out_dtype, values=False)
    if out is not None:
        _check_out("normalize_mixup", x, out, out_dtype)
    lam_t, lam_s, mean_t, std_t = _check_mixup(x, perm, lam, mean, std, out_dtype, values=True)
    a = _norm(x, mean_t, std_t)
    if perm is None:
        y = a
    elif lam_t is None:
        y = lam_s * a + (1.0 - lam_s) * a[perm]
    else:
        w = lam_t.to(torch.float32).view(-1, 1, 1, 1)
        y = w * a + (1 - w) * a[perm]
    return _finish(x, y, out_dtype, out)


def normalize_cutmix_reference(x: torch.Tensor, perm: Optional[torch.Tensor], box: Box,
                               mean: Stats, std: Stats, *, out_dtype: torch.dtype = torch.float32,
                               out: Optional[torch.Tensor] = None):
    """The pure-torch definition of :func:`normalize_cutmix`: test oracle, fallback, baseline."""
    _check_cutmix(x, perm, box, mean, std, out_dtype, values=False)
    if out is not None:
        _check_out("normalize_cutmix", x, out, out_dtype)
    boxes, box_list, mean_t, std_t = _check_cutmix(x, perm, box, mean, std, out_dtype,
                                                   values=True)
    lam = _cut_lam(x, boxes, box_list, perm is None)
    a = _norm(x, mean_t, std_t)
    if perm is None:
        return _finish(x, a, out_dtype, out), lam
    from fastcore_train.ops.cutmix import _box_mask
    y = torch.where(_box_mask(x, boxes, box_list), a[perm], a)
    return _finish(x, y, out_dtype, out), lam


# ---------------------------------------------------------------------------------------------
# the reference's maths

def _norm(x, mean, std):
    C = x.shape[1]
    return (x.float() - mean.view(1, C, 1, 1)) / std.view(1, C, 1, 1)


def _finish(x, y, out_dtype, out):
    y = y.to(out_dtype).contiguous(memory_format=memory_format_of(x))
    if out is None:
        return y
    out.copy_(y)  # one write, one version bump, as torch's out= ops
    return out


def _cut_lam(x, boxes, box_list, identity: bool):
    if identity:
        return 1.0
    from fastcore_train.ops.cutmix import _lam
    return _lam(x, boxes, box_list)


# ---------------------------------------------------------------------------------------------
# argument checks: the same messages, exception types and order as
# csrc/common/normalize_mixup_checks.h and normalize_mixup_launch.h. values=False checks what
# the compiled op cannot see (Python types) and the metadata; values=True (the reference) also
# reads perm, lam, boxes, mean and std (a sync on CUDA; skipped while torch.compile traces).

def _check_x(op: str, x, out_dtype) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point:
        float_op = "ft.ops.cutmix" if op == "normalize_cutmix" else "ft.ops.mixup"
        raise TypeError(f"{op}: x must be uint8 (an image batch as loaded), got {x.dtype}; a "
                        f"float batch is mixed by {float_op}")
    if x.dtype != torch.uint8:
        raise TypeError(f"{op}: x must be uint8 (an image batch as loaded), got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D (B, C, H, W), got {x.dim()}-D")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be torch.float32, torch.bfloat16 or "
                        f"torch.float16, got {out_dtype}")


def _as_stats(op: str, x, t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.tensor([float(v) for v in t], dtype=torch.float32, device=x.device)
        except (TypeError, ValueError):
            raise TypeError(f"{op}: {name} must be a float32 tensor or a sequence of numbers, "
                            f"got {type(t).__name__}") from None
    C = x.shape[1]
    if t.dtype != torch.float32:
        raise TypeError(f"{op}: {name} must be a float32 tensor, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != C:
        raise ValueError(f"{op}: {name} must have shape ({C},) (one value per channel of x), "
                         f"got {list(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    return t.detach()  # constants: the op is not differentiable


def _check_stats(op: str, x, mean, std, values: bool):
    mean_t = _as_stats(op, x, mean, "mean")
    std_t = _as_stats(op, x, std, "std")
    if values and not torch.compiler.is_compiling() and mean_t.numel() > 0:
        for c, (m, s) in enumerate(zip(mean_t.tolist(), std_t.tolist())):
            if not (abs(m) < float("inf")):
                raise ValueError(f"{op}: mean[{c}] = {m:g} is not finite")
            if not (abs(s) < float("inf")) or s == 0.0:
                raise ValueError(f"{op}: std[{c}] = {s:g}; std must be finite and non-zero")
    return mean_t, std_t


def _check_mixup(x, perm, lam, mean, std, out_dtype, values: bool):
    op = "normalize_mixup"
    _check_x(op, x, out_dtype)
    if perm is not None:
        _check_perm(op, x, perm, none_ok=True)
    lam_t, lam_s = _check_lam(op, x, lam, values)
    mean_t, std_t = _check_stats(op, x, mean, std, values)
    if values and perm is not None:
        check_perm_values(op, perm)
    return lam_t, lam_s, mean_t, std_t


def _check_cutmix(x, perm, box, mean, std, out_dtype, values: bool):
    op = "normalize_cutmix"
    _check_x(op, x, out_dtype)
    if perm is not None:
        _check_perm(op, x, perm, none_ok=True)
    boxes, box_list = _check_box(op, x, box)
    if values:
        _check_box_values(x, boxes, op)
    mean_t, std_t = _check_stats(op, x, mean, std, values)
    if values and perm is not None:
        check_perm_values(op, perm)
    return boxes, box_list, mean_t, std_t


def _check_out(op: str, x, out, out_dtype, lam_t=None) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{op}: out must be a tensor, got {type(out).__name__}")
    _check_no_grad_out(op, x, lam_t, out)
    if out.shape != x.shape:
        raise ValueError(f"{op}: out must have the shape of x, {list(x.shape)}, "
                         f"got {list(out.shape)}")
    if out.dtype != out_dtype:
        raise TypeError(f"{op}: out must have dtype {out_dtype} (out_dtype), got {out.dtype}")
    if out.device != x.device:
        raise ValueError(f"{op}: out is on {out.device} but x is on {x.device}")
    if not torch.compiler.is_compiling() and _overlaps(x, out):
        raise ValueError(f"{op}: out overlaps x; pass a tensor that shares no memory with x")


# ---------------------------------------------------------------------------------------------
# torch.library fake kernels (torch.compile), only when the extension loaded; a failure here
# must never break `import fastcore_train`. No autograd: uint8 x never requires grad.

def _register():
    def fake_new(x, out_dtype):
        torch._check(x.dim() == 4, lambda: "normalize_mixup: x must be 4-D (B, C, H, W)")
        return torch.empty(x.shape, dtype=out_dtype, device=x.device,
                           memory_format=memory_format_of(x))

    def fake_checks(x, perm, mean, std):
        torch._check(x.dim() == 4, lambda: "normalize_mixup: x must be 4-D (B, C, H, W)")
        if perm is not None:
            torch._check(perm.dim() == 1 and perm.shape[0] == x.shape[0],
                         lambda: "normalize_mixup: perm must match the batch of x")
        torch._check(mean.shape == (x.shape[1],) and std.shape == (x.shape[1],),
                     lambda: "normalize_mixup: mean and std must have one value per channel")

    @torch.library.register_fake("fastcore_train::normalize_mixup")
    def _(x, perm, lam, lam_scalar, mean, std, out_dtype):
        fake_checks(x, perm, mean, std)
        return fake_new(x, out_dtype)

    @torch.library.register_fake("fastcore_train::normalize_mixup.out")
    def _(x, perm, lam, lam_scalar, mean, std, out_dtype, out):
        fake_checks(x, perm, mean, std)
        torch._check(out.shape == x.shape, lambda: "normalize_mixup: out must have x's shape")

    @torch.library.register_fake("fastcore_train::normalize_cutmix")
    def _(x, perm, boxes, box, mean, std, out_dtype):
        fake_checks(x, perm, mean, std)
        return fake_new(x, out_dtype)

    @torch.library.register_fake("fastcore_train::normalize_cutmix.out")
    def _(x, perm, boxes, box, mean, std, out_dtype, out):
        fake_checks(x, perm, mean, std)
        torch._check(out.shape == x.shape, lambda: "normalize_cutmix: out must have x's shape")


if _backend.extension_loaded():
    try:
        _register()
    except Exception as e:  # pragma: no cover - depends on the torch build
        import warnings
        warnings.warn(f"fastcore_train: could not register normalize_mixup with torch.library: "
                      f"{e}", RuntimeWarning)
