# The two entry points of the README: `make run` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXAMPLE ?= examples/cycle.json
# The installer: uv (several times faster than pip) from PATH or UV=..., else installed into the venv with its pip;
# plain pip when uv cannot be installed. The choice is kept in $(VENV)/.installer (delete it to choose again).
UV ?= $(shell command -v uv 2>/dev/null)
# `$(INSTALL) ARGS...` installs into the venv with the installer recorded in $(VENV)/.installer.
INSTALL = sh -c 'installer=$$(cat $(VENV)/.installer); \
	if [ "$$installer" = pip ]; then exec $(BIN)/python -m pip install --quiet "$$@"; \
	else exec "$$installer" pip install --quiet --python $(BIN)/python "$$@"; fi' install

.PHONY: run test test-phoenix setup setup-test lint bench bench-cli clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installer: | $(BIN)/python
	@if [ -n "$(UV)" ] && "$(UV)" --version >/dev/null 2>&1; then \
		echo "$(UV)" > $@; \
	elif $(BIN)/python -m pip install --quiet uv >/dev/null 2>&1 && $(BIN)/uv --version >/dev/null 2>&1; then \
		echo "$(abspath $(BIN))/uv" > $@; \
	else \
		echo "uv could not be installed: installing with pip (slower)"; \
		$(BIN)/python -m pip install --quiet --upgrade pip || true; \
		echo pip > $@; \
	fi

$(VENV)/.installed: pyproject.toml | $(VENV)/.installer
	$(INSTALL) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/.installer
	$(INSTALL) -e '.[test]'
	touch $(VENV)/.installed $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

## run: start embedded NATS + every agent, run the example task, print its result and trace, keep serving
run: setup
	$(BIN)/dspyrt up --example $(EXAMPLE)

# mypy cannot follow setuptools' editable import hook (dspyrt.bus -> bus/), so it reads the package through links
# laid out as the wheel installs it (pyproject.toml: [tool.mypy] mypy_path).
TYPECHECK_TREE := .dspyrt/typecheck/dspyrt
$(TYPECHECK_TREE):
	mkdir -p $@
	for folder in bus runtime agents; do ln -sfn ../../../$$folder $@/$$folder; done
	ln -sfn ../../../dspyrt/__init__.py $@/__init__.py

## test: lint, type-check and run the test suite against real nats-servers
test: setup-test | $(TYPECHECK_TREE)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q

## test-phoenix: the optional Phoenix test (installs the phoenix extra, about 850 MB, into .venv)
test-phoenix: setup-test
	$(INSTALL) -e '.[test,phoenix]'
	$(BIN)/pytest -q tests/test_phoenix.py

bench: setup-test
	$(INSTALL) -e '.[bench]'
	$(BIN)/python benchmarks/bench_foundation.py

## bench-cli: how long `dspyrt --help` and `dspyrt status` take to start, next to `python -c pass`
bench-cli: setup
	$(BIN)/python benchmarks/bench_cli.py

clean:
	rm -rf $(VENV) .dspyrt
