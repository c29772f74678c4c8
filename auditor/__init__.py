"""Backup-policy compliance auditor for the Katapult cloud."""

from __future__ import annotations

__version__ = "0.1.0"
