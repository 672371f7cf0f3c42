"""Quiet hours in the recipient's local time: skip, or defer to a later run."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from herald.core import clock
from herald.core.spec import QuietHours
from herald.delivery import ledger, ledger_reads, suppression
from herald.flows.cli import main
from herald.flows.engine import run_local

from .helpers import ledger_rows, outbox_messages, people

SHANGHAI = ZoneInfo("Asia/Shanghai")


def test_window_wraps_midnight_in_the_local_zone() -> None:
    quiet = QuietHours.model_validate({"from": "21:00", "to": "09:00"})
    late = datetime(2026, 11, 22, 14, 14, tzinfo=UTC)  # 22:14 in Shanghai
    assert quiet.until(late, SHANGHAI) == datetime(2026, 11, 23, 1, 0, tzinfo=UTC)
    early = datetime(2026, 11, 22, 0, 0, tzinfo=UTC)  # 08:00 in Shanghai
    assert quiet.until(early, SHANGHAI) == datetime(2026, 11, 22, 1, 0, tzinfo=UTC)
    noon = datetime(2026, 11, 22, 4, 0, tzinfo=UTC)
    assert quiet.until(noon, SHANGHAI) is None
    assert quiet.until(late, ZoneInfo("Europe/London")) is None  # 14:14 in London
    day = QuietHours.model_validate({"from": "12:00", "to": "13:00", "mode": "skip"})
    assert day.until(noon, SHANGHAI) == datetime(2026, 11, 22, 5, 0, tzinfo=UTC)


def around_now(mode: str) -> str:
    """A quiet window 16:00-18:00 UTC: it holds ``now`` (conftest), 16:30 UTC each day."""
    return f'quiet_hours: {{from: "16:00", to: "18:00", mode: {mode}}}\n'


CONFIG = """\
timezone: UTC
sources: {crm: "sqlite:///crm.db"}
channels:
  email: {type: outbox, kind: email}
  sms: {type: outbox, kind: sms}
caps:
  - {max: 1, per: 1d}
"""


def statuses(ws) -> dict[str, ledger.Existing]:
    with ws.store.connect() as conn:
        return ledger_reads.existing(conn, "promo", "q", [str(i) for i in range(1, 100)])


def test_skip_records_quiet_hours_and_sends_nothing(make_workspace, store_url, now) -> None:
    ws = make_workspace(
        {"config/herald.yaml": CONFIG + around_now("skip")}, rows=20, store=store_url
    )
    summary = run_local(ws, "promo", run_key="q")
    assert summary["deliveries"]["quiet_hours"] == 20 - summary["deliveries"]["no_address"]
    assert summary["deliveries"]["sent"] == 0 and outbox_messages(ws) == 0
    with ws.store.connect() as conn:
        reasons = set(conn.execute(select(ledger.deliveries.c.reason)).scalars())
    assert len(reasons) == 1 and reasons.pop().startswith("skipped: ")


def test_defer_keeps_the_place_and_a_later_run_sends(make_workspace, store_url, now) -> None:
    ws = make_workspace(
        {"config/herald.yaml": CONFIG + around_now("defer")}, rows=20, store=store_url
    )
    first = run_local(ws, "promo", run_key="q")
    deferred = first["deliveries"]["deferred"]
    assert deferred == 20 and first["deliveries"]["sent"] == 0
    rows = statuses(ws)
    ends = {r.not_before.replace(tzinfo=UTC) for r in rows.values() if r.status == "deferred"}
    window_end = now.replace(hour=18, minute=0)
    assert ends == {window_end}  # everyone is in UTC here: one end of the window
    assert datetime.fromisoformat(first["deferred_until"]) == window_end
    # too early: the rerun leaves them waiting and sends nothing
    clock.advance(timedelta(hours=1))
    again = run_local(ws, "promo", run_key="q")
    assert again["deliveries"]["deferred"] == 20 and again["deliveries"]["sent"] == 0
    # the quiet window ends and one person unsubscribes meanwhile
    suppression.suppress(ws.store, [("3", None, "unsubscribed overnight")], "operator")
    clock.advance(timedelta(minutes=31))
    later = run_local(ws, "promo", run_key="q")
    assert later["deliveries"]["sent"] == 19
    assert later["deliveries"]["suppressed"] == 1  # checked again, not sent blindly
    assert later["deliveries"]["capped"] == 0  # its own reservation does not cap it
    assert outbox_messages(ws) == 19


@pytest.mark.parametrize("mode", ["defer", "skip"])
def test_report_counts_quiet_hours_in_each_channels_row(make_workspace, store_url, mode,
                                                        capsys) -> None:
    """Whoever quiet hours keep back is recorded on the channel they would have been sent
    through, so `herald report`'s channel rows add up to its `all` row."""
    status = "deferred" if mode == "defer" else "quiet_hours"
    ws = make_workspace({"config/herald.yaml": CONFIG + around_now(mode)}, rows=20,
                        store=store_url)
    with clock.using(clock.Clock(datetime(2026, 11, 22, 16, 30, tzinfo=UTC), frozen=True)):
        summary = run_local(ws, "promo", run_key="q")
        with pytest.raises(SystemExit):
            main(["report", "promo", "--json", "-w", str(ws.root)])
    report = json.loads(capsys.readouterr().out)
    expected: Counter[str] = Counter()  # gold: email, then sms; the others sms, then email
    for person in people(20):
        order = ["email", "phone"] if person["tier"] == "gold" else ["phone", "email"]
        column = next((c for c in order if person[c]), None)
        if column:
            expected["email" if column == "email" else "sms"] += 1
    assert report["deliveries"][status] == summary["deliveries"][status] == 20
    for counts in (report, summary):
        assert {channel: row[status] for channel, row in counts["by_channel"].items()
                if row[status]} == expected
    assert None not in {r.channel for r in statuses(ws).values() if r.status == status}


# a second flow, without quiet hours, to the same people: sms first, then e-mail
OTHER_FLOW = {
    "config/flows/other.yaml": (
        "name: other\naudience: {source: crm, segment: people, params: {min_score: 0}, "
        "key: id, tier: tier}\ntiers: {default: {channels: [sms, email]}}\n"
        "quiet_hours: false\n"),
    "templates/other/default.sms.txt.j2": "x {{ name }}",
    "templates/other/default.email.subject.j2": "x",
    "templates/other/default.email.txt.j2": "x {{ name }}",
}


def test_deferred_rows_hold_their_cap_slot(make_workspace, store_url, now) -> None:
    files = {"config/herald.yaml": CONFIG + around_now("defer"), **OTHER_FLOW}
    ws = make_workspace(files, rows=10, store=store_url)
    assert run_local(ws, "promo", run_key="q")["deliveries"]["deferred"] == 10
    # `other` turns quiet hours off, but the daily cap is taken by the deferred promo
    other_run = run_local(ws, "other", run_key="q")
    assert other_run["deliveries"]["capped"] == 10 and other_run["deliveries"]["sent"] == 0
    with ws.store.connect() as conn:
        assert (
            conn.execute(
                select(ledger.deliveries.c.status).where(ledger.deliveries.c.flow == "other")
            )
            .scalars()
            .all()
            == ["capped"] * 10
        )


def test_a_deferred_row_holds_its_channels_cap(make_workspace, store_url) -> None:
    """Deferred on sms, a recipient's daily sms is taken: another flow that same day
    reaches them by e-mail (or is capped without one); deferred on e-mail, by sms as
    usual (e-mail without a phone)."""
    config = CONFIG.replace("{max: 1, per: 1d}", "{channel: sms, max: 1, per: 1d}")
    ws = make_workspace({"config/herald.yaml": config + around_now("defer"), **OTHER_FLOW},
                        rows=10, store=store_url)
    with clock.using(clock.Clock(datetime(2026, 11, 22, 16, 30, tzinfo=UTC), frozen=True)):
        run_local(ws, "promo", run_key="q")
        deferred = {k: r.channel for k, r in statuses(ws).items() if r.status == "deferred"}
        run_local(ws, "other", run_key="q")
    other = ledger_rows(ws, "channel", "status", where="flow = 'other'")
    has = {str(p["id"]): p for p in people(10)}
    assert set(deferred.values()) == {"sms", "email"}
    for key, channel in deferred.items():
        if channel == "sms":
            expected = ("email", "sent") if has[key]["email"] else ("sms", "capped")
        else:
            expected = ("sms", "sent") if has[key]["phone"] else ("email", "sent")
        assert other[key] == expected, key
