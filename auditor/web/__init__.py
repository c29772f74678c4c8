"""The web dashboard: server-rendered pages (Jinja2, inline SVG charts, no JavaScript) beside the JSON API."""

from __future__ import annotations

from auditor.web.headers import PageHeaders
from auditor.web.pages import dashboard_router

__all__ = ["PageHeaders", "dashboard_router"]
