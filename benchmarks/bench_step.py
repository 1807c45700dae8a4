"""Whole training steps (mixup + model + loss + optimizer): fastcore_train's recipe vs the eager
recipe users write today (timm-style flip mixup, dense soft targets, soft-target CE,
AdamW(fused=True)) and the same under torch.compile, plus what the fused ops replace timed alone
("parts ...": blend, loss forward+backward on ready logits, optimizer step), so that the table
shows their share of each recipe's step. The cases live
in fastcore_train/bench_step.py (shared with `fastcore-train bench --op step`)."""
import pytest
import torch

from fastcore_train import bench
from conftest import record, run, step_for

CASES = bench.cases("step", device="cpu")


@pytest.mark.parametrize("impl", ["fastcore_train", "eager", "compile", "parts fastcore_train",
                                  "parts eager"])
@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "-").replace(",", "")
                                             for c in CASES])
def test_step(benchmark, case, impl):
    threads = torch.get_num_threads()
    torch.set_num_threads(case.threads or threads)
    try:
        run(benchmark, step_for(case, impl), rounds=case.rounds, warmup=2)
    finally:
        torch.set_num_threads(threads)
    record(benchmark, op=case.op, case=case.name, impl=impl, nbytes=0)
