"""The `alertmanager` notifier: feeds an existing Alertmanager through POST <url>/api/v2/alerts.

Alertmanager resolves an alert by itself once its `endsAt` passes, and expects clients to keep re-sending alerts
that still fire (Prometheus re-sends every evaluation with endsAt = 4 x its resend delay). Planning re-posts every
open alert to this notifier every audit cycle, whatever `repeat_interval` says, with a keep-alive of 3 x the audit
interval + 5 min (`Notification.keep_alive`), so endsAt = send time + keep-alive always lies past the next
cycle's re-post; a resolved alert carries its resolution time, which resolves it at once. Notifications without a
keep-alive (`notify test`, rows queued by older versions) fall back to 3 x repeat_interval, at least 1h.

Labels: the notifier's static `labels`, ours (`severity` through `severity_map`) and `source="auditor"`;
generatorURL is `{external_url}/disks/{disk_id}` when external_url is set.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from auditor.config import AlertmanagerNotifier
from auditor.domain.alerts import AlertStatus, Notification
from auditor.notify.base import (
    DeliveryResult,
    alert_annotations,
    alert_labels,
    describe,
    generator_url,
    json_body,
    post,
    rfc3339,
    settings_secrets,
    url_secrets,
)

logger = logging.getLogger(__name__)

ALERTS_PATH = "/api/v2/alerts"
RESEND_FACTOR = 3
MIN_LIFETIME = timedelta(hours=1)


def alerts_url(base: str) -> str:
    """Returns the alerts endpoint for a configured Alertmanager URL (path prefix and query kept; accepting one
    that already ends in /api/v2/alerts)."""
    split = urlsplit(base)
    path = split.path.rstrip("/")
    if not path.endswith(ALERTS_PATH):
        path += ALERTS_PATH
    return urlunsplit(split._replace(path=path))


def firing_lifetime(repeat_interval: timedelta) -> timedelta:
    """Returns how long past `now` a firing alert is kept alive: 3 x repeat_interval, at least 1h."""
    return max(RESEND_FACTOR * repeat_interval, MIN_LIFETIME)


class AlertmanagerChannel:
    """Alertmanager API v2 client for postable alerts."""

    kind = "alertmanager"

    def build_payload(
        self, notification: Notification, settings: AlertmanagerNotifier, *, now: datetime
    ) -> list[dict[str, Any]]:
        """Returns the JSON list of postable alerts (labels, annotations, startsAt, endsAt, generatorURL)."""
        keep_alive = notification.keep_alive or firing_lifetime(settings.repeat_interval)
        keep_alive_until = now + keep_alive
        return [
            {
                "labels": alert_labels(alert, is_test=notification.is_test, settings=settings),
                "annotations": alert_annotations(alert, is_test=notification.is_test),
                "startsAt": rfc3339(alert.starts_at),
                "endsAt": rfc3339(keep_alive_until if alert.status is AlertStatus.FIRING else (alert.ends_at or now)),
                "generatorURL": generator_url(alert, settings),
            }
            for alert in notification.alerts
        ]

    async def send(
        self,
        http: httpx.AsyncClient,
        notification: Notification,
        settings: AlertmanagerNotifier,
        *,
        now: datetime,
    ) -> DeliveryResult:
        """POSTs the alerts once (Alertmanager answers 200); raises NotifyError on failure."""
        body = json_body(self.build_payload(notification, settings, now=now))
        url = alerts_url(settings.url.get_secret_value())
        # The URL posted to is the configured one plus /api/v2/alerts: a receiver may quote either back.
        secrets = settings_secrets(settings) + url_secrets(url)
        status = await post(http, url, body=body, settings=settings, headers={}, secrets=secrets, now=now)
        logger.debug("%s accepted notification %s (HTTP %d)", describe(settings), notification.id, status)
        return DeliveryResult(
            status_code=status, detail=f"{describe(settings)}: HTTP {status}, {len(notification.alerts)} alert(s)"
        )


NOTIFIER = AlertmanagerChannel()
