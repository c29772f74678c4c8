"""The application layer: the cycle lease and its fence, failed cycles announced and kept by whoever runs the cycles,
the heartbeat around cycles, deterministic notification keys, read-only commands that never create or migrate a
database, and the layer's shape (one way to call a use case; Services holds wiring only)."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import inspect
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from receivers import HttpReceiver, Reply

from auditor.api import ApiDeps, create_app
from auditor.config import Settings
from auditor.domain.records import RunStatus
from auditor.errors import LeaseHeldError, SchemaError
from auditor.fake import Fault, Fleet
from auditor.fake import create_app as fake_app
from auditor.service import Services, open_services
from auditor.service.alerts import notification_key
from auditor.service.cycle import PendingFailures, record_failures, run_cycle
from auditor.service.leases import read_cycle_lease
from auditor.service.runner import CycleMetrics, CycleRunner
from auditor.store import engine as db
from auditor.store import queries, writes
from auditor.store.leases import CYCLE, Holder

KATAPULT = "http://fake/core/v1"
TOKEN = "fake-token"
REPO = Path(__file__).resolve().parent.parent


class Clock:
    """The services' clock seam, moved by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _fleet(n: int = 3) -> tuple[Fleet, list[str]]:
    fleet = Fleet()
    fleet.rate_limit_per_minute = 1_000_000
    org = fleet.add_org("acme")
    ids = []
    for i in range(n):
        d = fleet.add_disk(org.id, name=f"disk {i}")
        if i:  # disk 0 stays unprotected: one open finding
            fleet.add_policy(d.id, retention=30 * 24, interval="hourly",
                             next_invocation_at=int(time.time()) + 30 * 86400)
        ids.append(d.id)
    return fleet, ids


def _settings(db_url: str, disks: list[str], **extra: Any) -> Settings:
    data: dict[str, Any] = {
        "katapult": {"api_url": KATAPULT, "per_page": 5, "max_attempts": 1, "max_requests_per_minute": 100_000},
        "database": {"url": db_url},
        "audit": {"disks": disks},
        "daemon": {"leader_ttl": "30s"},
    }
    data.update(extra)
    return Settings(**data)


# ---- the cycle lease ------------------------------------------------------------------------------------


async def test_a_second_process_cannot_run_a_cycle_while_the_lease_is_held(db_url: str) -> None:
    fleet, ids = _fleet()
    settings = _settings(db_url, ids)
    transport = httpx.ASGITransport(app=fake_app(fleet))
    async with open_services(settings, transport=transport, token=TOKEN) as first, \
            open_services(settings, transport=transport, token=TOKEN) as second:
        assert first.holder.id != second.holder.id
        taken, _ = await first.leases.acquire(CYCLE, first.holder, now=first.clock(), ttl=timedelta(seconds=30))
        assert taken
        with pytest.raises(LeaseHeldError) as held:
            await run_cycle(second, wait=0.3)
        assert f"pid {first.holder.pid}" in str(held.value) and held.value.since
        assert await second.store.read(queries.list_runs) == []  # nothing recorded by the refused cycle
        # The API answers 409 naming the holder.
        runner = CycleRunner(second, cycles=CycleMetrics())
        app = create_app(ApiDeps(services=second, trigger=runner.trigger))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as api:
            response = await api.post("/api/v1/audit")
        assert response.status_code == 409 and response.json()["holder"] == f"{first.holder.host} pid " \
            f"{first.holder.pid}"
        # Released: the second one runs, and numbering goes on.
        held_lease = await read_cycle_lease(first)
        assert held_lease is not None
        await first.leases.release(held_lease.term, now=first.clock())
        outcome = await run_cycle(second)
        assert outcome.status is RunStatus.COMPLETE
        released = await read_cycle_lease(second)  # released after the cycle: the row stays, expired, its epoch kept
        assert released is not None and not released.is_live(second.clock())
        assert released.epoch == held_lease.epoch + 1  # the second process's holding was the next term


@pytest.mark.slow  # a race won by timing: the taker commits while the first cycle waits on 0.5 s answers
async def test_a_commit_after_the_lease_was_taken_over_is_refused(db_url: str) -> None:
    fleet, ids = _fleet()
    fleet.latency = 0.5  # the first cycle is still reading when the other process takes over and commits
    same, same_ids = _fleet()  # the same fleet (same ids), answered at once, for the process that takes over
    assert same_ids == ids
    settings = _settings(db_url, ids)
    start = datetime.now(UTC)
    late = Clock(start + timedelta(minutes=10))  # its lease looks expired to this one
    async with open_services(settings, transport=httpx.ASGITransport(app=fake_app(fleet)), token=TOKEN) as slow, \
            open_services(settings, transport=httpx.ASGITransport(app=fake_app(same)), token=TOKEN,
                          clock=late) as taker:
        cycle = asyncio.create_task(run_cycle(slow))
        for _ in range(250):  # until the slow cycle holds its lease and has recorded its run as started
            lease = await read_cycle_lease(slow)
            started = [r for r in await slow.store.read(queries.list_runs) if r.status is RunStatus.RUNNING]
            if lease is not None and lease.holder == slow.holder.id and started:
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the slow cycle never started")
        # The taker's clock is past the lease expiry: it takes over and marks the slow run abandoned.
        taken = await run_cycle(taker)
        assert taken.status is RunStatus.COMPLETE
        outcome = await cycle
        assert outcome.status is RunStatus.FAILED and outcome.errors[0].code == "lease_lost"
        runs = {r.id: r for r in await slow.store.read(queries.list_runs)}
        assert runs[outcome.run_id].status is RunStatus.FAILED
        assert runs[outcome.run_id].errors[0].code == "abandoned"
        assert runs[taken.run_id].status is RunStatus.COMPLETE
        # Only the taker's verdict was written (its clock is the one every stored finding carries).
        findings = await slow.store.read(queries.all_findings, statuses=("open",))
        assert len(findings) == taken.opened and ids[0] in {f.disk_id for f in findings}
        assert {f.last_seen for f in findings} == {late.now}


async def test_a_live_holders_run_is_never_marked_abandoned(db_url: str) -> None:
    fleet, ids = _fleet()
    settings = _settings(db_url, ids)
    async with open_services(settings, transport=httpx.ASGITransport(app=fake_app(fleet)), token=TOKEN) as s:
        run_id = "a" * 32
        taken, _ = await s.leases.acquire(CYCLE, s.holder, now=s.clock(), ttl=timedelta(seconds=30), run_id=run_id)
        assert taken
        await s.store.write(writes.start_run, now=s.clock(), trigger="test", run_id=run_id, owner=s.holder.id)
        # Another process (a different holder) looks: the lease is live, so the run stays running.
        assert await s.store.write(writes.abandon_orphaned_runs, now=s.clock(), reason="x") == []
        # Once the lease has expired, the run is orphaned.
        later = s.clock() + timedelta(minutes=1)
        assert await s.store.write(writes.abandon_orphaned_runs, now=later, reason="its process stopped") == [run_id]


async def test_a_lease_of_a_dead_process_on_this_host_is_taken_at_once(db_url: str) -> None:
    fleet, ids = _fleet()
    settings = _settings(db_url, ids)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = Holder(f"{Holder.current().host}:{proc.pid}:dead", Holder.current().host, proc.pid,
                  datetime.now(UTC))
    async with open_services(settings, transport=httpx.ASGITransport(app=fake_app(fleet)), token=TOKEN) as s:
        taken, _ = await s.leases.acquire(CYCLE, dead, now=s.clock(), ttl=timedelta(hours=1), run_id="b" * 32)
        assert taken
        await s.store.write(writes.start_run, now=s.clock(), trigger="test", run_id="b" * 32, owner=dead.id)
        outcome = await run_cycle(s)  # no waiting out the hour: its holder is gone
        assert outcome.status is RunStatus.COMPLETE
        runs = {r.id: r for r in await s.store.read(queries.list_runs)}
        assert runs["b" * 32].status is RunStatus.FAILED and runs["b" * 32].errors[0].code == "abandoned"


# ---- failed cycles are announced ------------------------------------------------------------------------


async def test_a_failed_cycle_raises_audit_incomplete_and_counts(db_url: str) -> None:
    fleet, ids = _fleet(1)
    fleet.faults[ids[0]] = Fault.UNAVAILABLE
    settings = _settings(db_url, ids, notifiers=[{"kind": "webhook", "name": "hook",
                                                   "url": "http://127.0.0.1:9/hook", "min_severity": "low"}])
    async with open_services(settings, transport=httpx.ASGITransport(app=fake_app(fleet)), token=TOKEN) as s:
        # Failures in a row are counted by whoever runs the cycles (the daemon's runner), for /metrics.
        runner = CycleRunner(s, cycles=CycleMetrics())
        first = runner.start("schedule")
        assert first is not None
        outcome = await first
        assert outcome is not None and outcome.status is RunStatus.FAILED
        assert runner.cycles.consecutive_failed == 1
        entries = await s.outbox.recent()
        assert [a.rule for e in entries for a in e.notification.alerts] == ["audit-incomplete"]
        second = runner.start("schedule")
        assert second is not None and await second is not None
        assert runner.cycles.consecutive_failed == 2
        assert len(await s.outbox.recent()) == 1  # still firing: not announced twice
        app = create_app(ApiDeps(services=s, trigger=_no_trigger, cycles=runner.cycles))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as api:
            ready = await api.get("/readyz")
            metrics = (await api.get("/metrics")).text
        # A failed run finished recently, but failed runs do not make the auditor ready.
        assert ready.status_code == 503 and "the last one failed" in ready.json()["reason"]
        assert "auditor_consecutive_failed_cycles 2.0" in metrics


async def test_a_cycle_that_cannot_reach_the_database_is_recorded_when_it_can(tmp_path: Path) -> None:
    fleet, ids = _fleet(2)
    url = f"sqlite:///{tmp_path / 'a.db'}"
    settings = _settings(url, ids, notifiers=[{"kind": "webhook", "name": "hook",
                                                "url": "http://127.0.0.1:9/hook", "min_severity": "low"}])
    async with open_services(settings, transport=httpx.ASGITransport(app=fake_app(fleet)), token=TOKEN) as s:
        good = await run_cycle(s)
        assert good.status is RunStatus.COMPLETE
        # The database goes away (file moved aside): the cycle fails, the failure waits in memory.
        (tmp_path / "a.db").rename(tmp_path / "b.db")
        (tmp_path / "a.db").mkdir()  # a directory where the file was: every connection fails
        await s.store.close()
        failures = PendingFailures()  # what whoever runs the cycles keeps across them
        failed = await run_cycle(s, failures=failures)
        assert failed.status is RunStatus.FAILED and failed.errors[0].code == "database_unavailable"
        assert [f.run_id for f in failures] == [failed.run_id]
        # The database is back: the failure is recorded with its audit-incomplete alert.
        (tmp_path / "a.db").rmdir()
        (tmp_path / "b.db").rename(tmp_path / "a.db")
        assert await record_failures(s, failures=failures) == 0 and len(failures) == 0
        runs = {r.id: r for r in await s.store.read(queries.list_runs)}
        assert runs[failed.run_id].status is RunStatus.FAILED
        rules = [a.rule for e in await s.outbox.recent() for a in e.notification.alerts]
        assert "audit-incomplete" in rules


async def test_the_runner_keeps_its_failed_cycles_until_the_database_takes_them(tmp_path: Path) -> None:
    # The failure state lives across cycles in whoever runs them (the daemon's runner), never in Services.
    fleet, ids = _fleet(2)
    url = f"sqlite:///{tmp_path / 'a.db'}"
    async with open_services(_settings(url, ids), transport=httpx.ASGITransport(app=fake_app(fleet)),
                             token=TOKEN) as s:
        runner = CycleRunner(s, cycles=CycleMetrics())
        (tmp_path / "a.db").rename(tmp_path / "b.db")
        (tmp_path / "a.db").mkdir()  # every connection fails
        await s.store.close()
        failed = []
        for _ in range(2):
            task = runner.start("schedule")
            assert task is not None
            outcome = await task
            assert outcome is not None and outcome.status is RunStatus.FAILED
            failed.append(outcome.run_id)
        assert [f.run_id for f in runner.failures] == failed  # both kept, oldest first
        assert await runner.record_failures() == 2  # still down: nothing lost
        (tmp_path / "a.db").rmdir()
        (tmp_path / "b.db").rename(tmp_path / "a.db")
        assert await runner.record_failures() == 0 and len(runner.failures) == 0
        runs = {r.id: r for r in await s.store.read(queries.list_runs)}
        assert [runs[run_id].status for run_id in failed] == [RunStatus.FAILED] * 2


async def _no_trigger() -> str | None:
    return None


# ---- the heartbeat --------------------------------------------------------------------------------------


@pytest.fixture
def heartbeat() -> Any:
    with HttpReceiver() as receiver:
        yield receiver


async def test_heartbeat_start_success_and_fail(tmp_path: Path, heartbeat: HttpReceiver) -> None:
    fleet, ids = _fleet(2)
    settings = _settings(f"sqlite:///{tmp_path / 'a.db'}", ids,
                         heartbeat={"url": heartbeat.url + "/ping/secret-uuid", "timeout_seconds": 2})
    async with open_services(settings, transport=httpx.ASGITransport(app=fake_app(fleet)), token=TOKEN) as s:
        assert s.heartbeat is not None
        complete = await run_cycle(s)
        fleet.faults[ids[1]] = Fault.UNAVAILABLE
        partial = await run_cycle(s)
        fleet.faults[ids[0]] = Fault.UNAVAILABLE
        failed = await run_cycle(s)
        await s.heartbeat.flush(5)
    assert (complete.status, partial.status, failed.status) == (RunStatus.COMPLETE, RunStatus.PARTIAL,
                                                                RunStatus.FAILED)
    paths = [r.path for r in heartbeat.requests]
    base = "/ping/secret-uuid"
    assert paths == [f"{base}/start", base, f"{base}/start", f"{base}/fail", f"{base}/start", f"{base}/fail"]
    bodies = [r.body.decode() for r in heartbeat.requests]
    assert bodies[1].startswith("complete run ") and "2 disks" in bodies[1]
    assert bodies[3].startswith("partial run ") and "1 unknown" in bodies[3]


@pytest.mark.slow  # a receiver that hangs for real
async def test_a_hanging_heartbeat_receiver_does_not_delay_the_cycle(tmp_path: Path,
                                                                     heartbeat: HttpReceiver) -> None:
    fleet, ids = _fleet(2)
    heartbeat.script(*[Reply(200, "ok", delay=30)] * 4)
    settings = _settings(f"sqlite:///{tmp_path / 'a.db'}", ids,
                         heartbeat={"url": heartbeat.url + "/ping/x", "timeout_seconds": 5, "max_attempts": 1})
    async with open_services(settings, transport=httpx.ASGITransport(app=fake_app(fleet)), token=TOKEN) as s:
        began = time.monotonic()
        outcome = await run_cycle(s)
        took = time.monotonic() - began
        assert outcome.status is RunStatus.COMPLETE
        assert took < 4.0, f"the cycle waited for the heartbeat ({took:.1f}s; its timeout is 5 s)"
        assert s.heartbeat is not None
        heartbeat.app.release_waiters()


# ---- notification keys ----------------------------------------------------------------------------------


def test_one_transition_has_one_key_and_a_repeat_a_new_one() -> None:
    from auditor.domain.alerts import Alert, AlertStatus
    from auditor.domain.models import Severity

    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    alert = Alert("fp1", "unprotected-disk", Severity.HIGH, AlertStatus.FIRING, "s", "d", starts_at=t0)
    a = notification_key("hook", "firing", "{}:{}", [alert], now=t0)
    b = notification_key("hook", "firing", "{}:{}", [alert], now=t0 + timedelta(hours=1))
    assert a == b and len(a) == 32  # the same transition planned later (another process, a retry): same key
    resolved = Alert("fp1", "unprotected-disk", Severity.HIGH, AlertStatus.RESOLVED, "s", "d", starts_at=t0,
                     ends_at=t0 + timedelta(hours=2))
    assert notification_key("hook", "resolved", "{}:{}", [resolved], now=t0) != a
    r1 = notification_key("hook", "repeat", "{}:{}", [alert], now=t0 + timedelta(hours=4))
    r2 = notification_key("hook", "repeat", "{}:{}", [alert], now=t0 + timedelta(hours=8))
    assert len({a, r1, r2}) == 3
    assert notification_key("other", "firing", "{}:{}", [alert], now=t0) != a


# ---- read-only commands ---------------------------------------------------------------------------------


async def test_read_only_open_never_creates_or_migrates(tmp_path: Path, db_url: str) -> None:
    missing = tmp_path / "typo" / "nothing.db"
    with pytest.raises(SchemaError, match="does not exist"):
        async with open_services(_settings(f"sqlite:///{missing}", []), katapult=False, migrate=False):
            pass
    assert not missing.exists() and not missing.parent.exists()
    await db.upgrade(db_url, "0001")
    with pytest.raises(SchemaError, match="revision 0001"):
        async with open_services(_settings(db_url, []), katapult=False, migrate=False):
            pass
    assert (await db.current_revision(db_url))[0] == "0001"  # left as it was


@pytest.mark.slow  # a real `auditor report` process
def test_report_on_a_mistyped_database_path_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "auditor.toml"
    config.write_text('[database]\nurl = "sqlite:///./audtor.db"\n')
    proc = subprocess.run([sys.executable, "-m", "auditor", "report", "--config", str(config)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "audtor.db").exists()


# ---- history ----------------------------------------------------------------------------------------------


async def test_each_run_stores_its_summary_and_disk_verdicts_by_change(db_url: str) -> None:
    from sqlalchemy import select

    from auditor.store.tables import disk_states, run_summaries

    fleet, ids = _fleet(3)
    settings = _settings(db_url, ids)
    clock = Clock(datetime.now(UTC).replace(microsecond=0))
    async with open_services(settings, transport=httpx.ASGITransport(app=fake_app(fleet)), token=TOKEN,
                             clock=clock) as s:
        first = await run_cycle(s)
        clock.now += timedelta(minutes=15)
        await run_cycle(s)  # nothing changed: no new disk state rows
        fleet.faults[ids[1]] = Fault.UNAVAILABLE
        clock.now += timedelta(minutes=15)
        third = await run_cycle(s)
        async with s.store.engine.connect() as conn:
            summaries = (await conn.execute(select(run_summaries).order_by(run_summaries.c.started_at))).all()
            states = (await conn.execute(select(disk_states).order_by(disk_states.c.id))).all()
    assert [r.status for r in summaries] == ["complete", "complete", "partial"]
    assert (summaries[0].disks_total, summaries[0].disks_compliant, summaries[0].disks_noncompliant,
            summaries[0].disks_unknown) == (3, 2, 1, 0)
    assert summaries[0].open_by_rule == {"unprotected-disk": 1} and summaries[0].open_by_severity == {"critical": 1}
    assert (summaries[2].disks_compliant, summaries[2].disks_unknown) == (1, 1)
    assert summaries[0].run_id == first.run_id and summaries[2].run_id == third.run_id
    # Three first verdicts, then one change (disk 1 compliant -> unknown): the old row closed, a new one open.
    assert len(states) == 4
    changed = [r for r in states if r.disk_id == ids[1]]
    assert [(r.status, r.valid_to is None) for r in changed] == [("compliant", False), ("unknown", True)]
    assert changed[0].valid_to == changed[1].valid_from == clock.now


# ---- the layer's shape ----------------------------------------------------------------------------------------

USE_CASE_MODULES = ("cycle", "delivery", "leases", "housekeeping", "queries", "compliance", "evidence",
                    "sessions")
# The store-level read `read_report` and `read_snapshot` share (kept as the store rewrite wrote it).
NOT_A_USE_CASE = {"auditor.service.queries.build_report"}


def _use_cases() -> dict[str, inspect.Signature]:
    found = {}
    for name in USE_CASE_MODULES:
        module = importlib.import_module(f"auditor.service.{name}")
        for attr, fn in vars(module).items():
            if not attr.startswith("_") and inspect.iscoroutinefunction(fn) and fn.__module__ == module.__name__:
                found[f"{module.__name__}.{attr}"] = inspect.signature(fn)
    return found


def _odd_shape(signature: inspect.Signature) -> bool:
    first, *rest = signature.parameters.values()
    return first.name != "services" or any(p.kind is not inspect.Parameter.KEYWORD_ONLY for p in rest)


def test_every_use_case_is_called_one_way() -> None:
    # `async def verb(services: Services, *, ...)` (the convention in auditor/service/__init__.py).
    found = _use_cases()
    assert {"auditor.service.cycle.run_cycle", "auditor.service.delivery.deliver_due",
            "auditor.service.queries.read_report", "auditor.service.compliance.read_period_report",
            "auditor.service.evidence.build_evidence", "auditor.service.housekeeping.prune_history"} <= set(found)
    odd = sorted(name for name, signature in found.items() if name not in NOT_A_USE_CASE and _odd_shape(signature))
    assert odd == []
    # The check can fail: the shapes it refuses.
    assert _odd_shape(inspect.signature(lambda store, *, now: None))
    assert _odd_shape(inspect.signature(lambda services, period: None))


def test_services_is_wiring_without_state_or_use_cases() -> None:
    assert Services.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert [f.name for f in dataclasses.fields(Services)] == ["settings", "store", "client", "dispatcher",
                                                              "heartbeat", "clock", "holder"]
    public = {name for name in vars(Services) if not name.startswith("_")}
    assert public - {f.name for f in dataclasses.fields(Services)} == {"rules", "run_config", "targets", "outbox",
                                                                      "leases", "aclose"}


async def test_a_run_abandoned_by_a_process_that_is_gone_is_announced_as_audit_incomplete(db_url: str) -> None:
    from auditor.service.housekeeping import abandon_orphans

    fleet, ids = _fleet()
    settings = _settings(db_url, ids, notifiers=[{"kind": "webhook", "name": "ops", "url": "http://127.0.0.1:9/h"}])
    async with open_services(settings, transport=httpx.ASGITransport(app=fake_app(fleet)), token=TOKEN) as s:
        # A run whose process died holding no lease (kill -9 after its lease expired): nobody owns it.
        run_id = writes.new_run_id()
        await s.store.write(writes.start_run, run_id=run_id, now=s.clock(), trigger="schedule",
                            owner="elsewhere:1:0123456789ab")
        assert await abandon_orphans(s) == [run_id]
        [entry] = await s.outbox.recent()
        assert entry.kind == "firing" and [a.rule for a in entry.notification.alerts] == ["audit-incomplete"]
        assert entry.notification.alerts[0].status.value == "firing"
        assert await abandon_orphans(s) == []  # recorded once, announced once
        assert len(await s.outbox.recent()) == 1
        # The next complete cycle resolves it (its own sweep finds nothing more to announce).
        outcome = await run_cycle(s, trigger="manual")
        assert outcome.status is RunStatus.COMPLETE
        incomplete = [a for e in await s.outbox.recent() for a in e.notification.alerts if a.rule == "audit-incomplete"]
        assert [a.status.value for a in incomplete] == ["resolved", "firing"]  # newest first


async def test_simultaneous_audit_requests_on_two_processes_promise_only_runs_that_exist(db_url: str) -> None:
    # POST /api/v1/audit on two replicas at once: a 202's run id is recorded (running) before it is answered;
    # the other request is refused naming the holder, never handed an id for a run that will not exist.
    fleet, ids = _fleet()
    fleet.latency = 0.05  # the cycle is still running when the answers are checked
    settings = _settings(db_url, ids)
    transport = httpx.ASGITransport(app=fake_app(fleet))
    async with open_services(settings, transport=transport, token=TOKEN) as a, \
            open_services(settings, transport=transport, token=TOKEN, migrate=False) as b:
        runners = [CycleRunner(s, cycles=CycleMetrics()) for s in (a, b)]
        answers = await asyncio.gather(*(r.trigger() for r in runners), return_exceptions=True)
        started = [x for x in answers if isinstance(x, str)]
        refused = [x for x in answers if not isinstance(x, str)]
        assert len(started) == 1 and len(refused) == 1, answers
        assert isinstance(refused[0], LeaseHeldError) and refused[0].holder, refused
        runs = {r.id: r for r in await a.store.read(queries.list_runs)}
        assert runs[started[0]].status is RunStatus.RUNNING
        for r in runners:
            if r.current is not None:
                await r.current
        assert (await a.store.read(queries.latest_run)).id == started[0]


async def test_an_expired_lease_is_never_renewed_by_its_old_holder(db_url: str) -> None:
    # A process paused past its lease (SIGSTOP, a frozen VM) wakes up: even if nobody took the lease meanwhile,
    # it cannot renew it — its cycle's commit is refused and it must take the lease anew before acting.
    from auditor.errors import LeaseLostError

    fleet, ids = _fleet()
    settings = _settings(db_url, ids)
    async with open_services(settings, transport=httpx.ASGITransport(app=fake_app(fleet)), token=TOKEN) as s:
        now, ttl = s.clock(), timedelta(seconds=30)
        taken, first = await s.leases.acquire(CYCLE, s.holder, now=now, ttl=ttl, run_id="b" * 32)
        assert taken and first is not None
        assert await s.leases.renew(first.term, now=now + timedelta(seconds=10), ttl=ttl)  # live: renewed
        woke = now + timedelta(seconds=10) + ttl + timedelta(seconds=1)  # past the renewed expiry
        assert not await s.leases.renew(first.term, now=woke, ttl=ttl)
        with pytest.raises(LeaseLostError):
            async with s.store.transaction() as tx:
                await tx.fence(first.term, now=woke, ttl=ttl)
        retaken, lease = await s.leases.acquire(CYCLE, s.holder, now=woke, ttl=ttl)  # taken anew, not renewed
        assert retaken and lease is not None and lease.acquired_at == woke
        # A new term: what was started under the old epoch stays refused although the holder is the same.
        assert lease.epoch == first.epoch + 1
        assert not await s.leases.renew(first.term, now=woke, ttl=ttl)
        with pytest.raises(LeaseLostError):
            async with s.store.transaction() as tx:
                await tx.fence(first.term, now=woke, ttl=ttl)
        assert await s.leases.renew(lease.term, now=woke, ttl=ttl)
