"""fastcore_train: fused kernels and training recipes for PyTorch."""
from fastcore_train._backend import backend, backend_reason
from fastcore_train import ops, nn
from fastcore_train.nn import MixedTarget

__version__ = "0.1.0"

__all__ = ["backend", "backend_reason", "ops", "nn", "MixedTarget", "__version__"]
