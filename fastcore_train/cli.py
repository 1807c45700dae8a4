"""The ``fastcore-train`` command line.

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its parser and sets
``func`` (called with the parsed namespace, returns the exit code); adding a subcommand means
writing one such function and listing it in ``_SUBCOMMANDS``.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional, Sequence


def _info(args: argparse.Namespace) -> int:
    import torch

    import fastcore_train
    from fastcore_train import _backend

    info = dict(_backend.info())
    info["version"] = fastcore_train.__version__
    if torch.cuda.is_available():
        info["devices"] = [f"cuda:{i} {torch.cuda.get_device_name(i)}"
                           for i in range(torch.cuda.device_count())]
    else:
        info["devices"] = ["cpu"]
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0

    def yes_no(v):
        return "yes" if v else "no"

    rows = [
        ("fastcore_train", info["version"]),
        ("backend", f"{info['backend']} ({info['reason']})"),
        ("extension CUDA", yes_no(info["extension_cuda"]) if "extension_cuda" in info
         else "n/a (extension not loaded)"),
        ("CPU kernels", info.get("cpu_kernels", "n/a")),
        ("torch", info["torch"]),
        ("torch CUDA", info["torch_cuda"] or "none (CPU-only build)"),
        ("CUDA available", yes_no(info["cuda_available"])),
        ("devices", ", ".join(info["devices"])),
        ("threads", str(info["threads"])),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show the version, the op backend and why, torch and devices",
                       description="Show the version, which op backend is in use and why, "
                                   "torch's version and build, devices and threads.")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.set_defaults(func=_info)


def _launch(args: argparse.Namespace) -> int:
    from fastcore_train import distributed
    return distributed.torchrun(args.argv[args.argv.index("launch") + 1:])


def _add_launch(sub) -> None:
    # torchrun's own parser is the parent, so every torchrun option is accepted and documented
    # here and checked before anything starts; the arguments then go to torchrun unchanged.
    from torch.distributed.run import get_args_parser
    sub.add_parser(
        "launch", parents=[get_args_parser()], add_help=False,
        help="run a training script on several processes (torchrun)",
        description="Run a training script on several processes with torch.distributed.run "
                    "(torchrun); all options are torchrun's. On one node without rendezvous "
                    "options a free localhost port is used. Exits non-zero when any process "
                    "fails. Example: fastcore-train launch --nproc-per-node 2 train.py --lr 0.1",
    ).set_defaults(func=_launch)


def _bench(args: argparse.Namespace) -> int:
    import torch

    from fastcore_train import bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    case_list = bench.cases(args.op, device=device, size="quick" if args.quick else "full")
    bandwidth = bench.copy_bandwidth(device)
    if not args.json:
        print(f"fastcore-train bench on {device}: {len(case_list)} cases, "
              f"copy bandwidth {bandwidth:.1f} GB/s (measured now)", flush=True)

    def progress(row):
        if not args.json:
            print(f"  {row['op']} {row['case']}: {row['ms']:.2f} ms, "
                  + ", ".join(f"{v:.2f}x {k}" for k, v in row["speedup"].items()), flush=True)

    rows = bench.run(case_list, bandwidth=bandwidth, progress=progress)
    if args.json:
        print(json.dumps({"device": device, "copy_gbps": bandwidth, "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    else:
        print()
        print(bench.format_table(rows, bandwidth))
    return 0


def _add_bench(sub) -> None:
    from fastcore_train import bench
    p = sub.add_parser(
        "bench", help="time the fused ops against torch eager and torch.compile",
        description="Time the fused ops against torch eager and torch.compile in this process "
                    "and print one table: time, speed-up ratios, GB/s and the share of the copy "
                    "bandwidth measured in the same run. On a GPU the CUDA kernels are timed.")
    p.add_argument("--op", choices=sorted(bench.OPS), help="only this op (default: all)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=_bench)


_SUBCOMMANDS = (_add_info, _add_launch, _add_bench)


def _parser() -> argparse.ArgumentParser:
    from fastcore_train import __version__
    parser = argparse.ArgumentParser(
        prog="fastcore-train",
        description="fastcore_train: fused kernels and training recipes for PyTorch.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``fastcore-train``; returns the exit code."""
    argv: List[str] = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv  # the raw arguments, for subcommands that pass them on
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
