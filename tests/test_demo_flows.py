"""The shipped demo workspace runs end to end: every flow validates, sends through the
outbox in both languages, records every recipient, and sends nothing on a rerun."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from herald.audiences.demo_shop import build_demo_shop
from herald.core.db import resolve_url
from herald.core.workspace import Workspace
from herald.flows.engine import run_local
from herald.flows.validate import check_flow

from .helpers import outbox_files, outbox_messages

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("demo")
    shutil.copytree(ROOT / "config", root / "config")
    shutil.copytree(ROOT / "templates", root / "templates",
                    ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (root / "audiences").mkdir()
    for sql in (ROOT / "audiences").glob("*.sql"):
        shutil.copy(sql, root / "audiences" / sql.name)
    ws = Workspace.open(root)
    build_demo_shop(resolve_url(ws.config.sources["shop"], root), customers=4000)
    return ws


def test_every_demo_flow_validates(demo) -> None:
    assert demo.flow_names() == ["member_upgrade", "welcome", "winback"]
    for name in demo.flow_names():
        checked = check_flow(demo, name)
        assert checked.templates > 0


@pytest.mark.parametrize("flow", ["winback", "welcome", "member_upgrade"])
def test_demo_flow_runs_end_to_end(demo, flow) -> None:
    before = outbox_messages(demo)
    summary = run_local(demo, flow, run_key="demo-test")
    d = summary["deliveries"]
    assert summary["package"]["size"] > 0
    assert d["sent"] > 0
    assert d["render_error"] == 0 and d["failed"] == 0
    # every recipient has an outcome (a new run key: `duplicate` is only a second key
    # with an address already sent to in this run)
    assert sum(d.values()) == summary["package"]["size"]
    assert outbox_messages(demo) - before == d["sent"]
    again = run_local(demo, flow, run_key="demo-test")
    assert again["deliveries"]["sent"] == 0
    assert again["deliveries"]["duplicate"] == summary["package"]["size"]


def test_outbox_holds_chinese_and_english(demo) -> None:
    run_local(demo, "winback", run_key="demo-test")  # a no-op if it already ran
    texts = []
    for path in outbox_files(demo):
        if path.suffix == ".jsonl" and "/winback/demo-test/" in str(path):
            texts += [json.loads(line)["body"] for line in path.read_text().splitlines()]
    assert any("回T退订" in t for t in texts)
    assert any("STOP" in t for t in texts)


def test_simulated_response_gives_an_explainable_uplift(demo, capsys) -> None:
    """The demo's simulated week after the win-back: contacted customers order more often,
    and the report measures exactly the orders the simulation placed."""
    from herald.audiences.demo_response import response_chance, simulate_response
    from herald.reporting.conversions import compute
    from herald.reporting.runs import contacts

    run_local(demo, "winback", run_key="demo-test")  # a no-op if it already ran
    people = [(c.recipient, c.tier, c.contacted, c.at, c.variant)
              for c in contacts(demo, "winback", "demo-test")]
    url = resolve_url(demo.config.sources["shop"], demo.root)
    conversion = demo.flow("winback").conversion
    assert conversion is not None
    first = simulate_response(url, people, conversion.window)
    assert simulate_response(url, people, conversion.window) == first  # same orders again
    simulated: dict[tuple[str, bool], int] = {}
    for s in first:
        simulated[s.tier, s.contacted] = simulated.get((s.tier, s.contacted), 0) + s.ordered
    report = compute(demo, "winback", "demo-test")
    for tier, row in report.tiers.items():
        assert row.contacted.converted == simulated.get((tier, True), 0), tier
        assert row.held_out.converted == simulated.get((tier, False), 0), tier
    assert report.total.contacted.recipients == sum(1 for p in people if p[2])
    expected = sum(response_chance(p[1], True, p[4]) for p in people if p[2])
    got = report.total.contacted.converted
    assert abs(got - expected) < 4 * expected ** 0.5  # binomial noise around the chances
    uplift = report.total.uplift
    assert uplift is not None and uplift.absolute > 0
    assert report.has_revenue and report.total.contacted.revenue > 0
    # the command the Makefile's demo runs: the same orders again, and says what it did
    from .test_cli import cli

    code, out, _ = cli(capsys, "demo-data", "--simulate-response", "winback",
                       "-w", str(demo.root))
    assert code == 0 and "demo data, not a measurement" in out
    champions = next(s for s in first if s.tier == "champions" and s.contacted)
    rows = [line.split() for line in out.splitlines()]
    assert ["champions", "contacted", f"({champions.variant})", f"{champions.recipients:,}",
            f"{champions.ordered:,}", f"{champions.chance:.0%}"] in rows
    assert compute(demo, "winback", "demo-test").total.contacted.converted == got


@pytest.mark.parametrize("name", ["churn_winback", "welcome_series"])
def test_demo_journeys_validate_and_run_over_ten_days(demo, name) -> None:
    from datetime import timedelta

    from herald.core import clock
    from herald.journeys import engine as journeys
    from herald.journeys import load
    from herald.journeys.report import report, status

    assert load.names(demo) == ["churn_winback", "welcome_series"]
    assert load.check(demo, name).templates > 0
    with clock.using(clock.Clock(clock.now(), frozen=True)):
        first = journeys.tick_local(demo, name)
        for _ in range(10):
            clock.advance(timedelta(days=1))
            journeys.tick_local(demo, name)
        state = status(demo, name)
        results = report(demo, name)
    assert first["entered"] > 0 and state["enrollments"] == results["entered"]
    assert state["completed"] > 0 and state["exited"]["holdout"] > 0
    sends = [row for row in results["steps"].values() if row["messages"]]
    assert sends and all(row["messages"].get("render_error", 0) == 0
                         and row["messages"].get("failed", 0) == 0 for row in sends)
    assert sum(row["messages"].get("sent", 0) for row in sends) > first["entered"]


def test_the_demo_simulates_who_orders_after_entering_a_journey(demo, capsys) -> None:
    """`make demo` runs `herald demo-data --simulate-response JOURNEY` after a tick."""
    from herald.core import clock
    from herald.flows.cli import main
    from herald.journeys import engine as journeys

    with clock.using(clock.Clock(clock.now(), frozen=True)):
        journeys.tick_local(demo, "churn_winback")
        with pytest.raises(SystemExit) as exc:
            main(["demo-data", "--simulate-response", "churn_winback", "-w", str(demo.root)])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "simulated orders after entering churn_winback" in out
    assert "treated" in out and "held out" in out
