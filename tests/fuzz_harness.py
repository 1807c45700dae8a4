"""Bad and unusual inputs against torch's own ops (issue 13): run as a script by
tests/test_fuzz.py in a subprocess, so that a crash is a failed test, not a lost run.

Every case runs torch's op (the definition) and ours on both backends, then compares outcomes:

* torch raises  -> ours raises too, with the same exception type unless a documented
  difference (KNOWN) says otherwise, and a message that names our op;
* torch returns -> ours returns values equal to torch's computed in float64 (same NaN/inf
  positions; within twice torch's own error in the input dtype, or the dtype's tolerance);
  unless KNOWN lists it as input we refuse on purpose (then ours must raise, clearly).

Prints one JSON line: cases per family and every mismatch. `--list` prints the case ids.
Before each case its id goes to stderr, so a crash names the case that caused it.
"""
from __future__ import annotations

import itertools
import json
import math
import random
import sys
import traceback

import torch
import torch.nn.functional as F

import fastcore_train as ft
from fastcore_train import _backend

BACKENDS = ["extension", "reference"] if _backend.extension_loaded() else ["reference"]
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# Inputs we refuse on purpose where torch computes something (README: "Not covered"), and the
# exception type we raise there; or a different but clear exception type where torch raises.
KNOWN = {
    "ce.smoothing_negative": "ValueError",     # torch 2.13 accepts label_smoothing < 0
    "ce.smoothing_above_one": "ValueError",    # torch: RuntimeError from its C++ check
    "ce.smoothing_nan": "ValueError",          # torch ignores a NaN label_smoothing
    "ce.target_int": "TypeError",              # torch: RuntimeError "expected ... Long or Byte"
    "ce.target_float": "TypeError",            # probability targets: use target_b/lam
    "ce.batch_mismatch": "ValueError",
    "ce.logits_int": "TypeError",              # torch: NotImplementedError from the kernel
    "mixup.perm_duplicate": "ValueError",      # x[perm] accepts duplicates; a blend needs a perm
    "mixup.perm_negative": "IndexError",       # x[perm] wraps -1 around
    "mixup.perm_int32": "TypeError",
    "mixup.perm_length": "ValueError",         # eager: RuntimeError from broadcasting
    "mixup.lam_outside": "ValueError",         # eager extrapolates
    "mixup.lam_nan": "ValueError",
    "mixup.x_int": "TypeError",                # eager blends ints into floats
    "cutmix.box_outside": "ValueError",       # slicing wraps negatives, clips, empties
    "cutmix.box_none": "TypeError",            # a slice takes None as an open end
    "bce.target_out_of_range": "IndexError",  # torch's scatter of the dense targets: RuntimeError
    "bce.target_int": "TypeError",             # timm's .long() takes any integer (and float) dtype
    "bce.target_float": "TypeError",           # probability targets: pass class indices
    "bce.batch_mismatch": "ValueError",        # torch's scatter: RuntimeError
    "bce.smoothing_above_one": "ValueError",   # the dense targets would go negative
    "bce.lam_outside": "ValueError",           # the blend would extrapolate
    "bce.pos_weight_per_element": "ValueError",  # torch broadcasts a (B, C) weight; ours is per class
    "normmix.x_float": "TypeError",            # eager normalizes any dtype; ours takes uint8
    "normmix.std_zero": "ValueError",          # eager divides by 0 (inf/NaN); ours refuses
    "normmix.stat_nonfinite": "ValueError",    # eager propagates a NaN/inf mean or std
    "normmix.perm_duplicate": "ValueError",    # x[perm] accepts duplicates
    "normmix.perm_negative": "IndexError",     # x[perm] wraps -1 around
    "normmix.perm_int32": "TypeError",
    "normmix.perm_length": "ValueError",       # eager: RuntimeError from broadcasting
    "normmix.lam_outside": "ValueError",       # eager extrapolates
    "normmix.lam_nan": "ValueError",
    "normmix.stats_length": "ValueError",      # eager: RuntimeError from view()
    "optim.lr_str": "TypeError",
    "optim.lr_none": "TypeError",
    "optim.lr_nan": "ValueError",              # torch.optim.SGD accepts a NaN lr (AdamW refuses)
}


def outcome(fn):
    try:
        return ("ok", fn())
    except Exception as e:  # noqa: BLE001 - every exception is an outcome to compare
        return ("raise", e)


def _mask(t):
    return torch.isnan(t), torch.isposinf(t), torch.isneginf(t)


def same_values(ours, truth, native, dtype):
    """ours vs float64 truth: identical non-finite positions, finite values within twice the
    error torch's own op made in `dtype` (native), or the dtype's tolerance."""
    if ours.shape != truth.shape:
        return f"shape {list(ours.shape)} != {list(truth.shape)}"
    # non-finite positions against the truth rounded to ours' dtype: a value beyond float32's
    # range is rightly inf in a float32 result
    truth_r = truth.detach().to(ours.dtype) if ours.is_floating_point() else truth.detach()
    ours, truth = ours.detach().double(), truth.detach().double()
    nat_masks = None
    if native is not None and native.shape == truth.shape and native.is_floating_point():
        nat_masks = _mask(native.detach().double())
    for k, (a, b, what) in enumerate(zip(_mask(ours), _mask(truth_r.double()),
                                         ("NaN", "+inf", "-inf"))):
        # torch's own op in the input dtype overflowing where we do is not our error
        if not torch.equal(a, b) and not (nat_masks is not None and torch.equal(a, nat_masks[k])):
            return f"{what} positions differ"
    fin = torch.isfinite(truth_r.double()) & torch.isfinite(ours)
    if not fin.any():
        return None
    err = (ours[fin] - truth[fin]).abs()
    scale = truth[fin].abs().clamp(min=1.0)
    tol = TOL.get(dtype, 2e-5) * scale
    if native is not None:
        nat = native.detach().double()
        if nat.shape == truth.shape:
            nerr = (nat - truth)[fin].abs()
            tol = torch.maximum(tol, 2 * torch.nan_to_num(nerr, nan=0.0, posinf=0.0))
    bad = err > tol
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        return f"value {ours[fin][i].item():.6g} vs {truth[fin][i].item():.6g}"
    return None


class Harness:
    def __init__(self):
        self.counts, self.mismatches = {}, []

    def case(self, family, case_id, kind, torch_fn, ours_fn, truth_fn=None, dtype=None):
        """kind: the KNOWN keys that apply (a list, a key or ""); *_fn return a tuple of
        tensors (or raise)."""
        print(f"{family}:{case_id}", file=sys.stderr, flush=True)
        self.counts[family] = self.counts.get(family, 0) + 1
        t_kind, t_val = outcome(torch_fn)
        truth = outcome(truth_fn)[1] if (truth_fn is not None and t_kind == "ok") else None
        for backend in BACKENDS:
            with _backend.use_backend(backend):
                o_kind, o_val = outcome(ours_fn)
            problem = self._compare(family, kind, t_kind, t_val, o_kind, o_val, truth, dtype)
            if problem:
                self.mismatches.append({"case": f"{family}:{case_id}", "backend": backend,
                                        "problem": problem})

    @staticmethod
    def _compare(family, kind, t_kind, t_val, o_kind, o_val, truth, dtype):
        kinds = [kind] if isinstance(kind, str) else list(kind)
        known = {KNOWN[k] for k in kinds if k in KNOWN}
        if o_kind == "raise":
            name = type(o_val).__name__
            if not str(o_val).strip():
                return f"{name} without a message"
            same_as_torch = t_kind == "raise" and type(t_val) is type(o_val)
            if not same_as_torch and isinstance(o_val, (AssertionError, AttributeError, NameError,
                                                        KeyError, UnboundLocalError,
                                                        ZeroDivisionError)):
                return f"unclear {name}: {o_val}"
            if t_kind == "ok" and name not in known:
                return f"torch computes a result, ours raises {name}: {o_val}"
            if t_kind == "raise" and name != type(t_val).__name__ and name not in known:
                return (f"torch raises {type(t_val).__name__} ({t_val}), ours {name} "
                        f"({o_val})")
            return None
        if t_kind == "raise":
            return f"torch raises {type(t_val).__name__} ({t_val}), ours returns"
        if known:
            return f"ours computes where it should refuse ({', '.join(kinds)})"
        ref = truth if truth is not None else t_val
        native = t_val if truth is not None else None
        for i, (a, b) in enumerate(zip(o_val, ref)):
            if a is None and b is None:
                continue
            if (a is None) != (b is None):
                return f"output {i}: {'missing' if a is None else 'unexpected'} gradient"
            why = same_values(a, b, native[i] if native is not None else None, dtype)
            if why:
                return f"output {i}: {why}"
        return None


# ---- cross-entropy -----------------------------------------------------------------------------

def _logits(shape, dtype, kind, gen):
    B, C = shape
    z = torch.randn(B, C, generator=gen, dtype=torch.float64) * 3
    if kind == "offset_1e6":
        z += 1e6
    elif kind == "offset_1e30":
        z += 1e30
    elif kind == "max_float" and C > 1:
        z[:, 0] = 3e38
        z[:, -1] = -3e38
    elif kind == "nan_row" and B > 0:
        z[0, C // 2] = float("nan")
    elif kind == "posinf_row" and B > 0:
        z[0, 0] = float("inf")
    elif kind == "neginf_row" and B > 0:
        z[0] = float("-inf")
    elif kind == "masked" and C > 1:
        z[:, ::2] = float("-inf")
    return z.to(dtype)


def ce_family(h: Harness, rng: random.Random):
    gen = torch.Generator().manual_seed(0)
    shapes = [(0, 5), (1, 1), (3, 5), (17, 1000), (4, 2)]
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    values = ["randn", "offset_1e6", "offset_1e30", "max_float", "nan_row", "posinf_row",
              "neginf_row", "masked"]
    targets = ["valid", "ignored", "out_of_range", "negative", "uint8", "int32", "float",
               "batch_mismatch"]
    smoothing = [0.0, 0.1, 1.0, 1.1, -0.1, None, "0.1", float("nan")]
    reductions = ["mean", "sum", "none", "bad"]
    ignore = [-100, 0, 2 ** 70, 3.7]
    combos = list(itertools.product(shapes, dtypes, values))
    for i, (shape, dtype, vals) in enumerate(combos):
        # every shape x dtype x values; the other axes drawn at random, plus the plain form
        draws = [("valid", 0.1, "mean", -100)] + [
            (rng.choice(targets), rng.choice(smoothing), rng.choice(reductions),
             rng.choice(ignore)) for _ in range(3)]
        for j, draw in enumerate(draws):
            tkind, eps, red, ign = draw
            _ce_case(h, f"{i}.{j}", shape, dtype, vals, tkind, eps, red, ign, gen)
    # single axes against a plain input
    for tkind in targets:
        _ce_case(h, f"t.{tkind}", (3, 5), torch.float32, "randn", tkind, 0.1, "mean", -100, gen)
    for k, eps in enumerate(smoothing):
        _ce_case(h, f"s.{k}", (3, 5), torch.float32, "randn", "valid", eps, "mean", -100, gen)
    for k, ign in enumerate(ignore):
        _ce_case(h, f"i.{k}", (3, 5), torch.float32, "randn", "ignored", 0.0, "sum", ign, gen)
    _ce_case(h, "int_logits", (3, 5), torch.int64, "randn", "valid", 0.0, "mean", -100, gen)


def _target(kind, B, C, ign, gen):
    t = torch.randint(0, max(C, 1), (B,), generator=gen)
    if kind == "ignored" and B > 0:
        t[::2] = ign if isinstance(ign, int) and abs(ign) < 2 ** 63 else -100
    elif kind == "out_of_range" and B > 0:
        t[-1] = C
    elif kind == "negative" and B > 0:
        t[-1] = -1
    elif kind == "uint8":
        t = t.clamp(max=255).to(torch.uint8)
    elif kind == "int32":
        t = t.int()
    elif kind == "float":
        t = t.float()
    elif kind == "batch_mismatch":
        t = torch.cat([t, t[:1]]) if B > 0 else torch.zeros(1, dtype=torch.long)
    return t


def _ce_case(h, cid, shape, dtype, vals, tkind, eps, red, ign, gen):
    B, C = shape
    if dtype == torch.int64:
        logits = torch.randint(-3, 3, shape, generator=gen)
    else:
        logits = _logits(shape, dtype, vals, gen)
    target = _target(tkind, B, C, ign, gen)
    kind = []
    if tkind == "float":
        kind.append("ce.target_float")
    if tkind == "batch_mismatch":
        kind.append("ce.batch_mismatch")
    if dtype == torch.int64:
        kind.append("ce.logits_int")
    if isinstance(eps, float) and eps < 0:
        kind.append("ce.smoothing_negative")
    if isinstance(eps, float) and eps > 1:
        kind.append("ce.smoothing_above_one")
    if isinstance(eps, float) and math.isnan(eps):
        kind.append("ce.smoothing_nan")
    if tkind == "int32":
        kind.append("ce.target_int")

    def run(fn, x):
        def go():
            z = x.clone().requires_grad_(x.is_floating_point())
            loss = fn(z, target, label_smoothing=eps, reduction=red, ignore_index=ign)
            if z.requires_grad:
                loss.sum().backward()
            return (loss.detach(), z.grad)
        return go

    truth_x = logits.double() if logits.is_floating_point() else logits
    if truth_x.is_floating_point() and target.dtype in (torch.long, torch.uint8) \
            and target.shape[0] == B and isinstance(ign, int) and abs(ign) < 2 ** 63:
        # documented: an ignored row has loss and gradient 0 whatever its logits (torch's
        # gradient is NaN there when the row holds NaN/inf)
        truth_x = truth_x.masked_fill((target.long() == ign)[:, None], 0.0)
    h.case("cross_entropy", f"{cid}:{list(shape)}:{dtype}:{vals}:{tkind}:{eps}:{red}:{ign}",
           kind, run(F.cross_entropy, logits), run(ft.ops.cross_entropy, logits),
           run(F.cross_entropy, truth_x), dtype)


# ---- binary cross-entropy ----------------------------------------------------------------------

def bce_family(h: Harness, rng: random.Random):
    """ft.ops.binary_cross_entropy against timm's recipe written with torch's ops: dense smoothed
    one-hot targets (scatter, as timm's BinaryCrossEntropy and mixup_target build them), then
    F.binary_cross_entropy_with_logits."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(0, 5), (1, 1), (3, 5), (17, 1000)]
    dtypes = [torch.float32, torch.float64, torch.bfloat16]
    values = ["randn", "offset_1e6", "max_float", "nan_row", "posinf_row", "neginf_row", "masked"]
    targets = ["valid", "out_of_range", "negative", "uint8", "int32", "float", "batch_mismatch"]
    smoothing = [0.0, 0.1, 1.0, 1.1, None]
    reductions = ["mean", "sum", "none", "bad"]
    pws = [None, "per_class", "scalar", "per_element"]
    lams = [None, 0.3, "tensor", 1.5]
    for i, (shape, dtype, vals) in enumerate(itertools.product(shapes, dtypes, values)):
        draws = [("valid", 0.1, "mean", None, 0.3)] + [
            (rng.choice(targets), rng.choice(smoothing), rng.choice(reductions), rng.choice(pws),
             rng.choice(lams))]
        for j, draw in enumerate(draws):
            _bce_case(h, f"{i}.{j}", shape, dtype, vals, *draw, gen)
    for tkind in targets:
        _bce_case(h, f"t.{tkind}", (3, 5), torch.float32, "randn", tkind, 0.1, "mean", None,
                  None, gen)
    for k, pwk in enumerate(pws):
        _bce_case(h, f"w.{k}", (3, 5), torch.float32, "randn", "valid", 0.1, "none", pwk, 0.3,
                  gen)
    for k, lamk in enumerate(lams):
        _bce_case(h, f"l.{k}", (3, 5), torch.float32, "randn", "valid", 0.1, "sum", None, lamk,
                  gen)


def _bce_case(h, cid, shape, dtype, vals, tkind, eps, red, pwk, lamk, gen):
    B, C = shape
    logits = _logits(shape, dtype, vals, gen)
    target = _target(tkind, B, C, -100, gen)
    target_b = lam = None
    if lamk is not None:
        target_b = torch.randint(0, max(C, 1), (B,), generator=gen)
        lam = torch.rand(B, generator=gen) if lamk == "tensor" else lamk
    pw = {None: None, "per_class": torch.rand(C, generator=gen) * 3,
          "scalar": torch.tensor(2.0), "per_element": torch.rand(B, C, generator=gen)}[pwk]
    kind = {"int32": ["bce.target_int"], "float": ["bce.target_float"],
            "batch_mismatch": ["bce.batch_mismatch"]}.get(tkind, [])
    if tkind in ("out_of_range", "negative") and B > 0:
        kind.append("bce.target_out_of_range")
    if isinstance(eps, float) and eps > 1:
        kind.append("bce.smoothing_above_one")
    if isinstance(lam, float) and not 0 <= lam <= 1:
        kind.append("bce.lam_outside")
    if pwk == "per_element":
        kind.append("bce.pos_weight_per_element")

    def timm_recipe(z, target, **kw):
        # the reduction is checked first, as F.binary_cross_entropy_with_logits does before it
        # looks at its inputs (and as ours does)
        torch.nn._reduction.get_enum(kw["reduction"])
        off = eps / C if C else 0.0
        on = 1.0 - eps + off

        def one_hot(t):
            return torch.full((B, C), off, dtype=z.dtype).scatter_(1, t.long().view(-1, 1), on)

        q = one_hot(target)
        if target_b is not None:
            lt = lam[:, None].to(z.dtype) if isinstance(lam, torch.Tensor) else lam
            q = q * lt + one_hot(target_b) * (1 - lt)
        return F.binary_cross_entropy_with_logits(
            z, q, pos_weight=None if pw is None else pw.to(z.dtype), reduction=kw["reduction"])

    def run(fn, x):
        def go():
            z = x.clone().requires_grad_(True)
            kw = dict(reduction=red)
            if fn is not timm_recipe:
                kw.update(label_smoothing=eps, pos_weight=pw, target_b=target_b, lam=lam)
            loss = fn(z, target, **kw)
            loss.sum().backward()
            return (loss.detach(), z.grad)
        return go

    h.case("binary_cross_entropy", f"{cid}:{list(shape)}:{dtype}:{vals}:{tkind}:{eps}:{red}:"
           f"{pwk}:{lamk}", kind, run(timm_recipe, logits),
           run(ft.ops.binary_cross_entropy, logits), run(timm_recipe, logits.double()), dtype)


# ---- mixup ---------------------------------------------------------------------------------------

def mixup_family(h: Harness, rng: random.Random):
    gen = torch.Generator().manual_seed(1)
    shapes = [(0, 3), (1,), (4, 3), (5, 2, 3, 3), (6, 3, 4, 5)]
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    perms = ["flip", "random", "out_of_range", "negative", "duplicate", "int32", "length"]
    lams = [0.3, 0.0, 1.0, -0.1, 1.5, float("nan"), "tensor", "tensor_nan"]
    for i, (shape, dtype) in enumerate(itertools.product(shapes, dtypes)):
        for pk, lk in [("flip", 0.3)] + [(rng.choice(perms), rng.choice(lams))
                                         for _ in range(4)]:
            _mixup_case(h, f"{i}", shape, dtype, pk, lk, gen)
    for pk in perms:
        _mixup_case(h, f"p.{pk}", (4, 3), torch.float32, pk, 0.3, gen)
    for k, lk in enumerate(lams):
        _mixup_case(h, f"l.{k}", (4, 3), torch.float32, "random", lk, gen)
    _mixup_case(h, "x_int", (4, 3), torch.int64, "flip", 0.3, gen)


def _perm(kind, B, gen):
    p = torch.arange(B - 1, -1, -1) if kind != "random" else torch.randperm(B, generator=gen)
    if kind == "out_of_range" and B > 0:
        p[0] = B
    elif kind == "negative" and B > 0:
        p[0] = -1
    elif kind == "duplicate" and B > 1:
        p[1] = p[0]
    elif kind == "int32":
        p = p.int()
    elif kind == "length":
        p = torch.arange(B + 1)
    return p


def _mixup_case(h, cid, shape, dtype, pk, lk, gen):
    B = shape[0]
    x = (torch.randn(shape, generator=gen) if dtype != torch.int64
         else torch.randint(0, 5, shape, generator=gen)).to(dtype)
    perm = _perm(pk, B, gen)
    if lk == "tensor":
        lam = torch.rand(B, generator=gen)
    elif lk == "tensor_nan":
        lam = torch.rand(B, generator=gen)
        if B:
            lam[0] = float("nan")
    else:
        lam = lk
    kind = []
    if dtype == torch.int64:
        kind.append("mixup.x_int")
    if pk == "duplicate" and B > 1:
        kind.append("mixup.perm_duplicate")
    if pk == "negative" and B > 0:
        kind.append("mixup.perm_negative")
    if pk == "int32":
        kind.append("mixup.perm_int32")
    if pk == "length":
        kind.append("mixup.perm_length")
    if (isinstance(lam, float) and math.isnan(lam)) or (lk == "tensor_nan" and B > 0):
        kind.append("mixup.lam_nan")
    elif isinstance(lam, float) and not 0 <= lam <= 1:
        kind.append("mixup.lam_outside")

    def eager(xx):
        def go():
            lt = lam.reshape((-1,) + (1,) * (xx.dim() - 1)).double() \
                if isinstance(lam, torch.Tensor) else lam
            return ((lt * xx.double() + (1 - lt) * xx.double()[perm]),)
        return go

    def ours():
        return (ft.ops.mixup(x, perm, lam),)

    def native():  # eager in x's dtype: torch's own rounding, for the tolerance
        lt = lam.reshape((-1,) + (1,) * (x.dim() - 1)) if isinstance(lam, torch.Tensor) else lam
        return ((lt * x + (1 - lt) * x[perm]),)

    h.case("mixup", f"{cid}:{list(shape)}:{dtype}:{pk}:{lk}", kind, native, ours, eager(x),
           dtype)


# ---- optimizers ----------------------------------------------------------------------------------

def optim_family(h: Harness, rng: random.Random):
    values = {
        "lr": [1e-3, 0.0, -1.0, float("nan"), "0.01", None, "tensor"],
        "weight_decay": [0.0, 0.1, -1.0],
        "eps": [1e-8, 0.0, -1.0],
        "betas": [(0.9, 0.999), (1.5, 0.9), (0.9, -0.1), (0.0, 0.0)],
        "momentum": [0.0, 0.9, -1.0],
        "dampening": [0.0, 0.5],
        "nesterov": [False, True],
        "maximize": [False, True],
        "amsgrad": [False, True],
        "foreach": [None, False],
    }
    adam_keys = ["lr", "weight_decay", "eps", "betas", "maximize", "amsgrad", "foreach"]
    sgd_keys = ["lr", "weight_decay", "momentum", "dampening", "nesterov", "maximize", "foreach"]
    for name, tcls, ocls, keys in (("AdamW", torch.optim.AdamW, ft.optim.FusedAdamW, adam_keys),
                                   ("SGD", torch.optim.SGD, ft.optim.FusedSGD, sgd_keys)):
        for key in keys:  # one argument at a time
            for v in values[key]:
                _optim_case(h, name, tcls, ocls, {key: v})
        for k in range(60):  # random combinations
            kw = {key: rng.choice(values[key]) for key in keys if rng.random() < 0.5}
            _optim_case(h, name, tcls, ocls, kw, f"r{k}")


def _optim_case(h, name, tcls, ocls, kw, tag=""):
    kw = dict(kw)
    if kw.get("lr") == "tensor":
        kw["lr"] = "T"
    kind = []
    if kw.get("lr") == "0.01":
        kind.append("optim.lr_str")
    if "lr" in kw and kw["lr"] is None:
        kind.append("optim.lr_none")
    if isinstance(kw.get("lr"), float) and math.isnan(kw["lr"]):
        kind.append("optim.lr_nan")

    def run(cls):
        def go():
            torch.manual_seed(0)
            model = torch.nn.Linear(5, 3)
            args = {k: (torch.tensor(1e-3) if v == "T" else v) for k, v in kw.items()}
            args.setdefault("lr", 1e-2)
            opt = cls(model.parameters(), **args)
            g = torch.Generator().manual_seed(1)
            for _ in range(3):
                opt.zero_grad()
                model(torch.randn(4, 5, generator=g)).square().mean().backward()
                opt.step()
            return tuple(p.detach().clone() for p in model.parameters())
        return go

    h.case("optim", f"{name}{tag}:{kw}", kind, run(tcls), run(ocls), None, torch.float32)


# ---- cutmix ---------------------------------------------------------------------------------------

def cutmix_family(h: Harness, rng: random.Random):
    gen = torch.Generator().manual_seed(2)
    shapes = [(1, 1, 4, 4), (4, 3, 8, 8), (5, 2, 6, 9)]
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    layouts = ["nchw", "channels_last"]
    boxes = ["valid", "empty", "full", "negative", "reversed", "beyond", "float", "nan", "none",
             "numpy_int", "tensor_int", "short"]
    for i, (shape, dtype, layout) in enumerate(itertools.product(shapes, dtypes, layouts)):
        for bk in ["valid"] + [rng.choice(boxes) for _ in range(4)]:
            _cutmix_case(h, f"{i}", shape, dtype, layout, bk, gen)
    for bk in boxes:
        _cutmix_case(h, f"b.{bk}", (4, 3, 8, 8), torch.float32, "nchw", bk, gen)


def _box(kind, H, W):
    import numpy as np
    return {"valid": (1, H - 1, 2, W - 1), "empty": (2, 2, 3, 3), "full": (0, H, 0, W),
            "negative": (-1, 2, 0, 2), "reversed": (3, 1, 0, 2), "beyond": (0, H + 2, 0, W),
            "float": (1.0, 2.5, 0, 2), "nan": (float("nan"), 2, 0, 2), "none": (None, 2, 0, 2),
            "numpy_int": (np.int64(1), np.int32(3), 0, 2),
            "tensor_int": (torch.tensor(1), torch.tensor(3), 0, 2), "short": (1, 2, 3)}[kind]


def _cutmix_case(h, cid, shape, dtype, layout, bk, gen):
    B, C, H, W = shape
    x = torch.randn(shape, generator=gen).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    perm = torch.randperm(B, generator=gen)
    box = _box(bk, H, W)
    # slicing accepts what we refuse on purpose: wrap-around negatives, reversed/empty-by-order
    # ranges, ends past the image (clipped), None (an open end)
    kind = {"negative": ["cutmix.box_outside"], "reversed": ["cutmix.box_outside"],
            "beyond": ["cutmix.box_outside"], "none": ["cutmix.box_none"]}.get(bk, [])

    def paste(xx):
        def go():
            y0, y1, x0, x1 = box
            out = xx.clone()
            out[:, :, y0:y1, x0:x1] = xx[perm][:, :, y0:y1, x0:x1]
            return (out,)
        return go

    h.case("cutmix", f"{cid}:{list(shape)}:{dtype}:{layout}:{bk}", kind, paste(x),
           lambda: (ft.ops.cutmix(x, perm, box)[0],), paste(x.double()), dtype)


# ---- normalize + mixup of a uint8 batch ------------------------------------------------------------

def normalize_mixup_family(h: Harness, rng: random.Random):
    """ft.ops.normalize_mixup against the eager composition (x.float() - mean) / std, then
    lam * a + (1 - lam) * a[perm], cast to out_dtype."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(1, 1, 3, 3), (4, 3, 5, 7), (5, 4, 6, 9), (3, 3, 17, 33)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    layouts = ["nchw", "channels_last"]
    perms = ["valid", "none", "duplicate", "negative", "int32", "length"]
    lams = ["float", "tensor", "zero", "one", "outside", "nan"]
    stats = ["imagenet", "unit", "std_zero", "std_negative", "mean_nan", "std_inf", "short",
             "x_float"]
    for i, (shape, dtype, layout) in enumerate(itertools.product(shapes, dtypes, layouts)):
        for _ in range(5):
            pk = rng.choice(perms) if rng.random() < 0.4 else "valid"
            lk = rng.choice(lams)
            sk = rng.choice(stats) if rng.random() < 0.4 else "imagenet"
            _normmix_case(h, f"{i}", shape, dtype, layout, pk, lk, sk, gen)
    for pk in perms:
        _normmix_case(h, f"p.{pk}", (4, 3, 5, 7), torch.float32, "nchw", pk, "float", "imagenet",
                      gen)
    for lk in lams:
        _normmix_case(h, f"l.{lk}", (4, 3, 5, 7), torch.float32, "nchw", "valid", lk, "imagenet",
                      gen)
    for sk in stats:
        _normmix_case(h, f"s.{sk}", (4, 3, 5, 7), torch.float32, "nchw", "valid", "float", sk,
                      gen)


def _normmix_case(h, cid, shape, dtype, layout, pk, lk, sk, gen):
    B, C, H, W = shape
    x = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    if sk == "x_float":
        x = x.float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    perm = {"valid": torch.randperm(B, generator=gen), "none": None,
            "duplicate": torch.zeros(B, dtype=torch.long),
            "negative": torch.arange(B) - 1, "int32": torch.randperm(B, generator=gen).int(),
            "length": torch.arange(B + 1) % B}[pk]
    if pk == "duplicate" and B == 1:
        perm = torch.tensor([0, 0])[:1]  # a single sample cannot repeat: a valid perm
    if pk == "negative" and B == 1:
        perm = torch.tensor([-1])
    lam = {"float": 0.3, "tensor": torch.rand(B, generator=gen), "zero": 0.0, "one": 1.0,
           "outside": 1.5, "nan": float("nan")}[lk]
    mean = torch.rand(C, generator=gen) * 100 + 80
    std = torch.rand(C, generator=gen) * 30 + 40
    if sk == "unit":
        mean, std = torch.zeros(C), torch.ones(C)
    elif sk == "std_zero":
        std[0] = 0.0
    elif sk == "std_negative":
        std = -std
    elif sk == "mean_nan":
        mean[-1] = float("nan")
    elif sk == "std_inf":
        std[0] = float("inf")
    elif sk == "short":
        mean, std = mean[:-1], std[:-1]
    kind = []
    if sk == "x_float":
        kind.append("normmix.x_float")
    if sk == "std_zero":
        kind.append("normmix.std_zero")
    if sk in ("mean_nan", "std_inf"):
        kind.append("normmix.stat_nonfinite")
    if sk == "short":
        kind.append("normmix.stats_length")
    if perm is not None:
        kind += {"duplicate": ["normmix.perm_duplicate"] if B > 1 else [],
                 "negative": ["normmix.perm_negative"], "int32": ["normmix.perm_int32"],
                 "length": ["normmix.perm_length"]}.get(pk, [])
    # (checked with perm=None too, where eager never uses lam)
    kind += {"outside": ["normmix.lam_outside"], "nan": ["normmix.lam_nan"]}.get(lk, [])

    def eager(acc):
        def go():
            a = (x.to(acc) - mean.to(acc).view(1, -1, 1, 1)) / std.to(acc).view(1, -1, 1, 1)
            if perm is None:
                return (a.to(dtype),)
            w = lam.to(acc).view(-1, 1, 1, 1) if isinstance(lam, torch.Tensor) else lam
            return ((w * a + (1 - w) * a[perm]).to(dtype),)
        return go

    h.case("normalize_mixup", f"{cid}:{list(shape)}:{dtype}:{layout}:{pk}:{lk}:{sk}", kind,
           eager(torch.float32),
           lambda: (ft.ops.normalize_mixup(x, perm, lam, mean, std, out_dtype=dtype),),
           eager(torch.float64), dtype)


# ---- the loss scaler -------------------------------------------------------------------------------

def scaler_family(h: Harness, rng: random.Random):
    from fastcore_train.amp import LossScaler
    values = {"init_scale": [2.0 ** 16, 1.0, 0.0, -1.0, float("nan"), "x"],
              "growth_factor": [2.0, 1.0, 0.5, -1.0],
              "backoff_factor": [0.5, 1.0, 2.0, 0.0],
              "growth_interval": [2000, 1, 0, -1, 1.5],
              "enabled": [True, False]}
    cases = [{k: v} for k, vs in values.items() for v in vs]
    cases += [{k: rng.choice(vs) for k, vs in values.items() if rng.random() < 0.5}
              for _ in range(40)]
    for k, kw in enumerate(cases):
        def run(make, kw=kw):
            def go():
                torch.manual_seed(0)
                model = torch.nn.Linear(4, 2)
                opt = torch.optim.SGD(model.parameters(), lr=0.1)
                scaler = make(**kw)
                for step in range(3):
                    opt.zero_grad()
                    loss = model(torch.randn(3, 4)).square().mean()
                    scaler.scale(loss).backward()
                    if step == 1:
                        model.weight.grad[0, 0] = float("inf")
                    scaler.step(opt)
                    scaler.update()
                return tuple(p.detach().clone() for p in model.parameters()) + (
                    torch.tensor(float(scaler.get_scale())),)
            return go
        h.case("scaler", f"{k}:{kw}", [], run(lambda **a: torch.amp.GradScaler("cpu", **a)),
               run(LossScaler), None, torch.float32)


FAMILIES = {"cross_entropy": ce_family, "binary_cross_entropy": bce_family,
            "mixup": mixup_family, "cutmix": cutmix_family,
            "normalize_mixup": normalize_mixup_family, "optim": optim_family,
            "scaler": scaler_family}


def main(argv):
    only = [a for a in argv if not a.startswith("-")]
    h = Harness()
    torch.set_num_threads(1)
    for fam, fn in FAMILIES.items():
        if only and fam not in only:
            continue
        try:
            fn(h, random.Random(0))
        except Exception:  # a bug in a family's generator, not in the ops
            h.mismatches.append({"case": f"{fam}:generator", "backend": "-",
                                 "problem": traceback.format_exc(limit=3)})
    print(json.dumps({"counts": h.counts, "mismatches": h.mismatches}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
