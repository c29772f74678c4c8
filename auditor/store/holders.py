"""Lease holders and leases as values: who holds a lease (host, pid, start time, nonce) and whether that holder
is still alive. Standard library only: the reads (`queries`) and the lease statements (`leases`) both use it."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

CYCLE = "cycle"
LEADER = "leader"


def _boot_time() -> float | None:
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def process_started_at(pid: int) -> datetime | None:
    """Returns when process `pid` started (from /proc), or None where that cannot be read."""
    boot = _boot_time()
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    if boot is None:
        return None
    # Field 22 (starttime, in clock ticks since boot) comes after the parenthesised command name.
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        ticks = int(fields[19])
    except (IndexError, ValueError):
        return None
    return datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"), UTC)


def is_process_gone(host: str, pid: int, started_at: datetime) -> bool:
    """Returns True only when the holder is certainly gone: same host, and no such process (or a reused pid)."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by someone else
        pass
    actual = process_started_at(pid)
    # A different start time means the pid was reused by another process.
    return actual is not None and abs((actual - started_at).total_seconds()) > 2


@dataclass(frozen=True, slots=True)
class Holder:
    """This process as a lease holder: host, pid, process start time and a nonce (one per process)."""

    id: str
    host: str
    pid: int
    started_at: datetime

    @classmethod
    def current(cls) -> Holder:
        """Returns a holder for this process."""
        host = socket.gethostname()
        pid = os.getpid()
        started = process_started_at(pid) or datetime.now(UTC)
        return cls(f"{host[:60]}:{pid}:{uuid.uuid4().hex[:12]}", host, pid, started)

    def describe(self) -> str:
        """Returns 'host pid N' for messages."""
        return f"{self.host} pid {self.pid}"


@dataclass(frozen=True, slots=True)
class Term:
    """One holding of a lease: the lease's name, its holder and the epoch it was taken under.

    Every action taken under a term is fenced by it: refused once the lease expired or moved on to a later
    epoch, even when the same process took the lease back meanwhile (a new holding is a new term).
    """

    name: str
    holder: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease row as read."""

    name: str
    holder: str
    host: str
    pid: int
    process_started_at: datetime
    acquired_at: datetime
    expires_at: datetime
    run_id: str | None
    epoch: int = 1

    @property
    def term(self) -> Term:
        """Returns this holding of the lease as a Term."""
        return Term(self.name, self.holder, self.epoch)

    def is_live(self, now: datetime) -> bool:
        """Returns whether the holder still owns it: not expired, and not a process known to be gone."""
        return self.expires_at > now and not is_process_gone(self.host, self.pid, self.process_started_at)

    def describe(self) -> str:
        """Returns 'host pid N since T' for messages."""
        return f"{self.host} pid {self.pid} since {self.acquired_at.isoformat(timespec='seconds')}"
