"""The clock seam: `Clock`, the type of `Services.clock`, and `utcnow`, the real one."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    """Returns the current time, timezone-aware UTC."""
    return datetime.now(UTC)
