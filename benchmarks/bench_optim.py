"""Fused mixed-precision AdamW step (FusedAdamW + LossScaler) vs what users run today, in the
same process: 50M parameters in 100 tensors.

* fp16/bf16 params with fp32 masters vs the pipeline ``_amp_foreach_non_finite_check_and_unscale_``
  + grads copied to fp32 + ``AdamW(fused=True)`` on the masters + masters copied back
  (``pipeline`` column; target: >= 1.8x).
* fp32 params vs ``torch.optim.AdamW(fused=True)`` (``torch_fused`` column; target: parity).

The cases live in fastcore_train/bench.py (shared with `fastcore-train bench`). GB/s counts the
bytes the fused step must move per parameter: 30 with a half-precision weight and fp32 master
(check pass 2, grad 2, master/exp_avg/exp_avg_sq read+write 24, weight write 2), 28 for fp32.

On a machine shared with other jobs the memory bandwidth drifts from one second to the next, so
besides pytest-benchmark's per-implementation timings, test_optim_paired times fastcore_train,
its baseline and a copy alternately, round after round, and reports the median of the per-round
ratios and the share of the copy bandwidth of the same rounds (benchmarks/results/
optim_paired.md): the figures that load drift disturbs least.
"""
import os
import statistics
import time

import pytest
import torch

import conftest
from conftest import OUT_DIR, record, run, step_for
from fastcore_train import bench

CASES = bench.cases("optim", device="cpu")
PAIRS = [(case, impl) for case in CASES for impl in case.impls]


@pytest.mark.parametrize("case,impl", PAIRS,
                         ids=[f"{c.name.split(' in ')[0].replace(' ', '-')}-{i}" for c, i in PAIRS])
def test_optim_step(benchmark, case, impl):
    run(benchmark, step_for(case, impl), rounds=case.rounds, warmup=3)
    record(benchmark, op=case.op, case=case.name, impl=impl, nbytes=case.nbytes)


def _paired(case, rounds=15, warmup=3):
    """Per round: fastcore_train, its baseline (alternating which goes first) and a 256 MB copy,
    so the ratio and the share of copy bandwidth compare timings taken seconds apart."""
    steps = case.make()
    ours, base = case.impls
    src = torch.ones(64 << 20)
    dst = torch.empty_like(src)
    steps["copy"] = lambda: dst.copy_(src)
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    t = {name: [] for name in steps}
    for r in range(rounds):
        for name in ((ours, base, "copy") if r % 2 == 0 else (base, ours, "copy")):
            t0 = time.perf_counter()
            steps[name]()
            t[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in t.items()}
    ratio = statistics.median(b / o for o, b in zip(t[ours], t[base]))
    copy_gbps = 2 * src.numel() * 4 / med["copy"] / 1e9
    return base, med[ours], med[base], ratio, copy_gbps


def test_optim_paired():
    conftest._LAST_CASE.clear()  # free the last pytest-benchmark case first
    lines = ["| case | fastcore_train ms | baseline | baseline ms | × baseline (median of "
             "rounds) | GB/s | copy GB/s (same rounds) | % copy BW |",
             "|---|---|---|---|---|---|---|---|"]
    for case in CASES:
        base, ours_s, base_s, ratio, copy_gbps = _paired(case)
        gbps = case.nbytes / ours_s / 1e9
        lines.append(f"| {case.name} | {ours_s * 1e3:.2f} | {base} | {base_s * 1e3:.2f} | "
                     f"{ratio:.2f} | {gbps:.1f} | {copy_gbps:.1f} | {100 * gbps / copy_gbps:.0f}% |")
    text = ("## optim, paired rounds\n\n" + conftest._header() + "\n\n" + "\n".join(lines) + "\n")
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, "optim_paired.md"), "w") as f:
        f.write(text)
    print("\n" + text)
