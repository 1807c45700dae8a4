import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from fastcore_train.callbacks import Callback, EarlyStopping
from fastcore_train.nn import LabelSmoothingCrossEntropy, MixedTarget
from fastcore_train.train import History, accuracy, evaluate, fit
from fastcore_train.transfer import GradualUnfreezer, layer_groups


@pytest.fixture(autouse=True)
def one_thread():
    # Models this small are dominated by thread synchronisation; one thread is faster and
    # immune to other processes competing for the cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return TensorDataset(x[:1400], y[:1400]), TensorDataset(x[1400:], y[1400:])


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def loaders(digits, batch=64, shuffle=True):
    train, val = digits
    g = torch.Generator().manual_seed(0)
    return (DataLoader(train, batch_size=batch, shuffle=shuffle, generator=g),
            DataLoader(val, batch_size=256))


def test_fit_learns_digits_and_reports_true_metrics(digits):
    model = mlp()
    train, val = loaders(digits)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    epochs = 6
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=epochs * len(train))
    hist = fit(model, train, epochs=epochs, loss_fn=nn.CrossEntropyLoss(), optimizer=opt,
               scheduler=sched, val_loader=val, progress=False)

    assert isinstance(hist, History) and len(hist) == epochs
    assert hist[-1]["val_accuracy"] >= 0.90
    assert hist["train_loss"][-1] < hist["train_loss"][0]
    # the scheduler advanced once per optimizer step, and every step was taken
    assert sched.last_epoch == epochs * len(train)
    assert hist[-1]["lr"] == opt.param_groups[0]["lr"]
    assert all(r["ms_per_step"] > 0 and r["epoch_time_s"] > 0 for r in hist)

    # the logged validation numbers are those torch computes for the final model
    xv, yv = digits[1].tensors
    model.eval()
    with torch.no_grad():
        logits = model(xv)
    assert hist[-1]["val_loss"] == pytest.approx(F.cross_entropy(logits, yv).item(), rel=1e-5)
    assert hist[-1]["val_accuracy"] == pytest.approx((logits.argmax(1) == yv).float().mean().item())


def test_train_loss_is_the_sample_mean(digits):
    model = mlp()
    train, _ = loaders(digits, batch=300, shuffle=False)  # 1400 = 4 * 300 + 200: uneven batches
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay put
    hist = fit(model, train, epochs=1, loss_fn=nn.CrossEntropyLoss(), optimizer=opt,
               progress=False)
    x, y = digits[0].tensors
    with torch.no_grad():
        expected = F.cross_entropy(reference(x), y).item()
    assert hist[0]["train_loss"] == pytest.approx(expected, rel=1e-6)


def _final_weights(digits, batch, grad_accum, scaler=None):
    model = mlp()
    train, _ = loaders(digits, batch=batch, shuffle=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9 ** s)
    fit(model, train, epochs=1, loss_fn=nn.CrossEntropyLoss(), optimizer=opt, scheduler=sched,
        grad_accum=grad_accum, scaler=scaler, progress=False)
    return model.state_dict(), sched.last_epoch


def test_grad_accum_equals_the_larger_batch(digits):
    big, steps_big = _final_weights(digits, batch=40, grad_accum=1)
    acc, steps_acc = _final_weights(digits, batch=20, grad_accum=2)
    assert steps_big == steps_acc == 35
    for k in big:
        torch.testing.assert_close(acc[k], big[k], rtol=1e-5, atol=1e-6)


def test_grad_accum_steps_on_a_trailing_partial_accumulation(digits):
    _, steps = _final_weights(digits, batch=200, grad_accum=3)  # 7 batches: 3 + 3 + 1
    assert steps == 3


def test_scaler_is_used_for_every_step(digits):
    plain, _ = _final_weights(digits, batch=100, grad_accum=1)
    # a power-of-two scale is exact, so scale/unscale must reproduce the unscaled run
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaled, _ = _final_weights(digits, batch=100, grad_accum=1, scaler=scaler)
    for k in plain:
        torch.testing.assert_close(scaled[k], plain[k], rtol=1e-6, atol=1e-7)
    assert scaler.get_scale() == 2.0 ** 12


def test_amp_dtype_autocasts_training_and_validation(digits):
    model = mlp()
    dtypes = []
    model[0].register_forward_hook(lambda m, i, o: dtypes.append((m.training, o.dtype)))
    train, val = loaders(digits, batch=700)
    fit(model, train, epochs=1, loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1), val_loader=val,
        amp_dtype=torch.bfloat16, progress=False)
    assert dtypes == [(True, torch.bfloat16)] * 2 + [(False, torch.bfloat16)] * 2
    assert model[0].weight.dtype == torch.float32


def test_mixup_applies_to_training_batches_only(digits):
    calls = []

    def mixup(x, y):
        calls.append(len(x))
        perm = torch.arange(len(x)).flip(0)
        return 0.7 * x + 0.3 * x[perm], MixedTarget(y, y[perm], 0.7)

    model = mlp()
    train, val = loaders(digits, batch=100)
    hist = fit(model, train, epochs=2, loss_fn=LabelSmoothingCrossEntropy(0.1), mixup=mixup,
               optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3), val_loader=val,
               progress=False)
    assert calls == [100] * 28
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in hist)
    assert hist[-1]["val_accuracy"] > 0.5


class Recorder(Callback):
    def __init__(self, stop_at_step=None):
        self.events, self.stop_at_step = [], stop_at_step

    def on_train_begin(self, model):
        self.events.append("train_begin")

    def on_epoch_begin(self, epoch):
        self.events.append(f"epoch_begin {epoch}")

    def on_step_end(self, step, loss):
        assert loss.dim() == 0 and not loss.requires_grad
        self.events.append(f"step {step}")
        if step == self.stop_at_step:
            self.stop_training = True

    def on_epoch_end(self, epoch, logs):
        self.events.append(f"epoch_end {epoch} {sorted(logs)}")

    def on_train_end(self, model):
        self.events.append("train_end")


def test_callback_order_and_step_stop(digits):
    model = mlp()
    train, val = loaders(digits, batch=700)
    rec = Recorder(stop_at_step=3)
    hist = fit(model, train, epochs=5, loss_fn=nn.CrossEntropyLoss(), val_loader=val,
               optimizer=torch.optim.SGD(model.parameters(), lr=0.1), callbacks=[rec],
               metrics={}, progress=False)
    keys = ["epoch", "epoch_time_s", "lr", "ms_per_step", "train_loss", "val_loss"]
    assert rec.events == ["train_begin", "epoch_begin 0", "step 1", "step 2",
                          f"epoch_end 0 {keys}", "epoch_begin 1", "step 3",
                          f"epoch_end 1 {keys}", "train_end"]
    assert len(hist) == 2


def test_early_stopping_inside_fit_stops_on_nan_and_restores(digits):
    model = mlp()
    train, val = loaders(digits, batch=700)

    class PoisonAfter(Callback):  # makes validation NaN from the third epoch on
        epoch = 0

        def on_epoch_begin(self, epoch):
            self.epoch = epoch

    poison = PoisonAfter()

    def loss_fn(logits, y):
        loss = F.cross_entropy(logits, y)
        return loss * math.nan if (not torch.is_grad_enabled() and poison.epoch >= 2) else loss

    snapshots = []

    class Snap(Callback):
        def on_epoch_end(self, epoch, logs):
            snapshots.append(copy.deepcopy(model.state_dict()))

    es = EarlyStopping(patience=5)
    hist = fit(model, train, epochs=10, loss_fn=loss_fn, val_loader=val,
               optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
               callbacks=[poison, Snap(), es], progress=False)
    assert len(hist) == 3 and es.stopped_epoch == 2 and math.isnan(hist[-1]["val_loss"])
    best = min(range(2), key=lambda e: hist[e]["val_loss"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots[best][k])


def test_gradual_unfreezer_as_fit_callback(digits):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 10))
    opt = torch.optim.AdamW(model[4].parameters(), lr=1e-3)
    unf = GradualUnfreezer(model, opt, layer_groups(model), lrs=slice(1e-4, 1e-3))
    first = model[0].weight.clone()
    train, _ = loaders(digits, batch=700)
    fit(model, train, epochs=2, loss_fn=nn.CrossEntropyLoss(), optimizer=opt, callbacks=[unf],
        progress=False)
    # epoch 0 trains the head, epoch 1 also the middle layer; the first is unfrozen only after
    assert torch.equal(model[0].weight, first)
    assert len(opt.param_groups) == 3 and all(p.requires_grad for p in model.parameters())


def test_progress_output(digits, capsys):
    model = mlp()
    train, val = loaders(digits, batch=700)
    fit(model, train, epochs=1, loss_fn=nn.CrossEntropyLoss(), val_loader=val,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1), progress=True)
    out = capsys.readouterr().out
    assert "epoch 1/1 " in out and "val_accuracy=" in out


def test_evaluate_and_accuracy():
    logits = torch.tensor([[0.1, 2.0], [3.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([1, 1, 1])
    assert accuracy(logits, y).item() == pytest.approx(2 / 3)
    with pytest.raises(TypeError, match="class-index"):
        accuracy(logits, y.float())
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    loader = DataLoader(TensorDataset(logits, y), batch_size=2)
    out = evaluate(model, loader, nn.CrossEntropyLoss())
    assert out["val_loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert out["val_accuracy"] == pytest.approx(2 / 3)


def test_bad_grad_accum():
    with pytest.raises(ValueError, match="grad_accum"):
        fit(nn.Linear(1, 1), [], epochs=1, loss_fn=F.mse_loss,
            optimizer=torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1), grad_accum=0)
