"""The ledger: one row per recipient per run key, with a status and the reason for it.

A row's life: the contact policy reserves it as ``queued`` (inside one transaction with
the cap checks), the dispatcher marks a batch ``sending`` just before handing it to the
provider, and the provider's answer settles it as ``sent``, ``failed`` or ``deferred``
(a retryable answer that outlasted the run's retries: a later run of the run key tries
again after ``not_before``). Recipients the
policy stops are written straight away as ``held_out``, ``suppressed``, ``capped``,
``no_address`` or ``render_error``; those waiting for an experiment's winner as
``deferred`` (until the decision), and ``stopped`` when it found none and stops the rest.
Each row keeps the content ``variant`` the recipient got (experiments). The unique key
(flow, run_key, recipient) is what makes a rerun, a retried task or a resumed crash send
nobody twice: at most one message per recipient per run key, whichever channel carries
it.

A ``queued`` row was never handed to a provider, so a later run with the same run key
sends it. A ``sending`` row's outcome is unknown (the process died while the provider
had it); it is never resent automatically.

This module holds the rows' model and their state changes, each written per chunk or per
batch in one statement; what reads the ledger (cap counts, reports) is in
:mod:`herald.delivery.ledger_reads`, the runs' own records in
:mod:`herald.delivery.run_records`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any

import orjson
from sqlalchemy import (
    Connection,
    Engine,
    String,
    any_,
    bindparam,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import UserDefinedType

from herald.core import clock
from herald.core.db import SQLITE_JSON, at_driver, copy_text, deliveries, to_driver, writing

log = logging.getLogger("herald.ledger")


def now() -> datetime:
    """Herald's clock (see herald.core.clock): what the ledger stamps and caps count by."""
    return clock.now()


def message_id(flow: str, run_key: str, recipient: str) -> str:
    """Stable per (flow, run key, recipient): a provider can use it to drop duplicates."""
    digest = hashlib.sha256(f"{flow}\x00{run_key}\x00{recipient}".encode()).hexdigest()
    return f"<{digest[:32]}.{flow}@herald>"


@dataclass(slots=True)
class Entry:
    """A ledger row to write."""

    recipient: str
    tier: str
    status: str
    channel: str | None = None
    address: str | None = None
    reason: str | None = None
    not_before: datetime | None = None
    variant: str | None = None


@dataclass(frozen=True)
class Existing:
    """What the ledger already holds for a recipient under this run key."""

    status: str
    channel: str | None
    tier: str
    address: str | None
    not_before: datetime | None
    variant: str | None = None
    run_id: str | None = None  # the run that wrote or last took over the row

    def due(self, at: datetime) -> bool:
        """A deferred row whose time has come (quiet hours over, provider back-off done)."""
        if self.status != "deferred" or self.not_before is None:
            return False
        when = self.not_before
        return (when if when.tzinfo else when.replace(tzinfo=UTC)) <= at


@dataclass(slots=True)
class Outcome:
    """A settled send: what to write back to a ``sending`` row."""

    recipient: str
    status: str  # sent | failed | deferred (a retryable answer: a later run tries again)
    reason: str | None = None
    code: str | None = None
    provider_id: str | None = None
    attempts: int = 1  # provider attempts of this send, added to the row's earlier ones
    segments: int | None = None
    not_before: datetime | None = None  # deferred: not sent again before this


def reserve_lock(conn: Connection) -> None:
    """Serialise reservations (cap checks and the rows they write) across runs, journeys
    and workers. SQLite: the ``writing`` transaction's BEGIN IMMEDIATE already holds the
    database's write lock. Postgres: one advisory transaction lock."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7242817)")


def release_render_errors(engine: Engine, flow: str, run_key: str) -> int:
    """Forget the ``render_error`` rows of a run key (after the template was fixed), so
    the next run with that key decides for those recipients afresh (suppression, caps,
    quiet hours) and sends to them; rows already sent or settled otherwise stay."""
    with writing(engine) as conn:
        return int(conn.execute(deliveries.delete().where(
            deliveries.c.flow == flow, deliveries.c.run_key == run_key,
            deliveries.c.status == "render_error")).rowcount or 0)


def rewrite(conn: Connection, entries: Iterable[Entry], *, flow: str, run_key: str,
            run_id: str) -> None:
    """Decide again for deferred rows: the row keeps its place, takes the new outcome."""
    stamp = now()
    for e in entries:
        conn.execute(update(deliveries).where(
            deliveries.c.flow == flow, deliveries.c.run_key == run_key,
            deliveries.c.recipient == e.recipient).values(
            status=e.status, channel=e.channel, address=e.address, reason=e.reason,
            not_before=e.not_before, variant=e.variant, run_id=run_id, created_at=stamp,
            updated_at=stamp))


ENTRY_COLUMNS = ("flow", "run_key", "recipient", "run_id", "package_id", "tier", "channel",
                 "address", "status", "reason", "attempts", "priority", "counted",
                 "not_before", "variant", "created_at", "updated_at")


def write_entries(conn: Connection, entries: Iterable[Entry], *, flow: str, run_key: str,
                  run_id: str, package_id: str, priority: int = 0, counted: bool = True,
                  at: datetime | None = None) -> None:
    """Write new rows in one statement: COPY on Postgres, one executemany elsewhere."""
    stamp = at or now()
    if conn.dialect.name == "postgresql":
        _copy_entries(conn, list(entries), flow, run_key, run_id, package_id, priority,
                      counted, stamp)
        return
    rows = [(flow, run_key, e.recipient, run_id, package_id, e.tier, e.channel, e.address,
             e.status, e.reason, 0, priority, counted, e.not_before, e.variant, stamp, stamp)
            for e in entries]
    if not rows:
        return
    # elsewhere (SQLite) one executemany at the driver: the times converted once, not
    # by SQLAlchemy for each value of each row
    when = to_driver(conn, deliveries.c.created_at)
    fixed = when(stamp)
    conn.exec_driver_sql(_INSERT_SQL, [
        (*row[:13], when(row[13]) if row[13] is not None else None, row[14], fixed, fixed)
        for row in rows])


def _copy_entries(conn: Connection, entries: list[Entry], flow: str, run_key: str,
                  run_id: str, package_id: str, priority: int, counted: bool,
                  stamp: datetime) -> None:
    """Postgres: the rows as COPY's text, written whole. The columns every row shares
    (flow, run key, run, package, attempts, priority, counted, times) are formatted once;
    psycopg's ``write_row`` formatted all seventeen for each row, 6.2 µs of CPU a row
    against 1.6 here at the median (BENCHMARKS.md)."""
    if not entries:
        return
    head = f"{copy_text(flow)}\t{copy_text(run_key)}\t"
    middle = f"\t{copy_text(run_id)}\t{copy_text(package_id)}\t"
    tail = f"\t0\t{int(priority)}\t{'t' if counted else 'f'}\t"
    when = f"\t{stamp.isoformat()}\t{stamp.isoformat()}\n"
    text_ = "".join([
        f"{head}{copy_text(e.recipient)}{middle}{copy_text(e.tier)}\t"
        f"{_copy_or_null(e.channel)}\t{_copy_or_null(e.address)}\t{copy_text(e.status)}\t"
        f"{_copy_or_null(e.reason)}{tail}"
        f"{NULL_FIELD if e.not_before is None else e.not_before.isoformat()}\t"
        f"{_copy_or_null(e.variant)}{when}" for e in entries])
    statement = f"COPY {deliveries.name} ({', '.join(ENTRY_COLUMNS)}) FROM STDIN"
    with at_driver(conn, statement) as raw, raw.cursor() as cursor, \
            cursor.copy(statement) as copy:
        copy.write(text_)


NULL_FIELD = "\\N"  # NULL in COPY's text format


def _copy_or_null(value: str | None) -> str:
    return NULL_FIELD if value is None else copy_text(value)


_INSERT_SQL = (f"INSERT INTO {deliveries.name} ({', '.join(ENTRY_COLUMNS)}) "
               f"VALUES ({', '.join('?' for _ in ENTRY_COLUMNS)})")


def adopt(conn: Connection, flow: str, run_key: str, recipients: Sequence[str],
          run_id: str) -> None:
    """Take over ``queued`` rows left by an earlier run with the same run key."""
    for part in among(conn, deliveries.c.recipient, recipients):
        conn.execute(update(deliveries).where(
            deliveries.c.flow == flow, deliveries.c.run_key == run_key,
            deliveries.c.status == "queued", part).values(
            run_id=run_id, updated_at=now()))


def withdraw(conn: Connection, flow: str, rows: Sequence[tuple[str, str, str]]) -> None:
    """Settle the still unsent (``queued`` or ``deferred``) rows of (run key, recipient,
    reason) as ``withdrawn`` with the reason: a journey's enrollment left before its
    message went out, so it neither goes out later nor counts against caps. A row that
    is already sent or settled is left as it is."""
    if not rows:
        return
    d = deliveries.c
    stamp = now()
    conn.execute(update(deliveries).where(
        d.flow == flow, d.run_key == bindparam("w_run_key"),
        d.recipient == bindparam("w_recipient"),
        or_(d.status == "queued", d.status == "deferred")  # (no IN: an executemany)
    ).values(status="withdrawn", reason=bindparam("w_reason"), not_before=None,
             updated_at=stamp),
        [{"w_run_key": k, "w_recipient": r, "w_reason": why} for k, r, why in rows])


def mark(engine: Engine, flow: str, run_key: str, recipients: Sequence[str], status: str,
         reason: str | None = None) -> None:
    """Move rows to ``status`` (e.g. ``sending`` just before a batch goes out): one
    statement written for the driver, the recipients bound as one array (Postgres) or
    JSON array (SQLite); SQLAlchemy's compiling of the UPDATE for every batch was half
    of Herald's CPU for a mark (BENCHMARKS.md)."""
    with writing(engine) as conn:
        name = conn.dialect.name
        if name == "postgresql":
            statement = _MARK_PG[reason is not None]
            with at_driver(conn, statement) as raw, raw.cursor() as cursor:
                cursor.execute(statement, {
                    "status": status, "stamp": now(), "reason": reason, "flow": flow,
                    "run_key": run_key, "keys": pg_text_array(list(recipients))})
            return
        if name == "sqlite" and SQLITE_JSON:
            stamp = to_driver(conn, deliveries.c.updated_at)(now())
            conn.exec_driver_sql(_MARK_SQLITE[reason is not None], (
                status, stamp, *(() if reason is None else (reason,)), flow, run_key,
                orjson.dumps(list(recipients)).decode()))
            return
        for part in among(conn, deliveries.c.recipient, recipients):
            values: dict[str, Any] = {"status": status, "updated_at": now()}
            if reason is not None:
                values["reason"] = reason
            conn.execute(update(deliveries).where(
                deliveries.c.flow == flow, deliveries.c.run_key == run_key, part
            ).values(**values))


# mark's statements, without and with a reason (on Postgres the keys a text[] parameter,
# as among() binds them: not a cast in the statement, which a sequential scan evaluated
# for every row)
_MARK_PG = {with_reason: (
    f"UPDATE {deliveries.name} SET status = %(status)s, updated_at = %(stamp)s"
    + (", reason = %(reason)s" if with_reason else "")
    + " WHERE flow = %(flow)s AND run_key = %(run_key)s"
      " AND recipient = ANY(%(keys)s)") for with_reason in (False, True)}
_MARK_SQLITE = {with_reason: (
    f"UPDATE {deliveries.name} SET status = ?, updated_at = ?"
    + (", reason = ?" if with_reason else "")
    + " WHERE flow = ? AND run_key = ? AND recipient IN (SELECT value FROM json_each(?))")
    for with_reason in (False, True)}


def settle(engine: Engine, flow: str, run_key: str, outcomes: Sequence[Outcome]) -> None:
    """Write providers' answers for a batch in one transaction and one statement: on
    Postgres one UPDATE ... FROM the answers bound as arrays (a column they all share as
    one value), on SQLite one UPDATE ... FROM the answers as a JSON array (an executemany
    before SQLite 3.38)."""
    if not outcomes:
        return
    stamp = now()
    # The providers have answered: a store that is locked for a while (a backup, a long
    # report, another worker) must not leave these rows `sending` for ever. Each attempt
    # waits SETTLE_WAIT for the lock, and a few attempts are made before giving up loudly.
    for attempt in range(1, SETTLE_ATTEMPTS + 1):
        try:
            with _settling(engine) as conn:
                if conn.dialect.name == "postgresql":
                    _settle_arrays(conn, flow, run_key, outcomes, stamp)
                else:
                    _settle_many(conn, flow, run_key, outcomes, stamp)
            return
        except OperationalError as exc:
            text = str(exc.orig or exc).lower()
            locked = any(w in text for w in ("locked", "lock timeout", "lock_timeout",
                                             "could not obtain lock", "deadlock"))
            if not locked or attempt == SETTLE_ATTEMPTS:
                log.error("could not record the answers to %d message(s) of %s %s after "
                          "%d attempt(s): %s. Their rows stay `sending` though the "
                          "providers answered (recipients: %s)", len(outcomes), flow,
                          run_key, attempt, text.splitlines()[0] if text else exc,
                          ", ".join(o.recipient for o in outcomes[:20]))
                raise
            log.warning("the workspace database is locked; recording %d answer(s) again "
                        "(attempt %d of %d)", len(outcomes), attempt + 1, SETTLE_ATTEMPTS)
            time.sleep(min(4.0, 0.5 * 2 ** (attempt - 1)))


_SETTLE_SQL = (f"UPDATE {deliveries.name} SET status = ?, reason = ?, code = ?, "
               "provider_id = ?, attempts = attempts + ?, updated_at = ?, sent_at = ?, "
               "segments = ?, not_before = ? WHERE flow = ? AND run_key = ? "
               "AND recipient = ?")


def _settle_many(conn: Connection, flow: str, run_key: str, outcomes: Sequence[Outcome],
                 stamp: datetime) -> None:
    """SQLite: one UPDATE ... FROM the answers as a JSON array (an executemany where
    SQLite is older than 3.38), the times converted once."""
    when = to_driver(conn, deliveries.c.updated_at)
    fixed = when(stamp)
    if not SQLITE_JSON:
        conn.exec_driver_sql(_SETTLE_SQL, [
            (o.status, o.reason, o.code, o.provider_id, o.attempts, fixed,
             fixed if o.status == "sent" else None, o.segments,
             when(o.not_before) if o.not_before is not None else None, flow, run_key,
             o.recipient) for o in outcomes])
        return
    answers = orjson.dumps([
        (o.recipient, o.status, o.reason, o.code, o.provider_id, o.attempts, o.segments,
         when(o.not_before) if o.not_before is not None else None) for o in outcomes])
    conn.exec_driver_sql(_SETTLE_JSON, (fixed, fixed, answers.decode(), flow, run_key))


# the answers of a batch as one JSON array of [recipient, status, reason, code,
# provider_id, attempts, segments, not_before]: the rows are matched and written inside
# SQLite instead of one statement execution per answer through the driver
_SETTLE_JSON = f"""
WITH a AS MATERIALIZED (
    SELECT value ->> 0 AS recipient, value ->> 1 AS status, value ->> 2 AS reason,
           value ->> 3 AS code, value ->> 4 AS provider_id, value ->> 5 AS attempts,
           value ->> 6 AS segments, value ->> 7 AS not_before
    FROM json_each(?3))
UPDATE {deliveries.name} AS d
SET status = a.status, reason = a.reason, code = a.code, provider_id = a.provider_id,
    attempts = d.attempts + a.attempts, updated_at = ?1,
    sent_at = CASE WHEN a.status = 'sent' THEN ?2 END, segments = a.segments,
    not_before = a.not_before
FROM a
WHERE d.flow = ?4 AND d.run_key = ?5 AND d.recipient = a.recipient
"""
# (materialised, so that SQLite walks the answers and looks each row up by its key,
# not the run key's rows with a scan of the answers for each)


# One statement for a whole batch: the answers travel as one array per column, except
# the columns every answer of the batch shares (all `sent`, no reason, one attempt...),
# which travel as one value each: the server neither parses nor unnests those arrays
# (settling 100,000 rows in batches of 500: 0.3-0.5 µs a row less, BENCHMARKS.md).
_SETTLE_TYPES = {"recipient": "text", "status": "text", "reason": "text", "code": "text",
                 "provider_id": "text", "attempts": "int", "segments": "int",
                 "not_before": "timestamptz"}


@functools.cache
def _settle_statement(shared: frozenset[str]) -> str:
    """The settlement's UPDATE with the ``shared`` columns as single values."""
    varying = [c for c in _SETTLE_TYPES if c not in shared]

    def value(column: str) -> str:
        return f"%({column})s::{_SETTLE_TYPES[column]}" if column in shared else f"a.{column}"

    arrays = ", ".join(f"%({c})s::{_SETTLE_TYPES[c]}[]" for c in varying)
    return f"""
UPDATE {deliveries.name} AS d
SET status = {value("status")}, reason = {value("reason")}, code = {value("code")},
    provider_id = {value("provider_id")}, attempts = d.attempts + {value("attempts")},
    updated_at = %(stamp)s, sent_at = CASE WHEN {value("status")} = 'sent' THEN %(stamp)s END,
    segments = {value("segments")}, not_before = {value("not_before")}
FROM unnest({arrays}) AS a({", ".join(varying)})
WHERE d.flow = %(flow)s AND d.run_key = %(run_key)s AND d.recipient = a.recipient
"""


def _settle_arrays(conn: Connection, flow: str, run_key: str, outcomes: Sequence[Outcome],
                   stamp: datetime) -> None:
    params: dict[str, Any] = {"flow": flow, "run_key": run_key, "stamp": stamp}
    shared = set()
    for column in _SETTLE_TYPES:
        values = [getattr(o, column) for o in outcomes]
        first = values[0]
        if column != "recipient" and values.count(first) == len(values):
            shared.add(column)
            params[column] = first
        else:
            params[column] = pg_array(values)
    statement = _settle_statement(frozenset(shared))
    with at_driver(conn, statement) as raw, raw.cursor() as cursor:
        cursor.execute(statement, params)


SETTLE_ATTEMPTS = 6
SETTLE_WAIT = 5.0  # seconds each attempt waits for a lock


@contextmanager
def _settling(engine: Engine) -> Iterator[Connection]:
    """``writing`` with a lock wait of SETTLE_WAIT (SQLite's busy timeout, Postgres's
    lock_timeout) instead of the store's 30 s, so that settle retries instead."""
    with engine.connect().execution_options(immediate=True) as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            raw = conn.connection.dbapi_connection
            assert raw is not None
            raw.execute(f"PRAGMA busy_timeout = {int(SETTLE_WAIT * 1000)}")
        try:
            with conn.begin():
                if not sqlite and conn.dialect.name == "postgresql":
                    conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{int(SETTLE_WAIT)}s'")
                yield conn
        finally:
            if sqlite and raw is not None:
                raw.execute("PRAGMA busy_timeout = 30000")


def refresh_statistics(engine: Engine, written: int) -> None:
    """Let Postgres's planner see the ledger as it is after ``written`` rows were
    reserved (by this run so far, or this tick).

    A run's first chunks fill a table the planner last saw empty; with those statistics
    it scans every row of the run key for each batch's ``recipient = ANY(...)`` instead
    of using the index, and a million-recipient run turns quadratic. So the statistics
    are refreshed while they describe a table less than half the size of what was
    written (never analysed: ``reltuples`` -1): on a fresh ledger after about 1, 3, 7,
    15... chunks' worth of rows; on a ledger already holding earlier runs, not at all.
    The whole table is analysed: analysing only the filtered columns cost a third as
    much but left the expression index's statistics (``lower(address)``) out, and the
    planner then read the whole run key for each chunk's deduplication (0.82 s against
    0.14 s for 10,000 addresses among 1,000,000 rows; BENCHMARKS.md). It samples 3,000
    rows (a statistics target of 10) instead of the default 30,000: the plans need the
    table's size and that recipients and addresses are distinct, which the smaller
    sample tells as well, and an ANALYZE of 100,000 rows took 20 ms instead of 170-180
    (autovacuum's later analyses use the server's own target).
    """
    if engine.dialect.name != "postgresql":
        return
    with engine.connect() as conn:
        known = conn.execute(text("SELECT reltuples FROM pg_class WHERE oid = "
                                  "to_regclass(:table)"), {"table": deliveries.name}
                             ).scalar()
        if known is not None and known >= written / 2:
            return
        conn.execute(text(f"SET LOCAL default_statistics_target = {ANALYZE_TARGET}"))
        conn.execute(text(f"ANALYZE {deliveries.name}"))
        conn.commit()


ANALYZE_TARGET = 10  # refresh_statistics: Postgres samples 300 rows per unit


def among(conn: Connection, column: ColumnElement[Any], values: Sequence[str]
          ) -> Iterator[ColumnElement[bool]]:
    """``column IN values`` as conditions, one per slice of up to 20,000 values, each
    slice bound as a single parameter: an array on Postgres (``= ANY``), a JSON array
    read by ``json_each`` on SQLite (IN lists of 500 where SQLite is older than 3.38).
    An IN list of hundreds of parameters cost more to render, parse and plan than to
    run (on SQLite, SQLAlchemy rendering a chunk's IN lists was a fifth of a dry run),
    and its text changes with its length, so no statement cache keeps it.
    """
    for i in range(0, len(values), 20_000):
        part = values[i:i + 20_000]
        if conn.dialect.name == "postgresql":
            yield column == any_(bindparam(None, pg_text_array(part), type_=_TextArray()))
        elif not SQLITE_JSON:
            for j in range(0, len(part), 500):  # within SQLite's bound-parameter limit
                yield column.in_(part[j:j + 500])
        else:
            each = func.json_each(bindparam(None, orjson.dumps(part).decode(),
                                            type_=String)).table_valued("value")
            yield column.in_(select(each.c.value))


class PgTextArray(str):
    """A ``text[]`` parameter already written as Postgres's array text (:func:`pg_array`),
    sent as such: the server parses it once, as a parameter of that type."""

    __slots__ = ()


def pg_text_array(values: Sequence[str]) -> PgTextArray:
    _register_text_array()
    return PgTextArray(pg_array(values))


@cache
def _register_text_array() -> None:
    from psycopg import adapters
    from psycopg.adapt import Dumper
    from psycopg.postgres import types

    class TextArrayDumper(Dumper):
        oid = types["text"].array_oid

        def dump(self, obj: Any) -> bytes:
            return str(obj).encode()

    adapters.register_dumper(PgTextArray, TextArrayDumper)


class _TextArray(UserDefinedType[str]):
    """A bound ``text[]`` that SQLAlchemy passes on as it is (a :class:`PgTextArray`).
    Not a cast in the statement: a cast of text to an array is not folded by the
    planner, and a sequential scan evaluated it for every row."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "TEXT[]"

    def bind_processor(self, dialect: Any) -> None:
        return None


def pg_array(values: Sequence[Any]) -> str:
    """``values`` as the text of a Postgres array (``{"a","b",NULL}``), for a parameter
    cast to an array type: joined in one step where no value needs escaping. psycopg's
    own list adaptation works value by value in Python, and was a tenth of a run's CPU
    on Postgres (the ledger's and the policy's recipient sets, the settlements)."""
    if not values:
        return "{}"
    kinds = set(map(type, values))
    if kinds == {str}:
        joined = '","'.join(values)
        # no value holds a quote or a backslash: the only quotes are the separators'
        if "\\" not in joined and joined.count('"') == 2 * (len(values) - 1):
            return '{"' + joined + '"}'
    elif kinds == {type(None)}:
        return "{" + ",".join(["NULL"] * len(values)) + "}"
    elif kinds == {int}:
        return "{" + ",".join(map(str, values)) + "}"
    return "{" + ",".join(_pg_element(v) for v in values) + "}"


def _pg_element(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, int):
        return str(value)
    text = value.isoformat() if isinstance(value, datetime) else str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
