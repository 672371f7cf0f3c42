"""Text forms of the figures: percentages, uplift with its interval, the Markdown summary
(one home for each, shared by the CLI, the HTML report and the Prefect artifacts)."""

from __future__ import annotations

from herald.core.spec import format_duration
from herald.reporting.conversions import ConversionReport, Row
from herald.reporting.stats import Uplift


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
