"""The `teams` notifier: one Adaptive Card per notification, posted to a Microsoft Teams Workflows webhook.

Office 365 connectors are retired; a Workflows flow ("Post to a channel when a webhook request is received") takes
Adaptive Cards only, wrapped as `{"type": "message", "attachments": [{"contentType":
"application/vnd.microsoft.card.adaptive", "contentUrl": null, "content": <card>}]}`, and answers 202 Accepted.
Teams caps a message at about 28 KB, so we show at most 20 alerts, then one "…and N more" line. With
`external_url` set each alert links to its disk's page (Action.OpenUrl) and the card to the findings page; the
notifier's static labels (and source=auditor) are shown in the footer.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import httpx

from auditor.config import TeamsNotifier
from auditor.domain.alerts import Alert, AlertStatus, Notification
from auditor.notify.base import (
    DeliveryResult,
    generator_url,
    headline,
    human_time,
    post_to_webhook,
    static_labels,
)
from auditor.vocabulary import format_duration

logger = logging.getLogger(__name__)

CARD_CONTENT_TYPE = "application/vnd.microsoft.card.adaptive"
CARD_SCHEMA = "http://adaptivecards.io/schemas/adaptive-card.json"
# Adaptive Cards 1.4 is the newest version every Teams client renders (ActionSet needs 1.2).
CARD_VERSION = "1.4"
MAX_ALERTS = 20
DESCRIPTION_MAX = 1000
TEST_NOTE = "This is a test notification from the Katapult backup auditor; no action is needed."


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def literal(text: str, **style: Any) -> dict[str, Any]:
    """Returns a RichTextBlock showing `text` as it is: a TextBlock reads markdown (links, emphasis, lists) and
    {{DATE()}} functions, so a disk named "[click](https://…)" would become a link in the channel."""
    return {"type": "RichTextBlock", "inlines": [{"type": "TextRun", "text": text, **style}]}


def _facts(alert: Alert, *, now: datetime) -> list[dict[str, str]]:
    facts = [{"title": "Rule", "value": alert.rule}, {"title": "Severity", "value": alert.severity.value}]
    if alert.disk_id:
        facts.append({"title": "Disk", "value": f"{alert.disk_name} ({alert.disk_id})" if alert.disk_name
                      else alert.disk_id})
    if alert.organization:
        facts.append({"title": "Organization", "value": alert.organization})
    if alert.policy_id:
        facts.append({"title": "Policy", "value": alert.policy_id})
    if alert.status is AlertStatus.FIRING:
        facts.append({"title": "Since", "value": human_time(alert.starts_at)})
    else:
        ended = alert.ends_at or now
        facts.append({"title": "Resolved", "value": human_time(ended)})
        facts.append({"title": "Lasted", "value": format_duration(ended - alert.starts_at, style="alert")})
    return facts


def _alert_container(alert: Alert, *, settings: TeamsNotifier, now: datetime) -> dict[str, Any]:
    is_firing = alert.status is AlertStatus.FIRING
    items: list[dict[str, Any]] = [
        literal(alert.summary if is_firing else f"Resolved: {alert.summary}", weight="Bolder",
                color="Attention" if is_firing else "Good"),
        {"type": "FactSet", "facts": _facts(alert, now=now)},
    ]
    if alert.description:
        items.append(literal(_clip(alert.description, DESCRIPTION_MAX), isSubtle=True))
    if alert.remediation and is_firing:
        items.append(literal(f"What to do: {alert.remediation}"))
    link = generator_url(alert, settings)  # "" without external_url
    actions = [{"type": "Action.OpenUrl", "title": "Open in the auditor", "url": link}] if link else []
    if alert.runbook_url:
        actions.append({"type": "Action.OpenUrl", "title": "Runbook", "url": alert.runbook_url})
    if actions:
        items.append({"type": "ActionSet", "actions": actions})
    return {"type": "Container", "separator": True, "items": items}


class TeamsChannel:
    """Microsoft Teams Workflows webhook."""

    kind = "teams"

    def build_payload(self, notification: Notification, settings: TeamsNotifier, *, now: datetime) -> dict[str, Any]:
        """Returns the Workflows body: one Adaptive Card with a title, one container per alert and a footer."""
        firing = any(a.status is AlertStatus.FIRING for a in notification.alerts)
        body: list[dict[str, Any]] = [
            literal(headline(notification), size="Large", weight="Bolder", color="Attention" if firing else "Good")
        ]
        if notification.is_test:
            body.append({"type": "TextBlock", "text": TEST_NOTE, "wrap": True})
        shown = notification.alerts[:MAX_ALERTS]
        body += [_alert_container(alert, settings=settings, now=now) for alert in shown]
        hidden = len(notification.alerts) - len(shown)
        if hidden > 0:
            body.append({"type": "TextBlock", "text": f"…and {hidden} more", "separator": True, "wrap": True})
        labels = ", ".join(f"{k}={v}" for k, v in sorted(static_labels(settings).items()))
        body.append(
            {
                "type": "TextBlock",
                "text": f"Katapult backup auditor · notifier {settings.name} · {labels}",
                "size": "Small",
                "isSubtle": True,
                "separator": True,
                "wrap": True,
            }
        )
        base = settings.external_url
        actions = [{"type": "Action.OpenUrl", "title": "Open findings", "url": f"{base}/findings"}] if base else []
        card = {
            "type": "AdaptiveCard",
            "$schema": CARD_SCHEMA,
            "version": CARD_VERSION,
            # Teams renders cards narrow unless asked; alerts with facts read better full width.
            "msteams": {"width": "Full"},
            "body": body,
            "actions": actions,
        }
        return {
            "type": "message",
            "attachments": [{"contentType": CARD_CONTENT_TYPE, "contentUrl": None, "content": card}],
        }

    async def send(
        self, http: httpx.AsyncClient, notification: Notification, settings: TeamsNotifier, *, now: datetime
    ) -> DeliveryResult:
        """POSTs the card once (Workflows answers 202 Accepted); raises NotifyError on failure."""
        return await post_to_webhook(http, notification, settings, url=settings.webhook_url.get_secret_value(),
                                     payload=self.build_payload(notification, settings, now=now), now=now)


NOTIFIER = TeamsChannel()
