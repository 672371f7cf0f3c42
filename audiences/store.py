"""Audience packages: immutable, versioned snapshots of a segment's result.

``herald.audiences.builder`` builds a package; this module holds packages: their
manifests and rows, reading them by range, pruning and removing orphans. A manifest
records the flow, segment, SQL sha256, parameters, build time, size and counts per tier.
Rows are numbered (``seq``) so a run can read any chunk by range.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any, NamedTuple

import orjson
from sqlalchemy import (
    Engine,
    delete,
    func,
    select,
)
from sqlalchemy.exc import IntegrityError

from herald.core.db import (
    at_driver,
    driver_mark,
    owner_gone,
    package_rows,
    packages,
    writing,
)
from herald.core.errors import WorkspaceError, did_you_mean
from herald.core.workspace import Workspace

log = logging.getLogger("herald.audiences")

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


class Recipient(NamedTuple):
    """One row of a package. A NamedTuple (immutable, as a frozen dataclass would be) is
    made in a third of the time: one is made for every row a chunk reads."""

    seq: int
    key: str
    tier: str
    data: dict[str, Any]


_slow_encode = json.JSONEncoder(ensure_ascii=False, default=lambda v: json_default(v)).encode


def encode_row(row: dict[str, Any]) -> str:
    """A row as JSON text: orjson (3x faster than json), json for what orjson refuses
    (integers beyond 64 bits)."""
    try:
        return orjson.dumps(row, default=json_default).decode()
    except TypeError:
        return _slow_encode(row)


# orjson reads a row three times as fast as json but turns an integer beyond 64 bits into
# a float, and refuses the NaN json writes: a row holding a float or a nested value is
# looked at again (a regular expression over every row cost more than the parse), and
# read by json where it holds such an integer.
_BEYOND_64_BITS = re.compile(r"[0-9]{20}")


def decode_row(text: str) -> dict[str, Any]:
    """A row written by :func:`encode_row` (or built by the database), as it was."""
    try:
        row: dict[str, Any] = orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)  # type: ignore[no-any-return]
    for value in row.values():
        kind = type(value)
        if kind is float or kind is list or kind is dict:
            if _BEYOND_64_BITS.search(text):
                return json.loads(text)  # type: ignore[no-any-return]
            break
    return row


def encode_value(value: Any) -> str:
    """One value as JSON text, as ``encode_row`` writes it inside a row."""
    return orjson.dumps(value, default=json_default).decode()


def json_default(value: Any) -> Any:
    """JSON for the values a driver returns beyond JSON's own types."""
    converted = jsonable(value)
    if converted is value:
        return str(value)
    return converted


@functools.cache
def integrity_errors() -> tuple[type[BaseException], ...]:
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


def remove_orphans(store: Engine) -> list[str]:
    """Remove packages left ``building`` by a process that has ended (killed during the
    build) on this host, with their rows. Returns their ids."""
    with store.connect() as conn:
        found = [r.id for r in conn.execute(select(packages.c.id, packages.c.owner).where(
            packages.c.status == "building", packages.c.owner.is_not(None)))
            if owner_gone(r.owner)]
    for package_id in found:
        discard(store, package_id)
    return found


def discard(store: Engine, package_id: str) -> None:
    with writing(store) as conn:
        conn.execute(delete(package_rows).where(package_rows.c.package_id == package_id))
        conn.execute(delete(packages).where(packages.c.id == package_id))


def prune(ws: Workspace, keep: int, flow: str | None = None) -> tuple[list[str], list[str]]:
    """Delete all but the newest ``keep`` packages of each flow; (deleted, kept anyway).

    A package is kept anyway while the ledger still needs it: a row of it is ``queued``
    or ``deferred`` (a later run of that run key resumes from the package), or a run
    that used it is still ``running``."""
    from herald.core.db import deliveries, runs

    if flow:
        _check_flow(ws, flow)
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
        discard(ws.store, package_id)
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
            recent = conn.execute(select(packages.c.id).where(packages.c.status == "ready")
                                  .order_by(packages.c.built_at.desc()).limit(200)).scalars()
            raise WorkspaceError(f"no audience package '{package_id}'"
                                 f"{did_you_mean(package_id, recent)} (see: herald audience "
                                 "list)")
    return _package(row)


def _check_flow(ws: Workspace, flow: str) -> None:
    """``--flow``: a flow of the workspace, or one that packages were built for (its YAML
    may be gone since); anything else is a typo, named with a did-you-mean."""
    if flow in ws.flow_names():
        return
    with ws.store.connect() as conn:
        built = list(conn.execute(select(packages.c.flow).distinct()).scalars())
    if flow not in built:
        raise WorkspaceError(f"--flow: unknown flow '{flow}'" + did_you_mean(
            flow, [*ws.flow_names(), *built]) + f" (flows: {', '.join(ws.flow_names())})")


def list_packages(ws: Workspace, flow: str | None = None, limit: int = 50) -> list[Package]:
    if flow:
        _check_flow(ws, flow)
    query = select(packages).where(packages.c.status == "ready")
    if flow:
        query = query.where(packages.c.flow == flow)
    query = query.order_by(packages.c.built_at.desc()).limit(limit)
    with ws.store.connect() as conn:
        return [_package(r) for r in conn.execute(query)]


def read(ws: Workspace, package_id: str, start: int = 0, stop: int | None = None
         ) -> list[Recipient]:
    """Rows ``start <= seq < stop`` of a package, in order."""
    # at the driver: SQLAlchemy's rows cost as much as decoding each row's JSON
    with ws.store.connect() as conn:
        mark = driver_mark(conn.dialect)
        statement = (f"SELECT seq, key, tier, data FROM {package_rows.name} "
                     f"WHERE package_id = {mark} AND seq >= {mark} AND seq < {mark} "
                     "ORDER BY seq")
        with at_driver(conn, statement) as raw:
            cursor = raw.cursor()
            try:
                cursor.execute(statement, (package_id, start,
                                           stop if stop is not None else 1 << 62))
                rows = cursor.fetchall()
            finally:
                cursor.close()
    return [Recipient(seq, key, tier, decode_row(data)) for seq, key, tier, data in rows]


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
        return [Recipient(r.seq, r.key, r.tier, decode_row(r.data))
                for r in conn.execute(query.order_by(package_rows.c.seq).limit(limit))]


def count_rows(ws: Workspace, package_id: str) -> int:
    with ws.store.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(package_rows).where(
            package_rows.c.package_id == package_id)).scalar_one())


