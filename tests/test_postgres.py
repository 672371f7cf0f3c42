"""The same campaign with Postgres as the source and as the workspace database."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from herald.audiences import builder, sql, store
from herald.core.errors import AudienceError
from herald.delivery import ledger, run_records
from herald.flows import campaign
from herald.flows.engine import run_local

from .helpers import HERALD_YAML, fill_people, outbox_messages, people

pytestmark = pytest.mark.postgres


def pg_workspace(make_workspace, url: str, rows: int, folder: str = "ws"):
    fill_people(url, rows)
    config = HERALD_YAML.replace('crm: "sqlite:///crm.db"', f'crm: "{url}"').replace(
        'store: "sqlite:///.herald/herald.db"', f'store: "{url}"')
    return make_workspace({"config/herald.yaml": config}, rows=rows, folder=folder)


def test_end_to_end_on_postgres(make_workspace, pg_database) -> None:
    ws = pg_workspace(make_workspace, pg_database, 150)
    assert ws.store.dialect.name == "postgresql"
    first = run_local(ws, "promo", run_key="pg-1")
    assert first["package"]["size"] == 150 and first["chunks"] == 4
    assert first["deliveries"]["sent"] == 146  # 35, 70, 105 and 140 have no address
    assert first["deliveries"]["no_address"] == 4
    assert outbox_messages(ws) == 146
    with ws.store.connect() as conn:
        assert conn.execute(select(func.count()).select_from(ledger.deliveries)).scalar() == 150
    again = run_local(ws, "promo", run_key="pg-1")
    assert again["deliveries"]["sent"] == 0 and again["deliveries"]["duplicate"] == 150
    assert outbox_messages(ws) == 146


@pytest.mark.prefect
def test_prefect_flow_on_postgres(make_workspace, pg_database, prefect_harness) -> None:
    ws = pg_workspace(make_workspace, pg_database, 90)
    summary = campaign.run(ws, "promo", {"min_score": 3}, "pg-prefect", False)
    expected = sum(1 for p in people(90) if p["score"] >= 3)
    assert summary["package"]["size"] == expected
    assert summary["deliveries"]["sent"] + summary["deliveries"]["no_address"] == expected
    assert outbox_messages(ws) == summary["deliveries"]["sent"]
    assert run_records.get_run(ws.store, summary["run_id"]).status == "completed"


def test_duplicate_keys_on_postgres(make_workspace, pg_database) -> None:
    ws = pg_workspace(make_workspace, pg_database, 10)
    (ws.root / "audiences/people.sql").write_text(
        "SELECT * FROM people WHERE score >= :min_score UNION ALL "
        "SELECT * FROM people WHERE id = 2")
    flow = ws.flow("promo")
    with pytest.raises(AudienceError, match=r"duplicate key '2'"):
        builder.build(ws, flow, sql.load_segment(ws, flow))
    assert store.list_packages(ws) == []


class _Terminated(BaseException):
    """What Prefect's SIGTERM handler raises in a flow run (a BaseException)."""


def test_a_signal_during_the_segment_query_ends_it_without_a_traceback(
        make_workspace, pg_database, caplog) -> None:
    """SIGTERM while the Postgres source is still running the segment's query (a flow
    run's handler raises a BaseException there): the build stops at once, the busy
    connection is closed rather than handed back to the pool (whose rollback failed on
    it and logged a traceback), the server's query ends, and nothing is stored."""
    import signal
    import threading
    import time

    from sqlalchemy import create_engine, text

    ws = pg_workspace(make_workspace, pg_database, 10)
    (ws.root / "audiences/people.sql").write_text(
        "SELECT p.* FROM people p, pg_sleep(30) WHERE score >= :min_score")
    flow = ws.flow("promo")

    def terminated(signum, frame):
        raise _Terminated(signum)

    previous = signal.signal(signal.SIGTERM, terminated)
    timer = threading.Timer(1.0, signal.pthread_kill,
                            (threading.main_thread().ident, signal.SIGTERM))
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(_Terminated):
            builder.build(ws, flow, sql.load_segment(ws, flow))
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    assert time.monotonic() - started < 10
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    probe = create_engine(pg_database)
    try:
        for _ in range(50):  # the server notices the closed connection within moments
            with probe.connect() as conn:
                running = conn.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%'"
                    " AND pid <> pg_backend_pid()")).scalar_one()
            if not running:
                break
            time.sleep(0.1)
        assert running == 0
    finally:
        probe.dispose()
    assert store.list_packages(ws) == []


def test_a_list_parameter_binds_as_in_on_a_postgres_source(make_workspace, pg_database,
                                                           capsys) -> None:
    from herald.flows.cli import main

    from .test_audience import LISTED_SQL

    ws = pg_workspace(make_workspace, pg_database, 20)
    (ws.root / "audiences/people.sql").write_text(LISTED_SQL)
    flow = ws.flow("promo")
    segment = sql.load_segment(ws, flow, {"ids": [1, 2, 3, 4, 5], "tiers": ["gold"]})
    package = builder.build(ws, flow, segment)
    assert [r.key for r in store.read(ws, package.id)] == ["1", "2", "3", "5"]
    with pytest.raises(SystemExit):
        main(["preview", "promo", "-p", "ids=[1, 2, 3]", "-p", "tiers=[x]", "--tier",
              "bronze", "--json", "-w", str(ws.root)])
    assert [s["recipient"] for s in json.loads(capsys.readouterr().out)] == ["2", "3"]
    summary = run_local(ws, "promo", {"ids": [6, 9], "tiers": ["gold"]}, run_key="listed")
    assert summary["package"]["size"] == 2
