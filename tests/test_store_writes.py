"""The store's bulk statements (`statements.insert_rows`, `update_rows`, `clauses.among`): on PostgreSQL rows and ids
travel as arrays, on SQLite as executemany and IN lists, and either way the stored values are those a plain INSERT
or UPDATE stores."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from auditor.store import clauses
from auditor.store.repo import Store
from auditor.store.statements import insert_rows, update_rows
from auditor.store.tables import disks, drift_events

T0 = datetime(2026, 12, 1, 8, 30, 15, 123456, tzinfo=UTC)


def _drift(n: int, run_id: str) -> list[dict[str, Any]]:
    """Drift rows covering what the cycle writes: JSON objects, JSON null (None), text with quotes and accents."""
    return [{"disk_id": f"disk-{i}", "policy_id": "" if i % 3 == 0 else f"dbp-'{i}'\"é", "run_id": run_id,
             "at": T0 + timedelta(seconds=i), "kind": "policy-changed",
             "before": None if i % 2 else {"retention": i, "nested": {"a": [1, None, "x"]}},
             "after": {"tier": None} if i % 2 else None} for i in range(n)]


def _stored(conn: Connection, run_id: str) -> list[tuple[Any, ...]]:
    # The JSON columns as the database holds them (text, and whether SQL NULL), not as SQLAlchemy decodes them.
    return [tuple(r) for r in conn.execute(text(
        "SELECT disk_id, policy_id, at, kind, CAST(before AS TEXT), before IS NULL, CAST(after AS TEXT), "
        "after IS NULL FROM drift_events WHERE run_id = :run ORDER BY disk_id"), {"run": run_id})]


async def test_insert_rows_stores_what_a_plain_insert_stores(store: Store) -> None:
    def write(conn: Connection) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        conn.execute(insert(drift_events), _drift(7, "plain"))
        insert_rows(conn, drift_events, _drift(7, "bulk"))
        return _stored(conn, "plain"), _stored(conn, "bulk")

    plain, bulk = await store.write(write)
    assert len(plain) == 7
    assert bulk == plain
    # JSON null stays JSON null (what SQLAlchemy's JSON type stores for None), not SQL NULL.
    assert {row[5] for row in bulk} == {False} and {row[7] for row in bulk} == {False}


async def test_update_rows_sets_each_row_by_its_key(store: Store) -> None:
    def row(i: int, name: str | None, detail: dict[str, Any] | None) -> dict[str, Any]:
        return {"id": f"disk-{i}", "name": name, "vm_id": None, "vm_fqdn": None, "source": "config",
                "is_target": True, "outcome": "ok", "error_code": None, "error_message": None, "first_seen_at": T0,
                "last_checked_at": T0, "last_read_at": T0, "last_run_id": "r1", "tier": None, "tier_detail": detail,
                "policies_digest": None, "verdict": None}

    def write(conn: Connection) -> list[tuple[Any, ...]]:
        conn.execute(insert(disks), [row(i, f"old-{i}", None) for i in range(4)])
        update_rows(conn, disks, [
            {"id": "disk-1", "name": "new-1", "is_target": False, "tier_detail": {"exempt": True}, "verdict": "ok"},
            {"id": "disk-3", "name": None, "is_target": True, "tier_detail": None, "verdict": None},
        ], key="id")
        update_rows(conn, disks, [], key="id")  # nothing to do: no statement
        return [tuple(r) for r in conn.execute(text(
            "SELECT id, name, is_target, CAST(tier_detail AS TEXT), verdict, last_read_at FROM disks ORDER BY id"))]

    got = await store.write(write)
    assert [(r[0], r[1], bool(r[2]), r[4]) for r in got] == [
        ("disk-0", "old-0", True, None), ("disk-1", "new-1", False, "ok"), ("disk-2", "old-2", True, None),
        ("disk-3", None, True, None)]
    assert got[1][3] == '{"exempt": true}'
    assert got[3][3] == "null"  # JSON null, as a plain UPDATE with None stores it
    assert len({r[5] for r in got}) == 1  # columns not given are left alone


async def test_among_matches_the_ids_given(store: Store) -> None:
    ids = [f"disk-{i}" for i in range(1200)]

    def write(conn: Connection) -> list[str]:
        insert_rows(conn, drift_events, [{**r, "disk_id": f"disk-{i}"} for i, r in enumerate(_drift(1200, "r"))])
        conn.execute(update(drift_events).where(clauses.among(conn, drift_events.c.disk_id, ids[::7]))
                     .values(kind="tier-changed"))
        return [r[0] for r in conn.execute(text("SELECT disk_id FROM drift_events WHERE kind = 'tier-changed'"))]

    assert sorted(await store.write(write)) == sorted(ids[::7])


def test_among_keeps_one_statement_text_on_postgresql() -> None:
    # On PostgreSQL the ids are one array parameter, so 3 ids and 5,000 give the same statement (psycopg parses and
    # prepares it once); SQLite gets an IN list.
    class Conn:
        def __init__(self, dialect: Any) -> None:
            self.dialect = dialect

    def sql(dialect: Any, n: int) -> str:
        where = clauses.among(Conn(dialect), disks.c.id, [f"d{i}" for i in range(n)])  # type: ignore[arg-type]
        return str(update(disks).where(where).values(verdict=None).compile(dialect=dialect))

    pg = postgresql.psycopg.dialect()  # type: ignore[attr-defined]
    assert sql(pg, 3) == sql(pg, 5000)
    assert "= ANY (" in sql(pg, 3) and "::TEXT[]" in sql(pg, 3)
    assert clauses.batch(Conn(pg)) == 5000  # type: ignore[arg-type]
    lite = sqlite.dialect()
    assert "IN (" in sql(lite, 3)
    assert clauses.batch(Conn(lite)) == 500  # type: ignore[arg-type]


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # SQLite takes no array parameters
async def test_postgresql_connections_send_lists_in_binary(store: Store) -> None:
    # The array parameters of the bulk statements are packed in binary: psycopg's default for a list is text form,
    # escaping each element in Python (several times slower for 5,000 timestamps).
    assert store.engine.dialect.name == "postgresql"
    from psycopg.adapt import PyFormat
    from psycopg.types.array import ListBinaryDumper

    async with store.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        assert raw.driver_connection is not None
        assert raw.driver_connection.adapters.get_dumper(list, PyFormat.AUTO) is ListBinaryDumper


async def test_enqueue_applies_state_changes_as_if_one_after_another(store: Store) -> None:
    from auditor.domain.alerts import AlertState, AlertStatus
    from auditor.store import queries, writes

    def state(fp: str, status: AlertStatus, minutes: int) -> AlertState:
        return AlertState("hook", fp, status, T0 + timedelta(minutes=minutes), T0)

    firing, resolved = AlertStatus.FIRING, AlertStatus.RESOLVED
    await store.write(writes.enqueue, [], [state("a", firing, 0), state("b", firing, 0),
                                           AlertState("other", "a", firing, T0, T0)], run_id=None, now=T0)
    await store.write(writes.enqueue, [], [
        state("a", resolved, 5),  # an existing state changes
        state("c", firing, 5),  # a new one
        ("hook", "b"),  # an existing one is forgotten
        state("d", firing, 5), ("hook", "d"),  # added, then forgotten: gone
        ("hook", "e"), state("e", firing, 6),  # forgotten (nothing there), then added: there
        state("c", firing, 7),  # changed twice: the last change stands
    ], run_id=None, now=T0)
    got = await store.read(queries.alert_state_map)
    assert {k: (v.status, v.last_sent_at) for k, v in got.items()} == {
        ("hook", "a"): (resolved, T0 + timedelta(minutes=5)),
        ("hook", "c"): (firing, T0 + timedelta(minutes=7)),
        ("hook", "e"): (firing, T0 + timedelta(minutes=6)),
        ("other", "a"): (firing, T0),  # another notifier's state of the same fingerprint is untouched
    }
