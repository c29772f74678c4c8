"""The heartbeat against a real loopback receiver: order, paths and bodies, retries, hangs, and no leaked URL."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import notify_support
import pytest
from receivers import HttpReceiver, Reply, free_port

from auditor.config import HeartbeatSettings
from auditor.notify.heartbeat import MAX_BODY_BYTES, Heartbeat, ping_body, summary_line

# Anything still unraisable (a task destroyed with an unretrieved exception) fails the test.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")

SECRET = "0d338dcc-a054-11ec-s3cr3t-0242ac120002"
HOLD = 30.0  # a hanging reply: held back until the receiver is reset at teardown

http_server = notify_support.http_server
receiver = notify_support.receiver


@pytest.fixture(autouse=True)
def _env(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    # Capture everything at every level, httpx included: the heartbeat itself must keep httpx's URL lines quiet.
    caplog.set_level(logging.DEBUG)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Collects what the event loop reports (e.g. "Task exception was never retrieved"); must stay empty."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    gc.collect()  # unretrieved task exceptions are reported when the task is collected
    await asyncio.sleep(0)
    loop.set_exception_handler(previous)
    assert errors == []


class Sleeps:
    """An injectable sleep that records the delays and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def ping_url(receiver: HttpReceiver) -> str:
    return f"{receiver.url}/ping/{SECRET}"


def assert_no_secret(caplog: pytest.LogCaptureFixture) -> None:
    text = caplog.text + " ".join(str(r.args) for r in caplog.records)
    assert SECRET not in text
    assert "/ping/" not in text


# --------------------------------------------------------------------------------------------- what arrives


async def test_start_then_success_arrive_in_order(receiver: HttpReceiver, loop_errors: list[Any]) -> None:
    async with Heartbeat(ping_url(receiver), sleep=Sleeps()) as beat:
        beat.start("starting run r1")
        beat.success("complete run r1: 1 targets")
        await beat.flush(5)
        assert (beat.sent, beat.failures, beat.pending) == (2, 0, 0)
    arrived = [(r.method, r.path, r.body) for r in receiver.requests]
    assert arrived == [
        ("POST", f"/ping/{SECRET}/start", b"starting run r1"),
        ("POST", f"/ping/{SECRET}", b"complete run r1: 1 targets"),
    ]
    assert receiver.requests[0].headers["content-type"] == "text/plain; charset=utf-8"


async def test_start_then_fail(receiver: HttpReceiver, loop_errors: list[Any]) -> None:
    async with Heartbeat(ping_url(receiver) + "/", sleep=Sleeps()) as beat:  # a trailing slash is tolerated
        beat.start()
        beat.fail("failed run r2: 0 targets; reason: katapult unreachable")
        await beat.flush(5)
        assert (beat.sent, beat.failures) == (2, 0)
    assert [(r.path, r.body) for r in receiver.requests] == [
        (f"/ping/{SECRET}/start", b""),
        (f"/ping/{SECRET}/fail", b"failed run r2: 0 targets; reason: katapult unreachable"),
    ]


async def test_query_string_stays_after_the_suffix(receiver: HttpReceiver) -> None:
    # Slug URLs may carry ?create=1 (auto-provisioning); the /start suffix belongs to the path, not the query.
    async with Heartbeat(ping_url(receiver) + "?create=1", sleep=Sleeps()) as beat:
        beat.start()
        await beat.flush(5)
    assert [(r.path, r.query) for r in receiver.requests] == [(f"/ping/{SECRET}/start", "create=1")]


async def test_body_is_one_utf8_line_truncated(receiver: HttpReceiver) -> None:
    async with Heartbeat(ping_url(receiver), sleep=Sleeps()) as beat:
        beat.success("line one\nline two\r\n\tend")
        beat.success("é" * 6_000)  # 12,000 bytes
        await beat.flush(5)
    first, second = (r.body for r in receiver.requests)
    assert first == b"line one line two end"
    assert len(second) <= MAX_BODY_BYTES
    assert second.decode("utf-8").endswith("…")
    assert second.startswith("é".encode() * 100)


def test_ping_body_keeps_short_text() -> None:
    assert ping_body("ok") == b"ok"
    assert ping_body("x" * MAX_BODY_BYTES) == b"x" * MAX_BODY_BYTES
    assert len(ping_body("x" * (MAX_BODY_BYTES + 1))) == MAX_BODY_BYTES


# --------------------------------------------------------------------------------------------- failures


async def test_hanging_receiver_never_blocks_the_caller(
    receiver: HttpReceiver, loop_errors: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    receiver.script(Reply(delay=HOLD), Reply(delay=HOLD))
    beat = Heartbeat(ping_url(receiver), timeout=0.3, max_attempts=1, sleep=Sleeps())
    began = time.monotonic()
    beat.start("s")
    beat.success("ok")
    assert time.monotonic() - began < 0.5  # returned at once: the receiver holds each ping for HOLD
    await beat.flush(5)
    assert (beat.sent, beat.failures, beat.pending) == (0, 2, 0)
    await beat.aclose()
    assert beat.failures == 2
    assert [r.path for r in receiver.requests] == [f"/ping/{SECRET}/start", f"/ping/{SECRET}"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        "heartbeat ping start failed after 1 attempt(s): timeout after 0.3s",
        "heartbeat ping success failed after 1 attempt(s): timeout after 0.3s",
    ]
    assert_no_secret(caplog)


async def test_flush_gives_up_on_time_and_aclose_counts_the_rest(
    receiver: HttpReceiver, loop_errors: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    receiver.script(Reply(delay=HOLD))
    beat = Heartbeat(ping_url(receiver), timeout=10, sleep=Sleeps())
    beat.start()
    beat.success("ok")
    began = time.monotonic()
    await beat.flush(0.2)
    assert time.monotonic() - began < 1.0
    assert beat.pending == 2
    await beat.aclose()
    assert (beat.sent, beat.failures, beat.pending) == (0, 2, 0)
    assert "heartbeat: 2 ping(s) given up at shutdown" in caplog.text
    beat.fail("after close")  # ignored, never raises
    assert beat.pending == 0
    assert_no_secret(caplog)


async def test_500_twice_then_200_is_delivered_once(receiver: HttpReceiver, loop_errors: list[Any]) -> None:
    receiver.script(Reply(500, "oops"), Reply(503))
    sleeps = Sleeps()
    async with Heartbeat(ping_url(receiver), max_attempts=3, sleep=sleeps) as beat:
        beat.success("ok")
        await beat.flush(5)
        assert (beat.sent, beat.failures) == (1, 0)
    assert len(receiver.requests) == 3
    assert sleeps.delays == [1.0, 2.0]


async def test_429_is_retried_within_the_cap(receiver: HttpReceiver) -> None:
    receiver.script(Reply(429, headers={"Retry-After": "3600"}))
    sleeps = Sleeps()
    async with Heartbeat(ping_url(receiver), sleep=sleeps) as beat:
        beat.start()
        await beat.flush(5)
        assert (beat.sent, beat.failures) == (1, 0)
    assert sleeps.delays == [10.0]


async def test_404_is_not_retried(
    receiver: HttpReceiver, loop_errors: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    # healthchecks.io echoes nothing secret today, but a proxy's 404 page might quote the path.
    receiver.script(Reply(404, f"not found: /ping/{SECRET}"))
    sleeps = Sleeps()
    async with Heartbeat(ping_url(receiver), max_attempts=3, sleep=sleeps) as beat:
        beat.fail("failed run")
        await beat.flush(5)
        assert (beat.sent, beat.failures) == (0, 1)
    assert len(receiver.requests) == 1
    assert sleeps.delays == []
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage().startswith("heartbeat ping fail failed after 1 attempt(s): HTTP 404: not found")
    assert_no_secret(caplog)


async def test_retries_exhausted_log_once_and_never_the_url(
    loop_errors: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    sleeps = Sleeps()
    async with Heartbeat(f"http://127.0.0.1:{free_port()}/ping/{SECRET}", max_attempts=3, sleep=sleeps) as beat:
        beat.start()
        beat.success("ok")
        await beat.flush(5)
        assert (beat.sent, beat.failures) == (0, 2)
    assert sleeps.delays == [1.0, 2.0, 1.0, 2.0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2
    assert all("failed after 3 attempt(s): transport error (ConnectError" in w for w in warnings)
    assert_no_secret(caplog)


async def test_a_bug_in_delivery_is_caught_and_counted(receiver: HttpReceiver, loop_errors: list[Any]) -> None:
    async def broken(seconds: float) -> None:
        raise RuntimeError("boom")

    receiver.script(Reply(500))
    async with Heartbeat(ping_url(receiver), sleep=broken) as beat:
        beat.start()
        beat.success("ok")
        await beat.flush(5)
        assert (beat.sent, beat.failures) == (1, 1)  # the worker survived to send the second ping


# --------------------------------------------------------------------------------------------- settings


def test_from_settings_is_none_without_a_url() -> None:
    assert Heartbeat.from_settings(HeartbeatSettings()) is None
    assert Heartbeat.from_settings(HeartbeatSettings(url="")) is None


async def test_from_settings_uses_timeout_and_attempts() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(502)

    # max_attempts=1 (not the default 3): no retry, so the settings path needs no injected sleep.
    settings = HeartbeatSettings(url=f"https://hc-ping.example/{SECRET}", timeout_seconds=2.5, max_attempts=1)
    beat = Heartbeat.from_settings(settings, transport=httpx.MockTransport(answer))
    assert beat is not None
    async with beat:
        beat.success("ok")
        await beat.flush(5)
        assert (beat.sent, beat.failures) == (0, 1)
    assert [str(r.url) for r in seen] == [f"https://hc-ping.example/{SECRET}"]
    assert seen[0].extensions["timeout"]["read"] == 2.5


# --------------------------------------------------------------------------------------------- summary line


def test_summary_line() -> None:
    line = summary_line(status="partial", targets=12, disks=340, unknown=2, opened=3, resolved=1, requests=702,
                        run_id="3f2a9c")
    assert line == ("partial run 3f2a9c: 12 targets, 340 disks, 2 unknown, 3 findings opened, 1 resolved, "
                    "702 requests")


def test_summary_line_reason_is_one_line_and_truncated() -> None:
    line = summary_line(status="failed", targets=0, disks=0, unknown=0, opened=0, resolved=0, requests=1,
                        run_id=None, reason="katapult\nunreachable " + "x" * 1_000)
    assert line.startswith("failed run: 0 targets, ")
    assert "; reason: katapult unreachable xxx" in line
    assert "\n" not in line
    assert line.endswith("…")
    assert len(line) < 500

