"""`auditor demo`: the built-in fake Katapult's demo fleet, audited on a local SQLite file."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from auditor.config import Settings
from auditor.fake import create_app, demo_fleet
from auditor.service import AuditOutcome, Services, open_services
from auditor.service.cycle import run_cycle
from auditor.service.delivery import drain
from auditor.service.queries import read_report
from auditor.vocabulary import RETENTION_BELOW_MINIMUM, Severity

DEMO_TOKEN = "fake-token"
DEMO_API_URL = "http://fake-katapult.invalid/core/v1"
DEMO_WEBHOOK_URL = "http://demo-receiver.invalid/alerts"


class PrintingReceiver:
    """An in-process webhook receiver that prints each Alertmanager-format notification it gets (ASGI)."""

    def __init__(self, write: Callable[[str], object] = sys.stdout.write) -> None:
        self.write = write
        self.received: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            payload = json.loads(body)
            self.received.append(payload)
            alerts = payload.get("alerts", [])
            names = sorted({a["labels"].get("alertname", "?") for a in alerts})
            self.write(f"[demo webhook] {payload.get('status', '?').upper()} {len(alerts)} alert(s): "
                       f"{', '.join(names)} (groupKey {payload.get('groupKey')})\n")
            status = 200
        except (ValueError, KeyError, AttributeError):
            status = 400
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})


def demo_settings(*, db_path: str, listen: str, interval: str = "30s") -> Settings:
    """Returns settings for the demo: the demo fleet's targets, a small page size, a short interval. No config file
    and no AUDITOR_* variable applies: the demo never reaches anything but its fake Katapult and its SQLite file."""
    _, targets = demo_fleet(now=int(time.time()))
    data: dict[str, Any] = {
        "katapult": {"api_url": DEMO_API_URL, "per_page": 10, "max_requests_per_minute": 6000},
        "database": {"url": f"sqlite:///{db_path}"},
        "audit": {"interval": interval, "disks": targets.disks, "organizations": targets.organizations,
                  "jitter": "0s"},
        "api": {"listen": listen},
        # Nothing is logged before the first report (the daemon's "is now the leader" is a warning); `run_demo`
        # lowers the threshold to warnings once the report is shown.
        "log": {"level": "error"},
        # Alerts from the demo go to an in-process receiver that prints them (see PrintingReceiver).
        "notifiers": [{"kind": "webhook", "name": "demo-webhook", "url": DEMO_WEBHOOK_URL,
                       "min_severity": Severity.MEDIUM.value, "repeat_interval": "1h"}],
        # The demo fleet annotates a few disks and a VM (README "The fake Katapult"): tiers follow them.
        "tiers": [
            {"name": "gold", "match": {"disk_annotations": {"backup-tier": "gold"}}, "min_retention": 30,
             "min_retention_days": 30, "severity": {RETENTION_BELOW_MINIMUM: Severity.HIGH.value}},
            {"name": "scratch", "match": {"vm_annotations": {"env": ["dev", "scratch"]}}, "exempt": True,
             "reason": "dev machines are rebuilt from images"},
        ],
    }
    return Settings(**data)


Serve = Callable[..., Awaitable[int]]  # auditor.daemon.serve, passed in by the CLI (only it starts the daemon)


async def run_demo(settings: Settings, *, once: bool, show: Callable[[AuditOutcome, dict[str, Any]], None],
                   serve: Serve | None = None) -> int:
    """Audits the demo fleet once and shows the report; without `once`, keeps the daemon running.

    The daemon audits the in-process fake every `audit.interval` and serves the API on `api.listen`; the first
    report is shown, then where the API is, and it runs until Ctrl-C (exit 0).
    """

    fleet, _ = demo_fleet(now=int(time.time()))
    transport = httpx.ASGITransport(app=create_app(fleet))
    webhook = httpx.ASGITransport(app=PrintingReceiver())
    if not once:
        shown = False

        async def first_report(services: Services, outcome: AuditOutcome) -> None:
            nonlocal shown
            if shown:
                return
            shown = True
            show(outcome, await read_report(services))
            base = f"http://{settings.api.listen}"
            sys.stdout.write(f"dashboard: {base}/\n"
                             f"API: {base}/api/v1/report  docs: {base}/docs  metrics: {base}/metrics\n"
                             f"auditing every {settings.audit.interval.total_seconds():.0f}s; Ctrl-C stops\n")
            sys.stdout.flush()
            # The report came first; from now on the daemon's warnings are worth seeing (see demo_settings).
            logging.getLogger().setLevel(logging.WARNING)

        assert serve is not None, "the daemon demo needs auditor.daemon.serve"
        return await serve(settings, transport=transport, token=DEMO_TOKEN, on_cycle=first_report,
                           notify_transport=webhook)

    async with open_services(settings, transport=transport, token=DEMO_TOKEN, notify_transport=webhook) as services:
        outcome = await run_cycle(services, trigger="demo")
        show(outcome, await read_report(services))  # the report first, then the alerts it sent
        await drain(services, within=10)
    return 0
