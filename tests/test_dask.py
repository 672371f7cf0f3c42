"""Chunks on a Dask cluster (local, multi-process) give the same ledger as on threads."""

from __future__ import annotations

import os
import socket

import pytest
from sqlalchemy import create_engine, text

from herald.core.spec import TaskRunnerSpec
from herald.flows import campaign

from .helpers import PROMO_YAML, outbox_messages

pytestmark = [pytest.mark.prefect]

HOLDOUT = PROMO_YAML + "holdout: 0.1\n"


def ledger(url: str, run_key: str) -> list[tuple[str, str, str | None, str]]:
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT recipient, tier, channel, status FROM herald_deliveries "
            "WHERE run_key = :k ORDER BY recipient"), {"k": run_key}).all()
    engine.dispose()
    return [tuple(r) for r in rows]


@pytest.mark.postgres
def test_dask_run_matches_threaded_run(make_workspace, pg_database, prefect_harness) -> None:
    ws = make_workspace({"config/flows/promo.yaml": HOLDOUT}, rows=300, store=pg_database)
    threaded = campaign.run(ws, "promo", None, "threads", False,
                            TaskRunnerSpec(type="threads"))
    on_dask = campaign.run(ws, "promo", None, "dask", False,
                           TaskRunnerSpec(type="dask", workers=2))
    assert on_dask["chunks"] == threaded["chunks"] == 8  # chunk_size 40
    assert on_dask["deliveries"] == threaded["deliveries"]
    assert on_dask["by_tier"] == threaded["by_tier"]
    assert threaded["deliveries"]["held_out"] > 0 and threaded["deliveries"]["sent"] > 200
    assert ledger(pg_database, "dask") == ledger(pg_database, "threads")
    assert len(ledger(pg_database, "dask")) == 300
    sent = threaded["deliveries"]["sent"]
    assert outbox_messages(ws) == 2 * sent
    # the chunks really ran elsewhere: in two worker processes, not in this one
    here = f"{socket.gethostname()}:{os.getpid()}"
    assert threaded["workers"] == [here]
    assert len(on_dask["workers"]) == 2 and here not in on_dask["workers"]

    again = campaign.run(ws, "promo", None, "dask", False, TaskRunnerSpec(type="dask"))
    # the run key is complete: the rerun says so and builds nothing
    assert again["status"] == "nothing_to_do" and again["deliveries"]["sent"] == sent
    assert outbox_messages(ws) == 2 * sent


def test_task_runner_options_are_checked(make_workspace, capsys) -> None:
    from herald.flows.cli import main

    ws = make_workspace(rows=5)
    with pytest.raises(SystemExit) as exc:
        main(["run", "promo", "--task-runner", "spark", "-w", str(ws.root)])
    assert exc.value.code == 2
    assert "'spark' (use threads, processes or dask)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["run", "promo", "--task-runner", "threads", "--dask-address", "tcp://h:1",
              "-w", str(ws.root)])
    assert exc.value.code == 2
    assert "--dask-address needs --task-runner dask" in capsys.readouterr().err
