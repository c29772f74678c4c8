"""Statement helpers the writers share: an insert that keeps an existing row, and a row count."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection


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
