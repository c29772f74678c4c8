"""The period report (`compliance.compliance_from`'s JSON) as CSV, Markdown and one self-contained HTML page."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

from auditor.render.cells import csv_cell, md_cell
from auditor.vocabulary import format_duration, format_percent

DISK_CSV_COLUMNS = ("disk_id", "name", "compliance_pct", "compliant_seconds", "waived_seconds",
                    "noncompliant_seconds", "unknown_seconds", "no_data_seconds", "status_at_end", "exempt_seconds",
                    "status_at_start", "last_invocation_at", "observed_rpo_seconds", "observed_since")


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
    """Returns a percentage with up to three decimals (trailing zeros dropped), or n/a; never 0 or 100 when it is
    not ("< 0.001 %", "> 99.999 %")."""
    return format_percent(value, decimals=3, sep=" ")


def cycles_text(coverage: Mapping[str, Any]) -> str:
    """Returns how many cycles completed of those scheduled ("3 of 96 scheduled cycles completed (1 partial, 0
    failed)"); when less than one audit interval was measured none was scheduled, and it says so instead of "of 0"."""
    c = coverage
    done = (f"{c['completed_cycles']} of {c['scheduled_cycles']} scheduled cycles completed" if c["scheduled_cycles"]
            else f"{c['completed_cycles']} cycle(s) completed (less than one audit interval measured)")
    return f"{done} ({c['partial_cycles']} partial, {c['failed_cycles']} failed)"


def rpo_text(rpo: Mapping[str, Any]) -> str:
    """Returns the fleet's observed RPO in words: p50, p95 and max over the disks that have one."""
    if not rpo["disks"]:
        return "no disk with two observed runs"
    return (f"p50 {_duration(rpo['p50_seconds'])}, p95 {_duration(rpo['p95_seconds'])}, max "
            f"{_duration(rpo['max_seconds'])} over {rpo['disks']} disk(s)")


def worst_disks(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Returns the disks that were not compliant the whole covered time, least compliant first."""
    lacking = [d for d in report["disks"] if d["compliance_pct"] != 100.0]
    return sorted(lacking, key=lambda d: (d["compliance_pct"] if d["compliance_pct"] is not None else -1.0,
                                          d["disk_id"]))


def measured_note(period: Mapping[str, Any]) -> str | None:
    """Returns the sentence saying a period reaching past now is measured to now, None for one measured whole."""
    measured = period.get("measured_to")
    if measured is None or measured == period["to"]:
        return None
    if measured == period["from"]:
        return "The period lies ahead: nothing of it has happened yet, so nothing is measured."
    return f"Measured to {measured} (now): the rest of the period has not happened yet and counts as nothing."


def compliance_markdown(report: Mapping[str, Any], *, max_disks: int = 100) -> str:
    """Returns the period report as Markdown (coverage, fleet by day, rules, waivers, least compliant disks)."""
    p, c, f = report["period"], report["coverage"], report["fleet"]
    note = measured_note(p)
    lines = [f"# Backup-policy compliance {p['from']} – {p['to']}", "", f"Generated {report['generated_at']}.", "",
             *([note, ""] if note else []),
             f"- Fleet time in compliance: **{format_pct(f['compliance_pct'])}** over {f['disks']} disk(s)",
             f"- Coverage: {format_pct(c['coverage_pct'])} of the period checked; {cycles_text(c)}; no data for "
             f"{_duration(c['no_data_seconds'])}",
             f"- Observed RPO: {rpo_text(f['observed_rpo'])}", ""]
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
    return Environment(loader=PackageLoader("auditor.render", "templates"), autoescape=True,
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
    worst = worst_disks(report)
    rows = worst + [d for d in report["disks"] if d["compliance_pct"] == 100.0]
    return template.render(r=report, bars=_day_bars(report["fleet"]["by_day"]), worst=worst, rows=rows,
                           pct=format_pct, duration=_duration, rpo=rpo_text(report["fleet"]["observed_rpo"]),
                           measured=measured_note(report["period"]))
