"""Statement helpers the writers share: an insert that keeps an existing row, a row count, and rows written in bulk
(`insert_rows`, `update_rows`, `upsert_rows`) with one statement of a fixed shape per chunk."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, insert, update
from sqlalchemy.engine import Connection

from auditor.store.clauses import array_params, array_rows, uses_arrays


def insert_if_absent(conn: Connection, table: Any, values: dict[str, Any]) -> int:
    """Inserts a row unless its primary key exists (ON CONFLICT DO NOTHING); returns the row count."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    stmt = (pg_insert(table) if conn.dialect.name == "postgresql" else sqlite_insert(table)).values(**values)
    key = next(iter(table.primary_key.columns))
    # RETURNING, not rowcount: psycopg reports no row count for INSERT … ON CONFLICT.
    return 1 if conn.execute(stmt.on_conflict_do_nothing().returning(key)).first() is not None else 0


def rowcount(result: Any) -> int:
    """Returns the number of rows a statement changed (0 when the driver does not say)."""
    return int(getattr(result, "rowcount", 0) or 0)


def insert_rows(conn: Connection, table: Any, rows: Sequence[dict[str, Any]]) -> None:
    """Inserts `rows` (dicts with the same keys) in one statement.

    PostgreSQL: `INSERT … SELECT … FROM unnest(<one array per column>)`, one statement and one round trip whatever
    the number of rows (psycopg's executemany sends and the server runs one INSERT per row). SQLite: an executemany
    of one INSERT (sqlite3 runs it in-process, prepared once).
    """
    if not rows:
        return
    columns = list(rows[0])
    if uses_arrays(conn):
        conn.execute(insert(table).from_select(columns, array_rows(table, columns)), array_params(rows, columns))
    else:
        conn.execute(insert(table), list(rows))


def update_rows(conn: Connection, table: Any, rows: Sequence[dict[str, Any]], *, key: str) -> None:
    """Sets the columns given in `rows` (dicts with the same keys, `key` among them) on the row of `table` whose
    `key` matches each one.

    PostgreSQL: `UPDATE … FROM unnest(<one array per column>) AS v WHERE table.key = v.key`, one statement; SQLite:
    an executemany of one UPDATE by key.
    """
    if not rows:
        return
    columns = list(rows[0])
    values = [name for name in columns if name != key]
    if uses_arrays(conn):
        v = array_rows(table, columns)
        stmt = update(table).where(table.c[key] == v.c[key]).values({name: v.c[name] for name in values})
        conn.execute(stmt, array_params(rows, columns))
        return
    # The parameters are renamed (b_<column>): a bound parameter may not share its name with a column being set.
    stmt = update(table).where(table.c[key] == bindparam(f"b_{key}")).values(
        {name: bindparam(f"b_{name}") for name in values})
    conn.execute(stmt, [{f"b_{name}": row[name] for name in columns} for row in rows])


def upsert_rows(conn: Connection, table: Any, rows: Sequence[dict[str, Any]], *, keys: Sequence[str]) -> None:
    """Inserts `rows` (dicts with the same keys, `keys` among them, each key at most once), or sets their other
    columns where a row with the same `keys` exists (ON CONFLICT … DO UPDATE).

    PostgreSQL: one INSERT … SELECT FROM unnest(…) ON CONFLICT statement; SQLite: an executemany of one
    INSERT … ON CONFLICT.
    """
    if not rows:
        return
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    columns = list(rows[0])
    if uses_arrays(conn):
        pg = pg_insert(table).from_select(columns, array_rows(table, columns))
        stmt: Any = pg.on_conflict_do_update(index_elements=list(keys), set_={
            name: pg.excluded[name] for name in columns if name not in keys})
        conn.execute(stmt, array_params(rows, columns))
        return
    lite = sqlite_insert(table)
    conn.execute(lite.on_conflict_do_update(index_elements=list(keys), set_={
        name: lite.excluded[name] for name in columns if name not in keys}), list(rows))
