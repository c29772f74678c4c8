"""Property tests for the period arithmetic (`auditor.domain.periods`) against a minute-by-minute oracle.

Everything lives on a one-minute grid over a few days, so the oracle can look at every minute: which run was the
last at or before it (covered if that one was complete or partial and less than 2 × interval ago; a failed one
covers nothing), which verdict each disk had, and which UTC day it falls in. The grid starts on 2026-03-29, a
daylight-saving change in Europe: days are UTC days, 86,400 s each, whatever any local clock did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from profiles import examples

from auditor.domain import periods
from auditor.domain.periods import (
    DAY_US,
    LifecycleEvent,
    Period,
    Tally,
    Verdict,
    build_coverage,
    daily_tallies,
    disk_tallies,
    mean,
    parse_instant,
    percentile,
    rule_tallies,
)

T0 = datetime(2026, 3, 29, tzinfo=UTC)  # the EU's spring-forward day: irrelevant in UTC, which is the point
MINUTE_US = 60_000_000
SPAN = 3 * 24 * 60  # minutes on the grid: three UTC days
STATUSES = ("compliant", "waived", "noncompliant", "unknown")


def at(minute: int) -> datetime:
    return T0 + timedelta(minutes=minute)


@dataclass(frozen=True)
class World:
    period: tuple[int, int]  # minutes [start, end)
    interval: int  # minutes
    polls: list[tuple[int, str]]  # (minute, run status)
    disks: dict[str, list[tuple[int, int | None, str]]]  # per disk: (from, to or None, status), in order


@st.composite
def worlds(draw: st.DrawFn) -> World:
    start = draw(st.integers(0, SPAN - 1))
    end = draw(st.integers(start + 1, SPAN))
    interval = draw(st.integers(1, 240))
    polls = draw(st.lists(st.tuples(st.integers(-600, SPAN + 60),
                                    st.sampled_from(["complete", "partial", "failed", "running"])), max_size=30))
    disks: dict[str, list[tuple[int, int | None, str]]] = {}
    for n in range(draw(st.integers(0, 4))):
        # Change points strictly increasing (one verdict at a time per disk); the last one open or closed.
        points = sorted(set(draw(st.lists(st.integers(-300, SPAN + 300), min_size=1, max_size=8))))
        statuses = draw(st.lists(st.sampled_from(STATUSES), min_size=len(points), max_size=len(points)))
        is_open = draw(st.booleans())
        spans: list[tuple[int, int | None, str]] = []
        for i, p in enumerate(points):
            if i + 1 < len(points):
                spans.append((p, points[i + 1], statuses[i]))
            elif is_open:
                spans.append((p, None, statuses[i]))
        if not spans:
            spans.append((points[0], None, statuses[0]))
        disks[f"disk_{n}"] = spans
    return World((start, end), interval, polls, disks)


def verdicts_of(world: World) -> list[Verdict]:
    return [Verdict(disk, status, at(a), at(b) if b is not None else None)
            for disk, spans in world.disks.items() for a, b, status in spans]


def period_of(world: World) -> Period:
    return Period(at(world.period[0]), at(world.period[1]))


def coverage_of(world: World) -> periods.Coverage:
    return build_coverage([(at(m), status) for m, status in world.polls], period=period_of(world),
                          horizon=timedelta(minutes=2 * world.interval))


# ---- the oracle: look at every minute --------------------------------------------------------------------------


def covered(world: World, minute: int) -> bool:
    finished = [(m, status) for m, status in world.polls if status != "running" and m <= minute]
    if not finished:
        return False
    last = max(m for m, _ in finished)
    is_covering = any(status in ("complete", "partial") for m, status in finished if m == last)
    return is_covering and minute - last < 2 * world.interval


def verdict(world: World, disk: str, minute: int) -> str | None:
    for a, b, status in world.disks[disk]:
        if a <= minute and (b is None or minute < b):
            return status
    return None


def oracle_tally(world: World, minutes: range, disks: Sequence[str]) -> Tally:
    t = Tally()
    for minute in minutes:
        if not covered(world, minute):
            continue
        for disk in disks:
            status = verdict(world, disk, minute)
            if status is not None:
                t.add(status, MINUTE_US)
    return t


def as_tuple(t: Tally) -> tuple[int, int, int, int]:
    return t.compliant, t.waived, t.noncompliant, t.unknown


# ---- coverage -----------------------------------------------------------------------------------------------


@given(worlds())
@settings(max_examples=examples(300), deadline=None)
def test_coverage_matches_the_minute_by_minute_oracle(world: World) -> None:
    coverage = coverage_of(world)
    start, end = world.period
    expected = [m for m in range(start, end) if covered(world, m)]
    assert coverage.total_us == len(expected) * MINUTE_US
    # The gaps are exactly the uncovered minutes, as maximal runs, and with the covered part fill the period.
    uncovered = {m for m in range(start, end) if not covered(world, m)}
    from_gaps = {m for a, b in coverage.gaps() for m in range((a - periods.to_us(T0)) // MINUTE_US,
                                                               (b - periods.to_us(T0)) // MINUTE_US)}
    assert from_gaps == uncovered
    assert coverage.total_us + sum(b - a for a, b in coverage.gaps()) == period_of(world).length_us
    for (_, b1), (a2, _) in zip(coverage.gaps(), coverage.gaps()[1:], strict=False):
        assert b1 < a2  # maximal: two gaps never touch


@given(worlds(), st.integers(-600, SPAN + 60))
@settings(max_examples=examples(200), deadline=None)
def test_a_failed_run_ends_coverage_a_running_one_is_ignored(world: World, extra: int) -> None:
    base = coverage_of(world)
    running = coverage_of(World(world.period, world.interval, [*world.polls, (extra, "running")], world.disks))
    assert running.spans == base.spans
    failed = coverage_of(World(world.period, world.interval, [*world.polls, (extra, "failed")], world.disks))
    assert failed.total_us <= base.total_us
    t = periods.to_us(at(extra))
    if not any(m == extra and s in ("complete", "partial") for m, s in world.polls):
        assert failed.covered(t, t + MINUTE_US) == 0  # nothing is checked right after a failed run
        # ... and nothing before it lost cover.
        assert failed.covered(periods.to_us(at(-10_000)), t) == base.covered(periods.to_us(at(-10_000)), t)
    complete = coverage_of(World(world.period, world.interval, [*world.polls, (extra, "complete")], world.disks))
    assert complete.total_us >= base.total_us  # a successful run never removes coverage
    for a, b in base.spans:
        assert complete.covered(a, b) == b - a


# ---- per disk and per day -------------------------------------------------------------------------------------


@given(worlds())
@settings(max_examples=examples(300), deadline=None)
def test_disk_time_matches_the_oracle_and_adds_up_to_the_period(world: World) -> None:
    coverage = coverage_of(world)
    tallies = disk_tallies(verdicts_of(world), coverage)
    start, end = world.period
    length = period_of(world).length_us
    assert set(tallies) == set(world.disks)
    for disk, tally in tallies.items():
        assert as_tuple(tally) == as_tuple(oracle_tally(world, range(start, end), [disk]))
        assert tally.waived <= tally.compliant  # waived time is compliant time
        no_data = length - tally.judged
        assert 0 <= no_data <= length
        assert tally.compliant + tally.noncompliant + tally.unknown + no_data == length
        assert tally.judged <= coverage.total_us  # never more verdict than checked time


@given(worlds())
@settings(max_examples=examples(300), deadline=None)
def test_each_utc_day_matches_the_oracle_and_the_days_add_up(world: World) -> None:
    coverage = coverage_of(world)
    verdicts = verdicts_of(world)
    days = daily_tallies(verdicts, coverage)
    start, end = world.period
    disks = list(world.disks)
    total = Tally()
    for day in days:
        first = max(start, (day.day - T0.date()).days * 1440)
        last = min(end, first - first % 1440 + 1440)
        assert as_tuple(day.tally) == as_tuple(oracle_tally(world, range(first, last), disks))
        assert day.length_us == (last - first) * MINUTE_US
        assert day.covered_us == sum(covered(world, m) for m in range(first, last)) * MINUTE_US
        total.merge(day.tally)
    fleet = Tally()
    for t in disk_tallies(verdicts, coverage).values():
        fleet.merge(t)
    assert as_tuple(total) == as_tuple(fleet)  # the days partition the period
    assert sum(d.length_us for d in days) == period_of(world).length_us


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)),
       st.integers(1, 400 * 86400))
@settings(max_examples=examples(300), deadline=None)
def test_days_are_utc_days_of_86400_seconds_whatever_the_date(start: datetime, length: int) -> None:
    period = Period(start, start + timedelta(seconds=length))
    days = period.days()
    assert days[0][0] == start.date() and days[0][1] == period.start_us and days[-1][2] == period.end_us
    for (d1, _, e1), (d2, s2, _) in zip(days, days[1:], strict=False):
        assert d2 == d1 + timedelta(days=1) and e1 == s2 and s2 % DAY_US == 0
    assert all(e - s == DAY_US for _, s, e in days[1:-1])  # every inner day is whole: no 23 or 25 hour days


@given(worlds())
@settings(max_examples=examples(200), deadline=None)
def test_unknown_time_is_never_compliant(world: World) -> None:
    unknown = World(world.period, world.interval, world.polls,
                    {d: [(a, b, "unknown") for a, b, _ in spans] for d, spans in world.disks.items()})
    for tally in disk_tallies(verdicts_of(unknown), coverage_of(unknown)).values():
        assert tally.compliant == 0
        assert tally.compliance_pct in (0.0, None)


def test_a_verdict_crossing_both_edges_counts_only_its_covered_part_inside() -> None:
    period = Period(at(600), at(1200))
    runs = [(at(500), "complete"), (at(700), "partial"), (at(1000), "complete"), (at(1050), "failed"),
            (at(1080), "running")]
    coverage = build_coverage(runs, period=period, horizon=timedelta(minutes=100))
    # 500 covers [500, 600) (outside), 700 covers [700, 800), 1000 covers [1000, 1050) (the failed run ends it),
    # the running one is ignored: 150 minutes of 600.
    assert coverage.total_us == 150 * MINUTE_US
    assert [(periods.from_us(a), periods.from_us(b)) for a, b in coverage.gaps()] == [
        (at(600), at(700)), (at(800), at(1000)), (at(1050), at(1200))]
    tallies = disk_tallies([Verdict("d", "waived", at(0), at(1150)), Verdict("d", "noncompliant", at(1150), None)],
                           coverage)
    assert as_tuple(tallies["d"]) == (150 * MINUTE_US, 150 * MINUTE_US, 0, 0)
    assert tallies["d"].compliance_pct == 100.0


def test_percentages_truncate_and_never_claim_all_when_something_was_missing() -> None:
    assert periods.pct(0, 0) is None
    assert periods.pct(1, 1) == 100.0
    assert periods.pct(90 * DAY_US - 3600 * 10**6, 90 * DAY_US) == 99.953
    assert periods.pct(10**9 - 1, 10**9) == 99.999
    assert periods.pct(1, 3) == 33.333 and periods.pct(2, 3) == 66.666
    # ... nor none when something was there: one covered second in 90 days.
    assert periods.pct(10**6, 90 * DAY_US) == 0.001 and periods.pct(0, 90 * DAY_US) == 0.0


# ---- findings over the period -----------------------------------------------------------------------------------

NEXT = {  # the lifecycle's transitions: state -> possible events
    None: ("opened", "waived"),
    "open": ("resolved", "waived"),
    "waived": ("unwaived", "resolved"),
    "resolved": ("reopened", "waived"),
}
STATE_AFTER = {"opened": "open", "reopened": "open", "unwaived": "open", "waived": "waived", "resolved": "resolved"}


@st.composite
def lifecycles(draw: st.DrawFn) -> list[LifecycleEvent]:
    events = []
    for n in range(draw(st.integers(0, 6))):
        rule = draw(st.sampled_from(["unprotected-disk", "schedule-stale"]))
        state: str | None = None
        minute = draw(st.integers(-600, SPAN))
        for _ in range(draw(st.integers(1, 8))):
            kind = draw(st.sampled_from(NEXT[state]))
            events.append(LifecycleEvent(f"fp{n}", rule, "disk_x", None, at(minute), kind))
            state = STATE_AFTER[kind]
            minute += draw(st.integers(1, 900))
    return events


@given(lifecycles(), st.integers(0, SPAN - 1), st.integers(1, SPAN))
@settings(max_examples=examples(300), deadline=None)
def test_rule_figures_follow_each_findings_episodes(events: list[LifecycleEvent], start: int, length: int) -> None:
    period = Period(at(start), at(start + length))
    got = rule_tallies(events, period)
    expected: dict[str, dict[str, list[int] | int]] = {}
    by_fp: dict[str, list[LifecycleEvent]] = {}
    for e in events:
        by_fp.setdefault(e.fingerprint, []).append(e)
    for fp_events in by_fp.values():
        rule = fp_events[0].rule
        x = expected.setdefault(rule, {"opened": 0, "resolved": 0, "resolve": [], "ages": [], "waived_at_end": 0})
        episode = None
        state = None
        for e in fp_events:
            if e.at >= period.end:
                break
            inside = e.at >= period.start
            if inside and e.kind in ("opened", "reopened"):
                x["opened"] += 1  # type: ignore[operator]
            if e.kind == "resolved":
                if inside:
                    x["resolved"] += 1  # type: ignore[operator]
                    x["resolve"].append(periods.to_us(e.at) - episode)  # type: ignore[union-attr,operator]
                episode = None
            elif episode is None:
                episode = periods.to_us(e.at)
            state = STATE_AFTER[e.kind]
        if state == "open":
            x["ages"].append(period.end_us - episode)  # type: ignore[union-attr,operator]
        elif state == "waived":
            x["waived_at_end"] += 1  # type: ignore[operator]
    for rule, x in expected.items():
        g = got[rule]
        assert (g.opened, g.resolved, g.waived_at_end) == (x["opened"], x["resolved"], x["waived_at_end"])
        assert sorted(g.resolve_us) == sorted(x["resolve"])  # type: ignore[type-var]
        assert sorted(g.open_ages_us) == sorted(x["ages"])  # type: ignore[type-var]
        assert all(v > 0 for v in g.resolve_us) and all(v > 0 for v in g.open_ages_us)


def test_a_period_reaching_past_now_ages_its_open_findings_to_now_and_one_ahead_has_no_end_yet() -> None:
    events = [LifecycleEvent("fp1", "r", "d", None, at(10), "opened"),
              LifecycleEvent("fp2", "r", "d", None, at(20), "waived")]
    reaching = rule_tallies(events, Period(at(0), at(1000), now=at(100)))["r"]
    assert reaching.open_ages_us == [90 * MINUTE_US] and reaching.waived_at_end == 1 and reaching.opened == 1
    assert rule_tallies(events, Period(at(0), at(1000)))["r"].open_ages_us == [990 * MINUTE_US]  # measured whole
    ahead = rule_tallies(events, Period(at(200), at(300), now=at(100)))["r"]
    assert (ahead.opened, ahead.open_ages_us, ahead.waived_at_end) == (0, [], 0)


def test_a_period_is_measured_to_now_never_before_its_start_nor_past_its_end() -> None:
    assert Period(at(0), at(10), now=at(4)).measured_us == 4 * MINUTE_US
    assert Period(at(0), at(10), now=at(40)).measured_end == at(10)
    assert Period(at(5), at(10), now=at(1)).measured_end == at(5)  # wholly ahead: nothing measured
    assert Period(at(5), at(10), now=at(1)).days() == []
    assert Period(at(0), at(10)).measured_end == at(10)
    with pytest.raises(ValueError):
        Period(at(0), at(10), now=datetime(2026, 1, 1))  # naive


def test_a_resolution_whose_episode_start_was_pruned_has_no_time_to_resolve() -> None:
    period = Period(at(0), at(100))
    got = rule_tallies([LifecycleEvent("fp", "r", "d", None, at(10), "resolved")], period)
    assert got["r"].resolved == 1 and got["r"].resolve_us == []


@given(st.lists(st.integers(0, 10**12), min_size=1, max_size=50))
def test_mean_and_nearest_rank_p90(values: list[int]) -> None:
    ordered = sorted(values)
    p90 = percentile(values, 90)
    assert p90 in values
    assert sum(v <= p90 for v in values) >= 0.9 * len(values)  # at least 90 % at or below it
    assert sum(v < p90 for v in values) < 0.9 * len(values)  # and it is the smallest such value
    assert percentile(values, 100) == ordered[-1]
    m = mean(values)
    assert m is not None and abs(m - sum(values) / len(values)) <= 0.5


def test_mean_and_percentile_of_nothing() -> None:
    assert mean([]) is None and percentile([], 90) is None


# ---- parsing --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-30", datetime(2026, 11, 30, tzinfo=UTC)),
    ("2026-11-30T12:30:00Z", datetime(2026, 11, 30, 12, 30, tzinfo=UTC)),
    ("2026-11-30T12:30:00", datetime(2026, 11, 30, 12, 30, tzinfo=UTC)),
    ("2026-11-30T12:30:00+02:00", datetime(2026, 11, 30, 10, 30, tzinfo=UTC)),
    (" 2026-03-29T01:30:00+01:00 ", datetime(2026, 3, 29, 0, 30, tzinfo=UTC)),
])
def test_instants_parse_to_utc(text: str, expected: datetime) -> None:
    assert parse_instant(text) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "2026-13-01", "30d", "0001-01-01T00:00:00+01:00",
                                  "9999-12-31", "1969-12-31", "2026-11-30T25:00", "\x00"])
def test_bad_instants_are_value_errors(text: str) -> None:
    with pytest.raises(ValueError):
        parse_instant(text)


@given(st.text(max_size=40))
def test_parsing_anything_raises_only_value_error(text: str) -> None:
    try:
        parsed = parse_instant(text)
    except ValueError:
        return
    assert parsed.tzinfo is UTC and periods.EARLIEST <= parsed <= periods.LATEST


def test_a_period_needs_its_start_before_its_end() -> None:
    with pytest.raises(ValueError):
        Period(at(10), at(10))
    with pytest.raises(ValueError):
        Period(datetime(2026, 1, 1), datetime(2026, 1, 2))  # naive
    assert Period(at(0), at(1)).days() == [(date(2026, 3, 29), periods.to_us(at(0)), periods.to_us(at(1)))]


# ---- no data is never compliant: the whole period report over random run timelines ------------------------------


@given(worlds(), st.one_of(st.just(SPAN), st.integers(-120, SPAN + 120)))
@settings(max_examples=examples(400), deadline=None)
def test_no_data_is_never_compliant_in_the_period_report(world: World, now: int) -> None:
    """The whole period report, generated at `now` (a minute of the grid: after the period's end, or inside it, or
    before its start): no time after now is covered or counted as any status, and shares are of the time to now."""
    from auditor.service.compliance import compliance_from
    from auditor.store.queries import PeriodData, Poll

    data = PeriodData([Poll(at(m), status) for m, status in world.polls], verdicts_of(world), {}, [])
    report = compliance_from(data, period=period_of(world), interval=timedelta(minutes=world.interval), waivers=[],
                             generated_at=at(now), now=at(now))
    start, end = world.period
    until = min(end, max(now, start))  # the measured part: [start, until)

    def observed(minute: int) -> bool:  # a complete or partial run covered it, and it has happened
        return covered(world, minute) and minute < now

    assert report["period"]["measured_seconds"] == (until - start) * 60
    assert report["period"]["measured_to"] == at(until).strftime("%Y-%m-%dT%H:%M:%SZ")
    for d in report["disks"]:
        disk = d["disk_id"]
        # A disk's compliant (and every other verdict's) time is exactly its verdict over the observed minutes.
        expected = Tally()
        for minute in range(start, end):
            status = verdict(world, disk, minute)
            if observed(minute) and status is not None:
                expected.add(status, MINUTE_US)
        assert (d["compliant_seconds"], d["waived_seconds"], d["noncompliant_seconds"], d["unknown_seconds"]) == \
            tuple(periods.seconds(us) for us in as_tuple(expected))
        assert d["no_data_seconds"] == (until - start) * 60 - sum(d[k] for k in (
            "compliant_seconds", "noncompliant_seconds", "unknown_seconds", "exempt_seconds"))
        # At either edge: no_data unless a run covered that instant, and then the verdict it had (never guessed);
        # the end of a period reaching past now is now, and a period wholly ahead has no status at all.
        for key, minute in (("status_at_start", start), ("status_at_end", until - 1)):
            if until == start:
                assert d[key] == "no_data", key
            else:
                assert d[key] == (verdict(world, disk, minute) if observed(minute) else "no_data"), key
    covered_minutes = sum(observed(m) for m in range(start, end))
    coverage = report["coverage"]
    assert coverage["covered_seconds"] == covered_minutes * 60
    assert coverage["no_data_seconds"] == (until - start - covered_minutes) * 60
    assert coverage["coverage_pct"] == periods.pct(covered_minutes, until - start)
    assert sum(g["seconds"] for g in coverage["gaps"]) == coverage["no_data_seconds"]
    assert all(g["to"] <= report["period"]["measured_to"] for g in coverage["gaps"])
    assert sum(day["seconds"] for day in report["fleet"]["by_day"]) == (until - start) * 60


def test_cycles_text_never_says_of_0_scheduled() -> None:
    from auditor.render.compliance import cycles_text

    short = {"completed_cycles": 3, "scheduled_cycles": 0, "partial_cycles": 1, "failed_cycles": 0}
    assert cycles_text(short) == "3 cycle(s) completed (less than one audit interval measured) (1 partial, 0 failed)"
    assert cycles_text({**short, "scheduled_cycles": 96}) == "3 of 96 scheduled cycles completed (1 partial, 0 failed)"
