"""``herald audience build | list | show | export``: audience packages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from herald.flows.cli.common import (
    ParamOpt,
    WorkspaceOpt,
    audience_app,
    mask,
    open_workspace,
    out,
    parse_params,
    print_json,
)


# -- audience ---------------------------------------------------------------------------
@audience_app.command("build")
def audience_build(flow: str, param: ParamOpt = None, workspace: WorkspaceOpt = None,
                   as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Build and store an audience package for FLOW (validated first); print its summary."""
    from herald.audiences import builder
    from herald.flows.engine import tidy
    from herald.flows.validate import check_flow

    ws = open_workspace(workspace)
    checked = check_flow(ws, flow, parse_params(param))
    tidy(ws)
    package = builder.build(ws, checked.spec, checked.segment)
    if as_json:
        print_json(package.manifest())
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

    packages = store.list_packages(open_workspace(workspace), flow)
    if as_json:
        print_json([p.manifest() for p in packages])
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

    ws = open_workspace(workspace)
    package = store.get(ws, package_id)
    sample = store.read(ws, package_id, 0, rows)
    if as_json:
        print_json({**package.manifest(), "rows": [r.data for r in sample]})
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


@audience_app.command("export")
def audience_export(package_id: str,
                    to: Annotated[Path, typer.Option("--to", help="FILE.csv or FILE.parquet")],
                    workspace: WorkspaceOpt = None) -> None:
    """Export a package to CSV or Parquet."""
    from herald.audiences import export

    count = export.export(open_workspace(workspace), package_id, to)
    out.print(f"exported {count} rows of {package_id} to {to}")


@audience_app.command("prune")
def audience_prune(keep: Annotated[int, typer.Option("--keep", min=0, help="Packages to "
                                                     "keep per flow, newest first")],
                   flow: Annotated[str | None, typer.Option("--flow")] = None,
                   workspace: WorkspaceOpt = None) -> None:
    """Delete all but the newest N packages of each flow (a package a run of the ledger
    still needs to resume is kept)."""
    from herald.audiences import store

    deleted, needed = store.prune(open_workspace(workspace), keep, flow)
    out.print(f"{len(deleted)} package{'s' if len(deleted) != 1 else ''} deleted"
              + (f"; {len(needed)} kept because a run key still needs "
                 f"{'them' if len(needed) > 1 else 'it'} (queued or deferred recipients): "
                 f"{', '.join(needed)}" if needed else ""))
