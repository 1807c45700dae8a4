"""FusedAdamW / FusedSGD as drop-in replacements of torch.optim.AdamW / SGD: the same signature
and defaults, torch's own argument combinations giving torch's trajectories, refusals at
construction, version counters, torch.compile of the step, and configuration changes
(add_param_group, load_state_dict) that are validated before anything changes. Tests that take
``device`` run on the CPU and, with a GPU, on CUDA against torch's optimizer on the same device
(its single-tensor implementation, as on the CPU)."""
import copy
import inspect
import sys
import types
import unittest

import pytest
import torch
import torch.nn as nn

from fastcore_train import _backend
from fastcore_train.amp import LossScaler
from fastcore_train.optim import FusedAdamW, FusedSGD

from conftest import BACKENDS, DEVICES, device_context

PAIRS = [(FusedAdamW, torch.optim.AdamW), (FusedSGD, torch.optim.SGD)]
# our keyword-only additions after torch's arguments, with their defaults
EXTRAS = (("master_weights", None), ("max_grad_norm", None), ("ema_decay", None),
          ("ema_warmup", False))
# the keyword arguments that change the maths, not only torch's choice of implementation
MATHS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "momentum", "dampening",
         "nesterov")


# ---------------------------------------------------------------------------------------------
# signature


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=["AdamW", "SGD"])
def test_signature_and_defaults_are_torchs(ours, theirs):
    mine = list(inspect.signature(ours.__init__).parameters.values())
    torch_params = list(inspect.signature(theirs.__init__).parameters.values())
    assert [(p.name, p.kind, p.default) for p in mine[:len(torch_params)]] == \
        [(p.name, p.kind, p.default) for p in torch_params]
    extra = mine[len(torch_params):]
    assert [(p.name, p.kind, p.default) for p in extra] == \
        [(n, inspect.Parameter.KEYWORD_ONLY, d) for n, d in EXTRAS]


def test_sgd_defaults_follow_torch(backend, device):
    """FusedSGD(params, lr=0.1) is plain SGD, as torch.optim.SGD(params, lr=0.1) is: bit for bit
    on the CPU; on CUDA within an ulp (w + (-lr) * g is one FMA in ours, and nvcc decides how
    torch's kernel rounds it)."""
    torch.manual_seed(0)
    w = torch.randn(33, device=device)
    a, b = nn.Parameter(w.clone()), nn.Parameter(w.clone())
    opt, topt = FusedSGD([a], lr=0.1), torch.optim.SGD([b], lr=0.1, foreach=False)
    for _ in range(3):
        g = torch.randn(33).to(device)
        a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        topt.step()
    if device == "cpu":
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, atol=1e-7, rtol=2.4e-7)
    assert opt.param_groups[0]["momentum"] == 0 and "momentum_buffer" not in opt.state[a]


# ---------------------------------------------------------------------------------------------
# torch's own argument combinations (torch/testing/_internal/common_optimizers.py)


def _torch_combinations(torch_cls):
    """(id, kwargs) of torch's test inputs for ``torch_cls``, with the foreach / fused /
    differentiable variants, for CPU and CUDA (their kwargs run anywhere for us)."""
    if "expecttest" not in sys.modules:  # only a test dependency of torch's own suite
        stub = types.ModuleType("expecttest")
        stub.TestCase = unittest.TestCase
        sys.modules["expecttest"] = stub
    from torch.testing._internal import common_optimizers as co

    info = next(i for i in co.optim_db if i.optim_cls is torch_cls)
    seen = {}
    for device in ("cpu", "cuda"):
        for oi in co._get_optim_inputs_including_global_cliquey_kwargs(device, None, info):
            seen.setdefault(oi.desc, oi.kwargs)
    return sorted(seen.items())


def _combination_params():
    out = []
    for ours, theirs in PAIRS:
        for desc, kwargs in _torch_combinations(theirs):
            out.append(pytest.param(ours, theirs, kwargs, id=f"{theirs.__name__}: {desc}"))
    return out


def _run(make, steps=12, seed=0, device="cpu"):
    torch.manual_seed(seed)
    params = [nn.Parameter(torch.randn(s).to(device)) for s in [(7, 5), (5,), (33,), (1,)]]
    opt = make(params)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(device)
        opt.step()
    return params, opt


@pytest.mark.parametrize("ours, theirs, kwargs", _combination_params())
def test_torch_argument_combinations(backend, device, ours, theirs, kwargs):
    """Every combination torch tests its optimizer with: ours refuses the ones it does not
    support at construction with a sentence naming torch's alternative, and otherwise follows
    torch's trajectory (the maths arguments decide it; foreach / fused only pick torch's
    implementation, its single-tensor one here). A tensor lr or betas stays where torch's
    combination puts it (on the CPU), as a user's would."""
    kwargs = dict(kwargs)
    for flag in ("capturable", "differentiable"):
        if kwargs.get(flag):
            alternative = rf"use torch.optim.{theirs.__name__}\({flag}=True\)"
            with pytest.raises(ValueError, match=alternative):
                ours([nn.Parameter(torch.randn(3, device=device))], **copy.deepcopy(kwargs))
            kwargs.pop(flag)
    maths = {k: v for k, v in kwargs.items() if k in MATHS}
    p_ours, o_ours = _run(lambda ps: ours(ps, **copy.deepcopy(kwargs)), device=device)
    p_torch, o_torch = _run(lambda ps: theirs(ps, **copy.deepcopy(maths), foreach=False),
                            device=device)
    for p, q in zip(p_ours, p_torch):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-5)
        for key, value in o_torch.state[q].items():
            torch.testing.assert_close(o_ours.state[p][key].float().cpu(), value.float().cpu(),
                                       atol=1e-6, rtol=1e-5,
                                       msg=lambda m: f"state {key!r}: {m}")


# ---------------------------------------------------------------------------------------------
# bit-for-bit where torch's kernels round as ours


def _bitwise_run(make, steps=15):
    """Tensors of whole 16-float vectors per thread (2 threads): torch's fused AdamW computes
    the remainder of each thread's chunk in double precision."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(n)) for n in (64, 4096, 32)]
    opt = make(params)
    g = torch.Generator().manual_seed(1)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
    finally:
        torch.set_num_threads(old)
    return params, opt


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_adamw_options_bitwise_torch_fused(backend, amsgrad, maximize):
    kw = dict(lr=0.1, weight_decay=0.03, betas=(0.8, 0.99), amsgrad=amsgrad, maximize=maximize)
    ours, opt = _bitwise_run(lambda ps: FusedAdamW(ps, **kw))
    ref, topt = _bitwise_run(lambda ps: torch.optim.AdamW(ps, fused=True, **kw))
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
        if amsgrad:
            assert torch.equal(opt.state[p]["max_exp_avg_sq"], topt.state[q]["max_exp_avg_sq"])


@pytest.mark.parametrize("kw", [dict(momentum=0.9, dampening=0.5),
                                dict(momentum=0.8, dampening=0.1, weight_decay=0.1,
                                     maximize=True),
                                dict(momentum=0.9, nesterov=True, maximize=True),
                                dict(weight_decay=0.2, maximize=True)],
                         ids=["dampening", "dampening-decay-maximize", "nesterov-maximize",
                              "maximize"])
def test_sgd_options_bitwise_torch(backend, kw):
    ours, opt = _bitwise_run(lambda ps: FusedSGD(ps, lr=0.1, **kw))
    ref, topt = _bitwise_run(lambda ps: torch.optim.SGD(ps, lr=0.1, **kw))
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
        if kw.get("momentum"):
            assert torch.equal(opt.state[p]["momentum_buffer"], topt.state[q]["momentum_buffer"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dampening_first_step_after_skipped_steps(backend, dtype):
    """The undampened first step of a momentum buffer is decided on the device: steps skipped
    for overflow (LossScaler, no host read) do not count. Same trajectory as torch.optim.SGD
    under torch.amp.GradScaler, which skips on the host. For bfloat16 parameters the torch run
    steps float32 copies, as our master weights do."""
    torch.manual_seed(0)
    w0 = torch.randn(40)
    ours = nn.Parameter(w0.clone().to(dtype))
    ref = nn.Parameter(w0.clone().to(dtype).float())
    kw = dict(lr=0.05, momentum=0.9, dampening=0.6)
    opt, topt = FusedSGD([ours], **kw), torch.optim.SGD([ref], **kw)
    scaler = LossScaler(init_scale=2.0 ** 4, growth_interval=100)
    tscaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4, growth_interval=100)
    g = torch.Generator().manual_seed(1)
    for i in range(6):
        grad = torch.randn(40, generator=g).to(dtype).float()  # the same gradient in both runs
        if i in (0, 1, 4):
            grad[3] = float("inf")
        for p, o, s in ((ours, opt, scaler), (ref, topt, tscaler)):
            o.zero_grad()
            s.scale((p.float() * grad).sum()).backward()
            s.step(o)
            s.update()
        if i == 1:  # two skipped steps: the buffer exists but has not started
            assert opt.state[ours]["step"].item() == 0
            assert "momentum_buffer" not in topt.state[ref]
        torch.testing.assert_close(ours.detach().float(), ref.detach().to(dtype).float(),
                                   atol=0, rtol=0)
    assert opt.state[ours]["step"].item() == 3


# ---------------------------------------------------------------------------------------------
# what is accepted and what is refused at construction


def test_implementation_switches_are_accepted():
    p = [nn.Parameter(torch.randn(3))]
    for cls in (FusedAdamW, FusedSGD):
        for kw in (dict(foreach=True), dict(foreach=False), dict(fused=True), dict(fused=False)):
            opt = cls(p, **kw)
            assert all(opt.param_groups[0][k] == v for k, v in kw.items())
        with pytest.raises(RuntimeError, match="cannot be `True` together"):
            cls(p, foreach=True, fused=True)
    assert FusedAdamW(p).param_groups[0]["decoupled_weight_decay"] is True


@pytest.mark.parametrize("kw, msg", [
    (dict(lr=-1.0), "invalid learning rate -1.0"),
    (dict(lr="0.01"), "lr must be a number or a one-element tensor, got str"),
    (dict(lr=None), "lr must be a number or a one-element tensor, got NoneType"),
    (dict(lr=torch.ones(2)), "a tensor lr must have one element, got 2"),
    (dict(weight_decay=-0.1), "invalid weight_decay"),
    (dict(max_grad_norm=-1.0), "max_grad_norm must be None or > 0"),
    (dict(master_weights="yes"), "master_weights must be None, True or False"),
    (dict(differentiable=True), r"use torch.optim.(AdamW|SGD)\(differentiable=True\)"),
])
@pytest.mark.parametrize("cls", [FusedAdamW, FusedSGD])
def test_bad_arguments_at_construction(cls, kw, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        cls([nn.Parameter(torch.randn(3))], **kw)


def test_adamw_refusals():
    p = [nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match=r"not been validated under CUDA-graph capture; to "
                                         r"capture the step in a CUDA graph use "
                                         r"torch.optim.AdamW\(capturable=True\)"):
        FusedAdamW(p, capturable=True)
    for betas in ((1.5, 0.9), (0.9,), (0.9, -0.1)):
        with pytest.raises(ValueError, match="betas must be two numbers in"):
            FusedAdamW(p, betas=betas)
    with pytest.raises(ValueError, match="invalid eps"):
        FusedAdamW(p, eps=-1.0)
    # tensor betas as torch takes them (one element, any shape)
    FusedAdamW(p, betas=(torch.tensor([[[0.9]]]), torch.tensor([[0.99]])))


# ---------------------------------------------------------------------------------------------
# version counters: autograd sees the step's writes as it sees torch.optim's


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=0.1),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: FusedAdamW(ps, lr=0.1),
    lambda ps: FusedSGD(ps, lr=0.1, momentum=0.9),
    lambda ps: FusedAdamW(ps, lr=0.1, amsgrad=True, max_grad_norm=1.0),
], ids=["torch-adamw", "torch-sgd", "fused-adamw", "fused-sgd", "fused-adamw-clip"])
def test_step_between_forward_and_backward_raises(backend, make, dtype):
    """A graph that saved a parameter before the step must not backpropagate through the
    updated values: torch's in-place updates make backward raise, and so must ours."""
    w = nn.Parameter(torch.randn(4, 3).to(dtype))
    opt = make([w])
    w.grad = torch.ones_like(w)
    loss = (w * w).sum()  # saves w
    version = w._version
    opt.step()
    assert w._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_versions_of_written_state_and_skipped_steps(backend):
    w = nn.Parameter(torch.randn(8, dtype=torch.float16))
    opt = FusedAdamW([w], lr=0.1, amsgrad=True)
    w.grad = torch.ones_like(w)
    opt.step()
    before = {k: v._version for k, v in opt.state[w].items()}
    w_version = w._version
    opt.step()
    assert w._version > w_version
    assert all(opt.state[w][k]._version > v for k, v in before.items())


def test_direct_op_call_with_grad_mode_refuses_requires_grad():
    from fastcore_train import _backend
    if not _backend.extension_loaded():
        pytest.skip("fastcore_train._C is not built")
    w = nn.Parameter(torch.randn(3))
    with pytest.raises(RuntimeError, match="call it under torch.no_grad"):
        torch.ops.fastcore_train.fused_sgd_([w], [torch.ones(3)], [], [], [], 0.1, None, 0.0, 0.0,
                                           False, False, 0.0, None, None, None, 0.0, [], [],
                                           0.0, False)


# ---------------------------------------------------------------------------------------------
# torch.compile(opt.step)


CONFIGS = [
    (FusedAdamW, torch.float32, dict(lr=1e-2)),
    (FusedAdamW, torch.bfloat16, dict(lr=1e-2, amsgrad=True, maximize=True, max_grad_norm=0.5)),
    (FusedAdamW, torch.float16, dict(lr=torch.tensor(1e-2), weight_decay=0.1)),
    (FusedSGD, torch.float32, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (FusedSGD, torch.bfloat16, dict(lr=0.05, momentum=0.9, dampening=0.3, maximize=True,
                                    max_grad_norm=0.5)),
]


def _backends_and_devices():
    """(backend, device): both backends on the CPU, the extension on CUDA (compiling is slow;
    what the reference traces is device-independent Python)."""
    out = [pytest.param(b, "cpu") for b in BACKENDS]
    if "extension" in BACKENDS:
        out.append(pytest.param("extension", "cuda", marks=DEVICES[1].marks))
    return out


@pytest.mark.parametrize("backend, device", _backends_and_devices())
@pytest.mark.parametrize("cls, dtype, kw", CONFIGS,
                         ids=[f"{c.__name__}-{str(d)[6:]}-{'-'.join(k)}" for c, d, k in CONFIGS])
def test_compile_step_fullgraph_parity(backend, device, cls, dtype, kw):
    """``torch.compile(opt.step, fullgraph=True)`` traces (no graph break, as torch's AdamW) and
    computes what eager computes, state creation at the first step included. On CUDA with the
    aot_eager backend: the same graph (fake kernels, functionalised state writes) without
    inductor's Triton compilation of torch's own ops, seconds per kernel on a GPU run that is
    timed in minutes."""
    with device_context(device), _backend.use_backend(backend):
        _check_compile_step_parity(backend, device, cls, dtype, kw)


def _check_compile_step_parity(backend, device, cls, dtype, kw):
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).to(device, dtype)
        opt = cls(model.parameters(), **copy.deepcopy(kw))
        compiler = "inductor" if device == "cpu" else "aot_eager"
        step = torch.compile(opt.step, fullgraph=True, backend=compiler) if compiled else opt.step
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            model.zero_grad()
            x = torch.randn(4, 6, generator=g).to(device, dtype)
            model(x).float().square().mean().backward()
            step()
        results.append(([p.detach().clone() for p in model.parameters()],
                        [v.clone() for s in opt.state.values() for v in s.values()]))
    (p_eager, s_eager), (p_comp, s_comp) = results
    assert len(s_eager) == len(s_comp)
    if backend == "extension":  # the kernels run as in eager: bit for bit
        assert all(torch.equal(a, b) for a, b in zip(p_eager + s_eager, p_comp + s_comp))
    else:  # inductor compiles the reference's torch ops into its own kernels: rounding differs
        for a, b in zip(p_eager + s_eager, p_comp + s_comp):
            tol = 1e-6 if a.dtype == torch.float32 else 1e-2
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)


NO_BREAK = {"torch-adamw": lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(0.01)),
            "fused-adamw": lambda ps: FusedAdamW(ps, lr=torch.tensor(0.01)),
            "fused-sgd": lambda ps: FusedSGD(ps, lr=torch.tensor(0.01), momentum=0.9)}


@pytest.mark.parametrize("name, device", [
    pytest.param(name, d.values[0], marks=d.marks) for name in NO_BREAK for d in DEVICES
    if name != "torch-adamw" or d.values[0] == "cpu"])  # torch's: the reference point, on the CPU
def test_compile_step_has_no_graph_break(backend, name, device):
    with device_context(device):
        _check_no_graph_break(NO_BREAK[name], device)


def _check_no_graph_break(make, device):
    torch._dynamo.reset()
    model = nn.Linear(4, 3).to(device)
    opt = make(model.parameters())
    model(torch.randn(2, 4, device=device)).sum().backward()
    explained = torch._dynamo.explain(opt.step)()
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    if not isinstance(opt, torch.optim.AdamW):  # the step itself is in the graph
        ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes}
        assert any("fastcore_train" in o or "copy_" in o or "where" in o for o in ops)


# ---------------------------------------------------------------------------------------------
# add_param_group and load_state_dict: validated before anything changes


def _snapshot(opt):
    groups = [{k: (list(v) if k == "params" else copy.deepcopy(v)) for k, v in g.items()}
              for g in opt.param_groups]
    state = {id(p): {k: (v, v.clone()) if isinstance(v, torch.Tensor) else (v, copy.deepcopy(v))
                     for k, v in s.items()} for p, s in opt.state.items()}
    return groups, state


def _unchanged(opt, snap):
    groups, state = snap
    now = [{k: (list(v) if k == "params" else v) for k, v in g.items()} for g in opt.param_groups]
    assert len(now) == len(groups)
    for a, b in zip(now, groups):
        assert a.keys() == b.keys()
        assert all(x is y for x, y in zip(a["params"], b["params"]))
        assert all(a[k] == b[k] for k in a if k != "params" and not isinstance(a[k], torch.Tensor))
    assert {id(p) for p in opt.state} == set(state)
    for p, s in opt.state.items():
        assert s.keys() == state[id(p)].keys()
        for k, v in s.items():
            obj, value = state[id(p)][k]
            assert v is obj  # the same tensor object, so references users hold stay valid
            assert torch.equal(v, value) if isinstance(v, torch.Tensor) else v == value


def _trained(cls, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).to(dtype)
    ps = list(model.parameters())
    opt = cls([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.5}], lr=0.1, **kw)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn(p.shape).to(dtype)
        opt.step()
    return model, opt


BAD_GROUPS = [dict(lr=-1.0), dict(max_grad_norm=-1.0), dict(weight_decay=-1.0),
              dict(lr="0.01"), dict(master_weights=2), dict(differentiable=True),
              dict(foreach=True, fused=True)]


@pytest.mark.parametrize("bad", BAD_GROUPS + [dict(betas=(1.5, 0.9)), dict(capturable=True)],
                         ids=lambda b: ",".join(f"{k}={v}" for k, v in b.items()))
@pytest.mark.parametrize("cls", [FusedAdamW, FusedSGD])
def test_rejected_param_group_leaves_optimizer_unchanged(backend, cls, bad):
    if cls is FusedSGD and ("betas" in bad or "capturable" in bad):
        bad = dict(nesterov=True)  # needs momentum
    model, opt = _trained(cls)
    snap = _snapshot(opt)
    new = nn.Parameter(torch.randn(5))
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        opt.add_param_group({"params": [new], **bad})
    _unchanged(opt, snap)
    new.grad = torch.ones(5)
    before = new.detach().clone()
    opt.step()
    assert torch.equal(new, before)  # a rejected group is never stepped


def test_rejected_param_group_dtype_and_device(backend):
    model, opt = _trained(FusedAdamW)
    snap = _snapshot(opt)
    with pytest.raises(TypeError, match="parameter 1 of param group 2 is torch.float64"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2)),
                                        nn.Parameter(torch.randn(2, dtype=torch.float64))]})
    with pytest.raises(ValueError, match="parameter 0 of param group 2 is on meta"):
        opt.add_param_group({"params": nn.Parameter(torch.randn(2, device="meta"))})
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [model[0].weight]})
    _unchanged(opt, snap)
    # a generator of parameters is fine (checked, then added)
    opt.add_param_group({"params": (p for p in [nn.Parameter(torch.randn(2))]), "lr": 0.3})
    assert len(opt.param_groups) == 3 and len(opt.param_groups[2]["params"]) == 1


def _bad_state_dicts(opt):
    sd = opt.state_dict()

    def edit(fn):
        d = copy.deepcopy(sd)
        fn(d)
        return d

    first_key = "exp_avg" if isinstance(opt, FusedAdamW) else "momentum_buffer"
    return {
        "wrong shape in the last param": edit(
            lambda d: d["state"][3].__setitem__(first_key, torch.zeros(7))),
        "not a tensor": edit(lambda d: d["state"][3].__setitem__(first_key, [0.0, 1.0])),
        "bad step": edit(lambda d: d["state"][1].__setitem__("step", torch.zeros(3))),
        "group count": edit(lambda d: d["param_groups"].pop()),
        "group size": edit(lambda d: d["param_groups"][1]["params"].pop()),
        "bad hyperparameter": edit(lambda d: d["param_groups"][1].__setitem__("lr", -1.0)),
        "state not a dict": edit(lambda d: d["state"].__setitem__(2, 5)),
        "no param_groups": {"state": {}},
    }


@pytest.mark.parametrize("cls, kw", [(FusedAdamW, dict(amsgrad=True)),
                                     (FusedSGD, dict(momentum=0.9, dampening=0.2))],
                         ids=["AdamW", "SGD"])
def test_rejected_state_dict_leaves_optimizer_unchanged(backend, cls, kw):
    model, opt = _trained(cls, dtype=torch.bfloat16, **kw)
    assert all("master" in s for s in opt.state.values())
    for name, bad in _bad_state_dicts(opt).items():
        snap = _snapshot(opt)
        with pytest.raises((ValueError, TypeError)):
            opt.load_state_dict(bad)
        _unchanged(opt, snap)
    # the untouched optimizer still loads a good checkpoint and steps as the original
    other_model, other = _trained(cls, dtype=torch.bfloat16, **kw)
    other.load_state_dict(opt.state_dict())
    for o, m in ((opt, model), (other, other_model)):
        for p in m.parameters():
            p.grad = torch.full_like(p, 0.5)
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other_model.parameters()))


def test_amsgrad_state_dict_without_max_exp_avg_sq_is_refused():
    model, opt = _trained(FusedAdamW, amsgrad=True)
    sd = opt.state_dict()
    del sd["state"][0]["max_exp_avg_sq"]
    snap = _snapshot(opt)
    with pytest.raises(ValueError,
                       match=r"parameter 0 of param group 0 lacks \['max_exp_avg_sq'\]"):
        opt.load_state_dict(sd)
    _unchanged(opt, snap)


def test_load_state_dict_hooks_still_run():
    model, opt = _trained(FusedSGD, momentum=0.9)
    seen = []
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("post"))
    opt.load_state_dict(opt.state_dict())
    assert seen == ["pre", "post"]


def test_named_parameters_as_torch(backend):
    """torch.optim takes (name, parameter) pairs and keeps the names in state_dict()."""
    results = []
    for cls in (FusedAdamW, torch.optim.AdamW):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
        opt = cls(model.named_parameters(), lr=0.1, amsgrad=True)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.ones_like(p)
            opt.step()
        results.append((model, opt.state_dict()))
    (ours, sd), (ref, tsd) = results
    assert sd["param_groups"][0]["param_names"] == tsd["param_groups"][0]["param_names"]
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), ref.parameters()))
    again = FusedAdamW(ours.named_parameters())
    again.load_state_dict(tsd)
    assert again.param_groups[0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
