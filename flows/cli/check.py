"""``herald validate`` and ``herald preview``: check everything, render samples; send nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from herald.core.errors import HeraldError
from herald.flows.cli.common import (
    ParamOpt,
    WorkspaceOpt,
    app,
    err,
    mask,
    open_workspace,
    out,
    output_folder,
    parse_params,
    print_json,
    writing_output,
)


# -- validate ---------------------------------------------------------------------------
@app.command()
def validate(flows: Annotated[list[str] | None, typer.Argument(help="Flows (default: all)")]
             = None, workspace: WorkspaceOpt = None) -> None:
    """Check flows and journeys, SQL, templates and channels; exit 1 listing every
    problem."""
    from herald.core.fields import format_duration
    from herald.core.workspace import CONFIG_FILE
    from herald.delivery.render import templates_for
    from herald.flows.validate import cap_tier_warnings, check_flow
    from herald.journeys import load as journeys

    ws = open_workspace(workspace)
    journey_names = journeys.names(ws)
    names = [n for n in flows if n not in journey_names] if flows else ws.flow_names()
    chosen_journeys = [n for n in flows if n in journey_names] if flows else journey_names
    # a flow or journey saved as .yml would be silently left out of "all"
    problems: list[str] = [] if flows else [str(p) for p in ws.misnamed()]
    if not names and not chosen_journeys and not problems:
        raise HeraldError("no flows in config/flows/")
    templates = templates_for(ws)
    tiers: set[str] = set()  # every tier entry of the flows and journeys checked
    for name in chosen_journeys:
        try:
            jc = journeys.check(ws, name, templates)
        except HeraldError as exc:
            problems.extend(str(exc).splitlines())
            err.print(f"[red]✗[/] journey {name}")
            continue
        spec = jc.loaded.spec
        tiers.update(spec.tier_names())
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
        tiers.update(checked.spec.tiers)
    if not flows and not problems:  # all of them: a workspace cap's tier is among theirs
        for warning in cap_tier_warnings(ws.config.caps, sorted(tiers), CONFIG_FILE,
                                         ws.config_line):
            err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if problems:
        for line in problems:
            err.print(f"  {line}", markup=False)
        raise typer.Exit(1)


# -- preview ----------------------------------------------------------------------------
@app.command()
def preview(flow: str, tier: Annotated[str | None, typer.Option("--tier")] = None,
            limit: Annotated[int, typer.Option("--limit", min=1, max=100)] = 3,
            param: ParamOpt = None, workspace: WorkspaceOpt = None,
            as_json: Annotated[bool, typer.Option("--json")] = False,
            out_dir: Annotated[Path | None, typer.Option(
                "--out", help="Also write each sample as files to open: .json, and .eml "
                "and .html for e-mail")] = None) -> None:
    """Render FLOW's messages for sample recipients; send nothing."""
    from herald.flows.preview import render_samples, write_samples

    ws = open_workspace(workspace)
    if out_dir is not None:
        output_folder("--out", out_dir)
    samples = render_samples(ws, flow, parse_params(param), tier, limit)
    if out_dir is not None:
        with writing_output("--out", out_dir):
            files = write_samples(ws, flow, samples, out_dir)
        err.print(f"{len(files)} files written to {out_dir}: "
                  + ", ".join(p.name for p in files[:6]) + (" ..." if len(files) > 6 else ""),
                  markup=False)
    if as_json:
        print_json(samples)
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
