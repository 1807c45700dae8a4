"""Schedules: parity with torch.optim.lr_scheduler at every step, exact resume, warmup, scaling."""
import io
import logging
import math
import warnings

import pytest
import torch
from torch.optim import lr_scheduler as tls

from fastcore_train import schedules as S


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def make_opt(kind, groups=1, lr=0.1):
    params = [{"params": [torch.nn.Parameter(torch.zeros(3))]} for _ in range(groups)]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    raise AssertionError(kind)


def momenta(opt):
    return [g["betas"][0] if "betas" in g else g["momentum"] for g in opt.param_groups]


def trace(opt, sched, n):
    """(lrs, momenta) before each of n optimizer steps, i.e. the values each step uses."""
    out = []
    for _ in range(n):
        out.append(([g["lr"] for g in opt.param_groups], momenta(opt)))
        opt.step()
        sched.step()
    return out


def roundtrip(state):
    """Through torch.save/torch.load(weights_only=True): the state must be plain data."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


OPTS = ["sgd", "adam", "adamw"]


# --------------------------------------------------------------------------------------------
# OneCycleLR
# --------------------------------------------------------------------------------------------

ONECYCLE_CASES = [
    dict(),
    dict(anneal_strategy="linear"),
    dict(three_phase=True),
    dict(three_phase=True, anneal_strategy="linear", pct_start=0.4),
    dict(pct_start=0.1, div_factor=10.0, final_div_factor=100.0),
    dict(base_momentum=0.8, max_momentum=0.9),
    dict(cycle_momentum=False),
]


@pytest.mark.parametrize("kind", OPTS)
@pytest.mark.parametrize("kwargs", ONECYCLE_CASES, ids=lambda k: ",".join(k) or "default")
@pytest.mark.parametrize("total", [1, 7, 100])
def test_onecycle_matches_torch_every_step(kind, kwargs, total):
    o1, o2 = make_opt(kind, 2), make_opt(kind, 2)
    ours = S.OneCycleLR(o1, [0.5, 0.05], total_steps=total, **kwargs)
    ref = tls.OneCycleLR(o2, [0.5, 0.05], total_steps=total, **kwargs)
    assert trace(o1, ours, total) == trace(o2, ref, total)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_onecycle_per_group_momentum_and_epochs(kind):
    o1, o2 = make_opt(kind, 2), make_opt(kind, 2)
    kw = dict(max_lr=[1.0, 0.1], epochs=3, steps_per_epoch=11,
              base_momentum=[0.8, 0.85], max_momentum=[0.9, 0.99])
    ours, ref = S.OneCycleLR(o1, **kw), tls.OneCycleLR(o2, **kw)
    assert ours.total_steps == ref.total_steps == 33
    assert trace(o1, ours, 33) == trace(o2, ref, 33)


# The preset numbers are the ones the presets are specified by; "torch" is torch's defaults.
@pytest.mark.parametrize("preset,torch_kwargs", [
    ("torch", dict()),
    ("smith", dict(three_phase=True, anneal_strategy="linear",
                   pct_start=S.ONE_CYCLE_PRESETS["smith"]["pct_start"],
                   div_factor=S.ONE_CYCLE_PRESETS["smith"]["div_factor"],
                   final_div_factor=S.ONE_CYCLE_PRESETS["smith"]["final_div_factor"])),
])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_onecycle_presets(preset, torch_kwargs, kind):
    o1, o2 = make_opt(kind), make_opt(kind)
    ours = S.OneCycleLR(o1, 0.3, total_steps=50, preset=preset)
    ref = tls.OneCycleLR(o2, 0.3, total_steps=50, **torch_kwargs)
    assert trace(o1, ours, 50) == trace(o2, ref, 50)


# fastai's schedule, written out from fastai.callback.schedule (SchedCos, combine_scheds,
# combined_cos) and fit_one_cycle: before batch t of a run of N batches the position is
# pct_train = t / N, the lr is combined_cos(pct_start, lr_max/div, lr_max, lr_max/div_final)(pos)
# and the momentum combined_cos(pct_start, *moms)(pos).
def fastai_sched_cos(start, end, pos):
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def fastai_combined_cos(pct, start, middle, end):
    def at(pos):
        if pos >= 1:  # combine_scheds caps the phase index at the last one: its end value
            return fastai_sched_cos(middle, end, 1.0)
        if pos < pct:
            return fastai_sched_cos(start, middle, pos / pct)
        return fastai_sched_cos(middle, end, (pos - pct) / (1 - pct))
    return at


def assert_fastai_trace(got, n, lr_max, pct, div, div_final, moms):
    lr_max = lr_max if isinstance(lr_max, list) else [lr_max]
    lr_f = [fastai_combined_cos(pct, m / div, m, m / div_final) for m in lr_max]
    mom_f = fastai_combined_cos(pct, *moms)
    for t, (lrs, ms) in enumerate(got):
        pos = min(t, n) / n
        # the two cosine forms agree to rounding; scale the tolerance by the phase's start
        assert lrs == [pytest.approx(f(pos), rel=1e-12, abs=1e-14 * m)
                       for f, m in zip(lr_f, lr_max)], t
        assert ms == [pytest.approx(mom_f(pos), rel=1e-12)] * len(ms), t


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("n", [1, 7, 40, 101])
def test_onecycle_fastai_preset_is_fastais_combined_cos(kind, n):
    opt = make_opt(kind, 2)
    sched = S.OneCycleLR(opt, [0.3, 0.003], total_steps=n, preset="fastai",
                         max_momentum=0.95, base_momentum=0.85)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stepping past the end is part of the check
        got = trace(opt, sched, n + 3)
    assert_fastai_trace(got, n, [0.3, 0.003], 0.25, 25.0, 1e5, (0.95, 0.85, 0.95))
    # the final lr is lr_max / div_final (torch's convention would give lr_max/div/div_final)
    assert got[-1][0] == pytest.approx([0.3 / 1e5, 0.003 / 1e5], rel=1e-12)


@pytest.mark.parametrize("pct,div,div_final,moms", [
    (0.5, 10.0, 1e4, (0.9, 0.8, 0.7)),
    (0.99, 25.0, 1e5, (0.95, 0.85, 0.95)),   # fine_tune's frozen phase
    (0.3, 5.0, 1e5, (0.95, 0.85, 0.9)),      # fine_tune's unfrozen phase, uneven moms
    (0.0, 25.0, 1e5, (0.95, 0.85, 0.95)),
])
def test_onecycle_fastai_preset_overridden_by_explicit_arguments(pct, div, div_final, moms):
    opt = make_opt("adamw")
    sched = S.OneCycleLR(opt, 0.01, total_steps=37, preset="fastai", pct_start=pct,
                         div_factor=div, final_div_factor=div_final, max_momentum=moms[0],
                         base_momentum=moms[1], final_momentum=moms[2])
    assert_fastai_trace(trace(opt, sched, 37), 37, 0.01, pct, div, div_final, moms)


def test_onecycle_fastai_preset_resumes_exactly():
    o1, o2 = make_opt("sgd", 2), make_opt("sgd", 2)
    kw = dict(max_lr=[0.5, 0.05], total_steps=30, preset="fastai", final_momentum=0.9)
    full = trace(o1, S.OneCycleLR(o1, **kw), 30)
    first = S.OneCycleLR(o2, **kw)
    head = trace(o2, first, 12)
    o3 = make_opt("sgd", 2)
    second = S.OneCycleLR(o3, 1.0, total_steps=5)  # rebuilt differently: the state decides
    second.load_state_dict(roundtrip(first.state_dict()))
    assert head + trace(o3, second, 18) == full


def test_onecycle_final_momentum_torch_convention():
    o1, o2 = make_opt("sgd"), make_opt("sgd")
    ours = trace(o1, S.OneCycleLR(o1, 0.3, total_steps=20, final_momentum=0.9), 20)
    ref = trace(o2, tls.OneCycleLR(o2, 0.3, total_steps=20), 20)
    assert [lr for lr, _ in ours] == [lr for lr, _ in ref]
    assert [m for _, m in ours][:6] == [m for _, m in ref][:6]  # rise phase unchanged
    assert ours[-1][1] == [pytest.approx(0.9, rel=1e-12)]


@pytest.mark.parametrize("anneal", ["cos", "linear"])
def test_onecycle_past_end_clamps_with_one_warning(anneal):
    total = 20
    o1, o2 = make_opt("sgd"), make_opt("sgd")
    ours = S.OneCycleLR(o1, 0.4, total_steps=total, anneal_strategy=anneal)
    ref = tls.OneCycleLR(o2, 0.4, total_steps=total, anneal_strategy=anneal)
    expected = trace(o2, ref, total)
    final = expected[-1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = trace(o1, ours, total + 10)
    assert got[:total] == expected
    # Held at the last scheduled value (lr and momentum), never extrapolated.
    assert all(v == final for v in got[total:])
    assert all(lr > 0 for lrs, _ in got for lr in lrs)
    past = [w for w in caught if "total_steps" in str(w.message)]
    assert len(past) == 1
    # torch raises where we warn: the premise of the clamp.
    with pytest.raises(ValueError, match="Tried to step"):
        ref.step()


def test_onecycle_validation():
    opt = make_opt("sgd")
    with pytest.raises(ValueError, match="total_steps"):
        S.OneCycleLR(opt, 0.1)
    with pytest.raises(ValueError, match="preset"):
        S.OneCycleLR(opt, 0.1, total_steps=10, preset="nope")
    with pytest.raises(ValueError, match="pct_start"):
        S.OneCycleLR(opt, 0.1, total_steps=10, pct_start=1.5)
    with pytest.raises(ValueError, match="three_phase"):
        S.OneCycleLR(opt, 0.1, total_steps=10, three_phase=True, pct_start=0.6)
    with pytest.raises(ValueError, match="two-phase"):
        S.OneCycleLR(opt, 0.1, total_steps=10, preset="fastai", three_phase=True)
    with pytest.raises(ValueError, match="final_momentum"):
        S.OneCycleLR(opt, 0.1, total_steps=10, final_momentum=[0.9, 0.9])
    with pytest.raises(ValueError, match="anneal_strategy"):
        S.OneCycleLR(opt, 0.1, total_steps=10, anneal_strategy="step")
    with pytest.raises(ValueError, match="param groups"):
        S.OneCycleLR(opt, [0.1, 0.2], total_steps=10)
    rprop = torch.optim.Rprop([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="cycle_momentum"):
        S.OneCycleLR(rprop, 0.1, total_steps=10)


# --------------------------------------------------------------------------------------------
# CyclicLR
# --------------------------------------------------------------------------------------------

CYCLIC_CASES = [
    dict(),
    dict(mode="triangular2"),
    dict(mode="exp_range", gamma=0.97),
    dict(step_size_down=9),
    dict(mode="triangular2", step_size_down=3, base_momentum=0.7, max_momentum=0.95),
    dict(cycle_momentum=False),
]


@pytest.mark.parametrize("kind", OPTS)
@pytest.mark.parametrize("kwargs", CYCLIC_CASES, ids=lambda k: ",".join(k) or "default")
def test_cyclic_matches_torch_every_step(kind, kwargs):
    o1, o2 = make_opt(kind, 2), make_opt(kind, 2)
    ours = S.CyclicLR(o1, [0.01, 0.001], [0.1, 0.02], step_size_up=5, **kwargs)
    ref = tls.CyclicLR(o2, [0.01, 0.001], [0.1, 0.02], step_size_up=5, **kwargs)
    assert trace(o1, ours, 80) == trace(o2, ref, 80)


@pytest.mark.parametrize("scale_mode", ["cycle", "iterations"])
def test_cyclic_custom_scale_fn_matches_torch(scale_mode):
    def fn(x):
        return 1.0 / (1.0 + 0.1 * x)
    o1, o2 = make_opt("sgd"), make_opt("sgd")
    ours = S.CyclicLR(o1, 0.01, 0.1, step_size_up=4, scale_fn=fn, scale_mode=scale_mode)
    ref = tls.CyclicLR(o2, 0.01, 0.1, step_size_up=4, scale_fn=fn, scale_mode=scale_mode)
    assert trace(o1, ours, 50) == trace(o2, ref, 50)


def test_cyclic_validation():
    opt = make_opt("sgd")
    with pytest.raises(ValueError, match="mode"):
        S.CyclicLR(opt, 0.01, 0.1, mode="sine")
    with pytest.raises(ValueError, match="step_size"):
        S.CyclicLR(opt, 0.01, 0.1, step_size_up=0)


# --------------------------------------------------------------------------------------------
# Exact resume
# --------------------------------------------------------------------------------------------

def _onecycle(opt):
    return S.OneCycleLR(opt, 0.5, total_steps=80, three_phase=True)


def _cyclic(opt):
    return S.CyclicLR(opt, 0.01, 0.1, step_size_up=7, mode="triangular2")


def _warm_onecycle(opt):
    return S.warmup(S.OneCycleLR(opt, 0.5, total_steps=70), 10)


def _warm_torch_exp(opt):
    return S.warmup(tls.ExponentialLR(opt, gamma=0.95), 10, mode="exp")


@pytest.mark.parametrize("build", [_onecycle, _cyclic, _warm_onecycle, _warm_torch_exp],
                         ids=["onecycle", "cyclic", "warmup+onecycle", "warmup+torch-exp"])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("at", [3, 10, 27])
def test_resume_mid_cycle_is_exact(build, kind, at):
    opt = make_opt(kind)
    sched = build(opt)
    trace(opt, sched, at)
    state = roundtrip(sched.state_dict())
    expected = trace(opt, sched, 40)

    # A fresh optimizer and scheduler; only the scheduler state is loaded.
    opt2 = make_opt(kind)
    sched2 = build(opt2)
    sched2.load_state_dict(state)
    assert trace(opt2, sched2, 40) == expected


def test_state_dict_has_no_optimizer_or_callables():
    opt = make_opt("sgd")
    state = S.CyclicLR(opt, 0.01, 0.1, scale_fn=lambda x: 1.0).state_dict()
    assert "optimizer" not in state
    assert not any(callable(v) for v in state.values())


# --------------------------------------------------------------------------------------------
# Warmup
# --------------------------------------------------------------------------------------------

def _reference_sequence(build_inner, kind, n):
    opt = make_opt(kind)
    return trace(opt, build_inner(opt), n)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_linear_warmup_then_onecycle(kind):
    steps, total = 8, 30

    def inner(o):
        return S.OneCycleLR(o, 0.5, total_steps=total)

    after = _reference_sequence(inner, kind, total)
    # Reference warmup factors: torch's LinearLR from 1/(steps+1) to 1 over `steps`.
    probe = make_opt("sgd", lr=1.0)
    factors = [lrs[0] for lrs, _ in trace(probe, tls.LinearLR(
        probe, start_factor=1 / (steps + 1), end_factor=1.0, total_iters=steps), steps)]

    opt = make_opt(kind)
    sched = S.warmup(inner(opt), steps)
    got = trace(opt, sched, steps + total)
    target_lr, start_mom = after[0]
    for t in range(steps):
        assert got[t][0][0] == pytest.approx(target_lr[0] * factors[t], rel=1e-12)
        assert got[t][1] == start_mom           # momentum held at the inner's step-0 value
    assert got[steps:] == after                 # then exactly the wrapped schedule


def test_exp_warmup_is_geometric_and_reaches_target():
    steps = 10
    opt = make_opt("sgd", lr=0.2)
    sched = S.warmup(opt, steps, mode="exp", start_factor=1e-3)
    got = [lrs[0] for lrs, _ in trace(opt, sched, steps + 5)]
    # Reference: torch's ExponentialLR from 0.2e-3 with the ratio that reaches 0.2 in `steps`.
    probe = make_opt("sgd", lr=0.2 * 1e-3)
    ref = [lrs[0] for lrs, _ in trace(probe, tls.ExponentialLR(probe, gamma=1e3 ** (1 / steps)),
                                      steps + 1)]
    assert got[:steps + 1] == pytest.approx(ref, rel=1e-9)
    assert got[steps:] == [0.2] * 5


def test_warmup_hands_over_to_chainable_torch_scheduler():
    steps = 5

    def inner(o):
        return tls.StepLR(o, step_size=3, gamma=0.5)

    after = _reference_sequence(inner, "sgd", 20)
    opt = make_opt("sgd")
    got = trace(opt, S.warmup(inner(opt), steps), steps + 20)
    assert got[steps:] == after


def test_warmup_none_needs_optimizer_and_holds_lr():
    opt = make_opt("sgd", lr=0.3)
    with pytest.raises(ValueError, match="optimizer"):
        S.warmup(None, 4)
    got = [lrs[0] for lrs, _ in trace(opt, S.warmup(None, 4, optimizer=opt), 8)]
    assert got[0] == pytest.approx(0.3 / 5) and got[4:] == [0.3] * 4


def test_warmup_zero_steps_is_the_wrapped_schedule():
    after = _reference_sequence(lambda o: S.OneCycleLR(o, 0.5, total_steps=20), "sgd", 20)
    opt = make_opt("sgd")
    assert trace(opt, S.warmup(S.OneCycleLR(opt, 0.5, total_steps=20), 0), 20) == after


def test_warmup_validation():
    opt, other = make_opt("sgd"), make_opt("sgd")
    inner = S.OneCycleLR(opt, 0.5, total_steps=20)
    with pytest.raises(ValueError, match="different optimizer"):
        S.WarmupLR(other, 5, scheduler=inner)
    with pytest.raises(ValueError, match="mode"):
        S.warmup(inner, 5, mode="cosine")
    with pytest.raises(ValueError, match="start_factor"):
        S.warmup(inner, 5, mode="exp", start_factor=0.0)
    opt.step()
    inner.step()
    with pytest.raises(ValueError, match="freshly built"):
        S.warmup(inner, 5)
    with pytest.raises(TypeError):
        S.warmup("sgd", 5)


# --------------------------------------------------------------------------------------------
# LR scaling and step counts
# --------------------------------------------------------------------------------------------

def test_scale_lr_rules():
    assert S.scale_lr(0.1, 1024, rule="linear") == pytest.approx(0.1 * 1024 / 256)
    assert S.scale_lr(1e-3, 1024, rule="sqrt") == pytest.approx(1e-3 * math.sqrt(1024 / 256))
    assert S.scale_lr(0.1, 64, base_batch_size=128, rule="linear") == pytest.approx(0.05)


@pytest.mark.parametrize("optimizer,rule", [
    (make_opt("sgd"), "linear"), (make_opt("adam"), "sqrt"), (make_opt("adamw"), "sqrt"),
    (torch.optim.SGD, "linear"), (torch.optim.RAdam, "sqrt"), (torch.optim.RMSprop, "sqrt"),
    ("AdamW", "sqrt"), ("sgd", "linear"), ("FusedAdamW", "sqrt"), ("FusedSGD", "linear"),
    ("LAMB", "sqrt"), ("LARS", "linear"),
])
def test_scale_lr_auto_rule(optimizer, rule):
    assert S.scale_lr(0.1, 2048, optimizer=optimizer) == S.scale_lr(0.1, 2048, rule=rule)


def test_scale_lr_auto_from_unknown_class_defaults_and_errors():
    class MyAdaptive(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, dict(lr=0.1, betas=(0.9, 0.99)))

    opt = MyAdaptive([torch.nn.Parameter(torch.zeros(1))])
    assert S.scale_lr(0.1, 1024, optimizer=opt) == S.scale_lr(0.1, 1024, rule="sqrt")
    with pytest.raises(ValueError, match="rule"):
        S.scale_lr(0.1, 1024, optimizer="Shampoo")
    with pytest.raises(ValueError, match="optimizer"):
        S.scale_lr(0.1, 1024)
    with pytest.raises(ValueError, match="rule"):
        S.scale_lr(0.1, 1024, rule="cubic")
    with pytest.raises(ValueError):
        S.scale_lr(-0.1, 1024, rule="linear")


def test_scale_lr_and_global_batch_log(caplog):
    with caplog.at_level(logging.INFO, logger="fastcore_train.schedules"):
        gb = S.global_batch_size(32, accumulation_steps=4, world_size=8)
        lr = S.scale_lr(0.1, gb, optimizer="sgd")
    assert gb == 32 * 8 * 4
    assert lr == pytest.approx(0.1 * gb / 256)
    text = caplog.text
    assert "1024" in text and "linear" in text and f"{lr:g}" in text


def test_global_batch_size_reads_world_size_from_process_group():
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    assert S.global_batch_size(16, 2) == 32
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert S.global_batch_size(16, 2) == 16 * dist.get_world_size() * 2
    finally:
        dist.destroy_process_group()


def _simulated_steps(batches, accumulation, drop_last):
    # Count optimizer steps of a loop that steps every `accumulation` batches and, unless
    # drop_last, once more on a trailing partial window.
    steps, pending = 0, 0
    for _ in range(batches):
        pending += 1
        if pending == accumulation:
            steps, pending = steps + 1, 0
    return steps + (1 if pending and not drop_last else 0)


@pytest.mark.parametrize("n", [1, 97, 100, 128])
@pytest.mark.parametrize("world", [1, 3, 4])
@pytest.mark.parametrize("accum", [1, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_steps_per_epoch_matches_a_distributed_loader(n, world, accum, drop_last):
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
    ds = TensorDataset(torch.arange(n))
    sampler = DistributedSampler(ds, num_replicas=world, rank=0, shuffle=False,
                                 drop_last=drop_last)
    loader = DataLoader(ds, batch_size=8, sampler=sampler, drop_last=drop_last)
    expected = _simulated_steps(len(loader), accum, drop_last)
    assert S.steps_per_epoch(n, accumulation_steps=accum, world_size=world, drop_last=drop_last,
                             batch_size=8) == expected
    assert S.steps_per_epoch(loader, accumulation_steps=accum, drop_last=drop_last) == expected


def test_steps_per_epoch_feeds_onecycle_and_validates():
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(50)),
                                         batch_size=8)
    spe = S.steps_per_epoch(loader, accumulation_steps=2)
    sched = S.OneCycleLR(make_opt("sgd"), 0.1, epochs=3, steps_per_epoch=spe)
    assert sched.total_steps == 3 * math.ceil(len(loader) / 2)
    with pytest.raises(ValueError):
        S.steps_per_epoch(10, accumulation_steps=0)
    with pytest.raises(TypeError, match="sized"):
        S.steps_per_epoch(iter([1, 2]))
