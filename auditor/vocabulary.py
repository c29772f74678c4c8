"""The auditor's shared vocabulary, each value defined once: severities, rule ids, statuses, intervals, durations.

Config, the domain and every layer above import these names; this module imports nothing of ours and only the
standard library (an import-linter contract keeps it so), which is what lets `auditor.config` use it without
reaching into the domain. Everything here is a public contract: stored in the database, written in configuration
files, sent in alerts and reports. Never rename a value.

Each closed set of strings is spelled once, as a `Literal` (pydantic validates config keys and API parameters
against it, and its `literal_error` messages are part of the config's and the API's output); the enum of the same
name binds its members to the Literal's strings in order, so the two cannot drift apart.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Final, Literal, get_args


def _strings(literal: object) -> tuple[str, ...]:
    """Returns the strings of a Literal type, in order (typed, so the enum members bound to them are str)."""
    return get_args(literal)


# ---- severities ---------------------------------------------------------------------------------------------

SeverityName = Literal["low", "medium", "high", "critical"]


class Severity(StrEnum):
    """How bad a finding is; ordered low < medium < high < critical."""

    LOW, MEDIUM, HIGH, CRITICAL = _strings(SeverityName)

    @property
    def rank(self) -> int:
        """Returns 0 for low up to 3 for critical."""
        return _SEVERITY_ORDER.index(self)


_SEVERITY_ORDER = tuple(Severity)

# ---- rule ids -----------------------------------------------------------------------------------------------
# Waivers, alerts, reports and the configuration name rules by these ids. The registry that gives each its check
# and default severity is `auditor.domain.rules.RULES`, in this order.

UNPROTECTED_DISK: Final = "unprotected-disk"
RETENTION_BELOW_MINIMUM: Final = "retention-below-minimum"
RETENTION_WINDOW_TOO_SHORT: Final = "retention-window-too-short"
INTERVAL_TOO_INFREQUENT: Final = "interval-too-infrequent"
SCHEDULE_STALE: Final = "schedule-stale"
DISK_NOT_FOUND: Final = "disk-not-found"
DISK_IN_TRASH: Final = "disk-in-trash"
OBSERVED_INTERVAL_TOO_LONG: Final = "observed-interval-too-long"
NO_BACKUP_DATA: Final = "no-backup-data"
DETACHED_FROM_COVERING_VM: Final = "detached-from-covering-vm"
RULE_IDS: Final = (
    UNPROTECTED_DISK,
    RETENTION_BELOW_MINIMUM,
    RETENTION_WINDOW_TOO_SHORT,
    INTERVAL_TOO_INFREQUENT,
    SCHEDULE_STALE,
    DISK_NOT_FOUND,
    DISK_IN_TRASH,
    OBSERVED_INTERVAL_TOO_LONG,
    NO_BACKUP_DATA,
    DETACHED_FROM_COVERING_VM,
)
# Not a rule: the alert raised while audit runs are partial or failed (notifiers may filter on it like a rule id).
AUDIT_INCOMPLETE: Final = "audit-incomplete"

# ---- statuses -----------------------------------------------------------------------------------------------

FindingStatusName = Literal["open", "resolved", "waived"]


class FindingStatus(StrEnum):
    """Where a finding is in its lifecycle."""

    OPEN, RESOLVED, WAIVED = _strings(FindingStatusName)


RunStatusName = Literal["running", "complete", "partial", "failed"]


class RunStatus(StrEnum):
    """An audit run's outcome: running, complete (every target was read), partial (some targets could not be read:
    their verdicts are unknown) or failed (nothing could be read, or the cycle itself broke)."""

    RUNNING, COMPLETE, PARTIAL, FAILED = _strings(RunStatusName)


DiskStatusName = Literal["compliant", "noncompliant", "unknown", "exempt"]


class DiskStatus(StrEnum):
    """A disk's verdict in reports; exempt: its tier exempts it (judged by no rule, never counted as compliant)."""

    COMPLIANT, NONCOMPLIANT, UNKNOWN, EXEMPT = _strings(DiskStatusName)


# A disk's verdict after one run, kept in its history: its status, or waived when every finding against it is
# waived (reports count that disk compliant).
DiskVerdictName = Literal[DiskStatusName, "waived"]


class DiskVerdict(StrEnum):
    """A disk's verdict after one run, as its history keeps it."""

    COMPLIANT, NONCOMPLIANT, UNKNOWN, EXEMPT, WAIVED = _strings(DiskVerdictName)


# A disk's status at an instant of a period report that no complete or partial run observed (never compliant).
NO_DATA: Final = "no_data"

# ---- backup intervals ---------------------------------------------------------------------------------------

IntervalName = Literal["hourly", "daily", "weekly", "monthly"]


class Interval(StrEnum):
    """A backup policy's schedule interval, as Katapult names it (most frequent first)."""

    HOURLY, DAILY, WEEKLY, MONTHLY = _strings(IntervalName)

    @property
    def rank(self) -> int:
        """Returns 0 for the most frequent interval, 3 for the least frequent."""
        return _INTERVAL_ORDER.index(self)

    @property
    def length(self) -> timedelta:
        """Returns the nominal time between two backups (a month counts as 30 days)."""
        return _INTERVAL_LENGTH[self]


_INTERVAL_ORDER = tuple(Interval)
_INTERVAL_LENGTH = {
    Interval.HOURLY: timedelta(hours=1),
    Interval.DAILY: timedelta(days=1),
    Interval.WEEKLY: timedelta(days=7),
    Interval.MONTHLY: timedelta(days=30),
}
# The longest step between two observed runs a tier's `max_interval` allows (before `stale_grace`): a month may
# have 31 days.
OBSERVED_INTERVAL_LIMIT: Final = {
    Interval.HOURLY: timedelta(hours=1),
    Interval.DAILY: timedelta(hours=24),
    Interval.WEEKLY: timedelta(days=7),
    Interval.MONTHLY: timedelta(days=31),
}

# ---- durations ----------------------------------------------------------------------------------------------
# The configuration's syntax: a number and a unit ("90s", "15m", "2h", "7d"), or a bare number of seconds.

_US = 1_000_000
_WHOLE_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))  # largest first
_UNITS: dict[str, float] = {"ms": 0.001, **dict(_WHOLE_UNITS), "w": 604800}
_DURATION = re.compile(rf"^\s*(\d+(?:\.\d+)?)\s*({'|'.join(_UNITS)})?\s*$")
# Longer durations are refused: added to today's date they would pass year 9999, Python's last, and fail later
# (a schedule, a cutoff) instead of here. "Never" is spelled 0 where a key allows it.
MAX_DURATION = timedelta(days=36500)


def parse_duration(value: Any) -> timedelta:
    """Returns a timedelta from "90s", "15m", "2h", "7d", a bare number of seconds or a timedelta (at most
    MAX_DURATION, 100 years)."""
    seconds: float
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise ValueError("expected a duration like 90s, 15m, 2h or 7d")
    elif isinstance(value, int | float):
        if isinstance(value, int) and abs(value) >= 10**18:
            # float() of an int past 1e308 raises OverflowError; an int this large is out of range either way.
            seconds = math.inf if value > 0 else -math.inf
        else:
            seconds = float(value)
    else:
        match = _DURATION.match(value) if isinstance(value, str) else None
        if not match:
            raise ValueError(f"expected a duration like 90s, 15m, 2h or 7d, got {value!r}"[:200])
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds != seconds:  # NaN
        raise ValueError("expected a duration like 90s, 15m, 2h or 7d, got NaN")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"a duration can be at most {MAX_DURATION.days}d (100 years)")
    return value if isinstance(value, timedelta) else timedelta(seconds=seconds)


# Every shape a duration is printed in. Each is part of an output operators read or parse, so none changes; a new
# caller picks the shape of the surface it writes to.
DurationStyle = Literal["config", "export", "report", "alert", "age", "overdue", "wait", "elapsed"]


def format_duration(value: timedelta | float | None, *, style: DurationStyle = "config") -> str:
    """Returns a duration (a timedelta or seconds) as text in one of the auditor's shapes; None is "–".

    - config: the configuration's syntax, the largest exact unit (90s, 15m, 4h, 7d, 500ms, 1.5s): check-config,
      config errors, notifier warnings.
    - export: the same syntax as the evidence export has always written it (0 is "0d", fractions "0.5s").
    - report: the leading unit and the next (2d 3h, 4h 0m, 6m 7s, 7s): the period compliance report.
    - alert: the two largest non-zero units (3h 12m, 2d, 45s; negative is 0s): how long an alert lasted.
    - age: words for the dashboard (45s, 12 min, 5 h 3 min, 3 d).
    - overdue: hours and padded minutes (1h 05m, 12m): how late a scheduled backup is, in finding messages.
    - wait: one unit, rounded up (40s, 12m, 3h): waits announced to people.
    - elapsed: seconds with two decimals below 10 s (1.23s, 42s): a run's wall time.
    """
    if value is None:
        return "–"
    if style == "config":
        return _config(_micros(value))
    if style == "export":
        return _export(_micros(value))
    if style == "report":
        return _report(int(value.total_seconds()) if isinstance(value, timedelta) else int(value))
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if style == "alert":
        return _alert(max(int(seconds), 0))
    if style == "age":
        return _age(max(int(seconds), 0))
    if style == "overdue":
        hours, minutes = divmod(int(seconds // 60), 60)
        return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m"
    if style == "wait":
        return _wait(math.ceil(seconds))
    if style == "elapsed":
        return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.0f}s"
    raise ValueError(f"unknown duration style {style!r}")


def _micros(value: timedelta | float) -> int:
    if not isinstance(value, timedelta):
        value = timedelta(seconds=value)
    return (value.days * 86400 + value.seconds) * _US + value.microseconds


def _config(us: int) -> str:
    sign, us = ("-", -us) if us < 0 else ("", us)
    for unit, size in _WHOLE_UNITS:
        if us and us % (size * _US) == 0:
            return f"{sign}{us // (size * _US)}{unit}"
    if us == 0:
        return "0s"
    if us < _US and us % 1000 == 0:
        return f"{sign}{us // 1000}ms"
    return f"{sign}{us / _US:g}s"


def _export(us: int) -> str:
    for unit, size in _WHOLE_UNITS:
        if us % (size * _US) == 0:
            return f"{us // (size * _US)}{unit}"
    return f"{us / _US}s"


def _report(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def _alert(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")) if n]
    return " ".join(parts[:2]) if parts else "0s"


def _age(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def _wait(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{math.ceil(seconds / 60)}m"
    return f"{math.ceil(seconds / 3600)}h"


# ---- instants ------------------------------------------------------------------------------------------------


def format_instant(value: datetime | None) -> str | None:
    """Returns an instant as ISO 8601 with `Z` for UTC, at the precision it has (None stays None): how findings'
    observed values and stored records spell a time."""
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


# ---- percentages --------------------------------------------------------------------------------------------


def format_percent(value: float | None, *, decimals: int = 1, sep: str = "") -> str:
    """Returns a percentage for people with at most `decimals` decimals (trailing zeros dropped), `sep` before the
    "%"; None is "n/a". Never 0 or 100 when the value is not: 0.021 at one decimal is "< 0.1%", 99.97 "> 99.9%"."""
    if value is None:
        return "n/a"
    if value <= 0 or value >= 100:
        return f"{0 if value <= 0 else 100}{sep}%"
    step = 10.0 ** -decimals
    text = f"{value:.{decimals}f}"
    if float(text) <= 0:
        return f"< {step:.{decimals}f}{sep}%"
    if float(text) >= 100:
        return f"> {100 - step:.{decimals}f}{sep}%"
    return (text.rstrip("0").rstrip(".") if "." in text else text) + f"{sep}%"


# ---- remediation --------------------------------------------------------------------------------------------
# What `auditor plan` proposes and what `auditor apply` did with each change: stored, shown in history, the API and
# the evidence bundle. Never rename a value.

ChangeKindName = Literal["create-policy", "raise-retention", "shorten-interval"]


class ChangeKind(StrEnum):
    """What one planned change does: create a policy, raise a policy's retention, run a policy more often."""

    CREATE_POLICY, RAISE_RETENTION, SHORTEN_INTERVAL = _strings(ChangeKindName)


RemediationStatusName = Literal["intent", "applied", "stale", "refused", "failed", "not-attempted", "interrupted"]


class RemediationStatus(StrEnum):
    """A change's outcome: intent (recorded before the write, outcome not yet known), applied, stale (its
    precondition no longer held: left alone), refused (Katapult answered with an error), failed (no answer),
    not-attempted (past remediation.max_changes), interrupted (a process stopped between intent and outcome; a
    later apply re-read Katapult and recorded what it found)."""

    INTENT, APPLIED, STALE, REFUSED, FAILED, NOT_ATTEMPTED, INTERRUPTED = _strings(RemediationStatusName)


PolicyTargetName = Literal["disk", "vm"]
