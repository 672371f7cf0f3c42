"""One campaign run, as plain functions the Prefect flow wires together.

    prepare()    load and validate the flow, build the audience package, plan chunks
    run_chunk()  policy + reservation, render, dispatch, ledger: one chunk of recipients
                 (in herald.flows.chunks)
    finish()     the run's report, from the ledger

Nothing here imports Prefect: the same functions run under the Prefect flow in
``herald.flows.campaign``, in tests, and on any worker that can reach the workspace
database (a chunk job is a small picklable value).
"""

from __future__ import annotations

import logging
import secrets
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy.exc import DBAPIError

from herald.audiences import builder, store
from herald.core import clock
from herald.core.db import describe_exception
from herald.core.errors import HeraldError, Problem, RunError, ValidationFailed
from herald.core.spec import Param, TaskRunnerSpec
from herald.core.workspace import Workspace
from herald.delivery import ledger_reads, run_records, suppression
from herald.delivery.dispatch import (
    clear_stop,
    fatal_cause,
    forget_run,
    request_stop,
    stop_requested,
)
from herald.delivery.workers import chunk_runner
from herald.flows.chunks import (
    CARRIED,
    ChunkJob,
    ChunkResult,
    adopt_workspace,
    opened,
    run_chunk,
)
from herald.flows.validate import check_flow

log = logging.getLogger("herald.run")


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
    its answer instead is the run key's figures and one line saying so. A run key whose
    runs reached nobody (an empty audience: a parameter mistyped, the data not there
    yet) is not complete: its rerun builds the audience again, as no one can get a
    message twice."""
    found = run_records.list_runs(ws.store, 1000, flow=flow, run_key=run_key)
    done = [r for r in found if r.status == "completed" and not r.dry_run]
    if not done or ledger_reads.open_rows(ws.store, flow, run_key):
        return None
    counts = ledger_reads.key_counts(ws.store, flow, run_key)
    if not any(counts.deliveries.values()):
        return None
    sent, failed = counts.deliveries.get("sent", 0), counts.deliveries.get("failed", 0)
    return {"run_id": None, "flow": flow, "run_key": run_key, "dry_run": False,
            "status": "nothing_to_do", "sent_by": done[-1].id, "package": None,
            **counts.to_dict(),
            "message": f"already sent under run key {run_key}: {sent:,} sent, {failed:,} "
                       "failed" + (f", {unknown:,} with the outcome unknown (`sending`: check "
                                   "the provider's logs; never resent)"
                                   if (unknown := counts.deliveries.get("sending", 0))
                                   else "") + "; nothing to do"}


def prepare(ws: Workspace, flow_name: str, params: Mapping[str, Param] | None = None,
            run_key: str | None = None, dry_run: bool = False) -> Prepared:
    """Validate, record the run, build the package and plan its chunks."""
    adopt_workspace(ws)
    checked = check_flow(ws, flow_name, params, opened(str(ws.root))[1])
    # entries written before suppression values were normalised like addresses
    suppression.migrate(ws.store, ws.config.phone_region)
    tidy(ws)
    flow = checked.spec
    key = run_key or default_run_key(ws, flow_name)
    run_id = f"run-{clock.now():%Y%m%d%H%M%S}-{secrets.token_hex(3)}"
    run_records.start_run(ws.store, run_id, flow.name, key, dry_run)
    try:
        package = builder.build(ws, flow, checked.segment)
        orphans = [t for t in package.tiers if flow.tier_for(t) is None]
        if orphans:
            raise ValidationFailed([Problem(
                f"tier{'s' if len(orphans) > 1 else ''} {', '.join(map(repr, orphans))} "
                "returned by the segment ha{} no entry in tiers and there is no 'default' "
                "tier".format("ve" if len(orphans) > 1 else "s"),
                file=ws.flow_file(flow.name), line=ws.flow_line(flow.name, ("tiers",)),
                field="tiers")])
        run_records.set_run_package(ws.store, run_id, package.id)
        if package.size == 0:
            shown = ", ".join(f"{k}={v!r}" for k, v in checked.segment.params.items())
            log.warning("the audience of %s is empty: %s returned no rows%s; nothing is "
                        "sent (a rerun of run key %s builds it again)", flow.name,
                        checked.segment.file, f" with {shown}" if shown else "", key)
        if not dry_run and flow.experiments():
            from herald.flows.experiments import advance

            advance(ws, flow, key, clock.now())
    except BaseException as exc:  # the run is recorded as failed, whatever stopped it
        run_records.finish_run(ws.store, run_id, "failed", None, _build_failure(exc))
        raise
    size = ws.chunk_size(flow)
    chunks = [ChunkJob(str(ws.root), flow.name, run_id, key, package.id, i, start,
                       min(start + size, package.size), dry_run, clock.current())
              for i, start in enumerate(range(0, package.size, size))]
    return Prepared(run_id, flow.name, key, dry_run, package, chunks, checked.templates)


@dataclass
class EarlyBuild:
    """An audience ``herald run`` built before its flow run began, while Prefect was
    imported and its temporary server started (the command used to wait for both): the
    flow run's build-audience task takes it instead of building, with what the build
    logged (for the Prefect UI) and, when the build failed, its one-line reason. One that
    no task took is closed as a failed run by ``close_unused``."""

    flow_name: str
    run_key: str
    params: dict[str, Param]
    dry_run: bool
    prepared: Prepared | None = None
    failure: str | None = None
    seconds: float = 0.0
    records: list[logging.LogRecord] = field(default_factory=list)
    held: bool = False  # its records are not shown yet (see ``build_early``)
    taken: bool = False

    def show(self) -> None:
        """Print the records held back, now that logging is set up (``build_early``)."""
        held, self.held = self.held, False
        for record in self.records if held else ():
            logging.getLogger(record.name).handle(record)

    def close_unused(self, ws: Workspace, why: BaseException | str) -> None:
        """Record the run of an audience no task took as failed, saying ``why``."""
        if self.prepared is None or self.taken:
            return
        self.taken = True
        if isinstance(why, str):
            reason = why
        elif isinstance(why, Exception):
            reason = describe_exception(why)
        else:  # a signal while Prefect started
            reason = f"stopped by {why or 'a signal'} before sending: nothing was sent"
        run_records.finish_run(ws.store, self.prepared.run_id, "failed", None, reason)


class _Keep(logging.Handler):
    def __init__(self, into: list[logging.LogRecord]) -> None:
        super().__init__()
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record)


def build_early(ws: Workspace, flow_name: str, params: Mapping[str, Param] | None,
                run_key: str | None, dry_run: bool, hold: bool = False) -> EarlyBuild:
    """Build the audience of a run about to start (see ``EarlyBuild``). A failure the
    build task would report in one line (a file's mistake, the database's) is kept for
    it; anything else (a signal) is raised, the run recorded as failed. ``hold``: no
    handler prints Herald's records yet (Prefect sets up logging once imported), and
    they are kept for ``EarlyBuild.show`` instead of Python's last-resort printing."""
    key = run_key or default_run_key(ws, flow_name)
    early = EarlyBuild(flow_name, key, dict(params or {}), dry_run, held=hold)
    keep = _Keep(early.records)
    herald_log = logging.getLogger("herald")
    herald_log.addHandler(keep)
    started = time.perf_counter()
    try:
        early.prepared = prepare(ws, flow_name, early.params, key, dry_run)
    except (HeraldError, DBAPIError) as exc:
        early.failure = describe_exception(exc)
    finally:
        herald_log.removeHandler(keep)
        early.seconds = time.perf_counter() - started
    return early


def _build_failure(exc: BaseException) -> str:
    """Why a run failed before sending, for its record."""
    if not isinstance(exc, Exception):  # a signal (Prefect's handler or Ctrl-C)
        return "stopped by a signal while the audience was built: nothing was sent"
    return describe_exception(exc)


def tidy(ws: Workspace) -> None:
    """Close runs a killed process left ``running`` and remove the packages it left
    half-built (on this host), saying so in the log."""
    for run_id in run_records.close_abandoned_runs(ws.store):
        log.warning("run %s was left running by a process that ended; closed as failed "
                    "(rerun with its run key to resume)", run_id)
    for package_id in store.remove_orphans(ws.store):
        log.warning("package %s was left half-built by a process that ended; removed",
                    package_id)


# -- the report -------------------------------------------------------------------------
def finish(ws: Workspace, prepared: Prepared, chunk_results: list[ChunkResult],
           started: datetime) -> dict[str, Any]:
    """The run's summary (the ``herald run --json`` object), recorded with the run."""
    forget_run(prepared.run_id)
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


def check_channels(ws: Workspace, prepared: Prepared) -> None:
    """After the chunks: a channel that could not work (a fatal answer: an outbox folder
    that cannot be written, refused credentials) fails the run. The messages it did not
    send stay ``queued``, so the same run key sends them once it is fixed."""
    if prepared.dry_run:
        return
    stopped = ledger_reads.stopped_channels(ws.store, prepared.run_id)
    if not stopped:
        return
    why = "; ".join(f"channel {name} stopped ({fatal_cause(reason)}): {n:,} message(s) not "
                    "sent" for name, (reason, n) in stopped.items())
    raise RunError(f"{why}. Fix it, then run again with the same run key to send them: "
                   f"herald run {prepared.flow} --run-key {prepared.run_key}")


_signal_depth = [0]
_sending = [False]  # a use with ``sending`` began since the outermost was entered


@contextmanager
def stop_on_signals(sending: bool = True) -> Iterator[None]:
    """While running: SIGTERM or Ctrl-C (SIGINT) stops handing batches to providers at
    once; batches in flight finish and are recorded; the run then fails saying how to
    resume. A second signal stops at once (as without this). Used by ``herald run`` and,
    in the main thread, around the campaign flow's sending (Prefect installs its own
    SIGTERM handler for a flow run; this one takes over while chunks are sent). Nested
    uses share one stop request. Outside the main thread it does nothing.

    ``sending=False`` (``herald run``, around the whole command): until a nested use with
    ``sending`` begins, nothing has been handed to a provider, and a signal stops at once
    (KeyboardInterrupt) instead of waiting for Prefect's temporary server to start and
    the audience to be built; see ``began_sending``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, frame: Any) -> None:
        sig = signal.Signals(signum)
        if stop_requested() or not _sending[0]:
            signal.signal(sig, previous[sig])
            raise KeyboardInterrupt(sig.name)
        log.warning("%s: no new batches; finishing the ones in flight (again to stop "
                    "at once)", sig.name)
        request_stop(sig.name)

    if not _signal_depth[0]:
        clear_stop()
        _sending[0] = False
    _signal_depth[0] += 1
    _sending[0] = _sending[0] or sending
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


def began_sending() -> bool:
    """Whether the chunks of the run under ``stop_on_signals`` began (see there)."""
    return _sending[0]


def fail(ws: Workspace, run_id: str, error: BaseException) -> None:
    run_records.finish_run(ws.store, run_id, "failed", None, describe_exception(error))


def run_local(ws: Workspace, flow_name: str, params: Mapping[str, Param] | None = None,
              run_key: str | None = None, dry_run: bool = False,
              max_workers: int | None = None, runner: TaskRunnerSpec | None = None
              ) -> dict[str, Any]:
    """Run a campaign without Prefect (tests, embedded use): at most ``max_workers``
    chunks at once, each in a thread, or in a worker process when the workspace's
    ``task_runner`` is ``processes`` (``runner`` overrides it; ``dask`` runs threads)."""
    from concurrent.futures import ThreadPoolExecutor

    started = clock.now()
    prepared = prepare(ws, flow_name, params, run_key, dry_run)
    try:
        with chunk_runner(runner or ws.config.task_runner, prepared.run_id,
                          run_chunk) as run, \
                ThreadPoolExecutor(max_workers or ws.config.max_workers) as pool:
            results = list(pool.map(run, prepared.chunks))
        check_stopped(prepared)
        check_channels(ws, prepared)
        return finish(ws, prepared, results, started)
    except BaseException as exc:
        fail(ws, prepared.run_id, exc)
        raise
