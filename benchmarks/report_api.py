"""The reports API under load: GET /api/v1/report and /api/v1/findings at 10,000 disks / 3,000 open findings.

The API is served the way it is deployed: `auditor run` (the daemon: scheduler, cycle runner and uvicorn in one
event loop) in its own process, on a loopback port, over a real database. Its first cycle, at start, audits a
fake Katapult (its own process) whose organization has 10,000 disks: 1,500 without any policy and 1,500 with a
weekly policy give 3,000 open findings. The audit interval is a day, so no cycle runs while the API is measured.

Then 20 concurrent clients (one keep-alive connection each, a minimal HTTP/1.1 client so the load generator costs
little CPU on this 2-core machine) request one endpoint back to back for 15 s; /findings clients page through every
open finding with `next_cursor` (100 per page) and start over. Latency is from sending a request to having read
its whole body. Requests still in flight at the end are waited for and counted. A short run of the same load
on /healthz first shows what the HTTP stack alone costs on this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common as c

TARGET_P99_MS = 100.0
DAEMON_READY_SECONDS = 240.0



def _json(body: bytes) -> Any:
    """Parses a JSON body, unpacking it first if the server sent it gzipped."""
    return json.loads(gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body)


@dataclass
class Load:
    """Latencies and outcomes of one endpoint's load phase."""

    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    body_bytes: int = 0
    seconds: float = 0.0


class HttpConnection:
    """One keep-alive HTTP/1.1 connection that sends GETs and reads Content-Length bodies."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, bytes]:
        """Returns the status and body of GET path (reconnecting if the server closed the connection)."""
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port, limit=2**20)
            sock = self._writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert self._reader is not None and self._writer is not None
        # Like httpx, requests, curl --compressed and browsers, the client accepts gzip (the body is not unpacked).
        self._writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\nAccept: application/json\r\n"
                           f"Accept-Encoding: gzip\r\n\r\n".encode())
        head = await self._reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        closing = False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and value.strip().lower() == "close":
                closing = True
        body = await self._reader.readexactly(length)
        if closing:
            await self.close()
        return status, body

    async def close(self) -> None:
        """Closes the connection."""
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await self._writer.wait_closed()
        self._reader = self._writer = None


async def load(host: str, port: int, endpoint: str, *, clients: int, seconds: float) -> Load:
    """Runs `clients` closed-loop clients against one endpoint for `seconds`; returns what they saw."""
    result = Load()
    deadline = time.monotonic() + seconds

    async def client(n: int) -> None:
        conn = HttpConnection(host, port)
        cursor: str | None = None
        try:
            while time.monotonic() < deadline:
                path = endpoint
                if endpoint.startswith("/api/v1/findings") and cursor:
                    path = f"{endpoint}&cursor={cursor}"
                began = time.monotonic()
                try:
                    status, body = await conn.get(path)
                except (OSError, asyncio.IncompleteReadError, ConnectionError) as exc:
                    result.errors[type(exc).__name__] = result.errors.get(type(exc).__name__, 0) + 1
                    await conn.close()
                    continue
                result.latencies.append(time.monotonic() - began)
                result.body_bytes = max(result.body_bytes, len(body))
                if status != 200:
                    result.errors[str(status)] = result.errors.get(str(status), 0) + 1
                elif endpoint.startswith("/api/v1/findings"):
                    cursor = _json(body).get("next_cursor")
        finally:
            await conn.close()

    began = time.monotonic()
    await asyncio.gather(*(client(n) for n in range(clients)))
    result.seconds = time.monotonic() - began
    return result


def fleet_with_findings(*, disks: int, unprotected: int, weekly: int) -> tuple[dict[str, Any], str]:
    """Returns a fleet file with `disks` disks, of which `unprotected` have no policy and `weekly` a weekly one."""
    from auditor.fake.fleet import Fleet

    now = int(time.time())
    generated = Fleet.generate(disks=disks, orgs=1, policies_per_disk=1.0, vm_share=0.0, seed=5, now=now)
    org = next(iter(generated.orgs.values()))
    policies = []
    by_disk = {p.target_id: p for p in generated.policies.values()}
    for i, disk_id in enumerate(generated.disks):
        p = by_disk[disk_id]
        if i % 2 == 0 and i // 2 < unprotected:
            continue  # unprotected-disk
        weekly_one = i % 2 == 1 and i // 2 < weekly
        policies.append({"id": p.id, "target_type": "Disk", "target_id": disk_id,
                         "retention": max(p.retention, 8), "interval": "weekly" if weekly_one else "daily",
                         "next_in_seconds": 3600, "total_size": p.total_size})
    data = {
        "rate_limit_per_minute": 100_000,
        "organizations": [{
            "id": org.id, "sub_domain": org.sub_domain, "name": org.name,
            "disks": [{"id": d.id, "name": d.name, "size_in_gb": d.size_in_gb} for d in generated.disks.values()],
            "policies": policies,
        }],
    }
    return data, org.id


def free_port() -> int:
    """Returns a loopback port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_ready(host: str, port: int, *, within: float, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    """Waits until the daemon has finished its first run; returns that run."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"auditor run exited with {proc.returncode} before it was ready")
        conn = HttpConnection(host, port)
        try:
            status, body = await conn.get("/api/v1/runs?limit=1")
            runs = _json(body).get("runs", []) if status == 200 else []
            if runs and runs[0]["status"] != "running":
                return dict(runs[0])
        except (OSError, asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            await conn.close()
        await asyncio.sleep(0.5)
    raise SystemExit("auditor run did not finish its first cycle in time")


def main() -> int:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--disks", type=int, default=10_000)
    p.add_argument("--findings", type=int, default=3_000)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--seconds", type=float, default=15.0, help="load time per endpoint")
    p.add_argument("--floor-seconds", type=float, default=5.0, help="load time on /healthz (the stack's floor)")
    p.add_argument("--py-spy", metavar="FILE", default=None,
                   help="profile the daemon with py-spy (if installed) into FILE (collapsed stacks)")
    args = p.parse_args()
    report = c.header("report_api", args, f"{args.disks} disks / {args.findings} open findings, {args.clients} "
                                          f"clients x {args.seconds:g} s per endpoint, `auditor run` serving")
    try:
        import auditor.api  # noqa: F401
    except ImportError as exc:
        report.result("p99 latency", target=f"<= {TARGET_P99_MS:.0f} ms", measured=f"auditor.api missing ({exc})",
                      passed=None)
        return 0
    fleet, org_id = fleet_with_findings(disks=args.disks, unprotected=args.findings // 2,
                                        weekly=args.findings - args.findings // 2)
    port = free_port()
    with c.workdir(args) as tmp, c.database(args, tmp) as db, c.FakeKatapult(fleet, directory=tmp) as fake:
        data = c.settings_dict(api_url=fake.url, db_url=db.url, organizations=[org_id], rate=100_000)
        data["audit"]["interval"] = "24h"
        data["api"] = {"listen": f"127.0.0.1:{port}"}
        config = c.write_config(tmp / "auditor.toml", data)
        env = {**os.environ, "KATAPULT_API_TOKEN": fake.token, "AUDITOR_CONFIG": str(config)}
        log = (tmp / "daemon.log").open("wb")
        wrap = [str(Path(sys.executable).with_name("py-spy")), "record", "-r", "200", "-f", "raw", "-o",
                str(Path(args.py_spy).resolve()), "--"] if args.py_spy else []
        proc = subprocess.Popen([*wrap, *c.auditor_command(), "run"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=c.REPO)
        try:
            phases = asyncio.run(_measure(args, port, proc, report))
        finally:
            if proc.poll() is None:
                # py-spy writes its profile on SIGINT (and passes it on); the daemon stops on either.
                proc.send_signal(signal.SIGINT if args.py_spy else signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()
        if proc.returncode not in (0, None):
            report.note(f"auditor run exited {proc.returncode}: "
                        f"{(tmp / 'daemon.log').read_text(errors='replace')[-1500:]}")
    for endpoint, result in phases:
        _summarize(report, endpoint, result)
    return 0


async def _measure(args: Any, port: int, proc: subprocess.Popen[bytes], report: c.Report) -> list[tuple[str, Load]]:
    began = time.monotonic()
    run = await wait_ready("127.0.0.1", port, within=DAEMON_READY_SECONDS, proc=proc)
    report.info("first cycle", f"run {run['status']}, {run['disks_read']} disks, {run['api_requests']} requests; "
                               f"daemon ready {time.monotonic() - began:.1f} s after start")
    phases = []
    # The same load on /healthz (no database, a tiny body): what the server stack alone costs per request.
    floor = await load("127.0.0.1", port, "/healthz", clients=args.clients, seconds=args.floor_seconds)
    report.info("server floor (/healthz)", f"{len(floor.latencies) / floor.seconds:.0f} req/s, p50 "
                                           f"{c.percentile(floor.latencies, 50) * 1000:.0f} ms, p99 "
                                           f"{c.percentile(floor.latencies, 99) * 1000:.0f} ms with "
                                           f"{args.clients} clients: the HTTP stack's own cost")
    for endpoint in ("/api/v1/report", "/api/v1/findings?status=open&limit=100"):
        # One request first, alone: the size of the answer and its unloaded latency.
        conn = HttpConnection("127.0.0.1", port)
        t0 = time.monotonic()
        status, body = await conn.get(endpoint)
        single = time.monotonic() - t0
        await conn.close()
        if endpoint == "/api/v1/report" and status == 200:
            summary = _json(body)["summary"]
            report.info("report", f"{summary['disks_total']} disks, {summary['open_findings']} open findings, "
                                  f"{len(body) / 1e6:.2f} MB of JSON; alone: {single * 1000:.0f} ms")
        else:
            report.info("findings page", f"{len(body) / 1e3:.0f} kB of JSON; alone: {single * 1000:.0f} ms")
        phases.append((endpoint, await load("127.0.0.1", port, endpoint, clients=args.clients,
                                            seconds=args.seconds)))
    return phases


def _summarize(report: c.Report, endpoint: str, result: Load) -> None:
    name = endpoint.split("?")[0]
    lat = result.latencies
    p50 = c.percentile(lat, 50) * 1000
    p99 = c.percentile(lat, 99) * 1000
    rps = len(lat) / result.seconds if result.seconds else 0.0
    errors = ", ".join(f"{k}: {v}" for k, v in result.errors.items()) or "none"
    report.info(f"{name} load", f"{len(lat)} requests in {result.seconds:.1f} s = {rps:.1f} req/s; p50 {p50:.0f} ms, "
                                f"p99 {p99:.0f} ms, max {max(lat, default=0) * 1000:.0f} ms; errors {errors}")
    report.result(f"{name} p99", target=f"<= {TARGET_P99_MS:.0f} ms",
                  measured=f"{p99:.0f} ms (p50 {p50:.0f} ms, {rps:.1f} req/s)",
                  passed=p99 <= TARGET_P99_MS and not result.errors)


if __name__ == "__main__":
    sys.exit(main())
