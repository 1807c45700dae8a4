"""Builds fastcore_train._C from csrc/ when torch is importable here; the build itself is
defined once, in fastcore_train/_build.py, for setup.py and for `fastcore-train build`.

* `pip install --no-build-isolation .` (and `make`): the extension is built against the torch
  of the environment and ships in the package.
* `pip install .` (build isolation, the default): pip builds in an environment without the
  user's torch. Rather than compile against some other torch, the package installs without
  the extension; `import fastcore_train` then says so in one line and `fastcore-train build`
  builds the kernels against the torch in use (into torch's extension cache).

Either way the C++/CUDA sources ship in the package (fastcore_train/_csrc) for that build.
Knobs: FASTCORE_TRAIN_SKIP_EXT=1 (no extension), FASTCORE_TRAIN_NO_CUDA=1 (CPU kernels only),
TORCH_CUDA_ARCH_LIST, FASTCORE_TRAIN_DEBUG=1 (keep debug info), MAX_JOBS.
"""
import importlib.util
import json
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))

# fastcore_train/_build.py by path: importing the package would import torch and _C
_spec = importlib.util.spec_from_file_location(
    "_fastcore_train_build", os.path.join(ROOT, "fastcore_train", "_build.py"))
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)


def _extension_plan():
    """(ext_modules, cmdclass entries, why) for this build environment."""
    if os.environ.get("FASTCORE_TRAIN_SKIP_EXT") == "1":
        return [], {}, "skipped: FASTCORE_TRAIN_SKIP_EXT=1"
    try:
        import torch  # noqa: F401
    except ImportError:
        return [], {}, "skipped: pip built the package in an isolated environment without torch"
    # one generated-header folder per torch: builds for two torches (the CUDA compile check
    # beside the CPU build) never overwrite each other's
    gen = os.path.join(ROOT, "build", "gen", "torch-" + torch.__version__.replace("+", "_"))
    ext = _build.make_extension(os.path.join(ROOT, "csrc"), gen, rel_to=ROOT)
    return [ext], {"build_ext": _build.build_ext_class()}, "built"


class BuildPyWithSources(build_py):
    """Also puts csrc/ into the package (fastcore_train/_csrc), for `fastcore-train build`, and
    a note of how the extension was handled (shown by `import fastcore_train` when missing)."""

    def run(self):
        super().run()
        if self.editable_mode:
            return
        pkg = os.path.join(self.build_lib, "fastcore_train")
        dst = os.path.join(pkg, "_csrc")
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(os.path.join(ROOT, "csrc"), dst,
                        ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))
        with open(os.path.join(pkg, "_install.json"), "w") as f:
            json.dump({"extension": _WHY}, f)


_EXT, _CMDS, _WHY = _extension_plan()
if not _EXT:
    print(f"fastcore_train: building without the compiled kernels ({_WHY}); "
          "`fastcore-train build` builds them against the installed torch")

setup(ext_modules=_EXT, cmdclass={"build_py": BuildPyWithSources, **_CMDS})
