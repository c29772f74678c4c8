"""What Katapult really says about coverage, in real cycles on SQLite and PostgreSQL through the fake Katapult behind
a loopback socket: VM policies cover attached disks only (`detached-from-covering-vm`), the attachment refresh and
its request cost, both policy `target` shapes, and `audit.organizations = ["*"]`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from auditor.cli import tier_lines
from auditor.config import Settings, settings_from
from auditor.domain.records import RunStatus
from auditor.fake import FakeServer, Fault, Fleet, create_app
from auditor.fake.fleet import TARGET_SHAPES
from auditor.service import Services, open_services
from auditor.service.clock import utcnow
from auditor.service.collection import ATTACHMENT_UNKNOWN, ORGANIZATION_NOT_VISIBLE
from auditor.service.cycle import AuditOutcome, run_cycle
from auditor.service.reports import iso
from auditor.store import queries
from tests.test_audit_cycle import TOKEN, World, disk_of, findings_of, report_of, settings_for, soon
from tests.test_tiers import with_tiers

DETACHED = "detached-from-covering-vm"
VM_DISKS = "/virtual_machines/virtual_machine/disks"
ORGANIZATIONS = "/organizations"
FAR = 24 * 90  # hours: policies due far ahead, so moving the clock a few days makes nothing stale


class Clock:
    """The auditor's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


Serve = Callable[[Fleet], FakeServer]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Starts the fake Katapult serving a fleet on a loopback socket (stopped after the test)."""
    started: list[FakeServer] = []

    def start(fleet: Fleet) -> FakeServer:
        server = FakeServer(fleet)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def with_audit(settings: Settings, **changes: Any) -> Settings:
    return settings.model_copy(update={"audit": settings.audit.model_copy(update=changes)})


@asynccontextmanager
async def auditor(settings: Settings, clock: Clock | None = None) -> AsyncIterator[Services]:
    async with open_services(settings, token=TOKEN, clock=clock or utcnow) as rt:
        yield rt


def calls(fleet: Fleet, endpoint: str) -> int:
    return fleet.stats.by_endpoint.get(endpoint, 0)


async def cycle(rt: Services) -> tuple[AuditOutcome, dict[str, Any]]:
    outcome = await run_cycle(rt)
    return outcome, await report_of(rt)


def vm_world() -> tuple[World, dict[str, str]]:
    """acme: VM web (policy on the VM only) with an attached system disk and a detached data disk; VM db whose disks
    have their own policies (never needs its attachment read); a standalone disk."""
    w = World()
    web = w.vm("web")
    sys_ = w.disk("web-sys", vm=web)
    data = w.disk("web-data", vm=web)
    w.fleet.set_attachment(data.id, "detached", attach_on_boot=False)
    w.policy(web, "web", next_at=soon(FAR))
    db = w.vm("db")
    db_sys = w.disk("db-sys", vm=db)
    w.policy(db_sys, "db-sys", next_at=soon(FAR))
    lone = w.disk("lone")
    w.policy(lone, "lone", next_at=soon(FAR))
    return w, {"web": web.id, "sys": sys_.id, "data": data.id, "db": db.id, "db_sys": db_sys.id, "lone": lone.id}


# ---- attachment truth ----------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_detached_disk_in_per_disk_mode_from_the_lookup_and_reattaching_resolves(
        db_url: str, serve: Serve) -> None:
    w, ids = vm_world()
    server = serve(w.fleet)
    settings = settings_for(db_url, disks=[ids["sys"], ids["data"], ids["db_sys"]], api_url=server.url)
    async with auditor(settings) as rt:
        r1, rep = await cycle(rt)
        assert r1.status is RunStatus.COMPLETE
        (finding,) = findings_of(rep, ids["data"]).values()
        assert finding["rule"] == DETACHED and finding["severity"] == "high" and finding["policy_id"] is None
        assert finding["observed"] == {"vm_id": ids["web"], "state": "detached", "attach_on_boot": False,
                                       "vm_policies": ["dbp_web"]}
        assert disk_of(rep, ids["data"])["status"] == "noncompliant"
        assert disk_of(rep, ids["data"])["attachment"] == {"state": "detached", "verified_at": iso(r1.started_at)}
        assert disk_of(rep, ids["sys"])["status"] == "compliant"
        assert disk_of(rep, ids["sys"])["attachment"] == {"state": "attached", "verified_at": iso(r1.started_at)}
        assert disk_of(rep, ids["db_sys"])["attachment"]["state"] == "attached"
        # The disk lookup carries the state: no VM disk list is read in this mode.
        assert calls(w.fleet, VM_DISKS) == 0
        stored, *_ = await rt.store.read(queries.disk_history, ids["data"])
        assert stored is not None and stored.attachment is not None and stored.attachment.state == "detached"

        w.fleet.set_attachment(ids["data"], "attached")
        r2, rep = await cycle(rt)
        assert r2.resolved == 1 and findings_of(rep, ids["data"]) == {}
        assert disk_of(rep, ids["data"])["status"] == "compliant"
        assert disk_of(rep, ids["data"])["attachment"] == {"state": "attached", "verified_at": iso(r2.started_at)}


@pytest.mark.slow
async def test_detached_disk_in_organization_mode_and_the_refresh_schedule(db_url: str, serve: Serve) -> None:
    w, ids = vm_world()
    server = serve(w.fleet)
    clock = Clock()
    settings = with_audit(settings_for(db_url, orgs=[w.org.id], api_url=server.url),
                          attachment_refresh=timedelta(hours=24))
    async with auditor(settings, clock) as rt:
        r1, rep = await cycle(rt)
        assert r1.status is RunStatus.COMPLETE
        assert set(findings_of(rep, ids["data"])) == {(DETACHED, None)}
        assert disk_of(rep, ids["sys"])["status"] == "compliant"
        assert disk_of(rep, ids["data"])["attachment"] == {"state": "detached", "verified_at": iso(r1.started_at)}
        # One request: the disk list of web, whose policy is the only coverage of its disks. db's disks have their
        # own policies, and the standalone disk has no VM: neither needs one.
        assert calls(w.fleet, VM_DISKS) == 1
        assert disk_of(rep, ids["db_sys"])["attachment"] is None

        # Re-attached, but within the refresh: what was read stands (and costs nothing).
        w.fleet.set_attachment(ids["data"], "attached")
        clock.advance(timedelta(hours=23))
        r2, rep = await cycle(rt)
        assert calls(w.fleet, VM_DISKS) == 1
        assert set(findings_of(rep, ids["data"])) == {(DETACHED, None)} and r2.resolved == 0
        assert disk_of(rep, ids["data"])["attachment"]["verified_at"] == iso(r1.started_at)

        # Due again: read once more, and the finding resolves.
        clock.advance(timedelta(hours=1))
        r3, rep = await cycle(rt)
        assert calls(w.fleet, VM_DISKS) == 2
        assert r3.resolved == 1 and findings_of(rep, ids["data"]) == {}
        assert disk_of(rep, ids["data"])["status"] == "compliant"
        assert disk_of(rep, ids["data"])["attachment"] == {"state": "attached", "verified_at": iso(r3.started_at)}

        # A disk that moves to another VM (covered by that VM only) is read at once, for that VM.
        other = w.vm("other")
        w.policy(other, "other", next_at=soon(FAR))
        w.fleet.move_disk(ids["data"], other.id, attachment="detached")
        clock.advance(timedelta(minutes=15))
        r4, rep = await cycle(rt)
        assert calls(w.fleet, VM_DISKS) == 3
        assert set(findings_of(rep, ids["data"])) == {(DETACHED, None)}
        assert findings_of(rep, ids["data"])[(DETACHED, None)]["observed"]["vm_id"] == other.id
        assert disk_of(rep, ids["data"])["attachment"] == {"state": "detached", "verified_at": iso(r4.started_at)}

        # Moved off every VM: no VM covers it, nothing to read; it is unprotected.
        w.fleet.move_disk(ids["data"], None)
        clock.advance(timedelta(minutes=15))
        r5, rep = await cycle(rt)
        assert calls(w.fleet, VM_DISKS) == 3
        assert set(findings_of(rep, ids["data"])) == {("unprotected-disk", None)}
        assert disk_of(rep, ids["data"])["attachment"] is None


@pytest.mark.slow
async def test_an_unreadable_vm_disk_list_leaves_its_vm_covered_disks_unknown(db_url: str,
                                                                              serve: Serve) -> None:
    w, ids = vm_world()
    server = serve(w.fleet)
    w.fleet.faults[ids["web"]] = Fault.UNAVAILABLE  # every lookup of web: its policies are org-listed, not by VM
    settings = settings_for(db_url, orgs=[w.org.id], api_url=server.url, max_attempts=1)
    async with auditor(settings) as rt:
        r1, rep = await cycle(rt)
        assert r1.status is RunStatus.PARTIAL
        for name in ("sys", "data"):
            item = disk_of(rep, ids[name])
            assert item["status"] == "unknown" and item["error"]["code"] == "service_unavailable", name
            assert "attached" in item["error"]["message"]
        assert disk_of(rep, ids["db_sys"])["status"] == "compliant"
        assert disk_of(rep, ids["lone"])["status"] == "compliant"

        # Readable, but the list does not show the disk: not known either (a race with a move), never covered.
        w.fleet.faults.clear()
        w.fleet.move_disk(ids["data"], None)
        w.fleet.disks[ids["data"]].vm_id = ids["web"]  # listed on web by the organization, absent from web's list
        r2, rep = await cycle(rt)
        assert disk_of(rep, ids["data"])["status"] == "unknown"
        assert disk_of(rep, ids["data"])["error"]["code"] == ATTACHMENT_UNKNOWN
        assert disk_of(rep, ids["sys"])["status"] == "compliant"


# ---- observed runs of a VM's policy: only the disks attached to it ------------------------------------------


def runs_of(rt: Services, disk_id: str) -> Any:
    return rt.store.read(queries.disk_invocations, disk_id)


def epoch_iso(seconds: int) -> str:
    return iso(datetime.fromtimestamp(seconds, tz=UTC))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["organization", "per-disk"])
async def test_a_vm_policys_runs_are_observed_only_for_the_disks_known_attached(db_url: str, serve: Serve,
                                                                                mode: str) -> None:
    w, ids = vm_world()
    # db gets a policy of its own too: db-sys, which has its own, is attached, but in organization mode its
    # attachment is never read (it does not decide its coverage), so whether db's runs back it up is not known
    # there; the disk lookup of the per-disk mode always says.
    w.policy(w.fleet.vms[ids["db"]], "db", next_at=soon(FAR))
    server = serve(w.fleet)
    clock = Clock()
    audited = {"orgs": [w.org.id]} if mode == "organization" else {
        "disks": [ids[n] for n in ("sys", "data", "db_sys")]}
    settings = settings_for(db_url, api_url=server.url, **audited)  # type: ignore[arg-type]
    t0 = int(clock.now.timestamp())
    runs = [t0 + 3600, t0 + 3600 + 86400]  # every policy's two runs, a day apart

    def plan(next_at: int) -> None:
        for pid in ("dbp_web", "dbp_db", "dbp_db-sys"):
            w.fleet.update_policy(pid, next_invocation_at=next_at, total_size=5.0)

    plan(runs[0])
    async with auditor(settings, clock) as rt:
        await cycle(rt)
        for due in runs:
            clock.now = datetime.fromtimestamp(due + 3600, tz=UTC)
            plan(due + 86400)  # the run due at `due` happened: the next one is planned
            r, rep = await cycle(rt)
            assert r.status is RunStatus.COMPLETE, r.errors
        sys_, data, db_sys = (disk_of(rep, ids[n]) for n in ("sys", "data", "db_sys"))
        # The attached disk: both runs of web's policy, a day apart.
        assert sys_["last_invocation_at"] == epoch_iso(runs[1]) and sys_["observed_rpo_seconds"] == 86400
        assert sys_["observed_since"] is not None
        assert [(i.policy_id, int(i.due_at.timestamp())) for i in await runs_of(rt, ids["sys"])] == [
            ("dbp_web", runs[1]), ("dbp_web", runs[0])]
        # The detached disk: web's runs back up its attached disks, not this one.
        assert set(findings_of(rep, ids["data"])) == {(DETACHED, None)}
        assert (data["last_invocation_at"], data["observed_since"], data["observed_rpo_seconds"]) == (None, None, None)
        assert await runs_of(rt, ids["data"]) == []
        assert await rt.store.read(queries.policy_schedules_of, [ids["data"]]) == {}
        # Its own policy's runs always count; web's only where the disk is known to be attached.
        counted = {"organization": {"dbp_db-sys"}, "per-disk": {"dbp_db-sys", "dbp_db"}}[mode]
        assert {i.policy_id for i in await runs_of(rt, ids["db_sys"])} == counted
        assert db_sys["attachment"] == (None if mode == "organization" else
                                        {"state": "attached", "verified_at": iso(r.started_at)})
        assert rep["summary"]["observed_rpo"]["disks"] == 2  # sys and db-sys: never the detached disk

        # Attached again: web's next run is the disk's too (the run due before the poll that saw it attached is
        # not: whether it was attached then is not known).
        w.fleet.set_attachment(ids["data"], "attached")
        clock.now += timedelta(days=1, seconds=1)  # past the attachment refresh: read again in organization mode
        plan(runs[1] + 2 * 86400)
        r, rep = await cycle(rt)
        assert findings_of(rep, ids["data"]) == {} and await runs_of(rt, ids["data"]) == []
        clock.now += timedelta(days=1)
        plan(runs[1] + 3 * 86400)
        r, rep = await cycle(rt)
        assert [int(i.due_at.timestamp()) for i in await runs_of(rt, ids["data"])] == [runs[1] + 2 * 86400]
        assert disk_of(rep, ids["data"])["last_invocation_at"] == epoch_iso(runs[1] + 2 * 86400)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["organization", "per-disk"])
async def test_a_tier_that_disables_the_detached_rule_counts_a_vm_policys_runs_on_its_detached_disks(
        db_url: str, serve: Serve, mode: str) -> None:
    w, ids = vm_world()
    old = w.disk("web-old", vm=w.fleet.vms[ids["web"]])  # detached too, but in no tier
    w.fleet.set_attachment(old.id, "detached")
    ids["old"] = old.id
    w.fleet.set_annotations(ids["data"], {"backups": "detached-too"})
    server = serve(w.fleet)
    clock = Clock()
    audited = {"orgs": [w.org.id]} if mode == "organization" else {"disks": [ids[n] for n in ("sys", "data", "old")]}
    tier = {"name": "detached-ok", "match": {"disk_annotations": {"backups": "detached-too"}},
            "disabled": [DETACHED]}
    settings = with_tiers(settings_for(db_url, api_url=server.url, **audited), [tier])  # type: ignore[arg-type]
    due = int(clock.now.timestamp()) + 3600
    w.fleet.update_policy("dbp_web", next_invocation_at=due, total_size=5.0)
    async with auditor(settings, clock) as rt:
        await cycle(rt)
        clock.now = datetime.fromtimestamp(due + 3600, tz=UTC)
        w.fleet.update_policy("dbp_web", next_invocation_at=due + 86400)
        r, rep = await cycle(rt)
        assert r.status is RunStatus.COMPLETE, r.errors
        assert disk_of(rep, ids["data"])["tier"] == "detached-ok"
        assert findings_of(rep, ids["data"]) == {}  # covered by web's policy under its tier's rules...
        assert disk_of(rep, ids["data"])["last_invocation_at"] == epoch_iso(due)  # ... and so is web's run
        assert set(findings_of(rep, ids["old"])) == {(DETACHED, None)}
        assert disk_of(rep, ids["old"])["last_invocation_at"] is None
        assert [i.disk_id for i in await runs_of(rt, ids["old"])] == []


# ---- both target shapes --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("shape", TARGET_SHAPES)
@pytest.mark.parametrize("mode", ["organization", "per-disk"])
async def test_every_target_shape_gives_the_same_verdicts(db_url: str, serve: Serve, shape: str,
                                                          mode: str) -> None:
    w, ids = vm_world()
    bad = w.disk("bad")
    w.policy(bad, "bad", retention=3, next_at=soon(FAR))
    ids["bad"] = bad.id
    w.fleet.policy_target_shape = shape
    server = serve(w.fleet)
    audited = {"orgs": [w.org.id]} if mode == "organization" else {
        "disks": [ids[n] for n in ("sys", "data", "db_sys", "lone", "bad")]}
    async with auditor(settings_for(db_url, api_url=server.url, **audited)) as rt:  # type: ignore[arg-type]
        r, rep = await cycle(rt)
    assert r.status is RunStatus.COMPLETE
    verdicts = {name: (disk_of(rep, ids[name])["status"], sorted(findings_of(rep, ids[name])))
                for name in ("sys", "data", "db_sys", "lone", "bad")}
    assert verdicts == {
        "sys": ("compliant", []),
        "data": ("noncompliant", [(DETACHED, None)]),
        "db_sys": ("compliant", []),
        "lone": ("compliant", []),
        "bad": ("noncompliant", [("retention-below-minimum", "dbp_bad"), ("retention-window-too-short", "dbp_bad")]),
    }
    assert disk_of(rep, ids["sys"])["policies"] == ["dbp_web"]


class _RewriteTargets(httpx.AsyncBaseTransport):
    """Serves the fake, with every policy's `target` replaced by `target` (a shape no known API sends)."""

    def __init__(self, fleet: Fleet, target: Any) -> None:
        self.inner = httpx.ASGITransport(app=create_app(fleet))
        self.target = target

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if not request.url.path.endswith("/disk_backup_policies"):
            return response
        body = json.loads(await response.aread())
        for item in body.get("disk_backup_policies", []):
            item["target"] = self.target
        return httpx.Response(response.status_code, json=body, headers={"content-type": "application/json"})


@pytest.mark.parametrize(("target", "field"), [
    ({"target": {"id": "bucket_1"}}, "disk_backup_policies[0].target.target.id"),
    ({"kind": "Disk", "ref": "disk_1"}, "disk_backup_policies[0].target.id"),
    ({"type": "Volume", "value": {"id": "disk_1"}}, "disk_backup_policies[0].target.type"),
    # A type its id's prefix contradicts: neither dropped (it would cover nothing) nor trusted.
    ({"type": "VirtualMachine", "value": {"id": "disk_1"}}, "disk_backup_policies[0].target.value.id"),
    ({"type": "Disk", "value": {"id": "vm_1"}}, "disk_backup_policies[0].target.value.id"),
])
@pytest.mark.parametrize("mode", ["organization", "per-disk"])
async def test_an_unknown_target_shape_is_malformed_never_no_target(db_url: str, target: Any, field: str,
                                                                    mode: str) -> None:
    w, ids = vm_world()
    audited = {"orgs": [w.org.id]} if mode == "organization" else {"disks": [ids["lone"]]}
    settings = settings_for(db_url, **audited)  # type: ignore[arg-type]
    async with open_services(settings, transport=_RewriteTargets(w.fleet, target), token=TOKEN) as rt:
        r, rep = await cycle(rt)
    assert r.status is RunStatus.FAILED
    lone = [d for d in rep["disks"] if d["disk_id"] == ids["lone"]]
    if mode == "per-disk":
        (item,) = lone
        assert item["status"] == "unknown" and item["error"]["code"] == "malformed_response"
        assert field in item["error"]["message"]
    else:
        assert lone == []  # never read: nothing about it is reported compliant or unprotected
        (error,) = rep["last_run"]["errors"]
        assert error["code"] == "malformed_response" and field in error["message"]
    assert rep["summary"]["compliant"] == 0 and rep["findings"] == []


class _StrayVmPolicy(httpx.AsyncBaseTransport):
    """Serves the fake, with one more policy in VM web's policy list: one targeting `target`."""

    def __init__(self, fleet: Fleet, target: Any) -> None:
        self.inner = httpx.ASGITransport(app=create_app(fleet))
        self.target = target

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if not (request.url.path.endswith("/virtual_machines/virtual_machine/disk_backup_policies")
                and request.url.params.get("virtual_machine[id]") == "vm_web"):
            return response
        body = json.loads(await response.aread())
        body["disk_backup_policies"].append({"id": "dbp_stray", "retention": 1, "target": self.target,
                                             "schedule": {"interval": "monthly", "next_invocation_at": soon(FAR)}})
        return httpx.Response(response.status_code, json=body, headers={"content-type": "application/json"})


@pytest.mark.parametrize("target", [
    {"type": "Disk", "value": {"id": "disk_web-data"}},  # a disk of the VM: its own policies come from its own list
    {"type": "VirtualMachine", "value": {"id": "vm_db"}},
])
async def test_a_vm_policy_list_answering_about_another_object_leaves_its_disks_unknown(db_url: str,
                                                                                       target: Any) -> None:
    w, ids = vm_world()
    settings = settings_for(db_url, disks=[ids[n] for n in ("sys", "data", "db_sys", "lone")])
    async with open_services(settings, transport=_StrayVmPolicy(w.fleet, target), token=TOKEN) as rt:
        r, rep = await cycle(rt)
    assert r.status is RunStatus.PARTIAL
    for name in ("sys", "data"):  # web's disks: web's list was not about web alone
        item = disk_of(rep, ids[name])
        assert item["status"] == "unknown" and item["error"]["code"] == "unexpected_object", name
        assert "virtual machine vm_web" in item["error"]["message"] and "dbp_stray" in item["error"]["message"]
    assert disk_of(rep, ids["db_sys"])["status"] == disk_of(rep, ids["lone"])["status"] == "compliant"
    assert all("dbp_stray" not in d["policies"] for d in rep["disks"])
    assert rep["findings"] == []  # nothing judged by it: neither the weak stray policy nor "no policy"


# ---- every organization the token can see ---------------------------------------------------------------------


@pytest.mark.slow
async def test_every_visible_organization_listed_each_cycle(db_url: str, serve: Serve) -> None:
    w = World()
    acme_disk = w.disk("acme-data")
    w.policy(acme_disk, "acme", next_at=soon(FAR))
    other_disk = w.disk("other-data", org=w.other)  # unprotected: one critical finding
    server = serve(w.fleet)
    tiers = [{"name": "acme", "match": {"organizations": ["acme"]}, "min_retention": 10}]  # by sub-domain
    settings = with_tiers(settings_for(db_url, orgs=["*"], api_url=server.url), tiers)
    async with auditor(settings) as rt:
        r1, rep = await cycle(rt)
        assert r1.status is RunStatus.COMPLETE and r1.targets_checked == 2
        assert calls(w.fleet, ORGANIZATIONS) == 1
        assert disk_of(rep, acme_disk.id)["source"] == f"org:{w.org.id}"
        assert disk_of(rep, acme_disk.id)["tier"] == "acme"  # a "*" organization is known by its sub-domain too
        assert set(findings_of(rep, other_disk.id)) == {("unprotected-disk", None)}

        # A new organization is audited in the cycle that first sees it.
        new = w.fleet.add_org("newco", id="org_newconewconewco0")
        new_disk = w.disk("newco-data", org=new)
        w.policy(new_disk, "newco", next_at=soon(FAR))
        r2, rep = await cycle(rt)
        assert calls(w.fleet, ORGANIZATIONS) == 2 and r2.targets_checked == 3
        assert disk_of(rep, new_disk.id)["status"] == "compliant"

        # One the token no longer sees: its disks are unknown, their findings neither resolved nor dropped.
        w.other.visible = False
        r3, rep = await cycle(rt)
        assert calls(w.fleet, ORGANIZATIONS) == 3
        assert r3.status is RunStatus.PARTIAL and r3.resolved == 0
        item = disk_of(rep, other_disk.id)
        assert item["status"] == "unknown" and item["error"]["code"] == ORGANIZATION_NOT_VISIBLE
        assert [f["status"] for f in rep["findings"] if f["disk_id"] == other_disk.id] == ["open"]
        assert (w.other.id, ORGANIZATION_NOT_VISIBLE) in {(e["target"], e["code"]) for e in rep["last_run"]["errors"]}
        # Organization listings: one per cycle, and each visible organization's disk list once.
        before = calls(w.fleet, "/organizations/organization/disks")
        r4, rep = await cycle(rt)
        assert disk_of(rep, other_disk.id)["error"]["code"] == ORGANIZATION_NOT_VISIBLE
        assert calls(w.fleet, "/organizations/organization/disks") - before == 2

        # Visible again: audited again.
        w.other.visible = True
        r5, rep = await cycle(rt)
        assert r5.status is RunStatus.COMPLETE
        assert disk_of(rep, other_disk.id)["status"] == "noncompliant"

    # Removed from the configuration ("*" replaced by acme alone): the other organizations' disks leave the report.
    async with auditor(with_audit(settings, organizations=[w.org.id])) as rt:
        r6, rep = await cycle(rt)
        assert {d["disk_id"] for d in rep["disks"]} == {acme_disk.id}


@pytest.mark.slow
async def test_attachment_refreshes_are_spread_over_the_cycles_of_a_refresh(db_url: str, serve: Serve) -> None:
    w = World()
    vms = [w.vm(f"app-{n}") for n in range(4)]
    disks = [w.disk(f"app-{n}-sys", vm=vm) for n, vm in enumerate(vms)]
    for n, vm in enumerate(vms):
        pid = w.policy(vm, f"app-{n}", next_at=soon(FAR))
        w.fleet.policies[pid].total_size = 5.0  # holds backups: days pass here, and no-backup-data must not fire
    server = serve(w.fleet)
    clock = Clock()
    # Four VMs, a 6-hour interval and a 24-hour refresh: once due together, one VM a cycle is read again.
    settings = with_audit(settings_for(db_url, orgs=[w.org.id], api_url=server.url),
                          interval=timedelta(hours=6), attachment_refresh=timedelta(hours=24))
    reads: list[int] = []
    async with auditor(settings, clock) as rt:
        for step in (timedelta(0), timedelta(hours=6), timedelta(hours=18), timedelta(hours=6), timedelta(hours=6),
                     timedelta(hours=6), timedelta(hours=6)):
            clock.advance(step)
            before = calls(w.fleet, VM_DISKS)
            r, rep = await cycle(rt)
            assert r.status is RunStatus.COMPLETE
            reads.append(calls(w.fleet, VM_DISKS) - before)
            # A VM not read yet keeps what was read before: its disk stays judged, never unknown.
            assert all(disk_of(rep, d.id)["status"] == "compliant" for d in disks)
        # At 0h all; at 24h, 30h, 36h, 42h one each (oldest first); at 48h the one read at 24h is due again.
        assert reads == [4, 0, 1, 1, 1, 1, 1]
        verified = sorted(disk_of(rep, d.id)["attachment"]["verified_at"] for d in disks)
        assert len(set(verified)) == 4  # now read at four different times: the next refreshes stay spread

        # A disk moving to a VM it was never read for is read at once, whatever the share.
        w.fleet.move_disk(disks[0].id, vms[1].id)
        clock.advance(timedelta(minutes=1))
        before = calls(w.fleet, VM_DISKS)
        await cycle(rt)
        assert calls(w.fleet, VM_DISKS) - before == 1


class _OrganizationsFail(httpx.AsyncBaseTransport):
    """Serves the fake, except GET /organizations while `failing`: 503 service_unavailable."""

    def __init__(self, fleet: Fleet) -> None:
        self.inner = httpx.ASGITransport(app=create_app(fleet))
        self.failing = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.failing and request.url.path.endswith("/core/v1/organizations"):
            return httpx.Response(503, json={"error": {"code": "service_unavailable", "description": "down",
                                                       "detail": {}}}, headers={"x-api-schema": "json-error"})
        return await self.inner.handle_async_request(request)


async def test_when_the_organizations_cannot_be_listed_their_disks_stay_unknown(db_url: str) -> None:
    w = World()
    bare = w.disk("bare")  # unprotected: an open finding that must not resolve while unseen
    explicit = w.disk("explicit", org=w.other)
    w.policy(explicit, "explicit", next_at=soon(FAR))
    transport = _OrganizationsFail(w.fleet)
    settings = settings_for(db_url, orgs=["*", w.other.id], max_attempts=1)
    async with open_services(settings, transport=transport, token=TOKEN) as rt:
        r1, rep = await cycle(rt)
        assert r1.status is RunStatus.COMPLETE and set(findings_of(rep, bare.id)) == {("unprotected-disk", None)}
        transport.failing = True
        r2, rep = await cycle(rt)
        assert r2.status is RunStatus.PARTIAL and r2.resolved == 0
        item = disk_of(rep, bare.id)
        assert item["status"] == "unknown" and item["error"]["code"] == "service_unavailable"
        assert "organizations could not be listed" in item["error"]["message"]
        assert [f["status"] for f in rep["findings"] if f["disk_id"] == bare.id] == ["open"]
        # An organization named beside "*" is read whatever the listing says.
        assert disk_of(rep, explicit.id)["status"] == "compliant"
        assert ("*", "service_unavailable") in {(e["target"], e["code"]) for e in rep["last_run"]["errors"]}


@pytest.mark.parametrize(("audited", "warned"), [(["*"], False), (["org_acmeacmeacmeacme"], True)])
def test_check_config_warns_about_tier_organizations_only_when_they_cannot_match(audited: list[str],
                                                                                 warned: bool) -> None:
    settings = settings_from({"audit": {"organizations": audited},
                              "tiers": [{"name": "eu", "match": {"organizations": ["acme"]}, "min_retention": 9}]},
                             {})
    # With "*" every organization is known by its id and its sub-domain: "acme" matches.
    assert any("not spelled as in audit.organizations" in line for line in tier_lines(settings)) is warned


@pytest.mark.slow
def test_check_config_shows_every_organization_and_the_attachment_refresh(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('[audit]\norganizations = ["*"]\nattachment_refresh = "6h"\n', encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "auditor", "check-config", "--config", "c.toml"], cwd=tmp_path,
                          env={**os.environ, "KATAPULT_API_TOKEN": "t"}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert '"*" is every organization the token can see' in done.stdout
    assert "attachment refresh: 6h per VM" in done.stdout
    assert "rule detached-from-covering-vm: high" in done.stdout
