"""CUDA-graph capture of the fused ops (issue 15.2): a captured call replays with the values its
static inputs hold at replay time and gives what the eager call gives on those values.

Capture fails on any host synchronisation and on host-to-device copies of pageable memory, so
these tests also prove that none of the ops' CUDA paths reads the device on the host. Marked
``cuda``: skipped without a GPU.
"""
import copy

import pytest
import torch

import fastcore_train as ft
from fastcore_train.optim import FusedAdamW, FusedSGD

pytestmark = pytest.mark.cuda


def _capture(fn, warmup=2):
    """torch's recipe: warm up on a side stream (lazy state, allocator), then capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _params(dtype):
    torch.manual_seed(0)
    shapes = [(64, 33), (7,), (3, 1000)]
    return [torch.randn(s, device="cuda", dtype=dtype) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("make", [
    lambda ps, lr: FusedAdamW(ps, lr=lr, weight_decay=0.1),
    lambda ps, lr: FusedAdamW(ps, lr=lr, amsgrad=True, max_grad_norm=0.5),
    lambda ps, lr: FusedSGD(ps, lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-3),
    lambda ps, lr: FusedAdamW(ps, lr=lr, ema_decay=0.99, ema_warmup=True),
], ids=["adamw", "adamw-amsgrad-clip", "sgd-nesterov", "adamw-ema-warmup"])
def test_optimizer_step_replays(extension, dtype, make):
    """The step of a captured optimizer, replayed with new gradients and a new learning rate
    (a device tensor changed in place, as a scheduler would), matches eager steps of a twin
    optimizer bit for bit: the step counters and bias corrections live on the device."""
    params = _params(dtype)
    twins = [p.clone() for p in params]
    lr = torch.tensor(1e-2, device="cuda")
    lr_twin = lr.clone()
    opt, twin = make(params, lr), make(twins, lr_twin)
    for p in params:
        p.grad = torch.randn_like(p)

    graph, _ = _capture(opt.step)
    # the twin catches up with the warm-up and capture-time steps (capture runs nothing)
    for t, p in zip(twins, params):
        t.grad = p.grad.clone()
    for _ in range(2):
        twin.step()
    torch.testing.assert_close(twins, params, rtol=0, atol=0)

    for k in range(3):
        for p, t in zip(params, twins):
            p.grad.copy_(torch.randn_like(p))  # new values in the captured gradient tensors
            t.grad.copy_(p.grad)
        lr.fill_(1e-2 / (k + 2))
        lr_twin.fill_(1e-2 / (k + 2))
        graph.replay()
        twin.step()
    torch.cuda.synchronize()
    torch.testing.assert_close(twins, params, rtol=0, atol=0)
    for p, t in zip(params, twins):
        for key, v in opt.state[p].items():
            torch.testing.assert_close(v, twin.state[t][key], rtol=0, atol=0, msg=key)


def test_adamw_step_with_loss_scaling_replays(extension):
    """fp16 params with masters, unscaled on the fly and skipped on the device when a gradient
    overflows: a replay with an inf gradient changes nothing, the next one steps."""
    params = _params(torch.float16)
    opt = FusedAdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    scale = torch.tensor(1024.0, device="cuda")
    found_inf = torch.zeros((), device="cuda")
    graph, _ = _capture(lambda: opt.step(grad_scale=scale, found_inf=found_inf))
    before = copy.deepcopy(opt.state_dict()), [p.clone() for p in params]

    found_inf.fill_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close([p for p in params], before[1], rtol=0, atol=0)
    assert all(torch.equal(opt.state[p]["step"], before[0]["state"][i]["step"].cuda())
               for i, p in enumerate(params))

    found_inf.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert all(not torch.equal(p, b) for p, b in zip(params, before[1]))


@pytest.mark.parametrize("op", ["cross_entropy", "binary_cross_entropy"])
def test_loss_forward_backward_replays(extension, op):
    """Loss and gradient of a captured fused loss (static shapes), replayed on new logits,
    targets and lam, match the eager op."""
    fn = getattr(ft.ops, op)
    torch.manual_seed(0)
    B, C = 64, 1003  # odd C: the unaligned row path
    x = torch.randn(B, C, device="cuda", requires_grad=True)
    y = torch.randint(0, C, (B,), device="cuda")
    y_b = torch.randint(0, C, (B,), device="cuda")
    lam = torch.rand(B, device="cuda")

    def step():
        loss = fn(x, y, target_b=y_b, lam=lam, label_smoothing=0.1)
        return loss, torch.autograd.grad(loss, x)[0]

    graph, (loss, grad) = _capture(step)
    for _ in range(3):
        with torch.no_grad():
            x.copy_(torch.randn_like(x) * 5)
        y.copy_(torch.randint(0, C, (B,), device="cuda"))
        lam.copy_(torch.rand(B, device="cuda"))
        graph.replay()
        want_loss, want_grad = step()
        torch.testing.assert_close(loss, want_loss)
        torch.testing.assert_close(grad, want_grad)


def test_mixup_and_cutmix_replay(extension):
    """mixup (out of place, per-sample lam, and in place with a flip) and cutmix with
    per-sample boxes: captured once, replayed on new batches, perms, lams and boxes."""
    torch.manual_seed(0)
    B = 8
    x = torch.randn(B, 3, 16, 16, device="cuda")
    buf = torch.empty_like(x)
    perm = torch.randperm(B, device="cuda")
    flip = torch.arange(B - 1, -1, -1, device="cuda")
    lam = torch.rand(B, device="cuda")
    boxes = torch.tensor([[2, 9, 3, 12]] * B, device="cuda")

    def step():
        a = ft.ops.mixup(x, perm, lam)
        buf.copy_(x)
        ft.ops.mixup(buf, flip, 0.3, out=buf)
        c, c_lam = ft.ops.cutmix(x, perm, boxes)
        return a, c, c_lam

    graph, (a, c, c_lam) = _capture(step)
    for k in range(3):
        x.copy_(torch.randn_like(x))
        perm.copy_(torch.randperm(B, device="cuda"))
        lam.copy_(torch.rand(B, device="cuda"))
        boxes.copy_(torch.tensor([[k, 9 + k, 0, 16 - k]] * B, device="cuda"))
        graph.replay()
        want_a, want_c, want_lam = ft.ops.mixup(x, perm, lam), *ft.ops.cutmix(x, perm, boxes)
        torch.testing.assert_close(a, want_a, rtol=0, atol=0)
        torch.testing.assert_close(buf, ft.ops.mixup(x, flip, 0.3), rtol=0, atol=0)
        torch.testing.assert_close(c, want_c, rtol=0, atol=0)
        torch.testing.assert_close(c_lam, want_lam)
