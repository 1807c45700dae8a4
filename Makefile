# make demo | make test | make bench  -- each sets up .venv on first use, then runs.
PYTHON_BOOT ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
EXTRAS      ?= test,bench,demo
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
CSRC        := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: all test demo bench build gpu-check cuda-check sanitize clean help

all: test

help:
	@echo "make test   - build (first time) and run the test suite"
	@echo "make demo   - train the baseline and the fast recipe, print the table"
	@echo "make bench  - run the op benchmarks (pytest-benchmark)"

# torch and the build tools, once per venv (TORCH_SPEC picks another torch)
$(VENV)/.deps:
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)" numpy pybind11 ninja "setuptools>=77" wheel
	@touch $@

# the package, editable; the extension is built in place by the next rule, incrementally
# (build/temp) whenever csrc/ changes
$(VENV)/.installed: $(VENV)/.deps pyproject.toml
	FASTCORE_TRAIN_SKIP_EXT=1 $(PIP) install -q --no-build-isolation -e ".[$(EXTRAS)]"
	@touch $@

$(VENV)/.built: $(VENV)/.installed setup.py $(CSRC)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) setup.py -q build_ext --inplace --build-temp build/temp
	@touch $@

build: $(VENV)/.built

test: build
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

demo: build
	$(VENV)/bin/fastcore-train demo

# twice: torch's allocator switch is read once per process; the tables show torch with
# THP_MEM_ALLOC_ENABLE=1 (the fair baseline) beside torch's default (what users get unset)
BENCH_ARGS := -q benchmarks --benchmark-columns=median,iqr,ops --benchmark-sort=name
bench: build
	rm -f benchmarks/results/*.json
	THP_MEM_ALLOC_ENABLE=1 $(PY) -m pytest $(BENCH_ARGS) $(PYTEST_ARGS)
	env -u THP_MEM_ALLOC_ENABLE $(PY) -m pytest $(BENCH_ARGS) $(PYTEST_ARGS)

# on a GPU machine: build for its GPU, CUDA tests, whole suite, GPU benchmarks (one line and
# exit 0 without a GPU); GPU_PYTHON picks the interpreter whose torch has CUDA (default python3)
gpu-check:
	bash .ci/gpu_check.sh

# compile-check the CUDA sources without a GPU (torch CUDA build from TORCH_CUDA_SPEC)
cuda-check:
	bash .ci/cuda_check.sh

# ASan/UBSan run of the CPU kernels, built with CMakeLists.txt
sanitize: $(VENV)/.deps
	bash .ci/sanitize.sh

clean:
	rm -rf build fastcore_train/*.so *.egg-info $(VENV)/.built
