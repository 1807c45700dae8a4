"""LR range test: sane suggestions, bit-identical restore, divergence stop, scaler, DDP, plot."""
import copy
import datetime
import math
import time
import random
import socket
import sys
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastcore_train.lr_finder import LRFinderResult, lr_find

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: one thread is fastest and immune to other processes hogging the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    X, y = sklearn_datasets.load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(X), generator=g)
    X = torch.tensor(X / 16.0, dtype=torch.float32)[perm]
    y = torch.tensor(y)[perm]
    return (X[:1400], y[:1400]), (X[1400:], y[1400:])


def mlp(seed=1, bn=True, dropout=0.1):
    torch.manual_seed(seed)
    layers = [nn.Linear(64, 64)]
    if bn:
        layers.append(nn.BatchNorm1d(64))
    layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


def loader(data, batch_size=64, shuffle=True):
    return DataLoader(TensorDataset(*data), batch_size=batch_size, shuffle=shuffle)


def snapshot(model, optimizer, scaler=None):
    return dict(
        state={k: v.clone() for k, v in model.state_dict().items()},
        buffers={k: v.clone() for k, v in model.named_buffers()},
        grads={k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        modes=[m.training for m in model.modules()],
        opt=copy.deepcopy(optimizer.state_dict()),  # live tensors otherwise
        opt_lrs=[g["lr"] for g in optimizer.param_groups],
        scaler=None if scaler is None else copy.deepcopy(scaler.state_dict()),
        torch_rng=torch.get_rng_state(),
        py_rng=random.getstate(),
        np_rng=np.random.get_state(),
    )


def assert_same_tree(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tree(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y)
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b)
    else:
        assert a == b


def assert_restored(before, model, optimizer, scaler=None):
    after = snapshot(model, optimizer, scaler)
    for key in before:
        assert_same_tree(before[key], after[key])


def trained(model, optimizer, data, steps=3):
    """A few real steps so the optimizer has state, BN has stats and grads exist."""
    x, y = data
    for i in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x[i * 32:(i + 1) * 32]), y[i * 32:(i + 1) * 32]).backward()
        optimizer.step()
    return model


def accuracy(model, data):
    model.eval()
    with torch.no_grad():
        return (model(data[0]).argmax(1) == data[1]).float().mean().item()


# --------------------------------------------------------------------------------------------
# The curve and its suggestions on real data
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opt_name", ["adam", "sgd"])
def test_suggestion_is_sane_and_trains(digits, opt_name):
    train, test = digits

    def make_opt(model, lr):
        if opt_name == "adam":
            return torch.optim.Adam(model.parameters(), lr=lr)
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    model = mlp()
    result = lr_find(model, loader(train), F.cross_entropy, make_opt(model, 1e-3),
                     num_iter=80, progress=False)
    lr = result.suggestion
    assert lr is not None and 1e-7 < lr < 10
    assert set(result.suggestions) == {"valley", "steepest", "minimum/10"}
    # The valley lies on the descent, before the loss minimum.
    assert lr < result.lrs[int(np.argmin(result.losses))]
    assert len(result.lrs) == len(result.losses) == len(result.raw_losses)

    def train_at(lr):
        model = mlp(seed=2)
        opt = make_opt(model, lr)
        for _ in range(2):
            for x, y in loader(train):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        return accuracy(model, test)

    acc = train_at(lr)
    assert acc > 0.9
    # Reference: a 100x more timid lr learns less in the same budget.
    assert acc > train_at(lr / 100)


def test_exp_and_linear_sweeps_cover_the_range(digits):
    for mode in ("exp", "linear"):
        model = mlp()
        r = lr_find(model, loader(digits[0]), F.cross_entropy,
                    torch.optim.SGD(model.parameters(), lr=0.1), start_lr=1e-4, end_lr=1e-2,
                    num_iter=12, mode=mode, progress=False)
        assert len(r.lrs) == 12 and r.stop_reason == "completed"
        assert r.lrs[0] == pytest.approx(1e-4) and r.lrs[-1] == pytest.approx(1e-2)
        steps = np.diff(np.log(r.lrs)) if mode == "exp" else np.diff(r.lrs)
        assert np.allclose(steps, steps[0])


def test_smoothing_is_bias_corrected_ema(digits):
    model = mlp()
    r = lr_find(model, loader(digits[0]), F.cross_entropy,
                torch.optim.Adam(model.parameters()), num_iter=15, end_lr=1e-3,
                smooth=0.9, progress=False)
    avg = 0.0
    for i, raw in enumerate(r.raw_losses):
        avg = 0.9 * avg + 0.1 * raw
        assert r.losses[i] == pytest.approx(avg / (1 - 0.9 ** (i + 1)), rel=1e-12)
    assert r.losses[0] == pytest.approx(r.raw_losses[0], rel=1e-12)


# --------------------------------------------------------------------------------------------
# Restoring everything
# --------------------------------------------------------------------------------------------

def _prepared(digits, opt_cls=torch.optim.Adam):
    model = mlp()
    optimizer = opt_cls(model.parameters(), lr=3e-3)
    trained(model, optimizer, digits[0])
    model.eval()  # a mode lr_find changes and must put back
    random.seed(123)
    np.random.seed(123)
    return model, optimizer


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.SGD])
def test_state_restored_bit_identically(digits, opt_cls):
    model, optimizer = _prepared(digits, opt_cls)
    before = snapshot(model, optimizer)

    def rng_hungry_loss(out, y):
        # Draw from every RNG lr_find must restore (torch's is used by dropout and shuffling).
        random.random()
        np.random.rand()
        return F.cross_entropy(out, y)

    result = lr_find(model, loader(digits[0]), rng_hungry_loss, optimizer, num_iter=30,
                     progress=False)
    assert len(result.lrs) > 0
    assert_restored(before, model, optimizer)


def test_state_restored_after_exception_mid_sweep(digits):
    model, optimizer = _prepared(digits)
    scaler = torch.amp.GradScaler("cpu", growth_interval=1)
    before = snapshot(model, optimizer, scaler)
    calls = {"n": 0}

    def exploding_loss(out, y):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("boom")
        random.random()
        np.random.rand()
        return F.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        lr_find(model, loader(digits[0]), exploding_loss, optimizer, num_iter=30, scaler=scaler,
                progress=False)
    assert calls["n"] == 7
    assert_restored(before, model, optimizer, scaler)


@pytest.mark.parametrize("fail_at", [None, 7])
def test_tensor_lr_object_and_value_restored(digits, fail_at):
    """lr=torch.tensor(...): the sweep writes the group's lr; afterwards (also after an
    exception) the group holds the user's own tensor object again, with its own value."""
    model = mlp()
    lr = torch.tensor(1e-3)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    calls = {"n": 0}

    def loss_fn(out, y):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError("boom")
        return F.cross_entropy(out, y)

    if fail_at is None:
        lr_find(model, loader(digits[0]), loss_fn, optimizer, num_iter=20, progress=False)
    else:
        with pytest.raises(RuntimeError, match="boom"):
            lr_find(model, loader(digits[0]), loss_fn, optimizer, num_iter=20, progress=False)
    assert calls["n"] > 5
    assert optimizer.param_groups[0]["lr"] is lr
    assert lr.item() == torch.tensor(1e-3).item()


def test_rng_restored_and_sweep_is_repeatable(digits):
    model, optimizer = _prepared(digits)
    torch.manual_seed(5)
    r1 = lr_find(model, loader(digits[0]), F.cross_entropy, optimizer, num_iter=20,
                 progress=False)
    # Same RNG, same model: the shuffles and dropout masks repeat, so does the curve.
    r2 = lr_find(model, loader(digits[0]), F.cross_entropy, optimizer, num_iter=20,
                 progress=False)
    assert r1.raw_losses == r2.raw_losses
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    lr_find(model, loader(digits[0]), F.cross_entropy, optimizer, num_iter=5, progress=False)
    assert torch.equal(torch.rand(3), expected_next)


def test_param_group_ratios_kept_and_restored(digits):
    model = mlp(bn=False)
    head = list(model[-1].parameters())
    body = [p for p in model.parameters() if all(p is not h for h in head)]
    optimizer = torch.optim.SGD([{"params": body, "lr": 0.0}, {"params": head, "lr": 0.1}])
    seen = []

    def spy(out, y):
        seen.append([g["lr"] for g in optimizer.param_groups])
        return F.cross_entropy(out, y)

    body_before = [p.clone() for p in body]
    lr_find(model, loader(digits[0]), spy, optimizer, num_iter=10, end_lr=1e-2, progress=False)
    # The frozen (lr 0) group stays frozen while the head follows the sweep.
    assert all(lrs[0] == 0.0 for lrs in seen) and seen[-1][1] == pytest.approx(1e-2)
    assert [g["lr"] for g in optimizer.param_groups] == [0.0, 0.1]
    assert all(torch.equal(a, b) for a, b in zip(body_before, body))


# --------------------------------------------------------------------------------------------
# Stopping
# --------------------------------------------------------------------------------------------

def test_divergence_stop_after_the_stability_threshold():
    # Least squares with full-batch SGD: gradient descent is stable iff lr < 2 / lambda_max of
    # the Hessian, and the loss cannot blow up below that threshold (every mode contracts).
    g = torch.Generator().manual_seed(0)
    X = torch.randn(128, 8, generator=g) * torch.linspace(0.5, 2.0, 8)
    y = X @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(128, 1, generator=g)
    threshold = 2.0 / torch.linalg.eigvalsh(2.0 * X.T @ X / len(X)).max().item()
    torch.manual_seed(0)
    model = nn.Linear(8, 1, bias=False)
    r = lr_find(model, [(X, y)], F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.01),
                start_lr=1e-4, end_lr=10, num_iter=80, progress=False)
    assert r.stop_reason == "diverged" and r.diverged
    assert len(r.lrs) < 80
    assert r.lrs[-1] > threshold
    assert r.losses[-1] > 4.0 * min(r.losses[:-1])
    assert all(r.losses[i] <= 4.0 * min(r.losses[:i + 1]) for i in range(len(r.losses) - 1))
    # The suggestions lie in the stable region.
    assert r.suggestion < threshold
    assert r.suggestions["steepest"] < threshold


def test_negative_losses_do_not_stop_at_once(digits):
    # A shifted loss (negative everywhere) must not look like divergence to "4 x best".
    model = mlp()
    r = lr_find(model, loader(digits[0]), lambda out, y: F.cross_entropy(out, y) - 10.0,
                torch.optim.Adam(model.parameters()), num_iter=15, end_lr=1e-3, progress=False)
    assert r.stop_reason == "completed" and len(r.lrs) == 15


def test_nan_loss_stops_and_is_not_recorded(digits):
    model = mlp()
    calls = {"n": 0}

    def nan_after_five(out, y):
        calls["n"] += 1
        loss = F.cross_entropy(out, y)
        return loss * float("nan") if calls["n"] > 5 else loss

    r = lr_find(model, loader(digits[0]), nan_after_five, torch.optim.Adam(model.parameters()),
                num_iter=30, progress=False)
    assert r.stop_reason == "non-finite loss"
    assert len(r.lrs) == 5 and all(math.isfinite(v) for v in r.raw_losses)


def test_cycles_a_short_loader(digits):
    x, y = digits[0]
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)]  # 3 batches
    seen = []

    def spy(out, yb):
        seen.append(yb)
        return F.cross_entropy(out, yb)

    model = mlp()
    r = lr_find(model, batches, spy, torch.optim.SGD(model.parameters(), lr=0.1),
                end_lr=1e-3, num_iter=10, progress=False)
    assert len(r.lrs) == 10 and len(seen) == 10
    assert all(seen[i] is batches[i % 3][1] for i in range(10))


# --------------------------------------------------------------------------------------------
# Accumulation, validation loss, targets, scaler
# --------------------------------------------------------------------------------------------

def test_accumulation_equals_the_large_batch(digits):
    # Two micro-batches of 32 with loss/2 give the gradient of one batch of 64.
    x, y = digits[0]
    small = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 640, 32)]
    large = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 640, 64)]
    results = []
    for batches, accum in ((small, 2), (large, 1)):
        model = mlp(bn=False, dropout=0.0)
        results.append(lr_find(model, batches, F.cross_entropy,
                               torch.optim.SGD(model.parameters(), lr=0.1), num_iter=10,
                               end_lr=1.0, accumulation_steps=accum, progress=False))
    np.testing.assert_allclose(results[0].raw_losses, results[1].raw_losses, rtol=1e-5)


def test_val_loader_records_validation_loss(digits):
    train, test = digits
    model = mlp(bn=False, dropout=0.0)
    with torch.no_grad():
        initial = F.cross_entropy(model(test[0]), test[1]).item()
    r = lr_find(model, loader(train), F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                start_lr=1e-7, end_lr=1.0, num_iter=8,
                val_loader=loader(test, batch_size=100, shuffle=False), progress=False)
    # After one step at lr 1e-7 the validation loss is the initial model's, up to that step.
    assert r.raw_losses[0] == pytest.approx(initial, rel=1e-4)
    assert len(r.raw_losses) == 8
    assert model.training  # mode restored (it started in train mode)


class MixedTarget(NamedTuple):
    y_a: torch.Tensor
    y_b: torch.Tensor
    lam: torch.Tensor


def test_structured_targets_reach_the_loss(digits):
    x, y = digits[0]
    perm = torch.randperm(64)
    batches = [(x[:64], MixedTarget(y[:64], y[:64][perm], torch.tensor(0.7)))]
    seen = []

    def mixed_ce(out, t):
        seen.append(type(t))
        return t.lam * F.cross_entropy(out, t.y_a) + (1 - t.lam) * F.cross_entropy(out, t.y_b)

    model = mlp()
    r = lr_find(model, batches, mixed_ce, torch.optim.SGD(model.parameters(), lr=0.1),
                num_iter=5, end_lr=1e-3, progress=False)
    assert len(r.lrs) == 5 and set(seen) == {MixedTarget}


def test_grad_scaler_gives_the_unscaled_curve_and_is_restored(digits):
    # A power-of-two loss scale is exact in fp32, so the curve must equal the plain one.
    model, optimizer = _prepared(digits)
    plain = lr_find(model, loader(digits[0]), F.cross_entropy, optimizer, num_iter=20,
                    end_lr=1e-2, progress=False)
    scaler = torch.amp.GradScaler("cpu")
    before = snapshot(model, optimizer, scaler)
    scaled = lr_find(model, loader(digits[0]), F.cross_entropy, optimizer, num_iter=20,
                     end_lr=1e-2, scaler=scaler, progress=False)
    assert scaled.raw_losses == plain.raw_losses
    assert_restored(before, model, optimizer, scaler)


class StandInScaler:
    """The GradScaler surface, with a scale that changes on every update."""

    def __init__(self):
        self.scale_value, self.calls = 8.0, []

    def scale(self, loss):
        self.calls.append("scale")
        return loss * self.scale_value

    def step(self, optimizer):
        self.calls.append("step")
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(self.scale_value)
        optimizer.step()

    def update(self):
        self.calls.append("update")
        self.scale_value *= 2.0

    def state_dict(self):
        return {"scale": self.scale_value}

    def load_state_dict(self, state):
        self.scale_value = state["scale"]


def test_stand_in_scaler_is_used_and_restored(digits):
    model, optimizer = _prepared(digits)
    scaler = StandInScaler()
    lr_find(model, loader(digits[0]), F.cross_entropy, optimizer, num_iter=6, end_lr=1e-3,
            accumulation_steps=2, scaler=scaler, progress=False)
    assert scaler.calls == ["scale", "scale", "step", "update"] * 6
    assert scaler.scale_value == 8.0


# --------------------------------------------------------------------------------------------
# Suggestion rules on curves with known answers
# --------------------------------------------------------------------------------------------

def test_suggestion_rules_on_analytic_curves():
    lrs = list(np.logspace(-6, 0, 101))
    # A loss that falls linearly in index from 10 to 70 and rises after: the valley point is
    # 2/3 of the way down the run (index 50), the minimum at index 70.
    loss = np.concatenate([np.full(10, 3.0), np.linspace(3.0, 1.0, 61)[:],
                           np.linspace(1.1, 4.0, 30)])
    loss[:10] += np.linspace(0.01, 0.0, 10)  # a strictly decreasing lead-in joins the run
    r = LRFinderResult.from_curve(lrs, list(loss), list(loss))
    top, bottom = 0, 70
    target = loss[top] - 2 / 3 * (loss[top] - loss[bottom])
    expected = next(i for i in range(top, bottom + 1) if loss[i] <= target)
    assert r.suggestions["valley"] == lrs[expected] == r.suggestion
    assert r.suggestions["minimum/10"] == lrs[70] / 10
    # Steepest on a tanh step centred at log10(lr) = -3: the slope is most negative there.
    x = np.log10(lrs)
    r2 = LRFinderResult.from_curve(lrs, list(2 - np.tanh(2 * (x + 3))), list(x))
    assert r2.suggestions["steepest"] == pytest.approx(1e-3, rel=1e-9)


def test_short_curves_give_none_or_fallback():
    assert LRFinderResult.from_curve([], [], []).suggestion is None
    r = LRFinderResult.from_curve([1e-3, 1e-2], [1.0, 0.5], [1.0, 0.5])
    assert r.suggestions["valley"] is None and r.suggestion == pytest.approx(1e-3)


# --------------------------------------------------------------------------------------------
# Plot, progress, errors
# --------------------------------------------------------------------------------------------

def test_plot_writes_a_png(tmp_path, digits):
    pytest.importorskip("matplotlib")
    model = mlp()
    r = lr_find(model, loader(digits[0]), F.cross_entropy, torch.optim.Adam(model.parameters()),
                num_iter=40, progress=False)
    path = tmp_path / "lr.png"
    assert r.plot(path) == path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_plot_without_matplotlib_says_so(monkeypatch):
    r = LRFinderResult.from_curve([1e-3, 1e-2, 1e-1], [1.0, 0.5, 0.7], [1.0, 0.5, 0.7])
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install matplotlib"):
        r.plot("never-written.png")


def test_progress_fallback_without_tqdm(digits, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    model = mlp()
    lr_find(model, loader(digits[0]), F.cross_entropy, torch.optim.Adam(model.parameters()),
            num_iter=20, end_lr=1e-3, progress=True)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("lr_find:")]
    assert len(lines) == 10 and lines[-1].startswith("lr_find: 20/20")


def test_result_repr_is_short():
    res = LRFinderResult.from_curve([1e-4 * 1.1 ** i for i in range(200)],
                                    [2.0 - i / 400 for i in range(200)],
                                    [2.0 - i / 400 for i in range(200)], num_iter=200)
    text = repr(res)
    assert len(text) < 300 and "200 of 200 steps" in text and "valley=" in text


def test_progress_output(digits, capsys):
    model = mlp()
    lr_find(model, loader(digits[0]), F.cross_entropy, torch.optim.Adam(model.parameters()),
            num_iter=10, end_lr=1e-3, progress=True)
    shown = capsys.readouterr().err
    model = mlp()
    lr_find(model, loader(digits[0]), F.cross_entropy, torch.optim.Adam(model.parameters()),
            num_iter=10, end_lr=1e-3, progress=False)
    assert "lr_find" in shown and capsys.readouterr().err == ""


def test_input_errors(digits):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = loader(digits[0])
    empty = DataLoader(TensorDataset(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)))
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="empty"):
        lr_find(model, empty, F.cross_entropy, opt, progress=False)
    with pytest.raises(ValueError, match="empty"):
        lr_find(model, [], F.cross_entropy, opt, progress=False)
    with pytest.raises(ValueError, match="no batch"):
        lr_find(model, (b for b in []), F.cross_entropy, opt, progress=False)
    with pytest.raises(ValueError, match="start_lr"):
        lr_find(model, data, F.cross_entropy, opt, start_lr=1.0, end_lr=1.0)
    with pytest.raises(ValueError, match="start_lr"):
        lr_find(model, data, F.cross_entropy, opt, start_lr=0.0)
    with pytest.raises(ValueError, match="mode"):
        lr_find(model, data, F.cross_entropy, opt, mode="cos")
    with pytest.raises(ValueError, match="num_iter"):
        lr_find(model, data, F.cross_entropy, opt, num_iter=1)
    with pytest.raises(ValueError, match="smooth"):
        lr_find(model, data, F.cross_entropy, opt, smooth=1.0)
    with pytest.raises(ValueError, match="diverge_factor"):
        lr_find(model, data, F.cross_entropy, opt, diverge_factor=1.0)
    with pytest.raises(ValueError, match="accumulation_steps"):
        lr_find(model, data, F.cross_entropy, opt, accumulation_steps=0)
    with pytest.raises(TypeError, match="scaler"):
        lr_find(model, data, F.cross_entropy, opt, scaler=object())
    with pytest.raises(TypeError, match=r"\(x, y\)"):
        lr_find(model, [(digits[0][0][:8],)], F.cross_entropy, opt, progress=False)
    with pytest.raises(ValueError, match="cannot be restarted"):
        x, y = digits[0]
        lr_find(model, iter([(x[:8], y[:8])]), F.cross_entropy, opt, num_iter=3,
                progress=False)
    with pytest.raises(ValueError, match=r"one-element tensor .* got \(8,\)"):
        lr_find(model, data, lambda out, t: F.cross_entropy(out, t, reduction="none")[:8], opt,
                num_iter=3, progress=False)
    other = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="none of the optimizer's parameters belong"):
        lr_find(model, data, F.cross_entropy, other, progress=False)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter of the optimizer requires grad"):
        lr_find(model, data, F.cross_entropy, opt, progress=False)
    for p in model.parameters():
        p.requires_grad_(True)
    assert_restored(before, model, opt)


@pytest.mark.cuda
def test_cpu_batches_move_to_a_cuda_model(digits):
    model = mlp().cuda()
    target = MixedTarget(digits[0][1][:64], digits[0][1][:64].flip(0), torch.tensor(0.5))

    def mixed_ce(out, t):
        assert out.is_cuda and t.y_a.is_cuda and t.lam.is_cuda
        return t.lam * F.cross_entropy(out, t.y_a) + (1 - t.lam) * F.cross_entropy(out, t.y_b)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    lr_find(model, [(digits[0][0][:64], target)], mixed_ce,
            torch.optim.Adam(model.parameters()), num_iter=10, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------
# DDP: two gloo ranks with different data take the same, averaged decisions
# --------------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, queue):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(256, 16, generator=g)
        y = (x[:, 0] > 0).long()
        torch.manual_seed(0)  # same initial weights on both ranks, as DDP requires
        model = nn.parallel.DistributedDataParallel(
            nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2)))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        local = []

        def loss_fn(out, t):
            loss = F.cross_entropy(out, t)
            # Rank 1 alone would see its loss explode after 8 micro-batches.
            loss = loss * 1000.0 if rank == 1 and len(local) >= 8 else loss
            local.append(loss.item())
            return loss

        batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
        r = lr_find(model, batches, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1),
                    num_iter=20, accumulation_steps=2, progress=False)
        restored = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        queue.put((rank, r.lrs, r.raw_losses, r.stop_reason, local, restored))
        dist.barrier()  # nobody closes its sockets while the other still talks
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters import torch: a few seconds
def test_ddp_ranks_average_the_loss_and_stop_together():
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    import torch.multiprocessing as mp
    # spawn, not fork: a forked child of a process that already ran torch ops can hang.
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = mp.start_processes(_ddp_worker, args=(2, _free_port(), queue), nprocs=2,
                               join=False, start_method="spawn")
    items, deadline = [], time.monotonic() + 180
    while len(items) < 2:
        if not queue.empty():
            items.append(queue.get())
            continue
        dead = [p for p in procs.processes if p.exitcode not in (None, 0)]
        assert not dead, f"a rank died before reporting: exit codes {[p.exitcode for p in dead]}"
        assert time.monotonic() < deadline, "DDP workers did not report in time"
        time.sleep(0.05)
    try:
        procs.join(timeout=60)
    except mp.ProcessExitedException as e:
        # gloo can abort in its teardown after both ranks finished their work (a race between
        # the ranks closing their sockets); both results are in, so only that is tolerated.
        if e.signal_name != "SIGABRT":
            raise
    out = dict((item[0], item[1:]) for item in items)
    (lrs0, raw0, stop0, local0, ok0), (lrs1, raw1, stop1, local1, ok1) = out[0], out[1]
    assert ok0 and ok1
    assert lrs0 == lrs1 and raw0 == raw1 and stop0 == stop1 == "diverged"
    # Each recorded loss is the mean over ranks of that step's (accumulation-averaged) loss.
    per_step = [[(loc[2 * i] + loc[2 * i + 1]) / 2 for i in range(len(raw0))]
                for loc in (local0, local1)]
    expected = [(a + b) / 2 for a, b in zip(*per_step)]
    np.testing.assert_allclose(raw0, expected, rtol=1e-6)
