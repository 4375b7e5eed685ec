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

.PHONY: install demo test lint format clean gpu-check

install: $(STAMP)

# Every version is pinned by constraints.txt (the stack the tests and the README's figures were measured with).
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m minima.demo

test: $(STAMP)
	$(PY) -m pytest -q -rs

# On a GPU machine, in one call (< 8 minutes): the GPU smoke test, the KD-loss benchmark and the step benchmark at
# their GPU shapes (MiniMA's 7B -> 3B on one GPU), figures as JSON under runs/gpu-check/.
GPU_OUT ?= runs/gpu-check
gpu-check: $(STAMP)
	@mkdir -p $(GPU_OUT)
	$(PY) -m pytest -q -rs -m gpu --junitxml=$(GPU_OUT)/smoke.xml
	$(PY) tools/bench_kd_loss.py --tokens 8192 --student-hidden 2048 --teacher-hidden 4096 --vocab 128256 \
		--dtype bf16 --device cuda --cases naive,chunked,chunked_compiled --json $(GPU_OUT)/bench_kd_loss.json
	$(PY) tools/bench_distill_step.py --device cuda --ranks 1 --dtype bf16 --cases minima,reference \
		--seq 4096 --micro 2 --accum 2 --vocab 32000 --student 24x3072x8192 --teacher 32x4096x11008 \
		--steps 3 --json $(GPU_OUT)/bench_distill_step.json

lint: $(STAMP)
	$(PY) -m ruff check minima tools tests
	$(PY) -m ruff format --check minima tools tests
	$(VENV)/bin/shellcheck -x slurm/*.sh

format: $(STAMP)
	$(PY) -m ruff format minima tools tests
	$(PY) -m ruff check --fix minima tools tests

clean:
	rm -rf runs .pytest_cache .ruff_cache
