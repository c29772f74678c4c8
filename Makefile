# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_RUN := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test

.PHONY: demo test lint typecheck layers pytest bench clean install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP_RUN): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(STAMP_TEST): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(STAMP_RUN)

install: $(STAMP_RUN)

## demo: install into .venv and run the auditor against the built-in fake Katapult on SQLite
demo: $(STAMP_RUN)
	$(BIN)/auditor demo

## test: install with test extras and run every check (ruff, mypy, import contracts, pytest)
## (PostgreSQL: AUDITOR_TEST_POSTGRES_URL, else a local one answering at postgresql://postgres@127.0.0.1:5432/test;
##  pytest's last line names the backends it ran; with CI=true an unreachable PostgreSQL fails the run)
test: $(STAMP_TEST)
	$(BIN)/ruff check auditor tests benchmarks migrations
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/pytest -q

## bench: run every benchmark and print its figures against the targets
bench: $(STAMP_TEST)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache demo.db*
