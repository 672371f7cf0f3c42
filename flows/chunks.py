"""One chunk of a campaign run: decide and reserve (policy and ledger in one locked
transaction), render, dispatch, and the chunk's counts from the outcomes it settled.

A chunk job is a small picklable value: any worker that can reach the workspace database
runs it (threads, Dask, Prefect workers). This process's workspace and its compiled
templates are cached here, per workspace folder. Nothing here imports Prefect.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import socket
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from herald.audiences import store
from herald.channels.base import Message
from herald.core import clock, collector, workspace
from herald.core.db import writing
from herald.core.workspace import Workspace
from herald.delivery import (
    ledger,
    ledger_reads,
    render,
    run_records,
    suppression,
    unsubscribe,
    variants,
)
from herald.delivery.dispatch import (
    Job,
    dispatch,
    group,
    stop_requested,
)
from herald.delivery.policy import SEND, Decision, Policy
from herald.delivery.render import RenderError, Templates


@dataclass(frozen=True)
class ChunkJob:
    """Everything a worker needs to run one chunk (picklable, no secrets)."""

    workspace: str
    flow: str
    run_id: str
    run_key: str
    package_id: str
    index: int
    start: int
    stop: int
    dry_run: bool
    # the clock of the run that planned the chunk, so a worker process decides caps and
    # quiet hours at the same "now" as the run (the real time unless the clock was set)
    clock: clock.Clock = clock.REAL


def opened(root: str) -> tuple[Workspace, Templates]:
    """This process's workspace for ``root`` and its compiled templates (both cached per
    process: herald.core.workspace.shared and herald.delivery.render.shared)."""
    ws = workspace.shared(root)
    return ws, render.shared(ws)


def workspace_at(root: str) -> Workspace:
    """The workspace of this process for ``root``, opened once."""
    return opened(root)[0]


def adopt_workspace(ws: Workspace) -> None:
    """Make ``ws`` the one chunks of this process use for its folder."""
    workspace.adopt(ws)
    opened(str(ws.root))


def forget_workspace(root: str | Path) -> None:
    """Drop the cached workspace for ``root`` (its YAML or databases changed)."""
    workspace.forget(root)  # its templates are rebuilt with the next workspace


def forget_all() -> None:
    """Drop every cached workspace (tests that drop their databases)."""
    render.forget_shared()
    workspace.forget_all()


ChunkCounts = list[tuple[str, str, str | None, int]]  # (status, tier, channel, n)


@dataclass(frozen=True)
class ChunkResult:
    """What a chunk reports: counts, and (dry runs) why recipients would not be sent."""

    counts: ChunkCounts
    reasons: list[tuple[str, str, int]]  # (status, reason, n)
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

# Recipients of a chunk that have no row of this run: counted from the chunk's results
# (a deferred recipient still waiting is reported as deferred).
WAITING = "waiting"
ALREADY = "already"  # handled by an earlier run of the run key: reported as duplicate
CARRIED = {ALREADY: "duplicate", WAITING: "deferred"}


def run_chunk(job: ChunkJob) -> ChunkResult:
    """Run one chunk: decide, reserve, render, send, settle. Returns its counts."""
    if clock.current() != job.clock:  # a worker process started with another clock
        clock.install(job.clock)
    with collector.for_chunks():  # threads, Prefect's task runs and Dask's processes alike
        return _run_chunk(job)


def _run_chunk(job: ChunkJob) -> ChunkResult:
    if stop_requested():  # stopping: a chunk not started yet is left to the rerun
        return ChunkResult([], [])
    ws, templates = opened(job.workspace)
    flow = ws.flow(job.flow)
    rows = store.read(ws, job.package_id, job.start, job.stop)
    policy = Policy(ws, flow, variants.states(ws.store, flow.name, job.run_key)
                    if flow.experiments() else None)
    counts: Counter[tuple[str, str, str | None]] = Counter()
    screened = policy.screen(rows)  # the rows alone (addresses, holdout): before the lock

    # Decide and reserve in one transaction holding the write lock, so that two runs
    # checking the same person's caps at once cannot both pass.
    with writing(ws.store) as conn:
        _lock_ledger(conn)
        at = ledger.now()
        seen = ledger_reads.existing(conn, flow.name, job.run_key, [r.key for r in rows])
        # queued rows of another run of this run key that is still going (started twice
        # at once, say) are that run's to send: resuming them here would send them twice
        busy = run_records.live_runs(conn, (o.run_id for o in seen.values()
                                            if o.status == "queued" and o.run_id != job.run_id))
        resumed = [r for r in rows if r.key in seen and seen[r.key].status == "queued"
                   and seen[r.key].run_id not in busy]
        due = [r for r in rows if r.key in seen and seen[r.key].due(at)]
        for r in rows:
            old = seen.get(r.key)
            if old and (old.status != "queued" or old.run_id in busy) \
                    and not old.due(at) and old.run_id != job.run_id:
                # already handled under this run key by an earlier run, or being handled
                # by one still going (this run's own rows, met again when a chunk is
                # retried, are counted from the ledger); a deferred row still waits
                status = WAITING if old.status == "deferred" else ALREADY
                counts[status, old.tier, old.channel] += 1
        fresh = [r for r in rows if r.key not in seen]
        decisions = policy.decide(conn, fresh, at, job.run_key, screened)
        redecided = policy.decide(conn, due, at, job.run_key, screened) if due else []
        # on Postgres the messages are rendered in a helper thread while this one writes
        # the reservations and commits (the server works on the rows meanwhile):
        # nothing is handed to a channel before the commit
        rendering = _render_beside(ws, templates, job, decisions + redecided)
        if not job.dry_run:
            ledger.write_entries(conn, map(_entry, decisions),
                                 flow=flow.name, run_key=job.run_key, run_id=job.run_id,
                                 package_id=job.package_id, priority=flow.priority,
                                 counted=not flow.exempt)
            ledger.rewrite(conn, map(_entry, redecided), flow=flow.name,
                           run_key=job.run_key, run_id=job.run_id)
            if resumed:
                ledger.adopt(conn, flow.name, job.run_key, [r.key for r in resumed],
                             job.run_id)
    if not job.dry_run and len(decisions) >= 1000:
        # roughly the rows this run has reserved so far (chunks are of equal size)
        ledger.refresh_statistics(ws.store, (job.index + 1) * (job.stop - job.start))
    decisions += redecided
    built = rendering()
    if resumed:
        more = _resume_decisions(ws, flow.name, job, resumed)
        decisions += more
        built += _render_all(ws, templates, job, more)

    outgoing: list[tuple[str, Message]] = []
    tiers: dict[str, str] = {}  # each outgoing recipient's tier
    render_errors: list[ledger.Outcome] = []
    reasons: Counter[tuple[str, str]] = Counter()
    for d, message in zip(decisions, built, strict=True):
        if d.status != SEND:
            counts[d.status, d.recipient.tier, d.channel] += 1
            if job.dry_run:
                reasons[d.status, _reason_kind(d)] += 1
            continue
        assert d.channel is not None and message is not None
        if isinstance(message, RenderError):
            render_errors.append(ledger.Outcome(d.recipient.key, "render_error",
                                                str(message), attempts=0))
            counts["render_error", d.recipient.tier, d.channel] += 1
            if job.dry_run:
                reasons["render_error", str(message)] += 1
            continue
        outgoing.append((d.channel, message))
        tiers[d.recipient.key] = d.recipient.tier
        if job.dry_run:
            counts["sent", d.recipient.tier, d.channel] += 1
    if job.dry_run:
        return ChunkResult([(*k, n) for k, n in counts.items()],
                           [(*k, n) for k, n in reasons.items()])
    if render_errors:
        ledger.settle(ws.store, flow.name, job.run_key, render_errors)
    if outgoing:
        # a fatal answer leaves what it kept from going out `queued` for the rerun
        settled = asyncio.run(dispatch(ws, Job(flow.name, job.run_key, job.run_id),
                                       group(outgoing)))
        # counted from the outcomes written, not read back from the ledger: each row of
        # these recipients is this chunk's (reserved above under the ledger lock)
        status_of = {o.recipient: o.status for o in settled}
        for channel, message in outgoing:
            counts[status_of.get(message.recipient, "queued"), tiers[message.recipient],
                   channel] += 1
    return ChunkResult([(*k, n) for k, n in counts.items()], [])


Built = Message | RenderError | None  # None: a decision that sends nothing


def _render_all(ws: Workspace, templates: Templates, job: ChunkJob,
                decisions: list[Decision]) -> list[Built]:
    """Each decision's message (its RenderError when a template fails), in order."""
    out: list[Built] = []
    for d in decisions:
        if d.status != SEND:
            out.append(None)
            continue
        try:
            out.append(build_message(ws, templates, job, d))
        except RenderError as exc:
            out.append(exc)
    return out


def _render_beside(ws: Workspace, templates: Templates, job: ChunkJob,
                   decisions: list[Decision]) -> Callable[[], list[Built]]:
    """What renders ``decisions`` (:func:`_render_all`) once called. On Postgres the
    rendering starts at once in a thread of its own (with this thread's context
    variables), overlapping the reservation's writes and commit, which the server does
    in its own process; the call waits for it and raises what it raised. A dry run
    (nothing written) and SQLite render when called, after the commit: SQLite's writes
    run in this process, their Python holding the interpreter lock that rendering needs
    (a run took 2-5% longer with the thread, BENCHMARKS.md), and the reservation's
    transaction holds the database's write lock, which rendering must not prolong."""
    if job.dry_run or ws.store.dialect.name != "postgresql":
        return functools.partial(_render_all, ws, templates, job, decisions)
    context = contextvars.copy_context()
    result: Future[list[Built]] = Future()

    def work() -> None:
        try:
            result.set_result(context.run(_render_all, ws, templates, job, decisions))
        except BaseException as exc:  # handed to the chunk's thread, raised there
            result.set_exception(exc)

    threading.Thread(target=work, name="herald-render", daemon=True).start()
    return result.result


def _reason_kind(d: Decision) -> str:
    """A decision's reason without the per-recipient details (local times, dates)."""
    reason = d.reason or d.status
    if d.status == "deferred" and reason.startswith("experiment "):
        return reason.split(", decided at")[0]  # waiting for the winner
    if d.status in ("deferred", "quiet_hours"):
        return reason.split(":")[0] + " (quiet hours)"
    return reason


def _entry(d: Decision) -> ledger.Entry:
    return ledger.Entry(d.recipient.key, d.recipient.tier,
                        "queued" if d.status == SEND else d.status, d.channel, d.address,
                        d.reason, d.not_before, d.variant)


def _lock_ledger(conn: Any) -> None:
    ledger.reserve_lock(conn)


def _resume_decisions(ws: Workspace, flow: str, job: ChunkJob,
                      rows: list[store.Recipient]) -> list[Decision]:
    """Queued rows from an interrupted run: send them on the channel they reserved,
    unless the suppression list stops them now (``suppressed``, settled here)."""
    out = []
    with ws.store.connect() as conn:
        found = ledger_reads.existing(conn, flow, job.run_key, [r.key for r in rows])
        stopped = suppression.listed_since(
            conn, [(r.key, found[r.key].channel, found[r.key].address) for r in rows],
            ws.config.phone_region)
    for r in rows:
        entry = ws.flow(flow).tier_for(r.tier)
        assert entry is not None, "the row was reserved under this flow's tiers"
        row = found[r.key]
        out.append(Decision(r, entry[0], "suppressed" if r.key in stopped else SEND,
                            channel=row.channel, address=row.address, variant=row.variant,
                            reason=suppression.LISTED_SINCE if r.key in stopped else None))
    if stopped and not job.dry_run:
        ledger.settle(ws.store, flow, job.run_key, [
            ledger.Outcome(key, "suppressed", suppression.LISTED_SINCE, attempts=0)
            for key in stopped])
    return out


def build_message(ws: Workspace, templates: Templates, job: ChunkJob | Job,
                  d: Decision) -> Message:
    """Render the message a decision sends (RenderError when a template fails)."""
    flow = ws.flow(job.flow)
    assert d.channel is not None and d.address is not None
    kind = ws.channel_kind(d.channel)
    locale_col = flow.audience.locale
    locale = d.recipient.data.get(locale_col) if locale_col else None
    link, headers = unsubscribe.for_message(ws.config.unsubscribe, d.recipient.key,
                                            d.channel, kind, flow.name)
    variables = {**d.recipient.data, "flow": flow.name, "tier": d.recipient.tier,
                 "run_key": job.run_key, "channel": d.channel, "variant": d.variant, **link}
    rendered = templates.render(flow, d.tier, kind, str(locale) if locale else None,
                                variables, d.variant)
    return Message(recipient=d.recipient.key, address=d.address, kind=kind,
                   body=rendered.body, subject=rendered.subject, html=rendered.html,
                   message_id=ledger.message_id(flow.name, job.run_key, d.recipient.key),
                   headers=headers,
                   meta={"flow": flow.name, "run_key": job.run_key, "tier": d.recipient.tier,
                         **({"variant": d.variant} if d.variant else {})})
