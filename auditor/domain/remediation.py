"""Remediation plans: which stored findings a Katapult write can fix, the change that fixes them, and the facts the
change relies on (its precondition). Pure: the plan is a function of the stored audit state, the templates and `now`.

A plan proposes at most one change per disk and never a deletion; a change never lowers a retention and never
touches a disk that is exempt or has a waived finding. Every open finding no change fixes is listed as manual with
the reason, whatever its rule: a rule this module does not know is manual by construction.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from auditor.domain.models import BackupPolicy, Schedule, TargetType, TrackedFinding, Waiver
from auditor.domain.records import DiskRecord, PolicyStateRecord
from auditor.domain.rules import RULES, Applied
from auditor.vocabulary import (
    DETACHED_FROM_COVERING_VM,
    DISK_IN_TRASH,
    DISK_NOT_FOUND,
    INTERVAL_TOO_INFREQUENT,
    NO_BACKUP_DATA,
    OBSERVED_INTERVAL_LIMIT,
    OBSERVED_INTERVAL_TOO_LONG,
    RETENTION_BELOW_MINIMUM,
    RETENTION_WINDOW_TOO_SHORT,
    SCHEDULE_STALE,
    UNPROTECTED_DISK,
    ChangeKind,
    FindingStatus,
    Interval,
    format_duration,
    format_instant,
)

PLAN_FORMAT = "auditor-remediation-plan"
PLAN_VERSION = 1
# The write endpoints (README "Writing policies"); a plan holds no other request.
CREATE_ON_DISK = "/disks/disk/disk_backup_policies"
CREATE_ON_VM = "/virtual_machines/virtual_machine/disk_backup_policies"
PATCH_POLICY = "/disk_backup_policies/disk_backup_policy"
# The rules a write of retention or interval changes the verdict of; a template is checked against exactly these.
RETENTION_RULES = (RETENTION_BELOW_MINIMUM, RETENTION_WINDOW_TOO_SHORT)
SETTING_RULES = (*RETENTION_RULES, INTERVAL_TOO_INFREQUENT)
# Why the findings of rules no write fixes are manual; any other rule gets the generic reason.
MANUAL_REASONS: Mapping[str, str] = {
    SCHEDULE_STALE: "the policy's scheduled backup did not run: a policy change cannot make it run; ask Katapult "
                    "why it is stuck",
    DISK_NOT_FOUND: "the disk does not exist: remove it from audit.disks or find out what happened to it",
    DISK_IN_TRASH: "the disk is in the trash: restore it or remove it from the audit",
    DETACHED_FROM_COVERING_VM: "the disk is detached from the VM whose policy covers it: reattach it or give it a "
                               "policy of its own",
    OBSERVED_INTERVAL_TOO_LONG: "backups are observed further apart than the schedule says: a policy change "
                                "cannot fix how Katapult runs it",
    NO_BACKUP_DATA: "the policy has produced no backup data: a policy change cannot fix that",
}


@dataclass(frozen=True, slots=True)
class Template:
    """The policy a plan creates, and the retention and interval it raises to."""

    interval: Interval
    retention: int
    frequency: int = 1
    time: int = 2
    minute: int = 0
    target: str = "disk"  # "disk" | "vm"

    def schedule(self) -> dict[str, Any]:
        """Returns the template's schedule as Katapult's `properties.schedule`."""
        return {"interval": self.interval.value, "frequency": self.frequency, "time": self.time,
                "minute": self.minute}

    def as_dict(self) -> dict[str, Any]:
        """Returns the template as shown by check-config and the plan."""
        return {"retention": self.retention, **self.schedule(), "target": self.target}


def _settings(retention: int, interval: Interval) -> BackupPolicy:
    return BackupPolicy("template", retention, TargetType.DISK, "template", Schedule(interval, None))


# The rules that hold a policy to `max_interval`: a schedule running every `frequency` intervals is judged by its
# cadence (interval × frequency), which the observed runs show; the first enabled one is named.
CADENCE_RULES = (OBSERVED_INTERVAL_TOO_LONG, INTERVAL_TOO_INFREQUENT)


def cadence(interval: Interval, frequency: int) -> timedelta:
    """Returns the time between two backups of a schedule that runs every `frequency` `interval`s."""
    return interval.length * frequency


def cadence_violation(interval: Interval, frequency: int, applied: Applied) -> str | None:
    """Returns the rule a schedule of `interval` × `frequency` breaks under `applied` — its backups further apart
    than `max_interval` allows (the limit `observed-interval-too-long` judges observed runs by, before
    `stale_grace`) — or None. Disabled rules excepted."""
    limit = OBSERVED_INTERVAL_LIMIT[applied.params.max_interval]
    if cadence(interval, frequency) <= limit:
        return None
    return next((rule for rule in CADENCE_RULES if rule not in applied.disabled), None)


def violations(retention: int, interval: Interval, applied: Applied, *, now: datetime,
               frequency: int = 1) -> list[str]:
    """Returns the ids of the rules a policy with this retention and schedule (every `frequency` `interval`s)
    breaks under `applied` (the same checks the audit runs, and its cadence against `max_interval`; disabled rules
    excepted)."""
    out = []
    for rule_id in SETTING_RULES:
        check = RULES[rule_id].check
        if rule_id not in applied.disabled and check is not None and check(
                _settings(retention, interval), applied.params, now) is not None:
            out.append(rule_id)
    slow = cadence_violation(interval, frequency, applied)
    if slow is not None and slow not in out:
        out.append(slow)
    return out


def template_problems(template: Template, applied: Applied, *, now: datetime) -> list[str]:
    """Returns why a template would itself be a finding under `applied` (empty: it is not)."""
    broken = violations(template.retention, template.interval, applied, now=now)
    out = [f"a policy of retention {template.retention} {template.interval.value} would break {rule}"
           for rule in broken]
    slow = cadence_violation(template.interval, template.frequency, applied)
    if slow is not None and slow not in broken:
        every = cadence(template.interval, template.frequency)
        limit = OBSERVED_INTERVAL_LIMIT[applied.params.max_interval]
        out.append(f"interval {template.interval.value} × frequency {template.frequency} backs up every "
                   f"{format_duration(every, style='alert')}, further apart than max_interval "
                   f"{applied.params.max_interval.value} allows ({format_duration(limit, style='alert')}): a policy "
                   f"made from it would break {slow}")
    return out


@dataclass(frozen=True, slots=True)
class DiskState:
    """What the store knows of one disk for planning: the record, its current policies and its active findings."""

    disk: DiskRecord
    policies: tuple[PolicyStateRecord, ...]
    findings: tuple[TrackedFinding, ...]
    # The waivers of the configuration in force now that name this disk (the findings' statuses are the last
    # audit's: a waiver added since is seen here, before any audit).
    waivers: tuple[Waiver, ...] = ()

    @property
    def exempt(self) -> bool:
        """Returns whether the disk's tier exempts it."""
        return bool((self.disk.tier_detail or {}).get("exempt"))

    @property
    def waived(self) -> bool:
        """Returns whether any finding against the disk is waived, or a waiver in force names the disk."""
        return bool(self.waivers) or any(f.status is FindingStatus.WAIVED for f in self.findings)

    @property
    def left_alone(self) -> str | None:
        """Returns why no change may touch the disk ("exempt", "waived"), or None."""
        return "exempt" if self.exempt else "waived" if self.waived else None


def left_alone(states: Iterable[DiskState]) -> list[str]:
    """Returns "disk_x (exempt)" or "disk_x (waived)" for each disk a change must not touch, in disk order."""
    return [f"{s.disk.id} ({s.left_alone})" for s in sorted(states, key=lambda s: s.disk.id)
            if s.left_alone is not None]


def on_vm(states: Iterable[DiskState], vm_id: str) -> list[DiskState]:
    """Returns the disks a policy on VM `vm_id` covers, as the store knows them: those assigned to the VM, and those
    whose current policies include one on it."""
    return [s for s in states if s.disk.vm_id == vm_id
            or any(p.target_type == TargetType.VIRTUAL_MACHINE and p.target_id == vm_id for p in s.policies)]


@dataclass(frozen=True, slots=True)
class Manual:
    """An open finding no change of the plan fixes, and why."""

    fingerprint: str
    rule: str
    disk_id: str
    policy_id: str | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        """Returns the item as the plan's JSON."""
        return {"fingerprint": self.fingerprint, "rule": self.rule, "disk_id": self.disk_id,
                "policy_id": self.policy_id, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class Change:
    """One planned write: what it fixes, the exact request, the state before and after, and its precondition."""

    id: str
    kind: ChangeKind
    disk_id: str
    disks: tuple[str, ...]
    tier: str | None
    fixes: tuple[str, ...]
    rules: tuple[str, ...]
    request: dict[str, Any]
    before: dict[str, Any]
    after: dict[str, Any]
    precondition: dict[str, Any]
    note: str | None = None  # why the change differs from what the template says (e.g. on the disk, not its VM)

    def as_dict(self) -> dict[str, Any]:
        """Returns the change as the plan's JSON."""
        return {"id": self.id, "kind": self.kind.value, "disk_id": self.disk_id, "disks": list(self.disks),
                "tier": self.tier, "fixes": list(self.fixes), "rules": list(self.rules), "request": self.request,
                "before": self.before, "after": self.after, "precondition": self.precondition, "note": self.note}


@dataclass(frozen=True, slots=True)
class PlanFilter:
    """What `auditor plan` was asked to cover (None: everything)."""

    tier: str | None = None
    rule: str | None = None
    disk: str | None = None

    def admits(self, state: DiskState, finding: TrackedFinding) -> bool:
        """Returns whether the finding is within the filter."""
        return ((self.disk is None or state.disk.id == self.disk)
                and (self.tier is None or state.disk.tier == self.tier)
                and (self.rule is None or finding.rule == self.rule))


@dataclass(frozen=True, slots=True)
class Plan:
    """Changes and manual items, in disk order."""

    changes: tuple[Change, ...] = ()
    manual: tuple[Manual, ...] = ()


def _change_id(kind: ChangeKind, target: str, disks: Iterable[str]) -> str:
    raw = "\x1f".join([kind.value, target, *sorted(disks)])
    return "chg_" + hashlib.sha256(raw.encode()).hexdigest()[:16]


def _manual(f: TrackedFinding, reason: str) -> Manual:
    return Manual(f.fingerprint, f.rule, f.disk_id, f.policy_id, reason)


def manual_reason(rule: str) -> str:
    """Returns why a finding of `rule` is left to a person (any rule without an automatic fix)."""
    return MANUAL_REASONS.get(rule, f"no automatic fix for rule {rule}: see the finding's message")


def build_plan(states: Sequence[DiskState], *, templates: Mapping[str | None, Template],
               applied: Mapping[str, Applied], only: PlanFilter = PlanFilter(), now: datetime) -> Plan:
    """Returns the plan for the disks' open findings: at most one change per disk, every other open finding manual.

    `templates` maps a tier name (None: the defaults) to its template; `applied` a disk id to the rules it is
    judged by (a change must leave the policy breaking none of the setting rules).

    A policy on a VM covers every disk of the VM: no change creates or patches one while the VM holds an exempt
    disk or one with a waived finding. Such a patch is manual (naming those disks); such a create is made on the
    disk itself instead, the change's `note` saying why.
    """
    changes: list[Change] = []
    manual: list[Manual] = []
    # Disks a VM-wide create already covers: vm id -> index of that change in `changes`; the same for a policy a
    # change already patches (a VM's policy covers each of its disks: one write for all of them).
    vm_creates: dict[str, int] = {}
    patches: dict[str, int] = {}
    covered_vms = {p.target_id for s in states for p in s.policies if p.target_type == TargetType.VIRTUAL_MACHINE}

    def blocked(vm_id: str) -> list[str]:
        return left_alone(on_vm(states, vm_id))
    for state in sorted(states, key=lambda s: s.disk.id):
        open_findings = [f for f in state.findings if f.status is FindingStatus.OPEN and only.admits(state, f)]
        if not open_findings:
            continue
        if state.exempt or state.waived:
            why = ("the disk's tier exempts it" if state.exempt
                   else "the disk has a waived finding: remediation leaves waived disks alone")
            manual += [_manual(f, why) for f in open_findings]
            continue
        template = templates.get(state.disk.tier, templates.get(None))
        rules = applied.get(state.disk.id)
        fixable = [f for f in open_findings if f.rule == UNPROTECTED_DISK or f.rule in SETTING_RULES]
        rest = [f for f in open_findings if f not in fixable]
        manual += [_manual(f, manual_reason(f.rule)) for f in rest]
        if not fixable:
            continue
        if template is None or rules is None:
            manual += [_manual(f, "no remediation template applies to the disk's tier") for f in fixable]
            continue
        unprotected = [f for f in fixable if f.rule == UNPROTECTED_DISK]
        if unprotected:
            vm_id = state.disk.vm_id
            if template.target == "vm" and vm_id and vm_id in vm_creates:
                at = vm_creates[vm_id]
                prior = changes[at]
                made = prior.after["policies"][0]
                if broken := violations(made["retention"], Interval(made["interval"]), rules, now=now,
                                        frequency=made["frequency"]):
                    manual += [_manual(f, f"the policy planned for VM {vm_id} would break {', '.join(broken)} "
                                          "for this disk: create its policy by hand") for f in unprotected]
                    continue
                changes[at] = replace(prior, disks=(*prior.disks, state.disk.id),
                                      fixes=(*prior.fixes, *(f.fingerprint for f in unprotected)),
                                      precondition={**prior.precondition,
                                                    "disks": [*prior.precondition["disks"], state.disk.id]})
            elif template.target == "vm" and vm_id and vm_id in covered_vms:
                manual += [_manual(f, f"a policy already targets VM {vm_id}: the disk's reading is out of date; "
                                      "audit again") for f in unprotected]
            elif broken := violations(template.retention, template.interval, rules, now=now,
                                      frequency=template.frequency):
                manual += [_manual(f, f"the template (retention {template.retention}, {template.interval.value}) "
                                      f"would break {', '.join(broken)} for this disk: create its policy by hand")
                           for f in unprotected]
            else:
                kept_off = blocked(vm_id) if template.target == "vm" and vm_id else []
                note = (f"the template says target = \"vm\", but VM {vm_id} also holds {', '.join(kept_off)}, "
                        "which no change may touch: the policy is created on the disk itself" if kept_off else None)
                change = _create(state, template, unprotected, on_disk=bool(kept_off), note=note)
                if change.request["path"] == CREATE_ON_VM and vm_id:
                    vm_creates[vm_id] = len(changes)
                changes.append(change)
            manual += [_manual(f, "fixed by the policy this plan creates; audit again after applying")
                       for f in fixable if f.rule != UNPROTECTED_DISK]
            continue
        by_policy: dict[str, list[TrackedFinding]] = {}
        for f in fixable:
            by_policy.setdefault(f.policy_id or "", []).append(f)
        done = False
        for policy_id in sorted(by_policy):
            found = by_policy[policy_id]
            policy = next((p for p in state.policies if p.policy_id == policy_id), None)
            if done:
                manual += [_manual(f, "one change per disk per plan: plan again after the next audit")
                           for f in found]
                continue
            if policy is None:
                manual += [_manual(f, f"policy {policy_id} is not among the disk's current policies: audit again")
                           for f in found]
                continue
            if policy.target_type == TargetType.VIRTUAL_MACHINE and (kept_off := blocked(policy.target_id)):
                manual += [_manual(f, f"policy {policy_id} is on VM {policy.target_id}, which also holds "
                                      f"{', '.join(kept_off)}: changing it would change their backups too, and no "
                                      "change may touch them; fix it by hand (e.g. a policy on this disk)")
                           for f in found]
                continue
            if policy_id in patches:
                # Another disk's change already patches this (shared) policy: it fixes this disk's findings too,
                # provided the result breaks none of this disk's rules.
                at = patches[policy_id]
                prior = changes[at]
                after = prior.after
                schedule = prior.request["body"]["properties"].get("schedule", {})
                if broken := violations(after["retention"], Interval(after["interval"]), rules, now=now,
                                        frequency=schedule.get("frequency", 1)):
                    manual += [_manual(f, f"the change planned for policy {policy_id} would still break "
                                          f"{', '.join(broken)} for this disk") for f in found]
                else:
                    changes[at] = replace(prior, disks=(*prior.disks, state.disk.id),
                                          fixes=(*prior.fixes, *(f.fingerprint for f in found)))
                done = True
                continue
            change_or_reason = _patch(state, policy, found, template, rules, now=now)
            if isinstance(change_or_reason, str):
                manual += [_manual(f, change_or_reason) for f in found]
                continue
            patches[policy_id] = len(changes)
            changes.append(change_or_reason)
            done = True
    return Plan(tuple(changes), tuple(manual))


def _create(state: DiskState, template: Template, fixes: Sequence[TrackedFinding], *, on_disk: bool = False,
            note: str | None = None) -> Change:
    disk = state.disk
    vm_target = template.target == "vm" and disk.vm_id is not None and not on_disk
    properties = {"retention": template.retention, "schedule": template.schedule()}
    if vm_target:
        assert disk.vm_id is not None
        target = {"type": TargetType.VIRTUAL_MACHINE.value, "id": disk.vm_id}
        request = {"method": "POST", "path": CREATE_ON_VM,
                   "body": {"virtual_machine": {"id": disk.vm_id}, "properties": properties}}
    else:
        target = {"type": TargetType.DISK.value, "id": disk.id}
        request = {"method": "POST", "path": CREATE_ON_DISK,
                   "body": {"disk": {"id": disk.id}, "properties": properties}}
    return Change(
        id=_change_id(ChangeKind.CREATE_POLICY, target["id"], [disk.id]), kind=ChangeKind.CREATE_POLICY,
        disk_id=disk.id, disks=(disk.id,), tier=disk.tier, fixes=tuple(f.fingerprint for f in fixes),
        rules=(UNPROTECTED_DISK,), request=request, before={"policies": []},
        after={"policies": [{"target": target, "retention": template.retention, **template.schedule()}]},
        # The facts the create relies on: nothing targets the disk or its VM (a policy on the VM covers the disk).
        precondition={"kind": "no-policy", "disks": [disk.id], "vm_id": disk.vm_id},
        note=note,
    )


def _patch(state: DiskState, policy: PolicyStateRecord, found: Sequence[TrackedFinding], template: Template,
           rules: Applied, *, now: datetime) -> Change | str:
    try:
        interval = Interval(policy.interval)
    except ValueError:
        return f"policy {policy.policy_id} has an interval this auditor does not know ({policy.interval})"
    retention = policy.retention
    properties: dict[str, Any] = {}
    rule_ids = sorted({f.rule for f in found})
    if any(r in RETENTION_RULES for r in rule_ids) and template.retention > retention:
        retention = template.retention
        properties["retention"] = retention
    if INTERVAL_TOO_INFREQUENT in rule_ids and template.interval.rank < interval.rank:
        interval = template.interval
        properties["schedule"] = template.schedule()
    if not properties:
        return (f"the template (retention {template.retention}, {template.interval.value}) would not improve "
                f"policy {policy.policy_id} (retention {policy.retention}, {policy.interval}); never lowered")
    # A retention-only PATCH keeps the policy's frequency, which the lists do not send (README "A listed
    # DiskBackupPolicy"): only a schedule this change sets is judged by its cadence.
    frequency = template.frequency if "schedule" in properties else 1
    still = violations(retention, interval, rules, now=now, frequency=frequency)
    if still:
        return (f"changing policy {policy.policy_id} to retention {retention} {interval.value} would still break "
                f"{', '.join(still)}: fix it by hand or raise the template")
    kind = ChangeKind.RAISE_RETENTION if "retention" in properties else ChangeKind.SHORTEN_INTERVAL
    before = {"policy_id": policy.policy_id, "retention": policy.retention, "interval": policy.interval}
    return Change(
        id=_change_id(kind, policy.policy_id, [state.disk.id]), kind=kind, disk_id=state.disk.id,
        disks=(state.disk.id,), tier=state.disk.tier, fixes=tuple(f.fingerprint for f in found), rules=tuple(rule_ids),
        request={"method": "PATCH", "path": PATCH_POLICY,
                 "body": {"disk_backup_policy": {"id": policy.policy_id}, "properties": properties}},
        before=before, after={"policy_id": policy.policy_id, "retention": retention, "interval": interval.value},
        precondition={"kind": "policy-unchanged", "policy_id": policy.policy_id, "target_type": policy.target_type,
                      "target_id": policy.target_id, "retention": policy.retention, "interval": policy.interval},
    )


# ---- the plan file ---------------------------------------------------------------------------------------------


def canonical(data: Mapping[str, Any]) -> bytes:
    """Returns the canonical JSON of a plan (sorted keys, no spaces): what its hash is taken of."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def content_hash(document: Mapping[str, Any]) -> str:
    """Returns "sha256:<hex>" of a plan document without its `hash` key."""
    body = {k: v for k, v in document.items() if k != "hash"}
    return "sha256:" + hashlib.sha256(canonical(body)).hexdigest()


def summary_of(changes: Sequence[Mapping[str, Any]], manual: Sequence[Any]) -> dict[str, Any]:
    """Returns a plan's summary as computed from its changes and manual items (never read from a file: an edited
    plan could say anything there)."""
    by_kind: dict[str, int] = {}
    for c in changes:
        by_kind[str(c["kind"])] = by_kind.get(str(c["kind"]), 0) + 1
    return {"changes": len(changes), "manual": len(manual), "by_kind": by_kind}


def plan_document(plan: Plan, *, version: str, created_at: datetime, ttl: timedelta, only: PlanFilter,
                  templates: Mapping[str | None, Template]) -> dict[str, Any]:
    """Returns the plan as its JSON document, hash included (times to the second)."""
    created_at = created_at.replace(microsecond=0)
    changes = [c.as_dict() for c in plan.changes]
    manual = [m.as_dict() for m in plan.manual]
    doc: dict[str, Any] = {
        "format": PLAN_FORMAT,
        "format_version": PLAN_VERSION,
        "auditor_version": version,
        "created_at": format_instant(created_at),
        "expires_at": format_instant(created_at + ttl),
        "filters": {"tier": only.tier, "rule": only.rule, "disk": only.disk},
        "templates": {name or "": t.as_dict() for name, t in sorted(templates.items(), key=lambda i: i[0] or "")},
        "summary": summary_of(changes, manual),
        "changes": changes,
        "manual": manual,
    }
    doc["hash"] = content_hash(doc)
    return doc


@dataclass(frozen=True, slots=True)
class Check:
    """What a re-read of Katapult found against a change's precondition: None holds, else why it is stale."""

    stale: str | None
    # For a patch: the policy as re-read (retention and interval), to make sure nothing is lowered.
    current: dict[str, Any] = field(default_factory=dict)


def check_precondition(change: Mapping[str, Any], policies: Sequence[BackupPolicy], *,
                       vm_id: str | None) -> Check:
    """Returns whether a change's precondition still holds, given the policies now covering its disks (their own
    and their VM's, as re-read) and the VM the first disk is now attached to."""
    pre = change["precondition"]
    if pre["kind"] == "no-policy":
        if policies:
            ids = ", ".join(sorted({p.id for p in policies}))
            return Check(f"a policy now covers the disk ({ids})")
        if change["request"]["path"] == CREATE_ON_VM and vm_id != pre.get("vm_id"):
            return Check(f"the disk is no longer attached to VM {pre.get('vm_id')}")
        return Check(None)
    policy = next((p for p in policies if p.id == pre["policy_id"]), None)
    if policy is None:
        return Check(f"policy {pre['policy_id']} no longer covers the disk")
    current = {"retention": policy.retention, "interval": policy.schedule.interval.value}
    changed = [f"{name} {pre[name]} -> {current[name]}" for name in ("retention", "interval")
               if pre[name] != current[name]]
    if changed:
        return Check(f"policy {policy.id} changed since the plan ({', '.join(changed)})", current)
    return Check(None, current)


def request_of(change: Mapping[str, Any]) -> dict[str, Any]:
    """Returns the one request a change may send, rebuilt from its kind, target and after-state: a plan whose
    request differs was edited (or is not ours). Raises ValueError on a change of no known shape."""
    kind = ChangeKind(change["kind"])
    after = change["after"]
    if kind is ChangeKind.CREATE_POLICY:
        policy = after["policies"][0]
        target = policy["target"]
        properties = {"retention": policy["retention"],
                      "schedule": {k: policy[k] for k in ("interval", "frequency", "time", "minute")}}
        if target["type"] == TargetType.VIRTUAL_MACHINE.value:
            return {"method": "POST", "path": CREATE_ON_VM,
                    "body": {"virtual_machine": {"id": target["id"]}, "properties": properties}}
        return {"method": "POST", "path": CREATE_ON_DISK, "body": {"disk": {"id": target["id"]},
                                                                  "properties": properties}}
    body = change["request"]["body"]
    props = body["properties"]
    if set(props) - {"retention", "schedule"} or not props:
        raise ValueError("a patch may only set retention and schedule")
    return {"method": "PATCH", "path": PATCH_POLICY,
            "body": {"disk_backup_policy": {"id": change["precondition"]["policy_id"]}, "properties": props}}


def breaks_rules(change: Mapping[str, Any], current: Mapping[str, Any], applied: Mapping[str, Applied], *,
                 now: datetime) -> str | None:
    """Returns why the policy the change leaves (a create's properties; a patch's over the policy as re-read,
    `current`) would itself be a finding of a disk it covers (`applied`: each disk's rules) — or None. A plan's
    changes come from templates `check-config` checked; an edited plan's might not."""
    props = change["request"]["body"].get("properties", {})
    schedule = props.get("schedule") or {}
    raw = (props.get("retention", current.get("retention")), schedule.get("interval", current.get("interval")),
           schedule.get("frequency", 1))
    try:
        retention, interval, frequency = int(raw[0]), Interval(str(raw[1])), int(raw[2])
    except (TypeError, ValueError):
        return f"the write's retention or schedule is not one a policy can have {raw!r}: refused"
    for disk, rules in sorted(applied.items()):
        broken = violations(retention, interval, rules, now=now, frequency=frequency)
        if broken:
            return (f"the policy would itself break {', '.join(broken)} on disk {disk} (retention {retention}, "
                    f"{interval.value} × {frequency}): refused")
    return None


def weakens(change: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """Returns why applying the change would weaken the policy as re-read (`current`: retention, interval) — fewer
    backups kept or a less frequent schedule — or None. A plan never proposes that; an edited one might."""
    if change["request"]["method"] != "PATCH":
        return None
    props = change["request"]["body"].get("properties", {})
    new = props.get("retention")
    if new is not None and current.get("retention") is not None and not new >= current["retention"]:
        return f"the write would lower the policy's retention ({current['retention']} -> {new}): refused"
    interval = (props.get("schedule") or {}).get("interval")
    if interval is not None and current.get("interval") is not None:
        try:
            if Interval(interval).rank > Interval(current["interval"]).rank:
                return f"the write would make the policy run less often ({current['interval']} -> {interval}): refused"
        except ValueError:
            return f"unknown interval {interval!r}: refused"
    return None
