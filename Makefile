# One-liners that set themselves up: `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: demo test bench clean

$(VENV)/installed: requirements.txt requirements-dev.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: $(VENV)/installed
	$(PY) -m byol_jax.main --config=demo --workdir=$(WORKDIR)
	$(PY) -m byol_jax.main --config=demo --workdir=$(WORKDIR) --job=linear_eval
	$(PY) -m byol_jax.main --config=demo --workdir=$(WORKDIR) --job=export

test: $(VENV)/installed
	$(PY) -m pytest tests -q -ra --durations=15

clean:
	rm -rf $(VENV) runs
