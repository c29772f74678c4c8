"""Alerts (one finding's firing or resolved state) and notifications (a group of alerts for one notifier)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol
from urllib.parse import quote

from auditor.domain.hints import remediation_for
from auditor.domain.models import Severity
from auditor.vocabulary import AUDIT_INCOMPLETE as AUDIT_INCOMPLETE
from auditor.vocabulary import format_duration

# Kinds whose receiver resolves an alert by itself once its endsAt passes: open alerts are re-posted every cycle.
KEEP_ALIVE_KINDS = frozenset({"alertmanager"})
# Common notifier settings a kind ignores (check-config does not show them): a kept-alive receiver is re-posted
# every cycle, whatever repeat_interval says.
IGNORED_SETTINGS: Mapping[str, frozenset[str]] = {kind: frozenset({"repeat_interval"}) for kind in KEEP_ALIVE_KINDS}
# Kinds whose receiver keeps the test alert open until told otherwise: `notify test` resolves it after sending.
STATEFUL_KINDS = frozenset({"alertmanager", "pagerduty"})
# PagerDuty Events API v2 accepts exactly these payload.severity values.
PD_SEVERITIES = frozenset({"critical", "error", "warning", "info"})
# endsAt = send time + 3 x the audit interval + 5 min: two cycles can be missed or late (a slow run, a restart, a
# delivery retry) before Alertmanager resolves a still-open finding. Prometheus uses 4 x its resend delay alike.
KEEP_ALIVE_CYCLES = 3
KEEP_ALIVE_SLACK = timedelta(minutes=5)
DEFAULT_INTERVAL = timedelta(minutes=15)  # [audit] interval's default, for callers that do not pass one


def keep_alive_for(interval: timedelta) -> timedelta:
    """Returns how long past each send an open alert stays active in Alertmanager: 3 x interval + 5 min."""
    return KEEP_ALIVE_CYCLES * interval + KEEP_ALIVE_SLACK


class AlertStatus(StrEnum):
    """Alertmanager's two alert states."""

    FIRING = "firing"
    RESOLVED = "resolved"


@dataclass(frozen=True, slots=True)
class Alert:
    """One finding (or the `audit-incomplete` condition) as an on-call channel sees it."""

    fingerprint: str
    rule: str
    severity: Severity
    status: AlertStatus
    summary: str
    description: str
    starts_at: datetime
    ends_at: datetime | None = None
    disk_id: str | None = None
    policy_id: str | None = None
    tier: str | None = None  # the disk's [[tiers]] entry, None for the defaults
    # Context for people (annotations, never labels: labels are the alert's identity in Alertmanager).
    disk_name: str | None = None
    organization: str | None = None  # the organization the disk was listed through; None: not known
    runbook_url: str | None = None  # [notify] runbook_url with {rule} filled in

    @property
    def remediation(self) -> str:
        """Returns the rule's one-line remediation hint ("" when it has none)."""
        return remediation_for(self.rule)

    def labels(self) -> dict[str, str]:
        """Returns the Alertmanager labels: alertname = rule id, plus disk_id, policy_id, severity, fingerprint,
        and tier when the disk is in one (so an auditor without tiers sends the label sets it always sent)."""
        labels = {
            "alertname": self.rule,
            "disk_id": self.disk_id or "",
            "policy_id": self.policy_id or "",
            "severity": self.severity.value,
            "fingerprint": self.fingerprint,
        }
        if self.tier:
            labels["tier"] = self.tier
        return labels

    def annotations(self) -> dict[str, str]:
        """Returns the Alertmanager annotations: summary and description, then those known of `disk_name`,
        `organization`, `remediation` and `runbook_url`."""
        extra = {"disk_name": self.disk_name, "organization": self.organization, "remediation": self.remediation,
                 "runbook_url": self.runbook_url}
        return {"summary": self.summary, "description": self.description, **{k: v for k, v in extra.items() if v}}


@dataclass(frozen=True, slots=True)
class DiskContext:
    """What an alert says about its disk besides the id: its name and organization (None: not known)."""

    name: str | None = None
    organization: str | None = None


def runbook_link(template: str, rule: str) -> str | None:
    """Returns [notify] runbook_url with `{rule}` replaced by the rule id (URL-quoted), or None without one."""
    return template.replace("{rule}", quote(rule, safe="")) if template else None


@dataclass(frozen=True, slots=True)
class Notification:
    """One message for one notifier: a group of alerts sharing the notifier's `group_by` labels.

    `id` is the outbox id and the idempotency key: sending the same notification twice must be harmless.
    """

    id: str
    notifier: str
    group_key: str
    group_labels: dict[str, str]
    alerts: tuple[Alert, ...]
    created_at: datetime
    is_test: bool = False
    is_repeat: bool = False
    # For receivers that expire alerts (Alertmanager): how long past the send a firing alert stays active.
    # Planning sets it from the audit interval, so the next cycle's re-post always lands before endsAt.
    keep_alive: timedelta | None = None

    @property
    def status(self) -> AlertStatus:
        """Returns firing if any alert in the group fires, else resolved."""
        if any(a.status is AlertStatus.FIRING for a in self.alerts):
            return AlertStatus.FIRING
        return AlertStatus.RESOLVED



class DeliveryState(StrEnum):
    """Where an outbox entry is."""

    PENDING = "pending"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    FAILED = "failed"  # gave up: a permanent error, or too many attempts


@dataclass(frozen=True, slots=True)
class AlertState:
    """What one notifier was last told about one fingerprint (for dedup, repeat and resolve)."""

    notifier: str
    fingerprint: str
    status: AlertStatus
    last_sent_at: datetime
    starts_at: datetime


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A notification to write to the outbox; `kind` is firing, resolved, repeat or test."""

    notification: Notification
    kind: str


@dataclass(frozen=True, slots=True)
class Delivery:
    """An outbox entry as stored, with its delivery progress."""

    id: str
    notifier: str
    kind: str
    state: DeliveryState
    attempts: int
    created_at: datetime
    next_attempt_at: datetime
    delivered_at: datetime | None
    last_status: int | None
    last_error: str | None
    notification: Notification


def _ts(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _dt(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) and value else None


def notification_to_dict(n: Notification) -> dict[str, Any]:
    """Returns a JSON-ready form of the notification (what the outbox stores; holds no secret)."""
    return {
        "id": n.id,
        "notifier": n.notifier,
        "group_key": n.group_key,
        "group_labels": dict(n.group_labels),
        "created_at": _ts(n.created_at),
        "is_test": n.is_test,
        "is_repeat": n.is_repeat,
        "keep_alive_seconds": n.keep_alive.total_seconds() if n.keep_alive is not None else None,
        "alerts": [
            {
                "fingerprint": a.fingerprint,
                "rule": a.rule,
                "severity": a.severity.value,
                "status": a.status.value,
                "summary": a.summary,
                "description": a.description,
                "starts_at": _ts(a.starts_at),
                "ends_at": _ts(a.ends_at),
                "disk_id": a.disk_id,
                "policy_id": a.policy_id,
                **({"tier": a.tier} if a.tier else {}),
                **{k: v for k, v in (("disk_name", a.disk_name), ("organization", a.organization),
                                     ("runbook_url", a.runbook_url)) if v},
            }
            for a in n.alerts
        ],
    }


def notification_from_dict(data: dict[str, Any]) -> Notification:
    """Returns the notification stored by `notification_to_dict`."""
    alerts = tuple(
        Alert(
            fingerprint=a["fingerprint"],
            rule=a["rule"],
            severity=Severity(a["severity"]),
            status=AlertStatus(a["status"]),
            summary=a["summary"],
            description=a["description"],
            starts_at=_dt(a["starts_at"]) or datetime.min,
            ends_at=_dt(a.get("ends_at")),
            disk_id=a.get("disk_id"),
            policy_id=a.get("policy_id"),
            tier=a.get("tier"),
            disk_name=a.get("disk_name"),
            organization=a.get("organization"),
            runbook_url=a.get("runbook_url"),
        )
        for a in data["alerts"]
    )
    keep_alive = data.get("keep_alive_seconds")
    return Notification(
        id=data["id"],
        notifier=data["notifier"],
        group_key=data["group_key"],
        group_labels=dict(data["group_labels"]),
        alerts=alerts,
        created_at=_dt(data["created_at"]) or datetime.min,
        is_test=bool(data.get("is_test")),
        is_repeat=bool(data.get("is_repeat")),
        keep_alive=timedelta(seconds=keep_alive) if isinstance(keep_alive, int | float) else None,
    )


class _NotifierView(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def send_resolved(self) -> bool: ...
    @property
    def severity_map(self) -> Mapping[Any, str]: ...
    @property
    def model_fields_set(self) -> set[str]: ...


class _AuditView(Protocol):
    @property
    def interval(self) -> timedelta: ...
    @property
    def jitter(self) -> timedelta: ...


class SettingsView(Protocol):
    """The part of the settings `notifier_warnings` reads (the domain cannot import the config module)."""

    @property
    def audit(self) -> _AuditView: ...
    @property
    def notifiers(self) -> Sequence[_NotifierView]: ...


def notifier_warnings(settings: SettingsView) -> list[str]:
    """Returns one line per notifier setting that is valid but cannot do what it seems to (for check-config)."""
    interval = settings.audit.interval
    keep_alive = keep_alive_for(interval)
    # In whole seconds, as check-config has always shown them (a jitter of 500ms adds nothing to the text).
    every, horizon, with_jitter = (format_duration(timedelta(seconds=int(d.total_seconds())))
                                   for d in (interval, keep_alive, interval + settings.audit.jitter))
    out: list[str] = []
    for n in settings.notifiers:
        name = f"notifier {n.name} ({n.kind})"
        if n.kind in KEEP_ALIVE_KINDS:
            if "repeat_interval" in n.model_fields_set:
                out.append(f"{name}: repeat_interval is ignored: open alerts are re-posted every audit cycle "
                           f"({every}) with endsAt {horizon} ahead, as Alertmanager "
                           "expects; use Alertmanager's own repeat_interval for reminders")
            if interval + settings.audit.jitter >= keep_alive:
                out.append(f"{name}: the audit interval plus jitter ({with_jitter})"
                           f" reaches the alerts' endsAt horizon ({horizon}): Alertmanager would "
                           "resolve open findings between cycles")
            if not n.send_resolved:
                out.append(f"{name}: send_resolved = false: a fixed finding stays firing in Alertmanager until its "
                           f"endsAt passes (up to {horizon} later)")
        if n.kind == "pagerduty":
            ignored = sorted(str(k) for k, v in n.severity_map.items() if v not in PD_SEVERITIES)
            if ignored:
                out.append(f"{name}: severity_map for {', '.join(ignored)} is not a PagerDuty severity "
                           f"({', '.join(sorted(PD_SEVERITIES))}); PagerDuty's own mapping is used for it")
    return out
