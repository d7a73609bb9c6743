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

# ruff over the tree; mypy over the typed rooms, through a tree that names them the way
# they are installed (transact.<room>): the editable install maps folders, mypy cannot.
MYPY_ROOT := build/mypy
MYPY_PACKAGES := transact.kernels transact.model transact.serving
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	@rm -rf $(MYPY_ROOT) && mkdir -p $(MYPY_ROOT)/transact
	@for d in data model kernels features validation serving components pipelines monitoring bench; do \
	  ln -s $(CURDIR)/$$d $(MYPY_ROOT)/transact/$$d; done
	@ln -s $(CURDIR)/transact/__init__.py $(CURDIR)/transact/cli.py $(CURDIR)/transact/commands $(MYPY_ROOT)/transact/
	cd $(MYPY_ROOT) && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml $(addprefix -p ,$(MYPY_PACKAGES))

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# On a CUDA machine (no .venv needed: its own python3 with torch + triton): the CUDA tests
# with compiled kernels and the kernel benchmarks, results under bench/results/.
gpu-check:
	PYTHON=$(PYTHON) bench/gpu-check.sh bench/results

clean:
	rm -rf $(VENV) runs build .pytest_cache .hypothesis
