"""Shared fixtures: one database URL per backend (SQLite always; PostgreSQL when configured or a local one answers,
and always in CI)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from auditor.store import engine as db
from auditor.store.repo import Store

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


def _backends_line() -> str:
    if _PG_PROBLEM:
        return f"database backends: sqlite (postgresql skipped: {_PG_PROBLEM})"
    return f"database backends: sqlite, postgresql ({_without_password(PG_URL)})"


def pytest_report_header(config: pytest.Config) -> str:
    return _backends_line()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_line(_backends_line())


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL per test: an SQLite file, or a private PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'auditor.db'}"
        return
    if _PG_PROBLEM:
        pytest.skip(_PG_PROBLEM)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_libpq(PG_URL), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(_libpq(PG_URL), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    """A migrated Store on the per-backend database."""
    await db.upgrade(db_url)
    s = Store.from_url(db_url)
    try:
        yield s
    finally:
        await s.close()
