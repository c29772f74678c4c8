"""Shared fixtures: one database URL per backend (SQLite always; PostgreSQL when configured, and always in CI)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest

from auditor.store import engine as db
from auditor.store.repo import Store

PG_URL = os.environ.get("AUDITOR_TEST_POSTGRES_URL", "")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _pg_reachable() -> str | None:
    if not PG_URL:
        return "AUDITOR_TEST_POSTGRES_URL is not set"
    try:
        with psycopg.connect(_libpq(PG_URL), connect_timeout=5):
            return None
    except psycopg.Error as exc:
        return f"PostgreSQL unreachable: {exc}"


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


_PG_PROBLEM = _pg_reachable()


def pytest_sessionstart(session: pytest.Session) -> None:
    # In CI the PostgreSQL tests must run: an unreachable server fails the suite instead of skipping it.
    if IN_CI and _PG_PROBLEM:
        raise pytest.UsageError(f"CI=true but PostgreSQL tests cannot run: {_PG_PROBLEM}")


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
