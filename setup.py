"""Builds fastcore_train._C from csrc/.

CPU kernels under csrc/cpu/kernels/ are compiled once per instruction set (DEFAULT, AVX2,
AVX512) and the best one the CPU supports is picked at run time (csrc/cpu/isa.cpp): at::vec
only emits SIMD code in a translation unit built with the matching CPU_CAPABILITY macro and
-m flags. CUDA sources are added when torch has CUDA and nvcc is found.
"""
import glob
import os

from setuptools import setup
from torch.utils import cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))

# Order matters: DEFAULT is linked first so that the linker keeps its copies of inline
# functions shared through torch headers (never an AVX-512 encoding on a CPU without it).
ISA_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}
# the C++ standard is the one torch asks for (17 or 20); torch's headers carry pragmas GCC
# does not know (#pragma unroll, clang diagnostics), a warning per include otherwise
CXX_FLAGS = ["-O3", "-fopenmp", "-Wno-unknown-pragmas"]
# No --use_fast_math: it flushes denormals and approximates division and sqrt, and the
# optimizer must match torch (and our CPU kernels) on every value, as torch's own kernels do.
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT)
                  for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _cuda_include_dirs():
    """Headers of the pip CUDA packages (cuBLAS, cuSPARSE, ...) that torch's CUDA headers
    include; a bare toolkit (CUDA_HOME) may lack them."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for root in spec.submodule_search_locations:
        dirs += sorted(glob.glob(os.path.join(root, "*", "include")))
    return dirs


def _want_cuda():
    if os.environ.get("FASTCORE_TRAIN_NO_CUDA") == "1":
        return False
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


class BuildISAExtension(BuildExtension):
    """Compiles csrc/cpu/kernels/*.cpp once per ISA into their own folder, then links them all."""

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


def make_extension():
    sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
    isa_sources = _rel("csrc/cpu/kernels/*.cpp")
    # setuptools relinks only when a file of sources + depends is newer than the library: the
    # per-ISA kernels and every header (kernels/ included) must be among them.
    depends = _rel("csrc/**/*.h") + _rel("csrc/**/*.cuh") + isa_sources
    with_cuda = _want_cuda()
    cls = CppExtension
    args = {"cxx": list(CXX_FLAGS)}
    if with_cuda:
        cls = CUDAExtension
        sources += _rel("csrc/cuda/*.cu")
        args["cxx"].append("-DFASTCORE_TRAIN_WITH_CUDA")
        args["nvcc"] = NVCC_FLAGS + ["-DFASTCORE_TRAIN_WITH_CUDA"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        include_dirs += _cuda_include_dirs()
    ext = cls(
        name="fastcore_train._C",
        sources=sources,
        include_dirs=include_dirs,
        depends=depends,
        extra_compile_args=args,
        extra_link_args=["-fopenmp"],
    )
    ext.isa_sources = isa_sources
    return ext


# `make` installs the package editable without the extension and then builds it in place with
# build_ext (incremental, in build/temp); a plain `pip install .` builds it as usual.
_skip_ext = os.environ.get("FASTCORE_TRAIN_SKIP_EXT") == "1"

setup(
    ext_modules=[] if _skip_ext else [make_extension()],
    cmdclass={"build_ext": BuildISAExtension.with_options(no_python_abi_suffix=False)},
)
