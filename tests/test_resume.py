"""Whole-run checkpoints: a run SIGKILLed and resumed ends bit-identical to an uninterrupted one;
the file is replaced atomically; a checkpoint that does not fit the run is refused before
anything changes."""
import copy
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastcore_train as ft
from fastcore_train import checkpoint
from fastcore_train.callbacks import Callback
from fastcore_train.transfer import GradualUnfreezer, layer_groups

SCRIPT = Path(__file__).parent / "scripts" / "resume_train.py"
ROOT = Path(ft.__file__).resolve().parent.parent
TIMING = ("epoch_time_s", "ms_per_step")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def strip(history):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


# --- a killed process, resumed -----------------------------------------------------------------

def start(out, *args):
    # the package under test, whatever an installed copy says; one thread, as in every run
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(out), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def finish(proc, expect_killed=False):
    out, _ = proc.communicate(timeout=120)
    if expect_killed:
        assert proc.returncode == -9, out  # SIGKILL: no handler, no cleanup ran
    else:
        assert proc.returncode == 0, out
    return out


def assert_same_run(a, b):
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert "master" in sa[i]  # bfloat16 weights: the float32 masters are in the state
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    assert a["scheduler"] == b["scheduler"]
    assert a["scale"] == b["scale"]
    assert strip(a["history"]) == strip(b["history"])
    assert a["early"] == b["early"] and a["early"]["best_epoch"] == 0
    # every RNG stream is where the uninterrupted run left it
    assert torch.equal(a["next_random"][0], b["next_random"][0])
    assert a["next_random"][1:3] == b["next_random"][1:3]
    assert torch.equal(a["next_random"][3], b["next_random"][3])  # the device's generator


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "final.pt"
    finish(start(out))
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("kill", ["step", "write"])
def test_sigkilled_run_resumes_bit_identical(tmp_path, uninterrupted, kill):
    """``step``: killed after the 3rd step of epoch 3 (0-based epoch 2), the checkpoint of
    epoch 2 written. ``write``: killed inside the save after epoch 3, its temporary file written
    and synced but not yet renamed: the resume starts from epoch 2's file."""
    ckpt = tmp_path / "ckpt"
    killed = finish(start(tmp_path / "killed.pt", "--ckpt", ckpt, "--kill", kill),
                    expect_killed=True)
    assert "epoch 2/4" in killed and "epoch 4/4" not in killed
    assert not (tmp_path / "killed.pt").exists()
    leftovers = [p.name for p in ckpt.iterdir() if p.name != checkpoint.CHECKPOINT_FILE]
    if kill == "write":  # the complete, synced temporary file the rename never took
        assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")
    else:
        assert leftovers == []
    saved = checkpoint.read_checkpoint(ckpt)
    assert saved["epoch"] == 1 and len(saved["history"]) == 2  # after epoch 2 (counted from 1)

    resumed = finish(start(tmp_path / "resumed.pt", "--ckpt", ckpt, "--resume"))
    assert "after epoch 2/4" in resumed and "epoch 1/4 " not in resumed
    assert_same_run(uninterrupted, torch.load(tmp_path / "resumed.pt", weights_only=True))
    final = checkpoint.read_checkpoint(ckpt)
    assert (final["epoch"], final["global_step"]) == (3, 32)  # 4 epochs of 8 steps
    assert [p.name for p in ckpt.iterdir()] == [checkpoint.CHECKPOINT_FILE]  # debris removed


@pytest.mark.cuda
def test_sigkilled_cuda_run_resumes_bit_identical(tmp_path):
    """The same on the GPU: FusedAdamW's CUDA step, dropout on the CUDA generator."""
    finish(start(tmp_path / "reference.pt", "--device", "cuda"))
    ckpt = tmp_path / "ckpt"
    finish(start(tmp_path / "killed.pt", "--ckpt", ckpt, "--kill", "step", "--device", "cuda"),
           expect_killed=True)
    assert checkpoint.read_checkpoint(ckpt)["rng"][0]["cuda"] is not None
    finish(start(tmp_path / "resumed.pt", "--ckpt", ckpt, "--resume", "--device", "cuda"))
    assert_same_run(torch.load(tmp_path / "reference.pt", weights_only=True),
                    torch.load(tmp_path / "resumed.pt", weights_only=True))


# --- in-process resumes ------------------------------------------------------------------------

def digits_like(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    return x, (x[:, :2].sum(1) > 0).long() + (x[:, 2] > 0.5).long()


class Crash(Exception):
    pass


class CrashAt(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_begin(self, epoch):
        if epoch == self.epoch:
            raise Crash()


def unfreezer_run(ckpt, epochs=4, crash=None, resume=False):
    torch.manual_seed(0)
    x, y = digits_like()
    train = DataLoader(TensorDataset(x[:96], y[:96]), batch_size=16, shuffle=True)  # global RNG
    val = DataLoader(TensorDataset(x[96:], y[96:]), batch_size=24)
    model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1),
                          nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.AdamW(model[6].parameters(), lr=3e-3)
    cbs = [GradualUnfreezer(model, opt, layer_groups(model), lrs=slice(1e-4, 3e-3)),
           ft.callbacks.Checkpoint(str(ckpt) + "-best.pt")]
    if crash is not None:
        cbs.append(CrashAt(crash))
    hist = ft.fit(model, train, epochs=epochs, loss_fn=nn.CrossEntropyLoss(), optimizer=opt,
                  val_loader=val, callbacks=cbs, progress=False, checkpoint_dir=ckpt,
                  resume=resume)
    return model, opt, hist, cbs


def test_resume_restores_callbacks_that_reshape_the_optimizer(tmp_path):
    ref_model, ref_opt, ref_hist, ref_cbs = unfreezer_run(tmp_path / "ref")
    with pytest.raises(Crash):
        unfreezer_run(tmp_path / "run", crash=2)
    model, opt, hist, cbs = unfreezer_run(tmp_path / "run", resume=True)
    assert len(opt.param_groups) == len(ref_opt.param_groups) == 4  # head, BN, then 2 groups
    for k, v in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert strip(hist) == strip(ref_hist)
    assert cbs[0].n_frozen == ref_cbs[0].n_frozen == 0
    assert (cbs[1].best, cbs[1].best_epoch) == (ref_cbs[1].best, ref_cbs[1].best_epoch)


def plain_run(ckpt, epochs=3, callbacks=(), resume=False, model=None, generator=False,
              **kwargs):
    torch.manual_seed(0)
    x, y = digits_like()
    g = torch.Generator().manual_seed(1) if generator else None
    train = DataLoader(TensorDataset(x[:96], y[:96]), batch_size=32, shuffle=True, generator=g)
    val = DataLoader(TensorDataset(x[96:], y[96:]), batch_size=24)
    model = model if model is not None else nn.Sequential(nn.Linear(10, 8), nn.ReLU(),
                                                          nn.Linear(8, 3))
    opt = ft.optim.FusedAdamW(model.parameters(), lr=1e-2)
    hist = ft.fit(model, train, epochs=epochs, loss_fn=nn.CrossEntropyLoss(), optimizer=opt,
                  val_loader=val, callbacks=list(callbacks), progress=False,
                  checkpoint_dir=ckpt, resume=resume, **kwargs)
    return model, opt, hist


def test_resume_after_early_stop_trains_no_more_and_restores_best(tmp_path):
    class Worse(Callback):  # validation gets worse every epoch after the first
        def on_epoch_end(self, epoch, logs):
            logs["val_loss"] = float(epoch)

    es = ft.EarlyStopping(patience=2)
    model, _, hist = plain_run(tmp_path, epochs=10, callbacks=[Worse(), es])
    assert len(hist) == 3 and es.stopped_epoch == 2 and checkpoint.read_checkpoint(tmp_path)[
        "stopped"]
    final = copy.deepcopy(model.state_dict())

    es2, steps = ft.EarlyStopping(patience=2), []

    class Steps(Callback):
        def on_step_end(self, step, loss):
            steps.append(step)

    model2, _, hist2 = plain_run(tmp_path, epochs=10, callbacks=[Worse(), es2, Steps()],
                                 resume=True)
    assert steps == [] and strip(hist2) == strip(hist)
    assert es2.stopped_epoch == 2 and es2.best_epoch == 0
    for k, v in final.items():  # the best (epoch 0) weights, restored by on_train_end again
        assert torch.equal(model2.state_dict()[k], v)


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path, caplog):
    ref_model, _, ref_hist = plain_run(None)
    with caplog.at_level(logging.INFO, logger="fastcore_train.train"):
        model, _, hist = plain_run(tmp_path / "new", resume=True)
    assert "starting from scratch" in caplog.text
    assert strip(hist) == strip(ref_hist)
    assert all(torch.equal(v, ref_model.state_dict()[k]) for k, v in model.state_dict().items())
    assert checkpoint.read_checkpoint(tmp_path / "new")["epoch"] == 2
    with caplog.at_level(logging.WARNING, logger="fastcore_train.train"):
        plain_run(tmp_path / "new", epochs=1)  # a new run over an old checkpoint: said aloud
    assert "will be replaced" in caplog.text


def test_checkpoint_is_plain_data_and_complete(tmp_path):
    plain_run(tmp_path, epochs=2, callbacks=[ft.EarlyStopping()], generator=True,
              scaler=ft.amp.LossScaler(init_scale=8.0))
    state = torch.load(tmp_path / "last.pt", weights_only=True)  # no code needed to read it
    assert {"model", "optimizer", "scheduler", "scaler", "callbacks", "history", "meta", "epoch",
            "global_step", "rng", "stopped"} <= set(state)
    assert state["global_step"] == 6 and state["epoch"] == 1 and state["scaler"]["scale"] == 8.0
    rng = state["rng"][0]
    assert set(rng) == {"torch", "cuda", "python", "numpy", "generators"}
    assert list(rng["generators"]) == ["train"]  # the loader's and its sampler's: one object
    assert state["callbacks"][0]["type"].endswith("EarlyStopping")
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.atomic_save({"a": torch.ones(2)}, path)
    with pytest.raises(Exception):
        checkpoint.atomic_save({"a": lambda: 0}, path)  # cannot be pickled
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("case,match", [
    ("model", "does not match"),
    ("callbacks", "callbacks"),
    ("generator", "RNG streams"),
    ("scaler", "loss scaler"),
    ("epochs", "past this run's epochs"),
])
def test_a_checkpoint_that_does_not_fit_is_refused_before_anything_changes(tmp_path, case,
                                                                           match):
    plain_run(tmp_path, epochs=3, callbacks=[ft.EarlyStopping()])
    torch.manual_seed(5)
    width = 9 if case == "model" else 8
    model = nn.Sequential(nn.Linear(10, width), nn.ReLU(), nn.Linear(width, 3))
    before = copy.deepcopy(model.state_dict())
    kwargs = dict(callbacks=[] if case == "callbacks" else [ft.EarlyStopping()],
                  generator=case == "generator", epochs=2 if case == "epochs" else 3)
    if case == "scaler":
        kwargs["scaler"] = ft.amp.LossScaler()
    with pytest.raises(ValueError, match=match):
        plain_run(tmp_path, resume=True, model=model, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_checkpoint_arguments(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_dir"):
        plain_run(None, resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        plain_run(tmp_path / "file")
    torch.save({"model": {}}, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="not a fastcore_train run checkpoint"):
        plain_run(tmp_path, resume=True)


def test_early_stopping_state_round_trip():
    es = ft.EarlyStopping(patience=3)
    es.on_train_begin(nn.Linear(2, 2))
    for e, v in enumerate([1.0, 0.5, 0.7, 0.8]):
        es.on_epoch_end(e, {"val_loss": v})
    other = ft.EarlyStopping(patience=3)
    other.on_train_begin(nn.Linear(2, 2))
    other.load_state_dict(copy.deepcopy(es.state_dict()))
    assert (other.best, other.best_epoch, other.wait) == (0.5, 1, 2)
    other.on_epoch_end(4, {"val_loss": 0.9})  # the third epoch without improvement
    assert other.stop_training and other.stopped_epoch == 4
    with pytest.raises(ValueError, match="lacks"):
        other.load_state_dict({"best": 1.0})
