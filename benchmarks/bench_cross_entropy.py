"""Fused label-smoothed cross-entropy vs torch eager and torch.compile (same process).

The cases live in fastcore_train/bench.py (shared with `fastcore-train bench`). Bytes counted:
forward reads the logits once; forward+backward reads them twice and writes the gradient once.
"""
import pytest

from fastcore_train import bench
from conftest import record, run, step_for

CASES = bench.cases("cross_entropy", device="cpu")


@pytest.mark.parametrize("impl", ["fastcore_train", "eager", "compile"])
@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "-") for c in CASES])
def test_cross_entropy(benchmark, case, impl):
    run(benchmark, step_for(case, impl), rounds=case.rounds)
    record(benchmark, op=case.op, case=case.name, impl=impl, nbytes=case.nbytes)
