"""How the extension is found, checked and built: the build info embedded in _C, refusal of a build
made for another torch (before loading it), the JIT cache, its lock, and the one-sentence errors
of `fastcore-train build`. The full sdist -> wheel -> fresh venv path and a real JIT build run in
CI (.ci/install_check.sh); here nothing is compiled."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from fastcore_train import _backend, _build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SO_NAME = _build._so_name()


def _run(code, cwd, env_extra=None, timeout=120):
    env = dict(os.environ)
    env.pop("FASTCORE_TRAIN_BACKEND", None)
    env.pop("FASTCORE_TRAIN_JIT", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _package_copy(tmp_path, with_sources=True):
    """A copy of the Python package without any _C, importable from tmp_path (the cwd of the
    subprocess comes first on sys.path, before the editable install)."""
    shutil.copytree(os.path.join(ROOT, "fastcore_train"), tmp_path / "fastcore_train",
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__", "_install.json"))
    if with_sources:
        os.symlink(os.path.join(ROOT, "csrc"), tmp_path / "csrc")
    return tmp_path / "fastcore_train"


def _fake_build(path, torch_version):
    """A file that carries a build-info record but is no library: if the loader tried to load
    it, the reason would be an ELF error, not the version."""
    info = dict(_build.build_info(False, None), torch=torch_version)
    path.write_bytes(b"\x7fELF not a library " + _build._info_string(info).encode() + b"\0")


PROBE = """
    import warnings
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        import fastcore_train as ft
        from fastcore_train import _backend
    print(ft.backend())
    print(ft.backend_reason())
    print(len([x for x in w if issubclass(x.category, _backend.ExtensionUnavailableWarning)]))
    print(" ".join(str(x.message) for x in w).replace(chr(10), " "))
"""


def _probe(tmp_path, ext_dir):
    r = _run(PROBE, cwd=tmp_path, env_extra={"TORCH_EXTENSIONS_DIR": str(ext_dir)})
    assert r.returncode == 0, r.stderr
    backend, reason, n_warnings, message = r.stdout.splitlines()[:4]
    return backend, reason, int(n_warnings), message


# ---- the record in the binary -----------------------------------------------------------------

def test_loaded_build_records_the_running_torch(extension):
    info = _build.read_build_info(_backend._C_path)
    assert info is not None, "no build info in the loaded library"
    assert info["torch"] == torch.__version__
    assert info["torch_git"] == (torch.version.git_version or "")
    assert info["isas"] == ",".join(_build.ISA_FLAGS)
    # the record read from the file is the one compiled in
    assert _backend.build_info() == info
    assert f"torch {torch.__version__}" in _backend.built_against()


def test_info_command_names_the_torch_it_was_built_against(extension):
    r = subprocess.run([sys.executable, "-m", "fastcore_train.cli", "info"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("built against")]
    assert line and f"torch {torch.__version__}" in line[0]


def test_read_build_info_of_files_without_one(tmp_path):
    p = tmp_path / "x.so"
    p.write_bytes(b"\x7fELF nothing here")
    assert _build.read_build_info(str(p)) is None
    assert _build.read_build_info(str(tmp_path / "missing.so")) is None


# ---- choosing a build -------------------------------------------------------------------------

def test_a_build_for_another_torch_is_refused_before_loading(tmp_path):
    pkg = _package_copy(tmp_path)
    _fake_build(pkg / SO_NAME, "0.0.1+other")
    backend, reason, n, message = _probe(tmp_path, tmp_path / "empty_cache")
    assert backend == "reference"
    assert "built against torch 0.0.1+other" in reason
    assert f"torch {torch.__version__} is running" in reason
    assert n == 1, "exactly one warning"
    assert "fastcore-train build" in message and "\n" not in message


def test_no_build_at_all_says_how_to_build(tmp_path):
    _package_copy(tmp_path)
    backend, reason, n, message = _probe(tmp_path, tmp_path / "empty_cache")
    assert backend == "reference"
    assert f"no compiled kernels are built for torch {torch.__version__}" in reason
    assert n == 1 and "fastcore-train build" in message


def test_install_note_explains_a_wheel_built_without_torch(tmp_path):
    pkg = _package_copy(tmp_path)
    (pkg / "_install.json").write_text(
        '{"extension": "skipped: pip built the package in an isolated environment without torch"}')
    backend, reason, _, message = _probe(tmp_path, tmp_path / "empty_cache")
    assert backend == "reference"
    assert "isolated environment without torch" in reason
    assert "--no-build-isolation" in message


def _cache_path(tmp_path, ext_dir):
    r = _run("from fastcore_train import _build; print(_build.cache_root()); "
             "print(_build.cache_key())", cwd=tmp_path,
             env_extra={"TORCH_EXTENSIONS_DIR": str(ext_dir)})
    assert r.returncode == 0, r.stderr
    root, key = r.stdout.split()[:2]
    return os.path.join(root, key, SO_NAME)


def test_the_cached_build_is_used_when_the_package_has_none_for_this_torch(tmp_path, extension):
    pkg = _package_copy(tmp_path)
    _fake_build(pkg / SO_NAME, "0.0.1+other")
    ext_dir = tmp_path / "ext"
    target = _cache_path(tmp_path, ext_dir)
    os.makedirs(os.path.dirname(target))
    shutil.copy(_backend._C_path, target)
    backend, reason, n, _ = _probe(tmp_path, ext_dir)
    assert backend == "extension"
    assert target in reason
    assert n == 0


def test_a_cached_build_for_other_sources_is_not_used(tmp_path, extension):
    """The cache key hashes the sources: editing csrc/ (or another fastcore_train version)
    must not pick up an old build."""
    _package_copy(tmp_path, with_sources=False)
    shutil.copytree(os.path.join(ROOT, "csrc"), tmp_path / "csrc")
    ext_dir = tmp_path / "ext"
    target = _cache_path(tmp_path, ext_dir)
    os.makedirs(os.path.dirname(target))
    shutil.copy(_backend._C_path, target)
    with open(tmp_path / "csrc" / "ops.cpp", "a") as f:
        f.write("\n// edited\n")
    assert _cache_path(tmp_path, ext_dir) != target
    backend, _, _, _ = _probe(tmp_path, ext_dir)
    assert backend == "reference"


# ---- the JIT build: lock, errors ---------------------------------------------------------------

JIT_WORKER = """
    import os, sys, time
    from fastcore_train import _build

    def fake_builder(out_dir, log, jobs, verbose, say):
        # stands for the compiler: slow enough for the other process to arrive meanwhile
        with open(os.environ["BUILDS_LOG"], "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(1.5)
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "built.so")
        with open(path, "w") as f:
            f.write("library")
        return path

    print(_build.jit_build(builder=fake_builder, say=lambda m: print("SAY", m)))
"""


def test_concurrent_jit_builds_build_once(tmp_path):
    _package_copy(tmp_path)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"),
               BUILDS_LOG=str(tmp_path / "builds.log"), FASTCORE_TRAIN_BACKEND="reference")
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(JIT_WORKER)], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    builds = (tmp_path / "builds.log").read_text().split()
    assert len(builds) == 1, f"built {len(builds)} times"
    paths = [[ln for ln in out.splitlines() if not ln.startswith("SAY")][-1] for out, _ in outs]
    assert paths[0] == paths[1] and os.path.isfile(paths[0])
    assert open(paths[0]).read() == "library"
    waited = [out for out, _ in outs if "waiting for process" in out]
    assert len(waited) == 1, "the second process says it waits for the first"


def test_jit_build_reuses_an_existing_build_unless_forced(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    calls = []

    def builder(out_dir, log, jobs, verbose, say):
        calls.append(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "x.so")
        open(path, "w").write(str(len(calls)))
        return path

    quiet = lambda msg: None  # noqa: E731
    first = _build.jit_build(builder=builder, say=quiet)
    assert _build.jit_build(builder=builder, say=quiet) == first and len(calls) == 1
    assert _build.cached_build() == first
    _build.jit_build(builder=builder, say=quiet, force=True)
    assert len(calls) == 2 and open(first).read() == "2"


def test_no_compiler_is_one_sentence(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(_build.BuildError, match=r"no C\+\+ compiler found .*/nonexistent/c\+\+"):
        _build.check_toolchain()


def test_no_ninja_is_one_sentence(monkeypatch, tmp_path):
    monkeypatch.setattr(_build, "_build_path", lambda: str(tmp_path))
    if shutil.which(os.environ.get("CXX", "c++"), path=str(tmp_path)) is None:
        monkeypatch.setenv("CXX", shutil.which("c++") or "c++")
    with pytest.raises(_build.BuildError, match="ninja is needed to build the kernels"):
        _build.check_toolchain()


def test_build_command_without_a_compiler_exits_2_with_one_line(tmp_path):
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "CXX": "/nonexistent/c++"}
    r = _run("import sys; from fastcore_train.cli import main; "
             "sys.exit(main(['build', '--force']))", cwd=ROOT, env_extra=env)
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("fastcore-train build: error:")]
    assert len(errors) == 1 and "no C++ compiler found" in errors[0]
    assert "Traceback" not in r.stderr


def test_missing_sources_is_one_sentence(monkeypatch, tmp_path):
    monkeypatch.setattr(_build, "PACKAGE_DIR", str(tmp_path / "pkg"))
    with pytest.raises(_build.BuildError, match="C\\+\\+ sources of fastcore_train are not "
                                                "installed"):
        _build.csrc_dir()


# ---- CUDA arch list without a GPU -------------------------------------------------------------

@pytest.mark.parametrize("cuda,expected", [("13.0", "8.0;9.0;10.0;12.0+PTX"),
                                           ("12.8", "8.0;9.0;10.0;12.0+PTX"),
                                           ("12.4", "8.0;9.0+PTX")])
def test_default_cuda_archs_without_a_gpu(monkeypatch, cuda, expected):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _build.cuda_arch_list() == expected


def test_given_cuda_archs_win(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert _build.cuda_arch_list() == "9.0"


# ---- what ships ------------------------------------------------------------------------------

def test_manifest_ships_every_source_kind():
    text = open(os.path.join(ROOT, "MANIFEST.in")).read()
    for pattern in ("*.cpp", "*.h", "*.cu", "*.cuh", "LICENSE"):
        assert pattern in text
    assert os.path.isfile(os.path.join(ROOT, "LICENSE"))
    assert "Apache License" in open(os.path.join(ROOT, "LICENSE")).read()


def test_cache_root_is_torchs_extension_dir(monkeypatch):
    from torch.utils.cpp_extension import get_default_build_root
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert _build.cache_root().startswith(get_default_build_root() + os.sep)


def test_import_does_not_load_cpp_extension(tmp_path):
    """torch.utils.cpp_extension imports setuptools and probes CUDA: not at import time."""
    _package_copy(tmp_path)
    r = _run("import sys, fastcore_train; "
             "print('torch.utils.cpp_extension' in sys.modules)", cwd=tmp_path,
             env_extra={"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("env, want", [(None, "on, at most"), ("0", "off (FASTCORE_TRAIN_CACHE_MB=0)"),
                                       ("512", "on, at most 512 MiB")])
def test_info_says_whether_the_output_cache_is_on(extension, monkeypatch, env, want):
    from fastcore_train import cli
    if env is None:
        monkeypatch.delenv("FASTCORE_TRAIN_CACHE_MB", raising=False)
    else:
        monkeypatch.setenv("FASTCORE_TRAIN_CACHE_MB", env)
    line = cli._cache_line({"cached_bytes": 0, "cache_limit_bytes": 0})
    assert line.startswith(want), line
