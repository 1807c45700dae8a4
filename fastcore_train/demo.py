"""`fastcore-train demo`: the same model, data, seed and hardware trained twice.

1. the baseline a typical user writes: Adam at its default lr (1e-3, constant), plain
   cross-entropy, fp32, batch 64;
2. the fast recipe: LR finder -> ``ft.fit_one_cycle`` at the suggested lr, label smoothing +
   mixup through the fused ops, FusedAdamW, bf16 autocast where the hardware has it, early
   stopping.

Both start from the same initial weights and see the same batches' order. The table reports the
epochs and wall time each run took to reach the target validation accuracy (the recipe's time
includes its LR finder), the final accuracy and the time per step, whatever the outcome. Plots go
to the output folder: lr_find.png, schedule.png, curves.png.

Where the recipe wins, and where it cannot: what it adds is a learning rate picked for the model
instead of Adam's 1e-3 (the one-cycle warm-up is what makes that lr usable from the first step).
So the demo model is the tutorial CNN without BatchNorm (see :class:`SmallCNN`): on it 1e-3 is
~30x below the lr the finder picks, and on digits the baseline needs 10-25 epochs to reach 97%
(seeds 0-9) where the recipe needs 2-3 plus its LR finder (about one epoch's time). With
BatchNorm, Adam at 1e-3 already reaches 97% in 3-5 epochs, and a recipe that pays for an LR
finder cannot beat that by much.
"""
from __future__ import annotations

import copy
import math
import os
import pickle
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastcore_train as ft
from fastcore_train import _backend
from fastcore_train.callbacks import Callback

__all__ = ["SmallCNN", "Normalize", "load_data", "run_demo", "demo_lr_find", "RunResult",
           "Recipe"]


class SmallCNN(nn.Module):
    """The tutorial CNN: conv-ReLU, conv-ReLU, max-pool, a hidden ReLU layer, a linear head.

    The layout of PyTorch's MNIST example (without its dropout) at half its width: 16 and 32
    channels, ~72k parameters on 8x8 digits. No BatchNorm, as in most tutorials; that is also
    the case the recipe is for (see the module docstring).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, hidden: int = 128):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            # 4x4 maps for any input size: a no-op on 8x8 digits, 16x16 -> 4x4 on CIFAR-10.
            nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(2 * width * 16, hidden), nn.ReLU(inplace=True),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class Normalize(nn.Module):
    """The first layer of both runs' models: uint8 images -> ``(x - mean) / std`` per channel,
    float32 (mean and std on the images' own scale).

    The loaders yield uint8 batches, as image loaders do. The baseline normalises them in eager
    torch, ``(x.float() - mean) / std``, the way users write it. The recipe's training batches
    arrive here already normalised and mixed by ``ft.Mixup(mean=, std=)`` (one fused pass from
    uint8) and pass through; its validation batches are normalised by the same fused op with no
    mix (``ft.ops.normalize_mixup(x, None, ...)``). Both give the same values.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, fused: bool):
        super().__init__()
        self.fused = fused
        self.register_buffer("mean", mean.float().clone(), persistent=False)
        self.register_buffer("std", std.float().clone(), persistent=False)

    def forward(self, x):
        if x.dtype != torch.uint8:
            return x  # normalised on the way (ft.Mixup)
        if self.fused:
            return ft.ops.normalize_mixup(x, None, 1.0, self.mean, self.std)
        return (x.float() - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


# ---------------------------------------------------------------------------------------------
# data

def _split(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int = 0):
    """A fixed, stratified train/validation split (independent of the run's seed)."""
    rng = np.random.default_rng(seed)
    val_idx = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        val_idx += list(idx[: int(round(len(idx) * val_fraction))])
    val = np.zeros(len(y), dtype=bool)
    val[val_idx] = True
    return (x[~val], y[~val]), (x[val], y[val])


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits demo needs scikit-learn: pip install "
                          "'fastcore_train[demo]' (or scikit-learn)") from e
    d = load_digits()
    # 8x8 images of 0..16 ink levels, kept as such in uint8; normalised with mean 8 and std 8,
    # (v - 8) / 8 == (v/16 - 0.5) / 0.5 exactly in float32
    x = d.images.astype(np.uint8)
    return _split(x[:, None], d.target.astype(np.int64), val_fraction=0.2)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 python batch holds: a dict of bytes, lists of ints and
    bytes, and one uint8 numpy array. Any other global (os.system, builtins.eval, ...) is refused,
    so a crafted file cannot run code: pickle.load would call whatever the file names."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes pickled by Python 3 at protocol 2
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 batch "
                                         "never does")
        if module == "_codecs":
            import codecs
            return codecs.encode
        if name == "_reconstruct":
            core = getattr(np, "_core", None) or np.core
            return core.multiarray._reconstruct
        return getattr(np, name)


def _read_cifar_batch(path):
    """(images (N, 3, 32, 32) uint8, labels (N,) int64) of one batch file, or a ValueError that
    names the file and what is wrong with it."""
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError) as e:
        raise ValueError(f"{name} is not a CIFAR-10 python batch ({type(e).__name__}: {e})") \
            from None
    data = d.get(b"data") if isinstance(d, dict) else None
    labels = d.get(b"labels") if isinstance(d, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32 or not isinstance(labels, list) \
            or len(labels) != data.shape[0] \
            or not all(isinstance(v, int) and 0 <= v < 10 for v in labels):
        raise ValueError(f"{name} is not a CIFAR-10 python batch (expected b'data': uint8 "
                         "(N, 3072) and b'labels': N ints in 0..9)")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _load_cifar10(root: str):
    """CIFAR-10 from the standard python-pickle batches (data_batch_1..5, test_batch)."""
    if root is None:
        raise ValueError("--data cifar10 needs --root, the folder of the python batches")
    folder = root
    if not os.path.exists(os.path.join(folder, "test_batch")):
        folder = os.path.join(root, "cifar-10-batches-py")
    train_files = sorted(f for f in os.listdir(folder) if f.startswith("data_batch_")) \
        if os.path.isdir(folder) else []
    if not train_files or not os.path.exists(os.path.join(folder, "test_batch")):
        raise FileNotFoundError(f"no CIFAR-10 python batches (data_batch_*, test_batch) in {root}")
    parts = [_read_cifar_batch(os.path.join(folder, f)) for f in train_files]
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    xva, yva = _read_cifar_batch(os.path.join(folder, "test_batch"))
    return (xtr, ytr), (xva, yva)


def load_data(name: str = "digits", root: Optional[str] = None):
    """((x_train, y_train), (x_val, y_val), num_classes) as tensors; images are uint8 (B, C, H,
    W), normalised by the model's first layer (see :func:`normalization`)."""
    if name == "digits":
        (xtr, ytr), (xva, yva) = _load_digits()
    elif name == "cifar10":
        (xtr, ytr), (xva, yva) = _load_cifar10(root)
    else:
        raise ValueError(f"unknown dataset {name!r}; expected 'digits' or 'cifar10'")
    t = torch.from_numpy
    return (t(xtr), t(ytr)), (t(xva), t(yva)), int(max(ytr.max(), yva.max()) + 1)


def normalization(name: str, x_train: torch.Tensor):
    """Per-channel (mean, std), float32 (C,), on the uint8 images' scale: digits' 0..16 ink
    levels -> 8, 8; CIFAR-10 -> the training set's statistics (0..255)."""
    if name == "digits":
        return torch.full((1,), 8.0), torch.full((1,), 8.0)
    x = x_train.double().transpose(0, 1).reshape(x_train.shape[1], -1)
    return x.mean(dim=1).float(), x.std(dim=1, unbiased=False).float()


def build_model(in_channels: int, num_classes: int, mean, std, fused: bool) -> nn.Module:
    """``Normalize`` then :class:`SmallCNN`."""
    return nn.Sequential(Normalize(mean, std, fused), SmallCNN(in_channels, num_classes))


def _loader(x, y, batch_size, shuffle, seed):
    g = torch.Generator().manual_seed(seed)
    # Training drops the ragged last batch (every step the same size), unless the data set is
    # smaller than one batch, which would leave no batch at all.
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=g,
                      drop_last=shuffle and len(y) >= batch_size)


# ---------------------------------------------------------------------------------------------
# the two runs

@dataclass
class RunResult:
    name: str
    history: list
    setup_s: float = 0.0            # time before the first epoch (the recipe's LR finder)
    lrs: List[float] = field(default_factory=list)
    max_lr: Optional[float] = None  # the recipe's one-cycle peak, from the LR finder
    amp: Optional[torch.dtype] = None

    def wall_times(self) -> List[float]:
        """Cumulative wall time at the end of each epoch, set-up included."""
        out, t = [], self.setup_s
        for row in self.history:
            t += row["epoch_time_s"]
            out.append(t)
        return out

    def reached(self, target: float) -> Tuple[Optional[int], Optional[float]]:
        """(epochs, seconds) to the first epoch with val accuracy >= target, else (None, None)."""
        for i, (row, t) in enumerate(zip(self.history, self.wall_times())):
            if row.get("val_accuracy", 0.0) >= target:
                return i + 1, t
        return None, None

    @property
    def final_accuracy(self) -> float:
        return self.history[-1]["val_accuracy"] if self.history else math.nan

    @property
    def ms_per_step(self) -> float:
        v = [r["ms_per_step"] for r in self.history]
        return float(np.median(v)) if v else math.nan


class _RecordLR(Callback):
    def __init__(self, optimizer):
        super().__init__()
        self.optimizer, self.lrs = optimizer, []

    def on_step_end(self, step, loss):
        self.lrs.append(self.optimizer.param_groups[0]["lr"])


def _bf16_helps(device: torch.device) -> bool:
    """bf16 autocast pays off only where the hardware computes in bf16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cap = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else ""
    return "AMX" in str(cap).upper()


def run_baseline(model, data, *, epochs, batch_size, seed, device, progress) -> RunResult:
    """What a typical user writes: Adam at its default lr, constant, cross-entropy, fp32."""
    (xtr, ytr), (xva, yva) = data
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    hist = ft.fit(model, _loader(xtr, ytr, batch_size, True, seed), epochs=epochs,
                  loss_fn=nn.CrossEntropyLoss(), optimizer=opt,
                  val_loader=_loader(xva, yva, 512, False, seed), device=device,
                  progress=progress)
    return RunResult("baseline", list(hist))


@dataclass(frozen=True)
class Recipe:
    """The fast recipe's hyperparameters (defaults: the digits demo's, see DEFAULTS)."""
    # The LR range test sweeps up from Adam's default: the question is how much faster than
    # 1e-3 the model can train, and the sweep counts in the recipe's time. On digits the
    # smoothed loss is lowest at lr 0.1-0.2 and rises again by 0.3, so 30 steps over 1e-3..0.3
    # (12 per decade) find the valley (2.8-3.4e-2 on 9 of seeds 0-9) at a quarter of the cost
    # of 100 steps over 1e-5..1 (1.9-2.7e-2); 20 steps scatter it over 1.1-6.7e-2.
    lr_find_start: float = 1e-3
    lr_find_end: float = 0.3
    lr_find_iters: int = 30
    label_smoothing: float = 0.1
    # Mild mixup, on half of the batches: a run of a few epochs has little to regularise, and
    # on digits mixing every batch costs an epoch to the target on some seeds.
    mixup_alpha: float = 0.2
    mixup_prob: float = 0.5
    weight_decay: float = 1e-2
    # One-cycle needs its whole length planned in advance; the budget is set with room to spare
    # (the target is reached in 2-3 epochs) and early stopping ends runs that stop improving.
    patience: int = 2


def run_recipe(model, data, *, epochs, batch_size, seed, device, progress,
               recipe: Recipe = Recipe()) -> Tuple[RunResult, "ft.LRFinderResult"]:
    """LR finder -> fit_one_cycle, fused label smoothing + mixup, FusedAdamW, early stopping."""
    (xtr, ytr), (xva, yva) = data
    torch.manual_seed(seed)
    train = _loader(xtr, ytr, batch_size, True, seed)
    val = _loader(xva, yva, 512, False, seed)
    loss_fn = ft.nn.LabelSmoothingCrossEntropy(smoothing=recipe.label_smoothing)
    norm = model[0] if isinstance(model, nn.Sequential) and isinstance(model[0], Normalize) \
        else None
    # uint8 batch -> normalise + mix in one fused pass (float batches: the blend alone)
    stats = dict(mean=norm.mean, std=norm.std) if norm is not None else {}
    mixup = ft.Mixup(alpha=recipe.mixup_alpha, prob=recipe.mixup_prob,
                     generator=torch.Generator().manual_seed(seed), **stats)
    opt = ft.optim.FusedAdamW(model.parameters(), lr=1e-3, weight_decay=recipe.weight_decay)
    amp = torch.bfloat16 if _bf16_helps(device) else None

    # The sweep runs on the training loader itself, so its lr is for this batch size as is
    # (no scale_lr needed); lr_find restores the weights, optimizer and RNG states afterwards.
    t0 = time.perf_counter()
    finder = ft.lr_find(model, train, loss_fn, opt, start_lr=recipe.lr_find_start,
                        end_lr=recipe.lr_find_end, num_iter=recipe.lr_find_iters,
                        progress=progress)
    setup_s = time.perf_counter() - t0
    max_lr = finder.suggestion or 1e-3
    rec = _RecordLR(opt)
    stop = ft.EarlyStopping(monitor="val_loss", patience=recipe.patience, restore_best=False)
    # fastai's one-cycle (25% cosine warm-up from max_lr/25, cosine down to max_lr/1e5, beta1
    # 0.95 -> 0.85 -> 0.95). fit_one_cycle(lr_max=None) would run the same finder itself; the
    # demo runs it apart to time it and plot its curve.
    hist = ft.fit_one_cycle(model, train, epochs, lr_max=max_lr, val_loader=val,
                            loss_fn=loss_fn, optimizer=opt, mixup=mixup, amp_dtype=amp,
                            callbacks=[rec, stop], device=device, progress=progress)
    res = RunResult("fast recipe", list(hist), setup_s=setup_s, lrs=rec.lrs, max_lr=max_lr,
                    amp=amp)
    return res, finder


# ---------------------------------------------------------------------------------------------
# report

def _table(runs: List[RunResult], target: float) -> str:
    head = ["run", f"epochs to {target:.0%}", f"time to {target:.0%}", "final val acc",
            "ms/step", "epochs run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        ep, t = r.reached(target)
        lines.append("| " + " | ".join([
            r.name, str(ep) if ep else "not reached", f"{t:.2f} s" if t else "-",
            f"{r.final_accuracy:.2%}", f"{r.ms_per_step:.2f}", str(len(r.history))]) + " |")
    return "\n".join(lines)


def _plots(out: str, runs: List[RunResult], finder, target: float) -> List[str]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'fastcore_train[demo]')")
        return []
    paths = [finder.plot(os.path.join(out, "lr_find.png"))]

    recipe = runs[-1]
    fig = Figure(figsize=(7, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(range(1, len(recipe.lrs) + 1), recipe.lrs, color="C3")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"one-cycle schedule (max lr {recipe.max_lr:.2e} from the LR finder)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    paths.append(os.path.join(out, "schedule.png"))
    fig.savefig(paths[-1])

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, r in enumerate(runs):
        t = r.wall_times()
        ax1.plot(t, [h["val_loss"] for h in r.history], marker=".", color=f"C{i}", label=r.name)
        ax2.plot(t, [h["val_accuracy"] for h in r.history], marker=".", color=f"C{i}",
                 label=r.name)
    ax2.axhline(target, color="0.5", linestyle="--", linewidth=0.8, label=f"target {target:.0%}")
    # The recipe's loss includes label smoothing, whose floor is well above 0: compare the
    # shapes of the loss curves, and the accuracies.
    for ax, name in ((ax1, "validation loss (recipe: label-smoothed)"),
                     (ax2, "validation accuracy")):
        ax.set_xlabel("wall time (s), LR finder included")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    paths.append(os.path.join(out, "curves.png"))
    fig.savefig(paths[-1])
    return paths


# Per dataset: epoch budgets, batch sizes and the recipe's settings. On digits both runs use
# batch 64, so the two differ only by the recipe's elements; the baseline's 40 epochs leave room
# for its slowest seeds (up to 25 epochs to 97% on seeds 0-9). The CIFAR-10 settings are not
# tuned: a wider sweep, whose cost is small next to an epoch of 50k images.
DEFAULTS = {"digits": dict(baseline_epochs=40, recipe_epochs=5, baseline_batch=64,
                           recipe_batch=64, recipe=Recipe()),
            "cifar10": dict(baseline_epochs=20, recipe_epochs=8, baseline_batch=128,
                            recipe_batch=256,
                            recipe=Recipe(lr_find_start=1e-5, lr_find_end=1.0,
                                          lr_find_iters=100, patience=3))}


def run_demo(*, data: str = "digits", root: Optional[str] = None, epochs: Optional[int] = None,
             target: float = 0.97, out: str = "demo_out", seed: int = 0, device: str = "cpu",
             progress: bool = True) -> dict:
    """Runs the comparison, prints the table, writes the plots; returns the figures."""
    dev = torch.device(device)
    cfg = DEFAULTS[data]
    base_epochs = epochs or cfg["baseline_epochs"]
    recipe_epochs = epochs or cfg["recipe_epochs"]
    os.makedirs(out, exist_ok=True)
    tr, va, num_classes = load_data(data, root)
    mean, std = normalization(data, tr[0])
    torch.manual_seed(seed)
    model = build_model(tr[0].shape[1], num_classes, mean, std, fused=False).to(dev)
    init = copy.deepcopy(model.state_dict())  # both runs start from the same weights

    print(f"== baseline: Adam lr=1e-3 constant, cross-entropy, fp32, batch "
          f"{cfg['baseline_batch']}, {base_epochs} epochs")
    baseline = run_baseline(model, (tr, va), epochs=base_epochs, batch_size=cfg["baseline_batch"],
                            seed=seed, device=dev, progress=progress)
    model.load_state_dict(init)
    model[0].fused = True  # the recipe normalises in the fused op (same values)
    rc = cfg["recipe"]
    print(f"== fast recipe: LR finder ({rc.lr_find_iters} steps, {rc.lr_find_start:g}.."
          f"{rc.lr_find_end:g}) -> one-cycle, label smoothing {rc.label_smoothing:g} + mixup "
          f"(alpha {rc.mixup_alpha:g} on {rc.mixup_prob:.0%} of batches, normalised from uint8 "
          f"and mixed in one fused op), FusedAdamW, "
          f"early stopping, batch {cfg['recipe_batch']}, {recipe_epochs} epochs")
    recipe, finder = run_recipe(model, (tr, va), epochs=recipe_epochs,
                                batch_size=cfg["recipe_batch"], seed=seed, device=dev,
                                progress=progress, recipe=rc)
    runs = [baseline, recipe]
    table = _table(runs, target)
    (_, tb), (_, tr_) = baseline.reached(target), recipe.reached(target)
    info = _backend.info()
    print()
    print(f"dataset {data}: {len(tr[1])} train / {len(va[1])} validation images, "
          f"{num_classes} classes; device {dev}, {torch.get_num_threads()} threads; "
          f"backend {info['backend']} ({info.get('cpu_kernels', '-')} CPU kernels); "
          f"recipe lr {recipe.max_lr:.2e} (LR finder: {recipe.setup_s:.2f} s), "
          f"autocast {'bf16' if recipe.amp else 'off (no bf16 hardware)'}")
    print(table)
    if tb and tr_:
        print(f"time to {target:.0%}: the fast recipe took {tr_ / tb:.2f}x the baseline's time "
              f"({tb / tr_:.1f}x faster)")
    else:
        print(f"target {target:.0%} not reached by "
              + " and ".join(r.name for r in runs if r.reached(target)[0] is None))
    paths = _plots(out, runs, finder, target)
    if paths:
        print("plots: " + ", ".join(paths))
    return {"table": table, "baseline": baseline, "recipe": recipe, "finder": finder,
            "plots": paths, "speedup": (tb / tr_) if tb and tr_ else None}


def demo_lr_find(*, data: str = "digits", root: Optional[str] = None, out: str = "demo_out",
                 seed: int = 0, device: str = "cpu", num_iter: int = 100, progress=True):
    """`fastcore-train lr-find`: the LR range test on the demo model and data, with its plot.

    A wider sweep than the demo's (1e-5..1, 100 steps by default): here the whole curve is the
    point, not the cost of reading one lr off it."""
    dev = torch.device(device)
    os.makedirs(out, exist_ok=True)
    (xtr, ytr), _, num_classes = load_data(data, root)
    mean, std = normalization(data, xtr)
    torch.manual_seed(seed)
    model = build_model(xtr.shape[1], num_classes, mean, std, fused=True).to(dev)
    loss_fn = ft.nn.LabelSmoothingCrossEntropy(smoothing=0.1)
    opt = ft.optim.FusedAdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    res = ft.lr_find(model, _loader(xtr, ytr, DEFAULTS[data]["recipe_batch"], True, seed),
                     loss_fn, opt, start_lr=1e-5, end_lr=1.0, num_iter=num_iter,
                     progress=progress)
    path = os.path.join(out, "lr_find.png")
    try:
        res.plot(path)
    except ImportError as e:
        print(e)
        path = None
    return res, path
