"""Pure parsers from Katapult's real wire shapes (see shared/katapult/README.md) to domain objects and errors."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Generic, TypeVar

from auditor.domain.models import (
    Attachment,
    BackupPolicy,
    Disk,
    Interval,
    Schedule,
    TargetType,
    VirtualMachine,
    utc_from_epoch,
)
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

T = TypeVar("T")
_Annotated = TypeVar("_Annotated", Disk, VirtualMachine)

POLICIES_KEY = "disk_backup_policies"
# README: the organization disks list puts its array under "disk" (singular), not "disks".
ORG_DISKS_KEY = "disk"
ORG_VMS_KEY = "virtual_machines"
VM_DISKS_KEY = "disks"
ORGANIZATIONS_KEY = "organizations"
# More annotations than this on one object is not a real object: refuse rather than hold it.
MAX_ANNOTATIONS = 1000

_MAX_DESCRIPTION = 300
# Every error message is cut to this length: a hostile body cannot make logs, stored errors or alerts huge.
MAX_MESSAGE = 500
# How much of a server-sent value a message quotes.
_MAX_QUOTE = 60
# README error table: codes are short snake_case words (`disk_not_found`). Anything else is not that shape.
_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# Ceiling for integers the auditor stores or computes with (retention, a per-minute budget): a 32-bit integer
# column, which is what our store uses for them. Anything bigger cannot be a real setting.
MAX_INT32 = 2**31 - 1
# Characters that must not reach a message: lone surrogates (not Unicode at all) and control characters.
_UNSAFE_TEXT = re.compile(r"[\ud800-\udfff\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True, slots=True)
class Pagination:
    """The `pagination` object of a list response."""

    current_page: int | None
    total_pages: int | None
    total: int | None
    per_page: int | None
    large_set: bool


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a list response: its parsed items and its pagination object."""

    items: list[T]
    pagination: Pagination


@dataclass(frozen=True, slots=True)
class ApiErrorBody:
    """The inside of a wrapped error body `{"error": {code, description, detail}}`."""

    code: str
    description: str
    detail: dict[str, object]


class _Reader:
    """Typed field access that raises KatapultResponseError naming the endpoint, target and field path."""

    def __init__(self, *, endpoint: str, target: str, status_code: int | None = 200, page: int | None = None) -> None:
        self.endpoint = endpoint
        self.target = target
        self.status_code = status_code
        self.page = page

    def fail(self, path: str, problem: str) -> KatapultResponseError:
        """Returns the error for a bad field at `path`."""
        where = f"GET {self.endpoint} for {self.target}"
        if self.page is not None:
            where += f" (page {self.page})"
        return KatapultResponseError(
            clip(f"malformed response from {where}: {path or '<body>'}: {problem}"),
            field=path or None,
            target=self.target,
            endpoint=self.endpoint,
            status_code=self.status_code,
        )

    def obj(self, value: object, path: str) -> dict[str, object]:
        """Returns `value` as a JSON object."""
        if not isinstance(value, dict):
            raise self.fail(path, f"expected an object, got {_kind(value)}")
        return value

    def field(self, parent: Mapping[str, object], name: str, path: str) -> object:
        """Returns a required field of `parent`."""
        if name not in parent:
            raise self.fail(_join(path, name), "missing")
        return parent[name]

    def req_obj(self, parent: Mapping[str, object], name: str, path: str) -> dict[str, object]:
        """Returns a required object field."""
        return self.obj(self.field(parent, name, path), _join(path, name))

    def opt_obj(self, parent: Mapping[str, object], name: str, path: str) -> dict[str, object] | None:
        """Returns an optional (absent or null) object field."""
        value = parent.get(name)
        return None if value is None else self.obj(value, _join(path, name))

    def req_str(self, parent: Mapping[str, object], name: str, path: str) -> str:
        """Returns a required non-empty string field."""
        value = self.field(parent, name, path)
        if not isinstance(value, str) or not value:
            raise self.fail(_join(path, name), f"expected a non-empty string, got {_kind(value)}")
        return self._text(value, _join(path, name))

    def opt_str(self, parent: Mapping[str, object], name: str, path: str) -> str | None:
        """Returns an optional string field (absent or null gives None)."""
        value = parent.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail(_join(path, name), f"expected a string or null, got {_kind(value)}")
        return self._text(value, _join(path, name))

    def _text(self, value: str, path: str) -> str:
        # Katapult's JSON is generated from valid UTF-8, so a lone surrogate (a "\ud800" escape) cannot come from it,
        # and such a string cannot be stored, logged as UTF-8 or compared reliably.
        if not _is_unicode(value):
            raise self.fail(path, "string is not valid Unicode (lone surrogate)")
        if "\x00" in value:
            # PostgreSQL text cannot hold NUL (SQLite can): both databases must accept the same data. An id with
            # a NUL is not an id; in free text (a name, an FQDN) it is replaced, so one odd name fails nothing.
            if path.rsplit(".", 1)[-1].endswith("id"):
                raise self.fail(path, "an id cannot contain a NUL character")
            value = value.replace("\x00", "\ufffd")
        return value

    def req_count(self, parent: Mapping[str, object], name: str, path: str) -> int:
        """Returns a required integer field that must be positive and fit a 32-bit integer."""
        value = self.field(parent, name, path)
        if not _is_int(value):
            raise self.fail(_join(path, name), f"expected a positive integer, got {_kind(value)}")
        assert isinstance(value, int)
        if not 1 <= value <= MAX_INT32:
            raise self.fail(_join(path, name), f"expected a positive integer up to {MAX_INT32}, got {_quote(value)}")
        return value

    def opt_int(self, parent: Mapping[str, object], name: str, path: str) -> int | None:
        """Returns an optional integer field (absent or null gives None)."""
        value = parent.get(name)
        if value is None:
            return None
        if not _is_int(value):
            raise self.fail(_join(path, name), f"expected an integer or null, got {_kind(value)}")
        assert isinstance(value, int)
        return value

    def opt_number(self, parent: Mapping[str, object], name: str, path: str) -> float | None:
        """Returns an optional number field as a float (absent or null gives None)."""
        value = parent.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(_join(path, name), f"expected a number or null, got {_kind(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer literal beyond any float
            raise self.fail(_join(path, name), "number is out of range") from None
        if not math.isfinite(number):
            raise self.fail(_join(path, name), "number is out of range")
        return number

    def opt_bool(self, parent: Mapping[str, object], name: str, path: str) -> bool | None:
        """Returns an optional boolean field (absent or null gives None)."""
        value = parent.get(name)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise self.fail(_join(path, name), f"expected a boolean or null, got {_kind(value)}")
        return value

    def opt_time(self, parent: Mapping[str, object], name: str, path: str) -> datetime | None:
        """Returns an optional Unix-seconds field as an aware UTC datetime (absent or null gives None)."""
        # README: all times are Unix epoch seconds as JSON integers, never ISO strings.
        seconds = self.opt_int(parent, name, path)
        if seconds is None:
            return None
        moment = utc_from_epoch(seconds)
        if moment is None:
            raise self.fail(_join(path, name), f"timestamp {_quote(seconds)} is out of range")
        return moment


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _quote(value: object) -> str:
    """Returns a short, escaped rendering of a server-sent value for a message."""
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's digit limit for str()
        text = f"<{type(value).__name__}>"
    return text if len(text) <= _MAX_QUOTE else text[: _MAX_QUOTE - 3] + "..."


def clip(message: str, limit: int = MAX_MESSAGE) -> str:
    """Returns `message` cut to `limit` characters (marked with "...")."""
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _safe_text(text: str) -> str:
    """Returns server-sent text with lone surrogates and control characters replaced, safe to log and store."""
    return _UNSAFE_TEXT.sub(lambda m: "\ufffd" if "\ud800" <= m.group() <= "\udfff" else " ", text)


def _reject_constant(name: str) -> object:
    # json.loads accepts NaN, Infinity and -Infinity by default; they are not JSON (RFC 8259) and Katapult never
    # sends them.
    raise ValueError(f"{name} is not JSON")


def _loads(content: bytes) -> object:
    """Returns the decoded JSON value; raises ValueError for anything that is not strict JSON."""
    try:
        return json.loads(content, parse_constant=_reject_constant)
    except RecursionError:  # nesting deeper than the interpreter's stack
        raise ValueError("JSON nested too deeply") from None


def decode_json(content: bytes, *, endpoint: str, target: str, status_code: int = 200) -> dict[str, object]:
    """Returns a response body decoded as a JSON object, or raises KatapultResponseError."""
    reader = _Reader(endpoint=endpoint, target=target, status_code=status_code)
    try:
        value = _loads(content)
    except ValueError:  # includes UnicodeDecodeError
        raise reader.fail("", "body is not valid JSON") from None
    return reader.obj(value, "")


# README: the polymorphic target as the API framework serialises it ({"type", "value"}) has never been seen in a
# recorded policy body; the OpenAPI file describes {"target": {...}} (or the object itself). Both are accepted: the
# kind comes from `type` when present, else from the id's prefix. Anything else is malformed, never "no target":
# so is a `type` its id's known prefix contradicts (a "VirtualMachine" disk_… would cover no VM's disks, silently).
_TARGET_PREFIXES = {"disk_": TargetType.DISK, "vm_": TargetType.VIRTUAL_MACHINE}
_TARGET_NOUNS = {TargetType.DISK: "a disk (disk_…)", TargetType.VIRTUAL_MACHINE: "a virtual machine (vm_…)"}


def _kind_of(target_id: str) -> TargetType | None:
    """Returns what an id's prefix says it is, None for an id without a known prefix."""
    for prefix, kind in _TARGET_PREFIXES.items():
        if target_id.startswith(prefix):
            return kind
    return None


def _parse_target(reader: _Reader, item: Mapping[str, object], path: str) -> tuple[TargetType, str, str | None]:
    """Returns a policy's (target type, target id, target name) from either known `target` shape."""
    target = reader.req_obj(item, "target", path)
    target_path = _join(path, "target")
    if "type" in target or "value" in target:
        type_name = reader.req_str(target, "type", target_path)
        try:
            target_type = TargetType(type_name)
        except ValueError:
            raise reader.fail(_join(target_path, "type"), f"unknown target type {_quote(type_name)}") from None
        value_path = _join(target_path, "value")
        value = reader.req_obj(target, "value", target_path)
        target_id = reader.req_str(value, "id", value_path)
        prefixed = _kind_of(target_id)
        if prefixed is not None and prefixed is not target_type:
            # An id without a known prefix is trusted to be what `type` says.
            raise reader.fail(_join(value_path, "id"), f"target id {_quote(target_id)} is {_TARGET_NOUNS[prefixed]}, "
                                                       f"but the target's type is {_quote(type_name)}")
        return target_type, target_id, reader.opt_str(value, "name", value_path)
    if "target" in target:  # the OpenAPI shape: {"target": {"target": <VirtualMachine | Disk>}}
        value_path = _join(target_path, "target")
        value = reader.req_obj(target, "target", target_path)
    else:  # the object itself
        value_path, value = target_path, target
    target_id = reader.req_str(value, "id", value_path)
    kind = _kind_of(target_id)
    if kind is not None:
        return kind, target_id, reader.opt_str(value, "name", value_path)
    raise reader.fail(_join(value_path, "id"), f"target id {_quote(target_id)} is neither a disk (disk_…) nor a "
                                               "virtual machine (vm_…), and the target has no type")


def _parse_policy(reader: _Reader, raw: object, path: str) -> BackupPolicy:
    item = reader.obj(raw, path)
    target_type, target_id, target_name = _parse_target(reader, item, path)

    schedule = reader.req_obj(item, "schedule", path)
    schedule_path = _join(path, "schedule")
    interval_name = reader.req_str(schedule, "interval", schedule_path)
    try:
        interval = Interval(interval_name)
    except ValueError:
        raise reader.fail(_join(schedule_path, "interval"), f"unknown interval {_quote(interval_name)}") from None

    return BackupPolicy(
        id=reader.req_str(item, "id", path),
        # README: retention is an integer, the number of backups kept. Zero or fewer is not a policy that could be
        # judged (it would read as a compliance verdict on garbage), so it is malformed.
        retention=reader.req_count(item, "retention", path),
        target_type=target_type,
        target_id=target_id,
        target_name=target_name,
        # The list endpoints send only interval and next_invocation_at; a null next run is allowed.
        schedule=Schedule(
            interval=interval, next_invocation_at=reader.opt_time(schedule, "next_invocation_at", schedule_path)
        ),
        total_size=reader.opt_number(item, "total_size", path),
    )


def _parse_disk(reader: _Reader, raw: object, path: str) -> Disk:
    item = reader.obj(raw, path)
    vm_id: str | None = None
    vm_fqdn: str | None = None
    state: Attachment | None = None
    # README: virtual_machine_disk is null, or an object whose virtual_machine has id and fqdn. GET /disks/disk adds
    # the attachment `state` ("attached" | "detached") and `attach_on_boot`; organization list items do not.
    attachment = reader.opt_obj(item, "virtual_machine_disk", path)
    if attachment is not None:
        attachment_path = _join(path, "virtual_machine_disk")
        vm = reader.req_obj(attachment, "virtual_machine", attachment_path)
        vm_path = _join(attachment_path, "virtual_machine")
        vm_id = reader.req_str(vm, "id", vm_path)
        vm_fqdn = reader.opt_str(vm, "fqdn", vm_path)
        state = _parse_attachment(reader, attachment, attachment_path)
    return Disk(
        id=reader.req_str(item, "id", path),
        name=reader.opt_str(item, "name", path),
        vm_id=vm_id,
        vm_fqdn=vm_fqdn,
        state=reader.opt_str(item, "state", path),
        size_in_gb=reader.opt_int(item, "size_in_gb", path),
        annotations=_parse_annotations(reader, item, path),
        attachment=state,
    )


def _parse_attachment(reader: _Reader, parent: Mapping[str, object], path: str) -> Attachment | None:
    """Returns the attachment `state` and `attach_on_boot` of a VM disk object; None when it carries no state."""
    state = reader.opt_str(parent, "state", path)
    if state is None:
        return None
    return Attachment(state=state, attach_on_boot=reader.opt_bool(parent, "attach_on_boot", path))


def _parse_vm_disk(reader: _Reader, raw: object, path: str) -> tuple[str, Attachment | None]:
    """Returns (disk id, attachment) of one item of a VM's disk list."""
    # README: GET /virtual_machines/virtual_machine/disks lists {"disk": {id, …}, "attach_on_boot", "boot", "state"}.
    item = reader.obj(raw, path)
    disk = reader.req_obj(item, "disk", path)
    return reader.req_str(disk, "id", _join(path, "disk")), _parse_attachment(reader, item, path)


def _parse_organization(reader: _Reader, raw: object, path: str) -> tuple[str, str | None]:
    """Returns (id, sub_domain) of one item of GET /organizations."""
    item = reader.obj(raw, path)
    return reader.req_str(item, "id", path), reader.opt_str(item, "sub_domain", path)


def _parse_annotations(reader: _Reader, parent: Mapping[str, object], path: str) -> tuple[tuple[str, str], ...] | None:
    """Returns the `annotations` array as (key, value) pairs; None when the object has no such field.

    README: KeyValue is {"key": string (required), "value": string}; a pair without a value has the value "".
    The spec's list items carry no annotations and newer API versions may: absent means "not known", never "none".
    """
    if "annotations" not in parent or parent["annotations"] is None:
        return None
    raw = parent["annotations"]
    where = _join(path, "annotations")
    if not isinstance(raw, list):
        raise reader.fail(where, f"expected an array, got {_kind(raw)}")
    if len(raw) > MAX_ANNOTATIONS:
        raise reader.fail(where, f"{len(raw)} annotations (at most {MAX_ANNOTATIONS} are accepted)")
    pairs: dict[str, str] = {}
    for index, pair in enumerate(raw):
        pair_path = f"{where}[{index}]"
        item = reader.obj(pair, pair_path)
        key = reader.req_str(item, "key", pair_path)
        pairs[key] = reader.opt_str(item, "value", pair_path) or ""
    return tuple(pairs.items())


def _parse_vm(reader: _Reader, raw: object, path: str) -> VirtualMachine:
    item = reader.obj(raw, path)
    org = reader.opt_obj(item, "organization", path)
    org_path = _join(path, "organization")
    return VirtualMachine(
        id=reader.req_str(item, "id", path),
        fqdn=reader.opt_str(item, "fqdn", path),
        organization_id=reader.opt_str(org, "id", org_path) if org is not None else None,
        organization_sub_domain=reader.opt_str(org, "sub_domain", org_path) if org is not None else None,
        annotations=_parse_annotations(reader, item, path),
    )


def _parse_pagination(reader: _Reader, body: Mapping[str, object]) -> Pagination:
    raw = reader.req_obj(body, "pagination", "")
    path = "pagination"
    total_pages = reader.opt_int(raw, "total_pages", path)
    per_page = reader.opt_int(raw, "per_page", path)
    if total_pages is not None and total_pages < 0:
        raise reader.fail("pagination.total_pages", f"negative page count {total_pages}")
    if per_page is not None and per_page < 1:
        raise reader.fail("pagination.per_page", f"non-positive page size {per_page}")
    return Pagination(
        current_page=reader.opt_int(raw, "current_page", path),
        total_pages=total_pages,
        total=reader.opt_int(raw, "total", path),
        per_page=per_page,
        large_set=bool(reader.opt_bool(raw, "large_set", path)),
    )


def _parse_page(
    body: Mapping[str, object],
    key: str,
    item: Callable[[_Reader, object, str], T],
    *,
    endpoint: str,
    target: str,
    page: int | None,
) -> Page[T]:
    reader = _Reader(endpoint=endpoint, target=target, page=page)
    pagination = _parse_pagination(reader, body)
    raw_items = reader.field(body, key, "")
    if not isinstance(raw_items, list):
        raise reader.fail(key, f"expected an array, got {_kind(raw_items)}")
    return Page(items=[item(reader, raw, f"{key}[{i}]") for i, raw in enumerate(raw_items)], pagination=pagination)


def parse_policy_page(
    body: Mapping[str, object], *, endpoint: str, target: str, page: int | None = None
) -> Page[BackupPolicy]:
    """Returns the policies and pagination of one page of a `disk_backup_policies` list."""
    return _parse_page(body, POLICIES_KEY, _parse_policy, endpoint=endpoint, target=target, page=page)


def parse_disk_page(body: Mapping[str, object], *, endpoint: str, target: str, page: int | None = None) -> Page[Disk]:
    """Returns the disks and pagination of one page of an organization's disk list (array key `disk`)."""
    return _parse_page(body, ORG_DISKS_KEY, _parse_disk, endpoint=endpoint, target=target, page=page)


def parse_disk_response(body: Mapping[str, object], *, endpoint: str, target: str) -> Disk:
    """Returns the disk of a `GET /disks/disk` response (`{"disk": {...}, "annotations": [...]}`)."""
    return _parse_one(body, "disk", _parse_disk, endpoint=endpoint, target=target)


def parse_vm_page(
    body: Mapping[str, object], *, endpoint: str, target: str, page: int | None = None
) -> Page[VirtualMachine]:
    """Returns the VMs and pagination of one page of an organization's virtual machine list."""
    return _parse_page(body, ORG_VMS_KEY, _parse_vm, endpoint=endpoint, target=target, page=page)


def parse_vm_disk_page(
    body: Mapping[str, object], *, endpoint: str, target: str, page: int | None = None
) -> Page[tuple[str, Attachment | None]]:
    """Returns (disk id, attachment) per item and the pagination of one page of a VM's disk list (key `disks`)."""
    return _parse_page(body, VM_DISKS_KEY, _parse_vm_disk, endpoint=endpoint, target=target, page=page)


def parse_organizations(body: Mapping[str, object], *, endpoint: str) -> list[tuple[str, str | None]]:
    """Returns (id, sub_domain) of every organization of a GET /organizations body (not paginated)."""
    reader = _Reader(endpoint=endpoint, target="the token's organizations")
    raw_items = reader.field(body, ORGANIZATIONS_KEY, "")
    if not isinstance(raw_items, list):
        raise reader.fail(ORGANIZATIONS_KEY, f"expected an array, got {_kind(raw_items)}")
    return [_parse_organization(reader, raw, f"{ORGANIZATIONS_KEY}[{i}]") for i, raw in enumerate(raw_items)]


def parse_vm_response(body: Mapping[str, object], *, endpoint: str, target: str) -> VirtualMachine:
    """Returns the VM of a `GET /virtual_machines/virtual_machine` response, with its annotations."""
    return _parse_one(body, "virtual_machine", _parse_vm, endpoint=endpoint, target=target)


def _parse_one(body: Mapping[str, object], key: str, parse: Callable[[_Reader, object, str], _Annotated], *,
               endpoint: str, target: str) -> _Annotated:
    # A single-object response: the object under `key`, its annotations beside it (none when absent).
    reader = _Reader(endpoint=endpoint, target=target)
    found = parse(reader, reader.field(body, key, ""), key)
    annotations = _parse_annotations(reader, body, "")
    return found if annotations is None else replace(found, annotations=annotations)


def parse_error_body(content: bytes) -> ApiErrorBody | None:
    """Returns the wrapped error of an error body, or None if the body is not that shape."""
    # README: every error body is wrapped as {"error": {"code", "description", "detail"}} (the spec omits "error").
    try:
        value = _loads(content)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    error = value.get("error")
    if not isinstance(error, dict):
        return None
    code = error.get("code")
    if not isinstance(code, str) or not _CODE.fullmatch(code):
        return None
    description = error.get("description")
    detail = error.get("detail")
    return ApiErrorBody(
        code=code,
        description=_safe_text(description) if isinstance(description, str) else "",
        detail=_clean_detail(detail) if isinstance(detail, dict) else {},
    )


def _clean_detail(detail: dict[str, object]) -> dict[str, object]:
    """Returns an error detail with its documented parts checked; malformed ones are dropped (treated as absent)."""
    clean = dict(detail)
    if "trash_object" in clean:
        trash = _trash_object(clean.pop("trash_object"))
        if trash is not None:
            clean["trash_object"] = trash
    return clean


def _trash_object(raw: object) -> dict[str, object] | None:
    """Returns the well-formed fields of a `trash_object`, or None if it is not an object."""
    # README: 406 object_in_trash carries {"trash_object": {id, keep_until, object_id, object_type}}, keep_until in
    # Unix seconds. Only values of that shape are kept: a keep_until outside datetime's range is treated as absent.
    if not isinstance(raw, dict):
        return None
    trash: dict[str, object] = {}
    for name in ("id", "object_id", "object_type"):
        value = raw.get(name)
        if isinstance(value, str) and value and len(value) <= 200 and _is_unicode(value):
            trash[name] = value
    keep = raw.get("keep_until")
    if _is_int(keep) and isinstance(keep, int) and utc_from_epoch(keep) is not None:
        trash["keep_until"] = keep
    return trash


def api_error(
    status_code: int,
    content: bytes,
    *,
    endpoint: str,
    target: str,
    retry_after: float | None = None,
    redact: Callable[[str], str] = str,
    method: str = "GET",
) -> KatapultAPIError:
    """Returns the typed error for a non-2xx response; a body that is not the wrapped shape maps by status.

    `redact` blanks secrets in the server's description before it is cut, so no part of a secret survives a cut.
    """
    body = parse_error_body(content)
    if body is None:
        body = ApiErrorBody(code=f"http_{status_code}", description="", detail={})
    message = f"{method} {endpoint} for {target}: HTTP {status_code} {body.code}"
    description = clip(redact(body.description), _MAX_DESCRIPTION)
    if description:
        message += f": {description}"
    message = clip(message)
    cls = _error_class(status_code, body.code)
    if cls is RateLimitedError:
        return RateLimitedError(
            message,
            code=body.code,
            status_code=status_code,
            detail=body.detail,
            description=description,
            target=target,
            endpoint=endpoint,
            retry_after=retry_after,
        )
    if cls is UnavailableError:
        return UnavailableError(
            message,
            code=body.code,
            status_code=status_code,
            detail=body.detail,
            description=description,
            target=target,
            endpoint=endpoint,
            retry_after=retry_after,
        )
    return cls(message, code=body.code, status_code=status_code, detail=body.detail, description=description,
               target=target, endpoint=endpoint)


def _error_class(status_code: int, code: str) -> type[KatapultAPIError]:
    # README error table: an invalid token is 403 (not 401); a missing token is 400 missing_api_token.
    if status_code == 404:
        return NotFoundError
    if status_code == 406:
        return InTrashError
    if status_code in (401, 403) or code == "missing_api_token":
        return AuthError
    if status_code == 429:
        return RateLimitedError
    if status_code >= 500:
        return UnavailableError
    if status_code == 400:
        return InvalidRequestError
    return KatapultAPIError


def total_permitted(detail: Mapping[str, object]) -> int | None:
    """Returns `detail.total_permitted` of a 429 (requests per minute), if it is a positive integer."""
    value = detail.get("total_permitted")
    # Bounded: the pacing arithmetic turns it into a float (60 / N), which a huge integer would overflow.
    return value if _is_int(value) and isinstance(value, int) and 0 < value <= MAX_INT32 else None
