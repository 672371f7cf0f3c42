"""The Prefect flow of a campaign run: a thin wiring of ``herald.flows.engine``.

One flow run per campaign run, named ``<flow>/<run key>``; one task run to build the
audience package and one per chunk of recipients (never one per recipient); artifacts
for the audience summary, the delivery report and the sending progress.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, cast
from uuid import UUID

from prefect import State, flow, get_run_logger, tags, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactUpdate
from prefect.client.schemas.objects import FlowRun
from prefect.context import FlowRunContext
from prefect.events import emit_event
from prefect.exceptions import FailedRun
from prefect.futures import PrefectFuture, as_completed
from prefect.states import Failed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from sqlalchemy.exc import DBAPIError

from herald.core import clock
from herald.core.db import describe_exception
from herald.core.errors import HeraldError, RunError
from herald.core.spec import Param, TaskRunnerSpec
from herald.core.workspace import Workspace
from herald.delivery import ledger, workers
from herald.delivery.dispatch import stop_requested
from herald.flows import chunks, engine
from herald.flows import progress as live
from herald.flows.artifacts import artifact_key, in_run_workers, untagged_tasks
from herald.reporting import runs
from herald.reporting.text import delivery_markdown


@task(name="build-audience", task_run_name="build-audience", cache_policy=NO_CACHE)
def build_audience(ws: Workspace, flow_name: str, params: dict[str, Param], run_key: str,
                   dry_run: bool) -> engine.Prepared | State:
    early = _early_build(flow_name, params, run_key, dry_run)
    if early is not None:  # built by `herald run` while Prefect started
        early.taken = True
        logger = get_run_logger()
        for record in early.records:  # the console showed them; the UI gets them here
            logger.log(record.levelno, "%s", record.getMessage(),
                       extra={"ui_only": True, "replayed": True})
        logger.info("built in %.1f s before this flow run began, while Prefect started",
                    early.seconds)
        prepared, message = early.prepared, early.failure
    else:
        prepared, message = None, None
        try:
            prepared = engine.prepare(ws, flow_name, params, run_key, dry_run)
        except (HeraldError, DBAPIError) as exc:
            # one line naming the file or the database, never the SQL and its parameters
            message = describe_exception(exc)
    if prepared is None:
        # for the Prefect UI: `herald run` prints the failure itself, in one line
        get_run_logger().error("%s", message, extra={"ui_only": True})
        return Failed(message=message)
    package = prepared.package
    get_run_logger().info("audience package %s: %d recipients in %d chunks (%s)",
                          package.id, package.size, len(prepared.chunks),
                          ", ".join(f"{t}={n}" for t, n in package.tiers.items()) or "empty")
    rows = "\n".join(f"| {tier} | {n} |" for tier, n in package.tiers.items())
    create_markdown_artifact(
        key=artifact_key(flow_name, "audience"),
        description=f"Audience of {flow_name} {run_key}",
        markdown=(f"# Audience: {flow_name} ({run_key})\n\n"
                  f"- package: `{package.id}`\n- segment: `{package.segment}`\n"
                  f"- SQL sha256: `{package.sql_sha256}`\n- size: **{package.size}**\n"
                  f"- params: `{package.params}`\n\n| tier | recipients |\n|---|---|\n{rows}\n"))
    return prepared


_early: ContextVar[engine.EarlyBuild | None] = ContextVar("herald_early_build",
                                                         default=None)


def _early_build(flow_name: str, params: dict[str, Param], run_key: str, dry_run: bool
                 ) -> engine.EarlyBuild | None:
    """The early build handed to this flow run by ``run``, if it is this run's."""
    early = _early.get()
    if early is None or early.taken or (early.flow_name, early.run_key, early.params,
                                        early.dry_run) != (flow_name, run_key,
                                                           dict(params), dry_run):
        return None
    return early


@task(name="send-chunk", task_run_name="chunk-{job.index:04d}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=5)
def send_chunk(job: chunks.ChunkJob) -> chunks.ChunkResult:
    # A retried chunk is safe: the ledger holds who was already reserved or sent.
    return in_run_workers(job.run_id, chunks.run_chunk, job)


# `herald run --task-runner`: the runner of the flow run it starts in this process, in
# place of the workspace's (a deployment's runs read the workspace's)
_runner: ContextVar[TaskRunnerSpec | None] = ContextVar("herald_task_runner", default=None)


def resolve_run_key(ws: Workspace, flow_name: str, run_key: str | None,
                    flow_run: FlowRun | None = None) -> str:
    """The run key of a flow run: the one given, else the scheduled time, else today.

    A run created by a schedule takes its scheduled time (minute precision, in the flow's
    time zone), so a retried or re-triggered scheduled run has the same key and the ledger
    sends nobody twice. Other runs default to today's date, as ``herald run`` does.
    """
    if run_key:
        return run_key
    if flow_run is not None and flow_run.auto_scheduled and flow_run.expected_start_time:
        return engine.scheduled_run_key(ws, flow_name, flow_run.expected_start_time)
    return engine.default_run_key(ws, flow_name)


def _not_before_scheduled_time(flow_run: FlowRun | None, limit: float = 60.0) -> None:
    """Wait for the scheduled time when a runner started the run a little early.

    Runners fetch runs a few seconds ahead; a quiet-hours follow-up started 0.3 s before
    the window ends would find everyone still inside it and defer them once more.
    """
    if flow_run is None or flow_run.expected_start_time is None:
        return
    early = flow_run.expected_start_time.timestamp() - datetime.now(UTC).timestamp()
    if 0 < early <= limit:
        time.sleep(early)


def _run_name() -> str:
    ctx = FlowRunContext.get()
    assert ctx is not None and ctx.parameters is not None
    params = ctx.parameters
    try:
        ws = chunks.workspace_at(params["workspace"])
        with clock.using(_clock_of(params.get("now"))):
            key = resolve_run_key(ws, params["flow_name"], params.get("run_key"),
                                  ctx.flow_run)
    except Exception:  # the run itself reports the problem, in one line
        key = params.get("run_key") or "?"
    return f"{params['flow_name']}/{key}"


def _clock_of(now: str | None) -> clock.Clock | None:
    """The ``now`` parameter (a rehearsal of a deployment): a clock set to it, or None."""
    return clock.Clock(clock.parse(now)) if now else None


def run_tags(ws: Workspace, flow_name: str) -> list[str]:
    """Tags of a flow's runs in the UI: the flow, its segment and its channels."""
    spec = ws.flow(flow_name)
    return ["herald", f"flow:{flow_name}", f"segment:{spec.audience.segment}",
            *(f"channel:{c}" for c in spec.channel_names())]


@flow(name="herald-campaign", flow_run_name=_run_name, log_prints=False,
      validate_parameters=False)
def campaign(workspace: str, flow_name: str, run_key: str | None = None,
             params: dict[str, Param] | None = None, dry_run: bool = False,
             now: str | None = None, resend_render_errors: bool = False) -> dict[str, Any]:
    """Run one campaign: build its audience, send chunk by chunk, report.

    ``now`` (ISO 8601) sets Herald's clock for this run, e.g. a rehearsal with --dry-run.
    ``resend_render_errors``: after a template fix, the run key's ``render_error`` rows
    are forgotten and those recipients decided and sent afresh.
    """
    with clock.using(_clock_of(now)), untagged_tasks():
        try:
            return _campaign(workspace, flow_name, run_key, params, dry_run,
                             resend_render_errors)
        except Exception as exc:
            if os.environ.get(DEBUG_ENV):
                raise  # `herald run --debug`: the traceback
            # One line in the logs (and in `herald serve`'s console) and the run's state
            # message, rather than a traceback an operator has to read through.
            detail = describe_exception(exc)
            get_run_logger().error("run of %s failed: %s", flow_name, detail)
            return Failed(message=detail)  # type: ignore[return-value]


DEBUG_ENV = "HERALD_DEBUG"  # set by `herald --debug run`: failures raise with a traceback


def _campaign(workspace: str, flow_name: str, run_key: str | None,
              params: dict[str, Param] | None, dry_run: bool,
              resend_render_errors: bool = False) -> dict[str, Any]:
    logger = get_run_logger()
    started = clock.now()
    ws = chunks.workspace_at(workspace)
    ctx = FlowRunContext.get()
    key = resolve_run_key(ws, flow_name, run_key, ctx.flow_run if ctx else None)
    _not_before_scheduled_time(ctx.flow_run if ctx else None)
    if resend_render_errors and not dry_run:
        released = ledger.release_render_errors(ws.store, flow_name, key)
        logger.info("%d recipients of %s %s whose message failed to render: deciding and "
                    "sending again", released, flow_name, key)
    # released render errors are work to do, though no row of the key is open any more;
    # an early build comes of a command that checked this a moment ago
    done = None if (dry_run or resend_render_errors or _early_build(
        flow_name, dict(params or {}), key, dry_run)) else engine.nothing_to_do(
        ws, flow_name, key)
    if done is not None:
        logger.info("%s", done["message"])
        return done
    built = build_audience(ws, flow_name, dict(params or {}), key, dry_run,
                           return_state=True)
    if built.is_failed():
        # An operator's mistake (a duplicate key, a failing query): the run fails with the
        # message that names the file, without a traceback in the logs.
        _emit_failed(flow_name, key, None, built.message or "the audience build failed")
        return Failed(message=built.message)  # type: ignore[return-value]
    prepared = cast(engine.Prepared, built.result())
    figures = live.Progress(flow_name, key, prepared.run_id, len(prepared.chunks),
                            prepared.package.size, dry_run)
    progress = cast(UUID, create_progress_artifact(
        0.0, key=artifact_key(flow_name, "progress"), description=figures.headline()))
    table = cast(UUID, create_markdown_artifact(
        key=artifact_key(flow_name, "sending"), markdown=figures.markdown(),
        description=f"Sending {flow_name} {key}: figures as chunks finish"))
    publisher = _Publisher(progress, table, figures)
    live.notify("begin", figures)
    results: list[chunks.ChunkResult] = []
    try:
        with engine.stop_on_signals(), workers.chunk_runner(
                _runner.get() or ws.config.task_runner, prepared.run_id, chunks.run_chunk):
            for job, result in _send_all(prepared.chunks, ws.config.max_workers):
                results.append(result)
                line = figures.add(job, result)
                logger.info("%s", line)
                publisher.chunk_done()
                live.notify("chunk", figures, line)
            engine.check_stopped(prepared)  # a signal stopped it: fail, saying how to resume
            engine.check_channels(ws, prepared)  # a channel could not work: likewise
    except BaseException as exc:
        publisher.flush_quietly()
        engine.fail(ws, prepared.run_id, exc)
        _emit_failed(flow_name, key, prepared.run_id, exc)
        raise
    publisher.flush()
    live.notify("end", figures)
    summary = engine.finish(ws, prepared, results, started)
    failures = [] if dry_run else runs.failure_reasons(ws, flow_name, key, prepared.run_id)
    create_markdown_artifact(
        key=artifact_key(flow_name, "delivery"),
        description=f"Deliveries of {flow_name} {key} ({prepared.run_id})",
        markdown=delivery_markdown(summary, failures))
    for failure in failures[:3]:
        logger.warning("%s failed on %s: %s (code %s)", f"{failure['count']:,}",
                       failure["channel"], failure["reason"], failure["code"])
    if summary.get("deferred_until"):
        _follow_up(flow_name, key, dict(params or {}), summary["deferred_until"])
    _emit_finished(ws, summary)
    if not dry_run:  # write-back and the conversion report once its window closes
        from herald.flows.conversion_report import after_run

        try:
            after_run(ws, summary, logger)
        except HeraldError as exc:  # a failed write-back: the run fails, loudly
            engine.fail(ws, prepared.run_id, exc)
            _emit_failed(flow_name, key, prepared.run_id, exc)
            raise
    logger.info("run %s finished: %s", prepared.run_id,
                ", ".join(f"{s}={n}" for s, n in summary["deliveries"].items() if n) or "nothing")
    return summary


# The progress artifacts are written at most this often while chunks finish (seconds),
# and always once the last chunk is counted: two API calls per chunk cost the Prefect
# server about 15 ms of CPU each time, 1.5 s of a 100-chunk run (BENCHMARKS.md).
PUBLISH_EVERY = 2.0


class _Publisher:
    """Writes a run's figures into its progress and sending artifacts: the first chunk's
    at once, then at most every PUBLISH_EVERY seconds, and the last figures always (on
    success through ``flush``; when the run fails, as far as they got)."""

    def __init__(self, progress: UUID, table: UUID, figures: live.Progress) -> None:
        self.progress, self.table, self.figures = progress, table, figures
        self.shown = -1  # chunks counted in what the artifacts show (-1: not written yet)
        self.at = 0.0  # time.monotonic() of the last write

    def chunk_done(self) -> None:
        figures = self.figures
        if (self.shown < 0 or figures.done == figures.chunks
                or time.monotonic() - self.at >= PUBLISH_EVERY):
            self._write()

    def flush(self) -> None:
        if self.shown != self.figures.done:
            self._write()

    def flush_quietly(self) -> None:
        """``flush`` when the run is failing: a server that cannot take the figures must
        not hide why the run failed."""
        try:
            self.flush()
        except Exception as exc:
            get_run_logger().warning("the progress artifacts could not be updated: %s", exc)

    def _write(self) -> None:
        figures = self.figures
        update_progress_artifact(self.progress, figures.percent,
                                 description=figures.headline())
        with get_client(sync_client=True) as client:
            client.update_artifact(self.table, ArtifactUpdate(data=figures.markdown()))
        self.shown, self.at = figures.done, time.monotonic()


def _send_all(jobs: list[chunks.ChunkJob], workers: int
              ) -> Iterator[tuple[chunks.ChunkJob, chunks.ChunkResult]]:
    """Send chunks with at most ``workers`` in flight, yielding results as they finish.

    Bounding the submissions here (not in the task runner's constructor) keeps the
    workspace's ``max_workers`` in force however the flow was started: ``herald run``,
    ``herald serve`` or a worker.
    """
    waiting = list(reversed(jobs))
    running: dict[PrefectFuture[chunks.ChunkResult], chunks.ChunkJob] = {}

    def fill() -> None:
        while waiting and len(running) < workers and not stop_requested():
            job = waiting.pop()
            running[send_chunk.submit(job)] = job

    while waiting or running:
        fill()
        if not running:
            return  # stopping: chunks not started are left for the rerun
        done = next(as_completed(list(running)))
        finished = running.pop(done), done.result()
        fill()  # the next chunk starts before the caller reports this one
        yield finished


def failure_rate(deliveries: dict[str, int]) -> float:
    """Failed over attempted (sent + failed); 0 when nothing was attempted."""
    attempted = deliveries.get("sent", 0) + deliveries.get("failed", 0)
    return deliveries.get("failed", 0) / attempted if attempted else 0.0


def _resource(flow_name: str, run_key: str, run_id: str | None) -> dict[str, str]:
    return {"prefect.resource.id": f"herald.flow.{flow_name}",
            "prefect.resource.name": flow_name,
            "herald.run-key": run_key, "herald.run-id": run_id or ""}


def _emit_finished(ws: Workspace, summary: dict[str, Any]) -> None:
    """One event per finished run with its counts; an alert event past a threshold."""
    if summary["dry_run"]:
        return
    deliveries = {s: n for s, n in summary["deliveries"].items() if n}
    rate = failure_rate(deliveries)
    resource = _resource(summary["flow"], summary["run_key"], summary["run_id"])
    payload = {"deliveries": deliveries, "failure_rate": round(rate, 4),
               "recipients": summary["package"]["size"], "package": summary["package"]["id"],
               "duration_seconds": summary["duration_seconds"]}
    emit_event(event="herald.run.completed", resource=resource, payload=payload)
    alerts = ws.flow(summary["flow"]).alerts or ws.config.alerts
    if alerts.failure_rate is not None and rate > alerts.failure_rate:
        get_run_logger().warning("failure rate %.1f%% is above the alert threshold %.1f%%",
                                 100 * rate, 100 * alerts.failure_rate)
        emit_event(event="herald.run.alert", resource=resource,
                   payload={**payload, "threshold": alerts.failure_rate,
                            "reason": f"failure rate {rate:.1%} above "
                                      f"{alerts.failure_rate:.1%}"})


def _emit_failed(flow_name: str, run_key: str, run_id: str | None,
                 error: BaseException | str) -> None:
    detail = error if isinstance(error, str) else describe_exception(error)
    emit_event(event="herald.run.failed", resource=_resource(flow_name, run_key, run_id),
               payload={"error": detail})


def task_runner(spec: TaskRunnerSpec) -> TaskRunner[Any]:
    """The Prefect task runner for ``spec``: threads, or a Dask cluster (local or not).
    With ``processes`` the chunk tasks run in threads too, each handing its chunk to the
    run's worker processes (herald.delivery.workers)."""
    if spec.type in ("threads", "processes"):
        return ThreadPoolTaskRunner()
    from prefect_dask import DaskTaskRunner

    if spec.address:
        return DaskTaskRunner(address=spec.address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": spec.workers, "processes": True,
                                          "threads_per_worker": 1,
                                          "dashboard_address": ":0"})  # any free port


def run(ws: Workspace, flow_name: str, params: dict[str, Param] | None, run_key: str | None,
        dry_run: bool, runner: TaskRunnerSpec | None = None,
        resend_render_errors: bool = False, early: engine.EarlyBuild | None = None
        ) -> dict[str, Any]:
    """Run the campaign flow here and now (``herald run``), tagged like a deployment's;
    ``early``: its audience, built already (``engine.build_early``)."""
    chunks.adopt_workspace(ws)
    configured = campaign.with_options(task_runner=task_runner(runner or ws.config.task_runner))
    chosen, handed = _runner.set(runner), _early.set(early)
    try:
        with tags(*run_tags(ws, flow_name)):
            state = configured(str(ws.root), flow_name, run_key, params or {}, dry_run,
                               resend_render_errors=resend_render_errors, return_state=True)
    finally:
        _early.reset(handed)
        _runner.reset(chosen)
        if early is not None:
            early.close_unused(ws, "the flow run ended before its build task took the "
                               "audience built for it")
    if state.is_failed():
        outcome = state.result(raise_on_failure=False)
        if isinstance(outcome, BaseException) and not isinstance(outcome, FailedRun):
            raise outcome  # unexpected: the CLI shows its type (--debug, its traceback)
        raise RunError(state.message or f"run of {flow_name} failed")
    return cast(dict[str, Any], state.result())


DASK_ADDRESS_ENV = "HERALD_DASK_ADDRESS"
DASK_WORKERS_ENV = "HERALD_DASK_WORKERS"


def __getattr__(name: str) -> Any:
    # ``herald.flows.campaign.campaign_dask``: the entrypoint of deployments whose
    # workspace runs chunks on Dask. Built on first use, so that importing this module
    # does not import Dask; the cluster comes from the environment of the process that
    # executes the run (set by `herald serve`, or by `herald deploy` as job variables).
    if name == "campaign_dask":
        spec = TaskRunnerSpec(type="dask", address=os.environ.get(DASK_ADDRESS_ENV) or None,
                              workers=int(os.environ.get(DASK_WORKERS_ENV) or 2))
        return campaign.with_options(task_runner=task_runner(spec))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _follow_up(flow_name: str, run_key: str, params: dict[str, Param], when: str) -> None:
    """Schedule the run that sends deferred recipients once their quiet hours end or the
    provider's back-off is over.

    From a deployment (``herald serve`` / ``herald deploy``) the same deployment gets a
    flow run at that time with the same run key; without one there is nothing to
    schedule on, so the log says which command to run.
    """
    from prefect.runtime import deployment

    logger = get_run_logger()
    if not deployment.id:
        # `herald run`'s summary says so itself (a deployment's run has no such summary)
        logger.warning("recipients deferred (quiet hours or a provider's back-off) until "
                       "%s: run `herald run %s "
                       "--run-key %s` after that time to send them", when, flow_name, run_key,
                       extra={"ui_only": True})
        return
    from prefect.deployments import run_deployment

    run_deployment(name=deployment.id, parameters={**deployment.parameters,
                                                   "run_key": run_key},
                   scheduled_time=datetime.fromisoformat(when), timeout=0,
                   as_subflow=False)
    logger.info("follow-up run of %s (%s) scheduled for %s", flow_name, run_key, when)
