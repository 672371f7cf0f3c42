"""``herald demo-data``: the demo shop and its simulated response."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from herald.core.errors import HeraldError
from herald.core.workspace import Workspace
from herald.flows.cli.common import (
    NowOpt,
    WorkspaceOpt,
    app,
    open_workspace,
    out,
    set_now,
)


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
    from herald.core.db import resolve_url

    set_now(now)
    ws = open_workspace(workspace)
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
    from herald.audiences.demo_response import simulate_response
    from herald.core.db import resolve_url
    from herald.journeys import load as journeys
    from herald.reporting import runs

    if run in journeys.names(ws):
        _simulate_journey(ws, run)
        return
    row = runs.find_run(ws, run)
    flow = ws.flow(row.flow)
    source = flow.conversion_source()
    if flow.conversion is None or source is None:
        raise HeraldError(f"flow '{flow.name}' declares no conversion to simulate")
    contacts = ((c.recipient, c.tier, c.contacted, c.at, c.variant)
                for c in runs.contacts(ws, flow.name, row.run_key))
    done = simulate_response(resolve_url(ws.config.sources[source], ws.root), contacts,
                             flow.conversion.window)
    table = Table("tier", "group", "customers", "ordered", "chance", box=None)
    for s in done:
        group = (f"contacted ({s.variant})" if s.variant else "contacted") if s.contacted \
            else "held out"
        table.add_row(s.tier, group, f"{s.recipients:,}", f"{s.ordered:,}", f"{s.chance:.0%}")
    out.print(f"simulated orders after {flow.name} {row.run_key} (demo data, not a "
              "measurement):")
    out.print(table)


def _simulate_journey(ws: Workspace, name: str) -> None:
    """Orders after entering a journey: more likely for those not held out."""
    from herald.audiences.demo_response import simulate_response
    from herald.core.db import resolve_url
    from herald.journeys import load as journeys
    from herald.journeys.report import contacts

    spec = journeys.load(ws, name).spec
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
