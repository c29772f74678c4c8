"""Chart geometry for the overview's inline SVG, computed on the server (no JavaScript, no external assets).

Pure functions of the run history, the window and the audit interval: they return coordinates and labels, and the
template draws them (so every text lands in the page through Jinja's autoescaping). Time runs left to right over
the whole window; the part before the first run and every gap longer than twice the interval between two runs is
shaded "no data" and breaks the lines — a gap is never drawn as if the fleet had been compliant through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from auditor.domain.listings import RunPoint
from auditor.domain.models import Severity
from auditor.domain.records import RunStatus
from auditor.service.dashboard import compliance_pct
from auditor.vocabulary import format_percent

WIDTH, HEIGHT = 480.0, 220.0
# Margins hold the axis labels at the largest text size the stylesheet draws them (17 units on narrow screens).
LEFT, RIGHT, TOP, BOTTOM = 54.0, 16.0, 10.0, 28.0
# Above this many runs in the window a chart draws only its lines (each run is still a vertex): thousands of
# circles would make the page heavy for nothing a reader can tell apart at that density.
MAX_MARKS = 200
# Pixel columns of the plot area: with more runs than that in the window, a line keeps one vertex per column (the
# worst value of the runs in it: lowest compliance, most open findings), so dips and spikes stay visible and a
# 90-day chart is ~430 vertices instead of thousands. With fewer runs every run is a vertex.
COLUMNS = int(WIDTH - RIGHT - LEFT)
SEVERITIES = tuple(reversed(Severity))  # critical first, as the legend lists them


@dataclass(frozen=True, slots=True)
class Mark:
    """A run's point: where, its CSS class, and the text its tooltip shows."""

    x: float
    y: float
    css: str
    title: str


@dataclass(frozen=True, slots=True)
class Tick:
    """An axis tick at `pos` (x or y in chart units) with its label."""

    pos: float
    label: str


@dataclass(frozen=True, slots=True)
class Band:
    """A stretch of time without data, shaded."""

    x: float
    width: float


@dataclass(frozen=True, slots=True)
class Line:
    """One polyline (`points` in SVG syntax) of a series; a series broken by gaps has several."""

    css: str
    points: str
    vertices: int


@dataclass(frozen=True)
class Chart:
    """Everything the template needs to draw one chart."""

    key: str
    title: str
    desc: str
    lines: list[Line] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    bands: list[Band] = field(default_factory=list)
    x_ticks: list[Tick] = field(default_factory=list)
    y_ticks: list[Tick] = field(default_factory=list)
    legend: list[tuple[str, str]] = field(default_factory=list)
    runs: int = 0
    width: float = WIDTH
    height: float = HEIGHT
    left: float = LEFT
    right: float = WIDTH - RIGHT
    top: float = TOP
    bottom: float = HEIGHT - BOTTOM


def _x_scale(start: datetime, end: datetime) -> Callable[[datetime], float]:
    span = max((end - start).total_seconds(), 1.0)

    def x(t: datetime) -> float:
        frac = min(max((t - start).total_seconds() / span, 0.0), 1.0)
        return round(LEFT + frac * (WIDTH - RIGHT - LEFT), 1)

    return x


def _y_scale(top_value: float) -> Callable[[float], float]:
    def y(v: float) -> float:
        return round(HEIGHT - BOTTOM - (v / top_value) * (HEIGHT - BOTTOM - TOP), 1) if top_value else HEIGHT - BOTTOM

    return y


def _x_ticks(start: datetime, end: datetime) -> list[Tick]:
    x = _x_scale(start, end)
    span = end - start
    if span <= timedelta(days=2):  # the 24-hour window: whole hours, at most 5 ticks
        hours = next((h for h in (1, 2, 3, 6, 12) if span / timedelta(hours=h) <= 5), 12)
        t = datetime(start.year, start.month, start.day, start.hour, tzinfo=UTC) + timedelta(hours=1)
        while t.hour % hours:
            t += timedelta(hours=1)
        ticks = []
        while t <= end:
            ticks.append(Tick(x(t), t.strftime("%H:%M")))
            t += timedelta(hours=hours)
        return ticks
    step = next((d for d in (1, 2, 7, 14, 30) if span / timedelta(days=d) <= 5), 30)
    first = datetime(start.year, start.month, start.day, tzinfo=UTC) + timedelta(days=1)
    ticks = []
    t = first
    while t <= end:
        ticks.append(Tick(x(t), t.strftime("%d %b")))
        t += timedelta(days=step)
    return ticks


def _gaps(runs: Sequence[RunPoint], *, start: datetime, end: datetime, gap: timedelta) -> list[Band]:
    """Returns the no-data bands: before the first run, between runs further apart than `gap`, after the last."""
    x = _x_scale(start, end)
    times = [r.started_at for r in runs]
    edges = [start, *times, end]
    bands = []
    for a, b in zip(edges, edges[1:], strict=False):
        if b - a > gap:
            bands.append(Band(x(a), round(x(b) - x(a), 1)))
    return bands


def _has_data(run: RunPoint) -> bool:
    return run.status != RunStatus.FAILED and run.disks_total > 0


def _segments(runs: Sequence[RunPoint], *, gap: timedelta) -> list[list[RunPoint]]:
    """Returns the runs with data in runs of consecutive ones, split at failed runs and at gaps."""
    segments: list[list[RunPoint]] = [[]]
    previous: RunPoint | None = None
    for run in runs:
        broken = previous is not None and run.started_at - previous.started_at > gap
        if not _has_data(run) or broken:
            if segments[-1]:
                segments.append([])
        if _has_data(run):
            segments[-1].append(run)
        previous = run
    return [s for s in segments if s]


def _vertices(seg: Sequence[RunPoint], x: Callable[[datetime], float], value: Callable[[RunPoint], float], *,
              thin: bool, worst: Callable[[float, float], float]) -> list[tuple[float, float]]:
    """Returns (x, value) per run of `seg`; if `thin`, one per pixel column, the `worst` of the runs in it."""
    if not thin:
        return [(x(r.started_at), value(r)) for r in seg]
    out: list[tuple[float, float]] = []
    column = -1
    for r in seg:
        px, v = x(r.started_at), value(r)
        c = int(px)
        if c == column:
            out[-1] = (out[-1][0], worst(out[-1][1], v))
        else:
            out.append((px, v))
            column = c
    return out


def _polyline(css: str, vertices: list[tuple[float, float]], y: Callable[[float], float]) -> Line:
    return Line(css, " ".join(f"{vx},{y(v)}" for vx, v in vertices), len(vertices))


def _when(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M UTC")


def compliance_chart(runs: Sequence[RunPoint], *, start: datetime, end: datetime, gap: timedelta) -> Chart:
    """Returns the compliance % trend: one vertex (and, up to MAX_MARKS, one point) per run in the window, or per
    pixel column when the window has more runs than the chart has columns."""
    x, y = _x_scale(start, end), _y_scale(100.0)
    thin = len(runs) > COLUMNS
    lines = [_polyline("line-compliance", _vertices(seg, x, lambda r: compliance_pct(r.compliant, r.disks_total)
                                                     or 0.0, thin=thin, worst=min), y)
             for seg in _segments(runs, gap=gap)]
    marks = []
    # Every run is a point while they fit; past MAX_MARKS, the partial and failed ones still are (the latest
    # MAX_MARKS of them), so a run that went wrong never disappears into a line.
    marked = runs if len(runs) <= MAX_MARKS else [r for r in runs if r.status != RunStatus.COMPLETE][-MAX_MARKS:]
    for r in marked:
        if _has_data(r):
            pct = compliance_pct(r.compliant, r.disks_total) or 0.0
            marks.append(Mark(x(r.started_at), y(pct), f"point point-{r.status}",
                              f"{_when(r.started_at)}: {format_percent(pct)} compliant ({r.compliant} of "
                              f"{r.disks_total} disks, {r.unknown} unknown), run {r.status}"))
        else:  # a failed run has no verdicts: marked on the axis, never as 0 %
            marks.append(Mark(x(r.started_at), y(0.0), "point point-failed",
                              f"{_when(r.started_at)}: run {r.status}, no data"))
    with_data = [r for r in runs if _has_data(r)]
    if with_data:
        first = compliance_pct(with_data[0].compliant, with_data[0].disks_total) or 0.0
        last = compliance_pct(with_data[-1].compliant, with_data[-1].disks_total) or 0.0
        low = min(compliance_pct(r.compliant, r.disks_total) or 0.0 for r in with_data)
        desc = (f"{len(runs)} runs since {_when(start)}; compliance went from {format_percent(first)} to "
                f"{format_percent(last)} (low {format_percent(low)}).")
    else:
        desc = f"No run with data since {_when(start)}."
    return Chart(key="compliance", title="Compliant disks, % of audited disks", desc=desc, lines=lines,
                 marks=marks, bands=_gaps(runs, start=start, end=end, gap=gap), x_ticks=_x_ticks(start, end),
                 y_ticks=[Tick(y(v), f"{v}%") for v in (0, 25, 50, 75, 100)], runs=len(runs),
                 legend=[("line-compliance", "compliant %"), ("point-partial", "partial run"),
                         ("point-failed", "failed run"), ("nodata", "no data")])


def _nice_ceiling(value: int) -> int:
    """Returns a round axis maximum ≥ value that divides into 4 whole steps (4, 8, 20, 40, 100, 200…)."""
    if value <= 4:
        return 4
    step = value / 4
    magnitude = 10 ** math.floor(math.log10(step))
    nice = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= step)
    return int(math.ceil(nice) * 4)


def _open_of(sev: Severity) -> Callable[[RunPoint], float]:
    return lambda r: r.open_by_severity.get(sev.value, 0)


def severity_chart(runs: Sequence[RunPoint], *, start: datetime, end: datetime, gap: timedelta) -> Chart:
    """Returns the open findings by severity over time: one line per severity, a vertex per run with data (per
    pixel column, the most open, when the window has more runs than the chart has columns)."""
    x = _x_scale(start, end)
    peak = max((max(r.open_by_severity.values(), default=0) for r in runs), default=0)
    top = _nice_ceiling(peak)
    y = _y_scale(float(top))
    segments = _segments(runs, gap=gap)
    thin = len(runs) > COLUMNS
    lines = [_polyline(f"line-{sev.value}", _vertices(seg, x, _open_of(sev), thin=thin, worst=max), y)
             for sev in SEVERITIES for seg in segments]
    marks = []
    if len(runs) <= MAX_MARKS // 4:  # four dots a run
        for seg in segments:
            for r in seg:
                counts = ", ".join(f"{r.open_by_severity.get(s.value, 0)} {s.value}" for s in SEVERITIES)
                for sev in SEVERITIES:
                    marks.append(Mark(x(r.started_at), y(r.open_by_severity.get(sev.value, 0)),
                                      f"dot dot-{sev.value}", f"{_when(r.started_at)}: open {counts}"))
    latest = next((r for r in reversed(runs) if _has_data(r)), None)
    desc = (f"{len(runs)} runs since {_when(start)}; after the latest: "
            + ", ".join(f"{latest.open_by_severity.get(s.value, 0)} {s.value}" for s in SEVERITIES) + "."
            if latest else f"No run with data since {_when(start)}.")
    return Chart(key="severity", title="Open findings by severity", desc=desc, lines=lines, marks=marks,
                 bands=_gaps(runs, start=start, end=end, gap=gap), x_ticks=_x_ticks(start, end),
                 y_ticks=[Tick(y(v), str(v)) for v in range(0, top + 1, top // 4)], runs=len(runs),
                 legend=[(f"line-{s.value}", s.value) for s in SEVERITIES] + [("nodata", "no data")])
