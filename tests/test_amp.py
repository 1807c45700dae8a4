"""LossScaler: torch.amp.GradScaler's behaviour and scale sequence, with the scale and the
found-inf flags kept on the device and no host read when the optimizer is fused."""
import pytest
import torch
import torch.nn as nn

from fastcore_train.amp import LossScaler
from fastcore_train.optim import FusedAdamW, FusedSGD


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 8, generator=g), torch.randn(16, 3, generator=g)) for _ in range(n)]


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
def test_matches_gradscaler(backend, make_opt):
    """Same skipped steps, same scale after every update, same weights."""
    ours, ref = _model(), _model()
    opt, topt = make_opt(ours.parameters()), make_opt(ref.parameters())
    scaler = LossScaler(init_scale=2.0 ** 6, growth_interval=3)
    tscaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 6, growth_interval=3)
    for i, (x, y) in enumerate(_batches(14)):
        _iteration(ours, opt, scaler, x, y, poison=i in POISON)
        _iteration(ref, topt, tscaler, x, y, poison=i in POISON)
        assert scaler.get_scale() == tscaler.get_scale()
        assert scaler.state_dict() == tscaler.state_dict()
    assert scaler.get_scale() != 2.0 ** 6
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


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


def test_no_host_sync_with_fused_optimizer(backend, monkeypatch):
    """scale / step / update never read a device value back when the optimizer is fused."""
    model = _model()
    opt = FusedAdamW(model.parameters(), lr=1e-3, max_grad_norm=1.0)
    scaler = LossScaler(init_scale=2.0 ** 4)
    batches = _batches(3)
    _iteration(model, opt, scaler, *batches[0])  # lazy state set-up out of the way

    def host_read(*args, **kwargs):
        raise AssertionError("host read of a device value")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    for i, (x, y) in enumerate(batches[1:]):
        _iteration(model, opt, scaler, x, y, poison=i == 0)
    monkeypatch.undo()
    assert scaler.get_scale() == 2.0 ** 3


def test_fused_step_never_writes_grads(backend):
    model = _model()
    opt = FusedAdamW(model.parameters(), lr=1e-3)
    scaler = LossScaler(init_scale=2.0 ** 10)
    x, y = _batches(1)[0]
    scaler.scale(((model(x) - y) ** 2).mean()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_unscale_then_clip_then_step(backend):
    """unscale_ writes unscaled grads for the user; step then reuses the recorded flag."""
    ours, ref = _model(), _model()
    opt = FusedAdamW(ours.parameters(), lr=1e-2)
    topt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    scaler, tscaler = LossScaler(init_scale=2.0 ** 8), torch.amp.GradScaler("cpu", 2.0 ** 8)
    for i, (x, y) in enumerate(_batches(6)):
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
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_two_optimizers_one_scaler(backend):
    """Each optimizer skips on its own gradients; the scale backs off if either overflowed."""
    model = _model()
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    o1, o2 = FusedAdamW(first, lr=1e-3), FusedSGD(second, lr=1e-2)
    scaler = LossScaler(init_scale=2.0 ** 8)
    x, y = _batches(1)[0]
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


def test_protocol_errors():
    with pytest.raises(TypeError, match="no device argument"):
        LossScaler("cuda")
    model = _model()
    opt = FusedSGD(model.parameters(), lr=0.01)
    scaler = LossScaler()
    with pytest.raises(RuntimeError, match="before any scale"):
        scaler.step(opt)
    x, y = _batches(1)[0]
    scaler.scale(((model(x) - y) ** 2).mean()).backward()
    with pytest.raises(RuntimeError, match="no optimizer step was recorded"):
        scaler.update()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(opt)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="step\\(\\) has already been called"):
        scaler.step(opt)
    with pytest.raises(RuntimeError, match="after step"):
        scaler.unscale_(opt)
    scaler.update()
    with pytest.raises(ValueError, match="growth_factor"):
        LossScaler(growth_factor=1.0)
    with pytest.raises(ValueError, match="backoff_factor"):
        LossScaler(backoff_factor=1.5)


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
