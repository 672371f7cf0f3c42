"""``herald report``: a run's deliveries, conversions and uplift."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from herald.core.errors import HeraldError
from herald.flows.cli.common import (
    NowOpt,
    WorkspaceOpt,
    app,
    open_workspace,
    out,
    page_target,
    print_json,
    print_summary,
    set_now,
    write_page,
)
from herald.reporting.text import interval, pp


@app.command()
def report(run_id: Annotated[str | None, typer.Argument(
               metavar="[RUN|FLOW]", help="A run id (that run alone), or a flow name (its "
               "latest run key, every run under it). Default: the latest run's key")] = None,
           run_key: Annotated[str | None, typer.Option(
               "--run-key", help="Report this run key of the flow")] = None,
           dry_runs: Annotated[bool, typer.Option(
               "--dry-runs", help="Also consider dry runs (skipped by default)")] = False,
           workspace: WorkspaceOpt = None,
           as_json: Annotated[bool, typer.Option("--json")] = False,
           html: Annotated[bool, typer.Option("--html", help="Also write the HTML report "
                                              "(reports/FLOW/RUN_KEY.html)")] = False,
           to: Annotated[Path | None, typer.Option(
               "--to", help="Write the HTML report to this file, or into this existing "
               "folder as FLOW-RUN_KEY.html (implies --html)")] = None,
           write_back: Annotated[bool, typer.Option(
               "--write-back", help="Also copy the ledger and conversion results into the "
               "workspace's write-back source (a report alone writes nothing)")] = False,
           now: NowOpt = None) -> None:
    """Delivery report of a run key (or one run) from the ledger, with its conversions,
    uplift, content experiments and the top failure reasons."""
    from herald.delivery import run_records
    from herald.reporting import conversions, experiments, runs

    set_now(now)
    ws = open_workspace(workspace)
    if run_key and not run_id:
        found = run_records.list_runs(ws.store, 1, run_key=run_key)
        if not found:
            raise HeraldError(f"no run under run key '{run_key}'")
        run_id = found[0].flow
    row = runs.find_run(ws, run_id, dry_runs or bool(run_key))
    if run_id == row.id and not run_key:
        data = runs.run_report(ws, row)  # one run, as it happened
    else:
        data = runs.key_report(ws, row.flow, run_key or row.run_key, dry_runs)
        row = run_records.get_run(ws.store, run_id=data["run_id"])
    conversion, written = None, None
    if runs.measures(ws, row):
        conversion = conversions.compute(ws, row.flow, row.run_key)
        data["conversion"] = conversion.to_dict()
    tested = experiments.compute(ws, row.flow, row.run_key,
                                 conversion.converted if conversion else None) \
        if not row.dry_run and row.flow in ws.flow_names() else []
    if tested:
        data["experiments"] = [t.to_dict() for t in tested]
    if write_back:
        if not ws.config.writeback:
            raise HeraldError("--write-back: config/herald.yaml sets no writeback source")
        from herald.reporting.writeback import write_back as copy

        written = copy(ws, row.flow, row.run_key, conversion)
    path = None
    if html or to:
        from herald.channels.outbox import safe_name
        from herald.reporting.htmlreport import render

        # a run key is any text (`../x`, `a/b`): a file name of its own, inside reports/
        path = page_target(to, ws.root / "reports" / safe_name(row.flow)
                           / f"{safe_name(row.run_key)}.html",
                           f"{safe_name(row.flow)}-{safe_name(row.run_key)}.html")
        _with_package_params(ws, data)
        page = render(data, conversion, runs.timeline(ws, row.flow, row.run_key),
                      _tier_messages(ws, row.flow), ws.config.currency, tested)
        write_page("--to" if to else "the HTML report", path, page)
    if as_json:
        print_json({**data, **({"html": str(path)} if path else {})})
        return
    if data.setdefault("package", {}).get("size") is None:
        data["package"]["size"] = "?"
    print_summary(data)
    out.print(f"status: {row.status}" + (f" ({escape(row.error)})" if row.error else ""))
    if len(data.get("runs", [])) > 1:
        _print_runs(data["runs"], f"runs under run key {data['run_key']}")
    others = [r for r in data["reasons"] if r["status"] != "failed"]  # failed: below
    if others and not data["dry_run"]:
        reasons = Table("status", "channel", "reason", "count", title="not sent, and why")
        for r in others:
            reasons.add_row(r["status"], r["channel"] or "-", escape(r["reason"] or "-"),
                            str(r["count"]))
        out.print(reasons)
    if data.get("failure_reasons"):
        top = Table("channel", "code", "reason", "count", title="top failure reasons")
        for r in data["failure_reasons"]:
            top.add_row(r["channel"] or "-", r["code"] or "-", escape(r["reason"] or "-"),
                        f"{r['count']:,}")
        out.print(top)
    if conversion is not None:
        _print_conversion(conversion, ws.config.currency)
    for experiment in tested:
        _print_experiment(experiment)
    if written and ws.config.writeback:
        out.print(f"written back to source {ws.config.writeback.source}: "
                  f"{written['deliveries']} deliveries, {written['conversion_results']} "
                  "result rows")
    if path:
        out.print(f"HTML report: {path}")


def _with_package_params(ws: Any, data: dict[str, Any]) -> None:
    """The package's segment parameters, when the package is still stored."""
    from herald.audiences import store

    package = data.get("package") or {}
    if package.get("id") and "params" not in package:
        with contextlib.suppress(HeraldError):  # pruned: the report goes without them
            data["package"] = {**store.get(ws, package["id"]).manifest(), **package}


def _tier_messages(ws: Any, flow: str) -> list[dict[str, Any]]:
    """One sample message per tier, rendered now (nothing when the flow cannot be)."""
    from herald.flows.preview import render_samples

    if flow not in ws.flow_names():
        return []
    found = []
    for tier in ws.flow(flow).tiers:
        try:
            samples = render_samples(ws, flow, {}, None if tier == "default" else tier, 1)
        except HeraldError:
            continue
        found += [s for s in samples if s.get("body")][:1]
    return found


@app.command("runs")
def runs_command(flow: Annotated[str | None, typer.Argument(help="Only this flow")] = None,
                 limit: Annotated[int, typer.Option("--limit", min=1)] = 20,
                 workspace: WorkspaceOpt = None,
                 as_json: Annotated[bool, typer.Option("--json")] = False,
                 close: Annotated[str | None, typer.Option(
                     "--close", metavar="RUN", help="Close a run left running by a "
                     "process that ended where Herald cannot see it (another host)")] = None
                 ) -> None:
    """List runs, newest first: run key, status, counts and duration."""
    from herald.reporting import runs

    ws = open_workspace(workspace)
    if close:
        from herald.delivery import run_records

        out.print(run_records.close_run(ws.store, close))
        return
    found = runs.list_runs(ws, flow, limit)
    if as_json:
        print_json(found)
        return
    if not found:
        out.print("no runs yet")
        return
    _print_runs(found, None)


def _print_runs(rows: list[dict[str, Any]], title: str | None) -> None:
    from rich import box

    table = Table("run", "flow", "run key", "status", "sent", "failed", "dup", "took",
                  title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1),
                  collapse_padding=True)
    table.columns[0].no_wrap = True
    for column in table.columns[4:]:
        column.justify = "right"
    for r in rows:
        status = "dry run" if r["dry_run"] else r["status"]
        table.add_row(r["run_id"], r["flow"], r["run_key"], status, f"{r['sent']:,}",
                      f"{r['failed']:,}", f"{r['duplicate']:,}",
                      "" if r["duration_seconds"] is None else f"{r['duration_seconds']}s")
    out.print(table)


def _print_conversion(report: Any, currency: str | None = None) -> None:
    """Conversions in tables that fit 80 columns: one row per tier, then per channel."""
    from rich import box

    from herald.core.fields import format_duration

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
                cells = [f"[{style}]{pp(found.absolute, 1)}[/]",
                         escape(interval(found, 1)),
                         f"{found.relative * 100:+.0f}%" if found.relative is not None
                         else "–"]
            table.add_row(escape(row.name), _arm_cell(row.contacted), _arm_cell(row.held_out),
                          *cells, *([f"{row.contacted.revenue:,.2f}"] if money else []))
        out.print(table)
    total = report.total
    if report.has_revenue:
        out.print("revenue" + (f" ({currency})" if currency else "") + ": contacted "
                  + _money(total.contacted) + ", held out " + _money(total.held_out))
    itt = report.intent_to_treat
    out.print(f"campaign arm {report.assigned.recipients:,} (contacted "
              f"{total.contacted.recipients:,}, not contacted {total.not_contacted:,}); "
              "intent to treat vs held out: "
              + (f"{pp(itt.absolute)} {escape(interval(itt))}"
                 if itt else "not measurable"))
    out.print("[dim]channels are not randomised: a channel's uplift compares its recipients "
              "with the whole held-out group[/]")


def _print_experiment(report: Any) -> None:
    """One experiment: a table per audience (all, then each tier) and its verdict."""
    from rich import box

    from herald.reporting import text

    spec = report.spec
    out.print(f"\n[bold]experiment {escape(report.name)}[/] (control "
              f"{escape(spec.control_variant)}; a winner needs {spec.min_sample:,} contacted "
              f"per variant and p < {spec.significance:g})")
    test = text.describe_test(report)
    if test:
        out.print(escape(test))
    for result in [report.total, *report.by_tier.values()]:
        table = Table(*text.ARM_HEAD, box=box.SIMPLE_HEAD, padding=(0, 1),
                      collapse_padding=True, pad_edge=False, title=escape(result.name),
                      title_justify="left")
        for column in table.columns[1:]:
            column.justify = "right"
        for cells in text.arm_cells(result):
            table.add_row(*map(escape, cells))
        out.print(table)
        found = result.verdict
        style = "green" if found.winner else "yellow"
        out.print(f"[{style}]{escape(text.describe_verdict(result))}[/]")


def _arm_cell(group: Any) -> str:
    if not group.recipients:
        return "0"
    return f"{group.converted:,}/{group.recipients:,} {group.converted / group.recipients:.1%}"


def _money(group: Any) -> str:
    each = f" ({group.revenue / group.recipients:,.2f} each)" if group.recipients else ""
    return f"{group.revenue:,.2f}{each}"
