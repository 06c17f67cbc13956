# Two entry points: `make run` (dev profile) and `make test` (the whole suite).
# Everything installs into .venv from pyproject.toml; nothing global is touched.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: run test lint format clean

run: $(VENV)/.installed-dev
	$(BIN)/inngest-outbox serve --dev

test: $(VENV)/.installed-test
	$(BIN)/ruff check service migrations tests bench
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check service migrations tests bench
	$(BIN)/ruff format --check service migrations tests bench

format: $(VENV)/.installed-test
	$(BIN)/ruff format service migrations tests bench
	$(BIN)/ruff check --fix service migrations tests bench

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11 or newer is needed, found " + sys.version' 
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
