"""What tests share besides fixtures: the test workspace's files, CRM rows, and readers
of what a run left behind (the outbox, the ledger and the suppression list, read through
the workspace's own database so they work on SQLite and Postgres alike); the unsubscribe
server; the test journey (``nudge``), its CRM events and its enrollments, and a journey
that sends through a webhook (``hooked``)."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, text

from herald.core.db import journey_enrollments as enrollments
from herald.core.workspace import Workspace
from herald.journeys import engine as journeys

HERALD_YAML = """\
timezone: UTC
sources:
  crm: "sqlite:///crm.db"
store: "sqlite:///.herald/herald.db"
channels:
  email: {type: outbox, kind: email}
  sms: {type: outbox, kind: sms}
caps: []
chunk_size: 40
max_workers: 3
"""

PROMO_YAML = """\
name: promo
description: A test campaign
audience:
  source: crm
  segment: people
  params: {min_score: 0}
  key: id
  tier: tier
  locale: locale
tiers:
  gold: {channels: [email, sms]}
  default: {channels: [sms, email]}
"""

UNSUBSCRIBE_SECRET_ENV = "HERALD_TEST_UNSUB_SECRET"  # the tests set it (monkeypatch.setenv)


def unsubscribe_yaml(port: int) -> str:
    """The test workspace's herald.yaml with unsubscribe links served on ``port``."""
    return HERALD_YAML + (f'unsubscribe: {{base_url: "http://127.0.0.1:{port}", '
                          f'secret: "${{{UNSUBSCRIBE_SECRET_ENV}}}"}}\n')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def unsubscribe_server(ws: Workspace, port: int) -> Iterator[None]:
    """``herald unsubscribe-server``'s app for ``ws`` on 127.0.0.1:``port``, on a thread,
    for as long as the block runs."""
    import uvicorn

    from herald.flows.unsubscribe_server import make_app

    server = uvicorn.Server(uvicorn.Config(make_app(ws), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=10)


FILES: dict[str, str] = {
    "config/herald.yaml": HERALD_YAML,
    "config/flows/promo.yaml": PROMO_YAML,
    "audiences/people.sql": ("SELECT id, name, email, phone, tier, locale, score\n"
                             "FROM people\nWHERE score >= :min_score\nORDER BY id\n"),
    "templates/promo/default.email.subject.j2": "Hello {{ name }}",
    "templates/promo/default.email.txt.j2": "Hello {{ name }}, your score is {{ score }}.",
    "templates/promo/default.email.html.j2": "<p>Hello <b>{{ name }}</b></p>",
    "templates/promo/default.sms.txt.j2": "Hi {{ name }}, score {{ score }}. Reply STOP to opt out",
    "templates/promo/gold.email.subject.j2": "A gift for you, {{ name }}",
    "templates/promo/gold.email.subject.zh.j2": "{{ name }}，送您一份礼物",
    "templates/promo/gold.email.txt.j2": "Dear {{ name }}, gold member ({{ tier }}).",
    "templates/promo/gold.email.txt.zh.j2": "亲爱的{{ name }}，金卡会员专享。",
}


def people(n: int) -> list[dict[str, Any]]:
    """Deterministic CRM rows: every 7th has no email, every 5th no phone."""
    rows = []
    for i in range(1, n + 1):
        rows.append({
            "id": i,
            "name": f"User {i}",
            "email": None if i % 7 == 0 else f"user{i}@example.com",
            "phone": None if i % 5 == 0 else f"+1415555{i:04d}",
            "tier": "gold" if i % 4 == 0 else ("silver" if i % 4 == 1 else "bronze"),
            "locale": "zh_CN" if i % 2 == 0 else "en_US",
            "score": i % 10,
        })
    return rows


def write_people(path: Path, rows: list[dict[str, Any]]) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE IF EXISTS people")
        conn.execute("CREATE TABLE people (id INTEGER, name TEXT, email TEXT, phone TEXT, "
                     "tier TEXT, locale TEXT, score INTEGER)")
        conn.executemany("INSERT INTO people VALUES (:id, :name, :email, :phone, :tier, "
                         ":locale, :score)", rows)


def fill_people(url: str, rows: int) -> None:
    """Create and fill the CRM's people table in any database (Postgres sources)."""
    from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, insert

    engine = create_engine(url)
    meta = MetaData()
    table = Table("people", meta, Column("id", Integer), Column("name", String),
                  Column("email", String), Column("phone", String), Column("tier", String),
                  Column("locale", String), Column("score", Integer))
    meta.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(table), people(rows))
    engine.dispose()


# A workspace whose runs send slowly enough to be interrupted, its chunks in two worker
# processes (task_runner: processes): 600 recipients, chunks of 100, batches of 20 at 100/s.
SLOW_WORKERS_YAML = (
    "timezone: UTC\nsources:\n  crm: \"sqlite:///crm.db\"\nchannels:\n"
    "  email: {type: outbox, kind: email, rate: 100/s, batch_size: 20}\n"
    "  sms: {type: outbox, kind: sms, rate: 100/s, batch_size: 20}\n"
    "chunk_size: 100\nmax_workers: 2\ntask_runner: {type: processes, workers: 2}\n")


def process_state(pid: int) -> str:
    """A process's state letter from /proc (``Z``: ended, not yet reaped), or "gone"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def child_processes(pid: int, marker: str) -> list[int]:
    """The processes ``pid`` started whose command line holds ``marker``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and marker in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def run_script(ws: Workspace, run_key: str, stop_on_signals: bool = False) -> Path:
    """A script that runs the workspace's ``promo`` under ``run_key`` in a process of its
    own, behind the main guard that worker processes need (``stop_on_signals``: as
    ``herald run`` does, SIGTERM and Ctrl-C stop the sending)."""
    run = f"engine.run_local(Workspace.open(sys.argv[1]), 'promo', run_key={run_key!r})"
    body = (f"    with engine.stop_on_signals():\n        {run}\n" if stop_on_signals
            else f"    {run}\n")
    script = ws.root / f"run_{run_key}.py"
    script.write_text("import sys\nfrom herald.core.workspace import Workspace\n"
                      "from herald.flows import engine\n"
                      f"if __name__ == '__main__':\n{body}")
    return script


def wait_for_outbox(ws: Workspace, messages: int, timeout: float = 60) -> None:
    """Until the outbox holds ``messages`` messages (or ``timeout`` seconds passed)."""
    deadline = time.monotonic() + timeout
    while outbox_messages(ws) < messages and time.monotonic() < deadline:
        time.sleep(0.05)


def outbox_files(ws: Workspace) -> list[Path]:
    base = ws.root / ".herald" / "outbox"
    return sorted(p for p in base.rglob("*") if p.is_file()) if base.exists() else []


def outbox_messages(ws: Workspace) -> int:
    """How many messages the outbox holds (.eml files plus JSON lines)."""
    total = 0
    for path in outbox_files(ws):
        if path.suffix == ".eml":
            total += 1
        elif path.suffix == ".jsonl":
            total += sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line)
    return total


def outbox_recipients(ws: Workspace) -> Counter[str]:
    """How many messages the outbox holds for each recipient key (JSON lines and .eml
    files)."""
    lines = [json.loads(line)["recipient"] for path in outbox_files(ws)
             if path.suffix == ".jsonl" for line in path.read_text(encoding="utf-8").splitlines()
             if line]
    return Counter(lines + [p.stem for p in outbox_files(ws) if p.suffix == ".eml"])


def ledger_rows(ws: Workspace, *columns: str, where: str = "") -> dict[str, tuple[Any, ...]]:
    """{recipient: (columns...)} of the ledger, through the workspace's database."""
    query = f"SELECT recipient, {', '.join(columns)} FROM herald_deliveries"
    with ws.store.connect() as conn:
        return {r[0]: tuple(r[1:]) for r in conn.execute(text(query + (
            f" WHERE {where}" if where else "")))}


def suppression_rows(ws: Workspace, *columns: str) -> list[tuple[Any, ...]]:
    """Rows of the suppression list (``columns``, default the value)."""
    with ws.store.connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            f"SELECT {', '.join(columns or ('value',))} FROM herald_suppressions"))]


def table_rows(ws: Workspace, table: str, *columns: str) -> list[tuple[Any, ...]]:
    """Rows of one of the workspace database's tables."""
    with ws.store.connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            f"SELECT {', '.join(columns)} FROM {table}"))]


# -- journeys ----------------------------------------------------------------------------
JOURNEY_START = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)  # a Monday, 10:00 in Shanghai

NUDGE = """\
name: nudge
entry:
  source: crm
  segment: nudge_entry
  params: {min_score: 0}
  key: id
  tier: tier
  locale: locale
exit_when:
  - {condition: bought, at: placed_at, reason: purchased}
goal: {segment: bought, window: 14d, at: placed_at, key: id, exit: false}
steps:
  split:
    type: split
    cohorts:
      holdout: {weight: 10, holdout: true}
      main: {weight: 90, next: first}
  first:
    type: send
    tiers: {default: {channels: [email, sms]}}
    next: wait_visit
  wait_visit:
    type: wait_for
    condition: visited
    at: visited_at
    within: 3d
    matched: thanks
    timeout: second
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
  thanks: {type: send, tiers: {default: {channels: [email]}}, next: done}
  done: {type: exit, reason: thanked}
"""

NUDGE_TEMPLATES = {
    f"templates/nudge/{step}/default.{kind}": text
    for step in ("first", "second", "third", "third_gold", "thanks")
    for kind, text in (("email.subject.j2", "Hello {{ name }}"),
                       ("email.txt.j2", "Step {{ step }} for {{ name }} ({{ run_key }})"),
                       ("sms.txt.j2", "Hi {{ name }}: {{ step }}. Reply STOP to opt out"))
}

JOURNEY_FILES: dict[str, str | None] = {
    "config/journeys/nudge.yaml": NUDGE,
    "audiences/nudge_entry.sql": ("SELECT id, name, email, phone, tier, locale, score "
                                  "FROM people WHERE score >= :min_score"),
    "audiences/bought.sql": ("SELECT customer_id AS id, placed_at FROM orders "
                             "WHERE placed_at >= :since AND placed_at < :until"),
    "audiences/visited.sql": ("SELECT id, visited_at FROM visits "
                              "WHERE visited_at >= :since AND visited_at < :until"),
    **NUDGE_TEMPLATES,
}


def crm_events(ws: Workspace) -> None:
    """The CRM source's event tables the test journey's conditions read."""
    with sqlite3.connect(ws.root / "crm.db") as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS orders (customer_id INTEGER, placed_at TEXT)")
        conn.execute("CREATE TABLE IF NOT EXISTS visits (id INTEGER, visited_at TEXT)")


def crm_event(ws: Workspace, table: str, key: int, at: datetime) -> None:
    """One order or visit of recipient ``key`` at ``at``."""
    with sqlite3.connect(ws.root / "crm.db") as conn:
        conn.execute(f"INSERT INTO {table} VALUES (?, ?)",
                     (key, at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")))


def journey_tick(ws: Workspace, name: str = "nudge", **kw: Any) -> dict[str, Any]:
    """One tick of journey ``name`` on a thread pool, without Prefect."""
    return journeys.tick_local(ws, name, **kw)


def enrollment_rows(ws: Workspace, name: str = "nudge") -> dict[str, Any]:
    """{recipient: enrollment row} of journey ``name``."""
    with ws.store.connect() as conn:
        return {r.recipient: r for r in conn.execute(
            select(enrollments).where(enrollments.c.journey == name))}


HOOKED = """name: hooked
entry: {source: crm, segment: nudge_entry, params: {min_score: 0}, key: id, tier: tier}
steps:
  hello: {type: send, tiers: {default: {channels: [hook]}}, next: later}
  later: {type: wait, for: 1d}
"""


def hooked_workspace(make_workspace: Any, peer: Any, store: str | None = None
                     ) -> Workspace:
    """Journey ``hooked``: one webhook send (a request at a time, so nothing goes out
    after a fatal answer), 20 recipients (7 and 14 without an address) in two chunks."""
    return make_workspace({
        "config/herald.yaml": (
            "timezone: UTC\nsources:\n  crm: \"sqlite:///crm.db\"\nchannels:\n"
            "  email: {type: outbox, kind: email}\n  sms: {type: outbox, kind: sms}\n"
            f"  hook: {{type: webhook, url: \"{peer.url}/hook\", address: email, "
            "timeout: 1, concurrency: 1}\nchunk_size: 10\nmax_workers: 1\n"),
        "config/journeys/hooked.yaml": HOOKED,
        "audiences/nudge_entry.sql": JOURNEY_FILES["audiences/nudge_entry.sql"],
        "templates/hooked/hello/default.webhook.txt.j2": "Hello {{ name }}"},
        rows=20, store=store)
