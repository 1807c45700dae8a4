"""Functional fused ops. Each module holds one op: its pure-torch reference and the dispatch
to the compiled kernel (``torch.ops.fastcore_train.*``)."""
from fastcore_train.ops.cross_entropy import cross_entropy, cross_entropy_reference
from fastcore_train.ops.binary_cross_entropy import (binary_cross_entropy,
                                                     binary_cross_entropy_reference)
from fastcore_train.ops.mixup import mixup, mixup_reference
from fastcore_train.ops.cutmix import cutmix, cutmix_reference
from fastcore_train.ops.normalize_mixup import (normalize_cutmix, normalize_cutmix_reference,
                                                normalize_mixup, normalize_mixup_reference)

__all__ = ["cross_entropy", "cross_entropy_reference", "binary_cross_entropy",
           "binary_cross_entropy_reference", "mixup", "mixup_reference", "cutmix",
           "cutmix_reference", "normalize_mixup", "normalize_mixup_reference", "normalize_cutmix",
           "normalize_cutmix_reference"]
