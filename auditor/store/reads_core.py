"""The current report's reads (`reads.ReportReads`) with SQLAlchemy Core on a synchronous engine: PostgreSQL and any
SQLite URL that is not a plain file. No ORM (`tables`), no asyncio."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import JSON, BigInteger, Boolean, Float, String, column, select, table, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql.expression import TableClause

from auditor.domain.models import TrackedFinding
from auditor.domain.records import DiskRecord, DriftRecord, RunRecord, RunStatus
from auditor.errors import StoreError
from auditor.store import reads
from auditor.store.engine import SCHEMA_HEAD, _current, _translate, async_url, create_sync_engine_for
from auditor.store.types import UTCDateTime

T = TypeVar("T")


_TYPES: dict[str, Any] = {reads.TEXT: String, reads.INT: BigInteger, reads.FLOAT: Float, reads.BOOL: Boolean,
                          reads.UTC_DATETIME: UTCDateTime, reads.JSON: JSON}


def _table(name: str) -> TableClause:
    return table(name, *(column(c, _TYPES[kind]) for c, kind in reads.TABLES[name]))


runs, disks, findings, policy_states, drift_events, leases, finding_events = (
    _table(name) for name in ("audit_runs", "disks", "findings", "policy_states", "drift_events", "leases",
                              "finding_events"))


class CoreReads:
    """`reads.ReportReads` on a synchronous SQLAlchemy engine (`engine.create_sync_engine_for`).

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
            from auditor.store.leases import CYCLE

            orphans = reads.orphans_of(running, conn.execute(select(leases).where(leases.c.name == CYCLE)).first(),
                                       now)
            for i in range(0, len(orphans), reads.CHUNK):
                # finished_at stays empty: the run never finished, so readiness does not count it as a cycle.
                conn.execute(update(runs).where(runs.c.id.in_(orphans[i : i + reads.CHUNK]),
                                                runs.c.status == RunStatus.RUNNING.value)
                             .values(status=RunStatus.FAILED.value, errors=reads.orphan_errors(reason, now)))
            return orphans

    def latest_run(self) -> RunRecord | None:
        """Returns the most recent finished run."""

        def go(conn: Connection) -> RunRecord | None:
            q = select(runs).where(runs.c.status != RunStatus.RUNNING.value).order_by(runs.c.seq.desc()).limit(1)
            row = conn.execute(q).first()
            return reads._run(row) if row else None

        return self._read(go)

    def target_disks(self) -> dict[str, DiskRecord]:
        """Returns the disks audited as targets, by id."""

        def go(conn: Connection) -> dict[str, DiskRecord]:
            return {r.id: reads._disk(r) for r in conn.execute(select(disks).where(disks.c.is_target.is_(True)))}

        return self._read(go)

    def all_findings(self, *, statuses: Sequence[str]) -> list[TrackedFinding]:
        """Returns every finding with one of the statuses, ordered by disk and fingerprint."""

        def go(conn: Connection) -> list[TrackedFinding]:
            q = (select(findings).where(findings.c.status.in_(list(statuses)))
                 .order_by(findings.c.disk_id, findings.c.fingerprint))
            return [reads._finding(r) for r in conn.execute(q)]

        return self._read(go)

    def current_policy_ids(self) -> dict[str, list[str]]:
        """Returns the current policy ids of every disk."""

        def go(conn: Connection) -> dict[str, list[str]]:
            p = policy_states.c
            q = select(p.disk_id, p.policy_id).where(p.valid_to.is_(None)).order_by(p.disk_id, p.policy_id)
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
            return [reads._drift(r) for r in conn.execute(q)]

        return self._read(go)

    def disk_history(self, disk_id: str) -> reads.DiskHistory:
        """Returns a disk with all its policy states, drift events, findings and finding events, oldest first."""

        def go(conn: Connection) -> reads.DiskHistory:
            def rows(t: TableClause, *order: Any) -> list[Any]:
                return list(conn.execute(select(t).where(t.c.disk_id == disk_id).order_by(*order)))

            disk = conn.execute(select(disks).where(disks.c.id == disk_id)).first()
            return (
                reads._disk(disk) if disk else None,
                [reads._state(r) for r in rows(policy_states, policy_states.c.valid_from, policy_states.c.id)],
                [reads._drift(r) for r in rows(drift_events, drift_events.c.at, drift_events.c.id)],
                [reads._finding(r) for r in rows(findings, findings.c.first_seen, findings.c.fingerprint)],
                [reads._event(r) for r in rows(finding_events, finding_events.c.at, finding_events.c.id)],
            )

        return self._read(go)
