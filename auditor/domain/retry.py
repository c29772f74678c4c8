"""Retrying over HTTP: reading a Retry-After header and the backoff between attempts, for Katapult and notifiers.

Pure: callers pass `now` and, for jitter, a random source. What a caller does with the numbers (Katapult gives up
when the server asks for more than its retry budget; the delivery stage honours a receiver only up to
`notify.max_retry_after`) stays with the caller.
"""

from __future__ import annotations

import math
import random as _random
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

# RFC 9111 §1.2.2: a delta-seconds too large to represent is taken as 2**31 seconds; HTTP-dates are capped alike.
RETRY_AFTER_CEILING = float(2**31)
_DELTA_SECONDS = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
# Past this many doublings the ceiling is `cap` anyway; the bound keeps 2.0**n finite for any attempt count.
MAX_EXPONENT = 62


def parse_retry_after(value: str | None, *, now: datetime) -> float | None:
    """Returns the seconds a Retry-After header asks for (delta-seconds or HTTP-date, RFC 9110 §10.2.3), finite
    and within [0, 2**31]; None when absent, unreadable or a negative number of seconds."""
    if not value:
        return None
    value = value.strip()
    # Any decimal number is read (the RFC grammar is digits only, but "1.5" is clear enough); "inf", "nan", "1_0"
    # and non-ASCII digits, which float() would also take, are not numbers on the wire.
    if _DELTA_SECONDS.fullmatch(value):
        seconds = float(value)  # too many digits gives inf, which the ceiling turns into 2**31
        # A negative delay is not a delay: the caller falls back to its own wait, as for any unreadable value.
        return None if seconds < 0 else min(seconds, RETRY_AFTER_CEILING)
    try:
        when = parsedate_to_datetime(value)
        if when.tzinfo is None:  # RFC 9110 dates are GMT; parsedate_to_datetime returns naive for "-0000"
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    except (TypeError, ValueError, IndexError, OverflowError):  # a year or offset beyond what datetime holds
        return None
    # A date already past asks for no wait at all.
    return min(max(seconds, 0.0), RETRY_AFTER_CEILING)


def clamp_retry_after(seconds: float | None, *, maximum: timedelta) -> float | None:
    """Returns `seconds` within [0, maximum] (None stays None, and so does NaN: there is nothing to honour)."""
    if seconds is None or math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), max(maximum.total_seconds(), 0.0))


def backoff(
    attempt: int,
    *,
    base: float,
    cap: float,
    retry_after: float | None = None,
    max_retry_after: timedelta | None = None,
    random: Callable[[], float] = _random.random,
) -> float:
    """Returns seconds to wait before retry number `attempt` (1 = first retry): full jitter over
    min(cap, base * 2**(attempt-1)), never less than `retry_after` (clamped to [0, max_retry_after], or to
    [0, 2**31] without a maximum) when the server sent one; always finite.

    `random` returning 1.0 gives the plain exponential schedule without jitter.
    """
    exponent = min(max(attempt, 1) - 1, MAX_EXPONENT)
    delay = random() * min(cap, base * 2.0**exponent)
    # A Retry-After is honoured, but only up to the maximum: "Retry-After: 99999999999" must neither park a
    # notification for centuries nor overflow `now + timedelta(seconds=wait)`.
    maximum = max_retry_after if max_retry_after is not None else timedelta(seconds=RETRY_AFTER_CEILING)
    honoured = clamp_retry_after(retry_after, maximum=maximum)
    if honoured is not None:
        delay = max(delay, honoured)
    return delay
