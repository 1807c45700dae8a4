"""fastcore_train: fused kernels and training recipes for PyTorch."""
from fastcore_train._backend import backend, backend_reason, empty_cache
from fastcore_train import ops, nn
from fastcore_train.nn import MixedTarget
from fastcore_train.mixup import Mixup
from fastcore_train import transfer, callbacks, distributed, train, checkpoint
from fastcore_train.train import fit, History
from fastcore_train.callbacks import EarlyStopping
from fastcore_train import schedules, optim, amp
from fastcore_train.lr_finder import lr_find, LRFinderResult
from fastcore_train import recipes
from fastcore_train.recipes import fit_one_cycle, fine_tune

__version__ = "0.1.0"

__all__ = [
    "backend", "backend_reason", "empty_cache", "ops", "nn", "MixedTarget", "Mixup",
    "transfer", "callbacks", "distributed", "train", "fit", "History", "EarlyStopping",
    "schedules", "lr_find", "LRFinderResult", "optim", "amp", "checkpoint", "recipes",
    "fit_one_cycle", "fine_tune",
    "__version__",
]
