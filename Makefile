# Two commands from a fresh clone, on a machine with only Python >= 3.10:
#
#   make demo   the main job on the built-in example (lora-deploy demo, into out/demo)
#   make test   what CI runs (.ci/run): lint, format check, type check of the TensorRT code, tests
#
# Each first sets up the virtual environment .venv for its job, and only when it is missing or
# older than pyproject.toml, setup.py, the C kernels (lora_deploy/_native/*.c) or this file: a
# second run installs nothing. The CPU build of PyTorch goes in first, pinned; `pip install -e .`
# alone would pull torch's multi-GB CUDA build.
# `make -n demo` shows what would run.

PYTHON ?= python3
VENV ?= .venv
DEMO_OUT ?= out/demo
# The pinned torch, and where to get its CPU build. On these machines torch==2.13.0 resolves to
# the CPU wheel; elsewhere add PyTorch's CPU index: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
# TensorRT's API for mypy; installed without its dependencies (TensorRT itself needs NVIDIA's index).
TRT_STUBS ?= tensorrt-stubs==10.13.0.35.1
PYTEST_ARGS ?=

BIN := $(VENV)/bin
# A change to any of these reinstalls (setup.py and the C files: the optional compiled kernels).
BUILD_INPUTS := pyproject.toml setup.py Makefile $(wildcard lora_deploy/_native/*.c)
PIP := $(BIN)/python -m pip
TORCH_FROM := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))

.PHONY: demo test setup-demo setup-test clean-venv

demo: $(VENV)/.ready-demo
	$(BIN)/lora-deploy demo -o $(DEMO_OUT)

test: $(VENV)/.ready-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --ignore-missing-imports --follow-imports=silent lora_deploy/backends/trt/
	$(BIN)/python -m pytest $(PYTEST_ARGS)

setup-demo: $(VENV)/.ready-demo
setup-test: $(VENV)/.ready-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { echo "'$(PYTHON) -m venv' failed: install Python's venv module (Debian/Ubuntu: apt install python3-venv)" >&2; exit 1; }

# The demo trains its adapter with PEFT: the reference extra.
$(VENV)/.ready-demo: $(BUILD_INPUTS) | $(BIN)/python
	$(PIP) install $(TORCH_FROM) $(TORCH)
	$(PIP) install -e '.[reference]'
	touch $@

$(VENV)/.ready-test: $(BUILD_INPUTS) | $(BIN)/python
	$(PIP) install $(TORCH_FROM) $(TORCH)
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps $(TRT_STUBS)
	touch $@

clean-venv:
	rm -rf $(VENV)
