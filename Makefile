# svdkern: `make demo` and `make test` do all the set-up on a fresh machine with python3.
#
# PYTHON=python3 (or any interpreter that already has torch) skips the venv:
#   make test-gpu PYTHON=python3   on a GPU machine that cannot download.
VENV    := .venv
PYTHON  ?= $(VENV)/bin/python
TORCH   ?= torch==2.13.0
# Tests are many small ops: one thread each keeps the subprocess tests (CLI, DDP) from
# oversubscribing the cores.
PYTEST  := OMP_NUM_THREADS=1 $(PYTHON) -m pytest
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp)
export MAX_JOBS ?= 2

.PHONY: demo test test-cpu test-interp test-gpu bench bench-gpu lint install clean

# The backend and every op against the reference, then the whole pipeline on digits.
demo: $(VENV)/.installed
	$(PYTHON) -m svdkern check
	$(PYTHON) -m svdkern train

test: test-cpu test-interp

# The whole CPU suite: C++ kernels, autograd, opcheck, compile, modules, CLI, DDP, resume.
test-cpu: $(VENV)/.installed
	$(PYTEST) -q

# The Triton kernels on CPU tensors through the same ops (TRITON_INTERPRET=1), small shapes.
test-interp: $(VENV)/.installed
	TRITON_INTERPRET=1 SVDKERN_BACKEND=triton $(PYTEST) -q -m interp

# On a GPU machine with torch + triton already installed: build in place, run everything.
test-gpu:
	$(PYTHON) setup.py -q build_ext --inplace
	$(PYTEST) -q

# Benchmarks append to bench/results/*.csv; BENCHMARKS.md is regenerated from them.
bench: $(VENV)/.installed
	$(PYTHON) -m pytest -q bench --benchmark-only -p no:cacheprovider
	$(PYTHON) bench/make_report.py

bench-gpu:
	$(PYTHON) setup.py -q build_ext --inplace
	$(PYTHON) bench/bench_ops_gpu.py
	$(PYTHON) bench/bench_train_gpu.py
	$(PYTHON) bench/make_report.py

lint: $(VENV)/.installed
	$(PYTHON) -m ruff check svdkern tests bench
	$(PYTHON) -m ruff format --check svdkern tests bench

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
	rm -rf build svdkern/_C*.so *.egg-info $(VENV)/.installed
