"""Tests of the fake Katapult: wire shapes, paging, auth, faults, rate limits, fleet files, the demo fleet."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from auditor.fake import DemoTargets, FakeServer, Fault, Fleet, create_app, demo_fleet, serve
from auditor.fake.fleet import FakeDisk, FakeOrg, FakePolicy, FakeVM, fake_id

NOW = 1_800_000_000
BASE = "http://fake/core/v1"
AUTH = {"Authorization": "Bearer fake-token"}
ID_PATTERN = re.compile(r"^(disk|dbp|vm|org)_[A-Za-z0-9]{16}$")

DISK_POLICIES = "/disks/disk/disk_backup_policies"
ORG_POLICIES = "/organizations/organization/disk_backup_policies"
VM_POLICIES = "/virtual_machines/virtual_machine/disk_backup_policies"
ORG_DISKS = "/organizations/organization/disks"
DISK = "/disks/disk"
VM_DISKS = "/virtual_machines/virtual_machine/disks"


def client_for(fleet: Fleet, *, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(fleet)),
        base_url=BASE,
        headers=AUTH if headers is None else headers,
    )


class Small:
    """A hand-built fleet: one org, one VM with two disks, a standalone disk and an unprotected one."""

    def __init__(self) -> None:
        self.fleet = Fleet()
        self.org = self.fleet.add_org("acme", id="org_acmeacmeacmeacme", name="Acme")
        self.vm = self.fleet.add_vm(self.org.id, "web-1.acme.example.com", id="vm_web1web1web1web1")
        self.system = self.fleet.add_disk(
            self.org.id, "web-1-system", id="disk_systemsystemsyst", vm_id=self.vm.id
        )
        self.data = self.fleet.add_disk(self.org.id, "web-1-data", vm_id=self.vm.id, size_in_gb=80)
        self.lone = self.fleet.add_disk(self.org.id, "lone", size_in_gb=40)
        self.bare = self.fleet.add_disk(self.org.id, "bare")
        self.vm_policy = self.fleet.add_policy(self.vm.id, retention=14, next_invocation_at=NOW + 60)
        self.data_policy = self.fleet.add_policy(self.data.id, retention=8, next_invocation_at=NOW + 120)
        self.lone_daily = self.fleet.add_policy(
            self.lone.id, retention=7, interval="daily", next_invocation_at=NOW + 3600, total_size=12.5
        )
        self.lone_hourly = self.fleet.add_policy(
            self.lone.id, retention=168, interval="hourly", next_invocation_at=NOW + 600
        )


@pytest.fixture
def small() -> Small:
    return Small()


@pytest.fixture
async def client(small: Small) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(small.fleet) as c:
        yield c


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["x-api-schema"] == "json-error"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "description", "detail"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["description"], str) and body["error"]["description"]
    detail: dict[str, Any] = body["error"]["detail"]
    assert isinstance(detail, dict)
    return detail


# ----------------------------------------------------------------------------------------- shapes


async def test_disk_policies_shape(client: httpx.AsyncClient, small: Small) -> None:
    response = await client.get(DISK_POLICIES, params={"disk[id]": small.lone.id})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert "x-api-schema" not in response.headers
    body = response.json()
    assert body["pagination"] == {
        "current_page": 1,
        "total_pages": 1,
        "total": 2,
        "per_page": 30,
        "large_set": False,
    }
    first, second = body["disk_backup_policies"]
    assert first == {
        "id": small.lone_daily.id,
        "retention": 7,
        "total_size": 12.5,
        "target": {"type": "Disk", "value": {"id": small.lone.id, "name": "lone"}},
        "schedule": {"interval": "daily", "next_invocation_at": NOW + 3600},
        "annotations": [],
    }
    assert second["schedule"] == {"interval": "hourly", "next_invocation_at": NOW + 600}
    assert ID_PATTERN.match(first["id"])


async def test_disk_policies_exclude_vm_level_policies(client: httpx.AsyncClient, small: Small) -> None:
    response = await client.get(DISK_POLICIES, params={"disk[id]": small.data.id})
    ids = [p["id"] for p in response.json()["disk_backup_policies"]]
    assert ids == [small.data_policy.id]


async def test_org_policies_by_id_and_sub_domain(client: httpx.AsyncClient, small: Small) -> None:
    by_id = await client.get(ORG_POLICIES, params={"organization[id]": small.org.id})
    by_sub = await client.get(ORG_POLICIES, params={"organization[sub_domain]": "acme"})
    assert by_id.status_code == by_sub.status_code == 200
    assert by_id.json() == by_sub.json()
    items = by_id.json()["disk_backup_policies"]
    assert {p["id"] for p in items} == {
        small.vm_policy.id,
        small.data_policy.id,
        small.lone_daily.id,
        small.lone_hourly.id,
    }
    vm_item = next(p for p in items if p["id"] == small.vm_policy.id)
    assert vm_item["target"] == {"type": "VirtualMachine", "value": {"id": small.vm.id, "name": "web-1"}}


async def test_vm_policies_with_and_without_disks(client: httpx.AsyncClient, small: Small) -> None:
    own = await client.get(VM_POLICIES, params={"virtual_machine[id]": small.vm.id})
    assert [p["id"] for p in own.json()["disk_backup_policies"]] == [small.vm_policy.id]
    by_fqdn = await client.get(
        VM_POLICIES, params={"virtual_machine[fqdn]": small.vm.fqdn, "include_disks": "true"}
    )
    listed = [p["id"] for p in by_fqdn.json()["disk_backup_policies"]]
    assert listed == [small.vm_policy.id, small.data_policy.id]
    assert by_fqdn.json()["pagination"]["total"] == 2
    params = {"virtual_machine[id]": small.vm.id, "include_disks": "perhaps"}
    bad = await client.get(VM_POLICIES, params=params)
    assert_error(bad, 400, "invalid_argument")


async def test_org_disks_shape(client: httpx.AsyncClient, small: Small) -> None:
    response = await client.get(ORG_DISKS, params={"organization[id]": small.org.id})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"pagination", "disk"}
    assert body["pagination"]["total"] == 4
    by_id = {d["id"]: d for d in body["disk"]}
    assert list(by_id) == [small.system.id, small.data.id, small.lone.id, small.bare.id]
    system = by_id[small.system.id]
    assert {"id", "name", "size_in_gb", "wwn", "state", "virtual_machine_disk"} <= set(system)
    assert system["virtual_machine_disk"]["virtual_machine"] == {"id": small.vm.id, "fqdn": small.vm.fqdn}
    assert by_id[small.lone.id]["virtual_machine_disk"] is None
    assert by_id[small.lone.id]["size_in_gb"] == 40
    assert "annotations" not in by_id[small.lone.id]  # list items carry annotations only if the fleet says so
    assert re.fullmatch(r"[0-9a-f]{32}", system["wwn"])


async def test_get_disk_shape(client: httpx.AsyncClient, small: Small) -> None:
    response = await client.get(DISK, params={"disk[id]": small.data.id})
    assert response.status_code == 200
    body = response.json()
    assert body["annotations"] == []
    disk = body["disk"]
    assert disk["id"] == small.data.id
    assert disk["name"] == "web-1-data"
    assert disk["size_in_gb"] == 80
    assert disk["state"] == "attached"
    assert isinstance(disk["created_at"], int)
    assert disk["virtual_machine_disk"]["virtual_machine"]["fqdn"] == "web-1.acme.example.com"


async def test_attachment_state_on_the_disk_lookup_and_not_in_the_org_list(small: Small) -> None:
    small.fleet.set_attachment(small.data.id, "detached", attach_on_boot=False)
    async with client_for(small.fleet) as client:
        looked_up = (await client.get(DISK, params={"disk[id]": small.data.id})).json()["disk"]
        listed = (await client.get(ORG_DISKS, params={"organization[id]": small.org.id})).json()["disk"]
    assert looked_up["virtual_machine_disk"] == {
        "virtual_machine": {"id": small.vm.id, "fqdn": small.vm.fqdn}, "attach_on_boot": False, "boot": False,
        "state": "detached"}
    # README: organization list items name the VM only, without the attachment state.
    (item,) = [d for d in listed if d["id"] == small.data.id]
    assert item["virtual_machine_disk"] == {"virtual_machine": {"id": small.vm.id, "fqdn": small.vm.fqdn}}


async def test_vm_disk_list_shape_paging_and_faults(small: Small) -> None:
    small.fleet.set_attachment(small.data.id, "detached")
    async with client_for(small.fleet) as client:
        first = await client.get(VM_DISKS, params={"virtual_machine[id]": small.vm.id, "per_page": 1})
        second = await client.get(VM_DISKS, params={"virtual_machine[fqdn]": small.vm.fqdn, "page": 2,
                                                    "per_page": 1})
        missing = await client.get(VM_DISKS, params={"virtual_machine[id]": "vm_nonenonenonenone"})
        small.fleet.faults[small.vm.id] = Fault.MALFORMED
        malformed = await client.get(VM_DISKS, params={"virtual_machine[id]": small.vm.id})
    assert first.status_code == 200
    body = first.json()
    assert set(body) == {"pagination", "disks"} and body["pagination"]["total_pages"] == 2
    (system,) = body["disks"]
    assert system["state"] == "attached" and system["boot"] is True and system["attach_on_boot"] is True
    assert system["disk"]["id"] == small.system.id
    assert {"id", "name", "size_in_gb", "wwn", "state", "created_at"} == set(system["disk"])
    (data,) = second.json()["disks"]
    assert data["disk"]["id"] == small.data.id and data["state"] == "detached"
    assert_error(missing, 404, "virtual_machine_not_found")
    assert "state" not in malformed.json()["disks"][0]


async def test_organizations_lists_the_visible_ones(small: Small) -> None:
    other = small.fleet.add_org("other", id="org_otherotherother0")
    async with client_for(small.fleet) as client:
        both = (await client.get("/organizations")).json()
        other.visible = False
        one = (await client.get("/organizations")).json()
        hidden = await client.get(ORG_DISKS, params={"organization[id]": other.id})
    assert set(both) == {"organizations"}  # not paginated
    assert [(o["id"], o["sub_domain"], o["name"]) for o in both["organizations"]] == [
        (small.org.id, "acme", "Acme"), (other.id, "other", "Other")]
    assert [o["id"] for o in one["organizations"]] == [small.org.id]
    assert_error(hidden, 404, "organization_not_found")


@pytest.mark.parametrize(("shape", "target"), [
    ("typed", {"type": "VirtualMachine", "value": {"id": "vm_web1web1web1web1", "name": "web-1"}}),
    ("openapi", {"target": {"id": "vm_web1web1web1web1", "name": "web-1"}}),
    ("bare", {"id": "vm_web1web1web1web1", "name": "web-1"}),
])
async def test_policy_target_shapes(small: Small, shape: str, target: dict[str, Any]) -> None:
    small.fleet.policy_target_shape = shape
    async with client_for(small.fleet) as client:
        for path, params in ((VM_POLICIES, {"virtual_machine[id]": small.vm.id}),
                             (ORG_POLICIES, {"organization[id]": small.org.id})):
            items = (await client.get(path, params=params)).json()["disk_backup_policies"]
            (policy,) = [p for p in items if p["id"] == small.vm_policy.id]
            assert policy["target"] == target


def test_fleet_file_attachment_visibility_and_target_shape() -> None:
    fleet = Fleet.from_dict({
        "policy_target_shape": "openapi",
        "organizations": [{
            "id": "org_x", "sub_domain": "x", "visible": False,
            "virtual_machines": [{"id": "vm_x", "fqdn": "x.example.com"}],
            "disks": [{"id": "disk_x", "vm": "vm_x", "attachment": "detached", "attach_on_boot": False},
                      {"id": "disk_y", "vm": "vm_x"}],
        }],
    }, now=NOW)
    assert fleet.policy_target_shape == "openapi" and fleet.orgs["org_x"].visible is False
    assert (fleet.disks["disk_x"].attachment, fleet.disks["disk_x"].attach_on_boot) == ("detached", False)
    assert (fleet.disks["disk_y"].attachment, fleet.disks["disk_y"].attach_on_boot) == ("attached", True)
    fleet.move_disk("disk_x", None)
    assert fleet.disk_ids_of_vm("vm_x") == ["disk_y"] and fleet.disks["disk_x"].vm_id is None
    with pytest.raises(ValueError, match="unknown virtual machine"):
        fleet.move_disk("disk_x", "vm_nope")
    with pytest.raises(ValueError, match="attachment must be one of"):
        fleet.set_attachment("disk_y", "half")


# ----------------------------------------------------------------------------------------- paging


async def test_paging_across_pages() -> None:
    fleet = Fleet()
    org = fleet.add_org("paged")
    disk = fleet.add_disk(org.id, "busy")
    created = [fleet.add_policy(disk.id, retention=7 + n, next_invocation_at=NOW).id for n in range(25)]
    async with client_for(fleet) as c:
        pages = []
        for page in (1, 2, 3, 4):
            params = {"disk[id]": disk.id, "page": page, "per_page": "10"}
            response = await c.get(DISK_POLICIES, params=params)
            assert response.status_code == 200
            pages.append(response.json())
    assert [len(p["disk_backup_policies"]) for p in pages] == [10, 10, 5, 0]
    assert [p["pagination"]["current_page"] for p in pages] == [1, 2, 3, 4]
    assert all(p["pagination"]["total_pages"] == 3 and p["pagination"]["total"] == 25 for p in pages)
    assert [item["id"] for p in pages for item in p["disk_backup_policies"]] == created


async def test_empty_list_has_zero_pages(client: httpx.AsyncClient, small: Small) -> None:
    response = await client.get(DISK_POLICIES, params={"disk[id]": small.bare.id})
    body = response.json()
    assert body["disk_backup_policies"] == []
    assert body["pagination"] == {
        "current_page": 1,
        "total_pages": 0,
        "total": 0,
        "per_page": 30,
        "large_set": False,
    }


async def test_large_set_beyond_1000_rows() -> None:
    big = Fleet.generate(disks=1001, vm_share=0.0, now=NOW)
    exact = Fleet.generate(disks=1000, vm_share=0.0, now=NOW)
    async with client_for(big) as c:
        org_id = next(iter(big.orgs))
        params = {"organization[id]": org_id, "per_page": 200}
        first = (await c.get(ORG_DISKS, params=params)).json()
        last = (await c.get(ORG_DISKS, params={**params, "page": 6})).json()
        policies = (await c.get(ORG_POLICIES, params={"organization[id]": org_id})).json()
    assert first["pagination"] == {
        "current_page": 1,
        "total_pages": None,
        "total": None,
        "per_page": 200,
        "large_set": True,
    }
    assert len(first["disk"]) == 200
    assert len(last["disk"]) == 1  # the short page that tells a client to stop
    assert policies["pagination"]["large_set"] is True
    async with client_for(exact) as c:
        params = {"organization[id]": next(iter(exact.orgs)), "per_page": 200}
        body = (await c.get(ORG_DISKS, params=params)).json()
    assert body["pagination"]["large_set"] is False
    assert body["pagination"]["total"] == 1000
    assert body["pagination"]["total_pages"] == 5


@pytest.mark.parametrize(
    ("per_page", "page", "status"),
    [
        ("201", "1", 400),
        ("200", "1", 200),
        ("0", "1", 400),
        ("ten", "1", 400),
        ("10", "0", 400),
        ("10", "-1", 400),
    ],
)
async def test_paging_arguments_are_validated(
    client: httpx.AsyncClient, small: Small, per_page: str, page: str, status: int
) -> None:
    params = {"disk[id]": small.lone.id, "per_page": per_page, "page": page}
    response = await client.get(DISK_POLICIES, params=params)
    assert response.status_code == status
    if status == 400:
        detail = assert_error(response, 400, "invalid_argument")
        assert detail["issue"] in {"validation_errors", "invalid_scalar"}
        assert detail["errors"]


async def test_per_page_201_names_the_argument(client: httpx.AsyncClient, small: Small) -> None:
    response = await client.get(DISK_POLICIES, params={"disk[id]": small.lone.id, "per_page": 201})
    detail = assert_error(response, 400, "invalid_argument")
    assert detail["argument"] == {"name": "per_page"}
    assert detail["issue"] == "validation_errors"


# ----------------------------------------------------------------------------------------- lookups and auth


@pytest.mark.parametrize(
    ("path", "code"),
    [
        (DISK_POLICIES, "disk_not_found"),
        (DISK, "disk_not_found"),
        (ORG_POLICIES, "organization_not_found"),
        (ORG_DISKS, "organization_not_found"),
        (VM_POLICIES, "virtual_machine_not_found"),
    ],
)
async def test_missing_lookup_parameter_is_404(client: httpx.AsyncClient, path: str, code: str) -> None:
    assert assert_error(await client.get(path), 404, code) == {}


async def test_unknown_objects_are_404(client: httpx.AsyncClient) -> None:
    assert_error(await client.get(DISK_POLICIES, params={"disk[id]": "disk_nope"}), 404, "disk_not_found")
    response = await client.get(ORG_DISKS, params={"organization[sub_domain]": "nope"})
    assert_error(response, 404, "organization_not_found")
    response = await client.get(VM_POLICIES, params={"virtual_machine[fqdn]": "nope.example.com"})
    assert_error(response, 404, "virtual_machine_not_found")


async def test_unknown_route(client: httpx.AsyncClient, small: Small) -> None:
    assert_error(await client.get("/disks/disk/snapshots"), 404, "route_not_found")
    assert_error(await client.put(DISK_POLICIES, params={"disk[id]": small.lone.id}), 404, "route_not_found")
    assert small.fleet.stats.by_endpoint["(unknown)"] == 2


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 400, "missing_api_token"),
        ({"Authorization": "Basic ZmFrZQ=="}, 400, "missing_api_token"),
        ({"Authorization": "Bearer wrong"}, 403, "invalid_api_token"),
    ],
)
async def test_auth_errors(small: Small, headers: dict[str, str], status: int, code: str) -> None:
    async with client_for(small.fleet, headers=headers) as c:
        response = await c.get(DISK_POLICIES, params={"disk[id]": small.lone.id})
    assert_error(response, status, code)
    assert response.headers["x-ratelimit-permitted"] == "1000"
    assert response.headers["x-ratelimit-remaining"] == "1000"


async def test_extra_tokens_are_accepted(small: Small) -> None:
    small.fleet.tokens.add("second")
    async with client_for(small.fleet, headers={"Authorization": "Bearer second"}) as c:
        response = await c.get(DISK, params={"disk[id]": small.lone.id})
    assert response.status_code == 200


# ----------------------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        (Fault.NOT_FOUND, 404, "disk_not_found"),
        (Fault.UNAVAILABLE, 503, "service_unavailable"),
        (Fault.SERVER_ERROR, 500, "unhandled_exception"),
        (Fault.FORBIDDEN, 403, "permission_denied"),
    ],
)
async def test_error_faults(
    client: httpx.AsyncClient, small: Small, fault: Fault, status: int, code: str
) -> None:
    small.fleet.faults[small.lone.id] = fault
    assert_error(await client.get(DISK_POLICIES, params={"disk[id]": small.lone.id}), status, code)
    assert_error(await client.get(DISK, params={"disk[id]": small.lone.id}), status, code)
    other = await client.get(DISK_POLICIES, params={"disk[id]": small.data.id})
    assert other.status_code == 200


async def test_not_found_fault_uses_the_lookup_kind(client: httpx.AsyncClient, small: Small) -> None:
    small.fleet.faults[small.org.id] = Fault.NOT_FOUND
    small.fleet.faults[small.vm.id] = Fault.NOT_FOUND
    response = await client.get(ORG_POLICIES, params={"organization[sub_domain]": "acme"})
    assert_error(response, 404, "organization_not_found")
    response = await client.get(VM_POLICIES, params={"virtual_machine[id]": small.vm.id})
    assert_error(response, 404, "virtual_machine_not_found")


async def test_in_trash_fault(client: httpx.AsyncClient, small: Small) -> None:
    small.fleet.faults[small.lone.id] = Fault.IN_TRASH
    before = int(time.time())
    response = await client.get(DISK_POLICIES, params={"disk[id]": small.lone.id})
    detail = assert_error(response, 406, "object_in_trash")
    trash = detail["trash_object"]
    assert set(trash) == {"id", "keep_until", "object_id", "object_type"}
    assert trash["object_id"] == small.lone.id
    assert trash["object_type"] == "Disk"
    assert isinstance(trash["keep_until"], int) and trash["keep_until"] > before


async def test_malformed_fault_breaks_policies(client: httpx.AsyncClient, small: Small) -> None:
    small.fleet.faults[small.lone.id] = Fault.MALFORMED
    response = await client.get(DISK_POLICIES, params={"disk[id]": small.lone.id})
    assert response.status_code == 200
    first, second = response.json()["disk_backup_policies"]
    assert "retention" not in first
    assert isinstance(second["retention"], str) and not second["retention"].isdigit()


async def test_malformed_fault_on_empty_list_and_disks(client: httpx.AsyncClient, small: Small) -> None:
    small.fleet.faults[small.bare.id] = Fault.MALFORMED
    small.fleet.faults[small.org.id] = Fault.MALFORMED
    empty = (await client.get(DISK_POLICIES, params={"disk[id]": small.bare.id})).json()
    assert "disk_backup_policies" not in empty
    disks = (await client.get(ORG_DISKS, params={"organization[id]": small.org.id})).json()["disk"]
    assert "id" not in disks[0]
    assert all(not isinstance(d["id"], str) for d in disks[1:])
    one = (await client.get(DISK, params={"disk[id]": small.bare.id})).json()
    assert "id" not in one["disk"]


async def test_invalid_json_fault(client: httpx.AsyncClient, small: Small) -> None:
    small.fleet.faults[small.org.id] = Fault.INVALID_JSON
    response = await client.get(ORG_POLICIES, params={"organization[id]": small.org.id})
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.content)


async def test_slow_fault(client: httpx.AsyncClient, small: Small) -> None:
    small.fleet.faults[small.lone.id] = Fault.SLOW
    small.fleet.slow_seconds = 0.2
    started = time.perf_counter()
    response = await client.get(DISK_POLICIES, params={"disk[id]": small.lone.id})
    assert time.perf_counter() - started >= 0.2
    assert response.status_code == 200
    assert len(response.json()["disk_backup_policies"]) == 2


async def test_fault_clears_after_remaining_requests(client: httpx.AsyncClient, small: Small) -> None:
    small.fleet.faults[small.lone.id] = Fault.UNAVAILABLE
    small.fleet.faults_remaining[small.lone.id] = 2
    params = {"disk[id]": small.lone.id}
    statuses = [(await client.get(DISK_POLICIES, params=params)).status_code for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert small.lone.id not in small.fleet.faults
    assert small.lone.id not in small.fleet.faults_remaining


async def test_latency_delays_every_response(small: Small) -> None:
    small.fleet.latency = 0.15
    async with client_for(small.fleet, headers={}) as c:
        started = time.perf_counter()
        response = await c.get(DISK, params={"disk[id]": small.lone.id})
        elapsed = time.perf_counter() - started
    assert response.status_code == 400
    assert elapsed >= 0.15


# ----------------------------------------------------------------------------------------- rate limits


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_rate_limit_window(small: Small) -> None:
    clock = FakeClock()
    small.fleet.clock = clock
    small.fleet.rate_limit_per_minute = 3
    async with client_for(small.fleet) as c:
        oks = [await c.get(DISK, params={"disk[id]": small.lone.id}) for _ in range(3)]
        assert [r.status_code for r in oks] == [200, 200, 200]
        assert [r.headers["x-ratelimit-remaining"] for r in oks] == ["2", "1", "0"]
        assert all(r.headers["x-ratelimit-permitted"] == "3" for r in oks)
        clock.now += 30
        limited = await c.get(DISK, params={"disk[id]": small.lone.id})
        detail = assert_error(limited, 429, "rate_limit_reached")
        assert detail == {"total_permitted": 3}
        assert limited.headers["x-ratelimit-permitted"] == "3"
        assert limited.headers["x-ratelimit-remaining"] == "0"
        assert "retry-after" not in limited.headers
        # A second token has its own budget.
        small.fleet.tokens.add("other")
        other_auth = {"Authorization": "Bearer other"}
        other = await c.get(DISK, params={"disk[id]": small.lone.id}, headers=other_auth)
        assert other.status_code == 200
        # The 429 used no budget: once the first three leave the window, three more fit.
        clock.now += 30.5
        again = [await c.get(DISK, params={"disk[id]": small.lone.id}) for _ in range(4)]
        assert [r.status_code for r in again] == [200, 200, 200, 429]
    assert small.fleet.stats.rate_limited == 2
    assert small.fleet.stats.total == 9
    assert small.fleet.stats.by_endpoint == {DISK: 9}
    assert small.fleet.stats.by_status == {200: 7, 429: 2}


async def test_rate_limit_headers_on_errors(client: httpx.AsyncClient, small: Small) -> None:
    response = await client.get(DISK, params={"disk[id]": "disk_missing"})
    assert response.status_code == 404
    assert response.headers["x-ratelimit-permitted"] == "1000"
    assert response.headers["x-ratelimit-remaining"] == "999"


async def test_retry_after_is_optional(small: Small) -> None:
    small.fleet.rate_limit_per_minute = 1
    small.fleet.retry_after = 1.5
    async with client_for(small.fleet) as c:
        await c.get(DISK, params={"disk[id]": small.lone.id})
        limited = await c.get(DISK, params={"disk[id]": small.lone.id})
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "1.5"


async def test_rate_limit_changes_mid_run(small: Small) -> None:
    small.fleet.rate_limit_changes = [(2, 3), (4, 1000)]
    async with client_for(small.fleet) as c:
        responses = [await c.get(DISK, params={"disk[id]": small.lone.id}) for _ in range(5)]
    permitted = [r.headers["x-ratelimit-permitted"] for r in responses]
    assert permitted == ["1000", "1000", "3", "3", "1000"]
    assert [r.status_code for r in responses] == [200, 200, 200, 429, 200]
    assert responses[3].json()["error"]["detail"] == {"total_permitted": 3}


# ----------------------------------------------------------------------------------------- mutability


async def test_fleet_changes_are_served(client: httpx.AsyncClient, small: Small) -> None:
    fleet = small.fleet
    added = fleet.add_policy(small.bare.id, retention=9, interval="weekly", next_invocation_at=NOW)
    body = (await client.get(DISK_POLICIES, params={"disk[id]": small.bare.id})).json()
    assert [(p["id"], p["retention"], p["schedule"]["interval"]) for p in body["disk_backup_policies"]] == [
        (added.id, 9, "weekly")
    ]
    fleet.update_policy(added.id, retention=3, target_id=small.lone.id)
    bare = (await client.get(DISK_POLICIES, params={"disk[id]": small.bare.id})).json()
    assert bare["pagination"]["total"] == 0
    lone_body = (await client.get(DISK_POLICIES, params={"disk[id]": small.lone.id})).json()
    lone = lone_body["disk_backup_policies"]
    assert [p["retention"] for p in lone] == [7, 168, 3]
    fleet.remove_policy(added.id)
    fleet.remove_disk(small.lone.id)
    assert small.lone_daily.id not in fleet.policies
    assert_error(await client.get(DISK_POLICIES, params={"disk[id]": small.lone.id}), 404, "disk_not_found")
    org = (await client.get(ORG_POLICIES, params={"organization[id]": small.org.id})).json()
    assert {p["id"] for p in org["disk_backup_policies"]} == {small.vm_policy.id, small.data_policy.id}
    # Direct edits of the dicts are picked up too.
    fleet.policies["dbp_directdirectdirec"] = FakePolicy(
        id="dbp_directdirectdirec",
        target_type="Disk",
        target_id=small.bare.id,
        retention=30,
        interval="daily",
        next_invocation_at=None,
    )
    body = (await client.get(DISK_POLICIES, params={"disk[id]": small.bare.id})).json()
    assert [p["schedule"]["next_invocation_at"] for p in body["disk_backup_policies"]] == [None]


def test_builders_reject_inconsistent_objects(small: Small) -> None:
    with pytest.raises(ValueError, match="unknown policy target"):
        small.fleet.add_policy("disk_missing")
    with pytest.raises(ValueError, match="interval"):
        small.fleet.add_policy(small.bare.id, interval="yearly")
    with pytest.raises(ValueError, match="duplicate organization sub_domain"):
        small.fleet.add_org("acme")
    with pytest.raises(ValueError, match="unknown policy field"):
        small.fleet.update_policy(small.vm_policy.id, colour="red")
    with pytest.raises(ValueError, match="interval"):
        small.fleet.update_policy(small.vm_policy.id, interval="never")
    assert small.fleet.policies[small.vm_policy.id].interval == "daily"


def test_constructed_fleet_is_indexed() -> None:
    org = FakeOrg(id="org_a", sub_domain="a")
    vm = FakeVM(id="vm_a", fqdn="a.example.com", org_id=org.id)
    disk = FakeDisk(id="disk_a", name="a", org_id=org.id, vm_id=vm.id)
    policy = FakePolicy(
        id="dbp_a",
        target_type="VirtualMachine",
        target_id=vm.id,
        retention=7,
        interval="daily",
        next_invocation_at=1,
    )
    fleet = Fleet(orgs={org.id: org}, vms={vm.id: vm}, disks={disk.id: disk}, policies={policy.id: policy})
    assert fleet.policy_ids_of_org(org.id) == ["dbp_a"]
    assert fleet.disk_ids_of_vm(vm.id) == ["disk_a"]
    assert fleet.org_by_sub_domain("a") is org


# ----------------------------------------------------------------------------------------- generate


def test_generate_is_deterministic_and_sized() -> None:
    one = Fleet.generate(disks=500, orgs=3, policies_per_disk=1.0, vm_share=0.2, now=NOW, seed=7)
    two = Fleet.generate(disks=500, orgs=3, policies_per_disk=1.0, vm_share=0.2, now=NOW, seed=7)
    other = Fleet.generate(disks=500, orgs=3, policies_per_disk=1.0, vm_share=0.2, now=NOW, seed=8)
    assert one == two
    assert list(one.disks) == list(two.disks)
    assert set(one.disks).isdisjoint(other.disks)
    assert len(one.orgs) == 3 and len(one.disks) == 500
    attached = [d for d in one.disks.values() if d.vm_id is not None]
    assert len(attached) == 100
    assert all(len(one.disk_ids_of_vm(vm_id)) in (1, 2) for vm_id in one.vms)
    # Attached disks are protected by their VM only; the others carry exactly one policy each.
    assert all(not one.policy_ids_of_disk(d.id) for d in attached)
    assert all(len(one.policy_ids_of_vm(vm_id)) == 1 for vm_id in one.vms)
    assert len(one.policies) == 400 + len(one.vms)
    for policy in one.policies.values():
        assert policy.next_invocation_at is not None and policy.next_invocation_at > NOW
        assert policy.retention >= 7
        window_hours = policy.retention * (1 if policy.interval == "hourly" else 24)
        assert policy.interval in ("hourly", "daily") and window_hours >= 7 * 24
    assert all(ID_PATTERN.match(i) for i in [*one.orgs, *one.vms, *one.disks, *one.policies])
    assert sum(len(one.disk_ids_of_org(org_id)) for org_id in one.orgs) == 500


def test_generate_fractional_policies() -> None:
    fleet = Fleet.generate(disks=1000, policies_per_disk=1.5, vm_share=0.0, now=NOW)
    counts = [len(fleet.policy_ids_of_disk(d)) for d in fleet.disks]
    assert set(counts) == {1, 2}
    assert 1400 < len(fleet.policies) < 1600


# ----------------------------------------------------------------------------------------- fleet files

TOML_FLEET = """
tokens = ["tok-a", "tok-b"]
rate_limit_per_minute = 200
latency_ms = 25
slow_seconds = 0.5
rate_limit_changes = [[100, 50]]

[faults]
disk_bbbbbbbbbbbbbbbb = "in_trash"

[[organizations]]
id = "org_aaaaaaaaaaaaaaaa"
sub_domain = "acme"
name = "Acme"
virtual_machines = [{ id = "vm_aaaaaaaaaaaaaaaa", fqdn = "web.acme.example.com" }]
disks = [
  { id = "disk_aaaaaaaaaaaaaaaa", name = "system", vm = "vm_aaaaaaaaaaaaaaaa", size_in_gb = 40 },
  { id = "disk_bbbbbbbbbbbbbbbb", name = "scratch", state = "attached" },
]

[[organizations.policies]]
id = "dbp_aaaaaaaaaaaaaaaa"
target_type = "VirtualMachine"
target_id = "vm_aaaaaaaaaaaaaaaa"
retention = 14
interval = "daily"
next_in_seconds = 3600

[[organizations.policies]]
id = "dbp_bbbbbbbbbbbbbbbb"
target_type = "Disk"
target_id = "disk_bbbbbbbbbbbbbbbb"
retention = 3
interval = "weekly"
next_invocation_at = 1700000000
"""


def test_from_file_toml(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(TOML_FLEET)
    fleet = Fleet.from_file(path, now=NOW)
    assert fleet.tokens == {"tok-a", "tok-b"}
    assert fleet.rate_limit_per_minute == 200
    assert fleet.latency == pytest.approx(0.025)
    assert fleet.slow_seconds == 0.5
    assert fleet.rate_limit_changes == [(100, 50)]
    assert fleet.faults == {"disk_bbbbbbbbbbbbbbbb": Fault.IN_TRASH}
    assert fleet.disks["disk_aaaaaaaaaaaaaaaa"].vm_id == "vm_aaaaaaaaaaaaaaaa"
    assert fleet.disks["disk_aaaaaaaaaaaaaaaa"].size_in_gb == 40
    assert fleet.policies["dbp_aaaaaaaaaaaaaaaa"].next_invocation_at == NOW + 3600
    assert fleet.policies["dbp_bbbbbbbbbbbbbbbb"].next_invocation_at == 1_700_000_000
    assert fleet.policy_ids_of_org("org_aaaaaaaaaaaaaaaa") == ["dbp_aaaaaaaaaaaaaaaa", "dbp_bbbbbbbbbbbbbbbb"]


def test_from_file_json_with_generate(tmp_path: Path) -> None:
    data = {
        "generate": {"disks": 20, "orgs": 2, "vm_share": 0.0, "seed": 3},
        "faults": {"disk_cccccccccccccccc": "unavailable"},
        "faults_remaining": {"disk_cccccccccccccccc": 1},
        "organizations": [
            {
                "id": "org_cccccccccccccccc",
                "sub_domain": "extra",
                "disks": [{"id": "disk_cccccccccccccccc", "name": "x"}],
                "policies": [
                    {
                        "id": "dbp_cccccccccccccccc",
                        "target_type": "Disk",
                        "target_id": "disk_cccccccccccccccc",
                        "retention": 7,
                        "interval": "hourly",
                        "next_invocation_at": None,
                    }
                ],
            }
        ],
    }
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps(data))
    fleet = Fleet.from_file(path, now=NOW)
    assert len(fleet.orgs) == 3
    assert len(fleet.disks) == 21
    assert fleet.policies["dbp_cccccccccccccccc"].next_invocation_at is None
    assert fleet.faults_remaining == {"disk_cccccccccccccccc": 1}
    assert fleet.tokens == {"fake-token"}
    generated = Fleet.generate(disks=20, orgs=2, vm_share=0.0, seed=3, now=NOW)
    assert set(generated.disks) < set(fleet.disks)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"colour": "red"}, "colour"),
        ({"rate_limit_per_minute": "lots"}, "rate_limit_per_minute"),
        ({"rate_limit_per_minute": True}, "rate_limit_per_minute"),
        ({"latency_ms": "slow"}, "latency_ms"),
        ({"faults": {"disk_x": "exploding"}}, r"faults\.disk_x"),
        ({"rate_limit_changes": [[1]]}, r"rate_limit_changes\[0\]"),
        ({"generate": {"disks": 5, "colour": 1}}, r"generate\.colour"),
        ({"organizations": [{"id": "org_x", "sub_domain": "x", "disks": [{"id": "d", "size_in_gb": "big"}]}]},
         r"organizations\[0\]\.disks\[0\]\.size_in_gb"),
        ({"organizations": [{"id": "org_x", "sub_domain": "x", "virtual_machines": [{"id": "vm_x"}]}]},
         r"organizations\[0\]\.virtual_machines\[0\]\.fqdn"),
        (
            {
                "organizations": [
                    {
                        "id": "org_x",
                        "sub_domain": "x",
                        "policies": [
                            {
                                "id": "p",
                                "target_type": "Disk",
                                "target_id": "nope",
                                "retention": 7,
                                "interval": "daily",
                            }
                        ],
                    }
                ]
            },
            r"organizations\[0\]\.policies\[0\]: unknown Disk target",
        ),
        ({"organizations": [{"id": "org_x", "sub_domain": "x", "size": 3}]}, r"organizations\[0\]\.size"),
        ({"run_schedules": "yes"}, "run_schedules"),
        ({"organizations": [{"id": "org_x", "sub_domain": "x", "disks": [{"id": "disk_x"}], "policies": [
            {"id": "p", "target_type": "Disk", "target_id": "disk_x", "retention": 7, "interval": "daily",
             "frequency": 0}]}]}, r"organizations\[0\]\.policies\[0\]\.frequency"),
        ({"organizations": [{"id": "org_x", "sub_domain": "x", "disks": [{"id": "disk_x"}], "policies": [
            {"id": "p", "target_type": "Disk", "target_id": "disk_x", "retention": 7, "interval": "daily",
             "growth": -1}]}]}, r"organizations\[0\]\.policies\[0\]\.growth"),
        ({"policy_target_shape": "oneOf"}, "policy_target_shape"),
        ({"organizations": [{"id": "org_x", "sub_domain": "x", "visible": "no"}]}, r"organizations\[0\]\.visible"),
        ({"organizations": [{"id": "org_x", "sub_domain": "x", "disks": [{"id": "d", "attachment": "loose"}]}]},
         r"organizations\[0\]\.disks\[0\]: attachment must be one of attached, detached"),
        ({"organizations": [{"id": "org_x", "sub_domain": "x", "disks": [{"id": "d", "attach_on_boot": 1}]}]},
         r"organizations\[0\]\.disks\[0\]\.attach_on_boot"),
    ],
)
def test_from_dict_rejects_bad_input(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Fleet.from_dict(data, now=NOW)


def test_from_file_rejects_other_suffixes(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("{}")
    with pytest.raises(ValueError, match="json or .toml"):
        Fleet.from_file(path)


# ----------------------------------------------------------------------------------------- demo fleet


def _window_days(policy: FakePolicy) -> float:
    return policy.retention * {"hourly": 1 / 24, "daily": 1, "weekly": 7, "monthly": 30}[policy.interval]


def _covering(fleet: Fleet, disk: FakeDisk) -> list[FakePolicy]:
    ids = list(fleet.policy_ids_of_disk(disk.id))
    if disk.vm_id is not None:
        ids += fleet.policy_ids_of_vm(disk.vm_id)
    return [fleet.policies[i] for i in ids]


def test_demo_fleet_has_every_promised_case() -> None:
    fleet, targets = demo_fleet(now=NOW)
    assert isinstance(targets, DemoTargets)
    (org_id,) = targets.organizations
    demo = fleet.orgs[org_id]
    assert demo.sub_domain == "demo" and org_id.startswith("org_")
    demo_disks = [fleet.disks[i] for i in fleet.disk_ids_of_org(org_id)]
    assert 24 <= len(demo_disks) <= 48
    assert all(ID_PATTERN.match(i) for i in [*fleet.orgs, *fleet.vms, *fleet.disks, *fleet.policies])
    covering = {d.id: _covering(fleet, d) for d in demo_disks}
    by_name = {d.name: d for d in demo_disks}

    def ok(p: FakePolicy) -> bool:
        fresh = p.next_invocation_at is not None and p.next_invocation_at > NOW - 3600
        return p.retention >= 7 and _window_days(p) >= 7 and p.interval in ("hourly", "daily") and fresh

    compliant = [d for d in demo_disks if covering[d.id] and all(ok(p) for p in covering[d.id])]
    assert len(compliant) >= 10
    assert any(not covering[d.id] for d in demo_disks)  # unprotected-disk
    policies = [p for d in demo_disks for p in covering[d.id]]
    assert any(p.retention == 3 and p.interval == "daily" for p in policies)
    assert any(p.retention == 10 and p.interval == "hourly" for p in policies)
    assert {"weekly", "monthly"} <= {p.interval for p in policies}
    assert any(p.next_invocation_at == NOW - 3 * 3600 for p in policies)
    # A VM-level policy is the only protection of two attached disks of one VM.
    vm_only = [
        d
        for d in demo_disks
        if d.vm_id and not fleet.policy_ids_of_disk(d.id) and fleet.policy_ids_of_vm(d.vm_id)
    ]
    by_vm: dict[str, list[str]] = {}
    for d in vm_only:
        by_vm.setdefault(d.vm_id or "", []).append(d.attachment)
    assert sorted(by_vm.values()) == [["attached", "attached"], ["attached", "detached"]]
    (detached,) = [d for d in vm_only if d.attachment == "detached"]
    assert detached.attach_on_boot is False
    busy = [d for d in demo_disks if len(fleet.policy_ids_of_disk(d.id)) == 25]
    assert len(busy) == 1
    assert sum(not ok(p) for p in covering[busy[0].id]) == 1
    mixed = by_name["mixed-volume"]
    assert sorted(ok(p) for p in covering[mixed.id]) == [False, True]
    # The explicit disk targets: two partner disks, one missing disk and one in the trash.
    partner = fleet.org_by_sub_domain("partner")
    assert partner is not None and partner.id not in targets.organizations
    first, second, missing, trashed = targets.disks
    assert fleet.disks[first].org_id == fleet.disks[second].org_id == partner.id
    assert missing not in fleet.disks and ID_PATTERN.match(missing)
    assert fleet.faults == {trashed: Fault.IN_TRASH}
    assert demo_fleet(now=NOW)[1] == targets  # deterministic ids


async def test_demo_fleet_over_http() -> None:
    fleet, targets = demo_fleet(now=NOW)
    first, _, missing, trashed = targets.disks
    async with client_for(fleet) as c:
        assert (await c.get(DISK_POLICIES, params={"disk[id]": first})).status_code == 200
        assert_error(await c.get(DISK_POLICIES, params={"disk[id]": missing}), 404, "disk_not_found")
        assert_error(await c.get(DISK_POLICIES, params={"disk[id]": trashed}), 406, "object_in_trash")
        busy = next(d for d in fleet.disks.values() if d.name == "busy-volume")
        pages = [
            (await c.get(DISK_POLICIES, params={"disk[id]": busy.id, "per_page": 10, "page": n})).json()
            for n in (1, 2, 3)
        ]
        disks = (await c.get(ORG_DISKS, params={"organization[sub_domain]": "demo", "per_page": 200})).json()
    assert pages[0]["pagination"]["total_pages"] == 3
    assert sum(len(p["disk_backup_policies"]) for p in pages) == 25
    assert len(disks["disk"]) == len(fleet.disk_ids_of_org(targets.organizations[0]))


def test_fake_ids_look_like_katapult_ids() -> None:
    assert fake_id("disk", "x") == fake_id("disk", "x")
    assert fake_id("disk", "x") != fake_id("disk", "y")
    assert ID_PATTERN.match(fake_id("dbp", "x"))


# ----------------------------------------------------------------------------------------- real sockets


@pytest.mark.slow
def test_fake_server_on_loopback() -> None:
    fleet, targets = demo_fleet(now=int(time.time()))
    with FakeServer(fleet) as server:
        assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/core/v1")
        assert server.fleet is fleet
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=5) as c:
            params = {"organization[id]": targets.organizations[0], "per_page": 5}
            response = c.get(ORG_POLICIES, params=params)
            no_token = {"Authorization": ""}
            unauthenticated = c.get(DISK, params={"disk[id]": targets.disks[0]}, headers=no_token)
        url = server.url
    assert response.status_code == 200
    assert len(response.json()["disk_backup_policies"]) == 5
    assert response.headers["x-ratelimit-remaining"] == "999"
    assert unauthenticated.status_code == 400
    assert fleet.stats.total == 2
    with pytest.raises(httpx.ConnectError), httpx.Client(timeout=2) as c:
        c.get(url + DISK)


@pytest.mark.slow
async def test_serve_until_cancelled() -> None:
    fleet = Fleet.generate(disks=3, now=NOW)
    ready = asyncio.Event()
    urls: list[str] = []
    task = asyncio.create_task(serve(fleet, ready=ready, on_ready=urls.append))
    await asyncio.wait_for(ready.wait(), timeout=10)
    async with httpx.AsyncClient(base_url=urls[0], headers=AUTH, timeout=5) as c:
        response = await c.get(ORG_DISKS, params={"organization[sub_domain]": "fleet-1"})
    assert [d["id"] for d in response.json()["disk"]] == list(fleet.disks)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with httpx.AsyncClient(timeout=2) as c:
        with pytest.raises(httpx.ConnectError):
            await c.get(urls[0] + DISK)


@pytest.mark.slow
def test_module_entry_point_serves_until_sigterm(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(TOML_FLEET)
    process = subprocess.Popen(
        [sys.executable, "-m", "auditor.fake", "--port", "0", "--fleet", str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        pattern = r"fake katapult listening on (http://127\.0\.0\.1:\d+/core/v1) \(token: (\S+)\)"
        match = re.fullmatch(pattern, line)
        assert match, line
        assert match.group(2) == "tok-a"
        response = httpx.get(
            match.group(1) + DISK,
            params={"disk[id]": "disk_aaaaaaaaaaaaaaaa"},
            headers={"Authorization": "Bearer tok-b"},
            timeout=5,
        )
        assert response.json()["disk"]["name"] == "system"
        assert response.headers["x-ratelimit-permitted"] == "200"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_schedules_run_on_the_clock_they_are_given() -> None:
    now = [float(NOW)]
    fleet = Fleet(schedule_clock=lambda: now[0])
    org = fleet.add_org("sched", id="org_schedschedsched0")
    disk = fleet.add_disk(org.id, "d", id="disk_schedschedsched")
    weekly = fleet.add_policy(disk.id, id="dbp_everysevendays0", interval="daily", next_invocation_at=NOW + 60,
                              frequency=7, growth=2.5)
    daily = fleet.add_policy(disk.id, id="dbp_everydayeveryday", interval="daily", next_invocation_at=NOW + 60,
                             growth=1.0, total_size=4.0)
    stuck = fleet.add_policy(disk.id, id="dbp_pausedpausedpaus", interval="hourly", next_invocation_at=NOW + 60,
                             paused=True)

    async def listed() -> dict[str, tuple[int, float]]:
        async with client_for(fleet) as c:
            body = (await c.get(DISK_POLICIES, params={"disk[id]": disk.id})).json()
        return {p["id"]: (p["schedule"]["next_invocation_at"], p["total_size"]) for p in body["disk_backup_policies"]}

    assert await listed() == {weekly.id: (NOW + 60, 0.0), daily.id: (NOW + 60, 4.0), stuck.id: (NOW + 60, 0.0)}
    now[0] = NOW + 60  # due now: it runs
    assert await listed() == {weekly.id: (NOW + 60 + 7 * 86400, 2.5), daily.id: (NOW + 60 + 86400, 5.0),
                              stuck.id: (NOW + 60, 0.0)}
    now[0] = NOW + 60 + 3 * 86400 + 5  # three more daily runs were due: each counts
    assert await listed() == {weekly.id: (NOW + 60 + 7 * 86400, 2.5), daily.id: (NOW + 60 + 4 * 86400, 8.0),
                              stuck.id: (NOW + 60, 0.0)}
    # The list items carry no frequency, as the real list endpoints.
    async with client_for(fleet) as c:
        item = (await c.get(DISK_POLICIES, params={"disk[id]": disk.id})).json()["disk_backup_policies"][0]
    assert set(item["schedule"]) == {"interval", "next_invocation_at"}
    # Without a clock nothing moves.
    fleet.schedule_clock = None
    now[0] += 30 * 86400
    assert (await listed())[daily.id] == (NOW + 60 + 4 * 86400, 8.0)


def test_fleet_file_runs_schedules_on_the_wall_clock(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(
        "run_schedules = true\n"
        "[[organizations]]\nid = 'org_x'\nsub_domain = 'x'\n"
        "[[organizations.disks]]\nid = 'disk_x'\nname = 'x'\n"
        "[[organizations.policies]]\nid = 'dbp_x'\ntarget_type = 'Disk'\ntarget_id = 'disk_x'\nretention = 7\n"
        "interval = 'daily'\nnext_in_seconds = -10\nfrequency = 2\ngrowth = 1.5\n"
    )
    fleet = Fleet.from_file(path, now=int(time.time()))
    policy = fleet.run_schedule(fleet.policies["dbp_x"])
    assert policy.frequency == 2 and policy.total_size == 1.5
    assert time.time() < policy.next_invocation_at <= time.time() + 2 * 86400
