"""What the command line prints: data is printed as it is, never read as rich markup (a disk name or a Katapult
error reading `[/bold]` must neither crash a command nor vanish), and long tables come out fast as plain text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from hostile import Answer, Request, Tamper, wrapped_error
from test_cli import clean_env, write

from auditor.cli import LARGE_TABLE, print_table
from auditor.config import Settings
from auditor.fake import Fleet
from auditor.fake import create_app as fake_app
from auditor.service import open_services
from auditor.service.cycle import run_cycle

MARKUP_NAME = "[/bold] [disk] web [red]x"
MARKUP_ERROR = "no access to [disk] here [/red] (ask [bold]ops[/bold])"


def console() -> Any:
    from rich.console import Console

    return Console(width=200, highlight=False)


def test_cells_that_look_like_markup_are_printed_as_they_are(capsys: pytest.CaptureFixture[str]) -> None:
    print_table(console(), ("disk", "message"), [("disk_a", MARKUP_NAME), ("disk_b", MARKUP_ERROR)],
                title="[/title] t")
    out = capsys.readouterr().out
    assert MARKUP_NAME in out and MARKUP_ERROR in out and "[/title] t" in out


def test_a_long_table_is_plain_aligned_text_with_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [(f"disk_{i:05d}", str(i), f"message {i} [/bold]") for i in range(LARGE_TABLE + 1)]
    print_table(console(), ("disk", "count", "message"), rows, right=("count",))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "disk        count  message"
    assert lines[1] == "----------  -----  -------"
    assert lines[2] == "disk_00000      0  message 0 [/bold]"
    assert lines[-1] == f"disk_{LARGE_TABLE:05d}    {LARGE_TABLE}  message {LARGE_TABLE} [/bold]"
    assert len(lines) == LARGE_TABLE + 3


@pytest.mark.parametrize("rows", [1, LARGE_TABLE + 1])
def test_control_characters_in_data_never_reach_the_terminal(capsys: pytest.CaptureFixture[str], rows: int) -> None:
    hostile = "web\x1b]0;owned\x07\x1b[2J\rname\x9b"
    print_table(console(), ("disk", "name"), [("disk_a", hostile)] * rows)
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out and "\x9b" not in out
    assert "web\\x1b]0;owned\\x07\\x1b[2J\\x0dname\\x9b" in out


def test_a_short_table_is_a_rich_table(capsys: pytest.CaptureFixture[str]) -> None:
    print_table(console(), ("disk", "count"), [("disk_a", "1")])
    assert "┃ disk" in capsys.readouterr().out


def _forbidden(disk_id: str) -> Any:
    def rewrite(request: Request, status: int, body: Any) -> Answer | None:
        if request.endpoint == "/disks/disk" and request.target == disk_id:
            return wrapped_error(403, "permission_denied", MARKUP_ERROR)
        return None

    return rewrite


@pytest.mark.slow
async def test_commands_print_markup_like_data_verbatim(tmp_path: Path) -> None:
    fleet = Fleet(rate_limit_per_minute=1_000_000)
    org = fleet.add_org("acme")
    named = fleet.add_disk(org.id, name=MARKUP_NAME).id  # no policy: an unprotected-disk finding
    denied = fleet.add_disk(org.id, name="denied").id  # its lookup answers 403 with the markup-like error
    db = tmp_path / "auditor.db"
    data: dict[str, Any] = {"katapult": {"api_url": "http://fake/core/v1", "max_attempts": 1},
                            "database": {"url": f"sqlite:///{db}"}, "audit": {"disks": [named, denied]}}
    transport = httpx.ASGITransport(app=Tamper(fake_app(fleet), _forbidden(denied)))
    async with open_services(Settings(**data), transport=transport, token="fake-token") as services:
        outcome = await run_cycle(services, trigger="test")
    assert [e.target for e in outcome.errors] == [denied]
    config = write(tmp_path / "auditor.toml", f'[database]\nurl = "sqlite:///{db}"\n'
                                              f"[audit]\ndisks = {json.dumps([named, denied])}\n")

    def run(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "auditor", *args, "--config", str(config)], cwd=tmp_path,
                              env=clean_env(COLUMNS="400"), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
        return proc.stdout

    report = run("report")
    assert MARKUP_ERROR in report and named in report
    assert MARKUP_NAME in run("history", named)
    assert MARKUP_NAME in run("report", "--since", "1d")  # the disks not compliant the whole time, by name
    assert named in run("findings")
