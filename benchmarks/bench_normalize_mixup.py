"""Fused uint8 normalize + mixup vs the ways people write it, all measured in the same process.

The cases live in fastcore_train/bench.py (shared with `fastcore-train bench`). Per (shape, out
dtype), from a uint8 (B, 3, H, W) batch as a loader returns it, with timm's ImageNet statistics
on the 0-255 scale and the flip pairing:
  fastcore_train                 ft.ops.normalize_mixup(x, perm, lam, mean, std, out=out)
  fastcore_train fresh           the same, a new output every call
  fastcore_train normalize only  perm=None: the eval path
  eager                          ((x.float() - mean) / std), lam * a + (1 - lam) * a[perm], .to()
  compile                        torch.compile of that composition
  timm                           x.float().sub_(mean).div_(std), then timm's in-place flip blend
  copy                           out.copy_(x): the uint8 -> out dtype conversion, one read and
                                 one write, the yardstick of this size

Bytes counted: each output reads two uint8 source rows and is written once (numel x (2 + the
output's element size)); copy reads once (numel x (1 + element size)).
"""
import pytest

from fastcore_train import bench

from conftest import record, run, step_for

CASES = bench.cases("normalize_mixup", device="cpu")


@pytest.mark.parametrize("case,impl", [(c, i) for c in CASES for i in c.impls],
                         ids=[f"{c.name.replace(' ', '-')}-{i}" for c in CASES for i in c.impls])
def test_normalize_mixup(benchmark, case, impl):
    run(benchmark, step_for(case, impl), rounds=case.rounds, warmup=2)
    nbytes = case.nbytes
    if impl in ("copy", "fastcore_train normalize only"):  # one uint8 read per element
        numel = case.nbytes // (2 + (4 if case.name.endswith("fp32") else 2))
        nbytes = case.nbytes - numel
    record(benchmark, op=case.op, case=case.name, impl=impl, nbytes=nbytes)
