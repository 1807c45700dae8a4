"""Fused mixup blend vs the ways people write it, all measured in the same process.

The cases live in fastcore_train/bench.py (shared with `fastcore-train bench`). Per (shape, dtype):
  fastcore_train          ft.ops.mixup(x, perm, lam, out=out)        out preallocated
  fastcore_train fresh    ft.ops.mixup(x, perm, lam)                 a new output every call
  fastcore_train inplace  ft.ops.mixup(x, pairs, lam, out=x)         random pair swaps, in place
  eager                   lam * x + (1 - lam) * x[perm]
  eager out=              lerp(index_select(x, 0, perm, out=buf), x, lam, out=out): preallocated
  lerp                    torch.lerp(x[perm], x, lam, out=out)
  timm flip               f = x.flip(0).mul_(1 - lam); x.mul_(lam).add_(f)  timm's in place
  compile                 torch.compile of the eager one-liner
  copy                    out.copy_(x): the memory-bandwidth yardstick of this size

Bytes counted: out of place, each source row is read once and the output written once (3 x the
batch); in place, each row is read once and written once (2 x); copy reads and writes once (2 x).
"% copy BW" in the detail table compares GB/s counted that way with the copy of the same buffer
in the same run (the shared table uses the session's 256 MiB copy).

In-place pair mode must allocate nothing: test_inplace_allocates_nothing checks it with torch's
profiler (allocations through torch's allocator) and the process' peak RSS (everything else).
"""
import os

import pytest
import torch

import fastcore_train as ft
from fastcore_train import bench
from fastcore_train.mixup import pair_perm

from conftest import OUT_DIR, RESULTS, record, run, step_for

CASES = bench.cases("mixup", device="cpu")
IMPLS = list(bench.MIXUP_IMPLS)
TWO_PASS = ("fastcore_train inplace", "copy")  # read once + write once: 2 x the batch


@pytest.mark.parametrize("case,impl", [(c, i) for c in CASES for i in c.impls],
                         ids=[f"{c.name.replace(' ', '-')}-{i}" for c in CASES for i in c.impls])
def test_mixup(benchmark, case, impl):
    run(benchmark, step_for(case, impl), rounds=case.rounds, warmup=2)
    nbytes = case.nbytes * 2 // 3 if impl in TWO_PASS else case.nbytes
    record(benchmark, op=case.op, case=case.name, impl=impl, nbytes=nbytes)


# ---------------------------------------------------------------------------------------------
# memory: the in-place pair mode allocates nothing

def _peak_rss_growth(fn):
    """Bytes by which the process' peak RSS grows while fn runs (Linux; None elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        return None

    before = status("VmRSS:")
    fn()
    return status("VmHWM:") - before


def _profiled_alloc_bytes(fn):
    """Bytes allocated through torch's CPU allocator while fn runs."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


MEMORY: dict = {}
LAM = bench.MIXUP_LAM


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inplace_allocates_nothing(dtype):
    shape = bench.MIXUP_SHAPES["full"][0]
    x = torch.randn(shape).to(dtype)
    nb = x.numel() * x.element_size()
    pairs = pair_perm(shape[0], torch.Generator().manual_seed(0))
    perm = torch.randperm(shape[0])
    contenders = {
        "fastcore_train inplace": lambda: ft.ops.mixup(x, pairs, LAM, out=x),
        "timm flip": lambda: bench.timm_flip_(x, LAM),
        "eager": lambda: bench._mixup_eager(x, perm, LAM),
    }
    name = str(dtype).replace("torch.", "")
    for impl, fn in contenders.items():
        fn()  # warm
        MEMORY[(name, impl)] = (_profiled_alloc_bytes(fn), _peak_rss_growth(fn), nb)
    alloc, rss, _ = MEMORY[(name, "fastcore_train inplace")]
    assert alloc == 0, f"in-place mixup allocated {alloc} bytes through torch"
    # the RSS check is coarse (page granularity, other threads): allow 1% of the batch
    assert rss is None or rss < nb // 100, f"in-place mixup grew the peak RSS by {rss} bytes"
    # and the measurement does see allocations: the eager one-liner makes full-size temporaries
    assert MEMORY[(name, "eager")][0] >= nb


# ---------------------------------------------------------------------------------------------
# the detail report: every baseline, GB/s and the share of the same-size copy

def test_report():
    rows = [r for r in RESULTS if r["op"] == "mixup"]
    if not rows:
        pytest.skip("no mixup timings in this session")
    by_case: dict = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["impl"]] = r
    lines = ["| case | impl | median ms | GB/s | % copy BW | this / fastcore_train |",
             "|---|---|---|---|---|---|"]
    for case, impls in by_case.items():
        ours, copy = impls.get("fastcore_train"), impls.get("copy")
        copy_gbps = copy["nbytes"] / copy["median"] / 1e9 if copy else None
        for name in IMPLS:
            r = impls.get(name)
            if r is None:
                continue
            gbps = r["nbytes"] / r["median"] / 1e9
            lines.append("| {} | {} | {:.2f} | {:.1f} | {} | {} |".format(
                case, name, r["median"] * 1e3, gbps,
                f"{100 * gbps / copy_gbps:.0f}%" if copy_gbps else "-",
                f"{r['median'] / ours['median']:.2f}" if ours else "-"))
    mem = ["| dtype | impl | bytes allocated (torch) | peak RSS growth | batch bytes |",
           "|---|---|---|---|---|"]
    for (dtype, name), (alloc, rss, nb) in MEMORY.items():
        mem.append(f"| {dtype} | {name} | {alloc} | {rss if rss is not None else '-'} | {nb} |")
    text = ("## mixup (detail)\n\n" + "\n".join(lines) + "\n\n### memory of one call, "
            f"{'x'.join(map(str, bench.MIXUP_SHAPES['full'][0]))}\n\n" + "\n".join(mem) + "\n")
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, "mixup_detail.md"), "w") as f:
        f.write(text)
    print("\n" + text)
