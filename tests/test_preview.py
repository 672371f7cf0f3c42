"""Preview shows what a run would send: the same addresses, cleaned by the same rules."""

from __future__ import annotations

import sqlite3

from sqlalchemy import select

from herald.delivery import ledger
from herald.flows.engine import run_local
from herald.flows.preview import render_samples

from .helpers import HERALD_YAML


def test_preview_and_run_clean_addresses_alike(make_workspace) -> None:
    """National numbers need the workspace's phone_region: preview once ignored it and
    reported "no address" for people a real run sends to."""
    config = HERALD_YAML.replace("timezone: UTC", "timezone: UTC\nphone_region: CN")
    flow = ("name: promo\naudience: {source: crm, segment: people, params: {min_score: 0}, "
            "key: id, tier: tier}\ntiers: {default: {channels: [sms]}}\n")
    ws = make_workspace({"config/herald.yaml": config, "config/flows/promo.yaml": flow},
                        rows=4)
    with sqlite3.connect(ws.root / "crm.db") as conn:  # mainland numbers, written nationally
        conn.executemany("UPDATE people SET phone = ? WHERE id = ?",
                         [("138 0013 8000", 1), ("13800138001", 2), ("12345", 3)])
    samples = {s["recipient"]: s for s in render_samples(ws, "promo", {}, None, 10)}
    assert samples["1"]["status"] == "would_send"
    assert samples["1"]["address"] == "+8613800138000"
    assert samples["2"]["address"] == "+8613800138001"
    assert samples["3"]["status"] == "no_address"
    run_local(ws, "promo", run_key="k")
    with ws.store.connect() as conn:
        sent = dict(conn.execute(select(ledger.deliveries.c.recipient,
                                        ledger.deliveries.c.address).where(
            ledger.deliveries.c.status == "sent")).all())
    previewed = {k: s["address"] for k, s in samples.items() if s["status"] == "would_send"}
    assert sent == previewed


def test_preview_passes_over_the_suppression_list_as_a_run_does(make_workspace) -> None:
    """Preview said `would_send` for a recipient on the suppression list; it now picks
    the channel a run would (the next one in the tier's order) or says `suppressed`."""
    from herald.delivery.suppression import suppress

    ws = make_workspace(rows=8)  # gold: email, sms; default: sms, email
    suppress(ws.store, [("4", None, "asked"),  # key 4 (gold), every channel
                        ("USER8@example.com", "email", "bounced"),  # 8 (gold): its email
                        ("+14155550001", None, "stop")], "test")  # 1 (silver): its phone
    samples = {s["recipient"]: s for s in render_samples(ws, "promo", {}, None, 8)}
    assert samples["4"]["status"] == "suppressed" and samples["4"]["channel"] is None
    assert "suppression list for email, sms" in samples["4"]["error"]
    assert (samples["8"]["status"], samples["8"]["channel"]) == ("would_send", "sms")
    assert (samples["1"]["status"], samples["1"]["channel"]) == ("would_send", "email")
    assert (samples["2"]["status"], samples["2"]["channel"]) == ("would_send", "sms")
    dry = run_local(ws, "promo", run_key="k", dry_run=True)
    assert dry["deliveries"]["suppressed"] == 1


def test_preview_tier_default_is_whoever_the_default_entry_serves(make_workspace) -> None:
    """`--tier default` found nobody ('no recipients in tier default') though preview
    showed recipients in it: those without a tier, or with one the flow has no entry for."""
    ws = make_workspace(rows=12)  # tiers: gold every 4th, else silver / bronze
    with sqlite3.connect(ws.root / "crm.db") as conn:
        conn.execute("UPDATE people SET tier = NULL WHERE id = 2")
    picked = render_samples(ws, "promo", {}, "default", 20)
    assert {s["recipient"] for s in picked} == {str(i) for i in range(1, 13) if i % 4}
    assert {s["tier"] for s in picked} == {"silver", "bronze", "default"}
    assert all(s["recipient"] not in ("4", "8", "12") for s in picked)
    assert [s["recipient"] for s in render_samples(ws, "promo", {}, "default", 2)] == \
        ["1", "2"]
    gold = render_samples(ws, "promo", {}, "gold", 20)
    assert {s["recipient"] for s in gold} == {"4", "8", "12"}
