"""A journey tick, as plain functions the Prefect flow wires together.

    prepare()    validate, store the version, enter new recipients, count the chunks
    run_chunk()  claim a chunk of enrollments (lease), check exits, move each as far as
                 it can go now (branches, splits, sends, until a wait), release
    finish()     the tick's summary
    check()      a tick stopped by a signal, or on which a channel stopped, fails

Nothing here imports Prefect. An enrollment moves one step per *round*; each round of a
chunk is one transaction (the enrollments' new state and their log rows, written only
while this tick holds their lease), so a crash loses at most the round in progress and
the next tick redoes it from the committed state. Sends go through the ledger with the
run key ``e{entry}:{seq}:{step}``: a redone round finds its rows and sends nothing twice.
A message that was not handed to a provider (a fatal answer stopped its channel, or a
signal stopped the tick) stays ``queued``, its recipient at the send step, due: the next
tick sends it.

The work is done in ``entry`` (versions, entering), ``chunks`` (a chunk's job, its
enrollments and their leases) and ``mover`` (moving a claimed chunk).
"""

from __future__ import annotations

import math
import secrets
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from herald.core import clock, collector
from herald.core.db import JOURNEY_LIVE as LIVE
from herald.core.db import journey_enrollments as enrollments
from herald.core.errors import RunError
from herald.core.workspace import Workspace
from herald.core.workspace import shared as workspace_at
from herald.delivery import render
from herald.delivery.dispatch import forget_run, stop_requested
from herald.delivery.workers import chunk_runner
from herald.journeys import load
from herald.journeys.chunks import ChunkJob, ChunkResult, claim, claimable, release
from herald.journeys.entry import Entered, definition, enter_recipients, store_version
from herald.journeys.mover import Mover


@dataclass(frozen=True)
class Prepared:
    journey: str
    tick: str
    version: str
    entered: int
    live: int
    chunks: list[ChunkJob]
    started: datetime
    skipped: dict[str, int]  # entry rows not entered: no_key, duplicate_key


def new_tick_id() -> str:
    return f"tick-{clock.now():%Y%m%d%H%M%S}-{secrets.token_hex(3)}"


def prepare(ws: Workspace, name: str, enter: bool = True) -> Prepared:
    """Validate, record the version, enter new recipients, plan the chunks."""
    started = clock.now()
    checked = load.check(ws, name, render.shared(ws))
    spec = checked.loaded.spec
    version = store_version(ws, checked.loaded)
    tick = new_tick_id()
    entry = enter_recipients(ws, spec, version) if enter else Entered()
    moment = clock.now()
    every = any(definition(ws, name, v).checks_every_tick()
                for v in live_versions(ws, name)) or spec.checks_every_tick()
    live = claimable(ws, name, moment, every)
    size = spec.chunk_size or ws.config.chunk_size
    chunks = [ChunkJob(str(ws.root), name, tick, i, size, moment, every, clock.current())
              for i in range(math.ceil(live / size))]
    return Prepared(name, tick, version, entry.entered, live, chunks, started,
                    dict(sorted(entry.skipped.items())))


def live_versions(ws: Workspace, journey: str) -> list[str]:
    with ws.store.connect() as conn:
        return list(conn.execute(select(enrollments.c.version).where(
            enrollments.c.journey == journey, enrollments.c.status.in_(LIVE)).distinct()
        ).scalars())


def run_chunk(job: ChunkJob) -> ChunkResult:
    """Claim up to ``job.size`` enrollments, check exits, move them; release the leases."""
    if clock.current() != job.clock:  # a worker process started with another clock
        clock.install(job.clock)
    if stop_requested():  # stopping: a chunk not started yet is left to the next tick
        return ChunkResult()
    ws = workspace_at(job.workspace)
    owner = f"{job.tick}:{job.index}"
    items = claim(ws, job, owner)
    result = ChunkResult(claimed=len(items))
    if not items:
        return result
    done = False
    try:
        with collector.for_chunks():
            Mover(ws, job, owner, result).run(items)
        done = True
    finally:
        # A failed chunk is not stamped as looked at: a retry of its task takes it again.
        release(ws, [i.id for i in items], owner, job.moment if done else None)
    return result


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
        "entered": prepared.entered, "entry_skipped": prepared.skipped,
        "claimed": sum(r.claimed for r in results),
        "chunks": len(prepared.chunks), "steps": dict(steps), "exits": dict(exits),
        "workers": sorted({r.worker for r in results}),
        "started_at": prepared.started.isoformat(), "finished_at": finished.isoformat(),
        "duration_seconds": round((finished - prepared.started).total_seconds(), 3),
    }


def check(prepared: Prepared, results: list[ChunkResult]) -> None:
    """After the chunks (whose moves are saved): a tick that a signal stopped, or on
    which a channel stopped (a fatal answer: refused credentials, a suspended account),
    fails saying so. Their recipients wait at their send step with the message
    ``queued``; the next tick sends it, once."""
    again = f"herald journey tick {prepared.journey}"
    why = stop_requested()
    if why:
        raise RunError(f"journey {prepared.journey} stopped by {why}: batches in flight "
                       "were finished and recorded, nothing more was sent; whoever was "
                       f"not sent waits at their step: to go on, tick again: {again}")
    stopped: dict[str, tuple[str, int]] = {}
    for r in results:
        for channel, (cause, n) in r.stopped.items():
            first, total = stopped.get(channel, (cause, 0))
            stopped[channel] = (first, total + n)
    if stopped:
        channels = "; ".join(f"channel {name} stopped ({cause}): {n:,} message(s) not sent"
                             for name, (cause, n) in sorted(stopped.items()))
        raise RunError(f"journey {prepared.journey}: {channels}; their recipients wait at "
                       f"their send step. Fix it, then tick again to send them: {again}")


def tick_local(ws: Workspace, name: str, max_workers: int | None = None,
               enter: bool = True) -> dict[str, Any]:
    """One tick without Prefect (CLI, tests, embedded use): at most ``max_workers``
    chunks at once, each in a thread, or in a worker process when the workspace's
    ``task_runner`` is ``processes``. Raises RunError after the tick when it was
    stopped or a channel stopped (``check``)."""
    from concurrent.futures import ThreadPoolExecutor

    from herald.core.workspace import adopt as adopt_workspace

    adopt_workspace(ws)
    prepared = prepare(ws, name, enter)
    with chunk_runner(ws.config.task_runner, prepared.tick, run_chunk) as run, \
            ThreadPoolExecutor(max_workers or ws.config.max_workers) as pool:
        results = list(pool.map(run, prepared.chunks))
    summary = finish(ws, prepared, results)
    check(prepared, results)
    return summary
