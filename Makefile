# Two commands do everything on a fresh machine:
#   make demo   creates the environment, installs, runs the pipeline on the embedded default
#   make test   creates the environment if needed and runs every test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint env clean gpu-check

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# CPU torch first, from the wheel on disk: otherwise pip resolves a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/transact demo --out $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff over the tree; mypy over the whole package and lint-imports (the rooms contract in
# pyproject.toml), both from the repository root: `transact/<room>` links every room into the
# package, so no install step or link tree is needed for them to see `transact.<room>`.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# On a CUDA machine (no .venv needed: its own python3 with torch + triton): the CUDA tests
# with compiled kernels and the kernel benchmarks, results under bench/results/.
gpu-check:
	PYTHON=$(PYTHON) bench/gpu-check.sh bench/results

clean:
	rm -rf $(VENV) runs build .pytest_cache .hypothesis .mypy_cache .import_linter_cache
