"""KatapultClient against the fake Katapult: paging, error mapping, retries, pacing feedback, secrecy."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from clocks import FakeClock

from auditor.domain.models import Disk, Interval, TargetType
from auditor.errors import (
    AuthError,
    InTrashError,
    InvalidRequestError,
    KatapultAPIError,
    KatapultError,
    KatapultResponseError,
    KatapultTransportError,
    NotFoundError,
    RateLimitedError,
    UnavailableError,
)
from auditor.fake import FakeServer, Fault, Fleet, create_app
from auditor.katapult import KatapultClient, OrgRef, RateLimiter, RequestStats

TOKEN = "kt-s3cr3t-DO-NOT-LOG-9f8e7d"
BASE = "http://fake/core/v1"
NOW = 1_786_800_000


class Recording(httpx.AsyncBaseTransport):
    """Passes requests to another transport and keeps them for inspection."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self.inner.handle_async_request(request)

    def params(self, index: int = -1) -> dict[str, str]:
        return dict(self.requests[index].url.params)


class Harness:
    """A fleet, a virtual clock, and a client talking to the fake through ASGITransport."""

    def __init__(self, fleet: Fleet | None = None) -> None:
        self.clock = FakeClock(10_000.0)
        self.fleet = fleet if fleet is not None else Fleet()
        self.fleet.tokens.add(TOKEN)
        self.fleet.clock = self.clock
        self.fleet.rate_limit_per_minute = 100_000
        self.retry_sleeps: list[float] = []
        self.transport = Recording(httpx.ASGITransport(app=create_app(self.fleet)))

    async def retry_sleep(self, seconds: float) -> None:
        self.retry_sleeps.append(seconds)
        await self.clock.sleep(seconds)

    def client(self, **kwargs: Any) -> KatapultClient:
        options: dict[str, Any] = {
            "base_url": BASE,
            "token": TOKEN,
            "transport": self.transport,
            "limiter": RateLimiter(100_000, clock=self.clock, sleep=self.clock.sleep),
            "sleep": self.retry_sleep,
        }
        options.update(kwargs)
        return KatapultClient(**options)


@pytest.fixture
def h() -> Harness:
    return Harness()


def org_with_disk(fleet: Fleet) -> tuple[str, str]:
    org = fleet.add_org("acme", id="org_acme")
    disk = fleet.add_disk(org.id, "data", id="disk_data")
    return org.id, disk.id


# ---------------------------------------------------------------- reading


async def test_disk_policies_page_through_every_page(h: Harness) -> None:
    _, disk = org_with_disk(h.fleet)
    for i in range(5):
        h.fleet.add_policy(disk, id=f"dbp_{i}", retention=7 + i, next_invocation_at=NOW + i)
    async with h.client(per_page=2) as client:
        policies = await client.list_disk_policies(disk)
    assert [p.id for p in policies] == [f"dbp_{i}" for i in range(5)]
    assert [p.retention for p in policies] == [7, 8, 9, 10, 11]
    first = policies[0]
    assert first.target_type is TargetType.DISK and first.target_id == disk and first.target_name == "data"
    assert first.schedule.interval is Interval.DAILY
    assert first.schedule.next_invocation_at == datetime.fromtimestamp(NOW, tz=UTC)
    assert len(h.transport.requests) == 3
    assert [h.transport.params(i) for i in range(3)] == [
        {"disk[id]": disk, "page": str(page), "per_page": "2"} for page in (1, 2, 3)
    ]
    assert h.transport.requests[0].url.path == "/core/v1/disks/disk/disk_backup_policies"
    assert "disk%5Bid%5D=disk_data" in str(h.transport.requests[0].url)
    assert h.transport.requests[0].headers["authorization"] == f"Bearer {TOKEN}"


async def test_default_per_page_is_the_maximum(h: Harness) -> None:
    _, disk = org_with_disk(h.fleet)
    async with h.client() as client:
        await client.list_disk_policies(disk)
    assert h.transport.params()["per_page"] == "200"


async def test_empty_list_is_one_request(h: Harness) -> None:
    _, disk = org_with_disk(h.fleet)
    async with h.client() as client:
        assert await client.list_disk_policies(disk) == []
    assert len(h.transport.requests) == 1


@pytest.mark.parametrize(("count", "requests"), [(1001, 6), (1200, 7)])
async def test_large_set_pages_until_a_short_page(h: Harness, count: int, requests: int) -> None:
    org, disk = org_with_disk(h.fleet)
    for i in range(count):
        h.fleet.add_policy(disk, id=f"dbp_{i:05d}")
    async with h.client() as client:
        policies = await client.list_org_policies(OrgRef(org))
    assert len(policies) == count
    assert len({p.id for p in policies}) == count
    assert len(h.transport.requests) == requests
    assert h.transport.params(0)["organization[id]"] == org


async def test_large_set_that_never_ends_is_cut_off() -> None:
    full_page = {
        "pagination": {"current_page": 1, "total_pages": None, "total": None, "per_page": 2, "large_set": True},
        "disk": [{"id": "disk_a"}, {"id": "disk_b"}],
    }
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(200, json=full_page)

    async with KatapultClient(
        base_url=BASE, token=TOKEN, per_page=2, transport=httpx.MockTransport(handler), max_requests_per_minute=10**6
    ) as client:
        with pytest.raises(KatapultResponseError) as info:
            await client.list_org_disks(OrgRef("org_x"))
    # The same full page again is caught on page 2 instead of running to the hard page cap.
    assert calls == 2
    assert info.value.field == "pagination" and info.value.target == "org_x"


async def test_page_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    from auditor.katapult import client as client_module

    monkeypatch.setattr(client_module, "MAX_PAGES", 3)

    def handler(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params["page"])
        return httpx.Response(
            200,
            json={
                "pagination": {"current_page": page, "total_pages": None, "total": None, "large_set": True},
                "disk": [{"id": f"disk_{page}"}],
            },
        )

    async with KatapultClient(
        base_url=BASE, token=TOKEN, per_page=1, transport=httpx.MockTransport(handler), max_requests_per_minute=10**6
    ) as client:
        with pytest.raises(KatapultResponseError, match="3 pages"):
            await client.list_org_disks(OrgRef("org_x"))


async def test_org_disks_tie_disks_to_vms(h: Harness) -> None:
    org = h.fleet.add_org("acme", id="org_acme")
    vm = h.fleet.add_vm(org.id, "web.acme.example.com", id="vm_web")
    h.fleet.add_disk(org.id, "web-system", id="disk_1", vm_id=vm.id, size_in_gb=40)
    h.fleet.add_disk(org.id, "spare", id="disk_2")
    h.fleet.add_disk(org.id, "other", id="disk_3")
    async with h.client(per_page=2) as client:
        disks = await client.list_org_disks(OrgRef("acme"))
    assert disks == [
        Disk(
            id="disk_1",
            name="web-system",
            vm_id="vm_web",
            vm_fqdn="web.acme.example.com",
            state="attached",
            size_in_gb=40,
        ),
        Disk(id="disk_2", name="spare", state="attached", size_in_gb=20),
        Disk(id="disk_3", name="other", state="attached", size_in_gb=20),
    ]
    assert h.transport.params(0) == {"organization[sub_domain]": "acme", "page": "1", "per_page": "2"}
    assert h.transport.requests[0].url.path.endswith("/organizations/organization/disks")


async def test_vm_policies_and_get_disk(h: Harness) -> None:
    org = h.fleet.add_org("acme", id="org_acme")
    vm = h.fleet.add_vm(org.id, "db.acme.example.com", id="vm_db")
    h.fleet.add_disk(org.id, "db-system", id="disk_db", vm_id=vm.id)
    h.fleet.add_policy(vm.id, id="dbp_vm", interval="hourly", retention=168, next_invocation_at=None)
    async with h.client() as client:
        (policy,) = await client.list_vm_policies(vm.id)
        disk = await client.get_disk("disk_db")
    assert policy.target_type is TargetType.VIRTUAL_MACHINE and policy.target_id == "vm_db"
    assert policy.target_name == "db"
    assert policy.schedule.next_invocation_at is None
    assert h.transport.params(0)["virtual_machine[id]"] == "vm_db"
    assert disk.id == "disk_db" and disk.vm_id == "vm_db" and disk.vm_fqdn == "db.acme.example.com"
    assert dict(h.transport.requests[1].url.params) == {"disk[id]": "disk_db"}


async def test_vm_disks_attachment_states_page_through(h: Harness) -> None:
    org = h.fleet.add_org("acme", id="org_acme")
    vm = h.fleet.add_vm(org.id, "db.acme.example.com", id="vm_db")
    for n in range(3):
        h.fleet.add_disk(org.id, f"db-{n}", id=f"disk_db{n}", vm_id=vm.id)
    h.fleet.set_attachment("disk_db1", "detached", attach_on_boot=False)
    async with h.client(per_page=2) as client:
        states = await client.list_vm_disks(vm.id)
        disk = await client.get_disk("disk_db1")
    assert {k: (a.state, a.attach_on_boot) if a else None for k, a in states.items()} == {
        "disk_db0": ("attached", True), "disk_db1": ("detached", False), "disk_db2": ("attached", True)}
    assert [r.url.path.rsplit("/", 1)[-1] for r in h.transport.requests[:2]] == ["disks", "disks"]
    assert h.transport.params(0) == {"virtual_machine[id]": "vm_db", "page": "1", "per_page": "2"}
    assert disk.attachment is not None and (disk.attachment.state, disk.attachment.attach_on_boot) == (
        "detached", False)


async def test_organizations_are_one_request(h: Harness) -> None:
    h.fleet.add_org("acme", id="org_acme")
    h.fleet.add_org("beta", id="org_beta")
    async with h.client() as client:
        orgs = await client.list_organizations()
    assert orgs == [("org_acme", "acme"), ("org_beta", "beta")]
    (request,) = h.transport.requests
    assert request.url.path.endswith("/organizations") and dict(request.url.params) == {}


@pytest.mark.parametrize("shape", ["typed", "openapi", "bare"])
async def test_every_target_shape_reads_the_same_policies(h: Harness, shape: str) -> None:
    org = h.fleet.add_org("acme", id="org_acme")
    vm = h.fleet.add_vm(org.id, "db.acme.example.com", id="vm_db")
    h.fleet.add_disk(org.id, "db-system", id="disk_db", vm_id=vm.id)
    h.fleet.add_policy(vm.id, id="dbp_vm", next_invocation_at=None)
    h.fleet.add_policy("disk_db", id="dbp_disk", next_invocation_at=None)
    h.fleet.policy_target_shape = shape
    async with h.client() as client:
        read = [*await client.list_org_policies(OrgRef("org_acme")), *await client.list_vm_policies("vm_db"),
                *await client.list_disk_policies("disk_db")]
    assert [(p.id, p.target_type, p.target_id) for p in read] == [
        ("dbp_vm", TargetType.VIRTUAL_MACHINE, "vm_db"), ("dbp_disk", TargetType.DISK, "disk_db"),
        ("dbp_vm", TargetType.VIRTUAL_MACHINE, "vm_db"), ("dbp_disk", TargetType.DISK, "disk_db")]


async def test_generated_fleet_reads_cleanly() -> None:
    fleet = Fleet.generate(disks=60, now=NOW)
    h2 = Harness(fleet)
    (org,) = fleet.orgs
    async with h2.client(per_page=25) as client:
        disks = await client.list_org_disks(OrgRef(org))
        policies = await client.list_org_policies(OrgRef(org))
    assert {d.id for d in disks} == set(fleet.disks)
    assert {p.id for p in policies} == set(fleet.policies)


def test_org_ref() -> None:
    assert OrgRef("org_abc").params() == {"organization[id]": "org_abc"}
    assert OrgRef("acme").params() == {"organization[sub_domain]": "acme"}
    with pytest.raises(ValueError):
        OrgRef("")


@pytest.mark.parametrize("per_page", [0, 201, -1])
def test_per_page_is_validated(per_page: int) -> None:
    with pytest.raises(ValueError, match="per_page"):
        KatapultClient(base_url=BASE, token=TOKEN, per_page=per_page)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("fault", "cls", "code", "status"),
    [
        (Fault.NOT_FOUND, NotFoundError, "disk_not_found", 404),
        (Fault.IN_TRASH, InTrashError, "object_in_trash", 406),
        (Fault.FORBIDDEN, AuthError, "permission_denied", 403),
    ],
)
async def test_permanent_errors_are_typed_and_not_retried(
    h: Harness, fault: Fault, cls: type[KatapultError], code: str, status: int
) -> None:
    _, disk = org_with_disk(h.fleet)
    h.fleet.faults[disk] = fault
    async with h.client() as client:
        with pytest.raises(cls) as info:
            await client.list_disk_policies(disk)
    err = info.value
    assert err.code == code and err.status_code == status and err.permanent
    assert err.target == disk and err.endpoint == "/disks/disk/disk_backup_policies"
    assert len(h.transport.requests) == 1 and h.retry_sleeps == []
    assert client.stats.retries == 0


async def test_in_trash_keeps_the_trash_detail(h: Harness) -> None:
    _, disk = org_with_disk(h.fleet)
    h.fleet.faults[disk] = Fault.IN_TRASH
    async with h.client() as client:
        with pytest.raises(InTrashError) as info:
            await client.get_disk(disk)
    trash = info.value.detail["trash_object"]
    assert isinstance(trash, dict) and trash["object_id"] == disk


async def test_unknown_objects_are_not_found(h: Harness) -> None:
    async with h.client() as client:
        with pytest.raises(NotFoundError) as disk_info:
            await client.list_disk_policies("disk_nope")
        with pytest.raises(NotFoundError) as org_info:
            await client.list_org_disks(OrgRef("nope"))
        with pytest.raises(NotFoundError) as vm_info:
            await client.list_vm_policies("vm_nope")
    assert disk_info.value.code == "disk_not_found" and disk_info.value.target == "disk_nope"
    assert org_info.value.code == "organization_not_found" and org_info.value.target == "nope"
    assert vm_info.value.code == "virtual_machine_not_found"


async def test_invalid_token_is_an_auth_error(h: Harness) -> None:
    _, disk = org_with_disk(h.fleet)
    async with h.client(token="kt-wrong-token-123") as client:
        with pytest.raises(AuthError) as info:
            await client.list_disk_policies(disk)
    assert info.value.code == "invalid_api_token" and info.value.status_code == 403
    assert "kt-wrong-token-123" not in str(info.value)


@pytest.mark.parametrize(
    ("status", "body", "cls", "code"),
    [
        (
            400,
            {"error": {"code": "missing_api_token", "description": "No token", "detail": {}}},
            AuthError,
            "missing_api_token",
        ),
        (
            400,
            {"error": {"code": "invalid_argument", "description": "bad", "detail": {"issue": "x"}}},
            InvalidRequestError,
            "invalid_argument",
        ),
        (
            403,
            {"error": {"code": "scope_not_granted", "description": "s", "detail": {"scopes": ["disks"]}}},
            AuthError,
            "scope_not_granted",
        ),
        (
            404,
            {"error": {"code": "route_not_found", "description": "r", "detail": {}}},
            NotFoundError,
            "route_not_found",
        ),
        (418, "I'm a teapot", KatapultError, "http_418"),
    ],
)
async def test_other_error_codes(status: int, body: Any, cls: type[KatapultError], code: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)

    async with KatapultClient(base_url=BASE, token=TOKEN, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(cls) as info:
            await client.get_disk("disk_x")
    assert info.value.code == code and info.value.status_code == status and info.value.target == "disk_x"
    assert client.stats.requests == 1 and client.stats.retries == 0


async def test_malformed_body_names_the_field(h: Harness) -> None:
    org, disk = org_with_disk(h.fleet)
    h.fleet.add_policy(disk, id="dbp_1")
    h.fleet.add_policy(disk, id="dbp_2")
    h.fleet.faults[disk] = Fault.MALFORMED
    h.fleet.faults[org] = Fault.MALFORMED
    async with h.client() as client:
        with pytest.raises(KatapultResponseError) as info:
            await client.list_disk_policies(disk)
        with pytest.raises(KatapultResponseError) as org_info:
            await client.list_org_disks(OrgRef(org))
    assert info.value.field == "disk_backup_policies[0].retention"
    assert "disk_backup_policies[0].retention" in str(info.value)
    assert info.value.target == disk and info.value.endpoint == "/disks/disk/disk_backup_policies"
    assert org_info.value.field == "disk[0].id"
    assert len(h.transport.requests) == 2 and h.retry_sleeps == []


async def test_invalid_json_is_a_response_error(h: Harness) -> None:
    _, disk = org_with_disk(h.fleet)
    h.fleet.faults[disk] = Fault.INVALID_JSON
    async with h.client() as client:
        with pytest.raises(KatapultResponseError, match="not valid JSON") as info:
            await client.list_disk_policies(disk)
    assert info.value.permanent and info.value.status_code == 200
    assert len(h.transport.requests) == 1


async def test_unknown_fields_are_ignored() -> None:
    body = {
        "pagination": {
            "current_page": 1,
            "total_pages": 1,
            "total": 1,
            "per_page": 200,
            "large_set": False,
            "cursor": "x",
        },
        "disk_backup_policies": [
            {
                "id": "dbp_1",
                "retention": 3,
                "total_size": 1,
                "annotations": [{"key": "k", "value": "v"}],
                "created_at": 1,
                "target": {"type": "Disk", "value": {"id": "disk_1", "name": "d", "wwn": "w"}},
                "schedule": {"interval": "weekly", "next_invocation_at": NOW, "frequency": 1, "time": 2, "minute": 3},
            }
        ],
        "new_top_level": True,
    }
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=body))
    async with KatapultClient(base_url=BASE, token=TOKEN, transport=transport) as client:
        (policy,) = await client.list_disk_policies("disk_1")
    assert policy.id == "dbp_1" and policy.schedule.interval is Interval.WEEKLY


# ---------------------------------------------------------------- retries


@pytest.mark.parametrize(("fault", "status"), [(Fault.UNAVAILABLE, "503"), (Fault.SERVER_ERROR, "500")])
async def test_5xx_is_retried_then_succeeds(h: Harness, fault: Fault, status: str) -> None:
    _, disk = org_with_disk(h.fleet)
    h.fleet.add_policy(disk, id="dbp_1")
    h.fleet.faults[disk] = fault
    h.fleet.faults_remaining[disk] = 2
    async with h.client() as client:
        policies = await client.list_disk_policies(disk)
    assert [p.id for p in policies] == ["dbp_1"]
    assert client.stats.requests == 3 and client.stats.retries == 2
    assert client.stats.by_status == {status: 2, "200": 1}
    # Full jitter: uniform in [0, 0.5] then [0, 1.0].
    assert len(h.retry_sleeps) == 2
    assert 0 <= h.retry_sleeps[0] <= 0.5 and 0 <= h.retry_sleeps[1] <= 1.0


async def test_retries_are_exhausted(h: Harness) -> None:
    _, disk = org_with_disk(h.fleet)
    h.fleet.faults[disk] = Fault.UNAVAILABLE
    async with h.client(max_attempts=3) as client:
        with pytest.raises(UnavailableError) as info:
            await client.list_disk_policies(disk)
    assert info.value.code == "service_unavailable" and info.value.status_code == 503
    assert info.value.target == disk and not info.value.permanent
    assert client.stats.requests == 3 and client.stats.retries == 2
    assert len(h.retry_sleeps) == 2


async def test_retry_time_budget(h: Harness) -> None:
    _, disk = org_with_disk(h.fleet)
    h.fleet.faults[disk] = Fault.UNAVAILABLE
    h.fleet.retry_after = None
    async with h.client(max_attempts=100, max_retry_seconds=3.0) as client:
        with pytest.raises(UnavailableError):
            await client.list_disk_policies(disk)
    assert sum(h.retry_sleeps) <= 3.0 + 1e-9
    assert client.stats.requests < 100


async def test_429_is_retried_and_lowers_the_rate(h: Harness) -> None:
    _, disk = org_with_disk(h.fleet)
    h.fleet.add_policy(disk, id="dbp_1")
    h.fleet.rate_limit_per_minute = 200
    # Another process on the same token used the whole minute's budget 58 s ago.
    h.clock.now -= 58
    for _ in range(200):
        h.fleet.admit(TOKEN, permitted=200)
    h.clock.now += 58
    async with h.client() as client:
        policies = await client.list_disk_policies(disk)
    assert [p.id for p in policies] == ["dbp_1"]
    assert client.stats.rate_limited == 1
    assert client.stats.by_status == {"429": 1, "200": 1}
    assert client.limiter.per_minute == 200
    # Without Retry-After the wait comes from detail.total_permitted: a few slots of 60/200 s, at least 1 s.
    assert h.retry_sleeps and h.retry_sleeps[0] >= 1.0
    assert h.fleet.stats.rate_limited == 1


async def test_retry_after_is_honoured(h: Harness) -> None:
    _, disk = org_with_disk(h.fleet)
    h.fleet.rate_limit_per_minute = 5
    h.fleet.retry_after = 2.5
    for _ in range(5):
        h.fleet.admit(TOKEN, permitted=5)
    async with h.client(max_attempts=2) as client:
        with pytest.raises(RateLimitedError) as info:
            await client.list_disk_policies(disk)
    assert info.value.retry_after == 2.5
    assert h.retry_sleeps == [2.5]
    assert client.stats.rate_limited == 2 and client.stats.requests == 2


async def test_retry_after_beyond_the_budget_gives_up_at_once(h: Harness) -> None:
    _, disk = org_with_disk(h.fleet)
    h.fleet.rate_limit_per_minute = 5
    h.fleet.retry_after = 90
    for _ in range(5):
        h.fleet.admit(TOKEN, permitted=5)
    async with h.client(max_retry_seconds=30) as client:
        with pytest.raises(RateLimitedError):
            await client.list_disk_policies(disk)
    assert client.stats.requests == 1 and h.retry_sleeps == []


class RetryAfterAs(httpx.AsyncBaseTransport):
    """Passes requests on and rewrites any Retry-After of the answer: as an HTTP-date that many seconds from now,
    or as a fixed text."""

    def __init__(self, inner: httpx.AsyncBaseTransport, *, text: str | None = None) -> None:
        self.inner = inner
        self.text = text

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        seconds = response.headers.get("Retry-After")
        if seconds is not None:
            when = datetime.now(UTC) + timedelta(seconds=float(seconds))
            response.headers["Retry-After"] = self.text or format_datetime(when, usegmt=True)
        return response


async def test_retry_after_as_an_http_date_is_honoured(h: Harness) -> None:
    _, disk = org_with_disk(h.fleet)
    h.fleet.rate_limit_per_minute = 5
    h.fleet.retry_after = 90
    for _ in range(5):
        h.fleet.admit(TOKEN, permitted=5)
    # RFC 9110 allows either form; the date is read as the seconds until it (the same parser as the notifiers').
    async with h.client(transport=RetryAfterAs(h.transport), max_retry_seconds=30) as client:
        with pytest.raises(RateLimitedError) as info:
            await client.list_disk_policies(disk)
    assert info.value.retry_after is not None and 85 < info.value.retry_after <= 90
    assert client.stats.requests == 1 and h.retry_sleeps == []


async def test_a_negative_retry_after_is_no_wait_the_server_asked_for(h: Harness) -> None:
    _, disk = org_with_disk(h.fleet)
    h.fleet.rate_limit_per_minute = 5
    h.fleet.retry_after = 1
    for _ in range(5):
        h.fleet.admit(TOKEN, permitted=5)
    async with h.client(transport=RetryAfterAs(h.transport, text="-3"), max_attempts=2) as client:
        assert await client.list_disk_policies(disk) == []
    # As without Retry-After: a few request slots of detail.total_permitted (60 / 5 × 4 s), not "-3" read as 0.
    assert h.retry_sleeps == [48.0]


async def test_pacing_follows_the_servers_limit(h: Harness) -> None:
    org = h.fleet.add_org("acme", id="org_acme")
    disks = [h.fleet.add_disk(org.id, id=f"disk_{i}").id for i in range(30)]
    h.fleet.rate_limit_per_minute = 600
    start = h.clock.now
    async with h.client(max_requests_per_minute=1000) as client:
        for disk in disks:
            await client.list_disk_policies(disk)
    # 30 requests at 600/min (plus the 2% margin) after the first response revealed the limit.
    assert client.limiter.per_minute == 600
    assert h.clock.now - start == pytest.approx(29 * 0.1 * 1.02, rel=0.05)
    assert client.stats.rate_limited == 0


# ---------------------------------------------------------------- stats and secrecy


async def test_stats_snapshot_and_reset(h: Harness) -> None:
    _, disk = org_with_disk(h.fleet)
    h.fleet.faults[disk] = Fault.UNAVAILABLE
    h.fleet.faults_remaining[disk] = 1
    async with h.client() as client:
        await client.list_disk_policies(disk)
        await client.get_disk(disk)
        snapshot = client.stats.snapshot_and_reset()
        assert snapshot == RequestStats(requests=3, retries=1, rate_limited=0, by_status={"503": 1, "200": 2})
        assert client.stats == RequestStats()
        await client.get_disk(disk)
    assert client.stats == RequestStats(requests=1, by_status={"200": 1})
    assert snapshot.requests == 3


async def test_token_never_shows(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _, disk = org_with_disk(h.fleet)
    h.fleet.faults["disk_gone"] = Fault.NOT_FOUND
    h.fleet.faults[disk] = Fault.UNAVAILABLE
    errors: list[BaseException] = []
    async with h.client(max_attempts=2) as client:
        for call in (client.list_disk_policies(disk), client.list_disk_policies("disk_gone")):
            try:
                await call
            except KatapultError as error:
                errors.append(error)
        text = repr(client) + str(vars(client))
    assert len(errors) == 2
    for exc in errors:
        text += str(exc) + repr(exc) + repr(vars(exc))
    assert repr(client) == f"KatapultClient(base_url={BASE!r})"
    assert caplog.records, "expected debug and warning logs"
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    assert TOKEN not in text
    assert TOKEN not in caplog.text
    for record in caplog.records:
        assert TOKEN not in record.getMessage()


async def test_token_echoed_by_the_server_is_redacted() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"error": {"code": "invalid_api_token", "description": f"token {TOKEN} is bad", "detail": {}}}
        return httpx.Response(403, content=json.dumps(body))

    async with KatapultClient(base_url=BASE, token=TOKEN, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(AuthError) as info:
            await client.get_disk("disk_x")
    assert TOKEN not in str(info.value) and "[redacted]" in str(info.value)


async def test_a_token_echoed_in_a_write_answers_description_or_detail_is_redacted_plain_or_base64() -> None:
    encoded = base64.b64encode(TOKEN.encode()).decode()

    def handler(request: httpx.Request) -> httpx.Response:
        body = {"error": {"code": "validation_error", "description": f"token {TOKEN} / {encoded.rstrip('=')}",
                          "detail": {"errors": [f"Bearer {TOKEN}", f"Basic {encoded}"], f"k{TOKEN}": [{"v": encoded}],
                                     "total": 3}}}
        return httpx.Response(422, content=json.dumps(body))

    async with KatapultClient(base_url=BASE, token=TOKEN, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(KatapultAPIError) as info:
            await client.write("PATCH", "/disk_backup_policies/disk_backup_policy", {}, target="disk_x")
    error = info.value
    assert error.code == "validation_error" and error.description == "token [redacted] / [redacted]"
    assert error.detail == {"errors": ["Bearer [redacted]", "Basic [redacted]"], "k[redacted]": [{"v": "[redacted]"}],
                            "total": 3}
    for text in (str(error), repr(error.detail), error.description):
        assert TOKEN not in text and encoded.rstrip("=") not in text


@pytest.mark.parametrize("prefix", ["", "Bearer ", "Bearer  ", "Authorization: Bearer "])
@pytest.mark.parametrize("suffix", ["", "\n", "!?"])
async def test_a_token_inside_a_longer_base64_text_is_redacted_at_any_offset(prefix: str, suffix: str) -> None:
    # base64 of a whole header or body: the token starts at any of three byte offsets of the encoded text.
    blobs = [encode(f"{prefix}{TOKEN}{suffix}".encode()).decode() for encode in (base64.b64encode,
                                                                                  base64.urlsafe_b64encode)]

    def handler(request: httpx.Request) -> httpx.Response:
        body = {"error": {"code": "validation_error", "description": " ".join(blobs), "detail": {"errors": blobs}}}
        return httpx.Response(422, content=json.dumps(body))

    async with KatapultClient(base_url=BASE, token=TOKEN, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(KatapultAPIError) as info:
            await client.write("PATCH", "/disk_backup_policies/disk_backup_policy", {}, target="disk_x")
    shown = str(info.value) + repr(info.value.detail) + info.value.description
    for blob in blobs:
        decodable = [w for w in shown.replace("[redacted]", " ").split() if len(w) >= 8]
        for word in decodable:  # what is left of an encoded text never decodes to the token
            for decode in (base64.b64decode, base64.urlsafe_b64decode):
                try:
                    assert TOKEN.encode() not in decode(word + "=" * (-len(word) % 4))
                except (ValueError, TypeError):
                    continue
        assert blob not in shown


# ---------------------------------------------------------------- real loopback sockets


@pytest.mark.slow
async def test_timeout_is_retried_then_a_transport_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fleet = Fleet()
    fleet.tokens.add(TOKEN)
    org, disk = org_with_disk(fleet)
    fleet.faults[disk] = Fault.SLOW
    fleet.slow_seconds = 1.0
    sleeps: list[float] = []

    async def no_wait(seconds: float) -> None:
        sleeps.append(seconds)

    with FakeServer(fleet) as server:
        async with KatapultClient(
            base_url=server.url, token=TOKEN, timeout=0.2, max_attempts=2, sleep=no_wait
        ) as client:
            with pytest.raises(KatapultTransportError) as info:
                await client.list_disk_policies(disk)
            # A timeout that clears: the retry gets through.
            fleet.faults_remaining[disk] = 1
            assert await client.list_disk_policies(disk) == []
    err = info.value
    assert err.code == "timeout" and not err.permanent
    assert err.target == disk and err.endpoint == "/disks/disk/disk_backup_policies"
    assert client.stats.by_status == {"timeout": 3, "200": 1}
    assert client.stats.retries == 2 and client.stats.requests == 4
    assert len(sleeps) == 2
    assert TOKEN not in caplog.text and TOKEN not in str(err)


@pytest.mark.slow
async def test_connection_refused_is_a_transport_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sleeps: list[float] = []

    async def no_wait(seconds: float) -> None:
        sleeps.append(seconds)

    async with KatapultClient(
        base_url=f"http://127.0.0.1:{port}/core/v1", token=TOKEN, max_attempts=3, sleep=no_wait
    ) as client:
        with pytest.raises(KatapultTransportError) as info:
            await client.get_disk("disk_x")
    assert info.value.code == "connection_error" and info.value.target == "disk_x"
    assert TOKEN not in str(info.value)
    assert client.stats.by_status == {"connection_error": 3}
    assert client.stats.retries == 2 and len(sleeps) == 2
    assert info.value.__cause__ is None


async def test_concurrency_is_bounded() -> None:
    in_flight = peak = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        body = {
            "pagination": {"current_page": 1, "total_pages": 0, "total": 0, "per_page": 200, "large_set": False},
            "disk_backup_policies": [],
        }
        return httpx.Response(200, json=body, headers={"X-RateLimit-Permitted": "100000"})

    async with KatapultClient(
        base_url=BASE,
        token=TOKEN,
        max_concurrency=3,
        max_requests_per_minute=100_000,
        transport=httpx.MockTransport(handler),
    ) as client:
        results = await asyncio.gather(*(client.list_disk_policies(f"disk_{i}") for i in range(20)))
    assert results == [[]] * 20
    assert peak == 3
    assert client.stats.requests == 20


async def test_known_page_counts_fetch_the_remaining_pages_together(h: Harness) -> None:
    _, disk = org_with_disk(h.fleet)
    for i in range(7):
        h.fleet.add_policy(disk, id=f"dbp_{i}", retention=7, next_invocation_at=NOW)
    inner = h.transport
    arrived: set[str] = set()
    together = asyncio.Event()

    class Barrier(httpx.AsyncBaseTransport):
        """Holds pages 2-4 until all three are in flight: a one-at-a-time client would never get past it."""

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            page = request.url.params.get("page")
            if page != "1":
                arrived.add(str(page))
                if arrived >= {"2", "3", "4"}:
                    together.set()
                await asyncio.wait_for(together.wait(), timeout=5)
            return await inner.handle_async_request(request)

    async with h.client(per_page=2, transport=Barrier()) as client:
        policies = await client.list_disk_policies(disk)
    assert [p.id for p in policies] == [f"dbp_{i}" for i in range(7)]
    assert len(inner.requests) == 4  # exactly total_pages requests, no more
