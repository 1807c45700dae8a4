"""Shared machinery of the op benchmarks (pytest-benchmark).

Every benchmark records its median with :func:`record`; at the end of the session one table per
op is printed and written to ``benchmarks/results/<op>.md`` with, per case, fastcore_train's time,
the ratios against torch eager and ``torch.compile`` measured in the same process, and the
achieved GB/s as a share of the copy bandwidth measured in the same process.

torch's allocator setting (THP_MEM_ALLOC_ENABLE) is read once per process, so `make bench` runs
the suite once per setting (bench.ALLOC_CONFIGS: torch with THP -- the fair baseline -- and
torch's default); each session saves its rows as ``results/<op>.<setting>.json`` and the table
shows every setting found there, the fair one first.
"""
from __future__ import annotations

import json
import os
import platform
from collections import defaultdict

import pytest
import torch

import fastcore_train as ft
from fastcore_train import bench

RESULTS: list = []
_COPY_BW: dict = {}
OUT_DIR = os.path.join(os.path.dirname(__file__), "results")


@pytest.fixture(scope="session", autouse=True)
def copy_bw():
    """Copy bandwidth of this machine, measured once per run (the GB/s roofline)."""
    if "gbps" not in _COPY_BW:
        _COPY_BW["gbps"] = bench.copy_bandwidth("cpu")
    return _COPY_BW["gbps"]


_LAST_CASE: dict = {}


def step_for(case, impl):
    """The step of one implementation of a bench.Case; inputs are built once per case."""
    if _LAST_CASE.get("name") != (case.op, case.name):
        _LAST_CASE.clear()  # free the previous case's tensors first
        _LAST_CASE.update(name=(case.op, case.name), steps=case.make())
    return _LAST_CASE["steps"][impl]


def run(benchmark, fn, *, rounds: int = 5, warmup: int = 2):
    """Times ``fn`` (which must finish its work before returning) with warm-up rounds."""
    return benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)


def record(benchmark, *, op: str, case: str, impl: str, nbytes: int = 0):
    """Adds the benchmark just run to the session table."""
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(op=op, case=case, impl=impl, nbytes=nbytes)
    RESULTS.append(dict(op=op, case=case, impl=impl, median=median, nbytes=nbytes))


def _fmt_ms(s):
    return f"{s * 1e3:.2f}" if s < 1 else f"{s * 1e3:.0f}"


def _tables(results):
    """One table per op: fastcore_train's time, every baseline measured for that op (eager,
    compile, or the op's own, e.g. the optimizer's pipeline), ratios, GB/s. ``results``:
    {setting: rows}; with several settings, each baseline's ratio appears once per setting."""
    settings = [c for c in bench.ALLOC_CONFIGS if c in results] + \
        [c for c in results if c not in bench.ALLOC_CONFIGS]
    by_op = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for setting in settings:
        for r in results[setting]:
            by_op[r["op"]][r["case"]][setting][r["impl"]] = r
    bw = _COPY_BW.get("gbps")
    out = {}
    for op, cases in by_op.items():
        base = []
        for per_setting in cases.values():
            for impls in per_setting.values():
                base += [k for k in impls if k != "fastcore_train" and k not in base]
        tag = (lambda c: f" [{c}]") if len(settings) > 1 else (lambda c: "")
        head = ["case"]
        for c in settings:
            head += [f"fastcore_train ms{tag(c)}"] + [f"× {b}{tag(c)}" for b in base]
        head += [f"{b} ms{tag(settings[0])}" for b in base] + ["GB/s", "% copy BW"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for case, per_setting in cases.items():
            first = per_setting.get(settings[0], {})
            cells = [case]
            for c in settings:
                impls = per_setting.get(c, {})
                ours = impls.get("fastcore_train")
                cells += [_fmt_ms(ours["median"]) if ours else "-"]
                cells += [f"{impls[b]['median'] / ours['median']:.2f}" if ours and b in impls
                          else "-" for b in base]
            cells += [_fmt_ms(first[b]["median"]) if b in first else "-" for b in base]
            ours = first.get("fastcore_train")
            gbps = ours["nbytes"] / ours["median"] / 1e9 if ours and ours["nbytes"] else None
            cells += [f"{gbps:.1f}" if gbps else "-",
                      f"{100 * gbps / bw:.0f}%" if gbps and bw else "-"]
            lines.append("| " + " | ".join(cells) + " |")
        if len(settings) > 1:
            lines.append("")
            lines += [f"[{c}]: {bench.ALLOC_LABELS.get(c, c)}, its own process; ratios against "
                      "baselines timed in that process." for c in settings]
        out[op] = "\n".join(lines)
    return out


def _header():
    info = ft._backend.info()
    bw = _COPY_BW.get("gbps")
    return (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads; torch {torch.__version__}; "
            f"backend {info['backend']} (cpu kernels: {info.get('cpu_kernels', '-')}); "
            f"copy bandwidth {bw:.1f} GB/s (same run); allocator setting of this session: "
            f"{bench.alloc_config()}" if bw else "")


def _setting_slug(setting):
    return setting.replace(", ", "-").replace(" ", "-")


def pytest_sessionfinish(session, exitstatus):
    if not RESULTS:
        return
    os.makedirs(OUT_DIR, exist_ok=True)
    here = bench.alloc_config()
    ops = sorted({r["op"] for r in RESULTS})
    for op in ops:
        with open(os.path.join(OUT_DIR, f"{op}.{_setting_slug(here)}.json"), "w") as f:
            json.dump([r for r in RESULTS if r["op"] == op], f)
    # every setting saved so far (make bench clears them before its runs)
    results = defaultdict(list)
    for setting in list(bench.ALLOC_CONFIGS) + ["other"]:
        for op in ops:
            path = os.path.join(OUT_DIR, f"{op}.{_setting_slug(setting)}.json")
            if os.path.exists(path):
                with open(path) as f:
                    results[setting] += json.load(f)
    header = _header()
    for op, table in _tables(results).items():
        text = f"## {op}\n\n{header}\n\n{table}\n"
        with open(os.path.join(OUT_DIR, f"{op}.md"), "w") as f:
            f.write(text)
        print("\n" + text)
