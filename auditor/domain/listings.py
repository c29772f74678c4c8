"""What a listing asks for and what it gives back: finding filters and pages (API and dashboard), run summaries for
the trend charts, and the opaque keyset cursor. Plain values: the store runs them, the API and pages build them."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from auditor.domain.models import FindingStatus, TrackedFinding

# Every finding status, in the order listings name them (`all` in the API, the CLI and the dashboard).
ALL_STATUSES: tuple[str, ...] = (FindingStatus.OPEN.value, FindingStatus.WAIVED.value, FindingStatus.RESOLVED.value)
SortKey = Literal["severity", "rule", "disk", "status", "first_seen", "last_seen"]
SORT_KEYS: tuple[SortKey, ...] = ("severity", "rule", "disk", "status", "first_seen", "last_seen")


@dataclass(frozen=True, slots=True)
class FindingQuery:
    """Filters and keyset paging for listing findings (the API)."""

    statuses: tuple[str, ...] = (FindingStatus.OPEN.value, FindingStatus.WAIVED.value)
    rule: str | None = None
    severity: str | None = None
    disk_id: str | None = None
    limit: int = 100
    cursor: str | None = None
    tier: str | None = None  # only findings of disks in this tier (their latest reading's)


@dataclass(frozen=True, slots=True)
class FindingSearch:
    """Filters, order and page of a findings search (`org` is a disk source such as `org:<ref>` or `config`)."""

    statuses: tuple[str, ...] = (FindingStatus.OPEN.value,)
    rule: str | None = None
    severity: str | None = None
    org: str | None = None
    text: str | None = None  # a substring of the disk id or name, any case
    sort: SortKey = "severity"
    tier: str | None = None  # the disk's [[tiers]] entry
    descending: bool = True
    offset: int = 0
    limit: int = 50


@dataclass(frozen=True, slots=True)
class FindingListing:
    """A finding with what the list shows of its disk (its `observed` and `expected` are not read: empty)."""

    finding: TrackedFinding
    disk_name: str | None
    disk_source: str | None
    disk_tier: str | None = None


@dataclass(frozen=True, slots=True)
class RunPoint:
    """One finished run's summary (a row of `run_summaries`): the fleet as it stood after the run."""

    run_id: str
    started_at: datetime
    finished_at: datetime | None
    status: str
    disks_total: int
    compliant: int
    noncompliant: int
    unknown: int
    open_by_severity: dict[str, int]
    requests: int
    duration_seconds: float


def encode_cursor(key: tuple[str, str]) -> str:
    """Returns an opaque cursor for keyset paging."""
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    """Returns the keyset position in a cursor; ValueError if it is not one of ours."""
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, TypeError) as exc:
        raise ValueError("invalid cursor") from exc
    if not (isinstance(raw, list) and len(raw) == 2 and all(isinstance(x, str) for x in raw)):
        raise ValueError("invalid cursor")
    try:  # JSON may escape lone surrogates, which no database can compare with
        for part in raw:
            part.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("invalid cursor") from None
    if any("\x00" in part for part in raw):
        raise ValueError("invalid cursor")
    return raw[0], raw[1]
