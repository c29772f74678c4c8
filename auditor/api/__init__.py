"""The HTTP reports API: `create_app(deps)` with health, readiness, Prometheus metrics and /api/v1 reports."""

from __future__ import annotations

from auditor.api.app import create_app
from auditor.api.deps import ApiDeps
from auditor.service.runner import CycleMetrics

__all__ = ["ApiDeps", "CycleMetrics", "create_app"]
