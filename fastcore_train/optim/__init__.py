"""Fused mixed-precision optimizers: one check pass and one update pass per step, fp32 master
weights for float16/bfloat16 parameters kept in ``state_dict()``, loss scaling on the device."""
from fastcore_train.optim._fused import FusedOptimizer
from fastcore_train.optim.adamw import FusedAdamW
from fastcore_train.optim.sgd import FusedSGD

__all__ = ["FusedAdamW", "FusedSGD", "FusedOptimizer"]
