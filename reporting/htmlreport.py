"""A run's report as one self-contained HTML file: tables and inline SVG charts.

Nothing is fetched when the file is opened (no scripts, fonts or stylesheets from
elsewhere), so it can be mailed, attached to a ticket or opened from disk. Charts are
SVG drawn here: conversion rate by tier (contacted against held out, with Wilson
intervals), uplift per tier with its interval, and sends and failures over time.
"""

from __future__ import annotations

from datetime import timedelta
from html import escape
from typing import Any

from herald.core.fields import format_duration
from herald.reporting.conversions import ConversionReport, Row, by_day, incremental
from herald.reporting.experiments import ExperimentReport
from herald.reporting.runs import Timeline
from herald.reporting.stats import wilson
from herald.reporting.text import (
    ARM_HEAD,
    arm_cells,
    describe_test,
    describe_uplift,
    describe_verdict,
    interval,
    pct,
)

CONTACTED, HELD_OUT, FAILED, GRID, INK = "#2563eb", "#9ca3af", "#dc2626", "#e5e7eb", "#1f2937"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans",sans-serif;
color:#1f2937;margin:2rem auto;max-width:1080px;padding:0 1rem}
h1{font-size:1.5rem;margin:0 0 .25rem}h2{font-size:1.15rem;margin:2rem 0 .5rem}
.meta{color:#6b7280}.cards{display:flex;gap:1rem;flex-wrap:wrap;margin:1rem 0}
.card{border:1px solid #e5e7eb;border-radius:8px;padding:.75rem 1rem;min-width:150px}
.card b{display:block;font-size:1.35rem}.card span{color:#6b7280;font-size:.85rem}
table{border-collapse:collapse;margin:.5rem 0;font-variant-numeric:tabular-nums}
th,td{padding:.3rem .7rem;border-bottom:1px solid #e5e7eb;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f9fafb}
.good{color:#15803d}.bad{color:#b91c1c}.note{color:#6b7280;font-size:.9rem}
.warn{background:#fef3c7;border:1px solid #fcd34d;border-radius:6px;padding:.5rem .75rem}
svg{display:block;margin:.5rem 0;max-width:100%;height:auto}
svg text{font-family:inherit;font-size:12px;fill:#374151}
"""


def render(run: dict[str, Any], conversion: ConversionReport | None,
           timeline: Timeline, messages: list[dict[str, Any]] | None = None,
           currency: str | None = None, tested: list[ExperimentReport] | None = None) -> str:
    """The whole page for one run key (``run``: the ``herald report --json`` delivery
    data; ``messages``: each tier's sample message, subject and first lines; ``currency``:
    the workspace's, before revenue amounts; ``tested``: the content experiments)."""
    title = f"{run['flow']} · {run['run_key']}"
    package = run.get("package") or {}
    body = [f"<h1>{escape(title)}</h1>",
            f"<p class=meta>run {escape(str(run['run_id']))} · status "
            f"{escape(str(run['status']))} · package "
            f"{escape(str(package.get('id') or '–'))}</p>"]
    if package.get("segment"):
        params = ", ".join(f"{k} = {v}" for k, v in (package.get("params") or {}).items())
        body.append(f"<p class=meta>segment <code>{escape(str(package['segment']))}</code>"
                    + (f" · parameters <code>{escape(params)}</code>" if params else "")
                    + (f" · {package['size']:,} recipients" if isinstance(
                        package.get("size"), int) else "") + "</p>")
    if conversion is not None:
        body += _conversion(conversion, currency)
    else:
        body.append("<p class=note>This flow declares no <code>conversion:</code>, so the "
                    "report shows deliveries only.</p>")
    for experiment in tested or []:
        body += _experiment(experiment)
    body += _deliveries(run, timeline)
    if messages:
        body += _messages(messages)
    return ("<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content='width=device-width,initial-scale=1'>"
            f"<title>Herald report: {escape(title)}</title><style>{CSS}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")


# -- sections ---------------------------------------------------------------------------
def _money(amount: float, currency: str | None) -> str:
    return f"{currency} {amount:,.2f}" if currency else f"{amount:,.2f}"


def _conversion(report: ConversionReport, currency: str | None = None) -> list[str]:
    total = report.total
    found = total.uplift
    out = ["<h2>Conversions</h2>",
           f"<p class=meta>conversion <code>{escape(report.segment)}</code>, attributed "
           f"for {format_duration(report.window)} after contact (held-out recipients: "
           "after they were held out)</p>"]
    if not report.window_closed and report.closes_at:
        out.append(f"<p class=warn>The attribution window is open until "
                   f"{report.closes_at:%Y-%m-%d %H:%M} UTC: these figures are partial.</p>")
    cards = [("contacted", f"{total.contacted.recipients:,}",
              f"{pct(total.contacted.rate)} converted"),
             ("held out", f"{total.held_out.recipients:,}",
              f"{pct(total.held_out.rate)} converted"),
             ("uplift", describe_uplift(total).split(" [")[0] if found else "–",
              (f"95% CI {interval(found)} pp"
               if found else total.note or ""))]
    extra = incremental(report)
    if extra is not None:
        cards.append(("incremental conversions", f"{extra.conversions:+,.0f}",
                      f"95% CI {extra.conversions_low:+,.0f} to "
                      f"{extra.conversions_high:+,.0f}"))
    if report.has_revenue:
        cards.append(("revenue, contacted", _money(total.contacted.revenue, currency),
                      f"held out {_money(total.held_out.revenue, currency)}"))
    if extra is not None and extra.revenue is not None:
        assert extra.revenue_low is not None and extra.revenue_high is not None
        cards.append(("incremental revenue", _money(extra.revenue, currency),
                      f"95% CI {extra.revenue_low:+,.0f} to {extra.revenue_high:+,.0f}"))
    out.append("<div class=cards>" + "".join(
        f"<div class=card><span>{escape(k)}</span><b>{escape(v)}</b><span>{escape(s)}</span>"
        "</div>" for k, v, s in cards) + "</div>")
    tiers = list(report.tiers.values())
    out += ["<h2>Conversion rate by tier</h2>", rate_chart(tiers),
            "<h2>Uplift: contacted minus held out</h2>",
            uplift_chart([total, *tiers]),
            _table("tier", [total, *tiers], report.has_revenue),
            "<h2>By channel</h2>",
            _table("channel", list(report.channels.values()), report.has_revenue),
            "<p class=note>Channels are not randomised: a channel's uplift compares its "
            "recipients with the whole held-out group. Recipients of the campaign arm who "
            "were not contacted (caps, suppression, no address, failures) are counted "
            f"apart: {total.not_contacted:,} in this run.</p>"]
    days = by_day(report)
    if days:
        out += ["<h2>Conversions by day</h2>",
                "<table><thead><tr><th>day (UTC)</th><th>converted (contacted and held "
                "out)</th>" + ("<th>revenue</th>" if report.has_revenue else "")
                + "</tr></thead><tbody>" + "".join(
                    f"<tr><td>{d:%Y-%m-%d}</td><td>{n:,}</td>"
                    + (f"<td>{_money(r, currency)}</td>" if report.has_revenue else "")
                    + "</tr>" for d, n, r in days) + "</tbody></table>"]
    return out


def _table(first: str, rows: list[Row], money: bool) -> str:
    head = [first, "contacted", "converted", "rate", "held out", "converted", "rate",
            "uplift [95% CI] (relative)", *(["revenue contacted", "revenue held out"]
                                            if money else [])]
    lines = []
    for row in rows:
        found = row.uplift
        css = ("good" if found.low > 0 else "bad" if found.high < 0 else "") if found else ""
        cells = [escape(row.name), f"{row.contacted.recipients:,}",
                 f"{row.contacted.converted:,}", pct(row.contacted.rate),
                 f"{row.held_out.recipients:,}", f"{row.held_out.converted:,}",
                 pct(row.held_out.rate),
                 f"<span class='{css}'>{escape(describe_uplift(row))}</span>"]
        if money:
            cells += [f"{row.contacted.revenue:,.2f}", f"{row.held_out.revenue:,.2f}"]
        lines.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ("<table><thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join(lines) + "</tbody></table>")


def _experiment(report: ExperimentReport) -> list[str]:
    """Per-variant tables (all, then each tier), each with its verdict."""
    spec = report.spec
    out = [f"<h2>Experiment {escape(report.name)}</h2>",
           f"<p class=meta>control {escape(spec.control_variant)}; a winner needs "
           f"{spec.min_sample:,} contacted per variant and p &lt; {spec.significance:g}</p>"]
    test = describe_test(report)
    if test:
        out.append(f"<p class=meta>{escape(test)}</p>")
    for result in [report.total, *report.by_tier.values()]:
        css = "good" if result.verdict.winner else "note"
        rows = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>"
                       for cells in arm_cells(result))
        out += [f"<h3>{escape(result.name)}</h3>",
                "<table><thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in ARM_HEAD)
                + f"</tr></thead><tbody>{rows}</tbody></table>",
                f"<p class={css}>{escape(describe_verdict(result))}</p>"]
    return out


def _deliveries(run: dict[str, Any], timeline: Timeline) -> list[str]:
    statuses = [s for s, n in run["deliveries"].items() if n] or ["sent"]
    rows = [(c, r) for c, r in sorted(run["by_channel"].items())]
    rows.append(("all", run["deliveries"]))
    table = ("<table><thead><tr><th>channel</th>"
             + "".join(f"<th>{escape(s)}</th>" for s in statuses) + "</tr></thead><tbody>"
             + "".join("<tr><td>" + escape(c) + "</td>"
                       + "".join(f"<td>{r.get(s, 0):,}</td>" for s in statuses) + "</tr>"
                       for c, r in rows) + "</tbody></table>")
    tier_rows = sorted(run.get("by_tier", {}).items())
    tiers = ("<table><thead><tr><th>tier</th>"
             + "".join(f"<th>{escape(s)}</th>" for s in statuses) + "</tr></thead><tbody>"
             + "".join("<tr><td>" + escape(t) + "</td>"
                       + "".join(f"<td>{r.get(s, 0):,}</td>" for s in statuses) + "</tr>"
                       for t, r in tier_rows) + "</tbody></table>")
    out = ["<h2>Deliveries</h2>", table, "<h2>Deliveries per tier</h2>", tiers]
    failures = run.get("failure_reasons") or []
    out.append("<h2>Top failure reasons</h2>")
    if failures:
        out.append("<table><thead><tr><th>channel</th><th>provider code</th><th>reason"
                   "</th><th>count</th></tr></thead><tbody>" + "".join(
                       f"<tr><td>{escape(f['channel'] or '–')}</td>"
                       f"<td>{escape(f['code'] or '–')}</td>"
                       f"<td>{escape(f['reason'] or '–')}</td><td>{f['count']:,}</td></tr>"
                       for f in failures) + "</tbody></table>")
    else:
        out.append("<p class=note>No failed sends.</p>")
    return [*out, "<h2>Sends and failures over time</h2>", timeline_chart(timeline)]


def _messages(messages: list[dict[str, Any]]) -> list[str]:
    """Each tier's message as a sample recipient got it: channel, subject, first lines."""
    rows = []
    for m in messages:
        lines = [x.strip() for x in (m.get("body") or "").splitlines() if x.strip()][:3]
        rows.append(f"<tr><td>{escape(m['tier'])}</td><td>{escape(m.get('channel') or '–')}"
                    f"</td><td>{escape(m.get('subject') or '–')}</td><td>"
                    + "<br>".join(escape(x[:160]) for x in lines) + "</td></tr>")
    return ["<h2>The messages, per tier</h2>",
            "<table><thead><tr><th>tier</th><th>channel</th><th>subject</th><th>first lines"
            "</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>",
            "<p class=note>Rendered now for one sample recipient of each tier "
            "(<code>herald preview</code>).</p>"]


# -- charts -----------------------------------------------------------------------------
def el(tag: str, content: str = "", **attrs: Any) -> str:
    """An SVG element with quoted, escaped attributes (``stroke_width`` → ``stroke-width``,
    ``cls`` → ``class``); floats are rounded to one decimal."""
    parts = []
    for name, value in attrs.items():
        if isinstance(value, float):
            value = f"{value:.1f}"
        key = "class" if name == "cls" else name.replace("_", "-")
        parts.append(f'{key}="{escape(str(value))}"')
    opening = f"<{tag} {' '.join(parts)}" if parts else f"<{tag}"
    return f"{opening}>{content}</{tag}>" if content else f"{opening}/>"


def _svg(width: int, height: int, label: str, parts: list[str]) -> str:
    return el("svg", el("title", escape(label)) + "".join(parts), cls="chart", role="img",
              aria_label=label, width=width, height=height,
              viewBox=f"0 0 {width} {height}", xmlns="http://www.w3.org/2000/svg")


def _text(x: float, y: float, words: str, **attrs: Any) -> str:
    return el("text", escape(words), x=x, y=y, **attrs)


def _legend(x: float, y: float, items: list[tuple[str, str]]) -> list[str]:
    out = []
    for label, colour in items:
        out += [el("rect", x=x, y=y - 10, width=12, height=12, fill=colour),
                _text(x + 17, y, label)]
        x += 30 + 7 * len(label)
    return out


def _nice_max(value: float, percent: bool) -> float:
    """An axis maximum at or above ``value`` whose quarters are round numbers."""
    if percent:
        return next((c for c in (0.02, 0.04, 0.08, 0.2, 0.4, 0.6, 0.8) if c >= value), 1.0)
    return float(next(m * 10 ** e for e in range(15) for m in (4, 8, 20) if m * 10 ** e >= value))


def _axis(left: float, top: float, width: float, plot_h: float, ymax: float,
          percent: bool) -> list[str]:
    parts = []
    for k in range(5):
        value = ymax * k / 4
        y = top + plot_h - plot_h * k / 4
        label = f"{value:,.0f}"
        if percent:
            label = f"{value * 100:.1f}%" if ymax < 0.04 else f"{value * 100:.0f}%"
        parts += [el("line", x1=left, x2=width - 10, y1=y, y2=y, stroke=GRID),
                  _text(left - 6, y + 4, label, text_anchor="end")]
    return parts


def rate_chart(rows: list[Row]) -> str:
    """Grouped bars: each tier's conversion rate, contacted and held out, with intervals."""
    if not rows:
        return "<p class=note>No tiers.</p>"
    width, height, left, bottom, top = 760, 300, 56, 40, 30
    plot_h = height - bottom - top
    highs = [wilson(g.converted, g.recipients)[1] for r in rows
             for g in (r.contacted, r.held_out) if g.recipients]
    ymax = _nice_max(max(highs, default=0.01), percent=True)
    band = (width - left - 10) / len(rows)
    bar = min(48.0, band / 3)
    parts = _axis(left, top, width, plot_h, ymax, percent=True)
    for i, row in enumerate(rows):
        centre = left + i * band + band / 2
        for j, (group, colour, name) in enumerate(((row.contacted, CONTACTED, "contacted"),
                                                   (row.held_out, HELD_OUT, "held out"))):
            x = centre - bar + j * bar
            if not group.recipients:
                parts.append(_text(x + bar / 2, top + plot_h - 4, "n/a", text_anchor="middle",
                                   font_size=10))
                continue
            rate = group.converted / group.recipients
            h = plot_h * rate / ymax
            low, high = wilson(group.converted, group.recipients)
            tip = (f"{row.name}, {name}: {group.converted:,} of {group.recipients:,} "
                   f"({pct(rate)}; 95% CI {pct(low)} to {pct(high)})")
            y_low, y_high = (top + plot_h - plot_h * v / ymax for v in (low, high))
            cx = x + bar / 2
            parts.append(el(
                "g", el("title", escape(tip))
                + el("rect", cls="bar", x=x + 2, y=top + plot_h - h, width=bar - 4,
                     height=max(h, 0.5), fill=colour)
                + el("path", d=f"M{cx:.1f} {y_low:.1f}V{y_high:.1f}M{cx - 4:.1f} {y_low:.1f}"
                              f"h8M{cx - 4:.1f} {y_high:.1f}h8",
                     stroke=INK, fill="none", stroke_width=1.2)))
        parts.append(_text(centre, height - bottom + 18, row.name, text_anchor="middle"))
    parts += _legend(left, 16, [("contacted", CONTACTED), ("held out", HELD_OUT)])
    return _svg(width, height, "Conversion rate by tier, contacted and held out", parts)


def uplift_chart(rows: list[Row]) -> str:
    """A forest plot: each row's uplift in percentage points with its 95% interval."""
    measured = [(r, r.uplift) for r in rows]
    width, row_h, left, right = 760, 30, 150, 30
    height = 40 + row_h * len(rows)
    values = [v for _, u in measured if u for v in (u.low, u.high)] or [-0.01, 0.01]
    span = max(abs(min(values)), abs(max(values)), 0.01) * 1.1
    plot_w = width - left - right

    def x_of(v: float) -> float:
        return left + plot_w * (v + span) / (2 * span)

    parts = [el("line", x1=x_of(0), x2=x_of(0), y1=8, y2=height - 24, stroke=INK,
                stroke_dasharray="3 3")]
    for tick in (-span, -span / 2, 0.0, span / 2, span):
        parts.append(_text(x_of(tick), height - 8, f"{tick * 100:+.1f} pp",
                           text_anchor="middle"))
    for i, (row, found) in enumerate(measured):
        y = 20 + i * row_h
        parts.append(_text(8, y + 4, row.name))
        if found is None:
            parts.append(_text(x_of(0) + 8, y + 4, row.note or "", fill="#6b7280"))
            continue
        colour = "#15803d" if found.low > 0 else FAILED if found.high < 0 else CONTACTED
        parts.append(el("g", el("title", escape(f"{row.name}: {describe_uplift(row)}"))
                        + el("line", x1=x_of(found.low), x2=x_of(found.high), y1=y, y2=y,
                             stroke=colour, stroke_width=3)
                        + el("circle", cx=x_of(found.absolute), cy=y, r=5, fill=colour),
                        cls="uplift"))
    return _svg(width, height, "Uplift per tier with 95% intervals", parts)


def timeline_chart(timeline: Timeline) -> str:
    """Stacked bars: messages sent and failed per time bucket."""
    if timeline.start is None:
        return "<p class=note>Nothing was sent or failed in this run.</p>"
    width, height, left, bottom, top = 760, 240, 56, 40, 30
    plot_h = height - bottom - top
    n = len(timeline.sent)
    ymax = _nice_max(max(s + f for s, f in zip(timeline.sent, timeline.failed, strict=True)),
                     percent=False)
    band = (width - left - 10) / n
    parts = _axis(left, top, width, plot_h, ymax, percent=False)
    fmt = "%H:%M:%S" if timeline.step < timedelta(minutes=1) else (
        "%m-%d %H:%M" if timeline.step < timedelta(days=1) else "%Y-%m-%d")
    for i, (sent, failed) in enumerate(zip(timeline.sent, timeline.failed, strict=True)):
        x = left + i * band
        when = timeline.start + i * timeline.step
        h_sent, h_failed = plot_h * sent / ymax, plot_h * failed / ymax
        tip = f"{when:%Y-%m-%d %H:%M:%S} UTC: {sent:,} sent, {failed:,} failed"
        parts.append(el("g", el("title", escape(tip))
                        + el("rect", x=x + 1, y=top + plot_h - h_sent, width=max(band - 2, 1),
                             height=h_sent, fill=CONTACTED)
                        + el("rect", x=x + 1, y=top + plot_h - h_sent - h_failed,
                             width=max(band - 2, 1), height=h_failed, fill=FAILED),
                        cls="bucket"))
        if i in (0, n - 1) or (n > 2 and i == n // 2):
            parts.append(_text(x + band / 2, height - bottom + 18, f"{when:{fmt}}",
                               text_anchor="middle"))
    parts += _legend(left, 16, [("sent", CONTACTED), ("failed", FAILED)])
    step = timeline.step
    label = "Messages sent and failed per " + (
        format_duration(step) if step >= timedelta(minutes=1)
        else f"{int(step.total_seconds())} s")
    parts.append(_text(width - 10, 16, label, text_anchor="end"))
    return _svg(width, height, label, parts)
