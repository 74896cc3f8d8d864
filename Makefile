# Two commands on a fresh CPU machine:  make demo  |  make test
# Both set up .venv first (once; redone when the pins or pyproject change).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
# -n auto is not used: the suite spawns gloo process groups itself, and CI has 2 cores.
PYTEST_ARGS ?=

.PHONY: setup test lint demo bench clean

setup: $(STAMP)

# torch first, from the pinned CPU build: a bare `pip install deepspeed` would pull a multi-GB CUDA torch.
$(STAMP): requirements-ci.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$$(grep -E '^torch==' requirements-ci.txt)"
	$(PIP) install -q -r requirements-ci.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The suite runs the Triton kernels in the interpreter (TRITON_INTERPRET must be set before triton is imported).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	TRITON_INTERPRET=1 $(VENV)/bin/pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(PY) -m distlion_ds.demo

bench: $(STAMP)
	$(PY) benchmarks/bench_kernels.py
	$(PY) benchmarks/bench_vote_exchange.py

clean:
	rm -rf $(VENV) build *.egg-info runs

# One command on a 1-GPU machine (Python 3.12, torch, triton, pytest, pydantic; no venv, no network, package not
# installed): exact kernel tests on CUDA, bandwidth vs a D2D copy, TopK vs torch.topk, a D-Lion step, codec round
# trips. GPU_CHECK_ARGS="--test-workers 15" spreads the tests over pytest-xdist.
# Writes runs/gpu_check/gpu_check.{json,md}. See benchmarks/gpu_check.py.
.PHONY: gpu-check
GPU_CHECK_PY ?= python3
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_CHECK_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)
