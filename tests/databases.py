"""Migrated test databases without running Alembic for every test.

Each test process (each xdist worker) migrates one template per backend with the real `auditor.store.engine.upgrade`,
once, the first time a test needs it; every test that then wants a database at head gets a copy:

- SQLite: the template file, checkpointed and closed, is copied byte for byte.
- PostgreSQL: while the template schema is migrated, every statement Alembic sends is recorded (SQLAlchemy's
  `before_cursor_execute` on all engines); a test's schema gets the same statements, in order, in one transaction
  on one connection. The statements are unqualified (the schema comes from the URL's search_path), so they build
  the same tables, indexes, sequences and `alembic_version` row in the test's own schema.

tests/test_db_templates.py checks that a copy and a real migration give the same catalog and `alembic_version`.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Callable, Coroutine
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg

from auditor.store import engine as db

Recorded = tuple[str, Any, bool, bool]  # (statement, parameters, executemany, without parameters)

# The real migration, taken before any test replaces `db.upgrade` (the `db_url` fixture does, see Templates).
_REAL_UPGRADE = db.upgrade


def libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def schema_of(url: str) -> str:
    marker = "search_path%3D"
    if marker not in url:
        raise ValueError(f"not a private-schema test URL: {url}")
    return url.split(marker, 1)[1].split("&", 1)[0]


def with_schema(base_url: str, schema: str) -> str:
    sep = "&" if "?" in base_url else "?"
    return f"{base_url}{sep}options=-csearch_path%3D{schema}"


def _migrate(url: str) -> None:
    # The real migration, on its own event loop: the caller may be inside a test's loop or in none.
    result: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(_REAL_UPGRADE(url))
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller's thread
            result.append(exc)

    thread = threading.Thread(target=run, name="migrate-template")
    thread.start()
    thread.join()
    if result:
        raise result[0]


class SqliteTemplate:
    """One migrated SQLite file per process, copied for each test."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._path: Path | None = None
        self._lock = threading.Lock()

    def path(self) -> Path:
        with self._lock:
            if self._path is None:
                path = self.directory / "template.db"
                _migrate(f"sqlite:///{path}")
                # Fold the WAL into the file so the copy is the whole database (journal_mode=WAL stays in its header).
                with closing(sqlite3.connect(path)) as conn:
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                for suffix in ("-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
                self._path = path
            return self._path

    def copy_to(self, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path(), target)


class PostgresTemplate:
    """One migrated schema per process; its migration's statements are replayed into each test's schema."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.schema = f"tmpl_{uuid.uuid4().hex[:12]}"
        self._statements: list[Recorded] | None = None
        self._lock = threading.Lock()

    def statements(self) -> list[Recorded]:
        with self._lock:
            if self._statements is None:
                self._statements = self._record()
            return self._statements

    def _record(self) -> list[Recorded]:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        recorded: list[Recorded] = []

        url = with_schema(self.base_url, self.schema)

        def record(conn: Any, _cursor: Any, statement: str, parameters: Any, context: Any,
                   executemany: bool) -> None:
            # Only the template's own connections: another thread may be using another database meanwhile.
            if self.schema in str(conn.engine.url):
                recorded.append((statement, parameters, executemany, bool(getattr(context, "no_parameters", False))))

        with psycopg.connect(libpq(self.base_url), autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{self.schema}"')
        event.listen(Engine, "before_cursor_execute", record)
        try:
            _migrate(url)
        finally:
            event.remove(Engine, "before_cursor_execute", record)
        # A statement naming the template's schema would build into the template, not the test's schema.
        leaks = [s for s, p, _, _ in recorded if self.schema in s or self.schema in repr(p)]
        if leaks:
            raise AssertionError(f"the migration names its schema explicitly, it cannot be replayed: {leaks[0]}")
        if not recorded:
            raise AssertionError("no statement was recorded while migrating the template schema")
        return recorded

    def copy_to(self, url: str) -> None:
        with psycopg.connect(libpq(url)) as conn, conn.transaction(), conn.cursor() as cur:
            # As SQLAlchemy called the driver: an empty mapping still turns `%%` into `%`, no parameters do not.
            for statement, parameters, executemany, without_parameters in self.statements():
                if executemany:
                    cur.executemany(statement, parameters)
                elif without_parameters:
                    cur.execute(statement)
                else:
                    cur.execute(statement, parameters)

    def drop(self) -> None:
        if self._statements is None:
            return
        with psycopg.connect(libpq(self.base_url), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')


def is_empty(url: str) -> bool:
    """Returns whether the database behind a test URL holds no table yet (a missing SQLite file is empty)."""
    if db.is_sqlite(url):
        path = db.sqlite_path(url)
        return path is not None and not Path(path).exists()
    with psycopg.connect(libpq(url), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
                           "ON n.oid = c.relnamespace WHERE n.nspname = %s", (schema_of(url),)).fetchone()
        return row is not None and row[0] == 0


Upgrade = Callable[..., Coroutine[Any, Any, None]]


class Templates:
    """The process's templates, and the `upgrade` that copies them into the URLs `db_url` handed out."""

    def __init__(self, directory: Path, pg_url: str) -> None:
        self.sqlite = SqliteTemplate(directory)
        self.postgres = PostgresTemplate(pg_url) if pg_url else None
        self._lock = threading.Lock()

    def copy_to(self, url: str) -> None:
        """Makes the empty database at `url` a migrated one, as `db.upgrade(url)` would."""
        if db.is_sqlite(url):
            path = db.sqlite_path(url)
            assert path is not None, url
            self.sqlite.copy_to(Path(path))
            return
        assert self.postgres is not None, "no PostgreSQL template without a PostgreSQL server"
        self.postgres.copy_to(url)

    def upgrade_for(self, fresh: set[str], real: Upgrade) -> Upgrade:
        """Returns an `upgrade` for one test: to head on a database of `fresh` that is still empty, a copy of the
        template; anything else (another revision, another URL, a database already written to), `real`."""

        async def upgrade(url: str, revision: str = "head") -> None:
            with self._lock:  # a check and a copy no other caller (another thread, another task) interleaves
                if revision == "head" and url in fresh:
                    fresh.discard(url)
                    if is_empty(url):
                        self.copy_to(url)
                        return
            await real(url, revision)

        return upgrade

    def close(self) -> None:
        if self.postgres is not None:
            self.postgres.drop()
