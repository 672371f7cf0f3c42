"""Chunks in worker processes of this machine (``task_runner: processes``): the same
ledger as on threads, on SQLite and Postgres, through the engine and through Prefect;
a stop reaches the workers; their log lines reach the run's process."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import pytest

from herald.core.spec import TaskRunnerSpec
from herald.flows import chunks, engine

from .helpers import (
    HERALD_YAML,
    JOURNEY_FILES,
    JOURNEY_START,
    PROMO_YAML,
    SLOW_WORKERS_YAML,
    crm_event,
    crm_events,
    enrollment_rows,
    journey_tick,
    ledger_rows,
    outbox_messages,
    outbox_recipients,
    run_script,
    wait_for_outbox,
)
from .test_channel_webhook import hook_workspace

HERE = f"{socket.gethostname()}:{os.getpid()}"
PROCESSES = TaskRunnerSpec(type="processes", workers=2)


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_processes_write_the_ledger_threads_write(store, make_workspace, request) -> None:
    url = request.getfixturevalue("pg_database") if store == "postgres" else None
    ws = make_workspace({"config/flows/promo.yaml": PROMO_YAML + "holdout: 0.1\n"},
                        rows=300, store=url)
    threaded = engine.run_local(ws, "promo", run_key="threads")
    spread = engine.run_local(ws, "promo", run_key="processes", runner=PROCESSES)
    assert spread["chunks"] == threaded["chunks"] == 8  # chunk_size 40
    assert spread["deliveries"] == threaded["deliveries"]
    assert spread["by_tier"] == threaded["by_tier"]
    assert threaded["deliveries"]["held_out"] > 0 and threaded["deliveries"]["sent"] > 200

    def rows(key: str) -> dict[str, tuple[Any, ...]]:
        return ledger_rows(ws, "tier", "channel", "address", "status", "variant",
                           where=f"run_key = '{key}'")

    assert rows("processes") == rows("threads") and len(rows("threads")) == 300
    # each recipient of the second run got one message, from one of two other processes
    delivered = outbox_recipients(ws)
    assert set(delivered.values()) == {2}
    assert len(delivered) == threaded["deliveries"]["sent"]
    assert threaded["workers"] == [HERE]
    assert len(spread["workers"]) == 2 and HERE not in spread["workers"]


def test_the_workspace_setting_chooses_processes(make_workspace) -> None:
    ws = make_workspace({"config/herald.yaml": HERALD_YAML + (
        "task_runner: {type: processes, workers: 2}\n")}, rows=120)
    summary = engine.run_local(ws, "promo", run_key="k")
    threaded = engine.run_local(ws, "promo", run_key="t", runner=TaskRunnerSpec())
    assert summary["deliveries"] == threaded["deliveries"]
    assert outbox_messages(ws) == 2 * summary["deliveries"]["sent"] > 100
    assert threaded["workers"] == [HERE]
    assert HERE not in summary["workers"] and 1 <= len(summary["workers"]) <= 2


def test_worker_log_lines_reach_the_run_process(make_workspace, peer, monkeypatch,
                                                caplog) -> None:
    """A chunk's error in a worker (a provider refusing the channel's credentials stops
    the channel) is a record of the run's process, under the same logger name, with the
    marks its chunk was given."""
    from herald.delivery.workers import ChunkProcesses

    ws = hook_workspace(make_workspace, peer, monkeypatch, concurrency="1")
    for i in range(1, 13):
        peer.script(str(i), ("status", 401))
    prepared = engine.prepare(ws, "promo", run_key="logs")
    caplog.set_level(logging.INFO, logger="herald")
    pool = ChunkProcesses(1)
    try:
        result = pool.run(chunks.run_chunk, prepared.chunks[0],
                          {"flow_run_id": "f-1", "task_run_id": "t-1"})
    finally:
        pool.close()
    # the refused one and the ten after it, kept for the rerun (see engine.check_channels)
    assert sum(n for status, *_, n in result.counts if status == "queued") == 11
    assert result.worker != HERE
    stopped = [r for r in caplog.records if r.name == "herald.dispatch"
               and "channel hook stopped" in r.getMessage()]
    assert len(stopped) == 1, [r.getMessage() for r in caplog.records]
    assert stopped[0].levelno == logging.ERROR and stopped[0].process != os.getpid()
    assert (stopped[0].flow_run_id, stopped[0].task_run_id) == ("f-1", "t-1")


def test_a_stop_in_the_run_process_stops_the_workers(make_workspace) -> None:
    from herald.delivery import dispatch
    from herald.delivery.workers import ChunkProcesses

    ws = make_workspace(rows=40)
    prepared = engine.prepare(ws, "promo", run_key="stop")
    pool = ChunkProcesses(1)
    try:
        dispatch.request_stop("SIGTERM")
        # a chunk that starts after the stop sends nothing (its rows are left queued for
        # the rerun): the worker read the run process's stop
        assert pool.run(chunks.run_chunk, prepared.chunks[0]).counts == []
    finally:
        dispatch.clear_stop()
        pool.close()
    assert outbox_messages(ws) == 0
    assert dispatch._shared == []  # the pool's event is no longer set by later stops


@pytest.mark.parametrize("sig", ["SIGTERM", "Ctrl-C", "SIGTERM to a worker"])
def test_a_signal_stops_worker_processes_between_batches(sig, make_workspace,
                                                         catalogue) -> None:
    """SIGTERM to the run's process, Ctrl-C in its terminal (SIGINT to the whole
    process group, workers included) or SIGTERM to one worker: no new batch anywhere,
    the batches in flight settled, the run fails saying how to resume, and the rerun
    sends the rest once each."""
    from .test_reliability import _spawned_workers

    ws = make_workspace({"config/herald.yaml": SLOW_WORKERS_YAML}, rows=600)
    script = run_script(ws, "stop", stop_on_signals=True)
    proc = subprocess.Popen([sys.executable, str(script), str(ws.root)],
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_outbox(ws, 60)
    if sig == "Ctrl-C":
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's: every process of the group
    elif sig == "SIGTERM":
        proc.send_signal(signal.SIGTERM)
    else:
        os.kill(_spawned_workers(proc.pid)[0], signal.SIGTERM)
    signalled = time.monotonic()
    _, err = proc.communicate(timeout=30)
    took = time.monotonic() - signalled
    before = outbox_messages(ws)
    assert proc.returncode != 0, err[-800:]
    assert "herald run promo --run-key stop" in err and "stopped by" in err, err[-800:]
    assert before < 400
    first = ledger_rows(ws, "status", where="run_key = 'stop'")
    assert not any(s == "sending" for (s,) in first.values())  # in flight: settled
    chunks.forget_workspace(ws.root)
    from herald.core.workspace import Workspace

    again = Workspace.open(ws.root)
    try:
        engine.run_local(again, "promo", run_key="stop")
        rows = ledger_rows(again, "status", where="run_key = 'stop'")
    finally:
        chunks.forget_workspace(again.root)
        again.dispose()
    delivered = outbox_recipients(ws)
    assert len(rows) == 600 and max(delivered.values()) == 1
    assert sorted(delivered) == sorted(k for k, (s,) in rows.items() if s == "sent")
    every = [str(i) for i in range(1, 601)]
    lost = sum(1 for r in every if not delivered[r] and rows.get(r, ("queued",))[0]
               in ("queued", "sent"))
    assert lost == 0
    what = {"SIGTERM": "SIGTERM to the run's process",
            "Ctrl-C": "Ctrl-C (SIGINT to the process group)",
            "SIGTERM to a worker": "SIGTERM to one worker process"}[sig]
    catalogue("fault", f"{what}, chunks in two worker processes (task_runner: processes)",
              f"no new batch in any worker; exited {proc.returncode} in {took:.1f} s after "
              f"{before} messages, saying how to resume; no row left `sending`; the "
              "rerun sent the rest once each", messages=600, lost=lost, duplicated=0)


def test_processes_options_are_checked(make_workspace, capsys) -> None:
    from herald.core.errors import ConfigError
    from herald.core.workspace import Workspace
    from herald.flows.cli import main

    ws = make_workspace(rows=5)
    with pytest.raises(SystemExit) as exc:
        main(["run", "promo", "--task-runner", "processes", "--dask-address", "tcp://h:1",
              "-w", str(ws.root)])
    assert exc.value.code == 2
    assert "--dask-address needs --task-runner dask" in capsys.readouterr().err
    config = ws.root / "config" / "herald.yaml"
    config.write_text(HERALD_YAML + "task_runner: {type: processes, address: "
                      "\"tcp://h:1\"}\n")
    with pytest.raises(ConfigError, match="address applies to the dask task runner only"):
        Workspace.open(ws.root)
    config.write_text(HERALD_YAML + "task_runner: {type: processes, workers: 0}\n")
    with pytest.raises(ConfigError, match="workers"):
        Workspace.open(ws.root)
    # an in-memory store is refused for every task runner (test_config)


@pytest.mark.prefect
def test_herald_run_with_processes(make_workspace, prefect_harness, capsys) -> None:
    """``herald run --task-runner processes``: Prefect's task runs hand their chunks to
    two worker processes; the ledger is that of a run on threads."""
    from herald.flows.cli import main

    ws = make_workspace({"config/flows/promo.yaml": PROMO_YAML + "holdout: 0.1\n"},
                        rows=200)
    with pytest.raises(SystemExit) as exc:
        main(["run", "promo", "--json", "--run-key", "spread", "--task-runner",
              "processes", "-w", str(ws.root)])
    assert exc.value.code in (0, None)
    summary = json.loads(capsys.readouterr().out)
    threaded = engine.run_local(ws, "promo", run_key="threads")
    assert summary["deliveries"] == threaded["deliveries"] and summary["chunks"] == 5
    assert len(summary["workers"]) == 2 and HERE not in summary["workers"]
    by_key = {key: ledger_rows(ws, "tier", "channel", "status",
                               where=f"run_key = '{key}'") for key in ("spread", "threads")}
    assert by_key["spread"] == by_key["threads"] and len(by_key["spread"]) == 200


def test_a_journey_tick_in_worker_processes(make_workspace) -> None:
    """A journey's chunks in two worker processes move everyone as threads do, at the
    tick's clock (set here, read there)."""
    from herald.core import clock

    def tick_twice(ws: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        crm_events(ws)
        with clock.using(clock.Clock(JOURNEY_START, frozen=True)):
            first = journey_tick(ws)
            buyer = sorted((k for k, r in enrollment_rows(ws).items()
                            if r.cohort == "main"), key=int)[0]
            clock.advance(timedelta(days=1))
            crm_event(ws, "orders", int(buyer), clock.now() - timedelta(hours=2))
            second = journey_tick(ws)
        where = {k: (r.step, r.status, r.cohort, r.exit_reason)
                 for k, r in enrollment_rows(ws).items()}
        return first, second, where

    spread = make_workspace({**JOURNEY_FILES, "config/herald.yaml": HERALD_YAML + (
        "task_runner: {type: processes, workers: 2}\n")}, rows=60, folder="spread")
    threaded = make_workspace(JOURNEY_FILES, rows=60, folder="threaded")
    first, second, where = tick_twice(spread)
    assert first["entered"] == 60 and first["exits"] == {"holdout": 6}
    assert first["steps"]["first"]["sent"] > 40 and second["exits"] == {"purchased": 1}
    assert len(first["workers"]) >= 1 and HERE not in first["workers"]
    alike = tick_twice(threaded)
    assert (first["steps"], second["steps"], second["exits"]) == (
        alike[0]["steps"], alike[1]["steps"], alike[1]["exits"])
    assert where == alike[2] and alike[0]["workers"] == [HERE]


@pytest.mark.prefect
def test_a_journey_flow_run_hands_its_chunks_to_worker_processes(make_workspace,
                                                                 prefect_harness) -> None:
    from herald.core import clock
    from herald.flows import journey as journey_flow

    ws = make_workspace({**JOURNEY_FILES, "config/herald.yaml": HERALD_YAML + (
        "task_runner: {type: processes, workers: 2}\n")}, rows=60)
    crm_events(ws)
    with clock.using(clock.Clock(JOURNEY_START, frozen=True)):
        summary = journey_flow.run(ws, "nudge")
    assert summary["entered"] == 60 and summary["exits"] == {"holdout": 6}
    assert summary["chunks"] == 2 and HERE not in summary["workers"]
    assert sum(summary["steps"]["first"].values()) == 54


@pytest.mark.prefect
def test_a_killed_worker_s_chunks_are_retried_in_new_workers(make_workspace,
                                                             prefect_harness, capsys,
                                                             catalogue) -> None:
    """Under Prefect a worker killed mid-send (out of memory, say) fails the chunks in
    its pool; their task runs retry in new worker processes and the run completes: each
    recipient sent once, the killed worker's batches in flight left `sending`."""
    import threading

    from herald.flows.cli import main

    from .test_reliability import _spawned_workers

    ws = make_workspace({"config/herald.yaml": SLOW_WORKERS_YAML}, rows=600)
    killed: list[int] = []

    def kill_one() -> None:
        wait_for_outbox(ws, 60)
        # a worker holds at most 40 rows `sending` (a batch of 20 per channel): with more,
        # both have a batch in flight, whichever is killed (one waiting for the channel's
        # rate between batches has none)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum(
                1 for (s,) in ledger_rows(ws, "status", where="run_key = 'oom'").values()
                if s == "sending") <= 40:
            time.sleep(0.01)
        found = _spawned_workers(os.getpid())
        if found:
            os.kill(found[0], signal.SIGKILL)
            killed.append(found[0])

    killer = threading.Thread(target=kill_one)
    killer.start()
    with pytest.raises(SystemExit) as exc:
        main(["run", "promo", "--json", "--run-key", "oom", "-w", str(ws.root)])
    killer.join()
    assert killed and exc.value.code in (0, None), capsys.readouterr().err[-800:]
    summary = json.loads(capsys.readouterr().out)
    rows = ledger_rows(ws, "status", where="run_key = 'oom'")
    delivered = outbox_recipients(ws)
    in_flight = sum(1 for (s,) in rows.values() if s == "sending")
    lost = sum(1 for r in map(str, range(1, 601)) if not delivered[r]
               and rows.get(r, ("queued",))[0] in ("queued", "sent"))
    duplicated = sum(1 for n in delivered.values() if n > 1)
    assert len(rows) == 600 and lost == 0 and duplicated == 0
    assert 0 < in_flight <= 40  # the killed worker's batches, one per channel
    # the summary counts each recipient once: the retried chunks' rows are this run's
    # own, not duplicates
    counts = {s: n for s, n in summary["deliveries"].items() if n}
    assert sum(counts.values()) == 600 and "duplicate" not in counts, counts
    sent = sum(1 for (s,) in rows.values() if s == "sent")
    assert counts["sent"] == sent and counts["sending"] == in_flight
    # the killed worker may have handed part of its batches over before it died
    assert sent <= len(delivered) <= sent + in_flight
    assert all(rows[r][0] in ("sent", "sending") for r in delivered)
    catalogue("fault", "a worker process killed (SIGKILL) mid-send under Prefect "
              "(task_runner: processes)",
              f"the chunks of its pool failed and their task runs retried in new worker "
              f"processes; the run completed: {len(delivered)} delivered once each "
              f"({sent} recorded `sent`), {in_flight} rows of the killed worker's batches "
              "stay `sending` for review",
              messages=600, lost=lost, duplicated=duplicated)
