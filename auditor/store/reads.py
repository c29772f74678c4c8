"""The reads of the one-shot commands (`auditor report`, `findings`, `history`), without the ORM or asyncio.

`auditor report` reads a handful of rows and exits: loading the ORM mapping (`tables`), `sqlalchemy.ext.asyncio`
and aiosqlite — or even SQLAlchemy itself — costs more than everything else it does (benchmarks/cli_start.py).
A plain SQLite file (`sqlite:///FILE`, the embedded default) is read here with the standard library's sqlite3,
PostgreSQL with psycopg (the driver SQLAlchemy would load anyway, with the arguments it would pass), and any other
URL (in-memory SQLite, query options, several PostgreSQL hosts) with SQLAlchemy Core on a synchronous engine
(`reads_core`).

All give the domain objects `repo.Store` gives, with the same `StoreError`s (tests/test_cli_extra.py compares them
with it on one database), and run the same SQL as the ORM: the columns below are `tables`' (types as stored),
converted as `store.types.UTCDateTime`, SQLAlchemy's JSON and Boolean do. The daemon, the API and every writer use
`repo.Store`.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote

from auditor.domain.models import FindingStatus, Severity, TrackedFinding
from auditor.domain.records import (
    DiskRecord,
    DriftRecord,
    FindingEventRecord,
    PolicyStateRecord,
    RunError,
    RunRecord,
    RunStats,
    RunStatus,
)
from auditor.errors import StoreError
from auditor.store.engine import SCHEMA_HEAD, _sqlite_pragmas

T = TypeVar("T")
CHUNK = 500  # as repo.CHUNK: under SQLite's bound-parameter limit
ORPHAN_ERROR_CODE = "abandoned"

# Column kinds: how a stored value becomes what the ORM gives (reads_core maps them to SQLAlchemy types).
TEXT, INT, FLOAT, BOOL, UTC_DATETIME, JSON = "text", "int", "float", "bool", "utc", "json"
Columns = tuple[tuple[str, str], ...]

RUNS: Columns = (
    ("id", TEXT), ("seq", INT), ("trigger", TEXT), ("status", TEXT), ("started_at", UTC_DATETIME),
    ("finished_at", UTC_DATETIME), ("targets_checked", INT), ("disks_ok", INT), ("disks_unknown", INT),
    ("api_requests", INT), ("api_retries", INT), ("api_rate_limited", INT), ("api_by_status", JSON),
    ("findings_opened", INT), ("findings_resolved", INT), ("errors", JSON),
)
DISKS: Columns = (
    ("id", TEXT), ("name", TEXT), ("vm_id", TEXT), ("vm_fqdn", TEXT), ("source", TEXT), ("is_target", BOOL),
    ("outcome", TEXT), ("error_code", TEXT), ("error_message", TEXT), ("first_seen_at", UTC_DATETIME),
    ("last_checked_at", UTC_DATETIME), ("last_read_at", UTC_DATETIME), ("tier", TEXT), ("tier_detail", JSON),
)
FINDINGS: Columns = (
    ("fingerprint", TEXT), ("rule", TEXT), ("disk_id", TEXT), ("policy_id", TEXT), ("severity", TEXT),
    ("status", TEXT), ("message", TEXT), ("observed", JSON), ("expected", JSON), ("first_seen", UTC_DATETIME),
    ("last_seen", UTC_DATETIME), ("opened_at", UTC_DATETIME), ("resolved_at", UTC_DATETIME), ("waiver", JSON),
    ("tier", TEXT),
)
POLICY_STATES: Columns = (
    ("id", INT), ("disk_id", TEXT), ("policy_id", TEXT), ("settings_hash", TEXT), ("retention", INT),
    ("interval", TEXT), ("target_type", TEXT), ("target_id", TEXT), ("target_name", TEXT),
    ("next_invocation_at", UTC_DATETIME), ("total_size", FLOAT), ("valid_from", UTC_DATETIME),
    ("valid_to", UTC_DATETIME),
)
FINDING_EVENTS: Columns = (
    ("id", INT), ("fingerprint", TEXT), ("disk_id", TEXT), ("run_id", TEXT), ("at", UTC_DATETIME), ("kind", TEXT),
)
DRIFT_EVENTS: Columns = (
    ("id", INT), ("disk_id", TEXT), ("policy_id", TEXT), ("run_id", TEXT), ("at", UTC_DATETIME), ("kind", TEXT),
    ("before", JSON), ("after", JSON),
)
LEASES: Columns = (
    ("name", TEXT), ("holder", TEXT), ("host", TEXT), ("pid", INT), ("process_started_at", UTC_DATETIME),
    ("acquired_at", UTC_DATETIME), ("expires_at", UTC_DATETIME), ("run_id", TEXT),
)
TABLES: dict[str, Columns] = {"audit_runs": RUNS, "disks": DISKS, "findings": FINDINGS,
                              "policy_states": POLICY_STATES, "drift_events": DRIFT_EVENTS, "leases": LEASES,
                              "finding_events": FINDING_EVENTS}
# A disk's history (`repo.Store.disk_history`, `ReportReads.disk_history`).
DiskHistory = tuple[DiskRecord | None, list[PolicyStateRecord], list[DriftRecord], list[TrackedFinding],
                    list[FindingEventRecord]]


class ReportReads(Protocol):
    """What `auditor report` reads; `repo.Store`'s methods of the same names give the same objects."""

    def current_revision(self) -> tuple[str | None, str | None]: ...
    def abandon_orphaned_runs(self, *, now: datetime, reason: str) -> list[str]: ...
    def latest_run(self) -> RunRecord | None: ...
    def target_disks(self) -> dict[str, DiskRecord]: ...
    def all_findings(self, *, statuses: Sequence[str]) -> list[TrackedFinding]: ...
    def current_policy_ids(self) -> dict[str, list[str]]: ...
    def recent_drift(self, *, since: datetime, limit: int = 200) -> list[DriftRecord]: ...
    def disk_history(self, disk_id: str) -> DiskHistory: ...
    def close(self) -> None: ...


def open_report_reads(url: str) -> ReportReads:
    """Returns the reads for a configured database URL (nothing is connected yet): sqlite3 for a plain file,
    psycopg for PostgreSQL, SQLAlchemy Core for the rest. The caller checks first that an SQLite file exists
    (connecting would create it)."""
    path = plain_sqlite_file(url)
    if path is not None:
        return SqliteReads(url, path)
    args = postgres_connect_args(url)
    if args is not None:
        return PostgresReads(url, args)
    from auditor.store.reads_core import CoreReads

    return CoreReads(url)


# `sqlite[+driver]:///FILE` without a query: SQLAlchemy's URL grammar gives database = FILE, percent-decoded, and
# its sqlite3 dialect opens os.path.abspath(FILE). In-memory databases, `file:` URIs and query options go to Core.
_PLAIN_SQLITE = re.compile(r"sqlite(?:\+(?:pysqlite|aiosqlite))?:///(?P<database>[^?]+)")


def plain_sqlite_file(url: str) -> str | None:
    """Returns the file of a plain SQLite URL as SQLAlchemy's `sqlite_path` would (relative to the working
    directory), or None for any other URL."""
    m = _PLAIN_SQLITE.fullmatch(url)
    if m is None:
        return None
    database = unquote(m["database"])
    if database == ":memory:" or database.startswith("file:"):
        return None
    return database


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
        tier=row.tier,
    )


def _drift(row: Any) -> DriftRecord:
    return DriftRecord(row.disk_id, row.policy_id, row.run_id, row.at, row.kind, row.before, row.after)


def _state(row: Any) -> PolicyStateRecord:
    return PolicyStateRecord(
        disk_id=row.disk_id,
        policy_id=row.policy_id,
        retention=row.retention,
        interval=row.interval,
        target_type=row.target_type,
        target_id=row.target_id,
        target_name=row.target_name,
        next_invocation_at=row.next_invocation_at,
        total_size=row.total_size,
        valid_from=row.valid_from,
        valid_to=row.valid_to,
        settings_hash=row.settings_hash,
    )


def _event(row: Any) -> FindingEventRecord:
    return FindingEventRecord(row.fingerprint, row.disk_id, row.run_id, row.at, row.kind)


def orphans_of(running: Sequence[str], lease_row: Any, now: datetime) -> list[str]:
    """Returns the runs left `running` whose owner is gone: all but the cycle lease's run while it is live."""
    from auditor.store.leases import Lease  # only when a run is left running: leases loads SQLAlchemy Core

    lease = (Lease(lease_row.name, lease_row.holder, lease_row.host, lease_row.pid, lease_row.process_started_at,
                   lease_row.acquired_at, lease_row.expires_at, lease_row.run_id) if lease_row else None)
    live = lease.run_id if lease is not None and lease.is_live(now) else None
    return [run_id for run_id in running if run_id != live]


def orphan_errors(reason: str, now: datetime) -> list[dict[str, str]]:
    """Returns the `errors` of a run marked failed because its owner is gone."""
    return [{"target": "*", "code": ORPHAN_ERROR_CODE,
             "message": f"{reason} (noticed {now.isoformat(timespec='seconds')})"}]


# ---- DB-API reads: sqlite3 for a plain SQLite file, psycopg for PostgreSQL --------------------------------------


def _utc(value: Any) -> datetime | None:
    # SQLAlchemy's SQLite DATETIME gives datetime.fromisoformat(value); store.types.UTCDateTime re-attaches UTC.
    if value is None:
        return None
    parsed = datetime.fromisoformat(value) if isinstance(value, str) else value
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _stored(value: datetime) -> str:
    # store.types.UTCDateTime stores naive UTC on SQLite, in SQLAlchemy's DATETIME storage format.
    v = value.astimezone(UTC)
    return (f"{v.year:04d}-{v.month:02d}-{v.day:02d} {v.hour:02d}:{v.minute:02d}:{v.second:02d}."
            f"{v.microsecond:06d}")


def _same(value: Any) -> Any:
    return value


_DECODE: dict[str, Callable[[Any], Any]] = {
    TEXT: _same,
    INT: _same,
    FLOAT: lambda v: None if v is None else float(v),
    BOOL: lambda v: None if v is None else bool(v),
    UTC_DATETIME: _utc,
    # SQLite keeps JSON as text; psycopg gives PostgreSQL's json already decoded.
    JSON: lambda v: json.loads(v) if isinstance(v, str | bytes) else v,
}


def _select(table: str, columns: Columns | None = None) -> str:
    names = ", ".join(f"{table}.{name}" for name, _ in (columns or TABLES[table]))
    return f"SELECT {names} FROM {table}"


def _rows(cursor: Any, columns: Columns) -> Iterator[SimpleNamespace]:
    decoders = [(name, _DECODE[kind]) for name, kind in columns]
    for raw in cursor:
        yield SimpleNamespace(**{name: decode(value) for (name, decode), value in zip(decoders, raw, strict=True)})


class _DbapiReads:
    """The reads through a DB-API connection, with the SQL the ORM runs (written with `?`; `_sql` adapts it) and
    failing with `repo.Store`'s and `engine.current_revision`'s `StoreError`s, worded the same."""

    errors: tuple[type[Exception], ...] = (OSError,)

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: Any = None

    # What a backend provides.
    def _open(self) -> Any:
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql

    def _bind_time(self, value: datetime) -> Any:
        return value

    def _has_version_table(self, conn: Any) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        """Closes the connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connect(self) -> Any:
        if self._conn is None:
            self._conn = self._open()
        return self._conn

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        cursor = self._connect().cursor()
        cursor.execute(self._sql(sql), tuple(params))
        return cursor

    def _error(self, exc: Exception) -> StoreError:
        # As repo.Store names the database: by its async driver's URL (SQLAlchemy is loaded on this path only).
        from auditor.store.engine import async_url

        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return StoreError(f"database {async_url(self.url).render_as_string(hide_password=True)}: {text[:300]}")

    @contextmanager
    def _connection(self) -> Iterator[None]:
        try:
            yield
        except self.errors as exc:
            raise self._error(exc) from None

    def current_revision(self) -> tuple[str | None, str | None]:
        """Returns (the database's revision, the code's head revision), as `engine.current_revision`."""
        try:
            conn = self._connect()
            # What SQLAlchemy's has_table asks, then Alembic's own table read with SQL.
            if not self._has_version_table(conn):
                return None, SCHEMA_HEAD
            row = self._execute("SELECT version_num FROM alembic_version").fetchone()
        except self.errors as exc:
            from auditor.store.engine import _translate

            raise _translate(exc, self.url) from None
        return (str(row[0]) if row else None), SCHEMA_HEAD

    def abandon_orphaned_runs(self, *, now: datetime, reason: str) -> list[str]:
        """Marks failed the runs left `running` whose owner is gone; returns their ids (as `repo.Store`'s)."""
        with self._connection():
            conn = self._connect()
            try:
                running = [r for (r,) in self._execute("SELECT audit_runs.id FROM audit_runs "
                                                       "WHERE audit_runs.status = ?", (RunStatus.RUNNING.value,))]
                if not running:
                    conn.commit()
                    return []
                from auditor.store.leases import CYCLE

                lease = next(_rows(self._execute(_select("leases") + " WHERE leases.name = ?", (CYCLE,)), LEASES),
                             None)
                orphans = orphans_of(running, lease, now)
                errors = json.dumps(orphan_errors(reason, now))
                for i in range(0, len(orphans), CHUNK):
                    # finished_at stays empty: the run never finished, so readiness does not count it as a cycle.
                    chunk = orphans[i : i + CHUNK]
                    self._execute(f"UPDATE audit_runs SET status=?, errors=? WHERE audit_runs.id IN "
                                  f"({', '.join('?' * len(chunk))}) AND audit_runs.status = ?",
                                  (RunStatus.FAILED.value, errors, *chunk, RunStatus.RUNNING.value))
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
            return orphans

    def latest_run(self) -> RunRecord | None:
        """Returns the most recent finished run."""
        with self._connection():
            q = _select("audit_runs") + " WHERE audit_runs.status != ? ORDER BY audit_runs.seq DESC LIMIT 1"
            row = next(_rows(self._execute(q, (RunStatus.RUNNING.value,)), RUNS), None)
            return _run(row) if row else None

    def target_disks(self) -> dict[str, DiskRecord]:
        """Returns the disks audited as targets, by id."""
        with self._connection():
            q = _select("disks") + " WHERE disks.is_target = ?"
            return {r.id: _disk(r) for r in _rows(self._execute(q, (True,)), DISKS)}

    def all_findings(self, *, statuses: Sequence[str]) -> list[TrackedFinding]:
        """Returns every finding with one of the statuses, ordered by disk and fingerprint."""
        with self._connection():
            q = (_select("findings") + f" WHERE findings.status IN ({', '.join('?' * len(statuses))})"
                 " ORDER BY findings.disk_id, findings.fingerprint")
            return [_finding(r) for r in _rows(self._execute(q, tuple(statuses)), FINDINGS)]

    def current_policy_ids(self) -> dict[str, list[str]]:
        """Returns the current policy ids of every disk."""
        with self._connection():
            q = ("SELECT policy_states.disk_id, policy_states.policy_id FROM policy_states "
                 "WHERE policy_states.valid_to IS NULL ORDER BY policy_states.disk_id, policy_states.policy_id")
            out: dict[str, list[str]] = {}
            for disk_id, policy_id in self._execute(q):
                out.setdefault(disk_id, []).append(policy_id)
            return out

    def recent_drift(self, *, since: datetime, limit: int = 200) -> list[DriftRecord]:
        """Returns drift events since `since`, newest first."""
        with self._connection():
            q = (_select("drift_events") + " WHERE drift_events.at >= ?"
                 " ORDER BY drift_events.at DESC, drift_events.id DESC LIMIT ?")
            return [_drift(r) for r in _rows(self._execute(q, (self._bind_time(since), limit)), DRIFT_EVENTS)]

    def disk_history(self, disk_id: str) -> DiskHistory:
        """Returns a disk with all its policy states, drift events, findings and finding events, oldest first."""
        with self._connection():
            def rows(table: str, order: str) -> list[SimpleNamespace]:
                q = _select(table) + f" WHERE {table}.disk_id = ? ORDER BY {order}"
                return list(_rows(self._execute(q, (disk_id,)), TABLES[table]))

            disk = next(_rows(self._execute(_select("disks") + " WHERE disks.id = ?", (disk_id,)), DISKS), None)
            return (
                _disk(disk) if disk else None,
                [_state(r) for r in rows("policy_states", "policy_states.valid_from, policy_states.id")],
                [_drift(r) for r in rows("drift_events", "drift_events.at, drift_events.id")],
                [_finding(r) for r in rows("findings", "findings.first_seen, findings.fingerprint")],
                [_event(r) for r in rows("finding_events", "finding_events.at, finding_events.id")],
            )


class SqliteReads(_DbapiReads):
    """The reads on a plain SQLite file through sqlite3, connected as `engine.create_sync_engine_for` connects
    (the file's absolute path, the same pragmas)."""

    errors = (sqlite3.Error, OSError)

    def __init__(self, url: str, path: str) -> None:
        import os

        super().__init__(url)
        self.path = os.path.abspath(path)

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False)
        try:
            _sqlite_pragmas(conn, None)
        except BaseException:
            conn.close()
            raise
        return conn

    def _bind_time(self, value: datetime) -> str:
        return _stored(value)

    def _has_version_table(self, conn: Any) -> bool:
        return bool(conn.execute('PRAGMA main.table_info("alembic_version")').fetchall())


class PostgresReads(_DbapiReads):
    """The reads on PostgreSQL through psycopg, connected with the arguments SQLAlchemy's psycopg dialect would
    pass (`postgres_connect_args`) and the sync engine's connect timeout."""

    def __init__(self, url: str, connect_args: dict[str, Any]) -> None:
        import psycopg

        super().__init__(url)
        self.errors = (psycopg.Error, OSError)
        self._args = connect_args

    def _open(self) -> Any:
        import psycopg

        return psycopg.connect(**self._args)

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def _has_version_table(self, conn: Any) -> bool:
        # SQLAlchemy's has_table: a relation of that name visible on the search path.
        return bool(self._execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()[0])


# SQLAlchemy's URL grammar (sqlalchemy.engine.url._parse_url) for one host; several hosts or a repeated query key
# go to SQLAlchemy itself.
_URL = re.compile(r"""
    (?P<name>[\w+]+)://
    (?:(?P<username>[^:/]*)(?::(?P<password>[^@]*))?@)?
    (?:(?:\[(?P<ipv6host>[^/?]+)\]|(?P<ipv4host>[^/:?]+))?(?::(?P<port>[^/?]*))?)?
    (?:/(?P<database>[^?]*))?
    (?:\?(?P<query>.*))?
""", re.X)
CONNECT_TIMEOUT = 10  # as engine.create_sync_engine_for


def postgres_connect_args(url: str) -> dict[str, Any] | None:
    """Returns psycopg.connect's arguments for a `postgresql[+driver]://` URL, as SQLAlchemy's psycopg dialect makes
    them (user, password, host, port, dbname, then the query's options) plus the connect timeout; None for any
    other URL and for forms only SQLAlchemy reads (several hosts, a repeated option)."""
    from urllib.parse import parse_qsl

    m = _URL.fullmatch(url)
    if m is None or m["name"].split("+")[0] != "postgresql":
        return None
    host = m["ipv4host"] or m["ipv6host"]
    if host is not None and "," in host:
        return None
    args: dict[str, Any] = {}
    for key, value in (("host", host), ("dbname", m["database"]), ("user", m["username"]),
                       ("password", m["password"]), ("port", m["port"])):
        if value:
            args[key] = unquote(value) if key in ("dbname", "user", "password") else value
    if "port" in args:
        if not args["port"].isdigit():
            return None
        args["port"] = int(args["port"])
    query = parse_qsl(m["query"] or "")
    if len({k for k, _ in query}) != len(query):
        return None
    args.update(query)
    args["connect_timeout"] = CONNECT_TIMEOUT
    return args
