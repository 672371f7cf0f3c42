"""``herald journey tick | status | show | report``: advancing journeys and seeing where
everyone is."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from herald.flows.cli.common import (
    NowOpt,
    WorkspaceOpt,
    err,
    journey_app,
    open_workspace,
    out,
    page_target,
    prefect_console,
    prefect_env,
    print_json,
    require_key,
    set_now,
    write_page,
)
from herald.flows.cli.server import TemporaryServer


@journey_app.command("tick")
def journey_tick(ctx: typer.Context, name: str, workspace: WorkspaceOpt = None,
                 now: NowOpt = None,
                 as_json: Annotated[bool, typer.Option("--json")] = False,
                 prefect: Annotated[bool, typer.Option(
                     "--prefect", help="Run the tick as a Prefect flow run")] = False,
                 enter: Annotated[bool, typer.Option(
                     "--enter/--no-enter", help="Run the entry segment first")] = True,
                 ) -> None:
    """Enter new recipients, then move everyone who can move now (one tick).

    Exits 1 when a channel stopped (a fatal answer) or a signal stopped the tick: whoever
    was not sent waits at their send step for the next tick."""
    from herald.flows.engine import stop_on_signals

    set_now(now)
    server = TemporaryServer(ctx)
    if prefect:
        prefect_env()
        server.start()  # it gets ready while the journey is checked and Prefect imported
    ws = open_workspace(workspace)
    if prefect:
        from herald.flows.journey import run as run_tick

        prefect_console(verbose=False)
        with stop_on_signals():
            server.attach()
            with server.serving():
                summary = run_tick(ws, name, enter=enter)
    else:
        from herald.journeys.engine import tick_local

        with stop_on_signals():
            summary = tick_local(ws, name, enter=enter)
    if as_json:
        print_json(summary)
        return
    out.print(f"journey {name} tick {summary['tick']}: entered {summary['entered']}, "
              f"looked at {summary['claimed']} in {summary['chunks']} chunks, "
              f"{summary['duration_seconds']}s")
    if summary["entry_skipped"]:
        from herald.journeys.entry import SKIPPED_HINT

        err.print("[yellow]warning:[/] entry rows not entered: " + ", ".join(
            f"{why}={n}" for why, n in summary["entry_skipped"].items())
            + f" ({SKIPPED_HINT})", markup=True)
    for step, outcomes in summary["steps"].items():
        out.print(f"  {step}: " + ", ".join(f"{o}={n}" for o, n in outcomes.items()))
    if summary["exits"]:
        out.print("  exits: " + ", ".join(f"{r}={n}" for r, n in summary["exits"].items()))


@journey_app.command("status")
def journey_status(name: str, workspace: WorkspaceOpt = None,
                   as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """How many recipients are at each step, and why the others left."""
    from herald.journeys.report import status

    data = status(open_workspace(workspace), name)
    if as_json:
        print_json(data)
        return
    out.print(f"journey {name} (version {data['version']}): {data['enrollments']:,} "
              f"enrollments of {data['recipients']:,} recipients; {data['live']:,} inside, "
              f"{data['completed']:,} completed, {sum(data['exited'].values()):,} exited")
    table = Table("step", "active", "waiting", box=None)
    for step, counts in data["at_step"].items():
        table.add_row(step, f"{counts['active']:,}", f"{counts['waiting']:,}")
    out.print(table)
    if data["queued"]:
        out.print(_queued_line(data["queued"]))
    if data["exited"]:
        out.print("exited: " + ", ".join(f"{r} {n:,}" for r, n in data["exited"].items()))
    if len(data["live_by_version"]) > 1:
        out.print("inside by version: " + ", ".join(
            f"{v} {n:,}" for v, n in data["live_by_version"].items()))


def _queued_line(queued: dict[str, int]) -> str:
    return ("waiting with their message queued, not sent yet (the next tick sends it): "
            + ", ".join(f"{step} {n:,}" for step, n in queued.items()))


@journey_app.command("show")
def journey_show(name: str, recipient: str, workspace: WorkspaceOpt = None,
                 as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """One recipient's path through a journey, step by step."""
    from herald.journeys.report import show

    require_key(recipient, "RECIPIENT")
    data = show(open_workspace(workspace), name, recipient)
    if as_json:
        print_json(data)
        return
    if not data["enrollments"]:
        out.print(f"{recipient} has never entered {name}")
    for e in data["enrollments"]:
        out.print(f"entry {e['entry']} ({e['entered_at']}, version {e['version']}"
                  + (f", cohort {e['cohort']}" if e["cohort"] else "") + f"): {e['status']}"
                  + (f" at {e['step']}" + (f" until {e['due_at']}" if e["due_at"] else "")
                     if e["status"] in ("active", "waiting") else "")
                  + (f" ({e['exit_reason']})" if e["exit_reason"] else ""))
        if e["message"]:
            m = e["message"]
            out.print(f"  message at {e['step']}: {m['status']} via {m['channel']}"
                      + (f"  {m['reason']}" if m["reason"] else ""), markup=False)
        for p in e["path"]:
            said, via = p.get("message"), (f" via {p['channel']}" if p.get("channel") else "")
            out.print(f"  {p['at']}  {p['step']:<16} {p['outcome']}"
                      + (via if said in (None, p["outcome"]) else f" (its message {said}{via})")
                      + (f"  {p['detail']}" if p["detail"] else ""), markup=False)


@journey_app.command("report")
def journey_report(name: str, workspace: WorkspaceOpt = None,
                   as_json: Annotated[bool, typer.Option("--json")] = False,
                   html: Annotated[bool, typer.Option(
                       "--html", help="Also write reports/journeys/NAME.html")] = False,
                   to: Annotated[Path | None, typer.Option(
                       "--to", help="Write the HTML report to this file, or into this "
                       "existing folder as NAME.html")] = None) -> None:
    """Per step: visited, outcomes, messages, converted; the uplift over the holdout."""
    from herald.journeys.report import report as journey_results
    from herald.reporting.text import pp

    ws = open_workspace(workspace)
    data = journey_results(ws, name)
    if html or to:
        from herald.journeys import html as journey_html
        from herald.journeys.report import status as journey_state

        page = page_target(to, ws.root / "reports" / "journeys" / f"{name}.html",
                           f"{name}.html")
        text = journey_html.render(data, journey_state(ws, name))
        write_page("--to" if to else "the HTML report", page, text)
        err.print(f"HTML report: {page}")
    if as_json:
        print_json(data)
        return
    out.print(f"journey {name}: {data['entered']:,} entered, {data['live']:,} inside, "
              f"{data['completed']:,} completed, exited: "
              + (", ".join(f"{r} {n:,}" for r, n in data["exited"].items()) or "none"))
    if data["queued"]:
        out.print(_queued_line(data["queued"]))
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
