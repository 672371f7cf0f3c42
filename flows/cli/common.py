"""What every command of the ``herald`` command line shares: the Typer apps, consoles,
options and opening the workspace.

The ``herald`` command line.

Each command is thin: it opens the workspace, calls the engine, prints. A HeraldError
becomes one red line on stderr and exit status 1 (a traceback only with ``--debug``);
usage errors exit 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from herald.core.errors import HeraldError, did_you_mean
from herald.core.files import file_in_the_way
from herald.core.spec import Param
from herald.core.workspace import Workspace

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Herald: SQL segments, Jinja messages, contact policy, Prefect flows.")
audience_app = typer.Typer(no_args_is_help=True, help="Build, list, inspect and export "
                           "audience packages.")
suppress_app = typer.Typer(no_args_is_help=True, help="The suppression list.")
app.add_typer(audience_app, name="audience")
app.add_typer(suppress_app, name="suppress")
journey_app = typer.Typer(no_args_is_help=True, help="Journeys: advance them, see where "
                          "everyone is, one person's path, results.")
app.add_typer(journey_app, name="journey")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class State:
    workspace: str | None = None
    debug: bool = False
    opened: list[Workspace] = []  # closed when the command ends


state = State()

WorkspaceOpt = Annotated[str | None, typer.Option(
    "--workspace", "-w", envvar="HERALD_WORKSPACE", help="Workspace folder (default: .)")]
ParamOpt = Annotated[list[str] | None, typer.Option(
    "--param", "-p", help="Segment parameter NAME=VALUE (repeatable)")]
NowOpt = Annotated[str | None, typer.Option(
    "--now", envvar="HERALD_NOW", metavar="TIME",
    help="Set Herald's clock to this ISO 8601 time for the command (a rehearsal), "
    "e.g. 2026-12-01T10:00+08:00; it runs on from there. Default: the real time")]


def set_now(value: str | None) -> None:
    """``--now``: set Herald's one clock (run keys, caps, quiet hours, windows)."""
    if value is None:
        return
    from herald.core import clock

    try:
        clock.set_to(clock.parse(value))
    except ValueError as exc:
        # the value may come from the environment rather than the command line
        hint = (f"{clock.ENV} (the environment)" if value == os.environ.get(clock.ENV)
                else "--now")
        raise typer.BadParameter(str(exc), param_hint=hint) from None


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        out.print(f"herald {version('herald')}")
        raise typer.Exit()


@app.callback()
def _root(workspace: WorkspaceOpt = None,
          debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks")] = False,
          now: NowOpt = None,
          show_version: Annotated[bool, typer.Option(
              "--version", callback=_version, is_eager=True,
              help="Show Herald's version and exit")] = False) -> None:
    state.workspace = workspace
    state.debug = debug
    set_now(now)


def open_workspace(workspace: str | None) -> Workspace:
    ws = Workspace.open(workspace or state.workspace)
    state.opened.append(ws)
    return ws


def parse_params(items: list[str] | None) -> dict[str, Param]:
    """``-p days=30``: values are parsed like YAML scalars (30 is a number, "30" text), and
    ``-p ids=[1,2]`` is a list (for ``IN :ids``), as in a flow's ``params``."""
    from herald.core.errors import ConfigError
    from herald.core.fields import check_param
    from herald.core.yamlio import parse_yaml

    params: dict[str, Param] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise typer.BadParameter(f"'{item}' is not NAME=VALUE", param_hint="-p")
        try:
            params[name.strip()] = check_param(
                parse_yaml(value, "-p", {}).data if value.strip() else "")
        except (ConfigError, ValueError) as exc:
            why = exc.problems[0].message if isinstance(exc, ConfigError) else str(exc)
            raise typer.BadParameter(f"{name.strip()}: {why} (for the text itself, quote "
                                     f"it: -p {name.strip()}='\"{value}\"')",
                                     param_hint="-p") from None
    return params


def require_key(value: str, hint: str) -> None:
    """A recipient key given on the command line: an empty one names nobody."""
    if not value.strip():
        raise typer.BadParameter("an empty key names nobody", param_hint=hint)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n")


def check_channel(ws: Workspace, channel: str | None, where: str = "--channel") -> None:
    if channel and channel != "*" and channel not in ws.channels:
        raise HeraldError(f"{where}: unknown channel '{channel}'"
                          f"{did_you_mean(channel, ws.channels)} "
                          f"(configured: {', '.join(ws.channels)})")




def output_folder(option: str, folder: Path) -> None:
    """Check, before any work, that an option's folder can take the files it names."""
    if folder.exists() and not folder.is_dir():
        raise HeraldError(f"{option} {folder}: is a file, not a folder")


@contextmanager
def writing_output(option: str, path: Path) -> Iterator[None]:
    """A file or folder an option names that cannot be written: one line naming it."""
    try:
        yield
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        if exc.filename and str(exc.filename) != str(path):
            why = f"{exc.filename}: {why}"
        blocking = file_in_the_way(path)
        if blocking is not None:  # mkdir says "File exists", open "Not a directory"
            why = f"{blocking} is a file, not a folder"
        raise HeraldError(f"{option} {path}: cannot write: {why}") from None


def page_target(to: Path | None, default: Path, name: str) -> Path:
    """Where a report page goes: ``default`` without ``--to``; into ``to`` as ``name``
    when it is a folder that exists; else ``to`` itself, which must name an .html file
    (``--to config/herald.yaml`` replaced the workspace's configuration with the page,
    and a folder that does not exist yet became a file)."""
    if to is None:
        return default
    if to.is_dir():
        return to / name
    if to.suffix.lower() not in (".html", ".htm"):
        raise HeraldError(f"--to {to}: neither a folder that exists nor a file name ending "
                          "in .html (create the folder first to write into it)")
    return to


def write_page(option: str, path: Path, text: str) -> None:
    """Write a report page (its folders made), or say in one line why it cannot be."""
    with writing_output(option, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def mask(value: str) -> str:
    """Show enough of an address to recognise it, not enough to use it."""
    if "@" in value:
        name, _, domain = value.partition("@")
        return f"{name[:1]}***@{domain}"
    return f"{value[:3]}***{value[-2:]}" if len(value) > 6 else "***"




ChannelOpt = Annotated[str | None, typer.Option("--channel", help="Only this channel "
                                                "(default: every channel)")]


EPHEMERAL_STARTUP_SECONDS = 120


def prefect_env() -> None:
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "herald")
    # herald's loggers also speak outside flow runs (a chunk's dispatcher in a worker
    # thread, a command tidying up after a killed run): no warning for those records
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server `herald run` starts without PREFECT_API_URL took 15 s to
    # answer on a loaded 2-core machine and, once, more than Prefect's default wait of
    # 20 s: the run then failed before sending anything. Wait longer before giving up.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
                          str(EPHEMERAL_STARTUP_SECONDS))


class _HeraldOnly(logging.Filter):
    """Lets Herald's own records through a Prefect console handler: not those Prefect's
    code writes (through its run loggers too), nor Herald's marked ``ui_only``."""

    def __init__(self, prefect_code: str) -> None:
        super().__init__()
        self.prefect_code = prefect_code

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.pathname.startswith(self.prefect_code)
                    or getattr(record, "ui_only", False))


class _NotReplayed(logging.Filter):
    """Keeps a record off the console a second time: what an early audience build logged
    (shown as it happened) replayed into its task run's logs for the Prefect UI."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "replayed", False)


def prefect_console_handlers() -> set[logging.StreamHandler[Any]]:
    """Prefect's console handlers, on whichever loggers its logging setup put them (the
    root, Prefect's, and Herald's through PREFECT_LOGGING_EXTRA_LOGGERS)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(logging.getLogger(name)
                                      for name in list(logging.Logger.manager.loggerDict))]
    return {h for logger in loggers for h in logger.handlers
            if isinstance(h, PrefectConsoleHandler)}


def prefect_console(verbose: bool) -> None:
    """Without ``verbose``, Prefect's console handlers (set up when Prefect is imported)
    print Herald's records only: Prefect's own lines (task states, the temporary server,
    a failed task's "Finished in state Failed(...)" and its bare "NoneType: None") stay
    off stderr, and so do Herald's records that the command reports itself (marked
    ``extra={"ui_only": True}``: a failed build's reason, printed as the command's one
    error line). Herald's warnings (the main failure reasons, a failure-rate alert) are
    still printed. All of them reach the Prefect API and UI, through other handlers.
    With ``verbose``, everything is printed once (an early build's records replayed into
    its task run's logs are not printed again)."""
    import prefect

    prefect_code = os.path.dirname(prefect.__file__) + os.sep
    for handler in prefect_console_handlers():
        for found in [f for f in handler.filters if isinstance(f, _HeraldOnly | _NotReplayed)]:
            handler.removeFilter(found)
        handler.addFilter(_NotReplayed())
        if not verbose:
            handler.addFilter(_HeraldOnly(prefect_code))


def require_server(command: str) -> None:
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise HeraldError(f"herald {command} needs a Prefect server: start one with `prefect "
                          "server start` and set PREFECT_API_URL (e.g. "
                          "http://127.0.0.1:4200/api)")


def print_summary(summary: dict[str, Any]) -> None:
    package = summary["package"]
    title = "dry run" if summary.get("dry_run") else "run"
    out.print(f"[bold]{summary['flow']}[/] {title} {summary['run_id']} · run key "
              f"{summary['run_key']} · package {package['id']} ({package['size']} recipients)")
    shown = [s for s, n in summary["deliveries"].items() if n] or ["sent"]
    table = Table("channel", *shown)
    for channel, row in sorted(summary["by_channel"].items()):
        table.add_row(channel, *(str(row.get(s, 0)) for s in shown))
    table.add_row("[bold]all[/]", *(f"[bold]{summary['deliveries'].get(s, 0)}[/]"
                                    for s in shown))
    out.print(table)
    tiers = Table("tier", *shown)
    for tier, row in sorted(summary["by_tier"].items()):
        tiers.add_row(tier, *(str(row.get(s, 0)) for s in shown))
    out.print(tiers)
    if summary.get("dry_run") and summary.get("reasons"):
        reasons = Table("would be", "reason", "recipients")
        for r in summary["reasons"]:
            reasons.add_row(r["status"], r["reason"], str(r["count"]))
        out.print(reasons)
    if summary.get("deferred_until"):
        out.print(f"deferred (quiet hours or a provider's back-off) until "
                  f"{summary['deferred_until']}: a run with "
                  f"run key {summary['run_key']} after that time sends them")


