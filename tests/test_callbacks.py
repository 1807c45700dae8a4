import math

import pytest
import torch
from torch import nn

from fastcore_train.callbacks import Callback, Checkpoint, EarlyStopping


def run(cb, values, model=None, key="val_loss"):
    """Feed one metric value per epoch; returns the epochs seen before the callback stopped."""
    model = model if model is not None else nn.Linear(2, 2)
    cb.on_train_begin(model)
    seen = []
    for epoch, v in enumerate(values):
        with torch.no_grad():
            model.weight.fill_(epoch)  # weights record the epoch they belong to
        cb.on_epoch_end(epoch, {key: v})
        seen.append(epoch)
        if cb.stop_training:
            break
    cb.on_train_end(model)
    return seen, model


def test_patience_counts_epochs_without_improvement():
    es = EarlyStopping(patience=3)
    seen, model = run(es, [1.0, 0.8, 0.9, 0.85, 0.81, 0.5, 0.4])
    assert seen == [0, 1, 2, 3, 4]
    assert es.stopped_epoch == 4 and es.best == 0.8 and es.best_epoch == 1
    assert torch.all(model.weight == 1)  # best epoch's weights restored


def test_improvement_resets_patience():
    es = EarlyStopping(patience=2)
    seen, _ = run(es, [1.0, 1.1, 0.9, 1.0, 0.95, 0.7])
    assert seen == [0, 1, 2, 3, 4]
    assert es.best_epoch == 2


def test_min_delta_and_max_mode():
    es = EarlyStopping(patience=2, min_delta=0.1)
    seen, _ = run(es, [1.0, 0.95, 0.91, 0.5])  # 0.05 and 0.09 are not improvements
    assert seen == [0, 1, 2] and es.best == 1.0

    es = EarlyStopping(monitor="val_accuracy", mode="max", patience=1)
    seen, model = run(es, [0.5, 0.7, 0.6, 0.9], key="val_accuracy")
    assert seen == [0, 1, 2] and es.best == 0.7
    assert torch.all(model.weight == 1)


def test_without_restore_best_the_last_weights_stay():
    es = EarlyStopping(patience=1, restore_best=False)
    _, model = run(es, [1.0, 2.0, 3.0])
    assert torch.all(model.weight == 1)  # stopped at epoch 1, kept epoch 1's weights
    assert es.best_state is None


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_stops_at_once_and_restores_best(bad):
    es = EarlyStopping(patience=10)
    seen, model = run(es, [1.0, 0.5, bad, 0.1])
    assert seen == [0, 1, 2]
    assert "nan" in es.reason or "inf" in es.reason
    assert torch.all(model.weight == 1)


def test_nan_on_first_epoch_leaves_model_alone():
    es = EarlyStopping(patience=10)
    seen, model = run(es, [math.nan])
    assert seen == [0] and es.best_state is None and torch.all(model.weight == 0)


def test_best_state_is_a_copy():
    model = nn.Linear(2, 2)
    es = EarlyStopping(patience=5)
    es.on_train_begin(model)
    es.on_epoch_end(0, {"val_loss": 1.0})
    snapshot = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    es.on_epoch_end(1, {"val_loss": 2.0})
    es.on_train_end(model)
    assert torch.equal(model.weight, snapshot)


def test_missing_metric_and_bad_arguments():
    es = EarlyStopping()
    es.on_train_begin(nn.Linear(1, 1))
    with pytest.raises(KeyError, match="val_loss"):
        es.on_epoch_end(0, {"train_loss": 1.0})
    with pytest.raises(ValueError):
        EarlyStopping(mode="lowest")
    with pytest.raises(ValueError):
        EarlyStopping(patience=0)


def test_restart_resets_state():
    es = EarlyStopping(patience=1)
    run(es, [1.0, 2.0])
    assert es.stop_training
    seen, _ = run(es, [5.0, 4.0, 3.0])
    assert seen == [0, 1, 2] and not es.stop_training and es.best == 3.0


def test_checkpoint_saves_best_and_last(tmp_path):
    best, last = tmp_path / "best.pt", tmp_path / "sub" / "last.pt"
    ck = Checkpoint(str(best), last_path=str(last))
    run(ck, [1.0, 0.5, 0.7])
    saved_best = torch.load(best, weights_only=True)
    saved_last = torch.load(last, weights_only=True)
    assert torch.all(saved_best["weight"] == 1) and torch.all(saved_last["weight"] == 2)
    assert ck.best_epoch == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["best.pt", "last.pt", "sub"]


def test_checkpoint_unwraps_ddp_style_module(tmp_path):
    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    ck = Checkpoint(str(tmp_path / "m.pt"), monitor=None)
    inner = nn.Linear(2, 2)
    ck.on_train_begin(Wrapper(inner))
    ck.on_epoch_end(0, {})
    assert set(torch.load(tmp_path / "m.pt", weights_only=True)) == {"weight", "bias"}


def test_callback_base_is_a_no_op():
    cb = Callback()
    m = nn.Linear(1, 1)
    cb.on_train_begin(m), cb.on_epoch_begin(0), cb.on_step_end(1, torch.tensor(0.0))
    cb.on_epoch_end(0, {}), cb.on_train_end(m)
    assert cb.stop_training is False


def test_usable_in_a_hand_written_loop_without_fit():
    es = EarlyStopping(patience=1)
    stopped = None
    for epoch, v in enumerate([3.0, 2.0, 2.5, 1.0]):
        es.on_epoch_end(epoch, {"val_loss": v})
        if es.stop_training:
            stopped = epoch
            break
    assert stopped == 2 and es.best == 2.0 and es.best_state is None


# ---------------------------------------------------------------------------------------------
# restoring the best weights under an optimizer with fp32 master weights


def _masters_model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def _lr0_step_keeps_weights(model, opt):
    """A step at lr 0 with zero gradients must leave the (restored) weights where they are."""
    restored = [p.detach().clone() for p in model.parameters()]
    for group in opt.param_groups:
        group["lr"] = 0.0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return all(torch.equal(p, r) for p, r in zip(model.parameters(), restored))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_restore_best_refreshes_master_weights(backend, dtype, opt_name):
    from fastcore_train.optim import FusedAdamW, FusedSGD

    model = _masters_model(dtype)
    opt = (FusedAdamW(model.parameters(), lr=0.05) if opt_name == "adamw"
           else FusedSGD(model.parameters(), lr=0.05, momentum=0.9))
    es = EarlyStopping(patience=2, optimizer=opt)
    es.on_train_begin(model)
    g = torch.Generator().manual_seed(1)
    for epoch, v in enumerate([1.0, 2.0, 3.0]):  # the best epoch is the first
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
            opt.step()
        es.on_epoch_end(epoch, {"val_loss": v})
    assert es.stop_training and es.best_epoch == 0
    assert all("master" in s for s in opt.state.values())
    es.on_train_end(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, es.best_state[k])
    assert _lr0_step_keeps_weights(model, opt)


def test_fit_hands_its_optimizer_to_early_stopping(backend):
    from fastcore_train.optim import FusedAdamW
    from fastcore_train.train import fit

    dtype = torch.bfloat16
    model = _masters_model(dtype)
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(16, 8, generator=g).to(dtype), torch.randn(16, 4, generator=g))
            for _ in range(4)]
    opt = FusedAdamW(model.parameters(), lr=0.02)
    # the validation loss falls as the model trains, so in "max" mode epoch 0 stays the best
    es = EarlyStopping(mode="max", patience=2)
    fit(model, data, epochs=6, loss_fn=lambda out, y: ((out.float() - y) ** 2).mean(),
        optimizer=opt, val_loader=data, metrics={}, callbacks=[es], progress=False)
    assert es.optimizer is opt and es.best_epoch == 0 and es.stopped_epoch == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, es.best_state[k])
    assert _lr0_step_keeps_weights(model, opt)
