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
