# Two commands do all the set-up on a fresh machine: `make demo` and `make test`; `make check` is the fast loop.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_RUN := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test
# pytest-xdist workers, chosen by measurement on 2 cores: the slow tests mostly wait (real processes, sockets,
# timeouts), so more workers than cores; more than 3 gave no shorter run on a busy machine and starved the timed steps
# of the multi-process tests (a daemon's 3 s shutdown, a one-shot run's start within a cycle).
TEST_WORKERS ?= 3
CHECK_WORKERS ?= 3
# The fast subset: no real processes, sockets or waits (slow), no Chromium (browser), SQLite only (not postgres).
CHECK_MARKERS := not slow and not browser and not postgres

# With PYTHONDONTWRITEBYTECODE set (some images set it), every pytest worker would assertion-rewrite its plugins
# again (schemathesis and hypothesis: some 300 modules, seconds per process) and every `auditor` subprocess would
# compile the package again; the caches go to __pycache__ directories (ignored by git) and the venv.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test check lint typecheck layers pytest bench clean install lock lock-upgrade

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

## test: install with test extras and run every check (ruff, mypy, import contracts, pytest): every test, on both
## databases, with Chromium, the real processes and the full Hypothesis profile, on $(TEST_WORKERS) xdist workers
## (PostgreSQL: AUDITOR_TEST_POSTGRES_URL, else a local one answering at postgresql://postgres@127.0.0.1:5432/test;
##  pytest's summary names the backends it ran; with CI=true an unreachable PostgreSQL fails the run)
test: $(STAMP_TEST)
	$(BIN)/ruff check auditor tests benchmarks migrations
	$(BIN)/mypy
	$(BIN)/lint-imports
	AUDITOR_HYPOTHESIS_PROFILE=full $(BIN)/pytest -q -n $(TEST_WORKERS) --dist load --maxschedchunk 2

## check: the fast loop: ruff, mypy, the import contracts, and the fast tests (on SQLite, the small Hypothesis
## profile, $(CHECK_WORKERS) workers): no real processes or sockets, no browser, no PostgreSQL
check: $(STAMP_TEST)
	$(BIN)/ruff check auditor tests benchmarks migrations
	$(BIN)/mypy
	$(BIN)/lint-imports
	AUDITOR_HYPOTHESIS_PROFILE=check $(BIN)/pytest -q -n $(CHECK_WORKERS) --dist load --maxschedchunk 2 -m "$(CHECK_MARKERS)"

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
