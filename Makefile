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

.PHONY: demo test test-fast lint env clean gpu-check image image-push

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

# The container image the Kubeflow steps run (Containerfile; docs/image.md): `make image`
# builds $(IMAGE):$(VERSION), `make image-push REGISTRY=ghcr.io/transact-v2` tags and pushes
# $(REGISTRY)/$(IMAGE):$(VERSION). The version is pyproject.toml's. The builder: docker when
# its engine answers, else buildah, else podman (BUILDER=... picks one; BUILDER_FLAGS go
# before its subcommand, e.g. BUILDER_FLAGS="--storage-driver vfs"). IMAGE_BUILD_ARGS go to
# the build: the CUDA image, for one, is
#   make image IMAGE_BUILD_ARGS='--build-arg TORCH_INDEX_URL= --build-arg EXTRA_APT_PACKAGES="gcc libc6-dev"'
IMAGE ?= transact
VERSION := $(shell grep -m1 -E '^version *= *"' pyproject.toml | cut -d'"' -f2)
REGISTRY ?=
BUILDER ?=
BUILDER_FLAGS ?=
IMAGE_BUILD_ARGS ?=
FIND_BUILDER = builder="$(BUILDER)"; \
	if [ -z "$$builder" ]; then \
	  if command -v docker >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1; then builder=docker; \
	  elif command -v buildah >/dev/null 2>&1; then builder=buildah; \
	  elif command -v podman >/dev/null 2>&1; then builder=podman; \
	  else echo "no image builder: install buildah or podman, or start docker's engine" >&2; exit 2; fi; \
	fi

image:
	@test -n "$(VERSION)" || { echo "no version = \"...\" line in pyproject.toml" >&2; exit 2; }
	@$(FIND_BUILDER); \
	case "$$builder" in buildah) build=bud;; *) build=build;; esac; \
	set -x; \
	$$builder $(BUILDER_FLAGS) $$build -f Containerfile -t $(IMAGE):$(VERSION) \
	  --build-arg VERSION=$(VERSION) $(IMAGE_BUILD_ARGS) .

image-push:
	@test -n "$(REGISTRY)" || { echo "make image-push needs REGISTRY=<registry/namespace>, e.g. REGISTRY=ghcr.io/transact-v2" >&2; exit 2; }
	@$(FIND_BUILDER); \
	set -x; \
	$$builder $(BUILDER_FLAGS) tag $(IMAGE):$(VERSION) $(REGISTRY)/$(IMAGE):$(VERSION) && \
	$$builder $(BUILDER_FLAGS) push $(REGISTRY)/$(IMAGE):$(VERSION)
