"""Content experiments: sticky assignment, its independence from the holdout, the
statistics against hand-computed and published values, the verdict's refusals, the YAML's
errors, and test-then-winner end to end with Herald's clock advanced."""

from __future__ import annotations

import json
import math
import sqlite3
from collections import Counter
from datetime import timedelta
from statistics import NormalDist

import pytest
from sqlalchemy import select

from herald.core import clock
from herald.core.db import experiments as experiments_table
from herald.core.errors import ConfigError, ValidationFailed
from herald.delivery import ledger, ledger_reads
from herald.delivery.policy import in_holdout
from herald.delivery.variants import assign, in_test
from herald.flows.engine import run_local
from herald.flows.validate import check_flow
from herald.reporting import experiments
from herald.reporting.experiments import Arm, verdict
from herald.reporting.stats import chi_squared_sf, chi_squared_test, two_proportion_test

from .helpers import outbox_files

WEIGHTS = [("a", 1.0), ("b", 1.0)]


# -- assignment -------------------------------------------------------------------------
def test_assignment_is_sticky_and_follows_the_weights() -> None:
    keys = [str(i) for i in range(20_000)]
    first = [assign("winback", "subject", k, [("a", 3), ("b", 1)]) for k in keys]
    again = [assign("winback", "subject", k, [("a", 3), ("b", 1)]) for k in keys]
    assert first == again  # the same person, the same variant, on every call
    share_b = first.count("b") / len(keys)
    assert abs(share_b - 0.25) < 4 * math.sqrt(0.25 * 0.75 / len(keys))
    # another experiment (or scope) draws afresh: about half the people change arm
    other = [assign("winback", "body", k, WEIGHTS) for k in keys]
    even = [assign("winback", "subject", k, WEIGHTS) for k in keys]
    changed = sum(x != y for x, y in zip(other, even, strict=True)) / len(keys)
    assert 0.45 < changed < 0.55
    assert assign("welcome", "subject", "7", [("only", 1)]) == "only"
    with pytest.raises(ValueError):
        assign("s", "e", "k", [])


def test_variants_are_independent_of_the_holdout_and_the_test_share() -> None:
    """Over 100,000 keys, the held-out 5% splits between the variants like everyone
    else (within sampling error of the weights), and each variant loses 5% to it."""
    n = 100_000
    weights = [("a", 0.5), ("b", 0.3), ("c", 0.2)]
    held: Counter[str] = Counter()
    everyone: Counter[str] = Counter()
    tested: Counter[str] = Counter()
    for i in range(n):
        key = str(i)
        variant = assign("winback", "winback", key, weights)
        everyone[variant] += 1
        if in_holdout("winback", key, 0.05):
            held[variant] += 1
        if in_test("winback", "winback", key, 0.2):
            tested[variant] += 1
    total_held = sum(held.values())
    assert abs(total_held / n - 0.05) < 4 * math.sqrt(0.05 * 0.95 / n)
    for name, weight in weights:
        # the variant's share among the held out, within 4 standard errors of its weight
        assert abs(held[name] / total_held - weight) < 4 * math.sqrt(
            weight * (1 - weight) / total_held), name
        # and among everyone, and among the test share
        assert abs(everyone[name] / n - weight) < 4 * math.sqrt(weight * (1 - weight) / n)
        share = sum(tested.values())
        assert abs(tested[name] / share - weight) < 4 * math.sqrt(
            weight * (1 - weight) / share)
        # each variant loses the holdout's 5% to the control group
        rate = held[name] / everyone[name]
        assert abs(rate - 0.05) < 4 * math.sqrt(0.05 * 0.95 / everyone[name]), name


# -- statistics -------------------------------------------------------------------------
@pytest.mark.parametrize(("x", "df", "p"), [
    # published critical values of the chi-squared distribution (e.g. NIST/SEMATECH
    # e-Handbook of Statistical Methods, table 1.3.6.7.4): upper-tail probability p
    (3.841, 1, 0.05), (6.635, 1, 0.01), (5.991, 2, 0.05), (9.210, 2, 0.01),
    (7.815, 3, 0.05), (11.345, 3, 0.01), (9.488, 4, 0.05), (11.070, 5, 0.05),
    (15.086, 5, 0.01), (18.307, 10, 0.05),
])
def test_chi_squared_tail_matches_the_published_table(x: float, df: int, p: float) -> None:
    assert chi_squared_sf(x, df) == pytest.approx(p, abs=5e-5)


def test_chi_squared_three_arms_by_hand() -> None:
    """10/100, 20/100 and 30/100 converted: pooled 0.2, so 20 expected conversions and
    80 expected non-conversions per arm; (10-20)²/20 + 0 + (30-20)²/20 + (90-80)²/80 + 0
    + (70-80)²/80 = 5 + 5 + 1.25 + 1.25 = 12.5 on 2 degrees of freedom, whose tail is
    exactly e^(-12.5/2)."""
    stat, df, p = chi_squared_test([(10, 100), (20, 100), (30, 100)])
    assert stat == pytest.approx(12.5)
    assert df == 2
    assert p == pytest.approx(math.exp(-6.25))  # 0.0019305
    assert chi_squared_test([(0, 50), (0, 70)]) == (0.0, 1, 1.0)


def test_two_proportion_by_hand() -> None:
    """130/1000 against 100/1000: pooled 230/2000 = 0.115, standard error
    sqrt(0.115 · 0.885 · (1/1000 + 1/1000)) = 0.0142671, z = 0.03 / 0.0142671 = 2.10274,
    two-sided p = 2 · (1 - Φ(2.10274)) = 0.03549."""
    z, p = two_proportion_test(130, 1000, 100, 1000)
    assert z == pytest.approx(2.10274, abs=1e-5)
    assert p == pytest.approx(0.03549, abs=1e-5)
    assert p == pytest.approx(2 * (1 - NormalDist().cdf(z)))
    # with two arms Pearson's chi-squared is the square of the pooled z
    stat, df, p_chi = chi_squared_test([(130, 1000), (100, 1000)])
    assert stat == pytest.approx(z * z) and df == 1 and p_chi == pytest.approx(p)
    assert two_proportion_test(0, 10, 0, 12) == (0.0, 1.0)


def arms(*figures: tuple[str, int, int]) -> dict[str, Arm]:
    return {name: Arm(name, n, x) for name, x, n in figures}


def test_verdict_refuses_below_the_minimum_sample() -> None:
    # a huge difference, but 499 people in one arm: no winner, and it says why
    found = verdict(arms(("a", 10, 600), ("b", 200, 499)), 500, 0.05)
    assert found.status == "not_enough_data" and found.winner is None
    assert "fewer than 500" in found.reason and "b (499)" in found.reason
    assert found.p_value is None


def test_verdict_needs_significance() -> None:
    close = verdict(arms(("a", 100, 1000), ("b", 115, 1000)), 500, 0.05)
    assert close.status == "not_enough_data" and close.winner is None
    assert close.p_value is not None and close.p_value > 0.05
    assert "no significant difference" in close.reason
    clear = verdict(arms(("a", 100, 1000), ("b", 130, 1000)), 500, 0.05)
    assert clear.winner == "b" and clear.test == "two-proportion z"
    assert clear.p_value == pytest.approx(0.03549, abs=1e-5)
    # a stricter significance level refuses the same figures
    assert verdict(arms(("a", 100, 1000), ("b", 130, 1000)), 500, 0.01).winner is None


def test_verdict_with_three_arms_uses_chi_squared_and_the_runner_up() -> None:
    found = verdict(arms(("a", 10, 100), ("b", 20, 100), ("c", 30, 100)), 100, 0.05)
    assert found.test == "chi-squared" and found.p_value == pytest.approx(math.exp(-6.25))
    # the arms differ, but c (30%) does not beat b (20%) at 0.05: no single winner
    assert found.winner is None and "does not beat b" in found.reason
    clear = verdict(arms(("a", 10, 100), ("b", 12, 100), ("c", 40, 100)), 100, 0.05)
    assert clear.winner == "c"


# -- the YAML ---------------------------------------------------------------------------
SMS_ONLY = """\
timezone: UTC
sources: {crm: "sqlite:///crm.db"}
channels:
  sms: {type: outbox, kind: sms}
caps: []
chunk_size: 40
max_workers: 2
"""
ORDERS_SQL = ("SELECT customer AS id, placed_at, amount FROM orders\n"
              "WHERE placed_at >= :since AND placed_at < :until\n")


def flow_yaml(experiment: str, conversion: bool = True) -> str:
    return ("name: promo\n"
            "audience: {source: crm, segment: people, params: {min_score: 0}, key: id,"
            " tier: tier}\n"
            "tiers:\n  default: {channels: [sms]}\n"
            + ("conversion: {segment: orders_after, window: 7d, at: placed_at, amount: amount}\n"
               if conversion else "")
            + experiment)


def files(experiment: str, conversion: bool = True) -> dict[str, str | None]:
    return {"config/herald.yaml": SMS_ONLY,
            "config/flows/promo.yaml": flow_yaml(experiment, conversion),
            "audiences/orders_after.sql": ORDERS_SQL,
            "templates/promo/default.sms.txt.j2": "A: hello {{ name }} ({{ variant }})",
            "templates/promo/b/default.sms.txt.j2": "B: hello {{ name }}, last chance",
            "templates/promo/gold.email.subject.j2": None}


def orders(ws, rows: list[tuple[str, str, float]]) -> None:
    with sqlite3.connect(ws.root / "crm.db") as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS orders (customer INTEGER, placed_at TEXT, "
                     "amount REAL)")
        conn.executemany("INSERT INTO orders VALUES (?, ?, ?)", rows)


def test_yaml_errors_name_file_line_and_field(make_workspace) -> None:
    bad = ("experiment:\n  variants: {a: 1, b: 0}\n")
    with pytest.raises(ConfigError) as err:
        make_workspace(files(bad)).flow("promo")
    assert "config/flows/promo.yaml:7 experiment.variants" in str(err.value)
    assert "positive" in str(err.value)

    with pytest.raises(ConfigError) as err:
        make_workspace(files("experiment:\n  variants: {a: 1, b: 1}\n  control: c\n"),
                       folder="ws2").flow("promo")
    assert "config/flows/promo.yaml:" in str(err.value) and "control 'c'" in str(err.value)

    with pytest.raises(ConfigError) as err:
        make_workspace(files("experiment:\n  variants: {a: 1, b: 1}\n  test_share: 0.2\n"),
                       folder="ws3").flow("promo")
    assert "test_share and decide_after go together" in str(err.value)


def test_a_variant_needs_templates_and_a_test_needs_conversions(make_workspace) -> None:
    no_files = files("experiment:\n  variants: {a: 1, c: 1}\n")
    ws = make_workspace(no_files)
    orders(ws, [])
    with pytest.raises(ValidationFailed) as err:
        check_flow(ws, "promo")
    text = str(err.value)
    assert "config/flows/promo.yaml:7 experiment.variants.c" in text
    assert "no sms templates of its own for tier 'default'" in text
    assert "templates/promo/c/default.sms.*.j2" in text

    blind = files("experiment:\n  variants: {a: 1, b: 1}\n  test_share: 0.2\n"
                  "  decide_after: 2d\n", conversion=False)
    with pytest.raises(ValidationFailed) as err:
        check_flow(make_workspace(blind, folder="ws2"), "promo")
    assert "config/flows/promo.yaml:7 experiment.test_share" in str(err.value)

    broken = files("experiment:\n  variants: {a: 1, b: 1}\n")
    broken["templates/promo/b/default.sms.txt.j2"] = "B: {{ points }}"
    ws = make_workspace(broken, folder="ws3")
    orders(ws, [])
    with pytest.raises(ValidationFailed) as err:
        check_flow(ws, "promo")
    assert "templates/promo/b/default.sms.txt.j2:1: uses 'points'" in str(err.value)


# -- end to end -------------------------------------------------------------------------
def sent_messages(ws) -> list[dict]:
    out = []
    for path in outbox_files(ws):
        if path.suffix == ".jsonl":
            out += [json.loads(line) for line in path.read_text().splitlines() if line]
    return out


def ledger_rows(ws, run_key: str) -> dict[str, ledger.Existing]:
    with ws.store.connect() as conn:
        return ledger_reads.existing(conn, "promo", run_key, [str(i) for i in range(1, 2000)])


def test_ab_variants_are_sticky_across_runs(make_workspace, now) -> None:
    ws = make_workspace(files("experiment:\n  variants: {a: 1, b: 1}\n"), rows=120)
    orders(ws, [])
    run_local(ws, "promo", run_key="week-1")
    clock.advance(timedelta(days=7))
    run_local(ws, "promo", run_key="week-2")
    one, two = ledger_rows(ws, "week-1"), ledger_rows(ws, "week-2")
    sent = {k for k, r in one.items() if r.status == "sent"}
    assert len(sent) == 96  # every 5th has no phone
    assert {k: one[k].variant for k in sent} == {k: two[k].variant for k in sent}
    assert Counter(one[k].variant for k in sent).keys() == {"a", "b"}
    for message in sent_messages(ws):
        variant = one[message["recipient"]].variant
        assert message["meta"]["variant"] == variant
        assert message["body"].startswith("A: " if variant == "a" else "B: ")
        if variant == "a":
            assert message["body"].endswith("(a)")  # templates see `variant`
    assert all(r.variant is None for r in one.values() if r.status == "no_address")


TEST_THEN_WINNER = """\
experiment:
  name: subject
  variants: {a: 1, b: 1}
  test_share: 0.4
  decide_after: 2d
  min_sample: 15
  fallback: %s
"""


def run_test(make_workspace, fallback: str, b_converts: bool):
    ws = make_workspace(files(TEST_THEN_WINNER % fallback), rows=300)
    orders(ws, [])
    start = clock.now()
    dry = run_local(ws, "promo", run_key="k", dry_run=True)  # says who would wait, writes nothing
    assert {"status": "deferred", "reason": "experiment subject: waiting for the winner",
            "count": dry["deliveries"]["deferred"]} in dry["reasons"]
    with ws.store.connect() as conn:
        assert conn.execute(select(experiments_table)).first() is None
    first = run_local(ws, "promo", run_key="k")
    rows = ledger_rows(ws, "k")
    tested = {k for k, r in rows.items() if r.status == "sent"}
    waiting = {k for k, r in rows.items() if r.status == "deferred"}
    assert first["deliveries"]["sent"] == len(tested) and tested and waiting
    assert all(in_test("promo", "subject", k, 0.4) for k in tested)
    assert not any(in_test("promo", "subject", k, 0.4) for k in waiting)
    decide_at = start + timedelta(days=2)
    assert {r.not_before.replace(tzinfo=decide_at.tzinfo) for k, r in rows.items()
            if k in waiting} == {decide_at}
    assert first["deferred_until"] is not None
    # conversions during the test: in the test share, b's recipients order, a's do not
    if b_converts:
        when = (start + timedelta(hours=5)).strftime("%Y-%m-%d %H:%M:%S")
        orders(ws, [(int(k), when, 10.0) for k in tested if rows[k].variant == "b"])
    # a day later the same run key sends nothing new
    clock.advance(timedelta(days=1))
    early = run_local(ws, "promo", run_key="k")
    assert early["deliveries"]["sent"] == 0 and early["deliveries"]["deferred"] == len(waiting)
    # after decide_after, the follow-up decides and sends to the rest
    clock.advance(timedelta(days=1, minutes=1))
    later = run_local(ws, "promo", run_key="k")
    return ws, tested, waiting, rows, later


def test_test_then_winner_sends_the_winner_to_the_rest_only(make_workspace, now) -> None:
    ws, tested, waiting, before, later = run_test(make_workspace, "control", b_converts=True)
    after = ledger_rows(ws, "k")
    assert later["deliveries"]["sent"] == len(waiting)
    assert all(after[k].variant == "b" and after[k].status == "sent" for k in waiting)
    assert all(after[k].variant == before[k].variant for k in tested)  # unchanged
    messages = sent_messages(ws)
    per_person = Counter(m["recipient"] for m in messages)
    assert set(per_person.values()) == {1}  # nobody receives two variants
    assert set(per_person) == tested | waiting
    with ws.store.connect() as conn:
        row = conn.execute(select(experiments_table)).one()
    assert (row.experiment, row.status, row.winner, row.outcome) == (
        "subject", "decided", "b", "winner")
    assert "b converts best" in row.reason
    figures = json.loads(row.figures)
    assert [a["variant"] for a in figures["arms"]] == ["a", "b"]
    assert figures["verdict"]["winner"] == "b"
    # a third run with the key sends nothing more
    clock.advance(timedelta(hours=1))
    assert run_local(ws, "promo", run_key="k")["deliveries"]["sent"] == 0
    # the report: the test's arms, the winner sent to the rest counted in b
    reports = experiments.compute(ws, "promo", "k", None)
    assert reports[0].state is not None and reports[0].state.winner == "b"
    # the verdict's arms hold the randomised test share only; the rest are counted apart
    assert reports[0].total.arms["b"].recipients == sum(
        1 for k in tested if before[k].variant == "b")
    assert [(a.variant, a.recipients) for a in reports[0].rest.values()] == [
        ("b", len(waiting))]


@pytest.mark.parametrize(("fallback", "status", "variant"),
                         [("control", "sent", "a"), ("stop", "stopped", None)])
def test_without_a_winner_the_fallback_decides(make_workspace, fallback, status,
                                               variant) -> None:
    with clock.using(clock.Clock(clock.parse("2026-11-22T16:30Z"), frozen=True)):
        ws, tested, waiting, _, later = run_test(make_workspace, fallback, b_converts=False)
        after = ledger_rows(ws, "k")
        assert {(after[k].status, after[k].variant) for k in waiting} == {(status, variant)}
        assert later["deliveries"].get("stopped", 0) == (len(waiting) if status == "stopped"
                                                         else 0)
        with ws.store.connect() as conn:
            row = conn.execute(select(experiments_table)).one()
        assert row.outcome == fallback and row.reason.startswith("no winner (")
        assert Counter(m["recipient"] for m in sent_messages(ws)).most_common(1)[0][1] == 1


# -- the report -------------------------------------------------------------------------
def cli(capsys, *args: str) -> tuple[int, str, str]:
    from herald.flows.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    captured = capsys.readouterr()
    return int(exc.value.code or 0), captured.out, captured.err


def test_report_shows_each_variant_and_the_verdict(make_workspace, capsys) -> None:
    config = SMS_ONLY + "writeback: {source: crm, prefix: an_}\n"
    ws = make_workspace({**files("experiment:\n  variants: {a: 1, b: 1}\n"
                                 "  min_sample: 300\n"),
                         "config/herald.yaml": config}, rows=1500)
    orders(ws, [])
    # a table written by an earlier Herald, without the variant column
    with sqlite3.connect(ws.root / "crm.db") as conn:
        conn.execute("CREATE TABLE an_deliveries (flow TEXT, run_key TEXT, run_id TEXT, "
                     "recipient TEXT, tier TEXT, channel TEXT, status TEXT, arm TEXT, "
                     "reason TEXT, created_at TIMESTAMP, sent_at TIMESTAMP, converted "
                     "BOOLEAN, converted_at TIMESTAMP, revenue FLOAT)")
    start = clock.now()
    run_local(ws, "promo", run_key="r")
    rows = {k: r for k, r in ledger_rows(ws, "r").items() if r.status == "sent"}
    # b converts 3 in 8, a 1 in 8 (by key; keys ending in 0 or 5 have no phone),
    # an hour after the send
    when = (start + timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S")
    buyers = [k for k, r in rows.items()
              if int(k) % 10 in ((1, 2, 3) if r.variant == "b" else (1,))]
    orders(ws, [(int(k), when, 5.0) for k in buyers])
    n = Counter(r.variant for r in rows.values())
    x = Counter(rows[k].variant for k in buyers)

    code, out, _ = cli(capsys, "report", "promo", "--json", "--html", "-w", str(ws.root))
    assert code == 0
    (experiment,) = json.loads(out)["experiments"]
    total = experiment["total"]
    assert [(a["variant"], a["contacted"], a["converted"]) for a in total["arms"]] == [
        ("a", n["a"], x["a"]), ("b", n["b"], x["b"])]
    assert total["arms"][1]["revenue"] == 5.0 * x["b"]
    z, p = two_proportion_test(x["b"], n["b"], x["a"], n["a"])
    assert total["against_control"]["b"]["p_value"] == pytest.approx(p)
    assert total["verdict"]["winner"] == "b" and total["verdict"]["status"] == "winner"
    # per tier the arms are below 300: not enough data, and it says so
    assert {t["name"] for t in experiment["by_tier"]} == {"gold", "silver", "bronze"}
    for tier in experiment["by_tier"]:
        assert tier["verdict"]["status"] == "not_enough_data"
        assert tier["verdict"]["reason"].startswith("fewer than 300 contacted in")
    from herald.reporting.text import experiments_markdown

    artifact = experiments_markdown(experiments.compute(ws, "promo", "r", {
        k: (start, 5.0) for k in buyers}))  # what the Prefect conversion artifact adds
    assert "## Experiment promo" in artifact and "### all: winner: b" in artifact
    assert f"| b | {n['b']:,} | {x['b']:,} |" in artifact
    page = (ws.root / "reports/promo/r.html").read_text()
    assert "<h2>Experiment promo</h2>" in page and "winner: b" in page

    code, out, _ = cli(capsys, "report", "promo", "--write-back", "-w", str(ws.root))
    assert code == 0
    assert "experiment promo" in out and "winner: b" in out
    assert "not enough data: fewer than 300 contacted" in out
    with sqlite3.connect(ws.root / "crm.db") as conn:
        written = dict(conn.execute("SELECT recipient, variant FROM an_deliveries"))
    assert {k: written[k] for k in rows} == {k: r.variant for k, r in rows.items()}


def test_a_tier_runs_its_own_experiment_or_none(make_workspace) -> None:
    flow = ("name: promo\n"
            "audience: {source: crm, segment: people, params: {min_score: 0}, key: id,"
            " tier: tier}\n"
            "tiers:\n"
            "  gold:\n"
            "    channels: [sms]\n"
            "    experiment: {name: gold_test, variants: {a: 1, c: 1}}\n"
            "  silver: {channels: [sms], experiment: false}\n"
            "  default: {channels: [sms]}\n"
            "experiment: {variants: {a: 1, b: 1}}\n")
    ws = make_workspace({**files(""), "config/flows/promo.yaml": flow})
    with pytest.raises(ValidationFailed) as err:
        check_flow(ws, "promo")
    assert str(err.value).count("\n") == 0  # one problem: gold's c has no templates
    assert ("config/flows/promo.yaml:6 tiers.gold.experiment.variants.c: variant 'c' has "
            "no sms templates of its own for tier 'gold'") in str(err.value)
    engine_ws = make_workspace({**files(""), "config/flows/promo.yaml": flow,
                                "templates/promo/c/default.sms.txt.j2": "C: {{ name }}"},
                               folder="ok", rows=80)
    spec = engine_ws.flow("promo")
    assert set(spec.experiments()) == {"gold_test", "promo"}
    summary = run_local(engine_ws, "promo", run_key="t")
    rows = ledger_rows(engine_ws, "t")
    by_tier: dict[str, set] = {}
    for r in rows.values():
        if r.status == "sent":
            by_tier.setdefault(r.tier, set()).add(r.variant)
    assert by_tier == {"gold": {"a", "c"}, "silver": {None}, "bronze": {"a", "b"}}
    assert summary["deliveries"]["sent"] == 64
    for message in sent_messages(engine_ws):
        variant = rows[message["recipient"]].variant
        assert message["body"][0] == {"a": "A", "b": "B", "c": "C", None: "A"}[variant]
