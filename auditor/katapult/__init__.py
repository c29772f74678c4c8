"""The Katapult Core API client: wire parsing, pacing, retries and error mapping. httpx stays in here."""

from __future__ import annotations

from auditor.katapult.client import KatapultClient, OrgRef, RequestStats
from auditor.katapult.pacing import RateLimiter

__all__ = ["KatapultClient", "OrgRef", "RateLimiter", "RequestStats"]
