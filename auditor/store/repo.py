"""Where the store's statements run: `Store` on the async engine (the daemon, the API, the dashboard, `audit
--once`), `Reader` on a synchronous engine (the one-shot read-only commands), and `Transaction` for a use case
that reads and writes as one.

Each runs the same plain functions of a Core `Connection` (`queries` for reads; `writes`, `leases`, `outbox`,
`pruning` for writes): the async side through `AsyncConnection.run_sync`, the sync side directly. There is no
second definition of any statement here. SQLAlchemy's errors become `StoreError`s naming the database by its
masked URL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from auditor.errors import LeaseLostError
from auditor.store import leases, queries
from auditor.store.engine import async_url, create_engine_for, create_sync_engine_for, ping, safe_url, store_error
from auditor.store.holders import Term

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

P = ParamSpec("P")
T = TypeVar("T")
Statement = Callable[Concatenate["Connection", P], T]


class Store:
    """The store on an async engine: `read` and `write` run a statement function on a connection of their own."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.database = engine.url.render_as_string(hide_password=True)

    @classmethod
    def from_url(cls, url: str, *, pool_size: int = 5) -> Store:
        """Returns a Store on a new engine for the URL."""
        return cls(create_engine_for(url, pool_size=pool_size))

    def __repr__(self) -> str:
        return f"Store({safe_url(self.database)})"

    @property
    def kind(self) -> str:
        """Returns the database kind: "sqlite" or "postgresql" (SQLAlchemy's dialect name)."""
        return str(self.engine.dialect.name)

    async def close(self) -> None:
        """Disposes of the engine's connections."""
        await self.engine.dispose()

    async def ping(self) -> None:
        """Raises StoreError unless the database answers."""
        await ping(self.engine)

    async def read(self, fn: Statement[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Returns `fn(connection, *args, **kwargs)` run on a connection of its own (no transaction kept)."""
        try:
            async with self.engine.connect() as conn:
                return await conn.run_sync(fn, *args, **kwargs)
        except (SQLAlchemyError, OSError) as exc:
            raise store_error(exc, self.database) from None

    async def write(self, fn: Statement[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Returns `fn(connection, *args, **kwargs)` run in a transaction of its own, committed when it returns."""
        try:
            async with self.engine.begin() as conn:
                return await conn.run_sync(fn, *args, **kwargs)
        except (SQLAlchemyError, OSError) as exc:
            raise store_error(exc, self.database) from None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """Yields a Transaction: everything done through it commits together, or nothing does."""
        try:
            async with self.engine.begin() as conn:
                yield Transaction(conn)
        except (SQLAlchemyError, OSError) as exc:
            raise store_error(exc, self.database) from None

    def can_reopen(self) -> bool:
        """Returns whether a second engine on this database sees the same data (not for in-memory SQLite)."""
        url = self.engine.url
        return url.get_backend_name() != "sqlite" or url.database not in (None, "", ":memory:")

    def reopened(self) -> Store:
        """Returns a new Store (its own engine and connections) on the same database, for reads on another
        thread's event loop: an engine's connections belong to the loop that opened them. The caller closes it."""
        return Store.from_url(self.engine.url.render_as_string(hide_password=False), pool_size=2)


class Transaction:
    """One database transaction: a use case reads and writes through it and it commits as one."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def run(self, fn: Statement[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Returns `fn(connection, *args, **kwargs)` run inside this transaction."""
        return await self._conn.run_sync(fn, *args, **kwargs)

    async def fence(self, *terms: Term, now: datetime, ttl: timedelta) -> None:
        """Renews each term's lease inside this transaction, or raises LeaseLostError: what the transaction writes
        is refused once any of the terms is over (expired, taken, released, or taken again under a later epoch)."""
        for term in terms:
            if await self.run(leases.renew, term, now=now, ttl=ttl) != 1:
                current = await self.run(queries.lease, term.name)
                who = f"{current.describe()}, epoch {current.epoch}" if current and current.is_live(now) else "nobody"
                raise LeaseLostError(f"the {term.name} lease of epoch {term.epoch} is no longer ours (now held by "
                                     f"{who}); nothing was written")


class Reader:
    """The store on a synchronous engine, for a one-shot read-only command: no asyncio, no ORM."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.database = async_url(url).render_as_string(hide_password=True)  # worded as the Store names it
        self.engine: Engine = create_sync_engine_for(url)

    def close(self) -> None:
        """Disposes of the engine's connections."""
        self.engine.dispose()

    @contextmanager
    def _errors(self, database: str) -> Iterator[None]:
        try:
            yield
        except (SQLAlchemyError, OSError) as exc:
            raise store_error(exc, database) from None

    def revision(self) -> str | None:
        """Returns the database's schema revision (errors name the configured URL, as `engine.current_revision`)."""
        with self._errors(safe_url(self.url)), self.engine.connect() as conn:
            return queries.schema_revision(conn)

    def read(self, fn: Statement[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Returns `fn(connection, *args, **kwargs)` run on a connection of its own."""
        with self._errors(self.database), self.engine.connect() as conn:
            return fn(conn, *args, **kwargs)

