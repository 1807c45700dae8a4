"""Run from outside the source tree in a venv where fastcore_train was installed from a wheel or
an sdist: the compiled kernels are in use and every op agrees with the pure-torch reference."""
import sys

import torch

import fastcore_train as ft
from fastcore_train import _backend
from fastcore_train.ops import optim_step

assert ft.backend() == "extension", ft.backend_reason()
assert "site-packages" in ft.__file__ or "--any-location" in sys.argv, ft.__file__
print("extension:", _backend._C_path)
print("built against:", _backend.built_against())
torch.manual_seed(0)


def both(fn):
    """fn() on the extension and on the reference."""
    out = fn()
    with _backend.use_backend("reference"):
        ref = fn()
    return out, ref


def close(a, b, what):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")
    print("ok", what)


logits = torch.randn(37, 1003)
y, yb = torch.randint(0, 1003, (37,)), torch.randint(0, 1003, (37,))
lam = torch.rand(37)


def ce():
    x = logits.clone().requires_grad_()
    loss = ft.ops.cross_entropy(x, y, target_b=yb, lam=lam, label_smoothing=0.1)
    loss.backward()
    return loss.detach(), x.grad


(l1, g1), (l2, g2) = both(ce)
close(l1, l2, "cross_entropy loss")
close(g1, g2, "cross_entropy grad")
close(ft.ops.cross_entropy(logits, y, label_smoothing=0.1),
      torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1), "cross_entropy vs torch")

x = torch.randn(16, 3, 9, 11)
perm = torch.arange(15, -1, -1)
a, b = both(lambda: ft.ops.mixup(x, perm, 0.3))
close(a, b, "mixup")
a, b = both(lambda: ft.ops.cutmix(x, perm, (1, 6, 2, 9))[0])
close(a, b, "cutmix")


def step(cls, **kw):
    torch.manual_seed(1)
    m = torch.nn.Linear(64, 33).to(torch.bfloat16)
    opt = cls(m.parameters(), lr=1e-2, **kw)
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(8, 64, dtype=torch.bfloat16)).float().square().mean().backward()
        opt.step()
    return torch.cat([p.detach().float().flatten() for p in m.parameters()])


for cls, kw in ((ft.optim.FusedAdamW, {}), (ft.optim.FusedSGD, {"momentum": 0.9})):
    a, b = both(lambda: step(cls, **kw))
    close(a, b, cls.__name__)

grads = [torch.randn(100), torch.randn(7, 3)]
found, sq = both(lambda: (lambda f, s: (optim_step.grad_stats_(grads, f, s), f, s)[1:])(
    torch.zeros(()), torch.zeros(())))
close(found[0], sq[0], "grad_stats_ found_inf")
close(found[1], sq[1], "grad_stats_ sq_norm")
print("install smoke test passed")
