"""Whole-run checkpoints: what :func:`fastcore_train.fit` needs to continue a run as if it had
never stopped.

``fit(..., checkpoint_dir=d)`` writes ``d/last.pt`` after every epoch; ``fit(..., resume=True)``
reads it back. It holds the model, the optimizer (FusedAdamW/FusedSGD keep their float32 master
weights in their state, so ``state_dict()`` carries them), the LR scheduler, the loss scaler,
the state of every callback that has ``state_dict``/``load_state_dict``, the History, the epoch
and step counts, and every rank's RNG streams: torch CPU and CUDA, Python's ``random``, NumPy's
global generator and the ``torch.Generator`` objects of the loaders, their samplers and mixup
(so the next epoch shuffles, drops out and mixes as the uninterrupted run would).

The file is replaced atomically (written to a temporary file in the same folder, flushed to
disk, renamed over the old one): a run killed at any instant leaves the previous epoch's
checkpoint or the new one, never a torn file. Under DDP every rank takes part in the save (its
RNG states travel to rank 0), only rank 0 writes, and every rank loads; the folder must be
visible to all ranks, and every rank must pass the same ``checkpoint_dir``. Files are read with
``torch.load(weights_only=True)``: no code in them runs, so every saved state must be plain
data (tensors, numbers, strings, containers).

What cannot be continued exactly: the RNG state inside DataLoader worker processes kept alive
across epochs (``persistent_workers=True``; without it each epoch's workers are seeded from the
loader's generator, which is saved), the position inside an ``IterableDataset``, and RNG
streams of objects the checkpoint does not know (give such a callback ``state_dict``).
"""
from __future__ import annotations

import logging
import os
import random
import uuid
from typing import Any, Dict, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from fastcore_train import distributed

__all__ = ["CHECKPOINT_FILE", "checkpoint_path", "atomic_save", "read_checkpoint",
           "generators_of", "rng_state", "set_rng_state", "save_run", "load_run"]

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "last.pt"
_FORMAT = "fastcore_train.run/1"


def checkpoint_path(checkpoint_dir) -> str:
    """The file ``fit`` keeps its latest checkpoint in: ``checkpoint_dir/last.pt``."""
    return os.path.join(os.fspath(checkpoint_dir), CHECKPOINT_FILE)


def atomic_save(obj: Any, path) -> None:
    """``torch.save(obj, path)`` that a crash never leaves half-written: the bytes go to a
    temporary file in the same folder (a rename is atomic only within one file system), are
    fsynced, and the file is renamed over ``path``; the folder is fsynced so the rename
    survives a power loss too. On an error the temporary file is removed and ``path`` is left
    as it was."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        # O_EXCL: never write through someone else's file; 0o666 & ~umask, as torch.save would
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened; the rename is done anyway
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def read_checkpoint(checkpoint_dir, *, mmap: bool = False) -> Optional[dict]:
    """The run checkpoint in ``checkpoint_dir`` as saved (``None`` when there is none).

    ``mmap=True`` maps the tensors instead of reading them (cheap when only the History or
    the epoch is wanted)."""
    path = checkpoint_path(checkpoint_dir)
    if not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise RuntimeError(f"cannot read the checkpoint {path}: {e} (every saved state must be "
                           "plain data: tensors, numbers, strings, lists, dicts)") from e
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a fastcore_train run checkpoint (written by "
                         "fit(..., checkpoint_dir=...)); point checkpoint_dir elsewhere")
    return state


# ---------------------------------------------------------------------------------------------
# RNG streams

def generators_of(**holders: Any) -> Dict[str, torch.Generator]:
    """The ``torch.Generator`` objects a run draws from besides the global ones, by name:
    ``generators_of(train=loader, mixup=mixup)`` finds ``loader.generator`` (the DataLoader's
    worker base seed), ``loader.sampler.generator`` (the shuffle), the batch sampler's sampler's
    and ``mixup.generator``. One object reachable two ways is listed once."""
    found: Dict[str, torch.Generator] = {}
    seen = set()
    for name, obj in holders.items():
        if obj is None:
            continue
        batch_sampler = getattr(obj, "batch_sampler", None)
        candidates = [
            (name, getattr(obj, "generator", None)),
            (f"{name}.sampler", getattr(getattr(obj, "sampler", None), "generator", None)),
            (f"{name}.batch_sampler.sampler",
             getattr(getattr(batch_sampler, "sampler", None), "generator", None)),
        ]
        for key, g in candidates:
            if isinstance(g, torch.Generator) and id(g) not in seen:
                seen.add(id(g))
                found[key] = g
    return found


def rng_state(generators: Optional[Dict[str, torch.Generator]] = None) -> dict:
    """This process's RNG states as plain data (see :func:`set_rng_state`)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        # CUDA's generators live on the host; reading them is cheap, but querying an
        # uninitialised CUDA would create contexts on every GPU. Unused, they need no saving.
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    return state


def set_rng_state(state: dict, generators: Optional[Dict[str, torch.Generator]] = None) -> None:
    """Put back the RNG states :func:`rng_state` returned. Generators are matched by name; a
    generator saved but not found now (or found but not saved) raises before anything changes.
    """
    _check_generators(state, generators)
    saved, generators = state.get("generators", {}), generators or {}
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = state["cuda"][:torch.cuda.device_count()]
        for i, s in enumerate(cuda):
            torch.cuda.set_rng_state(s, i)
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    for k, g in generators.items():
        g.set_state(saved[k])


def _check_generators(state: dict, generators: Optional[Dict[str, torch.Generator]]) -> None:
    saved, now = sorted(state.get("generators", {})), sorted(generators or {})
    if saved != now:
        raise ValueError(f"the checkpoint's RNG streams {saved} do not match this run's {now}: "
                         "build the loaders and mixup as in the saved run (with or without "
                         "their own torch.Generator)")


def _as_tuple(x):
    # random.setstate wants tuples all the way down; a checkpoint may hand back lists
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------------------------------------
# The run: save after an epoch, load before training


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP's wrapped model: no "module." prefix


def _type_name(obj: Any) -> Optional[str]:
    return None if obj is None else f"{type(obj).__module__}.{type(obj).__qualname__}"


def _stateful(cb: Any) -> bool:
    return callable(getattr(cb, "state_dict", None)) and callable(
        getattr(cb, "load_state_dict", None))


def _gather_rng(generators) -> Optional[list]:
    """Every rank's RNG states on rank 0 (a list by rank); ``None`` on the other ranks."""
    mine = rng_state(generators)
    if not distributed.is_distributed():
        return [mine]
    everyone = [None] * dist.get_world_size() if distributed.is_main_process() else None
    dist.gather_object(mine, everyone, dst=0)
    return everyone


def save_run(checkpoint_dir, *, model, optimizer, scheduler=None, scaler=None,
             callbacks: Sequence = (), history: Sequence = (), meta: Optional[dict] = None,
             epoch: int, epochs: int, global_step: int, stopped: bool,
             generators: Optional[Dict[str, torch.Generator]] = None) -> None:
    """Write the run's state after ``epoch`` (counted from 0). Every rank must call it (the RNG
    states are gathered); only rank 0 writes."""
    rng = _gather_rng(generators)
    if not distributed.is_main_process():
        return
    state = {
        "format": _FORMAT,
        "epoch": int(epoch),
        "epochs": int(epochs),
        "global_step": int(global_step),
        "stopped": bool(stopped),
        "world_size": distributed.world_size(),
        "model": _inner(model).state_dict(),
        "optimizer_type": _type_name(optimizer),
        "optimizer": optimizer.state_dict(),
        "scheduler_type": _type_name(scheduler),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "callbacks": [{"type": _type_name(cb), "state": cb.state_dict()}
                      for cb in callbacks if _stateful(cb)],
        "history": [dict(row) for row in history],
        "meta": dict(meta or {}),
        "rng": rng,
    }
    path = checkpoint_path(checkpoint_dir)
    atomic_save(state, path)
    # temporary files of saves that a kill interrupted (each the size of a checkpoint)
    debris = f".{CHECKPOINT_FILE}."
    for name in os.listdir(os.path.dirname(os.path.abspath(path))):
        if name.startswith(debris) and name.endswith(".tmp"):
            try:
                os.remove(os.path.join(os.path.dirname(os.path.abspath(path)), name))
            except OSError:
                pass


def _agree_on_presence(path: str, state: Optional[dict]) -> None:
    """Under DDP, raise on every rank unless all ranks found the same checkpoint."""
    if not distributed.is_distributed():
        return
    mine = None if state is None else (state["epoch"], state["global_step"])
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, mine)
    if any(v != views[0] for v in views):
        raise RuntimeError(f"the ranks disagree on the checkpoint {path} (epoch, step by rank: "
                           f"{views}); checkpoint_dir must be one folder every rank sees")


def _check_model(state_dict: dict, model: torch.nn.Module, path: str) -> None:
    own = _inner(model).state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state_dict and isinstance(v, torch.Tensor)
              and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = [f"missing {missing[:5]}" if missing else "",
                 f"unexpected {unexpected[:5]}" if unexpected else "",
                 f"shapes differ: {shapes[:5]}" if shapes else ""]
        raise ValueError(f"the model does not match the checkpoint {path}: "
                         + "; ".join(p for p in parts if p))


def load_run(checkpoint_dir, *, model, optimizer, scheduler=None, scaler=None,
             callbacks: Sequence = (), epochs: int,
             generators: Optional[Dict[str, torch.Generator]] = None) -> Optional[dict]:
    """Restore a run saved by :func:`save_run` into freshly built objects; returns the saved
    ``epoch``, ``global_step``, ``stopped``, ``history`` and ``meta`` (``None`` when the folder
    holds no checkpoint yet: the run starts from scratch).

    Everything that can be checked is checked before anything changes: the model's keys and
    shapes, the optimizer, scheduler and scaler against what was saved, the callbacks that keep
    state (same classes in the same order) and the epoch count. Every rank calls it.
    """
    path = checkpoint_path(checkpoint_dir)
    state = read_checkpoint(checkpoint_dir)
    _agree_on_presence(path, state)
    if state is None:
        return None

    _check_model(state["model"], model, path)
    for what, saved_type, obj in (("optimizer", state["optimizer_type"], optimizer),
                                  ("scheduler", state["scheduler_type"], scheduler)):
        if saved_type != _type_name(obj):
            raise ValueError(f"the checkpoint {path} was saved with {what} {saved_type}, this run "
                             f"has {_type_name(obj)}; resume with the run's own set-up")
    if (state["scaler"] is None) != (scaler is None):
        had = "with" if state["scaler"] is not None else "without"
        raise ValueError(f"the checkpoint {path} was saved {had} a loss scaler; pass scaler= as "
                         "in the saved run")
    stateful = [cb for cb in callbacks if _stateful(cb)]
    saved_cbs = [c["type"] for c in state["callbacks"]]
    if saved_cbs != [_type_name(cb) for cb in stateful]:
        raise ValueError(f"the checkpoint {path} holds the state of callbacks {saved_cbs}, this "
                         f"run has {[_type_name(cb) for cb in stateful]}; pass the same "
                         "callbacks in the same order")
    if state["epoch"] + 1 > epochs:
        raise ValueError(f"the checkpoint {path} is at epoch {state['epoch'] + 1}, past this "
                         f"run's epochs={epochs}")
    rng = state["rng"]
    mine = rng[distributed.rank()] if distributed.rank() < len(rng) else None
    if mine is not None:
        _check_generators(mine, generators)

    # Callbacks first: one may reshape the optimizer (GradualUnfreezer adds param groups).
    for cb, saved in zip(stateful, state["callbacks"]):
        cb.load_state_dict(saved["state"])
    optimizer.load_state_dict(state["optimizer"])
    _inner(model).load_state_dict(state["model"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(state["scaler"])
    if mine is None or len(rng) != distributed.world_size():
        log.warning("the checkpoint %s was saved by %d processes, this run has %d: the RNG "
                    "streams are not continued exactly", path, len(rng),
                    distributed.world_size())
    if mine is not None:
        set_rng_state(mine, generators)
    return {k: state[k] for k in ("epoch", "global_step", "stopped", "history", "meta")}
