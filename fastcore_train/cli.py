"""The ``fastcore-train`` command line.

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its parser and sets
``func`` (called with the parsed namespace, returns the exit code); adding a subcommand means
writing one such function and listing it in ``_SUBCOMMANDS``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Sequence


def _cache_line(info: dict) -> str:
    """The large-output cache: its setting, then what it holds and may hold right now (the
    bound follows the recent peak of large outputs in use, so an idle process shows 0)."""
    env = os.environ.get("FASTCORE_TRAIN_CACHE_MB")
    held = (f"{info['cached_bytes'] / 2**20:.0f} MiB of freed large CPU outputs kept for reuse "
            f"(bound by recent use: {info['cache_limit_bytes'] / 2**20:.0f} MiB)")
    if env is not None and env.strip() == "0":
        return "off (FASTCORE_TRAIN_CACHE_MB=0)"
    if env is not None:
        return f"on, at most {env} MiB (FASTCORE_TRAIN_CACHE_MB); {held}"
    try:
        ram_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
        cap = f"at most {ram_mib / 8:.0f} MiB (1/8 of memory; FASTCORE_TRAIN_CACHE_MB sets it)"
    except (ValueError, OSError, AttributeError):
        cap = "at most 1/8 of memory (FASTCORE_TRAIN_CACHE_MB sets it)"
    return f"on, {cap}; {held}"


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
        ("built against", info.get("built_against", "n/a (extension not loaded)")),
        ("extension CUDA", yes_no(info["extension_cuda"]) if "extension_cuda" in info
         else "n/a (extension not loaded)"),
        ("CPU kernels", info.get("cpu_kernels", "n/a")),
        ("output cache", _cache_line(info) if "cached_bytes" in info else "n/a"),
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


def _build(args: argparse.Namespace) -> int:
    import subprocess

    import torch

    from fastcore_train import _backend, _build as build

    if args.no_cuda:
        os.environ["FASTCORE_TRAIN_NO_CUDA"] = "1"
    loaded = _backend.extension_loaded()
    if loaded and not args.force:
        print(f"fastcore-train build: the kernels for torch {torch.__version__} are already "
              f"built and in use ({_backend._C_path}); --force rebuilds them")
        return 0
    try:
        path = build.jit_build(force=args.force, jobs=args.jobs, verbose=args.verbose)
    except build.BuildError as e:
        print(f"fastcore-train build: error: {e}", file=sys.stderr)
        return 2
    # a fresh interpreter proves that `import fastcore_train` picks the build up
    probe = subprocess.run(
        [sys.executable, "-c", "import fastcore_train as ft; print(ft.backend()); "
                               "print(ft.backend_reason())"],
        capture_output=True, text=True, env=dict(os.environ, FASTCORE_TRAIN_BACKEND=""))
    lines = probe.stdout.split("\n")
    if probe.returncode != 0 or lines[0] != "extension":
        detail = (lines[1] if len(lines) > 1 and lines[1] else probe.stderr.strip()[-500:])
        print(f"fastcore-train build: error: built {path} but import fastcore_train does not "
              f"use it: {detail}", file=sys.stderr)
        return 2
    if loaded:
        print(f"fastcore-train build: rebuilt {path}; {lines[1]}")
    else:
        print(f"fastcore-train build: done; import fastcore_train now uses the kernels "
              f"({path})")
    return 0


def _add_build(sub) -> None:
    p = sub.add_parser(
        "build", help="compile the fused kernels for the installed torch (once)",
        description="Compile fastcore_train's C++ (and, with a CUDA torch and nvcc, CUDA) "
                    "kernels against the torch that is installed, into torch's extension cache "
                    "(TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions). Needed once "
                    "after `pip install fastcore_train` with build isolation, and after "
                    "upgrading torch; `import fastcore_train` finds the build by itself. "
                    "Concurrent builds wait for each other.")
    p.add_argument("--force", action="store_true", help="rebuild even if a build exists")
    p.add_argument("--jobs", type=_positive_int, default=None,
                   help="parallel compiler jobs (default: MAX_JOBS or the number of CPUs)")
    p.add_argument("--no-cuda", action="store_true",
                   help="CPU kernels only, even with a CUDA torch (FASTCORE_TRAIN_NO_CUDA=1)")
    p.add_argument("--verbose", action="store_true", help="show the compiler's output")
    p.set_defaults(func=_build)


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


# ---- argument types: a bad value is an argparse error (usage + message), not a traceback ----

def _device_type(value: str) -> str:
    import torch
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device; use cpu or cuda[:N]")
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{value!r}: only cpu and cuda are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{value!r}: CUDA is not available (torch {torch.__version__}, built with CUDA "
                f"{torch.version.cuda or 'none'})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{value!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return value


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _fraction(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = -1.0
    if not 0.0 < x <= 1.0:
        raise argparse.ArgumentTypeError(f"expected an accuracy in (0, 1], got {value!r}")
    return x


def _bench(args: argparse.Namespace) -> int:
    import torch

    from fastcore_train import bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    case_list = bench.cases(args.op, device=device, size="quick" if args.quick else "full")
    here = bench.alloc_config()
    if args.roofline:
        def show(row, n):
            if not args.json:
                print(f"  {row['op']} {row['case']} at {n} thread(s): {row['gbps'][n]:.1f} GB/s "
                      f"= {row['pct'][n]:.0f}% of the {row['roof']} bandwidth", flush=True)
        if not args.json:
            print(f"fastcore-train bench --roofline on {device}, allocator setting {here} "
                  "(this process only: --alloc does not apply)", flush=True)
        rows = bench.roofline(case_list, device=device, progress=show)
        if args.json:
            print(json.dumps({"device": device, "torch": torch.__version__, "alloc": here,
                              "rows": rows}, indent=2))
        elif not rows:
            print(f"no case of {bench.ROOFLINE_MIN_BYTES >> 20} MB or more in this selection "
                  "(smaller ones run from the caches); run without --quick")
        else:
            print("\n" + bench.format_roofline(rows))
        return 0
    # CPU: the other allocator settings run in child processes (torch reads its switch once)
    others = []
    if device == "cpu" and args.alloc != "current":
        wanted = ["THP", "default"] + (["THP, cache off"] if args.alloc == "all" else [])
        others = [c for c in wanted if c != here]
    bandwidth = bench.copy_bandwidth(device)
    if not args.json:
        print(f"fastcore-train bench on {device}: {len(case_list)} cases, "
              f"copy bandwidth {bandwidth:.1f} GB/s (measured now); allocator setting here: "
              f"{here}" + (f", then {', '.join(others)} in child processes" if others else ""),
              flush=True)

    def progress(row):
        if not args.json:
            print(f"  [{here}] {row['op']} {row['case']}: {row['ms']:.2f} ms, "
                  + ", ".join(f"{v:.2f}x {k}" for k, v in row["speedup"].items())
                  + "".join(f"; {k}'s fused parts {v:.2f} ms" for k, v
                            in row.get("parts_ms", {}).items()),
                  flush=True)

    by_config = {here: bench.run(case_list, bandwidth=bandwidth, progress=progress)}
    for config in others:
        if not args.json:
            print(f"  [{config}] running in a child process ...", flush=True)
        rows = bench.run_in_child(config, args.op, device, args.quick)
        for r in rows:  # GB/s shares against this run's copy bandwidth
            r["pct_bandwidth"] = 100 * r["gbps"] / bandwidth
        by_config[config] = rows
    if args.json:
        print(json.dumps({"device": device, "copy_gbps": bandwidth, "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "alloc": here,
                          "rows": by_config[here], "by_alloc": by_config}, indent=2))
    elif len(by_config) > 1:
        print()
        print(bench.format_multi(by_config, bandwidth))
    else:
        print()
        print(bench.format_table(by_config[here], bandwidth))
    return 0


def _add_bench(sub) -> None:
    from fastcore_train import bench
    p = sub.add_parser(
        "bench", help="time the fused ops against torch eager and torch.compile",
        description="Time the fused ops against torch eager and torch.compile in this process "
                    "and print one table: time, speed-up ratios, GB/s and the share of the copy "
                    "bandwidth measured in the same run. On a GPU the CUDA kernels are timed.")
    p.add_argument("--op", choices=sorted(bench.OPS), help="only this op (default: all)")
    p.add_argument("--device", type=_device_type,
                   help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--roofline", action="store_true",
                   help="our ops alone, at 1 thread and at all threads, as a share of the copy "
                        "bandwidth measured at the same thread count (cases >= 64 MB)")
    p.add_argument("--alloc", choices=["both", "current", "all"], default="both",
                   help="CPU allocator settings to time under: both = torch with "
                        "THP_MEM_ALLOC_ENABLE=1 (fair) and torch's default (as shipped), each "
                        "in its own process (default); all = also our output cache off; "
                        "current = this process only")
    p.set_defaults(func=_bench)


def _data_args(p) -> None:
    p.add_argument("--data", choices=["digits", "cifar10"], default="digits",
                   help="digits: scikit-learn's 8x8 digits (default); cifar10: the python-pickle "
                        "batches under --root")
    p.add_argument("--root", help="folder of the CIFAR-10 python batches")
    p.add_argument("--out", default="demo_out", help="folder for the plots (default demo_out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=_device_type, default=None,
                   help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _unwritable(folder: str) -> Optional[str]:
    """Why plots cannot be written to ``folder`` (None if they can), checked before training
    rather than after it."""
    import tempfile
    if os.path.exists(folder) and not os.path.isdir(folder):
        return "exists and is not a folder"
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return f"cannot write there ({e.strerror or e})"
    return None


def _device(args) -> str:
    import torch
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _demo(args: argparse.Namespace) -> int:
    from fastcore_train import demo
    res = demo.run_demo(data=args.data, root=args.root, epochs=args.epochs, target=args.target,
                        out=args.out, seed=args.seed, device=_device(args),
                        progress=not args.no_progress)
    if args.json:
        print(json.dumps({"speedup": res["speedup"], "table": res["table"]}, indent=2))
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="train a baseline and the fast recipe on real data and compare",
        description="Train the same small CNN twice on the same data, seed and hardware: the "
                    "baseline (Adam, constant lr, plain cross-entropy, fp32) and the fast recipe "
                    "(LR finder, one-cycle, fused label smoothing + mixup, FusedAdamW, early "
                    "stopping). Prints epochs and wall time to the target accuracy and writes "
                    "lr_find.png, schedule.png and curves.png.")
    _data_args(p)
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="epochs of each run (default: 40 baseline / 5 recipe on digits)")
    p.add_argument("--target", type=_fraction, default=0.97,
                   help="validation accuracy to reach (default 0.97)")
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    p.set_defaults(func=_demo)


def _lr_find(args: argparse.Namespace) -> int:
    from fastcore_train import demo
    res, path = demo.demo_lr_find(data=args.data, root=args.root, out=args.out, seed=args.seed,
                                  device=_device(args), num_iter=args.num_iter,
                                  progress=not args.no_progress)
    print(f"LR range test: {len(res.lrs)} steps ({res.stop_reason})")
    for name, lr in res.suggestions.items():
        print(f"  {name:<11} {lr:.3e}" if lr is not None else f"  {name:<11} -")
    if path:
        print(f"plot: {path}")
    return 0


def _add_lr_find(sub) -> None:
    p = sub.add_parser("lr-find", help="run the LR range test on the demo model and data",
                       description="Run the LR range test (fastcore_train.lr_find) on the demo "
                                   "model and data, print the suggestions and write "
                                   "lr_find.png.")
    _data_args(p)
    p.add_argument("--num-iter", type=_positive_int, default=100, help="steps of the sweep (default 100)")
    p.set_defaults(func=_lr_find)


_SUBCOMMANDS = (_add_info, _add_build, _add_launch, _add_bench, _add_demo, _add_lr_find)


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
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "data", None) == "cifar10" and not args.root:
        parser.error("--data cifar10 needs --root, the folder of the CIFAR-10 python batches "
                     "(data_batch_1 ... test_batch)")
    if getattr(args, "out", None) is not None:
        problem = _unwritable(args.out)
        if problem:
            parser.error(f"--out {args.out!r}: {problem}")
    args.argv = argv  # the raw arguments, for subcommands that pass them on
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:  # bad data folders and the like: no traceback
        print(f"fastcore-train {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
