# pvtlab: every command a user needs. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS := requirements/constraints.txt
# Extra arguments for train / bench / test, e.g. `make train ARGS="backbone=pvt_small"`.
ARGS ?=

.PHONY: help install train predict test test-fast lint format bench models clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c $(CONSTRAINTS) -e '.[dev,onnx]'
	touch $@

install: $(STAMP) ## Create .venv and install pvtlab editable with the dev and onnx extras (quick when done)

train: $(STAMP) ## Train the default experiment (PVT-Tiny classification on shapes, CPU)
	$(BIN)/python src/train.py $(ARGS)

predict: $(STAMP) ## Predict with a checkpoint: make predict ARGS="ckpt_path=<.ckpt> input=<folder>"
	$(BIN)/python src/predict.py $(ARGS)

test: $(STAMP) ## Run the test suite CI runs (slow end-to-end checks included)
	$(BIN)/python -m pytest $(ARGS)

test-fast: $(STAMP) ## Run the suite without the slow learning checks
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

lint: $(STAMP) ## ruff check and format check
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP) ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

bench: $(STAMP) ## Benchmark throughput (benchmarks/README.md); CSV under outputs/benchmarks/
	$(BIN)/python benchmarks/benchmark.py $(ARGS)

models: $(STAMP) ## List every backbone and head: parameters, GMACs, choice, weights (ARGS=--markdown)
	$(BIN)/python src/models.py $(ARGS)

clean: ## Remove the venv, caches, run outputs and generated data
	rm -rf $(VENV) outputs multirun lightning_logs wandb .pytest_cache .ruff_cache data/shapes
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
