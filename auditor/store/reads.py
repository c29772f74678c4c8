"""The current report's reads for one-shot commands: SQLAlchemy Core on a synchronous engine, no ORM, no asyncio.

`auditor report` reads a handful of rows and exits; loading the ORM mapping (`tables`), `sqlalchemy.ext.asyncio`
and aiosqlite would cost more than everything else it does (benchmarks/cli_start.py). The columns here are the
ones these reads need, declared with the same types as `tables` (UTC datetimes, JSON, booleans), and the rows
become the same domain objects `repo.Store` returns (tests/test_cli_extra.py compares the two on one database).
The daemon, the API and every writer use `repo.Store`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Integer,
    String,
    Text,
    TypeDecorator,
    column,
    select,
    table,
    update,
)
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import SQLAlchemyError

from auditor.domain.models import FindingStatus, Severity, TrackedFinding
from auditor.domain.records import DiskRecord, DriftRecord, RunError, RunRecord, RunStats, RunStatus
from auditor.errors import StoreError
from auditor.store.engine import SCHEMA_HEAD, _current, _translate, async_url, create_sync_engine_for

T = TypeVar("T")
CHUNK = 500  # as repo.CHUNK: under SQLite's bound-parameter limit


class UTCDateTime(TypeDecorator[datetime]):
    """As `tables.UTCDateTime`: timezone-aware UTC in, naive UTC stored on SQLite, UTC re-attached on the way out."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use timezone-aware UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


runs = table(
    "audit_runs",
    column("id", String), column("seq", BigInteger), column("trigger", String), column("status", String),
    column("started_at", UTCDateTime), column("finished_at", UTCDateTime), column("targets_checked", Integer),
    column("disks_ok", Integer), column("disks_unknown", Integer), column("api_requests", Integer),
    column("api_retries", Integer), column("api_rate_limited", Integer), column("api_by_status", JSON),
    column("findings_opened", Integer), column("findings_resolved", Integer), column("errors", JSON),
)
disks = table(
    "disks",
    column("id", Text), column("name", Text), column("vm_id", Text), column("vm_fqdn", Text), column("source", Text),
    column("is_target", Boolean), column("outcome", String), column("error_code", Text),
    column("error_message", Text), column("first_seen_at", UTCDateTime), column("last_checked_at", UTCDateTime),
    column("last_read_at", UTCDateTime), column("tier", Text), column("tier_detail", JSON),
)
findings = table(
    "findings",
    column("fingerprint", String), column("rule", String), column("disk_id", Text), column("policy_id", Text),
    column("severity", String), column("status", String), column("message", Text), column("observed", JSON),
    column("expected", JSON), column("first_seen", UTCDateTime), column("last_seen", UTCDateTime),
    column("opened_at", UTCDateTime), column("resolved_at", UTCDateTime), column("waiver", JSON),
)
policy_states = table(
    "policy_states",
    column("disk_id", Text), column("policy_id", Text), column("valid_to", UTCDateTime),
)
drift_events = table(
    "drift_events",
    column("id", Integer), column("disk_id", Text), column("policy_id", Text), column("run_id", String),
    column("at", UTCDateTime), column("kind", String), column("before", JSON), column("after", JSON),
)
leases = table(
    "leases",
    column("name", String), column("holder", String), column("host", Text), column("pid", Integer),
    column("process_started_at", UTCDateTime), column("acquired_at", UTCDateTime),
    column("expires_at", UTCDateTime), column("run_id", String),
)


def _run(row: Any) -> RunRecord:
    return RunRecord(
        id=row.id,
        trigger=row.trigger,
        status=RunStatus(row.status),
        started_at=row.started_at,
        finished_at=row.finished_at,
        targets_checked=row.targets_checked,
        disks_ok=row.disks_ok,
        disks_unknown=row.disks_unknown,
        stats=RunStats(row.api_requests, row.api_retries, row.api_rate_limited, dict(row.api_by_status or {})),
        findings_opened=row.findings_opened,
        findings_resolved=row.findings_resolved,
        errors=tuple(RunError(str(e.get("target", "")), str(e.get("code", "")), str(e.get("message", "")))
                     for e in (row.errors or [])),
    )


def _disk(row: Any) -> DiskRecord:
    return DiskRecord(
        id=row.id,
        name=row.name,
        vm_id=row.vm_id,
        vm_fqdn=row.vm_fqdn,
        source=row.source,
        is_target=row.is_target,
        outcome=row.outcome,
        error_code=row.error_code,
        error_message=row.error_message,
        first_seen_at=row.first_seen_at,
        last_checked_at=row.last_checked_at,
        last_read_at=row.last_read_at,
        tier=row.tier,
        tier_detail=row.tier_detail,
    )


def _finding(row: Any) -> TrackedFinding:
    return TrackedFinding(
        fingerprint=row.fingerprint,
        rule=row.rule,
        disk_id=row.disk_id,
        policy_id=row.policy_id,
        severity=Severity(row.severity),
        status=FindingStatus(row.status),
        message=row.message,
        observed=dict(row.observed or {}),
        expected=dict(row.expected or {}),
        first_seen=row.first_seen,
        last_seen=row.last_seen,
        opened_at=row.opened_at,
        resolved_at=row.resolved_at,
        waiver=row.waiver,
    )


class ReportReads:
    """The reads of the current report (and the orphaned-run sweep every command does) on one synchronous engine.

    Errors are the `StoreError`s the async path raises, worded the same: `current_revision` names the configured
    URL (as `engine.current_revision`), the other reads the async driver's URL (as `repo.Store`).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._store_url = async_url(url).render_as_string(hide_password=True)
        self.engine = create_sync_engine_for(url)

    def close(self) -> None:
        """Disposes of the engine's connections."""
        self.engine.dispose()

    def _error(self, exc: Exception) -> StoreError:
        reason = getattr(exc, "orig", None) or exc
        text = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
        return StoreError(f"database {self._store_url}: {text[:300]}")

    @contextmanager
    def _connection(self, *, write: bool = False) -> Iterator[Connection]:
        try:
            with (self.engine.begin() if write else self.engine.connect()) as conn:
                yield conn
        except (SQLAlchemyError, OSError) as exc:
            raise self._error(exc) from None

    def _read(self, fn: Callable[[Connection], T]) -> T:
        with self._connection() as conn:
            return fn(conn)

    def current_revision(self) -> tuple[str | None, str | None]:
        """Returns (the database's revision, the code's head revision), as `engine.current_revision`."""
        try:
            with self.engine.connect() as conn:
                current = _current(conn)
        except (SQLAlchemyError, OSError) as exc:
            raise _translate(exc, self.url) from None
        return current, SCHEMA_HEAD

    def abandon_orphaned_runs(self, *, now: datetime, reason: str) -> list[str]:
        """Marks failed the runs left `running` whose owner is gone; returns their ids (as `repo.Store`'s)."""
        with self._connection(write=True) as conn:
            running = list(conn.execute(select(runs.c.id).where(runs.c.status == RunStatus.RUNNING.value)).scalars())
            if not running:
                return []
            from auditor.store.leases import CYCLE, Lease  # only when a run is left running (socket, uuid)

            row = conn.execute(select(leases).where(leases.c.name == CYCLE)).first()
            lease = (Lease(row.name, row.holder, row.host, row.pid, row.process_started_at, row.acquired_at,
                           row.expires_at, row.run_id) if row else None)
            live = lease.run_id if lease is not None and lease.is_live(now) else None
            orphans = [run_id for run_id in running if run_id != live]
            for i in range(0, len(orphans), CHUNK):
                # finished_at stays empty: the run never finished, so readiness does not count it as a cycle.
                conn.execute(
                    update(runs).where(runs.c.id.in_(orphans[i : i + CHUNK]),
                                       runs.c.status == RunStatus.RUNNING.value).values(
                        status=RunStatus.FAILED.value,
                        errors=[{"target": "*", "code": "abandoned",
                                 "message": f"{reason} (noticed {now.isoformat(timespec='seconds')})"}],
                    ))
            return orphans

    def latest_run(self) -> RunRecord | None:
        """Returns the most recent finished run."""

        def go(conn: Connection) -> RunRecord | None:
            q = select(runs).where(runs.c.status != RunStatus.RUNNING.value).order_by(runs.c.seq.desc()).limit(1)
            row = conn.execute(q).first()
            return _run(row) if row else None

        return self._read(go)

    def target_disks(self) -> dict[str, DiskRecord]:
        """Returns the disks audited as targets, by id."""

        def go(conn: Connection) -> dict[str, DiskRecord]:
            return {r.id: _disk(r) for r in conn.execute(select(disks).where(disks.c.is_target.is_(True)))}

        return self._read(go)

    def all_findings(self, *, statuses: Sequence[str]) -> list[TrackedFinding]:
        """Returns every finding with one of the statuses, ordered by disk and fingerprint."""

        def go(conn: Connection) -> list[TrackedFinding]:
            q = (select(findings).where(findings.c.status.in_(list(statuses)))
                 .order_by(findings.c.disk_id, findings.c.fingerprint))
            return [_finding(r) for r in conn.execute(q)]

        return self._read(go)

    def current_policy_ids(self) -> dict[str, list[str]]:
        """Returns the current policy ids of every disk."""

        def go(conn: Connection) -> dict[str, list[str]]:
            q = (select(policy_states.c.disk_id, policy_states.c.policy_id)
                 .where(policy_states.c.valid_to.is_(None))
                 .order_by(policy_states.c.disk_id, policy_states.c.policy_id))
            out: dict[str, list[str]] = {}
            for disk_id, policy_id in conn.execute(q).all():
                out.setdefault(disk_id, []).append(policy_id)
            return out

        return self._read(go)

    def recent_drift(self, *, since: datetime, limit: int = 200) -> list[DriftRecord]:
        """Returns drift events since `since`, newest first."""

        def go(conn: Connection) -> list[DriftRecord]:
            d = drift_events.c
            q = select(drift_events).where(d.at >= since).order_by(d.at.desc(), d.id.desc()).limit(limit)
            return [DriftRecord(r.disk_id, r.policy_id, r.run_id, r.at, r.kind, r.before, r.after)
                    for r in conn.execute(q)]

        return self._read(go)
