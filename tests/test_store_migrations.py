"""Alembic owns the schema: models and migrations agree, and upgrade/downgrade/upgrade works on each backend."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from auditor.store import engine as db
from auditor.store.tables import metadata

pytestmark = pytest.mark.real_migrations  # these tests check the migrations: never the copied template


def _diff(sync_conn: object) -> list[object]:
    ctx = MigrationContext.configure(sync_conn, opts={"compare_type": True})  # type: ignore[arg-type]
    return list(compare_metadata(ctx, metadata))


def _tables(sync_conn: object) -> set[str]:
    return set(inspect(sync_conn).get_table_names())  # type: ignore[arg-type]


async def test_models_match_migrations(db_url: str) -> None:
    await db.upgrade(db_url)
    engine = db.create_engine_for(db_url)
    try:
        async with engine.connect() as conn:
            diff = await conn.run_sync(_diff)
    finally:
        await engine.dispose()
    assert diff == [], f"models and migrations disagree: {diff}"


async def test_upgrade_downgrade_upgrade(db_url: str) -> None:
    await db.upgrade(db_url)
    current, head = await db.current_revision(db_url)
    assert current == head and head is not None
    await db.downgrade(db_url, "base")
    engine = db.create_engine_for(db_url)
    try:
        async with engine.connect() as conn:
            tables = await conn.run_sync(_tables)
        assert tables <= {"alembic_version"}, tables
    finally:
        await engine.dispose()
    current, _ = await db.current_revision(db_url)
    assert current is None
    await db.upgrade(db_url)
    current, head = await db.current_revision(db_url)
    assert current == head
    engine = db.create_engine_for(db_url)
    try:
        async with engine.connect() as conn:
            tables = await conn.run_sync(_tables)
        assert {"audit_runs", "findings", "policy_states", "outbox"} <= tables
    finally:
        await engine.dispose()


def test_the_schema_head_constant_is_alembics_head() -> None:
    # Read-only commands compare the database with SCHEMA_HEAD without loading Alembic: it must be the real head.
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(db.alembic_config("sqlite:///unused.db"))
    assert db.SCHEMA_HEAD == scripts.get_current_head()
    # ... and SCHEMA_REVISIONS every revision, oldest first: a database at any other one was written by a newer auditor.
    assert db.SCHEMA_REVISIONS == tuple(reversed([s.revision for s in scripts.walk_revisions()]))


async def test_a_database_a_newer_auditor_migrated_is_refused_with_one_line(db_url: str) -> None:
    import pytest

    from auditor.errors import SchemaError

    await db.upgrade(db_url)
    engine = db.create_engine_for(db_url)
    try:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
    finally:
        await engine.dispose()
    message = "database schema 0099 is newer than this auditor, which knows up to " + db.SCHEMA_HEAD
    with pytest.raises(SchemaError, match=message + ": upgrade the auditor$"):
        await db.upgrade(db_url)
    assert (await db.current_revision(db_url))[0] == "0099"  # left as it was
    assert str(db.schema_error(db_url, "0099")) == message + ": upgrade the auditor"
    assert db.schema_error(db_url, db.SCHEMA_HEAD) is None
    assert "needs " + db.SCHEMA_HEAD in str(db.schema_error(db_url, "0001"))
