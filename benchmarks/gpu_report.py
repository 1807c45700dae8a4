"""The GPU benchmark of `make gpu-check`: the headline cases of every op on CUDA against torch
eager, torch.compile and the peers installed on the machine (Liger-Kernel's cross-entropy when
importable; torch's fused AdamW is the fp32 optimizer baseline), each op's GB/s against the
device-to-device copy bandwidth measured in the same run, written as one markdown report.

    python benchmarks/gpu_report.py --out benchmarks/results/cuda.md [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

from fastcore_train import bench

HEADLINE = {
    "cross_entropy": ["fwd+bwd 8192x32000 fp32", "fwd+bwd 8192x32000 bf16",
                      "fwd+bwd 1024x32000 fp32", "fwd+bwd 256x1000 fp32", "fwd 8192x32000 fp32"],
    "mixup": ["256x3x224x224 fp32", "256x3x224x224 bf16", "Mixup module 256x3x224x224 fp32",
              "Mixup module 32x3x32x32 fp32"],
    "binary_cross_entropy": ["fwd+bwd 1024x11821 fp32", "fwd+bwd 1024x11821 bf16",
                             "fwd+bwd 256x1000 fp32"],
    "normalize_mixup": ["uint8 256x3x224x224 -> fp32", "uint8 256x3x224x224 -> bf16"],
    "optim": None,  # every case
    "step": None,
}
TARGET = {"cross_entropy": "fwd+bwd 8192x32000 fp32", "mixup": "256x3x224x224 fp32",
          "optim": "adamw fp16+master 50M in 100 tensors"}


def _liger_ce():
    """Liger-Kernel's fused cross-entropy, when installed (it runs on CUDA through Triton)."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except Exception:  # noqa: BLE001 - not installed, or its Triton does not import
        return None
    loss = LigerCrossEntropyLoss(label_smoothing=bench.CE_SMOOTHING)
    return lambda x, y: loss(x, y)


def cases(quick: bool):
    out = []
    device = torch.device("cuda")
    for op, names in HEADLINE.items():
        if quick and op == "step":
            continue
        if op == "optim":
            # 50M parameters as on the CPU; the compiled baseline of a 100-tensor step takes
            # minutes to build, more than this check's budget: left out
            out += [bench._optim_case(bench.OPTIM_PARAMS["full"], dt, device,
                                      compile_baseline=False)
                    for dt in (torch.float16, torch.bfloat16, torch.float32)]
            out.append(bench._optim_ema_case(bench.OPTIM_PARAMS["full"], device))
            continue
        found = bench.cases(op, device=device, size="full")
        out += [c for c in found if names is None or c.name in names]
    return out


def with_liger(case_list):
    liger = _liger_ce()
    if liger is None:
        return case_list, False
    for case in case_list:
        if case.op != "cross_entropy":
            continue
        make = case.make

        def make_with_liger(make=make, case=case):
            steps = make()
            # the case's inputs again: the same seed and draws as bench._ce_case
            B, C = (int(v) for v in case.name.split()[1].split("x"))
            dtype = torch.bfloat16 if case.name.endswith("bf16") else torch.float32
            g = torch.Generator().manual_seed(0)
            x = torch.randn(B, C, generator=g).to("cuda", dtype)
            y = torch.randint(0, C, (B,), generator=g).to("cuda")
            if case.name.startswith("fwd+bwd"):
                x.requires_grad_(True)

                def step():
                    x.grad = None
                    liger(x, y).backward()
            else:
                def step():
                    with torch.no_grad():
                        liger(x, y)
            steps["liger"] = bench._synced(step, torch.device("cuda"))
            return steps
        case.make = make_with_liger
        case.impls = tuple(case.impls) + ("liger",)
    return case_list, True


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    dev = torch.cuda.get_device_name(0)
    bw = bench.copy_bandwidth("cuda", nbytes=1 << 30)
    print(f"gpu-check: {dev}: device-to-device copy {bw:.0f} GB/s", flush=True)
    case_list, has_liger = with_liger(cases(a.quick))
    # the target cases first: they matter most if the run is cut short
    targets = {(op, name) for op, name in TARGET.items()}
    case_list.sort(key=lambda c: (c.op, c.name) not in targets)

    done = []

    def progress(r):
        pct = f", {r['pct_bandwidth']:.0f}% of copy" if r["pct_bandwidth"] else ""
        print(f"  {r['op']} {r['case']}: {r['ms']:.3f} ms{pct}, "
              + ", ".join(f"{v:.2f}x {k}" for k, v in r["speedup"].items()), flush=True)
        # the report so far, rewritten after every case: a run stopped at its time limit still
        # leaves the cases it finished
        done.append(r)
        write_report(a.out, done, dev, bw, has_liger, complete=False)

    rows = bench.run(case_list, bandwidth=bw, progress=progress)
    print(write_report(a.out, rows, dev, bw, has_liger, complete=True))
    return 0


def write_report(path, rows, dev, bw, has_liger, complete):
    lines = [f"## CUDA, {datetime.date.today()}: {dev}", "",
             f"torch {torch.__version__} (CUDA {torch.version.cuda}); device-to-device copy "
             f"{bw:.0f} GB/s measured in this run (bytes read + written); peers: "
             f"{'Liger-Kernel CE' if has_liger else 'Liger-Kernel not installed'}, torch's fused "
             "AdamW (the fp32 optimizer baseline). `make gpu-check`."
             + ("" if complete else " **Incomplete: the run stopped before its last case.**"),
             "", bench.format_table(rows, bw), "", "### Targets (issue 15)", ""]
    for op, name in TARGET.items():
        r = next((r for r in rows if r["op"] == op and r["case"] == name), None)
        if r is None:
            lines.append(f"- {op} {name}: not measured")
            continue
        ok = r["pct_bandwidth"] is not None and r["pct_bandwidth"] >= 85
        lines.append(f"- {op} {name}: {r['pct_bandwidth']:.0f}% of the copy bandwidth "
                     f"({'met' if ok else 'NOT met'}: >= 85%); "
                     + ", ".join(f"{v:.2f}x {k}" for k, v in r["speedup"].items()))
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
