"""The Katapult Core API client: wire parsing, pacing, retries and error mapping. httpx stays in here."""

from __future__ import annotations

import httpx

from auditor.katapult.client import KatapultClient, OrgRef, RequestStats
from auditor.katapult.pacing import RateLimiter

# The HTTP seam (Katapult, notifiers, the heartbeat): tests and the demo pass an in-process transport. Named here
# so layers above can type it without importing httpx themselves.
Transport = httpx.AsyncBaseTransport

__all__ = ["KatapultClient", "OrgRef", "RateLimiter", "RequestStats", "Transport"]
