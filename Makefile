# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_RUN := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test

.PHONY: demo test lint typecheck layers pytest bench clean install lock lock-upgrade

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

## lock: pin pyproject.toml's runtime dependencies with hashes in requirements.lock, which the Docker image installs
## (for its Python 3.11 on linux x86_64, whatever this machine runs; pins already in the lock are kept: lock-upgrade
##  moves every pin to the newest release pyproject.toml allows). tests/test_deploy.py fails while the two disagree.
LOCK = $(BIN)/uv pip compile pyproject.toml --quiet --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
	--generate-hashes --custom-compile-command 'make lock' --output-file requirements.lock

$(BIN)/uv: | $(BIN)/python
	$(BIN)/python -m pip install --quiet 'uv>=0.5'

lock: $(BIN)/uv
	$(LOCK)

lock-upgrade: $(BIN)/uv
	$(LOCK) --upgrade

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache demo.db*
