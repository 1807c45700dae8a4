"""Fused mixed-precision AdamW step (FusedAdamW + LossScaler) vs what users run today, in the
same process: 50M parameters in 100 tensors.

* fp16/bf16 params with fp32 masters vs the pipeline ``_amp_foreach_non_finite_check_and_unscale_``
  + grads copied to fp32 + ``AdamW(fused=True)`` on the masters + masters copied back
  (``pipeline`` column; target: >= 1.8x).
* fp32 params vs ``torch.optim.AdamW(fused=True)`` (``torch_fused`` column; target: parity).

The cases live in fastcore_train/bench.py (shared with `fastcore-train bench`). GB/s counts the
bytes the fused step must move per parameter: 30 with a half-precision weight and fp32 master
(check pass 2, grad 2, master/exp_avg/exp_avg_sq read+write 24, weight write 2), 28 for fp32.
"""
import pytest

from fastcore_train import bench
from conftest import record, run, step_for

CASES = bench.cases("optim", device="cpu")
PAIRS = [(case, impl) for case in CASES for impl in case.impls]


@pytest.mark.parametrize("case,impl", PAIRS,
                         ids=[f"{c.name.split(' in ')[0].replace(' ', '-')}-{i}" for c, i in PAIRS])
def test_optim_step(benchmark, case, impl):
    run(benchmark, step_for(case, impl), rounds=case.rounds, warmup=3)
    record(benchmark, op=case.op, case=case.name, impl=impl, nbytes=case.nbytes)
