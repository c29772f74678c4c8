"""Remediation: `make_plan` and `apply_plan` against the fake Katapult behind a loopback socket, on SQLite and
PostgreSQL; the plan file's checks; the property that no plan lowers a retention or touches an exempt or waived
disk; the fake's write endpoints."""

from __future__ import annotations

import base64
import copy
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hostile import Answer, AsgiServer, Request, Tamper, wrapped_error
from hypothesis import given, settings
from hypothesis import strategies as st
from markupsafe import escape
from profiles import examples
from sqlalchemy import text

from auditor.config import Settings
from auditor.domain.models import FindingStatus, Severity, TrackedFinding, fingerprint
from auditor.domain.records import DiskRecord, PolicyStateRecord
from auditor.domain.remediation import DiskState, PlanFilter, Template, build_plan
from auditor.domain.remediation import template_problems as domain_template_problems
from auditor.domain.rules import Applied, RuleParams
from auditor.errors import ConfigError, PlanError
from auditor.fake import FakeServer, Fleet, create_app
from auditor.fake.fleet import DEFAULT_WRITE_TOKEN
from auditor.service import Services, open_services
from auditor.service.configuration import template_problems
from auditor.service.cycle import run_cycle
from auditor.service.queries import read_disk_detail
from auditor.service.remediation import Actor, apply_plan, make_plan, verify_plan
from auditor.service.services import client_from
from auditor.store import queries
from auditor.vocabulary import Interval, RemediationStatus

READ_TOKEN = "fake-token"
TTL = timedelta(hours=1)  # remediation.plan_ttl's default, which these tests' settings keep
ACTOR = Actor("tester", "test-host")


def soon() -> int:
    return int(time.time()) + 86400


@dataclass
class Site:
    fleet: Fleet
    disks: dict[str, str]


def build_fleet() -> Site:
    fleet = Fleet(rate_limit_per_minute=100_000)
    org = fleet.add_org("acme", id="org_acmeacmeacmeacme")
    vm = fleet.add_vm(org.id, "web.example.com", id="vm_webwebwebwebweb1")
    d = {name: fleet.add_disk(org.id, name, id=f"disk_{name}", vm_id=vm.id if name.startswith("vm") else None).id
         for name in ("bare", "vma", "vmb", "weak", "rare", "stale", "waived")}
    fleet.add_policy(d["weak"], id="dbp_weak", retention=3, next_invocation_at=soon())
    fleet.add_policy(d["rare"], id="dbp_rare", retention=14, interval="weekly", next_invocation_at=soon())
    fleet.add_policy(d["stale"], id="dbp_stale", retention=14, next_invocation_at=int(time.time()) - 86400)
    return Site(fleet, d)


def waiver(rule: str, disk_id: str) -> dict[str, str]:
    return {"rule": rule, "disk": disk_id, "reason": "decommissioning", "owner": "ops", "expires": "2099-01-01"}


def settings_for(db_url: str, site: Site, api_url: str, *, waivers: list[dict[str, str]] | None = None,
                 tiers: list[dict[str, Any]] | None = None, **remediation: Any) -> Settings:
    return Settings(**{
        "katapult": {"api_url": api_url, "per_page": 50, "max_requests_per_minute": 60000, "timeout_seconds": 5,
                     "max_attempts": 2},
        "database": {"url": db_url},
        "audit": {"disks": sorted(site.disks.values())},
        "waivers": [waiver("unprotected-disk", site.disks["waived"])] if waivers is None else waivers,
        "tiers": tiers or [],
        "remediation": {"enabled": True, **remediation},
    })


@contextmanager
def served(site: Site) -> Iterator[FakeServer]:
    with FakeServer(site.fleet) as server:
        yield server


@asynccontextmanager
async def wired(settings: Settings, *, write_token: str = DEFAULT_WRITE_TOKEN, read_token: str = READ_TOKEN,
                transport: httpx.AsyncBaseTransport | None = None) -> AsyncIterator[tuple[Services, Any]]:
    async with open_services(settings, token=read_token, transport=transport) as services:
        assert services.client is not None
        async with client_from(settings, token=write_token, transport=transport,
                               limiter=services.client.limiter) as writer:
            yield services, writer


def covering(fleet: Fleet, disk_id: str) -> list[str]:
    disk = fleet.disks[disk_id]
    ids = list(fleet.policy_ids_of_disk(disk_id))
    if disk.vm_id:
        ids += fleet.policy_ids_of_vm(disk.vm_id)
    return ids


def by_disk(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["disk_id"]: c for c in document["changes"]}


# ---- plan -> apply -> re-audit, over a loopback socket, on both databases ---------------------------------------


@pytest.mark.slow
async def test_plan_apply_resolves_findings_and_a_second_apply_changes_nothing(db_url: str) -> None:
    site = build_fleet()
    d = site.disks
    with served(site) as server:
        async with wired(settings_for(db_url, site, server.url)) as (services, writer):
            first = await run_cycle(services)
            assert first.open_findings  # unprotected, retention, interval, stale
            plan = await make_plan(services)
            verify_plan(plan, now=datetime.now(UTC), ttl=TTL)
            changes = by_disk(plan)
            assert {k: c["kind"] for k, c in changes.items()} == {
                d["bare"]: "create-policy", d["vma"]: "create-policy", d["vmb"]: "create-policy",
                d["weak"]: "raise-retention", d["rare"]: "shorten-interval"}
            assert changes[d["weak"]]["request"] == {
                "method": "PATCH", "path": "/disk_backup_policies/disk_backup_policy",
                "body": {"disk_backup_policy": {"id": "dbp_weak"}, "properties": {"retention": 14}}}
            assert changes[d["weak"]]["precondition"]["retention"] == 3
            manual = {(m["disk_id"], m["rule"]): m["reason"] for m in plan["manual"]}
            assert (d["stale"], "schedule-stale") in manual
            # A waived disk is never changed: its finding is waived, so nothing is planned for it.
            assert d["waived"] not in changes
            before_policies = set(site.fleet.policies)

            outcome = await apply_plan(services, document=plan, writer=writer, actor=ACTOR)
            assert [r.status for r in outcome.results] == [RemediationStatus.APPLIED] * 5, outcome.results
            assert site.fleet.policies["dbp_weak"].retention == 14
            assert site.fleet.policies["dbp_rare"].interval == "daily"
            assert len(set(site.fleet.policies) - before_policies) == 3
            assert outcome.reaudit is not None and outcome.reaudit.resolved >= 5
            for disk_id in changes:
                assert outcome.before[disk_id]["open_findings"], disk_id
                assert outcome.after[disk_id]["open_findings"] == [], (disk_id, outcome.after[disk_id])
            still = {(f.disk_id, f.rule) for f in await services.store.read(queries.all_findings,
                                                                              statuses=["open"])}
            assert still == {(d["stale"], "schedule-stale")}

            # The same plan again: every precondition is now false, nothing is written.
            again = await apply_plan(services, document=plan, writer=writer, actor=ACTOR)
            assert [r.status for r in again.results] == [RemediationStatus.STALE] * 5
            assert again.reaudit is None
            assert len(set(site.fleet.policies) - before_policies) == 3
            for disk_id in changes:
                assert len(covering(site.fleet, disk_id)) == 1, disk_id

            detail = await read_disk_detail(services, disk_id=d["bare"])
            assert detail is not None
            rows = detail["remediations"]
            assert [r["status"] for r in rows] == ["applied", "stale"]
            assert rows[0]["actor"] == {"user": "tester", "host": "test-host"}
            assert rows[0]["request"]["path"] == "/disks/disk/disk_backup_policies"
            assert rows[0]["response"]["body"]["disk_backup_policy"]["target"]["value"]["id"] == d["bare"]


@pytest.mark.slow
async def test_a_policy_changed_after_the_plan_is_skipped_as_stale_and_left_alone(db_url: str) -> None:
    site = build_fleet()
    with served(site) as server:
        async with wired(settings_for(db_url, site, server.url)) as (services, writer):
            await run_cycle(services)
            plan = await make_plan(services, only=PlanFilter(disk=site.disks["weak"]))
            assert [c["kind"] for c in plan["changes"]] == ["raise-retention"]
            site.fleet.update_policy("dbp_weak", retention=5)  # someone else changed it meanwhile
            outcome = await apply_plan(services, document=plan, writer=writer, actor=ACTOR)
            (result,) = outcome.results
            assert result.status is RemediationStatus.STALE and "changed since the plan" in (result.reason or "")
            assert site.fleet.policies["dbp_weak"].retention == 5
            assert outcome.reaudit is None


@pytest.mark.slow
async def test_max_changes_stops_where_it_says_and_lists_the_rest(db_url: str) -> None:
    site = build_fleet()
    with served(site) as server:
        async with wired(settings_for(db_url, site, server.url, max_changes=2)) as (services, writer):
            await run_cycle(services)
            plan = await make_plan(services)
            before = len(site.fleet.policies)
            outcome = await apply_plan(services, document=plan, writer=writer, actor=ACTOR, reaudit=False)
            statuses = [r.status for r in outcome.results]
            assert statuses == [RemediationStatus.APPLIED] * 2 + [RemediationStatus.NOT_ATTEMPTED] * 3
            applied = {c["disk_id"] for c in plan["changes"][:2]}
            created = sum(1 for c in plan["changes"][:2] if c["kind"] == "create-policy")
            assert len(site.fleet.policies) == before + created
            assert all("max_changes" in (r.reason or "") for r in outcome.results[2:])
            assert applied == {r.change["disk_id"] for r in outcome.results[:2]}


@pytest.mark.slow
async def test_a_read_only_token_is_refused_per_change_with_its_code(db_url: str) -> None:
    site = build_fleet()
    with served(site) as server:
        async with wired(settings_for(db_url, site, server.url), write_token=READ_TOKEN) as (services, writer):
            await run_cycle(services)
            plan = await make_plan(services)
            before = {k: (p.retention, p.interval) for k, p in site.fleet.policies.items()}
            outcome = await apply_plan(services, document=plan, writer=writer, actor=ACTOR)
            assert len(outcome.results) == 5
            for r in outcome.results:
                assert r.status is RemediationStatus.REFUSED and r.error_code == "scope_not_granted", r
            assert {k: (p.retention, p.interval) for k, p in site.fleet.policies.items()} == before
            detail = await read_disk_detail(services, disk_id=site.disks["weak"])
            assert detail is not None
            (row,) = detail["remediations"]
            assert row["status"] == "refused" and row["error_code"] == "scope_not_granted"
            assert row["response"]["status_code"] == 403
            # Katapult's whole error: code, description and detail.
            assert set(row["response"]["error"]) == {"code", "description", "detail"}
            assert row["response"]["error"]["code"] == "scope_not_granted" and row["response"]["error"]["description"]
            assert not outcome.all_applied


# ---- fast: through the ASGI transport -----------------------------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Any) -> str:
    return f"sqlite:///{tmp_path / 'auditor.db'}"


async def test_an_edited_or_expired_plan_is_refused(sqlite_url: str) -> None:
    site = build_fleet()
    transport = httpx.ASGITransport(app=create_app(site.fleet))
    async with wired(settings_for(sqlite_url, site, "http://fake/core/v1"), transport=transport) as (services, _):
        await run_cycle(services)
        plan = await make_plan(services)
        now = datetime.now(UTC)
        verify_plan(plan, now=now, ttl=TTL)
        edited = copy.deepcopy(plan)
        edited["changes"][0]["after"]["policies"][0]["retention"] = 1
        with pytest.raises(PlanError, match="edited"):
            verify_plan(edited, now=now, ttl=TTL)
        with pytest.raises(PlanError, match="expired"):
            verify_plan(plan, now=now + timedelta(hours=1, seconds=1), ttl=TTL)
        with pytest.raises(PlanError, match="not a remediation plan"):
            verify_plan({"changes": []}, now=now, ttl=TTL)


async def test_plan_needs_remediation_enabled(sqlite_url: str) -> None:
    site = build_fleet()
    settings = settings_for(sqlite_url, site, "http://fake/core/v1")
    settings = settings.model_copy(update={"remediation": settings.remediation.model_copy(update={"enabled": False})})
    async with open_services(settings, token=READ_TOKEN,
                             transport=httpx.ASGITransport(app=create_app(site.fleet))) as services:
        with pytest.raises(ConfigError, match="remediation.enabled"):
            await make_plan(services)


def test_a_template_that_violates_its_tier_is_a_config_error() -> None:
    good = Settings(**{"remediation": {"enabled": True}})
    assert template_problems(good) == []
    bad = Settings(**{
        "remediation": {"policy": {"retention": 3}},
        "tiers": [{"name": "gold", "match": {"disk_annotations": {"tier": "gold"}}, "min_retention": 30,
                   "remediation": {"retention": 20}},
                  {"name": "archive", "match": {"disk_annotations": {"tier": "archive"}}, "max_interval": "weekly"},
                  {"name": "lab", "match": {"disk_annotations": {"tier": "lab"}}, "exempt": True, "reason": "lab"}],
    })
    problems = template_problems(bad)
    assert any(p.startswith("remediation.policy:") and "retention-below-minimum" in p for p in problems)
    assert any(p.startswith("tiers[0].remediation:") and "tier gold" in p for p in problems)
    assert not any("tier lab" in p for p in problems)


# ---- the fake's write endpoints -----------------------------------------------------------------------------


async def test_fake_write_endpoints_validate_like_the_api() -> None:
    site = build_fleet()
    fleet = site.fleet
    transport = httpx.ASGITransport(app=create_app(fleet))
    auth = {"Authorization": f"Bearer {DEFAULT_WRITE_TOKEN}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://fake/core/v1") as http:
        ok = await http.post("/disks/disk/disk_backup_policies", headers=auth, json={
            "disk": {"id": site.disks["bare"]},
            "properties": {"retention": 9, "schedule": {"interval": "daily", "frequency": 1, "time": 2, "minute": 0}}})
        assert ok.status_code == 200
        made = ok.json()["disk_backup_policy"]
        assert made["retention"] == 9 and made["target"] == {"type": "Disk", "value": {"id": site.disks["bare"],
                                                                                        "name": "bare"}}
        listed = await http.get("/disks/disk/disk_backup_policies", headers=auth,
                                params={"disk[id]": site.disks["bare"]})
        assert [p["id"] for p in listed.json()["disk_backup_policies"]] == [made["id"]]

        bad = await http.post("/disks/disk/disk_backup_policies", headers=auth, json={
            "disk": {"id": site.disks["bare"]}, "properties": {"retention": 0, "schedule": {"interval": "yearly"}}})
        assert bad.status_code == 422
        error = bad.json()["error"]
        assert error["code"] == "validation_error" and len(error["detail"]["errors"]) == 2
        assert all(isinstance(e, str) for e in error["detail"]["errors"])

        patched = await http.patch("/disk_backup_policies/disk_backup_policy", headers=auth, json={
            "disk_backup_policy": {"id": "dbp_weak"}, "properties": {"retention": 21}})
        assert patched.status_code == 200 and patched.json()["disk_backup_policy"]["schedule"] == {}
        assert fleet.policies["dbp_weak"].retention == 21

        read_only = await http.patch("/disk_backup_policies/disk_backup_policy",
                                     headers={"Authorization": f"Bearer {READ_TOKEN}"},
                                     json={"disk_backup_policy": {"id": "dbp_weak"}, "properties": {"retention": 2}})
        assert read_only.status_code == 403 and read_only.json()["error"]["code"] == "scope_not_granted"
        assert fleet.policies["dbp_weak"].retention == 21

        missing = await http.post("/disks/disk/disk_backup_policies", headers=auth, json={
            "disk": {"id": "disk_nosuchdisknosuch"}, "properties": {"retention": 9, "schedule": {"interval": "daily"}}})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "disk_not_found"
        from auditor.fake import Fault

        fleet.faults[site.disks["rare"]] = Fault.IN_TRASH
        trashed = await http.patch("/disk_backup_policies/disk_backup_policy", headers=auth, json={
            "disk_backup_policy": {"id": "dbp_rare"}, "properties": {"retention": 30}})
        assert trashed.status_code == 406 and trashed.json()["error"]["code"] == "object_in_trash"
        assert fleet.policies["dbp_rare"].retention == 14


# ---- the property: no plan lowers a retention or touches an exempt or waived disk --------------------------

NOW = datetime(2026, 12, 1, tzinfo=UTC)
RULES_SETTING = ("unprotected-disk", "retention-below-minimum", "retention-window-too-short",
                 "interval-too-infrequent", "schedule-stale", "disk-in-trash", "some-future-rule")


@st.composite
def disk_states(draw: st.DrawFn) -> list[DiskState]:
    states = []
    # A VM may have a policy (its retention and interval), which covers the disks of the VM that list it.
    vm_policies = {vm: draw(st.none() | st.tuples(st.integers(1, 60), st.sampled_from([i.value for i in Interval])))
                   for vm in ("vm_a", "vm_b")}
    for index in range(draw(st.integers(0, 8))):
        disk_id = f"disk_{index:04d}"
        vm_id = draw(st.sampled_from([None, "vm_a", "vm_b"]))
        exempt = draw(st.booleans())
        tier = draw(st.sampled_from([None, "gold"]))
        record = DiskRecord(disk_id, None, vm_id, None, "config", True, "ok", None, None, NOW, NOW, NOW, tier,
                            {"exempt": exempt} if exempt else None)
        policies = tuple(
            PolicyStateRecord(disk_id, f"dbp_{index}_{n}", draw(st.integers(1, 60)),
                              draw(st.sampled_from([i.value for i in Interval])), "Disk", disk_id, None, None, None,
                              NOW, None, "h")
            for n in range(draw(st.integers(0, 2))))
        on_vm = vm_policies.get(vm_id or "")
        if on_vm is not None and vm_id is not None and draw(st.booleans()):
            vm_policy = PolicyStateRecord(disk_id, f"dbp_{vm_id}", on_vm[0], on_vm[1], "VirtualMachine", vm_id, None,
                                          None, None, NOW, None, "h")
            policies = (vm_policy, *policies) if draw(st.booleans()) else (*policies, vm_policy)
        findings = []
        for rule in draw(st.lists(st.sampled_from(RULES_SETTING), max_size=4, unique=True)):
            policy_id = policies[0].policy_id if policies and rule not in ("unprotected-disk",) else None
            status = draw(st.sampled_from([FindingStatus.OPEN, FindingStatus.OPEN, FindingStatus.WAIVED]))
            findings.append(TrackedFinding(fingerprint(rule, disk_id, policy_id), rule, disk_id, policy_id,
                                           Severity.HIGH, status, "m", {}, {}, NOW, NOW, NOW))
        states.append(DiskState(record, policies, tuple(findings)))
    return states


@settings(max_examples=examples(300), deadline=None)
@given(states=disk_states(), retention=st.integers(1, 90), interval=st.sampled_from(list(Interval)),
       target=st.sampled_from(["disk", "vm"]), min_retention=st.integers(1, 40))
def test_no_plan_lowers_a_retention_or_touches_an_exempt_or_waived_disk(
        states: list[DiskState], retention: int, interval: Interval, target: str, min_retention: int) -> None:
    templates = {None: Template(interval, retention, target=target), "gold": Template(Interval.HOURLY, 90)}
    applied = {s.disk.id: Applied(RuleParams(min_retention=min_retention)) for s in states}
    plan = build_plan(states, templates=templates, applied=applied, now=NOW)
    by_id = {s.disk.id: s for s in states}
    untouchable = {s.disk.id for s in states if s.exempt or s.waived}

    def covered_by_vm(vm_id: str) -> set[str]:
        # A policy on a VM covers every disk of it: those assigned to it and those listing one of its policies.
        return {s.disk.id for s in states if s.disk.vm_id == vm_id
                or any(p.target_type == "VirtualMachine" and p.target_id == vm_id for p in s.policies)}

    seen: set[str] = set()
    for change in plan.changes:
        touched = set(change.disks)
        body = change.request["body"]
        if "virtual_machine" in body:
            touched |= covered_by_vm(body["virtual_machine"]["id"])
        if change.precondition.get("target_type") == "VirtualMachine":
            touched |= covered_by_vm(change.precondition["target_id"])
        assert not touched & untouchable, (change, touched & untouchable)
        assert not set(change.disks) & seen, "two changes for one disk"
        seen |= set(change.disks)
        assert change.request["method"] in ("POST", "PATCH")
        if change.request["method"] == "PATCH":
            policy_id = change.precondition["policy_id"]
            (policy,) = [p for p in by_id[change.disk_id].policies if p.policy_id == policy_id]
            new = change.request["body"]["properties"].get("retention", policy.retention)
            assert new >= policy.retention
            assert change.after["retention"] >= change.before["retention"]
    fixed = {fp for c in plan.changes for fp in c.fixes}
    listed = {m.fingerprint for m in plan.manual}
    open_fps = {f.fingerprint for s in states for f in s.findings if f.status is FindingStatus.OPEN}
    # Every open finding is either fixed by a change or listed as manual with a reason (unknown rules included).
    assert open_fps <= fixed | listed
    assert all(m.reason for m in plan.manual)


# ---- read-only surfaces: GET /api/v1/plan and the planned fix of each finding -------------------------------


async def test_api_plan_is_the_plan_json_and_the_disk_detail_lists_remediations(sqlite_url: str) -> None:
    from auditor.api import ApiDeps, CycleMetrics
    from auditor.api import create_app as api_app
    from auditor.service.remediation import planned_fixes, read_planned_fixes

    site = build_fleet()
    transport = httpx.ASGITransport(app=create_app(site.fleet))
    async with wired(settings_for(sqlite_url, site, "http://fake/core/v1"), transport=transport) as (services, w):
        await run_cycle(services)

        async def no_trigger() -> str | None:
            return None

        deps = ApiDeps(services=services, trigger=no_trigger, cycles=CycleMetrics(), token=None)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api_app(deps)), base_url="http://api") as api:
            got = (await api.get("/api/v1/plan")).json()
            expected = await make_plan(services)
            assert {k: v for k, v in got.items() if k not in ("created_at", "expires_at", "hash")} == {
                k: v for k, v in expected.items() if k not in ("created_at", "expires_at", "hash")}
            only = (await api.get("/api/v1/plan", params={"disk_id": site.disks["weak"]})).json()
            assert [c["disk_id"] for c in only["changes"]] == [site.disks["weak"]]
            assert (await api.get("/api/v1/plan", params={"rule": "no-such-rule"})).status_code == 422
            # The dashboard's finding rows: the planned fix, or "manual: reason".
            page = (await api.get("/findings")).text
            fixes = planned_fixes(expected)
            for fp, text in fixes.items():
                row = page.split(f'data-fingerprint="{fp}"', 1)[1].split("</tr>", 1)[0]
                assert "data-fix" in row and str(escape(text))[:60] in row, (fp, row)
            await apply_plan(services, document=only, writer=w, actor=ACTOR, reaudit=False)
            detail = (await api.get(f"/api/v1/disks/{site.disks['weak']}")).json()
            assert [r["status"] for r in detail["remediations"]] == ["applied"]
            disk_page = (await api.get(f"/disks/{site.disks['weak']}")).text
            assert disk_page.count('data-remediation="applied"') == 1 and "tester@test-host" in disk_page

        fixes = await read_planned_fixes(services)
        plan = await make_plan(services)
        assert fixes == planned_fixes(plan)
        stale_fp = next(m["fingerprint"] for m in plan["manual"] if m["rule"] == "schedule-stale")
        assert fixes[stale_fp].startswith("manual: ")
        bare_fp = next(c["fixes"][0] for c in plan["changes"] if c["disk_id"] == site.disks["bare"])
        assert fixes[bare_fp].startswith("planned: create a policy (retention 14, daily) on Disk disk_bare")


def _state(disk_id: str, vm_id: str | None, policies: list[tuple[str, str, str, int, str]],
           findings: list[tuple[str, str | None]], *, waived: bool = False, exempt: bool = False) -> DiskState:
    record = DiskRecord(disk_id, None, vm_id, None, "config", True, "ok", None, None, NOW, NOW, NOW,
                        "lab" if exempt else None, {"exempt": True} if exempt else None)
    states = tuple(PolicyStateRecord(disk_id, pid, retention, interval, ttype, tid, None, None, None, NOW, None, "h")
                   for pid, ttype, tid, retention, interval in policies)
    status = FindingStatus.WAIVED if waived else FindingStatus.OPEN
    tracked = tuple(TrackedFinding(fingerprint(rule, disk_id, pid), rule, disk_id, pid, Severity.HIGH, status, "m",
                                   {}, {}, NOW, NOW, NOW) for rule, pid in findings)
    return DiskState(record, states, tracked)


def test_one_write_for_a_policy_or_a_vm_that_covers_several_disks() -> None:
    shared = [("dbp_vm", "VirtualMachine", "vm_a", 3, "daily")]
    weak = [("retention-below-minimum", "dbp_vm"), ("retention-window-too-short", "dbp_vm")]
    states = [_state("disk_a1", "vm_a", shared, weak), _state("disk_a2", "vm_a", shared, weak),
              _state("disk_b1", "vm_b", [], [("unprotected-disk", None)]),
              _state("disk_b2", "vm_b", [], [("unprotected-disk", None)]),
              _state("disk_c1", None, [], [("unprotected-disk", None)])]
    waived = TrackedFinding(fingerprint("some-future-rule", "disk_c1", None), "some-future-rule", "disk_c1", None,
                            Severity.LOW, FindingStatus.WAIVED, "m", {}, {}, NOW, NOW, NOW)
    states[-1] = DiskState(states[-1].disk, (), (*states[-1].findings, waived))
    templates = {None: Template(Interval.DAILY, 14, target="vm")}
    applied = {s.disk.id: Applied(RuleParams()) for s in states}
    plan = build_plan(states, templates=templates, applied=applied, now=NOW)
    assert [(c.kind.value, c.disks, len(c.fixes)) for c in plan.changes] == [
        ("raise-retention", ("disk_a1", "disk_a2"), 4), ("create-policy", ("disk_b1", "disk_b2"), 2)]
    create = plan.changes[1]
    assert create.request == {"method": "POST", "path": "/virtual_machines/virtual_machine/disk_backup_policies",
                              "body": {"virtual_machine": {"id": "vm_b"}, "properties": {
                                  "retention": 14, "schedule": {"interval": "daily", "frequency": 1, "time": 2,
                                                                "minute": 0}}}}
    assert create.precondition == {"kind": "no-policy", "disks": ["disk_b1", "disk_b2"], "vm_id": "vm_b"}
    # A disk with a waived finding is left alone even when another of its findings is open.
    assert [(m.disk_id, m.rule) for m in plan.manual] == [("disk_c1", "unprotected-disk")]
    assert "waived" in plan.manual[0].reason


async def test_a_rehashed_hand_edited_plan_still_never_lowers_a_retention_or_slows_a_schedule(
        sqlite_url: str) -> None:
    from auditor.domain.remediation import content_hash

    site = build_fleet()
    transport = httpx.ASGITransport(app=create_app(site.fleet))
    async with wired(settings_for(sqlite_url, site, "http://fake/core/v1"), transport=transport) as (services, w):
        await run_cycle(services)
        plan = await make_plan(services, only=PlanFilter(disk=site.disks["weak"]))
        (change,) = plan["changes"]
        lower = copy.deepcopy(plan)
        lower["changes"][0]["request"]["body"]["properties"] = {"retention": 1}
        slower = copy.deepcopy(plan)
        slower["changes"][0]["request"]["body"]["properties"] = {"schedule": {"interval": "monthly"}}
        for edited, why in ((lower, "lower the policy's retention"), (slower, "run less often")):
            edited["hash"] = content_hash(edited)
            verify_plan(edited, now=datetime.now(UTC), ttl=TTL)  # a valid plan by its hash: apply itself must refuse
            outcome = await apply_plan(services, document=edited, writer=w, actor=ACTOR)
            (result,) = outcome.results
            assert result.status is RemediationStatus.STALE and why in (result.reason or ""), result
        assert (site.fleet.policies["dbp_weak"].retention, site.fleet.policies["dbp_weak"].interval) == (3, "daily")
        assert change["precondition"]["retention"] == 3


async def test_a_rehashed_hand_edited_create_never_makes_a_policy_that_is_itself_a_finding(sqlite_url: str) -> None:
    from auditor.domain.remediation import content_hash

    site = build_fleet()
    transport = httpx.ASGITransport(app=create_app(site.fleet))
    async with wired(settings_for(sqlite_url, site, "http://fake/core/v1"), transport=transport) as (services, w):
        await run_cycle(services)
        plan = await make_plan(services, only=PlanFilter(disk=site.disks["bare"]))
        (change,) = plan["changes"]
        assert change["request"]["method"] == "POST"
        edits = {"retention 1": {"retention": 1},
                 "monthly": {"schedule": {**change["request"]["body"]["properties"]["schedule"],
                                          "interval": "monthly"}},
                 "daily × 7": {"schedule": {**change["request"]["body"]["properties"]["schedule"], "frequency": 7}}}
        for name, props in edits.items():
            edited = copy.deepcopy(plan)
            edited["changes"][0]["request"]["body"]["properties"].update(props)
            edited["hash"] = content_hash(edited)
            outcome = await apply_plan(services, document=edited, writer=w, actor=ACTOR, reaudit=False)
            (result,) = outcome.results
            assert result.status is RemediationStatus.STALE, (name, result)
            assert "would itself break" in (result.reason or ""), (name, result.reason)
        assert site.fleet.policy_ids_of_disk(site.disks["bare"]) == []  # nothing was created


async def test_pruning_drops_old_attempts_but_never_an_unsettled_intent(store: Any) -> None:
    from auditor.store import writes
    from auditor.store.pruning import delete_history_before

    old = datetime(2020, 1, 1, tzinfo=UTC)

    def row(attempt: str, disk: str, status: str, at: datetime) -> dict[str, Any]:
        return {"attempt_id": attempt, "disk_id": disk, "change_id": "chg_x", "plan_hash": "sha256:x",
                "kind": "create-policy", "status": status, "actor_user": "u", "actor_host": "h", "requested_at": at,
                "finished_at": at, "request": {"method": "POST", "path": "/p", "body": {}}, "response": None,
                "error_code": None, "errors": None, "reason": None, "fixes": [], "before": None, "after": None}

    await store.write(writes.record_intent, [row("a1", "disk_a", "applied", old), row("a1", "disk_b", "applied", old),
                                             row("a2", "disk_a", "intent", old),
                                             row("a3", "disk_a", "stale", datetime.now(UTC))])
    counts = await delete_history_before(store, datetime(2021, 1, 1, tzinfo=UTC))
    assert counts["remediations"] == 2  # the rows of one attempt
    left = [r.status for r in await store.read(queries.disk_remediations, "disk_a")]
    assert left == ["intent", "stale"]
    assert await store.read(queries.disk_remediations, "disk_b") == []


# ---- a Katapult answer echoing the tokens: nothing recorded or shown holds them ---------------------------------

READ_SECRET = "kat-read-Q7r2x9Lm4Pw8Zt1K"
WRITE_SECRET = "kat-write-H3v6Nc0Bj5Ys2Ud9"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# Every form in which an answer below carries a token (the base64 forms are what a server quoting a decoded
# credential shows).
SECRET_FORMS = (READ_SECRET, WRITE_SECRET, b64(READ_SECRET), b64(WRITE_SECRET), b64(f"Bearer {WRITE_SECRET}"),
                b64(f"Bearer {READ_SECRET}"))


def echoing_tokens(request: Request, status: int, body: Any) -> Answer | None:
    """Answers every write 422 quoting both tokens, as description and as detail.errors, plainly and in base64."""
    if request.method == "GET":
        return None
    return wrapped_error(422, "validation_error", f"bad token {READ_SECRET}", {
        "errors": [f"token {WRITE_SECRET} rejected", f"Bearer {b64(WRITE_SECRET)}", f"seen {b64(READ_SECRET)}"],
        "echo": {f"Bearer {WRITE_SECRET}": [READ_SECRET]},
        # The whole Authorization value encoded: the token sits at another byte offset of the encoded text.
        "headers": [b64(f"Bearer {WRITE_SECRET}"), b64(f"Bearer {READ_SECRET}")]})


def assert_no_secret(where: str, data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    leaked = [form for form in SECRET_FORMS if form.encode() in raw]
    assert not leaked, f"{where} holds a token ({len(leaked)} form(s))"


@pytest.mark.slow
async def test_a_write_answer_echoing_the_tokens_is_recorded_and_shown_without_them(db_url: str,
                                                                                   tmp_path: Any) -> None:
    from auditor.api import ApiDeps, CycleMetrics
    from auditor.api import create_app as api_app
    from auditor.domain.periods import Period
    from auditor.service.evidence import build_evidence
    from auditor.service.remediation import read_remediations

    site = build_fleet()
    site.fleet.tokens.add(READ_SECRET)
    site.fleet.write_tokens.add(WRITE_SECRET)
    with AsgiServer(Tamper(create_app(site.fleet), echoing_tokens)) as server:
        settings = settings_for(db_url, site, server.url)
        async with wired(settings, read_token=READ_SECRET, write_token=WRITE_SECRET) as (services, writer):
            started = datetime.now(UTC)
            await run_cycle(services)
            plan = await make_plan(services)
            outcome = await apply_plan(services, document=plan, writer=writer, actor=ACTOR)
            assert [r.status for r in outcome.results] == [RemediationStatus.REFUSED] * 5, outcome.results
            for r in outcome.results:
                assert r.error_code == "validation_error"
                assert r.errors == ["token [redacted] rejected", "Bearer [redacted]", "seen [redacted]"], r.errors
                assert_no_secret("apply's result", json.dumps([r.reason, r.errors, r.error_code]))

            stored = await read_remediations(services, start=started, end=datetime.now(UTC) + timedelta(minutes=1))
            assert len(stored) == 5
            # Katapult's whole error, description included, as the read path would have shown it.
            assert stored[0]["response"] == {"status_code": 422, "error": {
                "code": "validation_error", "description": "bad token [redacted]",
                "detail": {"errors": ["token [redacted] rejected", "Bearer [redacted]", "seen [redacted]"],
                           "echo": {"Bearer [redacted]": ["[redacted]"]},
                           # The encoded "Bearer " is left, and the character that mixes the token's last bits
                           # with what follows; the token is gone.
                           "headers": ["QmVhcmVyIG[redacted]", "QmVhcmVyIG[redacted]s="]}}}
            rows = await services.store.read(lambda conn: conn.execute(text("SELECT * FROM remediations")).all())
            assert len(rows) == 5
            assert_no_secret("the remediations table", repr(rows))
            detail = await read_disk_detail(services, disk_id=site.disks["weak"])
            assert detail is not None and detail["remediations"][0]["status"] == "refused"
            assert_no_secret("the disk's history", json.dumps(detail))

            async def no_trigger() -> str | None:
                return None

            deps = ApiDeps(services=services, trigger=no_trigger, cycles=CycleMetrics(), token=None)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api_app(deps)),
                                         base_url="http://api") as api:
                for disk_id in site.disks.values():
                    answer = await api.get(f"/api/v1/disks/{disk_id}")
                    assert answer.status_code == 200
                    assert_no_secret(f"GET /api/v1/disks/{disk_id}", answer.content)
            bundle = await build_evidence(services, period=Period(started - timedelta(days=1),
                                                                  datetime.now(UTC) + timedelta(minutes=1)))
            assert b"[redacted]" in bundle["remediations.json"]
            for name, content in bundle.items():
                assert_no_secret(f"the evidence bundle's {name}", content)
    if db_url.startswith("sqlite"):
        files = list(tmp_path.glob("auditor.db*"))
        assert files
        for path in files:
            assert_no_secret(path.name, path.read_bytes())


# ---- VM policies cover every disk of the VM: never changed while one is exempt or waived -------------------------


def test_a_vm_policy_shared_with_a_waived_or_exempt_disk_is_never_patched() -> None:
    shared = [("dbp_vm", "VirtualMachine", "vm_a", 3, "daily")]
    weak = [("retention-below-minimum", "dbp_vm")]
    templates = {None: Template(Interval.DAILY, 14)}
    for other, label in ((_state("disk_b", "vm_a", shared, weak, waived=True), "disk_b (waived)"),
                         (_state("disk_b", "vm_a", shared, [], exempt=True), "disk_b (exempt)")):
        states = [_state("disk_a", "vm_a", shared, weak), other]
        applied = {s.disk.id: Applied(RuleParams()) for s in states}
        for only in (PlanFilter(disk="disk_a"), PlanFilter()):
            plan = build_plan(states, templates=templates, applied=applied, only=only, now=NOW)
            assert plan.changes == (), plan.changes
            (item,) = [m for m in plan.manual if m.disk_id == "disk_a"]
            assert "dbp_vm" in item.reason and "vm_a" in item.reason and label in item.reason, item.reason
    # The same VM without such a disk: the policy is patched, once for both disks.
    states = [_state("disk_a", "vm_a", shared, weak), _state("disk_b", "vm_a", shared, weak)]
    plan = build_plan(states, templates=templates, applied={s.disk.id: Applied(RuleParams()) for s in states},
                      now=NOW)
    assert [(c.kind.value, c.disks) for c in plan.changes] == [("raise-retention", ("disk_a", "disk_b"))]


def test_a_vm_create_falls_back_to_the_disk_when_the_vm_holds_an_exempt_or_waived_disk() -> None:
    templates = {None: Template(Interval.DAILY, 14, target="vm")}
    unprotected = [("unprotected-disk", None)]
    states = [_state("disk_a", "vm_a", [], unprotected), _state("disk_b", "vm_a", [], unprotected),
              _state("disk_c", "vm_a", [], [], exempt=True)]
    applied = {s.disk.id: Applied(RuleParams()) for s in states}
    plan = build_plan(states, templates=templates, applied=applied, now=NOW)
    assert [(c.request["path"], c.disks) for c in plan.changes] == [
        ("/disks/disk/disk_backup_policies", ("disk_a",)), ("/disks/disk/disk_backup_policies", ("disk_b",))]
    first = plan.changes[0]
    assert first.request["body"]["disk"] == {"id": "disk_a"}
    assert first.after["policies"][0]["target"] == {"type": "Disk", "id": "disk_a"}
    assert first.note is not None and "vm_a" in first.note and "disk_c (exempt)" in first.note
    assert first.as_dict()["note"] == first.note
    assert first.precondition == {"kind": "no-policy", "disks": ["disk_a"], "vm_id": "vm_a"}
    # Without the exempt disk: one create on the VM for both, and no note.
    plan = build_plan(states[:2], templates=templates, applied=applied, now=NOW)
    assert [(c.request["path"], c.disks, c.note) for c in plan.changes] == [
        ("/virtual_machines/virtual_machine/disk_backup_policies", ("disk_a", "disk_b"), None)]


def vm_fleet() -> Site:
    fleet = Fleet(rate_limit_per_minute=100_000)
    org = fleet.add_org("acme", id="org_acmeacmeacmeacme")
    db = fleet.add_vm(org.id, "db.example.com", id="vm_dbdbdbdbdbdbdbd1")
    app = fleet.add_vm(org.id, "app.example.com", id="vm_appappappappap1")
    d = {"a": fleet.add_disk(org.id, "a", id="disk_shareda", vm_id=db.id).id,
         "b": fleet.add_disk(org.id, "b", id="disk_sharedb", vm_id=db.id).id,
         "c": fleet.add_disk(org.id, "c", id="disk_bare_c", vm_id=app.id).id,
         "d": fleet.add_disk(org.id, "d", id="disk_bare_d", vm_id=app.id).id}
    fleet.add_policy(db.id, id="dbp_shared", retention=3, next_invocation_at=soon())
    return Site(fleet, d)


LAB = {"name": "lab", "match": {"disk_annotations": {"tier": "lab"}}, "exempt": True, "reason": "scratch"}


async def test_apply_leaves_a_vm_policy_alone_once_its_vm_holds_a_waived_disk(sqlite_url: str) -> None:
    site = vm_fleet()
    transport = httpx.ASGITransport(app=create_app(site.fleet))
    api = "http://fake/core/v1"
    async with wired(settings_for(sqlite_url, site, api, waivers=[]), transport=transport) as (services, w):
        await run_cycle(services)
        plan = await make_plan(services, only=PlanFilter(disk=site.disks["a"]))
        (change,) = plan["changes"]
        assert change["kind"] == "raise-retention" and change["disks"] == [site.disks["a"]]
    # Then disk b's finding is waived, and the audit says so: applying the plan would change b's backups too.
    later = settings_for(sqlite_url, site, api, waivers=[waiver("retention-below-minimum", site.disks["b"])])
    async with wired(later, transport=transport) as (services, w):
        await run_cycle(services)
        outcome = await apply_plan(services, document=plan, writer=w, actor=ACTOR)
        (result,) = outcome.results
        assert result.status is RemediationStatus.STALE, result
        assert f"{site.disks['b']} (waived)" in (result.reason or "") and "vm_dbdbdbdbdbdbdbd1" in (result.reason or "")
        assert site.fleet.policies["dbp_shared"].retention == 3
        again = await make_plan(services, only=PlanFilter(disk=site.disks["a"]))
        assert again["changes"] == [] and f"{site.disks['b']} (waived)" in again["manual"][0]["reason"]


async def test_apply_creates_nothing_on_a_vm_that_now_holds_an_exempt_disk(sqlite_url: str) -> None:
    site = vm_fleet()
    transport = httpx.ASGITransport(app=create_app(site.fleet))
    settings = settings_for(sqlite_url, site, "http://fake/core/v1", waivers=[], tiers=[LAB],
                            policy={"target": "vm"})
    async with wired(settings, transport=transport) as (services, w):
        await run_cycle(services)
        plan = await make_plan(services, only=PlanFilter(disk=site.disks["c"]))
        (change,) = plan["changes"]
        assert change["request"]["path"] == "/virtual_machines/virtual_machine/disk_backup_policies"
        site.fleet.set_annotations(site.disks["d"], {"tier": "lab"})
        await run_cycle(services)
        before = set(site.fleet.policies)
        outcome = await apply_plan(services, document=plan, writer=w, actor=ACTOR)
        (result,) = outcome.results
        assert result.status is RemediationStatus.STALE and f"{site.disks['d']} (exempt)" in (result.reason or "")
        assert set(site.fleet.policies) == before
        # A new plan makes the policy on the disk itself, and says why.
        (fallback,) = (await make_plan(services, only=PlanFilter(disk=site.disks["c"])))["changes"]
        assert fallback["request"]["body"]["disk"] == {"id": site.disks["c"]}
        assert f"{site.disks['d']} (exempt)" in fallback["note"]
        outcome = await apply_plan(services, document={**plan, "changes": [fallback]}, writer=w, actor=ACTOR,
                                   reaudit=False)
        assert [r.status for r in outcome.results] == [RemediationStatus.APPLIED]
        assert len(site.fleet.policy_ids_of_disk(site.disks["c"])) == 1
        assert site.fleet.policy_ids_of_vm("vm_appappappappap1") == []


async def test_apply_sees_a_waiver_or_a_tier_added_to_the_configuration_since_the_last_audit(
        sqlite_url: str) -> None:
    site = vm_fleet()
    transport = httpx.ASGITransport(app=create_app(site.fleet))
    api = "http://fake/core/v1"
    async with wired(settings_for(sqlite_url, site, api, waivers=[]), transport=transport) as (services, w):
        await run_cycle(services)
        plan = await make_plan(services, only=PlanFilter(disk=site.disks["a"]))
        (change,) = plan["changes"]
    # No audit since: a waiver in the configuration apply runs with names disk b (on the same VM as a).
    waived = settings_for(sqlite_url, site, api, waivers=[waiver("retention-below-minimum", site.disks["b"])])
    async with wired(waived, transport=transport) as (services, w):
        outcome = await apply_plan(services, document=plan, writer=w, actor=ACTOR, reaudit=False)
        (result,) = outcome.results
        assert result.status is RemediationStatus.STALE, result
        assert f"{site.disks['b']} (waived)" in (result.reason or "")
        assert site.fleet.policies["dbp_shared"].retention == 3
    # No audit since: the tiers changed (one may now exempt a disk the plan touches): apply refuses it whole.
    tiered = settings_for(sqlite_url, site, api, waivers=[], tiers=[LAB])
    async with wired(tiered, transport=transport) as (services, w):
        with pytest.raises(PlanError, match=r"\[\[tiers\]\] changed since the last audit"):
            await apply_plan(services, document=plan, writer=w, actor=ACTOR, reaudit=False)
        assert site.fleet.policies["dbp_shared"].retention == 3
        await run_cycle(services)  # audited under the new tiers: the plan may be applied
        outcome = await apply_plan(services, document=plan, writer=w, actor=ACTOR, reaudit=False)
        assert [r.status for r in outcome.results] == [RemediationStatus.APPLIED], outcome.results


# ---- templates: their cadence and their integers ----------------------------------------------------------------


def test_a_template_backing_up_less_often_than_max_interval_allows_is_a_problem() -> None:
    daily = Applied(RuleParams(max_interval=Interval.DAILY))
    (problem,) = domain_template_problems(Template(Interval.DAILY, 14, frequency=7), daily, now=NOW)
    assert "frequency 7" in problem and "every 7d" in problem and "observed-interval-too-long" in problem
    assert domain_template_problems(Template(Interval.DAILY, 14, frequency=1), daily, now=NOW) == []
    assert domain_template_problems(Template(Interval.HOURLY, 400, frequency=24), daily, now=NOW) == []
    assert domain_template_problems(Template(Interval.HOURLY, 400, frequency=25), daily, now=NOW) != []
    weekly = Applied(RuleParams(max_interval=Interval.WEEKLY))
    assert domain_template_problems(Template(Interval.DAILY, 14, frequency=7), weekly, now=NOW) == []
    assert domain_template_problems(Template(Interval.DAILY, 14, frequency=8), weekly, now=NOW) != []
    # Judged by the rule that holds max_interval and is enabled; with neither enabled, no rule is broken.
    only_nominal = Applied(RuleParams(), disabled=frozenset({"observed-interval-too-long"}))
    (problem,) = domain_template_problems(Template(Interval.DAILY, 14, frequency=2), only_nominal, now=NOW)
    assert "interval-too-infrequent" in problem
    neither = Applied(RuleParams(), disabled=frozenset({"observed-interval-too-long", "interval-too-infrequent"}))
    assert domain_template_problems(Template(Interval.DAILY, 14, frequency=2), neither, now=NOW) == []

    settings = Settings(**{"remediation": {"policy": {"interval": "daily", "frequency": 7, "retention": 14, "time": 2,
                                                      "minute": 0, "target": "disk"}},
                           "tiers": [{"name": "gold", "match": {"disk_annotations": {"tier": "gold"}},
                                      "remediation": {"frequency": 2}}]})
    problems = template_problems(settings)
    assert any(p.startswith("remediation.policy:") and "observed-interval-too-long" in p for p in problems)
    assert any(p.startswith("tiers[0].remediation:") and "frequency 2" in p for p in problems), problems


def test_the_planner_judges_a_templates_cadence_by_each_disks_rules() -> None:
    states = [_state("disk_a", None, [], [("unprotected-disk", None)])]
    templates = {None: Template(Interval.DAILY, 14, frequency=2)}
    plan = build_plan(states, templates=templates, applied={"disk_a": Applied(RuleParams())}, now=NOW)
    assert plan.changes == () and "observed-interval-too-long" in plan.manual[0].reason
    weekly = Applied(RuleParams(max_interval=Interval.WEEKLY))
    plan = build_plan(states, templates=templates, applied={"disk_a": weekly}, now=NOW)
    assert [c.after["policies"][0]["frequency"] for c in plan.changes] == [2]


@pytest.mark.parametrize("key", ["retention", "frequency", "time", "minute"])
@pytest.mark.parametrize("value", ["14", 14.0, True])
def test_template_integers_are_integers(key: str, value: Any) -> None:
    from auditor.config import settings_from

    with pytest.raises(ConfigError) as caught:
        settings_from({"remediation": {"policy": {key: value}}}, environ={})
    (line,) = caught.value.problems
    assert line.startswith(f"remediation.policy.{key}: must be an integer"), line
    tier = {"name": "gold", "match": {"disk_annotations": {"tier": "gold"}}, "remediation": {key: value}}
    with pytest.raises(ConfigError) as caught:
        settings_from({"tiers": [tier]}, environ={})
    assert caught.value.problems[0].startswith(f"tiers[0].remediation.{key}: must be an integer")
    # The environment's digits are integers (an environment variable is always a string).
    env = settings_from({}, environ={f"AUDITOR_REMEDIATION__POLICY__{key.upper()}": "3"})
    assert getattr(env.remediation.policy, key) == 3


# ---- the plan file's word is not taken for its validity ---------------------------------------------------------


def test_a_rehashed_plan_cannot_stretch_its_life_come_from_the_future_or_another_format() -> None:
    from auditor.domain.remediation import Plan, content_hash, plan_document
    from auditor.vocabulary import format_instant

    now = datetime.now(UTC).replace(microsecond=0)
    doc = plan_document(Plan(), version="1", created_at=now, ttl=TTL, only=PlanFilter(), templates={})
    verify_plan(doc, now=now, ttl=TTL)

    def rehashed(**fields: Any) -> dict[str, Any]:
        edited = {**doc, **fields}
        edited["hash"] = content_hash(edited)
        return edited

    old = rehashed(created_at="2020-01-01T00:00:00Z", expires_at="2099-01-01T00:00:00Z")
    with pytest.raises(PlanError, match="expired at 2020-01-01T01:00:00Z"):
        verify_plan(old, now=now, ttl=TTL)
    # The configured plan_ttl counts, when shorter than the file's.
    with pytest.raises(PlanError, match="expired"):
        verify_plan(doc, now=now + timedelta(minutes=10), ttl=timedelta(minutes=5))
    verify_plan(doc, now=now + timedelta(minutes=4), ttl=timedelta(minutes=5))
    # Made in the future: beyond a little clock skew, refused.
    ahead = rehashed(created_at=format_instant(now + timedelta(hours=1)),
                     expires_at=format_instant(now + timedelta(hours=2)))
    with pytest.raises(PlanError, match="after now"):
        verify_plan(ahead, now=now, ttl=TTL)
    skewed = rehashed(created_at=format_instant(now + timedelta(minutes=4)),
                      expires_at=format_instant(now + timedelta(minutes=64)))
    verify_plan(skewed, now=now, ttl=TTL)
    for version in (99, 0, 2, "1", True, None, 1.0):
        with pytest.raises(PlanError, match="format_version"):
            verify_plan(rehashed(format_version=version), now=now, ttl=TTL)
    # Still refused: the parts apply and its output read, missing.
    for cut in ("manual", "changes", "created_at"):
        with pytest.raises(PlanError, match="malformed"):
            verify_plan(rehashed(**{cut: None}), now=now, ttl=TTL)


# ---- the API's plan filters answer as the CLI's do -------------------------------------------------------------


async def test_api_plan_refuses_an_unknown_tier_or_rule_and_404s_an_unknown_disk(sqlite_url: str) -> None:
    from auditor.api import ApiDeps, CycleMetrics
    from auditor.api import create_app as api_app

    site = build_fleet()
    transport = httpx.ASGITransport(app=create_app(site.fleet))
    gold = {"name": "gold", "match": {"disk_annotations": {"tier": "gold"}}}
    async with wired(settings_for(sqlite_url, site, "http://fake/core/v1", tiers=[gold]),
                     transport=transport) as (services, _):
        await run_cycle(services)

        async def no_trigger() -> str | None:
            return None

        deps = ApiDeps(services=services, trigger=no_trigger, cycles=CycleMetrics(), token=None)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api_app(deps)), base_url="http://api") as api:
            assert (await api.get("/api/v1/plan", params={"tier": "gold"})).status_code == 200
            unknown_tier = await api.get("/api/v1/plan", params={"tier": "nope"})
            assert unknown_tier.status_code == 422, unknown_tier.text
            (problem,) = unknown_tier.json()["detail"]
            assert problem["loc"] == ["query", "tier"] and "no tier named 'nope' (tiers: gold)" in problem["msg"]
            unknown_rule = await api.get("/api/v1/plan", params={"rule": "nope"})
            assert unknown_rule.status_code == 422 and unknown_rule.json()["detail"][0]["loc"] == ["query", "rule"]
            never = await api.get("/api/v1/plan", params={"disk_id": "disk_neverseen"})
            assert never.status_code == 404
            assert never.json() == (await api.get("/api/v1/disks/disk_neverseen")).json() == {
                "detail": "disk disk_neverseen is not known to the auditor"}
            known = await api.get("/api/v1/plan", params={"disk_id": site.disks["stale"]})
            assert known.status_code == 200 and known.json()["changes"] == []
