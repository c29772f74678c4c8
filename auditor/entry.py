"""The `auditor` command's entry point: for `auditor run`, SIGHUP is held from the first instant the interpreter
runs our code, before the CLI and its dependencies are imported. Operators send SIGHUP to reload a daemon, and its
default action would end a process that is still starting; a held one is noted, and the daemon reloads once its
own handlers are in place."""

from __future__ import annotations

import signal
import sys
from types import FrameType

HANGUPS: list[int] = []  # every SIGHUP noted before the daemon's own handler took over


def _note(signum: int, _frame: FrameType | None) -> None:
    HANGUPS.append(signum)


def hold_hangups() -> list[int]:
    """Notes SIGHUP in HANGUPS instead of ending the process (idempotent); returns HANGUPS."""
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is not _note:
        signal.signal(signal.SIGHUP, _note)
    return HANGUPS


def main() -> None:
    if sys.argv[1:2] == ["run"]:
        hold_hangups()
    from auditor.cli import main as cli_main

    cli_main()
