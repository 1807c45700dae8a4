"""Multi-process data-parallel training on ``torch.distributed``, launched by ``torchrun``.

A training script calls :func:`setup` first; it reads the environment ``torchrun`` sets (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and initialises the process group, or, when the
script was started without ``torchrun``, returns a single-process description and does nothing,
so one script runs both ways::

    info = distributed.setup(seed=0)
    model = distributed.wrap(model.to(info.device))
    loader = distributed.make_loader(dataset, batch_size=64)     # per-process batch size
    ...
    distributed.cleanup()

and is started with ``fastcore-train launch --nproc-per-node 2 train.py`` (or ``torchrun``).
The package has no launcher of its own: :func:`launch` hands its arguments to
``torch.distributed.run``.
"""
from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = [
    "DistInfo", "setup", "cleanup", "wrap", "distributed_sampler", "make_loader",
    "is_distributed", "is_main_process", "rank", "world_size", "all_reduce_mean",
    "launch", "torchrun",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its global ``rank``, the ``world_size``, its ``local_rank`` on
    the node, the ``device`` it should use and the process-group ``backend`` (``None`` when not
    distributed)."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def setup(backend: Optional[str] = None, seed: Optional[int] = 0,
          timeout: Union[float, timedelta] = timedelta(minutes=10)) -> DistInfo:
    """Initialise the default process group from the ``torchrun`` environment.

    ``backend`` defaults to NCCL when CUDA is available and gloo otherwise. On GPU the process
    uses ``cuda:LOCAL_RANK``. The Python, NumPy and torch RNGs are seeded with ``seed + rank`` so
    that data augmentation differs across ranks (model weights need not: :func:`wrap` broadcasts
    rank 0's); ``seed=None`` leaves them alone. ``timeout`` (seconds or a timedelta) bounds how long
    a collective waits for a missing rank before failing. Without ``RANK``/``WORLD_SIZE`` in the
    environment nothing is initialised and a single-process :class:`DistInfo` is returned.
    Calling it again returns the same description.
    """
    if not isinstance(timeout, timedelta):
        timeout = timedelta(seconds=float(timeout))
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        if seed is not None:
            _seed_everything(seed)
        return DistInfo(0, 1, 0, device, None)

    rank_, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank_))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if torch.cuda.is_available() and backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        # device_id binds NCCL's communicator to this rank's GPU up front
        extra = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank_, world_size=world, timeout=timeout,
                                **extra)
    if seed is not None:
        _seed_everything(seed + rank_)
    return DistInfo(rank_, world, local_rank, device, dist.get_backend())


def cleanup() -> None:
    """Destroy the default process group if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one that logs, prints and saves."""
    return rank() == 0


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo takes CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``tensor`` over all ranks (a new tensor, on ``tensor``'s device);
    ``tensor`` itself when not distributed. Every rank must call it."""
    if not is_distributed():
        return tensor
    dtype = torch.promote_types(tensor.dtype, torch.float32)  # a mean of integers is fractional
    t = tensor.detach().to(_collective_device(), dtype=dtype, copy=True)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).to(tensor.device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all ranks (a new tensor); ``tensor`` itself when
    not distributed. Every rank must call it."""
    if not is_distributed():
        return tensor
    t = tensor.detach().to(_collective_device(), copy=True)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.to(tensor.device)


def wrap(model: torch.nn.Module, **ddp_kwargs) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` on this process's device (``device_ids`` on GPU), or
    ``model`` unchanged when not distributed. Rank 0's weights are broadcast to all ranks."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel
    if dist.get_backend() == "nccl":
        device = _collective_device()
        model = model.to(device)
        ddp_kwargs.setdefault("device_ids", [device.index])
        ddp_kwargs.setdefault("output_device", device.index)
    return DistributedDataParallel(model, **ddp_kwargs)


def distributed_sampler(dataset: Dataset, shuffle: bool = True, seed: int = 0,
                        drop_last: bool = False) -> DistributedSampler:
    """A :class:`DistributedSampler` over this process's shard (the whole dataset when not
    distributed). Call ``sampler.set_epoch(epoch)`` each epoch (``fit`` does) to reshuffle.

    The permutation depends on ``seed`` and the epoch only, and rank ``r`` takes every
    ``world_size``-th index from ``r``; so with a per-process batch of ``B / world_size`` the
    ranks' k-th batches together are exactly the k-th batch of size ``B`` of a single process
    (when the dataset size divides evenly).
    """
    return DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle,
                              seed=seed, drop_last=drop_last)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = True, *, seed: int = 0,
                drop_last: bool = False, **loader_kwargs) -> DataLoader:
    """A DataLoader over this process's shard; ``batch_size`` is per process. See
    :func:`distributed_sampler` for how shards relate to a single-process run."""
    sampler = distributed_sampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      **loader_kwargs)


def torchrun(argv: Sequence[str]) -> int:
    """Run ``torch.distributed.run`` (torchrun) in this process with command-line ``argv``;
    returns 0 on success and 1 when any worker failed (torchrun then stops the others and
    reports the failure on stderr). With one node and no rendezvous options, torchrun picks a
    free port on localhost itself. Must be called from the main thread (it installs signal
    handlers to stop its workers)."""
    from torch.distributed import run as _run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    try:
        _run.main(list(argv))
    except ChildFailedError as e:
        print(e, file=sys.stderr, flush=True)
        return 1
    return 0


def launch(script: str, *script_args: str, nproc_per_node: Union[int, str] = 1,
           torchrun_args: Sequence[str] = ()) -> int:
    """Start ``script`` with ``script_args`` on ``nproc_per_node`` processes through torchrun;
    ``torchrun_args`` are further torchrun options. Returns the exit code (see :func:`torchrun`).
    """
    return torchrun([f"--nproc-per-node={nproc_per_node}", *torchrun_args, script,
                     *map(str, script_args)])
