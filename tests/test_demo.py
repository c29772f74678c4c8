"""`auditor demo --once` on a fresh database shows findings of every rule and the alerts it sent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from procs import free_port, wait_for

from auditor.domain.rules import RULES


@pytest.mark.slow  # a real `auditor demo` process
def test_demo_once_shows_every_rule_and_alerts(tmp_path: Path) -> None:
    # The demo reads no config and no AUDITOR_* variables: a production override in the environment (here an
    # unreachable Katapult and a PostgreSQL that is not there) must not point it anywhere but its fake and file.
    env = {**os.environ, "AUDITOR_KATAPULT__API_URL": "http://127.0.0.1:9/core/v1",
           "AUDITOR_DATABASE__URL": "postgresql+psycopg://nobody@127.0.0.1:9/none"}
    proc = subprocess.run(
        [sys.executable, "-m", "auditor", "demo", "--once", "--db", str(tmp_path / "demo.db")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    # One poll judges every rule but those judged from observed runs, which need a schedule seen moving between two
    # polls (README: the demo's first report).
    over_time = {rule_id for rule_id, rule in RULES.items() if rule.observed is not None}
    assert over_time == {"observed-interval-too-long", "no-backup-data"}
    for rule in RULES.keys() - over_time:
        assert rule in proc.stdout, f"the demo report shows no {rule} finding"
    assert "[demo webhook] FIRING" in proc.stdout
    # The report first, then the alerts it sent (README: "prints the report and the alerts it sent").
    assert proc.stdout.index("[demo webhook]") > proc.stdout.index("Compliance report generated")
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # a real `auditor demo` daemon
@pytest.mark.timeout(180)
def test_demo_shows_the_report_first_then_the_dashboard_url(tmp_path: Path) -> None:
    # stdout and stderr in one pipe, in the order they were written: no log line comes before the report.
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "auditor", "demo", "--db", str(tmp_path / "demo.db"), "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=dict(os.environ),
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in proc.stdout or ()),
                              daemon=True)
    reader.start()
    try:
        wait_for("the demo's first report", lambda: True if any(x.startswith("auditing every") for x in lines)
                 else None, timeout=120)
        head = lines[:next(i for i, x in enumerate(lines) if x.startswith("dashboard: "))]
        assert head and not any(x.lstrip().startswith("{") or "is now the leader" in x for x in head), head
        assert any(rule in "\n".join(head) for rule in RULES), head  # the report itself came first
        assert f"dashboard: http://127.0.0.1:{port}/" in lines
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert page.status_code == 200 and "Overview" in page.text
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        reader.join(timeout=5)
