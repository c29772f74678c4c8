"""The crash-point matrix (issue 9): `auditor audit --once` as a real process, SIGKILLed while reading Katapult,
inside its commit, after its commit before delivery, and during delivery — on SQLite and on PostgreSQL.

Every test first records a baseline verdict (a fleet whose disks have no backup policy: one open finding and one
firing webhook notification each), then makes the fleet compliant, so the killed run would resolve every finding
if any of its writes survived. After the kill, a new process (or the services in-process, for what only time
would release) must find the last committed verdict intact, and every alert transition delivered exactly once —
a send cut mid-flight again, with the same Idempotency-Key. A run killed before its commit ended is marked
failed/`abandoned` by the next process; one killed after its commit stays `complete` (its verdict is durable).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from procs import (
    BlackHole,
    Fake,
    Proc,
    assert_delivered_once,
    assert_disjoint,
    audit_once,
    findings,
    libpq,
    load_settings,
    outbox,
    run_sync,
    runs,
    sql,
    wait_for,
    write_config,
    write_fleet,
)
from receivers import HttpReceiver, Reply

from auditor.service import open_services, utcnow
from auditor.service.delivery import drain
from auditor.store.outbox import CLAIM_TIMEOUT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # clusters of real processes, timed

EXIT_FINDINGS = 1


@dataclass
class Crash:
    """One crash scenario: the fake, the receiver, the database and the configs the processes use."""

    tmp: Path
    url: str
    receiver: HttpReceiver
    fake: Fake
    disks: int
    group_by: tuple[str, ...]
    baseline_run: str = ""
    baseline_findings: dict[str, Any] = field(default_factory=dict)

    def config(self, name: str, *, hook: str | None = None, max_concurrency: int = 8) -> Path:
        return write_config(self.tmp / f"{name}.toml", katapult=self.fake.api_url, database=self.url,
                            hook=hook or self.receiver.url + "/alerts", group_by=self.group_by,
                            per_page=200 if self.disks > 100 else 5, max_concurrency=max_concurrency,
                            leader_ttl="3s")

    def fleet(self, name: str, *, compliant: bool, latency_ms: int = 0) -> Path:
        return write_fleet(self.tmp / f"{name}.json", disks=self.disks, policies_per_disk=1.0 if compliant else 0.0,
                           latency_ms=latency_ms)

    def record_baseline(self) -> None:
        """Runs a complete `audit --once` on the non-compliant fleet: every disk an open finding, alerts sent."""
        proc = audit_once(self.config("baseline"))
        assert proc.wait(120) == EXIT_FINDINGS, proc.tail()
        [run] = runs(self.url)
        assert run.status.value == "complete"
        self.baseline_run = run.id
        self.baseline_findings = findings(self.url)
        assert len(self.baseline_findings) == self.disks
        assert {status for status, _, _ in self.baseline_findings.values()} == {"open"}
        assert all(e.state.value == "delivered" for e in outbox(self.url))
        assert self.receiver.requests, "the baseline's alerts were not delivered"

    def killed_run(self) -> Any:
        [killed] = [r for r in runs(self.url) if r.id != self.baseline_run]
        return killed

    def recover(self, *, expect: int = 0) -> Proc:
        """Runs `audit --once` again, on a compliant fleet without latency; returns the finished process."""
        self.fake.restart(self.fleet("recovery", compliant=True))
        proc = audit_once(self.config("recovery"))
        assert proc.wait(120) == expect, proc.tail()
        return proc

    def deliver_stale_claims(self) -> None:
        """Delivers what the killed process had claimed, in-process, with the services' clock moved past the
        claim timeout (what a later process would do once that much time passed)."""
        later = utcnow() + CLAIM_TIMEOUT + timedelta(minutes=1)

        async def go() -> int:
            async with open_services(load_settings(self.config("later")), katapult=False,
                                     clock=lambda: later) as services:
                report = await drain(services, within=30)
                return report.pending

        assert run_sync(go()) == 0

    def assert_resolved_everywhere(self) -> None:
        after = findings(self.url)
        assert set(after) == set(self.baseline_findings)
        assert {status for status, _, _ in after.values()} == {"resolved"}
        # The verdict carried over: each finding is the baseline's one, resolved — not a new one.
        assert all(after[fp][1] == self.baseline_findings[fp][1] for fp in after)


@pytest.fixture
def crash(tmp_path: Path, db_url: str) -> Iterator[Callable[..., Crash]]:
    made: list[Crash] = []

    def make(*, disks: int = 8, group_by: tuple[str, ...] = ("disk_id",)) -> Crash:
        receiver = HttpReceiver().start()
        c = Crash(tmp_path, db_url, receiver, Fake(tmp_path / "a.json"), disks, group_by)
        made.append(c)
        c.fake.start(c.fleet("a", compliant=False))
        c.record_baseline()
        return c

    yield make
    for c in made:
        c.fake.kill()
        c.receiver.stop()


def recover_from_abandoned(c: Crash, run_id: str) -> None:
    """Runs the recovery audit and checks it: the killed run recorded as abandoned, every finding resolved, each
    alert delivered once, no two runs overlapping."""
    c.recover()
    killed = next(r for r in runs(c.url) if r.id == run_id)
    assert killed.status.value == "failed" and [e.code for e in killed.errors] == ["abandoned"]
    # The lost cycle was announced (and the recovery's complete cycle resolved it).
    lost = [a["status"] for r in c.receiver.requests for a in r.json()["alerts"]
            if a["labels"].get("alertname") == "audit-incomplete"]
    assert lost == ["firing", "resolved"], lost
    c.assert_resolved_everywhere()
    assert_delivered_once(c.receiver.requests, outbox(c.url))
    assert_disjoint(runs(c.url))


def running_run(url: str) -> str | None:
    rows = sql(url, "SELECT id FROM audit_runs WHERE status = 'running'")
    return rows[0][0] if rows else None


def test_kill_while_reading(crash: Callable[..., Crash]) -> None:
    c = crash()
    # 400 ms a request, one at a time: the killed run spends seconds reading Katapult.
    c.fake.restart(c.fleet("slow", compliant=True, latency_ms=400))
    proc = audit_once(c.config("killed", max_concurrency=1))
    run_id = wait_for("the run to start", lambda: running_run(c.url), alive=[proc])
    time.sleep(0.5)  # a request or two into the reading
    proc.kill()
    assert proc.proc.returncode == -9
    # Nothing of the killed run was written but its `running` row; the verdict is the baseline's.
    assert findings(c.url) == c.baseline_findings
    assert len(outbox(c.url)) == len(c.receiver.requests)
    # Stored as it was left (`running`); every reader already shows it failed, its owner being gone.
    assert sql(c.url, "SELECT status FROM audit_runs WHERE id = ?", run_id) == [("running",)]
    assert c.killed_run().status.value == "failed" and [e.code for e in c.killed_run().errors] == ["abandoned"]

    recover_from_abandoned(c, run_id)


def _hold_run_row(url: str, run_id: str) -> tuple[psycopg.Connection[Any], int]:
    """Locks the run's row (PostgreSQL): the cycle's commit blocks on its final UPDATE of the run, after it has
    written disks, policy states and findings in the same transaction. Returns the connection and its pid."""
    conn = psycopg.connect(libpq(url))
    conn.execute("SELECT id FROM audit_runs WHERE id = %s FOR UPDATE", (run_id,))
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert pid is not None
    return conn, int(pid[0])


def _blocked_by(url: str, pid: int) -> bool | None:
    rows = sql(url, "SELECT count(*) FROM pg_stat_activity WHERE ? = ANY(pg_blocking_pids(pid))", pid)
    return True if rows[0][0] else None


def _sqlite_writer_active(path: str) -> bool:
    """Returns whether another connection holds SQLite's write lock (BEGIN IMMEDIATE fails at once)."""
    import sqlite3

    conn = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        assert "locked" in str(exc) or "busy" in str(exc), exc
        return True
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()
    return False


def test_kill_inside_the_commit(crash: Callable[..., Crash], db_url: str) -> None:
    if db_url.startswith("sqlite"):
        # SQLite has no lock the test can hold to stop the commit half-way (WAL: readers never block it), so
        # approximate: a large fleet whose every finding resolves makes the commit last about a second, and the
        # process is killed while it holds the write lock (two probes in a row, 30 ms apart). Only the cycle's
        # commit holds that lock for more than a few milliseconds (run start and lease renewals are single rows).
        c = crash(disks=3000, group_by=("rule",))
        c.fake.restart(c.fleet("b", compliant=True))
        proc = audit_once(c.config("killed"))
        path = c.url.split(":///", 1)[1]
        run_id = wait_for("the run to start", lambda: running_run(c.url), alive=[proc], every=0.01)

        def in_commit() -> bool | None:
            if _sqlite_writer_active(path):
                time.sleep(0.03)
                return True if _sqlite_writer_active(path) else None
            return None

        wait_for("the cycle's commit", in_commit, alive=[proc], every=0.01)
        proc.kill()
    else:
        # PostgreSQL: exact. The test holds the run row's lock, so the commit stops inside its transaction.
        c = crash()
        c.fake.restart(c.fleet("b", compliant=True, latency_ms=300))
        proc = audit_once(c.config("killed", max_concurrency=1))
        run_id = wait_for("the run to start", lambda: running_run(c.url), alive=[proc], every=0.01)
        conn, pid = _hold_run_row(c.url, run_id)
        try:
            wait_for("the commit to block on the run row", lambda: _blocked_by(c.url, pid), alive=[proc])
            proc.kill()
        finally:
            conn.rollback()
            conn.close()
    assert proc.proc.returncode == -9
    # Atomic: nothing of the half-done commit is visible — no resolved finding, no event, no alert.
    assert findings(c.url) == c.baseline_findings
    assert sql(c.url, "SELECT count(*) FROM finding_events WHERE run_id = ?", run_id) == [(0,)]
    assert sql(c.url, "SELECT count(*) FROM disks WHERE last_run_id = ?", run_id) == [(0,)]
    assert sql(c.url, "SELECT count(*) FROM outbox WHERE run_id = ?", run_id) == [(0,)]
    assert sql(c.url, "SELECT status FROM audit_runs WHERE id = ?", run_id) == [("running",)]

    recover_from_abandoned(c, run_id)


def test_kill_after_commit_before_delivery(crash: Callable[..., Crash]) -> None:
    c = crash()
    c.fake.restart(c.fleet("b", compliant=True))
    hole = BlackHole()  # the notifier's endpoint accepts the connection and never answers
    try:
        proc = audit_once(c.config("killed", hook=hole.url + "/alerts"))
        sent = len(c.receiver.requests)
        wait_for("the cycle's outbox entries", lambda: True if len(outbox(c.url)) > sent else None, alive=[proc],
                 every=0.01)
        proc.kill()
    finally:
        hole.close()
    assert proc.proc.returncode == -9
    # The commit is durable: the run is complete, every finding resolved, its alerts queued and not yet sent.
    killed = c.killed_run()
    assert killed.status.value == "complete"
    c.assert_resolved_everywhere()
    committed = findings(c.url)
    queued = [e for e in outbox(c.url) if e.state.value != "delivered"]
    assert len(queued) == c.disks and {e.kind for e in queued} == {"resolved"}
    assert len(c.receiver.requests) == sent

    c.recover()
    c.deliver_stale_claims()
    assert findings(c.url) == committed  # the recovery run changed nothing: the verdict stands
    assert all(r.status.value == "complete" for r in runs(c.url))
    assert_delivered_once(c.receiver.requests, outbox(c.url))
    assert_disjoint(runs(c.url))


def test_kill_during_delivery(crash: Callable[..., Crash]) -> None:
    c = crash()
    c.fake.restart(c.fleet("b", compliant=True))
    sent = len(c.receiver.requests)
    c.receiver.script(Reply(200, "ok", delay=60))  # the next request is received and its answer held back
    proc = audit_once(c.config("killed"))
    wait_for("a request in flight", lambda: True if len(c.receiver.requests) > sent else None, alive=[proc],
             every=0.01)
    proc.kill()
    assert proc.proc.returncode == -9
    cut = c.receiver.requests[sent].headers["idempotency-key"]
    assert c.killed_run().status.value == "complete"
    c.assert_resolved_everywhere()
    committed = findings(c.url)

    c.recover()
    c.deliver_stale_claims()
    assert findings(c.url) == committed
    assert all(r.status.value == "complete" for r in runs(c.url))
    # Every alert once, except the send cut mid-flight: again, with the same key and the same alerts.
    assert_delivered_once(c.receiver.requests, outbox(c.url), resent=frozenset({cut}))
    first, again = [r for r in c.receiver.requests if r.headers.get("idempotency-key") == cut]
    assert [a["fingerprint"] for a in first.json()["alerts"]] == [a["fingerprint"] for a in again.json()["alerts"]]
    assert again.json()["status"] == "resolved"
    assert_disjoint(runs(c.url))
