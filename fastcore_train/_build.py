"""How fastcore_train._C is built, for both ways of building it.

* **Ahead of time** by ``setup.py`` (``pip install --no-build-isolation``, ``make``, wheels): the
  extension is built against the torch of the build environment and lands in the package.
* **Just in time** by ``fastcore-train build`` (or at import with ``FASTCORE_TRAIN_JIT=1``):
  the same build, run in a subprocess against the torch that is running, into torch's
  extension cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), under a
  file lock so that DDP ranks and DataLoader workers that import at once build it only once.

A plain ``pip install`` builds in an isolated environment that cannot see the user's torch;
pyproject.toml therefore does not ask for torch there, and setup.py installs the package without
the extension rather than compiling it against some other torch. Every build records the torch
it was built against in the binary (``FASTCORE_TRAIN_BUILD_INFO|...``), which
fastcore_train._backend reads before it loads a build, so a build for another torch is never
loaded.

This module imports neither torch nor the rest of the package at import time: setup.py loads it
by path, possibly where torch is missing, and the JIT build runs it as a script.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
MARKER = b"FASTCORE_TRAIN_BUILD_INFO|"

# Order matters: DEFAULT is linked first so that the linker keeps its copies of inline
# functions shared through torch headers (never an AVX-512 encoding on a CPU without it).
ISA_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}
# The C++ standard is the one torch asks for (17 or 20). Torch's headers carry pragmas GCC
# does not know (#pragma unroll, clang diagnostics): a warning per include otherwise. -g0: the
# interpreter's CFLAGS bring -g, which made _C 24 MB of which 23 MB debug info
# (FASTCORE_TRAIN_DEBUG=1 keeps it).
CXX_FLAGS = ["-O3", "-fopenmp", "-Wno-unknown-pragmas"]
# No --use_fast_math: it flushes denormals and approximates division and sqrt, and the
# optimizer must match torch (and our CPU kernels) on every value, as torch's own kernels do.
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]
# Built when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible (a container build, a login
# node): the datacenter GPUs torch itself targets, plus PTX of the newest for later GPUs.
DEFAULT_CUDA_ARCHS = "8.0;9.0"
DEFAULT_CUDA_ARCHS_CU128 = "8.0;9.0;10.0;12.0"  # CUDA >= 12.8 knows Blackwell

INFO_HEADER = "fastcore_train_build_info.h"


class BuildError(RuntimeError):
    """A build that cannot start or failed; the message is one sentence for the user."""


# ---- sources ------------------------------------------------------------------------------------

def csrc_dir() -> str:
    """The C++/CUDA sources: ``fastcore_train/_csrc`` in an installed wheel (setup.py copies
    them there), else ``csrc/`` beside the package (a source checkout, an editable install)."""
    for d in (os.path.join(PACKAGE_DIR, "_csrc"),
              os.path.join(os.path.dirname(PACKAGE_DIR), "csrc")):
        if os.path.isfile(os.path.join(d, "ops.cpp")):
            return d
    raise BuildError("the C++ sources of fastcore_train are not installed (no _csrc/ in the "
                     "package and no csrc/ beside it); reinstall fastcore_train from its sdist "
                     "or a source checkout")


def _files(root: str, pattern: str) -> List[str]:
    return sorted(glob.glob(os.path.join(root, pattern), recursive=True))


def sources(root: str, with_cuda: bool) -> Dict[str, List[str]]:
    """main: compiled once; isa: compiled once per ISA; depends: every header."""
    main = _files(root, "*.cpp") + _files(root, "cpu/*.cpp")
    if with_cuda:
        main += _files(root, "cuda/*.cu")
    return {"main": main, "isa": _files(root, "cpu/kernels/*.cpp"),
            "depends": _files(root, "**/*.h") + _files(root, "**/*.cuh")}


def source_hash(root: str) -> str:
    """Hash of every source file (names and contents): a JIT build is reused only for the same
    sources and the same torch."""
    h = hashlib.sha256()
    for path in sorted(_files(root, "**/*.cpp") + _files(root, "**/*.cu")
                       + _files(root, "**/*.h") + _files(root, "**/*.cuh")):
        h.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


# ---- what a build is made of ------------------------------------------------------------------

def want_cuda() -> bool:
    """CUDA kernels when torch has CUDA and nvcc is found, unless FASTCORE_TRAIN_NO_CUDA=1."""
    if os.environ.get("FASTCORE_TRAIN_NO_CUDA") == "1":
        return False
    import torch
    from torch.utils import cpp_extension
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _cuda_version_tuple(v: Optional[str]):
    try:
        return tuple(int(x) for x in (v or "").split(".")[:2])
    except ValueError:
        return ()


def cuda_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST for this build. Torch derives it from the visible GPUs; without one
    its default path crashes (IndexError in _get_cuda_arch_flags), so we pick a documented list."""
    import torch
    given = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if given:
        return given
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        caps = sorted({torch.cuda.get_device_capability(i)
                       for i in range(torch.cuda.device_count())})
        return ";".join(f"{a}.{b}" for a, b in caps)
    archs = (DEFAULT_CUDA_ARCHS_CU128 if _cuda_version_tuple(torch.version.cuda) >= (12, 8)
             else DEFAULT_CUDA_ARCHS)
    return archs + "+PTX"


def build_info(with_cuda: bool, archs: Optional[str]) -> Dict[str, str]:
    """What the binary records about itself (read back by read_build_info)."""
    import torch
    return {
        "torch": torch.__version__,
        "torch_git": torch.version.git_version or "",
        "cuda": torch.version.cuda if with_cuda else "none",
        "cuda_archs": archs if with_cuda else "none",
        "isas": ",".join(ISA_FLAGS),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def _info_string(info: Dict[str, str]) -> str:
    return MARKER.decode() + "|".join(f"{k}={v}" for k, v in info.items()) + "|END"


def write_info_header(directory: str, info: Dict[str, str]) -> None:
    """Writes the header that csrc/build_info.cpp embeds; untouched when unchanged, so that an
    incremental build does not recompile it."""
    os.makedirs(directory, exist_ok=True)
    text = ("// Generated by fastcore_train/_build.py: what this build was made against.\n"
            f"#define FASTCORE_TRAIN_BUILD_INFO {json.dumps(_info_string(info))}\n")
    path = os.path.join(directory, INFO_HEADER)
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    with open(path, "w") as f:
        f.write(text)


def read_build_info(path: str) -> Optional[Dict[str, str]]:
    """The build info embedded in a built _C, read from the file without loading it (loading a
    build for another torch can crash the process). None when the file has none."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    start = data.find(MARKER)
    if start < 0:
        return None
    end = data.find(b"|END", start)
    if end < 0:
        return None
    body = data[start + len(MARKER):end].decode("utf-8", "replace")
    return dict(kv.split("=", 1) for kv in body.split("|") if "=" in kv)


def _cuda_include_dirs() -> List[str]:
    """Headers of the pip CUDA packages (cuBLAS, cuSPARSE, ...) that torch's CUDA headers
    include; a bare toolkit (CUDA_HOME) may lack them."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for root in spec.submodule_search_locations:
        dirs += sorted(glob.glob(os.path.join(root, "*", "include")))
        dirs += sorted(glob.glob(os.path.join(root, "*", "*", "include")))  # nvidia/cu13/include
    return dirs


def make_extension(root: str, gen_dir: str, rel_to: Optional[str] = None):
    """The setuptools Extension of fastcore_train._C. ``root``: the csrc folder; ``gen_dir``:
    where the build-info header is written; ``rel_to``: make paths relative to it (setup.py)."""
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    with_cuda = want_cuda()
    archs = None
    if with_cuda:
        archs = cuda_arch_list()
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    write_info_header(gen_dir, build_info(with_cuda, archs))
    src = sources(root, with_cuda)

    def rel(paths):
        return [os.path.relpath(p, rel_to) for p in paths] if rel_to else paths

    debug = os.environ.get("FASTCORE_TRAIN_DEBUG") == "1"
    args = {"cxx": CXX_FLAGS + ([] if debug else ["-g0"])}
    cls = CppExtension
    include_dirs = [root, gen_dir]
    if with_cuda:
        cls = CUDAExtension
        args["cxx"].append("-DFASTCORE_TRAIN_WITH_CUDA")
        args["nvcc"] = NVCC_FLAGS + ["-DFASTCORE_TRAIN_WITH_CUDA"]
        include_dirs += _cuda_include_dirs()
    # setuptools relinks only when a file of sources + depends is newer than the library: the
    # per-ISA kernels, every header and the generated one must be among them.
    ext = cls(
        name="fastcore_train._C",
        sources=rel(src["main"]),
        include_dirs=include_dirs,
        depends=rel(src["depends"] + src["isa"]) + [os.path.join(gen_dir, INFO_HEADER)],
        extra_compile_args=args,
        extra_link_args=["-fopenmp"] + ([] if debug else ["-Wl,--strip-debug"]),
    )
    ext.isa_sources = rel(src["isa"])
    return ext


def build_ext_class():
    """torch's BuildExtension, compiling csrc/cpu/kernels/*.cpp once per ISA into their own
    folders and linking them all (at::vec emits SIMD code only in a translation unit built with
    the matching CPU_CAPABILITY macro and -m flags; csrc/cpu/isa.cpp picks one at run time)."""
    from torch.utils.cpp_extension import BuildExtension

    class BuildISAExtension(BuildExtension):
        def build_extension(self, ext):
            kernels = getattr(ext, "isa_sources", [])
            cxx = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) \
                else ext.extra_compile_args
            # the intrinsics headers trip -Wmaybe-uninitialized and -Wpsabi notes by the thousand
            quiet = ["-Wno-maybe-uninitialized", "-Wno-psabi"]
            objects = []
            for isa, flags in ISA_FLAGS.items():
                macros = [("CPU_CAPABILITY", isa), (f"CPU_CAPABILITY_{isa}", None)]
                objects += self.compiler.compile(
                    kernels,
                    output_dir=os.path.join(self.build_temp, f"isa_{isa}"),
                    macros=macros,
                    include_dirs=ext.include_dirs,
                    extra_postargs={"cxx": cxx + flags + quiet, "nvcc": []},
                    depends=ext.depends,
                )
            ext.extra_objects = objects + [o for o in ext.extra_objects if o not in objects]
            super().build_extension(ext)

    return BuildISAExtension.with_options(no_python_abi_suffix=False)


# ---- just-in-time builds into torch's extension cache -----------------------------------------

def cache_root() -> str:
    """Torch's extension cache for this Python and torch flavour, fastcore_train's folder."""
    import torch

    base = os.environ.get("TORCH_EXTENSIONS_DIR") or _default_build_root()
    flavour = "cu" + torch.version.cuda.replace(".", "") if torch.version.cuda else "cpu"
    return os.path.join(base, f"py{sys.version_info.major}{sys.version_info.minor}_{flavour}",
                        "fastcore_train")


def _default_build_root() -> str:
    """torch.utils.cpp_extension.get_default_build_root() without importing cpp_extension at
    `import fastcore_train` (it imports setuptools and, with a CUDA torch, probes for CUDA)."""
    try:
        from torch._appdirs import user_cache_dir
        return os.path.realpath(user_cache_dir(appname="torch_extensions"))
    except ImportError:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        return os.path.realpath(os.path.join(cache, "torch_extensions"))


def cache_key() -> str:
    """One build per (torch, sources): another torch or another fastcore_train version never
    picks up this one."""
    import torch
    tag = re.sub(r"[^A-Za-z0-9.]+", "_", torch.__version__)
    return f"torch-{tag}-{source_hash(csrc_dir())}"


def _so_name() -> str:
    import importlib.machinery
    return "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]


def cached_build() -> Optional[str]:
    """The cached _C built for the running torch and these sources, or None."""
    path = os.path.join(cache_root(), cache_key(), _so_name())
    return path if os.path.isfile(path) else None


def check_toolchain() -> None:
    """Raises BuildError naming what is missing before a build starts."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise BuildError(f"no C++ compiler found (looked for {cxx!r} on PATH; set CXX or install "
                         "g++ >= 9) -- fastcore_train keeps using the pure-torch reference ops")
    if shutil.which("ninja", path=_build_path()) is None:
        raise BuildError("ninja is needed to build the kernels and was not found: "
                         "pip install ninja")
    try:
        import setuptools  # noqa: F401  (torch.utils.cpp_extension builds through it)
    except ImportError:
        raise BuildError("setuptools is needed to build the kernels: pip install setuptools") \
            from None


def _build_path() -> str:
    """PATH for the build: the interpreter's bin folder and the ninja package's first, so that
    `.venv/bin/fastcore-train build` finds the venv's ninja without an activated venv."""
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja  # the PyPI package
        dirs.append(getattr(ninja, "BIN_DIR", ""))
    except ImportError:
        pass
    return os.pathsep.join([d for d in dirs if d] + [os.environ.get("PATH", "")])


class _Lock:
    """An exclusive flock on ``path``: released by the kernel if the holder dies."""

    def __init__(self, path: str, on_wait: Callable[[str], None]):
        self.path, self.on_wait, self.fd = path, on_wait, None

    def __enter__(self):
        import fcntl
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
            self.on_wait(f"waiting for process {holder}, which is building the kernels")
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc):
        import fcntl
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _say(msg: str) -> None:
    print(f"fastcore_train: {msg}", file=sys.stderr, flush=True)


def jit_build(force: bool = False, jobs: Optional[int] = None, verbose: bool = False,
              say: Callable[[str], None] = _say, builder: Optional[Callable] = None) -> str:
    """Builds _C for the running torch into the cache (once: concurrent callers wait for the
    first and reuse its build) and returns its path. Raises BuildError with one sentence when
    the build cannot run or fails (the full log stays in the cache folder).

    ``builder(out_dir, log_path, jobs, verbose, say)`` replaces the compiler run (tests)."""
    import torch
    key_dir = os.path.join(cache_root(), cache_key())
    target = os.path.join(key_dir, _so_name())
    with _Lock(key_dir + ".lock", say):
        if os.path.isfile(target) and not force:
            return target
        if builder is None:
            check_toolchain()
            builder = _compile
        os.makedirs(key_dir, exist_ok=True)
        staging = os.path.join(key_dir, "staging")
        shutil.rmtree(staging, ignore_errors=True)
        log = os.path.join(key_dir, "build.log")
        say(f"building the kernels for torch {torch.__version__} in {key_dir} "
            "(once per torch version; a few minutes)")
        t0 = time.monotonic()
        built = builder(staging, log, jobs, verbose, say)
        # the finished library appears atomically: a process importing meanwhile sees either
        # no build or a whole one
        os.replace(built, target)
        shutil.rmtree(staging, ignore_errors=True)
        say(f"built {target} in {time.monotonic() - t0:.0f} s")
        return target


_STEP = re.compile(r"^\[(\d+)/(\d+)\]\s")


def _compile(out_dir: str, log_path: str, jobs: Optional[int], verbose: bool,
             say: Callable[[str], None]) -> str:
    """Runs this file as a script (setup.py's build_ext against the running torch) and reports
    each compiled file; returns the built library's path."""
    env = dict(os.environ, PATH=_build_path(), PYTHONNOUSERSITE="1")
    env["MAX_JOBS"] = str(jobs or env.get("MAX_JOBS") or os.cpu_count() or 1)
    cmd = [sys.executable, os.path.abspath(__file__), "--csrc", csrc_dir(), "--out", out_dir]
    total = _expected_steps()
    done = 0
    bar = _progress_bar(total)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=os.path.dirname(out_dir) or ".")
        for line in proc.stdout:
            log.write(line)
            if verbose:
                sys.stderr.write(line)
            if _STEP.match(line):
                done += 1
                what = _describe(line)
                if bar is not None:
                    bar.set_postfix_str(what, refresh=False)
                    bar.update(1)
                elif not verbose:
                    say(f"[{min(done, total)}/{total}] {what}")
        code = proc.wait()
    if bar is not None:
        bar.close()
    if code != 0:
        with open(log_path) as f:
            tail = [ln.rstrip() for ln in f.readlines() if ln.strip()][-25:]
        sys.stderr.write("\n".join(tail) + "\n")
        raise BuildError(f"the kernel build failed (exit code {code}); the compiler's output is "
                         f"in {log_path}")
    built = glob.glob(os.path.join(out_dir, "lib", "fastcore_train", "_C*.so"))
    if not built:
        raise BuildError(f"the kernel build produced no library; see {log_path}")
    return built[0]


def _expected_steps() -> int:
    src = sources(csrc_dir(), want_cuda())
    return len(src["main"]) + len(ISA_FLAGS) * len(src["isa"])


def _describe(line: str) -> str:
    m = re.search(r"\s(\S+\.(?:cpp|cu))\s", line)
    if not m:
        return "compiling"
    name = os.path.relpath(m.group(1), csrc_dir()) if m.group(1).startswith("/") else m.group(1)
    isa = re.search(r"isa_([A-Z0-9]+)", line)
    return f"{name} ({isa.group(1).lower()})" if isa else name


def _progress_bar(total: int):
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="fastcore_train: compiling", unit="file", file=sys.stderr)


def _main(argv: List[str]) -> int:
    """The JIT build's subprocess: build_ext of make_extension() into --out."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--csrc", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    from setuptools import setup

    gen = os.path.join(a.out, "gen")
    setup(name="fastcore_train", ext_modules=[make_extension(a.csrc, gen)],
          cmdclass={"build_ext": build_ext_class()},
          script_args=["build_ext", "--build-lib", os.path.join(a.out, "lib"),
                       "--build-temp", os.path.join(a.out, "temp")])
    return 0


if __name__ == "__main__":
    # run as a script, Python put the package folder first on sys.path: its modules (amp, nn,
    # optim, ...) must not shadow top-level ones while torch and setuptools import
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != PACKAGE_DIR]
    sys.exit(_main(sys.argv[1:]))
