"""The Prefect flow of a journey tick: a thin wiring of ``herald.journeys.engine``.

One flow run per tick of ``herald-journey``, named ``JOURNEY/TICK``; one task run per
chunk of claimed enrollments (never per recipient), at most ``max_workers`` at once; a
funnel artifact of where everyone is after the tick. ``deployment`` makes one deployment
per journey with the journey's schedules, which ``herald serve`` / ``herald deploy``
register beside the flows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

from prefect import flow, get_run_logger, tags, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed

from herald.core import clock
from herald.core.errors import RunError
from herald.core.schedules import ScheduleSpec
from herald.core.workspace import Workspace
from herald.core.workspace import adopt as adopt_workspace
from herald.core.workspace import shared as workspace_at
from herald.delivery import workers
from herald.delivery.dispatch import stop_requested
from herald.flows.artifacts import artifact_key, in_run_workers, untagged_tasks
from herald.flows.engine import stop_on_signals
from herald.flows.schedules import prefect_schedule
from herald.journeys import engine, load, report
from herald.journeys.chunks import ChunkJob, ChunkResult
from herald.journeys.entry import SKIPPED_HINT

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment
    from prefect.schedules import Schedule


@task(name="journey-chunk", task_run_name="chunk-{job.index:04d}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=5)
def advance_chunk(job: ChunkJob) -> ChunkResult:
    # A retried chunk is safe: its leases were released, the ledger holds what was sent.
    return in_run_workers(job.tick, engine.run_chunk, job)


@flow(name="herald-journey", flow_run_name="{journey_name}", log_prints=False,
      validate_parameters=False)
def journey(workspace: str, journey_name: str, now: str | None = None,
            enter: bool = True) -> dict[str, Any]:
    """One tick: enter, claim chunks, move everyone who can move, report; fails after
    that when a signal stopped it or a channel stopped (``engine.check``)."""
    with clock.using(clock.Clock(clock.parse(now)) if now else None), untagged_tasks():
        logger = get_run_logger()
        ws = workspace_at(workspace)
        prepared = engine.prepare(ws, journey_name, enter)
        logger.info("journey %s tick %s: %d entered, %d to look at in %d chunks",
                    journey_name, prepared.tick, prepared.entered, prepared.live,
                    len(prepared.chunks))
        if prepared.skipped:
            logger.warning("journey %s: entry rows not entered: %s (%s)", journey_name,
                           prepared.skipped, SKIPPED_HINT)
        # SIGTERM (a cancelled flow run, a stopping worker): no new batch, as for a run
        with stop_on_signals(), workers.chunk_runner(ws.config.task_runner, prepared.tick,
                                                     engine.run_chunk):
            results = list(_advance_all(prepared.chunks, ws.config.max_workers))
            summary = engine.finish(ws, prepared, results)
            _funnel(ws, prepared, summary)
            logger.info("journey %s tick %s: %d looked at, moves %s, exits %s",
                        journey_name, prepared.tick, summary["claimed"],
                        {s: sum(o.values()) for s, o in summary["steps"].items()},
                        summary["exits"])
            engine.check(prepared, results)  # stopped, or a channel stopped: the run fails
        return summary


def _funnel(ws: Workspace, prepared: engine.Prepared, summary: dict[str, Any]) -> None:
    """The artifact of where everyone is after the tick."""
    name = prepared.journey
    state = report.status(ws, name)
    create_table_artifact(
        key=artifact_key(f"journey-{name}", "funnel"),
        description=f"Where everyone is in {name} after {prepared.tick}",
        table=[{"step": step, "active": n["active"], "waiting": n["waiting"],
                "moved this tick": sum(summary["steps"].get(step, {}).values())}
               for step, n in state["at_step"].items()]
        + [{"step": "completed", "active": state["completed"], "waiting": 0,
            "moved this tick": 0}]
        + [{"step": f"exited: {reason}", "active": n, "waiting": 0,
            "moved this tick": summary["exits"].get(reason, 0)}
           for reason, n in state["exited"].items()])


def _advance_all(chunks: list[ChunkJob], workers: int
                 ) -> Iterator[ChunkResult]:
    """Chunks with at most ``workers`` in flight (as flows.campaign._send_all)."""
    waiting = list(reversed(chunks))
    running: set[PrefectFuture[ChunkResult]] = set()
    while waiting or running:
        while waiting and len(running) < workers and not stop_requested():
            running.add(advance_chunk.submit(waiting.pop()))
        if not running:
            return  # stopping: chunks not started are left to the next tick
        done = next(as_completed(list(running)))
        running.discard(done)
        yield done.result()


def run(ws: Workspace, name: str, enter: bool = True) -> dict[str, Any]:
    """One tick as a Prefect flow run, here and now (``herald journey tick --prefect``)."""
    adopt_workspace(ws)
    now = clock.now().isoformat() if clock.current().is_set else None
    with tags("herald", f"journey:{name}"):
        state = journey(str(ws.root), name, now, enter, return_state=True)
    if state.is_failed():
        outcome = state.result(raise_on_failure=False)
        if isinstance(outcome, BaseException):
            raise outcome
        raise RunError(state.message or f"tick of journey {name} failed")
    return cast(dict[str, Any], state.result())


def schedule(ws: Workspace, name: str, index: int, spec: ScheduleSpec) -> Schedule:
    """A journey's schedule entry as Prefect's schedule (the journey's zone by default)."""
    zone = spec.timezone or load.load(ws, name).spec.timezone or ws.config.timezone
    return prefect_schedule(spec, zone, f"journey-{name}-{spec.name or index}")


def deployment(ws: Workspace, name: str, work_pool: str | None = None) -> RunnerDeployment:
    """The deployment ``herald-journey/NAME``, checked first like ``herald validate``."""
    from prefect.types.entrypoint import EntrypointType

    checked = load.check(ws, name)
    spec = checked.loaded.spec
    if any(s.params for s in spec.schedules):
        raise RunError(f"journey {name}: schedules take no params (set entry.params)")
    return cast("RunnerDeployment", journey.to_deployment(  # sync here
        name=name,
        schedules=[schedule(ws, name, i, s) for i, s in enumerate(spec.schedules)],
        parameters={"workspace": str(ws.root), "journey_name": name},
        description=spec.description or f"Herald journey {name}",
        tags=["herald", f"journey:{name}"],
        version=checked.loaded.version,
        work_pool_name=work_pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
    ))
