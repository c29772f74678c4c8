"""Pure helpers for the delivery stage: which alerts a notifier wants, how they group, when to repeat.

No I/O and no clock: callers pass `now` in. The wait before a retry is `auditor.domain.retry.backoff`, shared with
the Katapult client, with the delivery stage's numbers below.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from auditor.config import NotifierCommon
from auditor.domain.alerts import Alert, AlertStatus
from auditor.domain.models import Severity

# `group_by` names what the config calls a dimension; the group labels use Alertmanager's label names.
GROUP_LABELS = {"rule": "alertname", "severity": "severity", "disk_id": "disk_id", "tier": "tier"}
# Alertmanager prefixes a group key with the matchers of the route that grouped it; ours is the root route.
ROUTE_KEY = "{}"
# Retries of a notification: full jitter over 5 s doubling up to 15 minutes (a receiver's Retry-After, up to
# notify.max_retry_after, is the least wait).
BACKOFF_BASE = 5.0
BACKOFF_CAP = 900.0


def wants(settings: NotifierCommon, alert: Alert) -> bool:
    """Returns whether the notifier takes the alert: severity at least min_severity, rule listed (if any are),
    and resolved alerts only with send_resolved. `audit-incomplete` gets the same filters (it is high)."""
    if alert.severity.rank < Severity(settings.min_severity).rank:
        return False
    if settings.rules and alert.rule not in settings.rules:
        return False
    return alert.status is AlertStatus.FIRING or settings.send_resolved


def _label_set(labels: dict[str, str]) -> str:
    # Go's model.LabelSet.String(): sorted names, quoted values, ", " between pairs.
    pairs = (f"{name}={json.dumps(labels[name], ensure_ascii=False)}" for name in sorted(labels))
    return "{" + ", ".join(pairs) + "}"


def group_key(group_labels: dict[str, str]) -> str:
    """Returns Alertmanager's group key for a set of group labels, e.g. `{}:{alertname="schedule-stale"}`."""
    return f"{ROUTE_KEY}:{_label_set(group_labels)}"


def group_alerts(
    notifier: str,
    alerts: Sequence[Alert],
    group_by: Sequence[str],
    *,
    severity_map: Mapping[str, str] | None = None,
) -> list[tuple[str, dict[str, str], tuple[Alert, ...]]]:
    """Returns (group_key, group_labels, alerts) per group: alerts sorted by fingerprint, groups by key.

    Labels with an empty value (no disk for `audit-incomplete`) are left out of the group labels, as Alertmanager
    drops empty labels. The key does not include `notifier`: a notification carries its notifier separately, and
    receivers see the key exactly as Alertmanager would send it. `severity_map` (the notifier's) makes the
    severity group label the value the notifier sends, so alerts mapped to one value share a group.
    """
    del notifier  # part of the delivery stage's call shape; grouping is the same for every notifier
    names = sorted({GROUP_LABELS[dimension] for dimension in group_by})
    groups: dict[str, tuple[dict[str, str], list[Alert]]] = {}
    for alert in alerts:
        labels = alert.labels()
        if severity_map:
            labels["severity"] = severity_map.get(labels["severity"]) or labels["severity"]
        group_labels = {name: labels[name] for name in names if labels.get(name)}
        key = group_key(group_labels)
        groups.setdefault(key, (group_labels, []))[1].append(alert)
    return [
        (key, labels, tuple(sorted(members, key=lambda a: a.fingerprint)))
        for key, (labels, members) in sorted(groups.items())
    ]


def is_repeat_due(last_sent_at: datetime | None, repeat_interval: timedelta, *, now: datetime) -> bool:
    """Returns whether an unchanged, still-firing group should be sent again: never if repeat_interval is 0,
    at once if it was never sent, else once repeat_interval has passed since the last send."""
    if repeat_interval <= timedelta(0):
        return False
    if last_sent_at is None:
        return True
    return now - last_sent_at >= repeat_interval
