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
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from herald.channels import ledger
from herald.core import clock
from herald.flows import engine as flow_engine
from herald.flows.errors import ConfigError, ValidationFailed
from herald.flows.workspace import Workspace
from herald.journeys import engine, load, report
from herald.journeys.tables import enrollments, log

from .conftest import outbox_messages

START = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)  # a Monday, 10:00 in Shanghai

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
  cohort:
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

TEMPLATES = {
    f"templates/nudge/{step}/default.{kind}": text
    for step in ("first", "second", "third", "third_gold", "thanks")
    for kind, text in (("email.subject.j2", "Hello {{ name }}"),
                       ("email.txt.j2", "Step {{ step }} for {{ name }} ({{ run_key }})"),
                       ("sms.txt.j2", "Hi {{ name }}: {{ step }}. Reply STOP to opt out"))
}

FILES: dict[str, str | None] = {
    "config/journeys/nudge.yaml": NUDGE,
    "audiences/nudge_entry.sql": ("SELECT id, name, email, phone, tier, locale, score "
                                  "FROM people WHERE score >= :min_score"),
    "audiences/bought.sql": ("SELECT customer_id AS id, placed_at FROM orders "
                             "WHERE placed_at >= :since AND placed_at < :until"),
    "audiences/visited.sql": ("SELECT id, visited_at FROM visits "
                              "WHERE visited_at >= :since AND visited_at < :until"),
    **TEMPLATES,
}


def _crm_events(ws: Workspace) -> None:
    with sqlite3.connect(ws.root / "crm.db") as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS orders (customer_id INTEGER, placed_at TEXT)")
        conn.execute("CREATE TABLE IF NOT EXISTS visits (id INTEGER, visited_at TEXT)")


def _event(ws: Workspace, table: str, key: int, at: datetime) -> None:
    with sqlite3.connect(ws.root / "crm.db") as conn:
        conn.execute(f"INSERT INTO {table} VALUES (?, ?)",
                     (key, at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")))


@pytest.fixture
def journey_ws(make_workspace: Any, store_url: str | None) -> Workspace:
    ws = make_workspace(FILES, rows=60, store=store_url)
    _crm_events(ws)
    return ws


def tick(ws: Workspace, name: str = "nudge", **kw: Any) -> dict[str, Any]:
    return engine.tick_local(ws, name, **kw)


def _rows(ws: Workspace, name: str = "nudge") -> dict[str, Any]:
    with ws.store.connect() as conn:
        return {r.recipient: r for r in conn.execute(
            select(enrollments).where(enrollments.c.journey == name))}


def _deliveries(ws: Workspace, recipient: str | None = None) -> list[Any]:
    d = ledger.deliveries.c
    query = select(d.recipient, d.run_key, d.status, d.channel).where(d.flow == "journey:nudge")
    if recipient:
        query = query.where(d.recipient == recipient)
    with ws.store.connect() as conn:
        return list(conn.execute(query))


def _steps_sent(ws: Workspace, recipient: str) -> list[str]:
    return sorted(r.run_key.split(":")[2] for r in _deliveries(ws, recipient)
                  if r.status == "sent")


def test_smoke(journey_ws: Workspace) -> None:
    with clock.using(clock.Clock(START, frozen=True)):
        summary = tick(journey_ws)
    print(summary)
    assert summary["entered"] == 60
