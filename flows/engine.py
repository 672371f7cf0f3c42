"""One campaign run, as plain functions the Prefect flow wires together.

    prepare()    load and validate the flow, build the audience package, plan chunks
    run_chunk()  policy + reservation, render, dispatch, ledger: one chunk of recipients
    finish()     the run's report, from the ledger

Nothing here imports Prefect: the same functions run under the Prefect flow in
``herald.flows.campaign``, in tests, and on any worker that can reach the workspace
database (a chunk job is a small picklable value).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from herald.audiences import store
from herald.channels.base import Message
from herald.core import clock, workspace
from herald.core.db import writing
from herald.core.errors import HeraldError, Problem, RunError, ValidationFailed
from herald.core.spec import Scalar
from herald.core.workspace import Workspace
from herald.delivery import ledger, ledger_reads, run_records, suppression, unsubscribe, variants
from herald.delivery.dispatch import (
    Job,
    clear_stop,
    dispatch,
    forget_buckets,
    group,
    request_stop,
    stop_requested,
)
from herald.delivery.policy import SEND, Decision, Policy
from herald.delivery.render import RenderError, Templates
from herald.flows.validate import check_flow, templates_for

log = logging.getLogger("herald.run")


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


@dataclass(frozen=True)
class Prepared:
    """A validated run with its audience package built and its chunks planned."""

    run_id: str
    flow: str
    run_key: str
    dry_run: bool
    package: store.Package
    chunks: list[ChunkJob]
    templates: int


def default_run_key(ws: Workspace, flow: str) -> str:
    """Today's date in the flow's time zone by Herald's clock: one campaign a day unless
    told otherwise. The one home of this default (CLI, Prefect flow and engine use it)."""
    return clock.now().astimezone(ZoneInfo(ws.timezone(ws.flow(flow)))).date().isoformat()


def scheduled_run_key(ws: Workspace, flow: str, expected: datetime) -> str:
    """The run key of a run a schedule created: its scheduled time to the minute in the
    flow's time zone, so a retried or re-triggered scheduled run has the same key."""
    zone = ZoneInfo(ws.timezone(ws.flow(flow)))
    return expected.astimezone(zone).strftime("%Y-%m-%dT%H:%M")


def nothing_to_do(ws: Workspace, flow: str, run_key: str) -> dict[str, Any] | None:
    """The answer to a rerun of a run key that is complete (a real run of it completed
    and no recipient of it waits for a send: none queued, none deferred), else None.

    Such a rerun would build a whole package only to find every recipient a duplicate;
    its answer instead is the run key's figures and one line saying so."""
    found = run_records.list_runs(ws.store, 1000, flow=flow, run_key=run_key)
    done = [r for r in found if r.status == "completed" and not r.dry_run]
    if not done or ledger_reads.open_rows(ws.store, flow, run_key):
        return None
    counts = ledger_reads.key_counts(ws.store, flow, run_key)
    sent, failed = counts.deliveries.get("sent", 0), counts.deliveries.get("failed", 0)
    return {"run_id": None, "flow": flow, "run_key": run_key, "dry_run": False,
            "status": "nothing_to_do", "sent_by": done[-1].id, "package": None,
            **counts.to_dict(),
            "message": f"already sent under run key {run_key}: {sent:,} sent, {failed:,} "
                       "failed; nothing to do"}


def prepare(ws: Workspace, flow_name: str, params: Mapping[str, Scalar] | None = None,
            run_key: str | None = None, dry_run: bool = False) -> Prepared:
    """Validate, record the run, build the package and plan its chunks."""
    adopt_workspace(ws)
    checked = check_flow(ws, flow_name, params, _open(str(ws.root))[1])
    # entries written before suppression values were normalised like addresses
    suppression.migrate(ws.store, ws.config.phone_region)
    tidy(ws)
    flow = checked.spec
    key = run_key or default_run_key(ws, flow_name)
    run_id = f"run-{clock.now():%Y%m%d%H%M%S}-{secrets.token_hex(3)}"
    run_records.start_run(ws.store, run_id, flow.name, key, dry_run)
    try:
        package = store.build(ws, flow, checked.segment)
        orphans = [t for t in package.tiers if flow.tier_for(t) is None]
        if orphans:
            raise ValidationFailed([Problem(
                f"tier{'s' if len(orphans) > 1 else ''} {', '.join(map(repr, orphans))} "
                "returned by the segment ha{} no entry in tiers and there is no 'default' "
                "tier".format("ve" if len(orphans) > 1 else "s"),
                file=ws.flow_file(flow.name), line=ws.flow_line(flow.name, ("tiers",)),
                field="tiers")])
        run_records.set_run_package(ws.store, run_id, package.id)
        if not dry_run and flow.experiments():
            from herald.flows.experiments import advance

            advance(ws, flow, key, clock.now())
    except HeraldError as exc:
        run_records.finish_run(ws.store, run_id, "failed", None, str(exc))
        raise
    size = ws.chunk_size(flow)
    chunks = [ChunkJob(str(ws.root), flow.name, run_id, key, package.id, i, start,
                       min(start + size, package.size), dry_run, clock.current())
              for i, start in enumerate(range(0, package.size, size))]
    return Prepared(run_id, flow.name, key, dry_run, package, chunks, checked.templates)


def tidy(ws: Workspace) -> None:
    """Close runs a killed process left ``running`` and remove the packages it left
    half-built (on this host), saying so in the log."""
    for run_id in run_records.close_abandoned_runs(ws.store):
        log.warning("run %s was left running by a process that ended; closed as failed "
                    "(rerun with its run key to resume)", run_id)
    for package_id in store.remove_orphans(ws.store):
        log.warning("package %s was left half-built by a process that ended; removed",
                    package_id)


# -- one chunk --------------------------------------------------------------------------
# Compiled templates per workspace of this process (the workspace itself is the core's
# per-process one: herald.core.workspace.shared), rebuilt when that workspace changes.
_templates: dict[str, tuple[Workspace, Templates]] = {}
_lock = threading.Lock()


def _open(root: str) -> tuple[Workspace, Templates]:
    """This process's workspace for ``root`` and its compiled templates."""
    ws = workspace.shared(root)
    with _lock:
        cached = _templates.get(root)
        if cached is None or cached[0] is not ws:
            cached = _templates[root] = (ws, templates_for(ws))
        return cached


def workspace_at(root: str) -> Workspace:
    """The workspace of this process for ``root``, opened once."""
    return _open(root)[0]


def adopt_workspace(ws: Workspace) -> None:
    """Make ``ws`` the one chunks of this process use for its folder."""
    workspace.adopt(ws)
    _open(str(ws.root))


def forget_workspace(root: str | Path) -> None:
    """Drop the cached workspace for ``root`` (its YAML or databases changed)."""
    with _lock:
        _templates.pop(str(root), None)
    workspace.forget(root)


def forget_all() -> None:
    """Drop every cached workspace (tests that drop their databases)."""
    with _lock:
        _templates.clear()
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
    return _run_chunk(job)


def _run_chunk(job: ChunkJob) -> ChunkResult:
    if stop_requested():  # stopping: a chunk not started yet is left to the rerun
        return ChunkResult([], [])
    ws, templates = _open(job.workspace)
    flow = ws.flow(job.flow)
    rows = store.read(ws, job.package_id, job.start, job.stop)
    policy = Policy(ws, flow, variants.states(ws.store, flow.name, job.run_key)
                    if flow.experiments() else None)
    counts: Counter[tuple[str, str, str | None]] = Counter()

    # Decide and reserve in one transaction holding the write lock, so that two runs
    # checking the same person's caps at once cannot both pass.
    with writing(ws.store) as conn:
        _lock_ledger(conn)
        at = ledger.now()
        seen = ledger_reads.existing(conn, flow.name, job.run_key, [r.key for r in rows])
        resumed = [r for r in rows if r.key in seen and seen[r.key].status == "queued"]
        due = [r for r in rows if r.key in seen and seen[r.key].due(at)]
        for r in rows:
            old = seen.get(r.key)
            if old and old.status != "queued" and not old.due(at):
                # already handled under this run key; a deferred row still waits
                status = WAITING if old.status == "deferred" else ALREADY
                counts[status, old.tier, old.channel] += 1
        fresh = [r for r in rows if r.key not in seen]
        decisions = policy.decide(conn, fresh, at, job.run_key)
        redecided = policy.decide(conn, due, at, job.run_key) if due else []
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
    if not job.dry_run and len(decisions) >= 1000 and _statistics_due(job.index):
        ledger.refresh_statistics(ws.store)
    decisions += redecided
    if resumed:
        decisions += _resume_decisions(ws, flow.name, job, resumed)

    outgoing: list[tuple[str, Message]] = []
    tiers: dict[str, str] = {}  # each outgoing recipient's tier
    render_errors: list[ledger.Outcome] = []
    reasons: Counter[tuple[str, str]] = Counter()
    for d in decisions:
        if d.status != SEND:
            counts[d.status, d.recipient.tier, d.channel] += 1
            if job.dry_run:
                reasons[d.status, _reason_kind(d)] += 1
            continue
        assert d.channel is not None and d.address is not None
        try:
            message = build_message(ws, templates, job, d)
        except RenderError as exc:
            render_errors.append(ledger.Outcome(d.recipient.key, "render_error", str(exc),
                                                attempts=0))
            counts["render_error", d.recipient.tier, d.channel] += 1
            if job.dry_run:
                reasons["render_error", str(exc)] += 1
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
        settled = asyncio.run(dispatch(ws, Job(flow.name, job.run_key, job.run_id),
                                       group(outgoing)))
        # counted from the outcomes written, not read back from the ledger: each row of
        # these recipients is this chunk's (reserved above under the ledger lock)
        status_of = {o.recipient: o.status for o in settled}
        for channel, message in outgoing:
            counts[status_of.get(message.recipient, "queued"), tiers[message.recipient],
                   channel] += 1
    return ChunkResult([(*k, n) for k, n in counts.items()], [])


def _statistics_due(index: int) -> bool:
    """Whether chunk ``index`` refreshes the planner's statistics: chunks 0, 1, 3, 7, 15...
    so they stay within a factor two of the run key's rows (a fresh table's first chunks
    need them most) at a logarithmic number of ANALYZEs, not one per chunk."""
    return (index + 1) & index == 0


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
    """Queued rows from an interrupted run: send them on the channel they reserved."""
    out = []
    with ws.store.connect() as conn:
        found = ledger_reads.existing(conn, flow, job.run_key, [r.key for r in rows])
    for r in rows:
        entry = ws.flow(flow).tier_for(r.tier)
        assert entry is not None, "the row was reserved under this flow's tiers"
        out.append(Decision(r, entry[0], SEND, channel=found[r.key].channel,
                            address=found[r.key].address, variant=found[r.key].variant))
    return out


def build_message(ws: Workspace, templates: Templates, job: ChunkJob | Job,
                  d: Decision) -> Message:
    """Render the message a decision sends (RenderError when a template fails)."""
    flow = ws.flow(job.flow)
    assert d.channel is not None and d.address is not None
    kind = ws.channel_kind(d.channel)
    locale_col = flow.audience.locale
    locale = d.recipient.data.get(locale_col) if locale_col else None
    variables = {**d.recipient.data, "flow": flow.name, "tier": d.recipient.tier,
                 "run_key": job.run_key, "channel": d.channel, "variant": d.variant}
    headers: dict[str, str] = {}
    if ws.config.unsubscribe:
        url = unsubscribe.url_for(ws.config.unsubscribe, d.recipient.key, d.channel,
                                  flow.name)
        variables["unsubscribe_url"] = url
        if kind == "email":
            headers = unsubscribe.email_headers(url)
    rendered = templates.render(flow, d.tier, kind, str(locale) if locale else None,
                                variables, d.variant)
    return Message(recipient=d.recipient.key, address=d.address, kind=kind,
                   body=rendered.body, subject=rendered.subject, html=rendered.html,
                   message_id=ledger.message_id(flow.name, job.run_key, d.recipient.key),
                   headers=headers,
                   meta={"flow": flow.name, "run_key": job.run_key, "tier": d.recipient.tier,
                         **({"variant": d.variant} if d.variant else {})})


# -- the report -------------------------------------------------------------------------
def finish(ws: Workspace, prepared: Prepared, chunk_results: list[ChunkResult],
           started: datetime) -> dict[str, Any]:
    """The run's summary (the ``herald run --json`` object), recorded with the run."""
    forget_buckets(prepared.run_id)
    counts = ledger_reads.RunCounts()
    reasons: Counter[tuple[str, str]] = Counter()
    if prepared.dry_run:
        for chunk in chunk_results:
            for status, tier, channel, n in chunk.counts:
                counts.add(CARRIED.get(status, status), tier, channel, n)
            for status, reason, n in chunk.reasons:
                reasons[status, reason] += n
    else:
        counts = ledger_reads.run_counts(ws.store, prepared.run_id)
        for chunk in chunk_results:  # rows this run did not write
            for status, tier, channel, n in chunk.counts:
                if status in CARRIED:
                    counts.add(CARRIED[status], tier, channel, n)
    finished = clock.now()
    summary = {
        "run_id": prepared.run_id,
        "flow": prepared.flow,
        "run_key": prepared.run_key,
        "dry_run": prepared.dry_run,
        "status": "completed",
        "package": {"id": prepared.package.id, "size": prepared.package.size,
                    "tiers": prepared.package.tiers,
                    "segment": prepared.package.segment,
                    "sql_sha256": prepared.package.sql_sha256},
        **counts.to_dict(),
        "deferred_until": None,
        **({"reasons": [{"status": s, "reason": r, "count": n}
                        for (s, r), n in reasons.most_common()]} if prepared.dry_run else {}),
        "chunks": len(prepared.chunks),
        "workers": sorted({chunk.worker for chunk in chunk_results}),  # host:pid
        "started_at": started.isoformat(),
        "finished_at": finished.isoformat(),
        "duration_seconds": round((finished - started).total_seconds(), 3),
    }
    if counts.deliveries.get("deferred") and not prepared.dry_run:
        until = ledger_reads.deferred_until(ws.store, prepared.flow, prepared.run_key)
        summary["deferred_until"] = until.isoformat() if until else None
    run_records.finish_run(ws.store, prepared.run_id, "completed", summary)
    return summary


def check_stopped(prepared: Prepared) -> None:
    """After the chunks: a run stopped by a signal fails, saying how to resume it."""
    why = stop_requested()
    if why:
        raise RunError(f"stopped by {why}: batches in flight were finished and recorded, "
                       "nothing more was sent; to send the rest, run again with the same "
                       f"run key: herald run {prepared.flow} --run-key {prepared.run_key}")


_signal_depth = [0]


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While running: SIGTERM or Ctrl-C (SIGINT) stops handing batches to providers at
    once; batches in flight finish and are recorded; the run then fails saying how to
    resume. A second signal stops at once (as without this). Used by ``herald run`` and,
    in the main thread, around the campaign flow's sending (Prefect installs its own
    SIGTERM handler for a flow run; this one takes over while chunks are sent). Nested
    uses share one stop request. Outside the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, frame: Any) -> None:
        sig = signal.Signals(signum)
        if stop_requested():
            signal.signal(sig, previous[sig])
            raise KeyboardInterrupt(sig.name)
        log.warning("%s: no new batches; finishing the ones in flight (again to stop "
                    "at once)", sig.name)
        request_stop(sig.name)

    if not _signal_depth[0]:
        clear_stop()
    _signal_depth[0] += 1
    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _signal_depth[0] -= 1
        if not _signal_depth[0]:
            clear_stop()


def fail(ws: Workspace, run_id: str, error: BaseException) -> None:
    run_records.finish_run(ws.store, run_id, "failed", None, f"{type(error).__name__}: {error}")


def run_local(ws: Workspace, flow_name: str, params: Mapping[str, Scalar] | None = None,
              run_key: str | None = None, dry_run: bool = False,
              max_workers: int | None = None) -> dict[str, Any]:
    """Run a campaign on a thread pool without Prefect (tests, embedded use)."""
    from concurrent.futures import ThreadPoolExecutor

    started = clock.now()
    prepared = prepare(ws, flow_name, params, run_key, dry_run)
    try:
        with ThreadPoolExecutor(max_workers or ws.config.max_workers) as pool:
            results = list(pool.map(run_chunk, prepared.chunks))
        check_stopped(prepared)
        return finish(ws, prepared, results, started)
    except BaseException as exc:
        fail(ws, prepared.run_id, exc)
        raise
