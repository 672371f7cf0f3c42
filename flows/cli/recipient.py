"""``herald recipient KEY``: one person's history, caps, suppression and holdout."""

from __future__ import annotations

from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from herald.flows.cli.common import (
    WorkspaceOpt,
    app,
    mask,
    open_workspace,
    out,
    print_json,
    require_key,
)


@app.command()
def recipient(key: Annotated[str, typer.Argument(help="The recipient's key (the flow's "
                                                 "audience.key value)")],
              limit: Annotated[int, typer.Option("--limit", min=1)] = 50,
              workspace: WorkspaceOpt = None,
              as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """One recipient across flows: ledger history, the caps that count them now, whether
    they are suppressed or held out."""
    from herald.reporting.recipient import recipient_view

    require_key(key, "KEY")
    view = recipient_view(open_workspace(workspace), key, limit)
    if as_json:
        print_json(view)
        return
    out.print(f"[bold]recipient {escape(key)}[/] (as of {view['now'][:16]} UTC)")
    if view["history"]:
        table = Table("when", "flow", "run key", "tier", "channel", "to", "status", "reason",
                      box=box.SIMPLE_HEAD, title="history (newest first)")
        for h in view["history"]:
            table.add_row(h["at"][:16].replace("T", " "), h["flow"], h["run_key"], h["tier"],
                          h["channel"] or "-", mask(h["address"]) if h["address"] else "-",
                          h["status"], escape(h["reason"] or ""))
        out.print(table)
    else:
        out.print("history: no ledger rows")
    if view["caps"]:
        caps = Table("cap", "used", "left", box=box.SIMPLE_HEAD,
                     title="frequency caps now")
        for c in view["caps"]:
            left = max(c["max"] - c["used"], 0)
            caps.add_row(c["rule"], str(c["used"]),
                         "[red]0 (reached)[/]" if c["reached"] else str(left))
        out.print(caps)
    if view["suppressed"]:
        for s in view["suppressed"]:
            out.print(f"[red]suppressed[/]: {mask(s['value'])} on "
                      f"{', '.join('every channel' if c == '*' else c for c in s['channels'])}")
    else:
        out.print("suppressed: no")
    held = [flow for flow, out_ in view["held_out"].items() if out_]
    out.print("held out: " + (", ".join(held) if held else "no")
              + (f" (flows with a holdout: {', '.join(view['held_out'])})"
                 if view["held_out"] else ""))
