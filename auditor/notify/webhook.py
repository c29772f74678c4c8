"""The `webhook` notifier: POSTs Alertmanager's webhook payload (version "4") to any URL.

The body is exactly what Alertmanager's webhook receiver sends, so existing Alertmanager webhook consumers work
unchanged. Two headers are added:

- `Idempotency-Key: <notification id>`: the same notification re-sent (after a timeout, say) carries the same key,
  so a receiver can drop the duplicate.
- `X-Auditor-Signature: sha256=<hex>` when `secret` is configured: the lowercase hex HMAC-SHA256 of the exact
  request body bytes, keyed with the secret's UTF-8 bytes. Verify it over the raw body before parsing the JSON,
  with a constant-time comparison (Python: `hmac.compare_digest(expected, header)`).

Test notifications carry the label `test="true"` and a `test` annotation on every alert.

Every alert carries `source="auditor"` and the notifier's static `labels`; `severity` is the notifier's
`severity_map` value. Each alert's `fingerprint` is the auditor's finding fingerprint (the first 16 hex digits of a
SHA-256 over rule, disk and policy), stable for the life of the finding, and NOT Alertmanager's fingerprint (a hash
of the label set): adding a static label or a severity_map entry does not change it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from datetime import datetime
from typing import Any

import httpx

from auditor.config import WebhookNotifier
from auditor.domain.alerts import AlertStatus, Notification
from auditor.notify.base import (
    ZERO_TIME,
    DeliveryResult,
    alert_annotations,
    alert_labels,
    common_items,
    describe,
    generator_url,
    json_body,
    post,
    rfc3339,
    settings_secrets,
)

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Auditor-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"


def sign(body: bytes, secret: str) -> str:
    """Returns the X-Auditor-Signature value for `body`: "sha256=" + hex HMAC-SHA256 keyed with `secret`."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


class WebhookChannel:
    """Alertmanager-format webhook (payload version 4)."""

    kind = "webhook"

    def build_payload(self, notification: Notification, settings: WebhookNotifier, *, now: datetime) -> dict[str, Any]:
        """Returns the Alertmanager webhook payload (version 4) for the notification."""
        is_test = notification.is_test
        labels = [alert_labels(alert, is_test=is_test, settings=settings) for alert in notification.alerts]
        annotations = [alert_annotations(alert, is_test=is_test) for alert in notification.alerts]
        alerts = [
            {
                "status": alert.status.value,
                "labels": item_labels,
                "annotations": item_annotations,
                "startsAt": rfc3339(alert.starts_at),
                "endsAt": ZERO_TIME if alert.status is AlertStatus.FIRING else rfc3339(alert.ends_at or now),
                "generatorURL": generator_url(alert, settings),
                "fingerprint": alert.fingerprint,
            }
            for alert, item_labels, item_annotations in zip(notification.alerts, labels, annotations, strict=True)
        ]
        return {
            "version": "4",
            "groupKey": notification.group_key,
            "truncatedAlerts": 0,
            "status": notification.status.value,
            "receiver": settings.name,
            "groupLabels": dict(notification.group_labels),
            "commonLabels": common_items(labels),
            "commonAnnotations": common_items(annotations),
            # Alertmanager sends its own address here; ours is where the auditor's dashboard is reached.
            "externalURL": settings.external_url,
            "alerts": alerts,
        }

    async def send(
        self, http: httpx.AsyncClient, notification: Notification, settings: WebhookNotifier, *, now: datetime
    ) -> DeliveryResult:
        """POSTs the payload once, signed when a secret is set; raises NotifyError on failure."""
        body = json_body(self.build_payload(notification, settings, now=now))
        url = settings.url.get_secret_value()
        headers = {IDEMPOTENCY_HEADER: notification.id}
        if settings.secret is not None:
            headers[SIGNATURE_HEADER] = sign(body, settings.secret.get_secret_value())
        status = await post(
            http, url, body=body, settings=settings, headers=headers, secrets=settings_secrets(settings), now=now
        )
        logger.debug("%s accepted notification %s (HTTP %d)", describe(settings), notification.id, status)
        return DeliveryResult(
            status_code=status, detail=f"{describe(settings)}: HTTP {status}, {len(notification.alerts)} alert(s)"
        )


NOTIFIER = WebhookChannel()
