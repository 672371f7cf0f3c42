"""Caps hold under concurrency, and a run killed mid-send resumes without double sends.

These tests start real processes: two runs at once racing for the same people, and a
run killed with SIGKILL while it sends, then run again with the same run key.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from sqlalchemy import create_engine, select

from herald.delivery import ledger

from .helpers import fill_people, outbox_files, people

CONFIG = """\
timezone: UTC
sources: {crm: "%(source)s"}
store: "%(store)s"
channels:
  email: {type: outbox, kind: email}
  sms: {type: outbox, kind: sms%(rate)s}
caps:
  - {max: 1, per: day}
chunk_size: 25
max_workers: 3
"""

FLOW = """\
name: %s
audience: {source: crm, segment: people, params: {min_score: 0}, key: id, tier: tier}
tiers:
  default: {channels: [sms, email]}
"""

TEMPLATES = {f"templates/{flow}/default.{part}.j2": "Hi {{ name }} from " + flow
             for flow in ("promo", "other")
             for part in ("email.subject", "email.txt", "sms.txt")}


def _run(root: str, flow: str, run_key: str, start: multiprocessing.synchronize.Event,
         out: multiprocessing.Queue) -> None:
    from herald.core.workspace import Workspace
    from herald.flows.engine import run_local

    try:
        ws = Workspace.open(root)
        start.wait(30)
        out.put(run_local(ws, flow, run_key=run_key)["deliveries"])
    except BaseException as exc:  # report it instead of leaving the parent waiting
        import traceback

        out.put({"error": "".join(traceback.format_exception(exc))})
        raise


def race(ws) -> list[dict[str, int]]:
    """Run `promo` and `other` in two processes released at the same instant."""
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_run, args=(str(ws.root), flow, "race", start, out))
             for flow in ("promo", "other")]
    for p in procs:
        p.start()
    time.sleep(2.0)  # both processes imported and waiting
    start.set()
    results = [out.get(timeout=240) for _ in procs]
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, errors[0]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return results


def test_the_same_run_started_twice_at_once_sends_each_recipient_once(
        make_workspace, store_url) -> None:
    """An operator (or two overlapping schedules) starts one flow with one run key twice
    at the same moment: the runs share the work, and neither resumes the rows the other
    has reserved and is still sending (its `queued` rows are not left over from a
    crash), so each recipient gets the message once."""
    if store_url:
        fill_people(store_url, 300)
    ws = workspace(make_workspace, store_url or "sqlite:///crm.db",
                   store_url or "sqlite:///.herald/herald.db", 300, rate=", rate: 60/s")
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_run, args=(str(ws.root), "promo", "twice", start, out))
             for _ in range(2)]
    for p in procs:
        p.start()
    time.sleep(2.0)  # both processes imported and waiting
    start.set()
    results = [out.get(timeout=240) for _ in procs]
    assert not [r for r in results if "error" in r], results
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    reachable = sum(1 for p in people(300) if p["email"] or p["phone"])
    assert sum(r["sent"] for r in results) == reachable, results
    assert all(r["sent"] for r in results), results  # both took part: the race happened
    delivered = outbox_recipients(ws)
    assert len(delivered) == reachable and set(delivered.values()) == {1}
    assert sent_per_recipient(ws) == Counter(dict.fromkeys(delivered, 1))


def test_queued_rows_of_a_run_still_going_are_left_to_it(make_workspace, store_url) -> None:
    """The rule the race above relies on, step by step: rows another run of the run key
    has reserved are not resumed while that run is going (its process is alive and its
    record `running`); once it has stopped (recorded failed), a rerun sends them once."""
    from herald.core.db import process_owner, runs, writing
    from herald.delivery import run_records
    from herald.flows.engine import run_local

    if store_url:
        fill_people(store_url, 20)
    ws = workspace(make_workspace, store_url or "sqlite:///crm.db",
                   store_url or "sqlite:///.herald/herald.db", 20)
    run_records.start_run(ws.store, "run-other", "promo", "k", False)
    with writing(ws.store) as conn:  # as that run's first chunk left them: reserved
        ledger.write_entries(conn, [ledger.Entry(str(i), "silver", "queued", "sms",
                                                 f"+1415555{i:04d}") for i in (1, 2, 3)],
                             flow="promo", run_key="k", run_id="run-other", package_id="p")
        conn.execute(runs.update().where(runs.c.id == "run-other").values(
            owner=process_owner()))  # this very process: alive
    first = run_local(ws, "promo", run_key="k")
    assert first["deliveries"]["duplicate"] == 3
    assert not {"1", "2", "3"} & set(outbox_recipients(ws))
    run_records.finish_run(ws.store, "run-other", "failed", None, "stopped")
    second = run_local(ws, "promo", run_key="k")
    assert second["deliveries"]["sent"] == 3
    assert {k: n for k, n in outbox_recipients(ws).items() if k in ("1", "2", "3")} == {
        "1": 1, "2": 1, "3": 1}


def test_a_run_left_running_on_another_host_is_closed_by_hand(make_workspace,
                                                               capsys) -> None:
    """A run recorded by a process on another host is never presumed gone: its queued
    rows wait. `herald runs --close RUN` closes it (refused for a run still going on
    this host), and the next run of its key sends them once."""
    from herald.core.db import process_owner, runs, writing
    from herald.delivery import run_records
    from herald.flows.cli import main
    from herald.flows.engine import run_local

    ws = workspace(make_workspace, "sqlite:///crm.db", "sqlite:///.herald/herald.db", 20)
    for run_id, owner in (("run-far", "elsewhere.example:4242"),
                          ("run-here", process_owner())):
        run_records.start_run(ws.store, run_id, "promo", run_id, False)
        with writing(ws.store) as conn:
            ledger.write_entries(conn, [ledger.Entry("1", "silver", "queued", "sms",
                                                     "+14155550001")],
                                 flow="promo", run_key=run_id, run_id=run_id, package_id="p")
            conn.execute(runs.update().where(runs.c.id == run_id).values(owner=owner))
    assert run_local(ws, "promo", run_key="run-far")["deliveries"]["duplicate"] == 1

    def close(run_id: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as done:
            main(["-w", str(ws.root), "runs", "--close", run_id])
        said = capsys.readouterr()
        return int(done.value.code or 0), " ".join((said.out + said.err).split())

    code, said = close("run-here")
    assert code == 1 and "is still running here (process" in said, said
    code, said = close("run-nope")
    assert code == 1 and "no run 'run-nope'" in said, said
    code, said = close("run-far")
    assert code == 0 and said == ("run run-far closed as failed; its queued rows go out "
                                  "with the next run of its key"), said
    code, said = close("run-far")
    assert code == 1 and "is failed, not running" in said, said
    assert run_local(ws, "promo", run_key="run-far")["deliveries"]["sent"] == 1
    assert outbox_recipients(ws)["1"] == 1


def sent_per_recipient(ws) -> Counter[str]:
    with ws.store.connect() as conn:
        return Counter(conn.execute(select(ledger.deliveries.c.recipient).where(
            ledger.deliveries.c.status == "sent")).scalars())


def workspace(make_workspace, source: str, store: str, rows: int, rate: str = ""):
    files = {"config/herald.yaml": CONFIG % {"source": source, "store": store, "rate": rate},
             "config/flows/promo.yaml": FLOW % "promo",
             "config/flows/other.yaml": FLOW % "other", **TEMPLATES}
    return make_workspace(files, rows=rows)


def check_race(ws, rows: int) -> None:
    results = race(ws)
    reachable = sum(1 for p in people(rows) if p["email"] or p["phone"])
    per = sent_per_recipient(ws)
    assert max(per.values()) == 1, "somebody got two messages on one day"
    assert sum(r["sent"] for r in results) == len(per) == reachable
    assert sum(r["capped"] for r in results) == reachable  # the loser of each race


def test_two_runs_racing_on_sqlite_respect_the_cap(make_workspace) -> None:
    ws = workspace(make_workspace, "sqlite:///crm.db", "sqlite:///.herald/herald.db", 400)
    check_race(ws, 400)


@pytest.mark.postgres
def test_two_runs_racing_on_postgres_respect_the_cap(make_workspace, pg_database) -> None:
    fill_people(pg_database, 600)
    ws = workspace(make_workspace, pg_database, pg_database, 600)
    check_race(ws, 600)


def outbox_recipients(ws) -> Counter[str]:
    seen: Counter[str] = Counter()
    for path in outbox_files(ws):
        if path.suffix == ".jsonl":
            seen.update(json.loads(line)["recipient"]
                        for line in path.read_text().splitlines() if line)
        elif path.suffix == ".eml":
            seen[path.stem] += 1
    return seen


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres",
                                                              marks=pytest.mark.postgres)])
def test_killed_mid_send_then_rerun_sends_each_remaining_recipient_once(
        make_workspace, request, backend) -> None:
    rows = 600
    if backend == "postgres":
        url = request.getfixturevalue("pg_database")
        fill_people(url, rows)
        source = store = url
    else:
        source, store = "sqlite:///crm.db", "sqlite:///.herald/herald.db"
    # SMS at 150/s: the run takes about 4 s to send, long enough to kill it midway
    ws = workspace(make_workspace, source, store, rows, rate=", rate: 150/s")
    # no one has an email, so the outbox's SMS lines are the whole record of sends
    update_people = ("UPDATE people SET email = NULL, "
                     "phone = '+1415555' || lpad(CAST(id AS text), 4, '0')")
    if backend == "postgres":
        engine = create_engine(source)
        with engine.begin() as conn:
            conn.exec_driver_sql(update_people)
        engine.dispose()
    else:
        with __import__("sqlite3").connect(ws.root / "crm.db") as conn:
            conn.execute("UPDATE people SET email = NULL, "
                         "phone = '+1415555' || printf('%04d', id)")
    python = os.path.join(os.path.dirname(sys.executable), "python")
    code = ("import sys; from herald.core.workspace import Workspace; "
            "from herald.flows.engine import run_local; "
            "run_local(Workspace.open(sys.argv[1]), 'promo', run_key='crash')")
    proc = subprocess.Popen([python, "-c", code, str(ws.root)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until it is really sending
        if sum(outbox_recipients(ws).values()) >= 150:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    before = outbox_recipients(ws)
    assert 0 < sum(before.values()) < rows, "the kill should land mid-send"

    from herald.flows.engine import run_local

    summary = run_local(ws, "promo", run_key="crash")
    after = outbox_recipients(ws)
    assert max(after.values()) == 1, "nobody is sent twice"
    with ws.store.connect() as conn:
        statuses = dict(conn.execute(select(ledger.deliveries.c.recipient,
                                            ledger.deliveries.c.status)).all())
    assert len(statuses) == rows  # every recipient has exactly one ledger row
    in_flight = {k for k, s in statuses.items() if s == "sending"}
    sent = {k for k, s in statuses.items() if s == "sent"}
    assert sent | in_flight == set(statuses)
    # rows in flight at the kill are not resent: their messages were written or not, once
    assert set(after) == sent | (in_flight & set(before))
    assert summary["deliveries"]["sent"] == len(sent) - len(set(before) - in_flight)
