"""Journey steps one by one: waits in the recipient's time zone, sticky variants and
cohorts, branch tests, wait_for on arrival, on_capped, max_duration, the goal as exit."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from herald.core import clock
from herald.delivery import variants
from herald.journeys import chunks, engine, mover, report
from herald.journeys.spec import NotADate, Until, When, until_moment

from .helpers import (
    JOURNEY_FILES,
    JOURNEY_START,
    crm_event,
    crm_events,
    enrollment_rows,
    journey_tick,
    table_rows,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")
NEW_YORK = ZoneInfo("America/New_York")


def test_until_a_local_time_on_given_weekdays():
    monday_1000_shanghai = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
    at_ten = Until(time="10:00")
    # strictly after arrival: 10:00 sharp waits for tomorrow's 10:00
    assert until_moment(at_ten, monday_1000_shanghai, SHANGHAI, {}) == \
        datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
    # the same instant is 21:00 on Sunday in New York: 10:00 Monday there is 15:00 UTC
    assert until_moment(at_ten, monday_1000_shanghai, NEW_YORK, {}) == \
        datetime(2026, 11, 23, 15, 0, tzinfo=UTC)
    weekend = Until(time="09:30", weekdays=["sat", "sun"])
    assert until_moment(weekend, monday_1000_shanghai, SHANGHAI, {}) == \
        datetime(2026, 11, 28, 1, 30, tzinfo=UTC)


def test_until_a_date_column_plus_an_offset():
    arrived = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
    before = Until(date="renews_on", offset="-3d", time="09:00")
    row = {"renews_on": "2026-12-10"}
    assert until_moment(before, arrived, SHANGHAI, row) == datetime(2026, 12, 7, 1, 0,
                                                                    tzinfo=UTC)
    assert until_moment(before, arrived, SHANGHAI, {"renews_on": "2026-11-01"}) == arrived
    assert until_moment(before, arrived, SHANGHAI, {"renews_on": None}) == arrived
    assert until_moment(before, arrived, SHANGHAI, {"renews_on": ""}) == arrived
    with pytest.raises(NotADate, match="renews_on holds 'soon', not a date"):
        until_moment(before, arrived, SHANGHAI, {"renews_on": "soon"})


def test_variants_are_sticky_weighted_and_independent():
    """Journeys draw with the flows' one implementation (herald.delivery.variants)."""
    weights = [("a", 80.0), ("b", 20.0)]
    draws = [variants.assign("journey:x", "step", str(k), weights) for k in range(20_000)]
    assert draws == [variants.assign("journey:x", "step", str(k), weights)
                     for k in range(20_000)]
    share = Counter(draws)["a"] / len(draws)
    assert 0.78 < share < 0.82
    other = [variants.assign("journey:x", "other", str(k), weights) for k in range(20_000)]
    agree = sum(x == y for x, y in zip(draws, other, strict=True)) / len(draws)
    assert 0.64 < agree < 0.72  # independent: 0.8² + 0.2² = 0.68


def test_branch_tests_on_columns():
    row = {"tier": "gold", "points": "1200", "city": None}
    assert When(column="tier", eq="gold").matches(row)
    assert When.model_validate({"column": "tier", "in": ["gold", "vip"]}).matches(row)
    assert When(column="tier", not_in=["gold"]).matches(row) is False
    assert When(column="points", gte=1000).matches(row)
    assert When(column="points", lt=1000).matches(row) is False
    assert When(column="city", is_null=True).matches(row)
    assert When(column="city", gt=3).matches(row) is False
    # order tests: numbers when both sides read as numbers, text when neither does
    assert When(column="points", lt="900").test(row) is False  # text order would say True
    assert When(column="points", gt=999.5).test({"points": 1000}) is True
    assert When(column="day", gte="2026-01-05").test({"day": "2026-01-10"}) is True
    # a number against text that is not one cannot be compared: neither True nor False
    assert When(column="points", gt=3).test({"points": "n/a"}) is None
    assert When(column="points", gt="lots").test({"points": 12}) is None
    assert When(column="points", gt=3).test({"points": True}) is None
    # equality alike: a number on one side compares as numbers, text as text
    assert When.model_validate({"column": "p", "in": [30, 40]}).test({"p": " 40 "}) is True
    assert When(column="p", eq=40).test({"p": 40.0}) is True
    assert When(column="p", eq="007").test({"p": "7"}) is False  # codes stay text
    assert When(column="p", eq=7).test({"p": "n/a"}) is False
    with pytest.raises(ValueError, match="exactly one test"):
        When(column="tier", eq="gold", ne="silver")


ARRIVAL = """\
name: arrival
entry: {source: crm, segment: nudge_entry, params: {min_score: 0}, key: id, tier: tier}
steps:
  wait_gold:
    type: wait_for
    condition: is_gold
    within: 1d
    matched: gold_hello
    timeout: plain_hello
  gold_hello: {type: send, tiers: {gold: {channels: [email]}}}
  plain_hello: {type: send, tiers: {default: {channels: [email]}}}
"""


def test_already_matching_on_arrival_does_not_wait_and_tiers_without_entry(make_workspace):
    ws = make_workspace({**JOURNEY_FILES, "config/journeys/arrival.yaml": ARRIVAL,
                         "audiences/is_gold.sql": "SELECT id FROM people WHERE tier = 'gold'",
                         "templates/arrival/gold_hello/gold.email.subject.j2": "Gold",
                         "templates/arrival/gold_hello/gold.email.txt.j2": "Hi {{ name }}",
                         "templates/arrival/plain_hello/default.email.subject.j2": "Hi",
                         "templates/arrival/plain_hello/default.email.txt.j2": "Hi {{ name }}"},
                        rows=20)
    crm_events(ws)
    with clock.using(clock.Clock(JOURNEY_START, frozen=True)):
        first = journey_tick(ws, "arrival")
        assert first["steps"]["wait_gold"] == {"matched": 5}
        assert first["steps"]["gold_hello"] == {"sent": 5}
        clock.advance(timedelta(days=1))
        second = journey_tick(ws, "arrival")
    assert second["steps"]["wait_gold"] == {"timeout": 15}
    rows = enrollment_rows(ws, "arrival")
    assert all(r.status == "completed" for r in rows.values())


DATED = """\
name: dated
entry: {source: crm, segment: nudge_entry, params: {min_score: 8}, key: id}
steps:
  pause: {type: wait, until: {date: COLUMN, offset: 1d, time: "09:00"}, next: hello}
  hello: {type: send, tiers: {default: {channels: [email]}}}
"""


def test_a_wait_on_a_column_that_holds_no_date_is_an_exit_not_a_skip(make_workspace):
    """`until: {date: name}` (a text column, by mistake): not waiting would send the
    next message at once; each person leaves instead, the value named in their path."""
    ws = make_workspace({**JOURNEY_FILES, "config/journeys/dated.yaml":
                         DATED.replace("COLUMN", "name"),
                         "templates/dated/hello/default.email.subject.j2": "Hi",
                         "templates/dated/hello/default.email.txt.j2": "Hi {{ name }}"},
                        rows=20)
    with clock.using(clock.Clock(JOURNEY_START, frozen=True)):
        summary = journey_tick(ws, "dated")
    assert summary["exits"] == {"not_a_date": 4}  # scores 8 and 9: ids 8, 9, 18, 19
    assert "hello" not in summary["steps"]
    path = report.show(ws, "dated", "8")["enrollments"][0]["path"]
    assert [(p["step"], p["outcome"], p["detail"]) for p in path] == [
        ("pause", "exited", "name holds 'User 8', not a date")]
    assert report.status(ws, "dated")["exited"] == {"not_a_date": 4}


CAPPED = """\
name: capped
entry: {source: crm, segment: nudge_entry, params: {min_score: 9}, key: id}
caps: [{max: 1, per: 1d}]
steps:
  one: {type: send, tiers: {default: {channels: [email]}}, next: two}
  two: {type: send, tiers: {default: {channels: [email]}}, on_capped: ON, next: three}
  three: {type: wait, for: 5d}
"""
CAPPED_FILES = {f"templates/capped/{s}/default.email.{p}.j2": f"{s} {{{{ name }}}}"
                for s in ("one", "two") for p in ("subject", "txt")}


@pytest.mark.parametrize("mode", ["wait", "skip"])
def test_on_capped_wait_sends_later_and_skip_moves_on(make_workspace, mode):
    ws = make_workspace({**JOURNEY_FILES, **CAPPED_FILES,
                         "config/journeys/capped.yaml": CAPPED.replace("ON", mode)}, rows=40)
    crm_events(ws)  # score 9: ids 9, 19, 29, 39
    with clock.using(clock.Clock(JOURNEY_START, frozen=True)):
        first = journey_tick(ws, "capped")
        assert first["steps"]["one"] == {"sent": 4}
        if mode == "skip":
            assert first["steps"]["two"] == {"capped": 4}
            assert {r.step for r in enrollment_rows(ws, "capped").values()} == {"three"}
            return
        assert first["steps"].get("two") == {"capped_waiting": 4}
        clock.advance(timedelta(hours=2))
        assert journey_tick(ws, "capped")["steps"] == {"two": {"capped_waiting": 4}}
        clock.advance(timedelta(days=1))
        third = journey_tick(ws, "capped")
    assert third["steps"]["two"] == {"sent": 4}
    assert {r.step for r in enrollment_rows(ws, "capped").values()} == {"three"}


LIMITS = """\
name: limits
entry: {source: crm, segment: nudge_entry, params: {min_score: 8}, key: id}
max_duration: 2d
goal: {segment: bought, window: 7d, at: placed_at}
steps:
  long: {type: wait, for: 5d}
"""


def test_max_duration_and_the_goal_end_the_journey(make_workspace):
    ws = make_workspace({**JOURNEY_FILES, "config/journeys/limits.yaml": LIMITS}, rows=20)
    crm_events(ws)  # scores 8 and 9: ids 8, 9, 18, 19
    with clock.using(clock.Clock(JOURNEY_START, frozen=True)):
        journey_tick(ws, "limits")
        crm_event(ws, "orders", 8, JOURNEY_START + timedelta(hours=5))
        clock.advance(timedelta(hours=6))
        assert journey_tick(ws, "limits")["exits"] == {"goal": 1}
        clock.advance(timedelta(days=2))
        assert journey_tick(ws, "limits")["exits"] == {"max_duration": 3}
        state = report.status(ws, "limits")
    assert state["exited"] == {"max_duration": 3, "goal": 1} and state["live"] == 0


def test_a_failing_chunk_releases_its_leases_and_a_retry_takes_it_again(make_workspace):
    from sqlalchemy.exc import OperationalError

    ws = make_workspace(JOURNEY_FILES, rows=30)
    crm_events(ws)
    with clock.using(clock.Clock(JOURNEY_START, frozen=True)):
        journey_tick(ws)  # everyone in the main cohort waits at wait_visit
        waiting = {k: r.checked_at for k, r in enrollment_rows(ws).items() if r.status == "waiting"}
        clock.advance(timedelta(hours=1))
        prepared = engine.prepare(ws, "nudge")  # validated; then the source changes
        with sqlite3.connect(ws.root / "crm.db") as conn:
            conn.execute("ALTER TABLE visits RENAME TO visits_gone")
        (job,) = prepared.chunks
        with pytest.raises(OperationalError, match="no such table: visits"):
            engine.run_chunk(job)
        rows = enrollment_rows(ws)
        assert all(rows[k].lease_owner is None and rows[k].checked_at == waiting[k]
                   for k in waiting)
        with sqlite3.connect(ws.root / "crm.db") as conn:
            conn.execute("ALTER TABLE visits_gone RENAME TO visits")
        again = engine.run_chunk(job)  # the task's retry takes the same enrollments again
    assert again.claimed == len(waiting) and not again.moves


def _claimed(make_workspace: Any) -> tuple[Any, Any, list[Any]]:
    """A journey whose first step sends, its one chunk claimed by tick "slow-tick" (the
    clock set by the caller)."""
    ws = make_workspace({**JOURNEY_FILES, **CAPPED_FILES,
                         "config/journeys/capped.yaml": CAPPED.replace("ON", "skip")},
                        rows=30)
    crm_events(ws)
    (job,) = engine.prepare(ws, "capped").chunks
    return ws, job, chunks.claim(ws, job, "slow-tick")


def test_a_tick_that_lost_its_lease_sends_nothing(make_workspace):
    from sqlalchemy import update

    from herald.core.db import journey_enrollments as enrollments
    from herald.core.errors import RunError

    from .helpers import outbox_messages

    with clock.using(clock.Clock(JOURNEY_START, frozen=True)):
        ws, job, items = _claimed(make_workspace)
        with ws.store.begin() as conn:  # another tick took them over meanwhile
            conn.execute(update(enrollments).values(lease_owner="other-tick"))
        moving = mover.Mover(ws, job, "slow-tick", chunks.ChunkResult())
        with pytest.raises(RunError, match="lost the lease on .* before sending"):
            moving.run(items)
    assert outbox_messages(ws) == 0


def test_a_round_whose_lease_was_lost_saves_nothing(make_workspace):
    """A round's states and log rows are saved together, and only while the tick holds
    every enrollment of the round: one taken by another tick and nothing is written."""
    from sqlalchemy import update

    from herald.core.db import journey_enrollments as enrollments
    from herald.core.errors import RunError

    with clock.using(clock.Clock(JOURNEY_START, frozen=True)):
        ws, job, items = _claimed(make_workspace)
        before = enrollment_rows(ws, "capped")
        moving = mover.Mover(ws, job, "slow-tick", chunks.ChunkResult())
        for item in items:
            moving.visit(item, "exit", "completed")
            item.status = "completed"
        with ws.store.begin() as conn:  # another tick took one over meanwhile
            conn.execute(update(enrollments).where(enrollments.c.id == items[0].id).values(
                lease_owner="other-tick"))
        with pytest.raises(RunError, match="lost the lease on 1 enrollments .* nothing of "
                                           "this round was saved"):
            moving.persist(items)
        after = enrollment_rows(ws, "capped")
        assert [(r.status, r.seq) for r in after.values()] == \
            [(r.status, r.seq) for r in before.values()]
        assert table_rows(ws, "herald_journey_log", "seq") == []
        with ws.store.begin() as conn:  # given back: the same round is saved whole
            conn.execute(update(enrollments).values(lease_owner="slow-tick"))
        moving.persist(items)
    after = enrollment_rows(ws, "capped")
    assert {r.status for r in after.values()} == {"completed"}
    assert all(r.lease_owner is None and r.lease_until is None for r in after.values())
    logged = table_rows(ws, "herald_journey_log", "enrollment_id", "outcome", "at", "tick")
    assert sorted(r[0] for r in logged) == sorted(it.id for it in items)
    assert {(r[1], r[3]) for r in logged} == {("completed", job.tick)}
    assert {str(r[2])[:19] for r in logged} == {"2026-11-23 02:00:00"}  # the tick's clock


def test_quiet_hours_defer_a_send_until_the_window_ends(make_workspace):
    quiet = CAPPED.replace("ON", "skip").replace(
        "caps: [{max: 1, per: 1d}]", 'quiet_hours: {from: "21:00", to: "09:00", mode: defer}')
    ws = make_workspace({**JOURNEY_FILES, **CAPPED_FILES, "config/journeys/capped.yaml": quiet},
                        rows=40)
    crm_events(ws)
    late = datetime(2026, 11, 23, 23, 0, tzinfo=UTC)  # 23:00 UTC, the workspace's zone
    with clock.using(clock.Clock(late, frozen=True)):
        first = journey_tick(ws, "capped")
        assert first["steps"] == {"one": {"quiet_hours_waiting": 4}}
        rows = enrollment_rows(ws, "capped")
        assert {(r.step, r.status) for r in rows.values()} == {("one", "waiting")}
        clock.advance(timedelta(hours=9, minutes=30))  # 08:30: still quiet
        assert journey_tick(ws, "capped")["steps"] == {}
        clock.advance(timedelta(minutes=31))  # 09:01
        later = journey_tick(ws, "capped")
    assert later["steps"]["one"] == {"sent": 4} and later["steps"]["two"] == {"sent": 4}


PICK = """name: pick
entry: {source: crm, segment: pick_entry, key: id}
steps:
  pick:
    type: branch
    cases:
      - {when: {column: points, gte: 5}, next: high}
      - {when: {column: points, eq: gone}, next: gone}
    default: low
  high: {type: exit, reason: high}
  gone: {type: exit, reason: gone}
  low: {type: exit, reason: low}
"""


def test_a_branch_logs_who_took_the_default_because_a_value_was_not_a_number(
        make_workspace):
    """`gte: 5` on a text column: numbers read from text compare as numbers ('10' >= 5,
    which text order would deny), and text that is no number matches no order test; who
    then takes the default is logged `default_not_a_number`, not an ordinary miss."""
    entry = ("SELECT id, CASE WHEN id % 10 = 0 THEN 'n/a' WHEN id % 10 = 1 THEN 'gone' "
             "ELSE CAST(score + 5 * (id % 2) AS TEXT) END AS points FROM people")
    ws = make_workspace({"config/journeys/pick.yaml": PICK,
                         "audiences/pick_entry.sql": entry}, rows=40)
    with clock.using(clock.Clock(JOURNEY_START, frozen=True)):
        summary = journey_tick(ws, "pick")
    # ids 1-40: 4 'n/a' (10, 20, 30, 40), 4 'gone', the rest numbers score + 5 * odd
    numbers = [i % 10 + 5 * (i % 2) for i in range(1, 41) if i % 10 not in (0, 1)]
    high = sum(n >= 5 for n in numbers)
    assert summary["steps"]["pick"] == {"case:1": high, "case:2": 4,
                                        "default": len(numbers) - high,
                                        "default_not_a_number": 4}
    assert summary["steps"]["low"] == {"completed": len(numbers) - high + 4}
    outcomes = report.report(ws, "pick")["steps"]["pick"]["outcomes"]
    assert outcomes["default_not_a_number"] == 4 and outcomes["default"] == 8


LOOP = """name: loop
entry: {source: crm, segment: loop_entry, key: id}
exempt: true
steps:
  hello: {type: send, tiers: {default: {channels: [email]}}, next: again}
  again: {type: wait_for, condition: anyone, within: 1d, matched: hello, timeout: bye}
  bye: {type: exit}
"""
LOOP_FILES = {"config/journeys/loop.yaml": LOOP,
              "audiences/loop_entry.sql": "SELECT id, name, email FROM people WHERE id = 1",
              "audiences/anyone.sql": "SELECT id FROM people",
              "templates/loop/hello/default.email.subject.j2": "Hi",
              "templates/loop/hello/default.email.txt.j2": "Hi {{ name }}"}


@pytest.mark.parametrize(("edit", "refused"), [
    ({}, True),  # a wait_for's matched branch: no wait when the condition holds
    ({"matched: hello, timeout: bye": "matched: bye, timeout: hello"}, False),  # its timeout
    ({"again: {type: wait_for, condition: anyone, within: 1d, matched: hello, timeout: bye}":
      "again: {type: wait, until: {date: signup}, next: hello}",
      "  bye: {type: exit}\n": ""}, True),
    ({"again: {type: wait_for, condition: anyone, within: 1d, matched: hello, timeout: bye}":
      "again: {type: wait, until: {time: '10:00'}, next: hello}",
      "  bye: {type: exit}\n": ""}, False),
    ({"again: {type: wait_for, condition: anyone, within: 1d, matched: hello, timeout: bye}":
      "again: {type: wait, for: 1h, next: hello}",
      "  bye: {type: exit}\n": ""}, False),
], ids=["wait_for-matched", "wait_for-timeout", "until-a-date", "until-a-time", "for"])
def test_a_cycle_must_take_time_whatever_the_data(make_workspace, edit, refused):
    """A wait_for whose condition already holds does not wait, nor does a wait until a
    date that has passed: a cycle through only those is refused before any tick (it
    sent one person 500 messages in a tick); a wait for a duration, until a time of day,
    or a wait_for's timeout always takes time."""
    from herald.core.errors import ConfigError
    from herald.journeys import load

    text = LOOP
    for old, new in edit.items():
        text = text.replace(old, new)
    entry = "SELECT id, name, email, '2020-01-01' AS signup FROM people WHERE id = 1"
    ws = make_workspace({**LOOP_FILES, "config/journeys/loop.yaml": text,
                         "audiences/loop_entry.sql": entry}, rows=5)
    if not refused:
        load.load(ws, "loop")
        return
    with pytest.raises(ConfigError) as caught:
        load.load(ws, "loop")
    assert str(caught.value) == (
        "config/journeys/loop.yaml:5 steps.hello: the cycle hello -> again -> hello can go "
        "round without waiting (a wait_for's matched branch and a wait until a date column "
        "take no time when the condition holds or the date has passed): put a "
        "`wait: {for: ...}` in it")


def test_a_cycle_that_took_no_time_stops_for_the_tick(make_workspace, monkeypatch):
    """A definition an earlier Herald accepted may hold such a cycle: a recipient goes
    round it at most once a tick (one message), not until the tick's safety net."""
    from herald.journeys import load

    monkeypatch.setattr(load, "graph_problems", lambda j: [])  # accepted, as before
    ws = make_workspace(LOOP_FILES, rows=5)
    with clock.using(clock.Clock(JOURNEY_START, frozen=True)):
        first = journey_tick(ws, "loop")
        clock.advance(timedelta(hours=1))
        second = journey_tick(ws, "loop")
    assert first["steps"] == {"hello": {"sent": 1}, "again": {"matched": 1}}
    assert second["steps"] == {"hello": {"sent": 1}, "again": {"matched": 1}}
    assert table_rows(ws, "herald_deliveries", "recipient", "status") == [
        ("1", "sent"), ("1", "sent")]
    row = enrollment_rows(ws, "loop")["1"]
    assert (row.step, row.status) == ("hello", "active")


def test_entry_rows_without_a_key_or_with_a_repeated_one_are_counted(make_workspace,
                                                                     capsys):
    """A flow refuses a segment with NULL or repeated keys; a journey's entry runs on a
    schedule, so it enters the first row of each key and says, in the tick's summary and
    on stderr, how many rows it passed over (they vanished without a word)."""
    from herald.flows.cli import main

    entry = ("SELECT CASE WHEN id > 30 AND id <= 35 THEN NULL WHEN id > 35 THEN id - 30 "
             "ELSE id END AS id, name, email FROM people")
    ws = make_workspace({**LOOP_FILES, "config/journeys/loop.yaml": LOOP.replace(
        "matched: hello, timeout: bye", "matched: bye, timeout: hello"),
        "audiences/loop_entry.sql": entry}, rows=40)
    with clock.using(clock.Clock(JOURNEY_START, frozen=True)):
        summary = journey_tick(ws, "loop")
    assert summary["entered"] == 30
    assert summary["entry_skipped"] == {"duplicate_key": 5, "no_key": 5}
    # the first row of a key is the one entered: id 1's own, not row 31's
    assert json.loads(enrollment_rows(ws, "loop")["1"].data)["name"] == "User 1"
    with pytest.raises(SystemExit) as done:
        main(["-w", str(ws.root), "--now", (JOURNEY_START + timedelta(hours=1)).isoformat(),
              "journey", "tick", "loop"])
    err = " ".join(capsys.readouterr().err.split())
    assert done.value.code == 0
    assert "warning: entry rows not entered: duplicate_key=5, no_key=5 (no_key: NULL" in err


def test_a_branch_case_names_its_condition_as_a_wait_for_does(make_workspace):
    """`{condition: NAME, next: S}` (as the README and a wait_for write it) was refused
    ('must be a mapping'); the long form keeps `at` and `params`."""
    from herald.journeys import load

    pick = """name: pick
entry: {source: crm, segment: loop_entry, key: id}
steps:
  pick:
    type: branch
    cases:
      - {condition: gold, next: yes}
      - {condition: {condition: gold, params: {}}, next: yes}
    default: no
  yes: {type: exit, reason: gold}
  no: {type: exit, reason: other}
"""
    ws = make_workspace({**LOOP_FILES, "config/journeys/pick.yaml": pick,
                         "audiences/loop_entry.sql": "SELECT id, name, email FROM people",
                         "audiences/gold.sql": "SELECT id FROM people WHERE tier = 'gold'"},
                        rows=12)
    spec = load.load(ws, "pick").spec
    assert [c.condition.condition for c in spec.steps["pick"].cases] == ["gold", "gold"]
    with clock.using(clock.Clock(JOURNEY_START, frozen=True)):
        summary = journey_tick(ws, "pick")
    assert summary["steps"]["pick"] == {"case:1": 3, "default": 9}
