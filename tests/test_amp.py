"""LossScaler: torch.amp.GradScaler's behaviour and scale sequence, with the scale and the
found-inf flags kept on the device and no host read when the optimizer is fused. Tests that take
``device`` run on the CPU and, with a GPU, on CUDA against GradScaler on the same device."""
import inspect
import pickle
import warnings

import pytest
import torch
import torch.nn as nn

from fastcore_train.amp import LossScaler
from fastcore_train.optim import FusedAdamW, FusedSGD


def _model(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3)).to(device)


def _batches(n, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 8, generator=g).to(device), torch.randn(16, 3, generator=g).to(device))
            for _ in range(n)]


def _atol(device):
    """Weights against torch's optimizer on the same device: on CUDA torch's kernels (its fused
    AdamW among them) round some products differently, an ulp that later steps carry on."""
    return 1e-6 if device == "cpu" else 1e-5


def _iteration(model, opt, scaler, x, y, poison=False):
    opt.zero_grad(set_to_none=True)
    scaler.scale(((model(x) - y) ** 2).mean()).backward()
    if poison:
        next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()


POISON = {0, 1, 2, 5, 9}


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),       # generic: one host read
    lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),       # found_inf handed over
    lambda ps: FusedAdamW(ps, lr=1e-3),                          # fused step
    lambda ps: FusedSGD(ps, lr=0.05, momentum=0.9),
], ids=["torch-sgd", "torch-fused-adamw", "fused-adamw", "fused-sgd"])
def test_matches_gradscaler(backend, device, make_opt):
    """Same skipped steps, same scale after every update, same weights."""
    ours, ref = _model(device=device), _model(device=device)
    opt, topt = make_opt(ours.parameters()), make_opt(ref.parameters())
    scaler = LossScaler(init_scale=2.0 ** 6, growth_interval=3)
    tscaler = torch.amp.GradScaler(device, init_scale=2.0 ** 6, growth_interval=3)
    for i, (x, y) in enumerate(_batches(14, device=device)):
        _iteration(ours, opt, scaler, x, y, poison=i in POISON)
        _iteration(ref, topt, tscaler, x, y, poison=i in POISON)
        assert scaler.get_scale() == tscaler.get_scale()
        assert scaler.state_dict() == tscaler.state_dict()
    assert scaler.get_scale() != 2.0 ** 6
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=_atol(device), rtol=0)


def test_growth_and_backoff():
    scaler = LossScaler(init_scale=8.0, growth_factor=4.0, backoff_factor=0.25, growth_interval=2)
    model = _model()
    opt = FusedSGD(model.parameters(), lr=0.01)
    seq = []
    for poison in (False, False, False, True, False, False):
        x, y = _batches(1)[0]
        _iteration(model, opt, scaler, x, y, poison)
        seq.append(scaler.get_scale())
    assert seq == [8.0, 32.0, 32.0, 8.0, 8.0, 32.0]


def test_no_host_sync_with_fused_optimizer(backend, device, monkeypatch):
    """scale / step / update never read a device value back when the optimizer is fused."""
    model = _model(device=device)
    opt = FusedAdamW(model.parameters(), lr=1e-3, max_grad_norm=1.0)
    scaler = LossScaler(init_scale=2.0 ** 4)
    batches = _batches(3, device=device)
    _iteration(model, opt, scaler, *batches[0])  # lazy state set-up out of the way

    def host_read(*args, **kwargs):
        raise AssertionError("host read of a device value")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    for i, (x, y) in enumerate(batches[1:]):
        _iteration(model, opt, scaler, x, y, poison=i == 0)
    monkeypatch.undo()
    assert scaler.get_scale() == 2.0 ** 3


def test_fused_step_never_writes_grads(backend, device):
    model = _model(device=device)
    opt = FusedAdamW(model.parameters(), lr=1e-3)
    scaler = LossScaler(init_scale=2.0 ** 10)
    x, y = _batches(1, device=device)[0]
    scaler.scale(((model(x) - y) ** 2).mean()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_unscale_then_clip_then_step(backend, device):
    """unscale_ writes unscaled grads for the user; step then reuses the recorded flag."""
    ours, ref = _model(device=device), _model(device=device)
    opt = FusedAdamW(ours.parameters(), lr=1e-2)
    topt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    scaler, tscaler = LossScaler(init_scale=2.0 ** 8), torch.amp.GradScaler(device, 2.0 ** 8)
    for i, (x, y) in enumerate(_batches(6, device=device)):
        for model, o, s in ((ours, opt, scaler), (ref, topt, tscaler)):
            o.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            s.scale(loss).backward()
            if i == 3:
                next(model.parameters()).grad[1, 1] = float("nan")
            s.unscale_(o)
            if i == 0:
                expect = torch.autograd.grad(((model(x) - y) ** 2).mean(), next(model.parameters()))
                torch.testing.assert_close(next(model.parameters()).grad, expect[0])
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            s.step(o)
            s.update()
        assert scaler.get_scale() == tscaler.get_scale()
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=_atol(device), rtol=0)


def test_two_optimizers_one_scaler(backend, device):
    """Each optimizer skips on its own gradients; the scale backs off if either overflowed."""
    model = _model(device=device)
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    o1, o2 = FusedAdamW(first, lr=1e-3), FusedSGD(second, lr=1e-2)
    scaler = LossScaler(init_scale=2.0 ** 8)
    x, y = _batches(1, device=device)[0]
    for o in (o1, o2):
        o.zero_grad()
    scaler.scale(((model(x) - y) ** 2).mean()).backward()
    first[0].grad[0, 0] = float("inf")
    before1 = [p.detach().clone() for p in first]
    before2 = [p.detach().clone() for p in second]
    scaler.step(o1)
    scaler.step(o2)
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(first, before1))
    assert not any(torch.equal(p, b) for p, b in zip(second, before2))
    assert scaler.get_scale() == 2.0 ** 7


def test_state_dict_interchange_with_gradscaler():
    model = _model()
    opt = FusedSGD(model.parameters(), lr=0.01)
    scaler = LossScaler(init_scale=2.0 ** 5, growth_interval=4)
    for i, (x, y) in enumerate(_batches(3)):
        _iteration(model, opt, scaler, x, y, poison=i == 0)
    sd = scaler.state_dict()
    assert sd == {"scale": 16.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                  "growth_interval": 4, "_growth_tracker": 2}
    t = torch.amp.GradScaler("cpu")
    t.load_state_dict(sd)
    assert t.state_dict() == sd
    back = LossScaler()
    back.load_state_dict(t.state_dict())
    assert back.state_dict() == sd
    x, y = _batches(1)[0]
    _iteration(model, opt, back, x, y)
    assert back.get_scale() == 16.0 and back.state_dict()["_growth_tracker"] == 3


def _protocol_misuses(scaler_cls, make_opt):
    """Each misuse of the scaler protocol, with the exception it raised (or None)."""
    model = _model()
    opt = make_opt(model.parameters())
    scaler = scaler_cls(init_scale=2.0 ** 8)
    x, y = _batches(1)[0]
    out = {}

    def attempt(name, fn):
        try:
            fn()
            out[name] = None
        except Exception as e:  # noqa: BLE001 - recorded and compared
            out[name] = (type(e), str(e))

    attempt("step before scale", lambda: scaler.step(opt))
    scaler.scale(((model(x) - y) ** 2).mean()).backward()
    attempt("update before step", lambda: scaler.update())
    attempt("closure", lambda: scaler.step(opt, closure=lambda: None))
    attempt("unscale_", lambda: scaler.unscale_(opt))
    attempt("unscale_ twice", lambda: scaler.unscale_(opt))
    attempt("step", lambda: scaler.step(opt))
    attempt("step twice", lambda: scaler.step(opt))
    attempt("unscale_ after step", lambda: scaler.unscale_(opt))
    attempt("update", lambda: scaler.update())
    attempt("growth_factor", lambda: scaler_cls(growth_factor=1.0))
    attempt("backoff_factor", lambda: scaler_cls(backoff_factor=1.5))
    return out


@pytest.mark.parametrize("make_opt", [lambda ps: FusedSGD(ps, lr=0.01),
                                      lambda ps: torch.optim.SGD(ps, lr=0.01)],
                         ids=["fused", "torch"])
def test_protocol_errors_are_gradscalers(make_opt):
    """The same misuses raise the same errors as torch.amp.GradScaler (a fused optimizer under
    LossScaler against torch's SGD under GradScaler)."""
    ours = _protocol_misuses(LossScaler, make_opt)
    theirs = _protocol_misuses(lambda **kw: torch.amp.GradScaler("cpu", **kw),
                               lambda ps: torch.optim.SGD(ps, lr=0.01))
    assert ours == theirs
    assert ours["step"] is None and ours["step twice"] is not None
    assert ours["update before step"] is not None


def test_is_a_gradscaler_with_its_signature():
    scaler = LossScaler()
    assert isinstance(scaler, torch.amp.GradScaler)
    ours = list(inspect.signature(LossScaler.__init__).parameters.values())
    theirs = list(inspect.signature(torch.amp.GradScaler.__init__).parameters.values())
    assert [p.name for p in ours] == [p.name for p in theirs]
    assert [p.default for p in ours[2:]] == [p.default for p in theirs[2:]]
    assert ours[1].default is None  # device: where the first scaled loss lives
    # GradScaler's configuration API is there
    scaler.set_growth_factor(3.0)
    scaler.set_backoff_factor(0.25)
    scaler.set_growth_interval(7)
    assert (scaler.get_growth_factor(), scaler.get_backoff_factor(),
            scaler.get_growth_interval()) == (3.0, 0.25, 7)


def test_device_argument():
    with pytest.raises(TypeError, match="the first argument is the device"):
        LossScaler(2.0 ** 10)
    model = _model()
    opt = FusedSGD(model.parameters(), lr=0.01)
    for scaler in (LossScaler("cpu", init_scale=4.0), LossScaler(torch.device("cpu"), 4.0),
                   LossScaler(init_scale=4.0)):
        x, y = _batches(1)[0]
        _iteration(model, opt, scaler, x, y)
        assert scaler.get_scale() == 4.0 and scaler._device == "cpu"
    if not torch.cuda.is_available():  # as GradScaler("cuda") does on such a machine
        with pytest.warns(UserWarning, match="CUDA is not available"):
            assert not LossScaler("cuda").is_enabled()


@pytest.mark.parametrize("opt_cls", [FusedAdamW, FusedSGD])
def test_scheduler_and_hooks_see_the_step(backend, opt_cls):
    """scaler.step(fused optimizer) goes through optimizer.step: step hooks run and LR
    schedulers count it (no "lr_scheduler.step() before optimizer.step()" warning), skipped
    steps included, as for torch's fused optimizers under GradScaler."""
    model = _model()
    opt = opt_cls(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scaler = LossScaler(init_scale=2.0 ** 8)
    calls = []
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i, (x, y) in enumerate(_batches(3)):
            _iteration(model, opt, scaler, x, y, poison=i == 0)
            sched.step()
    assert len(calls) == 3
    assert opt.param_groups[0]["lr"] == 0.01 * 0.5 ** 3
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


def test_unscale_fp16_grads_on_cpu(backend):
    """fp16 parameters with fp32 masters: unscale_ (to clip by hand) works on any device;
    GradScaler refuses fp16 gradients there."""
    torch.manual_seed(0)
    model = _model().half()
    ref = _model().half()
    opt = FusedAdamW(model.parameters(), lr=1e-2)
    ropt = FusedAdamW(ref.parameters(), lr=1e-2)
    x, y = _batches(1)[0]
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        tscaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
        tscaler.scale(((ref(x.half()) - y.half()) ** 2).float().mean()).backward()
        tscaler.unscale_(ropt)
    scaler = LossScaler(init_scale=2.0 ** 8)
    scaler.scale(((model(x.half()) - y.half()) ** 2).float().mean()).backward()
    scaled = [p.grad.clone() for p in model.parameters()]
    scaler.unscale_(opt)
    for p, g in zip(model.parameters(), scaled):
        assert torch.equal(p.grad, g / 2 ** 8)  # a power of two: exact
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert not any(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_pickles_like_gradscaler():
    model = _model()
    opt = FusedSGD(model.parameters(), lr=0.01)
    scaler = LossScaler(init_scale=2.0 ** 5, growth_interval=1)
    x, y = _batches(1)[0]
    _iteration(model, opt, scaler, x, y)
    back = pickle.loads(pickle.dumps(scaler))
    assert isinstance(back, LossScaler) and back.state_dict() == scaler.state_dict()
    _iteration(model, opt, back, x, y)
    assert back.get_scale() == 2.0 ** 7


def test_disabled_and_iterables():
    model = _model()
    opt = FusedSGD(model.parameters(), lr=0.01)
    off = LossScaler(enabled=False)
    loss = torch.tensor(2.0)
    assert off.scale(loss) is loss and off.get_scale() == 1.0 and off.state_dict() == {}
    on = LossScaler(init_scale=4.0)
    a, (b, c) = on.scale([torch.tensor(1.0), (torch.tensor(2.0), torch.tensor(3.0))])
    assert (a.item(), b.item(), c.item()) == (4.0, 8.0, 12.0)
    x, y = _batches(1)[0]
    ((model(x) - y) ** 2).mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    off.step(opt)
    assert not any(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    on.update(new_scale=2.0)
    assert on.get_scale() == 2.0
