"""The fake Katapult Core API v1 as a plain ASGI app (no framework: benchmarks push it hard)."""

from __future__ import annotations

import asyncio
import contextvars
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from auditor.fake.fleet import INTERVAL_SECONDS, FakeDisk, FakePolicy, FakeVM, Fault, Fleet, fake_id

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PREFIX = "/core/v1"
# README "Pagination": per_page defaults to 30 and may not exceed 200; more than 1,000 rows is a "large set".
DEFAULT_PER_PAGE = 30
MAX_PER_PAGE = 200
LARGE_SET_ROWS = 1000
# How long a trashed object is kept, for the object_in_trash detail.
TRASH_KEEP_SECONDS = 7 * 86400
# The annotation filters of the organization lists: repeatable, so every value is kept (README "Annotations").
ANNOTATION_KEY_PARAM = "annotations[][key]"
ANNOTATION_VALUE_PARAM = "annotations[][value]"
_REPEATED_PARAMS = (ANNOTATION_KEY_PARAM, ANNOTATION_VALUE_PARAM)
# Where every fake VM lives (GET /virtual_machines/virtual_machine and the organization's VM list).
_ZONE = {"id": "zone_demo", "name": "Demo Zone", "permalink": "demo-zone"}
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no", ""})
# The fleet a request started with: a fleet swapped in mid-request (SIGHUP reload) is seen from the next one on,
# so no request reads half of each.
_REQUEST_FLEET: contextvars.ContextVar[Fleet | None] = contextvars.ContextVar("fake_katapult_fleet", default=None)

_JSON_TYPE = (b"content-type", b"application/json")
_ERROR_SCHEMA = (b"x-api-schema", b"json-error")


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class _Reply:
    """One response: status, body and whether it is a wrapped error."""

    status: int
    body: bytes
    is_error: bool = False


def _error(status: int, code: str, description: str, detail: dict[str, Any] | None = None) -> _Reply:
    """Returns a wrapped Katapult error (README "Errors": always `{"error": {...}}` plus X-Api-Schema)."""
    payload = {"error": {"code": code, "description": description, "detail": detail or {}}}
    return _Reply(status, _dumps(payload), is_error=True)


@dataclass(frozen=True, slots=True)
class _Kind:
    """What a lookup finds: its query parameter family, 404 code, trash type and description noun."""

    param: str
    not_found: str
    object_type: str
    noun: str


_DISK = _Kind("disk", "disk_not_found", "Disk", "disk")
_ORG = _Kind("organization", "organization_not_found", "Organization", "organization")
_VM = _Kind("virtual_machine", "virtual_machine_not_found", "VirtualMachine", "virtual machine")


def _not_found(kind: _Kind) -> _Reply:
    return _error(
        404,
        kind.not_found,
        f"No {kind.noun} was found matching any of the criteria provided in the arguments",
    )


def _invalid_argument(name: str, issue: str, errors: list[str]) -> _Reply:
    detail = {"argument": {"name": name}, "index": None, "path": [name], "issue": issue, "errors": errors}
    return _error(400, "invalid_argument", f"The '{name}' argument is invalid", detail)


def _fault_reply(fault: Fault, kind: _Kind, object_id: str) -> _Reply:
    """Returns the error answer for a fault (MALFORMED, INVALID_JSON and SLOW are handled by the caller)."""
    if fault is Fault.NOT_FOUND:
        return _not_found(kind)
    if fault is Fault.IN_TRASH:
        trash = {
            "id": fake_id("trsh", object_id),
            "keep_until": int(time.time()) + TRASH_KEEP_SECONDS,
            "object_id": object_id,
            "object_type": kind.object_type,
        }
        return _error(
            406,
            "object_in_trash",
            "The object found is in the trash and therefore cannot be manipulated through the API. "
            "It should be restored in order to run this operation.",
            {"trash_object": trash},
        )
    if fault is Fault.UNAVAILABLE:
        description = "The service is currently unavailable, please try again later"
        return _error(503, "service_unavailable", description)
    if fault is Fault.SERVER_ERROR:
        return _error(500, "unhandled_exception", "An internal error occurred while processing this request")
    return _error(
        403,
        "permission_denied",
        "The authenticated identity is not permitted to perform this action",
        {"details": f"No access to {kind.noun} {object_id}"},
    )


# A 200 whose body is cut off mid-document: valid UTF-8, not JSON.
_INVALID_JSON = _Reply(200, b'{"pagination":{"current_page":1,"total_pages":')


@dataclass(slots=True)
class _Lookup:
    """A resolved lookup: the object id or the reply ending the request, and whether to malform the body."""

    object_id: str = ""
    reply: _Reply | None = None
    malformed: bool = False


@dataclass(frozen=True, slots=True)
class _Query:
    """A request's query: the last value of each parameter, and every value of the repeatable ones."""

    params: dict[str, str]
    repeated: dict[str, list[str]]


# An annotation filter: (key, required value), or (key, None) for "the key with any value".
_AnnotationFilter = list[tuple[str, str | None]]

Handler = Callable[[_Query, int, int], Awaitable[_Reply]]
WriteHandler = Callable[[dict[str, Any]], Awaitable[_Reply]]


class FakeKatapult:
    """ASGI app answering the Katapult Core API v1 endpoints the auditor uses, from a mutable `Fleet`."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._routes: dict[str, tuple[str, Handler]] = {
            PREFIX + path: (path, handler)
            for path, handler in (
                ("/disks/disk/disk_backup_policies", self._disk_policies),
                ("/organizations/organization/disk_backup_policies", self._org_policies),
                ("/virtual_machines/virtual_machine/disk_backup_policies", self._vm_policies),
                ("/organizations/organization/disks", self._org_disks),
                ("/disks/disk", self._disk),
                ("/organizations/organization/virtual_machines", self._org_vms),
                ("/virtual_machines/virtual_machine", self._vm),
                ("/virtual_machines/virtual_machine/disks", self._vm_disks),
                ("/organizations", self._organizations),
            )
        }
        # README "Writing policies": the three write endpoints, with a JSON body.
        self._writes: dict[tuple[str, str], tuple[str, WriteHandler]] = {
            (method, PREFIX + path): (f"{method} {path}", handler)
            for method, path, handler in (
                ("POST", "/disks/disk/disk_backup_policies", self._create_on_disk),
                ("POST", "/virtual_machines/virtual_machine/disk_backup_policies", self._create_on_vm),
                ("PATCH", "/disk_backup_policies/disk_backup_policy", self._patch_policy),
            )
        }

    @property
    def _fleet(self) -> Fleet:
        """Returns the fleet of the request being served (the current one outside a request)."""
        pinned = _REQUEST_FLEET.get()
        return self.fleet if pinned is None else pinned

    def replace_fleet(self, fleet: Fleet) -> None:
        """Serves `fleet` from the next request on, keeping the request counters (rate windows start afresh)."""
        fleet.stats = self.fleet.stats
        self.fleet = fleet

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serves one ASGI connection scope."""
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        fleet = self.fleet
        pinned = _REQUEST_FLEET.set(fleet)
        try:
            await self._serve(fleet, scope, send, receive)
        finally:
            _REQUEST_FLEET.reset(pinned)

    async def _serve(self, fleet: Fleet, scope: Scope, send: Send, receive: Receive) -> None:
        """Answers one HTTP request from `fleet`."""
        stats = fleet.stats
        permitted = fleet.permitted_now()
        stats.total += 1
        if fleet.latency > 0:
            await asyncio.sleep(fleet.latency)
        token = _bearer_token(scope)
        route: tuple[str, Handler] | None = None
        if scope["method"] == "GET":
            route = self._routes.get(scope["path"])
        else:
            write = self._writes.get((scope["method"], scope["path"]))
            if write is not None:
                body = await _read_body(receive)
                name, write_handler = write
                route = (name, self._write_handler(write_handler, body, token))
        remaining: int | None = None
        extra: list[tuple[bytes, bytes]] = []
        if route is None:
            stats.by_endpoint["(unknown)"] = stats.by_endpoint.get("(unknown)", 0) + 1
            description = f"No route matches '{scope['path']}' for {scope['method']}"
            reply = _error(404, "route_not_found", description)
        else:
            name, handler = route
            stats.by_endpoint[name] = stats.by_endpoint.get(name, 0) + 1
            if token is None:
                reply = _error(
                    400,
                    "missing_api_token",
                    "No API token was provided in the Authorization header. "
                    "Ensure a token is provided prefixed with Bearer",
                )
            elif token not in fleet.tokens and token not in fleet.write_tokens:
                reply = _error(
                    403,
                    "invalid_api_token",
                    "The API token provided was not valid (it may not exist or have expired)",
                    {"details": "No API token matches the one provided"},
                )
            else:
                admitted, remaining = fleet.admit(token, permitted=permitted)
                if not admitted:
                    stats.rate_limited += 1
                    reply = _error(
                        429,
                        "rate_limit_reached",
                        "You have reached the rate limit for this type of request",
                        {"total_permitted": permitted},
                    )
                    if fleet.retry_after is not None:
                        extra.append((b"retry-after", f"{fleet.retry_after:g}".encode()))
                else:
                    reply = await self._dispatch(handler, scope)
        if remaining is None:
            remaining = fleet.remaining(token, permitted=permitted)
        stats.by_status[reply.status] = stats.by_status.get(reply.status, 0) + 1
        headers = [
            _JSON_TYPE,
            (b"content-length", str(len(reply.body)).encode()),
            (b"x-ratelimit-permitted", str(permitted).encode()),
            (b"x-ratelimit-remaining", str(remaining).encode()),
            *extra,
        ]
        if reply.is_error:
            headers.append(_ERROR_SCHEMA)
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})

    async def _dispatch(self, handler: Handler, scope: Scope) -> _Reply:
        """Parses the query and paging arguments, then runs the endpoint."""
        pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        params = dict(pairs)
        repeated = {name: [value for key, value in pairs if key == name] for name in _REPEATED_PARAMS}
        page = _positive_int(params, "page", default=1)
        if isinstance(page, _Reply):
            return page
        per_page = _positive_int(params, "per_page", default=DEFAULT_PER_PAGE)
        if isinstance(per_page, _Reply):
            return per_page
        if per_page > MAX_PER_PAGE:
            return _invalid_argument("per_page", "validation_errors", [f"must be at most {MAX_PER_PAGE}"])
        return await handler(_Query(params, repeated), page, per_page)

    async def _lookup(self, kind: _Kind, object_id: str | None) -> _Lookup:
        """Applies the fault of the looked-up object (if any) and checks it exists."""
        fleet = self._fleet
        if object_id is None:
            return _Lookup(reply=_not_found(kind))
        fault = fleet.take_fault(object_id)
        if fault is Fault.SLOW:
            await asyncio.sleep(fleet.slow_seconds)
            fault = None
        elif fault is Fault.INVALID_JSON:
            return _Lookup(reply=_INVALID_JSON)
        elif fault is not None and fault is not Fault.MALFORMED:
            return _Lookup(reply=_fault_reply(fault, kind, object_id))
        if not self._exists(kind, object_id):
            return _Lookup(reply=_not_found(kind))
        return _Lookup(object_id=object_id, malformed=fault is Fault.MALFORMED)

    def _exists(self, kind: _Kind, object_id: str) -> bool:
        fleet = self._fleet
        if kind is _DISK:
            return object_id in fleet.disks
        if kind is _ORG:
            org = fleet.orgs.get(object_id)
            return org is not None and org.visible
        return object_id in fleet.vms

    def _org_id(self, params: dict[str, str]) -> str | None:
        org_id = params.get("organization[id]")
        if org_id is not None:
            return org_id
        sub_domain = params.get("organization[sub_domain]")
        if sub_domain is None:
            return None
        org = self._fleet.org_by_sub_domain(sub_domain)
        # An unknown sub-domain still has to 404: look up an id no organization has.
        return org.id if org is not None else ""

    def _vm_id(self, params: dict[str, str]) -> str | None:
        vm_id = params.get("virtual_machine[id]")
        if vm_id is None and "virtual_machine[fqdn]" in params:
            vm = self._fleet.vm_by_fqdn(params["virtual_machine[fqdn]"])
            # An unknown FQDN still has to 404: look up an id no VM has.
            vm_id = vm.id if vm is not None else ""
        return vm_id

    # ----------------------------------------------------------------- endpoints

    async def _disk_policies(self, query: _Query, page: int, per_page: int) -> _Reply:
        # README: without disk[id] the API looks up a disk literally named "disk", which is a 404.
        found = await self._lookup(_DISK, query.params.get("disk[id]"))
        if found.reply is not None:
            return found.reply
        ids = self._fleet.policy_ids_of_disk(found.object_id)
        return self._policy_page(ids, page, per_page, malformed=found.malformed)

    async def _org_policies(self, query: _Query, page: int, per_page: int) -> _Reply:
        found = await self._lookup(_ORG, self._org_id(query.params))
        if found.reply is not None:
            return found.reply
        ids = self._fleet.policy_ids_of_org(found.object_id)
        return self._policy_page(ids, page, per_page, malformed=found.malformed)

    async def _vm_policies(self, query: _Query, page: int, per_page: int) -> _Reply:
        include = query.params.get("include_disks", "").lower()
        if include not in _TRUE and include not in _FALSE:
            return _invalid_argument("include_disks", "invalid_scalar", ["must be true or false"])
        found = await self._lookup(_VM, self._vm_id(query.params))
        if found.reply is not None:
            return found.reply
        ids = self._fleet.policy_ids_of_vm(found.object_id, include_disks=include in _TRUE)
        return self._policy_page(ids, page, per_page, malformed=found.malformed)

    async def _org_disks(self, query: _Query, page: int, per_page: int) -> _Reply:
        fleet = self._fleet
        return await self._org_list(query, page, per_page, "disk", fleet.disk_ids_of_org, fleet.disks,
                                    lambda disk: self._disk_item(disk, full=False))

    async def _org_list(self, query: _Query, page: int, per_page: int, key: str,
                        ids_of: Callable[[str], list[str]], objects: Mapping[str, Any],
                        item: Callable[[Any], dict[str, Any]]) -> _Reply:
        """An organization's disks or VMs: annotation filters, then paging (README "Annotations")."""
        wanted = _annotation_filter(query)
        if isinstance(wanted, _Reply):
            return wanted
        found = await self._lookup(_ORG, self._org_id(query.params))
        if found.reply is not None:
            return found.reply
        ids = ids_of(found.object_id)
        if wanted:
            ids = [object_id for object_id in ids if _matches(objects[object_id].annotations, wanted)]
        chunk, pagination = _paginate(ids, page, per_page)
        items = [item(objects[object_id]) for object_id in chunk]
        if found.malformed:
            return _Reply(200, _dumps(_malform(items, key, pagination, field="id")))
        return _Reply(200, _dumps({"pagination": pagination, key: items}))

    async def _disk(self, query: _Query, page: int, per_page: int) -> _Reply:
        found = await self._lookup(_DISK, query.params.get("disk[id]"))
        if found.reply is not None:
            return found.reply
        disk = self._fleet.disks[found.object_id]
        item = self._disk_item(disk, full=True)
        if found.malformed:
            del item["id"]
        return _Reply(200, _dumps({"disk": item, "annotations": _key_values(disk.annotations)}))

    async def _org_vms(self, query: _Query, page: int, per_page: int) -> _Reply:
        fleet = self._fleet
        return await self._org_list(query, page, per_page, "virtual_machines", fleet.vm_ids_of_org, fleet.vms,
                                    lambda vm: self._vm_item(vm, full=False))

    async def _vm(self, query: _Query, page: int, per_page: int) -> _Reply:
        found = await self._lookup(_VM, self._vm_id(query.params))
        if found.reply is not None:
            return found.reply
        vm = self._fleet.vms[found.object_id]
        item = self._vm_item(vm, full=True)
        if found.malformed:
            del item["id"]
        return _Reply(200, _dumps({"virtual_machine": item, "annotations": _key_values(vm.annotations)}))

    async def _vm_disks(self, query: _Query, page: int, per_page: int) -> _Reply:
        # README: a VM's disks, paginated under `disks`: {"disk": {...}, "attach_on_boot", "boot", "state"}.
        found = await self._lookup(_VM, self._vm_id(query.params))
        if found.reply is not None:
            return found.reply
        disks = self._fleet.disks
        chunk, pagination = _paginate(self._fleet.disk_ids_of_vm(found.object_id), page, per_page)
        items = [self._vm_disk_item(disks[disk_id]) for disk_id in chunk]
        if found.malformed:
            return _Reply(200, _dumps(_malform(items, "disks", pagination, field="state")))
        return _Reply(200, _dumps({"pagination": pagination, "disks": items}))

    async def _organizations(self, query: _Query, page: int, per_page: int) -> _Reply:
        # README: GET /organizations lists what the token can see, under `organizations`, not paginated.
        items = [{"id": org.id, "name": org.name, "sub_domain": org.sub_domain, "personal": False,
                  "created_at": _created_at(org.id), "suspended": False, "managed": False}
                 for org in self._fleet.visible_orgs()]
        return _Reply(200, _dumps({"organizations": items}))

    # ----------------------------------------------------------------- writes

    def _write_handler(self, handler: WriteHandler, raw: bytes, token: str | None) -> Handler:
        """Returns a handler that checks the token's write scope and the JSON body, then runs `handler`."""

        async def run(query: _Query, page: int, per_page: int) -> _Reply:
            if token not in self._fleet.write_tokens:
                # README: a token without the disk_backup_policies write scope is 403 scope_not_granted.
                return _error(403, "scope_not_granted", "The API token does not have the scope required for this "
                              "action", {"scopes": ["disk_backup_policies"]})
            try:
                body = json.loads(raw or b"null")
            except ValueError:
                return _invalid_argument("body", "invalid_json", ["the request body is not JSON"])
            if not isinstance(body, dict):
                return _invalid_argument("body", "invalid_json", ["the request body must be a JSON object"])
            return await handler(body)

        return run

    async def _create_on_disk(self, body: dict[str, Any]) -> _Reply:
        return await self._create(body, "disk", _DISK, "Disk")

    async def _create_on_vm(self, body: dict[str, Any]) -> _Reply:
        return await self._create(body, "virtual_machine", _VM, "VirtualMachine")

    async def _create(self, body: dict[str, Any], key: str, kind: _Kind, target_type: str) -> _Reply:
        ref = body.get(key)
        found = await self._lookup(kind, ref.get("id") if isinstance(ref, dict) else None)
        if found.reply is not None:
            return found.reply
        properties = body.get("properties")
        errors = _policy_errors(properties, partial=False)
        if errors:
            return _validation_error(errors)
        assert isinstance(properties, dict)
        schedule = properties["schedule"]
        policy = self._fleet.add_policy(
            found.object_id, target_type=target_type, retention=properties["retention"],
            interval=schedule["interval"],
            next_invocation_at=int(time.time()) + INTERVAL_SECONDS[schedule["interval"]],
        )
        return _Reply(200, _dumps({"disk_backup_policy": self._policy_item(policy)}))

    async def _patch_policy(self, body: dict[str, Any]) -> _Reply:
        ref = body.get("disk_backup_policy")
        policy_id = ref.get("id") if isinstance(ref, dict) else None
        fleet = self._fleet
        if not isinstance(policy_id, str) or policy_id not in fleet.policies:
            return _error(404, "disk_backup_policy_not_found",
                          "No disk backup policy was found matching any of the criteria provided in the arguments")
        policy = fleet.policies[policy_id]
        kind = _DISK if policy.target_type == "Disk" else _VM
        found = await self._lookup(kind, policy.target_id)
        if found.reply is not None:
            return found.reply
        properties = body.get("properties")
        errors = _policy_errors(properties, partial=True)
        if errors:
            return _validation_error(errors)
        assert isinstance(properties, dict)
        changes: dict[str, Any] = {}
        if "retention" in properties:
            changes["retention"] = properties["retention"]
        if "schedule" in properties:
            changes["interval"] = properties["schedule"]["interval"]
        fleet.update_policy(policy_id, **changes)
        # README: a PATCH answers `schedule` as {}.
        return _Reply(200, _dumps({"disk_backup_policy": {**self._policy_item(policy), "schedule": {}}}))

    # ----------------------------------------------------------------- wire shapes

    def _policy_page(self, ids: list[str], page: int, per_page: int, *, malformed: bool) -> _Reply:
        chunk, pagination = _paginate(ids, page, per_page)
        fleet = self._fleet
        items = [self._policy_item(fleet.run_schedule(fleet.policies[policy_id])) for policy_id in chunk]
        if malformed:
            return _Reply(200, _dumps(_malform(items, "disk_backup_policies", pagination, field="retention")))
        return _Reply(200, _dumps({"pagination": pagination, "disk_backup_policies": items}))

    def _policy_item(self, policy: FakePolicy) -> dict[str, Any]:
        """Returns a policy as the list endpoints send it (README "A listed DiskBackupPolicy")."""
        target: FakeDisk | FakeVM | None
        if policy.target_type == "Disk":
            target = self._fleet.disks.get(policy.target_id)
        else:
            target = self._fleet.vms.get(policy.target_id)
        value = {"id": policy.target_id, "name": None if target is None else target.name}
        shape = self._fleet.policy_target_shape
        # README: the typed shape is the API framework's; the OpenAPI file describes {"target": <object>}.
        sent: dict[str, Any] = ({"type": policy.target_type, "value": value} if shape == "typed"
                                else {"target": value} if shape == "openapi" else value)
        return {
            "id": policy.id,
            "retention": policy.retention,
            "total_size": policy.total_size,
            "target": sent,
            "schedule": {"interval": policy.interval, "next_invocation_at": policy.next_invocation_at},
            "annotations": [],
        }

    def _disk_item(self, disk: FakeDisk, *, full: bool) -> dict[str, Any]:
        """Returns a disk as the organization list sends it, plus GET /disks/disk's extra fields if `full`."""
        attachment: dict[str, Any] | None = None
        vm = None if disk.vm_id is None else self._fleet.vms.get(disk.vm_id)
        if vm is not None:
            # README: organization list items name the VM only; GET /disks/disk adds the attachment state.
            attachment = {"virtual_machine": {"id": vm.id, "fqdn": vm.fqdn}}
            if full:
                attachment.update(attach_on_boot=disk.attach_on_boot, boot=disk.name.endswith("system"),
                                  state=disk.attachment)
        item: dict[str, Any] = {
            "id": disk.id,
            "name": disk.name,
            "size_in_gb": disk.size_in_gb,
            "wwn": disk.wwn,
            "state": disk.state,
            "virtual_machine_disk": attachment,
        }
        if not full and self._fleet.list_annotations:
            # Newer API versions list each disk's annotations; the spec's items (and the default fake) have none.
            item["annotations"] = _key_values(disk.annotations)
        if full:
            # The real object carries more than the auditor needs; a stable created_at keeps answers equal.
            item["created_at"] = _created_at(disk.id)
            item["storage_speed"] = "ssd"
            item["io_profile"] = None
            item["bus_type"] = "virtio"
            item["data_center"] = {"id": "dc_demo", "name": "Demo DC", "permalink": "demo-dc"}
            item["installation"] = None
        return item

    def _vm_disk_item(self, disk: FakeDisk) -> dict[str, Any]:
        """Returns one item of a VM's disk list."""
        return {
            "disk": {"id": disk.id, "name": disk.name, "size_in_gb": disk.size_in_gb, "wwn": disk.wwn,
                     "state": disk.state, "created_at": _created_at(disk.id)},
            "attach_on_boot": disk.attach_on_boot,
            "boot": disk.name.endswith("system"),
            "state": disk.attachment,
        }

    def _vm_item(self, vm: FakeVM, *, full: bool) -> dict[str, Any]:
        """Returns a VM as the organization list sends it, or as GET /virtual_machines/virtual_machine if `full`."""
        item: dict[str, Any] = {"id": vm.id, "name": vm.name, "hostname": vm.name, "fqdn": vm.fqdn}
        if full:
            org = self._fleet.orgs.get(vm.org_id)
            item["description"] = None
            item["created_at"] = _created_at(vm.id)
            item["state"] = "started"
            item["organization"] = {
                "id": vm.org_id,
                "name": None if org is None else org.name,
                "sub_domain": None if org is None else org.sub_domain,
            }
            item["zone"] = dict(_ZONE)
            return item
        item["state"] = "started"
        item["zone"] = dict(_ZONE)
        if self._fleet.list_annotations:
            item["annotations"] = _key_values(vm.annotations)
        return item


def _validation_error(errors: list[str]) -> _Reply:
    """Returns Katapult's 422 (README "Writing policies": `detail.errors` is a list of strings)."""
    return _error(422, "validation_error", "A validation error occurred with the object that was being created "
                  "or updated", {"errors": errors})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _policy_errors(properties: Any, *, partial: bool) -> list[str]:
    """Returns the validation errors of a policy's `properties` (all required unless `partial`)."""
    if not isinstance(properties, dict):
        return ["Properties must be provided"]
    errors = []
    if "retention" in properties or not partial:
        retention = properties.get("retention")
        if not isinstance(retention, int) or isinstance(retention, bool) or retention < 1:
            errors.append("Retention must be greater than or equal to 1")
    if "schedule" in properties or not partial:
        schedule = properties.get("schedule")
        if not isinstance(schedule, dict):
            errors.append("Schedule must be provided")
        else:
            if schedule.get("interval") not in INTERVAL_SECONDS:
                errors.append("Schedule interval is not included in the list")
            for name, low, high in (("frequency", 1, 1000), ("time", 0, 23), ("minute", 0, 59)):
                value = schedule.get(name)
                if value is not None and (not _is_int(value) or not low <= value <= high):
                    errors.append(f"Schedule {name} must be between {low} and {high}")
    return errors


async def _read_body(receive: Receive) -> bytes:
    """Returns the whole request body."""
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def _created_at(object_id: str) -> int:
    """Returns a stable creation time for an object, so repeated answers are equal."""
    return 1_600_000_000 + int.from_bytes(object_id.encode()[-3:], "big") % 10_000_000


def _key_values(annotations: dict[str, str]) -> list[dict[str, str]]:
    """Returns annotations as the API sends them: a list of KeyValue `{"key", "value"}` in their order."""
    return [{"key": key, "value": value} for key, value in annotations.items()]


def _annotation_filter(query: _Query) -> _AnnotationFilter | _Reply:
    """Returns the annotation filter of an organization list request, or the 400 for unequal arrays.

    With no `annotations[][value]` at all, each `annotations[][key]` only has to be present (any value);
    otherwise both arrays must have the same length and pair up as key_i = value_i. Every pair must hold.
    """
    keys = query.repeated.get(ANNOTATION_KEY_PARAM, [])
    values = query.repeated.get(ANNOTATION_VALUE_PARAM, [])
    if not values:
        return [(key, None) for key in keys]
    if len(keys) != len(values):
        return _invalid_argument(
            "annotations",
            "validation_errors",
            [
                f"all annotations[] params should have the same amount of elements "
                f"(got {len(keys)} key(s) and {len(values)} value(s))"
            ],
        )
    return list(zip(keys, values, strict=True))


def _matches(annotations: dict[str, str], wanted: _AnnotationFilter) -> bool:
    """Returns whether an object's annotations satisfy every pair of the filter."""
    for key, value in wanted:
        actual = annotations.get(key)
        if actual is None or (value is not None and actual != value):
            return False
    return True


def _paginate(ids: list[str], page: int, per_page: int) -> tuple[list[str], dict[str, Any]]:
    """Returns one page of ids and the pagination object (README "Pagination object")."""
    total = len(ids)
    start = (page - 1) * per_page
    chunk = ids[start : start + per_page]
    # Past 1,000 rows the API stops counting: total and total_pages are null and large_set is true.
    large = total > LARGE_SET_ROWS
    pagination = {
        "current_page": page,
        "total_pages": None if large else math.ceil(total / per_page),
        "total": None if large else total,
        "per_page": per_page,
        "large_set": large,
    }
    return chunk, pagination


def _malform(
    items: list[dict[str, Any]], key: str, pagination: dict[str, Any], *, field: str
) -> dict[str, Any]:
    """Returns a body that breaks the schema: `field` missing on the first item and mistyped on the others."""
    if not items:
        return {"pagination": pagination}  # the required list itself is missing
    broken = [dict(item) for item in items]
    del broken[0][field]
    for item in broken[1:]:
        value = item[field]
        # A number becomes a non-numeric string (so lax decoders cannot coerce it back); a string an object.
        item[field] = f"{value} (corrupted)" if isinstance(value, int) else {"corrupted": value}
    return {"pagination": pagination, key: broken}


def _positive_int(params: dict[str, str], name: str, *, default: int) -> int | _Reply:
    """Returns an integer argument > 0 (strings of digits are accepted), or the invalid_argument reply."""
    raw = params.get(name)
    if raw is None:
        return default
    text = raw.strip()
    if not text.isdigit() or not text.isascii():
        return _invalid_argument(name, "invalid_scalar", ["must be an integer"])
    value = int(text)
    if value < 1:
        return _invalid_argument(name, "validation_errors", ["must be greater than 0"])
    return value


def _bearer_token(scope: Scope) -> str | None:
    """Returns the bearer token of the request, or None if there is no usable Authorization header."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            header: str = bytes(value).decode("latin-1")
            scheme, _, token = header.partition(" ")
            token = token.strip()
            if scheme.lower() == "bearer" and token:
                return token
            return None
    return None


async def _lifespan(receive: Receive, send: Send) -> None:
    """Acknowledges ASGI lifespan startup and shutdown (there is nothing to set up)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def create_app(fleet: Fleet) -> FakeKatapult:
    """Returns the fake Katapult ASGI app serving `fleet` under /core/v1."""
    return FakeKatapult(fleet)
