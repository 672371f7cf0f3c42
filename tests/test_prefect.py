"""The campaign as a Prefect flow run: names, one task per chunk, artifacts."""

from __future__ import annotations

import asyncio

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterName,
)
from prefect.concurrency import _sync as prefect_sync

from herald.core.errors import RunError
from herald.flows import campaign

from .helpers import outbox_messages

pytestmark = pytest.mark.prefect


def flow_run(name: str):
    async def read():
        async with get_client() as client:
            (run,) = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
            tasks = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
                    any_=[run.id])))
        return run, tasks, artifacts

    return asyncio.run(read())


def test_one_flow_run_one_task_per_chunk_and_artifacts(make_workspace, prefect_harness,
                                                      monkeypatch) -> None:
    ws = make_workspace(rows=100)  # chunk_size 40: three chunks
    # A task run with tags first asks the server for tag concurrency slots (an API call
    # per chunk, limits or not): the tags stay on the flow run, its task runs have none
    asked: list[object] = []
    acquire = prefect_sync.acquire_concurrency_slots_with_lease
    monkeypatch.setattr(prefect_sync, "acquire_concurrency_slots_with_lease",
                        lambda names, *a, **k: asked.append(names) or acquire(names, *a, **k))
    summary = campaign.run(ws, "promo", None, "pf-1", False)
    assert summary["deliveries"]["sent"] == 98
    run, tasks, artifacts = flow_run("promo/pf-1")
    assert run.state.is_completed()
    assert set(run.tags) == {"herald", "flow:promo", "segment:people", "channel:email",
                             "channel:sms"}
    names = sorted(t.name for t in tasks)
    assert names == ["build-audience", "chunk-0000", "chunk-0001", "chunk-0002"]
    assert [t.tags for t in tasks] == [[]] * 4 and asked == []
    by_key = {a.key: a for a in artifacts}
    audience = by_key["herald-promo-audience"]
    assert summary["package"]["id"] in audience.data
    assert summary["package"]["sql_sha256"] in audience.data
    assert "| gold | 25 |" in audience.data
    delivery = by_key["herald-promo-delivery"].data  # Markdown: channels, tiers, failures
    assert "| **all** | **98** | **2** |" in delivery  # sent, no_address
    assert "## Per tier" in delivery and "| gold | " in delivery
    assert by_key["herald-promo-progress"].data == 100.0
    assert outbox_messages(ws) == 98


def test_failed_validation_fails_the_flow_run(make_workspace, prefect_harness) -> None:
    ws = make_workspace({"templates/promo/default.sms.txt.j2": "{{ nope }}"})
    with pytest.raises(RunError, match=r"templates/promo/default.sms.txt.j2:1: uses 'nope'"):
        campaign.run(ws, "promo", None, "pf-bad", False)
    run, _, _ = flow_run("promo/pf-bad")
    assert run.state.is_failed()
    assert "uses 'nope'" in (run.state.message or "")
    assert outbox_messages(ws) == 0
