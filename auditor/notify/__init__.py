"""Notifier channels: one module per kind (a pure payload builder plus one send), the registry, delivery policy."""

from __future__ import annotations

from auditor.notify.base import DeliveryResult, Notifier, Payload
from auditor.notify.registry import NOTIFIERS, notifier_for

__all__ = ["NOTIFIERS", "DeliveryResult", "Notifier", "Payload", "notifier_for"]
