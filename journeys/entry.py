"""Entering a journey: its versions (each distinct definition stored once; an enrollment
keeps the one it entered under) and the entry segment's recipients enrolled by the
re-entry rules.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, func, insert, select, text
from sqlalchemy import case as sql_case
from sqlalchemy.exc import IntegrityError

from herald.audiences.sql import statement
from herald.core import clock
from herald.core.db import JOURNEY_LIVE as LIVE
from herald.core.db import journey_enrollments as enrollments
from herald.core.db import journey_versions as versions
from herald.core.db import writing
from herald.core.errors import RunError
from herald.core.workspace import Workspace
from herald.delivery import ledger
from herald.journeys import load
from herald.journeys.spec import (
    JourneySpec,
)
from herald.reporting.conversions import utc

ENTRY_BATCH = 2000


# -- versions --------------------------------------------------------------------------
def store_version(ws: Workspace, loaded: load.Loaded) -> str:
    """Record the journey's current definition (once per distinct definition)."""
    with ws.store.connect() as conn:
        have = conn.execute(select(versions.c.version).where(
            versions.c.journey == loaded.spec.name,
            versions.c.version == loaded.version)).first()
    if not have:
        try:
            with writing(ws.store) as conn:
                conn.execute(insert(versions).values(
                    journey=loaded.spec.name, version=loaded.version,
                    definition=loaded.definition, created_at=clock.now()))
        except IntegrityError:
            pass  # another tick stored it first
    return loaded.version


_definitions: dict[tuple[str, str, str], JourneySpec] = {}


def definition(ws: Workspace, journey: str, version: str) -> JourneySpec:
    """The definition an enrollment entered under."""
    key = (str(ws.store.url), journey, version)
    if key not in _definitions:
        with ws.store.connect() as conn:
            stored = conn.execute(select(versions.c.definition).where(
                versions.c.journey == journey, versions.c.version == version)).scalar()
        if stored is None:
            raise RunError(f"journey {journey}: version {version} is not in the database")
        _definitions[key] = load.parse_definition(stored)
    return _definitions[key]


# -- entering ---------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.hex()
    return value


SKIPPED_HINT = ("no_key: NULL in the entry's key column; duplicate_key: a key an "
                "earlier row had, whose row was entered")


@dataclass
class Entered:
    """What an entry pass did: how many entered, and the rows it could not enter
    (``no_key``: NULL in the key column; ``duplicate_key``: a key an earlier row of the
    same pass had, whose row was used)."""

    entered: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


def enter_recipients(ws: Workspace, spec: JourneySpec, version: str) -> Entered:
    """Run the entry segment and enroll whoever may enter now."""
    segment = load.entry_segment(ws, spec)
    source = ws.source(spec.entry.source)
    done = Entered()
    seen: set[str] = set()  # keys of this pass (a flow refuses duplicates; a journey
    # runs on a schedule, so it enters the first row and says how many it passed over)
    with source.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=ENTRY_BATCH).execute(
            statement(segment.sql, segment.params), dict(segment.params))
        columns = list(result.keys())
        for batch, part in enumerate(result.partitions(ENTRY_BATCH), start=1):
            rows = [dict(zip(columns, (_jsonable(v) for v in r), strict=True)) for r in part]
            done.entered += _enter_batch(ws, spec, version, rows, seen, done.skipped)
            if batch & (batch - 1) == 0:  # after batches 1, 2, 4, 8, ...
                refresh_statistics(ws.store)
    if done.entered:
        refresh_statistics(ws.store)
    return done


def refresh_statistics(engine: Engine) -> None:
    """Let Postgres's planner see the enrollments as they are now.

    With the statistics of an empty table it looked up each entry batch's recipients by
    scanning every enrollment, and entering 100,000 people turned quadratic (114 s; 7 s
    with fresh statistics). ANALYZE samples a bounded number of rows: milliseconds.
    """
    if engine.dialect.name != "postgresql":
        return
    with engine.connect() as conn:
        conn.execute(text(f"ANALYZE {enrollments.name}"))
        conn.commit()


def _enter_batch(ws: Workspace, spec: JourneySpec, version: str,
                 rows: list[dict[str, Any]], seen: set[str], skipped: Counter[str]) -> int:
    entry = spec.entry
    by_key: dict[str, dict[str, Any]] = {}
    for row in rows:
        value = row.get(entry.key)
        if value is None:
            skipped["no_key"] += 1
            continue
        key = str(value)
        if key in seen:
            skipped["duplicate_key"] += 1
            continue
        seen.add(key)
        by_key[key] = row
    if not by_key:
        return 0
    now = clock.now()
    c = enrollments.c
    new = []
    with writing(ws.store) as conn:
        if conn.dialect.name == "postgresql":  # one enterer per journey at a time
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:j))"),
                         {"j": f"herald-journey:{spec.name}"})
        history: dict[str, tuple[int, bool, datetime | None]] = {}
        for part in ledger.among(conn, c.recipient, list(by_key)):
            query = select(c.recipient, func.max(c.entry_no), func.count(),
                           func.sum(sql_case((c.status.in_(LIVE), 1), else_=0)),
                           func.max(c.updated_at)).where(c.journey == spec.name, part
                                                         ).group_by(c.recipient)
            for recipient, last, _n, live, ended in conn.execute(query):
                history[recipient] = (int(last), bool(live), utc(ended))
        for key, row in by_key.items():
            last, live, ended = history.get(key, (0, False, None))
            if live or (spec.re_entry.max is not None and last >= spec.re_entry.max):
                continue
            if last and spec.re_entry.cooldown and ended and \
                    ended + spec.re_entry.cooldown > now:
                continue
            tier = row.get(entry.tier) if entry.tier else None
            new.append({"journey": spec.name, "recipient": key, "entry_no": last + 1,
                        "version": version, "step": spec.first, "seq": 0,
                        "status": "active", "tier": str(tier) if tier is not None
                        else "default", "due_at": now, "arrived_at": now,
                        "entered_at": now, "updated_at": now,
                        "data": json.dumps(row, ensure_ascii=False, default=str)})
        if new:
            conn.execute(insert(enrollments), new)
    return len(new)
