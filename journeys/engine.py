"""A journey tick, as plain functions the Prefect flow wires together.

    prepare()    validate, store the version, enter new recipients, count the chunks
    run_chunk()  claim a chunk of enrollments (lease), check exits, move each as far as
                 it can go now (branches, splits, sends, until a wait), release
    finish()     the tick's summary

Nothing here imports Prefect. An enrollment moves one step per *round*; each round of a
chunk is one transaction (the enrollments' new state and their log rows, written only
while this tick holds their lease), so a crash loses at most the round in progress and
the next tick redoes it from the committed state. Sends go through the ledger with the
run key ``e{entry}:{seq}:{step}``: a redone round finds its rows and sends nothing twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import secrets
import socket
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import Engine, and_, bindparam, func, insert, or_, select, text, update
from sqlalchemy import case as sql_case
from sqlalchemy.exc import IntegrityError

from herald.audiences.store import Recipient
from herald.channels.base import Message
from herald.core import clock
from herald.core.db import JOURNEY_LIVE as LIVE
from herald.core.db import journey_enrollments as enrollments
from herald.core.db import journey_log as log
from herald.core.db import journey_versions as versions
from herald.core.db import writing
from herald.core.errors import RunError
from herald.core.workspace import Workspace
from herald.core.workspace import shared as workspace_at
from herald.delivery import ledger
from herald.delivery.dispatch import Job, dispatch, forget_run, group
from herald.delivery.ledger import message_id
from herald.delivery.policy import SEND, Decision, Policy
from herald.delivery.render import RenderError, Templates
from herald.delivery.variants import assign as assign_variant
from herald.journeys import conditions, load
from herald.journeys.spec import (
    BranchStep,
    ExitStep,
    JourneySpec,
    SendStep,
    SplitStep,
    WaitForStep,
    WaitStep,
)

logger = logging.getLogger("herald.journey")

LEASE = timedelta(minutes=10)  # how long (Herald's clock) a claimed chunk is this tick's alone
CAPPED_RETRY = timedelta(hours=1)  # on_capped: wait decides again after this
# A wait that ends within this of the tick is over: a tick starts a little late or early
# (a scheduler, a process starting), and a 3-day wait must not miss the tick 72 hours on
# by a second and take one more tick interval.
GRACE = timedelta(minutes=1)
ENTRY_BATCH = 2000
MAX_ROUNDS = 1000  # a safety net: validation forbids cycles without a wait


# -- versions --------------------------------------------------------------------------
def store_version(ws: Workspace, loaded: load.Loaded) -> str:
    """Record the journey's current definition (once per distinct definition)."""
    with ws.store.connect() as conn:
        have = conn.execute(select(versions.c.version).where(
            versions.c.journey == loaded.spec.name,
            versions.c.version == loaded.version)).first()
    if not have:
        try:
            with writing(ws.store) as conn:
                conn.execute(insert(versions).values(
                    journey=loaded.spec.name, version=loaded.version,
                    definition=loaded.definition, created_at=clock.now()))
        except IntegrityError:
            pass  # another tick stored it first
    return loaded.version


_definitions: dict[tuple[str, str, str], JourneySpec] = {}


def definition(ws: Workspace, journey: str, version: str) -> JourneySpec:
    """The definition an enrollment entered under."""
    key = (str(ws.store.url), journey, version)
    if key not in _definitions:
        with ws.store.connect() as conn:
            stored = conn.execute(select(versions.c.definition).where(
                versions.c.journey == journey, versions.c.version == version)).scalar()
        if stored is None:
            raise RunError(f"journey {journey}: version {version} is not in the database")
        _definitions[key] = load.parse_definition(stored)
    return _definitions[key]


# -- jobs -------------------------------------------------------------------------------
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
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")


@dataclass(frozen=True)
class Prepared:
    journey: str
    tick: str
    version: str
    entered: int
    live: int
    chunks: list[ChunkJob]
    started: datetime


def new_tick_id() -> str:
    return f"tick-{clock.now():%Y%m%d%H%M%S}-{secrets.token_hex(3)}"


def prepare(ws: Workspace, name: str, enter: bool = True) -> Prepared:
    """Validate, record the version, enter new recipients, plan the chunks."""
    started = clock.now()
    checked = load.check(ws, name, templates_for(ws))
    spec = checked.loaded.spec
    version = store_version(ws, checked.loaded)
    tick = new_tick_id()
    entered = enter_recipients(ws, spec, version) if enter else 0
    moment = clock.now()
    every = any(definition(ws, name, v).checks_every_tick()
                for v in live_versions(ws, name)) or spec.checks_every_tick()
    live = claimable(ws, name, moment, every)
    size = spec.chunk_size or ws.config.chunk_size
    chunks = [ChunkJob(str(ws.root), name, tick, i, size, moment, every, clock.current())
              for i in range(math.ceil(live / size))]
    return Prepared(name, tick, version, entered, live, chunks, started)


def live_versions(ws: Workspace, journey: str) -> list[str]:
    with ws.store.connect() as conn:
        return list(conn.execute(select(enrollments.c.version).where(
            enrollments.c.journey == journey, enrollments.c.status.in_(LIVE)).distinct()
        ).scalars())


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


# -- entering ---------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.hex()
    return value


def enter_recipients(ws: Workspace, spec: JourneySpec, version: str) -> int:
    """Run the entry segment and enroll whoever may enter now; return how many did."""
    segment = load.entry_segment(ws, spec)
    source = ws.source(spec.entry.source)
    entered = 0
    with source.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=ENTRY_BATCH).execute(
            text(segment.sql), dict(segment.params))
        columns = list(result.keys())
        for batch, part in enumerate(result.partitions(ENTRY_BATCH), start=1):
            rows = [dict(zip(columns, (_jsonable(v) for v in r), strict=True)) for r in part]
            entered += _enter_batch(ws, spec, version, rows)
            if batch & (batch - 1) == 0:  # after batches 1, 2, 4, 8, ...
                refresh_statistics(ws.store)
    if entered:
        refresh_statistics(ws.store)
    return entered


def refresh_statistics(engine: Engine) -> None:
    """Let Postgres's planner see the enrollments as they are now.

    With the statistics of an empty table it looked up each entry batch's recipients by
    scanning every enrollment, and entering 100,000 people turned quadratic (114 s; 7 s
    with fresh statistics). ANALYZE samples a bounded number of rows: milliseconds.
    """
    if engine.dialect.name != "postgresql":
        return
    with engine.connect() as conn:
        conn.execute(text(f"ANALYZE {enrollments.name}"))
        conn.commit()


def _enter_batch(ws: Workspace, spec: JourneySpec, version: str,
                 rows: list[dict[str, Any]]) -> int:
    entry = spec.entry
    by_key: dict[str, dict[str, Any]] = {}
    for row in rows:
        value = row.get(entry.key)
        if value is not None:
            by_key.setdefault(str(value), row)
    if not by_key:
        return 0
    now = clock.now()
    c = enrollments.c
    new = []
    with writing(ws.store) as conn:
        if conn.dialect.name == "postgresql":  # one enterer per journey at a time
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:j))"),
                         {"j": f"herald-journey:{spec.name}"})
        history: dict[str, tuple[int, bool, datetime | None]] = {}
        for part in ledger.among(conn, c.recipient, list(by_key)):
            query = select(c.recipient, func.max(c.entry_no), func.count(),
                           func.sum(sql_case((c.status.in_(LIVE), 1), else_=0)),
                           func.max(c.updated_at)).where(c.journey == spec.name, part
                                                         ).group_by(c.recipient)
            for recipient, last, _n, live, ended in conn.execute(query):
                history[recipient] = (int(last), bool(live), _utc(ended))
        for key, row in by_key.items():
            last, live, ended = history.get(key, (0, False, None))
            if live or (spec.re_entry.max is not None and last >= spec.re_entry.max):
                continue
            if last and spec.re_entry.cooldown and ended and \
                    ended + spec.re_entry.cooldown > now:
                continue
            tier = row.get(entry.tier) if entry.tier else None
            new.append({"journey": spec.name, "recipient": key, "entry_no": last + 1,
                        "version": version, "step": spec.first, "seq": 0,
                        "status": "active", "tier": str(tier) if tier is not None
                        else "default", "due_at": now, "arrived_at": now,
                        "entered_at": now, "updated_at": now,
                        "data": json.dumps(row, ensure_ascii=False, default=str)})
        if new:
            conn.execute(insert(enrollments), new)
    return len(new)


def _utc(value: Any) -> datetime | None:
    from herald.reporting.conversions import utc

    return utc(value)


# -- one chunk --------------------------------------------------------------------------
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
    logs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def run_key(self) -> str:
        return f"e{self.entry_no}:{self.seq}:{self.step}"

    def recipient_row(self) -> Recipient:
        return Recipient(self.seq, self.recipient, self.tier, self.data)


_templates: dict[str, Templates] = {}
_templates_lock = threading.Lock()


def templates_for(ws: Workspace) -> Templates:
    with _templates_lock:
        root = str(ws.root)
        if root not in _templates:
            _templates[root] = Templates(ws.templates_dir, ws.config.default_locale)
        return _templates[root]


def run_chunk(job: ChunkJob) -> ChunkResult:
    """Claim up to ``job.size`` enrollments, check exits, move them; release the leases."""
    if clock.current() != job.clock:  # a worker process started with another clock
        clock.install(job.clock)
    ws = workspace_at(job.workspace)
    owner = f"{job.tick}:{job.index}"
    items = claim(ws, job, owner)
    result = ChunkResult(claimed=len(items))
    if not items:
        return result
    done = False
    try:
        Mover(ws, job, owner, result).run(items)
        done = True
    finally:
        # A failed chunk is not stamped as looked at: a retry of its task takes it again.
        release(ws, [i.id for i in items], owner, job.moment if done else None)
    return result


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
        for part in _among_ids(ids):
            conn.execute(update(enrollments).where(part).values(
                lease_owner=owner, lease_until=real + job.lease))
        rows: list[Any] = []
        for part in _among_ids(ids):
            rows.extend(conn.execute(select(enrollments).where(part)))
    return [Item(r.id, r.recipient, r.entry_no, r.version, r.step, r.seq, r.status, r.tier,
                 r.cohort, _must(r.due_at), _utc(r.deadline), _must(r.arrived_at),
                 _must(r.entered_at), json.loads(r.data)) for r in rows]


def _must(value: Any) -> datetime:
    moment = _utc(value)
    assert moment is not None
    return moment


def _among_ids(ids: list[int]) -> list[Any]:
    return [enrollments.c.id.in_(ids[i:i + 500]) for i in range(0, len(ids), 500)]


def release(ws: Workspace, ids: list[int], owner: str, moment: datetime | None) -> None:
    """Give up this chunk's leases; ``moment``: stamp them as looked at by this tick."""
    values: dict[str, Any] = {"lease_owner": None, "lease_until": None}
    if moment is not None:
        values["checked_at"] = moment
    with writing(ws.store) as conn:
        for part in _among_ids(ids):
            conn.execute(update(enrollments).where(
                part, enrollments.c.lease_owner == owner).values(**values))


class Mover:
    """Moves one claimed chunk: exit checks, then rounds of one step each."""

    def __init__(self, ws: Workspace, job: ChunkJob, owner: str, result: ChunkResult) -> None:
        self.ws = ws
        self.job = job
        self.owner = owner
        self.result = result
        self.templates = templates_for(ws)
        self.now = clock.now()

    def spec(self, item: Item) -> JourneySpec:
        return definition(self.ws, self.job.journey, item.version)

    def run(self, items: list[Item]) -> None:
        self.check_exits(items)
        self.persist([i for i in items if i.logs])  # those who left
        for item in items:
            if item.status in LIVE and item.status == "waiting":
                step = self.spec(item).steps[item.step]
                item.moving = isinstance(step, WaitForStep) or item.due_at <= self.now + GRACE
            else:
                item.moving = item.status in LIVE
        for _ in range(MAX_ROUNDS):
            moving = [i for i in items if i.moving]
            if not moving:
                return
            self.round(moving)
            self.persist(moving)
        raise RunError(f"journey {self.job.journey}: enrollments still moving after "
                       f"{MAX_ROUNDS} steps in one tick")

    # -- exits before every step ---------------------------------------------------
    def check_exits(self, items: list[Item]) -> None:
        by_version: dict[str, list[Item]] = defaultdict(list)
        for item in items:
            by_version[item.version].append(item)
        for version, group_ in by_version.items():
            spec = definition(self.ws, self.job.journey, version)
            left = list(group_)
            if spec.max_duration:
                for item in left:
                    if self.now - item.entered_at >= spec.max_duration:
                        self.exit(item, "max_duration")
                left = [i for i in left if i.status in LIVE]
            if spec.goal and spec.goal.exit and left:
                goal = spec.goal
                query = load.load_sql(self.ws, goal.segment, goal.source or spec.entry.source,
                                      goal.params, ("since", "until"))
                hits = conditions.matching(
                    self.ws, goal.source or spec.entry.source, query,
                    goal.key or spec.entry.key, goal.at,
                    {i.recipient: i.entered_at for i in left}, self.now, goal.window)
                for item in left:
                    if item.recipient in hits:
                        self.exit(item, "goal")
                left = [i for i in left if i.status in LIVE]
            for cond in spec.exit_when:
                if not left:
                    break
                hits = self.matching(spec, cond, {i.recipient: i.entered_at for i in left})
                for item in left:
                    if item.recipient in hits:
                        self.exit(item, cond.reason)
                left = [i for i in left if i.status in LIVE]

    def matching(self, spec: JourneySpec, cond: Any, since: dict[str, datetime]
                 ) -> dict[str, datetime | None]:
        query = load.condition_sql(self.ws, spec, cond)
        return conditions.matching(self.ws, load.condition_source(spec, cond), query,
                                   spec.entry.key, cond.at, since, self.now)

    def exit(self, item: Item, reason: str) -> None:
        self.visit(item, "exit_check", "exited", reason)
        item.status, item.exit_reason, item.moving = "exited", reason, False
        self.result.exits[reason] += 1

    # -- moving ------------------------------------------------------------------------
    def visit(self, item: Item, kind: str, outcome: str, detail: str | None = None) -> None:
        """Log the current step's outcome (the step is done)."""
        item.logs.append({"enrollment_id": item.id, "journey": self.job.journey,
                          "recipient": item.recipient, "entry_no": item.entry_no,
                          "seq": item.seq, "step": item.step, "kind": kind,
                          "outcome": outcome, "detail": detail, "at": self.now,
                          "tick": self.job.tick})
        item.seq += 1
        self.result.moves[item.step, outcome] += 1

    def go(self, item: Item, nxt: str | None) -> None:
        """Move to ``nxt`` (None: the journey is completed)."""
        if nxt is None:
            item.status, item.exit_reason, item.moving = "completed", None, False
            return
        item.step, item.status = nxt, "active"
        item.arrived_at = item.due_at = self.now
        item.deadline = None

    def park(self, item: Item, until: datetime, deadline: datetime | None = None) -> None:
        item.status, item.due_at, item.deadline, item.moving = "waiting", until, deadline, False

    def round(self, moving: list[Item]) -> None:
        groups: dict[tuple[str, str], list[Item]] = defaultdict(list)
        for item in moving:
            groups[item.version, item.step].append(item)
        for (version, step_name), items in groups.items():
            spec = definition(self.ws, self.job.journey, version)
            step = spec.steps[step_name]
            if isinstance(step, ExitStep):
                for item in items:
                    self.visit(item, "exit", "completed", step.reason)
                    self.go(item, None)
            elif isinstance(step, SplitStep):
                self.split(spec, step_name, step, items)
            elif isinstance(step, BranchStep):
                self.branch(spec, step, items)
            elif isinstance(step, WaitStep):
                self.wait(spec, step, items)
            elif isinstance(step, WaitForStep):
                self.wait_for(spec, step, items)
            else:
                assert isinstance(step, SendStep)
                self.send(spec, step_name, step, items)

    def split(self, spec: JourneySpec, name: str, step: SplitStep, items: list[Item]) -> None:
        weights = {cohort: c.weight for cohort, c in step.cohorts.items()}
        for item in items:
            cohort = assign_variant(spec.flow, name, item.recipient,
                                    list(weights.items()))
            chosen = step.cohorts[cohort]
            item.cohort = item.cohort or cohort
            self.visit(item, "split", f"cohort:{cohort}")
            if chosen.holdout:
                item.cohort = cohort
                item.status, item.exit_reason, item.moving = "exited", "holdout", False
                self.result.exits["holdout"] += 1
            else:
                self.go(item, chosen.next)

    def branch(self, spec: JourneySpec, step: BranchStep, items: list[Item]) -> None:
        left = list(items)
        for i, case in enumerate(step.cases):
            if not left:
                break
            if case.when is not None:
                hits = {it.recipient for it in left if case.when.matches(it.data)}
            else:
                assert case.condition is not None
                hits = set(self.matching(spec, case.condition,
                                         {it.recipient: it.entered_at for it in left}))
            for item in [it for it in left if it.recipient in hits]:
                self.visit(item, "branch", f"case:{i + 1}", case.next)
                self.go(item, case.next)
            left = [it for it in left if it.recipient not in hits]
        for item in left:
            self.visit(item, "branch", "default", step.default)
            self.go(item, step.default)

    def zone(self, spec: JourneySpec, item: Item) -> ZoneInfo:
        name = item.data.get(spec.entry.timezone) if spec.entry.timezone else None
        try:
            return ZoneInfo(str(name)) if name else ZoneInfo(
                spec.timezone or self.ws.config.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            return ZoneInfo(spec.timezone or self.ws.config.timezone)

    def wait(self, spec: JourneySpec, step: WaitStep, items: list[Item]) -> None:
        for item in items:
            if item.status == "waiting":
                due = item.due_at
            else:
                due = step.due(item.arrived_at, self.zone(spec, item), item.data)
            if due <= self.now + GRACE:
                self.visit(item, "wait", "waited")
                self.go(item, step.next)
            else:
                self.park(item, due)

    def wait_for(self, spec: JourneySpec, step: WaitForStep, items: list[Item]) -> None:
        hits = self.matching(spec, step, {it.recipient: it.arrived_at for it in items})
        for item in items:
            deadline = item.deadline or item.arrived_at + step.within
            if item.recipient in hits:
                self.visit(item, "wait_for", "matched", step.matched)
                self.go(item, step.matched)
            elif self.now + GRACE >= deadline:
                self.visit(item, "wait_for", "timeout", step.timeout)
                self.go(item, step.timeout)
            else:
                self.park(item, deadline, deadline)

    # -- sending ---------------------------------------------------------------------
    def send(self, spec: JourneySpec, name: str, step: SendStep, items: list[Item]) -> None:
        """Policy, reservation, render and dispatch for the items at one send step."""
        ws, flow = self.ws, spec.flow
        for item in items:  # a capped or deferred recipient back for another try
            item.status = "active"
        orphans = [it for it in items if step.tier_for(it.tier) is None]
        for item in orphans:  # no entry for the tier and no default: nothing to send
            self.visit(item, "send", "no_tier",
                       f"tier '{item.tier}' has no entry in this step and there is no default")
            self.go(item, step.next)
        items = [it for it in items if step.tier_for(it.tier) is not None]
        if not items:
            return
        policy = Policy(ws, load.step_flow(spec, step, flow))
        wanted = {(it.run_key, it.recipient): it for it in items}
        decisions: list[tuple[Item, Decision]] = []
        with writing(ws.store) as conn:
            ledger.reserve_lock(conn)
            have = _ledger_rows(conn, flow, wanted)
            fresh = [it for key, it in wanted.items() if key not in have]
            decided = policy.decide(conn, [it.recipient_row() for it in fresh], self.now)
            by_key: dict[str, list[ledger.Entry]] = defaultdict(list)
            for item, d in zip(fresh, decided, strict=True):
                if d.status == "capped" and step.on_capped == "wait":
                    self.park(item, self.now + CAPPED_RETRY)
                    self.result.moves[name, "capped_waiting"] += 1
                    continue
                if d.status == "deferred":
                    assert d.not_before is not None
                    self.park(item, d.not_before)
                    self.result.moves[name, "quiet_hours_waiting"] += 1
                    continue
                by_key[item.run_key].append(ledger.Entry(
                    item.recipient, item.tier, "queued" if d.status == SEND else d.status,
                    d.channel, d.address, d.reason))
                decisions.append((item, d))
            for run_key, entries in by_key.items():
                ledger.write_entries(conn, entries, flow=flow, run_key=run_key,
                                     run_id=self.job.tick, package_id=item_version(items),
                                     priority=spec.priority, counted=not spec.exempt)
        if sum(map(len, by_key.values())) >= 1000:  # as flows' chunks do (see the ledger)
            ledger.refresh_statistics(ws.store)
        for key, row in have.items():
            item = wanted[key]
            if row.status == "queued":  # reserved by an interrupted tick: send it now
                entry = step.tier_for(item.tier)
                assert entry is not None
                decisions.append((item, Decision(item.recipient_row(), entry[0], SEND,
                                                 channel=row.channel, address=row.address)))
        outgoing: dict[str, list[tuple[str, Message]]] = defaultdict(list)
        failed: dict[str, list[ledger.Outcome]] = defaultdict(list)
        for item, d in decisions:
            if d.status != SEND:
                continue
            try:
                message = self.render(spec, name, step, item, d)
            except RenderError as exc:
                failed[item.run_key].append(ledger.Outcome(item.recipient, "render_error",
                                                           str(exc), attempts=0))
                continue
            assert d.channel is not None
            outgoing[item.run_key].append((d.channel, message))
        for run_key, outcomes in failed.items():
            ledger.settle(ws.store, flow, run_key, outcomes)
        if outgoing:
            # Hold the lease for the whole dispatch: renewed now, and nothing is sent if
            # another tick took over (a lease outrun by a slow round).
            self.renew(items)
            asyncio.run(self._dispatch(flow, outgoing))
        with ws.store.connect() as conn:
            settled = _ledger_rows(conn, flow, wanted)
        for key, item in wanted.items():
            if not item.moving:
                continue  # capped (wait) or deferred by quiet hours: decided again later
            row = settled.get(key)
            outcome = row.status if row else "lost"
            self.visit(item, "send", outcome, row.reason if row else None)
            self.go(item, step.next)

    async def _dispatch(self, flow: str, outgoing: dict[str, list[tuple[str, Message]]]
                        ) -> None:
        await asyncio.gather(*(dispatch(self.ws, Job(flow, run_key, self.job.tick),
                                        group(messages))
                               for run_key, messages in outgoing.items()))

    def render(self, spec: JourneySpec, name: str, step: SendStep, item: Item,
               d: Decision) -> Message:
        assert d.channel is not None and d.address is not None
        chosen = assign_variant(spec.flow, name, item.recipient,
                                list(step.variants.items())) \
            if step.variants else None
        flow = load.step_flow(spec, step, load.template_folder(spec.name, name, chosen))
        kind = self.ws.channel_kind(d.channel)
        locale = item.data.get(spec.entry.locale) if spec.entry.locale else None
        variables = {**item.data, "journey": spec.name, "step": name, "variant": chosen,
                     "flow": spec.flow, "tier": item.tier, "run_key": item.run_key,
                     "channel": d.channel}
        rendered = self.templates.render(flow, d.tier, kind, str(locale) if locale else None,
                                         variables)
        return Message(recipient=item.recipient, address=d.address, kind=kind,
                       body=rendered.body, subject=rendered.subject, html=rendered.html,
                       # "journey-NAME": a colon is not allowed in a Message-ID
                       message_id=message_id(f"journey-{spec.name}", item.run_key,
                                             item.recipient),
                       meta={"flow": spec.flow, "run_key": item.run_key, "tier": item.tier,
                             "journey": spec.name, "step": name,
                             **({"variant": chosen} if chosen else {})})

    # -- persisting ------------------------------------------------------------------
    def renew(self, items: list[Item]) -> None:
        """Extend this tick's lease on ``items``; RunError if it lost any of them."""
        ids = [it.id for it in items]
        with writing(self.ws.store) as conn:
            held = 0
            for part in _among_ids(ids):
                held += conn.execute(update(enrollments).where(
                    part, enrollments.c.lease_owner == self.owner).values(
                    lease_until=clock.now() + self.job.lease)).rowcount or 0
            if held != len(ids):
                raise RunError(f"journey {self.job.journey}: tick {self.job.tick} lost the "
                               f"lease on {len(ids) - held} enrollments before sending; "
                               "nothing was sent (a round took longer than the lease: "
                               "use a smaller chunk_size)")

    def persist(self, items: list[Item]) -> None:
        """One transaction: the items' state and their new log rows, lease permitting."""
        if not items:
            return
        logs = [row for it in items for row in it.logs]
        real = clock.now()
        statement = update(enrollments).where(
            enrollments.c.id == bindparam("b_id"),
            enrollments.c.lease_owner == bindparam("b_owner")).values(
            step=bindparam("b_step"), seq=bindparam("b_seq"), status=bindparam("b_status"),
            exit_reason=bindparam("b_reason"), cohort=bindparam("b_cohort"),
            due_at=bindparam("b_due"), deadline=bindparam("b_deadline"),
            arrived_at=bindparam("b_arrived"), updated_at=bindparam("b_updated"),
            lease_owner=bindparam("b_new_owner"), lease_until=bindparam("b_lease"))
        params = [{"b_id": it.id, "b_owner": self.owner, "b_step": it.step, "b_seq": it.seq,
                   "b_status": it.status, "b_reason": it.exit_reason, "b_cohort": it.cohort,
                   "b_due": it.due_at, "b_deadline": it.deadline, "b_arrived": it.arrived_at,
                   "b_updated": self.now,
                   # an ended enrollment is nobody's to claim again: its lease goes now
                   "b_new_owner": self.owner if it.status in LIVE else None,
                   "b_lease": real + self.job.lease if it.status in LIVE else None}
                  for it in items]
        with writing(self.ws.store) as conn:
            held: set[int] = set()
            for part in _among_ids([it.id for it in items]):
                held.update(conn.execute(select(enrollments.c.id).where(
                    part, enrollments.c.lease_owner == self.owner)).scalars())
            if len(held) != len(items):
                raise RunError(f"journey {self.job.journey}: tick {self.job.tick} lost the "
                               f"lease on {len(items) - len(held)} enrollments (a tick took "
                               "longer than the lease); nothing of this round was saved")
            if params:
                conn.execute(statement, params)
            if logs:
                conn.execute(insert(log), logs)
        for it in items:
            it.logs.clear()


def item_version(items: list[Item]) -> str:
    return items[0].version


def _ledger_rows(conn: Any, flow: str, wanted: dict[tuple[str, str], Item]
                 ) -> dict[tuple[str, str], Any]:
    """The ledger rows of (run key, recipient) pairs of ``flow``."""
    d = ledger.deliveries.c
    out = {}
    recipients = sorted({k[1] for k in wanted})
    for part in ledger.among(conn, d.recipient, recipients):
        for row in conn.execute(select(d.recipient, d.run_key, d.status, d.channel,
                                       d.address, d.reason).where(d.flow == flow, part)):
            if (row.run_key, row.recipient) in wanted:
                out[row.run_key, row.recipient] = row
    return out


# -- a whole tick -------------------------------------------------------------------------
def finish(ws: Workspace, prepared: Prepared, results: list[ChunkResult]) -> dict[str, Any]:
    """The tick's summary (``herald journey tick --json``)."""
    forget_run(prepared.tick)
    moves: Counter[tuple[str, str]] = Counter()
    exits: Counter[str] = Counter()
    for r in results:
        moves.update(r.moves)
        exits.update(r.exits)
    steps: dict[str, dict[str, int]] = defaultdict(dict)
    for (step, outcome), n in sorted(moves.items()):
        steps[step][outcome] = n
    finished = clock.now()
    return {
        "journey": prepared.journey, "tick": prepared.tick, "version": prepared.version,
        "entered": prepared.entered, "claimed": sum(r.claimed for r in results),
        "chunks": len(prepared.chunks), "steps": dict(steps), "exits": dict(exits),
        "workers": sorted({r.worker for r in results}),
        "started_at": prepared.started.isoformat(), "finished_at": finished.isoformat(),
        "duration_seconds": round((finished - prepared.started).total_seconds(), 3),
    }


def tick_local(ws: Workspace, name: str, max_workers: int | None = None,
               enter: bool = True) -> dict[str, Any]:
    """One tick on a thread pool without Prefect (CLI, tests, embedded use)."""
    from concurrent.futures import ThreadPoolExecutor

    from herald.core.workspace import adopt as adopt_workspace

    adopt_workspace(ws)
    prepared = prepare(ws, name, enter)
    with ThreadPoolExecutor(max_workers or ws.config.max_workers) as pool:
        results = list(pool.map(run_chunk, prepared.chunks))
    return finish(ws, prepared, results)
