"""Flows as Prefect deployments: ``herald serve`` and ``herald deploy``.

Each Herald flow becomes one deployment of the ``herald-campaign`` Prefect flow, named
after the Herald flow (``herald-campaign/winback``), with the flow's YAML schedules, its
tags and its parameters. Deployments are upserted by name and schedules carry a slug, so
serving or deploying again after a YAML change updates the deployment in place.

The entrypoint is the module path ``herald.flows.campaign.campaign``: whoever executes a
run (the serving process, or a worker of a work pool) needs Herald installed and the
workspace folder at the same path, nothing else.
"""

from __future__ import annotations

import hashlib
import os
import threading
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

from herald.core.errors import ConfigError, Problem
from herald.core.schedules import ScheduleSpec
from herald.core.workspace import Workspace
from herald.flows.schedules import prefect_schedule
from herald.flows.validate import check_flow

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment
    from prefect.schedules import Schedule


def schedule(ws: Workspace, flow_name: str, index: int, spec: ScheduleSpec) -> Schedule:
    """A flow's schedule entry as Prefect's schedule (the flow's zone by default)."""
    parameters: dict[str, Any] = {"params": dict(spec.params)} if spec.params else {}
    return prefect_schedule(spec, spec.timezone or ws.timezone(ws.flow(flow_name)),
                            f"{flow_name}-{spec.name or index}", parameters)


def deployment(ws: Workspace, flow_name: str, work_pool: str | None = None
               ) -> RunnerDeployment:
    """The deployment of one Herald flow, checked first like ``herald validate``."""
    from prefect.types.entrypoint import EntrypointType

    from herald.flows.campaign import campaign, run_tags

    check_flow(ws, flow_name)
    spec = ws.flow(flow_name)
    flow_file = ws.root / ws.flow_file(flow_name)
    version = hashlib.sha256(flow_file.read_bytes()).hexdigest()[:12]
    dep: RunnerDeployment = campaign.to_deployment(  # type: ignore[assignment]
        name=flow_name,
        schedules=[schedule(ws, flow_name, i, s) for i, s in enumerate(spec.schedules)],
        parameters={"workspace": str(ws.root), "flow_name": flow_name},
        description=spec.description or f"Herald flow {flow_name}",
        tags=run_tags(ws, flow_name),
        version=version,
        work_pool_name=work_pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
        job_variables={"env": dask_env(ws)} if dask_env(ws) else None,
    )
    if ws.config.task_runner.type == "dask":
        dep.entrypoint = "herald.flows.campaign.campaign_dask"
    return dep


def dask_env(ws: Workspace) -> dict[str, str]:
    """What the process executing a run needs to find the workspace's Dask cluster."""
    from herald.flows.campaign import DASK_ADDRESS_ENV, DASK_WORKERS_ENV

    spec = ws.config.task_runner
    if spec.type != "dask":
        return {}
    return {DASK_WORKERS_ENV: str(spec.workers),
            **({DASK_ADDRESS_ENV: spec.address} if spec.address else {})}


def _flows(ws: Workspace, names: list[str] | None) -> list[str]:
    known = ws.flow_names()
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        raise ConfigError([Problem(str(ws.not_found("flow", n))) for n in unknown])
    chosen = names or known
    if not chosen:
        raise ConfigError([Problem("no flows in config/flows/")])
    return chosen


def _flows_and_journeys(ws: Workspace, names: list[str] | None
                        ) -> tuple[list[str], list[str]]:
    """The flows and the journeys (``config/journeys``) named, or all of both."""
    from herald.journeys.load import names as journey_names

    every = journey_names(ws)
    journeys = [n for n in names if n in every] if names else every
    flows = [n for n in names if n not in every] if names else None
    if flows or not journeys:
        return _flows(ws, flows), journeys
    return (ws.flow_names() if names is None else []), journeys


def journey_deployment(ws: Workspace, name: str, work_pool: str | None = None
                       ) -> RunnerDeployment:
    """A journey's deployment ``herald-journey/NAME`` (its ticks, on its schedules)."""
    from herald.flows.journey import deployment as make

    return make(ws, name, work_pool)


def register(dep: RunnerDeployment, work_pool: str | None = None) -> UUID:
    """Create or update ``dep`` on the server; drop schedules no longer in the YAML.

    Prefect upserts schedules by slug but keeps the ones a new list leaves out, so a
    schedule removed from the YAML would go on firing without this.
    """
    from prefect.client.orchestration import get_client

    deployment_id = cast(UUID, dep.apply(work_pool_name=work_pool))  # sync here
    wanted = {s.slug for s in dep.schedules or []}
    with get_client(sync_client=True) as client:
        for existing in client.read_deployment_schedules(deployment_id):
            if existing.slug not in wanted:
                client.delete_deployment_schedule(deployment_id, existing.id)
    return deployment_id


def serve(ws: Workspace, names: list[str] | None = None, limit: int | None = None) -> None:
    """Serve the flows as deployments in this process until it is stopped."""
    from prefect import serve as prefect_serve

    chosen, journeys = _flows_and_journeys(ws, names)
    deployments = [deployment(ws, name) for name in chosen]
    deployments += [journey_deployment(ws, name) for name in journeys]
    if any(ws.flow(name).conversion for name in chosen):
        from herald.flows.conversion_report import deployment as report_deployment

        deployments.append(report_deployment())  # runs when attribution windows close
    os.environ.update(dask_env(ws))  # runs execute in subprocesses of this one
    ids = {register(dep): name for dep, name in zip(deployments, chosen, strict=False)}
    namer = threading.Thread(target=_name_scheduled_runs, args=(ws, ids), daemon=True,
                             name="herald-run-names")
    namer.start()
    prefect_serve(*deployments, limit=limit, print_starting_message=True)


def scheduled_run_name(ws: Workspace, flow_name: str, expected: datetime) -> str:
    """``FLOW/RUN_KEY`` of a run created by a schedule: its key is the scheduled time in
    the flow's time zone (as the run resolves it when it starts)."""
    from herald.flows.engine import scheduled_run_key

    return f"{flow_name}/{scheduled_run_key(ws, flow_name, expected)}"


def _name_scheduled_runs(ws: Workspace, deployments: dict[UUID, str],
                         every: float = 15.0) -> None:
    """Give the runs Prefect's scheduler creates their ``FLOW/RUN_KEY`` names while they
    wait, so the deployment's upcoming runs read like the runs they become (the
    scheduler names them at random; the flow renames a run only when it starts)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    while True:
        try:
            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(
                        any_=list(deployments))),
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
                    limit=200)
                for run in runs:
                    flow = deployments.get(run.deployment_id) if run.deployment_id else None
                    if flow is None or not run.auto_scheduled or not run.expected_start_time:
                        continue
                    name = scheduled_run_name(ws, flow, run.expected_start_time)
                    if run.name != name:
                        client.update_flow_run(run.id, name=name)
        except Exception:  # noqa: S110 - naming is cosmetic; the next pass tries again
            pass
        time.sleep(every)


def deploy(ws: Workspace, pool: str, names: list[str] | None = None) -> list[str]:
    """Register the flows on the Prefect server for the workers of work pool ``pool``."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            raise ConfigError([Problem(f"work pool '{pool}' not found on the Prefect server "
                                       f"(create it: prefect work-pool create {pool} "
                                       "--type process)")]) from None
    ids = []
    chosen, journeys = _flows_and_journeys(ws, names)
    for name in chosen:
        ids.append(str(register(deployment(ws, name, work_pool=pool), pool)))
    for name in journeys:
        ids.append(str(register(journey_deployment(ws, name, work_pool=pool), pool)))
    if any(ws.flow(name).conversion for name in chosen):
        from herald.flows.conversion_report import deployment as report_deployment

        register(report_deployment(pool), pool)
    return ids
