"""The benchmark harness (fastcore_train/bench.py): its baselines must compute what our ops
compute, or their timings compare different work."""
import pytest
import torch
from torch import nn

from fastcore_train import bench
from fastcore_train.optim import FusedAdamW

SIZES = [7, 33, 256, 1000]


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter((torch.randn(n, generator=g) * 0.1).to(dtype)) for n in SIZES]
    grads = [[(torch.randn(n, generator=g) * 1e-2).to(dtype) for n in SIZES] for _ in range(5)]
    return params, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_compiled_adamw_baseline_is_fused_adamw(backend, dtype, monkeypatch):
    """bench._adamw_maths (run eagerly here; the benchmark compiles it) follows FusedAdamW's
    trajectory, with master weights for half-precision parameters. A large lr and weight decay
    make every term of the update visible at the tolerance."""
    monkeypatch.setitem(bench.OPTIM_HPARAMS, "lr", 1e-2)
    monkeypatch.setitem(bench.OPTIM_HPARAMS, "weight_decay", 0.1)
    params, grads = _params(dtype)
    opt = FusedAdamW(params, **bench.OPTIM_HPARAMS)
    w = [p.detach().clone() for p in params]
    masters = [x.float() for x in w] if dtype != torch.float32 else w
    m = [torch.zeros_like(x) for x in masters]
    v = [torch.zeros_like(x) for x in masters]
    step, inv, found = torch.zeros(()), torch.ones(()), torch.zeros(())
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
        bench._adamw_maths(w, gs, masters, m, v, step, inv, found)
    assert step.item() == len(grads) and found.item() == 0
    for p, x, mw in zip(params, w, masters):
        ours = opt.state[p].get("master", p.detach())
        torch.testing.assert_close(mw, ours, atol=1e-6, rtol=1e-5)
        # the weight: the master rounded to the dtype, so at most one ulp apart
        torch.testing.assert_close(x.float(), p.detach().float(), atol=1e-6,
                                   rtol=torch.finfo(dtype).eps)


def test_compiled_adamw_baseline_skips_on_overflow():
    params, grads = _params(torch.float16)
    w = [p.detach().clone() for p in params]
    masters = [x.float() for x in w]
    m = [torch.full_like(x, 0.5) for x in masters]
    v = [torch.full_like(x, 0.25) for x in masters]
    step, inv, found = torch.full((), 3.0), torch.full((), 0.5), torch.zeros(())
    before = [t.clone() for t in w + masters + m + v + [step]]
    gs = grads[0]
    gs[2][17] = float("inf")
    bench._adamw_maths(w, gs, masters, m, v, step, inv, found)
    assert found.item() == 1
    for a, b in zip(before, w + masters + m + v + [step]):
        assert torch.equal(a, b)


def test_run_and_table():
    x = torch.ones(1 << 16)
    y = torch.empty_like(x)
    case = bench.Case("copy", "copy 64k", 2 * x.numel() * 4,
                      lambda: {"fastcore_train": lambda: y.copy_(x),
                               "fastcore_train inplace": lambda: y.mul_(1.0),
                               "eager": lambda: y.copy_(x.clone()),
                               "copy": lambda: y.copy_(x)},
                      rounds=3, impls=("fastcore_train", "fastcore_train inplace", "eager", "copy"))
    rows = bench.run([case], bandwidth=10.0)
    (row,) = rows
    assert row["case"] == "copy 64k" and set(row["speedup"]) == {"eager"}
    assert set(row["variants_ms"]) == {"fastcore_train inplace", "copy"}
    assert row["gbps"] > 0 and row["pct_bandwidth"] == pytest.approx(10 * row["gbps"])
    table = bench.format_table(rows, 10.0)
    assert "| copy | copy 64k |" in table and "× eager" in table
    assert "| fastcore_train inplace ms | copy ms |" in table and "× copy" not in table


def test_bandwidth_probes():
    assert bench.copy_bandwidth(nbytes=1 << 20, repeats=2) > 0
    assert bench.rmw_bandwidth(nbytes=1 << 20, repeats=2) > 0


def test_case_names_are_unique():
    names = [(c.op, c.name) for c in bench.cases(size="quick")]
    assert len(names) == len(set(names))
    for op in bench.OPS:
        assert bench.cases(op, size="quick")
    with pytest.raises(ValueError, match="unknown op"):
        bench.cases("nope")


def test_alloc_config_names_the_allocator_setting():
    assert bench.alloc_config({"THP_MEM_ALLOC_ENABLE": "1"}) == "THP"
    assert bench.alloc_config({}) == "default"
    assert bench.alloc_config({"THP_MEM_ALLOC_ENABLE": "1",
                               "FASTCORE_TRAIN_CACHE_MB": "0"}) == "THP, cache off"
    assert bench.alloc_config({"FASTCORE_TRAIN_CACHE_MB": "7"}) == "other"


def test_format_multi_leads_with_the_fair_setting():
    row = dict(op="cross_entropy", case="fwd 2x3 fp32", ms=1.0, speedup={"eager": 2.0},
               gbps=1.0, pct_bandwidth=10.0, baselines_ms={"eager": 2.0}, variants_ms={})
    text = bench.format_multi({"default": [dict(row, speedup={"eager": 5.0})],
                               "THP": [row]}, bandwidth=10.0)
    head = text.splitlines()[0]
    assert head.index("[THP]") < head.index("[default]")
    assert "| 1.00 | 2.00 | 1.00 | 5.00 |" in text


def test_step_recipes_train_the_same_model_the_same_way():
    """The whole-step benchmark compares recipes, not different maths: one eager step and one
    fastcore_train step from the same weights give the same loss (same lam, same smoothing)."""
    import fastcore_train as ft
    from fastcore_train import bench_step

    torch.manual_seed(0)
    model = bench_step.StepCNN(classes=10)
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    eager = bench_step._eager_loss(model, x.clone(), y, 0.7, 10)
    xm = ft.ops.mixup(x, torch.arange(7, -1, -1), 0.7)
    ours = ft.nn.LabelSmoothingCrossEntropy(bench_step.SMOOTHING)(
        model(xm), ft.MixedTarget(y, y.flip(0), 0.7))
    torch.testing.assert_close(ours, eager, atol=1e-5, rtol=1e-5)


def test_timm_flip_baseline_is_a_mixup():
    from fastcore_train import bench as b
    x = torch.randn(6, 5)
    torch.testing.assert_close(b.timm_flip_(x.clone(), 0.3), 0.3 * x + 0.7 * x.flip(0))


def test_gpu_report_names_existing_cases():
    """benchmarks/gpu_report.py (make gpu-check) selects cases by name: a renamed case would
    silently drop out of the GPU report."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks", "gpu_report.py")
    spec = importlib.util.spec_from_file_location("gpu_report", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for op, names in mod.HEADLINE.items():
        have = {c.name for c in bench.cases(op, device="cpu", size="full")}
        assert names is None or set(names) <= have, (op, set(names) - have)
    optim = bench._optim_case(bench.OPTIM_PARAMS["full"], torch.float16, torch.device("cpu"),
                              compile_baseline=False)
    assert optim.name == mod.TARGET["optim"]
    for op in ("cross_entropy", "mixup"):
        assert mod.TARGET[op] in mod.HEADLINE[op]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_bce_baselines_compute_the_same_loss(mode):
    """The BCE case compares one loss computed four ways: timm's recipe (targets built per step),
    torch's loss on prebuilt targets, its compiled form and ours must agree, gradients too."""
    import fastcore_train as ft
    torch.manual_seed(0)
    x = torch.randn(6, 11)
    y = torch.randint(0, 11, (6,))
    q = bench.timm_mixup_targets(y, 11, bench.BCE_LAM, bench.BCE_SMOOTHING, x.device)
    want = torch.nn.functional.binary_cross_entropy_with_logits(x, q)
    # timm's mixup_target, written out: lam * smooth(y) + (1 - lam) * smooth(y.flip(0))
    off = bench.BCE_SMOOTHING / 11
    one = torch.nn.functional.one_hot
    q_direct = (bench.BCE_LAM * (one(y, 11) * (1 - bench.BCE_SMOOTHING) + off)
                + (1 - bench.BCE_LAM) * (one(y.flip(0), 11) * (1 - bench.BCE_SMOOTHING) + off))
    torch.testing.assert_close(q, q_direct)
    torch.testing.assert_close(bench._bce_timm(x, y), want)
    ours = ft.ops.binary_cross_entropy(x, y, target_b=y.flip(0), lam=bench.BCE_LAM,
                                       label_smoothing=bench.BCE_SMOOTHING)
    torch.testing.assert_close(ours, want)
    steps = bench._bce_case((6, 11), torch.float32, mode, torch.device("cpu")).make()
    assert set(steps) == set(bench.BCE_IMPLS)


def test_roofline_rows_and_table(monkeypatch):
    """The roofline times only our op (a baseline that would fail is never called), at 1 and
    at all threads, against the copy at the same count; goals by dtype."""
    monkeypatch.setattr(bench, "copy_bandwidth", lambda device: 10.0)
    monkeypatch.setattr(bench, "rmw_bandwidth", lambda device: 20.0)
    calls = []

    def make():
        def boom():
            raise AssertionError("a baseline was timed")
        return {"fastcore_train": lambda: calls.append(torch.get_num_threads()), "eager": boom}

    big = bench.ROOFLINE_MIN_BYTES
    cases = [bench.Case("cross_entropy", "fwd 8x8 bf16", big, make, rounds=3),
             bench.Case("mixup", "tiny fp32", 1, make),
             bench.Case("optim", "adamw fp32", big, make, rounds=3)]
    threads = torch.get_num_threads()
    rows = bench.roofline(cases)
    assert torch.get_num_threads() == threads
    # the cache-sized case is left out; the optimizer's roof is the in-place bandwidth
    assert [r["case"] for r in rows] == ["fwd 8x8 bf16", "adamw fp32"]
    assert [r["roof"] for r in rows] == ["copy", "in-place RMW"]
    assert rows[1]["roof_gbps"][1] == 20.0 and rows[1]["goal_pct"] == 80
    assert rows[0]["goal_pct"] == 60
    assert set(rows[0]["pct"]) == ({1, threads} if threads > 1 else {threads})
    assert set(calls) == set(rows[0]["pct"])
    table = bench.format_roofline(rows)
    assert "| cross_entropy | fwd 8x8 bf16 | copy |" in table
    assert "copy 10.0 GB/s at 1 thread" in table and "in-place RMW 20.0 GB/s" in table


def test_normalize_mixup_baselines_compute_the_op():
    """The normalize_mixup benchmark's baselines (eager, timm's path) compute what the fused op
    does, so the ratios compare the same work."""
    import fastcore_train as ft
    from fastcore_train import bench as b
    x = torch.randint(0, 256, (6, 3, 5, 7), dtype=torch.uint8)
    mean, std = torch.tensor(b.IMAGENET_MEAN_255), torch.tensor(b.IMAGENET_STD_255)
    perm = torch.arange(5, -1, -1)
    for dtype in (torch.float32, torch.bfloat16):
        ours = ft.ops.normalize_mixup(x, perm, 0.7, mean, std, out_dtype=dtype)
        eager = b._normmix_eager(x, perm, 0.7, mean, std, dtype)
        torch.testing.assert_close(ours, eager, atol=0, rtol=0)
        torch.testing.assert_close(b._normmix_timm(x, 0.7, mean, std, dtype), eager)
    names = {c.name for c in b.cases("normalize_mixup", size="full")}
    assert names == {"uint8 256x3x224x224 -> fp32", "uint8 256x3x224x224 -> bf16"}


def test_cli_roofline_says_when_no_case_is_large_enough(capsys):
    from fastcore_train import cli
    assert cli.main(["bench", "--roofline", "--op", "mixup", "--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "allocator setting" in out and "run without --quick" in out
