"""`python -m auditor.fake` as a person uses it: the ids it serves on stdout, and SIGHUP re-reading the fleet file."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest

from auditor.fake.__main__ import fleet_summary
from auditor.fake.fleet import Fleet

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGHUP is POSIX")

TOKEN = "fake-token"
ORG = "org_usability000001"
DISK_A = "disk_usability00000a"
DISK_B = "disk_usability00000b"
VM = "vm_usability0000001"

FLEET_TOML = f"""\
[[organizations]]
id = "{ORG}"
sub_domain = "acme"
name = "Acme"

[[organizations.virtual_machines]]
id = "{VM}"
fqdn = "web-1.acme.example.com"

[[organizations.disks]]
id = "{DISK_A}"
name = "web-1-system"
vm = "{VM}"

[[organizations.policies]]
id = "dbp_usability000001"
target_type = "Disk"
target_id = "{DISK_A}"
retention = 14
interval = "daily"
next_in_seconds = 3600
"""

EXTRA_DISK = f"""
[[organizations.disks]]
id = "{DISK_B}"
name = "added-later"
size_in_gb = 40
"""


def _pump(stream: IO[str], lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))


class FakeProcess:
    """`python -m auditor.fake --fleet FILE --port 0`, with stdout and stderr read line by line as it runs."""

    def __init__(self, fleet_file: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "auditor.fake", "--fleet", str(fleet_file), "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.out: queue.Queue[str] = queue.Queue()
        self.err: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=_pump, args=(stream, lines), daemon=True).start()
        first = self.out.get(timeout=15)
        assert "listening on http://127.0.0.1:" in first, first
        self.url = first.split("listening on ", 1)[1].split(" ", 1)[0]

    def wait_line(self, lines: queue.Queue[str], needle: str, *, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            seen.append(line)
            if needle in line:
                return line
        raise AssertionError(f"{needle!r} not seen in {seen}")

    def get(self, path: str, **params: str) -> httpx.Response:
        return httpx.get(
            self.url + path, params=params, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5, trust_env=False
        )

    def org_disk_ids(self) -> list[str]:
        response = self.get("/organizations/organization/disks", **{"organization[sub_domain]": "acme"})
        assert response.status_code == 200, response.text
        return [disk["id"] for disk in response.json()["disk"]]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def fleet_file(tmp_path: Path) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(FLEET_TOML)
    return path


@pytest.fixture
def fake(fleet_file: Path) -> Iterator[FakeProcess]:
    process = FakeProcess(fleet_file)
    try:
        yield process
    finally:
        process.stop()


@pytest.mark.slow  # a real fake process, as the next ones
def test_prints_the_ids_it_serves(fake: FakeProcess) -> None:
    fake.wait_line(fake.out, "organizations (1):")
    fake.wait_line(fake.out, f"{ORG}  sub_domain=acme  Acme")
    fake.wait_line(fake.out, "disks (1):")
    fake.wait_line(fake.out, f"{DISK_A}  web-1-system  org=acme  vm={VM}")
    fake.wait_line(fake.out, "virtual machines (1):")
    fake.wait_line(fake.out, f"{VM}  web-1.acme.example.com")
    fake.wait_line(fake.out, "policies: 1")


def test_big_fleets_print_a_count_and_the_first_few() -> None:
    fleet = Fleet.generate(disks=500, orgs=3, now=1_800_000_000)
    lines = fleet_summary(fleet, limit=5)
    assert "disks (500):" in lines
    assert "  … and 495 more" in lines
    assert lines[lines.index("disks (500):") + 1].startswith(f"  {next(iter(fleet.disks))}  ")
    assert len(lines) < 30


@pytest.mark.slow
def test_sighup_rereads_the_fleet_file(fake: FakeProcess, fleet_file: Path) -> None:
    assert fake.org_disk_ids() == [DISK_A]
    assert fake.get("/disks/disk", **{"disk[id]": DISK_B}).status_code == 404
    fleet_file.write_text(FLEET_TOML + EXTRA_DISK)
    fake.proc.send_signal(signal.SIGHUP)
    line = fake.wait_line(fake.err, "reloaded")
    assert "1 organization(s), 2 disk(s), 1 VM(s), 1 polic(ies)" in line
    assert fake.org_disk_ids() == [DISK_A, DISK_B]
    disk = fake.get("/disks/disk", **{"disk[id]": DISK_B})
    assert disk.status_code == 200 and disk.json()["disk"]["size_in_gb"] == 40


@pytest.mark.slow
@pytest.mark.parametrize(
    "broken",
    [
        "[[organizations]\nid = ",  # not TOML
        FLEET_TOML + '\n[[organizations.disks]]\nid = "x"\nsize_in_gb = "big"\n',  # a wrong type
        FLEET_TOML + f'\n[[organizations.disks]]\nid = "{DISK_A}"\n',  # a duplicate id
    ],
    ids=["syntax", "type", "duplicate"],
)
def test_a_broken_file_keeps_the_old_fleet(fake: FakeProcess, fleet_file: Path, broken: str) -> None:
    fleet_file.write_text(broken)
    fake.proc.send_signal(signal.SIGHUP)
    line = fake.wait_line(fake.err, "kept the current fleet")
    assert str(fleet_file) in line
    assert fake.org_disk_ids() == [DISK_A]
    assert fake.proc.poll() is None
    # A fixed file is picked up on the next SIGHUP.
    fleet_file.write_text(FLEET_TOML + EXTRA_DISK)
    fake.proc.send_signal(signal.SIGHUP)
    fake.wait_line(fake.err, "reloaded")
    assert fake.org_disk_ids() == [DISK_A, DISK_B]


@pytest.mark.slow
def test_json_fleet_files_reload_too(tmp_path: Path) -> None:
    path = tmp_path / "fleet.json"
    org = {"id": ORG, "sub_domain": "acme", "disks": [{"id": DISK_A, "name": "a"}]}
    path.write_text(json.dumps({"organizations": [org]}))
    process = FakeProcess(path)
    try:
        assert process.org_disk_ids() == [DISK_A]
        org["disks"] = []
        path.write_text(json.dumps({"organizations": [org]}))
        process.proc.send_signal(signal.SIGHUP)
        process.wait_line(process.err, "reloaded")
        assert process.org_disk_ids() == []
    finally:
        process.stop()


def test_the_readme_fleet_example_loads(tmp_path: Path) -> None:
    # The fleet format documented for operators must be one the fake really reads.
    from auditor.fake.fleet import Fleet

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## The fake Katapult"):]
    start = section.index("```toml") + len("```toml")
    example = tmp_path / "fleet.toml"
    example.write_text(section[start:section.index("```", start)])
    fleet = Fleet.from_file(example)
    assert len(fleet.disks) == 2 and len(fleet.vms) == 1 and len(fleet.policies) == 1
    assert set(fleet.faults) == {"disk_acmescratch001"}


@pytest.mark.slow  # a real `auditor fake-katapult` process
def test_a_busy_port_is_one_line_and_exit_2() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "auditor", "fake-katapult", "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"fake katapult cannot listen on 127.0.0.1:{port}: Address already in use"], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_a_port_out_of_range_is_a_usage_error_not_a_traceback(port: str) -> None:
    from click.testing import CliRunner

    from auditor.cli import main

    result = CliRunner().invoke(main, ["fake-katapult", "--port", port])
    assert result.exit_code == 2 and "Invalid value for '--port'" in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
