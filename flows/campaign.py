"""The Prefect flow of a campaign run: a thin wiring of ``herald.flows.engine``.

One flow run per campaign run, named ``<flow>/<run key>``; one task run to build the
audience package and one per chunk of recipients (never one per recipient); artifacts
for the audience summary, the delivery report and the sending progress.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from herald.channels.ledger import STATUSES
from herald.flows import engine
from herald.flows.spec import Scalar
from herald.flows.workspace import Workspace


def _artifact_key(flow_name: str, what: str) -> str:
    # artifact keys allow lowercase letters, digits and dashes only
    return f"herald-{flow_name.lower().replace('_', '-')}-{what}"


@task(name="build-audience", task_run_name="build-audience", cache_policy=NO_CACHE)
def build_audience(ws: Workspace, flow_name: str, params: dict[str, Scalar], run_key: str,
                   dry_run: bool) -> engine.Prepared:
    prepared = engine.prepare(ws, flow_name, params, run_key, dry_run)
    package = prepared.package
    get_run_logger().info("audience package %s: %d recipients in %d chunks (%s)",
                          package.id, package.size, len(prepared.chunks),
                          ", ".join(f"{t}={n}" for t, n in package.tiers.items()) or "empty")
    rows = "\n".join(f"| {tier} | {n} |" for tier, n in package.tiers.items())
    create_markdown_artifact(
        key=_artifact_key(flow_name, "audience"),
        description=f"Audience of {flow_name} {run_key}",
        markdown=(f"# Audience: {flow_name} ({run_key})\n\n"
                  f"- package: `{package.id}`\n- segment: `{package.segment}`\n"
                  f"- SQL sha256: `{package.sql_sha256}`\n- size: **{package.size}**\n"
                  f"- params: `{package.params}`\n\n| tier | recipients |\n|---|---|\n{rows}\n"))
    return prepared


@task(name="send-chunk", task_run_name="chunk-{job.index:04d}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=5)
def send_chunk(job: engine.ChunkJob) -> engine.ChunkResult:
    # A retried chunk is safe: the ledger holds who was already reserved or sent.
    return engine.run_chunk(job)


@flow(name="herald-campaign", flow_run_name="{flow_name}/{run_key}", log_prints=False,
      validate_parameters=False)
def campaign(workspace: str, flow_name: str, run_key: str,
             params: dict[str, Scalar] | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Run one campaign: build its audience, send chunk by chunk, report."""
    logger = get_run_logger()
    started = datetime.now(UTC)
    ws = Workspace.open(workspace)
    # Prefect's sync/async decorators confuse type checkers: these calls are synchronous.
    prepared = cast(engine.Prepared,
                    build_audience(ws, flow_name, dict(params or {}), run_key, dry_run))
    total = len(prepared.chunks)
    progress = cast(UUID, create_progress_artifact(
        0.0, key=_artifact_key(flow_name, "progress"),
        description=f"Sending {flow_name} {run_key}"))
    results: list[engine.ChunkResult] = []
    try:
        futures = [send_chunk.submit(job) for job in prepared.chunks]
        for done, future in enumerate(as_completed(futures), start=1):
            results.append(future.result())
            update_progress_artifact(progress, 100.0 * done / total)
    except BaseException as exc:
        engine.fail(ws, prepared.run_id, exc)
        raise
    if not total:
        update_progress_artifact(progress, 100.0)
    summary = engine.finish(ws, prepared, results, started)
    statuses = [s for s in STATUSES if any(row.get(s) for row in summary["by_channel"].values())
                or summary["deliveries"].get(s)]
    create_table_artifact(
        key=_artifact_key(flow_name, "delivery"),
        description=f"Deliveries of {flow_name} {run_key} ({prepared.run_id})",
        table=[{"channel": channel, **{s: row.get(s, 0) for s in statuses}}
               for channel, row in summary["by_channel"].items()]
        + [{"channel": "all", **{s: summary["deliveries"].get(s, 0) for s in statuses}}])
    if summary.get("deferred_until"):
        _follow_up(flow_name, run_key, dict(params or {}), summary["deferred_until"])
    if not dry_run:  # write-back and the conversion report once its window closes
        from herald.flows.conversion_report import after_run

        after_run(ws, summary, logger)
    logger.info("run %s finished: %s", prepared.run_id,
                ", ".join(f"{s}={n}" for s, n in summary["deliveries"].items() if n) or "nothing")
    return summary


def run(ws: Workspace, flow_name: str, params: dict[str, Scalar] | None, run_key: str,
        dry_run: bool) -> dict[str, Any]:
    """Run the campaign flow with a bounded thread pool for its chunks."""
    engine.adopt_workspace(ws)
    runner: Any = ThreadPoolTaskRunner(max_workers=ws.config.max_workers)
    configured = campaign.with_options(task_runner=runner)
    return configured(str(ws.root), flow_name, run_key, params or {}, dry_run)


def _follow_up(flow_name: str, run_key: str, params: dict[str, Scalar], when: str) -> None:
    """Schedule the run that sends deferred recipients once their quiet hours end.

    From a deployment (``herald serve`` / ``herald deploy``) the same deployment gets a
    flow run at that time with the same run key; without one there is nothing to
    schedule on, so the log says which command to run.
    """
    from prefect.runtime import deployment

    logger = get_run_logger()
    if not deployment.id:
        logger.warning("recipients deferred by quiet hours until %s: run `herald run %s "
                       "--run-key %s` after that time to send them", when, flow_name, run_key)
        return
    from prefect.deployments import run_deployment

    run_deployment(name=deployment.id, parameters={**deployment.parameters,
                                                   "run_key": run_key},
                   scheduled_time=datetime.fromisoformat(when), timeout=0,
                   as_subflow=False)
    logger.info("follow-up run of %s (%s) scheduled for %s", flow_name, run_key, when)
