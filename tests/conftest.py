"""Shared fixtures: one database URL per backend (SQLite always; PostgreSQL when configured or a local one answers,
and always in CI), migrated databases copied from a per-process template, one Chromium per process, and the test
profiles (markers, Hypothesis profiles, the order tests are handed to xdist workers).

Markers: `postgres`/`sqlite` (the backend of `db_url`, set by its parameter), `browser` (uses the `browser` fixture,
set here), `slow` (real processes, sockets or waits on real time; set in the test files), `real_migrations` (the
test checks migrations: `db_url`'s databases are migrated by Alembic, never copied). `make check` runs
`-m "not slow and not browser and not postgres"`; `make test` runs everything.
"""

from __future__ import annotations

import collections
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from browsers import Chromium, missing
from databases import Templates
from profiles import load_hypothesis_profile

from auditor.store import engine as db
from auditor.store.repo import Store

load_hypothesis_profile()

# Without AUDITOR_TEST_POSTGRES_URL, a local PostgreSQL answering here is used (a newcomer's `make test` then covers
# both backends); the explicit URL always wins, and CI=true still fails when the one in use does not answer.
LOCAL_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
EXPLICIT_PG_URL = os.environ.get("AUDITOR_TEST_POSTGRES_URL", "")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _pg_problem(url: str, *, timeout: int) -> str | None:
    try:
        with psycopg.connect(_libpq(url), connect_timeout=timeout):
            return None
    except psycopg.Error as exc:
        return f"PostgreSQL unreachable: {exc}"


def _choose_pg() -> tuple[str, str | None]:
    """Returns the PostgreSQL URL to test on and why it cannot be used (None when it answers)."""
    if EXPLICIT_PG_URL:
        return EXPLICIT_PG_URL, _pg_problem(EXPLICIT_PG_URL, timeout=5)
    if _pg_problem(LOCAL_PG_URL, timeout=2) is None:
        return LOCAL_PG_URL, None
    return "", f"AUDITOR_TEST_POSTGRES_URL is not set and no PostgreSQL answers at {LOCAL_PG_URL}"


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


PG_URL, _PG_PROBLEM = _choose_pg()


def pytest_sessionstart(session: pytest.Session) -> None:
    # In CI the PostgreSQL tests must run: an unreachable server fails the suite instead of skipping it.
    if IN_CI and _PG_PROBLEM:
        raise pytest.UsageError(f"CI=true but PostgreSQL tests cannot run: {_PG_PROBLEM}")


# Tests that ran (a call phase that was not skipped) per backend marker; with xdist the controller sees every worker's
# reports here, so the summary names what really ran, not what could have.
_RAN: collections.Counter[str] = collections.Counter()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and not report.skipped:
        for backend in ("sqlite", "postgres"):
            if backend in report.keywords:
                _RAN[backend] += 1


def _backends_line(*, ran: collections.Counter[str] | None = None) -> str:
    if ran is None:  # the header, before anything ran
        if _PG_PROBLEM:
            return f"database backends: sqlite (postgresql skipped: {_PG_PROBLEM})"
        return f"database backends: sqlite, postgresql ({_without_password(PG_URL)})"
    sqlite = f"sqlite ({ran['sqlite']} tests)" if ran["sqlite"] else "sqlite (no test ran)"
    if _PG_PROBLEM:
        postgres = f"postgresql skipped: {_PG_PROBLEM}"
    elif ran["postgres"]:
        postgres = f"postgresql ({ran['postgres']} tests, {_without_password(PG_URL)})"
    else:
        postgres = "postgresql not run (no PostgreSQL test selected)"
    return f"database backends: {sqlite}, {postgres}"


def pytest_report_header(config: pytest.Config) -> str:
    return _backends_line()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_line(_backends_line(ran=_RAN))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)
        if "promtool" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)  # runs the promtool binary: a real process
    if hasattr(config, "workerinput"):
        # Under xdist (`--dist load --maxschedchunk 2` hands tests out in this order, two at a time), the long tests
        # go first: those that raise their timeout, then the other slow and browser tests; so the run does not end
        # waiting on a long test started last. The sort is stable and the same in every worker, as xdist requires.
        def rank(item: pytest.Item) -> int:
            if item.get_closest_marker("timeout"):
                return 0
            return 1 if item.get_closest_marker("slow") or item.get_closest_marker("browser") else 2

        items.sort(key=rank)


@pytest.fixture(scope="session")
def db_templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Templates]:
    """This process's migrated templates (built on first use)."""
    templates = Templates(tmp_path_factory.mktemp("templates"), "" if _PG_PROBLEM else PG_URL)
    try:
        yield templates
    finally:
        templates.close()


@pytest.fixture(params=[pytest.param("sqlite", marks=pytest.mark.sqlite),
                        pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, db_templates: Templates,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh, empty database URL per test: an SQLite file, or a private PostgreSQL schema.

    The first migration of it to head in this process (`db.upgrade`, directly or through `open_services`) copies
    the process's template instead of running Alembic again, unless the test is marked `real_migrations`;
    another revision, or a database already written to, always runs Alembic.
    """
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'auditor.db'}"
        if not request.node.get_closest_marker("real_migrations"):
            monkeypatch.setattr(db, "upgrade", db_templates.upgrade_for({url}, db.upgrade))
        yield url
        return
    if _PG_PROBLEM:
        pytest.skip(_PG_PROBLEM)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_libpq(PG_URL), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in PG_URL else "?"
    url = f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    if not request.node.get_closest_marker("real_migrations"):
        monkeypatch.setattr(db, "upgrade", db_templates.upgrade_for({url}, db.upgrade))
    try:
        yield url
    finally:
        with psycopg.connect(_libpq(PG_URL), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    """A migrated Store on the per-backend database (a copy of the template, see `db_url`)."""
    await db.upgrade(db_url)
    s = Store.from_url(db_url)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(scope="session")
def chromium() -> Iterator[Chromium]:
    """This process's Chromium, launched by the first browser test."""
    browsers = Chromium()
    try:
        yield browsers
    finally:
        browsers.close()


@pytest.fixture
def browser(chromium: Chromium) -> Iterator[Any]:
    """Headless Chromium for one test (one per process, shared; the contexts a test opens are closed after it).
    Without Chromium the test skips, except under CI=true, where it fails (as the PostgreSQL tests do)."""
    problem = missing()
    if problem is not None:
        if IN_CI:
            pytest.fail(f"CI=true but the browser tests cannot run: {problem}")
        pytest.skip(problem)
    with chromium.lend() as shared:
        yield shared
