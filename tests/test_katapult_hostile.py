"""KatapultClient against a hostile or broken Katapult: huge bodies, malformed policies, odd error details, wrong
objects, and arbitrary JSON in every field (property-based). The client returns domain objects or raises a
KatapultError, never anything else, and no rule ever raises on what the parser lets through."""

from __future__ import annotations

import asyncio
import copy
import gzip
import json
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from clocks import FakeClock
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from profiles import examples

from auditor.domain.models import BackupPolicy, Disk, DiskSnapshot, Interval, ReadOutcome, Schedule, TargetType
from auditor.domain.rules import DISK_IN_TRASH, RETENTION_WINDOW_TOO_SHORT, RuleParams, RuleSet, evaluate
from auditor.errors import (
    AuthError,
    InTrashError,
    InvalidRequestError,
    KatapultAPIError,
    KatapultError,
    KatapultResponseError,
    NotFoundError,
    RateLimitedError,
    ResponseTooLargeError,
    UnavailableError,
    UnexpectedObjectError,
)
from auditor.fake import Fault, Fleet, create_app
from auditor.katapult import KatapultClient, OrgRef, RateLimiter, wire
from auditor.katapult import client as client_module

TOKEN = "kt-s3cr3t-DO-NOT-LOG-9f8e7d"
BASE = "http://fake/core/v1"
NOW_S = 1_786_800_000
NOW = datetime.fromtimestamp(NOW_S, UTC)
POLICIES_EP = "/disks/disk/disk_backup_policies"
Handler = Callable[[httpx.Request], httpx.Response]


# ---------------------------------------------------------------- helpers


def client(handler: Handler | httpx.AsyncBaseTransport, **kwargs: Any) -> KatapultClient:
    """A client on a MockTransport (or any transport) whose pacing and retry waits run on a virtual clock."""
    clock = FakeClock(10_000.0)

    async def no_wait(seconds: float) -> None:
        await clock.sleep(seconds)

    transport = handler if isinstance(handler, httpx.AsyncBaseTransport) else httpx.MockTransport(handler)
    options: dict[str, Any] = {
        "base_url": BASE,
        "token": TOKEN,
        "transport": transport,
        "limiter": RateLimiter(10**6, clock=clock, sleep=clock.sleep),
        "sleep": no_wait,
    }
    options.update(kwargs)
    return KatapultClient(**options)


def policy_item(**overrides: Any) -> dict[str, Any]:
    """A DiskBackupPolicy as the list endpoints really send it (README)."""
    raw: dict[str, Any] = {
        "id": "dbp_abc",
        "retention": 7,
        "total_size": 12.5,
        "target": {"type": "Disk", "value": {"id": "disk_x", "name": "System Disk"}},
        "schedule": {"interval": "daily", "next_invocation_at": NOW_S + 3600},
        "annotations": [],
    }
    raw.update(overrides)
    return raw


def disk_item(disk_id: str = "disk_x", **overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "id": disk_id,
        "name": "web-system",
        "size_in_gb": 20,
        "wwn": "abc",
        "state": "attached",
        "virtual_machine_disk": {"virtual_machine": {"id": "vm_1", "fqdn": "web.example.com"}, "boot": True},
        "annotations": [],
    }
    raw.update(overrides)
    return raw


def page(items: list[Any], *, key: str = "disk_backup_policies") -> dict[str, Any]:
    pagination = {"current_page": 1, "total_pages": 1, "total": len(items), "per_page": 200, "large_set": False}
    return {"pagination": pagination, key: items}


def error_json(code: Any, description: Any = "Something", detail: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "description": description, "detail": {} if detail is None else detail}}


def respond(status: int, body: Any) -> Handler:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return lambda request: httpx.Response(status, content=content, headers={"Content-Type": "application/json"})


def fake_harness() -> tuple[Fleet, httpx.ASGITransport]:
    fleet = Fleet()
    fleet.tokens.add(TOKEN)
    fleet.rate_limit_per_minute = 100_000
    org = fleet.add_org("acme", id="org_acme")
    fleet.add_disk(org.id, "data", id="disk_data")
    return fleet, httpx.ASGITransport(app=create_app(fleet))


def assert_clean(err: KatapultError) -> None:
    """A raised error is short, valid Unicode, free of the token, and keeps `detail` a plain dict."""
    message = str(err)
    assert len(message) <= 500
    message.encode("utf-8")  # no lone surrogates
    assert TOKEN not in message and "kt-s3cr3t" not in message
    if isinstance(err, KatapultAPIError):
        assert type(err.detail) is dict


class Chunks(httpx.AsyncByteStream):
    """A response body produced chunk by chunk; counts how many chunks the client pulled."""

    def __init__(self, chunk: bytes, count: int | None) -> None:
        self.chunk = chunk
        self.count = count
        self.pulled = 0
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.count is None or self.pulled < self.count:
            self.pulled += 1
            yield self.chunk

    async def aclose(self) -> None:
        self.closed = True


# ---------------------------------------------------------------- 1. bounded responses


async def test_a_body_past_the_cap_is_refused_while_streaming() -> None:
    # No Content-Length and a body that never ends: only counting while streaming can stop it.
    stream = Chunks(b" " * 65_536, None)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=stream, headers={"X-RateLimit-Permitted": "1000"})

    async with client(handler, max_response_bytes=200_000) as c:
        with pytest.raises(ResponseTooLargeError) as info:
            await c.list_disk_policies("disk_x")
    err = info.value
    assert stream.pulled == 4  # 4 × 64 KiB is the first count past 200,000 bytes; nothing more was read
    assert stream.closed
    assert err.code == "response_too_large" and err.permanent and err.max_bytes == 200_000
    assert isinstance(err, KatapultResponseError)
    assert err.status_code == 200 and err.target == "disk_x" and err.endpoint == POLICIES_EP
    assert POLICIES_EP in str(err) and "200000" in str(err)
    assert "per_page" not in str(err) and "disk%5Bid%5D" not in str(err)
    assert_clean(err)
    # Not retried; counted like any other answer with its status; pacing still saw the headers.
    assert c.stats.requests == 1 and c.stats.retries == 0 and c.stats.by_status == {"200": 1}
    assert c.limiter.permitted == 1000


async def test_a_declared_content_length_past_the_cap_is_refused_before_reading() -> None:
    stream = Chunks(b"{}", 1)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=stream, headers={"Content-Length": str(10**9)})

    async with client(handler, max_response_bytes=1024) as c:
        with pytest.raises(ResponseTooLargeError):
            await c.get_disk("disk_x")
    assert stream.pulled == 0
    assert c.stats.requests == 1 and c.stats.retries == 0


async def test_a_compressed_body_is_counted_as_it_expands() -> None:
    bomb = gzip.compress(b'{"pagination": {}, "x": "' + b"a" * 5_000_000 + b'"}')
    assert len(bomb) < 20_000

    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Encoding": "gzip", "Content-Length": str(len(bomb))}
        return httpx.Response(200, content=bomb, headers=headers)

    async with client(handler, max_response_bytes=100_000) as c:
        with pytest.raises(ResponseTooLargeError):
            await c.list_disk_policies("disk_x")


async def test_the_cap_is_inclusive_through_the_fake() -> None:
    fleet, transport = fake_harness()
    for i in range(50):
        fleet.add_policy("disk_data", id=f"dbp_{i:03d}")
    async with client(transport) as c:
        assert len(await c.list_disk_policies("disk_data")) == 50
    # Measure the exact body the fake sends, then allow exactly that many bytes, and one fewer.
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as raw:
        body = await raw.get(
            POLICIES_EP,
            params={"disk[id]": "disk_data", "page": "1", "per_page": "200"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
    exact = len(body.content)
    async with client(transport, max_response_bytes=exact) as c:
        assert len(await c.list_disk_policies("disk_data")) == 50
    async with client(transport, max_response_bytes=exact - 1) as c:
        with pytest.raises(ResponseTooLargeError) as info:
            await c.list_disk_policies("disk_data")
    assert info.value.status_code == 200 and c.stats.requests == 1


async def test_an_oversized_error_body_is_refused_and_not_retried() -> None:
    huge = json.dumps(error_json("service_unavailable", "x" * 100_000)).encode()
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(503, content=huge, headers={"Retry-After": "2"})

    async with client(handler, max_response_bytes=10_000) as c:
        with pytest.raises(ResponseTooLargeError) as info:
            await c.list_org_disks(OrgRef("org_x"))
    assert calls == 1 and info.value.status_code == 503 and c.stats.by_status == {"503": 1}


async def test_an_oversized_429_still_pauses_pacing() -> None:
    huge = json.dumps(error_json("rate_limit_reached", "x" * 100_000, {"total_permitted": 200})).encode()
    async with client(lambda request: httpx.Response(429, content=huge), max_response_bytes=10_000) as c:
        with pytest.raises(ResponseTooLargeError):
            await c.get_disk("disk_x")
    assert c.stats.rate_limited == 1


@pytest.mark.parametrize("cap", [0, -1, True])
def test_max_response_bytes_is_validated(cap: int) -> None:
    with pytest.raises(ValueError, match="max_response_bytes"):
        KatapultClient(base_url=BASE, token=TOKEN, max_response_bytes=cap)


@pytest.mark.parametrize(("mebibytes", "refused"), [(16, False), (17, True)])
async def test_max_response_bytes_defaults_to_16_mib(mebibytes: int, refused: bool) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        # Blanks are not JSON: a body within the default cap is read whole and then found malformed.
        return httpx.Response(200, stream=Chunks(b" " * (1024 * 1024), mebibytes))

    async with client(handler) as c:
        with pytest.raises(KatapultResponseError) as info:
            await c.get_disk("disk_x")
    assert isinstance(info.value, ResponseTooLargeError) is refused


# ---------------------------------------------------------------- 2. malformed policies are malformed, not judged


def parse_policies(items: list[Any]) -> wire.Page[BackupPolicy]:
    return wire.parse_policy_page(page(items), endpoint=POLICIES_EP, target="disk_x", page=1)


def with_item_3(mutate: Callable[[dict[str, Any]], Any]) -> list[dict[str, Any]]:
    items = [policy_item(id=f"dbp_{i}") for i in range(5)]
    mutate(items[3])
    return items


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda p: p.update(retention=-1), "retention"),
        (lambda p: p.update(retention=0), "retention"),
        (lambda p: p.update(retention=-(10**15)), "retention"),
        (lambda p: p.update(retention=2**31), "retention"),
        (lambda p: p.update(retention=10**400), "retention"),
        (lambda p: p.update(retention=True), "retention"),
        (lambda p: p.update(retention=7.0), "retention"),
        (lambda p: p.update(retention="7"), "retention"),
        (lambda p: p.update(retention=None), "retention"),
        (lambda p: p.pop("retention"), "retention"),
        (lambda p: p.pop("schedule"), "schedule"),
        (lambda p: p.update(schedule=None), "schedule"),
        (lambda p: p.update(schedule=["daily"]), "schedule"),
        (lambda p: p.update(schedule="daily"), "schedule"),
        (lambda p: p["schedule"].update(interval="Daily"), "schedule.interval"),
        (lambda p: p["schedule"].update(interval="yearly"), "schedule.interval"),
        (lambda p: p["schedule"].update(interval=1), "schedule.interval"),
        (lambda p: p["schedule"].update(interval=None), "schedule.interval"),
        (lambda p: p["schedule"].update(interval="x" * 100_000), "schedule.interval"),
        (lambda p: p["schedule"].update(next_invocation_at=10**15), "schedule.next_invocation_at"),
        (lambda p: p["schedule"].update(next_invocation_at=-(10**15)), "schedule.next_invocation_at"),
        (lambda p: p["schedule"].update(next_invocation_at=2**63), "schedule.next_invocation_at"),
        (lambda p: p["schedule"].update(next_invocation_at=10**400), "schedule.next_invocation_at"),
        (lambda p: p["schedule"].update(next_invocation_at=float(NOW_S)), "schedule.next_invocation_at"),
        (lambda p: p["schedule"].update(next_invocation_at=str(NOW_S)), "schedule.next_invocation_at"),
        (lambda p: p["schedule"].update(next_invocation_at=[NOW_S]), "schedule.next_invocation_at"),
        (lambda p: p.update(total_size=10**400), "total_size"),
        (lambda p: p.update(total_size=float("nan")), "total_size"),
        (lambda p: p.update(total_size=float("inf")), "total_size"),
        (lambda p: p.update(id="dbp_\ud800"), "id"),
        (lambda p: p["target"]["value"].update(id="disk_\udfff"), "target.value.id"),
        (lambda p: p["target"]["value"].update(name="a\ud800b"), "target.value.name"),
        (lambda p: p["target"].update(type="x" * 100_000), "target.type"),
    ],
)
def test_malformed_policy_field_is_named(mutate: Callable[[dict[str, Any]], Any], field: str) -> None:
    with pytest.raises(KatapultResponseError) as info:
        parse_policies(with_item_3(mutate))
    err = info.value
    assert err.code == "malformed_response" and err.permanent
    assert err.field == f"disk_backup_policies[3].{field}"
    assert f"disk_backup_policies[3].{field}" in str(err)
    assert_clean(err)


@pytest.mark.parametrize("retention", [1, 7, 2**31 - 1])
def test_positive_retention_is_accepted_and_every_rule_evaluates(retention: int) -> None:
    items = [
        policy_item(id="dbp_m", retention=retention, schedule={"interval": "monthly", "next_invocation_at": 0}),
        policy_item(id="dbp_h", retention=retention, schedule={"interval": "hourly", "next_invocation_at": None}),
    ]
    policies = parse_policies(items).items
    assert [p.retention for p in policies] == [retention, retention]
    snapshot = DiskSnapshot(Disk("disk_x"), ReadOutcome.OK, tuple(policies))
    findings = evaluate(snapshot, RuleSet(), now=NOW)
    if retention == 2**31 - 1:
        # A timedelta would overflow here (2**31 months is past datetime's range): the window is in float days.
        assert all(f.rule != RETENTION_WINDOW_TOO_SHORT for f in findings)


@pytest.mark.parametrize("seconds", [253_402_300_799, -62_135_596_800])
def test_edge_of_range_times_are_accepted_and_judged(seconds: int) -> None:
    (policy,) = parse_policies([policy_item(schedule={"interval": "daily", "next_invocation_at": seconds})]).items
    assert policy.schedule.next_invocation_at is not None
    evaluate(DiskSnapshot(Disk("disk_x"), ReadOutcome.OK, (policy,)), RuleSet(), now=NOW)


async def test_negative_retention_from_the_fake_is_malformed_not_judged() -> None:
    fleet, transport = fake_harness()
    fleet.add_policy("disk_data", id="dbp_ok")
    fleet.add_policy("disk_data", id="dbp_bad", retention=-3)
    async with client(transport) as c:
        with pytest.raises(KatapultResponseError) as info:
            await c.list_disk_policies("disk_data")
    assert info.value.field == "disk_backup_policies[1].retention"
    assert c.stats.requests == 1 and c.stats.retries == 0


@pytest.mark.parametrize(
    "content",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"pagination": {"total": NaN}, "disk_backup_policies": []}',
        b'{"pagination": {"total": Infinity}, "disk_backup_policies": []}',
        b'{"x": -Infinity}',
        b'{"a": 1' + b"9" * 5000 + b"}",
    ],
)
def test_bodies_that_are_not_strict_json_are_response_errors(content: bytes) -> None:
    with pytest.raises(KatapultResponseError) as info:
        wire.decode_json(content, endpoint=POLICIES_EP, target="disk_x")
    assert info.value.field is None and "not valid JSON" in str(info.value)


# ---------------------------------------------------------------- 3. trash details cannot break rules


TRASH = {"id": "trsh_1", "keep_until": NOW_S + 86_400, "object_id": "disk_x", "object_type": "Disk"}


@pytest.mark.parametrize(
    "keep_until",
    [10**15, -(10**15), 2**63, 10**400, "2026-08-16T00:00:00Z", None, {"seconds": NOW_S}, [NOW_S], True, 1.5e9],
)
def test_out_of_range_keep_until_is_absent(keep_until: Any) -> None:
    detail = {"trash_object": dict(TRASH, keep_until=keep_until), "other": [1, {"x": None}]}
    err = wire.api_error(406, json.dumps(error_json("object_in_trash", "in trash", detail)).encode(),
                         endpoint="/disks/disk", target="disk_x")
    assert isinstance(err, InTrashError)
    assert err.detail == {
        "trash_object": {"id": "trsh_1", "object_id": "disk_x", "object_type": "Disk"},
        "other": [1, {"x": None}],
    }
    (finding,) = evaluate(DiskSnapshot(Disk("disk_x"), ReadOutcome.IN_TRASH, detail=err.detail), RuleSet(), now=NOW)
    assert finding.rule == DISK_IN_TRASH and finding.observed["keep_until"] is None


@pytest.mark.parametrize("trash", ["trsh_1", 5, None, [TRASH], True])
def test_a_trash_object_that_is_not_an_object_is_dropped(trash: Any) -> None:
    err = wire.api_error(406, json.dumps(error_json("object_in_trash", "t", {"trash_object": trash})).encode(),
                         endpoint="/disks/disk", target="disk_x")
    assert err.detail == {}


def test_well_formed_trash_fields_are_kept_and_malformed_ones_dropped() -> None:
    raw = {"id": 7, "keep_until": NOW_S, "object_id": "disk_\ud800", "object_type": "Disk", "extra": "dropped"}
    err = wire.api_error(406, json.dumps(error_json("object_in_trash", "t", {"trash_object": raw})).encode(),
                         endpoint="/disks/disk", target="disk_x")
    assert err.detail == {"trash_object": {"keep_until": NOW_S, "object_type": "Disk"}}


@pytest.mark.parametrize(
    "detail",
    [
        {"trash_object": {"keep_until": 10**15}},
        {"trash_object": {"keep_until": -(10**15)}},
        {"trash_object": {"keep_until": 2**63}},
        {"trash_object": {"keep_until": "soon"}},
        {"trash_object": {"keep_until": {"nested": [1, 2]}}},
        {"trash_object": {"keep_until": True}},
        {"trash_object": {"keep_until": float("nan")}},
        {"trash_object": "x"},
        {"trash_object": ["x"]},
        {"trash_object": None},
    ],
)
def test_the_trash_rule_never_raises(detail: dict[str, Any]) -> None:
    (finding,) = evaluate(DiskSnapshot(Disk("disk_x"), ReadOutcome.IN_TRASH, detail=detail), RuleSet(), now=NOW)
    assert finding.rule == DISK_IN_TRASH and finding.observed["keep_until"] is None
    assert finding.message == "disk disk_x is in the trash"


async def test_in_trash_through_the_client_with_a_hostile_keep_until() -> None:
    body = error_json("object_in_trash", "in trash", {"trash_object": dict(TRASH, keep_until=10**15)})
    async with client(respond(406, body)) as c:
        with pytest.raises(InTrashError) as info:
            await c.get_disk("disk_x")
    snapshot = DiskSnapshot(Disk("disk_x"), ReadOutcome.IN_TRASH, detail=dict(info.value.detail))
    (finding,) = evaluate(snapshot, RuleSet(), now=NOW)
    assert finding.observed == {"error": "object_in_trash", "keep_until": None}


async def test_in_trash_from_the_fake_keeps_its_real_detail() -> None:
    fleet, transport = fake_harness()
    fleet.faults["disk_data"] = Fault.IN_TRASH
    async with client(transport) as c:
        with pytest.raises(InTrashError) as info:
            await c.get_disk("disk_data")
    trash = info.value.detail["trash_object"]
    assert isinstance(trash, dict) and set(trash) == {"id", "keep_until", "object_id", "object_type"}
    snapshot = DiskSnapshot(Disk("disk_data"), ReadOutcome.IN_TRASH, detail=dict(info.value.detail))
    (finding,) = evaluate(snapshot, RuleSet(), now=NOW)
    assert str(finding.observed["keep_until"]).endswith("Z")


# ---------------------------------------------------------------- 4. identity check on the disk lookup


async def test_get_disk_answering_about_another_disk_is_refused() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(200, json={"disk": disk_item("disk_other"), "annotations": []})

    async with client(handler) as c:
        with pytest.raises(UnexpectedObjectError) as info:
            await c.get_disk("disk_x")
    err = info.value
    assert isinstance(err, KatapultResponseError)
    assert err.code == "unexpected_object" and err.permanent
    assert err.target == "disk_x" and err.endpoint == "/disks/disk" and err.field == "disk.id"
    assert "asked for disk disk_x" in str(err) and "disk_other" in str(err)
    assert calls == 1 and c.stats.retries == 0
    assert_clean(err)


async def test_get_vm_answering_about_another_vm_is_refused() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"virtual_machine": {"id": "vm_other", "fqdn": "other.example.com"},
                                         "annotations": [{"key": "env", "value": "prod"}]})

    async with client(handler) as c:
        with pytest.raises(UnexpectedObjectError) as info:
            await c.get_vm("vm_x")
    err = info.value
    assert err.code == "unexpected_object" and err.permanent
    assert err.target == "vm_x" and err.field == "virtual_machine.id" and "virtual_machine" in (err.endpoint or "")
    assert "asked for virtual machine vm_x" in str(err) and "vm_other" in str(err)
    assert_clean(err)


@pytest.mark.parametrize(("target", "named"), [
    ({"type": "Disk", "value": {"id": "disk_x"}}, "Disk disk_x"),
    ({"type": "VirtualMachine", "value": {"id": "vm_other"}}, "VirtualMachine vm_other"),
])
async def test_a_vm_policy_list_holding_another_objects_policy_is_refused(target: dict[str, Any],
                                                                         named: str) -> None:
    items = [policy_item(id="dbp_vm", target={"type": "VirtualMachine", "value": {"id": "vm_1"}}),
             policy_item(id="dbp_stray", target=target)]
    async with client(respond(200, page(items))) as c:
        with pytest.raises(UnexpectedObjectError) as info:
            await c.list_vm_policies("vm_1")
    async with client(respond(200, page(items[:1]))) as c:  # the VM's own policies only: accepted whole
        assert [p.id for p in await c.list_vm_policies("vm_1")] == ["dbp_vm"]
    err = info.value
    assert err.code == "unexpected_object" and err.permanent and err.status_code == 200
    assert err.target == "vm_1" and err.field == "disk_backup_policies[1].target"
    assert err.endpoint == "/virtual_machines/virtual_machine/disk_backup_policies"
    assert "virtual machine vm_1" in str(err) and f"(dbp_stray) targets {named}" in str(err)
    assert_clean(err)


async def test_get_disk_of_the_asked_disk_through_the_fake() -> None:
    _, transport = fake_harness()
    async with client(transport) as c:
        assert (await c.get_disk("disk_data")).id == "disk_data"


# ---------------------------------------------------------------- 5. every documented error code with any detail


DOCUMENTED = [
    (400, "missing_api_token", AuthError),
    (400, "invalid_argument", InvalidRequestError),
    (403, "invalid_api_token", AuthError),
    (403, "scope_not_granted", AuthError),
    (403, "permission_denied", AuthError),
    (403, "unauthorized_network_for_api_token", AuthError),
    (403, "invalid_capabilities_token", AuthError),
    (404, "disk_not_found", NotFoundError),
    (404, "organization_not_found", NotFoundError),
    (404, "virtual_machine_not_found", NotFoundError),
    (404, "route_not_found", NotFoundError),
    (406, "object_in_trash", InTrashError),
    (429, "rate_limit_reached", RateLimitedError),
    (500, "unhandled_exception", UnavailableError),
    (503, "service_unavailable", UnavailableError),
]
# Raw JSON text, so "\ud800" arrives as a real JSON escape of a lone surrogate.
ODD_DETAILS = [
    b"[]",
    b"[1, 2, {\"a\": []}]",
    b"{\"a\": {\"b\": {\"c\": [null, true, 1.5, \"x\"]}}}",
    b"\"" + b"x" * 200_000 + b"\"",
    b"{\"k\": \"\\ud800\", \"\\udfff\": 1}",
    b"\"\\ud800\"",
    b"null",
    b"{\"total_permitted\": 1" + b"0" * 400 + b"}",
    b"{\"total_permitted\": -5, \"trash_object\": {\"keep_until\": 1" + b"0" * 20 + b"}}",
    b"{\"scopes\": " + b"[" * 50_000 + b"]" * 50_000 + b"}",
]


@pytest.mark.parametrize(("status", "code", "cls"), DOCUMENTED)
@pytest.mark.parametrize("detail", ODD_DETAILS)
async def test_documented_codes_with_any_detail_map_to_their_type(
    status: int, code: str, cls: type[KatapultAPIError], detail: bytes
) -> None:
    description = b"\"bad \\ud800 thing\\n\\u0000 " + b"y" * 5_000 + b"\""
    content = b"{\"error\": {\"code\": \"" + code.encode() + b"\", \"description\": " + description
    content += b", \"detail\": " + detail + b"}}"
    async with client(respond(status, content), max_attempts=2) as c:
        with pytest.raises(KatapultError) as info:
            await c.get_disk("disk_x")
    err = info.value
    if b"[" * 50_000 in detail:
        # Nested past the parser's stack: not the wrapped shape, so it maps by status alone.
        by_status = wire.api_error(status, b"", endpoint="/disks/disk", target="disk_x")
        assert type(err) is type(by_status) and err.code == f"http_{status}"
    else:
        assert type(err) is cls and err.code == code
    assert err.status_code == status and err.target == "disk_x"
    assert_clean(err)
    if isinstance(err, InTrashError):
        evaluate(DiskSnapshot(Disk("disk_x"), ReadOutcome.IN_TRASH, detail=dict(err.detail)), RuleSet(), now=NOW)


@pytest.mark.parametrize(
    "code", ["x" * 10_000, "disk not found", "disk_not_found\n", "\ud800", "", 404, None, ["disk_not_found"]]
)
def test_a_code_that_is_not_a_code_maps_by_status(code: Any) -> None:
    err = wire.api_error(404, json.dumps(error_json(code, "d")).encode(), endpoint="/disks/disk", target="disk_x")
    assert type(err) is NotFoundError and err.code == "http_404"
    assert_clean(err)


def test_a_token_is_redacted_before_the_description_is_cut() -> None:
    # The token straddles the description cut: redacting only after the cut would leave a piece of it.
    body = json.dumps(error_json("invalid_api_token", "x" * 290 + TOKEN + " is not valid")).encode()
    err = wire.api_error(403, body, endpoint="/disks/disk", target="disk_x", redact=lambda s: s.replace(TOKEN, "[r]"))
    assert "kt-s3cr3t" not in str(err)


async def test_a_huge_total_permitted_does_not_break_pacing() -> None:
    content = b"{\"error\": {\"code\": \"rate_limit_reached\", \"description\": \"slow down\", "
    content += b"\"detail\": {\"total_permitted\": 1" + b"0" * 400 + b"}}}"
    async with client(respond(429, content), max_attempts=3) as c:
        with pytest.raises(RateLimitedError):
            await c.get_disk("disk_x")
    assert c.stats.requests == 3 and c.stats.rate_limited == 3


async def test_hostile_rate_limit_headers_are_ignored() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"X-RateLimit-Permitted": "1" + "0" * 400, "X-RateLimit-Remaining": "-" + "9" * 400}
        return httpx.Response(200, json={"disk": disk_item()}, headers=headers)

    async with client(handler) as c:
        await c.get_disk("disk_x")
        await c.get_disk("disk_x")
    assert c.limiter.permitted is None


# ---------------------------------------------------------------- 6. properties: arbitrary JSON in every field


DELETE = object()
ODD_SCALARS = st.sampled_from(
    [0, -1, 2**31, 2**63, 10**15, -(10**15), 10**400, 1.5, "", "\ud800", "a\udfffb", "x" * 5000, "daily", "Disk"]
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | ODD_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path into a JSON value, the root included."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from paths(child, (*prefix, index))


def substitute(body: Any, path: tuple[Any, ...], value: Any) -> Any:
    """Returns a copy of `body` with the value at `path` replaced by `value` (or removed, for DELETE)."""
    if not path:
        return None if value is DELETE else copy.deepcopy(value)
    out = copy.deepcopy(body)
    parent = out
    for step in path[:-1]:
        parent = parent[step]
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = copy.deepcopy(value)
    return out


@st.composite
def mutated(draw: st.DrawFn, base: Any) -> Any:
    """`base` with one to three fields (at any depth, or the whole body) replaced by arbitrary JSON or removed."""
    body = base
    for _ in range(draw(st.integers(1, 3))):
        candidates = list(paths(body))
        if not candidates:
            break
        path = draw(st.sampled_from(candidates))
        value = draw(st.just(DELETE) | JSON) if path else draw(JSON)
        body = substitute(body, path, value)
    return body


def encode(body: Any) -> bytes:
    # allow_nan: NaN and Infinity go out as the non-JSON literals a broken server might send.
    return json.dumps(body).encode()


POLICY_BASE = page(
    [
        policy_item(),
        policy_item(
            id="dbp_vm",
            retention=30,
            target={"type": "VirtualMachine", "value": {"id": "vm_1", "name": "web"}},
            schedule={"interval": "hourly", "next_invocation_at": None},
        ),
    ]
)
DISK_BASE = {
    "disk": disk_item(created_at=1_600_000_000, storage_speed="ssd"),
    "annotations": [{"key": "k", "value": "v"}],
}
ORG_DISKS_BASE = page([disk_item(), disk_item("disk_y", virtual_machine_disk=None)], key="disk")
RULESETS = [
    RuleSet(),
    RuleSet(RuleParams(min_retention=10**6, min_retention_days=10**9, max_interval=Interval.HOURLY)),
    RuleSet(RuleParams(min_retention=0, min_retention_days=0, max_interval=Interval.MONTHLY,
                       stale_grace=timedelta(days=3650))),
]
STEADY = BackupPolicy("dbp_fixed", 7, TargetType.DISK, "disk_x", Schedule(Interval.DAILY, NOW))


def judge(snapshot: DiskSnapshot) -> None:
    for ruleset in RULESETS:
        evaluate(snapshot, ruleset, now=NOW)


async def serve(content: bytes, status: int, call: Callable[[KatapultClient], Any]) -> Any:
    """Runs `call` against a server answering every request with `content`; returns its result or the error."""
    with pytest.MonkeyPatch.context() as patch:
        # A substituted total_pages may be huge: a few pages show the same behaviour as ten thousand.
        patch.setattr(client_module, "MAX_PAGES", 4)
        async with client(respond(status, content), max_attempts=2) as c:
            try:
                result = await call(c)
            except KatapultError as err:
                assert_clean(err)
                event(f"raised {type(err).__name__}")
                return err
    event("parsed")
    return result


PROPERTY = settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(body=mutated(POLICY_BASE), endpoint=st.sampled_from(["disk", "vm", "org"]))
def test_any_policy_list_parses_or_raises_a_katapult_error(body: Any, endpoint: str) -> None:
    calls: dict[str, Callable[[KatapultClient], Any]] = {
        "disk": lambda c: c.list_disk_policies("disk_x"),
        "vm": lambda c: c.list_vm_policies("vm_1"),
        "org": lambda c: c.list_org_policies(OrgRef("org_x")),
    }
    result = asyncio.run(serve(encode(body), 200, calls[endpoint]))
    if isinstance(result, KatapultError):
        return
    assert all(isinstance(p, BackupPolicy) for p in result)
    judge(DiskSnapshot(Disk("disk_x", vm_id="vm_1"), ReadOutcome.OK, tuple(result)))


@PROPERTY
@given(body=mutated(DISK_BASE))
def test_any_disk_lookup_parses_or_raises_a_katapult_error(body: Any) -> None:
    result = asyncio.run(serve(encode(body), 200, lambda c: c.get_disk("disk_x")))
    if isinstance(result, KatapultError):
        return
    assert isinstance(result, Disk) and result.id == "disk_x"
    judge(DiskSnapshot(result, ReadOutcome.OK, ()))
    judge(DiskSnapshot(result, ReadOutcome.OK, (STEADY,)))


@PROPERTY
@given(body=mutated(ORG_DISKS_BASE))
def test_any_org_disk_listing_parses_or_raises_a_katapult_error(body: Any) -> None:
    result = asyncio.run(serve(encode(body), 200, lambda c: c.list_org_disks(OrgRef("org_x"))))
    if isinstance(result, KatapultError):
        return
    for disk in result:
        assert isinstance(disk, Disk)
        judge(DiskSnapshot(disk, ReadOutcome.OK, ()))
        judge(DiskSnapshot(disk, ReadOutcome.OK, (STEADY,)))


def documented_detail(status: int) -> dict[str, Any]:
    """The detail each documented status really carries (README error table)."""
    if status == 406:
        return {"trash_object": TRASH}
    if status == 429:
        return {"total_permitted": 200}
    return {"scopes": ["disks:read"]} if status == 403 else {}


ERROR_BASES = [(status, error_json(code, "Described", documented_detail(status))) for status, code, _ in DOCUMENTED]


@st.composite
def error_answers(draw: st.DrawFn) -> tuple[int, Any]:
    status, base = draw(st.sampled_from(ERROR_BASES))
    status = draw(st.just(status) | st.integers(400, 599))
    return status, draw(mutated(base))


@PROPERTY
@given(answer=error_answers())
def test_any_error_body_maps_to_a_katapult_error(answer: tuple[int, Any]) -> None:
    status, body = answer
    result = asyncio.run(serve(encode(body), status, lambda c: c.get_disk("disk_x")))
    assert isinstance(result, KatapultError)
    assert result.status_code == status
    if isinstance(result, KatapultAPIError):
        assert result.code == f"http_{status}" or wire._CODE.fullmatch(result.code)
    if isinstance(result, InTrashError):
        judge(DiskSnapshot(Disk("disk_x"), ReadOutcome.IN_TRASH, detail=dict(result.detail)))


INTERVALS = [interval.value for interval in Interval]


@PROPERTY
@given(
    # Mostly well-formed values (every edge of their range), some of any integer, some of any JSON at all.
    retention=st.one_of(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1), st.integers(), JSON),
    interval=st.one_of(st.sampled_from(INTERVALS), st.sampled_from(INTERVALS), JSON),
    next_run=st.one_of(st.integers(-62_135_596_800, 253_402_300_799), st.none(), st.integers(), JSON),
    total_size=st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.none(), st.integers(), JSON),
    target_type=st.sampled_from(["Disk", "VirtualMachine"]),
)
def test_every_policy_the_parser_accepts_can_be_judged(
    retention: Any, interval: Any, next_run: Any, total_size: Any, target_type: str
) -> None:
    raw = policy_item(
        retention=retention,
        total_size=total_size,
        target={"type": target_type, "value": {"id": "disk_x", "name": None}},
        schedule={"interval": interval, "next_invocation_at": next_run},
    )
    try:
        parsed = wire.parse_policy_page(page([raw]), endpoint=POLICIES_EP, target="disk_x").items
    except KatapultResponseError as err:
        assert_clean(err)
        assert err.field is not None and err.field.startswith("disk_backup_policies[0].")
        event("rejected")
        return
    event("parsed")
    (policy,) = parsed
    assert 1 <= policy.retention <= 2**31 - 1
    judge(DiskSnapshot(Disk("disk_x"), ReadOutcome.OK, (policy,)))


@PROPERTY
@given(detail=st.dictionaries(st.text(max_size=12) | st.just("trash_object"), JSON, max_size=3),
       trash=st.dictionaries(st.sampled_from(["id", "keep_until", "object_id", "object_type"]), JSON))
def test_the_rules_never_raise_on_any_trash_detail(detail: dict[str, Any], trash: dict[str, Any]) -> None:
    for value in (detail, {**detail, "trash_object": trash}):
        judge(DiskSnapshot(Disk("disk_x"), ReadOutcome.IN_TRASH, detail=value))
