"""Remediation: `make_plan` (the plan of the stored findings, never a Katapult write) and `apply_plan` (a saved plan
applied, each change re-checked against Katapult first, every outcome recorded, then a re-audit).

Crash safety: each write's intent is recorded before it is sent and its outcome after. A process killed between the
two leaves the intent; the next apply of the plan re-reads Katapult for that change, so a policy the killed process
created makes its precondition ("no policy covers the disk") false: the change is stale and nothing is sent twice.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from auditor import __version__
from auditor.config import Settings, redacted_config
from auditor.domain.models import BackupPolicy, TargetType, Waiver
from auditor.domain.periods import parse_instant
from auditor.domain.remediation import (
    CREATE_ON_VM,
    PLAN_FORMAT,
    PLAN_VERSION,
    DiskState,
    PlanFilter,
    breaks_rules,
    build_plan,
    check_precondition,
    content_hash,
    left_alone,
    plan_document,
    request_of,
    weakens,
)
from auditor.domain.rules import Applied
from auditor.domain.tiers import DEFAULTS, TierDecision
from auditor.errors import (
    ConfigError,
    InTrashError,
    KatapultAPIError,
    KatapultError,
    KatapultTransportError,
    NotFoundError,
    PlanError,
    PlanFilterError,
    UnavailableError,
    UnknownDiskError,
)
from auditor.katapult import KatapultClient
from auditor.log import Redactor
from auditor.service.configuration import template_problems, templates_from, waivers_from
from auditor.service.cycle import AuditOutcome, run_cycle
from auditor.service.services import Services
from auditor.store import queries, writes
from auditor.vocabulary import RULE_IDS, FindingStatus, RemediationStatus, format_duration, format_instant

log = logging.getLogger(__name__)

# How far ahead of this clock a plan's created_at may be (the planning host's clock may run a little fast); further
# ahead, the plan is refused: its expiry counts from created_at, so a future one would stretch plan_ttl.
PLAN_CLOCK_SKEW = timedelta(minutes=5)
ENABLE_HINT = ("remediation is not enabled: set enabled = true in [remediation] (env "
               "AUDITOR_REMEDIATION__ENABLED=true), review the templates `auditor check-config` prints, then plan")


def check_enabled(services: Services) -> None:
    """Raises ConfigError when [remediation] is off or a template would itself be a finding."""
    check_remediation(services.settings)


def check_remediation(settings: Settings) -> None:
    """Raises ConfigError when [remediation] is off or a template would itself be a finding."""
    if not settings.remediation.enabled:
        raise ConfigError([f"remediation.enabled: {ENABLE_HINT}"])
    problems = template_problems(settings)
    if problems:
        raise ConfigError(problems)


def _applied(services: Services, disk_id: str, tier: str | None) -> Applied:
    rules = services.rules
    found = next((t for t in rules.tiers if t.name == tier), None)
    return rules.applied(disk_id, DEFAULTS if found is None else TierDecision(found))


def _states(services: Services, inputs: queries.PlanInputs) -> list[DiskState]:
    by_disk: dict[str, list[Any]] = {}
    for f in inputs.findings:
        by_disk.setdefault(f.disk_id, []).append(f)
    # The waivers in force now, from the configuration this process runs with, not only the last audit's.
    waivers: dict[str, list[Waiver]] = {}
    for w in waivers_from(services.settings, now=services.clock())[0]:
        waivers.setdefault(w.disk_id, []).append(w)
    return [DiskState(disk, tuple(inputs.policies.get(disk_id, ())), tuple(by_disk.get(disk_id, ())),
                      tuple(waivers.get(disk_id, ()))) for disk_id, disk in inputs.disks.items()]


async def check_tiers_audited(services: Services) -> None:
    """Raises PlanError when the [[tiers]] in force differ from those of the last audit: which disks are exempt
    (and by which rules the others are judged) is what that audit recorded, so a plan made or applied after the tiers
    changed could touch a disk they now exempt. An audit, then a new plan, settles it."""
    last = await services.store.read(queries.config_before, at=services.clock() + timedelta(days=1), judged=True)
    if last is None:
        return  # no audit recorded its configuration: nothing to compare (the plan holds no change then)
    if last.settings.get("tiers") != redacted_config(services.settings).get("tiers"):
        raise PlanError("[[tiers]] changed since the last audit (which disks are exempt, and by which rules the "
                        "others are judged, is what that audit recorded): run `auditor audit --once`, then make a "
                        "new plan")


def check_filter(settings: Settings, only: PlanFilter) -> None:
    """Raises PlanFilterError for a tier no [[tiers]] entry names or a rule id no rule has (the disk is checked
    against the database by `make_plan`)."""
    names = [t.name for t in settings.tiers]
    if only.tier is not None and only.tier not in names:
        raise PlanFilterError("tier", f"no tier named {only.tier!r} (tiers: {', '.join(names) or 'none'})")
    if only.rule is not None and only.rule not in RULE_IDS:
        raise PlanFilterError("rule", f"unknown rule id {only.rule!r}; known: {', '.join(RULE_IDS)}")


async def make_plan(services: Services, *, only: PlanFilter | None = None) -> dict[str, Any]:
    """Returns the remediation plan of the stored findings as its JSON document (no Katapult call, no write).

    Raises PlanFilterError for an unknown tier or rule and UnknownDiskError for a disk the auditor has never seen.
    """
    only = only or PlanFilter()
    check_filter(services.settings, only)
    check_enabled(services)
    now = services.clock()
    if only.disk is not None and not await services.store.read(queries.disk_known, only.disk):
        raise UnknownDiskError(only.disk)
    inputs = await services.store.read(queries.plan_inputs)
    states = _states(services, inputs)
    templates = templates_from(services.settings)
    applied = {s.disk.id: _applied(services, s.disk.id, s.disk.tier) for s in states}
    plan = build_plan(states, templates=templates, applied=applied, only=only, now=now)
    return plan_document(plan, version=__version__, created_at=now, ttl=services.settings.remediation.plan_ttl,
                         only=only, templates=templates)


def verify_plan(document: Any, *, now: datetime, ttl: timedelta) -> None:
    """Raises PlanError unless `document` is a plan of this format and version, made no later than now (within
    PLAN_CLOCK_SKEW), unexpired and unedited (its hash matches and every request is the one its change allows).

    The hash is not keyed, so whoever can edit the file can rehash it: the plan's word is not taken for how long it
    lasts. It expires at its `expires_at` or `created_at` + `ttl` (this configuration's remediation.plan_ttl),
    whichever comes first.
    """
    if not isinstance(document, dict) or document.get("format") != PLAN_FORMAT:
        raise PlanError(f"not a remediation plan (no \"format\": \"{PLAN_FORMAT}\"); make one with `auditor plan "
                        "--out FILE`")
    version = document.get("format_version")
    if type(version) is not int or version != PLAN_VERSION:
        raise PlanError(f"format_version {repr(version)[:20]} is not one this auditor applies ({PLAN_VERSION}): "
                        "make a new plan with `auditor plan --out FILE`")
    if document.get("hash") != content_hash(document):
        raise PlanError("the plan was edited after it was made (its hash does not match its content): make a new "
                        "one with `auditor plan --out FILE`")
    try:
        created = parse_instant(str(document["created_at"]))
        expires = min(parse_instant(str(document["expires_at"])), created + ttl)
        changes = document["changes"]
        _require_list(changes, "changes", _CHANGE_KEYS)
        _require_list(document["manual"], "manual", _MANUAL_KEYS)
        for change in changes:
            if not all(isinstance(change[k], list) for k in ("disks", "fixes")) or not change["disks"]:
                raise TypeError(f"change {str(change['id'])[:40]!r}: disks and fixes must be lists, disks not empty")
            if not all(isinstance(change[k], dict) for k in ("before", "after", "precondition")):
                raise TypeError(f"change {str(change['id'])[:40]!r}: before, after and precondition must be objects")
            if request_of(change) != change["request"]:
                raise PlanError(f"change {change.get('id')}: its request is not the one its kind and target allow")
    except PlanError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
        raise PlanError(f"the plan is malformed ({type(exc).__name__}: {str(exc)[:120]})") from None
    if created > now + PLAN_CLOCK_SKEW:
        raise PlanError(f"the plan says it was made at {format_instant(created)}, after now "
                        f"({format_instant(now)}, {format_duration(PLAN_CLOCK_SKEW)} of clock skew allowed): "
                        "make a new one")
    if now >= expires:
        raise PlanError(f"the plan expired at {format_instant(expires)} (created_at + remediation.plan_ttl "
                        f"{format_duration(ttl)}, or its expires_at if sooner): make a new one")


# What apply and its output read of each change and manual item (a plan's own JSON: `Change.as_dict`,
# `Manual.as_dict`).
_CHANGE_KEYS = ("id", "kind", "disk_id", "disks", "fixes", "request", "before", "after", "precondition")
_MANUAL_KEYS = ("fingerprint", "rule", "disk_id", "policy_id", "reason")


def _require_list(items: Any, name: str, keys: Sequence[str]) -> None:
    """Raises TypeError or KeyError unless `items` is a list of objects that have every key of `keys`."""
    if not isinstance(items, list):
        raise TypeError(f"{name} must be a list")
    for item in items:
        if not isinstance(item, dict):
            raise TypeError(f"every item of {name} must be an object")
        missing = [k for k in keys if k not in item]
        if missing:
            raise KeyError(f"{name}: an item has no {', '.join(missing)}")


@dataclass(frozen=True, slots=True)
class Actor:
    """Who applies: the OS user and the host."""

    user: str
    host: str

    @classmethod
    def current(cls) -> Actor:
        """Returns the OS user and host of this process."""
        try:
            user = getpass.getuser()
        except (OSError, KeyError):
            user = f"uid:{os.getuid()}"
        return cls(user, socket.gethostname())


@dataclass(slots=True)
class ChangeResult:
    """What apply did with one change."""

    change: dict[str, Any]
    status: RemediationStatus
    reason: str | None = None
    error_code: str | None = None
    errors: list[str] = field(default_factory=list)
    sent: bool = False  # whether a write was sent (counts towards remediation.max_changes)


@dataclass(slots=True)
class ApplyOutcome:
    """Every change's result, the re-audit and the touched disks' state before and after it."""

    results: list[ChangeResult] = field(default_factory=list)
    reaudit: AuditOutcome | None = None
    unreachable: str | None = None  # why apply stopped: Katapult did not answer a re-read
    before: dict[str, dict[str, Any]] = field(default_factory=dict)
    after: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def all_applied(self) -> bool:
        """Returns whether every change of the plan was applied."""
        return all(r.status is RemediationStatus.APPLIED for r in self.results)


class KatapultUnreachable(KatapultError):
    """Katapult did not answer a re-read: apply stops (exit 2)."""

    code = "katapult_unreachable"


def _disk_view(inputs: queries.PlanInputs, disk_id: str) -> dict[str, Any]:
    disk = inputs.disks.get(disk_id)
    found = sorted(f"{f.rule}" + (f" ({f.policy_id})" if f.policy_id else "")
                   for f in inputs.findings if f.disk_id == disk_id and f.status is FindingStatus.OPEN)
    policies = [f"{p.policy_id} retention {p.retention} {p.interval}" for p in inputs.policies.get(disk_id, [])]
    return {"outcome": disk.outcome if disk else None, "open_findings": found, "policies": policies}


async def _covering(client: KatapultClient, disks: Sequence[str]) -> tuple[list[BackupPolicy], str | None]:
    """Returns the policies now covering the disks (their own and their VMs') and the first disk's VM."""
    policies: dict[str, BackupPolicy] = {}
    first_vm: str | None = None
    vms: set[str] = set()
    for index, disk_id in enumerate(disks):
        disk = await client.get_disk(disk_id)
        if index == 0:
            first_vm = disk.vm_id
        if disk.vm_id:
            vms.add(disk.vm_id)
        for p in await client.list_disk_policies(disk_id):
            policies[p.id] = p
    for vm_id in sorted(vms):
        for p in await client.list_vm_policies(vm_id):
            policies[p.id] = p
    return list(policies.values()), first_vm


async def apply_plan(services: Services, *, document: dict[str, Any], writer: KatapultClient,
                     actor: Actor, reaudit: bool = True) -> ApplyOutcome:
    """Applies a verified plan: per change, a re-read of Katapult, then the write if its precondition still holds,
    each outcome recorded; at most remediation.max_changes writes; then a re-audit when anything was applied.

    When Katapult does not answer a re-read, nothing more is attempted (`unreachable` says why; the rest of the
    changes are not attempted) and there is no re-audit. Whatever Katapult (or a proxy) answers is recorded and
    returned with both tokens blanked (the read client's and the writer's redactors, as the read path blanks its
    errors).
    """
    check_enabled(services)
    client = services.client
    assert client is not None, "apply needs the read client"
    scrub = client.redactor | writer.redactor
    plan_hash = str(document["hash"])
    limit = services.settings.remediation.max_changes
    await check_tiers_audited(services)
    inputs = await services.store.read(queries.plan_inputs)
    states = {s.disk.id: s for s in _states(services, inputs)}
    outcome = ApplyOutcome()
    writes_sent = 0
    touched: list[str] = []
    for change in document["changes"]:
        disks = [str(d) for d in change["disks"]]
        if outcome.unreachable is not None:
            outcome.results.append(ChangeResult(change, RemediationStatus.NOT_ATTEMPTED, "Katapult did not answer"))
            continue
        if writes_sent >= limit:
            outcome.results.append(ChangeResult(change, RemediationStatus.NOT_ATTEMPTED,
                                                f"remediation.max_changes ({limit}) writes reached"))
            continue
        try:
            result = await _apply_one(services, change, disks, states=states, client=client, writer=writer,
                                      actor=actor, plan_hash=plan_hash, scrub=scrub)
        except KatapultUnreachable as exc:
            outcome.unreachable = scrub.text(str(exc))
            outcome.results.append(ChangeResult(change, RemediationStatus.NOT_ATTEMPTED, "Katapult did not answer"))
            continue
        outcome.results.append(result)
        if result.sent:
            writes_sent += 1
        if result.status is RemediationStatus.APPLIED:
            touched += disks
    if touched and outcome.unreachable is None:
        outcome.before = {d: _disk_view(inputs, d) for d in touched}
        if reaudit:
            outcome.reaudit = await run_cycle(services, trigger="remediation", wait=60.0)
            after = await services.store.read(queries.plan_inputs)
            outcome.after = {d: _disk_view(after, d) for d in touched}
    return outcome


def _covered_by_target(change: dict[str, Any], policies: Sequence[BackupPolicy]) -> str | None:
    """Returns the VM whose policy the change would create or patch (a policy on a VM covers all its disks), as
    re-read: the policy's own target for a patch, not what the plan says of it."""
    request = change["request"]
    if request["method"] == "POST":
        return str(request["body"]["virtual_machine"]["id"]) if request["path"] == CREATE_ON_VM else None
    policy_id = change["precondition"]["policy_id"]
    policy = next((p for p in policies if p.id == policy_id), None)
    if policy is not None and policy.target_type is TargetType.VIRTUAL_MACHINE:
        return policy.target_id
    return None


async def _apply_one(services: Services, change: dict[str, Any], disks: list[str], *, states: dict[str, DiskState],
                     client: KatapultClient, writer: KatapultClient, actor: Actor, plan_hash: str,
                     scrub: Redactor) -> ChangeResult:
    store = services.store
    change_id = str(change["id"])
    dangling = [r.attempt_id for r in await store.read(queries.dangling_intents, change_id)]

    async def record(status: RemediationStatus, reason: str, **extra: Any) -> ChangeResult:
        now = services.clock()
        reason = scrub.text(reason)
        rows = [scrub.json(_row(change, disk, attempt_id=uuid.uuid4().hex, plan_hash=plan_hash, actor=actor,
                                now=now, status=status, reason=reason)) for disk in disks]
        async with store.transaction() as tx:
            await tx.run(writes.record_intent, rows)
            await tx.run(writes.close_intents, dangling, reason=f"a later apply re-read Katapult: {reason}",
                         now=now)
        return ChangeResult(change, status, reason, **extra)

    # Never touch a disk that is now exempt (as the last audit recorded it, under the tiers in force) or waived (a
    # waived finding, or a waiver in force now names it).
    for disk in disks:
        state = states.get(disk)
        if state is not None and state.left_alone is not None:
            return await record(RemediationStatus.STALE, f"disk {disk} is now {state.left_alone}: left alone")
    try:
        policies, vm_id = await _covering(client, disks)
        # A policy on a VM covers every disk of the VM: the VM's disks as Katapult lists them now.
        vm = _covered_by_target(change, policies)
        on_vm = list(await client.list_vm_disks(vm)) if vm is not None else []
    except (NotFoundError, InTrashError) as exc:
        return await record(RemediationStatus.STALE, f"the disk can no longer be read: {exc.code}")
    except (KatapultTransportError, UnavailableError) as exc:
        raise KatapultUnreachable(f"Katapult did not answer the re-read for change {change_id}: {exc}") from None
    except KatapultError as exc:
        return await record(RemediationStatus.FAILED, f"the re-read failed: {exc}")
    check = check_precondition(change, policies, vm_id=vm_id)
    if check.stale is not None:
        return await record(RemediationStatus.STALE, check.stale)
    weaker = weakens(change, check.current)
    if weaker is not None:
        return await record(RemediationStatus.STALE, weaker)
    rules = {d: _applied(services, d, states[d].disk.tier if d in states else None) for d in disks}
    unsound = breaks_rules(change, check.current, rules, now=services.clock())
    if unsound is not None:
        return await record(RemediationStatus.STALE, unsound)
    kept_off = left_alone(states[d] for d in on_vm if d in states and d not in disks)
    if kept_off:
        return await record(RemediationStatus.STALE, f"VM {vm} now also holds {', '.join(kept_off)}, which no "
                                                     "change may touch (a policy on the VM covers them): left "
                                                     "alone; make a new plan")
    request = change["request"]
    now = services.clock()
    attempt_id = uuid.uuid4().hex
    rows = [scrub.json(_row(change, disk, attempt_id=attempt_id, plan_hash=plan_hash, actor=actor, now=now,
                            status=RemediationStatus.INTENT, reason=None)) for disk in disks]
    # The intent is committed before the write is sent: a crash after the write leaves a trace the next apply sees.
    async with store.transaction() as tx:
        await tx.run(writes.record_intent, rows)
        await tx.run(writes.close_intents, dangling, reason="a later apply re-read Katapult: the change was not "
                     "made; it is being applied again", now=now)
    values: dict[str, Any]
    try:
        answer = await writer.write(request["method"], request["path"], request["body"], target=disks[0])
    except KatapultAPIError as exc:
        raw = exc.detail.get("errors")
        # Blanked before the cut, so no cut leaves part of a token behind.
        errors = [scrub.text(e)[:500] for e in raw if isinstance(e, str)] if isinstance(raw, list) else []
        reason = scrub.text(str(exc))
        values = {"status": RemediationStatus.REFUSED.value, "error_code": exc.code, "errors": errors,
                  "response": {"status_code": exc.status_code,
                               "error": {"code": exc.code, "description": exc.description, "detail": exc.detail}},
                  "reason": reason}
        result = ChangeResult(change, RemediationStatus.REFUSED, reason, scrub.text(exc.code), errors, sent=True)
    except KatapultError as exc:
        reason = (f"no answer ({exc}): the write may or may not have been made; apply the plan again — the re-read "
                  "decides")
        values = {"status": RemediationStatus.FAILED.value, "error_code": exc.code, "reason": reason}
        result = ChangeResult(change, RemediationStatus.FAILED, scrub.text(reason), exc.code, sent=True)
    else:
        values = {"status": RemediationStatus.APPLIED.value, "response": {"status_code": 200, "body": answer}}
        result = ChangeResult(change, RemediationStatus.APPLIED, sent=True)
    values["finished_at"] = services.clock()
    await store.write(writes.record_outcome, attempt_id, values=scrub.json(values))
    log.info("remediation %s %s on %s: %s", change_id, change["kind"], ", ".join(disks), result.status.value)
    return result


def _row(change: dict[str, Any], disk: str, *, attempt_id: str, plan_hash: str, actor: Actor, now: datetime,
         status: RemediationStatus, reason: str | None) -> dict[str, Any]:
    final = status is not RemediationStatus.INTENT
    return {"attempt_id": attempt_id, "disk_id": disk, "change_id": str(change["id"]), "plan_hash": plan_hash,
            "kind": str(change["kind"]), "status": status.value, "actor_user": actor.user, "actor_host": actor.host,
            "requested_at": now, "finished_at": now if final else None, "request": change["request"],
            "response": None, "error_code": None, "errors": None, "reason": reason, "fixes": list(change["fixes"]),
            "before": change["before"], "after": change["after"]}


async def read_remediations(services: Services, *, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """Returns the remediation attempts requested in [start, end) as JSON, oldest first."""
    return [r.as_dict() for r in await services.store.read(queries.remediations_between, start=start, end=end)]


def planned_fixes(document: dict[str, Any]) -> dict[str, str]:
    """Returns, per finding fingerprint, what the plan does about it: the planned change or "manual: reason"."""
    out: dict[str, str] = {}
    for change in document.get("changes", []):
        if change["kind"] == "create-policy":
            made = change["after"]["policies"][0]
            text = (f"planned: create a policy (retention {made['retention']}, {made['interval']}) on "
                    f"{made['target']['type']} {made['target']['id']}")
        else:
            props = change["request"]["body"]["properties"]
            parts = ([f"retention {props['retention']}"] if "retention" in props else []) + (
                [f"interval {props['schedule'].get('interval')}"] if "schedule" in props else [])
            text = f"planned: set {', '.join(parts)} on policy {change['precondition']['policy_id']}"
        for fp in change["fixes"]:
            out[fp] = text
    for item in document.get("manual", []):
        out.setdefault(item["fingerprint"], f"manual: {item['reason']}")
    return out


async def read_planned_fixes(services: Services) -> dict[str, str]:
    """Returns what the current plan does about each open finding (the dashboard's finding rows); empty while
    [remediation] is off or a template is invalid."""
    try:
        check_enabled(services)
    except ConfigError:
        return {}
    return planned_fixes(await make_plan(services))
