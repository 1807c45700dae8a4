"""Training script for tests/test_distributed.py: run directly (one process) or under
``fastcore-train launch`` (DDP); writes each rank's final weights and history to --out.
With --ckpt the run checkpoints every epoch (--resume continues it); --kill-epoch makes every
rank SIGKILL itself at the start of that epoch."""
import argparse
import json
import os
import signal

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fastcore_train import checkpoint, distributed
from fastcore_train.callbacks import Callback, EarlyStopping
from fastcore_train.train import fit


class KillAt(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_begin(self, epoch):
        if epoch == self.epoch:
            if distributed.is_distributed():  # rank 0 has written the checkpoint when it gets here
                torch.distributed.barrier()
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--crash-rank", type=int, default=-1)
    p.add_argument("--es-check", action="store_true",
                   help="also feed EarlyStopping different values on each rank")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--ckpt")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-epoch", type=int, default=-1)
    args = p.parse_args()

    info = distributed.setup(seed=0, timeout=60)
    if info.rank == args.crash_rank:
        raise RuntimeError(f"deliberate crash on rank {info.rank}")

    # Data and initial weights come from fixed generators, identical in every process.
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(128, 10, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    torch.manual_seed(0)
    layers = [nn.Linear(10, 32), nn.ReLU()]
    if args.dropout:  # per-rank RNG streams (seeded seed + rank) that a resume must continue
        layers.append(nn.Dropout(args.dropout))
    model = nn.Sequential(*layers, nn.Linear(32, 3))
    if args.dropout:
        torch.manual_seed(1000 + info.rank)  # the weights are equal; the masks differ by rank
    os.makedirs(args.out, exist_ok=True)
    if info.is_main:
        torch.save(model.state_dict(), os.path.join(args.out, "init.pt"))

    model = distributed.wrap(model)
    per_rank = args.global_batch // info.world_size // args.grad_accum
    train = distributed.make_loader(TensorDataset(x[:96], y[:96]), per_rank, shuffle=True, seed=7)
    val = distributed.make_loader(TensorDataset(x[96:], y[96:]), 8, shuffle=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.05 * s))
    early = EarlyStopping(patience=100)  # never fires; exercises the cross-rank reduction
    callbacks = [early] + ([KillAt(args.kill_epoch)] if args.kill_epoch >= 0 else [])
    if args.ckpt and not info.is_main:
        def refuse(*a, **kw):
            raise AssertionError(f"rank {info.rank} tried to write a checkpoint")
        checkpoint.atomic_save = refuse
    hist = fit(model, train, epochs=args.epochs, loss_fn=nn.CrossEntropyLoss(), optimizer=opt,
               scheduler=sched, val_loader=val, callbacks=callbacks, grad_accum=args.grad_accum,
               progress=False, checkpoint_dir=args.ckpt, resume=args.resume)

    result = {"history": list(hist), "world_size": info.world_size, "backend": info.backend}
    if args.es_check:
        # rank r sees means[e] -/+ spread[e]: alone, either rank would improve at epoch 2 or 3
        # and not stop at 3; on the means (patience 2) it stops at epoch 3.
        means = [1.0, 0.9, 0.95, 0.97, 0.5, 0.4]
        spread = [0.0, 0.0, 0.2, -0.2, 0.0, 0.0]
        sign = 1 if info.rank % 2 else -1
        es = EarlyStopping(patience=2, restore_best=False)
        es.on_train_begin(model)
        for epoch, (m, d) in enumerate(zip(means, spread)):
            es.on_epoch_end(epoch, {"val_loss": m + sign * d})
            if es.stop_training:
                break
        result.update(es_means=means, es_stopped_epoch=es.stopped_epoch)

    inner = getattr(model, "module", model)
    torch.save(inner.state_dict(), os.path.join(args.out, f"rank{info.rank}.pt"))
    with open(os.path.join(args.out, f"history{info.rank}.json"), "w") as f:
        json.dump(result, f)
    if distributed.is_distributed():
        torch.distributed.barrier()  # gloo can abort if one rank closes its sockets mid-talk
    distributed.cleanup()


if __name__ == "__main__":
    main()
