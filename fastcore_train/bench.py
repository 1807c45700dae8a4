"""Benchmark cases of the fused ops and a small timing harness.

One definition of every case serves both `fastcore-train bench` (quick table, `--json`) and the
pytest-benchmark suite in benchmarks/ (`make bench`). A case builds its inputs once and returns
one step function per implementation: ``fastcore_train`` and the baselines measured in the same
process (torch ``eager``, ``compile``d eager, and others where the op has them). Each step finishes
its work before returning (CUDA is synchronised), so wall-clock timing is honest.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import fastcore_train as ft

__all__ = ["Case", "cases", "copy_bandwidth", "rmw_bandwidth", "time_fn", "run", "format_table",
           "roofline", "format_roofline",
           "ALLOC_CONFIGS", "alloc_config", "run_in_child", "format_multi"]



@dataclasses.dataclass
class Case:
    op: str
    name: str     # e.g. "fwd+bwd 8192x32000 bf16"
    nbytes: int   # bytes the fused op must move at least: the roofline of GB/s
    make: Callable[[], Dict[str, Callable[[], None]]]
    rounds: int = 5
    impls: Tuple[str, ...] = ("fastcore_train", "eager", "compile")  # the keys make() returns
    threads: Optional[int] = None  # torch threads while this case runs (None: as set)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _synced(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    if device.type != "cuda":
        return fn

    def step():
        fn()
        torch.cuda.synchronize(device)
    return step


def copy_bandwidth(device="cpu", nbytes: int = 256 << 20, repeats: int = 7) -> float:
    """GB/s of a preallocated ``dst.copy_(src)`` on ``device``, counting bytes read + written."""
    device = torch.device(device)
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.zeros_like(src)
    step = _synced(lambda: dst.copy_(src), device)
    return 2 * nbytes / time_fn(step, repeats=repeats, warmup=2) / 1e9


def rmw_bandwidth(device="cpu", nbytes: int = 256 << 20, repeats: int = 7) -> float:
    """GB/s of an in-place ``x.mul_(1.0)`` (each element read and written once): the roofline of
    kernels that update their buffers in place, like an optimizer step."""
    device = torch.device(device)
    x = torch.ones(nbytes // 4, device=device)
    step = _synced(lambda: x.mul_(1.0), device)
    return 2 * nbytes / time_fn(step, repeats=repeats, warmup=2) / 1e9


def time_fn(fn: Callable[[], None], *, repeats: int = 5, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in seconds, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# cross-entropy

CE_SHAPES = {"full": [(256, 1000), (4096, 1000), (1024, 32000), (8192, 32000)],
             "quick": [(4096, 1000), (1024, 32000)]}
CE_SMOOTHING = 0.1
_compiled: dict = {}


def _allow_recompiles():
    # Every case compiles the same function for its own shape; past dynamo's recompile limit
    # it would silently run eager and the "compile" column would lie.
    # Inductor compiles in-process: its default pool of worker processes warms up in the
    # background after the first compile and took the second core from the cases timed next
    # (8 ms for a 0.1 ms op whose two threads waited for a time slice).
    import torch._inductor.config as inductor_config
    inductor_config.compile_threads = 1
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))


def _ce_eager(x, y):
    return F.cross_entropy(x, y, label_smoothing=CE_SMOOTHING)


def _ce_case(shape, dtype, mode, device) -> Case:
    B, C = shape
    es = torch.finfo(dtype).bits // 8

    def make():
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(B, C, generator=g).to(device=device, dtype=dtype)
        y = torch.randint(0, C, (B,), generator=g).to(device)
        key = (shape, dtype, mode, device.type)
        if key not in _compiled:  # one compiled graph per case, as a user would have
            _allow_recompiles()
            _compiled[key] = torch.compile(_ce_eager, dynamic=False)
        impls = {
            "fastcore_train": lambda a, b: ft.ops.cross_entropy(a, b, label_smoothing=CE_SMOOTHING),
            "eager": _ce_eager,
            "compile": _compiled[key],
        }
        steps = {}
        for name, fn in impls.items():
            if mode == "fwd":
                def step(fn=fn):
                    with torch.no_grad():
                        fn(x, y)
            else:
                x.requires_grad_(True)

                def step(fn=fn):
                    x.grad = None
                    fn(x, y).backward()
            steps[name] = _synced(step, device)
        return steps

    dname = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    # forward reads the logits; forward+backward reads them twice and writes the gradient once
    nbytes = B * C * es * (1 if mode == "fwd" else 3)
    big = B * C >= 8192 * 32000
    # small cases take microseconds and are noisy: many rounds; the largest take seconds
    rounds = 3 if big and device.type == "cpu" else (7 if B * C * es >= 32 << 20 else 50)
    return Case("cross_entropy", f"{mode} {B}x{C} {dname}", nbytes, make, rounds=rounds)


def cross_entropy_cases(device, size="full") -> List[Case]:
    device = torch.device(device)
    return [_ce_case(shape, dtype, mode, device)
            for shape in CE_SHAPES[size]
            for dtype in (torch.float32, torch.bfloat16)
            for mode in ("fwd", "fwd+bwd")]


# ---------------------------------------------------------------------------------------------
# binary cross-entropy on mixup targets: timm's BinaryCrossEntropy(smoothing) on Mixup's dense
# targets (a smoothed one-hot of y and of y.flip(0), blended with lam: timm's mixup_target)

BCE_SHAPES = {"full": [(256, 1000), (1024, 11821)],  # ImageNet-1k; ImageNet-21k-P's classes
              "quick": [(1024, 11821)]}
BCE_SMOOTHING = 0.1
BCE_LAM = 0.7
BCE_IMPLS = ("fastcore_train", "eager", "eager, q prebuilt", "compile")


def timm_mixup_targets(y, num_classes, lam, smoothing, device):
    """timm's mixup_target: smoothed one-hot of y and of y.flip(0), blended with lam."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off

    def one_hot(t):
        return torch.full((t.shape[0], num_classes), off, device=device).scatter_(
            1, t.long().view(-1, 1), on)

    return one_hot(y) * lam + one_hot(y.flip(0)) * (1.0 - lam)


def _bce_timm(x, y):
    q = timm_mixup_targets(y, x.shape[1], BCE_LAM, BCE_SMOOTHING, x.device)
    return F.binary_cross_entropy_with_logits(x, q)


def _bce_case(shape, dtype, mode, device) -> Case:
    """``eager`` and ``compile`` build timm's targets every step as timm does; ``eager, q
    prebuilt`` times the loss alone on ready-made targets (the baseline most favourable to
    torch). Ours never builds them."""
    B, C = shape
    es = torch.finfo(dtype).bits // 8

    def make():
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(B, C, generator=g).to(device=device, dtype=dtype)
        y = torch.randint(0, C, (B,), generator=g).to(device)
        y_b = y.flip(0)
        q = timm_mixup_targets(y, C, BCE_LAM, BCE_SMOOTHING, device).to(dtype)
        key = ("bce", shape, dtype, mode, device.type)
        if key not in _compiled:  # one compiled graph per case, as a user would have
            _allow_recompiles()
            _compiled[key] = torch.compile(_bce_timm, dynamic=False)
        impls = {
            "fastcore_train": lambda a: ft.ops.binary_cross_entropy(
                a, y, target_b=y_b, lam=BCE_LAM, label_smoothing=BCE_SMOOTHING),
            "eager": lambda a: _bce_timm(a, y),
            "eager, q prebuilt": lambda a: F.binary_cross_entropy_with_logits(a, q),
            "compile": lambda a: _compiled[key](a, y),
        }
        steps = {}
        for name, fn in impls.items():
            if mode == "fwd":
                def step(fn=fn):
                    with torch.no_grad():
                        fn(x)
            else:
                x.requires_grad_(True)

                def step(fn=fn):
                    x.grad = None
                    fn(x).backward()
            steps[name] = _synced(step, device)
        return steps

    dname = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    # forward reads the logits; forward+backward reads them twice and writes the gradient once
    nbytes = B * C * es * (1 if mode == "fwd" else 3)
    rounds = 21 if B * C * es >= 32 << 20 else 101  # medians over many rounds: a noisy VM
    return Case("binary_cross_entropy", f"{mode} {B}x{C} {dname}", nbytes, make,
                rounds=rounds, impls=BCE_IMPLS)


def binary_cross_entropy_cases(device, size="full") -> List[Case]:
    device = torch.device(device)
    return [_bce_case(shape, dtype, mode, device)
            for shape in BCE_SHAPES[size]
            for dtype in (torch.float32, torch.bfloat16)
            for mode in ("fwd", "fwd+bwd")]


# ---------------------------------------------------------------------------------------------
# fused optimizer step (AdamW): ~100 tensors of mixed sizes, one step per call

OPTIM_PARAMS = {"full": 50_000_000, "quick": 10_000_000}
OPTIM_TENSORS = 100


def _optim_sizes(total: int, n: int = OPTIM_TENSORS) -> List[int]:
    g = torch.Generator().manual_seed(0)
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.1  # sizes spread over ~10x
    sizes = [max(1, int(x)) for x in (w / w.sum() * total)]
    sizes[-1] += total - sum(sizes)
    return sizes


OPTIM_HPARAMS = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def _adamw_maths(params, grads, masters, exp_avgs, exp_avg_sqs, step, inv_scale, found_inf):
    """torch.optim.AdamW's maths with the overflow skip, as plain torch ops for torch.compile:
    a non-finite check over every gradient, then per tensor unscale, AdamW on the float32
    master (``masters is params`` for float32 weights) and the weight written back, all kept
    unchanged when a gradient had an inf/NaN (``found_inf`` set to 1 then, for the scaler)."""
    lr, (b1, b2), eps, wd = (OPTIM_HPARAMS[k] for k in ("lr", "betas", "eps", "weight_decay"))
    found = torch.stack([(~torch.isfinite(g)).any() for g in grads]).any()
    t = step + 1
    step_size = lr / (1 - b1 ** t)
    bc2_sqrt = (1 - b2 ** t).sqrt()
    for p, g, w, m, v in zip(params, grads, masters, exp_avgs, exp_avg_sqs):
        g = g.float() * inv_scale
        m_new = m.lerp(g, 1 - b1)
        v_new = v * b2 + (1 - b2) * g * g
        w_new = w * (1 - lr * wd) - step_size * m_new / (v_new.sqrt() / bc2_sqrt + eps)
        m.copy_(torch.where(found, m, m_new))
        v.copy_(torch.where(found, v, v_new))
        w.copy_(torch.where(found, w, w_new))
        if w is not p:
            p.copy_(torch.where(found, p, w_new.to(p.dtype)))
    step.copy_(torch.where(found, step, t))
    found_inf.copy_(found)


def _torch_master_pipeline(params, grads, masters, device):
    """The mixed-precision step users run today, as a function: torch's unscale/check pass over
    the half grads, the grads copied to the fp32 ``masters``, AdamW(fused=True) on the masters
    with the found-inf flag (GradScaler's no-sync protocol), the masters copied back into the
    half ``params``, the scale update."""
    for m in masters:
        m.grad = torch.empty_like(m)
    topt = torch.optim.AdamW(masters, **OPTIM_HPARAMS, fused=True)
    mgrads = [m.grad for m in masters]
    scale = torch.ones((), device=device)
    tracker = torch.zeros((), dtype=torch.int32, device=device)
    inv_scale = torch.ones((), device=device)
    found = torch.zeros((), device=device)
    topt.grad_scale, topt.found_inf = None, found

    def pipeline():
        found.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv_scale)
        torch._foreach_copy_(mgrads, grads)
        topt.step()
        with torch.no_grad():
            torch._foreach_copy_(params, masters)
        torch._amp_update_scale_(scale, tracker, found, 2.0, 0.5, 2000)
    return pipeline


def _optim_case(total: int, dtype, device, compile_baseline: bool) -> Case:
    """fp16/bf16 params: FusedAdamW + LossScaler against the pipeline users run today (fp16
    model + fp32 master copy: torch's unscale/check pass, grads copied to fp32, AdamW(fused=True)
    on the masters with the found-inf flag, masters copied back, scale update).
    fp32 params: FusedAdamW against torch.optim.AdamW(fused=True).
    Both: against torch.compile of the same maths in one function (``_adamw_maths``)."""
    from fastcore_train.amp import LossScaler
    from fastcore_train.optim import FusedAdamW

    half = dtype != torch.float32

    def make():
        g = torch.Generator(device="cpu").manual_seed(0)
        sizes = _optim_sizes(total)
        params = [torch.nn.Parameter((torch.randn(n, generator=g) * 0.02).to(device, dtype))
                  for n in sizes]
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device, dtype)
        grads = [p.grad for p in params]
        ours = FusedAdamW(params, **OPTIM_HPARAMS)
        steps = {}
        if half:
            scaler = LossScaler(init_scale=1.0)
            scaler.scale(torch.ones((), device=device))  # puts the scale on the device

            def fused():
                scaler.step(ours)
                scaler.update()
            steps["fastcore_train"] = fused

            masters = [torch.nn.Parameter(p.detach().float()) for p in params]
            steps["pipeline"] = _torch_master_pipeline(params, grads, masters, device)
        else:
            topt = torch.optim.AdamW(params, **OPTIM_HPARAMS, fused=True)
            steps["fastcore_train"] = ours.step
            steps["torch_fused"] = topt.step
        if compile_baseline:
            key = ("optim", total, dtype, device.type)
            if key not in _compiled:
                _allow_recompiles()
                _compiled[key] = torch.compile(_adamw_maths, dynamic=False)
            compiled = _compiled[key]
            c_params = [p.detach().clone() for p in params]
            c_masters = [p.float() for p in c_params] if half else c_params
            c_m = [torch.zeros_like(w) for w in c_masters]
            c_v = [torch.zeros_like(w) for w in c_masters]
            c_step = torch.zeros((), device=device)
            c_scale, c_inv = torch.ones((), device=device), torch.ones((), device=device)
            c_found = torch.zeros((), device=device)
            c_tracker = torch.zeros((), dtype=torch.int32, device=device)

            def compiled_step():
                with torch.no_grad():
                    compiled(c_params, grads, c_masters, c_m, c_v, c_step, c_inv, c_found)
                    if half:  # the scale update, as in the pipeline
                        torch._amp_update_scale_(c_scale, c_tracker, c_found, 2.0, 0.5, 2000)
            steps["compile"] = compiled_step
        return {k: _synced(v, device) for k, v in steps.items()}

    # Bytes per parameter the fused step must move. Half: read the grad in the check pass (2),
    # then grad (2), master/exp_avg/exp_avg_sq read+write (24) and the weight written (2).
    # fp32: grad (4), param/exp_avg/exp_avg_sq read+write (24), as torch's fused AdamW.
    nbytes = total * (30 if half else 28)
    dname = {torch.float32: "fp32", torch.bfloat16: "bf16+master",
             torch.float16: "fp16+master"}[dtype]
    label = f"{total / 1e6:.0f}M" if total >= 1e6 else str(total)
    impls = ("fastcore_train", "pipeline" if half else "torch_fused")
    return Case("optim", f"adamw {dname} {label} in {OPTIM_TENSORS} tensors", nbytes, make,
                rounds=10, impls=impls + (("compile",) if compile_baseline else ()))


OPTIM_EMA_DECAY = 0.9998


def _optim_ema_case(total: int, device) -> Case:
    """The EMA of the weights, fp16 params with fp32 masters: FusedAdamW(ema_decay=...) + LossScaler
    against the same step without EMA (``no_ema``: the EMA's share of our step), and the
    pipeline of _optim_case followed by AveragedModel(multi_avg_fn=get_ema_multi_avg_fn)
    .update_parameters over the float32 masters (``pipeline_ema``; ``pipeline`` alone gives
    the share of AveragedModel's extra pass)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from fastcore_train.amp import LossScaler
    from fastcore_train.optim import FusedAdamW

    dtype = torch.float16

    def make():
        g = torch.Generator(device="cpu").manual_seed(0)
        params = [torch.nn.Parameter((torch.randn(n, generator=g) * 0.02).to(device, dtype))
                  for n in _optim_sizes(total)]
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device, dtype)
        grads = [p.grad for p in params]
        steps = {}
        for name, kw in (("fastcore_train", dict(ema_decay=OPTIM_EMA_DECAY)), ("no_ema", {})):
            opt = FusedAdamW(params, **OPTIM_HPARAMS, **kw)
            scaler = LossScaler(init_scale=1.0)
            scaler.scale(torch.ones((), device=device))  # puts the scale on the device

            def fused(opt=opt, scaler=scaler):
                scaler.step(opt)
                scaler.update()
            steps[name] = fused
        # torch's pipeline on float32 masters (as in _optim_case), the EMA over the masters
        holder = torch.nn.Module()
        holder.masters = torch.nn.ParameterList(
            [torch.nn.Parameter(p.detach().float()) for p in params])
        pipeline = _torch_master_pipeline(params, grads, list(holder.masters), device)
        averaged = AveragedModel(holder, multi_avg_fn=get_ema_multi_avg_fn(OPTIM_EMA_DECAY))
        averaged.update_parameters(holder)  # past its first (copying) update

        def pipeline_ema():
            pipeline()
            averaged.update_parameters(holder)
        steps["pipeline_ema"] = pipeline_ema
        steps["pipeline"] = pipeline
        return {k: _synced(v, device) for k, v in steps.items()}

    # the fp16+master step's 30 bytes per parameter and the EMA's read and write (8)
    label = f"{total / 1e6:.0f}M" if total >= 1e6 else str(total)
    return Case("optim", f"adamw fp16+master +ema {label} in {OPTIM_TENSORS} tensors",
                total * 38, make, rounds=10,
                impls=("fastcore_train", "no_ema", "pipeline_ema", "pipeline"))


def optim_cases(device, size="full") -> List[Case]:
    device = torch.device(device)
    total = OPTIM_PARAMS[size]
    # Compiling the 100-tensor step takes about a minute per dtype on a 2-core machine: the
    # quick set leaves that baseline out.
    return [_optim_case(total, dt, device, compile_baseline=size == "full")
            for dt in (torch.float16, torch.bfloat16, torch.float32)] + \
        [_optim_ema_case(total, device)]


# ---------------------------------------------------------------------------------------------
# mixup

MIXUP_SHAPES = {"full": [(256, 3, 224, 224), (256, 3, 64, 64)], "quick": [(256, 3, 64, 64)]}
MIXUP_LAM = 0.7
MIXUP_IMPLS = ("fastcore_train", "fastcore_train fresh", "fastcore_train inplace", "eager",
               "eager out=", "lerp", "timm flip", "compile", "copy")


def _mixup_eager(x, perm, lam):
    return lam * x + (1 - lam) * x[perm]


def timm_flip_(x, lam):
    """timm's in-place batch mixup: the scaled flip first (a full temporary), then x blended
    into it. (Written as one expression, x.mul_(lam).add_(x.flip(0)...) would flip the already
    scaled x.)"""
    flipped = x.flip(0).mul_(1.0 - lam)
    return x.mul_(lam).add_(flipped)



def _mixup_case(shape, dtype, device) -> Case:
    es = torch.finfo(dtype).bits // 8
    numel = 1
    for s in shape:
        numel *= s

    def make():
        from fastcore_train.mixup import pair_perm

        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
        xi = x.clone()  # the in-place contenders blend their own batch, again and again
        perm = torch.randperm(shape[0], generator=g).to(device)
        pairs = pair_perm(shape[0], g).to(device)
        out = torch.empty_like(x)
        gathered = torch.empty_like(x)
        lam = MIXUP_LAM
        key = ("mixup", shape, dtype, device.type)
        if key not in _compiled:
            _allow_recompiles()
            _compiled[key] = torch.compile(_mixup_eager, dynamic=False)
        compiled = _compiled[key]
        impls = {
            "fastcore_train": lambda: ft.ops.mixup(x, perm, lam, out=out),
            "fastcore_train fresh": lambda: ft.ops.mixup(x, perm, lam),
            "fastcore_train inplace": lambda: ft.ops.mixup(xi, pairs, lam, out=xi),
            "eager": lambda: _mixup_eager(x, perm, lam),
            # torch at its best without a custom kernel: every output preallocated
            "eager out=": lambda: torch.lerp(torch.index_select(x, 0, perm, out=gathered), x,
                                             lam, out=out),
            "lerp": lambda: torch.lerp(x[perm], x, lam, out=out),
            "timm flip": lambda: timm_flip_(xi, lam),
            "compile": lambda: compiled(x, perm, lam),
            "copy": lambda: out.copy_(x),
        }
        return {name: _synced(fn, device) for name, fn in impls.items()}

    dname = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    big = numel >= 256 * 3 * 224 * 224
    # out of place: both source rows read once, the result written once
    return Case("mixup", f"{'x'.join(map(str, shape))} {dname}", 3 * numel * es, make,
                rounds=7 if big and device.type == "cpu" else 15, impls=MIXUP_IMPLS)


# The whole module call, small batches first: sampling, checks and dispatch are most of the
# time there. timm's recipe (batch mode) written out: a numpy Beta draw, the batch blended in
# place with its flip, dense smoothed mixup targets (B x 1000) for the soft-target loss; ours
# needs no targets (the loss takes the MixedTarget).
MODULE_SHAPES = {"full": [(32, 3, 32, 32), (128, 3, 32, 32), (128, 3, 64, 64),
                          (256, 3, 224, 224)],
                 "quick": [(32, 3, 32, 32), (128, 3, 64, 64)]}


def _mixup_module_case(shape, device) -> Case:
    numel = 1
    for s_ in shape:
        numel *= s_

    def make():
        import numpy as np

        from fastcore_train.bench_step import dense_mixup_targets

        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(shape, generator=g).to(device)
        y = torch.randint(0, 1000, (shape[0],), generator=g).to(device)
        ours = ft.Mixup(alpha=0.8, mode="batch", inplace=True,
                        generator=torch.Generator().manual_seed(0))
        rng = np.random.default_rng(0)

        def timm_style():
            lam = float(rng.beta(0.8, 0.8))
            timm_flip_(x, lam)
            return dense_mixup_targets(y, 1000, lam, 0.1)

        return {"fastcore_train": _synced(lambda: ours(x, y), device),
                "timm-style": _synced(timm_style, device)}

    small = numel < 4 << 20
    # in place: the batch is read and written once
    return Case("mixup", f"Mixup module {'x'.join(map(str, shape))} fp32", 2 * numel * 4, make,
                rounds=200 if small else 7, impls=("fastcore_train", "timm-style"))


def mixup_cases(device, size="full") -> List[Case]:
    device = torch.device(device)
    return ([_mixup_case(shape, dtype, device)
             for shape in MIXUP_SHAPES[size]
             for dtype in (torch.float32, torch.bfloat16)]
            + [_mixup_module_case(shape, device) for shape in MODULE_SHAPES[size]])


# ---------------------------------------------------------------------------------------------
# normalize + mixup of a uint8 batch (the loader's output) in one pass

NORMMIX_SHAPES = {"full": [(256, 3, 224, 224)], "quick": [(256, 3, 64, 64)]}
NORMMIX_IMPLS = ("fastcore_train", "fastcore_train fresh", "fastcore_train normalize only",
                 "eager", "compile", "timm", "copy")
# timm's IMAGENET_DEFAULT_MEAN / STD on the 0-255 scale of a uint8 batch
IMAGENET_MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def _normmix_eager(x, perm, lam, mean, std, dtype):
    """As a user writes it: normalize, blend, cast."""
    C = x.shape[1]
    a = (x.float() - mean.view(1, C, 1, 1)) / std.view(1, C, 1, 1)
    return (lam * a + (1 - lam) * a[perm]).to(dtype)


def _normmix_timm(x, lam, mean, std, dtype):
    """timm's path: the loader's x.float().sub_(mean).div_(std), then its in-place flip blend."""
    C = x.shape[1]
    a = x.float().sub_(mean.view(1, C, 1, 1)).div_(std.view(1, C, 1, 1))
    return timm_flip_(a, lam).to(dtype)


def _normmix_case(shape, dtype, device) -> Case:
    numel = 1
    for s_ in shape:
        numel *= s_
    es = torch.finfo(dtype).bits // 8

    def make():
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(device)
        perm = torch.arange(shape[0] - 1, -1, -1, device=device)  # timm's flip pairing
        mean = torch.tensor(IMAGENET_MEAN_255, device=device)
        std = torch.tensor(IMAGENET_STD_255, device=device)
        out = torch.empty(shape, dtype=dtype, device=device)
        lam = MIXUP_LAM
        key = ("normalize_mixup", shape, dtype, device.type)
        if key not in _compiled:
            _allow_recompiles()
            _compiled[key] = torch.compile(_normmix_eager, dynamic=False)
        compiled = _compiled[key]
        impls = {
            "fastcore_train": lambda: ft.ops.normalize_mixup(x, perm, lam, mean, std,
                                                             out_dtype=dtype, out=out),
            "fastcore_train fresh": lambda: ft.ops.normalize_mixup(x, perm, lam, mean, std,
                                                                   out_dtype=dtype),
            "fastcore_train normalize only": lambda: ft.ops.normalize_mixup(
                x, None, 1.0, mean, std, out_dtype=dtype, out=out),
            "eager": lambda: _normmix_eager(x, perm, lam, mean, std, dtype),
            "compile": lambda: compiled(x, perm, lam, mean, std, dtype),
            "timm": lambda: _normmix_timm(x, lam, mean, std, dtype),
            "copy": lambda: out.copy_(x),  # uint8 -> dtype: one read, one write
        }
        return {name: _synced(fn, device) for name, fn in impls.items()}

    dname = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    big = numel >= 256 * 3 * 224 * 224
    # both source rows of each output read (2 x the uint8 batch), the result written once
    return Case("normalize_mixup", f"uint8 {'x'.join(map(str, shape))} -> {dname}",
                numel * (2 + es), make, rounds=7 if big and device.type == "cpu" else 15,
                impls=NORMMIX_IMPLS)


def normalize_mixup_cases(device, size="full") -> List[Case]:
    device = torch.device(device)
    return [_normmix_case(shape, dtype, device) for shape in NORMMIX_SHAPES[size]
            for dtype in (torch.float32, torch.bfloat16)]


# ---------------------------------------------------------------------------------------------

def step_cases(device, size="full") -> List[Case]:
    from fastcore_train.bench_step import step_cases as cases_
    return cases_(device, size)


_REGISTRY = {"cross_entropy": cross_entropy_cases,
             "binary_cross_entropy": binary_cross_entropy_cases,
             "optim": optim_cases, "mixup": mixup_cases,
             "normalize_mixup": normalize_mixup_cases, "step": step_cases}
OPS = tuple(_REGISTRY)


def cases(op: Optional[str] = None, device="cpu", size: str = "full") -> List[Case]:
    """Every benchmark case of ``op`` (all ops when None) on ``device``."""
    ops = [op] if op else list(_REGISTRY)
    out = []
    for name in ops:
        if name not in _REGISTRY:
            raise ValueError(f"unknown op {name!r}; expected one of {sorted(_REGISTRY)}")
        out += _REGISTRY[name](device, size)
    return out


# ---------------------------------------------------------------------------------------------
# allocator settings: torch at its best, as shipped, and our kernels without our output cache

# torch's CPU allocator takes 2 MiB pages only with THP_MEM_ALLOC_ENABLE=1, read once per
# process; without it every large fresh tensor page-faults 4 KiB at a time. Our large outputs
# always come from 2 MiB pages and a cache of freed blocks (csrc/cpu/alloc.cpp), so the fair
# comparison is against torch with THP on; the default setting is what users get unless they set
# it. "THP, cache off" measures what our kernels alone bring.
ALLOC_CONFIGS = {
    "THP": {"THP_MEM_ALLOC_ENABLE": "1", "FASTCORE_TRAIN_CACHE_MB": None},
    "default": {"THP_MEM_ALLOC_ENABLE": None, "FASTCORE_TRAIN_CACHE_MB": None},
    "THP, cache off": {"THP_MEM_ALLOC_ENABLE": "1", "FASTCORE_TRAIN_CACHE_MB": "0"},
}
ALLOC_LABELS = {"THP": "torch with THP_MEM_ALLOC_ENABLE=1 (fair)",
                "default": "torch's default allocator (as shipped)",
                "THP, cache off": "torch with THP, our output cache off (kernels alone)"}


def alloc_config(environ=None) -> str:
    """The ALLOC_CONFIGS entry this process runs under ("other" if none)."""
    env = os.environ if environ is None else environ
    for name, want in ALLOC_CONFIGS.items():
        if all((env.get(k) or None) == v for k, v in want.items()):
            return name
    return "other"


def run_in_child(config: str, op: Optional[str], device: str, quick: bool) -> List[dict]:
    """The rows of `fastcore-train bench` run in a fresh process under another allocator setting
    (the setting is read once per process), with this process' thread count."""
    env = dict(os.environ)
    for k, v in ALLOC_CONFIGS[config].items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    cmd = [sys.executable, "-m", "fastcore_train.cli", "bench", "--json", "--alloc", "current",
           "--device", device] + (["--op", op] if op else []) + (["--quick"] if quick else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the benchmark under '{config}' failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)["rows"]


def format_multi(rows_by_config: Dict[str, List[dict]], bandwidth: Optional[float]) -> str:
    """One table, a row per case: our time under each setting and each baseline's ratio, the
    fair setting first."""
    order = [c for c in ALLOC_CONFIGS if c in rows_by_config] + \
        [c for c in rows_by_config if c not in ALLOC_CONFIGS]
    cases, names = [], []
    for c in order:
        for r in rows_by_config[c]:
            if (r["op"], r["case"]) not in cases:
                cases.append((r["op"], r["case"]))
            names += [k for k in r["speedup"] if k not in names]
    head = ["op", "case"]
    for c in order:
        head += [f"ms [{c}]"] + [f"× {n} [{c}]" for n in names]
    parts = list(dict.fromkeys(k for c in order for r in rows_by_config[c]
                               for k in r.get("parts_share", {})))
    head += [f"{p} fused parts ms (share) [{order[0]}]" for p in parts]
    head += ["GB/s", "% copy BW"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = {c: {(r["op"], r["case"]): r for r in rows_by_config[c]} for c in order}
    for key in cases:
        cells = list(key)
        for c in order:
            r = by[c].get(key)
            cells += [f"{r['ms']:.2f}" if r else "-"]
            cells += [f"{r['speedup'][n]:.2f}" if r and n in r["speedup"] else "-"
                      for n in names]
        first = next((by[c][key] for c in order if key in by[c]), None)
        cells += [f"{first['parts_ms'][p]:.2f} ({100 * first['parts_share'][p]:.0f}%)"
                  if first and p in first.get("parts_share", {}) else "-" for p in parts]
        cells += [f"{first['gbps']:.1f}" if first and first["gbps"] else "-",
                  f"{first['pct_bandwidth']:.0f}%" if first and first["pct_bandwidth"] else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for c in order:
        lines.append(f"[{c}]: {ALLOC_LABELS.get(c, c)}; ratios against baselines timed in "
                     "the same process.")
    lines.append("× X: X's time over fastcore_train's (above 1: fastcore_train is faster). "
                 "GB/s and % copy BW: of the first setting.")
    return "\n".join(lines)


def _is_variant(name: str) -> bool:
    """Other forms of our op (``fastcore_train fresh``/``inplace``), the same-size ``copy`` and
    the whole-step ``parts ...``: shown as times, not as speed-ups over a baseline."""
    return name.startswith(("fastcore_train ", "parts ")) or name == "copy"


def run(case_list: List[Case], *, bandwidth: Optional[float] = None, progress=None) -> List[dict]:
    """Times every implementation of every case; one row per case with ratios and GB/s.

    ``speedup``: a baseline's time over ours (> 1: ours is faster), for torch's implementations;
    ``variants_ms``: the times of our other forms and of a same-size copy."""
    rows = []
    for case in case_list:
        threads = torch.get_num_threads()
        if case.threads:
            torch.set_num_threads(case.threads)
        try:
            steps = case.make()
            times = {name: time_fn(fn, repeats=case.rounds) for name, fn in steps.items()}
            del steps
        finally:
            torch.set_num_threads(threads)
        ours = times["fastcore_train"]
        gbps = case.nbytes / ours / 1e9
        others = {k: v for k, v in times.items() if k != "fastcore_train"}
        rows.append(dict(
            op=case.op, case=case.name, ms=ours * 1e3,
            baselines_ms={k: v * 1e3 for k, v in others.items() if not _is_variant(k)},
            variants_ms={k: v * 1e3 for k, v in others.items() if _is_variant(k)},
            speedup={k: v / ours for k, v in others.items() if not _is_variant(k)},
            gbps=gbps, pct_bandwidth=100 * gbps / bandwidth if bandwidth and gbps else None))
        parts = {k[len("parts "):]: v for k, v in times.items() if k.startswith("parts ")}
        if parts:  # whole steps: the fused parts' time and share of each recipe's step
            rows[-1]["parts_ms"] = {k: v * 1e3 for k, v in parts.items()}
            rows[-1]["parts_share"] = {k: v / times[k] for k, v in parts.items() if k in times}
        if progress is not None:
            progress(rows[-1])
    return rows


# ---------------------------------------------------------------------------------------------
# roofline: our kernels' GB/s against the copy bandwidth at 1 thread and at all threads

# Fractions of the copy bandwidth each case should reach (issue 14): fp32 moves 4 bytes per
# element of work, bf16 and fp16 2, so the fixed per-element arithmetic weighs more in them.
ROOFLINE_GOAL = {"fp32": 0.8, "bf16": 0.6, "fp16": 0.6}
# Cases small enough to run from the caches (their GB/s can exceed DRAM's) are left out.
ROOFLINE_MIN_BYTES = 64 << 20


# In-place kernels (the optimizer updates its buffers where they are) are measured against an
# in-place read-modify-write of the same size, which this machine runs faster than a copy.
_RMW_OPS = ("optim",)


def roofline(case_list: List[Case], *, device="cpu", progress=None) -> List[dict]:
    """Our op alone (no baselines), at 1 thread and at all threads, against the bandwidth of a
    256 MB copy (a read-modify-write in place for the optimizer) timed at the same thread count
    just before: one row per case with GB/s and % of that roof."""
    device = torch.device(device)
    threads = torch.get_num_threads()
    counts = [1, threads] if device.type == "cpu" and threads > 1 else [threads]
    rows = {c.name + c.op: dict(op=c.op, case=c.name, nbytes=c.nbytes, gbps={}, pct={},
                                roof="in-place RMW" if c.op in _RMW_OPS else "copy")
            for c in case_list if c.nbytes >= ROOFLINE_MIN_BYTES and not c.op == "step"}
    try:
        for n in counts:
            torch.set_num_threads(n)
            roofs = {"copy": copy_bandwidth(device), "in-place RMW": rmw_bandwidth(device)}
            for case in case_list:
                row = rows.get(case.name + case.op)
                if row is None:
                    continue
                step = case.make()["fastcore_train"]  # baselines are built, never called
                t = time_fn(step, repeats=max(3, min(case.rounds, 11)), warmup=2)
                bw = roofs[row["roof"]]
                row["gbps"][n] = case.nbytes / t / 1e9
                row["pct"][n] = 100 * row["gbps"][n] / bw
                row.setdefault("roof_gbps", {})[n] = bw
                if progress is not None:
                    progress(row, n)
    finally:
        torch.set_num_threads(threads)
    out = list(rows.values())
    for row in out:
        dtype = next((d for d in ROOFLINE_GOAL if d in row["case"]), "fp32")
        row["goal_pct"] = 100 * ROOFLINE_GOAL[dtype]
        row["met"] = all(v >= row["goal_pct"] for v in row["pct"].values())
    return out


def format_roofline(rows: List[dict]) -> str:
    counts = sorted({n for r in rows for n in r["gbps"]})
    head = (["op", "case", "roof"] + [f"GB/s, {n} thr" for n in counts]
            + [f"% roof, {n} thr" for n in counts] + ["goal", "met"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    roofs = {}
    for r in rows:
        cells = [r["op"], r["case"], r["roof"]]
        cells += [f"{r['gbps'][n]:.1f}" if n in r["gbps"] else "-" for n in counts]
        cells += [f"{r['pct'][n]:.0f}%" if n in r["pct"] else "-" for n in counts]
        cells += [f"≥{r['goal_pct']:.0f}%", "yes" if r["met"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
        for n, bw in r.get("roof_gbps", {}).items():
            roofs[(r["roof"], n)] = bw
    lines.append("\nGB/s: the bytes the op must move (each input read once per pass it "
                 "needs, each output written once) over its time. % roof: of a 256 MB copy "
                 "(in place: x.mul_(1)) timed at the same thread count in the same run ("
                 + ", ".join(f"{k[0]} {bw:.1f} GB/s at {k[1]} thread{'s' if k[1] > 1 else ''}"
                             for k, bw in sorted(roofs.items())) + ").")
    return "\n".join(lines)


def format_table(rows: List[dict], bandwidth: Optional[float] = None) -> str:
    variants, names = [], []
    for r in rows:
        variants += [k for k in r.get("variants_ms", {}) if k not in variants]
        names += [k for k in r["speedup"] if k not in names]
    variants = [v for v in variants if not v.startswith("parts ")]
    added = [k for r in rows for k in r.get("parts_share", {})]
    added = list(dict.fromkeys(added))
    head = (["op", "case", "fastcore_train ms"] + [f"{v} ms" for v in variants]
            + [f"× {n}" for n in names] + [f"{a}: fused parts ms (share)" for a in added]
            + ["GB/s", "% copy BW"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["op"], r["case"], f"{r['ms']:.2f}"]
        cells += [f"{r['variants_ms'][v]:.2f}" if v in r.get("variants_ms", {}) else "-"
                  for v in variants]
        cells += [f"{r['speedup'][n]:.2f}" if n in r["speedup"] else "-" for n in names]
        cells += [f"{r['parts_ms'][a]:.2f} ({100 * r['parts_share'][a]:.0f}%)"
                  if a in r.get("parts_share", {}) else "-" for a in added]
        cells += [f"{r['gbps']:.1f}" if r["gbps"] else "-",
                  f"{r['pct_bandwidth']:.0f}%" if r["pct_bandwidth"] is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("\n× X: X's time over fastcore_train's (above 1: fastcore_train is faster). "
                 "GB/s: the bytes the op must move over its time.")
    if added:
        lines.append("fused parts ms (share): what the fused ops replace in that recipe -- the "
                     "blend, the targets and loss forward+backward on ready logits, the "
                     "optimizer step -- timed alone, and its share of that recipe's step.")
    if bandwidth:
        lines.append(f"% copy BW: of a 256 MB copy measured at the start of the run, "
                     f"{bandwidth:.1f} GB/s; small cases run from cache and exceed it "
                     f"(the 'copy ms' column, where shown, times a copy of the case's own size).")
    return "\n".join(lines)
