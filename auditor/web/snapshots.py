"""The dashboard's caches: one snapshot of the data per data version, built off the event loop and shared by every
request that waits for it; pages rendered once per snapshot, with slots for what differs per request.

A data version is what the API's response cache keys on: the latest finished run (id and finish time) and the
UTC day. A request never gets a page of an older version than the one it looked up: when a run commits, the first
request to see it starts the new snapshot's build (in a worker thread, over a second engine on the same database:
`queries.off_loop`, so the event loop keeps serving everything else) and every request for the new version waits
for that one build.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from markupsafe import Markup

from auditor.service.dashboard import Snapshot
from auditor.service.versions import SingleFlight

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# A slot is a marker no data can contain: NUL (PostgreSQL refuses it in text, pages never render one) around a
# random per-process nonce.
_SLOT = f"\x00{secrets.token_hex(8)}:"


def slot(name: str) -> Markup:
    """Returns the marker of a per-request value, to render in its place (see `Slotted`)."""
    return Markup(f"{_SLOT}{name}\x00")


class Slotted:
    """A rendered page with slots: rendered once, then each request fills the slots (HTML it passes, already
    escaped: the CSRF token, the time the page is read at, …) and sends the bytes."""

    __slots__ = ("_names", "_parts", "size")

    def __init__(self, html: str) -> None:
        first, *rest = html.split(_SLOT)
        self._parts = [first.encode()]
        self._names: list[str] = []
        for piece in rest:
            name, _, text = piece.partition("\x00")
            self._names.append(name)
            self._parts.append(text.encode())
        self.size = sum(len(p) for p in self._parts)

    @property
    def names(self) -> frozenset[str]:
        """Returns the names of the page's slots."""
        return frozenset(self._names)

    def fill(self, values: Mapping[str, str | bytes]) -> bytes:
        """Returns the page with every slot replaced by its value (text, or already UTF-8)."""
        out = [self._parts[0]]
        for name, part in zip(self._names, self._parts[1:], strict=True):
            value = values[name]
            out.append(value if isinstance(value, bytes) else value.encode())
            out.append(part)
        return b"".join(out)


class LRU(Generic[K, V]):
    """A small least-recently-used map."""

    def __init__(self, *, size: int) -> None:
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        """Returns the value of `key` (now the most recently used), or None."""
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
        return hit

    def put(self, key: K, value: V) -> None:
        """Stores a value, dropping the least recently used beyond `size`."""
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def clear(self) -> None:
        """Drops every value."""
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True, eq=False)
class Built:
    """A snapshot with what the pages precompute from it (`rows`: each indexed finding's table row, rendered and
    encoded)."""

    serial: int  # 1, 2, …: which build this was (page caches key on it)
    version: Hashable
    started: float  # time.monotonic() when its reads began
    snapshot: Snapshot
    rows: dict[str, bytes] = field(default_factory=dict)


class Snapshots:
    """The snapshot of the newest data version: built once per version by `build`, shared by every waiter.

    `get(version, seen_at)` returns the current snapshot if it is of `version`, or was read after `seen_at` (the
    time the caller looked the version up: it is at least as new); else it waits for a build that began after
    `seen_at` (sharing an in-flight one that did, or one started for the same version), starting one if needed.
    """

    def __init__(self, build: Callable[[], Awaitable[tuple[Hashable, Snapshot, dict[str, bytes]]]]) -> None:
        self._build = build
        self.current: Built | None = None
        self._flights = SingleFlight()
        self._pending: tuple[int, Hashable | None, float] | None = None  # serial, version it is for, start
        self._serial = 0

    @property
    def builds(self) -> int:
        """Returns how many builds were started."""
        return self._flights.started

    async def get(self, version: Hashable, seen_at: float) -> Built:
        """Returns a snapshot at least as new as `version` (looked up at monotonic time `seen_at`)."""
        current = self.current
        if current is not None and (current.version == version or current.started >= seen_at):
            return current
        pending = self._pending
        if pending is not None and self._flights.pending(pending[0]) and (pending[1] == version
                                                                          or pending[2] >= seen_at):
            serial = pending[0]
        else:
            self._serial += 1
            serial = self._serial
            self._pending = (serial, version, time.monotonic())
        return await self._flights.run(serial, lambda: self._make(serial))

    async def _make(self, serial: int) -> Built:
        started = time.monotonic()
        version, snap, rows = await self._build()
        built = Built(serial=serial, version=version, started=started, snapshot=snap, rows=rows)
        if self.current is None or self.current.started < started:
            self.current = built
        return built
