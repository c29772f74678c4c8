"""What the read side caches on: the data's version (the latest finished run and the UTC day), looked up at most
once a `version_ttl` by all concurrent requests together, and `SingleFlight`, which lets concurrent callers share
one in-flight build. The API's response cache and the dashboard's snapshots both use them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from auditor.domain.records import RunRecord
from auditor.service.queries import read_latest_run

if TYPE_CHECKING:
    from auditor.service.services import Services

T = TypeVar("T")


class SingleFlight:
    """Builds per key where concurrent callers for one key share one in-flight build (a failed build is shared by
    its waiters, then forgotten: the next call builds again). A caller that gives up does not cancel the build."""

    def __init__(self) -> None:
        self._tasks: dict[Hashable, asyncio.Future[Any]] = {}
        self.started = 0  # builds started, for tests and benchmarks

    def start(self, key: Hashable, build: Callable[[], Awaitable[T]]) -> asyncio.Future[T]:
        """Returns the in-flight build of `key`, starting it if there is none."""
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.ensure_future(build())
            self.started += 1
            self._tasks[key] = task

            def done(t: asyncio.Future[Any]) -> None:
                if self._tasks.get(key) is t:
                    del self._tasks[key]
                if not t.cancelled():
                    t.exception()  # retrieved: a failure nobody awaited any more is not logged as unhandled

            task.add_done_callback(done)
        return task

    async def run(self, key: Hashable, build: Callable[[], Awaitable[T]]) -> T:
        """Returns the result of the in-flight build of `key` (started if there is none)."""
        return await asyncio.shield(self.start(key, build))

    def pending(self, key: Hashable) -> bool:
        """Returns whether a build of `key` is in flight."""
        return key in self._tasks


def data_version(run: RunRecord | None, now: datetime) -> Hashable:
    """Returns the data's version: the latest run (id, finish time) and the UTC day (waiver expiry and the drift
    window move with the date)."""
    return (run.id, run.finished_at) if run else None, now.date()


class DataVersion:
    """The data's current version, looked up at most every `ttl` seconds (the daemon: 1 s; 0: every time).

    Requests that find it due at the same time share one lookup (at 20 concurrent requests, one query a second
    instead of a burst of 20 that would each check out a database connection).
    """

    def __init__(self, services: Services, *, ttl: float) -> None:
        self.services = services
        self.ttl = ttl
        self._value: Hashable = None
        self._checked = -1.0
        self._lookups = SingleFlight()

    async def get(self) -> tuple[Hashable, float]:
        """Returns the current version and when (time.monotonic()) it was looked up."""
        ttl = self.ttl
        if ttl <= 0:
            return await self._lookup()  # every request its own look: what it gets is never older than it
        if time.monotonic() - self._checked < ttl:
            return self._value, self._checked
        return await self._lookups.run("version", self._lookup)

    async def _lookup(self) -> tuple[Hashable, float]:
        checked = time.monotonic()
        value = data_version(await read_latest_run(self.services), self.services.clock())
        if checked > self._checked:
            self._value, self._checked = value, checked
        return value, checked
