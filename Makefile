# One-liners that set themselves up: `make demo` and `make test` create .venv on first use.
# The demo installs requirements.txt only; the tests add requirements-dev.txt (pytest, torch,
# ruff and import-linter for `make lint`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
DEMO := $(PY) -m byol_jax.main --config=demo --workdir=$(WORKDIR)

.PHONY: demo lint test test-gpu-compile clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/installed-demo: requirements.txt setup.py | $(PY)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/installed-test: requirements.txt requirements-dev.txt setup.py | $(PY)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# Pretrain, export, then the evidence: BYOL vs random init, and where the files are.
demo: $(VENV)/installed-demo
	$(DEMO)
	$(DEMO) --job=export
	$(DEMO) --job=compare

# ruff for real defects, import-linter for the layers (both configured in pyproject.toml).
lint: $(VENV)/installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# Two pytest workers (pytest-xdist), a test file each at a time: one worker leaves ~40% of two
# cores idle (compiles and Python are single-threaded). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest tests -q -ra --durations=15 -n $(TEST_WORKERS) --dist loadfile

# --job=compile for NVIDIA GPUs, tested with JAX's CUDA plugin (~4.4 GB of NVIDIA wheels) in a
# venv of its own, so CPU runs never load it; no GPU needed. CUDA_VENV=/path reuses one.
# jax[cuda12] pins the plugin to the jax it installs.
CUDA_VENV ?= .venv-cuda
$(CUDA_VENV)/installed-cuda: requirements.txt setup.py
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install -q -r requirements.txt "pytest>=8.0" "jax[cuda12]"
	$(CUDA_VENV)/bin/pip install -q --no-deps -e .
	touch $@

test-gpu-compile: $(CUDA_VENV)/installed-cuda
	JAX_PLATFORMS=cpu $(CUDA_VENV)/bin/python -m pytest tests/test_compile_gpu.py -q -ra --durations=5

clean:
	rm -rf $(VENV) $(CUDA_VENV) runs
