"""A journey tick as a Prefect flow run: one task per chunk of enrollments, bounded in
flight, a funnel artifact; the deployment carries the journey's schedule."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)

from herald.core import clock
from herald.flows import journey as journey_flow

from .helpers import JOURNEY_FILES, JOURNEY_START, crm_events, hooked_workspace

pytestmark = pytest.mark.prefect

WAITING = """\
name: slow
entry: {source: crm, segment: nudge_entry, params: {min_score: 0}, key: id}
chunk_size: 100
schedules: [{cron: "0 * * * *", timezone: Asia/Shanghai}]
steps:
  settle: {type: wait, for: 1d, next: cohort}
  cohort:
    type: split
    cohorts:
      holdout: {weight: 20, holdout: true}
      rest: {weight: 80, next: bye}
  bye: {type: exit, reason: done}
"""


def _tasks(flow_run_id):
    async def read():
        async with get_client() as client:
            run = await client.read_flow_run(flow_run_id)
            tasks = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        return run, tasks, artifacts

    return asyncio.run(read())


def test_a_tick_is_one_flow_run_with_one_task_per_chunk(make_workspace, prefect_harness):
    ws = make_workspace({**JOURNEY_FILES, "config/journeys/slow.yaml": WAITING}, rows=1000)
    crm_events(ws)
    with clock.using(clock.Clock(JOURNEY_START, frozen=True)):
        first = journey_flow.run(ws, "slow")
        clock.advance(timedelta(days=1, minutes=1))
        second = journey_flow.run(ws, "slow")
    assert first["entered"] == 1000 and first["chunks"] == 10
    assert second["claimed"] == 1000 and second["chunks"] == 10
    assert sum(second["exits"].values()) == 1000 - second["steps"]["bye"]["completed"]

    async def runs():
        async with get_client() as client:
            return await client.read_flow_runs(flow_run_filter=FlowRunFilter())
    slow = [r for r in asyncio.run(runs()) if r.name == "slow" and "journey:slow" in r.tags
            and r.parameters.get("workspace") == str(ws.root)]
    assert len(slow) == 2
    latest = max(slow, key=lambda r: r.start_time or r.created)
    run, tasks, artifacts = _tasks(latest.id)
    assert run.state.is_completed()
    assert sorted(t.name for t in tasks) == [f"chunk-{i:04d}" for i in range(10)]
    assert all(t.tags == [] for t in tasks)  # the tags are the flow run's (see flows.artifacts)
    funnel = next(a for a in artifacts if a.key == "herald-journey-slow-funnel")
    assert "exited: holdout" in str(funnel.data)


def test_a_stopped_channel_fails_the_flow_run_after_its_funnel(make_workspace, peer,
                                                                prefect_harness):
    from herald.core.errors import RunError

    ws = hooked_workspace(make_workspace, peer)
    for key in map(str, range(1, 21)):  # the account suspended
        peer.script(key, ("status", 403))
    with clock.using(clock.Clock(JOURNEY_START, frozen=True)), pytest.raises(
            RunError, match=r"journey hooked: channel hook stopped \(HTTP 403 Forbidden: "
            r".*\): 18 message\(s\) not sent; .*herald journey tick hooked"):
        journey_flow.run(ws, "hooked")
    assert len(peer.requests) == 1

    async def runs():
        async with get_client() as client:
            return await client.read_flow_runs(flow_run_filter=FlowRunFilter())
    (mine,) = [r for r in asyncio.run(runs()) if r.name == "hooked"
               and r.parameters.get("workspace") == str(ws.root)]
    run, _, artifacts = _tasks(mine.id)
    assert run.state.is_failed()
    funnel = next(a for a in artifacts if a.key == "herald-journey-hooked-funnel")
    assert "later" in str(funnel.data)


def test_the_deployment_has_the_journeys_schedule(make_workspace):
    ws = make_workspace({**JOURNEY_FILES, "config/journeys/slow.yaml": WAITING}, rows=10)
    crm_events(ws)
    dep = journey_flow.deployment(ws, "slow")
    assert dep.name == "slow" and dep.entrypoint and "herald.flows.journey" in dep.entrypoint
    (sched,) = dep.schedules
    assert sched.schedule.cron == "0 * * * *"
    assert sched.schedule.timezone == "Asia/Shanghai"
    assert dep.parameters == {"workspace": str(ws.root), "journey_name": "slow"}


def test_a_hundred_thousand_enrollments_advance_in_chunks(make_workspace, prefect_harness):
    ws = make_workspace({**JOURNEY_FILES, "config/journeys/slow.yaml": WAITING.replace(
        "chunk_size: 100", "chunk_size: 5000")}, rows=100_000)
    crm_events(ws)
    with clock.using(clock.Clock(JOURNEY_START, frozen=True)):
        first = journey_flow.run(ws, "slow")
        clock.advance(timedelta(days=1, minutes=1))
        second = journey_flow.run(ws, "slow")
    assert first["entered"] == 100_000 and first["claimed"] == 100_000
    assert first["chunks"] == 20 and second["chunks"] == 20
    assert second["steps"]["settle"] == {"waited": 100_000}
    assert second["exits"]["holdout"] + second["steps"]["bye"]["completed"] == 100_000

    async def runs():
        async with get_client() as client:
            return await client.read_flow_runs(flow_run_filter=FlowRunFilter())
    mine = [r for r in asyncio.run(runs()) if r.name == "slow"
            and r.parameters.get("workspace") == str(ws.root)]
    assert len(mine) == 2
    for run in mine:
        _, tasks, _ = _tasks(run.id)
        assert sorted(t.name for t in tasks) == [f"chunk-{i:04d}" for i in range(20)]


def test_serve_and_deploy_take_flows_and_journeys(make_workspace):
    from herald.core.errors import ConfigError
    from herald.flows import deploy
    from herald.journeys import load

    ws = make_workspace({**JOURNEY_FILES, "config/journeys/slow.yaml": WAITING}, rows=10)
    assert deploy._flows_and_journeys(ws, None) == (["promo"], ["nudge", "slow"])
    assert deploy._flows_and_journeys(ws, ["slow"]) == ([], ["slow"])
    assert deploy._flows_and_journeys(ws, ["promo", "slow"]) == (["promo"], ["slow"])
    with pytest.raises(ConfigError, match="unknown flow 'nope'"):
        deploy._flows_and_journeys(ws, ["nope"])
    clash = make_workspace({**JOURNEY_FILES, "config/journeys/promo.yaml": WAITING.replace(
        "name: slow", "name: promo")}, rows=10, folder="clash")
    with pytest.raises(ConfigError, match=r"promo.yaml:1 name: a flow is also named 'promo'"):
        load.load(clash, "promo")


def test_a_prefect_tick_from_the_command_line_without_a_server(make_workspace, tmp_path):
    """`herald journey tick --prefect` in a fresh process with no Prefect server: the
    temporary server it starts as it starts serves the tick's flow run, and is gone
    with the command."""
    import json
    import os
    import subprocess
    import sys

    ws = make_workspace(JOURNEY_FILES, rows=30)
    crm_events(ws)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    herald = os.path.join(os.path.dirname(sys.executable), "herald")
    proc = subprocess.run([herald, "-w", str(ws.root), "--now", JOURNEY_START.isoformat(),
                           "journey", "tick", "nudge", "--prefect", "--json"],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["entered"] == 30 and set(summary["exits"]) == {"holdout"}
    assert sum(summary["steps"]["first"].values()) + summary["exits"]["holdout"] == 30
    assert (tmp_path / "prefect-home" / "prefect.db").exists()  # its runs were kept there
