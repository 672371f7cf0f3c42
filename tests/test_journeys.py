"""Journeys end to end: entry, waits, wait_for, branches, splits, exits, re-entry,
versions, concurrency and crashes, on SQLite and Postgres (``store_url``)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from herald.core import clock
from herald.core.db import journey_enrollments as enrollments
from herald.core.errors import ConfigError, ValidationFailed
from herald.core.workspace import Workspace
from herald.delivery import ledger
from herald.delivery.variants import assign as assign_variant
from herald.flows import chunks as flow_chunks
from herald.journeys import engine, load, report

from .helpers import (
    JOURNEY_FILES,
    JOURNEY_START,
    NUDGE,
    crm_event,
    crm_events,
    enrollment_rows,
    hooked_workspace,
    journey_tick,
    ledger_rows,
)


@pytest.fixture
def journey_ws(make_workspace: Any, store_url: str | None) -> Workspace:
    ws = make_workspace(JOURNEY_FILES, rows=60, store=store_url)
    crm_events(ws)
    return ws


def _deliveries(ws: Workspace, recipient: str | None = None, flow: str = "journey:nudge"
                ) -> list[Any]:
    d = ledger.deliveries.c
    query = select(d.recipient, d.run_key, d.status, d.channel).where(d.flow == flow)
    if recipient:
        query = query.where(d.recipient == recipient)
    with ws.store.connect() as conn:
        return list(conn.execute(query))


def _steps_sent(ws: Workspace, recipient: str) -> list[str]:
    return sorted(r.run_key.split(":")[2] for r in _deliveries(ws, recipient)
                  if r.status == "sent")


def _outbox_lines(ws: Workspace) -> Counter[tuple[str, str]]:
    """(run key folder, recipient) of every JSON-lines message in the outbox: a message
    sent twice shows up twice. Read while a tick writes, a last line not yet ended is
    not counted."""
    import json

    seen: Counter[tuple[str, str]] = Counter()
    base = ws.root / ".herald" / "outbox"
    for path in base.rglob("*.jsonl") if base.exists() else []:
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            if line.endswith("\n") and line.strip():
                seen[path.parent.name, str(json.loads(line)["recipient"])] += 1
    return seen


# The split's holdout: drawn by herald.delivery.variants.assign (journeys and flows share
# it), 6 of the 60 recipients for this journey and step name.
HELD = sum(assign_variant("journey:nudge", "split", str(k), [("holdout", 10.0), ("main", 90.0)])
           == "holdout" for k in range(1, 61))
assert HELD == 6, "the figures below are worked out for this draw"


def _main_cohort(ws: Workspace) -> list[str]:
    return sorted((k for k, r in enrollment_rows(ws).items() if r.cohort == "main"), key=int)


def test_a_recipient_who_converts_during_a_wait_leaves_at_the_next_tick(journey_ws):
    ws = journey_ws
    with clock.using(clock.Clock(JOURNEY_START, frozen=True)):
        first = journey_tick(ws)
        assert first["entered"] == 60 and first["exits"] == {"holdout": 6}
        assert first["steps"]["first"]["sent"] + first["steps"]["first"].get(
            "no_address", 0) == 54
        buyer, other = _main_cohort(ws)[:2]
        row = enrollment_rows(ws)[buyer]
        assert row.step == "wait_visit" and row.status == "waiting"
        clock.advance(timedelta(days=1))
        crm_event(ws, "orders", int(buyer), clock.now() - timedelta(hours=2))
        later = journey_tick(ws)
        assert later["exits"] == {"purchased": 1}
        row = enrollment_rows(ws)[buyer]
        assert (row.status, row.exit_reason, row.step) == ("exited", "purchased", "wait_visit")
        clock.advance(timedelta(days=3))  # past wait_visit's 3 days: the others go on
        after = journey_tick(ws)
        assert after["steps"]["wait_visit"]["timeout"] == 53
        assert _steps_sent(ws, buyer) == ["first"]
        assert _steps_sent(ws, other) == ["first", "second"]
        path = report.show(ws, "nudge", buyer)["enrollments"][0]["path"]
        assert [p["step"] for p in path] == ["split", "first", "wait_visit"]
        assert path[-1]["outcome"] == "exited" and path[-1]["detail"] == "purchased"


def test_entry_and_condition_params_take_lists_for_in(make_workspace):
    """A journey's SQL binds lists as its flows' do: ``IN :ids`` in the entry segment, and
    in a condition (whose query Herald wraps to ask about a chunk's keys)."""
    nudge = str(JOURNEY_FILES["config/journeys/nudge.yaml"])
    ws = make_workspace({
        **JOURNEY_FILES,
        "config/journeys/nudge.yaml": nudge.replace(
            "params: {min_score: 0}", "params: {min_score: 0, ids: [1, 2, 3, 5, 6, 7]}")
        .replace("condition: visited\n", "condition: visited\n    params: {who: [2, 5]}\n"),
        "audiences/nudge_entry.sql": str(JOURNEY_FILES["audiences/nudge_entry.sql"])
        + " AND id IN :ids",
        "audiences/visited.sql": str(JOURNEY_FILES["audiences/visited.sql"])
        + " AND id IN :who"}, rows=10)
    crm_events(ws)
    with clock.using(clock.Clock(JOURNEY_START, frozen=True)):
        assert journey_tick(ws)["entered"] == 6
        waiting = {k for k, r in enrollment_rows(ws).items() if r.step == "wait_visit"}
        assert {"2", "5", "6"} <= waiting
        clock.advance(timedelta(hours=5))
        for visitor in (2, 5, 6):  # 6 visits too, but the condition asks about 2 and 5
            crm_event(ws, "visits", visitor, clock.now() - timedelta(hours=1))
        journey_tick(ws)
    steps = {k: r.step for k, r in enrollment_rows(ws).items()}
    assert (steps["2"], steps["5"], steps["6"]) == ("done", "done", "wait_visit")


def test_timeout_and_matched_lead_where_the_yaml_says(journey_ws):
    ws = journey_ws
    with clock.using(clock.Clock(JOURNEY_START, frozen=True)):
        journey_tick(ws)
        main = _main_cohort(ws)
        visitor = main[0]
        gold = next(k for k in main[1:] if int(k) % 4 == 0)
        plain = next(k for k in main[1:] if int(k) % 4 != 0)
        clock.advance(timedelta(hours=5))
        crm_event(ws, "visits", int(visitor), clock.now() - timedelta(hours=1))
        journey_tick(ws)
        row = enrollment_rows(ws)[visitor]
        assert (row.status, row.step) == ("completed", "done")
        assert _steps_sent(ws, visitor) == ["first", "thanks"]
        assert enrollment_rows(ws)[gold].step == "wait_visit"  # nothing happened for them yet
        clock.advance(timedelta(days=3))  # timeout: second, then a 2-day pause
        journey_tick(ws)
        row = enrollment_rows(ws)[gold]
        assert row.step == "pause" and row.status == "waiting"
        assert _steps_sent(ws, gold) == ["first", "second"]
        clock.advance(timedelta(days=1))
        assert journey_tick(ws)["steps"] == {}  # still pausing: nothing moves
        clock.advance(timedelta(days=1, minutes=1))
        journey_tick(ws)
        assert _steps_sent(ws, gold) == ["first", "second", "third_gold"]
        assert _steps_sent(ws, plain) == ["first", "second", "third"]
        assert enrollment_rows(ws)[plain].status == "completed"
        shown = report.show(ws, "nudge", visitor)["enrollments"][0]["path"]
        assert [(p["step"], p["outcome"]) for p in shown] == [
            ("split", "cohort:main"), ("first", "sent"), ("wait_visit", "matched"),
            ("thanks", "sent"), ("done", "completed")]


def test_two_ticks_at_the_same_moment_send_each_step_once(journey_ws, store_url, catalogue):
    ws = journey_ws
    summaries: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            summaries.append(engine.tick_local(ws, "nudge"))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    # The clock is the process's: set once for the three threads of each moment. The
    # first moment enters and sends; the second, past wait_visit's 3 days, times out.
    for moment in (JOURNEY_START, JOURNEY_START + timedelta(days=3, hours=1)):
        with clock.using(clock.Clock(moment, frozen=True)):
            threads = [threading.Thread(target=one) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert not errors
    assert sum(s["entered"] for s in summaries) == 60
    assert sum(s["claimed"] for s in summaries[:3]) == 60
    rows = _deliveries(ws)
    assert len({(r.run_key.split(":")[2], r.recipient) for r in rows}) == len(rows)
    steps = Counter(r.run_key.split(":")[2] for r in rows)
    assert steps == {"first": 54, "second": 54}
    lines = _outbox_lines(ws)
    assert lines and max(lines.values()) == 1
    assert sum(lines.values()) + _eml_count(ws) == sum(1 for r in rows if r.status == "sent")
    catalogue("fault", f"three ticks of one journey at the same moment, at two moments "
              f"({'Postgres' if store_url else 'SQLite'})",
              "each enrollment claimed by one tick; each step's message once per recipient "
              f"({len(rows)} ledger rows for 54 + 54 sends)", messages=len(rows),
              duplicated=sum(1 for n in lines.values() if n > 1))


def _eml_count(ws: Workspace) -> int:
    base = ws.root / ".herald" / "outbox"
    return sum(1 for _ in base.rglob("*.eml"))


KILL_HERALD = """timezone: UTC
sources:
  crm: "sqlite:///crm.db"
channels:
  email: {type: outbox, kind: email, rate: 40/s, batch_size: 5}
  sms: {type: outbox, kind: sms, rate: 40/s, batch_size: 5}
chunk_size: 50
max_workers: 2
"""


def _sms_only(make_workspace: Any, store_url: str | None) -> Workspace:
    """The nudge journey over 300 people, its send on SMS (the outbox) only."""
    ws = make_workspace({**JOURNEY_FILES, "config/herald.yaml": KILL_HERALD,
                         "config/journeys/nudge.yaml": NUDGE.replace(
                             "tiers: {default: {channels: [email, sms]}}\n    next: wait_visit",
                             "tiers: {default: {channels: [sms]}}\n    next: wait_visit")},
                        rows=300, store=store_url)
    crm_events(ws)
    return ws


def test_a_tick_killed_mid_send_then_a_tick_loses_and_repeats_nothing(make_workspace,
                                                                      store_url, catalogue):
    ws = _sms_only(make_workspace, store_url)
    code = ("import sys; from herald.core.workspace import Workspace; "
            "from herald.journeys.engine import tick_local; "
            "tick_local(Workspace.open(sys.argv[1]), 'nudge')")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", clock.ENV: JOURNEY_START.isoformat()}
    proc = subprocess.Popen([sys.executable, "-c", code, str(ws.root)], env=env)
    deadline = time.monotonic() + 60
    while sum(_outbox_lines(ws).values()) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = sum(_outbox_lines(ws).values())
    expected = [k for k in map(str, range(1, 301)) if int(k) % 5]  # has a phone
    flow_chunks.forget_workspace(ws.root)
    ws2 = Workspace.open(ws.root)
    # the killed tick's leases run out (10 minutes of Herald's clock), then a tick resumes
    with clock.using(clock.Clock(JOURNEY_START + timedelta(minutes=11), frozen=True)):
        engine.tick_local(ws2, "nudge")
    rows = enrollment_rows(ws2)
    main = [k for k, r in rows.items() if r.cohort == "main"]
    assert len(rows) == 300 and all(r.lease_owner is None for r in rows.values())
    assert all(rows[k].step == "wait_visit" for k in main)
    sent = {r.recipient: r.status for r in _deliveries(ws2)}
    lines = _outbox_lines(ws2)
    duplicated = sum(1 for n in lines.values() if n > 1)
    lost = sum(1 for k in main if k in expected and sent.get(k) not in ("sent", "sending"))
    unknown = [k for k in main if sent.get(k) == "sending"]
    assert duplicated == 0 and lost == 0
    assert all(lines[next(iter(lines))[0], k] == 1 for k in main
               if k in expected and k not in unknown)
    assert 0 < before < len([k for k in main if k in expected])
    catalogue("fault", "journey tick process killed (SIGKILL) mid-send, then a tick once its "
              f"leases ran out ({'Postgres' if store_url else 'SQLite'})",
              f"{before} messages before the kill; the next tick sent the rest once each and "
              f"moved everyone on; {len(unknown)} caught in flight stay `sending` (never "
              "resent blindly)", messages=len([k for k in main if k in expected]),
              lost=lost, duplicated=duplicated)


# -- a send that did not go out ----------------------------------------------------------
def _hooked(ws: Workspace) -> dict[str, tuple[str, str | None]]:
    """{recipient: (status, reason)} of the journey's ledger."""
    return ledger_rows(ws, "status", "reason", where="flow = 'journey:hooked'")


WITH_ADDRESS = [str(i) for i in range(1, 21) if i % 7]


def test_a_refused_credential_keeps_the_unsent_at_their_step_until_a_tick_sends_them(
        make_workspace, peer, store_url, capsys, catalogue):
    from herald.core.errors import RunError
    from herald.flows.cli import main
    from herald.journeys import html

    ws = hooked_workspace(make_workspace, peer, store_url)
    for key in map(str, range(4, 21)):  # a wrong key from the 4th request on
        peer.script(key, *[("status", 401)] * 3)
    with clock.using(clock.Clock(JOURNEY_START, frozen=True)), \
            pytest.raises(RunError) as failed:
        journey_tick(ws, "hooked")
    rows = _hooked(ws)
    sent = sorted(k for k, (status, _) in rows.items() if status == "sent")
    kept = sorted(k for k, (status, _) in rows.items() if status == "queued")
    assert sent and kept and sorted(sent + kept, key=int) == WITH_ADDRESS
    assert all(str(rows[k][1]).startswith("fatal: ") for k in kept)
    assert len(peer.requests) == len(sent) + 1  # nothing went out after the refusal
    assert str(failed.value) == (
        f"journey hooked: channel hook stopped (HTTP 401 Unauthorized: the endpoint "
        f"refused the channel's credentials): {len(kept)} message(s) not sent; their "
        "recipients wait at their send step. Fix it, then tick again to send them: "
        "herald journey tick hooked")
    enrolled = enrollment_rows(ws, "hooked")
    assert all(r.lease_owner is None for r in enrolled.values())
    for key, row in enrolled.items():
        if key in kept:  # the step is not done: due again, no visit logged
            assert (row.step, row.status, row.seq) == ("hello", "waiting", 0)
            assert row.due_at.replace(tzinfo=None) == JOURNEY_START.replace(tzinfo=None)
        else:  # sent, or no address: moved on as before
            assert (row.step, row.status) == ("later", "waiting")
    state = report.status(ws, "hooked")
    assert state["queued"] == {"hello": len(kept)}
    assert state["at_step"]["hello"] == {"active": 0, "waiting": len(kept)}
    results = report.report(ws, "hooked")
    assert results["queued"] == {"hello": len(kept)}
    assert results["steps"]["hello"]["visited"] == len(sent) + 2  # 2 without an address
    assert results["steps"]["hello"]["outcomes"] == {"sent": len(sent), "no_address": 2}
    assert results["steps"]["hello"]["messages"]["queued"] == len(kept)
    assert f"message queued, not sent: hello {len(kept)}" in html.render(results, state)
    shown = report.show(ws, "hooked", kept[0])["enrollments"][0]
    assert shown["path"] == [] and shown["message"]["status"] == "queued"
    assert shown["message"]["channel"] == "hook"

    # An hour later, still refused: the tick tries once more and fails again (exit 1).
    later = (JOURNEY_START + timedelta(hours=1)).isoformat()
    root = str(ws.root)
    with pytest.raises(SystemExit) as done:
        main(["-w", root, "--now", later, "journey", "tick", "hooked"])
    err = capsys.readouterr().err
    assert done.value.code == 1 and "channel hook stopped (HTTP 401" in err, err
    assert f"{len(kept)} message(s) not sent" in err and "herald journey tick hooked" in err
    assert len(peer.requests) == len(sent) + 2
    with pytest.raises(SystemExit) as done:
        main(["-w", root, "journey", "status", "hooked"])
    assert done.value.code == 0
    assert f"message queued, not sent yet (the next tick sends it): hello {len(kept)}" in \
        capsys.readouterr().out

    # meanwhile one of them unsubscribes: what was reserved for them is not sent
    from herald.delivery import suppression

    suppression.suppress(ws.store, [(kept[-1], None, "unsubscribed")], "operator")
    peer.scripts.clear()  # the credentials fixed
    with clock.using(clock.Clock(JOURNEY_START + timedelta(hours=2), frozen=True)):
        fixed = journey_tick(ws, "hooked")
    assert fixed["steps"] == {"hello": {"sent": len(kept) - 1, "suppressed": 1}}
    rows = _hooked(ws)
    assert rows[kept[-1]] == ("suppressed", suppression.LISTED_SINCE)
    assert sorted(k for k, (status, _) in rows.items() if status == "sent") == sorted(
        k for k in WITH_ADDRESS if k != kept[-1])
    delivered = peer.delivered()
    assert sorted(delivered, key=int) == [k for k in WITH_ADDRESS if k != kept[-1]]
    assert set(delivered.values()) == {1}
    enrolled = enrollment_rows(ws, "hooked")
    assert {(r.step, r.status) for r in enrolled.values()} == {("later", "waiting")}
    assert report.status(ws, "hooked")["queued"] == {}
    path = report.show(ws, "hooked", kept[0])["enrollments"][0]["path"]
    assert [(p["step"], p["outcome"]) for p in path] == [("hello", "sent")]
    path = report.show(ws, "hooked", kept[-1])["enrollments"][0]["path"]
    assert [(p["step"], p["outcome"]) for p in path] == [("hello", "suppressed")]
    duplicated = sum(1 for n in delivered.values() if n > 1)
    catalogue("fault", "journey send: webhook 401, credentials refused (the channel stops) "
              f"({'Postgres' if store_url else 'SQLite'})",
              f"the tick fails naming the channel and its answer (exit 1); the {len(kept)} "
              "not sent stay queued and their recipients at the step; after the fix the "
              "next tick sends them once each and moves them on, except one put on the "
              "suppression list meanwhile (`suppressed`)", messages=len(WITH_ADDRESS),
              lost=len(WITH_ADDRESS) - 1 - len(delivered), duplicated=duplicated)


def test_a_recipient_the_provider_refuses_fails_and_moves_on(make_workspace, peer,
                                                             store_url):
    ws = hooked_workspace(make_workspace, peer, store_url)
    peer.script("3", ("status", 400))  # refused for this recipient only: not fatal
    peer.script("9", ("status", 410))  # gone: failed, and the address suppressed
    with clock.using(clock.Clock(JOURNEY_START, frozen=True)):
        summary = journey_tick(ws, "hooked")
    assert summary["steps"] == {"hello": {"sent": 16, "failed": 2, "no_address": 2}}
    rows = _hooked(ws)
    assert rows["3"][0] == rows["9"][0] == "failed"
    assert str(rows["3"][1]).startswith("permanent: HTTP 400")
    enrolled = enrollment_rows(ws, "hooked")
    assert {(r.step, r.status) for r in enrolled.values()} == {("later", "waiting")}
    assert report.status(ws, "hooked")["queued"] == {}
    path = report.show(ws, "hooked", "3")["enrollments"][0]["path"]
    assert [(p["step"], p["outcome"]) for p in path] == [("hello", "failed")]



def test_a_provider_that_says_later_keeps_the_recipient_at_the_step_until_then(
        make_workspace, peer, store_url):
    """A throttled answer whose wait outlasts the tick's retries (429, Retry-After: 120)
    defers the message and pauses the channel in that chunk (what it would send meanwhile
    is deferred without a request): the recipients wait at the send step until the
    back-off ends and a tick then sends each once; nobody moves on without their
    message."""
    ws = hooked_workspace(make_workspace, peer, store_url)
    peer.script("5", ("status", 429, {"Retry-After": "120"}))
    with clock.using(clock.Clock(JOURNEY_START, frozen=True)):
        first = journey_tick(ws, "hooked")
    # chunk 1 (ids 1-10, 7 without an address): 1-4 sent, 5 throttled, 6, 8, 9 and 10
    # held by the pause; chunk 2 (11-20, 14 without an address) all sent
    assert first["steps"] == {"hello": {"sent": 13, "no_address": 2, "deferred_waiting": 5}}
    status, reason = _hooked(ws)["5"]
    assert status == "deferred" and "after 1 attempts" in str(reason)
    assert "asked the channel to wait" in str(_hooked(ws)["6"][1])
    assert all(peer.delivered().get(r) is None for r in ("5", "6", "8", "9", "10"))
    row = enrollment_rows(ws, "hooked")["5"]
    assert (row.step, row.status, row.seq) == ("hello", "waiting", 0)
    assert row.due_at.replace(tzinfo=None) == (
        JOURNEY_START + timedelta(minutes=2)).replace(tzinfo=None)
    with clock.using(clock.Clock(JOURNEY_START + timedelta(minutes=1), frozen=True)):
        early = journey_tick(ws, "hooked")  # the back-off is not over: not sent
    assert early["steps"] == {} and peer.delivered().get("5") is None
    with clock.using(clock.Clock(JOURNEY_START + timedelta(minutes=3), frozen=True)):
        due = journey_tick(ws, "hooked")
    assert due["steps"] == {"hello": {"sent": 5}}
    assert _hooked(ws)["5"][0] == "sent" and all(
        peer.delivered()[r] == 1 for r in ("5", "6", "8", "9", "10"))
    assert enrollment_rows(ws, "hooked")["5"].step == "later"
    path = report.show(ws, "hooked", "5")["enrollments"][0]["path"]
    assert [(p["step"], p["outcome"]) for p in path] == [("hello", "sent")]


@pytest.mark.parametrize("answer", ["fatal", "later"])
def test_a_message_whose_recipient_leaves_the_journey_is_withdrawn(
        make_workspace, peer, store_url, answer, capsys):
    """A message kept at its send step (queued after a fatal answer, or deferred by the
    provider's back-off) whose enrollment then leaves the journey (here: max_duration)
    is settled ``withdrawn`` with the exit's reason: never sent afterwards, and no longer
    counted against the caps."""
    from herald.core.db import COUNTED
    from herald.core.errors import RunError

    ws = hooked_workspace(make_workspace, peer, store_url)
    spec = ws.root / "config/journeys/hooked.yaml"
    spec.write_text(spec.read_text() + "max_duration: 1h\n")
    if answer == "fatal":
        peer.script("5", ("status", 401))
    else:
        peer.script("5", ("status", 429, {"Retry-After": "7200"}))
    with clock.using(clock.Clock(JOURNEY_START, frozen=True)):
        if answer == "fatal":
            with pytest.raises(RunError):
                journey_tick(ws, "hooked")
        else:
            journey_tick(ws, "hooked")
    rows = _hooked(ws)
    waiting = sorted(k for k, (status, _) in rows.items() if status in ("queued", "deferred"))
    assert "5" in waiting and peer.delivered().get("5") is None
    peer.scripts.clear()
    with clock.using(clock.Clock(JOURNEY_START + timedelta(hours=3), frozen=True)):
        later = journey_tick(ws, "hooked")
    assert later["exits"] == {"max_duration": len(WITH_ADDRESS) + 2}
    rows = _hooked(ws)
    for key in waiting:
        assert rows[key] == ("withdrawn",
                             "left the journey before it was sent: max_duration"), key
    assert all(peer.delivered().get(k) is None for k in waiting)
    assert report.status(ws, "hooked")["queued"] == {}
    shown = report.show(ws, "hooked", waiting[0])["enrollments"][0]
    assert (shown["status"], shown["message"]) == ("exited", None)
    assert [(p["step"], p["outcome"], p["detail"], p["message"]) for p in shown["path"]] \
        == [("hello", "exited", "max_duration", "withdrawn")]
    from herald.flows.cli import main

    with pytest.raises(SystemExit):
        main(["-w", str(ws.root), "journey", "show", "hooked", waiting[0]])
    assert "exited (its message withdrawn via hook)  max_duration" in capsys.readouterr().out
    with ws.store.connect() as conn:
        assert conn.execute(select(ledger.deliveries.c.recipient).where(
            ledger.deliveries.c.status.in_(COUNTED),
            ledger.deliveries.c.recipient.in_(waiting))).first() is None


def test_a_stop_signal_mid_send_keeps_the_unsent_at_their_step(make_workspace, store_url,
                                                               catalogue):
    """SIGTERM to ``herald journey tick`` while it sends: no new batch; the batches in
    flight are recorded; those not sent stay queued at the step (not moved on), the
    leases are released, and the next tick sends them once each."""
    ws = _sms_only(make_workspace, store_url)
    code = "import sys; from herald.flows.cli import main; main(sys.argv[1:])"
    proc = subprocess.Popen([sys.executable, "-c", code, "-w", str(ws.root), "--now",
                             JOURNEY_START.isoformat(), "journey", "tick", "nudge"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while sum(_outbox_lines(ws).values()) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    _, err = proc.communicate(timeout=30)
    took = time.monotonic() - signalled
    assert proc.returncode == 1 and took < 5, (proc.returncode, took, err[-500:])
    assert "stopped by SIGTERM" in err and "herald journey tick nudge" in err, err[-500:]
    before = sum(_outbox_lines(ws).values())
    expected = [k for k in map(str, range(1, 301)) if int(k) % 5]  # has a phone
    flow_chunks.forget_workspace(ws.root)
    ws2 = Workspace.open(ws.root)
    first = {r.recipient: r.status for r in _deliveries(ws2)}
    assert "sending" not in first.values()  # the batches in flight were recorded
    kept = [k for k, status in first.items() if status == "queued"]
    rows = enrollment_rows(ws2)
    assert kept and all(rows[k].lease_owner is None for k in rows)
    assert all((rows[k].step, rows[k].status) == ("first", "waiting") for k in kept)
    assert all(rows[k].step == "wait_visit" for k, s in first.items() if s == "sent")
    assert all([p["step"] for p in report.show(ws2, "nudge", k)["enrollments"][0]["path"]]
               == ["split"] for k in kept)  # no visit of `first` for them
    # within the stopped tick's lease time: its leases were released, not left to expire
    with clock.using(clock.Clock(JOURNEY_START + timedelta(minutes=2), frozen=True)):
        engine.tick_local(ws2, "nudge")
    rows = enrollment_rows(ws2)
    main = [k for k, r in rows.items() if r.cohort == "main"]
    assert all(rows[k].step == "wait_visit" for k in main)
    sent = {r.recipient: r.status for r in _deliveries(ws2)}
    lines = _outbox_lines(ws2)
    duplicated = sum(1 for n in lines.values() if n > 1)
    lost = sum(1 for k in main if k in expected and sent.get(k) != "sent")
    assert duplicated == 0 and lost == 0 and 0 < before < sum(lines.values())
    catalogue("fault", "SIGTERM to `herald journey tick` mid-send "
              f"({'Postgres' if store_url else 'SQLite'})",
              f"no new batch; exit 1 after {before} messages, saying to tick again; the "
              f"{len(kept)} reserved but not sent stay queued at their step (not moved on); "
              "the next tick sent them once each and moved everyone on",
              messages=len([k for k in main if k in expected]), lost=lost,
              duplicated=duplicated)


RE_ENTRY = """name: again
entry: {source: crm, segment: nudge_entry, params: {min_score: 8}, key: id}
re_entry: {cooldown: 2d, max: 2}
steps:
  hello: {type: send, tiers: {default: {channels: [email]}}}
"""


def test_re_entry_rules_hold_over_several_entry_runs(make_workspace, store_url):
    ws = make_workspace({**JOURNEY_FILES, "config/journeys/again.yaml": RE_ENTRY,
                         "templates/again/hello/default.email.subject.j2": "Hi {{ name }}",
                         "templates/again/hello/default.email.txt.j2": "Entry {{ run_key }}"},
                        rows=50, store=store_url)
    crm_events(ws)
    entered = []
    with clock.using(clock.Clock(JOURNEY_START, frozen=True)):
        for days in (0, 1, 1, 3, 6, 9):  # ticks at day 0, 1, 2, 5, 11, 20
            clock.advance(timedelta(days=days))
            entered.append(journey_tick(ws, "again")["entered"])
    # scores 8 and 9: 10 people; again after 2 days of cooldown, at most twice
    assert entered == [10, 0, 10, 0, 0, 0]
    with ws.store.connect() as conn:
        per = Counter(r.recipient for r in conn.execute(
            select(enrollments.c.recipient).where(enrollments.c.journey == "again")))
    assert set(per.values()) == {2}
    keys = Counter((r.recipient, r.run_key) for r in _deliveries(ws, flow="journey:again"))
    assert len(keys) == 20 and max(keys.values()) == 1
    assert {k[1] for k in keys} == {"e1:0:hello", "e2:0:hello"}


def test_never_re_entry_and_nobody_inside_is_entered_twice(journey_ws):
    with clock.using(clock.Clock(JOURNEY_START, frozen=True)):
        assert journey_tick(journey_ws)["entered"] == 60
        for _ in range(3):
            clock.advance(timedelta(days=4))
            assert journey_tick(journey_ws)["entered"] == 0


EDITED = NUDGE.replace("""    timeout: second
  second:
    type: send
    tiers: {default: {channels: [sms, email]}}
    next: pause
  pause: {type: wait, for: 2d, next: by_tier}
  by_tier:
    type: branch
    cases:
      - {when: {column: tier, eq: gold}, next: third_gold}
    default: third
  third_gold: {type: send, tiers: {default: {channels: [email]}}}
  third: {type: send, tiers: {default: {channels: [email]}}}
""", """    timeout: final
  final: {type: send, tiers: {default: {channels: [email]}}}
""")


def test_editing_the_yaml_keeps_those_inside_on_their_version(journey_ws):
    ws = journey_ws
    (ws.root / "templates/nudge/final").mkdir()
    (ws.root / "templates/nudge/final/default.email.subject.j2").write_text("Last one")
    (ws.root / "templates/nudge/final/default.email.txt.j2").write_text("Bye {{ name }}")
    with clock.using(clock.Clock(JOURNEY_START, frozen=True)):
        first = journey_tick(ws)
        (ws.root / "config/journeys/nudge.yaml").write_text(EDITED)
        load.forget(ws)
        with sqlite3.connect(ws.root / "crm.db") as conn:
            conn.executemany("INSERT INTO people VALUES (?, ?, ?, NULL, 'gold', 'en', 5)",
                             [(i, f"New {i}", f"new{i}@example.com") for i in range(61, 71)])
        clock.advance(timedelta(days=3, hours=1))
        second = journey_tick(ws)
        assert second["version"] != first["version"] and second["entered"] == 10
        old_steps = set(load.parse_definition(
            engine_definition(ws, first["version"])).steps)
        rows = enrollment_rows(ws)
        for key, row in rows.items():
            if row.version == first["version"]:
                assert row.step in old_steps
                if row.cohort == "main":
                    assert row.step == "pause"  # the old graph: timeout -> second -> pause
            else:
                assert int(key) > 60 and row.step in {"split", "wait_visit"}
        state = report.status(ws, "nudge")
        assert set(state["live_by_version"]) == {first["version"], second["version"]}
        assert state["at_step"]["pause"]["waiting"] == 54  # a step only the old version has
        clock.advance(timedelta(days=3, hours=1))
        journey_tick(ws)
        newcomer = next(k for k, r in enrollment_rows(ws).items()
                        if int(k) > 60 and r.cohort == "main")
        assert _steps_sent(ws, newcomer) == ["final", "first"]


def engine_definition(ws: Workspace, version: str) -> str:
    from herald.core.db import journey_versions as versions

    with ws.store.connect() as conn:
        return str(conn.execute(select(versions.c.definition).where(
            versions.c.version == version)).scalar())


def test_the_reports_per_step_counts_add_up(journey_ws):
    ws = journey_ws
    with clock.using(clock.Clock(JOURNEY_START, frozen=True)):
        journey_tick(ws)
        main = _main_cohort(ws)
        holdout = sorted(k for k, r in enrollment_rows(ws).items() if r.cohort == "holdout")
        for key in main[:10] + holdout[:2]:
            crm_event(ws, "orders", int(key), clock.now() + timedelta(hours=2))
        crm_event(ws, "visits", int(main[20]), clock.now() + timedelta(hours=1))
        for hours in (3, 24 * 3 + 3, 24 * 6):
            clock.set_to(JOURNEY_START + timedelta(hours=hours), frozen=True)
            journey_tick(ws)
        data = report.report(ws, "nudge")
        state = report.status(ws, "nudge")
    steps = data["steps"]
    live = sum(a["active"] + a["waiting"] for a in state["at_step"].values())
    assert live + state["completed"] + sum(state["exited"].values()) == data["entered"] == 60
    assert steps["split"]["visited"] == 60
    assert steps["split"]["outcomes"] == {"cohort:holdout": HELD, "cohort:main": 60 - HELD}
    assert sum(steps["first"]["messages"].values()) == steps["first"]["visited"] == 54
    wait = steps["wait_visit"]["outcomes"]
    assert wait == {"exited": 10, "matched": 1, "timeout": 43}
    assert steps["second"]["visited"] == 43 == steps["pause"]["visited"]
    assert steps["third"]["visited"] + steps["third_gold"]["visited"] == 43
    assert steps["thanks"]["visited"] == 1 == steps["done"]["visited"]
    assert data["exited"] == {"purchased": 10, "holdout": 6}
    goal = data["goal"]
    assert goal["treated"] == {"recipients": 54, "converted": 10, "rate": 10 / 54,
                               "revenue": None}
    assert goal["holdout"]["recipients"] == 6 and goal["holdout"]["converted"] == 2
    assert goal["uplift"] is not None and goal["uplift"]["absolute"] == pytest.approx(
        10 / 54 - 2 / 6)
    assert steps["first"]["converted"] == 10
    from herald.journeys import html

    page = html.render(data, state)
    assert "<script" not in page and page.count("<svg") == 1
    assert all(f"<td>{step}</td>" in page for step in steps)
    assert "uplift -14.81 pp" in page


BROKEN = """name: broken
entry: {source: crm, segment: nudge_entry, params: {min_score: 0}, key: id}
steps:
  a: {type: send, tiers: {default: {channels: [email]}}, next: b}
  b: {type: branch, cases: [{when: {column: nope, eq: 1}, next: a}], default: c}
  c: {type: wait_for, condition: visited, within: 1d, matched: a, timeout: zz}
  orphan: {type: exit}
"""
# BROKEN with its graph mended (every step known and reachable, no instant cycle)
MENDED = BROKEN.replace("timeout: zz", "timeout: orphan").replace(
    "next: a}]", "next: c}]").replace("matched: a,", "matched: orphan,")


def test_unknown_keys_get_the_flows_suggestions(make_workspace):
    """An unknown key of the journey or of a step (by its type) gets the closest field as
    a did-you-mean, as in a flow; a deeper key, or one close to nothing, gets none."""
    ws = make_workspace({**JOURNEY_FILES, "config/journeys/broken.yaml": MENDED
        .replace("key: id}", "key: id, sgment: x}\nmax_duraton: 3d\nzzz: 1")
        .replace("within: 1d", "withn: 1d")})
    with pytest.raises(ConfigError) as caught:
        load.load(ws, "broken")
    assert sorted(str(caught.value).splitlines()) == [
        "config/journeys/broken.yaml:2 entry.sgment: unknown key 'sgment'",
        "config/journeys/broken.yaml:3 max_duraton: unknown key 'max_duraton' "
        "(did you mean 'max_duration'?)",
        "config/journeys/broken.yaml:4 zzz: unknown key 'zzz'",
        "config/journeys/broken.yaml:8 steps.c.within: required key is missing",
        "config/journeys/broken.yaml:8 steps.c.withn: unknown key 'withn' "
        "(did you mean 'within'?)"]


def test_validation_names_file_line_and_field(make_workspace, catalogue):
    ws = make_workspace({**JOURNEY_FILES, "config/journeys/broken.yaml": BROKEN,
                         "templates/broken/a/default.email.subject.j2": "{{ nickname }}",
                         "templates/broken/a/default.email.txt.j2": "x"})
    with pytest.raises(ConfigError) as caught:
        load.load(ws, "broken")
    text = str(caught.value)
    assert "config/journeys/broken.yaml:6 steps.c.timeout: unknown step 'zz'" in text
    assert "config/journeys/broken.yaml:7 steps.orphan: step 'orphan' is not reachable" in text
    assert "the cycle a -> b -> a can go round without waiting" in text
    ws2 = make_workspace({**JOURNEY_FILES, "config/journeys/broken.yaml": MENDED
        .replace("a: {type: send", "a: {type: send, on_capd: skip"), }, folder="ws2")
    with pytest.raises(ConfigError) as caught:
        load.load(ws2, "broken")
    assert ("config/journeys/broken.yaml:4 steps.a.on_capd: unknown key 'on_capd' "
            "(did you mean 'on_capped'?)") in str(caught.value)
    ws3 = make_workspace({**JOURNEY_FILES, "config/journeys/broken.yaml": MENDED,
        "templates/broken/a/default.email.subject.j2": "{{ nickname }}",
        "templates/broken/a/default.email.txt.j2": "x",
        "audiences/visited.sql": "SELECT visited_at FROM visits WHERE visited_at >= :since"},
        folder="ws3")
    crm_events(ws3)
    with pytest.raises(ValidationFailed) as failed:
        load.check(ws3, "broken")
    text = str(failed.value)
    assert "templates/broken/a/default.email.subject.j2:1: uses 'nickname'" in text
    assert "config/journeys/broken.yaml:5 steps.b.cases[0].when.column: column 'nope'" in text
    assert "config/journeys/broken.yaml:6 steps.c.condition: audiences/visited.sql must " \
           "return the key column 'id'" in text
    catalogue("input", "journey YAML: an unknown or unreachable step, a cycle without a "
              "wait, a mistyped key, a template variable or condition column the SQL lacks",
              "every problem named with file, line and field before any tick runs")



@pytest.mark.parametrize("value", ["sometimes", "3", "[never]"])
def test_re_entry_other_than_never_or_a_mapping_says_what_is_accepted(make_workspace, value):
    ws = make_workspace({**JOURNEY_FILES, "config/journeys/broken.yaml": MENDED.replace(
        "steps:", f"re_entry: {value}\nsteps:")}, folder="ws")
    with pytest.raises(ConfigError) as caught:
        load.load(ws, "broken")
    assert ("config/journeys/broken.yaml:3 re_entry: " in str(caught.value)
            and "is not accepted: never (the default), {cooldown: 30d}, {max: 3} or both"
            in str(caught.value)), str(caught.value)

def test_cli_tick_status_show_and_validate(journey_ws, capsys):
    from herald.flows.cli import main

    root = str(journey_ws.root)
    for argv in (["validate"], ["--now", JOURNEY_START.isoformat(), "journey", "tick", "nudge"],
                 ["journey", "status", "nudge", "--json"], ["journey", "show", "nudge", "3"],
                 ["journey", "report", "nudge"]):
        with pytest.raises(SystemExit) as done:
            main(["-w", root, *argv])
        assert done.value.code == 0, capsys.readouterr()
    output = capsys.readouterr().out
    assert "✓ journey nudge" in output and '"live": 54' in output
    assert "first" in output and "split" in output
    (journey_ws.root / "out").mkdir()
    (journey_ws.root / "a-file").write_text("x")
    with pytest.raises(SystemExit) as done:
        main(["-w", root, "journey", "report", "nudge", "--to", f"{root}/out"])
    assert done.value.code == 0 and (journey_ws.root / "out/nudge.html").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(["-w", root, "journey", "report", "nudge", "--to", f"{root}/a-file/r.html"])
    err = capsys.readouterr().err
    assert done.value.code == 1 and err == (f"error: --to {root}/a-file/r.html: cannot "
                                            f"write: {root}/a-file is a file, not a folder\n")


# -- unsubscribe links ----------------------------------------------------------------------
LETTERS = """\
name: letters
entry: {source: crm, segment: nudge_entry, params: {min_score: 0}, key: id, tier: tier}
steps:
  first: {type: send, tiers: {default: {channels: [email, sms]}}, next: pause}
  pause: {type: wait, for: 1d, next: second}
  second: {type: send, tiers: {default: {channels: [email, sms]}}}
"""


def test_journey_messages_carry_a_working_unsubscribe_link(make_workspace, monkeypatch,
                                                           capsys):
    """A template using ``unsubscribe_url`` passes validation and renders in a tick; the
    e-mail carries the List-Unsubscribe headers; the link unsubscribes its recipient, whom
    the next step then suppresses."""
    import re
    from email import message_from_bytes

    import httpx

    from herald.delivery import suppression, unsubscribe
    from herald.flows.cli import main

    from .helpers import (
        UNSUBSCRIBE_SECRET_ENV,
        free_port,
        outbox_files,
        unsubscribe_server,
        unsubscribe_yaml,
    )

    secret = "s3cret-for-the-journey-unsubscribe-test"
    monkeypatch.setenv(UNSUBSCRIBE_SECRET_ENV, secret)
    port = free_port()
    templates = {f"templates/letters/{step}/default.{kind}": text
                 for step in ("first", "second")
                 for kind, text in (("email.subject.j2", "Hello {{ name }}"),
                                    ("email.txt.j2", "{{ step }}: unsubscribe at "
                                                     "{{ unsubscribe_url }}"),
                                    ("sms.txt.j2", "Hi {{ name }}. Stop: {{ unsubscribe_url }}"))}
    ws = make_workspace({"config/herald.yaml": unsubscribe_yaml(port),
                         "config/journeys/letters.yaml": LETTERS,
                         "audiences/nudge_entry.sql": JOURNEY_FILES["audiences/nudge_entry.sql"],
                         **templates}, rows=20)
    with pytest.raises(SystemExit) as done:
        main(["-w", str(ws.root), "validate", "letters"])
    assert done.value.code == 0, capsys.readouterr()
    assert "✓ journey letters" in capsys.readouterr().out

    with clock.using(clock.Clock(JOURNEY_START, frozen=True)):
        first = journey_tick(ws, "letters")
        assert first["steps"]["first"] == {"sent": 20}  # no render_error
        emails = [message_from_bytes(p.read_bytes()) for p in outbox_files(ws)
                  if p.suffix == ".eml"]
        assert len(emails) == 18  # 7 and 14 have no e-mail address: SMS
        for mail in emails:
            link = re.sub(r"\s+", "", str(mail["List-Unsubscribe"])).strip("<>")
            assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
            assert link.startswith(f"http://127.0.0.1:{port}/u/")
            assert link in re.sub(r"=\r?\n", "", mail.get_payload(decode=True).decode())
        sms = "\n".join(p.read_text() for p in outbox_files(ws) if p.suffix == ".jsonl")
        assert len(re.findall(r"Stop: http://127\.0\.0\.1:\d+/u/", sms)) == 2

        mail = emails[0]
        link = re.sub(r"\s+", "", str(mail["List-Unsubscribe"])).strip("<>")
        found = unsubscribe.read_token(secret, link.rsplit("/", 1)[1])
        assert found is not None and (found.channel, found.flow) == ("email", "journey:letters")
        assert mail["To"] == f"user{found.recipient}@example.com"
        with unsubscribe_server(ws, port):
            clicked = httpx.post(link, content="List-Unsubscribe=One-Click",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert clicked.status_code == 200 and "Unsubscribed" in clicked.text
        rows = suppression.list_suppressions(ws.store)
        assert [(r.value, r.channel, r.source) for r in rows] == [
            (found.recipient, "*", "unsubscribe")]

        clock.advance(timedelta(days=1, minutes=1))
        second = journey_tick(ws, "letters")
        assert second["steps"]["second"] == {"sent": 19, "suppressed": 1}
        history = sorted((r.run_key, r.status) for r in _deliveries(
            ws, found.recipient, flow="journey:letters"))
        assert history == [("e1:0:first", "sent"), ("e1:2:second", "suppressed")]


def test_a_source_that_cannot_be_opened_is_named_once_where_it_is_defined(make_workspace):
    """The entry's source is named at its sources.NAME line in config/herald.yaml, not
    also at the journey's entry.segment."""
    ws = make_workspace(JOURNEY_FILES, rows=5)
    (ws.root / "crm.db").unlink()
    with pytest.raises(ValidationFailed) as exc:
        load.check(Workspace.open(ws.root), "nudge")
    lines = [str(p) for p in exc.value.problems]
    assert len(lines) == 1, lines
    assert lines[0].startswith("config/herald.yaml:3 sources.crm: sqlite:///"), lines
    assert lines[0].endswith(f"crm.db: database file not found ({ws.root / 'crm.db'})")
