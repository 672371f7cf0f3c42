"""Run views from the ledger: finding a run, its delivery report, who was contacted or
held out, and sends over time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, select

from herald.core.db import packages
from herald.core.errors import HeraldError, did_you_mean
from herald.core.workspace import Workspace
from herald.delivery import ledger, ledger_reads, run_records
from herald.reporting.conversions import _START, CONTACTED, HELD_OUT, utc

_d = ledger.deliveries


# -- the whole report of a run ----------------------------------------------------------
def find_run(ws: Workspace, run: str | None, dry_runs: bool = False) -> Any:
    """A run by id, else the latest run of the flow named ``run``, else the latest run
    (dry runs only when ``dry_runs``)."""
    if run:
        row = run_records.get_run(ws.store, run_id=run)
        if row is not None:
            return row
    for candidate in run_records.list_runs(ws.store, 200, flow=run or None):
        if dry_runs or not candidate.dry_run:
            return candidate
    if run and (run in ws.flow_names() or run in run_records.run_flows(ws.store)):
        raise HeraldError(f"flow '{run}' has no {'' if dry_runs else 'real '}runs yet"
                          + ("" if dry_runs else " (--dry-runs to report dry runs)"))
    if run:
        journeys = ws.journey_names()
        raise HeraldError(f"no run or flow '{run}'" + (did_you_mean(run, [
            *ws.flow_names(), *run_records.run_flows(ws.store),
            *(r.id for r in run_records.list_runs(ws.store, 200))]) or (
            f" ('{run}' is a journey: herald journey report {run})" if run in journeys
            else did_you_mean(run, journeys, "journey"))))
    raise HeraldError("no runs yet" if dry_runs else "no real runs yet (--dry-runs to "
                      "report dry runs)")


def run_report(ws: Workspace, row: Any) -> dict[str, Any]:
    """A run's delivery report from the ledger (``herald report --json`` without the
    conversions)."""
    summary = json.loads(row.summary) if row.summary else None
    counts = ledger_reads.run_counts(ws.store, row.id)
    if summary is not None:  # duplicates are counted in the summary, not in the ledger
        counts.deliveries["duplicate"] = summary["deliveries"].get("duplicate", 0)
    data = {"run_id": row.id, "flow": row.flow, "run_key": row.run_key,
            "status": row.status, "dry_run": row.dry_run,
            "package": summary["package"] if summary else _package(ws, row.package_id),
            "error": row.error, **counts.to_dict(),
            "reasons": [{"channel": r.channel, "status": r.status, "reason": r.reason,
                         "count": int(r.n)} for r in ledger_reads.failures(ws.store, row.id)],
            "failure_reasons": failure_reasons(ws, row.flow, row.run_key, row.id)}
    if row.dry_run and summary:
        data.update({k: summary[k] for k in ("deliveries", "by_tier", "by_channel")})
        data["reasons"] = summary.get("reasons", [])
    return data


def key_report(ws: Workspace, flow: str, run_key: str, dry_runs: bool = False
               ) -> dict[str, Any]:
    """The report of a whole run key: every recipient once (the first run that sent,
    the reruns that found them already handled, the follow-ups that sent the deferred),
    and the runs under it. Dry runs write no ledger rows: with ``dry_runs`` and no real
    run, the latest dry run's figures."""
    rows = run_records.list_runs(ws.store, 1000, flow=flow, run_key=run_key)
    real = [r for r in rows if not r.dry_run]
    if not real:
        dry = [r for r in rows if r.dry_run]
        if dry and dry_runs:
            return {**run_report(ws, dry[0]), "runs": [run_row(ws, r) for r in dry]}
        known = sorted({r.run_key for r in run_records.list_runs(ws.store, 200, flow=flow)})
        raise HeraldError(f"no {'' if dry_runs else 'real '}run of {flow} under run key "
                          f"'{run_key}'" + (did_you_mean(run_key, known) or (
                              f" (run keys: {', '.join(known[-5:])})" if known else "")))
    latest, first = real[0], real[-1]
    sender = next((r for r in reversed(real) if r.summary), first)
    summary = json.loads(sender.summary) if sender.summary else None
    counts = ledger_reads.key_counts(ws.store, flow, run_key)
    shown = rows if dry_runs else real
    return {"run_id": latest.id, "flow": flow, "run_key": run_key, "status": latest.status,
            "dry_run": False,
            "package": summary["package"] if summary else _package(ws, first.package_id),
            "error": latest.error, **counts.to_dict(),
            "reasons": [{"channel": r.channel, "status": r.status, "reason": r.reason,
                         "count": int(r.n)}
                        for r in ledger_reads.failures(ws.store, None, key=(flow, run_key))],
            "failure_reasons": failure_reasons(ws, flow, run_key),
            "deferred_until": (when.isoformat() if (when := ledger_reads.deferred_until(
                ws.store, flow, run_key)) else None),
            "runs": [run_row(ws, r) for r in shown]}


def failure_reasons(ws: Workspace, flow: str, run_key: str, run_id: str | None = None,
                    limit: int = 10) -> list[dict[str, Any]]:
    """The top reasons sends failed: channel, provider code, reason, count."""
    return [{"channel": r.channel, "code": r.code, "reason": r.reason, "count": int(r.n)}
            for r in ledger_reads.failure_reasons(ws.store, flow, run_key, limit, run_id)]


def run_row(ws: Workspace, row: Any) -> dict[str, Any]:
    """One run as ``herald runs`` lists it: key, status, counts, duration. A run that
    ended without its summary (stopped, failed, killed, still going) is counted from
    its ledger rows: what it sent before it stopped is not shown as 0."""
    summary = json.loads(row.summary) if row.summary else {}
    deliveries = summary.get("deliveries", {})
    size = summary.get("package", {}).get("size")
    if not summary and not row.dry_run:
        deliveries = ledger_reads.run_counts(ws.store, row.id).deliveries
        size = _package(ws, row.package_id)["size"]
    started, finished = utc(row.started_at), utc(row.finished_at)
    return {"run_id": row.id, "flow": row.flow, "run_key": row.run_key,
            "status": row.status, "dry_run": bool(row.dry_run),
            "started_at": started.isoformat() if started else None,
            "duration_seconds": round((finished - started).total_seconds(), 1)
            if started and finished else None,
            "recipients": size,
            "sent": deliveries.get("sent", 0), "failed": deliveries.get("failed", 0),
            "duplicate": deliveries.get("duplicate", 0), "error": row.error}


def _package(ws: Workspace, package_id: str | None) -> dict[str, Any]:
    """A run's package as its summary names it (id, size) when the run left no summary:
    the size None if it was never built, or since removed."""
    if not package_id:
        return {"id": package_id, "size": None}
    with ws.store.connect() as conn:
        return {"id": package_id, "size": conn.execute(select(packages.c.size).where(
            packages.c.id == package_id)).scalar_one_or_none()}


def list_runs(ws: Workspace, flow: str | None, limit: int = 20) -> list[dict[str, Any]]:
    """The latest runs (of ``flow``), newest first."""
    if flow and flow not in ws.flow_names() and flow not in run_records.run_flows(ws.store):
        if flow in ws.journey_names():
            raise HeraldError(f"'{flow}' is a journey, not a flow: its ticks are in "
                              f"herald journey status {flow} and herald journey report {flow}")
        raise HeraldError(f"unknown flow '{flow}'" + did_you_mean(
            flow, [*ws.flow_names(), *run_records.run_flows(ws.store)]))
    return [run_row(ws, r) for r in run_records.list_runs(ws.store, limit, flow=flow)]


def measures(ws: Workspace, row: Any) -> bool:
    """Whether a run's conversions can be measured: a real run of a flow that declares
    a conversion (and still exists in config/flows)."""
    return (not row.dry_run and row.flow in ws.flow_names()
            and ws.flow(row.flow).conversion is not None)


# -- ledger views for reports and the demo ----------------------------------------------
@dataclass(frozen=True)
class Contact:
    """A recipient of the contacted or held-out group and when their window opened."""

    recipient: str
    tier: str
    contacted: bool
    at: datetime
    variant: str | None = None  # the content variant, where the flow runs an experiment


def contacts(ws: Workspace, flow: str, run_key: str) -> Iterator[Contact]:
    """The contacted and held-out recipients of a run key, a slice at a time."""
    for rows in ledger_reads.run_key_rows(ws.store, flow, run_key,
                                    [_d.c.tier, _d.c.status, _START, _d.c.variant],
                                    statuses=(CONTACTED, HELD_OUT)):
        for recipient, tier, status, start, variant in rows:
            opened = utc(start)
            assert opened is not None
            yield Contact(recipient, tier, status == CONTACTED, opened, variant)


@dataclass(frozen=True)
class Timeline:
    """Sends and failures of a run key per time bucket."""

    start: datetime | None
    step: timedelta
    sent: list[int]
    failed: list[int]


_STEPS = [timedelta(seconds=s) for s in (1, 5, 10, 30, 60, 300, 900, 1800, 3600, 3 * 3600,
                                          6 * 3600, 86400, 7 * 86400)]


def timeline(ws: Workspace, flow: str, run_key: str, buckets: int = 40) -> Timeline:
    """Sends (``sent_at``) and failures (``updated_at``) over time, at most about
    ``buckets`` buckets of a round size; counted while streaming, O(buckets) memory."""
    at = case((_d.c.status == CONTACTED, _d.c.sent_at), else_=_d.c.updated_at)
    where = and_(_d.c.flow == flow, _d.c.run_key == run_key,
                 _d.c.status.in_((CONTACTED, "failed")))
    with ws.store.connect() as conn:
        first, last = conn.execute(select(func.min(at), func.max(at)).where(where)).one()
        start, end = utc(first), utc(last)
        if start is None or end is None:
            return Timeline(None, _STEPS[0], [], [])
        span = end - start
        step = next((s for s in _STEPS if span / s < buckets), _STEPS[-1])
        start = datetime.fromtimestamp(start.timestamp() // step.total_seconds()
                                       * step.total_seconds(), UTC)
        size = int((end - start) / step) + 1
        sent, failed = [0] * size, [0] * size
        result = conn.execution_options(yield_per=5000).execute(
            select(_d.c.status, at).where(where))
        for status, when in result:
            stamp = utc(when)
            assert stamp is not None
            (sent if status == CONTACTED else failed)[int((stamp - start) / step)] += 1
    return Timeline(start, step, sent, failed)
