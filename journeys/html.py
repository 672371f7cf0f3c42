"""A journey's report as one self-contained HTML page: the funnel of its steps as an SVG
chart, the per-step table and the goal's uplift over the holdout. Nothing is fetched when
the page opens (no scripts, fonts or stylesheets from elsewhere), like the flows' report."""

from __future__ import annotations

from html import escape
from typing import Any

from herald.reporting.htmlreport import CONTACTED, CSS, HELD_OUT, _svg, _text, el
from herald.reporting.text import pp


def render(data: dict[str, Any], state: dict[str, Any]) -> str:
    """The page for ``herald journey report NAME --html`` (``data``: the report's JSON)."""
    name = data["journey"]
    exited = ", ".join(f"{escape(r)} {n:,}" for r, n in data["exited"].items()) or "none"
    queued = ", ".join(f"{escape(s)} {n:,}" for s, n in data["queued"].items())
    cards = [("entered", data["entered"]), ("inside", data["live"]),
             ("completed", data["completed"]), ("exited", sum(data["exited"].values()))]
    parts = [f"<h1>Journey {escape(name)}</h1>",
             f"<p class=meta>version {escape(state['version'])}; exited: {exited}"
             + (f"; waiting with their message queued, not sent: {queued}" if queued else "")
             + "</p>",
             "<div class=cards>" + "".join(f"<div class=card><b>{n:,}</b><span>{label}"
                                           "</span></div>" for label, n in cards) + "</div>",
             "<h2>Steps</h2>", funnel(data["steps"]), _steps(data)]
    if data["goal"]:
        parts += _goal(data["goal"])
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<title>Herald journey: {escape(name)}</title><style>{CSS}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")


def funnel(steps: dict[str, dict[str, Any]]) -> str:
    """Horizontal bars: recipients who did each step, and how many of them converted."""
    rows = list(steps.items())
    top = max([row["visited"] for _, row in rows] + [1])
    label_w, bar_w, row_h = 150, 560, 26
    height = 30 + row_h * len(rows)
    out = []
    for i, (step, row) in enumerate(rows):
        y = 20 + i * row_h
        width = bar_w * row["visited"] / top
        out += [_text(0, y + 14, step),
                el("rect", x=label_w, y=y, width=max(width, 1.0), height=18, fill=CONTACTED),
                el("rect", x=label_w, y=y + 12, width=bar_w * row["converted"] / top,
                   height=6, fill=HELD_OUT),
                _text(label_w + max(width, 1.0) + 6, y + 14, f"{row['visited']:,}")]
    return _svg(label_w + bar_w + 80, height, "Recipients at each step (blue) and how many "
                "of them converted (grey)", out)


def _steps(data: dict[str, Any]) -> str:
    head = "<tr><th>step</th><th>visited</th><th>converted</th><th>outcomes</th></tr>"
    body = "".join(
        f"<tr><td>{escape(step)}</td><td>{row['visited']:,}</td><td>{row['converted']:,}</td>"
        f"<td>{escape(', '.join(f'{o} {n:,}' for o, n in row['outcomes'].items()))}</td></tr>"
        for step, row in data["steps"].items())
    return f"<table>{head}{body}</table>"


def _goal(goal: dict[str, Any]) -> list[str]:
    t, h, u = goal["treated"], goal["holdout"], goal["uplift"]

    def rate(group: dict[str, Any]) -> str:
        return f"{group['rate']:.1%}" if group["rate"] is not None else "–"

    out = ["<h2>Goal</h2>",
           f"<p>{escape(goal['segment'])} within {goal['window_seconds'] // 86400} days of "
           f"entry: treated {t['converted']:,}/{t['recipients']:,} ({rate(t)}), holdout "
           f"{h['converted']:,}/{h['recipients']:,} ({rate(h)}).</p>"]
    if u:
        verdict = "good" if u["significant"] and u["absolute"] > 0 else \
            "bad" if u["significant"] else "note"
        out.append(f"<p class={verdict}>uplift {pp(u['absolute'])}, 95% interval "
                   f"[{pp(u['ci_low'])}, {pp(u['ci_high'])}]</p>")
    else:
        out.append(f"<p class=note>uplift not measurable: {escape(goal['note'] or '')}</p>")
    if goal["variants"]:
        out.append("<table><tr><th>variant</th><th>recipients</th><th>converted</th></tr>"
                   + "".join(f"<tr><td>{escape(v['step'])}/{escape(v['variant'])}</td>"
                             f"<td>{v['recipients']:,}</td><td>{v['converted']:,}</td></tr>"
                             for v in goal["variants"]) + "</table>")
    return out
