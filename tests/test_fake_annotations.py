"""The fake Katapult's annotations: on disks and VMs, their GETs, the organization lists' filters, fleet files."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from auditor.fake import Fault, Fleet, create_app, demo_fleet
from auditor.fake.fleet import fake_id

NOW = 1_800_000_000
BASE = "http://fake/core/v1"
AUTH = {"Authorization": "Bearer fake-token"}

DISK = "/disks/disk"
VM = "/virtual_machines/virtual_machine"
ORG_DISKS = "/organizations/organization/disks"
ORG_VMS = "/organizations/organization/virtual_machines"
DISK_POLICIES = "/disks/disk/disk_backup_policies"
KEY = "annotations[][key]"
VALUE = "annotations[][value]"

Params = list[tuple[str, str | int]]


def client_for(fleet: Fleet) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(fleet)), base_url=BASE, headers=AUTH)


class Labelled:
    """One org: three VMs (two labelled) and five disks with assorted annotations."""

    def __init__(self) -> None:
        self.fleet = Fleet()
        self.org = self.fleet.add_org("acme", id="org_acmeacmeacmeacme", name="Acme Ltd")
        self.other = self.fleet.add_org("other", id="org_otherotherother1", name="Other")
        self.web = self.fleet.add_vm(
            self.org.id, "web-1.acme.example.com", id="vm_web1web1web1web1", annotations={"env": "prod", "team": "web"}
        )
        self.dev = self.fleet.add_vm(self.org.id, "dev-1.acme.example.com", annotations={"env": "dev"})
        self.plain_vm = self.fleet.add_vm(self.org.id, "plain.acme.example.com")
        self.gold = self.fleet.add_disk(
            self.org.id, "gold-1", vm_id=self.web.id, annotations={"backup-tier": "gold", "env": "prod"}
        )
        self.gold_dev = self.fleet.add_disk(
            self.org.id, "gold-dev", vm_id=self.dev.id, annotations={"backup-tier": "gold", "env": "dev"}
        )
        self.silver = self.fleet.add_disk(self.org.id, "silver", annotations={"backup-tier": "silver"})
        self.empty_value = self.fleet.add_disk(self.org.id, "empty-value", annotations={"backup-tier": ""})
        self.plain = self.fleet.add_disk(self.org.id, "plain")
        # Another organization's gold disk must never show up in acme's lists.
        self.foreign = self.fleet.add_disk(self.other.id, "foreign", annotations={"backup-tier": "gold"})


@pytest.fixture
def world() -> Labelled:
    return Labelled()


@pytest.fixture
async def client(world: Labelled) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(world.fleet) as c:
        yield c


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["x-api-schema"] == "json-error"
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    return error


async def listed(client: httpx.AsyncClient, path: str, org_id: str, *filters: tuple[str, str]) -> dict[str, Any]:
    params: Params = [("organization[id]", org_id), ("per_page", 200), *filters]
    response = await client.get(path, params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def ids_of(body: dict[str, Any], key: str) -> list[str]:
    return [item["id"] for item in body[key]]


# ----------------------------------------------------------------------------------------- single GETs


async def test_get_disk_sends_its_annotations_in_order(client: httpx.AsyncClient, world: Labelled) -> None:
    body = (await client.get(DISK, params={"disk[id]": world.gold.id})).json()
    assert body["annotations"] == [{"key": "backup-tier", "value": "gold"}, {"key": "env", "value": "prod"}]
    assert body["disk"]["id"] == world.gold.id
    assert "annotations" not in body["disk"]  # a sibling of the disk object, as the spec has it
    plain = (await client.get(DISK, params={"disk[id]": world.plain.id})).json()
    assert plain["annotations"] == []
    empty = (await client.get(DISK, params={"disk[id]": world.empty_value.id})).json()
    assert empty["annotations"] == [{"key": "backup-tier", "value": ""}]


async def test_get_vm_shape(client: httpx.AsyncClient, world: Labelled) -> None:
    response = await client.get(VM, params={"virtual_machine[id]": world.web.id})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"virtual_machine", "annotations"}
    assert body["annotations"] == [{"key": "env", "value": "prod"}, {"key": "team", "value": "web"}]
    vm = body["virtual_machine"]
    created_at = vm.pop("created_at")
    assert isinstance(created_at, int) and not isinstance(created_at, bool)
    assert vm == {
        "id": world.web.id,
        "name": "web-1",
        "hostname": "web-1",
        "fqdn": "web-1.acme.example.com",
        "description": None,
        "state": "started",
        "organization": {"id": world.org.id, "name": "Acme Ltd", "sub_domain": "acme"},
        "zone": {"id": "zone_demo", "name": "Demo Zone", "permalink": "demo-zone"},
    }
    again = (await client.get(VM, params={"virtual_machine[id]": world.web.id})).json()
    assert again["virtual_machine"]["created_at"] == created_at  # stable between answers
    plain = (await client.get(VM, params={"virtual_machine[id]": world.plain_vm.id})).json()
    assert plain["annotations"] == []


async def test_get_vm_by_fqdn(client: httpx.AsyncClient, world: Labelled) -> None:
    by_fqdn = await client.get(VM, params={"virtual_machine[fqdn]": world.dev.fqdn})
    assert by_fqdn.status_code == 200
    assert by_fqdn.json()["virtual_machine"]["id"] == world.dev.id
    assert by_fqdn.json()["annotations"] == [{"key": "env", "value": "dev"}]
    by_id = await client.get(VM, params={"virtual_machine[id]": world.dev.id})
    assert by_id.json() == by_fqdn.json()


@pytest.mark.parametrize(
    "params",
    [
        {"virtual_machine[id]": "vm_doesnotexist0000"},
        {"virtual_machine[fqdn]": "nowhere.acme.example.com"},
        {},
        {"disk[id]": "vm_web1web1web1web1"},  # the wrong family of lookup parameter
    ],
    ids=["unknown-id", "unknown-fqdn", "no-lookup", "wrong-param"],
)
async def test_get_vm_not_found(client: httpx.AsyncClient, params: dict[str, str]) -> None:
    error = assert_error(await client.get(VM, params=params), 404, "virtual_machine_not_found")
    assert error["detail"] == {}


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        (Fault.NOT_FOUND, 404, "virtual_machine_not_found"),
        (Fault.IN_TRASH, 406, "object_in_trash"),
        (Fault.UNAVAILABLE, 503, "service_unavailable"),
        (Fault.SERVER_ERROR, 500, "unhandled_exception"),
        (Fault.FORBIDDEN, 403, "permission_denied"),
    ],
)
@pytest.mark.parametrize("lookup", ["id", "fqdn"])
async def test_get_vm_error_faults(
    client: httpx.AsyncClient, world: Labelled, fault: Fault, status: int, code: str, lookup: str
) -> None:
    world.fleet.faults[world.web.id] = fault
    value = world.web.id if lookup == "id" else world.web.fqdn
    error = assert_error(await client.get(VM, params={f"virtual_machine[{lookup}]": value}), status, code)
    if fault is Fault.IN_TRASH:
        trash = error["detail"]["trash_object"]
        assert trash["object_id"] == world.web.id and trash["object_type"] == "VirtualMachine"
    # Another VM is unaffected.
    assert (await client.get(VM, params={"virtual_machine[id]": world.dev.id})).status_code == 200


async def test_get_vm_malformed_invalid_json_and_slow(client: httpx.AsyncClient, world: Labelled) -> None:
    fleet = world.fleet
    fleet.faults[world.web.id] = Fault.MALFORMED
    malformed = await client.get(VM, params={"virtual_machine[id]": world.web.id})
    assert malformed.status_code == 200
    assert "id" not in malformed.json()["virtual_machine"]
    assert malformed.json()["virtual_machine"]["fqdn"] == world.web.fqdn

    fleet.faults[world.web.id] = Fault.INVALID_JSON
    broken = await client.get(VM, params={"virtual_machine[id]": world.web.id})
    assert broken.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(broken.content)

    fleet.faults[world.web.id] = Fault.SLOW
    fleet.slow_seconds = 0.2
    started = time.monotonic()
    slow = await client.get(VM, params={"virtual_machine[id]": world.web.id})
    assert time.monotonic() - started >= 0.2
    assert slow.status_code == 200 and slow.json()["virtual_machine"]["id"] == world.web.id


async def test_vm_fault_countdown(client: httpx.AsyncClient, world: Labelled) -> None:
    world.fleet.faults[world.web.id] = Fault.UNAVAILABLE
    world.fleet.faults_remaining[world.web.id] = 1
    statuses = [(await client.get(VM, params={"virtual_machine[id]": world.web.id})).status_code for _ in range(2)]
    assert statuses == [503, 200]


# ----------------------------------------------------------------------------------------- the org VM list


async def test_org_vm_list_shape(client: httpx.AsyncClient, world: Labelled) -> None:
    response = await client.get(ORG_VMS, params={"organization[sub_domain]": "acme"})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"pagination", "virtual_machines"}
    assert body["pagination"] == {
        "current_page": 1,
        "total_pages": 1,
        "total": 3,
        "per_page": 30,
        "large_set": False,
    }
    assert ids_of(body, "virtual_machines") == [world.web.id, world.dev.id, world.plain_vm.id]
    assert body["virtual_machines"][0] == {
        "id": world.web.id,
        "name": "web-1",
        "hostname": "web-1",
        "fqdn": "web-1.acme.example.com",
        "state": "started",
        "zone": {"id": "zone_demo", "name": "Demo Zone", "permalink": "demo-zone"},
    }
    other = await listed(client, ORG_VMS, world.other.id)
    assert other["virtual_machines"] == [] and other["pagination"]["total_pages"] == 0


async def test_org_vm_list_paging() -> None:
    fleet = Fleet()
    org = fleet.add_org("paged")
    created = [fleet.add_vm(org.id, f"vm-{n}.paged.example.com").id for n in range(7)]
    async with client_for(fleet) as c:
        pages = [
            (await c.get(ORG_VMS, params={"organization[id]": org.id, "per_page": 3, "page": n})).json()
            for n in (1, 2, 3, 4)
        ]
    assert [len(p["virtual_machines"]) for p in pages] == [3, 3, 1, 0]
    assert [vm["id"] for p in pages for vm in p["virtual_machines"]] == created
    assert all(p["pagination"]["total"] == 7 and p["pagination"]["total_pages"] == 3 for p in pages)
    assert [p["pagination"]["current_page"] for p in pages] == [1, 2, 3, 4]


async def test_org_vm_list_errors_and_faults(client: httpx.AsyncClient, world: Labelled) -> None:
    missing = await client.get(ORG_VMS, params={"organization[sub_domain]": "nobody"})
    assert_error(missing, 404, "organization_not_found")
    assert_error(await client.get(ORG_VMS), 404, "organization_not_found")
    too_many = await client.get(ORG_VMS, params={"organization[id]": world.org.id, "per_page": 201})
    assert_error(too_many, 400, "invalid_argument")

    world.fleet.faults[world.org.id] = Fault.IN_TRASH
    trashed = assert_error(await client.get(ORG_VMS, params={"organization[id]": world.org.id}), 406, "object_in_trash")
    assert trashed["detail"]["trash_object"]["object_type"] == "Organization"

    world.fleet.faults[world.org.id] = Fault.MALFORMED
    body = (await client.get(ORG_VMS, params={"organization[id]": world.org.id})).json()
    first, *rest = body["virtual_machines"]
    assert "id" not in first and first["fqdn"] == world.web.fqdn
    assert all(not isinstance(item["id"], str) for item in rest)  # mistyped on the others


async def test_stats_name_the_new_routes(client: httpx.AsyncClient, world: Labelled) -> None:
    await client.get(VM, params={"virtual_machine[id]": world.web.id})
    await client.get(ORG_VMS, params={"organization[id]": world.org.id})
    await client.get(ORG_VMS, params={"organization[id]": world.org.id, "page": 2})
    assert world.fleet.stats.by_endpoint == {VM: 1, ORG_VMS: 2}


# ----------------------------------------------------------------------------------------- filters


@pytest.mark.parametrize(("path", "key"), [(ORG_DISKS, "disk"), (ORG_VMS, "virtual_machines")])
async def test_no_filter_lists_everything(client: httpx.AsyncClient, world: Labelled, path: str, key: str) -> None:
    body = await listed(client, path, world.org.id)
    expected = 5 if key == "disk" else 3
    assert body["pagination"]["total"] == len(body[key]) == expected


async def test_filter_by_key_and_value(client: httpx.AsyncClient, world: Labelled) -> None:
    body = await listed(client, ORG_DISKS, world.org.id, (KEY, "backup-tier"), (VALUE, "gold"))
    assert ids_of(body, "disk") == [world.gold.id, world.gold_dev.id]
    assert body["pagination"]["total"] == 2
    silver = await listed(client, ORG_DISKS, world.org.id, (KEY, "backup-tier"), (VALUE, "silver"))
    assert ids_of(silver, "disk") == [world.silver.id]
    # An empty value is a value like any other: only the disk whose value is "" matches it.
    empty = await listed(client, ORG_DISKS, world.org.id, (KEY, "backup-tier"), (VALUE, ""))
    assert ids_of(empty, "disk") == [world.empty_value.id]


async def test_filter_by_key_only(client: httpx.AsyncClient, world: Labelled) -> None:
    body = await listed(client, ORG_DISKS, world.org.id, (KEY, "backup-tier"))
    assert ids_of(body, "disk") == [world.gold.id, world.gold_dev.id, world.silver.id, world.empty_value.id]
    both = await listed(client, ORG_DISKS, world.org.id, (KEY, "backup-tier"), (KEY, "env"))
    assert ids_of(both, "disk") == [world.gold.id, world.gold_dev.id]


async def test_filter_pairs_are_anded(client: httpx.AsyncClient, world: Labelled) -> None:
    pairs = [(KEY, "backup-tier"), (KEY, "env"), (VALUE, "gold"), (VALUE, "dev")]
    body = await listed(client, ORG_DISKS, world.org.id, *pairs)
    assert ids_of(body, "disk") == [world.gold_dev.id]
    # Interleaved in the query string, the arrays still pair up by position.
    interleaved = [(KEY, "backup-tier"), (VALUE, "gold"), (KEY, "env"), (VALUE, "prod")]
    assert ids_of(await listed(client, ORG_DISKS, world.org.id, *interleaved), "disk") == [world.gold.id]
    # Two pairs no single disk satisfies together.
    none = await listed(client, ORG_DISKS, world.org.id, (KEY, "backup-tier"), (KEY, "env"), (VALUE, "silver"),
                        (VALUE, "prod"))
    assert none["disk"] == []


@pytest.mark.parametrize(
    "filters",
    [
        [(KEY, "no-such-key")],
        [(KEY, "no-such-key"), (VALUE, "gold")],
        [(KEY, "backup-tier"), (VALUE, "platinum")],
        [(KEY, "backup-tier"), (KEY, "no-such-key")],
    ],
    ids=["unknown-key-only", "unknown-key", "unknown-value", "one-key-unknown"],
)
@pytest.mark.parametrize(("path", "key"), [(ORG_DISKS, "disk"), (ORG_VMS, "virtual_machines")])
async def test_filter_matching_nothing_is_an_empty_list(
    client: httpx.AsyncClient, world: Labelled, path: str, key: str, filters: list[tuple[str, str]]
) -> None:
    body = await listed(client, path, world.org.id, *filters)
    assert body[key] == []
    assert body["pagination"]["total"] == 0
    assert body["pagination"]["total_pages"] == 0
    assert body["pagination"]["large_set"] is False


@pytest.mark.parametrize(
    "filters",
    [
        [(KEY, "a"), (KEY, "b"), (VALUE, "1")],
        [(KEY, "a"), (VALUE, "1"), (VALUE, "2")],
        [(VALUE, "gold")],
    ],
    ids=["more-keys", "more-values", "values-without-keys"],
)
@pytest.mark.parametrize("path", [ORG_DISKS, ORG_VMS])
async def test_filter_arrays_of_unequal_length_are_a_400(
    client: httpx.AsyncClient, world: Labelled, path: str, filters: list[tuple[str, str]]
) -> None:
    response = await client.get(path, params=[("organization[id]", world.org.id), *filters])
    error = assert_error(response, 400, "invalid_argument")
    assert error["detail"]["argument"] == {"name": "annotations"}
    assert error["detail"]["path"] == ["annotations"]
    assert error["detail"]["errors"]


async def test_filter_comes_before_paging() -> None:
    fleet = Fleet()
    org = fleet.add_org("many")
    gold = []
    for n in range(12):
        annotations = {"backup-tier": "gold"} if n % 3 == 0 else {"backup-tier": "bronze"}
        disk = fleet.add_disk(org.id, f"d{n}", annotations=annotations)
        if n % 3 == 0:
            gold.append(disk.id)
    async with client_for(fleet) as c:
        pages = []
        for page in (1, 2, 3):
            params: Params = [("organization[id]", org.id), ("per_page", 2), ("page", page), (KEY, "backup-tier"),
                              (VALUE, "gold")]
            pages.append((await c.get(ORG_DISKS, params=params)).json())
    assert [len(p["disk"]) for p in pages] == [2, 2, 0]
    assert [d["id"] for p in pages for d in p["disk"]] == gold
    assert pages[0]["pagination"]["total"] == 4 and pages[0]["pagination"]["total_pages"] == 2


async def test_filter_on_the_vm_list(client: httpx.AsyncClient, world: Labelled) -> None:
    dev = await listed(client, ORG_VMS, world.org.id, (KEY, "env"), (VALUE, "dev"))
    assert ids_of(dev, "virtual_machines") == [world.dev.id]
    assert dev["pagination"]["total"] == 1
    with_env = await listed(client, ORG_VMS, world.org.id, (KEY, "env"))
    assert ids_of(with_env, "virtual_machines") == [world.web.id, world.dev.id]
    anded = await listed(client, ORG_VMS, world.org.id, (KEY, "env"), (KEY, "team"), (VALUE, "prod"), (VALUE, "web"))
    assert ids_of(anded, "virtual_machines") == [world.web.id]


async def test_filter_params_are_ignored_elsewhere_and_others_keep_their_last_value(
    client: httpx.AsyncClient, world: Labelled
) -> None:
    # Only the organization lists filter; a lookup with a stray (even unequal) filter still answers.
    stray = await client.get(DISK, params=[("disk[id]", world.plain.id), (VALUE, "x")])
    assert stray.status_code == 200
    # Every other repeated parameter keeps its last value, as before.
    params: Params = [("organization[id]", world.org.id), ("per_page", 2), ("page", 1), ("page", 2)]
    body = (await client.get(ORG_DISKS, params=params)).json()
    assert body["pagination"]["current_page"] == 2
    assert ids_of(body, "disk") == [world.silver.id, world.empty_value.id]


async def test_filter_with_a_faulty_org_validates_first(client: httpx.AsyncClient, world: Labelled) -> None:
    world.fleet.faults[world.org.id] = Fault.UNAVAILABLE
    world.fleet.faults_remaining[world.org.id] = 1
    bad = await client.get(ORG_DISKS, params=[("organization[id]", world.org.id), (VALUE, "gold")])
    assert_error(bad, 400, "invalid_argument")
    # The 400 did not use up the fault: the next well-formed request meets it.
    faulty = await client.get(ORG_DISKS, params=[("organization[id]", world.org.id), (KEY, "env")])
    assert_error(faulty, 503, "service_unavailable")


# ----------------------------------------------------------------------------------------- list_annotations


async def test_list_items_carry_no_annotations_by_default(client: httpx.AsyncClient, world: Labelled) -> None:
    assert world.fleet.list_annotations is False
    disks = await listed(client, ORG_DISKS, world.org.id)
    assert all("annotations" not in item for item in disks["disk"])
    vms = await listed(client, ORG_VMS, world.org.id)
    assert all("annotations" not in item for item in vms["virtual_machines"])
    # Policy items keep their (empty) annotations list whatever the setting.
    world.fleet.add_policy(world.gold.id, next_invocation_at=NOW)
    policies = (await client.get(DISK_POLICIES, params={"disk[id]": world.gold.id})).json()
    assert policies["disk_backup_policies"][0]["annotations"] == []


async def test_list_annotations_adds_them_to_list_items(client: httpx.AsyncClient, world: Labelled) -> None:
    world.fleet.list_annotations = True
    disks = {item["id"]: item for item in (await listed(client, ORG_DISKS, world.org.id))["disk"]}
    assert disks[world.gold.id]["annotations"] == [
        {"key": "backup-tier", "value": "gold"},
        {"key": "env", "value": "prod"},
    ]
    assert disks[world.plain.id]["annotations"] == []
    vms = {item["id"]: item for item in (await listed(client, ORG_VMS, world.org.id))["virtual_machines"]}
    assert vms[world.dev.id]["annotations"] == [{"key": "env", "value": "dev"}]
    assert vms[world.plain_vm.id]["annotations"] == []
    # Filtered lists carry them too; GET /disks/disk is unchanged (annotations beside the disk, not in it).
    gold = await listed(client, ORG_DISKS, world.org.id, (KEY, "backup-tier"), (VALUE, "gold"))
    assert all({"key": "backup-tier", "value": "gold"} in item["annotations"] for item in gold["disk"])
    single = (await client.get(DISK, params={"disk[id]": world.gold.id})).json()
    assert "annotations" not in single["disk"] and len(single["annotations"]) == 2


# ----------------------------------------------------------------------------------------- set_annotations


async def test_set_annotations_changes_the_next_answers(client: httpx.AsyncClient, world: Labelled) -> None:
    before = await listed(client, ORG_DISKS, world.org.id, (KEY, "backup-tier"), (VALUE, "gold"))
    assert world.plain.id not in ids_of(before, "disk")
    mapping = {"backup-tier": "gold", "owner": "ops"}
    returned = world.fleet.set_annotations(world.plain.id, mapping)
    assert returned is world.plain
    mapping["owner"] = "changed later"  # the fleet keeps its own copy
    after = await listed(client, ORG_DISKS, world.org.id, (KEY, "backup-tier"), (VALUE, "gold"))
    assert ids_of(after, "disk") == [world.gold.id, world.gold_dev.id, world.plain.id]
    single = (await client.get(DISK, params={"disk[id]": world.plain.id})).json()
    assert single["annotations"] == [{"key": "backup-tier", "value": "gold"}, {"key": "owner", "value": "ops"}]
    # Replacing, not merging: the old keys go.
    world.fleet.set_annotations(world.gold.id, {})
    assert (await client.get(DISK, params={"disk[id]": world.gold.id})).json()["annotations"] == []
    world.fleet.set_annotations(world.plain_vm.id, {"env": "dev"})
    dev = await listed(client, ORG_VMS, world.org.id, (KEY, "env"), (VALUE, "dev"))
    assert ids_of(dev, "virtual_machines") == [world.dev.id, world.plain_vm.id]


def test_set_annotations_rejects_unknown_ids_and_non_strings(world: Labelled) -> None:
    with pytest.raises(ValueError, match="disk_nothere"):
        world.fleet.set_annotations("disk_nothere", {"a": "b"})
    with pytest.raises(ValueError, match="expected a string"):
        world.fleet.set_annotations(world.plain.id, {"a": 1})  # type: ignore[dict-item]
    assert world.plain.annotations == {}  # a rejected change leaves the old annotations
    with pytest.raises(ValueError, match="expected a string"):
        world.fleet.add_disk(world.org.id, "bad", annotations={"a": None})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="keys must be strings"):
        world.fleet.add_vm(world.org.id, "bad.acme.example.com", annotations={1: "x"})  # type: ignore[dict-item]


def test_builders_copy_the_annotations(world: Labelled) -> None:
    labels = {"backup-tier": "gold"}
    disk = world.fleet.add_disk(world.org.id, "copied", annotations=labels)
    vm = world.fleet.add_vm(world.org.id, "copied.acme.example.com", annotations=labels)
    labels["backup-tier"] = "bronze"
    assert disk.annotations == vm.annotations == {"backup-tier": "gold"}
    assert disk.annotations is not vm.annotations
    assert world.fleet.vm_ids_of_org(world.org.id)[-1] == vm.id


# ----------------------------------------------------------------------------------------- fleet files

FLEET_TOML = """\
list_annotations = true

[[organizations]]
id = "org_acmeacmeacmeacme"
sub_domain = "acme"

[[organizations.virtual_machines]]
id = "vm_web1web1web1web1"
fqdn = "web-1.acme.example.com"
annotations = { env = "prod", "team" = "web" }

[[organizations.virtual_machines]]
id = "vm_plainplainplain1"
fqdn = "plain.acme.example.com"

[[organizations.disks]]
id = "disk_goldgoldgoldgold"
vm = "vm_web1web1web1web1"
annotations = { "backup-tier" = "gold", env = "prod" }

[[organizations.disks]]
id = "disk_plainplainplain"
"""


def test_fleet_file_annotations(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(FLEET_TOML)
    fleet = Fleet.from_file(path)
    assert fleet.list_annotations is True
    assert fleet.vms["vm_web1web1web1web1"].annotations == {"env": "prod", "team": "web"}
    assert fleet.vms["vm_plainplainplain1"].annotations == {}
    assert list(fleet.disks["disk_goldgoldgoldgold"].annotations.items()) == [("backup-tier", "gold"), ("env", "prod")]
    assert fleet.disks["disk_plainplainplain"].annotations == {}
    as_json = tmp_path / "fleet.json"
    as_json.write_text(json.dumps({
        "organizations": [{
            "id": "org_acmeacmeacmeacme", "sub_domain": "acme",
            "virtual_machines": [{"id": "vm_web1web1web1web1", "fqdn": "w.acme", "annotations": {"env": "dev"}}],
            "disks": [{"id": "disk_goldgoldgoldgold", "annotations": {"backup-tier": "gold"}}],
        }],
    }))
    from_json = Fleet.from_file(as_json)
    assert from_json.list_annotations is False
    assert from_json.vms["vm_web1web1web1web1"].annotations == {"env": "dev"}
    assert from_json.disks["disk_goldgoldgoldgold"].annotations == {"backup-tier": "gold"}


def _org(**extra: Any) -> dict[str, Any]:
    return {"id": "org_acmeacmeacmeacme", "sub_domain": "acme", **extra}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"organizations": [_org(disks=[{"id": "disk_a", "annotations": {"backup-tier": 3}}])]},
            "organizations[0].disks[0].annotations.backup-tier: expected a string, got int",
        ),
        (
            {"organizations": [_org(disks=[{"id": "disk_a"}, {"id": "disk_b", "annotations": ["gold"]}])]},
            "organizations[0].disks[1].annotations: expected a table/object of strings, got list",
        ),
        (
            {"organizations": [_org(virtual_machines=[{"id": "vm_a", "fqdn": "a", "annotations": {"env": True}}])]},
            "organizations[0].virtual_machines[0].annotations.env: expected a string, got bool",
        ),
        (
            {"organizations": [_org(virtual_machines=[{"id": "vm_a", "fqdn": "a", "annotations": "env=dev"}])]},
            "organizations[0].virtual_machines[0].annotations: expected a table/object of strings, got str",
        ),
        (
            {"organizations": [_org(disks=[{"id": "disk_a", "annotations": {"tier": {"nested": "x"}}}])]},
            "organizations[0].disks[0].annotations.tier: expected a string, got dict",
        ),
        ({"list_annotations": "yes"}, "list_annotations: expected true or false, got str"),
        ({"list_annotation": True}, "list_annotation: unknown key"),
        (
            {"organizations": [_org(disks=[{"id": "disk_a", "labels": {}}])]},
            "organizations[0].disks[0].labels: unknown key",
        ),
    ],
    ids=["disk-value", "disk-table", "vm-value", "vm-table", "nested", "list-flag", "top-typo", "disk-typo"],
)
def test_fleet_file_annotation_errors_name_the_location(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        Fleet.from_dict(data, now=NOW)
    assert str(caught.value) == message


# ----------------------------------------------------------------------------------------- generate.annotations

GOLD = {"share": 0.25, "disk": {"backup-tier": "gold"}}
SILVER = {"share": 0.5, "disk": {"backup-tier": "silver", "owner": "ops"}}
DEV = {"share": 0.4, "vm": {"env": "dev"}}


def _counts(fleet: Fleet) -> dict[str, int]:
    counts: dict[str, int] = {}
    for obj in [*fleet.disks.values(), *fleet.vms.values()]:
        label = ",".join(f"{k}={v}" for k, v in obj.annotations.items())
        counts[label] = counts.get(label, 0) + 1
    return counts


def test_generate_annotations_shares_are_exact_and_disjoint() -> None:
    fleet = Fleet.generate(disks=200, orgs=2, vm_share=0.5, now=NOW, seed=3, annotations=[GOLD, SILVER, DEV])
    disks = list(fleet.disks.values())
    vms = list(fleet.vms.values())
    assert len(vms) == 51  # odd VMs per organization keep one disk each
    gold = [d for d in disks if d.annotations == {"backup-tier": "gold"}]
    silver = [d for d in disks if d.annotations == {"backup-tier": "silver", "owner": "ops"}]
    unlabelled = [d for d in disks if not d.annotations]
    assert (len(gold), len(silver), len(unlabelled)) == (50, 100, 50)
    dev = [vm for vm in vms if vm.annotations == {"env": "dev"}]
    assert len(dev) == round(51 * 0.4) == 20 and all(vm.annotations in ({}, {"env": "dev"}) for vm in vms)
    # The picks are spread over the fleet, not the first N objects.
    assert {d.org_id for d in gold} == set(fleet.orgs)
    assert [d.id for d in gold] != [d.id for d in disks[:50]]
    # Each object has its own dict: changing one changes no other.
    gold[0].annotations["backup-tier"] = "changed"
    assert gold[1].annotations == {"backup-tier": "gold"}


def test_generate_annotations_are_deterministic_and_leave_the_rest_alone() -> None:
    plain = Fleet.generate(disks=120, orgs=3, now=NOW, seed=7)
    first = Fleet.generate(disks=120, orgs=3, now=NOW, seed=7, annotations=[GOLD, DEV])
    second = Fleet.generate(disks=120, orgs=3, now=NOW, seed=7, annotations=[GOLD, DEV])
    other_seed = Fleet.generate(disks=120, orgs=3, now=NOW, seed=8, annotations=[GOLD, DEV])
    assert {d.id: d.annotations for d in first.disks.values()} == {d.id: d.annotations for d in second.disks.values()}
    assert {v.id: v.annotations for v in first.vms.values()} == {v.id: v.annotations for v in second.vms.values()}
    gold_ids = sorted(d.id for d in first.disks.values() if d.annotations)
    other_names = sorted(d.name for d in other_seed.disks.values() if d.annotations)
    assert other_names != sorted(first.disks[i].name for i in gold_ids)  # another seed picks others
    # Ids, sizes, attachments and policies are exactly those of the fleet generated without annotations.
    assert all(not d.annotations for d in plain.disks.values())
    assert [(d.id, d.name, d.size_in_gb, d.vm_id) for d in first.disks.values()] == [
        (d.id, d.name, d.size_in_gb, d.vm_id) for d in plain.disks.values()
    ]
    assert list(first.vms) == list(plain.vms)
    assert first.policies == plain.policies


def test_generate_without_annotations_is_unchanged() -> None:
    # Benchmarks and daemon tests depend on these exact ids.
    fleet = Fleet.generate(disks=10, orgs=2, now=NOW, seed=0)
    assert next(iter(fleet.orgs)) == fake_id("org", "gen:0:0")
    assert list(fleet.disks) == [fake_id("disk", f"gen:0:{i}") for i in range(10)]
    assert fleet.list_annotations is False
    assert Fleet.generate(disks=10, orgs=2, now=NOW, seed=0, annotations=[]).policies == fleet.policies


def test_generate_annotations_from_a_fleet_file(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(
        "list_annotations = true\n[generate]\ndisks = 40\nseed = 5\nvm_share = 0.5\n"
        'annotations = [{ share = 0.25, disk = { "backup-tier" = "gold" } }, { share = 0.4, vm = { env = "dev" } }]\n'
    )
    from_file = Fleet.from_file(path, now=NOW)
    direct = Fleet.generate(disks=40, seed=5, vm_share=0.5, now=NOW, annotations=[GOLD, DEV])
    assert from_file.list_annotations is True
    assert {d.id: d.annotations for d in from_file.disks.values()} == {
        d.id: d.annotations for d in direct.disks.values()
    }
    assert {v.id: v.annotations for v in from_file.vms.values()} == {v.id: v.annotations for v in direct.vms.values()}
    assert _counts(from_file) == {"backup-tier=gold": 10, "": 30 + 6, "env=dev": 4}


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ([{"share": 0.2}], "generate.annotations[0]: give exactly one of disk or vm"),
        ([{"share": 0.2, "disk": {}, "vm": {}}], "generate.annotations[0]: give exactly one of disk or vm"),
        ([{"disk": {"a": "b"}}], "generate.annotations[0].share: missing"),
        ([{"share": 1.5, "disk": {"a": "b"}}], "generate.annotations[0].share: must be <= 1, got 1.5"),
        ([{"share": -0.1, "disk": {"a": "b"}}], "generate.annotations[0].share: must be >= 0.0, got -0.1"),
        ([{"share": "half", "disk": {"a": "b"}}], "generate.annotations[0].share: expected a number, got str"),
        (
            [{"share": 0.7, "disk": {"a": "b"}}, {"share": 0.7, "vm": {"a": "b"}}, {"share": 0.4, "disk": {"c": "d"}}],
            "generate.annotations[2].share: the disk shares add up to 1.1, more than 1",
        ),
        ([{"share": 0.2, "disk": {"a": 1}}], "generate.annotations[0].disk.a: expected a string, got int"),
        ([{"share": 0.2, "vm": "env=dev"}], "generate.annotations[0].vm: expected a table/object of strings, got str"),
        ([{"share": 0.2, "disks": {"a": "b"}}], "generate.annotations[0].disks: unknown key"),
        (["gold"], "generate.annotations[0]: expected a table/object, got str"),
    ],
)
def test_generate_annotation_errors_name_the_location(annotations: list[Any], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        Fleet.from_dict({"generate": {"disks": 10, "annotations": annotations}}, now=NOW)
    assert str(caught.value) == message
    with pytest.raises(ValueError, match="generate.annotations"):
        Fleet.generate(disks=10, now=NOW, annotations=annotations)


def test_generate_annotations_must_be_a_list() -> None:
    with pytest.raises(ValueError, match=r"^generate\.annotations: expected a list, got dict$"):
        Fleet.from_dict({"generate": {"disks": 10, "annotations": {"share": 0.2}}}, now=NOW)


# ----------------------------------------------------------------------------------------- the demo fleet


async def test_demo_fleet_labels_a_few_objects() -> None:
    fleet, targets = demo_fleet(now=NOW)
    labelled = {obj.name: obj.annotations for obj in [*fleet.disks.values(), *fleet.vms.values()] if obj.annotations}
    assert labelled == {
        "shared-uploads": {"backup-tier": "gold"},
        "analytics-warehouse": {"backup-tier": "gold", "team": "data"},
        "web-3": {"env": "dev"},
        "web-3-system": {"env": "dev"},
    }
    assert fleet.list_annotations is False
    async with client_for(fleet) as c:
        gold = (await c.get(ORG_DISKS, params=[("organization[id]", targets.organizations[0]), (KEY, "backup-tier"),
                                               (VALUE, "gold")])).json()
        dev_vm = (await c.get(VM, params={"virtual_machine[id]": fake_id("vm", "demo:web-3")})).json()
    assert [d["name"] for d in gold["disk"]] == ["shared-uploads", "analytics-warehouse"]
    assert dev_vm["annotations"] == [{"key": "env", "value": "dev"}]
