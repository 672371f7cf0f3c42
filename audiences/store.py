"""Audience packages: immutable, versioned snapshots of a segment's result.

A package is built by streaming the segment query from its source into the workspace
database in batches, so memory stays O(batch) whatever the audience size. Its manifest
records the flow, segment, SQL sha256, parameters, build time, size and counts per tier.
Rows are numbered (``seq``) so a run can read any chunk by range.
"""

from __future__ import annotations

import functools
import json
import secrets
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import (
    Engine,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError

from herald.audiences.sql import Segment, db_message
from herald.core import clock
from herald.core.db import owner_gone, package_rows, packages, process_owner, writing
from herald.core.errors import AudienceError, WorkspaceError
from herald.core.spec import FlowSpec
from herald.core.workspace import Workspace

DEFAULT_TIER = "default"
INSERT_BATCH = 20_000

@dataclass(frozen=True)
class Package:
    """A package's manifest."""

    id: str
    flow: str
    segment: str
    source: str
    sql_sha256: str
    params: dict[str, Any]
    key_column: str
    tier_column: str | None
    columns: list[str]
    built_at: datetime
    size: int
    tiers: dict[str, int]
    status: str

    def manifest(self) -> dict[str, Any]:
        return {
            "id": self.id, "flow": self.flow, "segment": self.segment,
            "source": self.source, "sql_sha256": self.sql_sha256, "params": self.params,
            "key": self.key_column, "tier_column": self.tier_column,
            "columns": self.columns, "built_at": self.built_at.isoformat(),
            "size": self.size, "tiers": self.tiers, "status": self.status,
        }


@dataclass(frozen=True, slots=True)
class Recipient:
    """One row of a package."""

    seq: int
    key: str
    tier: str
    data: dict[str, Any]


_slow_encode = json.JSONEncoder(ensure_ascii=False, default=lambda v: _json_default(v)).encode


def _encode(row: dict[str, Any]) -> str:
    """A row as JSON text: orjson (3x faster than json), json for what orjson refuses
    (integers beyond 64 bits)."""
    try:
        return orjson.dumps(row, default=_json_default).decode()
    except TypeError:
        return _slow_encode(row)


def _json_default(value: Any) -> Any:
    """JSON for the values a driver returns beyond JSON's own types."""
    converted = jsonable(value)
    if converted is value:
        return str(value)
    return converted


@functools.cache
def _integrity_errors() -> tuple[type[BaseException], ...]:
    """What a duplicate key raises: through SQLAlchemy, or from the driver's own cursor
    (psycopg is imported on first need: 0.1 s that read-only commands do not pay)."""
    import sqlite3

    errors: list[type[BaseException]] = [IntegrityError, sqlite3.IntegrityError]
    try:
        import psycopg
    except ImportError:
        pass
    else:
        errors.append(psycopg.errors.IntegrityError)
    return tuple(errors)



def jsonable(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, bytes | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    return value


def build(ws: Workspace, flow: FlowSpec, segment: Segment) -> Package:
    """Run ``segment`` streamed and store its rows as a new, immutable package."""
    source = ws.source(flow.audience.source)
    store = ws.store
    key_col, tier_col = flow.audience.key, flow.audience.tier
    package_id = f"pkg-{secrets.token_hex(5)}"
    built_at = clock.now()
    with writing(store) as conn:
        conn.execute(insert(packages).values(
            id=package_id, flow=flow.name, segment=segment.name, source=flow.audience.source,
            sql_sha256=segment.sha256, params=json.dumps(segment.params), key_column=key_col,
            tier_column=tier_col, columns="[]", built_at=built_at, size=0, tiers="{}",
            status="building", owner=process_owner()))
    tiers: Counter[str] = Counter()
    size = 0
    columns: list[str] = []
    try:
        with source.connect() as src, ExitStack() as stack:
            result = src.execution_options(stream_results=True, yield_per=INSERT_BATCH).execute(
                text(segment.sql), segment.params)
            # close the server-side cursor on every exit, a duplicate key included
            stack.callback(result.close)
            columns = list(result.keys())
            for needed, what in ((key_col, "audience.key"), (tier_col, "audience.tier")):
                if needed and needed not in columns:
                    raise AudienceError(f"{segment.file}: the result has no column "
                                        f"'{needed}' ({what}; columns: {', '.join(columns)})")
            key_at = columns.index(key_col)
            tier_at = columns.index(tier_col) if tier_col else None
            for batch in result.partitions(INSERT_BATCH):
                rows: list[tuple[str, int, str, str, str]] = []
                for row in batch:
                    key = row[key_at]
                    if key is None:
                        raise AudienceError(f"{segment.file}: row {size + len(rows) + 1} has "
                                            f"NULL in key column '{key_col}'")
                    value = row[tier_at] if tier_at is not None else None
                    tier = DEFAULT_TIER if value is None else str(value)
                    tiers[tier] += 1
                    rows.append((package_id, size + len(rows), str(key), tier,
                                 _encode(dict(zip(columns, row, strict=True)))))
                _insert_rows(store, rows, segment.file)
                size += len(rows)
    except DBAPIError as exc:
        _discard(store, package_id)
        raise AudienceError(f"{segment.file}: the query failed: {db_message(exc)}") from None
    except BaseException:
        _discard(store, package_id)
        raise
    with writing(store) as conn:
        conn.execute(update(packages).where(packages.c.id == package_id).values(
            size=size, tiers=json.dumps(dict(sorted(tiers.items()))),
            columns=json.dumps(columns), status="ready"))
    return get(ws, package_id)


def _insert_rows(store: Engine, rows: list[tuple[str, int, str, str, str]], file: str
                 ) -> None:
    """Store a batch of rows: COPY on Postgres, one executemany elsewhere.

    Both go straight to the driver: building SQLAlchemy parameters for each row cost
    more than the database's own work (see BENCHMARKS.md).
    """
    try:
        with writing(store) as conn:
            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            try:
                if store.dialect.name == "postgresql":
                    with cursor.copy(f"COPY {package_rows.name} (package_id, seq, key, tier, "
                                     "data) FROM STDIN") as copy:
                        for row in rows:
                            copy.write_row(row)
                else:
                    mark = "?" if store.dialect.paramstyle == "qmark" else "%s"
                    marks = ", ".join([mark] * 5)
                    cursor.executemany(f"INSERT INTO {package_rows.name} (package_id, seq, "
                                       f"key, tier, data) VALUES ({marks})", rows)
            finally:
                cursor.close()
    except _integrity_errors():
        keys = Counter(r[2] for r in rows)
        dup = [k for k, n in keys.items() if n > 1]
        if not dup:
            with store.connect() as conn:
                found = conn.execute(select(package_rows.c.key).where(
                    package_rows.c.package_id == rows[0][0],
                    package_rows.c.key.in_(list(keys)))).scalars().all()
            dup = list(found)
        shown = ", ".join(repr(k) for k in sorted(dup)[:5])
        raise AudienceError(f"{file}: duplicate key{'s' if len(dup) > 1 else ''} {shown} in "
                            "the result: each recipient must appear once (a duplicate would "
                            "be sent twice)") from None


def remove_orphans(store: Engine) -> list[str]:
    """Remove packages left ``building`` by a process that has ended (killed during the
    build) on this host, with their rows. Returns their ids."""
    with store.connect() as conn:
        found = [r.id for r in conn.execute(select(packages.c.id, packages.c.owner).where(
            packages.c.status == "building", packages.c.owner.is_not(None)))
            if owner_gone(r.owner)]
    for package_id in found:
        _discard(store, package_id)
    return found


def _discard(store: Engine, package_id: str) -> None:
    with writing(store) as conn:
        conn.execute(delete(package_rows).where(package_rows.c.package_id == package_id))
        conn.execute(delete(packages).where(packages.c.id == package_id))


def prune(ws: Workspace, keep: int, flow: str | None = None) -> tuple[list[str], list[str]]:
    """Delete all but the newest ``keep`` packages of each flow; (deleted, kept anyway).

    A package is kept anyway while the ledger still needs it: a row of it is ``queued``
    or ``deferred`` (a later run of that run key resumes from the package), or a run
    that used it is still ``running``."""
    from herald.core.db import deliveries, runs

    with ws.store.connect() as conn:
        query = select(packages.c.id, packages.c.flow).order_by(packages.c.built_at.desc())
        if flow:
            query = query.where(packages.c.flow == flow)
        seen: Counter[str] = Counter()
        candidates = []
        for package_id, package_flow in conn.execute(query):
            seen[package_flow] += 1
            if seen[package_flow] > keep:
                candidates.append(package_id)
        needed = set(conn.execute(select(deliveries.c.package_id).distinct().where(
            deliveries.c.status.in_(("queued", "deferred")))).scalars())
        needed |= set(conn.execute(select(runs.c.package_id).where(
            runs.c.status == "running")).scalars())
    deleted = [p for p in candidates if p not in needed]
    for package_id in deleted:
        _discard(ws.store, package_id)
    return deleted, [p for p in candidates if p in needed]


def _package(row: Any) -> Package:
    built_at = row.built_at if row.built_at.tzinfo else row.built_at.replace(tzinfo=UTC)
    return Package(row.id, row.flow, row.segment, row.source, row.sql_sha256,
                   json.loads(row.params), row.key_column, row.tier_column,
                   json.loads(row.columns), built_at, row.size, json.loads(row.tiers),
                   row.status)


def get(ws: Workspace, package_id: str) -> Package:
    with ws.store.connect() as conn:
        row = conn.execute(select(packages).where(packages.c.id == package_id)).first()
    if row is None or row.status != "ready":
        raise WorkspaceError(f"no audience package '{package_id}' (see: herald audience list)")
    return _package(row)


def list_packages(ws: Workspace, flow: str | None = None, limit: int = 50) -> list[Package]:
    query = select(packages).where(packages.c.status == "ready")
    if flow:
        query = query.where(packages.c.flow == flow)
    query = query.order_by(packages.c.built_at.desc()).limit(limit)
    with ws.store.connect() as conn:
        return [_package(r) for r in conn.execute(query)]


def read(ws: Workspace, package_id: str, start: int = 0, stop: int | None = None
         ) -> list[Recipient]:
    """Rows ``start <= seq < stop`` of a package, in order."""
    query = select(package_rows.c.seq, package_rows.c.key, package_rows.c.tier,
                   package_rows.c.data).where(package_rows.c.package_id == package_id,
                                              package_rows.c.seq >= start)
    if stop is not None:
        query = query.where(package_rows.c.seq < stop)
    with ws.store.connect() as conn:
        return [Recipient(r.seq, r.key, r.tier, json.loads(r.data))
                for r in conn.execute(query.order_by(package_rows.c.seq))]


def iter_rows(ws: Workspace, package_id: str, batch: int = INSERT_BATCH
              ) -> Iterator[Recipient]:
    """Every row of a package, ``batch`` rows in memory at a time."""
    start = 0
    while True:
        rows = read(ws, package_id, start, start + batch)
        if not rows:
            return
        yield from rows
        start += batch


def sample(ws: Workspace, package_id: str, tier: str | None, limit: int) -> list[Recipient]:
    query = select(package_rows.c.seq, package_rows.c.key, package_rows.c.tier,
                   package_rows.c.data).where(package_rows.c.package_id == package_id)
    if tier:
        query = query.where(package_rows.c.tier == tier)
    with ws.store.connect() as conn:
        return [Recipient(r.seq, r.key, r.tier, json.loads(r.data))
                for r in conn.execute(query.order_by(package_rows.c.seq).limit(limit))]


def count_rows(ws: Workspace, package_id: str) -> int:
    with ws.store.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(package_rows).where(
            package_rows.c.package_id == package_id)).scalar_one())


