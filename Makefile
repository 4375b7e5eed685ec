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

.PHONY: install demo test lint format clean gpu-check wheelhouse

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
# On a node whose python already holds a CUDA torch and the rest (see `wheelhouse`), skip the virtualenv:
#   make gpu-check PY=python3 SETUP=
GPU_OUT ?= runs/gpu-check
SETUP ?= $(STAMP)
IN_CHECKOUT := PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PY)
gpu-check: $(SETUP)
	@mkdir -p $(GPU_OUT)
	$(IN_CHECKOUT) -m pytest -q -rs -m gpu --junitxml=$(GPU_OUT)/smoke.xml
	$(IN_CHECKOUT) tools/bench_kd_loss.py --tokens 8192 \
		--student-hidden 2048 --teacher-hidden 4096 --vocab 128256 \
		--dtype bf16 --device cuda --cases naive,chunked,chunked_compiled --json $(GPU_OUT)/bench_kd_loss.json
	$(IN_CHECKOUT) tools/bench_distill_step.py --device cuda --ranks 1 \
		--dtype bf16 --cases minima,reference \
		--seq 4096 --micro 2 --accum 2 --vocab 32000 --student 24x3072x8192 --teacher 32x4096x11008 \
		--steps 3 --json $(GPU_OUT)/bench_distill_step.json

# GPU nodes without a package index, whose image holds a CUDA torch, numpy, pyarrow, pandas, tokenizers,
# huggingface_hub, tensorboard and the like: the wheels of minima's other dependencies, at constraints.txt's versions,
# for that node's Python (WHEEL_PYTHON), into .whl/ (WHEELHOUSE). Copy them over with the checkout, then there:
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site make gpu-check PY=python3 SETUP=
# (deepspeed is an sdist: it builds as a pure-Python wheel; its ops are JIT-built on the node.)
WHEEL_PYTHON ?= 3.12
WHEELHOUSE ?= .whl
WHEEL_PLATFORMS := $(foreach p,manylinux_2_28 manylinux_2_17 manylinux2014,--platform $(p)_x86_64)
OFFLINE_WHEELS := transformers datasets dill multiprocess zstandard sentencepiece hjson pydantic pydantic_core \
	annotated-types typing-inspection
wheelhouse: $(STAMP)
	@mkdir -p $(WHEELHOUSE)
	$(PY) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -c constraints.txt \
		--python-version $(WHEEL_PYTHON) --implementation cp $(WHEEL_PLATFORMS) -d $(WHEELHOUSE) $(OFFLINE_WHEELS)
	$(PY) -m pip wheel --quiet --disable-pip-version-check --no-deps -c constraints.txt -w $(WHEELHOUSE) deepspeed

lint: $(STAMP)
	$(PY) -m ruff check minima tools tests
	$(PY) -m ruff format --check minima tools tests
	$(VENV)/bin/shellcheck -x slurm/*.sh

format: $(STAMP)
	$(PY) -m ruff format minima tools tests
	$(PY) -m ruff check --fix minima tools tests

clean:
	rm -rf runs .pytest_cache .ruff_cache
