# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv when missing,
# install torch first (pinned by constraints.txt: peft/bitsandbytes would otherwise pull a CUDA build),
# then the package with its dev extras. Safe to re-run: the install step reruns only when pyproject changes.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.ila-installed
CONSTRAINTS ?= constraints.txt

.PHONY: demo test lint bench clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml $(CONSTRAINTS)
	$(PIP) install -q -c $(CONSTRAINTS) torch
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ila demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(PY) -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks tools

bench: $(STAMP)
	$(PY) benchmarks/ila_cost.py

clean-venv:
	rm -rf $(VENV)
