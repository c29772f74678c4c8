"""Prometheus exposition, built per scrape on a fresh registry from stored state plus the daemon's cycle counters.

Nothing here is a module-level registry: the daemon owns one `CycleMetrics` (what only the running process knows:
cycle durations, Katapult traffic since start) and every scrape reads the rest (findings, disks, last cycle) from
the store, so a scrape never triggers a poll and two processes never share counters by accident.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from auditor.audit import AuditOutcome
from auditor.domain.records import RunRecord
from auditor.errors import StoreError
from auditor.store.outbox import Outbox
from auditor.store.repo import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Cycles take from well under a second (a few disks) to many minutes (tens of thousands behind a rate limit).
DURATION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


@dataclass
class CycleMetrics:
    """Counters of the cycles this process ran; the daemon records every cycle here."""

    buckets: tuple[float, ...] = DURATION_BUCKETS
    bucket_counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    duration_sum: float = 0.0
    duration_count: int = 0
    cycles: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    responses: dict[str, int] = field(default_factory=dict)

    def _observe(self, seconds: float) -> None:
        self.bucket_counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.duration_sum += seconds
        self.duration_count += 1

    def record(self, outcome: AuditOutcome) -> None:
        """Counts a cycle that ran to its end (complete, partial or failed) and its Katapult traffic."""
        self._observe(outcome.duration)
        status = outcome.status.value
        self.cycles[status] = self.cycles.get(status, 0) + 1
        self.requests += outcome.stats.requests
        self.retries += outcome.stats.retries
        self.rate_limited += outcome.stats.rate_limited
        for code, n in outcome.stats.by_status.items():
            self.responses[code] = self.responses.get(code, 0) + n

    def record_error(self, seconds: float) -> None:
        """Counts a cycle that broke before recording its verdict (e.g. the database went away)."""
        self._observe(seconds)
        self.cycles["error"] = self.cycles.get("error", 0) + 1


@dataclass(frozen=True, slots=True)
class StoredState:
    """What a scrape reads from the database."""

    finding_counts: list[tuple[str, str, str, int]]
    disk_counts: dict[str, int]
    notification_counts: list[tuple[str, str, int]]
    last_success_at: float | None
    last_finished_at: float | None


async def read_state(store: Store) -> StoredState | None:
    """Returns the stored state metrics show, or None when the database does not answer."""
    try:
        counts = await store.finding_counts()
        disks = await store.disk_status_counts()
        notifications = await Outbox(store).counts()
        success = await store.last_successful_run()
        last = await store.latest_run(finished=True)
    except StoreError:
        return None

    def stamp(run: RunRecord | None) -> float | None:
        return run.finished_at.timestamp() if run is not None and run.finished_at is not None else None

    return StoredState(counts, disks, notifications, stamp(success), stamp(last))


class _Snapshot(Collector):
    """A collector over one scrape's numbers (prometheus_client calls `collect` while rendering)."""

    def __init__(self, cycles: CycleMetrics, state: StoredState | None) -> None:
        self._cycles = cycles
        self._state = state

    def collect(self) -> Iterator[Metric]:
        c = self._cycles
        cumulative: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*c.buckets, float("inf")), c.bucket_counts, strict=True):
            running += n
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
        yield HistogramMetricFamily(
            "auditor_cycle_duration_seconds", "Wall time of audit cycles run by this process.",
            buckets=cumulative, sum_value=c.duration_sum,
        )
        cycles = CounterMetricFamily("auditor_cycles", "Audit cycles run by this process, by outcome "
                                     "(complete, partial, failed, or error when nothing could be recorded).",
                                     labels=["status"])
        for status in sorted({"complete", "partial", "failed", "error"} | set(c.cycles)):
            cycles.add_metric([status], c.cycles.get(status, 0))
        yield cycles
        yield CounterMetricFamily("auditor_katapult_requests", "HTTP requests sent to Katapult by this process.",
                                  value=c.requests)
        yield CounterMetricFamily("auditor_katapult_retries", "Katapult requests retried by this process.",
                                  value=c.retries)
        yield CounterMetricFamily("auditor_katapult_rate_limited", "Katapult 429 rate_limit_reached responses.",
                                  value=c.rate_limited)
        responses = CounterMetricFamily("auditor_katapult_responses", "Katapult responses by HTTP status code "
                                        "(or transport failure kind, e.g. timeout).", labels=["code"])
        for code in sorted(c.responses):
            responses.add_metric([code], c.responses[code])
        yield responses

        yield GaugeMetricFamily("auditor_store_up", "Whether the database answered this scrape.",
                                value=0 if self._state is None else 1)
        if self._state is None:
            return
        s = self._state
        if s.last_success_at is not None:
            yield GaugeMetricFamily("auditor_last_successful_cycle_timestamp_seconds",
                                    "When the last complete or partial audit cycle finished (Unix time).",
                                    value=s.last_success_at)
        if s.last_finished_at is not None:
            yield GaugeMetricFamily("auditor_last_cycle_timestamp_seconds",
                                    "When the last audit cycle finished, whatever its outcome (Unix time).",
                                    value=s.last_finished_at)
        # Every (rule, severity) that has findings in any state gets a series, so a resolved one drops to 0
        # instead of vanishing.
        open_by: dict[tuple[str, str], int] = {}
        for status, rule, severity, n in s.finding_counts:
            key = (rule, severity)
            open_by[key] = open_by.get(key, 0) + (n if status == "open" else 0)
        findings = GaugeMetricFamily("auditor_open_findings", "Open findings by rule and severity.",
                                     labels=["rule", "severity"])
        for (rule, severity), n in sorted(open_by.items()):
            findings.add_metric([rule, severity], n)
        yield findings
        disks = GaugeMetricFamily("auditor_disks", "Audited disks by status.", labels=["status"])
        for status, n in sorted(s.disk_counts.items()):
            disks.add_metric([status], n)
        yield disks
        notifications = GaugeMetricFamily("auditor_notifications", "Alert notifications in the outbox by notifier "
                                          "and delivery state (pending, delivering, delivered, failed).",
                                          labels=["notifier", "state"])
        for notifier, state, n in sorted(s.notification_counts):
            notifications.add_metric([notifier, state], n)
        yield notifications


def render(cycles: CycleMetrics, state: StoredState | None) -> bytes:
    """Returns the Prometheus text exposition of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(cycles, state))
    data: bytes = generate_latest(registry)
    return data
