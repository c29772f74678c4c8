"""Alerts (one finding's firing or resolved state) and notifications (a group of alerts for one notifier)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from auditor.domain.models import Severity

AUDIT_INCOMPLETE = "audit-incomplete"


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

    def labels(self) -> dict[str, str]:
        """Returns the Alertmanager labels: alertname = rule id, plus disk_id, policy_id, severity, fingerprint."""
        return {
            "alertname": self.rule,
            "disk_id": self.disk_id or "",
            "policy_id": self.policy_id or "",
            "severity": self.severity.value,
            "fingerprint": self.fingerprint,
        }

    def annotations(self) -> dict[str, str]:
        """Returns the Alertmanager annotations: summary and description."""
        return {"summary": self.summary, "description": self.description}


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

    @property
    def status(self) -> AlertStatus:
        """Returns firing if any alert in the group fires, else resolved."""
        if any(a.status is AlertStatus.FIRING for a in self.alerts):
            return AlertStatus.FIRING
        return AlertStatus.RESOLVED

    @property
    def highest_severity(self) -> Severity:
        """Returns the most severe alert's severity (low for an empty group)."""
        return max((a.severity for a in self.alerts), key=lambda s: s.rank, default=Severity.LOW)


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
        )
        for a in data["alerts"]
    )
    return Notification(
        id=data["id"],
        notifier=data["notifier"],
        group_key=data["group_key"],
        group_labels=dict(data["group_labels"]),
        alerts=alerts,
        created_at=_dt(data["created_at"]) or datetime.min,
        is_test=bool(data.get("is_test")),
        is_repeat=bool(data.get("is_repeat")),
    )
