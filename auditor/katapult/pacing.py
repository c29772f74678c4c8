"""Client-side pacing of Katapult requests under the per-token, per-minute budget."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

# Longest single pause after a 429 streak: after one full window every earlier request has aged out.
_MAX_PAUSE = 60.0
# Shortest sleep while waiting for the window to free up, so waiting never spins.
_MIN_WAIT = 0.005
# A start this late (event-loop load, timer jitter) still keeps the even schedule instead of restarting it.
_LATE_TOLERANCE = 0.25


# How pacing works. README: every response carries X-RateLimit-Permitted (requests per minute for the token)
# and X-RateLimit-Remaining; the limit is per token, so every process using the token shares it. Two rules
# gate each request start, both fed from those headers:
# * spacing: one start every `window / rate` seconds (plus a small margin), where rate is
#   min(max_per_minute, last X-RateLimit-Permitted);
# * a sliding-window budget: our own start times over the last window are counted exactly; usage we cannot
#   see (another process on the same token, or requests from before we started) is estimated at every
#   response as `Permitted - Remaining - ours`, held for a few seconds (it may be a recent burst) and then
#   assumed to age out evenly over the rest of the window. A start waits while ours + theirs would pass the
#   budget minus a small reserve (for requests already in flight), so a Remaining that runs low makes us wait
#   for older requests to age out instead of running into 429s.
# After a 429 every start pauses; the pause doubles while the first request sent after a pause is refused again.
class RateLimiter:
    """Paces request starts: evenly spaced under the budget, and never over it in any sliding 60-s window."""

    def __init__(
        self,
        max_per_minute: float,
        *,
        reserve: int = 10,
        margin: float = 0.02,
        window: float = 60.0,
        slack: float = 1.0,
        hold: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if max_per_minute <= 0:
            raise ValueError("max_per_minute must be positive")
        if reserve < 0 or not 0 <= margin < 1 or window <= 0 or slack < 0 or not 0 <= hold < window:
            raise ValueError("reserve, margin, slack and hold must be non-negative (margin < 1, hold < window)")
        self._max = float(max_per_minute)
        self._reserve = reserve
        self._margin = margin
        self._window = window
        # Our own start may reach the server a little after we record it; count it a little longer.
        self._horizon = window + slack
        self._hold = hold
        self._clock = clock
        self._sleep = sleep
        self._permitted: int | None = None
        self._next_slot = -math.inf
        self._starts: deque[float] = deque()
        self._external = 0.0
        self._external_at = 0.0
        self._paused_until = -math.inf
        self._pause_set_at = -math.inf
        self._pause = 0.0
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"RateLimiter(per_minute={self.per_minute:g}, permitted={self._permitted})"

    @property
    def per_minute(self) -> float:
        """Returns the budget being paced to: min(max_per_minute, the server's last X-RateLimit-Permitted)."""
        if self._permitted is None:
            return self._max
        return min(self._max, float(self._permitted))

    @property
    def permitted(self) -> int | None:
        """Returns the last X-RateLimit-Permitted seen (or lowered to by a 429), if any."""
        return self._permitted

    @property
    def interval(self) -> float:
        """Returns the spacing between two request starts, in seconds."""
        return self._window / self.per_minute * (1.0 + self._margin)

    @property
    def window_budget(self) -> int:
        """Returns how many starts the sliding window may hold: the budget less a small reserve."""
        budget = math.floor(self.per_minute)
        return max(1, budget - min(self._reserve, budget // 10))

    async def acquire(self) -> float:
        """Waits until a request may start, records the start and returns its clock time."""
        async with self._lock:
            while True:
                now = self._clock()
                wait = self._wait(now)
                if wait <= 0:
                    break
                await self._sleep(wait)
            interval = self.interval
            # Keep the even schedule when only slightly late (timer jitter) so lateness does not add up;
            # after an idle gap start a fresh schedule from now.
            if now - self._next_slot <= max(interval / 2, _LATE_TOLERANCE):
                self._next_slot += interval
            else:
                self._next_slot = now + interval
            self._starts.append(now)
            return now

    def observe(self, *, permitted: int | None, remaining: int | None) -> None:
        """Takes in X-RateLimit-Permitted and X-RateLimit-Remaining from any response."""
        now = self._clock()
        if permitted is not None and permitted > 0:
            if permitted != self._permitted:
                logger.debug("Katapult rate limit is %d/min (pacing at %g/min)", permitted, min(self._max, permitted))
            self._permitted = permitted
        if remaining is not None and self._permitted is not None:
            self._set_external(now, used=self._permitted - max(0, remaining))

    def pause(self, seconds: float) -> None:
        """Holds every start for `seconds` from now (e.g. a Retry-After on a 503)."""
        self._paused_until = max(self._paused_until, self._clock() + max(0.0, seconds))

    def on_success(self) -> None:
        """Ends a 429 streak."""
        self._pause = 0.0

    def on_rate_limited(self, *, permitted: int | None, wait: float, started_at: float | None = None) -> float:
        """Takes in a 429: lowers the budget, treats the window as full and pauses every start; returns the pause."""
        now = self._clock()
        if permitted is not None and permitted > 0:
            self._permitted = permitted
        # Double the pause only when a request sent after the last pause began is refused again; requests that
        # were already in flight when the pause was set say nothing new.
        if started_at is None or started_at > self._pause_set_at:
            self._pause = min(_MAX_PAUSE, max(wait, 2 * self._pause))
            self._pause_set_at = now
        self._paused_until = max(self._paused_until, now + max(wait, self._pause))
        if self._permitted is not None:
            # A 429 means the server's window is full right now (Remaining is effectively 0).
            self._set_external(now, used=self._permitted)
        return max(0.0, self._paused_until - now)

    def _set_external(self, now: float, *, used: int) -> None:
        self._expire(now)
        self._external = float(max(0, used - len(self._starts)))
        # Unseen usage is not assumed to age out while every start is paused after a 429.
        self._external_at = max(now, self._paused_until)

    def _external_now(self, now: float) -> float:
        if self._external <= 0:
            return 0.0
        age = now - self._external_at - self._hold
        if age <= 0:
            return self._external
        return max(0.0, self._external * (1.0 - age / (self._window - self._hold)))

    def _expire(self, now: float) -> None:
        cutoff = now - self._horizon
        while self._starts and self._starts[0] <= cutoff:
            self._starts.popleft()

    def _wait(self, now: float) -> float:
        """Returns how long to wait before a start at `now` is allowed (0 or less: go)."""
        self._expire(now)
        external = self._external_now(now)
        budget = self.window_budget
        used = len(self._starts) + external
        # Even spacing while the window has room. Near a full window (e.g. right after the limit was lowered)
        # the window rule alone decides: starts follow old ones out of the window, which keeps the count at the
        # budget without idling behind a schedule that old, faster starts no longer justify.
        spacing = self._next_slot - now if used < budget - max(self._reserve, budget // 20) else -math.inf
        wait = max(self._paused_until - now, spacing)
        excess = used + 1 - budget
        if excess > 0:
            candidates: list[float] = []
            if self._starts:
                # Enough of our own starts age out (README: the limit is a per-token count per minute).
                index = min(len(self._starts), math.ceil(excess)) - 1
                candidates.append(self._starts[index] + self._horizon - now)
            if external > 0:
                # Unseen usage is held, then assumed to age out evenly over the rest of the window.
                rate = self._external / (self._window - self._hold)
                candidates.append(max(0.0, self._external_at + self._hold - now) + min(excess, external) / rate)
            window_wait = min(candidates) if candidates else self._window
            wait = max(wait, window_wait, _MIN_WAIT)
        return wait
