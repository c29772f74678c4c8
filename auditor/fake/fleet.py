"""The fake Katapult's world: organizations, VMs, disks, backup policies, faults and rate-limit settings."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import math
import random
import string
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

INTERVALS = ("hourly", "daily", "weekly", "monthly")
TARGET_TYPES = ("Disk", "VirtualMachine")
# How a policy's `target` is sent (the real shape is unverified, see README): the API framework's typed shape
# {"type", "value"}, the OpenAPI file's {"target": {...}}, or the bare object {...}.
TARGET_SHAPES = ("typed", "openapi", "bare")
ATTACHMENT_STATES = ("attached", "detached")
DEFAULT_TOKEN = "fake-token"
# The fake's token with the disk_backup_policies write scope (DEFAULT_TOKEN reads only: a write with it is 403).
DEFAULT_WRITE_TOKEN = "fake-write-token"
# Seconds per interval, used to place generated `next_invocation_at` within one interval from now.
_INTERVAL_SECONDS = {"hourly": 3600, "daily": 86400, "weekly": 7 * 86400, "monthly": 30 * 86400}
INTERVAL_SECONDS = _INTERVAL_SECONDS
_ALPHABET = string.ascii_letters + string.digits
# The real API counts a minute-long window per token (README: "requests per minute for this token").
RATE_WINDOW_SECONDS = 60.0


def fake_id(prefix: str, key: str) -> str:
    """Returns a Katapult-looking id (`prefix_` + 16 alphanumerics) derived deterministically from `key`."""
    number = int.from_bytes(hashlib.sha256(f"{prefix}\x1f{key}".encode()).digest(), "big")
    chars = []
    for _ in range(16):
        number, digit = divmod(number, len(_ALPHABET))
        chars.append(_ALPHABET[digit])
    return f"{prefix}_{''.join(chars)}"


def _fake_wwn(disk_id: str) -> str:
    """Returns a stable 32-hex-digit WWN for a disk id."""
    return hashlib.sha256(f"wwn\x1f{disk_id}".encode()).hexdigest()[:32]


class Fault(StrEnum):
    """A failure the fake injects when a request looks up an object id that has one."""

    NOT_FOUND = "not_found"  # 404 disk_not_found / organization_not_found / virtual_machine_not_found
    IN_TRASH = "in_trash"  # 406 object_in_trash with a trash_object detail
    UNAVAILABLE = "unavailable"  # 503 service_unavailable
    SERVER_ERROR = "server_error"  # 500 unhandled_exception
    FORBIDDEN = "forbidden"  # 403 permission_denied
    MALFORMED = "malformed"  # 200 whose body lacks a required field or has one of the wrong type
    INVALID_JSON = "invalid_json"  # 200 whose body is not JSON
    SLOW = "slow"  # sleeps `Fleet.slow_seconds` before answering normally


@dataclass
class FakeOrg:
    """An organization; `sub_domain` is its alternative lookup key."""

    id: str
    sub_domain: str
    name: str = ""
    # Whether the token sees it: GET /organizations lists it and its lookups answer (else 404 as if it did not exist).
    visible: bool = True


@dataclass
class FakeVM:
    """A virtual machine of an organization."""

    id: str
    fqdn: str
    org_id: str
    annotations: dict[str, str] = field(default_factory=dict)  # key -> value, in insertion order

    @property
    def name(self) -> str:
        """Returns the VM's short name (the first label of its FQDN)."""
        return self.fqdn.split(".", 1)[0]


@dataclass
class FakeDisk:
    """A disk of an organization, assigned to `vm_id` if set and then `attachment` ("attached" | "detached")."""

    id: str
    name: str
    org_id: str
    vm_id: str | None = None
    size_in_gb: int = 20
    state: str = "attached"
    wwn: str = ""
    annotations: dict[str, str] = field(default_factory=dict)  # key -> value, in insertion order
    attachment: str = "attached"  # virtual_machine_disk.state while assigned to a VM
    attach_on_boot: bool = True


@dataclass
class FakePolicy:
    """A disk backup policy targeting a disk or a VM."""

    id: str
    target_type: str  # "Disk" | "VirtualMachine"
    target_id: str
    retention: int
    interval: str  # hourly | daily | weekly | monthly
    next_invocation_at: int | None  # unix seconds
    total_size: float = 0.0
    # On a fleet whose schedules run (`Fleet.schedule_clock`): runs every `frequency` intervals, each run adding
    # `growth` to `total_size`; a paused policy never runs (its next_invocation_at stays, as a broken schedule's).
    frequency: int = 1
    growth: float = 0.0
    paused: bool = False


@dataclass
class FakeStats:
    """What the fake has served: every request, the 429s among them, and counts per endpoint and status."""

    total: int = 0
    rate_limited: int = 0
    by_endpoint: dict[str, int] = field(default_factory=dict)
    by_status: dict[int, int] = field(default_factory=dict)


@dataclass
class DemoTargets:
    """What the demo configuration audits: explicit disk ids and whole organizations."""

    disks: list[str]
    organizations: list[str]


class _OrderedIndex:
    """Maps a key to an insertion-ordered set of ids, with a cached list per key for O(page) slicing."""

    __slots__ = ("_members", "_lists")

    def __init__(self) -> None:
        self._members: dict[str, dict[str, None]] = {}
        self._lists: dict[str, list[str]] = {}

    def add(self, key: str, member: str) -> None:
        """Adds `member` under `key`."""
        self._members.setdefault(key, {})[member] = None
        self._lists.pop(key, None)

    def discard(self, key: str, member: str) -> None:
        """Removes `member` from `key` if present."""
        members = self._members.get(key)
        if members is not None and member in members:
            del members[member]
            self._lists.pop(key, None)
            if not members:
                del self._members[key]

    def get(self, key: str) -> list[str]:
        """Returns the ids under `key` in insertion order (a cached list: do not mutate)."""
        cached = self._lists.get(key)
        if cached is None:
            cached = list(self._members.get(key, ()))
            self._lists[key] = cached
        return cached

    def clear(self) -> None:
        """Forgets everything."""
        self._members.clear()
        self._lists.clear()


def _no_rate_changes() -> list[tuple[int, int]]:
    return []


def _checked_annotations(mapping: Mapping[Any, Any] | None, where: str = "annotations") -> dict[str, str]:
    """Returns a fresh insertion-ordered copy of `mapping`, whose keys and values must all be strings."""
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{where}: expected a table/object of strings, got {type(mapping).__name__}")
    checked: dict[str, str] = {}
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise ValueError(f"{where}: keys must be strings, got {type(key).__name__} {key!r}")
        if not isinstance(value, str):
            raise ValueError(f"{where}.{key}: expected a string, got {type(value).__name__}")
        checked[key] = value
    return checked


@dataclass
class Fleet:
    """Everything the fake serves, mutable between requests.

    Change objects through the add_*/remove_*/update_* methods. After editing the dicts directly, call
    `reindex()` (a change in their sizes is noticed automatically; plain field edits such as `retention` need
    nothing, but moving a policy's target or a disk's VM does).
    """

    orgs: dict[str, FakeOrg] = field(default_factory=dict)
    vms: dict[str, FakeVM] = field(default_factory=dict)
    disks: dict[str, FakeDisk] = field(default_factory=dict)
    policies: dict[str, FakePolicy] = field(default_factory=dict)
    tokens: set[str] = field(default_factory=lambda: {DEFAULT_TOKEN})
    # Tokens that may also write policies (they read too).
    write_tokens: set[str] = field(default_factory=lambda: {DEFAULT_WRITE_TOKEN})
    faults: dict[str, Fault] = field(default_factory=dict)
    rate_limit_per_minute: int = 1000
    latency: float = 0.0
    slow_seconds: float = 5.0
    rate_limit_changes: list[tuple[int, int]] = field(default_factory=_no_rate_changes)
    faults_remaining: dict[str, int] = field(default_factory=dict)
    retry_after: float | None = None
    # Whether the organization list endpoints send each item's `annotations` (newer API versions do; the spec's
    # items carry none). GET /disks/disk and GET /virtual_machines/virtual_machine always send them.
    list_annotations: bool = False
    # How policies' `target` is sent: one of TARGET_SHAPES.
    policy_target_shape: str = "typed"
    stats: FakeStats = field(default_factory=FakeStats)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)
    # The clock the policies' schedules run on (Unix seconds): None keeps every next_invocation_at where it was set;
    # `time.time` (the fleet file's `run_schedules = true`) or a test's own clock runs them (`run_schedule`).
    schedule_clock: Callable[[], float] | None = field(default=None, repr=False, compare=False)

    _org_by_sub: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)
    _vm_by_fqdn: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)
    _org_vms: _OrderedIndex = field(default_factory=_OrderedIndex, init=False, repr=False, compare=False)
    _org_disks: _OrderedIndex = field(default_factory=_OrderedIndex, init=False, repr=False, compare=False)
    _vm_disks: _OrderedIndex = field(default_factory=_OrderedIndex, init=False, repr=False, compare=False)
    _disk_policies: _OrderedIndex = field(
        default_factory=_OrderedIndex, init=False, repr=False, compare=False
    )
    _vm_policies: _OrderedIndex = field(default_factory=_OrderedIndex, init=False, repr=False, compare=False)
    _org_policies: _OrderedIndex = field(default_factory=_OrderedIndex, init=False, repr=False, compare=False)
    _indexed_sizes: tuple[int, int, int, int] = field(
        default=(0, 0, 0, 0), init=False, repr=False, compare=False
    )
    _windows: dict[str, collections.deque[float]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _seq: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.reindex()

    # ----------------------------------------------------------------- indexes

    def reindex(self) -> None:
        """Rebuilds every lookup index from the four object dicts."""
        for index in (
            self._org_vms,
            self._org_disks,
            self._vm_disks,
            self._disk_policies,
            self._vm_policies,
            self._org_policies,
        ):
            index.clear()
        self._org_by_sub = {org.sub_domain: org.id for org in self.orgs.values()}
        self._vm_by_fqdn = {vm.fqdn: vm.id for vm in self.vms.values()}
        for vm in self.vms.values():
            self._org_vms.add(vm.org_id, vm.id)
        for disk in self.disks.values():
            self._index_disk(disk)
        for policy in self.policies.values():
            self._index_policy(policy)
        self._indexed_sizes = self._sizes()

    def _sizes(self) -> tuple[int, int, int, int]:
        return (len(self.orgs), len(self.vms), len(self.disks), len(self.policies))

    def _check_index(self) -> None:
        # Cheap guard for tests that insert into or delete from the dicts directly.
        if self._indexed_sizes != self._sizes():
            self.reindex()

    def _index_disk(self, disk: FakeDisk) -> None:
        self._org_disks.add(disk.org_id, disk.id)
        if disk.vm_id is not None:
            self._vm_disks.add(disk.vm_id, disk.id)

    def _unindex_disk(self, disk: FakeDisk) -> None:
        self._org_disks.discard(disk.org_id, disk.id)
        if disk.vm_id is not None:
            self._vm_disks.discard(disk.vm_id, disk.id)

    def _policy_org(self, policy: FakePolicy) -> str | None:
        target: FakeDisk | FakeVM | None
        if policy.target_type == "Disk":
            target = self.disks.get(policy.target_id)
        else:
            target = self.vms.get(policy.target_id)
        return None if target is None else target.org_id

    def _index_policy(self, policy: FakePolicy) -> None:
        index = self._disk_policies if policy.target_type == "Disk" else self._vm_policies
        index.add(policy.target_id, policy.id)
        org_id = self._policy_org(policy)
        if org_id is not None:
            self._org_policies.add(org_id, policy.id)

    def _unindex_policy(self, policy: FakePolicy) -> None:
        index = self._disk_policies if policy.target_type == "Disk" else self._vm_policies
        index.discard(policy.target_id, policy.id)
        org_id = self._policy_org(policy)
        if org_id is not None:
            self._org_policies.discard(org_id, policy.id)

    def _new_id(self, prefix: str) -> str:
        pools: dict[str, dict[str, Any]] = {
            "org": self.orgs,
            "vm": self.vms,
            "disk": self.disks,
            "dbp": self.policies,
        }
        taken = pools[prefix]
        while True:
            self._seq += 1
            candidate = fake_id(prefix, f"auto:{self._seq}")
            if candidate not in taken:
                return candidate

    # ----------------------------------------------------------------- builders

    def add_org(self, sub_domain: str, *, id: str | None = None, name: str = "") -> FakeOrg:
        """Adds an organization and returns it (a deterministic id is made if none is given)."""
        self._check_index()
        org_id = id if id is not None else self._new_id("org")
        if org_id in self.orgs:
            raise ValueError(f"duplicate organization id {org_id!r}")
        if sub_domain in self._org_by_sub:
            raise ValueError(f"duplicate organization sub_domain {sub_domain!r}")
        org = FakeOrg(id=org_id, sub_domain=sub_domain, name=name or sub_domain.title())
        self.orgs[org.id] = org
        self._org_by_sub[sub_domain] = org.id
        self._indexed_sizes = self._sizes()
        return org

    def add_vm(
        self,
        org_id: str,
        fqdn: str,
        *,
        id: str | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> FakeVM:
        """Adds a virtual machine to an organization (with a copy of `annotations`) and returns it."""
        self._check_index()
        checked = _checked_annotations(annotations)
        if org_id not in self.orgs:
            raise ValueError(f"unknown organization {org_id!r}")
        vm_id = id if id is not None else self._new_id("vm")
        if vm_id in self.vms:
            raise ValueError(f"duplicate virtual machine id {vm_id!r}")
        if fqdn in self._vm_by_fqdn:
            raise ValueError(f"duplicate virtual machine fqdn {fqdn!r}")
        vm = FakeVM(id=vm_id, fqdn=fqdn, org_id=org_id, annotations=checked)
        self.vms[vm.id] = vm
        self._vm_by_fqdn[fqdn] = vm.id
        self._org_vms.add(org_id, vm.id)
        self._indexed_sizes = self._sizes()
        return vm

    def add_disk(
        self,
        org_id: str,
        name: str = "",
        *,
        id: str | None = None,
        vm_id: str | None = None,
        size_in_gb: int = 20,
        state: str = "attached",
        wwn: str | None = None,
        annotations: Mapping[str, str] | None = None,
        attachment: str = "attached",
        attach_on_boot: bool = True,
    ) -> FakeDisk:
        """Adds a disk to an organization (assigned to `vm_id` if given, `attachment` to it; with a copy of
        `annotations`)."""
        self._check_index()
        checked = _checked_annotations(annotations)
        _check_attachment(attachment)
        if org_id not in self.orgs:
            raise ValueError(f"unknown organization {org_id!r}")
        if vm_id is not None and vm_id not in self.vms:
            raise ValueError(f"unknown virtual machine {vm_id!r}")
        disk_id = id if id is not None else self._new_id("disk")
        if disk_id in self.disks:
            raise ValueError(f"duplicate disk id {disk_id!r}")
        disk = FakeDisk(
            id=disk_id,
            name=name or disk_id,
            org_id=org_id,
            vm_id=vm_id,
            size_in_gb=size_in_gb,
            state=state,
            wwn=_fake_wwn(disk_id) if wwn is None else wwn,
            annotations=checked,
            attachment=attachment,
            attach_on_boot=attach_on_boot,
        )
        self.disks[disk.id] = disk
        self._index_disk(disk)
        self._indexed_sizes = self._sizes()
        return disk

    def add_policy(
        self,
        target_id: str,
        *,
        retention: int = 7,
        interval: str = "daily",
        next_invocation_at: int | None = None,
        target_type: str | None = None,
        id: str | None = None,
        total_size: float = 0.0,
        frequency: int = 1,
        growth: float = 0.0,
        paused: bool = False,
    ) -> FakePolicy:
        """Adds a backup policy on a disk or VM (type inferred from the id if not given) and returns it."""
        self._check_index()
        if target_type is None:
            if target_id in self.disks:
                target_type = "Disk"
            elif target_id in self.vms:
                target_type = "VirtualMachine"
            else:
                raise ValueError(f"unknown policy target {target_id!r}")
        policy_id = id if id is not None else self._new_id("dbp")
        if policy_id in self.policies:
            raise ValueError(f"duplicate policy id {policy_id!r}")
        policy = FakePolicy(
            id=policy_id,
            target_type=target_type,
            target_id=target_id,
            retention=retention,
            interval=interval,
            next_invocation_at=next_invocation_at,
            total_size=total_size,
            frequency=frequency,
            growth=growth,
            paused=paused,
        )
        self._validate_policy(policy)
        self.policies[policy.id] = policy
        self._index_policy(policy)
        self._indexed_sizes = self._sizes()
        return policy

    def run_schedule(self, policy: FakePolicy) -> FakePolicy:
        """Returns the policy after the runs its schedule has made by `schedule_clock()`: each run moves
        next_invocation_at on by interval × frequency and adds `growth` to total_size (nothing without a clock)."""
        if self.schedule_clock is None or policy.paused or policy.next_invocation_at is None:
            return policy
        now = self.schedule_clock()
        if policy.next_invocation_at > now:
            return policy
        period = _INTERVAL_SECONDS[policy.interval] * policy.frequency
        runs = int((now - policy.next_invocation_at) // period) + 1
        policy.next_invocation_at += runs * period
        policy.total_size = round(policy.total_size + runs * policy.growth, 6)
        return policy

    def visible_orgs(self) -> list[FakeOrg]:
        """Returns the organizations the token sees (GET /organizations), in insertion order."""
        return [org for org in self.orgs.values() if org.visible]

    def _validate_policy(self, policy: FakePolicy) -> None:
        if policy.target_type not in TARGET_TYPES:
            choices = ", ".join(TARGET_TYPES)
            raise ValueError(f"target_type must be one of {choices}, not {policy.target_type!r}")
        targets: dict[str, Any] = self.disks if policy.target_type == "Disk" else self.vms
        if policy.target_id not in targets:
            raise ValueError(f"unknown {policy.target_type} target {policy.target_id!r}")
        if policy.interval not in INTERVALS:
            raise ValueError(f"interval must be one of {', '.join(INTERVALS)}, not {policy.interval!r}")
        if isinstance(policy.frequency, bool) or not isinstance(policy.frequency, int) or policy.frequency < 1:
            raise ValueError(f"frequency must be a whole number of at least 1, not {policy.frequency!r}")
        if policy.growth < 0:
            raise ValueError(f"growth must be at least 0, not {policy.growth!r}")

    def remove_policy(self, policy_id: str) -> FakePolicy:
        """Removes a policy and returns it."""
        self._check_index()
        policy = self.policies.pop(policy_id)
        self._unindex_policy(policy)
        self._indexed_sizes = self._sizes()
        return policy

    def remove_disk(self, disk_id: str) -> FakeDisk:
        """Removes a disk and its disk-level policies (as deleting a disk does) and returns it."""
        self._check_index()
        for policy_id in list(self._disk_policies.get(disk_id)):
            self.remove_policy(policy_id)
        disk = self.disks[disk_id]
        self._unindex_disk(disk)
        del self.disks[disk_id]
        self._indexed_sizes = self._sizes()
        return disk

    def update_policy(self, policy_id: str, **changes: Any) -> FakePolicy:
        """Changes fields of a policy in place (re-indexing it if its target moves) and returns it."""
        self._check_index()
        policy = self.policies[policy_id]
        allowed = {f.name for f in fields(FakePolicy)} - {"id"}
        unknown = sorted(set(changes) - allowed)
        if unknown:
            raise ValueError(f"unknown policy field(s): {', '.join(unknown)}")
        self._unindex_policy(policy)
        before = {name: getattr(policy, name) for name in changes}
        for name, value in changes.items():
            setattr(policy, name, value)
        try:
            self._validate_policy(policy)
        except ValueError:
            for name, value in before.items():
                setattr(policy, name, value)
            raise
        finally:
            self._index_policy(policy)
        return policy

    def move_disk(self, disk_id: str, vm_id: str | None, *, attachment: str = "attached") -> FakeDisk:
        """Assigns a disk to another VM (or to none), `attachment` to it, and returns it."""
        self._check_index()
        _check_attachment(attachment)
        if vm_id is not None and vm_id not in self.vms:
            raise ValueError(f"unknown virtual machine {vm_id!r}")
        disk = self.disks[disk_id]
        self._unindex_disk(disk)
        disk.vm_id, disk.attachment = vm_id, attachment
        self._index_disk(disk)
        return disk

    def set_attachment(self, disk_id: str, attachment: str, *, attach_on_boot: bool | None = None) -> FakeDisk:
        """Attaches or detaches a disk from the VM it is assigned to and returns it."""
        _check_attachment(attachment)
        disk = self.disks[disk_id]
        disk.attachment = attachment
        if attach_on_boot is not None:
            disk.attach_on_boot = attach_on_boot
        return disk

    def set_annotations(self, object_id: str, annotations: Mapping[str, str]) -> FakeDisk | FakeVM:
        """Replaces the annotations of a disk or VM with a copy of `annotations` and returns the object."""
        target: FakeDisk | FakeVM | None = self.disks.get(object_id)
        if target is None:
            target = self.vms.get(object_id)
        if target is None:
            raise ValueError(f"unknown disk or virtual machine {object_id!r}")
        target.annotations = _checked_annotations(annotations)
        return target

    # ----------------------------------------------------------------- queries (used by the app)

    def org_by_sub_domain(self, sub_domain: str) -> FakeOrg | None:
        """Returns the organization with this sub-domain, if any."""
        self._check_index()
        org_id = self._org_by_sub.get(sub_domain)
        return None if org_id is None else self.orgs.get(org_id)

    def vm_by_fqdn(self, fqdn: str) -> FakeVM | None:
        """Returns the VM with this FQDN, if any."""
        self._check_index()
        vm_id = self._vm_by_fqdn.get(fqdn)
        return None if vm_id is None else self.vms.get(vm_id)

    def disk_ids_of_org(self, org_id: str) -> list[str]:
        """Returns the ids of an organization's disks in insertion order (shared list: do not mutate)."""
        self._check_index()
        return self._org_disks.get(org_id)

    def vm_ids_of_org(self, org_id: str) -> list[str]:
        """Returns the ids of an organization's VMs in insertion order (shared list: do not mutate)."""
        self._check_index()
        return self._org_vms.get(org_id)

    def disk_ids_of_vm(self, vm_id: str) -> list[str]:
        """Returns the ids of the disks attached to a VM."""
        self._check_index()
        return self._vm_disks.get(vm_id)

    def policy_ids_of_org(self, org_id: str) -> list[str]:
        """Returns the ids of every policy (disk- and VM-targeted) of an organization (shared list)."""
        self._check_index()
        return self._org_policies.get(org_id)

    def policy_ids_of_disk(self, disk_id: str) -> list[str]:
        """Returns the ids of the policies whose target is this disk (shared list)."""
        self._check_index()
        return self._disk_policies.get(disk_id)

    def policy_ids_of_vm(self, vm_id: str, *, include_disks: bool = False) -> list[str]:
        """Returns the ids of the policies targeting this VM, plus its disks' own if `include_disks`."""
        self._check_index()
        ids = self._vm_policies.get(vm_id)
        if not include_disks:
            return ids
        combined = list(ids)
        for disk_id in self._vm_disks.get(vm_id):
            combined.extend(self._disk_policies.get(disk_id))
        return combined

    def take_fault(self, object_id: str) -> Fault | None:
        """Returns the fault for a request looking up `object_id`, counting down `faults_remaining`."""
        fault = self.faults.get(object_id)
        if fault is None:
            return None
        remaining = self.faults_remaining.get(object_id)
        if remaining is None:
            return fault
        if remaining <= 1:
            self.faults.pop(object_id, None)
            self.faults_remaining.pop(object_id, None)
            return fault if remaining == 1 else None
        self.faults_remaining[object_id] = remaining - 1
        return fault

    # ----------------------------------------------------------------- rate limiting

    def permitted_now(self) -> int:
        """Returns the per-minute limit now in force, given `rate_limit_changes` and the requests served."""
        permitted = self.rate_limit_per_minute
        latest = -1
        for after, value in self.rate_limit_changes:
            if self.stats.total >= after > latest:
                latest, permitted = after, value
        return permitted

    def _window(self, token: str, now: float) -> collections.deque[float]:
        window = self._windows.get(token)
        if window is None:
            window = self._windows[token] = collections.deque()
        horizon = now - RATE_WINDOW_SECONDS
        while window and window[0] <= horizon:
            window.popleft()
        return window

    def admit(self, token: str, *, permitted: int) -> tuple[bool, int]:
        """Returns (admitted, remaining) for one request by `token`; a refused request uses no budget."""
        now = self.clock()
        window = self._window(token, now)
        if len(window) >= permitted:
            return False, 0
        window.append(now)
        return True, max(0, permitted - len(window))

    def remaining(self, token: str | None, *, permitted: int) -> int:
        """Returns how many requests `token` may still make in the current window, without using any."""
        if token is None or token not in self._windows:
            return permitted
        return max(0, permitted - len(self._window(token, self.clock())))

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_file(cls, path: str | Path, *, now: int | None = None) -> Fleet:
        """Returns the fleet described by a .json or .toml fleet file."""
        file = Path(path)
        suffix = file.suffix.lower()
        if suffix == ".toml":
            with file.open("rb") as handle:
                data: Any = tomllib.load(handle)
        elif suffix == ".json":
            data = json.loads(file.read_text(encoding="utf-8"))
        else:
            raise ValueError(f"{file}: fleet files must be .json or .toml, not {suffix or 'no suffix'!r}")
        if not isinstance(data, dict):
            raise ValueError(f"{file}: the top level must be a table/object")
        return cls.from_dict(data, now=now)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, now: int | None = None) -> Fleet:
        """Returns the fleet a parsed fleet file describes; relative times count from `now` or the clock."""
        load_time = int(time.time()) if now is None else now
        _check_keys(data, _TOP_KEYS, "")
        if "generate" in data:
            spec = _table(data["generate"], "generate")
            _check_keys(spec, _GENERATE_KEYS, "generate")
            fleet = cls.generate(
                disks=_int(spec.get("disks"), "generate.disks", minimum=0),
                orgs=_int(spec.get("orgs", 1), "generate.orgs", minimum=1),
                policies_per_disk=_number(spec.get("policies_per_disk", 1.0), "generate.policies_per_disk"),
                vm_share=_number(spec.get("vm_share", 0.2), "generate.vm_share"),
                seed=_int(spec.get("seed", 0), "generate.seed"),
                now=load_time,
                annotations=(
                    None
                    if "annotations" not in spec
                    else _list(spec["annotations"], "generate.annotations")
                ),
            )
        else:
            fleet = cls()
        if "tokens" in data:
            tokens = _list(data["tokens"], "tokens")
            fleet.tokens = {_str(token, f"tokens[{i}]") for i, token in enumerate(tokens)}
        if "write_tokens" in data:
            tokens = _list(data["write_tokens"], "write_tokens")
            fleet.write_tokens = {_str(token, f"write_tokens[{i}]") for i, token in enumerate(tokens)}
        if "rate_limit_per_minute" in data:
            limit = _int(data["rate_limit_per_minute"], "rate_limit_per_minute", minimum=1)
            fleet.rate_limit_per_minute = limit
        if "latency_ms" in data:
            fleet.latency = _number(data["latency_ms"], "latency_ms", minimum=0.0) / 1000.0
        if "slow_seconds" in data:
            fleet.slow_seconds = _number(data["slow_seconds"], "slow_seconds", minimum=0.0)
        if "list_annotations" in data:
            fleet.list_annotations = _bool(data["list_annotations"], "list_annotations")
        if _bool(data.get("run_schedules", False), "run_schedules"):
            fleet.schedule_clock = time.time
        if "policy_target_shape" in data:
            shape = _str(data["policy_target_shape"], "policy_target_shape")
            if shape not in TARGET_SHAPES:
                raise ValueError(f"policy_target_shape: one of {', '.join(TARGET_SHAPES)}, not {shape!r}")
            fleet.policy_target_shape = shape
        if "retry_after" in data:
            fleet.retry_after = _number(data["retry_after"], "retry_after", minimum=0.0)
        if "rate_limit_changes" in data:
            changes = []
            for i, pair in enumerate(_list(data["rate_limit_changes"], "rate_limit_changes")):
                where = f"rate_limit_changes[{i}]"
                items = _list(pair, where)
                if len(items) != 2:
                    raise ValueError(f"{where}: expected [after, permitted], got {len(items)} item(s)")
                changes.append(
                    (_int(items[0], f"{where}[0]", minimum=0), _int(items[1], f"{where}[1]", minimum=1))
                )
            fleet.rate_limit_changes = changes
        _load_organizations(fleet, _list(data.get("organizations", []), "organizations"), now=load_time)
        for object_id, value in _table(data.get("faults", {}), "faults").items():
            fleet.faults[object_id] = _fault(value, f"faults.{object_id}")
        for object_id, value in _table(data.get("faults_remaining", {}), "faults_remaining").items():
            fleet.faults_remaining[object_id] = _int(value, f"faults_remaining.{object_id}", minimum=0)
        return fleet

    # ----------------------------------------------------------------- generation

    @classmethod
    def generate(
        cls,
        *,
        disks: int,
        orgs: int = 1,
        policies_per_disk: float = 1.0,
        vm_share: float = 0.2,
        now: int,
        seed: int = 0,
        annotations: Sequence[Mapping[str, Any]] | None = None,
    ) -> Fleet:
        """Returns a deterministic fleet whose policies all comply with the default rules.

        `vm_share` of the disks sit in pairs on VMs protected by VM-level policies only; the others carry
        `policies_per_disk` disk-level policies on average (daily keeping 7..30, or hourly keeping 168..336).

        `annotations` is a list of `{"share": 0.2, "disk": {key: value, ...}}` or `{"share": 0.1, "vm": {...}}`:
        that share of the disks (or VMs), picked from the seed, get those annotations. Entries of one kind take
        disjoint picks in order (each object gets at most one disk entry / one VM entry), so their shares may add
        up to at most 1. The picks use their own random stream: ids and policies are the same as without them.
        """
        if disks < 0 or orgs < 1:
            raise ValueError("generate needs disks >= 0 and orgs >= 1")
        if not 0.0 <= vm_share <= 1.0:
            raise ValueError("generate.vm_share must be between 0 and 1")
        if policies_per_disk < 0:
            raise ValueError("generate.policies_per_disk must be >= 0")
        shares = _annotation_shares(annotations, "generate.annotations")
        rng = random.Random(seed)
        fleet = cls()
        org_list = [
            fleet.add_org(
                f"fleet-{i + 1}", id=fake_id("org", f"gen:{seed}:{i}"), name=f"Generated Org {i + 1}"
            )
            for i in range(orgs)
        ]
        whole, fraction = divmod(policies_per_disk, 1.0)

        def policy_count() -> int:
            return int(whole) + (1 if fraction and rng.random() < fraction else 0)

        def add_policies(target_id: str, count: int) -> None:
            for _ in range(count):
                if rng.random() < 0.2:
                    interval, retention = "hourly", rng.randint(168, 336)
                else:
                    interval, retention = "daily", rng.randint(7, 30)
                fleet.add_policy(
                    target_id,
                    id=fake_id("dbp", f"gen:{seed}:{len(fleet.policies)}"),
                    retention=retention,
                    interval=interval,
                    next_invocation_at=now + rng.randint(60, _INTERVAL_SECONDS[interval]),
                    total_size=round(rng.uniform(0.5, 500.0), 2),
                )

        attached = set(rng.sample(range(disks), round(disks * vm_share)))
        open_vm: dict[str, FakeVM] = {}  # org id -> VM with one free slot (VMs get two disks each)
        for i in range(disks):
            org = org_list[i % orgs]
            vm: FakeVM | None = None
            name = f"disk-{i + 1:05d}"
            if i in attached:
                vm = open_vm.pop(org.id, None)
                if vm is None:
                    number = len(fleet.vms) + 1
                    fqdn = f"vm-{number:05d}.{org.sub_domain}.example.com"
                    vm = fleet.add_vm(org.id, fqdn, id=fake_id("vm", f"gen:{seed}:{number}"))
                    open_vm[org.id] = vm
                    add_policies(vm.id, policy_count())
                    name = f"{vm.name}-system"
                else:
                    name = f"{vm.name}-data"
            disk = fleet.add_disk(
                org.id,
                name,
                id=fake_id("disk", f"gen:{seed}:{i}"),
                vm_id=None if vm is None else vm.id,
                size_in_gb=rng.choice((10, 20, 40, 80, 160, 320)),
            )
            if vm is None:
                add_policies(disk.id, policy_count())
        if shares:
            _annotate_generated(fleet, shares, seed=seed)
        return fleet


# ------------------------------------------------------------------- fleet-file validation

_TOP_KEYS = frozenset(
    {
        "tokens",
        "write_tokens",
        "rate_limit_per_minute",
        "latency_ms",
        "slow_seconds",
        "retry_after",
        "rate_limit_changes",
        "faults",
        "faults_remaining",
        "organizations",
        "generate",
        "list_annotations",
        "run_schedules",
        "policy_target_shape",
    }
)
_GENERATE_KEYS = frozenset({"disks", "orgs", "policies_per_disk", "vm_share", "seed", "annotations"})
_ANNOTATION_SHARE_KEYS = frozenset({"share", "disk", "vm"})
_ORG_KEYS = frozenset({"id", "sub_domain", "name", "visible", "virtual_machines", "disks", "policies"})
_VM_KEYS = frozenset({"id", "fqdn", "annotations"})
_DISK_KEYS = frozenset({"id", "name", "vm", "size_in_gb", "state", "wwn", "annotations", "attachment",
                        "attach_on_boot"})
_POLICY_KEYS = frozenset(
    {
        "id",
        "target_type",
        "target_id",
        "retention",
        "interval",
        "next_invocation_at",
        "next_in_seconds",
        "total_size",
        "frequency",
        "growth",
        "paused",
    }
)


def _where(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _check_keys(table: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ValueError(f"{_where(where, str(key))}: unknown key")


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a table/object, got {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _check_attachment(value: str) -> None:
    if value not in ATTACHMENT_STATES:
        raise ValueError(f"attachment must be one of {', '.join(ATTACHMENT_STATES)}, not {value!r}")


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {type(value).__name__}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where}: expected true or false, got {type(value).__name__}")
    return value


def _annotations(value: Any, where: str) -> dict[str, str]:
    """Returns an `annotations` table of a fleet file: string keys to string values."""
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a table/object of strings, got {type(value).__name__}")
    return _checked_annotations(value, where)


@dataclass(frozen=True)
class _AnnotationShare:
    """One `generate.annotations` entry: `share` of the generated disks or VMs get `annotations`."""

    share: float
    kind: str  # "disk" | "vm"
    annotations: dict[str, str]


def _annotation_shares(value: Any, where: str) -> list[_AnnotationShare]:
    """Returns the validated `generate.annotations` entries (shares of one kind add up to at most 1)."""
    if value is None:
        return []
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
    shares: list[_AnnotationShare] = []
    totals = {"disk": 0.0, "vm": 0.0}
    for i, raw in enumerate(value):
        entry_where = f"{where}[{i}]"
        if not isinstance(raw, Mapping):
            raise ValueError(f"{entry_where}: expected a table/object, got {type(raw).__name__}")
        entry = dict(raw)
        _check_keys(entry, _ANNOTATION_SHARE_KEYS, entry_where)
        share = _number(_required(entry, "share", entry_where), f"{entry_where}.share", minimum=0.0)
        if share > 1.0:
            raise ValueError(f"{entry_where}.share: must be <= 1, got {share:g}")
        kinds = [kind for kind in ("disk", "vm") if kind in entry]
        if len(kinds) != 1:
            raise ValueError(f"{entry_where}: give exactly one of disk or vm")
        kind = kinds[0]
        annotations = _checked_annotations(entry[kind], f"{entry_where}.{kind}")
        totals[kind] += share
        if totals[kind] > 1.0 + 1e-9:
            raise ValueError(f"{entry_where}.share: the {kind} shares add up to {totals[kind]:g}, more than 1")
        shares.append(_AnnotationShare(share=share, kind=kind, annotations=annotations))
    return shares


def _annotate_generated(fleet: Fleet, shares: list[_AnnotationShare], *, seed: int) -> None:
    """Gives each `shares` entry its share of the generated disks or VMs (disjoint picks, from the seed)."""
    # A stream of its own, so the fleet's ids, sizes and policies do not depend on the annotations asked for.
    rng = random.Random(f"generate.annotations:{seed}")
    for kind in ("disk", "vm"):
        objects: list[FakeDisk] | list[FakeVM] = (
            list(fleet.disks.values()) if kind == "disk" else list(fleet.vms.values())
        )
        order = list(range(len(objects)))
        rng.shuffle(order)
        cumulative = 0.0
        start = 0
        for entry in shares:
            if entry.kind != kind:
                continue
            cumulative += entry.share
            # Rounding the running total (not each share) keeps the picks disjoint and their sizes exact.
            end = min(len(order), round(len(order) * cumulative))
            for index in order[start:end]:
                objects[index].annotations = dict(entry.annotations)
            start = end


def _int(value: Any, where: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: expected an integer, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}: must be >= {minimum}, got {value}")
    return value


def _number(value: Any, where: str, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: expected a number, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}: must be >= {minimum}, got {value}")
    return float(value)


def _fault(value: Any, where: str) -> Fault:
    text = _str(value, where)
    try:
        return Fault(text)
    except ValueError:
        choices = ", ".join(fault.value for fault in Fault)
        raise ValueError(f"{where}: unknown fault {text!r} (one of {choices})") from None


def _required(table: dict[str, Any], key: str, where: str) -> Any:
    if key not in table:
        raise ValueError(f"{_where(where, key)}: missing")
    return table[key]


@contextlib.contextmanager
def _located(where: str) -> Iterator[None]:
    """Prefixes a builder's ValueError with the fleet-file location."""
    try:
        yield
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _load_organizations(fleet: Fleet, organizations: Iterable[Any], *, now: int) -> None:
    """Adds the organizations of a fleet file (all VMs and disks first, so policies may point anywhere)."""
    pending: list[tuple[str, dict[str, Any]]] = []
    for i, raw_org in enumerate(organizations):
        where = f"organizations[{i}]"
        org_table = _table(raw_org, where)
        _check_keys(org_table, _ORG_KEYS, where)
        org_id = _str(_required(org_table, "id", where), f"{where}.id")
        sub_domain = _str(_required(org_table, "sub_domain", where), f"{where}.sub_domain")
        org_name = _str(org_table.get("name", ""), f"{where}.name")
        visible = _bool(org_table.get("visible", True), f"{where}.visible")
        with _located(where):
            fleet.add_org(sub_domain, id=org_id, name=org_name).visible = visible
        for j, raw_vm in enumerate(_list(org_table.get("virtual_machines", []), f"{where}.virtual_machines")):
            vm_where = f"{where}.virtual_machines[{j}]"
            vm_table = _table(raw_vm, vm_where)
            _check_keys(vm_table, _VM_KEYS, vm_where)
            vm_id = _str(_required(vm_table, "id", vm_where), f"{vm_where}.id")
            fqdn = _str(_required(vm_table, "fqdn", vm_where), f"{vm_where}.fqdn")
            vm_annotations = _annotations(vm_table.get("annotations", {}), f"{vm_where}.annotations")
            with _located(vm_where):
                fleet.add_vm(org_id, fqdn, id=vm_id, annotations=vm_annotations)
        for j, raw_disk in enumerate(_list(org_table.get("disks", []), f"{where}.disks")):
            disk_where = f"{where}.disks[{j}]"
            _load_disk(fleet, _table(raw_disk, disk_where), org_id=org_id, where=disk_where)
        for j, raw_policy in enumerate(_list(org_table.get("policies", []), f"{where}.policies")):
            pending.append((f"{where}.policies[{j}]", _table(raw_policy, f"{where}.policies[{j}]")))
    for where, table in pending:
        _load_policy(fleet, table, now=now, where=where)


def _load_disk(fleet: Fleet, table: dict[str, Any], *, org_id: str, where: str) -> None:
    """Adds one disk of a fleet file."""
    _check_keys(table, _DISK_KEYS, where)
    disk_id = _str(_required(table, "id", where), f"{where}.id")
    name = _str(table.get("name", ""), f"{where}.name")
    vm_ref = table.get("vm")
    vm_id = None if vm_ref is None else _str(vm_ref, f"{where}.vm")
    size = _int(table.get("size_in_gb", 20), f"{where}.size_in_gb", minimum=1)
    state = _str(table.get("state", "attached"), f"{where}.state")
    wwn = None if "wwn" not in table else _str(table["wwn"], f"{where}.wwn")
    annotations = _annotations(table.get("annotations", {}), f"{where}.annotations")
    attachment = _str(table.get("attachment", "attached"), f"{where}.attachment")
    attach_on_boot = _bool(table.get("attach_on_boot", True), f"{where}.attach_on_boot")
    with _located(where):
        fleet.add_disk(
            org_id,
            name,
            id=disk_id,
            vm_id=vm_id,
            size_in_gb=size,
            state=state,
            wwn=wwn,
            annotations=annotations,
            attachment=attachment,
            attach_on_boot=attach_on_boot,
        )


def _load_policy(fleet: Fleet, table: dict[str, Any], *, now: int, where: str) -> None:
    """Adds one policy of a fleet file; `next_in_seconds` counts from `now`."""
    _check_keys(table, _POLICY_KEYS, where)
    if "next_invocation_at" in table and "next_in_seconds" in table:
        raise ValueError(f"{where}: give next_invocation_at or next_in_seconds, not both")
    next_at: int | None = None
    if table.get("next_invocation_at") is not None:
        next_at = _int(table["next_invocation_at"], f"{where}.next_invocation_at")
    elif "next_in_seconds" in table:
        next_at = now + _int(table["next_in_seconds"], f"{where}.next_in_seconds")
    policy_id = _str(_required(table, "id", where), f"{where}.id")
    target_type = _str(_required(table, "target_type", where), f"{where}.target_type")
    target_id = _str(_required(table, "target_id", where), f"{where}.target_id")
    retention = _int(_required(table, "retention", where), f"{where}.retention", minimum=0)
    interval = _str(_required(table, "interval", where), f"{where}.interval")
    total_size = _number(table.get("total_size", 0.0), f"{where}.total_size", minimum=0.0)
    frequency = _int(table.get("frequency", 1), f"{where}.frequency", minimum=1)
    growth = _number(table.get("growth", 0.0), f"{where}.growth", minimum=0.0)
    paused = _bool(table.get("paused", False), f"{where}.paused")
    with _located(where):
        fleet.add_policy(
            target_id,
            id=policy_id,
            target_type=target_type,
            retention=retention,
            interval=interval,
            next_invocation_at=next_at,
            total_size=total_size,
            frequency=frequency,
            growth=growth,
            paused=paused,
        )


# ------------------------------------------------------------------- the demo fleet

# Where the next run falls for a healthy policy, by interval (keeps the demo's schedules in the future).
_DEMO_NEXT_IN = {"hourly": 20 * 60, "daily": 5 * 3600, "weekly": 3 * 86400, "monthly": 10 * 86400}


def demo_fleet(*, now: int) -> tuple[Fleet, DemoTargets]:
    """Returns the demo fleet (every default rule fires somewhere) and what the demo configuration audits."""
    fleet = Fleet()
    demo = fleet.add_org("demo", id=fake_id("org", "demo"), name="Demo Ltd")
    partner = fleet.add_org("partner", id=fake_id("org", "partner"), name="Partner Co")

    def vm(org: FakeOrg, host: str) -> FakeVM:
        return fleet.add_vm(org.id, f"{host}.{org.sub_domain}.example.com", id=fake_id("vm", f"demo:{host}"))

    def disk(org: FakeOrg, name: str, *, on: FakeVM | None = None, size: int = 20) -> FakeDisk:
        vm_id = None if on is None else on.id
        return fleet.add_disk(org.id, name, id=fake_id("disk", f"demo:{name}"), vm_id=vm_id, size_in_gb=size)

    def annotate(name_or_host: str, annotations: dict[str, str]) -> None:
        # Annotations change no finding by themselves; a configuration with backup tiers has these to match.
        by_name = {d.name: d.id for d in fleet.disks.values()} | {v.name: v.id for v in fleet.vms.values()}
        fleet.set_annotations(by_name[name_or_host], annotations)

    def policy(
        target: FakeDisk | FakeVM,
        key: str,
        retention: int,
        interval: str = "daily",
        *,
        next_at: int | None = None,
    ) -> FakePolicy:
        return fleet.add_policy(
            target.id,
            id=fake_id("dbp", f"demo:{key}"),
            retention=retention,
            interval=interval,
            next_invocation_at=now + _DEMO_NEXT_IN[interval] if next_at is None else next_at,
            total_size=round(retention * 1.75, 2),
        )

    # Compliant: system disks of VMs with disk-level policies, and standalone volumes.
    hosts: dict[str, FakeVM] = {}
    for host, retention in (("web-1", 14), ("web-2", 14), ("web-3", 14), ("app-1", 21), ("app-2", 21)):
        hosts[host] = vm(demo, host)
        policy(disk(demo, f"{host}-system", on=hosts[host]), f"{host}-system", retention)
    policy(disk(demo, "app-1-data", on=hosts["app-1"], size=160), "app-1-data", 30)
    policy(disk(demo, "ldap-1-system", on=vm(demo, "ldap-1")), "ldap-1-system", 14)
    policy(disk(demo, "vpn-gateway-system", on=vm(demo, "vpn-gateway")), "vpn-gateway-system", 14)
    dns_1 = disk(demo, "dns-1-system", on=vm(demo, "dns-1"), size=10)
    policy(dns_1, "dns-1-system", 7)  # exactly the minimum
    for name, retention, interval, size in (
        ("shared-uploads", 30, "daily", 320),
        ("mail-store", 168, "hourly", 80),  # 168 hourly backups: exactly the 7-day window
        ("git-repos", 7, "daily", 40),
        ("monitoring-tsdb", 336, "hourly", 160),
        ("wiki-data", 10, "daily", 20),
        ("backup-staging", 14, "daily", 320),
        ("analytics-warehouse", 14, "daily", 320),
        ("media-assets", 21, "daily", 160),
    ):
        policy(disk(demo, name, size=size), name, retention, interval)

    # One finding kind each.
    disk(demo, "scratch-space", size=40)  # unprotected-disk
    disk(demo, "tmp-import", size=10)  # unprotected-disk
    policy(disk(demo, "legacy-db-data", size=80), "legacy-db-data", 3)  # below minimum and window too short
    policy(disk(demo, "metrics-cache"), "metrics-cache", 10, "hourly")  # 10 hours: window too short only
    policy(disk(demo, "archive-weekly", size=320), "archive-weekly", 8, "weekly")  # interval too infrequent
    policy(disk(demo, "cold-archive", size=320), "cold-archive", 12, "monthly")  # interval too infrequent
    policy(disk(demo, "reports-data"), "reports-data", 14, next_at=now - 3 * 3600)  # schedule stale

    # A VM-level policy is the only protection of the VM's two disks.
    db_1 = vm(demo, "db-1")
    disk(demo, "db-1-system", on=db_1)
    disk(demo, "db-1-data", on=db_1, size=160)
    policy(db_1, "db-1-vm", 14)

    # A disk left assigned to a VM but detached from it: the VM policy does not back it up (detached-from-covering-vm).
    batch_1 = vm(demo, "batch-1")
    disk(demo, "batch-1-system", on=batch_1)
    fleet.set_attachment(disk(demo, "batch-1-old-data", on=batch_1, size=80).id, "detached", attach_on_boot=False)
    policy(batch_1, "batch-1-vm", 14)

    # 25 policies on one disk (three pages at per_page 10); one on the last page keeps too few backups.
    busy = disk(demo, "busy-volume", size=80)
    for n in range(25):
        policy(busy, f"busy-volume-{n:02d}", 5 if n == 22 else 7 + n)

    # One good and one bad policy on the same disk.
    mixed = disk(demo, "mixed-volume", size=40)
    policy(mixed, "mixed-volume-good", 14)
    policy(mixed, "mixed-volume-bad", 24, "hourly")  # one day of hourly backups: window too short

    # The partner organization is audited disk by disk, not as a whole.
    partner_web = disk(partner, "partner-web-system")
    policy(partner_web, "partner-web-system", 14)
    partner_db = disk(partner, "partner-db-data", size=80)
    policy(partner_db, "partner-db-data", 5)
    trashed = disk(partner, "partner-old-volume")
    fleet.faults[trashed.id] = Fault.IN_TRASH
    missing = fake_id("disk", "demo:deleted-volume")  # never added: 404 disk_not_found

    # A few labelled objects: two gold-tier volumes (one keeping only 14 daily backups) and a dev VM whose system
    # disk says so too. Everything else stays unannotated.
    annotate("shared-uploads", {"backup-tier": "gold"})
    annotate("analytics-warehouse", {"backup-tier": "gold", "team": "data"})
    annotate("web-3", {"env": "dev"})
    annotate("web-3-system", {"env": "dev"})

    targets = DemoTargets(disks=[partner_web.id, partner_db.id, missing, trashed.id], organizations=[demo.id])
    return fleet, targets
