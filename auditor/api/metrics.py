"""Prometheus exposition, built per scrape on a fresh registry from stored state plus the daemon's cycle counters.

Nothing here is a module-level registry: the daemon owns one `CycleMetrics` (what only the running process knows:
cycle durations, Katapult traffic since start), the dashboard's `LoginThrottle` (in `ApiDeps`) counts its logins,
and every scrape reads the rest (findings, disks, last cycle) from the store (`queries.read_stored_state`), so a
scrape never triggers a poll and two processes never share counters by accident.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from auditor.domain.models import FindingStatus
from auditor.domain.periods import FINISHED_RUNS
from auditor.service.queries import BuildInfo, StoredState
from auditor.service.reloads import ConfigStatus
from auditor.service.runner import CycleMetrics
from auditor.web.auth import LoginThrottle

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Snapshot(Collector):
    """A collector over one scrape's numbers (prometheus_client calls `collect` while rendering)."""

    def __init__(self, cycles: CycleMetrics, state: StoredState | None, config: ConfigStatus | None,
                 logins: LoginThrottle | None, process: ProcessInfo | None) -> None:
        self._cycles = cycles
        self._process = process
        self._state = state
        self._config = config
        self._logins = logins

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
        for status in sorted(FINISHED_RUNS | {"error"} | set(c.cycles)):
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
        yield GaugeMetricFamily("auditor_consecutive_failed_cycles",
                                "Audit cycles in a row that failed (or broke) in this process; 0 after a complete "
                                "or partial one.", value=c.consecutive_failed)
        yield CounterMetricFamily("auditor_heartbeat_failures", "Heartbeat pings given up after every attempt.",
                                  value=c.heartbeat_failures)
        yield CounterMetricFamily("auditor_delivery_errors", "Unexpected errors while delivering a notification "
                                  "(the entry was put back for a later round).", value=c.delivery_errors)
        if c.is_leader is not None:
            leads = c.leading() if c.leading is not None else c.is_leader
            yield GaugeMetricFamily("auditor_leader", "1 while this replica is the leader (runs the schedule and "
                                    "the alert delivery), else 0.", value=1 if leads else 0)
            yield GaugeMetricFamily("auditor_leader_epoch", "The leader lease's epoch as this replica last saw it "
                                    "(grows by one with every new leader term; 0 before the first look).",
                                    value=c.leader_epoch)
        if self._config is not None:
            yield from _config_metrics(self._config)
        if self._process is not None:
            yield from _process_metrics(self._process)

        if self._logins is not None:
            yield CounterMetricFamily("auditor_login_failures", "Dashboard logins with a wrong token, in this "
                                      "process.", value=self._logins.failures)
            yield CounterMetricFamily("auditor_login_throttled", "Dashboard logins refused with 429 because the "
                                      "client address must wait after repeated wrong tokens, in this process.",
                                      value=self._logins.refused)

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
            open_by[key] = open_by.get(key, 0) + (n if status == FindingStatus.OPEN else 0)
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


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """What a scrape says about this process itself: its build and the audit interval it runs on."""

    build: BuildInfo
    interval_seconds: float


def _process_metrics(process: ProcessInfo) -> Iterator[Metric]:
    """The build (Prometheus' own `prometheus_build_info` alike) and the audit interval, so alerting rules derive
    their thresholds from the deployment instead of assuming one."""
    info = GaugeMetricFamily("auditor_build_info", "The auditor's version, the Python running it and the database "
                             "kind (sqlite or postgresql); always 1.", labels=["version", "python", "database"])
    b = process.build
    info.add_metric([b.version, b.python, b.database], 1)
    yield info
    yield GaugeMetricFamily("auditor_audit_interval_seconds", "audit.interval in force, in seconds: how often the "
                            "leader runs an audit cycle.", value=process.interval_seconds)


def _config_metrics(config: ConfigStatus) -> Iterator[Metric]:
    """The configuration in force and its reloads (SIGHUP), as Prometheus and Alertmanager report theirs."""
    yield GaugeMetricFamily("auditor_config_last_reload_success", "1 if the last configuration reload (SIGHUP) "
                            "took effect, or none was asked for; 0 if it was refused (the previous configuration "
                            "stays in force).", value=1 if config.is_last_reload_ok else 0)
    yield GaugeMetricFamily("auditor_config_last_reload_success_timestamp_seconds",
                            "When the configuration in force was loaded: at start or by the last successful "
                            "reload (Unix time).", value=config.loaded_at)
    yield CounterMetricFamily("auditor_config_reload_failures", "Configuration reloads refused because the file "
                              "or the environment was invalid.", value=config.reload_failures)
    info = GaugeMetricFamily("auditor_config_info", "The configuration in force: the SHA-256 (64 hex digits) of "
                             "its canonical JSON, secrets redacted.", labels=["fingerprint"])
    info.add_metric([config.fingerprint], 1)
    yield info


def render(cycles: CycleMetrics, state: StoredState | None, *, config: ConfigStatus | None = None,
           logins: LoginThrottle | None = None, process: ProcessInfo | None = None) -> bytes:
    """Returns the Prometheus text exposition of one scrape (the configuration's, the dashboard's login counters,
    the build and the audit interval when given)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(cycles, state, config, logins, process))
    if process is not None:
        # process_start_time_seconds and the other standard process_* series (read from /proc on Linux): the
        # shipped rules measure "no cycle since the auditor started" from it.
        ProcessCollector(registry=registry)
    data: bytes = generate_latest(registry)
    return data
