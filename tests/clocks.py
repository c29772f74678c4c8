"""A virtual clock for tests: it only moves when someone sleeps."""

from __future__ import annotations


class FakeClock:
    """A clock that only moves when someone sleeps (share it between a limiter, retry sleeps and the fake)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)
