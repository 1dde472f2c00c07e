# One-liners that set themselves up: `make demo` and `make test` create .venv on first use.
# The demo installs requirements.txt only; the tests add requirements-dev.txt (pytest, torch,
# ruff and import-linter for `make lint`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
DEMO := $(PY) -m byol_jax.main --config=demo --workdir=$(WORKDIR)

.PHONY: demo lint test clean

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

test: lint
	$(PY) -m pytest tests -q -ra --durations=15

clean:
	rm -rf $(VENV) runs
