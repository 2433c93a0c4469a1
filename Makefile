# The two entry points of the README: `make run` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXAMPLE ?= examples/cycle.json

.PHONY: run test test-phoenix setup setup-test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(VENV)/.installed $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

## run: start embedded NATS + every agent, run the example task, print its result and trace, keep serving
run: setup
	$(BIN)/dspyrt up --example $(EXAMPLE)

## test: lint, type-check and run the test suite against real nats-servers
test: setup-test
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q

## test-phoenix: the optional Phoenix test (installs the phoenix extra, about 850 MB, into .venv)
test-phoenix: setup-test
	$(BIN)/pip install --quiet -e '.[test,phoenix]'
	$(BIN)/pytest -q tests/test_phoenix.py

bench: setup-test
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/bench_foundation.py

clean:
	rm -rf $(VENV) .dspyrt
