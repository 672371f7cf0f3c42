"""Segment SQL: reading ``audiences/NAME[.dialect].sql``, checking and binding its
parameters (``:now`` from Herald's clock; a list for ``IN :name``), and probing its
result columns."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Dialect, Engine, TextClause, bindparam, text
from sqlalchemy.exc import DBAPIError

from herald.core import clock
from herald.core.db import driver_message
from herald.core.errors import AudienceError, Problem, WorkspaceError
from herald.core.files import read_text
from herald.core.spec import FlowSpec, Param
from herald.core.workspace import SegmentNotFound, Workspace


@dataclass(frozen=True)
class Segment:
    """A segment query ready to run: its file, text, hash and bound parameters."""

    name: str
    file: str  # workspace-relative, for messages
    sql: str  # as text() takes it: each colon in a comment or quoted string escaped
    sha256: str  # of the file's query as written
    params: dict[str, Param]


def load_segment(ws: Workspace, flow: FlowSpec, overrides: Mapping[str, Param] | None = None
                 ) -> Segment:
    """Read the flow's segment SQL (the source dialect's variant if any) and bind params.

    ``:now``, when the SQL uses it and no parameter overrides it, is Herald's clock as a
    naive UTC timestamp: segments measure "days since" against the run's clock, not the
    database's, so a rehearsal (``--now``) selects who a run at that moment would select.
    """
    moment = bind_time(ws.source(flow.audience.source), clock.now())
    try:
        return load_sql(ws, flow.audience.segment, flow.audience.source,
                        {**flow.audience.params, **(overrides or {})},
                        hint="set audience.params in the flow or pass -p name=value",
                        defaults={"now": moment})
    except SegmentNotFound as exc:
        raise WorkspaceError(str(Problem(
            str(exc), file=ws.flow_file(flow.name),
            line=ws.flow_line(flow.name, ("audience", "segment")),
            field="audience.segment"))) from None


def bind_time(engine: Engine, moment: datetime) -> Any:
    """``moment`` as a source binds a timestamp: naive UTC, as ``YYYY-MM-DD HH:MM:SS``
    text on SQLite (where timestamps are text that sorts)."""
    naive = moment.astimezone(UTC).replace(tzinfo=None)
    return naive.isoformat(" ", "seconds") if engine.dialect.name == "sqlite" else naive


def segment_params(ws: Workspace, name: str, source: str) -> tuple[str, set[str]]:
    """The parameters a segment's SQL uses, and its workspace-relative file."""
    path = ws.segment_file(name, ws.source(source).dialect.name)
    try:
        sql = read_text(path, ws.relative(path))
    except UnicodeDecodeError:
        raise AudienceError(f"{ws.relative(path)}: cannot be read") from None
    check_query(sql, ws.relative(path))  # a statement that is not a query says so first
    return ws.relative(path), set(text(literal_colons(sql)).compile().binds)


def load_sql(ws: Workspace, name: str, source: str, params: Mapping[str, Param],
             supplied: tuple[str, ...] = (), hint: str = "",
             defaults: Mapping[str, Any] | None = None) -> Segment:
    """Read ``audiences/NAME[.dialect].sql`` for ``source`` and check its parameters.

    Every parameter the SQL uses must be in ``params``, ``defaults`` or ``supplied``
    (bound later, at run time); every one of ``params`` must be used. Only used
    parameters are kept.
    """
    engine = ws.source(source)
    path = ws.segment_file(name, engine.dialect.name)
    rel = ws.relative(path)
    try:
        sql = read_text(path, rel)
    except UnicodeDecodeError as exc:
        raise WorkspaceError(f"{rel}: not valid UTF-8 (byte {exc.start})") from None
    sql = sql.strip().rstrip(";").rstrip()
    if not sql:
        raise AudienceError(f"{rel}: the query is empty")
    check_query(sql, rel)
    digest = hashlib.sha256(sql.encode("utf-8")).hexdigest()
    sql = literal_colons(sql)
    used = set(text(sql).compile().binds)
    params = {**{k: v for k, v in (defaults or {}).items() if k in used}, **params}
    missing = sorted(used - params.keys() - set(supplied))
    if missing:
        raise AudienceError(f"{rel}: parameter{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(':' + m for m in missing)} not given"
                            + (f" ({hint})" if hint else ""))
    unused = sorted(params.keys() - used)
    if unused:
        raise AudienceError(f"{rel}: unknown parameter{'s' if len(unused) > 1 else ''} "
                            f"{', '.join(unused)} (the SQL uses: "
                            f"{', '.join(sorted(used)) or 'none'})")
    _check_lists(sql, rel, params)
    return Segment(name, rel, sql, digest, {k: params[k] for k in used if k in params})


def statement(sql: str, params: Mapping[str, Any]) -> TextClause:
    """``sql`` as a statement for ``params``: a list value is an expanding parameter, so
    ``IN :ids`` is sent as ``IN (?, ?, ...)`` with each item bound on its own."""
    return text(sql).bindparams(*(bindparam(name, expanding=True)
                                  for name, value in params.items() if isinstance(value, list)))


def driver_query(sql: str, params: Mapping[str, Any], dialect: Dialect) -> tuple[str, Any]:
    """``sql`` and ``params`` as ``dialect``'s DB-API driver takes them, for a query run
    on the driver's own cursor: its parameter style, each list expanded."""
    compiled = statement(sql, params).params(dict(params)).compile(
        dialect=dialect, compile_kwargs={"render_postcompile": True})
    values = compiled.construct_params()
    return str(compiled), ([values[n] for n in compiled.positiontup or ()]
                           if compiled.positional else values)


QUERY_WORDS = ("select", "with", "values")
_COMMENTS_AND_STRINGS = re.compile(r"--[^\n]*|/\*.*?\*/|'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"",
                                   re.S)
_BIND = re.compile(r"(?<![:\w\\]):(\w+)(?!:)")  # a :name, as text() finds them
_BEFORE_A_LIST = re.compile(r"\bIN\s*$", re.I)


def literal_colons(sql: str) -> str:
    """``sql`` with each colon inside a comment, a quoted string or a quoted name escaped,
    so that only a ``:name`` in the statement itself binds a parameter: a JSON literal
    (``'{"vip":true}'``) or a comment (``-- the last :days``) stays as written."""
    return _COMMENTS_AND_STRINGS.sub(lambda m: m.group(0).replace(":", "\\:"), sql)


def _bare(sql: str) -> str:
    """The SQL without its comments, and with every quoted string or name emptied."""
    return _COMMENTS_AND_STRINGS.sub(lambda m: " " if m.group(0)[0] in "-/" else "''", sql)


def _check_lists(sql: str, rel: str, params: Mapping[str, Any]) -> None:
    """A list is bound as one value per item, which only ``IN :name`` takes: anywhere
    else (``= :ids``, ``IN (:ids)``) it is refused before the query runs, naming it."""
    lists = {name for name, value in params.items() if isinstance(value, list)}
    if not lists:
        return
    bare = _bare(sql)
    for found in _BIND.finditer(bare):
        name = found.group(1)
        if name in lists and not _BEFORE_A_LIST.search(bare, 0, found.start()):
            raise AudienceError(f"{rel}: parameter :{name} is a list, which binds only as "
                                f"IN :{name} (written without parentheses: each item is "
                                "bound on its own)")


def check_query(sql: str, rel: str) -> None:
    """A segment is one query: sources are read, never written. A statement that is not
    a SELECT (or WITH / VALUES) or a second statement is refused before anything runs;
    the source's read-only connection stops what a query hides (a writing CTE)."""
    bare = _bare(sql)
    words = bare.replace("(", " ( ").split()
    first = next((w for w in words if w != "("), "").lower()
    if first not in QUERY_WORDS:
        raise AudienceError(f"{rel}: not a query: a segment is one SELECT statement, this "
                            f"one starts with {first.upper() or 'nothing'} (sources are read, "
                            "never written)")
    if ";" in bare:
        raise AudienceError(f"{rel}: more than one statement: a segment is one SELECT "
                            "statement")


def probe_columns(ws: Workspace, flow: FlowSpec, segment: Segment) -> list[str]:
    """The segment's result columns, without fetching its rows."""
    return probe(ws, flow.audience.source, segment, segment.params)


def probe(ws: Workspace, source: str, segment: Segment, params: Mapping[str, Any]
          ) -> list[str]:
    """A query's result columns on ``source``, without fetching its rows."""
    engine = ws.source(source)
    wrapped = f"SELECT * FROM (\n{segment.sql}\n) AS herald_probe LIMIT 0"
    try:
        with engine.connect() as conn:
            columns = list(conn.execute(statement(wrapped, params), dict(params)).keys())
    except DBAPIError as exc:
        raise AudienceError(f"{segment.file}: the query failed: {db_message(exc)}") from None
    twice = _named_twice(columns)
    if twice:
        raise AudienceError(f"{segment.file}: the result has more than one column named "
                            f"'{twice}': give each its own name (AS ...); a recipient's "
                            "row, and so the templates, would hold only one of them")
    return columns


def _named_twice(columns: list[str]) -> str | None:
    """A column name the result has more than once: as it is (Postgres), or as SQLite
    renames the second in a subquery (``score:1``; its names are case-insensitive)."""
    seen: set[str] = set()
    for name in columns:
        if name.lower() in seen:
            return name
        seen.add(name.lower())
    for name in columns:
        base, colon, number = name.rpartition(":")
        if colon and number.isdigit() and base.lower() in seen:
            return base
    return None


def db_message(exc: DBAPIError) -> str:
    return driver_message(exc)
