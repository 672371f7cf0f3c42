"""A tick's chunks: the job a worker runs, what it reports, the enrollments it moves
(``Item``), and claiming them under a lease (SKIP LOCKED on Postgres; SQLite's BEGIN
IMMEDIATE serialises claims) and releasing them.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update

from herald.audiences.store import Recipient, decode_row
from herald.core import clock
from herald.core.db import JOURNEY_LIVE as LIVE
from herald.core.db import journey_enrollments as enrollments
from herald.core.db import writing
from herald.core.workspace import Workspace
from herald.reporting.conversions import utc

LEASE = timedelta(minutes=10)  # how long (Herald's clock) a claimed chunk is this tick's alone
# A wait that ends within this of the tick is over: a tick starts a little late or early
# (a scheduler, a process starting), and a 3-day wait must not miss the tick 72 hours on
# by a second and take one more tick interval.
GRACE = timedelta(minutes=1)


@dataclass(frozen=True)
class ChunkJob:
    """One chunk of a tick (picklable): claim up to ``size`` enrollments and move them."""

    workspace: str
    journey: str
    tick: str
    index: int
    size: int
    moment: datetime  # the tick's clock time: what "due" and "looked at" compare with
    every: bool  # claim every live enrollment (exit checks, wait_for), not only due ones
    clock: clock.Clock = clock.REAL
    lease: timedelta = LEASE


@dataclass
class ChunkResult:
    claimed: int = 0
    moves: Counter[tuple[str, str]] = field(default_factory=Counter)  # (step, outcome)
    exits: Counter[str] = field(default_factory=Counter)  # reason
    # channels a fatal answer stopped: the provider's answer and how many of this chunk's
    # messages it kept from going out (their recipients wait at their send step)
    stopped: dict[str, tuple[str, int]] = field(default_factory=dict)
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")


def _claimable(journey: str, moment: datetime, every: bool, real: datetime) -> Any:
    c = enrollments.c
    where = [c.journey == journey, c.status.in_(LIVE),
             or_(c.lease_until.is_(None), c.lease_until < real),
             or_(c.checked_at.is_(None), c.checked_at < moment)]
    if not every:
        where.append(c.due_at <= moment + GRACE)
    return and_(*where)


def claimable(ws: Workspace, journey: str, moment: datetime, every: bool) -> int:
    with ws.store.connect() as conn:
        return int(conn.execute(select(func.count()).where(
            _claimable(journey, moment, every, clock.now()))).scalar() or 0)


@dataclass
class Item:
    """An enrollment being moved (mutable copy of its row)."""

    id: int
    recipient: str
    entry_no: int
    version: str
    step: str
    seq: int
    status: str
    tier: str
    cohort: str | None
    due_at: datetime
    deadline: datetime | None
    arrived_at: datetime
    entered_at: datetime
    data: dict[str, Any]
    exit_reason: str | None = None
    moving: bool = True
    # its new log rows: (enrollment id, journey, recipient, entry no, seq, step, kind,
    # outcome, detail), their time and tick added when saved
    logs: list[tuple[Any, ...]] = field(default_factory=list)
    passed: set[str] = field(default_factory=set)  # the steps it left in this tick

    @property
    def run_key(self) -> str:
        return f"e{self.entry_no}:{self.seq}:{self.step}"

    def recipient_row(self) -> Recipient:
        return Recipient(self.seq, self.recipient, self.tier, self.data)


def claim(ws: Workspace, job: ChunkJob, owner: str) -> list[Item]:
    """Take a lease on up to ``job.size`` claimable enrollments (SKIP LOCKED on Postgres;
    SQLite's BEGIN IMMEDIATE serialises claims)."""
    real = clock.now()
    c = enrollments.c
    with writing(ws.store) as conn:
        query = select(c.id).where(_claimable(job.journey, job.moment, job.every, real)
                                   ).order_by(c.due_at, c.id).limit(job.size)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        ids = list(conn.execute(query).scalars())
        if not ids:
            return []
        for part in among_ids(ids):
            conn.execute(update(enrollments).where(part).values(
                lease_owner=owner, lease_until=real + job.lease))
        rows: list[Any] = []
        for part in among_ids(ids):
            rows.extend(conn.execute(select(enrollments).where(part)))
    return [Item(r.id, r.recipient, r.entry_no, r.version, r.step, r.seq, r.status, r.tier,
                 r.cohort, must(r.due_at), utc(r.deadline), must(r.arrived_at),
                 must(r.entered_at), decode_row(r.data)) for r in rows]


def must(value: Any) -> datetime:
    moment = utc(value)
    assert moment is not None
    return moment


def among_ids(ids: list[int]) -> list[Any]:
    return [enrollments.c.id.in_(ids[i:i + 500]) for i in range(0, len(ids), 500)]


def release(ws: Workspace, ids: list[int], owner: str, moment: datetime | None) -> None:
    """Give up this chunk's leases; ``moment``: stamp them as looked at by this tick."""
    values: dict[str, Any] = {"lease_owner": None, "lease_until": None}
    if moment is not None:
        values["checked_at"] = moment
    with writing(ws.store) as conn:
        for part in among_ids(ids):
            conn.execute(update(enrollments).where(
                part, enrollments.c.lease_owner == owner).values(**values))
