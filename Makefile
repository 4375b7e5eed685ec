# `make demo` and `make test` do all the set-up on a fresh machine: a virtualenv in the checkout, torch first (the CPU
# wheel where there is no GPU, e.g. torch==2.13.0 from a local wheel), then minima and its dependencies.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.minima-installed
# The virtualenv's tools first: DeepSpeed JIT-builds a C++ op with `ninja`, and a system ninja of another version
# hashes build commands differently, so alternating between the two rebuilds the op (~30 s) every time.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo test lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m minima.demo

test: $(STAMP)
	$(PY) -m pytest -q -rs

lint: $(STAMP)
	$(PY) -m ruff check minima tools tests
	$(PY) -m ruff format --check minima tools tests

format: $(STAMP)
	$(PY) -m ruff format minima tools tests
	$(PY) -m ruff check --fix minima tools tests

clean:
	rm -rf runs .pytest_cache .ruff_cache
