"""Training script for tests/test_resume.py: one run of fit with every kind of state a resume
must carry (bfloat16 weights with FusedAdamW's float32 masters, a loss scaler whose scale moves,
the fastai one-cycle schedule, BatchNorm statistics, dropout on torch's global RNG, data noise
from Python's and NumPy's global RNGs, a shuffling loader and mixup with generators of their
own, EarlyStopping's counters and best value). ``--kill`` ends the process with SIGKILL at a
chosen point; ``--resume`` continues from the checkpoint. Writes the final state to ``--out``.
"""
import argparse
import os
import random
import signal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import fastcore_train as ft
from fastcore_train import checkpoint
from fastcore_train.callbacks import Callback


class NoisyData(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        # augmentation noise from the two global RNGs a resume must also continue
        noise = random.gauss(0.0, 0.05) + float(np.random.normal(0.0, 0.05))
        return self.x[i] + noise, self.y[i]


class Kill(Callback):
    """SIGKILL this process at the start of epoch ``epoch`` (``mode="epoch"``) or after the
    ``step``-th optimizer step (``mode="step"``)."""

    def __init__(self, mode, epoch, step):
        self.mode, self.epoch, self.step = mode, epoch, step

    def on_epoch_begin(self, epoch):
        if self.mode == "epoch" and epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_step_end(self, step, loss):
        if self.mode == "step" and step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_at_rename(n):
    """SIGKILL at the n-th rename of a checkpoint: its temporary file is written and synced,
    the previous checkpoint still in place."""
    real, count = os.replace, [0]

    def replace(src, dst, *a, **kw):
        if os.path.basename(dst) == checkpoint.CHECKPOINT_FILE:
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst, *a, **kw)

    checkpoint.os.replace = replace


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--kill", choices=["epoch", "step", "write"])
    p.add_argument("--kill-epoch", type=int, default=2, help="0-based epoch the kill falls in")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(1)

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(160, 12, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 0.5).long()
    model = nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2),
                          nn.Linear(32, 3)).to(args.device, torch.bfloat16)
    train = DataLoader(NoisyData(x[:128].bfloat16(), y[:128]), batch_size=16, shuffle=True,
                       generator=torch.Generator().manual_seed(7))
    val = DataLoader(NoisyData(x[128:].bfloat16(), y[128:]), batch_size=32)
    opt = ft.optim.FusedAdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    steps = args.epochs * len(train)
    sched = ft.schedules.OneCycleLR(opt, 3e-2, total_steps=steps, preset="fastai")
    scaler = ft.amp.LossScaler(init_scale=2.0 ** 4, growth_interval=3)
    mixup = ft.Mixup(alpha=0.4, prob=0.5, generator=torch.Generator().manual_seed(5))
    # never stops; monitoring the training loss for a rise, its counters and best value are
    # set at epoch 0 and count up after, so a resume that forgot them would end elsewhere
    early = ft.EarlyStopping(monitor="train_loss", mode="max", patience=100, restore_best=False)
    callbacks = [early]
    if args.kill in ("epoch", "step"):
        callbacks.append(Kill(args.kill, args.kill_epoch, args.kill_epoch * len(train) + 3))
    elif args.kill == "write":
        kill_at_rename(args.kill_epoch + 1)
    hist = ft.fit(model, train, epochs=args.epochs, loss_fn=ft.nn.LabelSmoothingCrossEntropy(0.1),
                  optimizer=opt, scheduler=sched, val_loader=val, mixup=mixup, scaler=scaler,
                  callbacks=callbacks, progress=True, checkpoint_dir=args.ckpt,
                  resume=args.resume)
    if args.device != "cpu":  # the CUDA generator is part of the run's state there
        torch.cuda.synchronize()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "scale": scaler.get_scale(),
                "history": list(hist), "early": early.state_dict(),
                "next_random": (torch.rand(3), random.random(), float(np.random.rand()),
                                torch.rand(3, device=args.device).cpu())},
               args.out)


if __name__ == "__main__":
    main()
