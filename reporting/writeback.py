"""Write-back: the ledger and the conversion results as tables in a source database.

Opt-in (``writeback: {source: shop, prefix: herald_}`` in ``config/herald.yaml``), for
analysts who join campaigns with their own data. Two tables, created if missing:

- ``<prefix>deliveries``: one row per recipient per (flow, run key), without addresses,
  with the recipient's content variant where the flow runs an experiment;
- ``<prefix>conversion_results``: one row per (flow, run key, scope, name), scope being
  ``run``, ``tier`` or ``channel``.

Each write replaces the rows of that (flow, run key) in one transaction, so writing again
(a rerun, a later report once more conversions are in) never duplicates anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    insert,
    inspect,
)
from sqlalchemy.exc import SQLAlchemyError

from herald.core.errors import RunError
from herald.core.workspace import Workspace
from herald.delivery import ledger, ledger_reads
from herald.reporting.conversions import CONTACTED, HELD_OUT, ConversionReport, Row

ARMS = {CONTACTED: "contacted", HELD_OUT: "held_out"}


def tables(prefix: str) -> tuple[Table, Table]:
    """The two write-back tables for a name prefix."""
    meta = MetaData()
    deliveries = Table(
        f"{prefix}deliveries", meta,
        Column("flow", String(128), nullable=False),
        Column("run_key", String(128), nullable=False),
        Column("run_id", String(40), nullable=False),
        Column("recipient", String(255), nullable=False),
        Column("tier", String(128), nullable=False),
        Column("channel", String(64)),
        Column("status", String(16), nullable=False),
        Column("arm", String(16), nullable=False),  # contacted | held_out | not_contacted
        Column("reason", Text),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("sent_at", DateTime(timezone=True)),
        Column("converted", Boolean),  # null until conversions are measured
        Column("converted_at", DateTime(timezone=True)),
        Column("revenue", Float),
        Column("variant", String(64)),  # the content variant, for experiments
    )
    results = Table(
        f"{prefix}conversion_results", meta,
        Column("flow", String(128), nullable=False),
        Column("run_key", String(128), nullable=False),
        Column("scope", String(16), nullable=False),  # run | tier | channel
        Column("name", String(128), nullable=False),
        Column("contacted", Integer, nullable=False),
        Column("contacted_converted", Integer, nullable=False),
        Column("contacted_rate", Float),
        Column("contacted_revenue", Float, nullable=False),
        Column("held_out", Integer, nullable=False),
        Column("held_out_converted", Integer, nullable=False),
        Column("held_out_rate", Float),
        Column("held_out_revenue", Float, nullable=False),
        Column("not_contacted", Integer, nullable=False),
        Column("uplift", Float),
        Column("uplift_ci_low", Float),
        Column("uplift_ci_high", Float),
        Column("uplift_relative", Float),
        Column("note", Text),
        Column("window_seconds", Integer, nullable=False),
        Column("window_closed", Boolean, nullable=False),
        Column("closes_at", DateTime(timezone=True)),
        Column("computed_at", DateTime(timezone=True), nullable=False),
    )
    return deliveries, results


def write_back(ws: Workspace, flow: str, run_key: str,
               conversion: ConversionReport | None = None) -> dict[str, int] | None:
    """Replace (flow, run key)'s rows in the write-back tables; None when not configured.

    Without ``conversion`` only the deliveries are written (their ``converted`` stays
    null) and earlier conversion results are left as they were.
    """
    settings = ws.config.writeback
    if settings is None:
        return None
    deliveries, results = tables(settings.prefix)
    engine = ws.source(settings.source, write=True)
    written = {"deliveries": 0, "conversion_results": 0}
    try:
        with engine.begin() as conn:
            deliveries.metadata.create_all(conn)
            _add_columns(conn, deliveries)
            conn.execute(delete(deliveries).where(deliveries.c.flow == flow,
                                                  deliveries.c.run_key == run_key))
            for batch in _ledger_rows(ws, flow, run_key, conversion):
                conn.execute(insert(deliveries), batch)
                written["deliveries"] += len(batch)
            if conversion is not None:
                written["conversion_results"] = _write_results(conn, results, conversion)
    except SQLAlchemyError as exc:
        raise RunError(f"write-back of {flow} {run_key} to source {settings.source} "
                       f"(tables {deliveries.name}, {results.name}) failed: "
                       f"{getattr(exc, 'orig', None) or exc}") from exc
    return written


def _ledger_rows(ws: Workspace, flow: str, run_key: str,
                 conversion: ConversionReport | None) -> Iterator[list[dict[str, Any]]]:
    d = ledger.deliveries
    for rows in ledger_reads.run_key_rows(ws.store, flow, run_key, [
            d.c.run_id, d.c.tier, d.c.channel, d.c.status, d.c.reason, d.c.created_at,
            d.c.sent_at, d.c.variant]):
        batch = []
        for r in rows:
            hit = conversion.converted.get(r.recipient) if conversion else None
            batch.append({
                "flow": flow, "run_key": run_key, "run_id": r.run_id,
                "recipient": r.recipient, "tier": r.tier, "channel": r.channel,
                "status": r.status, "reason": r.reason,
                "arm": ARMS.get(r.status, "not_contacted"),
                "created_at": r.created_at, "sent_at": r.sent_at,
                "converted": (hit is not None) if conversion else None,
                "converted_at": hit[0] if hit else None,
                "revenue": hit[1] if hit else None, "variant": r.variant})
        yield batch


def _add_columns(conn: Connection, table: Table) -> None:
    """Nullable columns added since a table was first written (``variant``)."""
    have = {c["name"] for c in inspect(conn).get_columns(table.name)}
    for column in table.columns:
        if column.name not in have and column.nullable:
            kind = column.type.compile(dialect=conn.dialect)
            conn.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}')


def _write_results(conn: Connection, results: Table, report: ConversionReport) -> int:
    conn.execute(delete(results).where(results.c.flow == report.flow,
                                       results.c.run_key == report.run_key))
    scoped: list[tuple[str, Row]] = [("run", report.total),
                                     *(("tier", r) for r in report.tiers.values()),
                                     *(("channel", r) for r in report.channels.values())]
    rows = []
    for scope, row in scoped:
        rows.append({
            "flow": report.flow, "run_key": report.run_key, "scope": scope, **row.flat(),
            "not_contacted": row.not_contacted if scope != "channel" else 0,
            "window_seconds": int(report.window.total_seconds()),
            "window_closed": report.window_closed, "closes_at": report.closes_at,
            "computed_at": report.computed_at})
    conn.execute(insert(results), rows)
    return len(rows)
