"""Compliance over a period: `read_period_report`, the period report's JSON from stored history.

The period report answers "how compliant were we from `from` to `to`" from stored history only (no Katapult
call). Its arithmetic lives in `auditor.domain.periods`; the semantics, as the README states them:

- Coverage: a complete or partial run polled at t covers [t, t + min(gap to the next run, 2 × audit.interval)),
  the next run being complete, partial or failed. Failed runs cover nothing, so one ends the previous run's
  cover. Time no run covers is "no data", never counted as compliant nor as noncompliant; `coverage.gaps` lists
  every such stretch (one appears after a failed run, or when two runs are more than 2 × audit.interval apart).
  `scheduled_cycles` is the measured period divided by audit.interval, `completed_cycles` the complete and partial
  runs polled in the period.
- Now: the period is measured up to now (`period.measured_to`): time after now has not happened, so it is neither
  covered nor any verdict, and every share and no-data figure is of the measured part; `status_at_end` is the
  status just before now (or `no_data`); a period wholly ahead measures nothing.
- Per disk: its verdict intervals (`disk_states`) intersected with the coverage and the period: compliant
  seconds (compliant + waived), waived, noncompliant, unknown and no-data seconds; time in compliance % =
  compliant / (compliant + noncompliant + unknown) — unknown is not compliant. The fleet's % is the same ratio
  over every disk's sums (time-weighted), for the period and for each UTC day.
- Per rule: findings opened (opened or reopened) and resolved in the period, mean and p90 time to resolve of the
  episodes resolved in it, and the age at the period's end of the findings still open then.
- Waivers: those of the configuration in force during the period (a waiver lasts through its expiry day, UTC).

Seconds are rounded to whole seconds; percentages are computed from exact microseconds and truncated to three
decimals (100.0 means exactly all). Timestamps are ISO-8601 UTC ending in Z, as in the current report.

Its CSV, Markdown and HTML are `auditor.render.compliance`'s; `evidence` exports it with what backs it. This is the
one service module that reads the stored history (`queries.period_data`, `queries.runs_between`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from auditor.domain import periods
from auditor.domain.invocations import rpo_distribution
from auditor.domain.lifecycle import parse_waivers
from auditor.domain.models import Waiver, WaiverProblem
from auditor.domain.periods import Period
from auditor.domain.records import RunRecord, RunStatus
from auditor.domain.rules import RULES
from auditor.service.reports import iso, observation_json
from auditor.store import queries

if TYPE_CHECKING:
    from auditor.service.services import Services

DEFAULT_SPAN = timedelta(days=30)
MAX_SPAN = periods.MAX_SPAN


# ---- the period ---------------------------------------------------------------------------------------------


def resolve_period(*, start: datetime | None, end: datetime | None, now: datetime,
                   span: timedelta = DEFAULT_SPAN, max_span: timedelta = MAX_SPAN) -> Period:
    """Returns the period [start, end): `end` defaults to now (whole seconds), `start` to `span` before `end`.

    ValueError (one line, naming the problem) when start is not before end or the span exceeds `max_span`.
    """
    end = end if end is not None else now.replace(microsecond=0)
    if start is None:
        start = periods.earlier(end, span)
    if start >= end:
        raise ValueError(f"from ({iso(start)}) must be before to ({iso(end)})")
    if end - start > max_span:
        raise ValueError(f"the period from {iso(start)} to {iso(end)} is longer than {max_span.days} days")
    return Period(start, end)


def configured_waivers(raw: Sequence[Mapping[str, Any]]) -> tuple[list[Waiver], list[WaiverProblem]]:
    """Returns every well-formed configured waiver whatever its expiry, and the malformed ones' problems."""
    return parse_waivers(raw, known_rules=RULES.keys(), now=periods.EPOCH)


def _in_force_until(w: Waiver) -> datetime:
    # A waiver applies through its expiry day (UTC): it stops at the next midnight.
    midnight = datetime(w.expires.year, w.expires.month, w.expires.day, tzinfo=UTC)
    return midnight + timedelta(days=1) if midnight < periods.LATEST else periods.LATEST


def waivers_during(waivers: Sequence[Waiver], period: Period) -> list[Waiver]:
    """Returns the waivers in force at some time of the period (not expired before it), in a stable order."""
    found = {(w.rule, w.disk_id, w.policy_id or "", w.expires, w.owner, w.reason): w for w in waivers
             if _in_force_until(w) > period.start}
    return [found[k] for k in sorted(found)]


def waiver_json(w: Waiver, period: Period) -> dict[str, Any]:
    """Returns a waiver as the period report lists it: with when it stops applying and whether it did in the period."""
    return {**w.as_dict(), "in_force_until": iso(_in_force_until(w)),
            "lapsed_in_period": _in_force_until(w) <= period.end}


# ---- the period report --------------------------------------------------------------------------------------


async def read_period_report(services: Services, *, start: datetime | None = None, end: datetime | None = None,
                             span: timedelta = DEFAULT_SPAN) -> dict[str, Any]:
    """Returns the period report of [start, end) (defaults: see `resolve_period`), generated now, with every
    well-formed configured waiver (see the module docstring for what each figure means).

    ValueError (one line, naming the problem) when the period is not one `resolve_period` accepts.
    """
    # Whole seconds: the period's measured end, its length and every figure then agree to the second.
    now = services.clock().replace(microsecond=0)
    period = resolve_period(start=start, end=end, now=now, span=span)
    waivers, _ = configured_waivers(services.settings.waivers)
    data = await read_period_data(services, period=period)
    return compliance_from(data, period=period, interval=services.settings.audit.interval, waivers=waivers,
                           generated_at=now, now=now)


async def read_period_data(services: Services, *, period: Period,
                           interval: timedelta | None = None) -> queries.PeriodData:
    """Returns the stored history a period report of `period` is made of (runs from 2 × the audit interval before
    it, every disk's verdicts, the findings' lifecycle events, what was observed of the policies' runs up to the
    period's end or now); `interval` defaults to audit.interval."""
    interval = interval if interval is not None else services.settings.audit.interval
    return await services.store.read(queries.period_data, start=period.start, end=period.end,
                                     lookback=periods.earlier(period.start, 2 * interval), now=services.clock())


async def read_period_runs(services: Services, *, period: Period) -> list[RunRecord]:
    """Returns the runs polled in the period, oldest first."""
    return await services.store.read(queries.runs_between, start=period.start, end=period.end)


def compliance_from(data: queries.PeriodData, *, period: Period, interval: timedelta, waivers: Sequence[Waiver],
                    generated_at: datetime, now: datetime) -> dict[str, Any]:
    """Returns the period report from what `queries.period_data` read, measured at `now`: the part of the period
    after it has not happened, and counts as nothing (see `periods.Period`)."""
    s = periods.seconds
    period = Period(period.start, period.end, now)
    coverage = periods.build_coverage([(p.at, p.status) for p in data.polls], period=period, horizon=2 * interval)
    in_period = [p for p in data.polls if period.start <= p.at < period.end]
    by_status = {status: sum(1 for p in in_period if p.status == status)
                 for status in (RunStatus.COMPLETE, RunStatus.PARTIAL, RunStatus.FAILED)}
    completed = by_status[RunStatus.COMPLETE] + by_status[RunStatus.PARTIAL]
    # Every share is of the measured part: the cycles still to come are not yet due, nor is their time.
    length = period.measured_us
    scheduled = length // max(interval // periods.ONE_US, 1)

    tallies = periods.disk_tallies(data.verdicts, coverage)
    at_start, at_end = periods.statuses_observed(data.verdicts, coverage, tallies)
    fleet = periods.Tally()
    disks = []
    for disk_id in sorted(tallies):
        t = tallies[disk_id]
        fleet.merge(t)
        disks.append({
            "disk_id": disk_id,
            "name": data.names.get(disk_id),
            "compliance_pct": t.compliance_pct,
            "compliant_seconds": s(t.compliant),
            "waived_seconds": s(t.waived),
            "noncompliant_seconds": s(t.noncompliant),
            "unknown_seconds": s(t.unknown),
            "exempt_seconds": s(t.exempt),
            "no_data_seconds": s(length - t.judged - t.exempt),
            "status_at_start": at_start.get(disk_id),
            "status_at_end": at_end.get(disk_id),
            **observation_json(data.observed.get(disk_id)),
        })
    by_day = [{
        "date": d.day.isoformat(),
        "seconds": s(d.length_us),
        "coverage_pct": periods.pct(d.covered_us, d.length_us),
        "compliance_pct": d.tally.compliance_pct,
        "compliant_seconds": s(d.tally.compliant),
        "waived_seconds": s(d.tally.waived),
        "noncompliant_seconds": s(d.tally.noncompliant),
        "unknown_seconds": s(d.tally.unknown),
        "exempt_seconds": s(d.tally.exempt),
    } for d in periods.daily_tallies(data.verdicts, coverage)]

    rule_tallies = periods.rule_tallies(data.events, period)
    rules = []
    for rule in [*RULES, *sorted(set(rule_tallies) - set(RULES))]:
        r = rule_tallies.get(rule) or periods.RuleTally()
        mean_resolve, p90_resolve = periods.mean(r.resolve_us), periods.percentile(r.resolve_us, 90)
        mean_age = periods.mean(r.open_ages_us)
        rules.append({
            "rule": rule,
            "opened": r.opened,
            "resolved": r.resolved,
            "waived": r.waived,
            "unwaived": r.unwaived,
            "mean_time_to_resolve_seconds": s(mean_resolve) if mean_resolve is not None else None,
            "p90_time_to_resolve_seconds": s(p90_resolve) if p90_resolve is not None else None,
            "open_at_end": len(r.open_ages_us),
            "oldest_open_age_seconds": s(max(r.open_ages_us)) if r.open_ages_us else None,
            "mean_open_age_seconds": s(mean_age) if mean_age is not None else None,
            "waived_at_end": r.waived_at_end,
        })

    return {
        "generated_at": iso(generated_at),
        "period": {"from": iso(period.start), "to": iso(period.end), "seconds": s(period.length_us),
                   "measured_to": iso(period.measured_end), "measured_seconds": s(length)},
        "coverage": {
            "interval_seconds": s(interval // periods.ONE_US),
            "scheduled_cycles": scheduled,
            "completed_cycles": completed,
            "complete_cycles": by_status[RunStatus.COMPLETE],
            "partial_cycles": by_status[RunStatus.PARTIAL],
            "failed_cycles": by_status[RunStatus.FAILED],
            # Manual runs can push completed past scheduled: the share is capped at 100.
            "completed_pct": periods.pct(min(completed, scheduled), scheduled),
            "covered_seconds": s(coverage.total_us),
            "no_data_seconds": s(length - coverage.total_us),
            "coverage_pct": periods.pct(coverage.total_us, length),
            "gaps": [{"from": iso(periods.from_us(a)), "to": iso(periods.from_us(b)), "seconds": s(b - a)}
                     for a, b in coverage.gaps()],
        },
        "fleet": {
            "disks": len(disks),
            "compliance_pct": fleet.compliance_pct,
            "compliant_seconds": s(fleet.compliant),
            "waived_seconds": s(fleet.waived),
            "noncompliant_seconds": s(fleet.noncompliant),
            "unknown_seconds": s(fleet.unknown),
            "exempt_seconds": s(fleet.exempt),
            "by_day": by_day,
            "observed_rpo": rpo_distribution([d["observed_rpo_seconds"] for d in disks]),
        },
        "disks": disks,
        "rules": rules,
        "waivers": [waiver_json(w, period) for w in waivers_during(waivers, period)],
    }
