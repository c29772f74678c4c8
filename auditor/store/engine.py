"""Engine set-up for SQLite (embedded) and PostgreSQL, and Alembic migrations run from code."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auditor.errors import SchemaError, SchemaNewerError, StoreError

if TYPE_CHECKING:  # Alembic is imported only where migrations run: read-only commands start faster without it
    from alembic.config import Config as AlembicConfig
    from sqlalchemy.engine import URL, Engine
    from sqlalchemy.ext.asyncio import AsyncEngine  # loads the ORM: imported where an async engine is made

# The code's schema revision: the newest file in migrations/versions (a test checks it is Alembic's head). Read-only
# commands compare the database with it without loading Alembic.
# Every revision this code knows, oldest first.
SCHEMA_REVISIONS = ("0001", "0002", "0003", "0004", "0005", "0006", "0007", "0008", "0009", "0010",
                    "0011")
SCHEMA_HEAD = SCHEMA_REVISIONS[-1]
# What a command tells the operator to do about a database that is missing or behind the code.
SCHEMA_HINT = "run `auditor db upgrade` or start `auditor run` once"

log = logging.getLogger(__name__)


def _parse(url: str) -> URL:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise StoreError("database.url is not a valid database URL") from None


_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+psycopg"}
_SYNC_DRIVERS = {"sqlite": "sqlite", "postgresql": "postgresql+psycopg"}


def _with_driver(url: str, drivers: dict[str, str]) -> URL:
    parsed = _parse(url)
    backend = parsed.get_backend_name()
    if backend not in drivers:
        raise StoreError(f"unsupported database backend {backend!r}: use sqlite or postgresql")
    return parsed.set(drivername=drivers[backend])


def async_url(url: str) -> URL:
    """Returns the async-driver form of a configured URL (sqlite → aiosqlite, postgresql → psycopg)."""
    return _with_driver(url, _ASYNC_DRIVERS)


def sync_url(url: str) -> URL:
    """Returns the sync-driver form of a configured URL, for Alembic."""
    return _with_driver(url, _SYNC_DRIVERS)


def is_sqlite(url: str) -> bool:
    """Returns whether the URL names an SQLite database."""
    return _parse(url).get_backend_name() == "sqlite"


def sqlite_path(url: str) -> str | None:
    """Returns the file of an SQLite URL (None for in-memory or non-SQLite URLs)."""
    parsed = _parse(url)
    if not parsed.drivername.startswith("sqlite") or not parsed.database or parsed.database == ":memory:":
        return None
    return parsed.database


def sqlite_file_missing(url: str) -> bool:
    """Returns True when the URL names an SQLite file that does not exist (connecting would create it)."""
    path = sqlite_path(url)
    return path is not None and not Path(path).is_file()


def safe_url(url: str) -> str:
    """Returns the URL with any password masked, for log lines and error messages."""
    return _parse(url).render_as_string(hide_password=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while a cycle writes; busy_timeout waits out short write locks instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _binary_lists(dbapi_connection: Any, _record: Any) -> None:
    # psycopg sends a Python list as an array in text form by default, quoting every element through a regular
    # expression in Python (psycopg 3.3 types/array.py ListDumper: ~8 µs a timestamp, ~2 µs a string); the binary
    # form packs them (~0.4 µs). Lists reach the driver only as the store's array parameters (`clauses`), each of
    # one element type, which the binary form needs.
    from psycopg.types.array import ListBinaryDumper

    getattr(dbapi_connection, "driver_connection", dbapi_connection).adapters.register_dumper(list, ListBinaryDumper)


def _ensure_sqlite_dir(url: URL) -> None:
    db = url.database
    if db and db != ":memory:" and not db.startswith("file:"):
        Path(db).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)


def create_engine_for(url: str, *, pool_size: int = 5) -> AsyncEngine:
    """Returns an AsyncEngine for the configured URL."""
    from sqlalchemy import event
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    aurl = async_url(url)
    if aurl.get_backend_name() == "sqlite":
        _ensure_sqlite_dir(aurl)
        engine = create_async_engine(aurl, poolclass=NullPool if aurl.database in (None, "", ":memory:") else None)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_async_engine(
        aurl, pool_size=pool_size, max_overflow=5, pool_pre_ping=True, connect_args={"connect_timeout": 10}
    )
    event.listen(engine.sync_engine, "connect", _binary_lists)
    return engine


def create_sync_engine_for(url: str) -> Engine:
    """Returns a sync Engine (Alembic, schema checks)."""
    from sqlalchemy import create_engine, event
    from sqlalchemy.pool import NullPool

    surl = sync_url(url)
    if surl.get_backend_name() == "sqlite":
        _ensure_sqlite_dir(surl)
        engine = create_engine(surl)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_engine(surl, poolclass=NullPool, connect_args={"connect_timeout": 10})
    event.listen(engine, "connect", _binary_lists)
    return engine


def migrations_dir() -> Path:
    """Returns the Alembic script directory: shipped inside the wheel, or the repository's `migrations/`."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise StoreError("Alembic migrations directory not found (is the package installed correctly?)")


def alembic_config(url: str) -> AlembicConfig:
    """Returns an Alembic Config bound to the URL (sync driver)."""
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(migrations_dir()))
    # Alembic's ini interpolation treats % specially.
    cfg.set_main_option("sqlalchemy.url", sync_url(url).render_as_string(hide_password=False).replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    return cfg


MIGRATION_LOCK = 0x61756469746F72  # "auditor": the advisory lock key migrations take on PostgreSQL


def _run(sync_conn: Any, cfg: AlembicConfig, action: str, revision: str) -> None:
    from alembic import command

    cfg.attributes["connection"] = sync_conn
    if action == "upgrade":
        command.upgrade(cfg, revision)
    else:
        command.downgrade(cfg, revision)


def store_error(exc: Exception, database: str) -> StoreError:
    """Returns the StoreError for a driver or SQLAlchemy error: the database by its masked name and the first line
    of the driver's message (SQLAlchemy's own text can embed the URL)."""
    reason = getattr(exc, "orig", None) or exc
    first = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
    return StoreError(f"database {database}: {first[:300]}")


def schema_error(url: str, current: str | None, *, hint: str = SCHEMA_HINT,
                 exists: bool = True) -> SchemaError | None:
    """Returns why a database at schema revision `current` cannot be used by this code (None at the head): it does
    not exist, it is behind the code (an upgrade fixes that), or at a revision this code does not know, which a
    newer auditor wrote."""
    if not exists:
        return SchemaError(f"database {safe_url(url)} does not exist: check database.url, or {hint}")
    if current == SCHEMA_HEAD:
        return None
    if current is not None and current not in SCHEMA_REVISIONS:
        return SchemaNewerError(f"database schema {current} is newer than this auditor, which knows up to "
                                f"{SCHEMA_HEAD}: upgrade the auditor")
    return SchemaError(f"database {safe_url(url)} is at schema revision {current or 'none'}, this version needs "
                       f"{SCHEMA_HEAD}: {hint}")


def _translate(exc: Exception, url: str) -> StoreError:
    return store_error(exc, safe_url(url))


async def _migrate(url: str, action: str, revision: str) -> None:
    # Alembic is synchronous; run it on the async engine's connection through run_sync (its asyncio recipe),
    # so the same driver and event loop serve migrations and the application.
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    from auditor.store.queries import schema_revision

    cfg = alembic_config(url)
    engine = create_engine_for(url)
    try:
        async with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                # Replicas starting together on a fresh database: one migrates, the others wait and then find
                # the schema at head (PostgreSQL's DDL is transactional; the lock ends with this transaction).
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            current = await conn.run_sync(schema_revision)
            if current is not None and current not in SCHEMA_REVISIONS:
                # A newer auditor migrated it: Alembic would fail on the unknown revision; nothing can be done here.
                raise schema_error(url, current) or SchemaError(current)
            await conn.run_sync(_run, cfg, action, revision)
    except (SQLAlchemyError, OSError) as exc:
        raise _translate(exc, url) from None
    finally:
        await engine.dispose()


async def upgrade(url: str, revision: str = "head") -> None:
    """Applies migrations up to `revision`."""
    await _migrate(url, "upgrade", revision)


async def downgrade(url: str, revision: str) -> None:
    """Reverts migrations down to `revision`."""
    await _migrate(url, "downgrade", revision)


async def current_revision(url: str) -> tuple[str | None, str | None]:
    """Returns (the database's revision, the code's head revision)."""
    from sqlalchemy.exc import SQLAlchemyError

    from auditor.store.queries import schema_revision

    head = SCHEMA_HEAD
    engine = create_engine_for(url)
    try:
        async with engine.connect() as conn:
            current = await conn.run_sync(schema_revision)
    except (SQLAlchemyError, OSError) as exc:
        raise _translate(exc, url) from None
    finally:
        await engine.dispose()
    return current, head


async def ping(engine: AsyncEngine) -> None:
    """Raises StoreError unless the database answers `SELECT 1`."""
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except (SQLAlchemyError, OSError) as exc:
        raise _translate(exc, engine.url.render_as_string(hide_password=True)) from None
