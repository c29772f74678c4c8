"""The notifier registry: kind -> notifier, written out literally so every channel is one grep away."""

from __future__ import annotations

from typing import Any

from auditor.config import NotifierCommon
from auditor.errors import ConfigError
from auditor.notify import alertmanager, email, pagerduty, slack, teams, webhook
from auditor.notify.base import Notifier

# Kinds are stored strings (outbox rows, config files): never rename one.
NOTIFIERS: dict[str, Notifier[Any]] = {
    "webhook": webhook.NOTIFIER,
    "alertmanager": alertmanager.NOTIFIER,
    "pagerduty": pagerduty.NOTIFIER,
    "slack": slack.NOTIFIER,
    "teams": teams.NOTIFIER,
    "email": email.NOTIFIER,
}


def notifier_for(settings: NotifierCommon) -> Notifier[Any]:
    """Returns the notifier for a notifier's settings (by its `kind`); ConfigError naming it if unknown."""
    kind = getattr(settings, "kind", None)
    notifier = NOTIFIERS.get(kind) if isinstance(kind, str) else None
    if notifier is None:
        raise ConfigError([f"notifier {settings.name!r}: unknown kind {kind!r}; known: {', '.join(sorted(NOTIFIERS))}"])
    return notifier
