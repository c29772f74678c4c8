"""What the notifier tests share: a fixed clock, sample alerts and notifications, and pytest fixtures for the
loopback receivers (tests/receivers.py), an HTTP client and log capture.

A test module takes a fixture by binding it at module level, e.g. `receiver = notify_support.receiver`: pytest then
finds it in that module (a module-scoped server is one per module, an autouse fixture applies to that module only),
and the test parameters of the same name shadow an assignment rather than an unused import.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import TypeVar

import httpx
import pytest
from receivers import HttpReceiver, SmtpReceiver

from auditor.domain.alerts import Alert, AlertStatus, Notification
from auditor.domain.models import Severity

NOW = datetime(2026, 11, 28, 7, 0, tzinfo=UTC)

# ------------------------------------------------------------------------------------------------ samples

DISK_1 = Alert(
    fingerprint="1111aaaa2222bbbb",
    rule="unprotected-disk",
    severity=Severity.CRITICAL,
    status=AlertStatus.FIRING,
    summary="Disk dsk_1 has no backup policy",
    description="No backup policy covers disk dsk_1 (web-1).",
    starts_at=datetime(2026, 11, 28, 4, 0, tzinfo=UTC),
    disk_id="dsk_1",
)
DISK_2 = replace(
    DISK_1,
    fingerprint="3333cccc4444dddd",
    severity=Severity.HIGH,
    summary="Disk dsk_2 has no backup policy",
    description="No backup policy covers disk dsk_2 (db-1).",
    starts_at=datetime(2026, 11, 28, 5, 30, 15, 250000, tzinfo=UTC),
    disk_id="dsk_2",
)
STALE = Alert(
    fingerprint="5555eeee6666ffff",
    rule="schedule-stale",
    severity=Severity.MEDIUM,
    status=AlertStatus.RESOLVED,
    summary="Policy dbp_9 on dsk_3 missed its run",
    description="next_invocation_at is 2h in the past.",
    starts_at=datetime(2026, 11, 28, 3, 48, tzinfo=UTC),
    ends_at=datetime(2026, 11, 28, 7, 0, tzinfo=UTC),
    disk_id="dsk_3",
    policy_id="dbp_9",
)


def notification(id_: str, notifier: str, *alerts: Alert) -> Notification:
    """Returns a notification created at NOW, grouped by alertname (the first alert's rule)."""
    alertname = alerts[0].rule
    return Notification(
        id=id_,
        notifier=notifier,
        group_key=f'{{}}:{{alertname="{alertname}"}}',
        group_labels={"alertname": alertname},
        alerts=alerts,
        created_at=NOW,
    )


# One firing alert in a notification of its own: what the delivery tests send.
ALERT = replace(DISK_1, description="No backup policy covers disk dsk_1.")
NOTE = notification("ntf_0001", "n", ALERT)

# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def http_server() -> Iterator[HttpReceiver]:
    with HttpReceiver() as server:
        yield server


@pytest.fixture(scope="module")
def smtp_server() -> Iterator[SmtpReceiver]:
    with SmtpReceiver() as server:
        yield server


Server = TypeVar("Server", HttpReceiver, SmtpReceiver)


def _reset_around(server: Server) -> Iterator[Server]:
    server.reset()
    yield server
    server.reset()


@pytest.fixture
def receiver(http_server: HttpReceiver) -> Iterator[HttpReceiver]:
    """The module's HTTP receiver, with no requests and no script before and after the test."""
    yield from _reset_around(http_server)


@pytest.fixture
def smtp(smtp_server: SmtpReceiver) -> Iterator[SmtpReceiver]:
    """The module's SMTP receiver, with no messages and no scripted replies before and after the test."""
    yield from _reset_around(smtp_server)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    # trust_env=False: a proxy in the environment must not intercept loopback traffic in tests.
    async with httpx.AsyncClient(trust_env=False) as client:
        yield client


@pytest.fixture(autouse=True)
def debug_logs(caplog: pytest.LogCaptureFixture) -> None:
    # Capture everything we log, at every level. httpx itself logs each request URL at INFO (secrets and all);
    # the daemon's log setup must keep the "httpx" logger at WARNING, so the tests do the same.
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.WARNING, logger="httpx")
