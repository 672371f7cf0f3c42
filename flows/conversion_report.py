"""The conversion report as a Prefect flow, run once a campaign's attribution window closes.

``herald-conversion-report`` computes a run key's conversions (``herald.reporting.conversions``),
publishes them as artifacts (``herald-FLOW-conversions``: the Markdown summary, with the
per-variant results of content experiments;
``herald-FLOW-conversions-by-tier``: a table) and writes them back to the source database
when the workspace asks for it.

Nothing sleeps for a week: when a campaign runs from a deployment, ``after_run`` schedules
a flow run of the ``herald-conversion-report/conversion-report`` deployment at the moment
the last recipient's window closes. ``herald serve`` / ``herald deploy`` register that
deployment next to the campaign deployments (``deployment()`` builds it). Without a
deployment there is nothing to schedule on: the log names the ``herald report`` command
that computes it on demand.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from herald.core.workspace import Workspace
from herald.flows.artifacts import artifact_key
from herald.reporting import conversions, experiments, text

FLOW_NAME = "herald-conversion-report"
DEPLOYMENT_NAME = "conversion-report"


@flow(name=FLOW_NAME, flow_run_name="{flow_name}/{run_key}/conversions", log_prints=False,
      validate_parameters=False)
def conversion_report(workspace: str, flow_name: str, run_key: str) -> dict[str, Any]:
    """Compute, publish and (if configured) write back the conversions of a run key."""
    ws = Workspace.open(workspace)
    try:
        report = conversions.compute(ws, flow_name, run_key)
        tested = experiments.compute(ws, flow_name, run_key, report.converted)
        publish(report, tested)
        from herald.reporting.writeback import write_back

        written = write_back(ws, flow_name, run_key, report)
    finally:
        ws.dispose()
    total = report.total
    get_run_logger().info(
        "conversions of %s %s: contacted %d/%d, held out %d/%d, uplift %s%s", flow_name,
        run_key, total.contacted.converted, total.contacted.recipients,
        total.held_out.converted, total.held_out.recipients, text.describe_uplift(total),
        f"; written back: {written}" if written else "")
    return report.to_dict()


def publish(report: conversions.ConversionReport,
            tested: list[experiments.ExperimentReport] | None = None) -> None:
    """The report as a Markdown artifact (with the content experiments' results and
    verdicts, if any) and a table artifact, keyed by flow."""
    markdown = text.markdown(report)
    if tested:
        markdown += "\n" + text.experiments_markdown(tested)
    create_markdown_artifact(
        key=artifact_key(report.flow, "conversions"), markdown=markdown,
        description=f"Conversions of {report.flow} {report.run_key}")
    create_table_artifact(
        key=artifact_key(report.flow, "conversions-by-tier"),
        description=f"Conversions of {report.flow} {report.run_key} by tier",
        table=[_table_row(row) for row in [report.total, *report.tiers.values()]])


def _table_row(row: conversions.Row) -> dict[str, Any]:
    flat = row.flat()
    return {"tier": flat.pop("name"), **flat}


def deployment(work_pool: str | None = None) -> Any:
    """The deployment ``after_run`` schedules on; ``herald serve`` and ``herald deploy``
    register it beside the campaign deployments of flows that measure conversions."""
    from prefect.types.entrypoint import EntrypointType

    return conversion_report.to_deployment(
        name=DEPLOYMENT_NAME, work_pool_name=work_pool, tags=["herald"],
        entrypoint_type=EntrypointType.MODULE_PATH)


def after_run(ws: Workspace, summary: dict[str, Any],
              log: logging.Logger | logging.LoggerAdapter[Any]) -> None:
    """After a real campaign run: write the ledger back (if configured) and arrange for
    the conversions to be measured once the attribution window has closed."""
    from herald.reporting.writeback import write_back

    flow_name, run_key = summary["flow"], summary["run_key"]
    # A failed write-back fails the run (RunError): the messages are out and the ledger
    # holds them, but analysts would read stale tables without anyone noticing.
    write_back(ws, flow_name, run_key)
    if ws.flow(flow_name).conversion is None:
        return
    closes = conversions.window_closes(ws, flow_name, run_key)
    if closes is None:
        return
    from prefect.runtime import deployment as current

    if not current.id:
        log.info("conversions of %s %s can be measured when the attribution window closes "
                 "at %s: run `herald report %s`", flow_name, run_key,
                 f"{closes:%Y-%m-%d %H:%M} UTC", summary["run_id"])
        return
    schedule(ws, flow_name, run_key, closes, log)


def schedule(ws: Workspace, flow_name: str, run_key: str, when: datetime,
             log: logging.Logger | logging.LoggerAdapter[Any]) -> None:
    """A flow run of the conversion-report deployment at ``when``."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    name = f"{FLOW_NAME}/{DEPLOYMENT_NAME}"
    try:
        run_deployment(name=name, parameters={"workspace": str(ws.root),
                                              "flow_name": flow_name, "run_key": run_key},
                       scheduled_time=when, timeout=0, as_subflow=False,
                       flow_run_name=f"{flow_name}/{run_key}/conversions",
                       # a rerun of the run key schedules again only if the window moved
                       idempotency_key=f"{flow_name}/{run_key}/{when.isoformat()}")
    except ObjectNotFound:
        log.warning("no deployment %s to schedule the conversion report on: serve it with "
                    "the campaigns, or run `herald report %s` after %s", name, flow_name,
                    f"{when:%Y-%m-%d %H:%M} UTC")
        return
    log.info("conversion report of %s %s scheduled for %s", flow_name, run_key,
             f"{when:%Y-%m-%d %H:%M} UTC")
