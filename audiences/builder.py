"""Building a package: a segment's rows stored in the workspace database as a new,
immutable package (``herald.audiences.store`` holds packages and reads them).

Two ways, which write the same rows and refuse the same segments with the same
messages (tests/test_store_paths.py):

- Inside the database: when the source and the workspace database are both SQLite
  files, the source is opened read-only (``mode=ro``: never written, never created),
  the workspace database attached, and one ``INSERT ... SELECT`` writes the rows
  (``herald.audiences.inplace`` writes the statement).
- Streamed through Herald: the segment's rows fetched in batches from the driver's
  cursor (server-side on Postgres, on the source's read-only session), encoded once to
  JSON and stored with one COPY for the whole build on Postgres; on SQLite one
  ``INSERT ... SELECT`` a batch over the batch as one JSON array, written by a thread
  of its own beside the next batch's fetching and encoding. Memory stays O(batch)
  whatever the audience size.

A Postgres source and store in one database stream too: an ``INSERT ... SELECT`` there
would run the segment in the store's writable session, where a function the segment
calls could write, and it measured no faster than the streamed COPY (BENCHMARKS.md).
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from itertools import repeat
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import DBAPIError

from herald.audiences import inplace
from herald.audiences.sql import Segment, db_message, driver_query, statement
from herald.audiences.store import (
    INSERT_BATCH,
    Package,
    discard,
    encode_row,
    encode_value,
    get,
    integrity_errors,
    json_default,
)
from herald.core import clock
from herald.core.db import (
    SQLITE_JSON,
    at_driver,
    copy_escapes,
    copy_text,
    driver_mark,
    driver_message,
    from_database,
    not_utf8_text,
    package_rows,
    packages,
    process_owner,
    writing,
)
from herald.core.errors import AudienceError
from herald.core.spec import DEFAULT_TIER, FlowSpec
from herald.core.workspace import Workspace

log = logging.getLogger("herald.audiences")


def build(ws: Workspace, flow: FlowSpec, segment: Segment, *, stream: bool = False
          ) -> Package:
    """Run ``segment`` and store its rows as a new, immutable package.

    When the source and the workspace database are both SQLite files, the source is
    opened read-only with the workspace database attached and the rows are written by
    one ``INSERT ... SELECT`` that never brings them through Python; otherwise, or with
    ``stream``, they are streamed through Herald in batches. Both write the same rows
    and refuse the same segments with the same messages.
    """
    source = ws.source(flow.audience.source)
    store = ws.store
    package_id = f"pkg-{secrets.token_hex(5)}"
    with writing(store) as conn:
        conn.execute(insert(packages).values(
            id=package_id, flow=flow.name, segment=segment.name, source=flow.audience.source,
            sql_sha256=segment.sha256, params=json.dumps(segment.params),
            key_column=flow.audience.key, tier_column=flow.audience.tier, columns="[]",
            built_at=clock.now(), size=0, tiers="{}", status="building",
            owner=process_owner()))
    try:
        built = None if stream else _build_in_database(source, store, flow, segment,
                                                        package_id)
        how = "inside the database"
        if built is None:
            built = _build_streamed(source, store, flow, segment, package_id)
            how = "streamed through Herald"
    except DBAPIError as exc:
        discard(store, package_id)
        if from_database(exc, store):  # the workspace database failed, not the segment
            raise
        raise AudienceError(f"{segment.file}: the query failed: {db_message(exc)}") from None
    except BaseException:
        discard(store, package_id)
        raise
    tiers, columns = built
    with writing(store) as conn:
        conn.execute(update(packages).where(packages.c.id == package_id).values(
            size=sum(tiers.values()), tiers=json.dumps(dict(sorted(tiers.items()))),
            columns=json.dumps(columns), status="ready"))
    log.info("package %s: %d rows built %s", package_id, sum(tiers.values()), how)
    return get(ws, package_id)


def _check_columns(columns: list[str], flow: FlowSpec, segment: Segment) -> None:
    for needed, what in ((flow.audience.key, "audience.key"),
                         (flow.audience.tier, "audience.tier")):
        if needed and needed not in columns:
            raise AudienceError(f"{segment.file}: the result has no column "
                                f"'{needed}' ({what}; columns: {', '.join(columns)})")


def _null_key(segment: Segment, key_col: str, row: int) -> AudienceError:
    return AudienceError(f"{segment.file}: row {row} has NULL in key column '{key_col}'")


def _duplicates(segment: Segment, dup: list[str]) -> AudienceError:
    shown = ", ".join(repr(k) for k in sorted(dup)[:5])
    return AudienceError(f"{segment.file}: duplicate key{'s' if len(dup) > 1 else ''} {shown} "
                         "in the result: each recipient must appear once (a duplicate would "
                         "be sent twice)")


def _driver_error(segment: Segment, exc: BaseException) -> AudienceError:
    return AudienceError(f"{segment.file}: the query failed: {driver_message(exc)}")


# -- streamed through Herald ------------------------------------------------------------
def _build_streamed(source: Engine, store: Engine, flow: FlowSpec, segment: Segment,
                    package_id: str) -> tuple[Counter[str], list[str]]:
    """Stream the segment's rows from the source and write them to the store in batches.

    Rows are fetched from the driver's (server-side, where there is one) cursor as plain
    tuples: SQLAlchemy's Row objects cost as much as the database's own work."""
    try:
        return _stream(source, store, flow, segment, package_id,
                       source.dialect.loaded_dbapi.Error)
    except integrity_errors():  # at the end of Postgres's COPY: its rows are gone
        raise _duplicates(segment, _source_duplicates(source, segment, flow.audience.key)
                          ) from None


def _stream(source: Engine, store: Engine, flow: FlowSpec, segment: Segment,
            package_id: str, driver_error: type[Exception]
            ) -> tuple[Counter[str], list[str]]:
    with source.connect() as src:
        try:
            return _stream_from(src, store, flow, segment, package_id, driver_error)
        except BaseException as exc:
            if not isinstance(exc, Exception):
                # a signal (Ctrl-C, or SIGTERM: Prefect's TerminationSignal) while the
                # source runs the query: the connection is closed, not handed back to the
                # pool, whose rollback on a connection still busy failed with a
                # traceback; closing it ends the query on the server too
                src.invalidate()
            raise


def _stream_from(src: Connection, store: Engine, flow: FlowSpec, segment: Segment,
                 package_id: str, driver_error: type[Exception]
                 ) -> tuple[Counter[str], list[str]]:
    key_col, tier_col = flow.audience.key, flow.audience.tier
    tiers: Counter[str] = Counter()
    size = 0
    with ExitStack() as stack:
        try:
            fetch, columns = _open_rows(src, segment, stack)
        except driver_error as exc:
            raise _driver_error(segment, exc) from None
        _check_columns(columns, flow, segment)
        key_at = columns.index(key_col)
        tier_at = columns.index(tier_col) if tier_col else None
        dumps = orjson.dumps
        write = stack.enter_context(_row_writer(store, package_id, segment))
        while True:
            try:
                batch = fetch()
            except driver_error as exc:
                raise _driver_error(segment, exc) from None
            if not batch:
                break
            keys = [row[key_at] for row in batch]
            if None in keys:
                raise _null_key(segment, key_col, size + keys.index(None) + 1)
            names = [k if type(k) is str else str(k) for k in keys]
            if tier_at is None:
                tier_names = [DEFAULT_TIER] * len(batch)
            else:
                tier_names = [DEFAULT_TIER if row[tier_at] is None else str(row[tier_at])
                              for row in batch]
            tiers.update(tier_names)
            # one comprehension, no call per row: orjson takes all but huge integers; a
            # row has a value per column (the cursor's), and strict= costs 40% of the zip
            try:
                data = [dumps(dict(zip(columns, row, strict=False)),
                              default=json_default).decode() for row in batch]
            except TypeError:
                data = [encode_row(dict(zip(columns, row, strict=False))) for row in batch]
            write(size, names, tier_names, data)
            size += len(batch)
    return tiers, columns


def _open_rows(src: Connection, segment: Segment, stack: ExitStack
               ) -> tuple[Callable[[], Sequence[Sequence[Any]]], list[str]]:
    """The segment's rows, a batch a call, and its columns. On SQLite and psycopg the
    driver's own cursor (server-side on Postgres) gives plain tuples; elsewhere
    SQLAlchemy streams them."""
    dialect = src.dialect
    if dialect.name == "sqlite" or dialect.driver == "psycopg":
        sql, params = driver_query(segment.sql, segment.params, dialect)
        driver = src.connection.driver_connection
        assert driver is not None
        cursor = (driver.cursor(name=f"herald_build_{secrets.token_hex(4)}")
                  if dialect.name == "postgresql" else driver.cursor())
        # close the (server-side) cursor on every exit, a duplicate key included
        stack.callback(cursor.close)
        if dialect.name == "sqlite":
            stack.enter_context(signals_reach(driver))
        cursor.execute(sql, params)
        return (lambda: cursor.fetchmany(INSERT_BATCH),
                [d[0] for d in cursor.description])
    result = src.execution_options(stream_results=True, yield_per=INSERT_BATCH).execute(
        statement(segment.sql, segment.params), segment.params)
    stack.callback(result.close)
    return (lambda: result.fetchmany(INSERT_BATCH)), list(result.keys())


BACKSLASH, DOUBLED = "\\", "\\\\"  # JSON from orjson only ever needs its backslashes
# doubled in COPY's text format: it escapes control characters itself


@contextmanager
def _row_writer(store: Engine, package_id: str, segment: Segment
                ) -> Iterator[Callable[[int, list[str], list[str], list[str]], None]]:
    """What stores a batch of rows: on Postgres one COPY for the whole build (in one
    transaction: the server stores a batch while Herald encodes the next; the text
    written whole, not row by row); elsewhere a statement a batch (on SQLite one
    ``INSERT ... SELECT`` over the batch as JSON, an executemany where SQLite is older
    than 3.38 or a key holds a NUL), each in its own short transaction (SQLite's write
    lock is held a batch at a time), written by a thread beside the next batch.

    Both go straight to the driver: building SQLAlchemy parameters for each row cost
    more than the database's own work (see BENCHMARKS.md).
    """
    if store.dialect.name == "postgresql":
        statement = f"COPY {package_rows.name} (package_id, seq, key, tier, data) FROM STDIN"
        with writing(store) as conn, at_driver(conn, statement) as driver, \
                driver.cursor() as cursor, cursor.copy(statement) as copy:
            head = f"{copy_text(package_id)}\t"

            def copy_rows(start: int, keys: list[str], tiers: list[str],
                          data: list[str]) -> None:
                names = "".join(keys) + "".join(tiers)
                if copy_escapes(names):  # rare: escape each
                    keys = [copy_text(k) for k in keys]
                    tiers = [copy_text(t) for t in tiers]
                copy.write("".join([
                    f"{head}{seq}\t{k}\t{t}\t{d.replace(BACKSLASH, DOUBLED)}\n"
                    for seq, k, t, d in zip(range(start, start + len(keys)), keys,
                                            tiers, data, strict=False)]))

            yield copy_rows
        return
    mark = driver_mark(store.dialect)
    statement = (f"INSERT INTO {package_rows.name} (package_id, seq, key, tier, data) "
                 f"VALUES ({', '.join([mark] * 5)})")
    # SQLite: a batch is one statement over its rows as one JSON array of [key, tier,
    # data], which the driver runs without the interpreter lock (an executemany takes
    # the lock back for every row)
    whole = store.dialect.name == "sqlite" and SQLITE_JSON

    def insert_rows(start: int, keys: list[str], tiers: list[str], data: list[str],
                    rows: str | None) -> None:
        try:
            with writing(store) as conn, at_driver(conn, statement) as driver:
                cursor = driver.cursor()
                try:
                    if rows is not None:
                        cursor.execute(_INSERT_JSON, (package_id, start, rows))
                    else:
                        cursor.executemany(statement, zip(
                            repeat(package_id), range(start, start + len(keys)), keys,
                            tiers, data))
                finally:
                    cursor.close()
        except integrity_errors():
            counts = Counter(keys)
            dup = [k for k, n in counts.items() if n > 1]
            if not dup:
                with store.connect() as conn:
                    dup = list(conn.execute(select(package_rows.c.key).where(
                        package_rows.c.package_id == package_id,
                        package_rows.c.key.in_(list(counts)))).scalars())
            raise _duplicates(segment, dup) from None

    # Each batch is written by a thread of its own while the next one is fetched and
    # encoded: the database works without the interpreter lock, so the two overlap on
    # two cores. One batch at most waits to be written (memory stays two batches), and a
    # batch's failure (a duplicate key) is raised at the next batch or at the end.
    with ThreadPoolExecutor(1, thread_name_prefix="herald-build") as writer:
        flight: list[Future[None]] = []

        def write_behind(start: int, keys: list[str], tiers: list[str],
                         data: list[str]) -> None:
            rows = None
            if whole and "\x00" not in "".join(keys) and "\x00" not in "".join(tiers):
                # (SQLite's ->> ends a text at a NUL: such a rare batch goes row by row)
                rows = orjson.dumps(list(zip(keys, tiers, data, strict=True))).decode()
            if flight:
                flight.pop().result()
            flight.append(writer.submit(insert_rows, start, keys, tiers, data, rows))

        try:
            yield write_behind
        except BaseException:
            # the build stops (the package is discarded): the batch in flight ends first,
            # and what it raises is not the build's error
            for future in flight:
                with suppress(Exception):
                    future.result()
            raise
        for future in flight:
            future.result()


_INSERT_JSON = f"""
INSERT INTO {package_rows.name} (package_id, seq, key, tier, data)
SELECT ?1, ?2 + j.key, j.value ->> 0, j.value ->> 1, j.value ->> 2 FROM json_each(?3) AS j
"""


def _source_duplicates(source: Engine, segment: Segment, key_col: str) -> list[str]:
    """The keys (as stored: ``str``) that more than one row of the segment has, found by
    the source itself: what a failed COPY or INSERT ... SELECT no longer holds."""
    query = (f"SELECT k FROM (SELECT {inplace.quote_name(key_col)} AS k FROM (\n{segment.sql}"
             "\n) AS herald_segment) AS keyed WHERE k IS NOT NULL GROUP BY k "
             "HAVING count(*) > 1")
    with source.connect() as src:
        return [str(k) for k in src.execute(statement(query, segment.params),
                                            segment.params).scalars()]


# -- inside the database ----------------------------------------------------------------
def _build_in_database(source: Engine, store: Engine, flow: FlowSpec, segment: Segment,
                       package_id: str) -> tuple[Counter[str], list[str]] | None:
    """Build the package with one INSERT ... SELECT when source and store are one
    database; None (nothing written) when they are not or a column's type needs Python."""
    if source.dialect.name == store.dialect.name == "sqlite":
        source_file, store_file = _sqlite_file(source), _sqlite_file(store)
        if source_file and store_file:
            return _build_in_sqlite(source_file, store_file, flow, segment, package_id)
    return None


def _sqlite_file(engine: Engine) -> Path | None:
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _probe_sql(segment: Segment) -> str:
    return f"SELECT * FROM (\n{segment.sql}\n) AS herald_probe LIMIT 0"


def _build_in_sqlite(source_file: Path, store_file: Path, flow: FlowSpec, segment: Segment,
                     package_id: str) -> tuple[Counter[str], list[str]] | None:
    """The source opened read-only (``mode=ro``: never written, never created) with the
    workspace database attached, and one INSERT ... SELECT into it."""
    conn = sqlite3.connect(f"{source_file.as_uri()}?mode=ro", uri=True, timeout=30,
                           isolation_level=None)
    try:
        with signals_reach(conn):
            return _insert_select(conn, store_file, flow, segment, package_id)
    finally:
        conn.close()


def _insert_select(conn: sqlite3.Connection, store_file: Path, flow: FlowSpec,
                   segment: Segment, package_id: str
                   ) -> tuple[Counter[str], list[str]] | None:
    dialect = sqlite_dialect.dialect()
    conn.create_function("herald_text", 1, str, deterministic=True)
    conn.create_function("herald_json", 1, encode_value, deterministic=True)
    conn.execute("ATTACH DATABASE ? AS herald_store", (f"{store_file.as_uri()}?mode=rw",))
    conn.execute("PRAGMA herald_store.synchronous=NORMAL")

    def run(sql: str, params: dict[str, Any]) -> Any:
        return conn.execute(*driver_query(sql, params, dialect))

    try:
        columns = [d[0] for d in run(_probe_sql(segment), segment.params).description]
    except sqlite3.Error as exc:
        raise _driver_error(segment, exc) from None
    _check_columns(columns, flow, segment)
    if any(_renamed_twin(name, columns) for name in columns):
        # a name twice: SQLite calls the second "name:1" in a subquery, the streamed
        # build keeps the last of the two, as a dict does
        return None
    row = inplace.sqlite_row(columns, flow.audience.key, flow.audience.tier, DEFAULT_TIER)
    params = {**segment.params, **row.params, "herald_package": package_id}
    conn.execute("BEGIN IMMEDIATE")
    try:
        run(inplace.insert_select(f"herald_store.{package_rows.name}", segment.sql, row),
            params)
        _refuse_text_not_utf8(conn, f"herald_store.{package_rows.name}", package_id,
                              segment)
        tiers = Counter(dict(conn.execute(
            f"SELECT tier, count(*) FROM herald_store.{package_rows.name} "
            "WHERE package_id = ? GROUP BY tier", (package_id,)).fetchall()))
        conn.execute("COMMIT")
    except sqlite3.IntegrityError:
        conn.execute("ROLLBACK")
        null_at = run(inplace.null_key_sql(segment.sql, flow.audience.key),
                      segment.params).fetchone()
        if null_at:
            raise _null_key(segment, flow.audience.key, null_at[0]) from None
        dup = [k for (k,) in run(inplace.duplicate_keys_sql(segment.sql, row),
                                 params).fetchall()]
        raise _duplicates(segment, dup) from None
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise _driver_error(segment, exc) from None
    except AudienceError:
        conn.execute("ROLLBACK")
        raise
    return tiers, columns


NOT_UTF8_SPAN = 50_000  # rows checked in one piece for text that is not UTF-8


def _refuse_text_not_utf8(conn: sqlite3.Connection, table: str, package_id: str,
                          segment: Segment) -> None:
    """SQLite keeps text as the bytes it was given, so a source's value in another
    encoding went into the package, and every read of it failed (a run's chunks, with
    the value in the message). The streamed build meets it as it reads the source; here
    the package's rows are checked after the INSERT, a span of rows joined by SQLite and
    decoded at once (5-7% of the build's time at 100,000 rows), the offending row found
    only when a span fails."""
    first, last = conn.execute(f"SELECT min(seq), max(seq) FROM {table} "
                               "WHERE package_id = ?", (package_id,)).fetchone()
    if first is None:
        return
    # a row's data holds its key's and tier's values too: it is the one to check
    joined = (f"SELECT CAST(group_concat(data, '') AS BLOB) FROM {table} "
              "WHERE package_id = ? AND seq >= ? AND seq < ?")
    for start in range(first, last + 1, NOT_UTF8_SPAN):
        span = (package_id, start, start + NOT_UTF8_SPAN)
        (blob,) = conn.execute(joined, span).fetchone()
        try:
            (blob or b"").decode()
        except UnicodeDecodeError:
            pass
        else:
            continue
        for (data,) in conn.execute(
                f"SELECT CAST(data AS BLOB) FROM {table} WHERE package_id = ? AND seq >= ? "
                "AND seq < ? ORDER BY seq", span):
            column = _not_utf8_column(data)
            if column:  # said as the streamed build says it (which knows no row)
                raise AudienceError(f"{segment.file}: the query failed: "
                                    f"{not_utf8_text(column)}")


def _not_utf8_column(data: bytes) -> str | None:
    """The segment's column whose text in this package row's data is not UTF-8, if any
    (the data holds every column, the key's and the tier's too)."""
    try:
        data.decode()
        return None
    except UnicodeDecodeError:
        values = json.loads(data.decode(errors="surrogateescape"))
    return next((name for name, value in values.items()
                 if isinstance(value, str) and _escaped(value)), "?")


def _escaped(text: str) -> bool:
    """Whether ``text`` holds a byte that did not decode (surrogateescape's U+DC80-DCFF)."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


@contextmanager
def signals_reach(conn: sqlite3.Connection) -> Iterator[None]:
    """While SQLite runs a statement, Python's signal handlers wait for it to return: a
    Ctrl-C or SIGTERM during a long segment waited for the whole statement. A progress
    handler lets them run every 50,000 of SQLite's steps; one that raises
    (KeyboardInterrupt, Prefect's TerminationSignal) aborts the statement, and that
    exception, not SQLite's "interrupted", comes out of here. Signal handlers run in
    the main thread only: elsewhere the statement still finishes first."""
    caught: list[BaseException] = []
    checks = _checks(caught)
    next(checks)
    # the generator's own __next__: no Python function is entered before its ``try``
    conn.set_progress_handler(checks.__next__, 50_000)
    try:
        yield
    except Exception:
        if caught:
            raise caught[0] from None
        raise
    finally:
        conn.set_progress_handler(None, 0)
        checks.close()


def _checks(caught: list[BaseException]) -> Generator[int, None, None]:
    """Where the signal handlers that are due run: the interpreter runs them as a
    generator resumes and on each turn of a loop, here all inside the ``try``. The
    first exception is kept; every later check aborts."""
    try:
        while True:
            yield 0
    except GeneratorExit:  # closed: the statement is over
        return
    except BaseException as exc:  # noqa: BLE001 - given back by signals_reach
        caught.append(exc)
    while True:
        yield 1


def _renamed_twin(name: str, columns: list[str]) -> bool:
    """Whether ``name`` is how SQLite renames a second column of the same name in a
    subquery (``name:1``); a real column so named only makes the build stream."""
    base, colon, number = name.rpartition(":")
    return bool(colon) and number.isdigit() and base in columns
