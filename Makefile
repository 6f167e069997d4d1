# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv on first use: torch first, pinned to the CPU build, then the package.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test lint bench clean docs cli-docs fuzz

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,plot]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/adapters demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

# The property-based fuzz suite with the long hypothesis profile (minutes, not seconds).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=long $(BIN)/pytest -q -m fuzz $(PYTEST_ARGS)

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

cli-docs: $(STAMP)
	$(BIN)/python -m adapterhub_local.cli.reference > docs/cli.md

lint: $(STAMP)
	$(BIN)/python -m pip install -q ruff
	$(BIN)/ruff check adapterhub_local trainer registry tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/registry.py
	$(BIN)/python benchmarks/merge.py
	$(BIN)/python benchmarks/train.py

clean:
	rm -rf $(VENV) build *.egg-info adapterhub_local/*.so
