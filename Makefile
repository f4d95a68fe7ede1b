# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs moerm into it. CONSTRAINTS pins torch to the CPU build that these machines
# carry on local disk; CUDA users run e.g. `make setup CONSTRAINTS=` to keep their own torch.
PYTHON ?= python3.11
ifeq (, $(shell command -v $(PYTHON) 2>/dev/null))
PYTHON := python3
endif
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS ?= constraints-cpu.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
RUN ?= runs/demo

.PHONY: setup setup-dev demo test bench bench-medium bench-small clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(BIN)/pip install -q $(PIP_C) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q $(PIP_C) -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

setup-dev: $(VENV)/.installed-dev

## demo: train the baseline on examples/data with the embedded MiniLM, evaluate per domain, score one example
demo: setup
	HF_HUB_OFFLINE=1 bash scripts/demo.sh $(RUN)

## test: the whole offline test suite (tiny random models + one end-to-end test on the real MiniLM)
test: setup-dev
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

## bench: every system x 3 seeds on 15 domains of ../shared/data, 500 pairs per domain, 2 epochs, top tuning, three
## domain groups and the issue-12 targets (the cpu-medium preset; docs/BENCH.md; 80 min on 2 cores)
bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/moerm bench --preset cpu-medium --out runs/bench-cpu-medium

bench-medium: bench

## bench-small: the quick preset, every system once per seed on a per-domain sample with full fine-tuning (~45-60 min)
bench-small: setup
	HF_HUB_OFFLINE=1 $(BIN)/moerm bench --preset cpu-small --out runs/bench-cpu-small

clean:
	rm -rf $(VENV) runs .pytest_cache
