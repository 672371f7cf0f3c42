"""SQL conditions over the source, asked about many recipients at once.

A condition (``exit_when``, ``wait_for``, a branch's ``condition``) and the goal are
SELECTs returning the key of each recipient who matches, and optionally a timestamp.
Herald binds ``:since`` (the earliest reference moment of the recipients asked about) and
``:until`` (now), and wraps the query so that it returns only those recipients' rows::

    SELECT * FROM (<the file's SQL>) AS herald_c
    WHERE CAST(herald_c.<key> AS VARCHAR(255)) IN (:k1, ..., :k500)

so a chunk costs a few queries per condition, never one per recipient. With a timestamp
column, a row counts for a recipient only when it falls in that recipient's own period.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from herald.audiences.sql import Segment, statement
from herald.core.workspace import Workspace
from herald.reporting.conversions import bind_period, utc

SLICE = 500


def rows_for(ws: Workspace, source: str, query: Segment, key: str, columns: list[str],
             keys: list[str], since: datetime, until: datetime) -> dict[str, list[Any]]:
    """{key: [row, ...]} of the query's rows for ``keys`` (``columns`` of each)."""
    engine = ws.source(source)
    quote = engine.dialect.identifier_preparer.quote
    wanted = ", ".join(f"herald_c.{quote(c)}" for c in columns) or "1"
    sql = (f"SELECT CAST(herald_c.{quote(key)} AS VARCHAR(255)) AS herald_key, {wanted} "
           f"FROM (\n{query.sql}\n) AS herald_c "
           f"WHERE CAST(herald_c.{quote(key)} AS VARCHAR(255)) IN :herald_keys")
    params = bind_period(engine, query, since, until)
    query_keys = statement(sql, {**params, "herald_keys": keys})
    out: dict[str, list[Any]] = defaultdict(list)
    with engine.connect() as conn:
        for i in range(0, len(keys), SLICE):
            for row in conn.execute(query_keys, {**params, "herald_keys": keys[i:i + SLICE]}):
                out[row[0]].append(row[1:])
    return out


def matching(ws: Workspace, source: str, query: Segment, key: str, at: str | None,
             since: Mapping[str, datetime], until: datetime,
             window: Any = None) -> dict[str, datetime | None]:
    """The recipients of ``since`` ({key: reference moment}) who match, with the first
    matching moment (None without an ``at`` column). With ``at``, a row matches when
    ``since[key] <= at < until`` (and ``at < since[key] + window`` if given)."""
    if not since:
        return {}
    found = rows_for(ws, source, query, key, [at] if at else [], sorted(since),
                     min(since.values()), until)
    out: dict[str, datetime | None] = {}
    for k, rows in found.items():
        if k not in since:
            continue
        if at is None:
            out[k] = None
            continue
        start = since[k]
        moments = []
        for row in rows:
            try:
                moment = utc(row[0])
            except ValueError:
                continue
            if moment is None or moment < start or moment >= until:
                continue
            if window is not None and moment >= start + window:
                continue
            moments.append(moment)
        if moments:
            out[k] = min(moments)
    return out
