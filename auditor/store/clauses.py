"""SQL pieces the reads (`queries`) and the writes (`writes`, `statements`) share, shaped per dialect so a statement's
text is the same for every chunk it runs on: set membership, and rows passed as one array per column.

On PostgreSQL a chunk of ids is one array parameter (`id = ANY(%(ids)s::TEXT[])`) instead of one placeholder per id:
the statement text does not grow with the chunk, so psycopg parses it once (psycopg 3.3 `_queries.py` caches the
conversion of a query of at most 4,096 characters and 50 parameters: an IN list of 500 placeholders was parsed again
on every execution) and prepares it after a few runs (`prepare_threshold`, 5). SQLite has no arrays: there the same
statements use an IN list.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import any_, bindparam, func
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import TableValuedAlias


def uses_arrays(conn: Connection) -> bool:
    """Returns whether the connection's database takes array parameters (PostgreSQL)."""
    return conn.dialect.name == "postgresql"


def batch(conn: Connection) -> int:
    """Returns how many ids or rows one statement takes: 5,000 on PostgreSQL, where they travel as one array per
    column whatever their number (fewer round trips), and 500 elsewhere (an IN list under SQLite's limit on bound
    parameters). Either bounds the memory a chunk of the cycle's write holds."""
    return 5000 if uses_arrays(conn) else 500


def among(conn: Connection, column: Any, values: Sequence[Any]) -> ColumnElement[bool]:
    """Returns `column IN values`: one array parameter on PostgreSQL, an expanding IN list elsewhere."""
    clause: ColumnElement[bool] = (column == any_(bindparam(None, list(values), type_=ARRAY(column.type)))
                                   if uses_arrays(conn) else column.in_(values))
    return clause


def array_rows(table: Any, columns: Sequence[str]) -> TableValuedAlias:
    """Returns `unnest(:a_<column>::<type>[], ...) AS v(<column>, ...)`: the rows given as one array per column,
    each typed as `table`'s column (PostgreSQL; the parameters are named `a_<column>`)."""
    arrays = (bindparam(f"a_{name}", type_=ARRAY(table.c[name].type)) for name in columns)
    return func.unnest(*arrays).table_valued(*columns).render_derived().alias("v")


def array_params(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> dict[str, list[Any]]:
    """Returns the parameters of `array_rows(table, columns)` for `rows` (each a dict with every column)."""
    return {f"a_{name}": [row[name] for row in rows] for name in columns}
