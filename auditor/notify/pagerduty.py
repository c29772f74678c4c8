"""The `pagerduty` notifier: one PagerDuty Events API v2 event per alert, POSTed to `events_url`.

A notification with N alerts is N sequential POSTs, all of which must be accepted (PagerDuty answers 202); the
first failure raises. Re-sending the whole notification after a partial failure is harmless: events dedup on
`dedup_key` (the alert fingerprint), so a repeated trigger updates the open incident and a repeated resolve is a
no-op.

Routing conventions: the notifier's static `labels` and `source="auditor"` go into `custom_details` (our own keys
win); `severity` is PagerDuty's mapping below unless `severity_map` maps ours to one of PagerDuty's four values;
with `external_url` set, each trigger links to the disk's page (`links`, `client`, `client_url`).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import httpx

from auditor.config import PagerDutyNotifier
from auditor.domain.alerts import PD_SEVERITIES, Alert, AlertStatus, Notification
from auditor.domain.models import Severity
from auditor.errors import NotifyError
from auditor.notify.base import (
    DeliveryResult,
    describe,
    generator_url,
    json_body,
    post,
    rfc3339,
    settings_secrets,
    severity_value,
    static_labels,
)

logger = logging.getLogger(__name__)

SOURCE = "katapult-backup-auditor"
SUMMARY_MAX = 1024  # Events API v2: payload.summary is at most 1024 characters
# Events API v2 refuses an event larger than 512 KB; stay under it, read as decimal (512,000 bytes, the stricter
# reading), with room for what we cannot clip.
EVENT_MAX_BYTES = 512_000 - 1024
CLIPPED_NOTE = (" … [clipped to fit PagerDuty's 512 KB event limit: {shown} of {total} characters shown; the full "
                "text is in the auditor]")
TEST_PREFIX = "[TEST] "
SEVERITY = {
    Severity.CRITICAL: "critical",
    Severity.HIGH: "error",
    Severity.MEDIUM: "warning",
    Severity.LOW: "info",
}
CLIENT = "Katapult backup auditor"


def pd_severity(alert: Alert, settings: PagerDutyNotifier | None) -> str:
    """Returns the event severity: the severity_map value when it is one PagerDuty accepts, else our mapping."""
    mapped = severity_value(alert, settings)
    return mapped if mapped in PD_SEVERITIES else SEVERITY[alert.severity]


def _summary(alert: Alert, *, is_test: bool) -> str:
    text = (TEST_PREFIX if is_test else "") + alert.summary
    return text if len(text) <= SUMMARY_MAX else text[: SUMMARY_MAX - 1] + "…"


def _custom_details(alert: Alert, *, is_test: bool, settings: PagerDutyNotifier | None) -> dict[str, Any]:
    details: dict[str, Any] = static_labels(settings) if settings is not None else {}
    details |= {
        "rule": alert.rule,
        "severity": alert.severity.value,
        "description": alert.description,
        "fingerprint": alert.fingerprint,
        "starts_at": rfc3339(alert.starts_at),
    }
    if alert.disk_id:
        details["disk_id"] = alert.disk_id
    if alert.disk_name:
        details["disk_name"] = alert.disk_name
    if alert.organization:
        details["organization"] = alert.organization
    if alert.policy_id:
        details["policy_id"] = alert.policy_id
    if alert.remediation:
        details["remediation"] = alert.remediation
    if alert.runbook_url:
        details["runbook_url"] = alert.runbook_url
    if is_test:
        details["test"] = True
    return details


def build_event(
    alert: Alert, routing_key: str, *, is_test: bool, settings: PagerDutyNotifier | None = None
) -> dict[str, Any]:
    """Returns one Events API v2 event: a full trigger for a firing alert, a bare resolve for a resolved one."""
    if alert.status is AlertStatus.RESOLVED:
        # Events API v2: resolve (and acknowledge) events need only routing_key, event_action and dedup_key.
        return {"routing_key": routing_key, "event_action": "resolve", "dedup_key": alert.fingerprint}
    payload: dict[str, Any] = {
        "summary": _summary(alert, is_test=is_test),
        "source": alert.disk_id or SOURCE,
        "severity": pd_severity(alert, settings),
        "timestamp": rfc3339(alert.starts_at),
    }
    if alert.disk_id:
        payload["component"] = alert.disk_id
    payload["group"] = alert.rule
    payload["class"] = alert.rule
    payload["custom_details"] = _custom_details(alert, is_test=is_test, settings=settings)
    event: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": alert.fingerprint,
        "payload": payload,
    }
    link = generator_url(alert, settings) if settings is not None else ""
    links = []
    if link and settings is not None:
        event["client"] = CLIENT
        event["client_url"] = settings.external_url
        links.append({"href": link, "text": f"{alert.disk_id} in the auditor" if alert.disk_id else "Audit runs"})
    if alert.runbook_url:
        links.append({"href": alert.runbook_url, "text": f"Runbook: {alert.rule}"})
    if links:
        event["links"] = links
    return fit(event)


def fit(event: dict[str, Any], *, limit: int = EVENT_MAX_BYTES) -> dict[str, Any]:
    """Returns the event within `limit` bytes of JSON: the longest `custom_details` texts (a description, a disk
    name) are clipped, longest first, each ending in a note saying so; an event that fits is returned as it is."""
    size = len(json_body(event))
    original = event["payload"]["custom_details"] if size > limit else {}
    details = dict(original)
    clipped: set[str] = set()
    while size > limit:
        texts = [k for k, v in details.items() if isinstance(v, str) and k not in clipped]
        if not texts:
            break
        key = max(texts, key=lambda k: len(json_body(details[k])))
        text: str = original[key]
        note = CLIPPED_NOTE.format(shown="{shown}", total=len(text))
        budget = len(json_body(text)) - (size - limit) - len(json_body(note)) - 16
        lo, hi = 0, len(text)  # the longest prefix whose JSON fits the budget (UTF-8 and escapes vary per char)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if len(json_body(text[:mid])) <= budget else (lo, mid - 1)
        details[key] = text[:lo] + note.format(shown=lo)
        clipped.add(key)
        event = {**event, "payload": {**event["payload"], "custom_details": details}}
        size = len(json_body(event))
    return event


class PagerDutyChannel:
    """PagerDuty Events API v2."""

    kind = "pagerduty"

    def build_payload(
        self, notification: Notification, settings: PagerDutyNotifier, *, now: datetime
    ) -> list[dict[str, Any]]:
        """Returns the events to send, one per alert, in the notification's order."""
        key = settings.routing_key.get_secret_value()
        return [
            build_event(alert, key, is_test=notification.is_test, settings=settings) for alert in notification.alerts
        ]

    async def send(
        self, http: httpx.AsyncClient, notification: Notification, settings: PagerDutyNotifier, *, now: datetime
    ) -> DeliveryResult:
        """POSTs every event in turn (PagerDuty answers 202); the first failure raises NotifyError."""
        events = self.build_payload(notification, settings, now=now)
        # The routing key, and whatever credentials or token the events URL carries (a proxy in front, say).
        secrets = settings_secrets(settings)
        status: int | None = None
        for index, event in enumerate(events, start=1):
            try:
                status = await post(
                    http,
                    settings.events_url,
                    body=json_body(event),
                    settings=settings,
                    headers={},
                    secrets=secrets,
                    now=now,
                )
            except NotifyError as exc:
                if len(events) == 1:
                    raise
                raise NotifyError(
                    f"{exc} (event {index} of {len(events)})",
                    permanent=exc.permanent,
                    status_code=exc.status_code,
                    retry_after=exc.retry_after,
                ) from None
        logger.debug("%s accepted %d event(s) for notification %s", describe(settings), len(events), notification.id)
        return DeliveryResult(
            status_code=status, detail=f"{describe(settings)}: {len(events)} event(s) accepted (HTTP {status})"
        )


NOTIFIER = PagerDutyChannel()
