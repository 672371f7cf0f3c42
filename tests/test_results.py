"""Conversions and uplift on a ledger whose right answer is worked out by hand.

The fixture writes ledger rows and orders directly, at fixed times, so every figure below
can be checked on paper: who was contacted or held out, which orders fall inside their
attribution window, and the Newcombe intervals (whose method is checked against the
published values of Newcombe 1998 in test_stats.py).
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text, update

from herald.core.errors import AudienceError, HeraldError, ValidationFailed
from herald.delivery import ledger
from herald.flows.validate import check_flow
from herald.reporting.conversions import compute
from herald.reporting.text import markdown

T0 = datetime(2026, 11, 1, 10, 0, tzinfo=UTC)  # the policy's decisions
SENT = T0 + timedelta(hours=1)  # the sends

FLOW = """\
name: promo
audience: {source: crm, segment: people, params: {min_score: 0}, key: id, tier: tier}
tiers:
  gold: {channels: [email]}
  silver: {channels: [sms]}
  bronze: {channels: [sms]}
  platinum: {channels: [email]}
  default: {channels: [sms]}
holdout: 0.2
conversion: {segment: orders_after, window: 7d, at: placed_at, amount: amount}
"""
ORDERS_SQL = ("SELECT customer AS id, placed_at, amount FROM orders\n"
              "WHERE placed_at >= :since AND placed_at < :until\n")
FILES = {"config/flows/promo.yaml": FLOW, "audiences/orders_after.sql": ORDERS_SQL}

# (recipient, tier, status, channel)
LEDGER = (
    [(str(i), "gold", "sent", "email") for i in range(1, 11)]
    + [(str(i), "gold", "held_out", None) for i in range(11, 16)]
    + [(str(i), "gold", "capped", "email") for i in range(16, 19)]
    + [(str(i), "silver", "sent", "sms") for i in range(21, 29)]
    + [(str(i), "silver", "no_address", "sms") for i in (29, 30)]
    + [(str(i), "bronze", "sent", "sms") for i in range(31, 37)]
    + [(str(i), "bronze", "held_out", None) for i in range(37, 41)]
)
ORDERS = [
    (1, T0 + timedelta(hours=2), 100.0),       # counts
    (1, T0 + timedelta(days=3), 50.0),         # counts: same person, more revenue
    (2, T0 + timedelta(days=1), 80.0),         # counts
    (3, T0 + timedelta(days=6), 20.0),         # counts
    (4, SENT + timedelta(days=7, minutes=-30), 40.0),  # last half hour of the window
    (5, T0 + timedelta(minutes=30), 70.0),     # before the send: not attributed
    (6, SENT + timedelta(days=7), 90.0),       # the window is half-open: not attributed
    (11, T0 + timedelta(days=2), 60.0),        # held out, converted anyway
    (12, T0 + timedelta(days=7, minutes=30)),  # held out: after its window (from T0)
    (16, T0 + timedelta(days=1), 30.0),        # capped (not contacted) but converted
    (21, T0 + timedelta(days=1), 10.0),
    (22, T0 + timedelta(days=2), 15.0),
]


def write_orders(ws, orders, source: str = "crm") -> None:
    """The CRM's orders (naive UTC timestamps; text on SQLite, as the demo shop's)."""
    engine = ws.source(source, write=True)
    sqlite = engine.dialect.name == "sqlite"
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS orders")
        conn.exec_driver_sql("CREATE TABLE orders (customer INTEGER, placed_at "
                             f"{'TEXT' if sqlite else 'TIMESTAMP'}, amount REAL)")
        rows = [{"c": o[0], "a": o[2] if len(o) > 2 else 5.0,
                 "p": (o[1].replace(tzinfo=None).isoformat(" ", "seconds") if sqlite
                       else o[1].replace(tzinfo=None))} for o in orders]
        if rows:
            conn.execute(text("INSERT INTO orders VALUES (:c, :p, :a)"), rows)


def write_ledger(ws, entries, run_key: str = "k1") -> None:
    with ws.store.begin() as conn:
        ledger.write_entries(conn, [ledger.Entry(r, t, s, c) for r, t, s, c in entries],
                             flow="promo", run_key=run_key, run_id="run-1",
                             package_id="pkg-1", at=T0)
        d = ledger.deliveries
        conn.execute(update(d).where(d.c.status == "sent").values(sent_at=SENT))


@pytest.fixture
def measured(make_workspace):
    ws = make_workspace(FILES)
    write_orders(ws, ORDERS)
    write_ledger(ws, LEDGER)
    return ws


def by_name(rows):
    return {row["name"]: row for row in rows}


def test_figures_known_by_hand(make_workspace, store_url) -> None:
    measured = make_workspace(FILES, store=store_url)  # the ledger on SQLite, then Postgres
    write_orders(measured, ORDERS)
    write_ledger(measured, LEDGER)
    report = compute(measured, "promo", "k1", now=T0 + timedelta(days=30)).to_dict()
    total = report["total"]
    assert total["contacted"] == {"recipients": 24, "converted": 6, "rate": 0.25,
                                  "revenue": 315.0, "revenue_per_recipient": 13.125}
    assert total["held_out"]["recipients"] == 9 and total["held_out"]["converted"] == 1
    assert total["held_out"]["revenue"] == 60.0
    assert total["not_contacted"] == 5  # three capped, two without an address
    up = total["uplift"]
    assert up["absolute"] == pytest.approx(0.25 - 1 / 9)
    assert (up["ci_low"], up["ci_high"]) == (pytest.approx(-0.210118, abs=1e-6),
                                              pytest.approx(0.357795, abs=1e-6))
    assert up["relative"] == pytest.approx((0.25 - 1 / 9) / (1 / 9))  # +125%
    assert up["significant"] is False

    tiers = by_name(report["by_tier"])
    assert list(tiers) == ["gold", "silver", "bronze", "platinum"]
    gold = tiers["gold"]
    assert (gold["contacted"]["converted"], gold["contacted"]["recipients"]) == (4, 10)
    assert gold["contacted"]["revenue"] == 290.0
    assert (gold["held_out"]["converted"], gold["held_out"]["recipients"]) == (1, 5)
    assert gold["not_contacted"] == 3
    assert (gold["uplift"]["ci_low"], gold["uplift"]["ci_high"]) == (
        pytest.approx(-0.283644, abs=1e-6), pytest.approx(0.530725, abs=1e-6))
    assert gold["uplift"]["relative"] == pytest.approx(1.0)  # 40% against 20%
    # silver: nobody held out, so no uplift, and the report says why
    silver = tiers["silver"]
    assert silver["contacted"]["converted"] == 2 and silver["held_out"]["recipients"] == 0
    assert silver["uplift"] is None
    assert silver["note"] == "no held-out recipients: uplift cannot be measured"
    # bronze: no conversions in either group: zero uplift, no relative uplift
    bronze = tiers["bronze"]
    assert bronze["contacted"]["rate"] == 0.0 and bronze["held_out"]["rate"] == 0.0
    assert bronze["uplift"]["absolute"] == 0.0 and bronze["uplift"]["relative"] is None
    assert (bronze["uplift"]["ci_low"], bronze["uplift"]["ci_high"]) == (
        pytest.approx(-0.489891, abs=1e-6), pytest.approx(0.390334, abs=1e-6))
    # platinum: declared, nobody in it
    platinum = tiers["platinum"]
    assert platinum["contacted"]["recipients"] == platinum["held_out"]["recipients"] == 0
    assert platinum["contacted"]["rate"] is None and platinum["uplift"] is None
    assert platinum["note"] == "no recipients"

    channels = by_name(report["by_channel"])
    assert (channels["email"]["contacted"]["converted"],
            channels["email"]["contacted"]["recipients"]) == (4, 10)
    assert (channels["sms"]["contacted"]["converted"],
            channels["sms"]["contacted"]["recipients"]) == (2, 14)
    assert channels["sms"]["held_out"]["recipients"] == 9  # the whole control group
    assert channels["sms"]["uplift"]["ci_low"] == pytest.approx(-0.308054, abs=1e-6)

    itt = report["intent_to_treat"]
    assert itt["assigned"]["recipients"] == 29 and itt["assigned"]["converted"] == 7
    assert itt["uplift"]["ci_high"] == pytest.approx(0.331792, abs=1e-6)

    assert report["window"] == "7d" and report["window_closed"] is True
    assert report["first_contact"] == T0.isoformat()
    assert report["closes_at"] == (SENT + timedelta(days=7)).isoformat()
    assert report["segment"] == "audiences/orders_after.sql"


def test_open_window_is_partial(measured) -> None:
    report = compute(measured, "promo", "k1", now=T0 + timedelta(days=2))
    assert report.window_closed is False
    assert "open until 2026-11-08 11:00 UTC: figures are partial" in markdown(report)


def test_zero_conversions_and_an_empty_holdout(make_workspace) -> None:
    ws = make_workspace(FILES)
    write_orders(ws, [])
    write_ledger(ws, [r for r in LEDGER if r[2] != "held_out"])
    report = compute(ws, "promo", "k1")
    assert report.total.contacted.recipients == 24 and report.total.contacted.converted == 0
    assert report.total.contacted.rate == 0.0 and report.total.held_out.rate is None
    assert report.total.uplift is None and report.intent_to_treat is None
    assert report.total.note == "no held-out recipients: uplift cannot be measured"
    text = markdown(report)
    assert "no held-out recipients: uplift cannot be measured" in text
    assert "not measurable" in text


def test_no_ledger_rows_yet(make_workspace) -> None:
    ws = make_workspace(FILES)
    write_orders(ws, ORDERS)
    report = compute(ws, "promo", "never-ran")
    assert report.total.contacted.recipients == 0 and report.closes_at is None
    assert [r.note for r in report.tiers.values()] == ["no recipients"] * 4


def test_other_run_keys_and_flows_do_not_count(measured) -> None:
    write_ledger(measured, [("1", "gold", "held_out", None)], run_key="k2")
    report = compute(measured, "promo", "k2")
    assert report.total.held_out.recipients == 1 and report.total.held_out.converted == 1
    assert report.total.contacted.recipients == 0


def test_flow_without_conversion(make_workspace) -> None:
    ws = make_workspace()
    with pytest.raises(HeraldError, match="declares no conversion"):
        compute(ws, "promo", "k1")


def test_validate_checks_the_conversion_sql(make_workspace) -> None:
    ws = make_workspace({**FILES, "config/flows/promo.yaml": FLOW.replace(
        "at: placed_at", "at: ordered_at")})
    write_orders(ws, [])
    with pytest.raises(ValidationFailed) as exc:
        check_flow(ws, "promo")
    assert str(exc.value) == ("config/flows/promo.yaml:10 conversion.at: column 'ordered_at' "
                              "is not in the result of audiences/orders_after.sql "
                              "(columns: id, placed_at, amount)")


def test_validate_reports_conversion_parameters_and_files(make_workspace) -> None:
    ws = make_workspace({**FILES, "audiences/orders_after.sql":
                         ORDERS_SQL + "AND amount > :minimum"})
    write_orders(ws, [])
    with pytest.raises(ValidationFailed, match=r"audiences/orders_after.sql: parameter "
                                               r":minimum not given \(set conversion.params"):
        check_flow(ws, "promo")
    ws = make_workspace({**FILES, "audiences/orders_after.sql": None,
                         "config/flows/promo.yaml": FLOW}, folder="other")
    with pytest.raises(ValidationFailed, match=r"promo.yaml:10 conversion.segment: segment "
                                               r"'orders_after' not found"):
        check_flow(ws, "promo")


def test_conversion_yaml_is_strict(make_workspace) -> None:
    from herald.core.errors import ConfigError

    ws = make_workspace({**FILES, "config/flows/promo.yaml": FLOW.replace(
        "window: 7d", "window: 7d, windw: 3")})
    with pytest.raises(ConfigError, match=r"promo.yaml:10 conversion.windw: unknown key "
                                          r"'windw' \(did you mean 'window'\?\)"):
        ws.flow("promo")


def test_a_bad_timestamp_is_named(measured) -> None:
    with sqlite3.connect(measured.root / "crm.db") as conn:
        conn.execute("INSERT INTO orders VALUES (1, '2026-11-02 yesterday', 1)")
    with pytest.raises(AudienceError, match=r"column 'placed_at' holds '2026-11-02 "
                                            r"yesterday', not a timestamp"):
        compute(measured, "promo", "k1")


@pytest.mark.parametrize("amount", ["'abc'", "'NaN'", "'Infinity'", "1e999"])
def test_an_amount_that_is_no_finite_number_is_named(measured, amount) -> None:
    """A text amount crashed the report; NaN or infinity printed 'nan' and --json gave
    NaN, which JSON readers refuse. An empty amount counts as none."""
    with sqlite3.connect(measured.root / "crm.db") as conn:
        conn.execute("INSERT INTO orders VALUES (1, '2026-11-02 10:00:00', '')")
    compute(measured, "promo", "k1")
    with sqlite3.connect(measured.root / "crm.db") as conn:
        conn.execute(f"INSERT INTO orders VALUES (1, '2026-11-02 10:00:00', {amount})")
        shown = conn.execute("SELECT amount FROM orders WHERE amount <> '' "
                             "ORDER BY rowid DESC LIMIT 1").fetchone()[0]
    with pytest.raises(AudienceError) as caught:
        compute(measured, "promo", "k1")
    assert str(caught.value) == (f"audiences/orders_after.sql: column 'amount' holds "
                                 f"{str(shown)!r}, not an amount (a finite number)")
