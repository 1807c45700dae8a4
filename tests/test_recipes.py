"""fit_one_cycle and fine_tune against fastai's definitions, written out here from fastai's
sources (fastai.callback.schedule: SchedCos, combine_scheds, combined_cos, fit_one_cycle,
fine_tune; fastai.optimizer: Optimizer.set_hyper for slices, Adam's defaults; fastai.learner:
freeze_to clears the optimizer state, TrainEvalCallback's pct_train = step / total steps)."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import fastcore_train as ft
from fastcore_train.callbacks import Callback
from fastcore_train.transfer import layer_groups


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- fastai's formulas -------------------------------------------------------------------------

def sched_cos(start, end, pos):  # fastai.callback.schedule.sched_cos
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def combined_cos(pct, start, middle, end):
    """combine_scheds([pct, 1 - pct], [SchedCos(start, middle), SchedCos(middle, end)])."""
    def at(pos):
        if pos < pct:
            return sched_cos(start, middle, pos / pct)
        return sched_cos(middle, end, (pos - pct) / (1 - pct))
    return at


def even_mults(start, stop, n):  # fastai.torch_core.even_mults
    step = (stop / start) ** (1 / (n - 1))
    return [start * step ** i for i in range(n)]


def slice_lrs(lr, n):
    """Optimizer.set_hyper('lr', lr) for n parameter groups."""
    if isinstance(lr, slice):
        if lr.start:
            return even_mults(lr.start, lr.stop, n)
        return [lr.stop / 10] * (n - 1) + [lr.stop]
    return [lr] * n


def assert_one_cycle(recorded, lr_maxes, pct, div=25.0, div_final=1e5,
                     moms=(0.95, 0.85, 0.95)):
    """recorded[t] = (lrs, beta1s) of each param group used by optimizer step t."""
    n = len(recorded)
    lr_f = [combined_cos(pct, m / div, m, m / div_final) for m in lr_maxes]
    mom_f = combined_cos(pct, *moms)
    for t, (lrs, betas) in enumerate(recorded):
        pos = t / n
        assert lrs == [pytest.approx(f(pos), rel=1e-12, abs=1e-14 * m)
                       for f, m in zip(lr_f, lr_maxes)], f"lr at step {t}"
        assert betas == [pytest.approx(mom_f(pos), rel=1e-12)] * len(betas), f"mom at step {t}"


# --- helpers -----------------------------------------------------------------------------------

class StepRecorder(Callback):
    """The lr and beta1/momentum of every param group as each optimizer step uses them,
    one list per fit call (fine_tune makes two)."""

    def __init__(self):
        self.runs, self.groups = [], []

    def set_optimizer(self, optimizer):
        run = []
        self.runs.append(run)
        self.groups.append([dict((k, v) for k, v in g.items() if k != "params")
                            | {"n": len(g["params"])} for g in optimizer.param_groups])

        def pre(opt, args, kwargs):
            run.append(([g["lr"] for g in opt.param_groups],
                        [g["betas"][0] if "betas" in g else g["momentum"]
                         for g in opt.param_groups]))
        optimizer.register_step_pre_hook(pre)


def data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    return x, y


def loaders(batch=16, n=96):
    x, y = data(n)
    return (DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False),
            DataLoader(TensorDataset(*data(32, seed=1)), batch_size=32))


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


class Net(nn.Module):
    """Pretrained-style: a body of two blocks with BatchNorm, a linear head (3 layer groups)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.block1 = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.block2 = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.block2(self.block1(x)))


def clone_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- fit_one_cycle -----------------------------------------------------------------------------

def test_fit_one_cycle_schedule_is_fastais_point_by_point():
    train, val = loaders()
    model, rec = mlp(), StepRecorder()
    hist = ft.fit_one_cycle(model, train, 3, 1e-2, val_loader=val, callbacks=[rec],
                            progress=False)
    assert len(hist) == 3 and len(rec.runs[0]) == 3 * len(train)
    # fastai's default optimizer: Adam(mom=0.9 -> cycled, sqr_mom=0.99, eps=1e-5), decoupled
    # wd=0.01, none on biases (wd_bn_bias=False); one layer group for a single lr
    groups = rec.groups[0]
    assert [g["weight_decay"] for g in groups] == [1e-2, 0.0]
    assert [g["n"] for g in groups] == [2, 2]  # weights, biases
    assert all(g["betas"][1] == 0.99 and g["eps"] == 1e-5 for g in groups)
    assert_one_cycle(rec.runs[0], [1e-2, 1e-2], pct=0.25)
    assert hist.meta["lr_max_from"] == "argument" and hist.meta["lr_max"] == [1e-2, 1e-2]


@pytest.mark.parametrize("lr_max", [slice(1e-4, 1e-2), slice(3e-3), [1e-3, 2e-3, 4e-3]])
def test_fit_one_cycle_discriminative_lrs_over_layer_groups(lr_max):
    train, _ = loaders()
    model, rec = Net(), StepRecorder()
    ft.fit_one_cycle(model, train, 2, lr_max, div=10.0, div_final=1e3, pct_start=0.4,
                     moms=(0.9, 0.8, 0.85), wd_bn_bias=True, callbacks=[rec], progress=False)
    per_layer = slice_lrs(lr_max, 3) if not isinstance(lr_max, list) else lr_max
    assert_one_cycle(rec.runs[0], per_layer, pct=0.4, div=10.0, div_final=1e3,
                     moms=(0.9, 0.8, 0.85))
    # wd_bn_bias=True: one param group per layer group, all with weight decay
    assert [g["n"] for g in rec.groups[0]] == [
        sum(1 for _ in g.parameters()) for g in layer_groups(model)]
    assert all(g["weight_decay"] == 1e-2 for g in rec.groups[0])


def test_fit_one_cycle_keeps_norm_and_bias_out_of_weight_decay():
    train, _ = loaders()
    model, rec = Net(), StepRecorder()
    ft.fit_one_cycle(model, train, 1, slice(1e-3, 1e-2), wd=0.1, callbacks=[rec], progress=False)
    # per layer group: the Linear weight decays; its bias and the BatchNorm's weight, bias don't
    assert [(g["n"], g["weight_decay"]) for g in rec.groups[0]] == [
        (1, 0.1), (3, 0.0), (1, 0.1), (3, 0.0), (1, 0.1), (1, 0.0)]
    lrs = even_mults(1e-3, 1e-2, 3)
    assert_one_cycle(rec.runs[0], [lr for lr in lrs for _ in range(2)], pct=0.25)


def test_fit_one_cycle_without_lr_uses_lr_find_and_says_so(capsys):
    train, val = loaders()
    # what lr_find suggests for this model and loader, asked directly
    probe = mlp()
    # fit_one_cycle's default optimizer, built by hand (the finder's lr sweep is uniform)
    opt = ft.optim.FusedAdamW([{"params": [probe[0].weight, probe[2].weight]},
                               {"params": [probe[0].bias, probe[2].bias], "weight_decay": 0.0}],
                              lr=1e-3, betas=(0.95, 0.99), eps=1e-5, weight_decay=1e-2)
    suggestion = ft.lr_find(probe, train, ft.nn.LabelSmoothingCrossEntropy(0.0), opt,
                            num_iter=30, progress=False).suggestion

    model, rec = mlp(), StepRecorder()
    hist = ft.fit_one_cycle(model, train, 2, val_loader=val, callbacks=[rec], progress=True,
                            lr_find_kwargs=dict(num_iter=30, progress=False))
    assert "from lr_find" in capsys.readouterr().out
    assert hist.meta["lr_max_from"] == "lr_find"
    assert hist.meta["lr_find"]["suggestion"] == suggestion
    assert hist.meta["lr_max"] == [suggestion] * 2
    assert_one_cycle(rec.runs[0], [suggestion] * 2, pct=0.25)

    # the finder left no trace: the same run with the lr given ends bit-identical
    same = mlp()
    hist2 = ft.fit_one_cycle(same, train, 2, suggestion, val_loader=val, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, same.state_dict()[k]), k
    assert hist["val_loss"] == hist2["val_loss"]


def test_fit_one_cycle_with_a_given_optimizer():
    train, _ = loaders()
    model, rec = mlp(), StepRecorder()
    opt = torch.optim.SGD([{"params": model[0].parameters()},
                           {"params": model[2].parameters()}], lr=0.5, momentum=0.9,
                          weight_decay=1e-4)
    ft.fit_one_cycle(model, train, 2, slice(1e-3, 1e-1), optimizer=opt, callbacks=[rec],
                     progress=False)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 1e-4]  # its own
    assert_one_cycle(rec.runs[0], [1e-3, 1e-1], pct=0.25)

    with pytest.raises(ValueError, match="moms=None"):
        ft.fit_one_cycle(model, train, 1, 1e-2,
                         optimizer=torch.optim.Adagrad(model.parameters()), progress=False)
    ada = torch.optim.Adagrad(model.parameters())
    ft.fit_one_cycle(model, train, 1, 1e-2, optimizer=ada, moms=None, progress=False)


class Endless(IterableDataset):
    def __iter__(self):
        yield torch.zeros(8), torch.tensor(0)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(epochs=0), ValueError, "epochs"),
    (dict(lr_max=-1.0), ValueError, "lr_max"),
    (dict(lr_max=slice(1e-3, None)), ValueError, "slice"),
    (dict(lr_max=[1e-3, float("nan")]), ValueError, "lr_max"),
    (dict(div=0), ValueError, "div"),
    (dict(div_final=-1), ValueError, "div_final"),
    (dict(pct_start=1.5), ValueError, "pct_start"),
    (dict(moms=(0.9, 0.8)), ValueError, "moms"),
    (dict(wd=-0.1), ValueError, "wd"),
    (dict(scheduler=object()), TypeError, "scheduler"),
    (dict(resume=True), ValueError, "checkpoint_dir"),
    (dict(grad_accum=0), ValueError, "accumulation_steps"),
    (dict(lr_mult=10), TypeError, "unexpected keyword argument"),
    (dict(loader="endless"), TypeError, "length"),
    (dict(lr_max=[1e-3, 1e-2, 1e-1], optimizer="sgd"), ValueError, "learning rates"),
    (dict(groups=[], optimizer="sgd"), ValueError, "groups"),
])
def test_fit_one_cycle_bad_input_changes_nothing(kwargs, exc, match):
    train, _ = loaders()
    model = mlp()
    before = clone_state(model)
    kwargs = dict(kwargs)
    loader = DataLoader(Endless(), batch_size=1) if kwargs.pop("loader", None) else train
    epochs = kwargs.pop("epochs", 1)
    kwargs.setdefault("lr_max", 1e-2)
    opt = None
    if kwargs.get("optimizer") == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        kwargs["optimizer"] = opt
    opt_before = copy.deepcopy(opt.state_dict()) if opt is not None else None
    with pytest.raises(exc, match=match):
        ft.fit_one_cycle(model, loader, epochs, progress=False, **kwargs)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    if opt is not None:
        assert opt.state_dict() == opt_before


# --- fine_tune ---------------------------------------------------------------------------------

class PhaseEnd(Callback):
    """The model's state at the end of each fit call."""

    def __init__(self, model):
        self.model, self.states = model, []

    def on_train_end(self, model):
        self.states.append(clone_state(self.model))


@pytest.mark.parametrize("train_bn", [True, False])
def test_fine_tune_is_fastais(train_bn):
    train, val = loaders()
    model, rec = Net(), StepRecorder()
    ends = PhaseEnd(model)
    init = clone_state(model)
    base_lr, lr_mult = 4e-3, 20
    hist = ft.fine_tune(model, train, 2, base_lr, freeze_epochs=2, lr_mult=lr_mult,
                        train_bn=train_bn, val_loader=val, callbacks=[rec, ends],
                        progress=False)

    # phase 1: freeze_to(-1), fit_one_cycle(freeze_epochs, slice(base_lr), pct_start=0.99):
    # the head at base_lr; the other groups at base_lr/10 hold only BatchNorm's parameters
    # (train_bn=True) or nothing (their groups are left out)
    frozen = rec.groups[0]
    if train_bn:
        assert [g["n"] for g in frozen] == [2, 2, 1, 1]  # BN of each block; head weight, bias
        lr_maxes = [base_lr / 10] * 2 + [base_lr] * 2
    else:
        assert [g["n"] for g in frozen] == [1, 1]
        lr_maxes = [base_lr] * 2
    assert_one_cycle(rec.runs[0], lr_maxes, pct=0.99)

    # the body did not move during the frozen epochs; BatchNorm per train_bn
    after1 = ends.states[0]
    for k, v in init.items():
        if k.startswith("head."):
            assert not torch.equal(after1[k], v), f"{k}: the head trains"
        elif ".1." in k and train_bn:  # BatchNorm: affine params and statistics
            if k.endswith("num_batches_tracked"):
                assert after1[k] == v + 2 * len(train)
            else:
                assert not torch.equal(after1[k], v), f"{k}: BatchNorm adapts with train_bn"
        else:
            assert torch.equal(after1[k], v), f"{k} changed while frozen"

    # phase 2: unfreeze, fit_one_cycle(epochs, slice(base_lr/2/lr_mult, base_lr/2),
    # pct_start=0.3, div=5), a fresh optimizer over every parameter
    half = base_lr / 2
    per_layer = even_mults(half / lr_mult, half, 3)
    assert [g["n"] for g in rec.groups[1]] == [1, 3, 1, 3, 1, 1]
    assert_one_cycle(rec.runs[1], [lr for lr in per_layer for _ in range(2)], pct=0.3, div=5.0)
    assert len(rec.runs[1]) == 2 * len(train)
    assert all(not torch.equal(ends.states[1][k], after1[k])
               for k in after1 if not k.endswith("num_batches_tracked"))
    assert all(p.requires_grad for p in model.parameters())
    model.train()
    assert all(m.training for m in model.modules())  # no BatchNorm left pinned in eval

    assert [r["phase"] for r in hist] == ["frozen"] * 2 + ["unfrozen"] * 2
    assert [r["epoch"] for r in hist] == [0, 1, 2, 3]
    assert hist.meta["frozen"]["lr_max"] == pytest.approx(lr_maxes, rel=1e-15)
    assert hist.meta["unfrozen"]["pct_start"] == 0.3 and hist.meta["unfrozen"]["div"] == 5.0


def test_fine_tune_freeze_epochs_zero_still_halves_base_lr():
    train, _ = loaders()
    rec = StepRecorder()
    hist = ft.fine_tune(Net(), train, 1, 1e-2, freeze_epochs=0, callbacks=[rec],
                        progress=False)
    assert len(rec.runs) == 1 and [r["phase"] for r in hist] == ["unfrozen"]
    per_layer = even_mults(5e-3 / 100, 5e-3, 3)
    assert_one_cycle(rec.runs[0], [lr for lr in per_layer for _ in range(2)], pct=0.3, div=5.0)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(base_lr=0), ValueError, "base_lr"),
    (dict(lr_mult=-1), ValueError, "lr_mult"),
    (dict(freeze_epochs=-1), ValueError, "freeze_epochs"),
    (dict(epochs=0), ValueError, "epochs"),
    (dict(pct_start=2), ValueError, "pct_start"),
    (dict(moms=(1, 2, 3)), ValueError, "moms"),
    (dict(optimizer=None), TypeError, "optimizer"),
    (dict(lr_max=1e-3), TypeError, "lr_max"),
    (dict(resume=True), ValueError, "checkpoint_dir"),
    (dict(groups=["one"]), ValueError, "two layer groups"),
    (dict(lr_mul=10), TypeError, "unexpected keyword argument"),
    (dict(pct_start=0.3, div=5.0, val_loader=None, wd=0.0, moms=None, mixup=None,
          wd_bn_bias=True, lr_find_kwargs={}, div_final=1e4, sheduler=1), TypeError, "sheduler"),
])
def test_fine_tune_bad_input_changes_nothing(kwargs, exc, match):
    train, _ = loaders()
    model = Net()
    before = clone_state(model)
    kwargs = dict(kwargs)
    epochs = kwargs.pop("epochs", 1)
    with pytest.raises(exc, match=match):
        ft.fine_tune(model, train, epochs, progress=False, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # not left frozen


class Crash(Exception):
    pass


class CrashAt(Callback):
    """Raise at the start of epoch ``epoch`` of the ``run``-th fit call (a crash mid-run)."""

    def __init__(self, run, epoch):
        self.run, self.epoch, self.calls = run, epoch, -1

    def on_train_begin(self, model):
        self.calls += 1

    def on_epoch_begin(self, epoch):
        if (self.calls, epoch) == (self.run, self.epoch):
            raise Crash()


def _fine_tune_run(tmp_path, crash=None, resume=False):
    torch.manual_seed(0)
    x, y = data(96)
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True,
                       generator=torch.Generator().manual_seed(3))
    model = Net()
    cbs = [ft.EarlyStopping(patience=50)] + ([CrashAt(*crash)] if crash else [])
    hist = ft.fine_tune(model, train, 3, 4e-3, freeze_epochs=2, val_loader=loaders()[1],
                        callbacks=cbs, checkpoint_dir=tmp_path, resume=resume, progress=False)
    return model, hist


def _strip(hist):
    return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "ms_per_step")}
            for r in hist]


@pytest.mark.parametrize("crash", [(0, 1), (1, 0), (1, 2)],
                         ids=["frozen-epoch-1", "unfrozen-epoch-0", "unfrozen-epoch-2"])
def test_fine_tune_resumes_into_the_right_phase(tmp_path, crash):
    ref_model, ref_hist = _fine_tune_run(tmp_path / "ref")
    with pytest.raises(Crash):
        _fine_tune_run(tmp_path / "run", crash=crash)
    model, hist = _fine_tune_run(tmp_path / "run", resume=True)
    for k, v in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert _strip(hist) == _strip(ref_hist)
    assert hist.meta == ref_hist.meta


def test_fit_one_cycle_resume_keeps_the_lr_find_choice(tmp_path, monkeypatch):
    def run(ckpt, crash=None, resume=False):
        torch.manual_seed(0)
        train, val = loaders()
        model = mlp()
        cbs = [CrashAt(0, crash)] if crash is not None else []
        hist = ft.fit_one_cycle(model, train, 3, val_loader=val, callbacks=cbs,
                                checkpoint_dir=ckpt, resume=resume, progress=False,
                                lr_find_kwargs=dict(num_iter=20, progress=False))
        return model, hist

    ref_model, ref_hist = run(tmp_path / "ref")
    with pytest.raises(Crash):
        run(tmp_path / "run", crash=2)

    def no_search(*args, **kwargs):
        raise AssertionError("a resumed run must not search for its lr again")
    monkeypatch.setattr(ft.recipes, "lr_find", no_search)
    model, hist = run(tmp_path / "run", resume=True)
    assert hist.meta == ref_hist.meta and hist.meta["lr_max_from"] == "lr_find"
    assert _strip(hist) == _strip(ref_hist)
    for k, v in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
