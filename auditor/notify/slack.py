"""The `slack` notifier: one incoming-webhook message per notification, Block Kit blocks plus a `text` fallback.

Slack limits (Block Kit reference): 50 blocks a message, 150 characters in a header, 3000 in a section's text.
We show at most 20 alerts, each in its own section, then one "…and N more" line. With `external_url` set each
alert links to its disk's page; the notifier's static labels (and source=auditor) are shown in the context line.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import httpx

from auditor.config import NotifierCommon, SlackNotifier
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

MAX_ALERTS = 20
HEADER_MAX = 150
SECTION_MAX = 3000
DESCRIPTION_MAX = 1000
FALLBACK_SUMMARIES = 5
TEST_NOTE = "This is a test notification from the Katapult backup auditor; no action is needed."


def escape(text: str) -> str:
    """Returns text safe inside Slack mrkdwn: &, < and > escaped as Slack requires."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _alert_text(alert: Alert, *, now: datetime, settings: NotifierCommon | None = None) -> str:
    where = []
    if alert.disk_id:
        where.append(f"disk `{escape(alert.disk_id)}`")
    if alert.policy_id:
        where.append(f"policy `{escape(alert.policy_id)}`")
    if alert.status is AlertStatus.FIRING:
        first = f":red_circle: *{escape(alert.summary)}*"
        when = f"Since {human_time(alert.starts_at)}"
    else:
        first = f":large_green_circle: *Resolved:* {escape(alert.summary)}"
        ended = alert.ends_at or now
        lasted = format_duration(ended - alert.starts_at, style="alert")
        when = f"Lasted {lasted} (until {human_time(ended)})"
    meta = " · ".join([f"`{escape(alert.rule)}`", escape(alert.severity.value), *where])
    lines = [first, meta]
    if alert.description:
        lines.append(escape(_clip(alert.description, DESCRIPTION_MAX)))
    if alert.remediation and alert.status is AlertStatus.FIRING:
        lines.append(f"*What to do:* {escape(alert.remediation)}")
    link = generator_url(alert, settings) if settings is not None else ""
    if link:
        # Slack link syntax <url|text>: the URL must not hold "|" or ">" (generator_url percent-quotes the id).
        when += f" · <{link.replace('|', '%7C').replace('>', '%3E')}|Open in the auditor>"
    lines.append(when)
    return _clip("\n".join(lines), SECTION_MAX)


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def _alert_section(alert: Alert, index: int, *, now: datetime, settings: NotifierCommon) -> dict[str, Any]:
    """Returns one alert's section, with a "Runbook" button beside it when [notify] runbook_url is set."""
    section = _section(_alert_text(alert, now=now, settings=settings))
    if alert.runbook_url:
        # Block Kit: a section's accessory button opens `url` (at most 3000 characters); action_id is unique.
        section["accessory"] = {"type": "button", "text": {"type": "plain_text", "text": "Runbook"},
                                "url": alert.runbook_url[:3000], "action_id": f"runbook-{index}"}
    return section


def fallback_text(notification: Notification) -> str:
    """Returns the plain `text` shown in notifications and by clients that cannot render blocks."""
    summaries = [a.summary for a in notification.alerts[:FALLBACK_SUMMARIES]]
    more = len(notification.alerts) - len(summaries)
    text = headline(notification)
    if summaries:
        text += ": " + "; ".join(summaries) + (f"; and {more} more" if more > 0 else "")
    return escape(text)


class SlackChannel:
    """Slack incoming webhook."""

    kind = "slack"

    def build_payload(self, notification: Notification, settings: SlackNotifier, *, now: datetime) -> dict[str, Any]:
        """Returns the incoming-webhook body: `text` fallback plus header, one section per alert, a context."""
        blocks: list[dict[str, Any]] = [
            {
                "type": "header",
                "text": {"type": "plain_text", "text": _clip(headline(notification), HEADER_MAX), "emoji": True},
            }
        ]
        if notification.is_test:
            blocks.append(_section(f":test_tube: {TEST_NOTE}"))
        shown = notification.alerts[:MAX_ALERTS]
        blocks += [_alert_section(alert, i, now=now, settings=settings) for i, alert in enumerate(shown)]
        hidden = len(notification.alerts) - len(shown)
        labels = ", ".join(f"{k}={v}" for k, v in sorted(static_labels(settings).items()))
        if hidden > 0:
            blocks.append(_section(f"…and {hidden} more"))
        blocks.append(
            {
                "type": "context",
                "elements": [
                    {
                        "type": "mrkdwn",
                        "text": escape(f"Katapult backup auditor · notifier {settings.name} · {labels}"),
                    }
                ],
            }
        )
        return {"text": fallback_text(notification), "blocks": blocks}

    async def send(
        self, http: httpx.AsyncClient, notification: Notification, settings: SlackNotifier, *, now: datetime
    ) -> DeliveryResult:
        """POSTs the message once (Slack answers 200 "ok"); raises NotifyError on failure."""
        return await post_to_webhook(http, notification, settings, url=settings.webhook_url.get_secret_value(),
                                     payload=self.build_payload(notification, settings, now=now), now=now)


NOTIFIER = SlackChannel()
