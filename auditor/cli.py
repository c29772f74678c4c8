"""The `auditor` command line: loads config once, runs a use case, maps errors to exit codes.

Exit codes: 0 ok / compliant, 1 open findings (audit) or changes not applied (apply), 2 a run was partial or
failed, the database could not be used, or a plan could not be applied at all, 78 configuration error (EX_CONFIG).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, get_args

import click

from auditor import __version__
from auditor.errors import AuditorError, ConfigError, LeaseHeldError, StoreError
from auditor.vocabulary import DiskStatus, FindingStatusName, RunStatus, Severity, format_duration, parse_duration

# Start-up time: `auditor --help` imports only click; pydantic (config), rich (output), SQLAlchemy (the store),
# httpx and the daemon are imported by the commands that use them (benchmarks/cli_start.py measures it).
if TYPE_CHECKING:
    from rich.console import Console

    from auditor.config import Settings
    from auditor.domain.periods import Period

EXIT_OK, EXIT_FINDINGS, EXIT_INCOMPLETE, EXIT_CONFIG = 0, 1, 2, 78
NOTIFY_DRAIN_SECONDS = 15.0
SEVERITY_CHOICES = [severity.value for severity in Severity]
CHECK_CONFIG_LIST = 20  # disks or organizations check-config lists by id

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def _out() -> Console:
    from rich.console import Console

    # Piped output (CI logs, files) gets a wide table rather than rich's 80-column default.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 180)


def _err() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


# Control characters (C0, DEL, C1) in data are shown as \xNN: a disk name or an id from Katapult never reaches the
# terminal as an escape sequence (rich passes ESC through).
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def printable(text: str) -> str:
    """Returns text with its control characters shown as \\xNN escapes."""
    return text.translate(_CONTROL)


def escape(text: str) -> str:
    """Returns data for a line that uses markup: control characters shown as escapes, markup escaped."""
    from rich.markup import escape as rich_escape

    return rich_escape(printable(text))


LARGE_TABLE = 200  # rows: a longer table is printed as aligned plain text (rich lays out ~1 ms a row)


def print_table(console: Console, columns: Sequence[str], rows: Sequence[Sequence[str]], *, title: str | None = None,
                right: Sequence[str] = (), show_header: bool = True, fold: bool = False) -> None:
    """Prints rows under their columns. Cells are data, never markup: a disk name or a Katapult error reading
    `[/bold]` or `[disk]` is printed as it is. Up to LARGE_TABLE rows as a rich table (`right`-aligned columns,
    long cells folded with `fold`); a longer one (3,000 findings took rich 3 s) as plain text, columns separated by
    two spaces and the last one unpadded."""
    if len(rows) <= LARGE_TABLE:
        from rich.table import Table
        from rich.text import Text

        table = Table(title=Text(printable(title)) if title else None, show_header=show_header)
        for col in columns:
            table.add_column(col, justify="right" if col in right else "left", overflow="fold" if fold else "ellipsis")
        for row in rows:
            table.add_row(*(Text(printable(cell)) for cell in row))
        console.print(table)
        return
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(col), *(len(row[i]) for row in rows)) for i, col in enumerate(columns[:-1])]

    def line(cells: Sequence[str]) -> str:
        return "  ".join([*(c.rjust(w) if col in right else c.ljust(w)
                            for c, w, col in zip(cells, widths, columns, strict=False)), cells[-1]])

    rule = line([*("-" * w for w in widths), "-" * len(columns[-1])])
    lines = ([title] if title else []) + ([line(columns), rule] if show_header else [])
    click.echo("\n".join([*lines, *(line(row) for row in rows)]))


def config_option(fn: F) -> F:
    """Adds --config to a command."""
    return click.option(
        "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
        help="Config file (TOML). Default: $AUDITOR_CONFIG, else config/auditor.toml if present, else built-ins.",
    )(fn)


def fail_config(err: ConfigError) -> None:
    """Prints one line per problem and exits 78."""
    console = _err()
    for line in err.problems:
        console.print(f"config error: {line}", markup=False)
    sys.exit(EXIT_CONFIG)


def load(config_path: Path | None) -> Settings:
    """Returns settings or exits 78 with one line per problem."""
    from auditor.config import load_settings

    try:
        return load_settings(config_path)
    except ConfigError as err:
        fail_config(err)
        raise AssertionError("unreachable") from None


def setup_logs(settings: Settings, *, extra_secrets: tuple[str, ...] = ()) -> None:
    """Configures logging with every configured secret registered for scrubbing."""
    from auditor.config import configured_secrets
    from auditor.log import setup_logging

    secrets = [*extra_secrets, *configured_secrets(settings)]
    setup_logging(level=settings.log.level, fmt=settings.log.format, secrets=[s for s in secrets if s])


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Runs a coroutine; expected failures print one clear line and exit 78 or 2, never a traceback."""
    import asyncio

    return run_guarded(lambda: asyncio.run(coro))


def run_guarded(call: Callable[[], T]) -> T:
    """Runs `call` (synchronous work, or `asyncio.run` of a coroutine); expected failures print one clear line and
    exit 78 or 2, never a traceback."""
    try:
        return call()
    except ConfigError as err:
        fail_config(err)
    except StoreError as err:
        _err().print(f"database error: {err}", markup=False)
        sys.exit(EXIT_INCOMPLETE)
    except AuditorError as err:
        _err().print(f"error: {err}", markup=False)
        sys.exit(EXIT_INCOMPLETE)
    except KeyboardInterrupt:
        _err().print("interrupted")
        sys.exit(130)
    except Exception as exc:  # no traceback for any input: one line, exit 2 (the log has the detail at debug)
        import logging

        logging.getLogger(__name__).debug("unexpected error", exc_info=exc)
        _err().print(f"error: internal error ({type(exc).__name__}: {str(exc)[:300]})", markup=False)
        sys.exit(EXIT_INCOMPLETE)
    raise AssertionError("unreachable")


def _check_argv(argv: list[str]) -> None:
    """Exits 2 with one line when an argument is not valid UTF-8 (Python hands it over with lone surrogates)."""
    for index, arg in enumerate(argv):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            shown = arg.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")[:120]
            _err().print(f"error: argument {index + 1} is not valid UTF-8: {shown}", markup=False)
            sys.exit(EXIT_INCOMPLETE)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="auditor")
def main() -> None:
    """Backup-policy compliance auditor for the Katapult cloud.

    Reads disk backup policies from Katapult, judges them against compliance rules, keeps findings with a
    lifecycle in a database, serves reports and alerts on-call channels.

    Configuration: a TOML file (--config, $AUDITOR_CONFIG or config/auditor.toml), every key overridable by
    AUDITOR_<SECTION>__<KEY>; the Katapult token comes from $KATAPULT_API_TOKEN or katapult.api_token_file.
    `auditor apply` alone also reads the write token, from $KATAPULT_WRITE_TOKEN or katapult.write_token_file.
    """
    _check_argv(sys.argv[1:])


# ---- check-config ---------------------------------------------------------------------------------------


@main.command("check-config")
@config_option
def check_config(config_path: Path | None) -> None:
    """Validate the configuration, print what is in effect (secrets redacted) and exit (0 valid, 78 invalid with
    one line per problem)."""
    from auditor.domain.alerts import IGNORED_SETTINGS, notifier_warnings
    from auditor.domain.rules import RULES
    from auditor.service.configuration import waivers_from

    settings = load(config_path)
    console = _out()
    try:
        settings.katapult.token()
        token_note = "set"
    except ConfigError as err:
        token_note = f"not set ({err.problems[0].split('(', 1)[-1].rstrip(')')})"
    try:
        settings.api.resolved_token()
    except ConfigError as err:
        fail_config(err)
    # `configuration` imports the settings and the domain only: not the store, httpx or the notifiers.
    waivers, problems = waivers_from(settings)
    audit, rules = settings.audit, settings.rules
    lines = [
        "configuration is valid",
        f"  targets: {len(audit.disks)} disk(s), {len(audit.organizations)} organization(s); "
        f"interval {format_duration(audit.interval)}; notifiers: {len(settings.notifiers)}; "
        f"katapult token: {token_note}",
    ]
    for label, items in (("disks", audit.disks), ("organizations", audit.organizations)):
        if items:
            more = f" ... and {len(items) - CHECK_CONFIG_LIST} more" if len(items) > CHECK_CONFIG_LIST else ""
            lines.append(f"  {label}: {', '.join(items[:CHECK_CONFIG_LIST])}{more}")
    if "*" in audit.organizations:
        lines.append('  organizations: "*" is every organization the token can see (GET /organizations, each cycle)')
    if audit.organizations:
        lines.append(f"  attachment refresh: {format_duration(audit.attachment_refresh)} per VM whose policies are a "
                     "disk's only coverage")
    lines.append(f"  rule parameters: min_retention {rules.min_retention}, min_retention_days "
                 f"{rules.min_retention_days:g}, max_interval {rules.max_interval}, stale_grace "
                 f"{format_duration(rules.stale_grace)}")
    for rule_id, rule in RULES.items():
        if rule_id in rules.disabled:
            state = "disabled"
        elif rule_id in rules.severity:
            state = f"{rules.severity[rule_id]} (default {rule.severity.value})"
        else:
            state = rule.severity.value
        lines.append(f"  rule {rule_id}: {state}")
    for o in rules.overrides:
        changed = [f"{name} {format_duration(value) if isinstance(value, timedelta) else value}"
                   for name in ("min_retention", "min_retention_days", "max_interval", "stale_grace")
                   if (value := getattr(o, name)) is not None]
        lines.append(f"  override for {', '.join(o.disks)}: {', '.join(changed) or 'nothing changed'}")
    lines += tier_lines(settings)
    lines += remediation_lines(settings)
    lines.append(f"  waivers: {len(waivers)} in force, {len(problems)} not applying")
    for w in waivers:
        where = w.disk_id + (f" / {w.policy_id}" if w.policy_id else "")
        lines.append(f"  waiver {w.rule} on {where} until {w.expires.isoformat()} ({w.owner}): {w.reason}")
    for p in problems:
        lines.append(f"  warning: waivers[{p.index}] does not apply: {p.problem}")
    # Name, kind and filters only: a notifier's URL, key or password is a secret and is never printed.
    # Settings the notifier's kind ignores are left out (Alertmanager is re-posted every cycle: no repeat_interval).
    for n in settings.notifiers:
        kind = getattr(n, "kind", "?")
        shown = [f"min_severity {n.min_severity}"]
        if "repeat_interval" not in IGNORED_SETTINGS.get(kind, frozenset()):
            shown.append(f"repeat_interval {format_duration(n.repeat_interval) if n.repeat_interval else 'never'}")
        if n.rules:
            shown.append(f"rules {', '.join(n.rules)}")
        lines.append(f"  notifier {n.name} ({kind}): {', '.join(shown)}")
    if settings.notify.runbook_url:
        lines.append(f"  runbook_url {settings.notify.runbook_url}")
    lines += [f"  warning: {w}" for w in notifier_warnings(settings)]
    for line in lines:  # one line each, never wrapped: scripts grep them
        console.print(line, markup=False, soft_wrap=True)


def remediation_lines(settings: Settings) -> list[str]:
    """Returns check-config's lines about [remediation] (the templates in force), or exits 78 when a template would
    itself be a finding under its tier's rules."""
    import os

    from auditor.config import WRITE_TOKEN_ENV
    from auditor.service.configuration import template_problems, templates_from

    problems = template_problems(settings)
    if problems:
        fail_config(ConfigError(problems))
    r = settings.remediation
    # Only whether the write token is configured: check-config never reads it (`auditor apply` alone does).
    write = ("file katapult.write_token_file" if settings.katapult.write_token_file
             else f"env {WRITE_TOKEN_ENV}" if os.environ.get(WRITE_TOKEN_ENV, "").strip() else "not configured")
    lines = [f"  remediation: {'enabled' if r.enabled else 'disabled'}; plan_ttl {format_duration(r.plan_ttl)}, "
             f"max_changes {r.max_changes}; write token: {write}"]
    for name, t in templates_from(settings).items():
        lines.append(f"  remediation template {name or '(rules defaults)'}: retention {t.retention}, "
                     f"{t.interval.value} (frequency {t.frequency}, time {t.time}, minute {t.minute}), "
                     f"target {t.target}")
    return lines


def tier_lines(settings: Settings) -> list[str]:
    """Returns check-config's lines about [[tiers]]: each tier, and warnings about tiers that can never match."""
    from auditor.config import EVERY_ORGANIZATION
    from auditor.domain.tiers import shadowed
    from auditor.service.configuration import tier_from

    lines: list[str] = []
    tiers = []
    for t in settings.tiers:
        m = t.match
        tiers.append(tier_from(t))
        conds = [f"{side} {key}={value if isinstance(value, str) else '|'.join(value)}"
                 for side, table in (("disk", m.disk_annotations), ("vm", m.vm_annotations))
                 for key, value in table.items()]
        if m.organizations:
            conds.append(f"organization {'|'.join(m.organizations)}")
        if t.exempt:
            what = f"exempt ({t.reason})"
        else:
            changed = [f"{name} {format_duration(value) if isinstance(value, timedelta) else value}"
                       for name in ("min_retention", "min_retention_days", "max_interval", "stale_grace")
                       if (value := getattr(t, name)) is not None]
            changed += [f"{rule} {sev}" for rule, sev in t.severity.items()]
            if t.disabled is not None:
                changed.append(f"disabled [{', '.join(t.disabled)}]")
            what = ", ".join(changed) or "the [rules] parameters"
        lines.append(f"  tier {t.name}: when {' and '.join(conds)}: {what}")
    for tier, earlier in shadowed(tiers):
        lines.append(f"  warning: tier {tier.name} can never match: every disk it matches matches tier "
                     f"{earlier.name} first")
    # With "*" every organization is listed with its id and sub-domain: a tier may name either.
    if (settings.audit.organizations and not settings.audit.disks
            and EVERY_ORGANIZATION not in settings.audit.organizations):
        audited = set(settings.audit.organizations)
        for t in settings.tiers:
            stray = [o for o in t.match.organizations if o not in audited]
            if stray:
                lines.append(f"  warning: tier {t.name} names organization(s) {', '.join(stray)} not spelled as in "
                             "audit.organizations: disks are matched by the reference they were listed through")
    return lines


# ---- audit ----------------------------------------------------------------------------------------------


@main.command("audit")
@config_option
@click.option("--once", is_flag=True, help="Run one cycle and exit (the only mode of this command).")
@click.option("--fail-on", type=click.Choice(SEVERITY_CHOICES), default=None,
              help="Count only open findings at or above this severity for exit code 1.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              help="Summary format.")
@click.option("--wait", "wait", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Seconds to wait for another process's running cycle (the cycle lease) before giving up.")
@click.option("--drain-timeout", "drain_timeout", type=click.FloatRange(min=0), default=NOTIFY_DRAIN_SECONDS,
              show_default=True,
              help="Seconds to keep delivering this run's notifications, waiting out retries of temporary failures "
                   "(5xx, 429, timeouts) that fit; what is left stays in the outbox for the daemon or the next run.")
def audit_cmd(config_path: Path | None, once: bool, fail_on: str | None, fmt: str, wait: float,
              drain_timeout: float) -> None:
    """Run one audit cycle against Katapult and record it.

    Exit 0: complete and recorded, no open finding; 1: complete and recorded, with open findings; 2: anything else
    (partial or failed run, another process holding the cycle lease past --wait, the database) with a one-line
    reason; 78: configuration error.
    """
    settings = load(config_path)
    setup_logs(settings)
    try:
        settings.katapult.token()
    except ConfigError as err:
        fail_config(err)
    code = run_async(_audit(settings, fail_on=fail_on, fmt=fmt, wait=wait, drain_timeout=drain_timeout))
    sys.exit(code)


async def _audit(settings: Settings, *, fail_on: str | None, fmt: str, wait: float = 0.0,
                 transport: Any = None, print_report: bool = False,
                 drain_timeout: float = NOTIFY_DRAIN_SECONDS) -> int:
    from auditor.service import PendingFailures, open_services
    from auditor.service.cycle import record_failures, run_cycle
    from auditor.service.delivery import drain

    if settings.audit.disks == [] and settings.audit.organizations == []:
        raise ConfigError(["audit: nothing to audit: set audit.disks and/or audit.organizations "
                           "(env AUDITOR_AUDIT__DISKS / AUDITOR_AUDIT__ORGANIZATIONS)"])
    async with open_services(settings, transport=transport) as services:
        progress, stop = _progress(len(settings.audit.disks))
        failures = PendingFailures()  # this run's failure, if the database cannot take it at once
        try:
            outcome = await run_cycle(services, failures=failures, progress=progress, wait=wait)
        except LeaseHeldError as exc:
            _err().print(f"error: {exc} (waited {wait:g}s; see --wait)", markup=False)
            return EXIT_INCOMPLETE
        finally:
            stop()
        # Deliver what this cycle produced before exiting; what is not delivered stays in the outbox.
        drained = await drain(services, within=drain_timeout)
        if drained.pending:
            why = f": {'; '.join(drained.reasons)}" if drained.reasons else ""
            _err().print(f"{drained.pending} notification(s) not yet delivered{why}; they stay in the outbox "
                         "for the daemon or the next run", markup=False)
        unrecorded = await record_failures(services, failures=failures)
        if print_report:
            await _print_report(services, "table")
    print_outcome(outcome, fmt=fmt)
    if unrecorded:
        _err().print(f"error: run {outcome.run_id} failed and could not be recorded: the database does not answer",
                     markup=False)
        return EXIT_INCOMPLETE
    if outcome.status is not RunStatus.COMPLETE:
        first = outcome.errors[0] if outcome.errors else None
        _err().print(f"audit {outcome.status.value}: " + (f"{first.target}: {first.code}: {first.message}"
                                                         if first else "see the errors above"), markup=False)
        return EXIT_INCOMPLETE
    threshold = SEVERITY_CHOICES.index(fail_on) if fail_on else 0
    counted = sum(n for sev, n in outcome.open_findings.items() if SEVERITY_CHOICES.index(sev) >= threshold)
    return EXIT_FINDINGS if counted else EXIT_OK


def _progress(total: int) -> tuple[Any, Callable[[], None]]:
    if total < 50 or not sys.stderr.isatty():
        return None, lambda: None
    from rich.progress import Progress

    bar = Progress(console=_err(), transient=True)
    task = bar.add_task("reading disks", total=total)
    bar.start()
    return (lambda done, _total: bar.update(task, completed=done)), bar.stop


def print_outcome(outcome: Any, *, fmt: str) -> None:
    """Prints a cycle's one-screen summary."""
    if fmt == "json":
        click.echo(json.dumps({
            "run_id": outcome.run_id, "status": outcome.status.value, "duration_seconds": round(outcome.duration, 3),
            "targets_checked": outcome.targets_checked, "disks_read": outcome.disks_ok,
            "disks_unknown": outcome.disks_unknown, "api_requests": outcome.stats.requests,
            "api_retries": outcome.stats.retries, "api_rate_limited": outcome.stats.rate_limited,
            "findings_opened": outcome.opened, "findings_resolved": outcome.resolved,
            "open_findings_by_severity": outcome.open_findings,
            "errors": [e.as_dict() for e in outcome.errors],
        }, indent=2))
        return
    console = _out()
    rows = [
        ("duration", f"{outcome.duration:.1f}s"),
        ("targets checked", str(outcome.targets_checked)),
        ("disks read", str(outcome.disks_ok)),
        ("disks without a verdict", str(outcome.disks_unknown)),
        ("API requests (retries, 429s)",
         f"{outcome.stats.requests} ({outcome.stats.retries}, {outcome.stats.rate_limited})"),
        ("findings opened / resolved", f"{outcome.opened} / {outcome.resolved}"),
        *((f"open {sev}", str(outcome.open_findings[sev])) for sev in reversed(SEVERITY_CHOICES)
          if outcome.open_findings.get(sev)),
    ]
    print_table(console, ("what", "value"), rows, title=f"audit run {outcome.run_id}: {outcome.status.value}",
                right=("value",), show_header=False)
    for e in outcome.errors[:20]:
        console.print(printable(f"could not read {e.target}: {e.code}: {e.message}"), markup=False)
    if len(outcome.errors) > 20:
        console.print(f"... and {len(outcome.errors) - 20} more (see `auditor report`)", markup=False)
    for p in outcome.waiver_problems:
        console.print(f"warning: waivers[{p.index}] does not apply: {p.problem}", markup=False)


# ---- run (the daemon) -----------------------------------------------------------------------------------


@main.command("run")
@config_option
def run_cmd(config_path: Path | None) -> None:
    """Run the daemon: an audit every audit.interval (the first at start) and the HTTP API on api.listen.

    Several daemons may share one database: all serve the API, the one holding the leader lease
    (daemon.leader_ttl) runs the schedule and the alert delivery, and another takes over when it dies.
    Stops on SIGTERM or SIGINT: a running cycle gets daemon.shutdown_grace to finish, then the process exits 0.
    SIGHUP reloads the configuration file (and the AUDITOR_* environment as at start): rules, tiers, waivers,
    notifiers, the heartbeat, [katapult], [audit] and the log level take effect from the next cycle; a key that
    needs a restart (database.url, api.listen, ...) is logged and keeps its value; an invalid file is logged
    line by line and the running configuration stays.
    Exit 2: the API address could not be taken or the database failed; 78: configuration error.
    """
    from functools import partial

    hangups = _hold_hangups()  # from the first step: SIGHUP's default action would end the process
    from auditor.config import check_runnable, load_settings

    settings = load(config_path)
    try:
        katapult_token, api_token = check_runnable(settings)
    except ConfigError as err:
        fail_config(err)
        raise AssertionError("unreachable") from None
    secrets = (katapult_token.get_secret_value(),) + ((api_token.get_secret_value(),) if api_token else ())
    setup_logs(settings, extra_secrets=secrets)
    from auditor.daemon import serve

    sys.exit(run_async(serve(settings, reload=partial(load_settings, config_path),
                             hangups_at_start=lambda: bool(hangups))))


def _hold_hangups() -> list[int]:
    """Catches SIGHUP until the daemon installs its own handler (operators send it to reload: it must never end the
    process while it starts); returns the list each one is noted in. The `auditor` command and `python -m auditor`
    already hold it from their first step (`auditor.entry`); this covers the CLI called any other way."""
    from auditor.entry import hold_hangups

    return hold_hangups()


# ---- report / findings / history ------------------------------------------------------------------------


@main.command("report")
@config_option
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv", "markdown", "html"]), default="table",
              help="Output format; json is a stable contract. html needs --since.")
@click.option("--since", "since", default=None, metavar="DURATION",
              help="Report compliance over a period instead of the current state: the DURATION (e.g. 30d, 12h; at "
                   "most 400d) before --until.")
@click.option("--until", "until", default=None, metavar="DATE",
              help="End of the --since period, excluded: an ISO-8601 date (midnight UTC) or datetime (UTC unless "
                   "it has an offset). Default: now.")
@click.option("--tier", "tier", default=None, metavar="NAME",
              help="Only the disks (and their findings) of this [[tiers]] entry, the summary counting those.")
def report_cmd(config_path: Path | None, fmt: str, since: str | None, until: str | None,
               tier: str | None) -> None:
    """Print the current compliance report, or with --since compliance over a period (no Katapult call).

    With --since: time-weighted fleet compliance over the period and per UTC day, each disk's time in compliance,
    per rule findings opened/resolved and time to resolve, coverage and its gaps ("no data", never counted as
    compliant) and the waivers in force. Exit 2 on a bad period or when the database cannot be used.
    """
    if since is None and (until is not None or fmt == "html"):
        fail_usage("--until and --format html need --since (the period report)")
    if tier is not None and since is not None:
        fail_usage("--tier applies to the current report, not to --since")
    settings = load(config_path)
    if tier is not None and tier not in {t.name for t in settings.tiers}:
        known = ", ".join(t.name for t in settings.tiers) or "none configured"
        fail_usage(f"--tier: no tier named {tier!r} (tiers: {known})")
    setup_logs(settings)
    if since is not None:
        period = parse_period(since, until)

        async def period_report() -> dict[str, Any]:
            from auditor.service import open_services
            from auditor.service.compliance import read_period_report

            async with open_services(settings, katapult=False, migrate=False) as services:
                return await read_period_report(services, start=period.start, end=period.end)

        print_compliance(run_async(period_report()), fmt)
        return

    def current() -> None:
        # The current report reads a few rows (sqlite3 for a plain SQLite file, else SQLAlchemy Core), without the
        # ORM, asyncio, httpx or the notifiers that open_services would load (benchmarks/cli_start.py times it).
        from auditor.service.queries import current_report

        show_report(current_report(settings, tier=tier), fmt)

    run_guarded(current)


def fail_usage(message: str) -> None:
    """Prints one `error:` line and exits 2."""
    _err().print(f"error: {message}", markup=False)
    sys.exit(EXIT_INCOMPLETE)


def parse_period(since: str, until: str | None) -> Period:
    """Returns the Period of `--since DURATION [--until DATE]`, or exits 2 with one line naming the option."""
    from datetime import timedelta

    from auditor.domain.periods import parse_instant
    from auditor.service.clock import utcnow
    from auditor.service.compliance import resolve_period

    try:
        span = parse_duration(since)
    except (ValueError, OverflowError) as exc:
        fail_usage(f"--since: {str(exc).removeprefix('Value error, ')}")
        raise AssertionError("unreachable") from None
    if span <= timedelta(0):
        fail_usage("--since: must be longer than 0")
    try:
        end = parse_instant(until) if until is not None else None
    except ValueError as exc:
        fail_usage(f"--until: {exc}")
        raise AssertionError("unreachable") from None
    try:
        return resolve_period(start=None, end=end, now=utcnow(), span=span)
    except (ValueError, OverflowError) as exc:
        fail_usage(f"--since/--until: {exc}")
        raise AssertionError("unreachable") from None


def print_compliance(report: dict[str, Any], fmt: str) -> None:
    """Prints the period report in the chosen format."""
    from auditor.render.compliance import compliance_csv, compliance_html, compliance_markdown

    if fmt == "json":
        click.echo(json.dumps(report, indent=2))
    elif fmt == "csv":
        click.echo(compliance_csv(report), nl=False)
    elif fmt == "markdown":
        click.echo(compliance_markdown(report))
    elif fmt == "html":
        click.echo(compliance_html(report), nl=False)
    else:
        print_compliance_table(report)


def print_compliance_table(report: dict[str, Any], *, max_disks: int = 20) -> None:
    """Prints the period report as rich tables (the least compliant disks only; json/csv list every disk)."""
    from auditor.render.compliance import cycles_text, format_pct, measured_note, worst_disks

    duration = partial(format_duration, style="report")
    console = _out()
    p, c, f = report["period"], report["coverage"], report["fleet"]
    console.print(f"[bold]Compliance {escape(p['from'])} – {escape(p['to'])}[/bold] generated "
                  f"{escape(report['generated_at'])}")
    note = measured_note(p)
    if note:
        console.print(note, markup=False)
    console.print(f"fleet time in compliance {format_pct(f['compliance_pct'])} over {f['disks']} disk(s); coverage "
                  f"{format_pct(c['coverage_pct'])}: {cycles_text(c)}, no data for {duration(c['no_data_seconds'])}",
                  markup=False)
    day_columns = ("date", "coverage", "compliance", "noncompliant disk-time", "unknown disk-time")
    print_table(console, day_columns, [
        (d["date"], format_pct(d["coverage_pct"]), format_pct(d["compliance_pct"]),
         duration(d["noncompliant_seconds"]), duration(d["unknown_seconds"])) for d in f["by_day"]
    ], title="by UTC day", right=day_columns[1:])
    rule_columns = ("rule", "opened", "resolved", "mean to resolve", "p90 to resolve", "open at end", "oldest open")
    print_table(console, rule_columns, [
        (r["rule"], str(r["opened"]), str(r["resolved"]), duration(r["mean_time_to_resolve_seconds"]),
         duration(r["p90_time_to_resolve_seconds"]), str(r["open_at_end"]),
         duration(r["oldest_open_age_seconds"])) for r in report["rules"]
    ], title="rules", right=rule_columns[1:])
    for g in c["gaps"]:
        console.print(f"no data {g['from']} – {g['to']} ({duration(g['seconds'])})", markup=False)
    for w in report["waivers"]:
        console.print(f"waiver {w['rule']} on {w['disk_id']} until {w['expires']} ({w['owner']}): {w['reason']}",
                      markup=False)
    worst = worst_disks(report)
    if worst:
        print_table(console, ("disk", "name", "compliance", "noncompliant", "unknown", "no data"), [
            (d["disk_id"], d["name"] or "-", format_pct(d["compliance_pct"]),
             duration(d["noncompliant_seconds"]), duration(d["unknown_seconds"]),
             duration(d["no_data_seconds"])) for d in worst[:max_disks]
        ], title=f"disks not compliant the whole time ({len(worst)})", fold=True)
        if len(worst) > max_disks:
            console.print(f"... and {len(worst) - max_disks} more (see --format csv)", markup=False)


@main.command("evidence")
@config_option
@click.option("--since", "since", default="90d", show_default=True, metavar="DURATION",
              help="Length of the period before --until (at most 400d).")
@click.option("--until", "until", default=None, metavar="DATE",
              help="End of the period, excluded: an ISO-8601 date (midnight UTC) or datetime. Default: now (give "
                   "it to make the export reproducible).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write into: a new or empty one (created if missing); a folder that already holds "
                   "anything is refused with exit 2 and nothing written.")
@click.option("--sign", "sign_key", default=None, type=click.Path(dir_okay=False, path_type=Path),
              metavar="KEYFILE",
              help="Sign MANIFEST.sha256 with this SSH private key (ssh-keygen -Y sign, namespace "
                   "auditor-evidence) into MANIFEST.sha256.sig; the key must not need a passphrase.")
def evidence_cmd(config_path: Path | None, since: str, until: str | None, out: Path, sign_key: Path | None) -> None:
    """Write evidence for an external auditor: every configuration in force during the period with the runs that
    used it, the period report (JSON, CSV, HTML), rules and waivers, the findings register, policy snapshots,
    drift, alert deliveries, an OSCAL Assessment Results document, metadata, a README and MANIFEST.sha256
    (signed with --sign).

    Everything comes from the database: two exports of the same database and period are byte-identical, whatever
    the configuration of the exporting process. Reads the database only. Exit 0 written, 2 a bad period, the
    database, the directory or the signing key could not be used (a folder that is not empty among them).
    """
    settings = load(config_path)
    setup_logs(settings)
    period = parse_period(since, until)
    from auditor.errors import FolderNotEmptyError, SigningError
    from auditor.service.evidence import is_empty_folder

    if not is_empty_folder(out):  # checked before reading the database; write_evidence checks again
        fail_usage(str(FolderNotEmptyError(out)))
    if sign_key is not None and not sign_key.is_file():  # likewise; sign_manifest checks again
        fail_usage(str(SigningError(sign_key, "no such key file")))

    async def collect_evidence() -> dict[str, bytes]:
        from auditor.service import open_services
        from auditor.service.evidence import build_evidence

        async with open_services(settings, katapult=False, migrate=False) as services:
            return await build_evidence(services, period=period)

    files = run_async(collect_evidence())
    from auditor.service.evidence import MANIFEST, SIGNATURE, SIGNATURE_NAMESPACE, sign_manifest, write_evidence
    from auditor.service.reports import iso

    if sign_key is not None:
        try:
            files[SIGNATURE] = sign_manifest(files[MANIFEST], sign_key)
        except SigningError as exc:
            fail_usage(str(exc))
    try:
        write_evidence(files, out)
    except FolderNotEmptyError as exc:  # something appeared there while the database was read
        fail_usage(str(exc))
    except OSError as exc:
        fail_usage(f"cannot write {out}: {exc.strerror or exc}")
    verify = f"cd {out} && sha256sum -c {MANIFEST}"
    if sign_key is not None:
        verify += (f" && ssh-keygen -Y verify -f ALLOWED_SIGNERS -I IDENTITY -n {SIGNATURE_NAMESPACE} "
                   f"-s {SIGNATURE} < {MANIFEST}")
    _out().print(f"wrote {len(files)} files to {out} for {iso(period.start)} – {iso(period.end)}; verify with: "
                 f"{verify}", markup=False, soft_wrap=True)


async def _print_report(services: Any, fmt: str) -> None:
    from auditor.service.queries import read_report

    show_report(await read_report(services), fmt)


def show_report(report: dict[str, Any], fmt: str) -> None:
    """Prints the current report in the chosen format."""
    if fmt == "json":
        click.echo(json.dumps(report, indent=2))
    elif fmt == "csv":
        from auditor.render.report import report_csv

        click.echo(report_csv(report), nl=False)
    elif fmt == "markdown":
        from auditor.render.report import report_markdown

        click.echo(report_markdown(report))
    else:
        print_report_table(report)


def print_report_table(report: dict[str, Any]) -> None:
    """Prints the report as rich tables."""
    console = _out()
    s = report["summary"]
    run = report["last_run"]
    head = (f"last run {run['id']} {run['status']} at {run['finished_at'] or '(cut short)'} "
            f"({run['api_requests']} requests)"
            if run else "no audit has run yet")
    console.print(f"[bold]Compliance report[/bold] generated {escape(report['generated_at'])}; {escape(head)}")
    console.print(f"disks {s['disks_total']}: [green]{s['compliant']} compliant[/green], "
                  f"[red]{s['noncompliant']} noncompliant[/red], [yellow]{s['unknown']} unknown[/yellow]"
                  + (f", {s['exempt']} exempt" if s.get("exempt") else "")
                  + f"; {s['open_findings']} open findings, {s['waived_findings']} waived")
    tiers = {name: n for name, n in s.get("by_tier", {}).items() if name}
    if tiers:
        console.print("tiers: " + ", ".join(f"{name} {n}" for name, n in tiers.items())
                      + f" (rules defaults: {s['by_tier'].get('', 0)})", markup=False)
    for d in report["disks"]:
        if d.get("exemption"):
            console.print(f"exempt: {d['disk_id']} (tier {d['tier']}): {d['exemption']['reason']}", markup=False)
    if report["findings"]:
        order = {sev: i for i, sev in enumerate(reversed(SEVERITY_CHOICES))}
        print_table(console, ("severity", "rule", "disk", "policy", "status", "message"), [
            (f["severity"], f["rule"], f["disk_id"], f["policy_id"] or "-", f["status"], f["message"])
            for f in sorted(report["findings"], key=lambda f: (order[f["severity"]], f["rule"], f["disk_id"]))
        ], fold=True)
    unknown = [d for d in report["disks"] if d["status"] == DiskStatus.UNKNOWN]
    for d in unknown:
        err = d.get("error") or {}
        console.print(f"[yellow]unknown[/yellow] {escape(d['disk_id'])}: {escape(str(err.get('code')))}: "
                      f"{escape(str(err.get('message')))}")
    for p in report.get("waiver_problems", []):
        console.print(f"warning: waivers[{p['index']}] does not apply: {p['problem']}", markup=False)
    for w in report.get("expiring_waivers", []):
        console.print(f"waiver expiring {w['expires']}: {w['rule']} on {w['disk_id']} ({w['owner']})", markup=False)
    for d in report.get("drift", [])[:20]:
        console.print(printable(f"drift {d['at']} {d['disk_id']} {d['policy_id']}: {d['kind']} {d['before']} -> "
                                f"{d['after']}"), markup=False)


@main.command("findings")
@config_option
@click.option("--status", type=click.Choice([*get_args(FindingStatusName), "all"]), default="open",
              help="Which findings to list.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", help="Output format.")
def findings_cmd(config_path: Path | None, status: str, fmt: str) -> None:
    """List findings, including resolved ones with their resolved_at."""
    settings = load(config_path)
    setup_logs(settings)
    from auditor.domain.listings import ALL_STATUSES

    statuses = ALL_STATUSES if status == "all" else (status,)
    # Read as `auditor report` reads: sqlite3 or psycopg, without the ORM or asyncio (a one-shot command).
    from auditor.service.queries import current_findings
    from auditor.service.reports import finding_json

    items = [finding_json(f, with_resolution=True)
             for f in run_guarded(lambda: current_findings(settings, statuses=statuses))]
    if fmt == "json":
        click.echo(json.dumps({"findings": items}, indent=2))
        return
    print_table(_out(), ("status", "severity", "rule", "disk", "policy", "opened", "resolved", "message"), [
        (f["status"], f["severity"], f["rule"], f["disk_id"], f["policy_id"] or "-", f["opened_at"],
         f["resolved_at"] or "-", f["message"]) for f in items
    ], fold=True)


@main.command("history")
@config_option
@click.argument("disk_id")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", help="Output format.")
def history_cmd(config_path: Path | None, disk_id: str, fmt: str) -> None:
    """Show a disk's policy snapshots, observed runs, drift events and findings over time."""
    settings = load(config_path)
    setup_logs(settings)

    # Read as `auditor report` reads: sqlite3 or psycopg, without the ORM or asyncio (a one-shot command).
    from auditor.service.queries import current_disk_detail

    detail = run_guarded(lambda: current_disk_detail(settings, disk_id))
    if detail is None:
        _err().print(f"disk {disk_id} is not known to the auditor", markup=False)
        sys.exit(EXIT_INCOMPLETE)
    if fmt == "json":
        click.echo(json.dumps(detail, indent=2))
        return
    console = _out()
    d = detail["disk"]
    console.print(f"[bold]{escape(d['disk_id'])}[/bold] {escape(d['name'] or '')} (status {escape(detail['status'])}, "
                  f"source {escape(str(d['source']))})")
    print_table(console, ("policy", "retention", "interval", "target", "from", "to"), [
        (p["policy_id"], str(p["retention"]), p["interval"], f"{p['target_type']}:{p['target_id']}",
         p["valid_from"], p["valid_to"] or "now") for p in detail["snapshots"]
    ], title="policy snapshots")
    rpo = d["observed_rpo_seconds"]
    console.print(f"observed runs: last {d['last_invocation_at'] or '-'}, observed RPO (30 days) "
                  f"{'-' if rpo is None else format_duration(rpo, style='report')}, since {d['observed_since'] or '-'}",
                  markup=False)
    if detail["invocations"]:
        print_table(console, ("policy", "due", "next planned", "step", "seen at"), [
            (i["policy_id"], i["due_at"], i["next_at"], format_duration(i["step_seconds"], style="report"),
             i["observed_at"]) for i in detail["invocations"]
        ], title="observed runs")
    for e in detail["drift"]:
        console.print(printable(f"drift {e['at']} {e['policy_id']}: {e['kind']} {e['before']} -> {e['after']}"),
                      markup=False)
    for e in detail["finding_events"]:
        console.print(f"finding {e['at']} {e['fingerprint']}: {e['kind']}", markup=False)
    for f in detail["findings"]:
        console.print(printable(f"{f['status']:>8} {f['severity']:>8} {f['rule']} {f['policy_id'] or '-'}: "
                                f"{f['message']}"),
                      markup=False)
    for r in detail.get("remediations", []):
        req = r["request"]
        code = f" {r['error_code']}" if r["error_code"] else ""
        errors = f" [{'; '.join(r['errors'])}]" if r["errors"] else ""
        console.print(printable(f"remediation {r['requested_at']} {r['kind']} {r['status']}{code}{errors} by "
                                f"{r['actor']['user']}@{r['actor']['host']}: {req['method']} {req['path']} "
                                f"{json.dumps(req['body'], sort_keys=True)}"
                                + (f" ({r['reason']})" if r["reason"] else "")), markup=False)


# ---- remediation ----------------------------------------------------------------------------------------


@main.command("plan")
@config_option
@click.option("--tier", "tier", default=None, metavar="NAME", help="Only the disks of this [[tiers]] entry.")
@click.option("--rule", "rule", default=None, metavar="ID", help="Only findings of this rule id.")
@click.option("--disk", "disk", default=None, metavar="DISK_ID", help="Only this disk.")
@click.option("--out", "out", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Write the plan (JSON, with its hash) to FILE for `auditor apply FILE`.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", help="Output format.")
def plan_cmd(config_path: Path | None, tier: str | None, rule: str | None, disk: str | None, out: Path | None,
             fmt: str) -> None:
    """Propose the Katapult changes that fix the open findings, from the last audit (reads the database only;
    never writes to Katapult).

    At most one change per disk: create a policy from the disk's tier template on an unprotected disk (or its VM),
    raise a retention up to the template's, run a policy at the template's interval; every other open finding is
    listed as manual with the reason. Exempt disks and disks with a waived finding are never changed, nor a policy
    on their VM (a create on such a VM is made on the disk itself). The plan expires after remediation.plan_ttl.
    Exit 0 planned; 2 a bad option (a tier or rule id that does not exist, a disk the auditor has never seen) or
    the database; 78 configuration ([remediation] disabled or a template that would itself be a finding).
    """
    settings = load(config_path)
    from auditor.domain.remediation import PlanFilter
    from auditor.errors import PlanFilterError, UnknownDiskError
    from auditor.service.remediation import check_filter, check_remediation

    only = PlanFilter(tier=tier, rule=rule, disk=disk)
    try:
        check_filter(settings, only)
    except PlanFilterError as exc:
        fail_usage(f"--{exc.option}: {exc}")
    setup_logs(settings)
    try:
        check_remediation(settings)
    except ConfigError as err:
        fail_config(err)

    async def make() -> dict[str, Any] | UnknownDiskError:
        from auditor.service import open_services
        from auditor.service.remediation import make_plan

        async with open_services(settings, katapult=False, migrate=False) as services:
            try:
                return await make_plan(services, only=only)
            except UnknownDiskError as exc:
                return exc

    document = run_async(make())
    if isinstance(document, UnknownDiskError):
        fail_usage(f"--disk: {document}")
        raise AssertionError("unreachable")
    text = json.dumps(document, indent=2, sort_keys=True)
    if out is not None:
        try:
            out.write_text(text + "\n", encoding="utf-8")
        except OSError as exc:
            fail_usage(f"cannot write {out}: {exc.strerror or exc}")
    if fmt == "json":
        click.echo(text)
    else:
        print_plan(document)
    if out is not None:
        (_err() if fmt == "json" else _out()).print(
            f"plan written to {out} (expires {document['expires_at']}, {document['hash']}); review it, then: "
            f"auditor apply {out}", markup=False, soft_wrap=True)


def print_plan(document: dict[str, Any]) -> None:
    """Prints a plan's changes and manual items as tables, under a summary counted from them (a plan file's own
    `summary` is not shown: an edited plan could say anything there)."""
    from auditor.domain.remediation import summary_of

    console = _out()
    s = summary_of(document["changes"], document["manual"])
    console.print(f"plan: {s['changes']} change(s), {s['manual']} finding(s) left to a person; created "
                  f"{document['created_at']}, expires {document['expires_at']}", markup=False)
    if document["changes"]:
        print_table(console, ("disk", "change", "request", "before", "after", "fixes"), [
            (c["disk_id"] + (f" (+{len(c['disks']) - 1})" if len(c["disks"]) > 1 else ""), c["kind"],
             f"{c['request']['method']} {c['request']['path']} {json.dumps(c['request']['body'], sort_keys=True)}",
             _setting_text(c["before"]), _setting_text(c["after"]),
             str(len(c["fixes"]))) for c in document["changes"]], title="changes", fold=True)
        for c in document["changes"]:
            if c.get("note"):
                console.print(printable(f"note on {c['disk_id']}: {c['note']}"), markup=False, soft_wrap=True)
    if document["manual"]:
        print_table(console, ("disk", "rule", "policy", "manual: reason"), [
            (m["disk_id"], m["rule"], m["policy_id"] or "-", m["reason"]) for m in document["manual"]],
            title="manual", fold=True)


def _setting_text(state: dict[str, Any]) -> str:
    """Returns a change's before or after state in a few words (the plan file holds it exactly)."""
    if "policies" in state:
        made = state["policies"]
        if not made:
            return "no policy"
        p = made[0]
        return f"retention {p['retention']} {p['interval']} on {p['target']['type']} {p['target']['id']}"
    return f"{state.get('policy_id')}: retention {state.get('retention')} {state.get('interval')}"


@main.command("apply")
@config_option
@click.argument("plan_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--yes", is_flag=True, help="Apply without asking.")
def apply_cmd(config_path: Path | None, plan_file: Path, yes: bool) -> None:
    """Apply a saved plan (`auditor plan --out FILE`) and nothing else, then re-audit the touched disks.

    Shows the plan's summary and asks before writing (unless --yes). Each change is re-read from Katapult first and
    skipped as stale when the facts it relies on no longer hold; nothing is deleted, no retention lowered, no exempt
    or waived disk touched; at most remediation.max_changes writes. Uses the write credential
    (katapult.write_token_file or env KATAPULT_WRITE_TOKEN), which no other command loads. Every outcome is recorded
    (see `auditor history DISK`). Exit 0 every change applied; 1 some stale, refused, failed or not attempted (each
    named), or the question was not answered yes (declined, or stdin closed: "not applied: ...", nothing written);
    2 the plan is invalid, expired (its expires_at or created_at + remediation.plan_ttl, whichever is sooner), made
    in the future, of an unknown format_version or edited, no write credential, or Katapult unreachable; 78 config
    error.
    """
    settings = load(config_path)
    try:
        read_token = settings.katapult.token()
    except ConfigError as err:
        fail_config(err)
        raise AssertionError("unreachable") from None
    from auditor.service.remediation import check_remediation

    try:
        check_remediation(settings)
    except ConfigError as err:
        fail_config(err)
    try:
        document = json.loads(plan_file.read_text(encoding="utf-8"))
    except OSError as exc:
        fail_usage(f"cannot read the plan {plan_file}: {exc.strerror or exc}")
    except (ValueError, UnicodeDecodeError):
        fail_usage(f"{plan_file} is not a plan (not JSON); make one with `auditor plan --out FILE`")
    from auditor.errors import PlanError
    from auditor.service.clock import utcnow
    from auditor.service.remediation import verify_plan

    try:
        verify_plan(document, now=utcnow(), ttl=settings.remediation.plan_ttl)
    except PlanError as exc:
        fail_usage(f"plan {plan_file}: {exc}")
    try:
        write_token = settings.katapult.write_token()
    except ConfigError as err:
        fail_usage(f"no write credential: {err.problems[0]}")
        raise AssertionError("unreachable") from None
    setup_logs(settings, extra_secrets=(read_token.get_secret_value(), write_token.get_secret_value()))
    print_plan(document)
    if not document["changes"]:
        _out().print("nothing to apply", markup=False)
        sys.exit(EXIT_OK)
    if not yes:
        try:
            confirmed = click.confirm(f"Apply {len(document['changes'])} change(s) to Katapult?", default=False)
        except click.Abort:  # stdin closed (or Ctrl-C) at the question: click would print "Aborted!"
            click.echo()  # ends the question's line
            _err().print("not applied: no answer to the question (stdin closed); answer yes, or pass --yes",
                         markup=False)
            sys.exit(EXIT_FINDINGS)
        if not confirmed:
            _err().print("not applied: the answer was not yes; answer yes, or pass --yes", markup=False)
            sys.exit(EXIT_FINDINGS)
    outcome = run_async(_apply(settings, document, write_token.get_secret_value()))
    console = _out()
    for r in outcome.results:
        c = r.change
        code = f" {r.error_code}" if r.error_code else ""
        errors = f" [{'; '.join(r.errors)}]" if r.errors else ""
        console.print(printable(f"{r.status.value}{code}{errors}: {c['kind']} on {', '.join(c['disks'])}"
                                + (f": {r.reason}" if r.reason and r.status.value != "refused" else "")),
                      markup=False)
    if outcome.unreachable is not None:
        _err().print(f"error: {outcome.unreachable}; the changes above not attempted were left for the next apply",
                     markup=False)
        sys.exit(EXIT_INCOMPLETE)
    if outcome.reaudit is not None:
        run = outcome.reaudit
        console.print(f"re-audit run {run.run_id}: {run.status.value}, {run.resolved} finding(s) resolved, "
                      f"{run.opened} opened", markup=False)
        for disk_id, before in outcome.before.items():
            after = outcome.after.get(disk_id, {})
            console.print(printable(f"{disk_id}: before {', '.join(before['open_findings']) or 'no open finding'}"
                                    f" -> after {', '.join(after.get('open_findings', [])) or 'no open finding'}"
                                    f"; policies now {', '.join(after.get('policies', [])) or 'none'}"),
                          markup=False)
    sys.exit(EXIT_OK if outcome.all_applied else EXIT_FINDINGS)


async def _apply(settings: Settings, document: dict[str, Any], write_token: str) -> Any:
    from auditor.service import open_services
    from auditor.service.remediation import Actor, apply_plan
    from auditor.service.services import client_from

    async with open_services(settings) as services:
        assert services.client is not None
        async with client_from(settings, token=write_token, limiter=services.client.limiter) as writer:
            return await apply_plan(services, document=document, writer=writer, actor=Actor.current())


# ---- db -------------------------------------------------------------------------------------------------


@main.group("db")
def db_group() -> None:
    """Database schema management (Alembic)."""


@db_group.command("upgrade")
@config_option
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def db_upgrade(config_path: Path | None, revision: str) -> None:
    """Apply migrations up to a revision."""
    settings = load(config_path)
    setup_logs(settings)
    from auditor.store import engine

    url = settings.database.url.get_secret_value()
    run_async(engine.upgrade(url, revision))
    current, head = run_async(engine.current_revision(url))
    _out().print(f"database {engine.safe_url(url)} at revision {current} (head {head})", markup=False)


@db_group.command("current")
@config_option
def db_current(config_path: Path | None) -> None:
    """Print the database's schema revision and the code's head revision."""
    settings = load(config_path)
    from auditor.store import engine

    url = settings.database.url.get_secret_value()
    current, head = run_async(engine.current_revision(url))
    _out().print(f"current {current or 'none'}; head {head}", markup=False)
    problem = engine.schema_error(url, current)
    if problem is not None and current is not None:  # behind (an upgrade fixes it) or newer (a newer auditor wrote it)
        _err().print(str(problem), markup=False)
    sys.exit(EXIT_OK if current == head else EXIT_INCOMPLETE)


# ---- notify ----------------------------------------------------------------------------------------------


@main.group("notify")
def notify_group() -> None:
    """Alert channels."""


MAX_HOLD = timedelta(hours=1)


def _hold(_ctx: click.Context, _param: click.Parameter, value: str) -> timedelta:
    """Returns --hold as a timedelta (0 up to an hour), or a one-line usage error."""
    try:
        hold = parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if hold > MAX_HOLD:
        raise click.BadParameter(f"at most {format_duration(MAX_HOLD)}")
    return hold


@notify_group.command("test")
@config_option
@click.option("--notifier", "name", default=None, help="Only this notifier (by name).")
@click.option("--hold", "hold", default="30s", show_default=True, metavar="DURATION", callback=_hold,
              help="On Alertmanager and PagerDuty: how long the test alert stays firing before it is resolved, so "
                   "it passes through routing and group_wait (Alertmanager's default group_wait is 30s) and reaches "
                   "the on-call receiver; 0 resolves it at once. At most 1h.")
def notify_test(config_path: Path | None, name: str | None, hold: timedelta) -> None:
    """Send a clearly-marked test message to each configured notifier and report the result.

    On Alertmanager and PagerDuty the test alert fires, is held for --hold, then resolved (Ctrl-C resolves it at
    once, prints each channel's result and exits 130). Exit 0 when every channel accepted it, 2 otherwise.
    """
    settings = load(config_path)
    setup_logs(settings)
    chosen = [n for n in settings.notifiers if name is None or n.name == name]
    if not chosen:
        _err().print(f"no notifier named {name!r}" if name else "no notifiers configured ([[notifiers]])",
                     markup=False)
        sys.exit(EXIT_CONFIG)
    held = format_duration(hold)

    async def send_test_messages() -> dict[str, tuple[str, bool]]:
        import asyncio

        from auditor.domain.alerts import STATEFUL_KINDS
        from auditor.errors import NotifyError
        from auditor.notify.dispatch import Dispatcher
        from auditor.service.alerts import resolved_test_notification, test_notification
        from auditor.service.clock import utcnow

        results: dict[str, tuple[str, bool]] = {}
        firing = []  # (settings, test notification, result text) of the stateful receivers that took the alert
        async with Dispatcher() as dispatcher:
            for n in chosen:
                now = utcnow()
                test = test_notification(n.name, now=now)
                try:
                    r = await dispatcher.send(test, n, now=now)
                except NotifyError as exc:
                    kind = "permanent" if exc.permanent else "temporary"
                    results[n.name] = (f"FAILED ({kind}): {exc}", False)
                    continue
                text = f"ok (HTTP {r.status_code})" if r.status_code else f"ok ({r.detail})"
                if getattr(n, "kind", None) in STATEFUL_KINDS:
                    firing.append((n, test, text))
                else:
                    results[n.name] = (text, True)
            interrupted = False
            try:
                if firing and hold:
                    # Alertmanager routes a new alert only after its group_wait: resolved at once, it never
                    # reaches the on-call receiver. Holding it firing lets it through.
                    names = ", ".join(n.name for n, _, _ in firing)
                    _out().print(f"holding the test alert firing on {names} for {held} (so it passes routing and "
                                 "group_wait), then resolving it…", markup=False)
                    try:
                        await asyncio.sleep(hold.total_seconds())
                    except asyncio.CancelledError:  # Ctrl-C: resolve now, say what each channel did, exit 130
                        interrupted = True
                        raise
            finally:
                # Alertmanager and PagerDuty keep the test alert open (12h, until acknowledged): resolve it, with
                # the same fingerprint (Alertmanager's label set, PagerDuty's dedup_key), also after Ctrl-C.
                for n, test, text in firing:
                    now = utcnow()
                    done = ("sent, resolved early (interrupted)" if interrupted
                            else f"sent, held {held} and resolved" if hold else "sent and resolved")
                    try:
                        await dispatcher.send(resolved_test_notification(test, now=now), n, now=now)
                    except NotifyError as exc:
                        kind = "permanent" if exc.permanent else "temporary"
                        results[n.name] = (f"{text}, sent but NOT resolved ({kind}): {exc}; resolve the test "
                                           "alert by hand", False)
                        continue
                    results[n.name] = (f"{text}, {done}", True)
                if interrupted:
                    print_results(results)
        return results

    def print_results(results: dict[str, tuple[str, bool]]) -> None:
        console = _out()
        for n in chosen:
            text, _ = results[n.name]
            console.print(f"{n.name} [{n.kind}]: {text}", markup=False)

    results = run_async(send_test_messages())
    print_results(results)
    sys.exit(EXIT_OK if all(ok for _, ok in results.values()) else EXIT_INCOMPLETE)


# ---- fake Katapult and demo ----------------------------------------------------------------------------


@main.command("fake-katapult")
@click.option("--host", default="127.0.0.1", show_default=True, help="Listen address (loopback).")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535),
              help="Listen port (0 = any free port).")
@click.option("--fleet", "fleet_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Fleet description (TOML or JSON). Default: the demo fleet.")
def fake_katapult(host: str, port: int, fleet_path: Path | None) -> None:
    """Serve the built-in fake Katapult API on a loopback port (token: fake-token)."""
    from auditor.fake.__main__ import main as fake_main

    args = ["--host", host, "--port", str(port)]
    args += ["--fleet", str(fleet_path)] if fleet_path else ["--demo"]
    sys.exit(fake_main(args))


@main.command("demo")
@click.option("--once", is_flag=True, help="Audit once, print the report and exit.")
@click.option("--db", "db_path", default="demo.db", show_default=True, help="SQLite file for the demo.")
@click.option("--listen", default="127.0.0.1:8080", show_default=True, help="Where the demo daemon's API listens.")
def demo_cmd(once: bool, db_path: str, listen: str) -> None:
    """Audit the built-in fake Katapult's demo fleet on a local SQLite file and show the report."""
    from auditor.demo import demo_settings, run_demo

    settings = demo_settings(db_path=db_path, listen=listen)
    setup_logs(settings, extra_secrets=("fake-token",))

    def show(outcome: Any, report: dict[str, Any]) -> None:
        print_outcome(outcome, fmt="table")
        print_report_table(report)

    from auditor.daemon import serve

    sys.exit(run_async(run_demo(settings, once=once, show=show, serve=serve)))


if __name__ == "__main__":
    main()
