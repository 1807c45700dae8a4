"""The EMA of the weights kept by FusedAdamW / FusedSGD (``ema_decay``, ``ema_warmup``): parity
with torch.optim.swa_utils.AveragedModel(get_ema_multi_avg_fn) updated after each torch.optim
step, timm's ModelEmaV3 warmup written out from its definition, the overflow skip, the
``ema_weights()`` swap, checkpoints, op checks and version counters, torch.compile and
``fit(ema=True)``. Tests that take ``device`` also run on CUDA when a GPU is visible."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset

import fastcore_train as ft
from fastcore_train import _backend
from fastcore_train.ops import optim_step as ops
from fastcore_train.optim import FusedAdamW, FusedSGD
from fastcore_train.train import evaluate

STEPS = 100
PAIRS = {
    "adamw": (FusedAdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
    "sgd": (FusedSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "sgd-plain": (FusedSGD, torch.optim.SGD, dict(lr=0.05)),
}


def _module(device, dtype=torch.float32, seed=0):
    """Sizes that fill whole vectors and leave tails (1000 = 62 * 16 + 8), and odd ones."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 25), nn.Tanh(), nn.Linear(25, 3)).to(device, dtype)


def _grads(model, steps, seed=1):
    """Gradients independent of the weights, so that both sides see the same ones whatever
    their rounding; float32 values representable in the parameters' dtype."""
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    return [[torch.randn(p.shape, generator=g).to(dtype) for p in model.parameters()]
            for _ in range(steps)]


def _torch_run(model16, make_topt, decay, grads, device):
    """torch.optim on a float32 copy (the same maths as our float32 masters) and an
    AveragedModel built before training, update_parameters after each step."""
    ref = copy.deepcopy(model16).float()
    topt = make_topt(ref.parameters())
    avg = AveragedModel(ref, multi_avg_fn=get_ema_multi_avg_fn(decay))
    for gs in grads:
        for p, g in zip(ref.parameters(), gs):
            p.grad = g.float().to(device)
        topt.step()
        avg.update_parameters(ref)
    return ref, avg


def _our_run(model, opt, grads, device):
    for gs in grads:
        for p, g in zip(model.parameters(), gs):
            p.grad = g.to(device)
        opt.step()


def _emas(opt, model):
    return [opt.state[p]["ema"] for p in model.parameters()]


# ---------------------------------------------------------------------------------------------
# parity with AveragedModel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("decay", [0.9, 0.3])  # both branches of ATen's lerp (1 - d < 0.5 or not)
def test_matches_averaged_model(backend, device, name, dtype, decay):
    ours_cls, torch_cls, kw = PAIRS[name]
    model = _module(device, dtype)
    grads = _grads(model, STEPS)
    ref, avg = _torch_run(model, lambda ps: torch_cls(ps, foreach=False, **kw), decay, grads,
                          device)
    opt = ours_cls(model.parameters(), ema_decay=decay, **kw)
    _our_run(model, opt, grads, device)
    for p, q in zip(model.parameters(), ref.parameters()):
        w = opt.state[p].get("master", p)
        torch.testing.assert_close(w, q, atol=1e-6, rtol=0)  # the float32 weights agree
    for e, a in zip(_emas(opt, model), avg.module.parameters()):
        assert e.dtype == torch.float32 and e.shape == a.shape
        torch.testing.assert_close(e, a, atol=1e-6, rtol=0)
    # and the EMA is not simply the weights
    assert any((e - p.float()).abs().max() > 1e-4 for e, p in zip(_emas(opt, model),
                                                                 model.parameters()))
    assert all(opt.state[p]["ema_step"].item() == STEPS for p in model.parameters())


def test_first_step_copies_the_new_weight(backend, device):
    model = _module(device)
    before = [p.detach().clone() for p in model.parameters()]
    opt = FusedAdamW(model.parameters(), lr=0.1, ema_decay=0.999)
    _our_run(model, opt, _grads(model, 1), device)
    for p, e, b in zip(model.parameters(), _emas(opt, model), before):
        assert torch.equal(e, p) and not torch.equal(e, b)


def _timm_decay(decay, step):
    """timm's ModelEmaV3.get_decay(step) with use_warmup=True and its defaults
    (update_after_step=0, warmup_gamma=1, warmup_power=2/3, min_decay=0), step = num_updates."""
    step = max(0, step - 0 - 1)
    if step <= 0:
        return 0.0
    d = 1 - (1 + step / 1.0) ** -(2 / 3)
    return max(min(d, decay), 0.0)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_warmup_is_timms(backend, device, name):
    """timm calls model_ema.update(model, step=num_updates) after each optimizer step, with
    num_updates counting that step: our EMA after n steps is timm's with step = n."""
    ours_cls, torch_cls, kw = PAIRS[name]
    decay = 0.999  # never reached in 100 steps: the warmup decides throughout
    model = _module(device)
    grads = _grads(model, STEPS)
    ref = copy.deepcopy(model)
    topt = torch_cls(ref.parameters(), foreach=False, **kw)
    ema = [p.detach().clone() for p in ref.parameters()]  # ModelEmaV3: a copy at construction
    for num_updates, gs in enumerate(grads, start=1):
        for p, g in zip(ref.parameters(), gs):
            p.grad = g.to(device)
        topt.step()
        d = _timm_decay(decay, num_updates)
        for e, p in zip(ema, ref.parameters()):
            e.lerp_(p.detach(), 1.0 - d)
    opt = ours_cls(model.parameters(), ema_decay=decay, ema_warmup=True, **kw)
    _our_run(model, opt, grads, device)
    for e, r in zip(_emas(opt, model), ema):
        torch.testing.assert_close(e, r, atol=1e-6, rtol=0)
    # without warmup the EMA is elsewhere: the test can tell them apart
    m2 = _module(device)
    plain = ours_cls(m2.parameters(), ema_decay=decay, **kw)
    _our_run(m2, plain, grads, device)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(_emas(plain, m2), ema))


# ---------------------------------------------------------------------------------------------
# overflow, ema_weights(), add_param_group


@pytest.mark.parametrize("first", [False, True], ids=["later", "first"])
def test_overflow_skip_leaves_the_ema_untouched(backend, device, first):
    model = _module(device, torch.float16)
    opt = FusedAdamW(model.parameters(), lr=1e-2, ema_decay=0.9)
    grads = _grads(model, 4)
    if not first:
        _our_run(model, opt, grads[:3], device)
    for p, g in zip(model.parameters(), grads[3]):
        p.grad = g.to(device)
    opt.step()  # state exists from here on
    emas = [opt.state[p]["ema"].clone() for p in model.parameters()]
    steps = [opt.state[p]["ema_step"].clone() for p in model.parameters()]
    opt.step(found_inf=torch.ones((), device=device))
    assert all(torch.equal(a, b) for a, b in zip(_emas(opt, model), emas))
    assert all(torch.equal(opt.state[p]["ema_step"], s) for p, s in zip(model.parameters(), steps))
    # a LossScaler step whose gradients overflow is skipped too
    scaler = ft.amp.LossScaler(init_scale=4.0)
    scaler.scale(torch.ones((), device=device))
    next(model.parameters()).grad[0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0  # it did see the overflow
    assert all(torch.equal(a, b) for a, b in zip(_emas(opt, model), emas))


def test_skipped_first_step_then_copy(backend, device):
    model = _module(device)
    opt = FusedSGD(model.parameters(), lr=0.1, ema_decay=0.99)
    before = [p.detach().clone() for p in model.parameters()]
    _set_grads(model, device)
    opt.step(found_inf=torch.ones((), device=device))
    assert all(torch.equal(e, b) for e, b in zip(_emas(opt, model), before))  # the weight
    assert all(opt.state[p]["ema_step"].item() == 0 for p in model.parameters())
    opt.step()
    assert all(torch.equal(e, p) for e, p in zip(_emas(opt, model), model.parameters()))


def _set_grads(model, device, seed=3):
    for p, g in zip(model.parameters(), _grads(model, 1, seed)[0]):
        p.grad = g.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ema_weights_swaps_and_restores(backend, device, dtype):
    model = _module(device, dtype)
    opt = FusedAdamW(model.parameters(), lr=0.05, ema_decay=0.8)
    _our_run(model, opt, _grads(model, 5), device)
    params = [p.detach().clone() for p in model.parameters()]
    masters = [opt.state[p]["master"].clone() for p in model.parameters()
               if "master" in opt.state[p]]
    x = torch.randn(4, 40, device=device, dtype=dtype)
    with opt.ema_weights():
        for p, e in zip(model.parameters(), _emas(opt, model)):
            assert p.dtype == dtype and torch.equal(p, e.to(dtype))
        with torch.no_grad():
            out_ema = model(x)
    for p, v in zip(model.parameters(), params):
        assert torch.equal(p, v)
    assert all(torch.equal(opt.state[p]["master"], m) for p, m in zip(
        [p for p in model.parameters() if "master" in opt.state[p]], masters))
    assert (dtype == torch.float32) == (not masters)
    assert not torch.equal(out_ema, model(x).detach())
    with pytest.raises(KeyError):  # restored on an exception too
        with opt.ema_weights():
            raise KeyError("boom")
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), params))
    # the next step starts from the restored weights: as if nothing happened
    twin = copy.deepcopy(model)
    topt = FusedAdamW(twin.parameters(), lr=0.05, ema_decay=0.8)
    topt.load_state_dict(opt.state_dict())
    _set_grads(model, device)
    _set_grads(twin, device)
    opt.step()
    topt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_ema_weights_before_any_step_and_without_ema(backend):
    model = _module("cpu")
    opt = FusedSGD(model.parameters(), lr=0.1, ema_decay=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    with opt.ema_weights():  # no EMA yet: the weights are their own EMA
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(RuntimeError, match="keeps no EMA of the weights; construct it with "
                                           "ema_decay"):
        with FusedSGD(model.parameters(), lr=0.1).ema_weights():
            pass


def test_add_param_group(backend, device):
    torch.manual_seed(0)
    body, head = nn.Linear(10, 6).to(device), nn.Linear(6, 2).to(device)
    opt = FusedAdamW(body.parameters(), lr=1e-2, ema_decay=0.5)
    for _ in range(3):
        _set_grads(body, device)
        opt.step()
    opt.add_param_group({"params": head.parameters(), "lr": 1e-3})
    assert opt.param_groups[1]["ema_decay"] == 0.5
    _set_grads(body, device)
    _set_grads(head, device)
    opt.step()
    for p in head.parameters():  # the new group's first EMA update: a copy
        assert torch.equal(opt.state[p]["ema"], p) and opt.state[p]["ema_step"].item() == 1
    assert all(opt.state[p]["ema_step"].item() == 4 for p in body.parameters())
    with pytest.raises(ValueError, match=r"ema_decay must be None or in \[0, 1\], got 1.5"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, device=device))],
                             "ema_decay": 1.5})
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("kw, exc, msg", [
    (dict(ema_decay=-0.1), ValueError, r"ema_decay must be None or in \[0, 1\], got -0.1"),
    (dict(ema_decay="0.9"), TypeError, "ema_decay must be a number"),
    (dict(ema_decay=0.9, ema_warmup=2), ValueError, "ema_warmup must be True or False"),
])
@pytest.mark.parametrize("cls", [FusedAdamW, FusedSGD])
def test_bad_ema_arguments(cls, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        cls(nn.Linear(2, 2).parameters(), lr=0.1, **kw)


def test_ema_decay_none_drops_the_ema(backend):
    model = _module("cpu")
    opt = FusedAdamW(model.parameters(), ema_decay=0.9)
    _our_run(model, opt, _grads(model, 2), "cpu")
    # load_state_dict restores the saved groups' hyperparameters, ema_decay included
    plain = FusedAdamW(model.parameters())
    plain.load_state_dict(opt.state_dict())
    assert plain.param_groups[0]["ema_decay"] == 0.9
    plain.param_groups[0]["ema_decay"] = None  # switched off: the next step drops the EMA
    _our_run(model, plain, _grads(model, 1), "cpu")
    assert all(not {"ema", "ema_step"} & set(plain.state[p]) for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# checkpoints


@pytest.mark.parametrize("cls", [FusedAdamW, FusedSGD])
def test_state_dict_round_trip_resumes_bitwise(backend, device, cls):
    kw = dict(lr=1e-2, ema_decay=0.95, ema_warmup=True)
    model = _module(device, torch.bfloat16)
    grads = _grads(model, 10)
    opt = cls(model.parameters(), **kw)
    _our_run(model, opt, grads[:5], device)
    twin = copy.deepcopy(model)
    sd = copy.deepcopy(opt.state_dict())
    assert all({"ema", "ema_step"} <= set(s) for s in sd["state"].values())
    opt2 = cls(twin.parameters(), **kw)
    opt2.load_state_dict(sd)
    _our_run(model, opt, grads[5:], device)
    _our_run(twin, opt2, grads[5:], device)
    for a, b in zip(_emas(opt, model), _emas(opt2, twin)):
        assert torch.equal(a, b)
    # loaded tensors are copies
    assert all(sd["state"][i]["ema"].data_ptr() != e.data_ptr()
               for i, e in enumerate(_emas(opt2, twin)))


def _bad(sd, key, value):
    sd = copy.deepcopy(sd)
    sd["state"][1][key] = value
    return sd


@pytest.mark.parametrize("key, value, exc, msg", [
    ("ema", torch.zeros(3), ValueError, r"state 'ema' of parameter 1 of param group 0 has "
                                        r"shape \[3\] but its parameter has shape \[25\]"),
    ("ema", [0.0] * 25, TypeError, "state 'ema' of parameter 1 of param group 0 must be a "
                                   "floating-point tensor, got list"),
    ("ema_step", torch.zeros(2), ValueError, "state 'ema_step' of parameter 1 of param group 0 "
                                             "must be a number or a one-element tensor"),
])
def test_bad_ema_state_is_refused_before_anything_changes(backend, key, value, exc, msg):
    model = _module("cpu")
    opt = FusedAdamW(model.parameters(), ema_decay=0.9)
    _our_run(model, opt, _grads(model, 2), "cpu")
    before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    with pytest.raises(exc, match=msg):
        opt.load_state_dict(_bad(opt.state_dict(), key, value))
    for p, s in opt.state.items():
        assert all(torch.equal(v, before[id(p)][k]) for k, v in s.items())


def test_ema_loaded_without_its_count_has_started(backend):
    model = _module("cpu")
    opt = FusedAdamW(model.parameters(), lr=0.1, ema_decay=0.5)
    _our_run(model, opt, _grads(model, 2), "cpu")
    sd = opt.state_dict()
    for s in sd["state"].values():
        del s["ema_step"]
    opt.load_state_dict(sd)
    emas = [e.clone() for e in _emas(opt, model)]
    _our_run(model, opt, _grads(model, 1, seed=7), "cpu")
    for e, old, p in zip(_emas(opt, model), emas, model.parameters()):
        torch.testing.assert_close(e, old.lerp(p.detach(), 0.5), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# the ops: checks, extension = reference, versions


def _op_args(device, n=2):
    ps = [torch.randn(1000, device=device), torch.randn(7, 3, device=device).t()]
    ps = ps[:n]
    return dict(params=ps, grads=[torch.randn_like(p) for p in ps],
                exp_avgs=[torch.zeros_like(p) for p in ps],
                exp_avg_sqs=[torch.zeros_like(p) for p in ps], max_exp_avg_sqs=[], masters=[],
                steps=[torch.zeros((), device=device) for _ in ps], lr=1e-2, lr_tensor=None,
                beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False,
                maximize=False, grad_scale=None, found_inf=None, sq_norm=None,
                max_grad_norm=0.0,
                # a contiguous EMA for a transposed parameter: staged in its layout and back
                emas=[torch.randn(p.shape, device=device) for p in ps],
                ema_steps=[torch.full((), 2.0, device=device) for _ in ps], ema_decay=0.9,
                ema_warmup=False)


OP_ERRORS = [
    ("dtype", lambda a: dict(emas=[a["emas"][0].double(), a["emas"][1]]), TypeError,
     "fused_adamw_: emas[0] must be torch.float32, got torch.float64"),
    ("count", lambda a: dict(emas=a["emas"][:1]), ValueError,
     "fused_adamw_: got 2 params but 1 emas"),
    ("shape", lambda a: dict(emas=[a["emas"][0][:5], a["emas"][1]]), ValueError,
     "fused_adamw_: emas[0] has shape [5] but params[0] has shape [1000]"),
    ("shared", lambda a: dict(emas=[a["exp_avgs"][0], a["emas"][1]]), ValueError,
     "fused_adamw_: exp_avgs[0] and emas[0] are the same memory; each parameter needs tensors "
     "of its own (is a parameter listed twice?)"),
    ("steps", lambda a: dict(ema_steps=a["ema_steps"][:1]), ValueError,
     "fused_adamw_: got 2 params but 1 ema_steps"),
    ("step-shared", lambda a: dict(ema_steps=[a["steps"][0], a["ema_steps"][1]]), ValueError,
     "fused_adamw_: steps[0] and ema_steps[0] are the same memory; each parameter needs "
     "tensors of its own (is a parameter listed twice?)"),
    ("no-emas", lambda a: dict(emas=[]), ValueError,
     "fused_adamw_: ema_steps must be empty without emas, got 2"),
    ("decay", lambda a: dict(ema_decay=1.5), ValueError,
     "fused_adamw_: ema_decay must be in [0, 1], got 1.5"),
]


@pytest.mark.parametrize("case", OP_ERRORS, ids=[c[0] for c in OP_ERRORS])
def test_op_errors_match_reference(device, case):
    _, change, exc, msg = case
    args = _op_args(device)
    args.update(change(args))
    with pytest.raises(exc) as e:
        ops.fused_adamw_reference_(*args.values())
    assert str(e.value) == msg
    if _backend.extension_loaded():
        with pytest.raises(exc) as e:
            torch.ops.fastcore_train.fused_adamw_(*args.values())
        assert str(e.value).splitlines()[0] == msg


def _mixed_args(device):
    """_op_args plus a float16 parameter without master (its EMA follows the float32 value);
    params[0]'s EMA at its first update (a copy), the others past it."""
    torch.manual_seed(0)
    a = _op_args(device)
    extra = dict(params=torch.randn(37, device=device, dtype=torch.float16),
                 grads=torch.randn(37, device=device, dtype=torch.float16),
                 exp_avgs=torch.zeros(37, device=device), exp_avg_sqs=torch.zeros(37, device=device),
                 steps=torch.zeros((), device=device), emas=torch.randn(37, device=device),
                 ema_steps=torch.full((), 5.0, device=device))
    for k, v in extra.items():
        a[k].append(v)
    a["ema_steps"][0].zero_()
    return a


@pytest.mark.parametrize("warmup", [False, True])
@pytest.mark.parametrize("op", ["adamw", "sgd"])
def test_extension_matches_reference(extension, device, op, warmup):
    """Non-contiguous parameters with a contiguous EMA, vector bodies and tails, three steps."""
    results = []
    for impl in ("ext", "ref"):
        a = _mixed_args(device)
        a["ema_warmup"] = warmup
        for _ in range(3):
            if op == "adamw":
                fn = torch.ops.fastcore_train.fused_adamw_ if impl == "ext" \
                    else ops.fused_adamw_reference_
                fn(*a.values())
            else:
                fn = torch.ops.fastcore_train.fused_sgd_ if impl == "ext" \
                    else ops.fused_sgd_reference_
                fn(a["params"], a["grads"], [], [], [], 0.05, None, 0.0, 0.0, False, False, 1e-3,
                   None, None, None, 0.0, a["emas"], a["ema_steps"], 0.9, warmup)
        results.append([t.clone() for t in a["params"] + a["emas"] + a["ema_steps"]])
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


def test_versions_of_the_ema_are_bumped(backend):
    a = _op_args("cpu")
    versions = [t._version for t in a["emas"] + a["ema_steps"]]
    ops.fused_adamw_(**{k: v for k, v in a.items() if k not in ("max_exp_avg_sqs",)},
                     max_exp_avg_sqs=[])
    assert all(t._version > v for t, v in zip(a["emas"] + a["ema_steps"], versions))
    model = _module("cpu")
    opt = FusedSGD(model.parameters(), lr=0.1, ema_decay=0.9)
    _our_run(model, opt, _grads(model, 1), "cpu")
    before = [opt.state[p]["ema"]._version for p in model.parameters()]
    _our_run(model, opt, _grads(model, 1), "cpu")
    assert all(opt.state[p]["ema"]._version > v for p, v in zip(model.parameters(), before))


# ---------------------------------------------------------------------------------------------
# torch.compile(opt.step)


def _backends_and_devices():
    from test_optim_torch_api import _backends_and_devices as both
    return both()


@pytest.mark.parametrize("backend_, device_", _backends_and_devices())
@pytest.mark.parametrize("cls, dtype", [(FusedAdamW, torch.float32), (FusedSGD, torch.bfloat16)])
def test_compile_step_with_ema(backend_, device_, cls, dtype):
    """torch.compile(opt.step, fullgraph=True) = eager, the EMA's state creation included."""
    from conftest import device_context
    from test_optim_torch_api import _check_compile_step_parity
    kw = dict(lr=1e-2, ema_decay=0.9, ema_warmup=cls is FusedSGD)
    if cls is FusedSGD:
        kw["momentum"] = 0.9
    with device_context(device_), _backend.use_backend(backend_):
        _check_compile_step_parity(backend_, device_, cls, dtype, kw)


# ---------------------------------------------------------------------------------------------
# fit(ema=True)


def _data(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = (x[:, :2].sum(1) > 0).long() + (x[:, 2] > 0.5).long()
    return (DataLoader(TensorDataset(x[:96], y[:96]), batch_size=16),
            DataLoader(TensorDataset(x[96:], y[96:]), batch_size=24))


def _fit(tmp=None, epochs=3, resume=False, callbacks=(), **opt_kw):
    torch.manual_seed(0)
    train, val = _data()
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = FusedAdamW(model.parameters(), lr=1e-2, **opt_kw)
    hist = ft.fit(model, train, epochs=epochs, loss_fn=nn.CrossEntropyLoss(), optimizer=opt,
                  val_loader=val, progress=False, ema=True, checkpoint_dir=tmp, resume=resume,
                  callbacks=list(callbacks))
    return model, opt, hist, val


def test_fit_reports_the_ema_validation():
    model, opt, hist, val = _fit(ema_decay=0.9)
    assert {"val_loss", "val_accuracy", "ema_val_loss", "ema_val_accuracy"} <= set(hist[-1])
    with opt.ema_weights():
        expected = evaluate(model, val, nn.CrossEntropyLoss())
    assert hist[-1]["ema_val_loss"] == pytest.approx(expected["val_loss"], rel=1e-6)
    assert hist[-1]["ema_val_loss"] != hist[-1]["val_loss"]
    assert hist[-1]["val_loss"] == pytest.approx(
        evaluate(model, val, nn.CrossEntropyLoss())["val_loss"], rel=1e-6)


def test_fit_refuses_ema_without_an_ema_optimizer():
    train, val = _data()
    model = nn.Linear(10, 3)
    for opt in (FusedAdamW(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1)):
        with pytest.raises(ValueError, match=r"fit\(ema=True\) needs an optimizer that keeps an "
                                             "EMA of the weights"):
            ft.fit(model, train, epochs=1, loss_fn=nn.CrossEntropyLoss(), optimizer=opt,
                   progress=False, ema=True)


def test_resume_carries_the_ema(tmp_path):
    from test_resume import Crash, CrashAt, strip
    ref_model, ref_opt, ref_hist, _ = _fit(ema_decay=0.8, ema_warmup=True)
    with pytest.raises(Crash):
        _fit(tmp_path, callbacks=[CrashAt(2)], ema_decay=0.8, ema_warmup=True)
    model, opt, hist, _ = _fit(tmp_path, resume=True, ema_decay=0.8, ema_warmup=True)
    assert strip(hist) == strip(ref_hist)
    for a, b in zip(_emas(opt, model), _emas(ref_opt, ref_model)):
        assert torch.equal(a, b)
