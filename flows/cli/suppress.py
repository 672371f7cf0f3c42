"""``herald suppress add | import | list | remove``: the suppression list."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from herald.core.errors import HeraldError
from herald.core.workspace import Workspace
from herald.flows.cli.common import (
    ChannelOpt,
    WorkspaceOpt,
    check_channel,
    mask,
    open_workspace,
    out,
    print_json,
    suppress_app,
)


@suppress_app.command("add")
def suppress_add(values: list[str], channel: ChannelOpt = None,
                 reason: Annotated[str | None, typer.Option("--reason")] = None,
                 keys: Annotated[bool, typer.Option(
                     "--keys", help="The values are recipient keys, not addresses")] = False,
                 workspace: WorkspaceOpt = None) -> None:
    """Suppress e-mail addresses and phone numbers (recipient keys with --keys). All or
    nothing: a value that is not one refuses them all, as `import` does."""
    from herald.delivery import suppression

    ws = open_workspace(workspace)
    check_channel(ws, channel)
    region = ws.config.phone_region
    checked = [suppression.import_value(v, region, keys) if v.strip()
               else (None, "an empty value") for v in values]
    if not keys:
        checked = [(v, _never_its_address(ws, channel, v)) if v else (v, why)
                   for v, why in checked]
    refused = [why for _, why in checked if why]
    if len(refused) == 1:
        raise HeraldError(f"{refused[0]}; nothing added")
    if refused:
        raise HeraldError("\n".join([*refused, f"nothing added: {len(refused)} values "
                                     "refused"]))
    suppression.migrate(ws.store, region)
    added = suppression.suppress(ws.store, [(v, channel, reason) for v, _ in checked
                                            if v is not None], "operator", region)
    out.print(f"{added} added, {len(values) - added} already suppressed")


@suppress_app.command("import")
def suppress_import(file: Path, channel: ChannelOpt = None,
                    reason: Annotated[str | None, typer.Option("--reason")] = None,
                    keys: Annotated[bool, typer.Option(
                        "--keys", help="The values are recipient keys, not addresses")] = False,
                    workspace: WorkspaceOpt = None) -> None:
    """Import a file: one address per line, or CSV with value[,channel[,reason]] columns.
    All or nothing: a line that is not an address refuses the file (file:line)."""
    from herald.delivery import suppression

    ws = open_workspace(workspace)
    check_channel(ws, channel)
    region = ws.config.phone_region
    def check(row_channel: str | None, where: str, value: str) -> None:
        check_channel(ws, row_channel, where)
        never = None if keys else _never_its_address(ws, row_channel, value)
        if never:
            raise HeraldError(f"{where}: {never}")

    items = suppression.read_import(file, channel, reason, check, region, keys)
    suppression.migrate(ws.store, region)
    added = suppression.suppress(ws.store, items, "import", region)
    out.print(f"{added} added, {len(items) - added} already suppressed")


@suppress_app.command("list")
def suppress_list(workspace: WorkspaceOpt = None,
                  as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the suppression list."""
    from herald.delivery import suppression

    ws = open_workspace(workspace)
    suppression.migrate(ws.store, ws.config.phone_region)
    rows = suppression.list_suppressions(ws.store)
    if as_json:
        print_json([{"value": r.value, "channel": r.channel, "reason": r.reason,
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
    from herald.delivery import suppression

    ws = open_workspace(workspace)
    suppression.migrate(ws.store, ws.config.phone_region)
    removed = suppression.unsuppress(ws.store, value, channel, ws.config.phone_region)
    if not removed:
        raise HeraldError(f"'{mask(value)}' is not on the suppression list")
    out.print(f"{removed} removed")


def _never_its_address(ws: Workspace, channel: str | None, value: str) -> str | None:
    """Why an address suppressed for one channel would never match there (an e-mail
    address on an SMS channel), else None."""
    if channel is None or channel == "*" or channel not in ws.channels:
        return None
    kind = ws.channel_kind(channel)
    is_email = "@" in value
    if (kind == "email" and not is_email) or (kind == "sms" and is_email):
        what = "an e-mail address" if is_email else "a phone number"
        return (f"{mask(value)} is {what}, and channel '{channel}' sends {kind} (to "
                f"{ws.address_column(channel)}): suppressed there it would never match; "
                "leave --channel out to suppress it on every channel")
    return None
