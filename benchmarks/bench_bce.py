"""Fused mixup-aware binary cross-entropy vs timm's recipe (BinaryCrossEntropy(smoothing=0.1) on
Mixup's dense targets) in torch eager and torch.compile, same process.

The cases live in fastcore_train/bench.py (shared with `fastcore-train bench`). ``eager, q
prebuilt`` times torch's loss alone on ready-made targets, the baseline most favourable to torch.
Bytes counted: forward reads the logits once; forward+backward reads them twice and writes the
gradient once.
"""
import pytest

from fastcore_train import bench
from conftest import record, run, step_for

CASES = bench.cases("binary_cross_entropy", device="cpu")


@pytest.mark.parametrize("impl", bench.BCE_IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "-") for c in CASES])
def test_binary_cross_entropy(benchmark, case, impl):
    run(benchmark, step_for(case, impl), rounds=case.rounds)
    record(benchmark, op=case.op, case=case.name, impl=impl, nbytes=case.nbytes)
