"""Text forms of the figures: percentages, uplift with its interval, the Markdown summary
(one home for each, shared by the CLI, the HTML report and the Prefect artifacts)."""

from __future__ import annotations

from typing import Any

from herald.core.db import STATUSES
from herald.core.fields import format_duration
from herald.reporting.conversions import ConversionReport, Row
from herald.reporting.experiments import ExperimentReport, Result
from herald.reporting.stats import Uplift, wilson


def pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value * 100:+.2f}%" if signed else f"{value * 100:.2f}%"


def pp(value: float, digits: int = 2) -> str:
    """A difference of rates in percentage points."""
    return f"{value * 100:+.{digits}f} pp"


def interval(found: Uplift, digits: int = 2) -> str:
    """An uplift's 95% interval in percentage points: ``[+1.20, +7.00]``."""
    return f"[{found.low * 100:+.{digits}f}, {found.high * 100:+.{digits}f}]"


def describe_uplift(row: Row) -> str:
    """``+4.10 pp [1.20, 7.00] (+85.3%)`` or why there is none."""
    found = row.uplift
    if found is None:
        return row.note or "–"
    text_ = f"{pp(found.absolute)} {interval(found)}"
    return text_ + (f" ({pct(found.relative, signed=True)})" if found.relative is not None
                    else "")


def markdown(report: ConversionReport) -> str:
    """The summary as Markdown (the Prefect artifact)."""
    money = report.has_revenue
    head = ["", "contacted", "converted", "rate", "held out", "converted", "rate",
            "uplift (95% CI) (relative)", *(["revenue contacted", "revenue held out"]
                                            if money else [])]

    def line(row: Row) -> str:
        cells = [row.name, str(row.contacted.recipients), str(row.contacted.converted),
                 pct(row.contacted.rate), str(row.held_out.recipients),
                 str(row.held_out.converted), pct(row.held_out.rate), describe_uplift(row)]
        if money:
            cells += [f"{row.contacted.revenue:,.2f}", f"{row.held_out.revenue:,.2f}"]
        return "| " + " | ".join(cells) + " |"

    def table(rows: list[Row], first: str) -> str:
        return "\n".join(["| " + " | ".join([first, *head[1:]]) + " |",
                          "|" + "---|" * len(head), *map(line, rows)])

    state = ("closed" if report.window_closed else
             f"open until {report.closes_at:%Y-%m-%d %H:%M} UTC: figures are partial")
    itt = report.intent_to_treat
    parts = [f"# Conversions: {report.flow} ({report.run_key})", "",
             f"- conversion: `{report.segment}`, window {format_duration(report.window)} "
             f"after contact",
             f"- attribution window: {state}",
             f"- campaign arm (everyone not held out): {report.assigned.recipients}, of "
             f"whom {report.total.contacted.recipients} contacted and "
             f"{report.total.not_contacted} not (caps, suppression, no address, failures)",
             "- intent to treat (whole arm vs held out): "
             + (f"{pp(itt.absolute)} {interval(itt)}"
                if itt else "not measurable (no held-out recipients or no arm)"),
             "", table([report.total], "run"), "", "## By tier", "",
             table(list(report.tiers.values()), "tier"), "", "## By channel", "",
             table(list(report.channels.values()), "channel"), "",
             "Channels are not randomised: a channel's uplift compares its recipients "
             "with the whole held-out group.", ""]
    return "\n".join(parts)


# -- content experiments ----------------------------------------------------------------
ARM_HEAD = ("variant", "contacted", "converted", "rate [95% CI]", "revenue",
            "vs control [95% CI]", "p")


def arm_cells(result: Result) -> list[tuple[str, ...]]:
    """One row of text cells per variant of a result (the control first), in ARM_HEAD's
    order: the CLI, the Markdown artifact and the HTML report show the same figures."""
    against = result.comparisons()
    rows: list[tuple[str, ...]] = []
    for name, arm in result.arms.items():
        if arm.recipients:
            low, high = wilson(arm.converted, arm.recipients)
            rate = f"{pct(arm.rate)} [{low * 100:.2f}, {high * 100:.2f}]"
        else:
            rate = "–"
        found = against.get(name)
        if name == result.control:
            versus, p = "control", ""
        elif found is None:
            versus, p = "–", "–"
        else:
            versus = (f"{pp(found['difference'])} [{found['ci_low'] * 100:+.2f}, "
                      f"{found['ci_high'] * 100:+.2f}]")
            p = f"{found['p_value']:.3g}"
        rows.append((name, f"{arm.recipients:,}", f"{arm.converted:,}", rate,
                     f"{arm.revenue:,.2f}", versus, p))
    return rows


def describe_verdict(result: Result) -> str:
    found = result.verdict
    if found.winner:
        return f"winner: {found.winner} ({found.reason})"
    return f"not enough data: {found.reason}"


def describe_test(report: ExperimentReport) -> str | None:
    """Where a test-then-winner experiment stands: waiting, or what it decided and why."""
    spec = report.spec
    if spec.test_share is None:
        return None
    state = report.state
    if state is None:
        return f"tests on {spec.test_share:.0%} first; not started under this run key"
    if not state.decided:
        return (f"testing on {spec.test_share:.0%}; {report.waiting:,} recipients wait for "
                f"the decision at {state.decide_at:%Y-%m-%d %H:%M} UTC")
    sent = "".join(f", {a.recipients:,} sent {a.variant} ({a.converted:,} converted)"
                   for a in report.rest.values())
    rest = (f"the rest get {state.winner}{sent}" if state.winner else
            f"the rest are not sent ({report.stopped:,} stopped)")
    return (f"decided {state.decided_at:%Y-%m-%d %H:%M} UTC ({state.outcome}): {rest}; "
            f"{state.reason}")


def experiments_markdown(reports: list[ExperimentReport]) -> str:
    """Per-variant results, against the control, with the verdicts (Markdown)."""
    parts: list[str] = []
    for report in reports:
        weights = ", ".join(f"{v} ({w:g})" for v, w in report.spec.variants.items())
        parts += [f"## Experiment {report.name}", "",
                  f"- variants: {weights}; control {report.spec.control_variant}; "
                  f"tiers {', '.join(report.tiers)}",
                  f"- a winner needs {report.spec.min_sample:,} contacted per variant and "
                  f"p < {report.spec.significance:g}"]
        test = describe_test(report)
        if test:
            parts.append(f"- test then winner: {test}")
        for result in [report.total, *report.by_tier.values()]:
            parts += ["", f"### {result.name}: {describe_verdict(result)}", "",
                      "| " + " | ".join(ARM_HEAD) + " |", "|" + "---|" * len(ARM_HEAD),
                      *("| " + " | ".join(cells) + " |" for cells in arm_cells(result))]
        parts.append("")
    return "\n".join(parts)


def delivery_markdown(summary: dict[str, Any], failures: list[dict[str, Any]]) -> str:
    """A run's deliveries as Markdown (the ``herald-FLOW-delivery`` artifact): statuses
    per channel and per tier, then the top failure reasons with the provider's code."""
    deliveries = summary["deliveries"]
    statuses = [s for s in STATUSES if deliveries.get(s) or any(
        row.get(s) for table in ("by_channel", "by_tier") for row in summary[table].values())]
    statuses = statuses or ["sent"]

    def table(first: str, rows: dict[str, dict[str, int]]) -> str:
        head = f"| {first} | " + " | ".join(statuses) + " |\n|---|" + "---|" * len(statuses)
        body = [f"| {name} | " + " | ".join(f"{row.get(s, 0):,}" for s in statuses) + " |"
                for name, row in sorted(rows.items())]
        total = "| **all** | " + " | ".join(f"**{deliveries.get(s, 0):,}**"
                                           for s in statuses) + " |"
        return "\n".join([head, *body, total])

    title = (f"# Deliveries: {summary['flow']} ({summary['run_key']})"
             + (" - dry run" if summary.get("dry_run") else ""))
    parts = [title, f"run `{summary['run_id']}`", "## Per channel",
             table("channel", summary["by_channel"]), "## Per tier",
             table("tier", summary["by_tier"]), "## Top failure reasons"]
    if failures:
        parts.append("| channel | code | reason | count |\n|---|---|---|---|\n" + "\n".join(
            f"| {f['channel'] or '-'} | {f['code'] or '-'} | "
            f"{(f['reason'] or '-').replace('|', '/')} | {f['count']:,} |" for f in failures))
    else:
        parts.append("No failed sends.")
    return "\n\n".join(parts) + "\n"
