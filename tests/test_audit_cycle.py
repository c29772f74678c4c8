"""Real audit cycles: the fake Katapult through its ASGI app (or a loopback socket for timeouts), the real store
on SQLite and PostgreSQL, wired by `open_runtime` and run by `audit_once`."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import event, text

from auditor.config import Settings
from auditor.domain.models import FindingStatus
from auditor.domain.records import RunStatus
from auditor.fake import FakeServer, Fault, Fleet, create_app
from auditor.fake.fleet import FakeDisk, FakeOrg, FakeVM
from auditor.service import Services, open_services
from auditor.service.clock import utcnow
from auditor.service.configuration import Targets
from auditor.service.cycle import run_cycle
from auditor.service.queries import read_disk_detail, read_report
from auditor.service.reports import iso
from auditor.store import queries

API = "http://fake/core/v1"
TOKEN = "fake-token"


def settings_for(
    db_url: str,
    *,
    disks: list[str] | None = None,
    orgs: list[str] | None = None,
    waivers: list[dict[str, Any]] | None = None,
    api_url: str = API,
    per_page: int = 2,
    timeout: float = 5.0,
    max_attempts: int = 2,
) -> Settings:
    return Settings(**{
        "katapult": {"api_url": api_url, "per_page": per_page, "max_requests_per_minute": 60000,
                     "timeout_seconds": timeout, "max_attempts": max_attempts, "max_concurrency": 4},
        "database": {"url": db_url},
        "audit": {"disks": disks or [], "organizations": orgs or []},
        "waivers": waivers or [],
    })


@asynccontextmanager
async def runtime(settings: Settings, fleet: Fleet | None, *, token: str = TOKEN) -> AsyncIterator[Services]:
    """A runtime talking to `fleet` through ASGITransport (or to settings' api_url over a socket if fleet is None)."""
    transport = httpx.ASGITransport(app=create_app(fleet)) if fleet is not None else None
    async with open_services(settings, transport=transport, token=token) as rt:
        yield rt


async def report_of(rt: Services) -> dict[str, Any]:
    return await read_report(rt)


def soon(hours: float = 24) -> int:
    return int(time.time() + hours * 3600)


class World:
    """A small fleet built per test: one organization, helpers for VMs, disks and policies."""

    def __init__(self) -> None:
        self.fleet = Fleet(rate_limit_per_minute=100_000)
        self.org: FakeOrg = self.fleet.add_org("acme", id="org_acmeacmeacmeacme")
        self.other: FakeOrg = self.fleet.add_org("other", id="org_otherotherother0")

    def vm(self, name: str, org: FakeOrg | None = None) -> FakeVM:
        return self.fleet.add_vm((org or self.org).id, f"{name}.example.com", id=f"vm_{name}")

    def disk(self, name: str, *, vm: FakeVM | None = None, org: FakeOrg | None = None) -> FakeDisk:
        return self.fleet.add_disk((org or self.org).id, name, id=f"disk_{name}", vm_id=vm.id if vm else None)

    def policy(self, target: FakeDisk | FakeVM, pid: str, *, retention: int = 14, interval: str = "daily",
               next_at: int | None = None) -> str:
        return self.fleet.add_policy(target.id, id=f"dbp_{pid}", retention=retention, interval=interval,
                                     next_invocation_at=soon() if next_at is None else next_at).id


def findings_of(report: dict[str, Any], disk_id: str) -> dict[tuple[str, str | None], dict[str, Any]]:
    return {(f["rule"], f["policy_id"]): f for f in report["findings"] if f["disk_id"] == disk_id}


def disk_of(report: dict[str, Any], disk_id: str) -> dict[str, Any]:
    (item,) = [d for d in report["disks"] if d["disk_id"] == disk_id]
    return item


async def count(rt: Services, table: str) -> int:
    async with rt.store.engine.connect() as conn:
        return int((await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())


# ---- the lifecycle across runs -----------------------------------------------------------------------------


async def test_lifecycle_open_persist_resolve_reopen(db_url: str) -> None:
    w = World()
    d = w.disk("data")
    bad = w.policy(d, "data", retention=3)  # below 7 backups and a 3-day window
    settings = settings_for(db_url, disks=[d.id])
    async with runtime(settings, w.fleet) as rt:
        r1 = await run_cycle(rt)
        assert r1.status is RunStatus.COMPLETE
        assert r1.opened == 2 and r1.open_findings == {"medium": 2}
        rep = await report_of(rt)
        mine = findings_of(rep, d.id)
        assert set(mine) == {("retention-below-minimum", bad), ("retention-window-too-short", bad)}
        fp = mine[("retention-below-minimum", bad)]["fingerprint"]
        assert disk_of(rep, d.id)["status"] == "noncompliant"
        assert mine[("retention-below-minimum", bad)]["first_seen"] == iso(r1.started_at)

        r2 = await run_cycle(rt)  # unchanged: persists, last_seen moves
        assert r2.opened == 0 and r2.resolved == 0
        (stored,) = [f for f in await rt.store.read(queries.all_findings, statuses=["open"]) if f.fingerprint == fp]
        assert stored.first_seen == r1.started_at and stored.opened_at == r1.started_at
        assert stored.last_seen == r2.started_at > r1.started_at

        w.fleet.update_policy(bad, retention=14)  # fixed
        r3 = await run_cycle(rt)
        assert r3.status is RunStatus.COMPLETE and r3.resolved == 2 and r3.open_findings == {}
        rep = await report_of(rt)
        assert findings_of(rep, d.id) == {}
        assert disk_of(rep, d.id)["status"] == "compliant"
        resolved = {f.fingerprint: f for f in await rt.store.read(queries.all_findings, statuses=["resolved"])}
        assert resolved[fp].resolved_at == r3.started_at
        assert resolved[fp].status is FindingStatus.RESOLVED

        w.fleet.update_policy(bad, retention=3)  # broken again
        r4 = await run_cycle(rt)
        assert r4.opened == 2
        rep = await report_of(rt)
        again = findings_of(rep, d.id)[("retention-below-minimum", bad)]
        assert again["fingerprint"] == fp and again["status"] == "open"
        assert again["first_seen"] == iso(r1.started_at)

        detail = await read_disk_detail(rt, disk_id=d.id)
    assert detail is not None
    assert detail["status"] == "noncompliant"
    (f,) = [f for f in detail["findings"] if f["fingerprint"] == fp]
    assert f["opened_at"] == iso(r4.started_at) and f["resolved_at"] is None
    assert f["first_seen"] == iso(r1.started_at)
    events = [(e["kind"], e["run_id"]) for e in detail["finding_events"] if e["fingerprint"] == fp]
    assert events == [("opened", r1.run_id), ("resolved", r3.run_id), ("reopened", r4.run_id)]
    assert [(e["kind"], e["before"]["retention"], e["after"]["retention"]) for e in detail["drift"]] == [
        ("policy-changed", 3, 14), ("policy-changed", 14, 3)]


# ---- unknown disks -----------------------------------------------------------------------------------------

UNREADABLE = {
    Fault.UNAVAILABLE: "service_unavailable",  # 503 (retries are covered below; one attempt keeps this fast)
    Fault.FORBIDDEN: "permission_denied",  # 403
    Fault.MALFORMED: "malformed_response",  # 200 with a body that breaks the schema
    Fault.INVALID_JSON: "malformed_response",  # 200 that is not JSON
    Fault.SLOW: "timeout",
}


@pytest.mark.parametrize("fault", [pytest.param(f, marks=pytest.mark.slow) if f is Fault.SLOW else f  # real timeouts
                                   for f in UNREADABLE])
async def test_unreadable_disk_is_unknown_and_keeps_its_findings_open(db_url: str, fault: Fault) -> None:
    w = World()
    bare = w.disk("bare")  # unprotected: critical
    fine = w.disk("fine")
    w.policy(fine, "fine")
    over_socket = fault is Fault.SLOW  # ASGITransport has no timeouts: a real socket is needed
    server = FakeServer(w.fleet) if over_socket else None
    if server is not None:
        server.start()
        w.fleet.slow_seconds = 2.0
    try:
        # 1 s: the healthy disk's answer fits even on a machine busy with parallel tests; the slow one's never does.
        settings = settings_for(db_url, disks=[bare.id, fine.id], api_url=server.url if server else API,
                                timeout=1.0, max_attempts=1)
        async with runtime(settings, None if server else w.fleet) as rt:
            r1 = await run_cycle(rt)
            assert r1.status is RunStatus.COMPLETE and r1.open_findings == {"critical": 1}
            (before,) = await rt.store.read(queries.all_findings, statuses=["open"])

            # The disk gets a good policy, but the auditor cannot see it: nothing may resolve.
            w.policy(bare, "bare")
            w.fleet.faults[bare.id] = fault
            r2 = await run_cycle(rt)
            assert r2.status is RunStatus.PARTIAL
            assert r2.resolved == 0 and r2.open_findings == {"critical": 1}
            assert r2.disks_unknown == 1 and r2.disks_ok == 1
            assert [(e.target, e.code) for e in r2.errors] == [(bare.id, UNREADABLE[fault])]
            (after,) = await rt.store.read(queries.all_findings, statuses=["open"])
            assert after.fingerprint == before.fingerprint
            assert after.status is FindingStatus.OPEN and after.resolved_at is None
            assert after.last_seen == r1.started_at  # not seen, not resolved: no verdict

            rep = await report_of(rt)
            assert disk_of(rep, bare.id)["status"] == "unknown"
            assert disk_of(rep, bare.id)["error"]["code"] == UNREADABLE[fault]
            assert disk_of(rep, fine.id)["status"] == "compliant"
            assert rep["summary"]["unknown"] == 1 and rep["summary"]["compliant"] == 1
            assert rep["summary"]["open_findings"] == 1
            assert rep["last_run"]["status"] == "partial"
            assert [(e["target"], e["code"]) for e in rep["last_run"]["errors"]] == [(bare.id, UNREADABLE[fault])]

            # Only the unreadable disk as a target: nothing was read, the run failed; still no verdict.
            audit = rt.settings.audit.model_copy(update={"disks": [bare.id], "organizations": []})
            rt = replace(rt, settings=rt.settings.model_copy(update={"audit": audit}))
            assert rt.targets == Targets((bare.id,), ())
            r3 = await run_cycle(rt)
            assert r3.status is RunStatus.FAILED and r3.resolved == 0
            still_open = await rt.store.read(queries.all_findings, statuses=["open"])
            assert [f.fingerprint for f in still_open] == [before.fingerprint]

            # Readable again: now the good policy resolves it.
            w.fleet.faults.pop(bare.id)
            r4 = await run_cycle(rt)
            assert r4.status is RunStatus.COMPLETE and r4.resolved == 1 and r4.open_findings == {}
            rep = await report_of(rt)
            assert disk_of(rep, bare.id)["status"] == "compliant"
    finally:
        if server is not None:
            server.stop()


async def test_unreadable_vm_policies_leave_its_disks_unknown(db_url: str) -> None:
    w = World()
    vm = w.vm("batch")
    a, b = w.disk("batch-a", vm=vm), w.disk("batch-b", vm=vm)
    w.policy(a, "batch-a")
    w.policy(vm, "batch", retention=2)
    async with runtime(settings_for(db_url, disks=[a.id, b.id]), w.fleet) as rt:
        r1 = await run_cycle(rt)
        assert r1.open_findings == {"medium": 4}  # the weak VM policy, on each disk
        w.fleet.faults[vm.id] = Fault.FORBIDDEN
        vm_reads = w.fleet.stats.by_endpoint["/virtual_machines/virtual_machine/disk_backup_policies"]
        r2 = await run_cycle(rt)
        rep = await report_of(rt)
    assert r2.status is RunStatus.FAILED and r2.resolved == 0 and r2.open_findings == {"medium": 4}
    assert sorted((e.target, e.code) for e in r2.errors) == [(a.id, "permission_denied"),
                                                              (b.id, "permission_denied")]
    assert w.fleet.stats.by_endpoint["/virtual_machines/virtual_machine/disk_backup_policies"] == vm_reads + 1
    assert {d["disk_id"]: d["status"] for d in rep["disks"]} == {a.id: "unknown", b.id: "unknown"}


async def test_retries_then_reads_a_disk_whose_outage_clears(db_url: str) -> None:
    w = World()
    d = w.disk("flaky")
    w.policy(d, "flaky", retention=3)
    w.fleet.faults[d.id] = Fault.UNAVAILABLE
    w.fleet.faults_remaining[d.id] = 1  # one 503, then fine
    async with runtime(settings_for(db_url, disks=[d.id], max_attempts=3), w.fleet) as rt:
        r = await run_cycle(rt)
    assert r.status is RunStatus.COMPLETE and r.errors == []
    assert r.stats.retries >= 1 and r.open_findings == {"medium": 2}


# ---- organizations and VM-level policies ------------------------------------------------------------------


async def test_org_discovery_joins_vm_level_policies(db_url: str) -> None:
    w = World()
    web = w.vm("web")
    db = w.vm("db")
    web_sys, web_data = w.disk("web-sys", vm=web), w.disk("web-data", vm=web)
    db_sys, db_data = w.disk("db-sys", vm=db), w.disk("db-data", vm=db)
    loose = w.disk("loose")  # no policy, no VM
    busy = w.disk("busy")
    web_policy = w.policy(web, "web")  # good: covers both web disks
    db_policy = w.policy(db, "db", retention=5)  # too few backups, for both db disks
    busy_policies = [w.policy(busy, f"busy-{n}", retention=7 + n) for n in range(5)]
    bad_busy = w.policy(busy, "busy-bad", retention=2)  # on the last page at per_page 2
    outside = w.disk("elsewhere", org=w.other)  # another organization: not audited
    w.policy(outside, "elsewhere", retention=1)

    async with runtime(settings_for(db_url, orgs=[w.org.id], per_page=2), w.fleet) as rt:
        r = await run_cycle(rt)
        rep = await report_of(rt)
    assert r.status is RunStatus.COMPLETE and r.targets_checked == 1
    assert {d["disk_id"] for d in rep["disks"]} == {web_sys.id, web_data.id, db_sys.id, db_data.id, loose.id,
                                                     busy.id}
    for disk in (web_sys, web_data):
        assert findings_of(rep, disk.id) == {}
        item = disk_of(rep, disk.id)
        assert item["status"] == "compliant" and item["policies"] == [web_policy]
        assert item["vm_id"] == web.id and item["source"] == f"org:{w.org.id}"
    db_fps = set()
    for disk in (db_sys, db_data):
        mine = findings_of(rep, disk.id)
        assert set(mine) == {("retention-below-minimum", db_policy), ("retention-window-too-short", db_policy)}
        assert ("unprotected-disk", None) not in mine
        assert mine[("retention-below-minimum", db_policy)]["observed"]["target"] == f"VirtualMachine:{db.id}"
        db_fps |= {f["fingerprint"] for f in mine.values()}
    assert len(db_fps) == 4  # one finding per disk per rule
    assert set(findings_of(rep, loose.id)) == {("unprotected-disk", None)}
    assert findings_of(rep, loose.id)[("unprotected-disk", None)]["severity"] == "critical"
    assert set(findings_of(rep, busy.id)) == {("retention-below-minimum", bad_busy),
                                              ("retention-window-too-short", bad_busy)}
    assert sorted(disk_of(rep, busy.id)["policies"]) == sorted([*busy_policies, bad_busy])
    assert rep["summary"]["disks_total"] == 6
    assert rep["summary"]["by_rule"] == {"retention-below-minimum": 3, "retention-window-too-short": 3,
                                         "unprotected-disk": 1}
    # Paged at 2 per page: 6 disks are 3 pages, the org's 8 policies 4 pages.
    assert w.fleet.stats.by_endpoint["/organizations/organization/disks"] == 3
    assert w.fleet.stats.by_endpoint["/organizations/organization/disk_backup_policies"] == 4
    # Both VMs' policies are their disks' only coverage: each VM's disk list is read once for the attachment states.
    assert w.fleet.stats.by_endpoint["/virtual_machines/virtual_machine/disks"] == 2
    assert r.stats.requests == 9
    for disk in (web_sys, web_data, db_sys, db_data):
        assert disk_of(rep, disk.id)["attachment"] == {"state": "attached", "verified_at": iso(r.started_at)}
    assert disk_of(rep, loose.id)["attachment"] is None


async def test_explicit_disk_covered_only_by_its_vm_policy(db_url: str) -> None:
    w = World()
    vm = w.vm("app")
    covered, covered_data = w.disk("app-sys", vm=vm), w.disk("app-data", vm=vm)
    low = w.vm("batch")
    weak, weak_data = w.disk("batch-sys", vm=low), w.disk("batch-data", vm=low)
    w.policy(vm, "app")
    weak_policy = w.policy(low, "batch", retention=2)
    disks = [covered.id, covered_data.id, weak.id, weak_data.id]
    async with runtime(settings_for(db_url, disks=disks), w.fleet) as rt:
        r = await run_cycle(rt)
        rep = await report_of(rt)
    assert r.status is RunStatus.COMPLETE
    for d in (covered, covered_data):
        assert findings_of(rep, d.id) == {}
        assert disk_of(rep, d.id)["status"] == "compliant"
        assert disk_of(rep, d.id)["policies"] == ["dbp_app"]
        assert disk_of(rep, d.id)["vm_id"] == vm.id
    for d in (weak, weak_data):
        assert set(findings_of(rep, d.id)) == {("retention-below-minimum", weak_policy),
                                               ("retention-window-too-short", weak_policy)}
    # Two requests per disk plus one per distinct VM (README "What is audited").
    assert w.fleet.stats.by_endpoint["/virtual_machines/virtual_machine/disk_backup_policies"] == 2
    assert r.stats.requests == 2 * len(disks) + 2


async def test_explicit_disk_judges_its_vm_policy_even_with_its_own(db_url: str) -> None:
    # A VM policy covers the disk whatever else does, and each policy is judged on its own: the per-disk read
    # must reach the verdict the org-wide join reaches (test_org_discovery_joins_vm_level_policies).
    w = World()
    vm = w.vm("mixed")
    d = w.disk("mixed-sys", vm=vm)
    own = w.policy(d, "own")
    vm_policy = w.policy(vm, "vm-weak", retention=2)
    async with runtime(settings_for(db_url, disks=[d.id]), w.fleet) as rt:
        r = await run_cycle(rt)
        rep = await report_of(rt)
    assert r.status is RunStatus.COMPLETE
    assert set(findings_of(rep, d.id)) == {("retention-below-minimum", vm_policy),
                                           ("retention-window-too-short", vm_policy)}
    assert sorted(disk_of(rep, d.id)["policies"]) == sorted([own, vm_policy])
    assert disk_of(rep, d.id)["vm_id"] == vm.id


async def test_org_outage_does_not_resolve_vm_policy_findings_of_an_explicit_disk(db_url: str) -> None:
    # Audited both ways: while the org listing fails, the explicit per-disk read stands in for it and must not
    # make the VM policy's findings disappear (missing data never looks compliant).
    w = World()
    vm = w.vm("mixed")
    d = w.disk("mixed-sys", vm=vm)
    own = w.policy(d, "own")
    vm_policy = w.policy(vm, "vm-weak", retention=2)
    expected = {("retention-below-minimum", vm_policy), ("retention-window-too-short", vm_policy)}
    async with runtime(settings_for(db_url, orgs=[w.org.id], disks=[d.id]), w.fleet) as rt:
        r1 = await run_cycle(rt)
        assert set(findings_of(await report_of(rt), d.id)) == expected
        w.fleet.faults[w.org.id] = Fault.FORBIDDEN
        r2 = await run_cycle(rt)
        rep = await report_of(rt)
        detail = await read_disk_detail(rt, disk_id=d.id)
    assert r2.status is RunStatus.PARTIAL and r2.resolved == 0
    assert [(e.target, e.code) for e in r2.errors] == [(w.org.id, "permission_denied")]
    assert set(findings_of(rep, d.id)) == expected
    assert disk_of(rep, d.id)["status"] == "noncompliant"
    assert sorted(disk_of(rep, d.id)["policies"]) == sorted([own, vm_policy])
    assert detail is not None and detail["drift"] == []  # the same two policies both ways: no drift
    assert r1.open_findings == r2.open_findings == {"medium": 2}


async def test_disk_in_an_org_and_listed_explicitly_is_audited_once(db_url: str) -> None:
    w = World()
    shared = w.disk("shared")
    w.policy(shared, "shared", retention=3)
    lone = w.disk("lone", org=w.other)
    w.policy(lone, "lone")
    settings = settings_for(db_url, orgs=[w.org.id], disks=[shared.id, lone.id])
    async with runtime(settings, w.fleet) as rt:
        r = await run_cycle(rt)
        rep = await report_of(rt)
    assert r.status is RunStatus.COMPLETE and r.targets_checked == 3
    assert [d["disk_id"] for d in rep["disks"]].count(shared.id) == 1
    assert disk_of(rep, shared.id)["source"] == f"org:{w.org.id}"
    assert disk_of(rep, lone.id)["source"] == "config"
    assert len(findings_of(rep, shared.id)) == 2  # once, not twice
    assert rep["summary"]["disks_total"] == 2
    assert rep["summary"]["open_findings"] == 2
    # The shared disk came from the org listing; only the other disk used the per-disk endpoints.
    assert w.fleet.stats.by_endpoint["/disks/disk/disk_backup_policies"] == 1


async def test_disk_not_found_and_disk_in_trash(db_url: str) -> None:
    w = World()
    trashed = w.disk("trashed")
    w.fleet.faults[trashed.id] = Fault.IN_TRASH
    missing = "disk_neverexisted00"
    async with runtime(settings_for(db_url, disks=[missing, trashed.id]), w.fleet) as rt:
        r = await run_cycle(rt)
        rep = await report_of(rt)
        assert r.status is RunStatus.COMPLETE and r.errors == []  # definite answers, not failures
        assert r.open_findings == {"high": 2}
        assert set(findings_of(rep, missing)) == {("disk-not-found", None)}
        (in_trash,) = findings_of(rep, trashed.id).values()
        assert in_trash["rule"] == "disk-in-trash" and in_trash["severity"] == "high"
        assert in_trash["observed"]["keep_until"].endswith("Z")
        assert disk_of(rep, missing)["status"] == "noncompliant"
        assert disk_of(rep, trashed.id)["status"] == "noncompliant"

        # Restored from the trash with a good policy: the finding resolves.
        w.fleet.faults.pop(trashed.id)
        w.policy(trashed, "trashed")
        r2 = await run_cycle(rt)
        rep = await report_of(rt)
    assert r2.resolved == 1
    assert findings_of(rep, trashed.id) == {}
    assert disk_of(rep, trashed.id)["status"] == "compliant"
    assert set(findings_of(rep, missing)) == {("disk-not-found", None)}


async def test_org_listing_failure_keeps_its_known_disks_unknown(db_url: str) -> None:
    w = World()
    bare = w.disk("bare")
    good = w.disk("good")
    w.policy(good, "good")
    lone = w.disk("lone", org=w.other)
    w.policy(lone, "lone")
    async with runtime(settings_for(db_url, orgs=[w.org.id], disks=[lone.id]), w.fleet) as rt:
        r1 = await run_cycle(rt)
        assert r1.open_findings == {"critical": 1}
        w.fleet.faults[w.org.id] = Fault.UNAVAILABLE
        w.policy(bare, "bare")  # fixed, but unseen
        r2 = await run_cycle(rt)
        rep = await report_of(rt)
        assert r2.status is RunStatus.PARTIAL and r2.resolved == 0
        assert [(e.target, e.code) for e in r2.errors] == [(w.org.id, "service_unavailable")]
        assert disk_of(rep, bare.id)["status"] == "unknown"
        assert disk_of(rep, good.id)["status"] == "unknown"  # never "compliant" without a reading
        assert disk_of(rep, lone.id)["status"] == "compliant"
        assert set(findings_of(rep, bare.id)) == {("unprotected-disk", None)}
        assert rep["summary"] == {**rep["summary"], "disks_total": 3, "unknown": 2, "compliant": 1,
                                  "open_findings": 1}

        w.fleet.faults.pop(w.org.id)
        r3 = await run_cycle(rt)
        rep = await report_of(rt)
    assert r3.status is RunStatus.COMPLETE and r3.resolved == 1
    assert {d["disk_id"]: d["status"] for d in rep["disks"]} == {bare.id: "compliant", good.id: "compliant",
                                                                 lone.id: "compliant"}


async def test_disk_removed_from_the_org_leaves_the_report(db_url: str) -> None:
    w = World()
    keep = w.disk("keep")
    w.policy(keep, "keep")
    gone = w.disk("gone")  # unprotected
    async with runtime(settings_for(db_url, orgs=[w.org.id]), w.fleet) as rt:
        await run_cycle(rt)
        rep = await report_of(rt)
        assert {d["disk_id"] for d in rep["disks"]} == {keep.id, gone.id}
        assert rep["summary"]["open_findings"] == 1
        w.fleet.remove_disk(gone.id)
        r = await run_cycle(rt)
        rep = await report_of(rt)
        open_now = await rt.store.read(queries.all_findings, statuses=["open", "waived"])
    assert r.status is RunStatus.COMPLETE
    assert [d["disk_id"] for d in rep["disks"]] == [keep.id]
    assert rep["findings"] == [] and rep["summary"]["disks_total"] == 1 and rep["summary"]["open_findings"] == 0
    assert open_now == []
    assert r.open_findings == {}


# ---- drift and storage -------------------------------------------------------------------------------------


async def test_drift_events_for_retention_interval_and_removal(db_url: str) -> None:
    w = World()
    d = w.disk("drifty")
    p_ret = w.policy(d, "ret", retention=7)
    p_int = w.policy(d, "int", retention=14, interval="daily")
    p_gone = w.policy(d, "gone", retention=30)
    async with runtime(settings_for(db_url, disks=[d.id]), w.fleet) as rt:
        r1 = await run_cycle(rt)
        detail = await read_disk_detail(rt, disk_id=d.id)
        assert detail is not None and detail["drift"] == []  # the first reading is the baseline
        w.fleet.update_policy(p_ret, retention=10)
        w.fleet.update_policy(p_int, interval="weekly")
        w.fleet.remove_policy(p_gone)
        r2 = await run_cycle(rt)
        detail = await read_disk_detail(rt, disk_id=d.id)
        rep = await report_of(rt)
    assert detail is not None
    drift = {e["policy_id"]: e for e in detail["drift"]}
    assert set(drift) == {p_ret, p_int, p_gone}
    assert all(e["run_id"] == r2.run_id for e in drift.values())
    assert drift[p_ret]["kind"] == "policy-changed"
    assert drift[p_ret]["before"]["retention"] == 7 and drift[p_ret]["after"]["retention"] == 10
    assert drift[p_int]["kind"] == "policy-changed"
    assert drift[p_int]["before"]["interval"] == "daily" and drift[p_int]["after"]["interval"] == "weekly"
    assert drift[p_gone]["kind"] == "policy-removed"
    assert drift[p_gone]["before"] == {"retention": 30, "interval": "daily", "target_type": "Disk",
                                       "target_id": d.id}
    assert drift[p_gone]["after"] is None
    # History stays answerable: every setting a policy had, with when it held.
    ret_states = [s for s in detail["snapshots"] if s["policy_id"] == p_ret]
    assert [(s["retention"], s["valid_from"], s["valid_to"]) for s in ret_states] == [
        (7, iso(r1.started_at), iso(r2.started_at)), (10, iso(r2.started_at), None)]
    assert sorted(p["policy_id"] for p in detail["policies"]) == sorted([p_ret, p_int])
    assert {(e["policy_id"], e["kind"]) for e in rep["drift"]} == {
        (p_ret, "policy-changed"), (p_int, "policy-changed"), (p_gone, "policy-removed")}
    # The weekly interval is now too infrequent.
    assert ("interval-too-infrequent", p_int) in findings_of(rep, d.id)


async def test_first_successful_reading_is_the_baseline_not_drift(db_url: str) -> None:
    # A disk first seen while unreadable has no known policies yet: its first real reading is not "added" drift.
    w = World()
    d = w.disk("late")
    w.policy(d, "late-a")
    w.policy(d, "late-b", retention=3)
    w.fleet.faults[d.id] = Fault.FORBIDDEN
    async with runtime(settings_for(db_url, disks=[d.id]), w.fleet) as rt:
        first = await run_cycle(rt)
        assert first.status is RunStatus.FAILED and first.disks_unknown == 1
        w.fleet.faults.pop(d.id)
        second = await run_cycle(rt)
        assert second.status is RunStatus.COMPLETE
        detail = await read_disk_detail(rt, disk_id=d.id)
        drift_rows = await count(rt, "drift_events")
    assert detail is not None
    assert detail["drift"] == [] and drift_rows == 0
    assert sorted(p["policy_id"] for p in detail["policies"]) == ["dbp_late-a", "dbp_late-b"]
    assert detail["status"] == "noncompliant"


async def test_unchanged_polls_add_no_snapshot_rows(db_url: str) -> None:
    w = World()
    vm = w.vm("host")
    d1 = w.disk("one")
    w.disk("two", vm=vm)
    p1 = w.policy(d1, "one", retention=3)
    w.policy(d1, "one-b")
    w.policy(vm, "host")
    async with runtime(settings_for(db_url, orgs=[w.org.id], disks=[d1.id]), w.fleet) as rt:
        await run_cycle(rt)
        baseline = {t: await count(rt, t) for t in ("policy_states", "drift_events", "finding_events", "findings",
                                                   "disks")}
        assert baseline["policy_states"] == 3 and baseline["drift_events"] == 0
        runs_before = await count(rt, "audit_runs")
        n = 4
        last_next = 0
        for i in range(n):
            # The schedule moves on every poll (as it does in Katapult): updated in place, not a new snapshot.
            last_next = soon(24 + i)
            w.fleet.update_policy(p1, next_invocation_at=last_next)
            r = await run_cycle(rt)
            assert r.status is RunStatus.COMPLETE and r.opened == 0 and r.resolved == 0
        after = {t: await count(rt, t) for t in baseline}
        assert after == baseline
        assert await count(rt, "audit_runs") == runs_before + n
        detail = await read_disk_detail(rt, disk_id=d1.id)
    assert detail is not None
    (current,) = [p for p in detail["policies"] if p["policy_id"] == p1]
    assert current["next_invocation_at"] == iso(datetime.fromtimestamp(last_next, UTC))
    assert current["valid_to"] is None


@contextmanager
def statements(rt: Services) -> Iterator[list[str]]:
    """Yields the list of SQL statements the store's engine runs meanwhile."""
    seen: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        seen.append(" ".join(statement.split()))

    event.listen(rt.store.engine.sync_engine, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        event.remove(rt.store.engine.sync_engine, "before_cursor_execute", note)


def history_reads(seen: list[str]) -> list[str]:
    return [s for s in seen if "FROM policy_states" in s or "FROM disk_states" in s]


async def read_model(rt: Services) -> dict[str, tuple[str | None, str | None, str | None]]:
    """Returns each disk's (verdict column, status of its open verdict interval, policies digest)."""
    async with rt.store.engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT d.id, d.verdict, s.status, d.policies_digest FROM disks d "
            "LEFT JOIN disk_states s ON s.disk_id = d.id AND s.valid_to IS NULL"))).all()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


async def test_an_unchanged_cycle_reads_no_history_and_a_later_change_is_still_seen(db_url: str) -> None:
    w = World()
    vm = w.vm("host")
    d = w.disk("one")
    w.disk("two", vm=vm)
    p = w.policy(d, "one", retention=14)
    w.policy(vm, "host")
    tables = ("policy_states", "disk_states", "drift_events", "findings")
    async with runtime(settings_for(db_url, orgs=[w.org.id]), w.fleet) as rt:
        await run_cycle(rt)
        baseline = {t: await count(rt, t) for t in tables}
        with statements(rt) as seen:
            r2 = await run_cycle(rt)
        assert r2.status is RunStatus.COMPLETE
        # The disks' read model says their policies and verdicts are as stored: neither history table is read.
        assert history_reads(seen) == []
        assert {t: await count(rt, t) for t in tables} == baseline
        w.fleet.update_policy(p, retention=3)
        r3 = await run_cycle(rt)
        detail = await read_disk_detail(rt, disk_id=d.id)
        model = await read_model(rt)
    assert r3.opened == 2
    assert detail is not None and detail["status"] == "noncompliant"
    assert [(e["kind"], e["before"]["retention"], e["after"]["retention"]) for e in detail["drift"]] == [
        ("policy-changed", 14, 3)]
    assert model[d.id][:2] == ("noncompliant", "noncompliant")
    assert all(verdict == status and digest for verdict, status, digest in model.values())


async def test_disks_without_a_read_model_are_compared_with_their_history(db_url: str) -> None:
    # As on a database migrated from revision 0005: the columns are empty until a cycle writes them.
    w = World()
    d = w.disk("one")
    w.policy(d, "one")
    w.policy(d, "one-b", retention=3)
    tables = ("policy_states", "disk_states", "drift_events")
    async with runtime(settings_for(db_url, orgs=[w.org.id]), w.fleet) as rt:
        await run_cycle(rt)
        baseline = {t: await count(rt, t) for t in tables}
        async with rt.store.engine.begin() as conn:
            await conn.execute(text("UPDATE disks SET policies_digest = NULL, verdict = NULL"))
        with statements(rt) as seen:
            await run_cycle(rt)
        assert history_reads(seen) != []
        assert {t: await count(rt, t) for t in tables} == baseline
        model = await read_model(rt)
        assert model[d.id][0] == model[d.id][1] == "noncompliant" and model[d.id][2]
        with statements(rt) as seen:
            await run_cycle(rt)
        assert history_reads(seen) == []


async def test_a_disk_that_leaves_and_comes_back_gets_a_verdict_again(db_url: str) -> None:
    w = World()
    keep = w.disk("keep")
    w.policy(keep, "keep")
    w.disk("gone")  # unprotected: noncompliant
    gone_id = "disk_gone"
    async with runtime(settings_for(db_url, orgs=[w.org.id]), w.fleet) as rt:
        await run_cycle(rt)
        w.fleet.remove_disk(gone_id)
        await run_cycle(rt)
        left = await read_model(rt)
        w.disk("gone")
        back = await run_cycle(rt)
        model = await read_model(rt)
        rep = await report_of(rt)
    assert left[gone_id][:2] == (None, None)  # its verdict interval is closed: no current verdict
    assert back.status is RunStatus.COMPLETE
    assert model[gone_id][:2] == ("noncompliant", "noncompliant")
    assert disk_of(rep, gone_id)["status"] == "noncompliant"


async def test_a_persisting_finding_whose_values_change_is_rewritten(db_url: str) -> None:
    w = World()
    d = w.disk("low")
    bad = w.policy(d, "low", retention=3)
    async with runtime(settings_for(db_url, disks=[d.id]), w.fleet) as rt:
        r1 = await run_cycle(rt)
        w.fleet.update_policy(bad, retention=4)  # still below the minimum: the same findings, other values
        r2 = await run_cycle(rt)
        stored = {f.rule: f for f in await rt.store.read(queries.all_findings, statuses=["open"])}
    assert r2.opened == 0 and r2.resolved == 0
    below = stored["retention-below-minimum"]
    assert below.observed["retention"] == 4 and "keeps 4 backups" in below.message
    assert below.first_seen == r1.started_at and below.last_seen == r2.started_at
    assert stored["retention-window-too-short"].observed["retention"] == 4


# ---- run records -------------------------------------------------------------------------------------------


async def test_run_records_and_the_token_never_leaks(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    secret = "kat-SECRET-token-0123456789abcdef"
    w = World()
    w.fleet.tokens.add(secret)
    ok = w.disk("ok")
    w.policy(ok, "ok")
    denied = w.disk("denied")
    w.fleet.faults[denied.id] = Fault.FORBIDDEN
    broken = w.disk("broken")
    w.fleet.faults[broken.id] = Fault.SERVER_ERROR
    caplog.set_level(logging.DEBUG)
    async with runtime(settings_for(db_url, disks=[ok.id, denied.id, broken.id], max_attempts=2), w.fleet,
                       token=secret) as rt:
        outcome = await run_cycle(rt)
        run = await rt.store.read(queries.latest_run)
        runs = await rt.store.read(queries.list_runs)
        rep = await report_of(rt)
    assert run is not None and run.id == outcome.run_id and len(runs) == 1
    assert run.status is RunStatus.PARTIAL
    assert run.started_at <= run.finished_at  # type: ignore[operator]
    assert run.targets_checked == 3 and run.disks_ok == 1 and run.disks_unknown == 2
    assert run.stats.requests > 0 and run.stats.requests == outcome.stats.requests
    assert run.stats.retries >= 1  # the 500 was retried
    assert sorted((e.target, e.code) for e in run.errors) == sorted(
        [(denied.id, "permission_denied"), (broken.id, "unhandled_exception")])
    assert all(e.message for e in run.errors)
    last = rep["last_run"]
    assert last["id"] == run.id and last["status"] == "partial" and last["targets_checked"] == 3
    assert last["api_requests"] == run.stats.requests
    assert last["started_at"].endswith("Z") and last["finished_at"].endswith("Z")
    everything = json.dumps(rep) + repr(run) + repr(outcome) + caplog.text
    assert secret not in everything
    assert "Bearer" not in everything


# ---- waivers -----------------------------------------------------------------------------------------------


async def test_waivers_from_config(db_url: str) -> None:
    w = World()
    waived_disk = w.disk("waived")
    expired_disk = w.disk("expired")
    mixed = w.disk("mixed")
    p_good = w.policy(mixed, "good", retention=3)
    p_other = w.policy(mixed, "other", retention=3)
    today = utcnow().date()
    waivers = [
        {"rule": "unprotected-disk", "disk": waived_disk.id, "reason": "being decommissioned",
         "owner": "ops@example.com", "expires": (today + timedelta(days=3)).isoformat()},
        {"rule": "unprotected-disk", "disk": expired_disk.id, "reason": "was fine", "owner": "old@example.com",
         "expires": (today - timedelta(days=1)).isoformat()},
        {"rule": "retention-below-minimum", "disk": mixed.id, "policy": p_good, "reason": "test data",
         "owner": "qa@example.com", "expires": (today + timedelta(days=60)).isoformat()},
        {"rule": "unprotected-disk", "disk": mixed.id, "reason": "no owner"},
    ]
    settings = settings_for(db_url, disks=[waived_disk.id, expired_disk.id, mixed.id], waivers=waivers)
    async with runtime(settings, w.fleet) as rt:
        outcome = await run_cycle(rt)
        rep = await report_of(rt)
    assert outcome.status is RunStatus.COMPLETE
    # Open: the expired one (critical), and for `mixed` all but the waived retention finding.
    assert outcome.open_findings == {"critical": 1, "medium": 3}
    assert [(p.index, p.problem.split(":")[0]) for p in outcome.waiver_problems] == [
        (1, f"expired on {(today - timedelta(days=1)).isoformat()}"), (3, "malformed")]

    (waived,) = findings_of(rep, waived_disk.id).values()
    assert waived["status"] == "waived"
    assert waived["waiver"]["reason"] == "being decommissioned"
    assert waived["waiver"]["owner"] == "ops@example.com"
    assert waived["waiver"]["expires"] == (today + timedelta(days=3)).isoformat()
    assert disk_of(rep, waived_disk.id)["status"] == "compliant"  # waived findings don't count

    (expired,) = findings_of(rep, expired_disk.id).values()
    assert expired["status"] == "open" and expired["waiver"] is None
    assert disk_of(rep, expired_disk.id)["status"] == "noncompliant"

    m = findings_of(rep, mixed.id)
    assert m[("retention-below-minimum", p_good)]["status"] == "waived"
    assert m[("retention-below-minimum", p_other)]["status"] == "open"
    assert m[("retention-window-too-short", p_good)]["status"] == "open"

    assert rep["summary"]["open_findings"] == 4 and rep["summary"]["waived_findings"] == 2
    assert [p["index"] for p in rep["waiver_problems"]] == [1, 3]
    assert rep["waiver_problems"][0]["problem"].startswith("expired on")
    assert "owner is required" in rep["waiver_problems"][1]["problem"]
    assert [x["disk_id"] for x in rep["expiring_waivers"]] == [waived_disk.id]


async def test_waiver_removed_while_the_disk_is_unknown_reopens_the_finding(db_url: str) -> None:
    w = World()
    d = w.disk("hidden")  # unprotected
    waived = [{"rule": "unprotected-disk", "disk": d.id, "reason": "r", "owner": "o@example.com",
               "expires": "2099-01-01"}]
    async with runtime(settings_for(db_url, disks=[d.id], waivers=waived), w.fleet) as rt:
        r1 = await run_cycle(rt)
        assert r1.open_findings == {}
    w.fleet.faults[d.id] = Fault.FORBIDDEN
    async with runtime(settings_for(db_url, disks=[d.id]), w.fleet) as rt:  # the waiver is gone from config
        r2 = await run_cycle(rt)
        rep = await report_of(rt)
    assert r2.status is RunStatus.FAILED
    assert r2.open_findings == {"critical": 1}
    (f,) = rep["findings"]
    assert f["status"] == "open" and f["waiver"] is None
    assert f["last_seen"] == iso(r1.started_at)
    assert disk_of(rep, d.id)["status"] == "unknown"
    assert rep["summary"]["open_findings"] == 1
