"""The ``herald`` command line.

Each command is thin: it opens the workspace, calls the engine, prints. A HeraldError
becomes one red line on stderr and exit status 1 (a traceback only with ``--debug``);
usage errors exit 2.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from herald.flows.errors import HeraldError, RunError
from herald.flows.spec import Scalar, TaskRunnerSpec
from herald.flows.workspace import Workspace

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
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


def _set_now(value: str | None) -> None:
    """``--now``: set Herald's one clock (run keys, caps, quiet hours, windows)."""
    if value is None:
        return
    from herald.core import clock

    try:
        clock.set_to(clock.parse(value))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--now") from None


@app.callback()
def _root(workspace: WorkspaceOpt = None,
          debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks")] = False,
          now: NowOpt = None) -> None:
    state.workspace = workspace
    state.debug = debug
    _set_now(now)


def _ws(workspace: str | None) -> Workspace:
    ws = Workspace.open(workspace or state.workspace)
    state.opened.append(ws)
    return ws


def _params(items: list[str] | None) -> dict[str, Scalar]:
    """``-p days=30``: values are parsed like YAML scalars (30 is a number, "30" text)."""
    from herald.flows.yamlio import parse_yaml

    params: dict[str, Scalar] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise typer.BadParameter(f"'{item}' is not NAME=VALUE", param_hint="-p")
        parsed = parse_yaml(value, "-p", {}).data if value.strip() else ""
        if isinstance(parsed, dict | list):
            parsed = value
        params[name.strip()] = parsed
    return params


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n")


# -- validate ---------------------------------------------------------------------------
@app.command()
def validate(flows: Annotated[list[str] | None, typer.Argument(help="Flows (default: all)")]
             = None, workspace: WorkspaceOpt = None) -> None:
    """Check flows, SQL, templates and channels; exit 1 listing every problem."""
    from herald.flows.spec import format_duration
    from herald.flows.validate import check_flow, templates_for
    from herald.journeys import load as journeys

    ws = _ws(workspace)
    journey_names = journeys.names(ws)
    names = [n for n in flows if n not in journey_names] if flows else ws.flow_names()
    chosen_journeys = [n for n in flows if n in journey_names] if flows else journey_names
    if not names and not chosen_journeys:
        raise HeraldError("no flows in config/flows/")
    templates = templates_for(ws)
    problems: list[str] = []
    for name in chosen_journeys:
        try:
            jc = journeys.check(ws, name, templates)
        except HeraldError as exc:
            problems.extend(str(exc).splitlines())
            err.print(f"[red]✗[/] journey {name}")
            continue
        spec = jc.loaded.spec
        out.print(f"[green]✓[/] journey {name}: entry {jc.segment.file} "
                  f"({len(jc.columns)} columns), {len(spec.steps)} steps, "
                  f"{jc.templates} templates"
                  + (f"; schedules: {'; '.join(x.describe() for x in spec.schedules)}"
                     if spec.schedules else ""))
    for name in names:
        try:
            checked = check_flow(ws, name, templates=templates)
        except HeraldError as exc:
            problems.extend(str(exc).splitlines())
            err.print(f"[red]✗[/] {name}")
            continue
        out.print(f"[green]✓[/] {name}: segment {checked.segment.file} "
                  f"({len(checked.columns)} columns), {len(checked.spec.tiers)} tiers, "
                  f"{checked.templates} templates, channels "
                  f"{', '.join(checked.spec.channel_names())}"
                  + (f"; schedules: {'; '.join(x.describe() for x in checked.spec.schedules)}"
                     if checked.spec.schedules else "")
                  + (f", conversion {conv.segment} within {format_duration(conv.window)}"
                     if (conv := checked.spec.conversion) else ""))
        for warning in checked.warnings:
            err.print(f"  [yellow]warning:[/] {warning}", highlight=False)
    if problems:
        for line in problems:
            err.print(f"  {line}", markup=False)
        raise typer.Exit(1)


# -- audience ---------------------------------------------------------------------------
@audience_app.command("build")
def audience_build(flow: str, param: ParamOpt = None, workspace: WorkspaceOpt = None,
                   as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Build and store an audience package for FLOW; print its summary."""
    from herald.audiences import store

    ws = _ws(workspace)
    spec = ws.flow(flow)
    package = store.build(ws, spec, store.load_segment(ws, spec, _params(param)))
    if as_json:
        _print_json(package.manifest())
    else:
        _show_package(package)


def _show_package(package: Any) -> None:
    out.print(f"[bold]{package.id}[/]  flow {package.flow}  segment {package.segment}")
    out.print(f"  built {package.built_at:%Y-%m-%d %H:%M:%S %Z}  size {package.size}  "
              f"params {json.dumps(package.params, ensure_ascii=False)}")
    out.print(f"  sql sha256 {package.sql_sha256}")
    table = Table("tier", "recipients", box=None, pad_edge=False)
    for tier, n in package.tiers.items():
        table.add_row(tier, str(n))
    out.print(table)


@audience_app.command("list")
def audience_list(flow: Annotated[str | None, typer.Option("--flow")] = None,
                  workspace: WorkspaceOpt = None,
                  as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List stored audience packages, newest first."""
    from herald.audiences import store

    packages = store.list_packages(_ws(workspace), flow)
    if as_json:
        _print_json([p.manifest() for p in packages])
        return
    table = Table("id", "flow", "segment", "size", "built", "sql sha256")
    for p in packages:
        table.add_row(p.id, p.flow, p.segment, str(p.size),
                      f"{p.built_at:%Y-%m-%d %H:%M}", p.sql_sha256[:12])
    out.print(table)


@audience_app.command("show")
def audience_show(package_id: str, workspace: WorkspaceOpt = None,
                  rows: Annotated[int, typer.Option("--rows", min=0)] = 5,
                  as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show a package's manifest and its first rows."""
    from herald.audiences import store

    ws = _ws(workspace)
    package = store.get(ws, package_id)
    sample = store.read(ws, package_id, 0, rows)
    if as_json:
        _print_json({**package.manifest(), "rows": [r.data for r in sample]})
        return
    _show_package(package)
    if sample:
        table = Table(*package.columns)
        for r in sample:
            table.add_row(*(_mask_cell(c, r.data.get(c)) for c in package.columns))
        out.print(table)


def _mask_cell(column: str, value: Any) -> str:
    from herald.channels.base import KINDS

    if value is None:
        return ""
    return mask(str(value)) if column in KINDS.values() else str(value)


def mask(value: str) -> str:
    """Show enough of an address to recognise it, not enough to use it."""
    if "@" in value:
        name, _, domain = value.partition("@")
        return f"{name[:1]}***@{domain}"
    return f"{value[:3]}***{value[-2:]}" if len(value) > 6 else "***"


@audience_app.command("export")
def audience_export(package_id: str,
                    to: Annotated[Path, typer.Option("--to", help="FILE.csv or FILE.parquet")],
                    workspace: WorkspaceOpt = None) -> None:
    """Export a package to CSV or Parquet."""
    from herald.audiences import store

    count = store.export(_ws(workspace), package_id, to)
    out.print(f"exported {count} rows of {package_id} to {to}")


# -- preview ----------------------------------------------------------------------------
@app.command()
def preview(flow: str, tier: Annotated[str | None, typer.Option("--tier")] = None,
            limit: Annotated[int, typer.Option("--limit", min=1, max=100)] = 3,
            param: ParamOpt = None, workspace: WorkspaceOpt = None,
            as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Render FLOW's messages for sample recipients; send nothing."""
    from herald.flows.preview import render_samples

    ws = _ws(workspace)
    samples = render_samples(ws, flow, _params(param), tier, limit)
    if as_json:
        _print_json(samples)
        return
    if not samples:
        out.print(f"no recipients{f' in tier {tier}' if tier else ''}")
    for s in samples:
        out.rule(f"{s['recipient']} · tier {s['tier']} · {s['channel'] or '-'}", style="dim")
        if s.get("error"):
            out.print(f"[red]{s['status']}[/]: {s['error']}", markup=True)
            continue
        out.print(f"to: {mask(s['address'])}", markup=False)
        if s.get("subject"):
            out.print(f"subject: {s['subject']}", markup=False)
        out.print(s["body"], markup=False)
        if s.get("html"):
            out.print(f"[dim](+ HTML part, {len(s['html'])} characters)[/]")


# -- run and report ---------------------------------------------------------------------
@app.command()
def run(flow: str, param: ParamOpt = None,
        run_key: Annotated[str | None, typer.Option("--run-key", help="Default: today's date "
                                                    "in the flow's time zone")] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Decide and render; send "
                                              "and record nothing")] = False,
        as_json: Annotated[bool, typer.Option("--json")] = False,
        task_runner: Annotated[str | None, typer.Option(
            "--task-runner", help="threads or dask (default: the workspace's task_runner)")
        ] = None,
        dask_address: Annotated[str | None, typer.Option(
            "--dask-address", help="Dask scheduler, e.g. tcp://10.0.0.5:8786 (implies "
            "--task-runner dask; default: a local cluster)")] = None,
        now: NowOpt = None,
        workspace: WorkspaceOpt = None) -> None:
    """Run FLOW once, now (by Herald's clock), as a Prefect flow run."""
    from herald.flows.engine import default_run_key

    _set_now(now)
    ws = _ws(workspace)
    params = _params(param)
    key = run_key or default_run_key(ws, flow)
    runner = _runner(ws, task_runner, dask_address)
    from herald.flows.validate import check_flow

    check_flow(ws, flow, params)  # fail fast, before Prefect starts
    _prefect_env()
    if as_json:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from herald.flows import campaign

    try:
        summary = campaign.run(ws, flow, params, key, dry_run, runner)
    except HeraldError:
        raise
    except Exception as exc:  # reported in one line; --debug shows the traceback
        if state.debug:
            raise
        raise RunError(f"run of {flow} failed: {type(exc).__name__}: {exc}") from exc
    if as_json:
        _print_json(summary)
    else:
        _print_summary(summary)


def _runner(ws: Workspace, kind: str | None, address: str | None) -> TaskRunnerSpec | None:
    if kind is None and address is None:
        return None
    if kind not in (None, "threads", "dask"):
        raise typer.BadParameter(f"'{kind}' (use threads or dask)", param_hint="--task-runner")
    if kind == "threads" and address:
        raise typer.BadParameter("--dask-address needs --task-runner dask",
                                 param_hint="--dask-address")
    if kind == "threads":
        return TaskRunnerSpec(type="threads")
    base = ws.config.task_runner
    return TaskRunnerSpec(type="dask", address=address or base.address, workers=base.workers)


def _prefect_env() -> None:
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "herald")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _require_server(command: str) -> None:
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise HeraldError(f"herald {command} needs a Prefect server: start one with `prefect "
                          "server start` and set PREFECT_API_URL (e.g. "
                          "http://127.0.0.1:4200/api)")


@app.command()
def serve(flows: Annotated[list[str] | None, typer.Argument(help="Flows (default: all)")]
          = None,
          limit: Annotated[int | None, typer.Option(
              "--limit", min=1, help="At most this many runs at once")] = None,
          workspace: WorkspaceOpt = None) -> None:
    """Serve flows as Prefect deployments, with their schedules, until stopped."""
    ws = _ws(workspace)
    _prefect_env()
    _require_server("serve")
    from herald.flows import deploy

    deploy.serve(ws, flows or None, limit)


@app.command()
def deploy(flows: Annotated[list[str] | None, typer.Argument(help="Flows (default: all)")]
           = None,
           pool: Annotated[str, typer.Option("--pool", help="Work pool whose workers run "
                                             "the flows")] = ...,  # type: ignore[assignment]
           workspace: WorkspaceOpt = None) -> None:
    """Register flows as deployments on the Prefect server, for a work pool's workers."""
    ws = _ws(workspace)
    _prefect_env()
    _require_server("deploy")
    from herald.flows import deploy as deploying

    names = flows or ws.flow_names()
    for name, deployment_id in zip(names, deploying.deploy(ws, pool, flows or None),
                                   strict=True):
        out.print(f"[green]✓[/] herald-campaign/{name} → pool {pool} ({deployment_id})")


def _print_summary(summary: dict[str, Any]) -> None:
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
        out.print(f"deferred by quiet hours until {summary['deferred_until']}: a run with "
                  f"run key {summary['run_key']} after that time sends them")


@app.command()
def report(run_id: Annotated[str | None, typer.Argument(
               metavar="[RUN]", help="Run id or flow name (default: the latest run)")] = None,
           workspace: WorkspaceOpt = None,
           as_json: Annotated[bool, typer.Option("--json")] = False,
           html: Annotated[bool, typer.Option("--html", help="Also write the HTML report "
                                              "(reports/FLOW/RUN_KEY.html)")] = False,
           to: Annotated[Path | None, typer.Option("--to", help="Write the HTML report "
                                                   "here (implies --html)")] = None,
           now: NowOpt = None) -> None:
    """Delivery report of a run from the ledger, with its conversions and uplift."""
    from herald.flows import results

    _set_now(now)
    ws = _ws(workspace)
    row = results.find_run(ws, run_id)
    data = results.run_report(ws, row)
    conversion, written = None, None
    if results.measures(ws, row):
        conversion = results.compute(ws, row.flow, row.run_key)
        data["conversion"] = conversion.to_dict()
        from herald.flows.writeback import write_back

        written = write_back(ws, row.flow, row.run_key, conversion)
    path = None
    if html or to:
        from herald.flows.htmlreport import render

        path = to or ws.root / "reports" / row.flow / f"{row.run_key}.html"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(data, conversion, results.timeline(ws, row.flow, row.run_key)),
                        encoding="utf-8")
    if as_json:
        _print_json({**data, **({"html": str(path)} if path else {})})
        return
    data.setdefault("package", {}).setdefault("size", "?")
    _print_summary(data)
    out.print(f"status: {row.status}" + (f" ({row.error})" if row.error else ""))
    if data["reasons"]:
        reasons = Table("status", "channel", "reason", "count")
        for r in data["reasons"]:
            reasons.add_row(r["status"], r["channel"] or "-", r["reason"] or "-",
                            str(r["count"]))
        out.print(reasons)
    if conversion is not None:
        _print_conversion(conversion)
    if written and ws.config.writeback:
        out.print(f"written back to source {ws.config.writeback.source}: "
                  f"{written['deliveries']} deliveries, {written['conversion_results']} "
                  "result rows")
    if path:
        out.print(f"HTML report: {path}")


def _print_conversion(report: Any) -> None:
    """Conversions in tables that fit 80 columns: one row per tier, then per channel."""
    from rich import box

    from herald.flows.spec import format_duration

    state = ("[green]closed[/]" if report.window_closed else
             f"[yellow]open until {report.closes_at:%Y-%m-%d %H:%M} UTC: partial figures[/]")
    out.print(f"\n[bold]conversions[/] ({escape(report.segment)}, "
              f"{format_duration(report.window)} after contact) · attribution window {state}")
    money = report.has_revenue and out.width >= 100
    for first, rows in (("tier", [report.total, *report.tiers.values()]),
                        ("channel", list(report.channels.values()))):
        table = Table(first, "contacted", "held out", "uplift", "95% CI", "relative",
                      *(["revenue"] if money else []), box=box.SIMPLE_HEAD, padding=(0, 1),
                      collapse_padding=True, pad_edge=False)
        for column in table.columns[1:]:
            column.justify = "right"
        for row in rows:
            found = row.uplift
            if found is None:
                why = (row.note or "").split(":")[0].replace("held-out recipients",
                                                             "holdout")
                cells = ["–", f"[dim]{why}[/]", "–"]
            else:
                style = "green" if found.low > 0 else "red" if found.high < 0 else "default"
                cells = [f"[{style}]{found.absolute * 100:+.1f} pp[/]",
                         f"[{found.low * 100:+.1f}, {found.high * 100:+.1f}]".replace(
                             "[", "\\["),
                         f"{found.relative * 100:+.0f}%" if found.relative is not None
                         else "–"]
            table.add_row(escape(row.name), _arm_cell(row.contacted), _arm_cell(row.held_out),
                          *cells, *([f"{row.contacted.revenue:,.2f}"] if money else []))
        out.print(table)
    total = report.total
    if report.has_revenue:
        out.print("revenue: contacted " + _money(total.contacted) + ", held out "
                  + _money(total.held_out))
    itt = report.intent_to_treat
    out.print(f"campaign arm {report.assigned.recipients:,} (contacted "
              f"{total.contacted.recipients:,}, not contacted {total.not_contacted:,}); "
              "intent to treat vs held out: "
              + (f"{itt.absolute * 100:+.2f} pp \\[{itt.low * 100:+.2f}, {itt.high * 100:+.2f}]"
                 if itt else "not measurable"))
    out.print("[dim]channels are not randomised: a channel's uplift compares its recipients "
              "with the whole held-out group[/]")


def _arm_cell(group: Any) -> str:
    if not group.recipients:
        return "0"
    return f"{group.converted:,}/{group.recipients:,} {group.converted / group.recipients:.1%}"


def _money(group: Any) -> str:
    each = f" ({group.revenue / group.recipients:,.2f} each)" if group.recipients else ""
    return f"{group.revenue:,.2f}{each}"


# -- suppression list -------------------------------------------------------------------
ChannelOpt = Annotated[str | None, typer.Option("--channel", help="Only this channel "
                                                "(default: every channel)")]


@suppress_app.command("add")
def suppress_add(values: list[str], channel: ChannelOpt = None,
                 reason: Annotated[str | None, typer.Option("--reason")] = None,
                 workspace: WorkspaceOpt = None) -> None:
    """Suppress addresses or recipient keys."""
    from herald.channels import ledger

    ws = _ws(workspace)
    _check_channel(ws, channel)
    added = ledger.suppress(ws.store, [(v, channel, reason) for v in values], "operator")
    out.print(f"{added} added, {len(values) - added} already suppressed")


@suppress_app.command("import")
def suppress_import(file: Path, channel: ChannelOpt = None,
                    reason: Annotated[str | None, typer.Option("--reason")] = None,
                    workspace: WorkspaceOpt = None) -> None:
    """Import a file: one value per line, or CSV with value[,channel[,reason]] columns."""
    from herald.channels import ledger

    ws = _ws(workspace)
    _check_channel(ws, channel)
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise HeraldError(f"{file}: file not found") from None
    except UnicodeDecodeError as exc:
        raise HeraldError(f"{file}: not valid UTF-8 (byte {exc.start})") from None
    items: list[tuple[str, str | None, str | None]] = []
    for number, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not row[0].strip() or row[0].startswith("#"):
            continue
        if number == 1 and row[0].strip().lower() in ("value", "address", "email", "phone"):
            continue  # a header line
        if len(row) > 3:
            raise HeraldError(f"{file}:{number}: expected value[,channel[,reason]]")
        row_channel = (row[1].strip() or None) if len(row) > 1 else channel
        _check_channel(ws, row_channel, f"{file}:{number}")
        items.append((row[0], row_channel,
                      (row[2].strip() or None) if len(row) > 2 else reason))
    added = ledger.suppress(ws.store, items, "import")
    out.print(f"{added} added, {len(items) - added} already suppressed")


@suppress_app.command("list")
def suppress_list(workspace: WorkspaceOpt = None,
                  as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the suppression list."""
    from herald.channels import ledger

    rows = ledger.list_suppressions(_ws(workspace).store)
    if as_json:
        _print_json([{"value": r.value, "channel": r.channel, "reason": r.reason,
                      "source": r.source, "created_at": r.created_at} for r in rows])
        return
    table = Table("value", "channel", "reason", "source", "added")
    for r in rows:
        table.add_row(mask(r.value), r.channel, r.reason or "", r.source,
                      f"{r.created_at:%Y-%m-%d %H:%M}")
    out.print(table)


@suppress_app.command("remove")
def suppress_remove(value: str, channel: ChannelOpt = None,
                    workspace: WorkspaceOpt = None) -> None:
    """Remove a value from the suppression list."""
    from herald.channels import ledger

    removed = ledger.unsuppress(_ws(workspace).store, value, channel)
    if not removed:
        raise HeraldError(f"'{mask(value)}' is not on the suppression list")
    out.print(f"{removed} removed")


def _check_channel(ws: Workspace, channel: str | None, where: str = "--channel") -> None:
    if channel and channel != "*" and channel not in ws.channels:
        raise HeraldError(f"{where}: unknown channel '{channel}' "
                          f"(configured: {', '.join(ws.channels)})")


# -- demo -------------------------------------------------------------------------------
@app.command("demo-data")
def demo_data(customers: Annotated[int, typer.Option(min=100)] = 20000,
              source: Annotated[str, typer.Option(help="Source to fill")] = "shop",
              simulate_response: Annotated[str | None, typer.Option(
                  "--simulate-response", metavar="RUN|FLOW|JOURNEY",
                  help="Instead: add the orders the run's customers place afterwards "
                  "(a simulation, more likely when contacted)")] = None,
              now: NowOpt = None,
              workspace: WorkspaceOpt = None) -> None:
    """(Re)build the deterministic demo shop database behind a source; its dates are
    relative to today by Herald's clock (``--now``)."""
    from herald.audiences.demo_shop import build_demo_shop
    from herald.flows.db import resolve_url

    _set_now(now)
    ws = _ws(workspace)
    if simulate_response:
        _simulate(ws, simulate_response)
        return
    if source not in ws.config.sources:
        raise HeraldError(f"unknown source '{source}'")
    url = resolve_url(ws.config.sources[source], ws.root)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    counts = build_demo_shop(url, customers=customers)
    out.print("demo shop built: " + ", ".join(f"{n} {t}" for t, n in counts.items()))


def _simulate(ws: Workspace, run: str) -> None:
    from herald.audiences.demo_shop import simulate_response
    from herald.flows import results
    from herald.flows.db import resolve_url
    from herald.journeys import load as journeys

    if run in journeys.names(ws):
        _simulate_journey(ws, run)
        return
    row = results.find_run(ws, run)
    flow = ws.flow(row.flow)
    source = flow.conversion_source()
    if flow.conversion is None or source is None:
        raise HeraldError(f"flow '{flow.name}' declares no conversion to simulate")
    contacts = ((c.recipient, c.tier, c.contacted, c.at)
                for c in results.contacts(ws, flow.name, row.run_key))
    done = simulate_response(resolve_url(ws.config.sources[source], ws.root), contacts,
                             flow.conversion.window)
    table = Table("tier", "group", "customers", "ordered", "chance", box=None)
    for s in done:
        table.add_row(s.tier, "contacted" if s.contacted else "held out", f"{s.recipients:,}",
                      f"{s.ordered:,}", f"{s.chance:.0%}")
    out.print(f"simulated orders after {flow.name} {row.run_key} (demo data, not a "
              "measurement):")
    out.print(table)


def _simulate_journey(ws: Workspace, name: str) -> None:
    """Orders after entering a journey: more likely for those not held out."""
    from herald.audiences.demo_shop import simulate_response
    from herald.flows.db import resolve_url
    from herald.journeys.report import contacts

    spec = journeys_spec(ws, name)
    if spec.goal is None:
        raise HeraldError(f"journey '{name}' declares no goal to simulate")
    source = spec.goal.source or spec.entry.source
    done = simulate_response(resolve_url(ws.config.sources[source], ws.root),
                             contacts(ws, name), spec.goal.window)
    table = Table("tier", "group", "customers", "ordered", "chance", box=None)
    for s in done:
        table.add_row(s.tier, "treated" if s.contacted else "held out", f"{s.recipients:,}",
                      f"{s.ordered:,}", f"{s.chance:.0%}")
    out.print(f"simulated orders after entering {name} (demo data, not a measurement):")
    out.print(table)


def journeys_spec(ws: Workspace, name: str) -> Any:
    from herald.journeys import load as journeys

    return journeys.load(ws, name).spec


# -- journeys ---------------------------------------------------------------------------
@journey_app.command("tick")
def journey_tick(name: str, workspace: WorkspaceOpt = None, now: NowOpt = None,
                 as_json: Annotated[bool, typer.Option("--json")] = False,
                 prefect: Annotated[bool, typer.Option(
                     "--prefect", help="Run the tick as a Prefect flow run")] = False,
                 enter: Annotated[bool, typer.Option(
                     "--enter/--no-enter", help="Run the entry segment first")] = True,
                 ) -> None:
    """Enter new recipients, then move everyone who can move now (one tick)."""
    _set_now(now)
    ws = _ws(workspace)
    if prefect:
        _prefect_env()
        from herald.journeys.prefect import run as run_tick

        summary = run_tick(ws, name, enter=enter)
    else:
        from herald.journeys.engine import tick_local

        summary = tick_local(ws, name, enter=enter)
    if as_json:
        _print_json(summary)
        return
    out.print(f"journey {name} tick {summary['tick']}: entered {summary['entered']}, "
              f"looked at {summary['claimed']} in {summary['chunks']} chunks, "
              f"{summary['duration_seconds']}s")
    for step, outcomes in summary["steps"].items():
        out.print(f"  {step}: " + ", ".join(f"{o}={n}" for o, n in outcomes.items()))
    if summary["exits"]:
        out.print("  exits: " + ", ".join(f"{r}={n}" for r, n in summary["exits"].items()))


@journey_app.command("status")
def journey_status(name: str, workspace: WorkspaceOpt = None,
                   as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """How many recipients are at each step, and why the others left."""
    from herald.journeys.report import status

    data = status(_ws(workspace), name)
    if as_json:
        _print_json(data)
        return
    out.print(f"journey {name} (version {data['version']}): {data['enrollments']:,} "
              f"enrollments of {data['recipients']:,} recipients; {data['live']:,} inside, "
              f"{data['completed']:,} completed, {sum(data['exited'].values()):,} exited")
    table = Table("step", "active", "waiting", box=None)
    for step, counts in data["at_step"].items():
        table.add_row(step, f"{counts['active']:,}", f"{counts['waiting']:,}")
    out.print(table)
    if data["exited"]:
        out.print("exited: " + ", ".join(f"{r} {n:,}" for r, n in data["exited"].items()))
    if len(data["live_by_version"]) > 1:
        out.print("inside by version: " + ", ".join(
            f"{v} {n:,}" for v, n in data["live_by_version"].items()))


@journey_app.command("show")
def journey_show(name: str, recipient: str, workspace: WorkspaceOpt = None,
                 as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """One recipient's path through a journey, step by step."""
    from herald.journeys.report import show

    data = show(_ws(workspace), name, recipient)
    if as_json:
        _print_json(data)
        return
    if not data["enrollments"]:
        out.print(f"{recipient} has never entered {name}")
    for e in data["enrollments"]:
        out.print(f"entry {e['entry']} ({e['entered_at']}, version {e['version']}"
                  + (f", cohort {e['cohort']}" if e["cohort"] else "") + f"): {e['status']}"
                  + (f" at {e['step']}" + (f" until {e['due_at']}" if e["due_at"] else "")
                     if e["status"] in ("active", "waiting") else "")
                  + (f" ({e['exit_reason']})" if e["exit_reason"] else ""))
        for p in e["path"]:
            out.print(f"  {p['at']}  {p['step']:<16} {p['outcome']}"
                      + (f" via {p['channel']}" if p.get("channel") else "")
                      + (f"  {p['detail']}" if p["detail"] else ""), markup=False)


@journey_app.command("report")
def journey_report(name: str, workspace: WorkspaceOpt = None,
                   as_json: Annotated[bool, typer.Option("--json")] = False,
                   html: Annotated[bool, typer.Option(
                       "--html", help="Also write reports/journeys/NAME.html")] = False,
                   to: Annotated[Path | None, typer.Option(
                       "--to", help="Write the HTML report to this file")] = None) -> None:
    """Per step: visited, outcomes, messages, converted; the uplift over the holdout."""
    from herald.flows.results import pp
    from herald.journeys.report import report as journey_results

    ws = _ws(workspace)
    data = journey_results(ws, name)
    if html or to:
        from herald.journeys import html as journey_html
        from herald.journeys.report import status as journey_state

        page = to or ws.root / "reports" / "journeys" / f"{name}.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(journey_html.render(data, journey_state(ws, name)), encoding="utf-8")
        err.print(f"HTML report: {page}")
    if as_json:
        _print_json(data)
        return
    out.print(f"journey {name}: {data['entered']:,} entered, {data['live']:,} inside, "
              f"{data['completed']:,} completed, exited: "
              + (", ".join(f"{r} {n:,}" for r, n in data["exited"].items()) or "none"))
    # One line per step, unwrapped: a send step's outcomes are its ledger statuses
    # (the JSON also has them per step as "messages").
    width = max(len(step) for step in data["steps"])
    out.print(f" {'step':<{width}}  {'visited':>8}  {'converted':>9}  outcomes")
    for step, row in data["steps"].items():
        converted = f"{row['converted']:,}" if data["goal"] else ""
        out.print(f" {step:<{width}}  {row['visited']:>8,}  {converted:>9}  "
                  + ", ".join(f"{o} {n:,}" for o, n in row["outcomes"].items()), markup=False)
    goal = data["goal"]
    if goal:
        t, h = goal["treated"], goal["holdout"]
        out.print(f"goal {goal['segment']} within {goal['window_seconds'] // 86400}d of "
                  f"entry: treated {t['converted']:,}/{t['recipients']:,}"
                  + (f" {t['rate']:.1%}" if t["rate"] is not None else "")
                  + f", holdout {h['converted']:,}/{h['recipients']:,}"
                  + (f" {h['rate']:.1%}" if h["rate"] is not None else ""))
        u = goal["uplift"]
        if u:
            out.print(f"uplift {pp(u['absolute'])} [{pp(u['ci_low'])}, {pp(u['ci_high'])}] "
                      f"(95% CI)" + (" significant" if u["significant"] else ""))
        else:
            out.print(f"uplift not measurable: {goal['note']}")
        for v in goal["variants"]:
            out.print(f"  variant {v['step']}/{v['variant']}: {v['converted']:,}/"
                      f"{v['recipients']:,}" + (f" {v['rate']:.1%}" if v["rate"] is not None
                                                 else ""))


def main(argv: list[str] | None = None) -> None:
    """Entry point: HeraldError → one line per problem on stderr, exit 1; usage → 2."""
    try:
        code = app(args=argv, prog_name="herald", standalone_mode=False)
    except HeraldError as exc:
        if state.debug:
            raise
        lines = str(exc).splitlines() or [type(exc).__name__]
        if len(lines) > 1:
            err.print(f"[red]error:[/] {len(lines)} problems")
            for line in lines:
                err.print(f"  {line}", markup=False)
        else:
            err.print(f"[red]error:[/] {escape(lines[0])}")
        sys.exit(1)
    except typer.Abort:
        err.print("aborted")
        sys.exit(1)
    except typer.TyperException as exc:  # usage errors (click's, vendored by typer): exit 2
        show = getattr(exc, "show", None)
        if show:
            show()
        sys.exit(getattr(exc, "exit_code", 2))
    finally:
        _close()
    sys.exit(code if isinstance(code, int) else 0)


def _close() -> None:
    while state.opened:
        state.opened.pop().dispose()
