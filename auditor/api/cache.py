"""Rendered responses cached until the data behind them changes: findings change only when a run commits.

Keyed by the latest finished run (id and finish time) and the UTC day (waiver expiry and the drift window move
with the date), so a report is rebuilt once per run instead of once per request. `generated_at` in a cached report
is when it was built, which is true: the data does not change until the next run.
"""

from __future__ import annotations

import gzip
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any

from auditor.service.versions import SingleFlight


@dataclass(frozen=True, slots=True)
class Rendered:
    """A JSON body, and its gzip form for clients that accept it."""

    raw: bytes
    gz: bytes


def render(body: Any) -> Rendered:
    """Returns the compact JSON encoding of `body` and its gzip form."""
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    return Rendered(raw, gzip.compress(raw, compresslevel=5, mtime=0))


class ResponseCache:
    """A small LRU of rendered bodies; concurrent misses for one key share one build, and a build for one key
    never holds up another key's (a slow findings search does not delay the report)."""

    def __init__(self, *, size: int = 256) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, Rendered] = OrderedDict()
        self._builds = SingleFlight()

    async def get(self, key: Hashable, build: Callable[[], Awaitable[Any]]) -> Rendered:
        """Returns the cached body for `key`, building (and rendering) it if missing."""
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
            return hit

        async def make() -> Rendered:
            rendered = render(await build())
            self._items[key] = rendered
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return rendered

        return await self._builds.run(key, make)
