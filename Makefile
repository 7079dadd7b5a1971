# svdkern: `make demo` and `make test` do all the set-up on a fresh machine with python3.
#
# PYTHON=python3 (or any interpreter that already has torch) skips the venv:
#   make gpu-test PYTHON=python3   on a GPU machine that cannot download.
SHELL   := /bin/bash
VENV    := .venv
PYTHON  ?= $(VENV)/bin/python
TORCH   ?= torch==2.13.0
# Tests are many small ops: one thread each keeps the subprocess tests (CLI, DDP) from
# oversubscribing the cores.
PYTEST  := OMP_NUM_THREADS=1 $(PYTHON) -m pytest
# The suites run in parallel processes (pytest-xdist), one per core (`make test JOBS=1`: one
# process), and list their slowest tests.
JOBS    ?= $(shell nproc 2>/dev/null || echo 2)
XDIST   := -n $(JOBS) --durations=15
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp)
export MAX_JOBS ?= 2

# The oldest supported stack (pyproject.toml: torch >= 2.11, triton >= 3.6), in its own venv
# and its own copy of the tree: each torch needs its own build of svdkern/_C*.so, so the
# compat build never touches the one in svdkern/. Both folders ignore themselves.
COMPAT_VENV   := .venv-compat
COMPAT_DIR    := .compat
COMPAT_SRC    := $(COMPAT_DIR)/src
COMPAT_PY     := $(CURDIR)/$(COMPAT_VENV)/bin/python
# numpy < 2.4: triton 3.6's interpreter fails with numpy >= 2.4 (a range() over a runtime
# scalar raises "only 0-dimensional arrays can be converted to Python scalars"; fixed in
# later triton). Also the dev and train extras of pyproject.toml (ruff aside).
COMPAT_PKGS   := torch==2.11.0 triton==3.6.0 "numpy<2.4" setuptools wheel \
                 pytest pytest-benchmark pytest-xdist hypothesis "transformers>=5.0,<6" \
                 accelerate scikit-learn matplotlib tqdm onnxruntime onnx onnxscript
# One stamp per package list: an existing venv gets the packages added to the list (a pip
# install of what is missing, seconds) instead of being rebuilt.
COMPAT_STAMP  := $(COMPAT_VENV)/.pkgs-$(shell printf '%s' '$(COMPAT_PKGS)' | sha1sum | cut -c1-12)
# Python 3.12 when this machine has one, else python3.
COMPAT_PYTHON ?= $(shell for p in python3.12 $(wildcard /root/.pyenv/versions/3.12*/bin/python3.12); \
                   do $$p -c "" 2>/dev/null && { echo $$p; break; }; done)
# Compiled Triton kernels of `make kernel-check` persist here between runs (CI points it
# outside its fresh clone, so an unchanged kernel is compiled once per machine).
KERNEL_CACHE  ?= $(CURDIR)/$(COMPAT_DIR)/triton-cache

.PHONY: demo test test-full test-cpu test-interp test-compat kernel-check gpu-check gpu-prebuilt gpu-cache \
        gpu-test gpu-bench test-gpu bench-gpu bench lint install clean compat-build mutants

# The backend and every op against the reference, then the whole pipeline on digits.
demo: $(VENV)/.installed
	$(PYTHON) -m svdkern check
	$(PYTHON) -m svdkern train

test: test-cpu test-interp

# The same, with every property test's whole hypothesis budget (`make test` runs a third of
# it; tests/conftest.py `budget`): a longer, nightly-style run.
test-full:
	SVDKERN_FULL_HYPOTHESIS=1 $(MAKE) test

# The whole CPU suite: C++ kernels, autograd, opcheck, compile, modules, CLI, DDP, resume.
# SVDKERN_REQUIRE_DEV: the dev dependencies (transformers) are installed here, so a test
# module needing one fails rather than skips when it is missing.
test-cpu: $(VENV)/.installed
	SVDKERN_REQUIRE_DEV=1 $(PYTEST) -q $(XDIST)

# The Triton kernels on CPU tensors through the same ops (TRITON_INTERPRET=1), small shapes.
test-interp: $(VENV)/.installed
	TRITON_INTERPRET=1 SVDKERN_BACKEND=triton $(PYTEST) -q -m interp $(XDIST)

# The CPU and interpreter suites on the oldest supported stack (Python 3.12, torch 2.11.0,
# triton 3.6.0). Skipped (a stamp) when nothing in the tree changed since it last passed.
test-compat: compat-build
	@hash=$$(cd $(COMPAT_SRC) && xargs -d '\n' sha1sum < .synced | sha1sum | cut -c1-16); \
	if [ -f $(COMPAT_DIR)/.passed-$$hash ]; then \
		echo "test-compat: this tree already passed ($(COMPAT_DIR)/.passed-$$hash)"; exit 0; fi; \
	cd $(COMPAT_SRC) && \
	SVDKERN_REQUIRE_DEV=1 OMP_NUM_THREADS=1 $(COMPAT_PY) -m pytest -q -p no:cacheprovider \
		$(XDIST) && \
	TRITON_INTERPRET=1 SVDKERN_BACKEND=triton OMP_NUM_THREADS=1 \
		$(COMPAT_PY) -m pytest -q -p no:cacheprovider -m interp $(XDIST) \
		-W "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning" && \
	rm -f ../.passed-* && touch ../.passed-$$hash

# Every Triton kernel variant the launchers' autotuners would keep for a fixed list of
# realistic shapes, compiled for sm_90 with triton 3.6's own ptxas (no GPU needed); fails on
# shared memory over the H100's limit, spills in bf16 hot kernels, bf16 tiles without wgmma.
# Writes bench/results/kernels_sm90.md, with the compiles each GPU run needs (gpu-check's
# tests and benchmarks, gpu-test, gpu-bench; `tools/kernel_check.py --count` prints only those).
kernel-check: compat-build
	cd $(COMPAT_SRC) && TRITON_CACHE_DIR=$(KERNEL_CACHE) $(COMPAT_PY) tools/kernel_check.py \
		--report $(CURDIR)/bench/results/kernels_sm90.md

# The venv of the oldest supported stack (~5 GB: torch 2.11.0 exists here as a CUDA build
# only; it imports and runs on CPU).
$(COMPAT_VENV)/.installed:
	@if [ -z "$(COMPAT_PYTHON)" ]; then \
		echo "test-compat: no python3.12 found; using python3 ($$(python3 --version))"; fi
	$(or $(COMPAT_PYTHON),python3) -m venv $(COMPAT_VENV)
	@echo '*' > $(COMPAT_VENV)/.gitignore
	@touch $@

$(COMPAT_STAMP): $(COMPAT_VENV)/.installed
	set -o pipefail; $(COMPAT_VENV)/bin/pip install -q $(COMPAT_PKGS) 2>&1 | \
		{ grep -v "is ignored: it is neither a file nor a directory" || true; }
	@rm -f $(COMPAT_VENV)/.pkgs-* && touch $@

# The tree (tracked and new files, as git sees them) mirrored into $(COMPAT_SRC), and the
# extension built there in place against torch 2.11 (again only when a source changed).
compat-build: $(COMPAT_STAMP)
	@mkdir -p $(COMPAT_SRC) && echo '*' > $(COMPAT_DIR)/.gitignore
	$(COMPAT_PY) tools/sync_tree.py $(COMPAT_SRC)
	cd $(COMPAT_SRC) && $(COMPAT_PY) setup.py -q build_ext --inplace

# gpu-check: the GPU check in under 5 minutes on a bare H100 machine (tools/gpu_check.py): the
# extension (reused when a prebuilt one of these sources imports, else built with ninja on
# every core) while the kernels compile into triton's cache in parallel; then the ops on CUDA
# against the reference (pytest-xdist, SVDKERN_AUTOTUNE=0) beside a ResNet-20 run against the
# reference path, the headline benchmarks, the remaining GPU tests until a 280 s deadline.
# A line per result; gpu_check.{log,json,md} in $OUT if set, else bench/results/. Exit status
# 2 at once without a CUDA device.
GPU_JOBS ?= $(shell nproc 2>/dev/null || echo 16)
gpu-check:
	$(PYTHON) tools/gpu_check.py --jobs $(GPU_JOBS)

# A prebuilt extension for the GPU machine's stack (Python 3.12, torch 2.11), from the compat
# build, debug info stripped, with the stamp of its sources (build/svdkern_C.sources): carry
# both with the tree and gpu-check imports it instead of building (~3 s instead of ~40 s).
gpu-prebuilt: compat-build
	for so in $(COMPAT_SRC)/svdkern/_C.cpython-*.so; do \
		strip --strip-debug -o svdkern/$$(basename $$so) $$so; done
	$(COMPAT_PY) tools/gpu_check.py --stamp

# The kernels gpu-check compiles, compiled here for sm_90 with the GPU machine's triton (3.6,
# .venv-compat), binaries only (~22 MB): carry .compat/gpu-triton-cache and gpu-check seeds
# triton's cache with it; the hits it reports say whether the keys matched there.
GPU_CACHE := $(COMPAT_DIR)/gpu-triton-cache
gpu-cache: $(COMPAT_STAMP)
	rm -rf $(GPU_CACHE)
	for cases in gpu-check gpu-check-bench; do \
		TRITON_CACHE_DIR=$(CURDIR)/$(GPU_CACHE) TRITON_STORE_BINARY_ONLY=1 \
			$(COMPAT_PY) tools/kernel_check.py --warm $$cases --jobs $(MAX_JOBS) || exit 1; done
	du -sh $(GPU_CACHE)

# On a GPU machine with torch + triton already installed (no download, no ninja needed),
# each designed to fit one 10-minute call on an H100 (estimates: bench/results/kernels_sm90.md
# counts the compiles, ~1-2 s each; the extension builds in ~1-2 min without ninja).
# gpu-test: first the `cuda` tests and the kernel tests on the GPU, each kernel at one fixed
# config (SVDKERN_AUTOTUNE=0: ~155 compiles, 2.5-5 min), then the rest of the suite (CPU,
# ~2 min) if the GPU part took under 5 min.
# Log: bench/results/gpu_test_<date>.log.
GPU_LOG := bench/results/gpu_test_$(shell date -u +%Y%m%d-%H%M).log
gpu-test:
	$(PYTHON) setup.py -q build_ext --inplace
	@mkdir -p bench/results
	set -o pipefail; { SVDKERN_AUTOTUNE=0 $(PYTEST) -q -p no:cacheprovider -m "cuda or interp"; \
		gpu=$$?; rest=0; \
		if [ $$SECONDS -lt 300 ]; then \
			$(PYTEST) -q -p no:cacheprovider -m "not cuda and not interp"; rest=$$?; \
		else echo "gpu-test: $$SECONDS s spent; the CPU part is left to make test"; fi; \
		exit $$(( gpu > rest ? gpu : rest )); } 2>&1 | tee $(GPU_LOG)

# gpu-bench: autotuned op and training-step benchmarks (bf16, the targets' shapes first)
# → bench/results/*.csv, then BENCHMARKS.md. ~200 compiles and ~400 autotune timings over
# every case; each script starts no new case once its budget is spent, so the call stays
# near build (1-2 min) + 100 s + 130 s + one case each past its budget (≤ 8 min).
gpu-bench:
	$(PYTHON) setup.py -q build_ext --inplace
	$(PYTHON) bench/bench_ops_gpu.py --modes forward full --budget-s 100
	$(PYTHON) bench/bench_train_gpu.py --dtype bf16 --budget-s 130
	$(PYTHON) bench/make_report.py

test-gpu: gpu-test
bench-gpu: gpu-bench

# Benchmarks append to bench/results/*.csv; BENCHMARKS.md is regenerated from them.
bench: $(VENV)/.installed
	$(PYTHON) -m pytest -q bench --benchmark-only -p no:cacheprovider
	$(PYTHON) bench/make_report.py

# Mutation check (not in CI, ~30 min on 2 cores): plants each bug of tools/mutants.toml in a
# copy of the tree, one at a time, runs the tests named for it; fails if one survives.
mutants: $(VENV)/.installed
	$(PYTHON) tools/mutants.py

lint: $(VENV)/.installed
	$(PYTHON) -m ruff check svdkern tests bench tools
	$(PYTHON) -m ruff format --check svdkern tests bench tools

install: $(VENV)/.installed

# Create the venv when missing; keep a torch that is already importable (the venv then
# sees the system site-packages), otherwise install $(TORCH) (a local CPU wheel here).
$(VENV)/bin/python:
	@if python3 -c "import torch" 2>/dev/null; then \
		python3 -m venv --system-site-packages $(VENV); \
	else \
		python3 -m venv $(VENV) && $(VENV)/bin/pip install -q --upgrade pip && \
		$(VENV)/bin/pip install -q "$(TORCH)"; \
	fi

# The project itself, built against the torch above (no build isolation, so pip never
# fetches another torch), editable so the extension lands in svdkern/.
$(VENV)/.installed: $(VENV)/bin/python $(SOURCES)
	$(VENV)/bin/pip install -q setuptools wheel ninja
	$(VENV)/bin/pip install -q --no-build-isolation -e ".[dev,train]"
	@touch $@

clean:
	rm -rf build svdkern/_C*.so *.egg-info $(VENV)/.installed $(COMPAT_DIR)
