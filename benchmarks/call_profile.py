"""Where the time of a small fused cross-entropy call goes, layer by layer.

    python benchmarks/call_profile.py [--batch 256 --classes 1000 --threads 2]

Each line times one layer of the call in the same process, medians of 7 rounds of N calls:
the raw kernels through torch's dispatcher (``torch.ops.fastcore_train...``), our Python entry
point without autograd, the whole forward+backward, torch's F.cross_entropy forward+backward,
and the floor any autograd backward costs (``x.sum().backward()``). The differences are the
Python checks and the autograd machinery around the same kernels.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fastcore_train as ft


def per_call_us(fn, calls: int) -> float:
    for _ in range(max(20, calls // 10)):
        fn()
    rounds = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(rounds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--calls", type=int, default=300)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if ft.backend() != "extension":
        raise SystemExit(f"the extension is not loaded ({ft.backend_reason()})")
    torch.manual_seed(0)
    x = torch.randn(a.batch, a.classes, requires_grad=True)
    xd = x.detach()
    y = torch.randint(0, a.classes, (a.batch,))
    eps = 0.1
    ops = torch.ops.fastcore_train
    _, stats = ops.cross_entropy.default(xd, y, None, None, 1.0, eps, -100, 1)
    one = torch.ones(())

    def fwd_bwd(fn):
        def step():
            x.grad = None
            fn().backward()
        return step

    def no_grad(fn):
        def step():
            with torch.no_grad():
                fn()
        return step

    layers = [
        ("kernel: forward (dispatcher)",
         lambda: ops.cross_entropy.default(xd, y, None, None, 1.0, eps, -100, 1)),
        ("kernel: backward (dispatcher)",
         lambda: ops.cross_entropy_backward.default(one, xd, y, None, None, 1.0, stats, eps,
                                                    -100, 1)),
        ("ft.ops.cross_entropy, no grad", no_grad(
            lambda: ft.ops.cross_entropy(x, y, label_smoothing=eps))),
        ("ft.ops.cross_entropy fwd+bwd", fwd_bwd(
            lambda: ft.ops.cross_entropy(x, y, label_smoothing=eps))),
        ("F.cross_entropy, no grad", no_grad(
            lambda: F.cross_entropy(x, y, label_smoothing=eps))),
        ("F.cross_entropy fwd+bwd", fwd_bwd(
            lambda: F.cross_entropy(x, y, label_smoothing=eps))),
        ("floor: x.sum().backward()", fwd_bwd(lambda: x.sum())),
    ]
    print(f"cross-entropy {a.batch}x{a.classes} fp32, label smoothing {eps}, {a.threads} "
          f"thread(s), torch {torch.__version__}")
    times = {}
    for name, fn in layers:
        times[name] = per_call_us(fn, a.calls)
        print(f"  {name:32s} {times[name]:8.1f} us", flush=True)
    kernels = times["kernel: forward (dispatcher)"] + times["kernel: backward (dispatcher)"]
    ours = times["ft.ops.cross_entropy fwd+bwd"]
    print(f"  kernels {kernels:.0f} us of our {ours:.0f} us call ({100 * kernels / ours:.0f}%); "
          f"fwd+bwd {times['F.cross_entropy fwd+bwd'] / ours:.2f}x eager; "
          f"with free Python and autograd the bound is "
          f"{times['F.cross_entropy fwd+bwd'] / kernels:.2f}x")


if __name__ == "__main__":
    main()
