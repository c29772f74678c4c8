"""The test databases copied from a template (tests/databases.py) are the databases a real migration gives: same
tables, columns, defaults, indexes, constraints, sequences and `alembic_version`, on each backend."""

from __future__ import annotations

import sqlite3
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import PG_URL
from databases import _REAL_UPGRADE, Templates, libpq, schema_of, with_schema

from auditor.store import engine as db


def _sqlite_catalog(url: str) -> list[tuple[Any, ...]]:
    path = db.sqlite_path(url)
    assert path is not None
    with closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name").fetchall()
        rows += conn.execute("SELECT 'alembic_version', version_num, '', '' FROM alembic_version").fetchall()
        rows += conn.execute("PRAGMA journal_mode").fetchall()
    return rows


_PG_CATALOG = {
    "columns": "SELECT table_name, column_name, ordinal_position, data_type, character_maximum_length, is_nullable, "
               "replace(column_default, %(schema)s || '.', '') FROM information_schema.columns "
               "WHERE table_schema = %(schema)s ORDER BY 1, 3",
    "indexes": "SELECT tablename, indexname, replace(indexdef, %(schema)s || '.', '') FROM pg_indexes "
               "WHERE schemaname = %(schema)s ORDER BY 1, 2",
    "constraints": "SELECT cl.relname, co.conname, co.contype, pg_get_constraintdef(co.oid) FROM pg_constraint co "
                   "JOIN pg_class cl ON cl.oid = co.conrelid JOIN pg_namespace n ON n.oid = co.connamespace "
                   "WHERE n.nspname = %(schema)s ORDER BY 1, 2",
    "sequences": "SELECT sequence_name, data_type, start_value, increment FROM information_schema.sequences "
                 "WHERE sequence_schema = %(schema)s ORDER BY 1",
    "relations": "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                 "WHERE n.nspname = %(schema)s ORDER BY 1",
}


def _pg_catalog(url: str) -> dict[str, list[tuple[Any, ...]]]:
    schema = schema_of(url)
    with psycopg.connect(libpq(url), autocommit=True) as conn:
        catalog = {name: conn.execute(query, {"schema": schema}).fetchall()  # type: ignore[arg-type]
                   for name, query in _PG_CATALOG.items()}
        catalog["alembic_version"] = conn.execute(f'SELECT version_num FROM "{schema}".alembic_version').fetchall()
    return catalog


def _catalog(url: str) -> Any:
    return _sqlite_catalog(url) if db.is_sqlite(url) else _pg_catalog(url)


async def test_a_copied_database_is_a_migrated_one(db_url: str, tmp_path: Path) -> None:
    assert db.upgrade is not _REAL_UPGRADE, "db_url should copy the template"
    await db.upgrade(db_url)
    if db.is_sqlite(db_url):
        real_url = f"sqlite:///{tmp_path / 'real.db'}"
        await db.upgrade(real_url)  # not a db_url database: Alembic runs
        assert _catalog(db_url) == _catalog(real_url)
        return
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(libpq(PG_URL), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        real_url = with_schema(PG_URL, schema)
        await _REAL_UPGRADE(real_url)
        copied, real = _catalog(db_url), _catalog(real_url)
        assert copied["alembic_version"] == [(db.SCHEMA_HEAD,)]
        assert copied == real
    finally:
        with psycopg.connect(libpq(PG_URL), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


async def test_the_copy_is_used_once_and_only_for_an_empty_database_at_head(db_url: str,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    real: list[tuple[str, str]] = []

    async def recording_upgrade(url: str, revision: str = "head") -> None:
        real.append((url, revision))
        await _REAL_UPGRADE(url, revision)

    templates = Templates(Path(), "")
    copies: list[str] = []
    monkeypatch.setattr(templates, "copy_to", copies.append)
    upgrade = templates.upgrade_for({db_url}, recording_upgrade)
    await upgrade(db_url, "0001")  # another revision: Alembic
    await upgrade(db_url)  # no longer empty: Alembic
    assert copies == [] and real == [(db_url, "0001"), (db_url, "head")]
    assert (await db.current_revision(db_url))[0] == db.SCHEMA_HEAD


@pytest.mark.real_migrations
async def test_real_migrations_marker_keeps_alembic(db_url: str) -> None:
    assert db.upgrade is _REAL_UPGRADE
