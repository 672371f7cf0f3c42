"""The conversion report as a Prefect flow: artifacts, and the follow-up a campaign run
from a deployment schedules for when the attribution window closes."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    DeploymentFilter,
    DeploymentFilterName,
)

from herald.flows import campaign, conversion_report
from herald.reporting import conversions

from .test_report import recorded_run
from .test_results import FILES, ORDERS, write_orders

pytestmark = pytest.mark.prefect


def artifacts(key: str):
    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    return asyncio.run(read())


def test_report_flow_publishes_the_summary(make_workspace, prefect_harness) -> None:
    ws = make_workspace(FILES)
    write_orders(ws, ORDERS)
    recorded_run(ws, "art-1")
    data = conversion_report.conversion_report(str(ws.root), "promo", "art-1")
    assert data["total"]["contacted"]["converted"] == 6
    (summary,) = [a for a in artifacts("herald-promo-conversions")
                  if "art-1" in (a.description or "")]
    assert "# Conversions: promo (art-1)" in summary.data
    assert "| gold | 10 | 4 | 40.00% | 5 | 1 | 20.00% | +20.00 pp [-28.36, +53.07] " \
           "(+100.00%) | 290.00 | 60.00 |" in summary.data
    assert "no held-out recipients: uplift cannot be measured" in summary.data
    (table,) = [a for a in artifacts("herald-promo-conversions-by-tier")
                if "art-1" in (a.description or "")]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["tier"] for r in rows] == ["all", "gold", "silver", "bronze", "platinum"]
    assert rows[1]["contacted_converted"] == 4 and rows[1]["held_out_converted"] == 1


def test_campaign_from_a_deployment_schedules_the_report(make_workspace, prefect_harness,
                                                          monkeypatch) -> None:
    ws = make_workspace(FILES, rows=60)
    write_orders(ws, [])
    deployment_id = conversion_report.deployment().apply()
    # as if this campaign run came from a deployment (Prefect's documented runtime mock)
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID",
                       "00000000-0000-0000-0000-000000000001")
    summary = campaign.run(ws, "promo", None, "dep-1", False)
    assert summary["deliveries"]["held_out"] > 0
    closes = conversions.window_closes(ws, "promo", "dep-1")
    assert closes is not None

    async def scheduled():
        async with get_client() as client:
            return await client.read_flow_runs(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=[conversion_report.DEPLOYMENT_NAME])))

    (run,) = [r for r in asyncio.run(scheduled()) if r.parameters.get("run_key") == "dep-1"]
    assert run.deployment_id == deployment_id
    assert run.state.is_scheduled()
    assert abs(run.expected_start_time - closes) < timedelta(seconds=1)
    assert run.parameters == {"workspace": str(ws.root), "flow_name": "promo",
                              "run_key": "dep-1"}
    assert run.name == "promo/dep-1/conversions"


def test_campaign_without_a_deployment_schedules_nothing(make_workspace, prefect_harness,
                                                         caplog) -> None:
    ws = make_workspace(FILES, rows=30)
    write_orders(ws, [])
    with caplog.at_level("INFO"):
        summary = campaign.run(ws, "promo", None, "nodep-1", False)
    assert f"run `herald report {summary['run_id']}`" in caplog.text
