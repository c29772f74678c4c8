"""Parsing of Katapult's real wire shapes into domain objects and typed errors."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from auditor.domain.models import Attachment, Disk, Interval, TargetType
from auditor.errors import (
    AuthError,
    InTrashError,
    InvalidRequestError,
    KatapultAPIError,
    KatapultResponseError,
    NotFoundError,
    RateLimitedError,
    UnavailableError,
)
from auditor.katapult import wire

EP = "/disks/disk/disk_backup_policies"


def policy(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "id": "dbp_abc",
        "retention": 7,
        "total_size": 12.5,
        "target": {"type": "Disk", "value": {"id": "disk_Eb8INAK4quHcSCfG", "name": "System Disk"}},
        "schedule": {"interval": "daily", "next_invocation_at": 1786800000},
    }
    raw.update(overrides)
    return raw


def page(items: list[Any], *, key: str = "disk_backup_policies", **pagination: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"current_page": 1, "total_pages": 1, "total": len(items), "per_page": 30}
    meta["large_set"] = False
    meta.update(pagination)
    return {"pagination": meta, key: items}


def parse(body: dict[str, Any]) -> wire.Page[Any]:
    return wire.parse_policy_page(body, endpoint=EP, target="disk_x", page=2)


def test_policy_as_it_really_arrives() -> None:
    result = parse(page([policy()]))
    (p,) = result.items
    assert p.id == "dbp_abc"
    assert p.retention == 7
    assert p.total_size == 12.5
    assert p.target_type is TargetType.DISK
    assert p.target_id == "disk_Eb8INAK4quHcSCfG"
    assert p.target_name == "System Disk"
    assert p.schedule.interval is Interval.DAILY
    assert p.schedule.next_invocation_at == datetime(2026, 8, 15, 13, 20, tzinfo=UTC)
    assert p.schedule.next_invocation_at.tzinfo is UTC
    assert result.pagination == wire.Pagination(current_page=1, total_pages=1, total=1, per_page=30, large_set=False)


@pytest.mark.parametrize(
    ("target", "kind", "target_id", "name"),
    [
        ({"type": "Disk", "value": {"id": "disk_1", "name": "sys"}}, TargetType.DISK, "disk_1", "sys"),
        ({"type": "VirtualMachine", "value": {"id": "vm_1"}}, TargetType.VIRTUAL_MACHINE, "vm_1", None),
        # The OpenAPI shape: the object under `target`, its kind from the id prefix.
        ({"target": {"id": "disk_2", "name": "data"}}, TargetType.DISK, "disk_2", "data"),
        ({"target": {"id": "vm_2", "fqdn": "web.example.com", "name": "web"}}, TargetType.VIRTUAL_MACHINE, "vm_2",
         "web"),
        # The object itself.
        ({"id": "disk_3"}, TargetType.DISK, "disk_3", None),
        ({"id": "vm_3", "name": "db"}, TargetType.VIRTUAL_MACHINE, "vm_3", "db"),
        # `type` decides for an id without a known prefix.
        ({"type": "VirtualMachine", "value": {"id": "server_odd"}}, TargetType.VIRTUAL_MACHINE, "server_odd", None),
        ({"type": "Disk", "value": {"id": "volume_odd"}}, TargetType.DISK, "volume_odd", None),
        ({"type": "Disk", "value": {"id": "VM_UPPER"}}, TargetType.DISK, "VM_UPPER", None),
    ],
)
def test_every_known_target_shape(target: dict[str, Any], kind: TargetType, target_id: str,
                                  name: str | None) -> None:
    (p,) = parse(page([policy(target=target)])).items
    assert (p.target_type, p.target_id, p.target_name) == (kind, target_id, name)


def test_vm_target_and_optional_fields() -> None:
    raw = policy(target={"type": "VirtualMachine", "value": {"id": "vm_1"}}, schedule={"interval": "hourly"})
    del raw["total_size"]
    (p,) = parse(page([raw])).items
    assert p.target_type is TargetType.VIRTUAL_MACHINE
    assert p.target_id == "vm_1"
    assert p.target_name is None
    assert p.total_size is None
    assert p.schedule.interval is Interval.HOURLY
    assert p.schedule.next_invocation_at is None


def test_null_next_invocation_is_none() -> None:
    (p,) = parse(page([policy(schedule={"interval": "weekly", "next_invocation_at": None})])).items
    assert p.schedule.next_invocation_at is None


def test_unknown_fields_are_ignored() -> None:
    raw = policy(annotations=[{"key": "a", "value": "b"}], surprise={"x": 1})
    raw["schedule"] = {"interval": "monthly", "next_invocation_at": 1, "frequency": 3, "time": 4, "minute": 5}
    raw["target"]["value"]["extra"] = True
    body = page([raw])
    body["annotations"] = []
    body["pagination"]["something_new"] = 1
    (p,) = parse(body).items
    assert p.schedule.interval is Interval.MONTHLY


def test_integer_total_size_becomes_float() -> None:
    (p,) = parse(page([policy(total_size=3)])).items
    assert p.total_size == 3.0 and isinstance(p.total_size, float)


@pytest.mark.parametrize(
    ("mutate", "field", "needle"),
    [
        (lambda p: p["schedule"].update(interval="fortnightly"), "schedule.interval", "fortnightly"),
        (lambda p: p["schedule"].pop("interval"), "schedule.interval", "missing"),
        (lambda p: p.update(schedule=None), "schedule", "object"),
        (lambda p: p.pop("schedule"), "schedule", "missing"),
        (lambda p: p.update(retention=True), "retention", "boolean"),
        (lambda p: p.update(retention="7"), "retention", "string"),
        (lambda p: p.update(retention=7.5), "retention", "integer"),
        (lambda p: p.pop("id"), "id", "missing"),
        (lambda p: p.update(id=""), "id", "non-empty"),
        (lambda p: p.update(total_size=False), "total_size", "boolean"),
        (lambda p: p.update(target={"target": {"id": "bucket_1"}}), "target.target.id", "bucket_1"),
        (lambda p: p.update(target={"target": "disk_1"}), "target.target", "object"),
        (lambda p: p.update(target={"target": {"name": "web"}}), "target.target.id", "missing"),
        (lambda p: p.update(target={"id": "volume_1", "name": "x"}), "target.id", "neither a disk"),
        (lambda p: p.update(target={}), "target.id", "missing"),
        (lambda p: p.update(target={"type": "Disk"}), "target.value", "missing"),
        (lambda p: p.update(target={"value": {"id": "disk_1"}}), "target.type", "missing"),
        (lambda p: p.update(target=None), "target", "object"),
        (lambda p: p.update(target=["disk_1"]), "target", "object"),
        (lambda p: p["target"].update(type="Bucket"), "target.type", "Bucket"),
        (lambda p: p["target"].pop("value"), "target.value", "missing"),
        (lambda p: p["target"]["value"].pop("id"), "target.value.id", "missing"),
        (lambda p: p["target"]["value"].update(name=5), "target.value.name", "number"),
        # A `type` its id's known prefix contradicts: malformed, never a target that covers nothing.
        (lambda p: p.update(target={"type": "VirtualMachine", "value": {"id": "disk_1"}}), "target.value.id",
         "'disk_1' is a disk (disk_…), but the target's type is 'VirtualMachine'"),
        (lambda p: p.update(target={"type": "Disk", "value": {"id": "vm_1", "name": "web"}}), "target.value.id",
         "'vm_1' is a virtual machine (vm_…), but the target's type is 'Disk'"),
        (
            lambda p: p["schedule"].update(next_invocation_at="2026-01-01T00:00:00Z"),
            "schedule.next_invocation_at",
            "string",
        ),
        (lambda p: p["schedule"].update(next_invocation_at=True), "schedule.next_invocation_at", "boolean"),
        (lambda p: p["schedule"].update(next_invocation_at=1.5), "schedule.next_invocation_at", "integer"),
        (lambda p: p["schedule"].update(next_invocation_at=10**20), "schedule.next_invocation_at", "range"),
    ],
)
def test_malformed_policy_names_the_field(mutate: Any, field: str, needle: str) -> None:
    items = [policy(id=f"dbp_{i}") for i in range(5)]
    mutate(items[3])
    with pytest.raises(KatapultResponseError) as info:
        parse(page(items))
    err = info.value
    assert err.field == f"disk_backup_policies[3].{field}"
    assert err.endpoint == EP
    assert err.target == "disk_x"
    assert err.code == "malformed_response"
    assert err.permanent
    message = str(err)
    assert f"disk_backup_policies[3].{field}" in message
    assert EP in message and "disk_x" in message and "page 2" in message
    assert needle in message


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"disk_backup_policies": []}, "pagination"),
        ({"pagination": [], "disk_backup_policies": []}, "pagination"),
        (page([], total_pages="1"), "pagination.total_pages"),
        (page([], total_pages=-1), "pagination.total_pages"),
        (page([], per_page=0), "pagination.per_page"),
        (page([], large_set="no"), "pagination.large_set"),
        ({"pagination": page([])["pagination"]}, "disk_backup_policies"),
        ({"pagination": page([])["pagination"], "disk_backup_policies": {}}, "disk_backup_policies"),
        (page(["dbp_1"]), "disk_backup_policies[0]"),
    ],
)
def test_malformed_page(body: dict[str, Any], field: str) -> None:
    with pytest.raises(KatapultResponseError) as info:
        parse(body)
    assert info.value.field == field


def test_large_set_pagination() -> None:
    result = parse(page([], total_pages=None, total=None, large_set=True))
    assert result.pagination.large_set is True
    assert result.pagination.total_pages is None and result.pagination.total is None


def test_empty_list_has_zero_pages() -> None:
    result = parse(page([], total_pages=0, total=0))
    assert result.items == []
    assert result.pagination.total_pages == 0


ORG_DISK = {
    "id": "disk_a",
    "name": "web-system",
    "size_in_gb": 20,
    "wwn": "abc",
    "state": "built",
    "virtual_machine_disk": {"virtual_machine": {"id": "vm_1", "fqdn": "web.example.com", "name": "web"}},
}


def test_org_disks_use_the_singular_key_and_tie_disks_to_vms() -> None:
    loose = dict(ORG_DISK, id="disk_b", virtual_machine_disk=None)
    bare = {"id": "disk_c"}
    result = wire.parse_disk_page(
        page([ORG_DISK, loose, bare], key="disk"), endpoint="/organizations/organization/disks", target="org_1"
    )
    assert result.items == [
        Disk(id="disk_a", name="web-system", vm_id="vm_1", vm_fqdn="web.example.com", state="built", size_in_gb=20),
        Disk(id="disk_b", name="web-system", state="built", size_in_gb=20),
        Disk(id="disk_c"),
    ]


def test_the_disk_lookup_carries_the_attachment_and_org_list_items_do_not() -> None:
    attached = dict(ORG_DISK, virtual_machine_disk={"virtual_machine": {"id": "vm_1", "fqdn": "web.example.com"},
                                                   "attach_on_boot": False, "boot": False, "state": "detached"})
    disk = wire.parse_disk_response({"disk": attached, "annotations": []}, endpoint="/disks/disk", target="disk_a")
    assert disk.vm_id == "vm_1" and disk.attachment == Attachment("detached", False)
    assert disk.attachment is not None and not disk.attachment.is_attached
    (listed,) = wire.parse_disk_page(page([ORG_DISK], key="disk"), endpoint="/o", target="org_1").items
    assert listed.vm_id == "vm_1" and listed.attachment is None  # not known, never assumed


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda d: d["virtual_machine_disk"].update(state=1), "disk.virtual_machine_disk.state"),
    (lambda d: d["virtual_machine_disk"].update(attach_on_boot="yes"), "disk.virtual_machine_disk.attach_on_boot"),
])
def test_a_malformed_attachment_names_the_field(mutate: Any, field: str) -> None:
    raw = dict(ORG_DISK, virtual_machine_disk={"virtual_machine": {"id": "vm_1"}, "state": "attached"})
    mutate(raw)
    with pytest.raises(KatapultResponseError) as info:
        wire.parse_disk_response({"disk": raw}, endpoint="/disks/disk", target="disk_a")
    assert info.value.field == field


def test_vm_disk_page_and_its_malformed_items() -> None:
    items = [{"disk": {"id": "disk_a", "name": "x"}, "attach_on_boot": True, "boot": True, "state": "attached"},
             {"disk": {"id": "disk_b"}, "state": "detached"}, {"disk": {"id": "disk_c"}}]
    result = wire.parse_vm_disk_page(page(items, key="disks"), endpoint="/v", target="vm_1")
    assert result.items == [("disk_a", Attachment("attached", True)), ("disk_b", Attachment("detached")),
                            ("disk_c", None)]
    for bad, field in (([{"disk": None}], "disks[0].disk"), ([{"disk": {}}], "disks[0].disk.id"),
                       ([{"disk": {"id": "disk_a"}, "state": 3}], "disks[0].state")):
        with pytest.raises(KatapultResponseError) as info:
            wire.parse_vm_disk_page(page(bad, key="disks"), endpoint="/v", target="vm_1")
        assert info.value.field == field


def test_organizations_parse_and_malformed() -> None:
    body = {"organizations": [{"id": "org_a", "sub_domain": "a", "name": "A"}, {"id": "org_b"}]}
    assert wire.parse_organizations(body, endpoint="/organizations") == [("org_a", "a"), ("org_b", None)]
    for bad, field in (({}, "organizations"), ({"organizations": {}}, "organizations"),
                       ({"organizations": [{"name": "x"}]}, "organizations[0].id")):
        with pytest.raises(KatapultResponseError) as info:
            wire.parse_organizations(bad, endpoint="/organizations")
        assert info.value.field == field


def test_org_disks_under_the_plural_key_are_rejected() -> None:
    with pytest.raises(KatapultResponseError) as info:
        wire.parse_disk_page(page([ORG_DISK], key="disks"), endpoint="/organizations/organization/disks", target="o")
    assert info.value.field == "disk"


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(virtual_machine_disk={}), "disk[1].virtual_machine_disk.virtual_machine"),
        (
            lambda d: d["virtual_machine_disk"]["virtual_machine"].pop("id"),
            "disk[1].virtual_machine_disk.virtual_machine.id",
        ),
        (lambda d: d.update(size_in_gb=True), "disk[1].size_in_gb"),
        (lambda d: d.update(virtual_machine_disk="vm_1"), "disk[1].virtual_machine_disk"),
    ],
)
def test_malformed_org_disk(mutate: Any, field: str) -> None:
    items = [copy.deepcopy(ORG_DISK), copy.deepcopy(ORG_DISK)]
    mutate(items[1])
    with pytest.raises(KatapultResponseError) as info:
        wire.parse_disk_page(page(items, key="disk"), endpoint="/organizations/organization/disks", target="org_1")
    assert info.value.field == field
    assert info.value.target == "org_1"


def test_single_disk_response() -> None:
    body = {"disk": dict(ORG_DISK, created_at=1, storage_speed="ssd"), "annotations": []}
    disk = wire.parse_disk_response(body, endpoint="/disks/disk", target="disk_a")
    assert disk.id == "disk_a" and disk.vm_id == "vm_1" and disk.vm_fqdn == "web.example.com"
    with pytest.raises(KatapultResponseError) as info:
        wire.parse_disk_response({"disks": {}}, endpoint="/disks/disk", target="disk_a")
    assert info.value.field == "disk"


@pytest.mark.parametrize("content", [b"not json", b"\xff\xfe", b"[1, 2]", b"null", b""])
def test_decode_json_rejects_non_objects(content: bytes) -> None:
    with pytest.raises(KatapultResponseError) as info:
        wire.decode_json(content, endpoint=EP, target="disk_x")
    assert info.value.endpoint == EP and info.value.target == "disk_x"
    assert info.value.status_code == 200


def error_body(code: str, detail: dict[str, Any] | None = None, description: str = "Something") -> bytes:
    return json.dumps({"error": {"code": code, "description": description, "detail": detail or {}}}).encode()


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (404, "disk_not_found", NotFoundError),
        (404, "organization_not_found", NotFoundError),
        (404, "virtual_machine_not_found", NotFoundError),
        (404, "route_not_found", NotFoundError),
        (406, "object_in_trash", InTrashError),
        (403, "invalid_api_token", AuthError),
        (403, "scope_not_granted", AuthError),
        (403, "permission_denied", AuthError),
        (403, "unauthorized_network_for_api_token", AuthError),
        (400, "missing_api_token", AuthError),
        (400, "invalid_argument", InvalidRequestError),
        (429, "rate_limit_reached", RateLimitedError),
        (500, "unhandled_exception", UnavailableError),
        (503, "service_unavailable", UnavailableError),
        (502, "bad_gateway", UnavailableError),
        (409, "conflict", KatapultAPIError),
    ],
)
def test_error_mapping(status: int, code: str, cls: type[KatapultAPIError]) -> None:
    err = wire.api_error(status, error_body(code, {"k": "v"}), endpoint=EP, target="disk_x")
    assert type(err) is cls
    assert err.code == code
    assert err.status_code == status
    assert err.target == "disk_x" and err.endpoint == EP
    assert err.detail == {"k": "v"}
    assert err.permanent is (status < 429 or status == 409)
    assert code in str(err) and "disk_x" in str(err)


def test_in_trash_keeps_detail() -> None:
    detail = {"trash_object": {"id": "trsh_1", "keep_until": 1786800000, "object_id": "disk_x"}}
    err = wire.api_error(406, error_body("object_in_trash", detail), endpoint=EP, target="disk_x")
    assert isinstance(err, InTrashError)
    assert err.detail == detail


def test_rate_limited_carries_retry_after_and_total_permitted() -> None:
    err = wire.api_error(
        429, error_body("rate_limit_reached", {"total_permitted": 200}), endpoint=EP, target="d", retry_after=3.0
    )
    assert isinstance(err, RateLimitedError)
    assert err.retry_after == 3.0
    assert wire.total_permitted(err.detail) == 200
    assert wire.total_permitted({"total_permitted": True}) is None
    assert wire.total_permitted({"total_permitted": "200"}) is None
    assert wire.total_permitted({}) is None


@pytest.mark.parametrize(
    ("status", "content", "cls"),
    [
        (502, b"<html>Bad Gateway</html>", UnavailableError),
        (503, b"", UnavailableError),
        (404, b'{"code": "disk_not_found"}', NotFoundError),
        (403, b'{"error": "nope"}', AuthError),
        (400, b'{"error": {"description": "no code"}}', InvalidRequestError),
    ],
)
def test_unwrapped_error_bodies_map_by_status(status: int, content: bytes, cls: type[KatapultAPIError]) -> None:
    err = wire.api_error(status, content, endpoint=EP, target="disk_x")
    assert type(err) is cls
    assert err.code == f"http_{status}"
    assert err.detail == {}


def test_long_descriptions_are_cut() -> None:
    err = wire.api_error(500, error_body("unhandled_exception", description="x" * 5000), endpoint=EP, target="d")
    assert len(str(err)) < 500
