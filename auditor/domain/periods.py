"""Period arithmetic for compliance over time: pure functions of stored runs, verdicts and finding events.

Every instant is a timezone-aware UTC datetime at the edges and an integer number of microseconds since the Unix
epoch inside (exact sums, no float drift). Periods are half-open, `[from, to)`; days are UTC days (no daylight
saving: every full day is 86,400 s).

Coverage. A complete or partial run polled at `t` covers `[t, t + min(gap to the next run, 2 × audit.interval))`,
where the next run is the next complete, partial or failed one (runs still running are ignored). Failed runs
cover nothing, so a failed run ends the previous run's cover: nothing was checked from then on (whatever it
managed to record, e.g. every disk unknown, falls in uncovered time). Time of the period no run covers is
"no data": never counted as compliant nor as noncompliant.

Now. A period is measured up to `now` (the clock of whoever reads it): time after it has not happened, so it is
neither covered nor any verdict, and it is not in the measured length the shares are taken of; a period reaching
past now is measured to now, one wholly ahead measures nothing.

Verdicts. A disk's verdict (`compliant`, `waived`, `noncompliant`, `unknown`) holds from one change to the next
(`disk_states`). Only its covered part counts: per disk, compliant time (which includes waived time), waived
time, noncompliant time, unknown time, and no-data time (the rest of the measured period: uncovered, or no
verdict).
Time in compliance = compliant / (compliant + noncompliant + unknown): unknown is not compliant. The fleet's
figure is the same ratio over the sums of every disk (time-weighted), per period and per UTC day.

Findings. Per rule, from the lifecycle events (`opened`, `reopened`, `resolved`, `waived`, `unwaived`): events
in the period by kind; an episode runs from a finding's first event (or its first after a resolution) to its
`resolved` event, and episodes resolved in the period give the time to resolve (mean and p90, nearest rank);
a finding whose last event before the period's end is `opened`, `reopened` or `unwaived` is open at the end, and
its age is the end minus its episode's start.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from auditor.vocabulary import NO_DATA, DiskVerdict, RunStatus

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_US = timedelta(microseconds=1)
US_PER_SECOND = 1_000_000
DAY_US = 86_400 * US_PER_SECOND
# The longest period a report covers (about 13 months: a year with its edges); history keeps 400 days by default.
MAX_SPAN = timedelta(days=400)
# Instants outside this range are refused, so no arithmetic around them can overflow a datetime.
EARLIEST = EPOCH
LATEST = datetime(9000, 1, 1, tzinfo=UTC)

COMPLIANT, WAIVED = DiskVerdict.COMPLIANT.value, DiskVerdict.WAIVED.value
NONCOMPLIANT, UNKNOWN = DiskVerdict.NONCOMPLIANT.value, DiskVerdict.UNKNOWN.value
# Exempt: a disk its tier exempts, judged by no rule, so neither compliant nor in the denominator.
EXEMPT = DiskVerdict.EXEMPT.value
COVERING_RUNS = frozenset({RunStatus.COMPLETE.value, RunStatus.PARTIAL.value})
FINISHED_RUNS = COVERING_RUNS | {RunStatus.FAILED.value}
OPEN_KINDS = frozenset({"opened", "reopened", "unwaived"})


def to_us(t: datetime) -> int:
    """Returns microseconds since the Unix epoch of a timezone-aware datetime."""
    if t.tzinfo is None:
        raise ValueError("naive datetime: use timezone-aware UTC")
    return (t - EPOCH) // ONE_US


def from_us(n: int) -> datetime:
    """Returns the UTC datetime `n` microseconds after the Unix epoch."""
    return EPOCH + timedelta(microseconds=n)


def earlier(t: datetime, delta: timedelta) -> datetime:
    """Returns `t - delta`, but never before EARLIEST (so a huge delta cannot overflow)."""
    return from_us(max(to_us(t) - delta // ONE_US, to_us(EARLIEST)))


def seconds(us: int) -> int:
    """Returns microseconds as whole seconds, rounded half up (deterministic, unlike float rounding)."""
    return (us + US_PER_SECOND // 2) // US_PER_SECOND


def pct(part: int, whole: int) -> float | None:
    """Returns part/whole as a percentage truncated to 3 decimals (100.0 only when exactly all, 0.0 only when none);
    None if whole is 0.

    Truncated, not rounded: a fleet with one noncompliant hour in 90 days reads 99.999, never 100.0; and a part too
    small for three decimals reads 0.001, never 0.0.
    """
    if whole <= 0:
        return None
    thousandths = part * 100_000 // whole
    return (1 if thousandths == 0 and part > 0 else thousandths) / 1000


def parse_instant(text: str) -> datetime:
    """Returns the UTC datetime of an ISO-8601 date (midnight UTC) or datetime (no offset = UTC); ValueError else."""
    value = text.strip()
    if not value:
        raise ValueError("empty: expected an ISO-8601 date or datetime, e.g. 2026-11-30 or 2026-11-30T12:00:00Z")
    try:
        parsed = datetime.fromisoformat(value)
        parsed = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ValueError(f"{value[:40]!r} is not an ISO-8601 date or datetime (e.g. 2026-11-30 or "
                         "2026-11-30T12:00:00Z)") from None
    if not EARLIEST <= parsed <= LATEST:
        raise ValueError(f"{value[:40]!r} is out of range ({EARLIEST.year}–{LATEST.year})")
    return parsed


@dataclass(frozen=True, slots=True)
class Period:
    """A half-open stretch of time `[start, end)`, both UTC, measured at `now`: what comes from `now` on has not
    happened yet, so its measured part is `[start, min(end, now))` (empty for a period wholly ahead; None: measured
    whole, as a period in the past is)."""

    start: datetime
    end: datetime
    now: datetime | None = None

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None or (self.now is not None and self.now.tzinfo is None):
            raise ValueError("a period's edges must be timezone-aware")
        if not self.start < self.end:
            raise ValueError("the period's start must be before its end")

    @property
    def measured_end(self) -> datetime:
        """Returns where the measured part ends: `end`, or `now` if earlier (never before `start`)."""
        if self.now is None:
            return self.end
        return min(self.end, max(self.now, self.start))

    @property
    def measured_end_us(self) -> int:
        """Returns where the measured part ends, in epoch microseconds."""
        return to_us(self.measured_end)

    @property
    def measured_us(self) -> int:
        """Returns the length of the measured part in microseconds (0 for a period wholly ahead)."""
        return self.measured_end_us - self.start_us

    @property
    def start_us(self) -> int:
        """Returns the start in epoch microseconds."""
        return to_us(self.start)

    @property
    def end_us(self) -> int:
        """Returns the end in epoch microseconds."""
        return to_us(self.end)

    @property
    def length_us(self) -> int:
        """Returns the length in microseconds."""
        return self.end_us - self.start_us

    def days(self) -> list[tuple[date, int, int]]:
        """Returns the UTC days the period's measured part touches as (day, start_us, end_us), clipped to it."""
        start, end = self.start_us, self.measured_end_us
        out: list[tuple[date, int, int]] = []
        if end <= start:
            return out
        midnight = start - start % DAY_US
        while midnight < end:
            out.append((from_us(midnight).date(), max(midnight, start), min(midnight + DAY_US, end)))
            midnight += DAY_US
        return out


class Coverage:
    """The covered parts of a period: sorted, disjoint, non-touching spans in epoch microseconds.

    `covered(a, b)` answers in O(log n) from prefix sums, so each verdict interval costs one lookup.
    """

    __slots__ = ("_before", "_starts", "period", "spans")

    def __init__(self, spans: Sequence[tuple[int, int]], period: Period) -> None:
        self.period = period
        self.spans = list(spans)
        self._starts = [s for s, _ in self.spans]
        self._before: list[int] = []
        total = 0
        for s, e in self.spans:
            self._before.append(total)
            total += e - s

    @property
    def total_us(self) -> int:
        """Returns the covered microseconds of the period."""
        if not self.spans:
            return 0
        s, e = self.spans[-1]
        return self._before[-1] + e - s

    def _upto(self, t: int) -> int:
        i = bisect.bisect_right(self._starts, t) - 1
        if i < 0:
            return 0
        s, e = self.spans[i]
        return self._before[i] + min(t, e) - s

    def covered(self, a: int, b: int) -> int:
        """Returns how many microseconds of `[a, b)` are covered."""
        if b <= a:
            return 0
        return self._upto(b) - self._upto(a)

    def covers(self, t: int) -> bool:
        """Returns whether the instant `t` (epoch microseconds) is covered."""
        return self.covered(t, t + 1) == 1

    def gaps(self) -> list[tuple[int, int]]:
        """Returns the uncovered stretches of the period's measured part ("no data"), in order."""
        out = []
        cursor = self.period.start_us
        for s, e in self.spans:
            if s > cursor:
                out.append((cursor, s))
            cursor = e
        if cursor < self.period.measured_end_us:
            out.append((cursor, self.period.measured_end_us))
        return out


def build_coverage(polls: Iterable[tuple[datetime, str]], *, period: Period, horizon: timedelta) -> Coverage:
    """Returns the coverage of the period by runs given as (poll time, status), in any order and range.

    A complete or partial run covers until the next finished run (complete, partial or failed) or `horizon`
    (2 × audit.interval) after it, whichever comes first; failed runs cover nothing; other statuses (running) are
    ignored. Pass the runs from `horizon` before the period's start on, so a run just before it counts. Of runs
    polled at the same instant, a covering one wins. Nothing is covered past the period's measured end (its
    `now`): no run has checked time that has not happened.
    """
    covers: dict[int, bool] = {}
    for when, status in polls:
        if status in FINISHED_RUNS:
            key = to_us(when)
            covers[key] = covers.get(key, False) or status in COVERING_RUNS
    times = sorted(covers)
    reach = horizon // ONE_US
    start, end = period.start_us, period.measured_end_us
    spans: list[tuple[int, int]] = []
    for i, t in enumerate(times):
        if not covers[t]:
            continue
        stop = t + reach
        if i + 1 < len(times):
            stop = min(stop, times[i + 1])
        a, b = max(t, start), min(stop, end)
        if a >= b:
            continue
        if spans and spans[-1][1] >= a:
            spans[-1] = (spans[-1][0], max(spans[-1][1], b))
        else:
            spans.append((a, b))
    return Coverage(spans, period)


@dataclass(frozen=True, slots=True)
class Verdict:
    """One disk's verdict from `start` until `end` (None while current)."""

    disk_id: str
    status: str
    start: datetime
    end: datetime | None


@dataclass(slots=True)
class Tally:
    """Covered microseconds by verdict; `compliant` includes `waived`."""

    compliant: int = 0
    waived: int = 0
    noncompliant: int = 0
    unknown: int = 0
    exempt: int = 0

    def add(self, status: str, us: int) -> None:
        """Adds `us` microseconds of `status` (anything unrecognised counts as unknown: never as compliant)."""
        if status == EXEMPT:
            self.exempt += us
        elif status == COMPLIANT:
            self.compliant += us
        elif status == WAIVED:
            self.compliant += us
            self.waived += us
        elif status == NONCOMPLIANT:
            self.noncompliant += us
        else:
            self.unknown += us

    def merge(self, other: Tally) -> None:
        """Adds another tally to this one."""
        self.compliant += other.compliant
        self.waived += other.waived
        self.noncompliant += other.noncompliant
        self.unknown += other.unknown
        self.exempt += other.exempt

    @property
    def judged(self) -> int:
        """Returns the covered time with a verdict: compliant + noncompliant + unknown."""
        return self.compliant + self.noncompliant + self.unknown

    @property
    def compliance_pct(self) -> float | None:
        """Returns compliant / (compliant + noncompliant + unknown) in percent, None without any judged time."""
        return pct(self.compliant, self.judged)


def _clip(v: Verdict, start: int, end: int) -> tuple[int, int]:
    a = max(to_us(v.start), start)
    b = end if v.end is None else min(to_us(v.end), end)
    return a, b


def disk_tallies(verdicts: Iterable[Verdict], coverage: Coverage) -> dict[str, Tally]:
    """Returns each disk's covered time by verdict within the coverage's period (one lookup per verdict)."""
    start, end = coverage.period.start_us, coverage.period.end_us
    out: dict[str, Tally] = {}
    for v in verdicts:
        tally = out.get(v.disk_id)
        if tally is None:
            tally = out[v.disk_id] = Tally()
        a, b = _clip(v, start, end)
        if a < b:
            tally.add(v.status, coverage.covered(a, b))
    return out


@dataclass(frozen=True, slots=True)
class DayTally:
    """One UTC day of the period: its length in the period, the covered part and the fleet's disk-time."""

    day: date
    length_us: int
    covered_us: int
    tally: Tally


def daily_tallies(verdicts: Iterable[Verdict], coverage: Coverage) -> list[DayTally]:
    """Returns the fleet's covered disk-time by verdict per UTC day, in one sweep over the verdict changes.

    The number of disks in each verdict is a step function of time; between two consecutive changes (or day
    edges) it is constant, so each step adds count × covered length. Cost: O(changes × log spans), not per disk.
    """
    period = coverage.period
    start, end = period.start_us, period.measured_end_us
    slot = {COMPLIANT: 0, WAIVED: 1, NONCOMPLIANT: 2, EXEMPT: 4}
    deltas: dict[int, list[int]] = {}
    for v in verdicts:
        a, b = _clip(v, start, end)
        if a >= b:
            continue
        k = slot.get(v.status, 3)
        deltas.setdefault(a, [0, 0, 0, 0, 0])[k] += 1
        deltas.setdefault(b, [0, 0, 0, 0, 0])[k] -= 1
    days = period.days()
    edges = sorted(set(deltas) | {d_start for _, d_start, _ in days} | {end})
    counts = [0, 0, 0, 0, 0]
    per_day = [Tally() for _ in days]
    day_starts = [d_start for _, d_start, _ in days]
    for i, t in enumerate(edges[:-1]):
        change = deltas.get(t)
        if change is not None:
            for k in range(5):
                counts[k] += change[k]
        if not any(counts):
            continue
        covered = coverage.covered(t, edges[i + 1])
        if not covered:
            continue
        tally = per_day[bisect.bisect_right(day_starts, t) - 1]
        tally.compliant += (counts[0] + counts[1]) * covered
        tally.waived += counts[1] * covered
        tally.noncompliant += counts[2] * covered
        tally.unknown += counts[3] * covered
        tally.exempt += counts[4] * covered
    return [DayTally(day, d_end - d_start, coverage.covered(d_start, d_end), tally)
            for (day, d_start, d_end), tally in zip(days, per_day, strict=True)]


def status_at(verdicts: Iterable[Verdict], instant: datetime) -> dict[str, str]:
    """Returns each disk's verdict in force just before `instant` (start < instant <= end), by disk."""
    t = to_us(instant)
    out: dict[str, str] = {}
    for v in verdicts:
        if to_us(v.start) < t and (v.end is None or to_us(v.end) >= t):
            out[v.disk_id] = v.status
    return out


def status_in_force(verdicts: Iterable[Verdict], instant: datetime) -> dict[str, str]:
    """Returns each disk's verdict in force at `instant` (start <= instant < end), by disk."""
    t = to_us(instant)
    out: dict[str, str] = {}
    for v in verdicts:
        if to_us(v.start) <= t and (v.end is None or to_us(v.end) > t):
            out[v.disk_id] = v.status
    return out


def statuses_observed(verdicts: Sequence[Verdict], coverage: Coverage, disk_ids: Iterable[str]) -> tuple[
        dict[str, str | None], dict[str, str | None]]:
    """Returns each disk's status at the period's start and just before its measured end (its end, or `now` for a
    period reaching past now): its verdict then, or `no_data` when no complete or partial run covered that instant
    (never a verdict no run observed; a period wholly ahead is `no_data` at both); None when runs covered it but
    the disk had no verdict (not audited then)."""
    period = coverage.period
    start, end = period.start_us, period.measured_end_us
    measured = end > start
    covered_at_start, covered_at_end = measured and coverage.covers(start), measured and coverage.covers(end - 1)
    at_start = status_in_force(verdicts, period.start)
    at_end = status_at(verdicts, period.measured_end)
    first: dict[str, str | None] = {}
    last: dict[str, str | None] = {}
    for disk_id in disk_ids:
        first[disk_id] = at_start.get(disk_id) if covered_at_start else NO_DATA
        last[disk_id] = at_end.get(disk_id) if covered_at_end else NO_DATA
    return first, last


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    """A finding's lifecycle transition with the finding's rule, disk and policy."""

    fingerprint: str
    rule: str
    disk_id: str
    policy_id: str | None
    at: datetime
    kind: str


@dataclass(slots=True)
class RuleTally:
    """One rule over a period: events by kind, times to resolve and ages of findings open at the end (µs)."""

    opened: int = 0  # opened or reopened in the period
    resolved: int = 0
    waived: int = 0
    unwaived: int = 0
    resolve_us: list[int] = field(default_factory=list)
    open_ages_us: list[int] = field(default_factory=list)
    waived_at_end: int = 0


def rule_tallies(events: Iterable[LifecycleEvent], period: Period) -> dict[str, RuleTally]:
    """Returns per-rule figures from lifecycle events up to the period's measured end (earlier events give episode
    starts); what is open or waived "at the end" is so at the measured end, and ages run to it (none for a period
    wholly ahead: nothing of it has happened).

    Events of one finding are taken in time order (stable for equal times). An episode whose first known event is
    a resolution (its start was pruned) has no time to resolve.
    """
    start, end = period.start_us, period.measured_end_us
    by_finding: dict[str, list[LifecycleEvent]] = {}
    for e in events:
        by_finding.setdefault(e.fingerprint, []).append(e)
    out: dict[str, RuleTally] = {}
    for fingerprint in sorted(by_finding):
        mine = sorted(by_finding[fingerprint], key=lambda e: to_us(e.at))
        episode: int | None = None
        last_kind: str | None = None
        rule = mine[-1].rule
        tally = out.get(rule)
        if tally is None:
            tally = out[rule] = RuleTally()
        for e in mine:
            at = to_us(e.at)
            if at >= end:
                break
            inside = at >= start
            if inside:
                if e.kind in ("opened", "reopened"):
                    tally.opened += 1
                elif e.kind == "resolved":
                    tally.resolved += 1
                elif e.kind == "waived":
                    tally.waived += 1
                elif e.kind == "unwaived":
                    tally.unwaived += 1
            if e.kind == "resolved":
                if inside and episode is not None:
                    tally.resolve_us.append(at - episode)
                episode = None
            elif episode is None:
                episode = at
            last_kind = e.kind
        if end <= start:
            continue  # a period wholly ahead has no end yet to be open or waived at
        if last_kind in OPEN_KINDS and episode is not None:
            tally.open_ages_us.append(end - episode)
        elif last_kind == "waived":
            tally.waived_at_end += 1
    return out


def mean(values: Sequence[int]) -> int | None:
    """Returns the integer mean (rounded half up), None for no values."""
    if not values:
        return None
    return (2 * sum(values) + len(values)) // (2 * len(values))


def percentile(values: Sequence[int], q: float) -> int | None:
    """Returns the q-th percentile (0 < q <= 100) by the nearest-rank method, None for no values."""
    if not values:
        return None
    if not 0 < q <= 100:
        raise ValueError("q must be in (0, 100]")
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)), 1) - 1]
