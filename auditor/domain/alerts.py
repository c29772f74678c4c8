"""Alerts (one finding's firing or resolved state) and notifications (a group of alerts for one notifier)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

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
