"""Batch mixing for training: mixup and cutmix, consumed by the loss without soft targets.

``Mixup`` samples the mixing parameters (lam, the pairing, the cutmix box) with a
``torch.Generator`` and blends the batch with the fused ops; it returns the mixed batch and a
:class:`~fastcore_train.nn.MixedTarget` that :class:`~fastcore_train.nn.LabelSmoothingCrossEntropy`
turns into the two-target loss ``lam * CE(y_a) + (1 - lam) * CE(y_b)`` (with label smoothing),
so no (B, classes) soft-target tensor is ever built.

Parameter sampling is kept apart from the blend (the ops take lam, perm and box explicitly).

Under ``torch.compile`` (``fullgraph=True`` included) ``Mixup`` takes a traceable path: every
random choice is a tensor op on torch's default CPU generator, and the choices that eager mode
makes with Python ``if`` (mixup or cutmix, mix this batch or not) become tensor arithmetic. See
:class:`Mixup` for what that changes.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch

from fastcore_train import ops
from fastcore_train.nn import MixedTarget

__all__ = ["Mixup", "flip_perm", "pair_perm", "sample_beta"]

_MODES = ("batch", "pair", "elem")


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU-drawn tensor on ``device`` without making the host wait: a plain .to(cuda) of
    pageable memory synchronises with the stream (the previous step's kernels) before it
    returns; from pinned memory the copy is queued like a kernel."""
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def flip_perm(batch: int) -> torch.Tensor:
    """``[B-1, ..., 1, 0]``: pairs sample i with B-1-i (an involution)."""
    return torch.arange(batch - 1, -1, -1)


def pair_perm(batch: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random disjoint pair swaps (an involution); with an odd batch one sample stays put."""
    order = torch.randperm(batch, generator=generator)
    m = batch // 2
    a_b = order[:2 * m]
    perm = torch.arange(batch)
    perm[a_b] = a_b.view(2, m).flip(0).reshape(-1)  # order[i] <-> order[m + i], one write
    return perm


def sample_beta(alpha: float, shape=(), generator: Optional[torch.Generator] = None
                ) -> torch.Tensor:
    """Beta(alpha, alpha) samples (float64, CPU) from two Gamma(alpha) draws of ``generator``.

    ``torch.distributions.Beta`` cannot take a generator; ``X / (X + Y)`` with X, Y ~
    Gamma(alpha) independent is Beta(alpha, alpha)-distributed.
    """
    conc = torch.full(tuple(shape) + (2,), float(alpha), dtype=torch.float64)
    g = torch._standard_gamma(conc, generator=generator)
    total = g.sum(-1)
    # Both draws can underflow to 0 for tiny alpha; the distribution is symmetric about 1/2.
    return torch.where(total > 0, g[..., 0] / total, torch.full_like(total, 0.5))


class Mixup(torch.nn.Module):
    """Mixup / cutmix of a batch: ``(x, y) -> (x_mixed, MixedTarget(y_a, y_b, lam))``.

    Args:
        alpha: mixup lam ~ Beta(alpha, alpha); 0 disables mixup.
        cutmix_alpha: cutmix lam ~ Beta(cutmix_alpha, cutmix_alpha); 0 disables cutmix. Needs
            (B, C, H, W) batches.
        prob: probability of mixing a batch (``mode="elem"``: a sample); the others are returned
            unchanged with ``lam = 1`` and ``y_b = y_a``.
        switch_prob: with both alphas > 0, probability of cutmix rather than mixup for a batch.
        mode: how samples are paired and weighted:
            ``"batch"``: one lam, sample i paired with B-1-i (a flip of the batch);
            ``"pair"``: one lam, random disjoint pairs;
            ``"elem"``: one lam per sample (a (B,) tensor), flip pairing; with cutmix, one box
            per sample. The choice of mixup or cutmix is made per batch in every mode.
        inplace: blend into the input batch instead of a new tensor (no extra memory; the
            pairings above are all involutions, which in-place blending needs). Opt-in: the
            caller's tensor is overwritten, and its version counter bumped as by torch's
            in-place ops, so a backward that saved it raises instead of using mixed values.
        generator: the ``torch.Generator`` (CPU) every random choice is drawn from; ``None``
            uses torch's default generator (so ``torch.manual_seed`` makes runs repeatable).
        mean, std: per-channel statistics on the 0-255 scale (C numbers each, e.g. timm's
            ``IMAGENET_DEFAULT_MEAN`` times 255): the batch is then a uint8 (B, C, H, W) image
            batch as loaded (NCHW or channels_last), normalized ``(x - mean) / std`` and mixed
            in one pass (:func:`ft.ops.normalize_mixup`, :func:`ft.ops.normalize_cutmix`); an
            unmixed batch (``prob``, ``eval()``) is normalized alone. Without them (the default)
            the batch is a float batch, mixed as it is.
        out_dtype: the dtype of the normalized batch with mean/std: torch.float32 (default),
            torch.bfloat16 or torch.float16.

    Cutmix boxes have the area ``(1 - lam) * H * W`` around a uniform centre, clipped to the
    image; lam is then recomputed from the clipped area so the loss weights match the pixels.
    In ``eval()`` mode the batch passes through unmixed, like dropout.

    Under ``torch.compile`` (a graph cannot take a ``torch.Generator``, nor branch on a random
    draw without a graph break):

    - ``generator`` is not used (nor advanced): the draws come from torch's default CPU
      generator, inside the compiled graph, so ``torch.manual_seed`` makes compiled runs
      repeatable, but they are not the draws eager mode makes with the same seed.
    - ``lam`` is a tensor on x's device: 0-d in the batch modes (a float in eager mode), (B,)
      in ``"elem"`` mode as in eager mode. ``LabelSmoothingCrossEntropy`` takes either.
    - A batch left unmixed by ``prob`` is blended with lam = 1 (or cut with an empty box) and
      keeps ``y_b = y[perm]``: the same values and loss as eager mode's untouched batch, except
      that a sample's value is NaN where its partner has an inf or NaN (0 * inf).
    - With both alphas > 0 the batch goes through both fused ops, one of them as the identity
      (an empty box, or lam = 1): one extra pass over the batch (with mean/std, the first op
      normalizes the uint8 batch and the second is the float blend).
    """

    def __init__(self, alpha: float = 0.4, cutmix_alpha: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, mode: str = "batch", inplace: bool = False,
                 generator: Optional[torch.Generator] = None, mean=None, std=None,
                 out_dtype: torch.dtype = torch.float32):
        super().__init__()
        for name, v in (("alpha", alpha), ("cutmix_alpha", cutmix_alpha)):
            if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"Mixup: {name} must be a finite number, got {v!r}")
            if v < 0:
                raise ValueError(f"Mixup: {name} must be >= 0, got {v}")
        if alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("Mixup: alpha and cutmix_alpha are both 0, so nothing would be "
                             "mixed; set alpha > 0 (mixup) and/or cutmix_alpha > 0 (cutmix)")
        for name, v in (("prob", prob), ("switch_prob", switch_prob)):
            if not isinstance(v, numbers.Real) or not 0.0 <= v <= 1.0:
                raise ValueError(f"Mixup: {name} must be in [0, 1], got {v!r}")
        if mode not in _MODES:
            raise ValueError(f"Mixup: mode must be one of {_MODES}, got {mode!r}")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"Mixup: generator must be a torch.Generator, got "
                                f"{type(generator).__name__}")
            if generator.device.type != "cpu":
                raise ValueError(f"Mixup: generator must be a CPU generator (the parameters are "
                                 f"sampled on the CPU), got one on {generator.device}")
        if (mean is None) != (std is None):
            raise ValueError("Mixup: mean and std go together; give both (to normalize a uint8 "
                             "batch) or neither")
        if mean is not None:
            mean, std = _stats("mean", mean), _stats("std", std)
            if mean.shape != std.shape:
                raise ValueError(f"Mixup: mean and std must have the same length, got "
                                 f"{mean.numel()} and {std.numel()}")
            if not bool((std != 0).all()) or not bool(torch.isfinite(std).all()) \
                    or not bool(torch.isfinite(mean).all()):
                raise ValueError("Mixup: mean and std must be finite and std non-zero")
            if inplace:
                raise ValueError("Mixup: inplace=True cannot be combined with mean/std: the "
                                 "normalized batch is a new float tensor, not the uint8 input")
        if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"Mixup: out_dtype must be torch.float32, torch.bfloat16 or "
                             f"torch.float16, got {out_dtype!r}")
        if mean is None and out_dtype != torch.float32:
            # a float batch is blended in its own dtype; a silently ignored out_dtype would
            # leave the user with a batch of another dtype than asked for
            raise ValueError("Mixup: out_dtype applies to uint8 batches normalized with "
                             "mean/std; without them the blend keeps the batch's dtype "
                             "(cast the batch instead)")
        self.mean = mean
        self.std = std
        self.out_dtype = out_dtype
        self._stats_on: dict = {}  # mean/std per device
        self.alpha = float(alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.prob = float(prob)
        self.switch_prob = float(switch_prob)
        self.mode = mode
        self.inplace = bool(inplace)
        self.generator = generator
        # Eager-mode caches, read only by the ops: the Gamma concentrations of each alpha and the
        # flip permutation of each (batch, device). They save tensor creations on every call.
        self._conc: dict = {}
        self._flips: dict = {}

    # -- eager sampling (CPU, from self.generator) ---------------------------------------------
    # The scalar helpers make the same draws, in the same order, as the tensor forms they stand
    # for (noted on each), so a seed gives the same batches as it always has.

    def _uniform(self, shape=()) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, dtype=torch.float64)

    def _coin(self, p: float) -> bool:
        """``bool(self._uniform() < p)``."""
        return torch.rand((), generator=self.generator, dtype=torch.float64).item() < p

    def _use_cutmix(self) -> bool:
        if self.alpha > 0 and self.cutmix_alpha > 0:
            return self._coin(self.switch_prob)
        return self.cutmix_alpha > 0

    def _beta(self, alpha: float) -> float:
        """``float(sample_beta(alpha, (), self.generator))``."""
        conc = self._conc.get(alpha)
        if conc is None:
            conc = self._conc[alpha] = torch.full((2,), alpha, dtype=torch.float64)
        a, b = torch._standard_gamma(conc, generator=self.generator).tolist()
        total = a + b
        return a / total if total > 0 else 0.5

    def _boxes(self, lam: torch.Tensor, H: int, W: int,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(n, 4) int64 boxes (y0, y1, x0, x1) of area ~ (1 - lam) * H * W, clipped."""
        ratio = torch.sqrt(1.0 - lam)
        cut_h = (H * ratio).long()
        cut_w = (W * ratio).long()
        cy = torch.randint(0, H, lam.shape, generator=generator)
        cx = torch.randint(0, W, lam.shape, generator=generator)
        y0 = cy - cut_h // 2
        x0 = cx - cut_w // 2
        return torch.stack([y0.clamp(0, H), (y0 + cut_h).clamp(0, H),
                            x0.clamp(0, W), (x0 + cut_w).clamp(0, W)], dim=-1)

    def _box(self, lam: float, H: int, W: int) -> list:
        """``self._boxes(torch.tensor(lam), H, W, self.generator).tolist()`` (float64 and int64
        arithmetic round and truncate as Python's float and int do)."""
        ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(H * ratio), int(W * ratio)
        cy = int(torch.randint(0, H, (), generator=self.generator))
        cx = int(torch.randint(0, W, (), generator=self.generator))
        y0, x0 = cy - cut_h // 2, cx - cut_w // 2
        return [min(max(y0, 0), H), min(max(y0 + cut_h, 0), H),
                min(max(x0, 0), W), min(max(x0 + cut_w, 0), W)]

    def _perm(self, batch: int, device: torch.device) -> torch.Tensor:
        if self.mode == "pair":
            return _to_device(pair_perm(batch, self.generator), device)
        perm = self._flips.get((batch, device))
        if perm is None:
            if len(self._flips) >= 8:  # a few batch sizes (the last batch) and devices at most
                self._flips.clear()
            perm = self._flips[(batch, device)] = flip_perm(batch).to(device)
        return perm

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, MixedTarget]:
        if not isinstance(x, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise TypeError("Mixup: x and target must be tensors")
        if x.dim() < 1:
            raise ValueError("Mixup: x must have a batch dimension, got a 0-D tensor")
        if target.dim() < 1 or target.shape[0] != x.shape[0]:
            raise ValueError(f"Mixup: target must have x's batch size {x.shape[0]} as its first "
                             f"dimension, got shape {list(target.shape)}")
        B = x.shape[0]
        if self.mean is not None and x.dtype != torch.uint8:
            raise TypeError(f"Mixup: with mean/std the batch must be uint8 images as loaded, "
                            f"got {x.dtype}; for a float batch leave mean and std unset")
        if not self.training or B == 0:
            return self._normalize(x), MixedTarget(target, target, 1.0)
        if self.cutmix_alpha > 0 and x.dim() != 4:
            # refused whatever the draw, so that a wrong input fails on its first batch
            raise ValueError(f"Mixup: cutmix needs a (B, C, H, W) batch, got a {x.dim()}-D one")
        if torch.compiler.is_compiling():
            return self._forward_traced(x, target)
        cut = self._use_cutmix()
        alpha = self.cutmix_alpha if cut else self.alpha
        out = x if self.inplace else None

        if self.mode == "elem":
            lam = sample_beta(alpha, (B,), self.generator)
            if self.prob < 1.0:
                lam = torch.where(self._uniform((B,)) < self.prob, lam, torch.ones_like(lam))
            perm = self._perm(B, x.device)
            if cut:
                boxes = self._boxes(lam, x.shape[2], x.shape[3], self.generator)
                # an unmixed sample (lam == 1) gets an empty box, hence lam 1 again below
                x_mixed, lam_t = self._cutmix(x, perm, _to_device(boxes, x.device), out)
            else:
                lam_t = _to_device(lam.to(torch.float32), x.device)
                x_mixed = self._mixup(x, perm, lam_t, out)
            return x_mixed, MixedTarget(target, _take(target, perm), lam_t)

        if self.prob < 1.0 and not self._coin(self.prob):
            return self._normalize(x), MixedTarget(target, target, 1.0)
        lam = self._beta(alpha)
        perm = self._perm(B, x.device)
        if cut:
            x_mixed, lam = self._cutmix(x, perm, self._box(lam, x.shape[2], x.shape[3]), out)
        else:
            x_mixed = self._mixup(x, perm, lam, out)
        return x_mixed, MixedTarget(target, _take(target, perm), lam)

    def _forward_traced(self, x: torch.Tensor, target: torch.Tensor
                        ) -> Tuple[torch.Tensor, MixedTarget]:
        """The torch.compile path (see the class notes): the parameters are tensors and no Python
        branch depends on a draw."""
        B, device = x.shape[0], x.device
        H, W = (x.shape[2], x.shape[3]) if x.dim() == 4 else (0, 0)
        perm, use_cut, lam_m, boxes = self._draw_traced(B, H, W)
        perm = perm.to(device)
        out = x if self.inplace else None
        x_mixed, lam = x, None
        if boxes is not None:
            if use_cut is not None:
                boxes = torch.where(use_cut, boxes, 0)  # mixup's turn: an empty box
            x_mixed, lam = self._cutmix(x, perm, boxes.expand(B, 4).to(device), out)
            if self.mode != "elem":
                lam = lam[0]
        if lam_m is not None:
            lam_m = lam_m.to(device=device, dtype=torch.float32)
            if use_cut is not None:
                use_cut = use_cut.to(device)
                lam_b = torch.where(use_cut, 1.0, lam_m)  # cutmix's turn: the identity
                x_mixed = ops.mixup(x_mixed, perm, lam_b.expand(B), out=out)
                lam = torch.where(use_cut, lam, lam_m)
            else:
                x_mixed = self._mixup(x, perm, lam_m.expand(B), out)
                lam = lam_m
        return x_mixed, MixedTarget(target, _take(target, perm), lam)

    def _draw_traced(self, B: int, H: int, W: int):
        """The parameters of one call under torch.compile, drawn with tensor ops from torch's
        default CPU generator (a graph cannot take ``self.generator``): the permutation, whether
        cutmix is used (a 0-d bool tensor, or None when only one of the two is enabled), mixup's
        lam and cutmix's boxes (float64 and int64 tensors of shape () or (B,) / (..., 4); None
        when disabled). Samples left unmixed by ``prob`` get lam 1 and an empty box."""
        shape = (B,) if self.mode == "elem" else ()
        mix_on, cut_on = self.alpha > 0, self.cutmix_alpha > 0
        use_cut = (torch.rand((), dtype=torch.float64) < self.switch_prob
                   if mix_on and cut_on else None)
        keep = torch.rand(shape, dtype=torch.float64) < self.prob if self.prob < 1.0 else None

        def lam_of(alpha):
            lam = sample_beta(alpha, shape)
            return lam if keep is None else torch.where(keep, lam, 1.0)

        perm = pair_perm(B) if self.mode == "pair" else flip_perm(B)
        lam_m = lam_of(self.alpha) if mix_on else None
        boxes = self._boxes(lam_of(self.cutmix_alpha), H, W) if cut_on else None
        return perm, use_cut, lam_m, boxes

    # -- the blends: plain, or normalizing a uint8 batch (mean/std) ----------------------------

    def _stats_for(self, device: torch.device):
        stats = self._stats_on.get(device)
        if stats is None:
            stats = self._stats_on[device] = (self.mean.to(device), self.std.to(device))
        return stats

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return x
        mean, std = self._stats_for(x.device)
        return ops.normalize_mixup(x, None, 1.0, mean, std, out_dtype=self.out_dtype)

    def _mixup(self, x, perm, lam, out):
        if self.mean is None:
            return ops.mixup(x, perm, lam, out=out)
        mean, std = self._stats_for(x.device)
        return ops.normalize_mixup(x, perm, lam, mean, std, out_dtype=self.out_dtype)

    def _cutmix(self, x, perm, box, out):
        if self.mean is None:
            return ops.cutmix(x, perm, box, out=out)
        mean, std = self._stats_for(x.device)
        return ops.normalize_cutmix(x, perm, box, mean, std, out_dtype=self.out_dtype)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, cutmix_alpha={self.cutmix_alpha}, prob={self.prob}, "
                f"switch_prob={self.switch_prob}, mode={self.mode!r}, inplace={self.inplace}"
                + ("" if self.mean is None else
                   f", mean={self.mean.tolist()}, std={self.std.tolist()}, "
                   f"out_dtype={self.out_dtype}"))


def _stats(name: str, v) -> torch.Tensor:
    """mean or std as a (C,) float32 CPU tensor."""
    try:
        t = torch.as_tensor(v, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"Mixup: {name} must be a sequence of numbers (one per channel) or a "
                        f"1-D tensor, got {type(v).__name__}") from None
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"Mixup: {name} must hold one number per channel (1-D), got shape "
                         f"{list(t.shape)}")
    return t


def _take(target: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``target[perm]`` (the partner labels), perm moved to target's device when needed."""
    if perm.device != target.device:
        perm = perm.to(target.device)
    return target.index_select(0, perm)
