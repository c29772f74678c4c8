"""Compliance over a period (JSON, CSV, Markdown, HTML), the evidence export, and history pruning.

The period report answers "how compliant were we from `from` to `to`" from stored history only (no Katapult
call). Its arithmetic lives in `auditor.domain.periods`; the semantics, as the README states them:

- Coverage: a complete or partial run polled at t covers [t, t + min(gap to the next run, 2 × audit.interval)),
  the next run being complete, partial or failed. Failed runs cover nothing, so one ends the previous run's
  cover. Time no run covers is "no data", never counted as compliant nor as noncompliant; `coverage.gaps` lists
  every such stretch (one appears after a failed run, or when two runs are more than 2 × audit.interval apart).
  `scheduled_cycles` is the period divided by audit.interval, `completed_cycles` the complete and partial runs
  polled in the period.
- Per disk: its verdict intervals (`disk_states`) intersected with the coverage and the period: compliant
  seconds (compliant + waived), waived, noncompliant, unknown and no-data seconds; time in compliance % =
  compliant / (compliant + noncompliant + unknown) — unknown is not compliant. The fleet's % is the same ratio
  over every disk's sums (time-weighted), for the period and for each UTC day.
- Per rule: findings opened (opened or reopened) and resolved in the period, mean and p90 time to resolve of the
  episodes resolved in it, and the age at the period's end of the findings still open then.
- Waivers: those of the configuration in force during the period (a waiver lasts through its expiry day, UTC).

Seconds are rounded to whole seconds; percentages are computed from exact microseconds and truncated to three
decimals (100.0 means exactly all). Timestamps are ISO-8601 UTC ending in Z, as in the current report.

The evidence export writes the period report with the configuration (secrets redacted), rule parameters,
waivers, runs and a `MANIFEST.sha256`; the same database and period give byte-identical files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from pydantic import BaseModel, SecretStr

from auditor.config import RulesSettings, Settings
from auditor.domain import periods
from auditor.domain.lifecycle import parse_waivers
from auditor.domain.models import Waiver, WaiverProblem
from auditor.domain.periods import Period
from auditor.domain.records import RunRecord, RunStatus
from auditor.domain.rules import RULES
from auditor.service.reports import csv_cell, iso, md_cell, run_json
from auditor.service.services import Services
from auditor.store import pruning, queries
from auditor.store.engine import safe_url
from auditor.store.repo import Store
from auditor.vocabulary import format_duration

log = logging.getLogger(__name__)

DEFAULT_SPAN = timedelta(days=30)
MAX_SPAN = periods.MAX_SPAN
REDACTED = "<redacted>"
MANIFEST = "MANIFEST.sha256"
DISK_CSV_COLUMNS = ("disk_id", "name", "compliance_pct", "compliant_seconds", "waived_seconds",
                    "noncompliant_seconds", "unknown_seconds", "no_data_seconds", "status_at_end", "exempt_seconds")
RUN_CSV_COLUMNS = ("id", "trigger", "status", "started_at", "finished_at", "targets_checked", "disks_read",
                   "disks_unknown", "api_requests", "api_retries", "api_rate_limited", "findings_opened",
                   "findings_resolved", "error_count", "errors")


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


def recover_waivers(valid: Sequence[Waiver], problems: Sequence[WaiverProblem]) -> list[Waiver]:
    """Returns the configured waivers from (those valid now, problems of the others): expired ones included."""
    return [*valid, *configured_waivers([p.raw for p in problems])[0]]


def _in_force_until(w: Waiver) -> datetime:
    # A waiver applies through its expiry day (UTC): it stops at the next midnight.
    midnight = datetime(w.expires.year, w.expires.month, w.expires.day, tzinfo=UTC)
    return midnight + timedelta(days=1) if midnight < periods.LATEST else periods.LATEST


def waivers_during(waivers: Sequence[Waiver], period: Period) -> list[Waiver]:
    """Returns the waivers in force at some time of the period (not expired before it), in a stable order."""
    found = {(w.rule, w.disk_id, w.policy_id or "", w.expires, w.owner, w.reason): w for w in waivers
             if _in_force_until(w) > period.start}
    return [found[k] for k in sorted(found)]


def _waiver_json(w: Waiver, period: Period) -> dict[str, Any]:
    return {**w.as_dict(), "in_force_until": iso(_in_force_until(w)),
            "lapsed_in_period": _in_force_until(w) <= period.end}


# ---- the period report --------------------------------------------------------------------------------------


async def build_compliance(store: Store, *, period: Period, interval: timedelta, waivers: Sequence[Waiver],
                           generated_at: datetime) -> dict[str, Any]:
    """Returns the period report (see the module docstring for what each figure means)."""
    data = await store.read(queries.period_data, start=period.start, end=period.end,
                                     lookback=periods.earlier(period.start, 2 * interval))
    return compliance_from(data, period=period, interval=interval, waivers=waivers, generated_at=generated_at)


def compliance_from(data: queries.PeriodData, *, period: Period, interval: timedelta, waivers: Sequence[Waiver],
                    generated_at: datetime) -> dict[str, Any]:
    """Returns the period report from what `queries.period_data` read."""
    s = periods.seconds
    coverage = periods.build_coverage([(p.at, p.status) for p in data.polls], period=period, horizon=2 * interval)
    in_period = [p for p in data.polls if period.start <= p.at < period.end]
    by_status = {status: sum(1 for p in in_period if p.status == status)
                 for status in (RunStatus.COMPLETE, RunStatus.PARTIAL, RunStatus.FAILED)}
    completed = by_status[RunStatus.COMPLETE] + by_status[RunStatus.PARTIAL]
    scheduled = period.length_us // max(interval // periods.ONE_US, 1)
    length = period.length_us

    tallies = periods.disk_tallies(data.verdicts, coverage)
    at_end = periods.status_at(data.verdicts, period.end)
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
            "status_at_end": at_end.get(disk_id),
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
        "period": {"from": iso(period.start), "to": iso(period.end), "seconds": s(length)},
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
        },
        "disks": disks,
        "rules": rules,
        "waivers": [_waiver_json(w, period) for w in waivers_during(waivers, period)],
    }


async def compliance_report(services: Services, period: Period, *,
                            generated_at: datetime | None = None) -> dict[str, Any]:
    """Returns the period report with the services' settings (generated now unless `generated_at` is given)."""
    waivers, _ = configured_waivers(services.settings.waivers)
    return await build_compliance(services.store, period=period, interval=services.settings.audit.interval,
                                  waivers=waivers, generated_at=generated_at or services.clock())


# ---- renderings ---------------------------------------------------------------------------------------------


def compliance_csv(report: Mapping[str, Any]) -> str:
    """Returns the period report's disks as CSV (one row a disk)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(DISK_CSV_COLUMNS)
    for d in report["disks"]:
        writer.writerow([csv_cell(d[c]) for c in DISK_CSV_COLUMNS])
    return buf.getvalue()


def _md(text: Any) -> str:
    return md_cell(text, empty="–")


# The period report's durations (2d 3h, 4h 5m, 6m 7s; "–" when there is none): Markdown, HTML and the CLI.
_duration = partial(format_duration, style="report")


def format_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}".rstrip("0").rstrip(".") + " %"


def worst_disks(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Returns the disks that were not compliant the whole covered time, least compliant first."""
    lacking = [d for d in report["disks"] if d["compliance_pct"] != 100.0]
    return sorted(lacking, key=lambda d: (d["compliance_pct"] if d["compliance_pct"] is not None else -1.0,
                                          d["disk_id"]))


def compliance_markdown(report: Mapping[str, Any], *, max_disks: int = 100) -> str:
    """Returns the period report as Markdown (coverage, fleet by day, rules, waivers, least compliant disks)."""
    p, c, f = report["period"], report["coverage"], report["fleet"]
    lines = [f"# Backup-policy compliance {p['from']} – {p['to']}", "", f"Generated {report['generated_at']}.", "",
             f"- Fleet time in compliance: **{format_pct(f['compliance_pct'])}** over {f['disks']} disk(s)",
             f"- Coverage: {format_pct(c['coverage_pct'])} of the period checked; {c['completed_cycles']} of "
             f"{c['scheduled_cycles']} scheduled cycles completed ({c['partial_cycles']} partial, "
             f"{c['failed_cycles']} failed); no data for {_duration(c['no_data_seconds'])}", ""]
    if c["gaps"]:
        lines += ["## Gaps (no data)", "", "| from | to | length |", "|---|---|---|"]
        lines += [f"| {g['from']} | {g['to']} | {_duration(g['seconds'])} |" for g in c["gaps"]]
        lines.append("")
    lines += ["## By day (UTC)", "", "| date | coverage | compliance | noncompliant disk-time | unknown disk-time |",
              "|---|---|---|---|---|"]
    lines += [f"| {d['date']} | {format_pct(d['coverage_pct'])} | {format_pct(d['compliance_pct'])} | "
              f"{_duration(d['noncompliant_seconds'])} | {_duration(d['unknown_seconds'])} |"
              for d in f["by_day"]]
    lines += ["", "## Rules", "", "| rule | opened | resolved | mean to resolve | p90 to resolve | open at end | "
              "oldest open |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['rule']} | {r['opened']} | {r['resolved']} | "
              f"{_duration(r['mean_time_to_resolve_seconds'])} | "
              f"{_duration(r['p90_time_to_resolve_seconds'])} | {r['open_at_end']} | "
              f"{_duration(r['oldest_open_age_seconds'])} |" for r in report["rules"]]
    lines.append("")
    if report["waivers"]:
        lines += ["## Waivers in force during the period", "", "| rule | disk | policy | expires | owner | reason |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {_md(w['rule'])} | {_md(w['disk_id'])} | {_md(w['policy_id'])} | {w['expires']} | "
                  f"{_md(w['owner'])} | {_md(w['reason'])} |" for w in report["waivers"]]
        lines.append("")
    worst = worst_disks(report)
    lines += ["## Disks not compliant the whole time", ""]
    if worst:
        lines += ["| disk | name | compliance | noncompliant | unknown | no data |", "|---|---|---|---|---|---|"]
        lines += [f"| {_md(d['disk_id'])} | {_md(d['name'])} | {format_pct(d['compliance_pct'])} | "
                  f"{_duration(d['noncompliant_seconds'])} | {_duration(d['unknown_seconds'])} | "
                  f"{_duration(d['no_data_seconds'])} |" for d in worst[:max_disks]]
        if len(worst) > max_disks:
            lines.append(f"\n… and {len(worst) - max_disks} more (every disk is in the CSV and JSON).")
    else:
        lines.append("None.")
    lines.append("")
    return "\n".join(lines)


def _template_env() -> Environment:
    # Autoescape on: every value from the database or the configuration is escaped in the page.
    return Environment(loader=PackageLoader("auditor.service", "templates"), autoescape=True,
                       undefined=StrictUndefined, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)


def _day_bars(by_day: Sequence[Mapping[str, Any]], *, width: int = 720, height: int = 120) -> list[dict[str, Any]]:
    """Returns one bar a day for the inline SVG chart (x, y, width, height, title); no bar for a day without data."""
    if not by_day:
        return []
    step = width / len(by_day)
    bars = []
    for i, d in enumerate(by_day):
        value = d["compliance_pct"]
        h = 0.0 if value is None else height * value / 100
        bars.append({"x": round(i * step, 2), "y": round(height - h, 2), "w": round(max(step - 1, 1), 2),
                     "h": round(h, 2), "title": f"{d['date']}: {format_pct(value)}"})
    return bars


def compliance_html(report: Mapping[str, Any]) -> str:
    """Returns the period report as one self-contained HTML page (inline CSS and SVG, no external assets)."""
    template = _template_env().get_template("compliance.html")
    return template.render(r=report, bars=_day_bars(report["fleet"]["by_day"]), worst=worst_disks(report),
                           pct=format_pct, duration=_duration)


# ---- the evidence export ------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Returns a JSON-ready copy of a settings value with every secret redacted."""
    if isinstance(value, SecretStr):
        return REDACTED if value.get_secret_value() else ""
    if isinstance(value, BaseModel):
        return {name: _plain(getattr(value, name)) for name in sorted(type(value).model_fields)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_plain(v) for v in value]
        return sorted(items, key=json.dumps) if isinstance(value, set | frozenset) else items
    if isinstance(value, timedelta):
        return format_duration(value, style="export")
    if isinstance(value, datetime):
        return iso(value.astimezone(UTC)) if value.tzinfo else value.isoformat()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def redacted_config(settings: Settings) -> dict[str, Any]:
    """Returns the effective configuration with every secret redacted (the database URL keeps all but its password).

    Secrets are the `SecretStr` settings: API token, notifier URLs, routing keys and passwords, the heartbeat URL.
    """
    out: dict[str, Any] = _plain(settings)
    out["database"]["url"] = safe_url(settings.database.url.get_secret_value())
    # The email notifier's sender is `from` in the file (a Python keyword, so `from_` in the model).
    for notifier in out["notifiers"]:
        if "from_" in notifier:
            notifier["from"] = notifier.pop("from_")
    return out


def rules_json(rules: RulesSettings) -> dict[str, Any]:
    """Returns the rules with their severities and whether they are enabled, the default parameters and overrides."""
    return {
        "defaults": {"min_retention": rules.min_retention, "min_retention_days": rules.min_retention_days,
                     "max_interval": rules.max_interval,
                     "stale_grace": format_duration(rules.stale_grace, style="export")},
        "overrides": [{k: _plain(v) for k, v in sorted(o.model_dump(exclude_none=True).items())}
                      for o in rules.overrides],
        "rules": [{"id": rule.id, "description": rule.description, "default_severity": rule.severity.value,
                   "severity": rules.severity.get(rule.id, rule.severity.value),
                   "enabled": rule.id not in rules.disabled} for rule in RULES.values()],
    }


def waivers_json(raw: Sequence[Mapping[str, Any]], events: Sequence[periods.LifecycleEvent],
                 period: Period) -> dict[str, Any]:
    """Returns the waivers in force during the period with the waive/unwaive events of the findings they match,
    and the configured waivers that were not in force (malformed, or expired before the period)."""
    start, end = period.start, period.end
    changes = [e for e in events if e.kind in ("waived", "unwaived") and start <= e.at < end]
    well_formed: list[Waiver] = []
    not_in_force: list[dict[str, Any]] = []
    for index, item in enumerate(raw):
        parsed, problems = configured_waivers([item])
        if problems:
            not_in_force.append({"index": index, "problem": problems[0].problem, "waiver": _plain(item)})
        elif not waivers_during(parsed, period):
            not_in_force.append({"index": index, "problem": f"expired on {parsed[0].expires.isoformat()}, before "
                                 "the period", "waiver": _plain(item)})
        well_formed += parsed
    items = []
    for w in waivers_during(well_formed, period):
        mine = [e for e in changes if e.rule == w.rule and e.disk_id == w.disk_id
                and (w.policy_id is None or w.policy_id == e.policy_id)]
        items.append({**_waiver_json(w, period), "events": [
            {"at": iso(e.at), "kind": e.kind, "fingerprint": e.fingerprint, "policy_id": e.policy_id}
            for e in sorted(mine, key=lambda e: (e.at, e.fingerprint, e.kind))]})
    return {"period": {"from": iso(start), "to": iso(end)}, "waivers": items, "not_in_force": not_in_force}


def runs_csv(runs: Sequence[Mapping[str, Any]]) -> str:
    """Returns the runs as CSV (one row a run; `errors` is the run's error list as JSON)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(RUN_CSV_COLUMNS)
    for r in runs:
        row = {**r, "error_count": len(r["errors"]), "errors": json.dumps(r["errors"], sort_keys=True)}
        writer.writerow([csv_cell(row[c]) for c in RUN_CSV_COLUMNS])
    return buf.getvalue()


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def manifest(files: Mapping[str, bytes]) -> bytes:
    """Returns `sha256sum` lines (`<sha256>  <file>`) for the files, sorted by name."""
    return "".join(f"{hashlib.sha256(files[name]).hexdigest()}  {name}\n" for name in sorted(files)).encode()


async def build_evidence(services: Services, period: Period) -> dict[str, bytes]:
    """Returns the evidence files by name (MANIFEST.sha256 included); the same database and period give the same
    bytes: nothing in them reads the clock (the report's `generated_at` is the period's end)."""
    settings = services.settings
    interval = settings.audit.interval
    waivers, _ = configured_waivers(settings.waivers)
    data = await services.store.read(queries.period_data, start=period.start, end=period.end,
                                     lookback=periods.earlier(period.start, 2 * interval))
    report = compliance_from(data, period=period, interval=interval, waivers=waivers, generated_at=period.end)
    runs: list[RunRecord] = await services.store.read(queries.runs_between, start=period.start, end=period.end)
    run_items = [r for r in (run_json(run) for run in runs) if r is not None]
    files = {
        "compliance.json": _json_bytes(report),
        "compliance.csv": compliance_csv(report).encode(),
        "compliance.html": compliance_html(report).encode(),
        "config.json": _json_bytes(redacted_config(settings)),
        "rules.json": _json_bytes(rules_json(settings.rules)),
        "waivers.json": _json_bytes(waivers_json(settings.waivers, data.events, period)),
        "runs.json": _json_bytes({"period": report["period"], "runs": run_items}),
        "runs.csv": runs_csv(run_items).encode(),
    }
    files[MANIFEST] = manifest(files)
    return files


def write_evidence(files: Mapping[str, bytes], out: Path) -> list[Path]:
    """Writes the files into `out` (created if missing; files of the same name replaced atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in sorted(files):
        target = out / name
        tmp = out / f".{name}.tmp"
        tmp.write_bytes(files[name])
        os.replace(tmp, target)
        written.append(target)
    return written


# ---- pruning ------------------------------------------------------------------------------------------------


async def prune_history(services: Services) -> dict[str, int]:
    """Deletes history older than `[history] keep` (the daemon's job); returns rows deleted per table."""
    now = services.clock()
    before = now - services.settings.history.keep
    counts = await pruning.prune_history(services.store, before)
    log.info("history pruned before %s: %s", iso(before),
             ", ".join(f"{n} {table}" for table, n in counts.items()) or "nothing",
             extra={"pruned": counts, "before": iso(before)})
    return counts
