"""A campaign run on the engine (no Prefect): ledger, outbox, run keys, the policy."""

from __future__ import annotations

from collections import Counter

import pytest
from sqlalchemy import select, update

from herald.core.db import STATUSES
from herald.core.errors import RunError, ValidationFailed
from herald.delivery import ledger, run_records, suppression
from herald.flows.engine import run_local

from .helpers import outbox_messages, outbox_recipients, people

CAP_WEEKLY = """\
timezone: UTC
sources: {crm: "sqlite:///crm.db"}
channels:
  email: {type: outbox, kind: email}
  sms: {type: outbox, kind: sms}
caps:
  - {max: 1, per: 7d}
chunk_size: 40
"""


def expected_channels(n: int) -> dict[str, str | None]:
    """Which channel each person of people(n) gets: gold prefers email, others SMS."""
    out: dict[str, str | None] = {}
    for p in people(n):
        order = ["email", "sms"] if p["tier"] == "gold" else ["sms", "email"]
        column = {"email": "email", "sms": "phone"}
        out[str(p["id"])] = next((c for c in order if p[column[c]]), None)
    return out


def rows(ws, run_id=None):
    query = select(ledger.deliveries)
    if run_id:
        query = query.where(ledger.deliveries.c.run_id == run_id)
    with ws.store.connect() as conn:
        return {r.recipient: r for r in conn.execute(query)}


def test_every_recipient_gets_one_ledger_row_and_messages_land(make_workspace) -> None:
    ws = make_workspace(rows=100)
    summary = run_local(ws, "promo", run_key="2026-11-22")
    expected = expected_channels(100)
    sent = {k: c for k, c in expected.items() if c}
    assert summary["package"]["size"] == 100
    assert summary["chunks"] == 3
    assert summary["deliveries"]["sent"] == len(sent) == 98
    assert summary["deliveries"]["no_address"] == 2  # ids 35 and 70 have neither
    assert set(summary["deliveries"]) >= set(STATUSES)
    by_channel = {c: summary["by_channel"][c]["sent"] for c in ("email", "sms")}
    assert by_channel == {"email": sum(1 for c in sent.values() if c == "email"),
                          "sms": sum(1 for c in sent.values() if c == "sms")}
    # tiers are reported by the recipients' own tier, not the "default" entry they used
    assert set(summary["by_tier"]) == {"gold", "silver", "bronze"}
    assert summary["by_tier"]["gold"]["sent"] == 25
    ledger_rows = rows(ws, summary["run_id"])
    assert len(ledger_rows) == 100
    assert {k: r.channel for k, r in ledger_rows.items() if r.status == "sent"} == sent
    assert ledger_rows["35"].status == "no_address"
    assert ledger_rows["35"].reason == "sms: phone empty; email: email empty"
    assert all(r.provider_id for r in ledger_rows.values() if r.status == "sent")
    assert outbox_messages(ws) == 98


def test_same_run_key_sends_nothing_new(make_workspace) -> None:
    ws = make_workspace(rows=60)
    first = run_local(ws, "promo", run_key="k1")
    second = run_local(ws, "promo", run_key="k1")
    assert first["deliveries"]["sent"] == 59  # id 35 has no address
    assert second["deliveries"]["sent"] == 0
    assert second["deliveries"]["duplicate"] == 60
    assert outbox_messages(ws) == 59


def test_global_cap_across_run_keys(make_workspace) -> None:
    ws = make_workspace({"config/herald.yaml": CAP_WEEKLY}, rows=50)
    run_local(ws, "promo", run_key="monday")
    again = run_local(ws, "promo", run_key="tuesday")
    assert again["deliveries"]["sent"] == 0
    assert again["deliveries"]["capped"] == 49  # all but the one with no address
    reasons = {r.reason for r in rows(ws, again["run_id"]).values() if r.status == "capped"}
    assert reasons == {"cap max 1 per 7d (all channels)"}


def test_channel_cap_falls_back_to_the_next_channel(make_workspace) -> None:
    ws = make_workspace({"config/herald.yaml": CAP_WEEKLY.replace(
        "  - {max: 1, per: 7d}", "  - {channel: sms, max: 1, per: 1d}")}, rows=40)
    first = run_local(ws, "promo", run_key="a")
    second = run_local(ws, "promo", run_key="b")
    first_rows, second_rows = rows(ws, first["run_id"]), rows(ws, second["run_id"])
    for key, row in second_rows.items():
        if first_rows[key].channel == "sms" and first_rows[key].status == "sent":
            person = people(40)[int(key) - 1]
            if person["email"]:
                assert (row.status, row.channel) == ("sent", "email")
            else:
                assert row.status == "capped"
                assert "sms: cap max 1 per 1d (channel sms)" in row.reason


def test_flow_cap_only_counts_that_flow(make_workspace) -> None:
    flow = (
        "name: promo\naudience: {source: crm, segment: people, params: {min_score: 0}, "
        "key: id, tier: tier}\ntiers: {default: {channels: [sms, email]}}\n"
        "caps: [{max: 1, per: 30d}]\n")
    other = flow.replace("name: promo", "name: other")
    files = {"config/flows/promo.yaml": flow, "config/flows/other.yaml": other,
             "templates/other/default.sms.txt.j2": "x {{ name }}",
             "templates/other/default.email.subject.j2": "x",
             "templates/other/default.email.txt.j2": "x {{ name }}"}
    ws = make_workspace(files, rows=20)
    assert run_local(ws, "promo", run_key="1")["deliveries"]["sent"] == 20
    assert run_local(ws, "other", run_key="1")["deliveries"]["sent"] == 20
    assert run_local(ws, "promo", run_key="2")["deliveries"]["capped"] == 20


def test_suppression_by_address_and_by_key(make_workspace) -> None:
    ws = make_workspace(rows=20)
    suppression.suppress(ws.store, [("USER4@example.com", "email", "complaint"),
                               ("8", None, "asked to be forgotten"),
                               ("+14155550011", None, None)], "operator")
    summary = run_local(ws, "promo", run_key="x")
    got = rows(ws, summary["run_id"])
    assert (got["4"].status, got["4"].channel) == ("sent", "sms")  # gold: email suppressed
    assert got["8"].status == "suppressed"
    assert got["8"].reason == "recipient is on the suppression list"
    assert (got["11"].status, got["11"].channel) == ("sent", "email")
    assert summary["deliveries"]["suppressed"] == 1


def test_holdout_is_deterministic_and_never_sent(make_workspace) -> None:
    flow = PROMO_WITH_HOLDOUT
    a = make_workspace({"config/flows/promo.yaml": flow}, rows=200, folder="a")
    b = make_workspace({"config/flows/promo.yaml": flow}, rows=200, folder="b")
    sa, sb = run_local(a, "promo", run_key="1"), run_local(b, "promo", run_key="2")
    held_a = {k for k, r in rows(a).items() if r.status == "held_out"}
    held_b = {k for k, r in rows(b).items() if r.status == "held_out"}
    assert held_a == held_b
    assert 40 <= len(held_a) <= 80  # 30% of 200, give or take chance
    assert sa["deliveries"]["held_out"] == len(held_a)
    assert sa["deliveries"]["sent"] + len(held_a) + sa["deliveries"]["no_address"] == 200
    assert outbox_messages(a) == sa["deliveries"]["sent"]
    assert sb["deliveries"] == sa["deliveries"]


PROMO_WITH_HOLDOUT = """\
name: promo
audience: {source: crm, segment: people, params: {min_score: 0}, key: id, tier: tier}
tiers:
  gold: {channels: [email, sms]}
  default: {channels: [sms, email]}
holdout: 0.3
"""


def test_render_errors_are_recorded_per_recipient(make_workspace) -> None:
    ws = make_workspace({"templates/promo/default.sms.txt.j2":
                         "Hi {{ name }}: {{ 100 // (score - 1) }} points"}, rows=30)
    summary = run_local(ws, "promo", run_key="r")
    got = rows(ws, summary["run_id"])
    broken = {k for k, r in got.items() if r.status == "render_error"}
    # score 1 divides by zero; ids 1, 11 and 21 have score 1 and get an SMS
    assert broken == {"1", "11", "21"}
    assert got["1"].reason == ("templates/promo/default.sms.txt.j2:1: ZeroDivisionError: "
                               "integer division or modulo by zero")
    assert summary["deliveries"]["render_error"] == 3
    assert outbox_messages(ws) == summary["deliveries"]["sent"]


def test_dry_run_records_and_sends_nothing(make_workspace) -> None:
    ws = make_workspace(rows=50)
    summary = run_local(ws, "promo", run_key="d", dry_run=True)
    assert summary["dry_run"] is True
    assert summary["deliveries"]["sent"] == 49
    assert rows(ws) == {}
    assert outbox_messages(ws) == 0
    real = run_local(ws, "promo", run_key="d")
    assert real["deliveries"]["sent"] == 49  # the dry run reserved nothing


def test_validation_failure_sends_nothing(make_workspace) -> None:
    ws = make_workspace({"templates/promo/default.sms.txt.j2": "Hi {{ nickname }}"}, rows=20)
    with pytest.raises(ValidationFailed, match=r"templates/promo/default.sms.txt.j2:1"):
        run_local(ws, "promo", run_key="v")
    assert rows(ws) == {} and outbox_messages(ws) == 0


def test_tier_without_entry_or_default_stops_before_sending(make_workspace) -> None:
    ws = make_workspace({"config/flows/promo.yaml": PROMO_WITH_HOLDOUT.replace(
        "  default: {channels: [sms, email]}\n", "")}, rows=20)
    with pytest.raises(ValidationFailed, match=r"tiers 'bronze', 'silver' returned by the "
                                               r"segment have no entry"):
        run_local(ws, "promo", run_key="t")
    assert rows(ws) == {} and outbox_messages(ws) == 0
    run = run_records.get_run(ws.store, flow="promo")
    assert run.status == "failed"


def test_queued_rows_are_resumed_sending_rows_are_not_resent(make_workspace) -> None:
    ws = make_workspace(rows=30)
    run_local(ws, "promo", run_key="c")
    before = outbox_messages(ws)
    # As if a crash had happened: five SMS recipients reserved but never handed over,
    # three in flight when the process died.
    queued, in_flight = ["1", "2", "3", "6", "7"], ["9", "10", "11"]
    with ws.store.begin() as conn:
        table = ledger.deliveries
        conn.execute(update(table).where(table.c.recipient.in_(queued)).values(status="queued"))
        conn.execute(update(table).where(table.c.recipient.in_(in_flight))
                     .values(status="sending"))
    again = run_local(ws, "promo", run_key="c")
    assert again["deliveries"]["sent"] == 5
    assert again["deliveries"]["duplicate"] == 25
    assert outbox_messages(ws) == before + 5  # five more SMS lines, nothing else
    after = rows(ws)
    assert {after[k].run_id for k in queued} == {again["run_id"]}
    assert {after[k].status for k in in_flight} == {"sending"}


def test_dry_run_says_which_rule_stops_whom(make_workspace) -> None:
    ws = make_workspace({"config/herald.yaml": CAP_WEEKLY}, rows=50)
    suppression.suppress(ws.store, [("9", None, "asked")], "operator")
    run_local(ws, "promo", run_key="monday")
    preview = run_local(ws, "promo", run_key="tuesday", dry_run=True)
    assert preview["deliveries"]["capped"] == 48 and preview["deliveries"]["sent"] == 0
    assert {(r["status"], r["reason"]): r["count"] for r in preview["reasons"]} == {
        ("capped", "cap max 1 per 7d (all channels)"): 48,
        ("suppressed", "recipient is on the suppression list"): 1,
        ("no_address", "sms: phone empty; email: email empty"): 1,
    }
    assert len(rows(ws)) == 50  # only the real run's rows


def test_an_outbox_that_cannot_be_written_fails_the_run_and_its_rerun_sends(
        make_workspace) -> None:
    # (the outbox's own folder made a file is found before the run: tests/test_cli.py)
    ws = make_workspace(rows=100)
    blocked = ws.root / ".herald" / "outbox" / "promo"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("not a folder\n")
    with pytest.raises(RunError, match=r"channel (email|sms) stopped \(cannot write "
                       r".*: \.herald/outbox/promo is a file, not a folder\): \d+ "
                       r"message\(s\) "
                       r"not sent.*herald run promo --run-key k1"):
        run_local(ws, "promo", run_key="k1")
    expected = {k for k, c in expected_channels(100).items() if c}
    first = rows(ws)
    assert {k for k, r in first.items() if r.status == "queued"} == expected
    assert all(r.reason.startswith("fatal: ") for k, r in first.items() if k in expected)
    assert blocked.read_text() == "not a folder\n"

    blocked.unlink()
    summary = run_local(ws, "promo", run_key="k1")
    assert summary["deliveries"]["sent"] == len(expected)
    assert {k for k, r in rows(ws).items() if r.status == "sent"} == expected
    assert outbox_recipients(ws) == Counter(expected)

