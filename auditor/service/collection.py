"""The audit cycle's collection: every target read, every disk's tier decided and every disk judged, each disk
inside its own fault boundary.

Whatever goes wrong with one disk — an API error, a malformed or unexpected response, a bug in a rule — makes that
disk `unknown` with an error code and leaves every other disk's verdict alone. `cycle.run_cycle` records it.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

from auditor.config import EVERY_ORGANIZATION
from auditor.domain.invocations import PolicySchedule
from auditor.domain.lifecycle import Change
from auditor.domain.models import (
    Attachment,
    BackupPolicy,
    Disk,
    DiskSnapshot,
    Finding,
    FindingStatus,
    ReadOutcome,
    TargetType,
    VirtualMachine,
)
from auditor.domain.records import RunError, RunStatus
from auditor.domain.rules import RuleSet, evaluate
from auditor.domain.tiers import (
    DEFAULTS,
    DISK_SIDE,
    NO_VM,
    VM_SIDE,
    Annotations,
    DiskFacts,
    Selector,
    Tier,
    Unknown,
    decide,
    needs,
)
from auditor.errors import (
    InTrashError,
    KatapultError,
    KatapultResponseError,
    NotFoundError,
)
from auditor.katapult import KatapultClient, OrgRef
from auditor.service.clock import utcnow
from auditor.service.configuration import Targets
from auditor.store.writes import DiskWrite
from auditor.vocabulary import DiskVerdict

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
Progress = Callable[[int, int], None]


async def _bounded_map(fn: Callable[[T], Awaitable[R]], items: Sequence[T], *, limit: int,
                       progress: Callable[[], None] | None = None) -> list[R]:
    """Returns fn(item) for every item, at most `limit` at a time, in order (workers, not a task per item)."""
    results: list[Any] = [None] * len(items)
    iterator = iter(enumerate(items))

    async def worker() -> None:
        for index, item in iterator:
            results[index] = await fn(item)
            if progress:
                progress()

    await asyncio.gather(*(worker() for _ in range(max(1, min(limit, len(items))))))
    return results


def _error_of(exc: KatapultError, target: str) -> RunError:
    return RunError(target=target, code=exc.code, message=_safe(str(exc))[:500])


INTERNAL_ERROR = "internal_error"
UNEXPECTED_OBJECT = "unexpected_object"
# A disk whose only coverage is a VM policy, when whether it is attached to that VM cannot be told.
ATTACHMENT_UNKNOWN = "attachment_unknown"
# A disk of an organization GET /organizations no longer lists (audit.organizations = ["*"]).
ORGANIZATION_NOT_VISIBLE = "organization_not_visible"
DEFAULT_ATTACHMENT_REFRESH = timedelta(hours=24)


def internal_error(exc: BaseException, *, where: str) -> tuple[str, str]:
    """Returns (code, message) for an unexpected exception inside a fault boundary (logged whole once)."""
    log.error("%s: unexpected %s: %s", where, type(exc).__name__, _safe(str(exc)), exc_info=exc)
    return INTERNAL_ERROR, f"{where}: internal error ({type(exc).__name__}: {_safe(str(exc))})"[:500]


def _safe(text: str) -> str:
    """Returns text fit for storage: valid UTF-8 (lone surrogates replaced), no NUL, at most 300 characters."""
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")[:300]


def _failed_snapshot(disk: Disk, exc: KatapultError) -> DiskSnapshot:
    # 404 disk_not_found and 406 object_in_trash are definite answers about the disk; anything else (5xx after
    # retries, timeouts, 403, a malformed body, a VM lookup failing) leaves the disk without a verdict.
    message = _safe(str(exc))
    if isinstance(exc, NotFoundError) and exc.code == "disk_not_found":
        return DiskSnapshot(disk, ReadOutcome.NOT_FOUND, error_code=exc.code, error_message=message)
    if isinstance(exc, InTrashError):
        return DiskSnapshot(disk, ReadOutcome.IN_TRASH, error_code=exc.code, error_message=message,
                            detail=dict(exc.detail))
    return DiskSnapshot(disk, ReadOutcome.UNKNOWN, error_code=exc.code, error_message=message)


def unknown_snapshot(disk_id: str, code: str, message: str) -> DiskSnapshot:
    """Returns the snapshot of a disk without a verdict."""
    return DiskSnapshot(Disk(disk_id), ReadOutcome.UNKNOWN, error_code=code, error_message=message[:500])


VmPolicies = Callable[[str], Awaitable[list[BackupPolicy]]]


def once_per_key(read: Callable[[str], Awaitable[T]]) -> Callable[[str], Awaitable[T]]:
    """Returns `read` asked at most once per key (per cycle): concurrent callers share the answer or the
    KatapultError, so a failure is not asked again either."""
    done: dict[str, T | KatapultError] = {}
    locks: dict[str, asyncio.Lock] = {}

    async def shared(key: str) -> T:
        async with locks.setdefault(key, asyncio.Lock()):
            if key not in done:
                try:
                    done[key] = await read(key)
                except KatapultError as exc:
                    done[key] = exc
        result = done[key]
        if isinstance(result, KatapultError):
            raise result
        return result

    return shared


def shared_vm_policies(client: KatapultClient) -> VmPolicies:
    """Returns a reader of VM policies that asks Katapult once per VM, however many of its disks are audited.

    Failures are kept too: a VM whose policies cannot be read makes each of its disks unknown without asking again.
    """
    return once_per_key(client.list_vm_policies)


async def read_disk(client: KatapultClient, disk_id: str, *, vm_policies: VmPolicies | None = None) -> DiskSnapshot:
    """Returns one disk's snapshot through the per-disk endpoint.

    The per-disk list returns the policies that target the disk itself; the disk is then looked up and, if it is
    attached, its VM's policies are added (a policy on a VM covers its disks). The VM's policies are read even
    when the disk has its own: each covering policy is judged, so skipping them would hide a weak VM policy and
    give a different verdict than the org-wide join for the same disk. `vm_policies` (see `shared_vm_policies`)
    lets the disks of one VM share one read.
    """
    disk = Disk(id=disk_id)
    try:
        policies = await client.list_disk_policies(disk_id)
        disk = await client.get_disk(disk_id)
        if disk.id != disk_id:  # the client checks this too; a verdict must never land on another disk
            raise KatapultResponseError(f"asked for disk {disk_id}, Katapult answered about disk {disk.id}")
        for index, p in enumerate(policies):
            # The per-disk list holds the policies on this disk (and, if any, on its VM): anything else means the
            # response is about another object, and judging it would be judging the wrong disk.
            on_disk = p.target_type is TargetType.DISK and p.target_id == disk_id
            on_vm = p.target_type is TargetType.VIRTUAL_MACHINE and disk.vm_id is not None and p.target_id == disk.vm_id
            if not (on_disk or on_vm):
                return DiskSnapshot(
                    Disk(disk_id), ReadOutcome.UNKNOWN, error_code=UNEXPECTED_OBJECT,
                    error_message=_safe(f"disk_backup_policies[{index}] ({p.id}) targets {p.target_type.value} "
                                        f"{p.target_id}, not disk {disk_id} or its virtual machine"))
        if disk.vm_id:
            try:
                vm_list = await (vm_policies or client.list_vm_policies)(disk.vm_id)
            except KatapultError as exc:
                # Only the disk's own endpoints answer definitely about the disk: a 404 or 406 from its VM's policy
                # list is about the VM, so the disk is unknown, not "not found" or "in trash".
                return DiskSnapshot(disk, ReadOutcome.UNKNOWN, error_code=exc.code,
                                    error_message=_safe(f"virtual machine {disk.vm_id}: {exc}"))
            # Every policy of the VM's list targets the VM (the client refuses any other answer as
            # `unexpected_object`, and the disk is then unknown above): none is dropped here.
            seen = {p.id for p in policies}
            policies = [*policies, *(p for p in vm_list if p.id not in seen)]
        return DiskSnapshot(disk, ReadOutcome.OK, tuple(policies))
    except KatapultError as exc:
        return _failed_snapshot(Disk(disk_id) if disk.id != disk_id else disk, exc)
    except Exception as exc:  # the fault boundary: a bug reading one disk makes that disk unknown, nothing more
        code, message = internal_error(exc, where=f"reading disk {disk_id}")
        return unknown_snapshot(disk_id, code, message)


def join_org(disks: Iterable[Disk], policies: Iterable[BackupPolicy]) -> list[DiskSnapshot]:
    """Returns a snapshot per org disk: the policies targeting it plus those targeting the VM it is attached to."""
    by_disk: dict[str, list[BackupPolicy]] = {}
    by_vm: dict[str, list[BackupPolicy]] = {}
    for p in policies:
        index = by_disk if p.target_type is TargetType.DISK else by_vm
        index.setdefault(p.target_id, []).append(p)
    out = []
    for d in disks:
        covering = list(by_disk.get(d.id, ()))
        if d.vm_id:
            covering.extend(by_vm.get(d.vm_id, ()))
        out.append(DiskSnapshot(d, ReadOutcome.OK, tuple(covering)))
    return out


def vm_only(snap: DiskSnapshot) -> bool:
    """Returns whether the disk's only coverage is policies on the VM it is assigned to (so whether it is attached
    to that VM decides whether it is backed up at all)."""
    return (snap.disk.vm_id is not None and bool(snap.policies)
            and all(p.target_type is TargetType.VIRTUAL_MACHINE for p in snap.policies))


VmDisks = Callable[[str], Awaitable[dict[str, Attachment | None]]]
StoredAttachments = dict[str, tuple[str, Attachment]]


@dataclass(frozen=True, slots=True)
class AttachmentTruth:
    """How the cycle learns whether VM-assigned disks are attached: what was read before (by disk id: the VM it was
    read for and the attachment), how long that is trusted, `now` (the cycle's clock reading) and the audit
    interval (None: no spreading, every due VM is read at once)."""

    now: datetime
    known: StoredAttachments = field(default_factory=dict)
    refresh: timedelta = DEFAULT_ATTACHMENT_REFRESH
    interval: timedelta | None = None

    def stored(self, disk: Disk) -> Attachment | None:
        """Returns what was read of the disk's attachment to the VM it is assigned to now, if anything."""
        found = self.known.get(disk.id)
        return found[1] if found is not None and found[0] == disk.vm_id else None

    def verified_at(self, disk: Disk) -> datetime | None:
        """Returns when the disk's attachment to its current VM was read (None: never)."""
        stored = self.stored(disk)
        return None if stored is None else stored.verified_at

    def share(self, vms: int) -> int:
        """Returns how many of `vms` VMs may be read again in one cycle when their states fall due together: each
        VM once per refresh, spread over the cycles of one refresh period (at least one a cycle)."""
        if self.interval is None or self.interval >= self.refresh:
            return vms
        return max(1, math.ceil(vms * self.interval / self.refresh))

    def is_due(self, disk: Disk) -> bool:
        """Returns whether the disk's attachment must be read again: never read for its VM (new, or it moved), or
        read `refresh` ago or more."""
        stored = self.stored(disk)
        return stored is None or stored.verified_at is None or self.now - stored.verified_at >= self.refresh


async def verify_attachments(snaps: list[DiskSnapshot], vm_disks: VmDisks, truth: AttachmentTruth
                             ) -> list[DiskSnapshot]:
    """Returns an organization's snapshots with each VM-assigned disk's attachment, as far as it is known.

    Organization disk lists do not carry the attachment state (README), so `GET /virtual_machines/virtual_machine/
    disks` is read for each VM whose policies are the only coverage of one of its disks, when that disk's state is
    due (`AttachmentTruth.is_due`); every other disk keeps what was read before. A VM with such a disk never read
    for it (new, or the disk moved there) is read at once; VMs whose states merely aged past the refresh are read
    oldest first, at most their share per cycle (`AttachmentTruth.share`), so that states read together (the first
    cycle reads them all) are read again spread over the following cycles, not all in one. A disk covered only by
    its VM whose state cannot be read becomes unknown: "covered" is never assumed.
    """
    needing = [s for s in snaps if s.disk.vm_id and vm_only(s)]
    urgent = {s.disk.vm_id for s in needing if truth.verified_at(s.disk) is None}
    aged: dict[str, datetime] = {}
    for s in needing:
        at = truth.verified_at(s.disk)
        if s.disk.vm_id and s.disk.vm_id not in urgent and at is not None and truth.is_due(s.disk):
            aged[s.disk.vm_id] = min(at, aged.get(s.disk.vm_id, at))
    share = truth.share(len({s.disk.vm_id for s in needing}))
    due_vms = sorted(vm for vm in urgent if vm) + sorted(aged, key=lambda vm: (aged[vm], vm))[:share]
    answers = await asyncio.gather(*(vm_disks(vm_id) for vm_id in due_vms), return_exceptions=True)
    read: dict[str, dict[str, Attachment | None] | KatapultError] = {}
    for vm_id, answer in zip(due_vms, answers, strict=True):
        if isinstance(answer, KatapultError) or isinstance(answer, dict):
            read[vm_id] = answer
        else:
            raise answer
    out: list[DiskSnapshot] = []
    for snap in snaps:
        disk = snap.disk
        if disk.vm_id is None:
            out.append(snap)
            continue
        got = read.get(disk.vm_id)
        attachment = truth.stored(disk)
        if isinstance(got, dict):
            fresh = got.get(disk.id)
            attachment = None if fresh is None else replace(fresh, verified_at=truth.now)
        elif got is not None and vm_only(snap) and truth.is_due(disk):
            attachment = None  # due and unreadable: what was read before is too old to decide coverage
        # A VM due but beyond this cycle's share keeps what was read: it is read in one of the next cycles.
        if attachment is None and vm_only(snap):
            why = (f"{got.code}: {got}" if isinstance(got, KatapultError)
                   else "the virtual machine's disk list does not show it with an attachment state")
            out.append(DiskSnapshot(disk, ReadOutcome.UNKNOWN, error_code=(
                got.code if isinstance(got, KatapultError) else ATTACHMENT_UNKNOWN),
                error_message=_safe(f"disk {disk.id}: whether it is attached to virtual machine {disk.vm_id}, "
                                    f"whose policies are its only coverage, is not known: {why}")))
            continue
        out.append(replace(snap, disk=replace(disk, attachment=attachment)))
    return out


def stamp_attachment(snap: DiskSnapshot, *, now: datetime) -> DiskSnapshot:
    """Returns a disk read through the per-disk endpoints with its attachment stamped `now` (the lookup carries the
    state: no extra request); a disk covered only by its VM whose lookup carried no state becomes unknown."""
    if snap.outcome is not ReadOutcome.OK or snap.disk.vm_id is None:
        return snap
    attachment = snap.disk.attachment
    if attachment is None:
        if not vm_only(snap):
            return snap
        return DiskSnapshot(snap.disk, ReadOutcome.UNKNOWN, error_code=ATTACHMENT_UNKNOWN, error_message=_safe(
            f"disk {snap.disk_id}: the disk lookup carried no attachment state for virtual machine "
            f"{snap.disk.vm_id}, whose policies are its only coverage"))
    return replace(snap, disk=replace(snap.disk, attachment=replace(attachment, verified_at=now)))


TIER_UNKNOWN = "tier_unknown"
NOT_READ = Unknown("not read: no tier needs it")


VmLookup = Callable[[str], Awaitable[VirtualMachine]]


def shared_vm_lookups(client: KatapultClient) -> VmLookup:
    """Returns a VM reader that asks Katapult once per VM per cycle, however many of its disks need it."""
    return once_per_key(client.get_vm)


@dataclass(frozen=True, slots=True)
class TierReads:
    """What the configured tiers make the cycle read: disk or VM annotations, the disks' organizations."""

    tiers: tuple[Tier, ...] = ()
    disk: bool = False
    vm: bool = False
    organization: bool = False

    @classmethod
    def of(cls, tiers: Sequence[Tier]) -> TierReads:
        """Returns what `tiers` need read."""
        disk, vm, organization = needs(tiers)
        return cls(tuple(tiers), disk, vm, organization)

    @property
    def any(self) -> bool:
        """Returns whether there are tiers at all."""
        return bool(self.tiers)

    def selectors(self, side: str) -> list[Selector]:
        """Returns the distinct filtered listings the tiers need for one side, in tier order."""
        return list(dict.fromkeys(sel for t in self.tiers for sel in t.match.selectors(side)))


def _known(pairs: tuple[tuple[str, str], ...] | None, missing: str) -> Annotations | Unknown:
    return Unknown(missing) if pairs is None else Annotations.of(pairs)


OrgOf = Callable[[str], Awaitable[frozenset[str] | Unknown]]


def org_of_unlisted(listing: Callable[[str], Awaitable[list[Disk]]], refs: Sequence[str]) -> OrgOf:
    """Returns a reader of the organizations (among `refs`, those the tiers name) whose disk list holds a disk.

    `GET /disks/disk` does not name a disk's organization, and a disk on no VM has no VM to ask: each organization
    named in `[[tiers]]` has its disks listed once per cycle (⌈disks/200⌉ requests each, shared through `listing`
    with the audit of that organization). A disk in none of those lists is in none of those organizations; a
    listing that fails leaves a disk found in no other one unknown.
    """
    ids_of = once_per_key(lambda ref: _ids(listing(ref)))

    async def org_of(disk_id: str) -> frozenset[str] | Unknown:
        answers = await asyncio.gather(*(ids_of(ref) for ref in refs), return_exceptions=True)
        found: set[str] = set()
        failed: str | None = None
        for ref, answer in zip(refs, answers, strict=True):
            if isinstance(answer, KatapultError):
                failed = failed or _safe(f"the disk list of organization {ref} could not be read: {answer.code}: "
                                         f"{answer}")
            elif isinstance(answer, BaseException):
                raise answer
            elif disk_id in answer:
                found.add(ref)
        if found or failed is None:
            return frozenset(found)
        return Unknown(failed)

    return org_of


async def _ids(disks: Awaitable[list[Disk]]) -> frozenset[str]:
    return frozenset(d.id for d in await disks)


async def per_disk_facts(disk: Disk, reads: TierReads, vm_lookup: VmLookup, org_of: OrgOf | None = None
                         ) -> DiskFacts:
    """Returns what a disk read through the per-disk endpoints tells about its tier.

    The disk lookup carries the disk's annotations (no extra request). The VM is looked up (once per VM per
    cycle) only when a tier matches on VM annotations or on organizations; a disk on no VM has its organization
    found in the disk lists of the organizations the tiers name (`org_of`, see `org_of_unlisted`).
    """
    disk_side = _known(disk.annotations, "the disk lookup carried no annotations") if reads.disk else NOT_READ
    vm_side: Annotations | Unknown = NOT_READ
    orgs: frozenset[str] | Unknown = NOT_READ
    if disk.vm_id is None:
        vm_side = NO_VM
        if reads.organization:
            orgs = await org_of(disk.id) if org_of is not None else Unknown(
                "the disk is not attached to a virtual machine, and Katapult's disk lookup does not name its "
                "organization: audit its organization in audit.organizations instead")
    elif reads.vm or reads.organization:
        try:
            vm = await vm_lookup(disk.vm_id)
        except KatapultError as exc:
            failed = Unknown(_safe(f"virtual machine {disk.vm_id}: {exc.code}: {exc}"))
            vm_side, orgs = (failed if reads.vm else NOT_READ), (failed if reads.organization else NOT_READ)
        else:
            if reads.vm:
                vm_side = _known(vm.annotations, f"the lookup of virtual machine {vm.id} carried no annotations")
            if reads.organization:
                orgs = vm.organization_refs or Unknown(f"the lookup of virtual machine {vm.id} named no organization")
    return DiskFacts(disk_side, vm_side, orgs)


async def _listing_facts(
    read: Callable[[Selector], Awaitable[Sequence[Disk | VirtualMachine]]], selectors: Sequence[Selector],
    tiers: Sequence[Tier], side: str,
) -> tuple[dict[str, dict[str, str | None]], frozenset[str], str | None]:
    """Runs one filtered listing per selector; returns what they say per object id, the tiers left undecided by a
    failed listing, and that failure's message."""
    results = await asyncio.gather(*(read(sel) for sel in selectors), return_exceptions=True)
    known: dict[str, dict[str, str | None]] = {}
    failed: set[Selector] = set()
    error: str | None = None
    for selector, result in zip(selectors, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, KatapultError):
                raise result
            failed.add(selector)
            error = error or _safe(f"{result.code}: {result}")
            continue
        for obj in result:
            pairs = known.setdefault(obj.id, {})
            for key, value in selector:
                if value is not None or pairs.get(key) is None:
                    pairs[key] = value
    unread = frozenset(t.name for t in tiers if any(sel in failed for sel in t.match.selectors(side)))
    return known, unread, error


async def org_facts(client: KatapultClient, org: OrgRef, disks: Sequence[Disk], reads: TierReads, *,
                    names: frozenset[str] | None = None) -> dict[str, DiskFacts]:
    """Returns the tier facts of an organization's disks, with the fewest requests the API allows.

    Disk annotations come from the disk list's items when they carry them; otherwise from one filtered listing per
    distinct tier selector (⌈matching/200⌉ requests each). VM annotations come from one filtered VM listing per
    selector. The organization is the one the disks were listed through (`names`: every reference naming it, when
    known).
    """
    if not disks:
        return {}
    by_disk: dict[str, Annotations | Unknown] = {d.id: NOT_READ for d in disks}
    if reads.disk:
        missing = [d for d in disks if d.annotations is None]
        partial: Annotations | None = None
        listed: dict[str, dict[str, str | None]] = {}
        if missing:
            listed, unread, error = await _listing_facts(
                lambda sel: client.list_org_disks_with(org, sel), reads.selectors(DISK_SIDE), reads.tiers, DISK_SIDE)
            partial = Annotations({}, complete=False, unread=unread, error=error)
        for d in disks:
            if d.annotations is not None:
                by_disk[d.id] = Annotations.of(d.annotations)
            else:
                assert partial is not None
                by_disk[d.id] = replace(partial, values=listed.get(d.id, {}))
    by_vm: dict[str, Annotations] = {}
    vm_partial = Annotations({}, complete=False)
    if reads.vm and any(d.vm_id for d in disks):
        listed_vms, unread, error = await _listing_facts(
            lambda sel: client.list_org_vms(org, sel), reads.selectors(VM_SIDE), reads.tiers, VM_SIDE)
        vm_partial = Annotations({}, complete=False, unread=unread, error=error)
        by_vm = {vm_id: replace(vm_partial, values=values) for vm_id, values in listed_vms.items()}
    out: dict[str, DiskFacts] = {}
    for d in disks:
        vm_side: Annotations | Unknown = NOT_READ
        if d.vm_id is None:
            vm_side = NO_VM
        elif reads.vm:
            vm_side = by_vm.get(d.vm_id, vm_partial)
        out[d.id] = DiskFacts(by_disk[d.id], vm_side,
                              (names or frozenset({org.value})) if reads.organization else NOT_READ)
    return out


def assign_tiers(collected: Collected, rules: RuleSet) -> None:
    """Decides each read disk's tier from its facts; a disk whose tier cannot be decided becomes unknown."""
    if not rules.tiers:
        return
    for index, w in enumerate(collected.disks):
        snap = w.snapshot
        if snap.outcome is not ReadOutcome.OK or rules.has_override(snap.disk_id):
            continue
        facts = collected.facts.get(snap.disk_id)
        error: RunError | None = None
        try:
            decision = decide(rules.tiers, facts) if facts is not None else None
        except Exception as exc:  # the disk's fault boundary: no verdict rather than the defaults
            code, message = internal_error(exc, where=f"deciding the tier of disk {snap.disk_id}")
            decision = None
            error = RunError(snap.disk_id, code, message)
        if decision is None or decision.unknown is not None:
            if error is None:
                why = decision.unknown if decision is not None else "its annotations were not read"
                error = RunError(snap.disk_id, TIER_UNKNOWN, _safe(f"disk {snap.disk_id}: {why}")[:500])
            collected.disks[index] = DiskWrite(
                DiskSnapshot(snap.disk, ReadOutcome.UNKNOWN, error_code=error.code, error_message=error.message),
                w.source)
            collected.errors.append(error)
            continue
        if decision is not DEFAULTS:
            collected.disks[index] = DiskWrite(replace(snap, tier=decision), w.source)


@dataclass(slots=True)
class Collected:
    """The raw result of reading every target."""

    disks: list[DiskWrite]
    errors: list[RunError]
    retired: set[str]
    targets_checked: int
    facts: dict[str, DiskFacts] = field(default_factory=dict)  # what each disk's tier is decided from


async def collect(
    client: KatapultClient,
    targets: Targets,
    *,
    known_sources: dict[str, str],
    concurrency: int,
    progress: Progress | None = None,
    rules: RuleSet | None = None,
    attachments: AttachmentTruth | None = None,
) -> Collected:
    """Reads every target; a disk is read once even if both an org and `audit.disks` name it.

    `known_sources` maps disks audited before to their source; disks of an org whose listing failed stay known
    (as unknown) rather than silently dropping out of the report. With tiers in `rules`, what decides each disk's
    tier is read too (see `org_facts`, `per_disk_facts`) and the tiers are assigned (`assign_tiers`).
    `attachments` says what was read before of disks' attachments to their VMs and when (see
    `verify_attachments`); without it every due state is read.
    """
    errors: list[RunError] = []
    writes: dict[str, DiskWrite] = {}
    facts: dict[str, DiskFacts] = {}
    reads = TierReads.of(rules.tiers) if rules is not None else TierReads()
    # The cycle passes its one clock reading; a caller without stored attachments reads every due state now.
    truth = attachments or AttachmentTruth(now=utcnow())
    # Each organization's disks are listed once per cycle, whether it is audited, named by a tier, or both.
    listing = once_per_key(lambda ref: client.list_org_disks(OrgRef(ref)))
    vm_disks = once_per_key(client.list_vm_disks)
    refs, names, gone = await _organizations(client, targets, known_sources, errors)

    async def read_org(ref: str) -> tuple[str, list[DiskSnapshot] | None, RunError | None, dict[str, DiskFacts]]:
        try:
            org = OrgRef(ref)
            disks, policies = await asyncio.gather(listing(ref), client.list_org_policies(org))
            found = await org_facts(client, org, disks, reads, names=names.get(ref)) if reads.any else {}
            return ref, await verify_attachments(join_org(disks, policies), vm_disks, truth), None, found
        except KatapultError as exc:
            return ref, None, _error_of(exc, ref), {}
        except Exception as exc:  # the org's fault boundary: its disks become unknown, never resolved
            code, message = internal_error(exc, where=f"reading organization {ref}")
            return ref, None, RunError(ref, code, message), {}

    for ref, snaps, err, found in await asyncio.gather(*(read_org(r) for r in refs)):
        source = f"org:{ref}"
        if snaps is None:
            assert err is not None
            errors.append(err)
            _keep_unknown(writes, known_sources, {source}, err.code,
                          f"organization {ref} could not be read: {err.message}")
            continue
        for snap in snaps:
            if snap.disk_id not in writes:
                writes[snap.disk_id] = DiskWrite(snap, source)
                if snap.disk_id in found:
                    facts[snap.disk_id] = found[snap.disk_id]
                if snap.outcome is ReadOutcome.UNKNOWN:
                    errors.append(RunError(snap.disk_id, snap.error_code or "unknown", snap.error_message or ""))
    for source, (code, message) in gone.items():
        _keep_unknown(writes, known_sources, {source}, code, message)

    pending = [d for d in targets.disks if d not in writes or writes[d].snapshot.outcome is ReadOutcome.UNKNOWN]
    total = len(pending)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    vm_policies = shared_vm_policies(client)
    vm_lookup = shared_vm_lookups(client)
    tier_orgs = list(dict.fromkeys(o for t in reads.tiers for o in t.match.organizations))
    org_of = org_of_unlisted(listing, tier_orgs) if tier_orgs else None

    async def read_one(disk_id: str) -> tuple[DiskSnapshot, DiskFacts | None]:
        snap = stamp_attachment(await read_disk(client, disk_id, vm_policies=vm_policies), now=truth.now)
        if not reads.any or snap.outcome is not ReadOutcome.OK or (rules is not None and rules.has_override(disk_id)):
            return snap, None
        try:
            return snap, await per_disk_facts(snap.disk, reads, vm_lookup, org_of)
        except Exception as exc:  # the disk's fault boundary
            code, message = internal_error(exc, where=f"reading the tier facts of disk {disk_id}")
            return unknown_snapshot(disk_id, code, message), None

    for snap, disk_facts in await _bounded_map(read_one, pending, limit=concurrency * 2, progress=tick):
        writes[snap.disk_id] = DiskWrite(snap, "config")
        if disk_facts is not None:
            facts[snap.disk_id] = disk_facts
        if snap.outcome is ReadOutcome.UNKNOWN:
            errors.append(RunError(snap.disk_id, snap.error_code or "unknown", snap.error_message or ""))

    retired = {d for d in known_sources if d not in writes}
    collected = Collected(list(writes.values()), errors, retired, len(refs) + len(targets.disks), facts)
    if rules is not None:
        assign_tiers(collected, rules)
    return collected


def _keep_unknown(writes: dict[str, DiskWrite], known_sources: dict[str, str], sources: set[str], code: str,
                  message: str) -> None:
    """Keeps the known disks of `sources` in the run as unknown (never dropped, never resolved)."""
    for disk_id, known in known_sources.items():
        if known in sources and disk_id not in writes:
            writes[disk_id] = DiskWrite(unknown_snapshot(disk_id, code, message), known)


async def _organizations(client: KatapultClient, targets: Targets, known_sources: dict[str, str],
                         errors: list[RunError]) -> tuple[list[str], dict[str, frozenset[str]],
                                                          dict[str, tuple[str, str]]]:
    """Returns the organizations to read this cycle, the references naming each one listed by GET /organizations,
    and the sources of known disks that must stay unknown (by source: code and message).

    `"*"` in audit.organizations is every organization the token sees, listed afresh each cycle (one request): a
    new one is read in the same cycle; the disks of one no longer listed stay unknown (`organization_not_visible`)
    until it is listed again or `"*"` leaves the configuration.
    """
    refs = [r for r in targets.organizations if r != EVERY_ORGANIZATION]
    if EVERY_ORGANIZATION not in targets.organizations:
        return refs, {}, {}
    explicit = {f"org:{r}" for r in refs}
    others = sorted({s for s in known_sources.values() if s.startswith("org:") and s not in explicit})
    try:
        listed = await client.list_organizations()
    except KatapultError as exc:
        error = _error_of(exc, EVERY_ORGANIZATION)
        errors.append(error)
        return refs, {}, {s: (error.code, f"the organizations could not be listed: {error.message}") for s in others}
    names: dict[str, frozenset[str]] = {}
    seen: set[str] = set(refs)
    for org_id, sub_domain in listed:
        aliases = frozenset(r for r in (org_id, sub_domain) if r)
        seen |= aliases
        if not aliases & set(refs) and org_id not in names:
            refs.append(org_id)
            names[org_id] = aliases
    gone = {s: (ORGANIZATION_NOT_VISIBLE, f"organization {s[4:]} is not among the organizations the token can see "
                                          "(GET /organizations)")
            for s in others if s[4:] not in seen}
    for source in gone:
        errors.append(RunError(source[4:], ORGANIZATION_NOT_VISIBLE, gone[source][1]))
    return refs, names, gone


def run_status(collected: Collected) -> RunStatus:
    """Returns complete when every target was read, failed when nothing was, else partial."""
    if not collected.errors and all(w.snapshot.outcome is not ReadOutcome.UNKNOWN for w in collected.disks):
        return RunStatus.COMPLETE
    if collected.disks and any(w.snapshot.outcome is not ReadOutcome.UNKNOWN for w in collected.disks):
        return RunStatus.PARTIAL
    return RunStatus.FAILED


def judge(collected: Collected, rules: RuleSet, *, now: datetime,
          schedules: Mapping[str, Mapping[str, PolicySchedule]] | None = None) -> list[Finding]:
    """Returns every disk's findings (`schedules`: what was observed of its policies' runs, by disk and policy); a
    disk whose rules raise becomes unknown (and its error is recorded)."""
    findings: list[Finding] = []
    for index, w in enumerate(collected.disks):
        try:
            findings.extend(evaluate(w.snapshot, rules, now=now,
                                     schedules=(schedules or {}).get(w.snapshot.disk_id)))
        except Exception as exc:  # rules are pure and total by design; this boundary is the second line
            code, message = internal_error(exc, where=f"judging disk {w.snapshot.disk_id}")
            collected.disks[index] = DiskWrite(unknown_snapshot(w.snapshot.disk_id, code, message), w.source)
            collected.errors.append(RunError(w.snapshot.disk_id, code, message))
    return findings


def open_after(previous: dict[str, Any], changes: list[Change]) -> dict[str, int]:
    """Returns open findings by severity after the run (changed ones plus untouched open ones)."""
    state = {fp: f for fp, f in previous.items()}
    for c in changes:
        state[c.finding.fingerprint] = c.finding
    out: dict[str, int] = {}
    for f in state.values():
        if f.status is FindingStatus.OPEN:
            out[f.severity.value] = out.get(f.severity.value, 0) + 1
    return out


@dataclass(slots=True)
class Verdicts:
    """Every disk's verdict after a run, and the open findings by severity and rule (the run's history)."""

    disk_statuses: dict[str, str]
    open_by_severity: dict[str, int]
    open_by_rule: dict[str, int]


def verdicts_after(collected: Collected, previous: dict[str, Any], changes: list[Change]) -> Verdicts:
    """Returns each disk's verdict after the run: unknown, exempt (its tier), noncompliant (an open finding),
    waived, or compliant."""
    state = {fp: f for fp, f in previous.items()}
    for c in changes:
        state[c.finding.fingerprint] = c.finding
    open_disks: set[str] = set()
    waived_disks: set[str] = set()
    by_severity: dict[str, int] = {}
    by_rule: dict[str, int] = {}
    for f in state.values():
        if f.status is FindingStatus.OPEN:
            open_disks.add(f.disk_id)
            by_severity[f.severity.value] = by_severity.get(f.severity.value, 0) + 1
            by_rule[f.rule] = by_rule.get(f.rule, 0) + 1
        elif f.status is FindingStatus.WAIVED:
            waived_disks.add(f.disk_id)
    statuses: dict[str, str] = {}
    for w in collected.disks:
        disk_id = w.snapshot.disk_id
        if w.snapshot.outcome is ReadOutcome.UNKNOWN:
            statuses[disk_id] = DiskVerdict.UNKNOWN.value
        elif w.snapshot.tier.exempt:
            statuses[disk_id] = DiskVerdict.EXEMPT.value  # judged by no rule: never counted as compliant
        elif disk_id in open_disks:
            statuses[disk_id] = DiskVerdict.NONCOMPLIANT.value
        elif disk_id in waived_disks:
            statuses[disk_id] = DiskVerdict.WAIVED.value
        else:
            statuses[disk_id] = DiskVerdict.COMPLIANT.value
    return Verdicts(statuses, by_severity, by_rule)
