# `make demo` and `make test` work on a fresh machine: they create .venv if missing and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
RUN_ID := $(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test bench gpu-suite kernel-check kernel-report lint format clean-runs

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall only when the package definition changes.
$(INSTALLED): setup.py pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[dev,dali]"
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(VENV)/bin/dtengine distill --config configs/demo.yaml out_dir=runs/demo-$(RUN_ID)

test: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(INSTALLED)
	$(PY) benchmarks/bench_step.py

# Every GPU measurement in one command: pytest -m gpu and the three benchmarks, results named by device (see
# README, Benchmarks). No .venv needed: a GPU box without network uses its own python3 (and wheels in .whl/).
SUITE_PY := $(if $(wildcard $(PY)),$(PY),python3)
gpu-suite:
	$(SUITE_PY) benchmarks/run_gpu_suite.py $(GPU_SUITE_ARGS)

# Kernels without a GPU: Triton-interpreter correctness and AOT compile of every shipped config of both kernels
# (feature loss, attention) for sm_80 and sm_90. `make test` runs these files too (they are part of tests/).
KERNEL_TESTS := tests/test_kernels_aot.py tests/test_kernels_feature_loss.py tests/test_kernels_attention_aot.py \
	tests/test_ops_attention_interpreter.py
kernel-check: $(INSTALLED)
	$(PY) -m pytest -q $(KERNEL_TESTS)

# What the compiler makes of both kernels for sm_80 / sm_90 as real launches specialise them (registers, spills,
# load widths, cp.async, wgmma, loop sizes); writes docs/kernel_aot_report.md, the committed AOT baseline.
kernel-report: $(INSTALLED)
	$(PY) benchmarks/kernel_report.py

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

format: $(INSTALLED)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean-runs:
	rm -rf runs
