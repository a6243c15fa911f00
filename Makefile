# The two set-up commands of README.md:
#   make demo   -> a virtualenv with everything, then a real small study on CPU
#   make test   -> the same virtualenv plus test tools, then the test suite
PYTHON ?= python3
VENV ?= .venv
# CPU machines: the torch build on this project's machines; GPU machines: set TORCH to the
# build for your CUDA (e.g. TORCH="torch==2.11.0"), or pre-install torch and set TORCH="".
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test lint install

$(BIN)/gemma-search: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/pip install -q "$(TORCH)")
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/gemma-search

demo: install
	$(BIN)/gemma-search demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check gemma_search tests
	$(BIN)/mypy gemma_search
