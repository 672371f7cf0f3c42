"""The cost of a journey tick per enrollment moved (README "Journeys", BENCHMARKS.md).

A synthetic workspace: N people in a SQLite source, the workspace database on SQLite (and
on Postgres when it answers at HERALD_BENCH_POSTGRES_URL), and the journey

    settle (wait 1d) -> cohort (split, 5% holdout) -> hello (send, outbox SMS) -> end

Tick 1 enters everyone and parks them at the wait (entry + one move each); tick 2, a day
later, moves everyone through the split and the send to the end (three moves each, one
message each); tick 3 finds nothing due. Prints one JSON object per store.

    .venv/bin/python bench/journey_tick.py [--size 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from herald.core import clock
from herald.core.workspace import Workspace
from herald.flows import chunks as flow_chunks
from herald.journeys import engine

PG = os.environ.get("HERALD_BENCH_POSTGRES_URL",
                    "postgresql+psycopg://postgres@127.0.0.1:5432/test")
START = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)

FILES = {
    "config/herald.yaml": """\
timezone: UTC
sources: {crm: "sqlite:///crm.db"}
store: "STORE"
channels:
  sms: {type: outbox, kind: sms}
chunk_size: 5000
max_workers: 2
""",
    "config/journeys/bench.yaml": """\
name: bench
entry: {source: crm, segment: everyone, key: id}
steps:
  settle: {type: wait, for: 1d, next: cohort}
  cohort:
    type: split
    cohorts: {holdout: {weight: 5, holdout: true}, rest: {weight: 95, next: hello}}
  hello: {type: send, tiers: {default: {channels: [sms]}}}
""",
    "audiences/everyone.sql": "SELECT id, name, phone FROM people",
    "templates/bench/hello/default.sms.txt.j2": "Hello {{ name }}. Reply STOP to opt out",
}


def workspace(root: Path, size: int, store: str) -> Workspace:
    for rel, content in FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content.replace("STORE", store))
    with sqlite3.connect(root / "crm.db") as conn:
        conn.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT, phone TEXT)")
        conn.executemany("INSERT INTO people VALUES (?, ?, ?)",
                         ((i, f"P{i}", f"+1415555{i % 10000:04d}") for i in range(1, size + 1)))
    return Workspace.open(root)


def timed(ws: Workspace) -> tuple[float, dict[str, Any]]:
    began = time.perf_counter()
    summary = engine.tick_local(ws, "bench")
    return time.perf_counter() - began, summary


def measure(size: int, store: str, label: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        ws = workspace(Path(tmp), size, store)
        out: dict[str, Any] = {"store": label, "enrollments": size}
        with clock.using(clock.Clock(START, frozen=True)):
            for name, advance in (("enter_and_park", None), ("move_and_send", 1),
                                  ("nothing_due", 1)):
                if advance:
                    clock.advance(timedelta(days=advance))
                seconds, summary = timed(ws)
                moves = sum(sum(o.values()) for o in summary["steps"].values())
                moves += sum(summary["exits"].values()) if not moves else 0
                out[name] = {"seconds": round(seconds, 2), "entered": summary["entered"],
                             "looked_at": summary["claimed"], "moves": moves,
                             "chunks": summary["chunks"],
                             "us_per_enrollment": round(1e6 * seconds / max(1, size), 1)}
        flow_chunks.forget_workspace(ws.root)
        ws.dispose()
        return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--only", choices=["sqlite", "postgres"])
    args = parser.parse_args()
    if args.only != "postgres":
        print(json.dumps(measure(args.size, "sqlite:///.herald/herald.db", "sqlite")))
    if args.only == "sqlite":
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(PG, isolation_level="AUTOCOMMIT")
    name = f"herald_bench_{uuid.uuid4().hex[:8]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # no Postgres here: SQLite only
        print(json.dumps({"store": "postgres", "skipped": str(exc)[:100]}))
        return
    try:
        url = make_url(PG).set(database=name).render_as_string(hide_password=False)
        print(json.dumps(measure(args.size, url, "postgres")))
    finally:
        flow_chunks.forget_all()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
