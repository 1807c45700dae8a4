"""Benchmark cases of the fused ops and a small timing harness.

One definition of every case serves both `fastcore-train bench` (quick table, `--json`) and the
pytest-benchmark suite in benchmarks/ (`make bench`). A case builds its inputs once and returns
one step function per implementation: ``fastcore_train`` and the baselines measured in the same
process (torch ``eager``, ``compile``d eager, and others where the op has them). Each step finishes
its work before returning (CUDA is synchronised), so wall-clock timing is honest.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import fastcore_train as ft

__all__ = ["Case", "cases", "copy_bandwidth", "time_fn", "run", "format_table"]



@dataclasses.dataclass
class Case:
    op: str
    name: str     # e.g. "fwd+bwd 8192x32000 bf16"
    nbytes: int   # bytes the fused op must move at least: the roofline of GB/s
    make: Callable[[], Dict[str, Callable[[], None]]]
    rounds: int = 5


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
    return Case("cross_entropy", f"{mode} {B}x{C} {dname}", nbytes, make,
                rounds=3 if big and device.type == "cpu" else 7)


def cross_entropy_cases(device, size="full") -> List[Case]:
    device = torch.device(device)
    return [_ce_case(shape, dtype, mode, device)
            for shape in CE_SHAPES[size]
            for dtype in (torch.float32, torch.bfloat16)
            for mode in ("fwd", "fwd+bwd")]


# ---------------------------------------------------------------------------------------------

_REGISTRY = {"cross_entropy": cross_entropy_cases}
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


def run(case_list: List[Case], *, bandwidth: Optional[float] = None, progress=None) -> List[dict]:
    """Times every implementation of every case; one row per case with ratios and GB/s."""
    rows = []
    for case in case_list:
        steps = case.make()
        times = {name: time_fn(fn, repeats=case.rounds) for name, fn in steps.items()}
        del steps
        ours = times["fastcore_train"]
        gbps = case.nbytes / ours / 1e9
        rows.append(dict(
            op=case.op, case=case.name, ms=ours * 1e3,
            baselines_ms={k: v * 1e3 for k, v in times.items() if k != "fastcore_train"},
            speedup={k: v / ours for k, v in times.items() if k != "fastcore_train"},
            gbps=gbps, pct_bandwidth=100 * gbps / bandwidth if bandwidth else None))
        if progress is not None:
            progress(rows[-1])
    return rows


def format_table(rows: List[dict], bandwidth: Optional[float] = None) -> str:
    names = []
    for r in rows:
        names += [k for k in r["speedup"] if k not in names]
    head = ["op", "case", "fastcore_train ms"] + [f"× {n}" for n in names] + ["GB/s", "% copy BW"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["op"], r["case"], f"{r['ms']:.2f}"]
        cells += [f"{r['speedup'][n]:.2f}" if n in r["speedup"] else "-" for n in names]
        cells += [f"{r['gbps']:.1f}",
                  f"{r['pct_bandwidth']:.0f}%" if r["pct_bandwidth"] is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    if bandwidth:
        lines.append(f"\ncopy bandwidth measured in the same run: {bandwidth:.1f} GB/s")
    return "\n".join(lines)
