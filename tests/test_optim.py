"""FusedAdamW / FusedSGD: parity with torch.optim, master weights, overflow skipping, clipping,
checkpoints, bad input, the launch limits of the multi-tensor kernels, and the three ops under
torch.library.opcheck. Tests that take ``device`` run on the CPU and, with a GPU, on CUDA: the
fused optimizer against torch's on the same device, the kernels against the CPU reference."""
import contextlib
import copy

import pytest
import torch
import torch.nn as nn

from fastcore_train import _backend
from fastcore_train.amp import LossScaler
from fastcore_train.ops import optim_step as ops
from fastcore_train.optim import FusedAdamW, FusedSGD

from conftest import on_device

STEPS = 50


def _model(seed=0, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 33), nn.GELU(), nn.Linear(33, 4))
    return m.to(device=device, dtype=dtype)


def _batches(n, seed=1, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 16, generator=g).to(device, dtype),
             torch.randn(32, 4, generator=g).to(device, dtype)) for _ in range(n)]


def _tol(device, atol):
    """The tolerance of a trajectory against torch's on ``device``. On CUDA the model's
    gradients come from cuBLAS (another summation order than the CPU's) and torch's
    elementwise kernels are built with FMA contraction, so the two runs differ by an ulp here
    and there that later steps carry on, where on the CPU they round alike; ten times the CPU
    tolerance is still far below what a wrong formula gives (lr * 1e-2 and more)."""
    return atol if device == "cpu" else 10 * atol


def _torch_kw(device):
    """torch.optim's single-tensor implementation on every device (CUDA defaults to foreach,
    another association of the same maths)."""
    return {} if device == "cpu" else {"foreach": False}


def _groups(model, lrs=(1e-2, 3e-3), wds=(1e-2, 0.0)):
    ps = list(model.parameters())
    return [{"params": ps[:4], "lr": lrs[0], "weight_decay": wds[0]},
            {"params": ps[4:], "lr": lrs[1], "weight_decay": wds[1]}]


def _train(model, opt, batches, sched=None, scaler=None, clip=None):
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = ((model(x).float() - y.float()) ** 2).mean()
        if scaler is not None:
            scaler.scale(loss).backward()
            if clip is not None:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
        if sched is not None:
            sched.step()


def _assert_params(a, b, atol=1e-6, rtol=0.0):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.detach().float(), q.detach().float(), atol=atol, rtol=rtol)


@contextlib.contextmanager
def _threads(n):
    """torch's fused kernels split each tensor into one chunk per thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _steplr(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)


# ---------------------------------------------------------------------------------------------
# parity with torch.optim on float32 parameters


def test_adamw_matches_torch(backend, device):
    ours, ref = _model(device=device), _model(device=device)
    opt = FusedAdamW(_groups(ours), betas=(0.8, 0.99))
    topt = torch.optim.AdamW(_groups(ref), betas=(0.8, 0.99), **_torch_kw(device))
    batches = _batches(STEPS, device=device)
    _train(ours, opt, batches, _steplr(opt))
    _train(ref, topt, batches, _steplr(topt))
    _assert_params(ours, ref, atol=_tol(device, 1e-6))
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert "master" not in opt.state[p]  # fp32 params need none
        assert opt.state[p]["exp_avg"].device == p.device
        torch.testing.assert_close(opt.state[p]["exp_avg"], topt.state[q]["exp_avg"],
                                   atol=_tol(device, 1e-7), rtol=0)
        # (torch keeps a CPU step for CUDA params unless capturable or fused)
        assert torch.equal(opt.state[p]["step"].cpu(), topt.state[q]["step"].cpu())


def test_adamw_bitwise_torch_fused(backend):
    """Same maths, same rounding as torch's fused CPU AdamW (both round sqrt correctly). Every
    tensor here splits into whole 16-float vectors per thread: torch's kernel computes the
    remainder of each thread's chunk in double precision (an ulp apart at times), which
    test_adamw_matches_torch covers with a tolerance. (CPU only: it pins the rounding of
    torch's CPU kernel and its split across threads.)"""
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                             nn.Linear(64, 32))

    def train(m, opt):
        for x, y in _batches(20, seed=3):
            opt.zero_grad(set_to_none=True)
            ((m(x) - y.repeat(1, 8)) ** 2).mean().backward()
            opt.step()

    ours, ref = model(), model()
    groups = (1e-1, 3e-2), (1e-1, 0.0)  # large lr and decay: rounding differences would show
    opt = FusedAdamW(_groups(ours, *groups))
    topt = torch.optim.AdamW(_groups(ref, *groups), fused=True)
    with _threads(2):
        train(ours, opt)
        train(ref, topt)
    _assert_params(ours, ref, atol=0.0)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_torch(backend, device, nesterov):
    ours, ref = _model(device=device), _model(device=device)
    opt = FusedSGD(_groups(ours), lr=1e-2, momentum=0.9, nesterov=nesterov)
    topt = torch.optim.SGD(_groups(ref), lr=1e-2, momentum=0.9, nesterov=nesterov,
                           **_torch_kw(device))
    batches = _batches(STEPS, device=device)
    _train(ours, opt, batches, _steplr(opt))
    _train(ref, topt, batches, _steplr(topt))
    _assert_params(ours, ref, atol=_tol(device, 1e-6))


def test_sgd_without_momentum(backend, device):
    ours, ref = _model(device=device), _model(device=device)
    opt = FusedSGD(ours.parameters(), lr=0.05, momentum=0.0, weight_decay=1e-3)
    topt = torch.optim.SGD(ref.parameters(), lr=0.05, weight_decay=1e-3, **_torch_kw(device))
    batches = _batches(10, device=device)
    _train(ours, opt, batches)
    _train(ref, topt, batches)
    _assert_params(ours, ref, atol=_tol(device, 1e-7))
    assert all("momentum_buffer" not in s for s in opt.state.values())


def test_tensor_lr(backend, device):
    """A tensor lr (read on the device by the kernels) steps as the same float does."""
    ours, ref = _model(device=device), _model(device=device)
    opt = FusedAdamW(ours.parameters(), lr=torch.tensor(3e-3))
    topt = FusedAdamW(ref.parameters(), lr=3e-3)
    batches = _batches(5, device=device)
    _train(ours, opt, batches)
    _train(ref, topt, batches)
    _assert_params(ours, ref, atol=1e-7)


EXT_REF_CONFIGS = [
    (FusedAdamW, dict(lr=1e-3, max_grad_norm=5.0)),
    (FusedAdamW, dict(lr=1e-2, amsgrad=True, maximize=True, weight_decay=0.1)),
    (FusedAdamW, dict(lr=1e-2, betas=(0.3, 0.9), amsgrad=True, master_weights=True)),
    (FusedSGD, dict(lr=1e-2, momentum=0.9, dampening=0.4, maximize=True, max_grad_norm=5.0)),
    (FusedSGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1)),
]


@pytest.mark.parametrize("check_finite", [False, True], ids=["no-check", "check-finite"])
@pytest.mark.parametrize("cls, kw", EXT_REF_CONFIGS,
                         ids=[f"{c.__name__}-{'-'.join(k)}" for c, k in EXT_REF_CONFIGS])
def test_extension_matches_reference(extension, device, cls, kw, check_finite):
    """The kernels on ``device`` and the pure-torch reference on the CPU compute the same thing
    (mixed dtypes in one group, masters, scale, clipping, amsgrad, maximize and dampening
    included, the found-inf flag set by the kernels' own check pass or absent; a parameter
    that gets its first gradient late starts its momentum buffer then: on CUDA decided on the
    device)."""
    results = []
    for name, dev in (("extension", device), ("reference", "cpu")):
        with _backend.use_backend(name):
            torch.manual_seed(0)
            ps = [torch.randn(n, dtype=dt) for n, dt in
                  [(70000, torch.float32), (33, torch.bfloat16), (1, torch.float16),
                   (0, torch.float32), (4097, torch.float16), (40, torch.float32)]]
            ps = [nn.Parameter(p.to(dev)) for p in ps]
            opt = cls(ps, **kw)
            flags = []
            for it in range(4):
                for p in ps[:5] if it < 2 else ps:
                    p.grad = (torch.randn(p.shape) * 128).to(dev, p.dtype)
                found = torch.zeros((), device=dev) if check_finite else None
                opt._fused_step(grad_scale=torch.tensor(128.0, device=dev), found_inf=found,
                                check_finite=check_finite)
                flags.append(None if found is None else found.item())
            assert flags == ([0.0] * 4 if check_finite else [None] * 4)
            results.append([p.detach().cpu() for p in ps] +
                           [opt.state[p][k].cpu() for p in ps for k in opt.state[p]])
    assert len(results[0]) == len(results[1])
    for a, b in zip(*results):
        torch.testing.assert_close(a.float(), b.float(), **_kernel_tol(device, a.dtype))


def _kernel_tol(device, dtype):
    """Kernels on ``device`` against the CPU reference. On the CPU they agree to an ulp. The
    CUDA kernels sum the squared norm (the clip coefficient) in another order than the CPU,
    so float32 values may differ by a few ulps, and a float16/bfloat16 parameter -- its float32
    master rounded once -- may then round to the neighbouring value: one ulp of its dtype."""
    if device == "cpu":
        return dict(atol=1e-7, rtol=1e-6)
    return dict(atol=1e-6, rtol=max(1e-5, torch.finfo(dtype).eps))


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_every_cpu_build(extension, isa):
    """Each per-ISA build of the kernels agrees with the reference (the CPU may lack some)."""
    C_ = _backend._C
    order = ["default", "avx2", "avx512"]
    if order.index(isa) > order.index(C_.best_cpu_capability()):
        pytest.skip(f"CPU lacks {isa}")
    results = []
    for name in ("extension", "reference"):
        torch.manual_seed(0)
        ps = [nn.Parameter(torch.randn(n).to(dt)) for n, dt in
              [(1000, torch.float32), (77, torch.float16), (130, torch.bfloat16)]]
        opts = [FusedAdamW(ps, lr=1e-2, weight_decay=0.1, max_grad_norm=3.0),
                FusedSGD(ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1),
                FusedAdamW(ps, lr=1e-2, amsgrad=True, maximize=True),
                FusedSGD(ps, lr=1e-2, momentum=0.9, dampening=0.3, maximize=True)]
        try:
            C_._set_cpu_capability(isa)
            with _backend.use_backend(name):
                for it in range(8):
                    for p in ps:
                        p.grad = torch.randn(p.shape).to(p.dtype)
                    found = torch.zeros(())
                    opts[it % 4]._fused_step(grad_scale=torch.tensor(2.0), found_inf=found,
                                             check_finite=True)
        finally:
            C_._set_cpu_capability("")
        results.append([p.detach().float() for p in ps])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# master weights


def test_master_weights_default_and_forced(backend, device):
    fp32 = nn.Parameter(torch.randn(5, device=device))
    bf16 = nn.Parameter(torch.randn(5, dtype=torch.bfloat16, device=device))
    fp16 = nn.Parameter(torch.randn(5, dtype=torch.float16, device=device))
    for mw, expect in [(None, [False, True, True]), (True, [True, True, True]),
                       (False, [False, False, False])]:
        opt = FusedAdamW([fp32, bf16, fp16], lr=1e-3, master_weights=mw)
        for p in (fp32, bf16, fp16):
            p.grad = torch.ones_like(p)
        opt.step()
        assert ["master" in opt.state[p] for p in (fp32, bf16, fp16)] == expect
        for p in (bf16, fp16):
            s = opt.state[p]
            assert s["exp_avg"].dtype == torch.float32 and s["step"].dtype == torch.float32
            assert all(v.device == p.device for v in s.values())
            if "master" in s:
                assert s["master"].dtype == torch.float32
                assert torch.equal(p.detach(), s["master"].to(p.dtype))


@pytest.mark.parametrize("opt_cls", [FusedAdamW, FusedSGD])
def test_bf16_master_weights_track_fp32(backend, device, opt_cls):
    """Why master weights exist: with lr = 1e-3 the updates of weights of magnitude ~1 are below
    half a bfloat16 ulp (2^-8), so plain bfloat16 training rounds every one of them away."""
    torch.manual_seed(0)
    w0 = torch.randn(4096)
    grad = torch.randn(4096)  # a constant gradient: the fp32 run moves every weight steadily
    kw = dict(lr=1e-3) if opt_cls is FusedAdamW else dict(lr=1e-4, momentum=0.9)

    def run(dtype, master_weights):
        p = nn.Parameter(w0.clone().to(device, dtype))
        opt = opt_cls([p], master_weights=master_weights, **kw)
        for _ in range(100):
            p.grad = grad.to(device, dtype)
            opt.step()
        return p.detach().float().cpu()

    fp32 = run(torch.float32, None)
    master = run(torch.bfloat16, None)
    plain = run(torch.bfloat16, False)
    moved = (fp32 - w0).abs().mean()
    err_master = (master - fp32).abs().mean()
    err_plain = (plain - fp32).abs().mean()
    err_rounding = (fp32.bfloat16().float() - fp32).abs().mean()  # the best bf16 can do
    assert moved > 0.05
    assert err_master < 1.5 * err_rounding
    assert err_plain > 0.3 * moved  # most of the trajectory lost
    assert err_master < err_plain / 10


def test_params_without_grad_are_skipped(backend, device):
    a, b = nn.Parameter(torch.randn(3, device=device)), nn.Parameter(torch.randn(3, device=device))
    b0 = b.detach().clone()
    opt = FusedAdamW([a, b], lr=0.1)
    a.grad = torch.ones(3, device=device)
    opt.step()
    assert torch.equal(b.detach(), b0) and b not in opt.state
    assert opt.state[a]["step"].item() == 1


def test_non_contiguous_and_odd_sizes(backend, device):
    """Params whose layout the kernels cannot take flat (transposed, sliced) and sizes around
    the vector width and the chunk size (16384 elements a CUDA block); the gradients are
    contiguous, so the transposed one is laid out unlike its param."""
    torch.manual_seed(0)
    base = torch.randn(40, 30)
    shapes = [(1,), (31,), (33,), (16385,), (65537,), (0,)]
    ps = [torch.randn(s) for s in shapes]
    ps.append(base.t())                                      # transposed: dense, not contiguous
    ps.append(torch.randn(40, 61)[:, ::2])                   # gaps: not dense
    ps = [nn.Parameter(on_device(p, device)) for p in ps]
    assert not ps[-2].is_contiguous() and ps[-1].stride() == (61, 2)
    refs = [nn.Parameter(p.detach().clone()) for p in ps]
    opt = FusedAdamW(ps, lr=1e-2, weight_decay=0.1)
    # not fused=True: torch 2.13's fused CPU AdamW gets a grad laid out unlike its param wrong
    topt = torch.optim.AdamW(refs, lr=1e-2, weight_decay=0.1, **_torch_kw(device))
    for _ in range(3):
        for p, r in zip(ps, refs):
            g = torch.randn(p.shape).to(device)
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        topt.step()
    for p, r in zip(ps, refs):
        torch.testing.assert_close(p.detach(), r.detach(), atol=_tol(device, 1e-6), rtol=0)


# ---------------------------------------------------------------------------------------------
# overflow: skip on the device, scale backoff and growth


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()] +
            [v.clone() for s in opt.state.values() for v in s.values()])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("opt_cls", [FusedAdamW, FusedSGD])
def test_overflow_skips_whole_step(backend, device, dtype, opt_cls):
    model = _model(dtype=dtype, device=device)
    opt = opt_cls(model.parameters(), lr=1e-3, max_grad_norm=1.0)
    scaler = LossScaler(init_scale=2.0 ** 10, growth_interval=3)
    batches = _batches(2, dtype=dtype, device=device)
    _train(model, opt, batches, scaler=scaler)
    assert all("master" in s for s in opt.state.values())
    before = _snapshot(model, opt)
    scale = scaler.get_scale()
    for bad in (float("inf"), float("nan")):
        x, y = batches[0]
        opt.zero_grad()
        scaler.scale(((model(x).float() - y.float()) ** 2).mean()).backward()
        list(model.parameters())[2].grad[3, 5] = bad  # one element of one tensor
        scaler.step(opt)
        scaler.update()
        after = _snapshot(model, opt)
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        scale /= 2
        assert scaler.get_scale() == scale
    # growth_interval clean steps
    _train(model, opt, _batches(3, seed=5, dtype=dtype, device=device), scaler=scaler)
    assert scaler.get_scale() == 2 * scale
    assert not all(torch.equal(a, b) for a, b in zip(before, _snapshot(model, opt)))


def test_scale_sequence_equals_gradscaler(backend, device):
    """LossScaler + FusedAdamW and torch.amp.GradScaler + torch AdamW skip the same steps,
    produce the same scales and the same weights."""
    ours, ref = _model(device=device), _model(device=device)
    opt = FusedAdamW(ours.parameters(), lr=1e-3)
    topt = torch.optim.AdamW(ref.parameters(), lr=1e-3, **_torch_kw(device))
    scaler = LossScaler(init_scale=2.0 ** 8, growth_interval=2)
    tscaler = torch.amp.GradScaler(device, init_scale=2.0 ** 8, growth_interval=2)
    poison = {1, 2, 6}
    scales, tscales = [], []
    for i, (x, y) in enumerate(_batches(9, device=device)):
        for model, o, s, out in ((ours, opt, scaler, scales), (ref, topt, tscaler, tscales)):
            o.zero_grad()
            s.scale(((model(x) - y) ** 2).mean()).backward()
            if i in poison:
                list(model.parameters())[0].grad[0, 0] = float("inf")
            s.step(o)
            s.update()
            out.append(s.get_scale())
    assert scales == tscales
    assert scales[:3] == [256.0, 128.0, 64.0]
    _assert_params(ours, ref, atol=_tol(device, 1e-6))


def test_under_torch_gradscaler(backend, device):
    """FusedAdamW declares _step_supports_amp_scaling: GradScaler hands it the scale and the
    found-inf flag and it unscales and skips inside the step."""
    ours, ref = _model(device=device), _model(device=device)
    opt = FusedAdamW(ours.parameters(), lr=1e-3)
    topt = torch.optim.AdamW(ref.parameters(), lr=1e-3, **_torch_kw(device))
    s1 = torch.amp.GradScaler(device, init_scale=2.0 ** 8, growth_interval=2)
    s2 = torch.amp.GradScaler(device, init_scale=2.0 ** 8, growth_interval=2)
    for i, (x, y) in enumerate(_batches(6, device=device)):
        for model, o, s in ((ours, opt, s1), (ref, topt, s2)):
            o.zero_grad()
            s.scale(((model(x) - y) ** 2).mean()).backward()
            if i == 2:
                list(model.parameters())[1].grad[0] = float("nan")
            if i == 4:  # the unscale_-then-step protocol
                s.unscale_(o)
            s.step(o)
            s.update()
        assert s1.get_scale() == s2.get_scale()
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    _assert_params(ours, ref, atol=_tol(device, 1e-6))
    assert opt.state[list(ours.parameters())[0]]["step"].item() == 5  # one skipped


# ---------------------------------------------------------------------------------------------
# clipping


@pytest.mark.parametrize("opt_cls", [FusedAdamW, FusedSGD])
def test_clipping_equals_clip_grad_norm(backend, device, opt_cls):
    kw = dict(lr=1e-2) if opt_cls is FusedAdamW else dict(lr=1e-2, momentum=0.9)
    torch_cls = torch.optim.AdamW if opt_cls is FusedAdamW else torch.optim.SGD
    ours, ref = _model(device=device), _model(device=device)
    opt = opt_cls(ours.parameters(), max_grad_norm=0.05, **kw)
    topt = torch_cls(ref.parameters(), **kw, **_torch_kw(device))
    batches = _batches(20, device=device)
    _train(ours, opt, batches)
    _train(ref, topt, batches, clip=0.05)
    _assert_params(ours, ref, atol=_tol(device, 1e-6))


def test_clipping_with_loss_scaling(backend, device):
    """Norm of the scaled gradients, unscaled inside: equals unscale_ + clip_grad_norm_ + step."""
    ours, ref = _model(device=device), _model(device=device)
    opt = FusedAdamW(ours.parameters(), lr=1e-2, max_grad_norm=0.05)
    topt = torch.optim.AdamW(ref.parameters(), lr=1e-2, **_torch_kw(device))
    batches = _batches(12, device=device)
    _train(ours, opt, batches, scaler=LossScaler(init_scale=2.0 ** 12, growth_interval=4))
    _train(ref, topt, batches, clip=0.05,
           scaler=torch.amp.GradScaler(device, init_scale=2.0 ** 12, growth_interval=4))
    _assert_params(ours, ref, atol=_tol(device, 1e-6))


# ---------------------------------------------------------------------------------------------
# checkpoints


def test_state_dict_round_trip_and_bitwise_resume(backend, device):
    """(Bit for bit on CUDA too: the same kernels on the same inputs in the same order.)"""
    bf16 = torch.bfloat16
    model = _model(dtype=bf16, device=device)
    opt = FusedAdamW(_groups(model), max_grad_norm=1.0)
    scaler = LossScaler(init_scale=2.0 ** 8, growth_interval=3)
    first = _batches(6, dtype=bf16, device=device)
    second = _batches(6, seed=9, dtype=bf16, device=device)
    _train(model, opt, first, scaler=scaler)
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(),
                          "scaler": scaler.state_dict()})
    assert all("master" in s for s in ckpt["opt"]["state"].values())
    assert all(s["master"].dtype == torch.float32 for s in ckpt["opt"]["state"].values())
    _train(model, opt, second, scaler=scaler)

    resumed = _model(seed=123, dtype=bf16, device=device)
    resumed.load_state_dict(ckpt["model"])
    ropt = FusedAdamW(_groups(resumed), max_grad_norm=1.0)
    ropt.load_state_dict(ckpt["opt"])
    rscaler = LossScaler()
    rscaler.load_state_dict(ckpt["scaler"])
    # exact round trip: same tensors, float32 kept (torch would cast them to bfloat16)
    sd = ropt.state_dict()
    for k, s in ckpt["opt"]["state"].items():
        for name, v in s.items():
            assert sd["state"][k][name].dtype == v.dtype and torch.equal(sd["state"][k][name], v)
            assert v.device.type == device
    assert sd["param_groups"] == ckpt["opt"]["param_groups"]
    _train(resumed, ropt, second, scaler=rscaler)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["master"], ropt.state[q]["master"])
    assert scaler.state_dict() == rscaler.state_dict()


def test_loaded_state_is_a_copy(backend):
    model = _model()
    opt = FusedAdamW(model.parameters())
    _train(model, opt, _batches(2))
    sd = opt.state_dict()
    other = FusedAdamW(model.parameters())
    other.load_state_dict(sd)
    p = next(model.parameters())
    assert other.state[p]["exp_avg"].data_ptr() != opt.state[p]["exp_avg"].data_ptr()


CHECKPOINT_KINDS = {
    "adamw": (torch.optim.AdamW, FusedAdamW, {}),
    "adamw-amsgrad-maximize": (torch.optim.AdamW, FusedAdamW, dict(amsgrad=True, maximize=True)),
    "sgd": (torch.optim.SGD, FusedSGD, dict(momentum=0.9, nesterov=True)),
    "sgd-dampening": (torch.optim.SGD, FusedSGD, dict(momentum=0.9, dampening=0.3)),
}


@pytest.mark.parametrize("kind", sorted(CHECKPOINT_KINDS))
def test_torch_checkpoint_interchange(backend, device, kind):
    """torch.optim checkpoint -> fused optimizer -> torch.optim, training continued at each
    stage, against an uninterrupted torch run. (On CUDA torch keeps AdamW's step counts on the
    CPU and ours on the device: each side takes the other's.)"""
    torch_cls, fused_cls, kw = CHECKPOINT_KINDS[kind]
    make_t = lambda m: torch_cls(_groups(m), **kw, **_torch_kw(device))  # noqa: E731
    make_f = lambda m: fused_cls(_groups(m), lr=0.0, **kw)  # noqa: E731
    b1, b2, b3 = (_batches(5, seed=seed, device=device) for seed in (1, 2, 3))
    ref = _model(device=device)
    ropt = make_t(ref)
    for b in (b1, b2, b3):
        _train(ref, ropt, b)

    model = _model(device=device)
    topt = make_t(model)
    _train(model, topt, b1)
    fopt = make_f(model)
    fopt.load_state_dict(topt.state_dict())
    assert [g["lr"] for g in fopt.param_groups] == [1e-2, 3e-3]
    _train(model, fopt, b2)
    topt2 = make_t(model)
    topt2.load_state_dict(fopt.state_dict())
    _train(model, topt2, b3)
    _assert_params(model, ref, atol=_tol(device, 1e-6))


def test_checks_hyperparameters_at_construction():
    model = _model()
    with pytest.raises(ValueError, match="nesterov needs momentum > 0 and dampening 0"):
        FusedSGD(model.parameters(), lr=0.1, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="nesterov needs momentum > 0 and dampening 0"):
        FusedSGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        FusedAdamW(model.parameters(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="max_grad_norm"):
        FusedAdamW(model.parameters(), max_grad_norm=0.0)
    with pytest.raises(ValueError, match=r"use torch.optim.Adam \(parameter group 0 of the state"):
        FusedAdamW(model.parameters()).load_state_dict(
            torch.optim.Adam(model.parameters(), weight_decay=0.1).state_dict())


# ---------------------------------------------------------------------------------------------
# bad input: the same errors from both backends


def test_bad_inputs(backend, device):
    p = nn.Parameter(torch.randn(4, 3, device=device))
    opt = FusedAdamW([p])
    p.grad = torch.randn(4, 3, device=device).to_sparse()
    with pytest.raises(TypeError, match=r"FusedAdamW: parameter 0 of param group 0 has a sparse "
                                        r"gradient; fused optimizers need dense gradients"):
        opt.step()
    assert p not in opt.state

    # at construction, not at the first step
    d = nn.Parameter(torch.randn(3, dtype=torch.float64, device=device))
    with pytest.raises(TypeError, match=r"^FusedSGD: parameter 0 of param group 0 is "
                                        r"torch.float64; fused optimizers support float32, float16 "
                                        r"and bfloat16 parameters \(use torch.optim.SGD for "
                                        r"torch.float64\)$"):
        FusedSGD([d], lr=0.1)
    a, m = nn.Parameter(torch.randn(3, device=device)), nn.Parameter(torch.randn(3, device="meta"))
    with pytest.raises(ValueError, match=r"^FusedAdamW: parameter 1 of param group 0 is on meta "
                                         rf"but other parameters are on {a.device}"):
        FusedAdamW([a, m])
    with pytest.raises(ValueError, match=r"parameter 0 of param group 1 is on meta"):
        FusedAdamW([{"params": [a]}, {"params": [m]}])

    # a dtype changed after construction is still caught at the step
    opt = FusedAdamW([a])
    a.data = a.data.double()
    a.grad = torch.randn(3, dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match=r"parameter 0 of param group 0 is torch.float64"):
        opt.step()


OP_ERRORS = [
    # (description, kwargs changes, exception type, message)
    ("sparse grad", dict(grads=lambda t: [t["grads"][0].to_sparse()] + t["grads"][1:]),
     TypeError, "fused_adamw_: grads[0] is sparse; fused optimizers need dense gradients"),
    ("float64 param", dict(params=lambda t: [t["params"][0].double()] + t["params"][1:],
                           grads=lambda t: [t["grads"][0].double()] + t["grads"][1:]),
     TypeError, "fused_adamw_: params[0] must be float32, float16 or bfloat16, got torch.float64"),
    ("grad dtype", dict(grads=lambda t: [t["grads"][0].half()] + t["grads"][1:]),
     TypeError, "fused_adamw_: grads[0] is torch.float16 but params[0] is torch.float32"),
    ("grad shape", dict(grads=lambda t: [t["grads"][0][:2]] + t["grads"][1:]),
     ValueError, "fused_adamw_: grads[0] has shape [2] but params[0] has shape [5]"),
    ("state dtype", dict(exp_avgs=lambda t: [t["exp_avgs"][0].half()] + t["exp_avgs"][1:]),
     TypeError, "fused_adamw_: exp_avgs[0] must be torch.float32, got torch.float16"),
    ("list length", dict(exp_avg_sqs=lambda t: t["exp_avg_sqs"][:1]),
     ValueError, "fused_adamw_: got 2 params but 1 exp_avg_sqs"),
    ("found_inf dtype", dict(found_inf=lambda t: torch.zeros((), dtype=torch.float64)),
     TypeError, "fused_adamw_: found_inf must be a torch.float32 tensor, got torch.float64"),
    ("step numel", dict(steps=lambda t: [torch.zeros(2)] + t["steps"][1:]),
     ValueError, "fused_adamw_: steps[0] must have one element, got 2"),
    ("clip without norm", dict(max_grad_norm=lambda t: 1.0),
     ValueError, "fused_adamw_: max_grad_norm > 0 needs sq_norm (from grad_stats_)"),
    ("amsgrad without max_exp_avg_sqs", dict(amsgrad=lambda t: True),
     ValueError, "fused_adamw_: got 2 params but 0 max_exp_avg_sqs"),
    ("max_exp_avg_sqs without amsgrad",
     dict(max_exp_avg_sqs=lambda t: [torch.zeros(p.shape) for p in t["params"]]),
     ValueError, "fused_adamw_: max_exp_avg_sqs must be empty when amsgrad is False, got 2"),
    ("max_exp_avg_sq shape", dict(amsgrad=lambda t: True, max_exp_avg_sqs=lambda t: [
        torch.zeros(3), torch.zeros(7)]),
     ValueError, "fused_adamw_: max_exp_avg_sqs[0] has shape [3] but params[0] has shape [5]"),
]


def _adamw_args():
    ps = [torch.randn(5), torch.randn(7, dtype=torch.bfloat16)]
    return dict(params=ps, grads=[torch.randn_like(p) for p in ps],
                exp_avgs=[torch.zeros(p.shape) for p in ps],
                exp_avg_sqs=[torch.zeros(p.shape) for p in ps], max_exp_avg_sqs=[], masters=[],
                steps=[torch.zeros(()) for _ in ps], lr=1e-3, lr_tensor=None, beta1=0.9,
                beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                grad_scale=None, found_inf=None, sq_norm=None, max_grad_norm=0.0, emas=[],
                ema_steps=[], ema_decay=0.0, ema_warmup=False)


@pytest.mark.parametrize("case", OP_ERRORS, ids=[c[0] for c in OP_ERRORS])
def test_op_errors_match_reference(device, case):
    """The C++ checks (csrc/common/optim_checks.h, on the host on every device) and the
    reference raise the same thing. (Every tensor of a case is made on ``device``.)"""
    _, changes, exc, msg = case
    with torch.device(device):
        args = _adamw_args()
        args.update({k: f(args) for k, f in changes.items()})
    assert all(t.device.type == device for v in args.values()
               for t in (v if isinstance(v, list) else [v]) if isinstance(t, torch.Tensor))
    with pytest.raises(exc) as ref_err:
        ops.fused_adamw_reference_(*args.values())
    assert str(ref_err.value) == msg
    if _backend.extension_loaded():
        with pytest.raises(exc) as ext_err:
            torch.ops.fastcore_train.fused_adamw_(*args.values())
        assert str(ext_err.value).splitlines()[0] == msg


def _sgd_call(params, buffers, steps=(), momentum=0.9, dampening=0.0, nesterov=False):
    return lambda f: f(params, [torch.randn(p.shape) for p in params], buffers, [], list(steps),
                       0.1, None, momentum, dampening, nesterov, False, 0.0, None, None, None, 0.0,
                       [], [], 0.0, False)


def test_sgd_and_stats_op_errors_match_reference(device):
    with torch.device(device):  # every tensor of the cases is made there
        _check_sgd_and_stats_op_errors()


def _check_sgd_and_stats_op_errors():
    g = [torch.randn(3), torch.randn(3, dtype=torch.float64)]
    p3 = [torch.randn(3)]
    stats = (ops.grad_stats_reference_, "grad_stats_")
    sgd = (ops.fused_sgd_reference_, "fused_sgd_")
    cases = [
        (lambda f: f(g, torch.zeros(()), None), TypeError,
         "grad_stats_: grads[1] must be float32, float16 or bfloat16, got torch.float64", stats),
        (lambda f: f([torch.randn(3)], None, torch.zeros(2)), ValueError,
         "grad_stats_: sq_norm must have one element, got 2", stats),
        (_sgd_call(p3, [], momentum=0.0, nesterov=True), ValueError,
         "fused_sgd_: nesterov needs momentum > 0 and dampening 0", sgd),
        (_sgd_call(p3, [torch.zeros(3)], dampening=0.1, nesterov=True), ValueError,
         "fused_sgd_: nesterov needs momentum > 0 and dampening 0", sgd),
        (_sgd_call(p3, []), ValueError, "fused_sgd_: got 1 params but 0 momentum_buffers", sgd),
        (_sgd_call(p3, [], steps=[torch.zeros(())], momentum=0.0), ValueError,
         "fused_sgd_: steps must be empty when momentum is 0, got 1", sgd),
        (_sgd_call(p3, [torch.zeros(3)], steps=[torch.zeros(()), torch.zeros(())]), ValueError,
         "fused_sgd_: got 1 params but 2 steps", sgd),
        (_sgd_call(p3, [torch.zeros(3)], steps=[torch.zeros((), dtype=torch.int64)]), TypeError,
         "fused_sgd_: steps[0] must be a torch.float32 tensor, got torch.int64", sgd),
    ]
    for call, exc, msg, (ref_fn, op) in cases:
        with pytest.raises(exc) as e:
            call(ref_fn)
        assert str(e.value) == msg
        if _backend.extension_loaded():
            with pytest.raises(exc) as e:
                call(getattr(torch.ops.fastcore_train, op))
            assert str(e.value).splitlines()[0] == msg


# ---------------------------------------------------------------------------------------------
# the ops as torch.library custom ops


def test_grad_stats_values(backend, device):
    with torch.device(device):
        g = [torch.randn(100000), torch.randn(33, dtype=torch.bfloat16),
             torch.randn(5, dtype=torch.float16), torch.empty(0)]
        found, sq = torch.zeros(()), torch.zeros(())
    ops.grad_stats_(g, found, sq)
    expect = sum(x.double().pow(2).sum() for x in g)
    assert found.item() == 0.0
    torch.testing.assert_close(sq.double(), expect, rtol=1e-5, atol=0)
    g[1][7] = float("nan")
    ops.grad_stats_(g, found, None)
    assert found.item() == 1.0
    g[1][7] = 0
    ops.grad_stats_(g, found, None)
    assert found.item() == 1.0  # never cleared


def test_ops_bump_versions_of_what_they_write(backend):
    """As torch's in-place ops do; the gradients, only read, keep theirs."""
    a = _adamw_args()
    a.update(amsgrad=True, max_exp_avg_sqs=[torch.zeros(p.shape) for p in a["params"]],
             masters=[p.float() for p in a["params"]])
    written = [a[k] for k in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "masters",
                              "steps")]
    before = [[t._version for t in ts] for ts in written]
    grads = [g._version for g in a["grads"]]
    kw = {k: v for k, v in a.items() if k not in ("params", "grads", "exp_avgs", "exp_avg_sqs",
                                                  "masters", "steps")}
    ops.fused_adamw_(a["params"], a["grads"], a["exp_avgs"], a["exp_avg_sqs"], a["masters"],
                     a["steps"], **kw)
    assert all(t._version > v for ts, vs in zip(written, before) for t, v in zip(ts, vs))
    assert [g._version for g in a["grads"]] == grads

    p, g, b, s = torch.randn(4), torch.randn(4), torch.zeros(4), torch.zeros(())
    versions = [t._version for t in (p, b, s)]
    ops.fused_sgd_([p], [g], [b], [], lr=0.1, momentum=0.9, dampening=0.5, steps=[s],
                   nesterov=False, weight_decay=0.0)
    assert all(t._version > v for t, v in zip((p, b, s), versions))
    assert s.item() == 1.0 and torch.equal(b, g)  # the first step: the buffer is d, undampened

    found, sq = torch.zeros(()), torch.zeros(())
    ops.grad_stats_([torch.randn(3)], found, sq)
    assert found._version > 0 and sq._version > 0


def _opcheck_samples():
    ps = [torch.randn(5), torch.randn(7, dtype=torch.bfloat16)]
    gs = [torch.randn_like(p) for p in ps]
    st = lambda: [torch.zeros(p.shape) for p in ps]  # noqa: E731
    steps = lambda v=0.0: [torch.full((), v) for _ in ps]  # noqa: E731
    masters = [p.float() for p in ps]
    scalars = (torch.tensor(8.0), torch.zeros(()), torch.tensor(2.0))
    no_ema = ([], [], 0.0, False)
    return [
        ("grad_stats_", (gs, torch.zeros(()), torch.zeros(()))),
        ("fused_adamw_", (ps, gs, st(), st(), [], [], steps(), 1e-3, None, 0.9, 0.999, 1e-8,
                          0.01, False, False, None, None, None, 0.0, *no_ema)),
        ("fused_adamw_", (ps, gs, st(), st(), st(), masters, steps(), 1e-3, torch.tensor(2e-3),
                          0.9, 0.999, 1e-8, 0.01, True, True, *scalars, 1.0, *no_ema)),
        ("fused_sgd_", (ps, gs, st(), masters, [], 1e-2, None, 0.9, 0.0, True, False, 1e-4,
                        *scalars, 1.0, *no_ema)),
        ("fused_sgd_", (ps, gs, [], [], [], 1e-2, None, 0.0, 0.0, False, True, 0.0, None, None,
                        None, 0.0, *no_ema)),
        ("fused_sgd_", (ps, gs, st(), [], steps(), 1e-2, None, 0.9, 0.3, False, False, 0.0,
                        None, None, None, 0.0, *no_ema)),
        ("fused_sgd_", (ps, gs, st(), [], steps(2.0), 1e-2, None, 0.9, 0.3, False, True, 0.0,
                        None, None, None, 0.0, *no_ema)),
        # the EMA of the weights: a first (copying) update, then a warmed-up one with masters
        ("fused_adamw_", (ps, gs, st(), st(), [], [], steps(), 1e-3, None, 0.9, 0.999, 1e-8,
                          0.01, False, False, None, None, None, 0.0, st(), steps(), 0.999,
                          False)),
        ("fused_sgd_", (ps, gs, st(), masters, [], 1e-2, None, 0.9, 0.0, False, False, 1e-4,
                        *scalars, 1.0, st(), steps(3.0), 0.999, True)),
    ]


@pytest.mark.parametrize("idx", range(9))
def test_opcheck(extension, device, idx):
    with torch.device(device):
        op, args = _opcheck_samples()[idx]
    torch.library.opcheck(getattr(torch.ops.fastcore_train, op).default, args)


def test_compile_fullgraph(extension, device):
    """Both passes trace into one graph (fake kernels, functionalised mutation) and compute
    what eager computes, with the default compiler on every device."""
    def step(ps, gs, ms, vs, masters, steps, found, sq, scale):
        ops.grad_stats_(gs, found, sq)
        ops.fused_adamw_(ps, gs, ms, vs, masters, steps, lr=1e-3, beta1=0.9, beta2=0.999,
                         eps=1e-8, weight_decay=0.01, grad_scale=scale, found_inf=found,
                         sq_norm=sq, max_grad_norm=1.0)

    def inputs():
        torch.manual_seed(0)
        ps = [torch.randn(5), torch.randn(7, dtype=torch.bfloat16)]
        return (ps, [torch.randn(p.shape).to(p.dtype) for p in ps],
                [torch.zeros(p.shape) for p in ps], [torch.zeros(p.shape) for p in ps],
                [p.float() for p in ps], [torch.zeros(()) for _ in ps], torch.zeros(()),
                torch.zeros(()), torch.tensor(4.0))

    with torch.device(device):
        eager, compiled = inputs(), inputs()
    step(*eager)
    torch.compile(step, fullgraph=True)(*compiled)
    for a, b in zip(eager, compiled):
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            assert torch.equal(x, y)
    assert compiled[5][0].item() == 1.0


# ---------------------------------------------------------------------------------------------
# launch limits, on every device. The CUDA kernels are multi-tensor applies: up to 40 tensors of
# one dtype per launch (kMaxTensors), a block per chunk of 16384 elements, the squared norm
# summed from one partial per chunk across launches, and the step counters of up to 256 tensors
# per increment launch (kMaxSteps). Each case runs three steps of the kernels on ``device`` and
# of the reference on the CPU: two clean ones and one with an inf in the last element of the
# last tensor (the last pack, the last chunk), which every tensor must skip.

def _limit_shapes(case):
    f32, bf16 = torch.float32, torch.bfloat16
    return {
        "40 tensors": [(n % 37 + 1, f32) for n in range(40)],
        "41 tensors": [(n % 37 + 1, f32) for n in range(41)],
        "81 tensors of two dtypes": [(n % 37 + 1, (f32, bf16)[n % 2]) for n in range(81)],
        "257 tensors": [(n % 7, f32) for n in range(257)],  # empty ones too: never packed
        "a tensor of 257 chunks": [(5, f32), (70000, bf16), (256 * 16384 + 1, f32)],
    }[case]


LIMIT_CASES = ["40 tensors", "41 tensors", "81 tensors of two dtypes", "257 tensors",
               "a tensor of 257 chunks"]
LIMIT_OPTIMIZERS = {
    "AdamW": (FusedAdamW, dict(lr=1e-2, amsgrad=True, max_grad_norm=1.0)),
    "SGD": (FusedSGD, dict(lr=1e-2, momentum=0.9, dampening=0.3, max_grad_norm=1.0)),
    "SGD-EMA": (FusedSGD, dict(lr=1e-2, momentum=0.9, ema_decay=0.9, ema_warmup=True)),
}


def _limit_run(case, cls, kw, device):
    g = torch.Generator().manual_seed(0)
    ps = [nn.Parameter(torch.randn(n, generator=g).to(device, dt)) for n, dt in
          _limit_shapes(case)]
    opt = cls(ps, **kw)
    flags, before_skip = [], None
    for it in range(3):
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=g) * 64).to(device, p.dtype)
        if it == 2:
            before_skip = [p.detach().clone() for p in ps]
            ps[-1].grad.view(-1)[-1] = float("inf")
        found = torch.zeros((), device=device)
        opt._fused_step(grad_scale=torch.tensor(64.0, device=device), found_inf=found,
                        check_finite=True)
        flags.append(found.item())
    assert flags == [0.0, 0.0, 1.0]
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before_skip))
    counted = {"step": cls is FusedAdamW or "dampening" in kw, "ema_step": "ema_decay" in kw}
    for key, present in counted.items():  # every counter, the 257th included
        steps = [s[key].item() for s in opt.state.values() if key in s]
        assert len(steps) == (len(ps) if present else 0) and set(steps) <= {2.0}
    return [p.detach().cpu() for p in ps] + [v.cpu() for s in opt.state.values()
                                             for v in s.values()]


@pytest.mark.parametrize("case, opt_name", [(c, o) for c in LIMIT_CASES for o in LIMIT_OPTIMIZERS
                                            if o == "AdamW" or "chunks" not in c])
def test_launch_limits(extension, device, case, opt_name):
    """(The 4M-element tensor with AdamW alone: the chunking is the same for both kernels.)"""
    cls, kw = LIMIT_OPTIMIZERS[opt_name]
    with _backend.use_backend("extension"):
        got = _limit_run(case, cls, kw, device)
    with _backend.use_backend("reference"):
        want = _limit_run(case, cls, kw, "cpu")
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), **_kernel_tol(device, a.dtype))


@pytest.mark.cuda
@pytest.mark.parametrize("opt_cls, kw", [(FusedAdamW, dict(amsgrad=True, max_grad_norm=1.0)),
                                         (FusedSGD, dict(momentum=0.9, dampening=0.5)),
                                         (FusedAdamW, dict(ema_decay=0.999, ema_warmup=True)),
                                         (FusedSGD, dict(ema_decay=0.99))])
def test_cuda_step_never_syncs(opt_cls, kw):
    """A whole LossScaler step, overflowing or not, runs without a host-device sync."""
    model = _model(dtype=torch.float16).cuda()
    opt = opt_cls(model.parameters(), lr=1e-3, **kw)
    scaler = LossScaler(init_scale=2.0 ** 10)
    batches = [(x.cuda(), y.cuda()) for x, y in _batches(3, dtype=torch.float16)]
    _train(model, opt, batches[:1], scaler=scaler)  # state created, caches warm
    torch.cuda.synchronize()
    version = next(model.parameters())._version
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, (x, y) in enumerate(batches[1:]):
            opt.zero_grad(set_to_none=True)
            scaler.scale(((model(x).float() - y.float()) ** 2).mean()).backward()
            if i == 0:
                next(model.parameters()).grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert next(model.parameters())._version > version
    assert scaler.get_scale() == 2.0 ** 9


# ---- tensors written twice (issue 15 review: a shared step tensor raced on CUDA) ---------------

def test_a_parameter_listed_twice_is_refused_at_construction():
    p = torch.nn.Parameter(torch.zeros(3))
    q = torch.nn.Parameter(torch.zeros(2))
    for cls in (FusedAdamW, FusedSGD):
        with pytest.raises(ValueError, match="parameter 2 of param group 0 is parameter 0 again"):
            cls([p, q, p], lr=0.1)
        opt = cls([q], lr=0.1)
        with pytest.raises(ValueError, match="parameter 1 of param group 1 is parameter 0 again"):
            opt.add_param_group({"params": [p, p]})
        assert len(opt.param_groups) == 1


@pytest.mark.parametrize("what", ["steps", "exp_avgs", "params"])
def test_ops_refuse_tensors_written_twice(backend, device, what):
    """(On CUDA two blocks would race on the shared tensor: refused on the host first.)"""
    with torch.device(device):
        ps = [torch.zeros(4), torch.zeros(4)]
        gs = [torch.ones(4), torch.ones(4)]
        m = [torch.zeros(4), torch.zeros(4)]
        v = [torch.zeros(4), torch.zeros(4)]
        steps = [torch.zeros(()), torch.zeros(())]
    if what == "steps":
        steps[1] = steps[0]
    elif what == "exp_avgs":
        m[1] = v[0]
    else:
        ps[1] = ps[0]
    expected = {"steps": r"steps\[0\] and steps\[1\] are the same memory",
                "exp_avgs": r"(exp_avgs\[1\] and exp_avg_sqs\[0\]|exp_avg_sqs\[0\] and "
                            r"exp_avgs\[1\]) are the same memory",
                "params": r"params\[0\] and params\[1\] are the same memory"}[what]
    before = [t.clone() for t in ps + m + v + steps]
    with pytest.raises(ValueError, match=expected):
        ops.fused_adamw_(ps, gs, m, v, [], steps, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
                         weight_decay=0.0)
    for a, b in zip(before, ps + m + v + steps):
        assert torch.equal(a, b)  # refused before writing anything


def test_sgd_refuses_a_shared_buffer(backend, device):
    with torch.device(device):
        ps = [torch.zeros(4), torch.zeros(4)]
        gs = [torch.ones(4), torch.ones(4)]
        buf = torch.zeros(4)
    with pytest.raises(ValueError, match=r"momentum_buffers\[0\] and momentum_buffers\[1\] are "
                                         "the same memory"):
        ops.fused_sgd_(ps, gs, [buf, buf], [], lr=0.1, momentum=0.9, nesterov=False,
                       weight_decay=0.0)
