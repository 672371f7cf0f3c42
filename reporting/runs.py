"""Run views from the ledger: finding a run, its delivery report, who was contacted or
held out, and sends over time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, select

from herald.core.errors import HeraldError
from herald.core.workspace import Workspace
from herald.delivery import ledger
from herald.reporting.conversions import _START, CONTACTED, HELD_OUT, utc

_d = ledger.deliveries


# -- the whole report of a run ----------------------------------------------------------
def find_run(ws: Workspace, run: str | None) -> Any:
    """A run by id, else the latest run of the flow named ``run``, else the latest run."""
    row = ledger.get_run(ws.store, run_id=run) if run else ledger.get_run(ws.store)
    if row is None and run:
        row = ledger.get_run(ws.store, flow=run)
    if row is None:
        raise HeraldError(f"no run '{run}'" if run else "no runs yet")
    return row


def run_report(ws: Workspace, row: Any) -> dict[str, Any]:
    """A run's delivery report from the ledger (``herald report --json`` without the
    conversions)."""
    summary = json.loads(row.summary) if row.summary else None
    counts = ledger.run_counts(ws.store, row.id)
    if summary is not None:  # duplicates are counted in the summary, not in the ledger
        counts.deliveries["duplicate"] = summary["deliveries"].get("duplicate", 0)
    data = {"run_id": row.id, "flow": row.flow, "run_key": row.run_key,
            "status": row.status, "dry_run": row.dry_run,
            "package": summary["package"] if summary else {"id": row.package_id},
            "error": row.error, **counts.to_dict(),
            "reasons": [{"channel": r.channel, "status": r.status, "reason": r.reason,
                         "count": int(r.n)} for r in ledger.failures(ws.store, row.id)]}
    if row.dry_run and summary:
        data.update({k: summary[k] for k in ("deliveries", "by_tier", "by_channel")})
    return data


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
    for rows in ledger.run_key_rows(ws.store, flow, run_key,
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
