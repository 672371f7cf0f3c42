"""``herald send-test``: one real message to yourself, never counted."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from herald.core.errors import RunError
from herald.flows.cli.common import (
    ParamOpt,
    WorkspaceOpt,
    app,
    mask,
    open_workspace,
    out,
    parse_params,
    print_json,
)


@app.command("send-test")
def send_test(flow: str,
              tier: Annotated[str, typer.Option("--tier", help="Whose message: a sample "
                                                "recipient of this tier")],
              to: Annotated[str, typer.Option("--to", help="Your own address (e-mail, "
                                              "phone, WeChat openid, URL)")],
              channel: Annotated[str | None, typer.Option(
                  "--channel", help="Default: the tier's first channel the address fits")
              ] = None,
              param: ParamOpt = None, workspace: WorkspaceOpt = None,
              as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Send FLOW's message for TIER once, for real, to your own address (marked \\[test];
    recorded apart from the ledger: no cap, report or rerun counts it)."""
    from herald.flows.sendtest import send_test as send

    result = send(open_workspace(workspace), flow, tier, to, channel, parse_params(param))
    if as_json:
        print_json(result)
    elif result["status"] == "sent":
        out.print(f"[green]✓[/] sent {flow}/{result['tier']} (rendered for recipient "
                  f"{result['sample']}) through {result['channel']} to "
                  f"{mask(result['address'])}"
                  + (f": {escape(result['subject'])}" if result.get("subject") else ""))
    if result["status"] != "sent":
        raise RunError(f"send-test through {result['channel']} failed: {result['reason']}")
