"""The two ways a package is built: inside the database (source and store both SQLite:
the source attached read-only) and streamed through Herald. Same rows, same decoded
values, same refusals with the same messages. A Postgres source and store in one
database stream, on the source's read-only session."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from herald.audiences import builder, sql, store
from herald.core.errors import AudienceError

from .helpers import HERALD_YAML, fill_people

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]

KINDS_FLOW = """\
name: kinds
audience: {source: crm, segment: kinds, key: id, tier: tier}
tiers:
  default: {channels: [sms]}
"""

# every kind of value SQLite holds, the odd ones included (a real and a text key, an
# integer and a real tier, reals that need 17 digits, infinity, blobs)
SQLITE_KINDS = [
    (1, "gold", "plain", 0.1, 5.0, 2**62, b"utf-8 ok", "2024-03-01"),
    (2, None, 'quote " and \\ backslash', 1 / 3, -0.0, -1, b"\xff\xfe not utf-8", None),
    (3, 3, "tab\tnew\nline\rend", 1e16, float("inf"), 0, None, "2024-03-01 10:00:00"),
    (4, 2.5, "中文 ✓", 1e-5, None, None, b"", "2024-03-01T10:00:00.123456"),
    (7.5, "silver", "", -2.5, 123456789.125, 7, None, ""),
    ("text-key", "", None, None, 1e-300, 42, None, None),
]

PG_KINDS = """\
CREATE TABLE kinds AS SELECT * FROM (VALUES
 (1, 'gold', 'plain', 0.1::float8, 0.1::real, 5::numeric, 2.50::numeric, 2::bigint,
  DATE '2024-03-01', TIMESTAMP '2024-03-01 10:00:00', TIMESTAMP '2024-03-01 10:00:00.5',
  TIMESTAMPTZ '2024-03-01 10:00:00+08', true, 'tab	and \\ "quote"'),
 (2, NULL, NULL, 1e16::float8, 1e-5::real, 1e20::numeric, 0.125::numeric, NULL,
  NULL, NULL, TIMESTAMP '1999-12-31 23:59:59.000001', NULL, NULL, NULL),
 (3, 'silver', '中文 ✓', 'Infinity'::float8, 'NaN'::real, 'NaN'::numeric, -3::numeric,
  -9007199254740993::bigint, DATE '0999-01-02', TIMESTAMP '2024-03-01 00:00:00.123',
  TIMESTAMP '2024-03-01 00:00:00', TIMESTAMPTZ '2024-07-01 23:00:00.25-05', false, ''),
 (4, 'odd\ttier \\ here', '', 5::float8, 5::real, 1.0::numeric, 0::numeric, 0, DATE '2024-02-29',
  NULL, NULL, NULL, NULL, NULL)
) AS t (id, tier, label, ratio, small, amount, price, count, day, at, at_fraction,
        at_zone, flag, note)
"""


def _workspace(make_workspace, request, backend: str, rows: int = 20,
               folder: str = "ws") -> Any:
    if backend == "sqlite":
        ws = make_workspace({"config/flows/kinds.yaml": KINDS_FLOW,
                             "audiences/kinds.sql": "SELECT * FROM kinds ORDER BY seq"},
                            rows=rows, folder=folder)
        with sqlite3.connect(ws.root / "crm.db") as conn:
            conn.execute("CREATE TABLE kinds (seq INTEGER, id, tier, label, ratio, whole, "
                         "big, raw, at)")
            conn.executemany("INSERT INTO kinds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             [(i, *row) for i, row in enumerate(SQLITE_KINDS)])
        return ws
    url = request.getfixturevalue("pg_database")
    fill_people(url, rows)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(PG_KINDS))
    engine.dispose()
    config = HERALD_YAML.replace('crm: "sqlite:///crm.db"', f'crm: "{url}"').replace(
        'store: "sqlite:///.herald/herald.db"', f'store: "{url}"')
    return make_workspace({"config/herald.yaml": config, "config/flows/kinds.yaml": KINDS_FLOW,
                           "audiences/kinds.sql": "SELECT * FROM kinds ORDER BY id"},
                          rows=rows, folder=folder)


def _build(ws: Any, flow: str, stream: bool, caplog: pytest.LogCaptureFixture
           ) -> store.Package:
    spec = ws.flow(flow)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="herald.audiences"):
        package = builder.build(ws, spec, sql.load_segment(ws, spec), stream=stream)
    inside = not stream and ws.store.dialect.name == "sqlite"
    how = "inside the database" if inside else "streamed through Herald"
    assert any(how in r.getMessage() for r in caplog.records), caplog.text
    return package


def _decoded(ws: Any, package: store.Package) -> list[tuple[int, str, str, str]]:
    # repr tells 5 from 5.0 and "5" from 5: a template would show them differently
    return [(r.seq, r.key, r.tier, repr(r.data)) for r in store.read(ws, package.id)]


def test_both_paths_store_the_same_values(make_workspace, request, caplog) -> None:
    ws = _workspace(make_workspace, request, "sqlite")
    inside = _build(ws, "kinds", False, caplog)
    streamed = _build(ws, "kinds", True, caplog)
    assert _decoded(ws, inside) == _decoded(ws, streamed)
    assert (inside.size, inside.tiers, inside.columns) == \
        (streamed.size, streamed.tiers, streamed.columns)
    first = store.read(ws, inside.id, 0, 1)[0]
    assert inside.size == 6
    assert inside.tiers == {"": 1, "2.5": 1, "3": 1, "default": 1, "gold": 1, "silver": 1}
    assert [r.key for r in store.read(ws, inside.id)][3:5] == ["4", "7.5"]
    assert first.data == {"seq": 0, "id": 1, "tier": "gold", "label": "plain",
                          "ratio": 0.1, "whole": 5.0, "big": 2**62, "raw": "utf-8 ok",
                          "at": "2024-03-01"}
    assert store.read(ws, inside.id, 2, 3)[0].data["whole"] is None  # infinity


@pytest.mark.postgres
def test_postgres_values_are_stored_as_read(make_workspace, request, caplog) -> None:
    """Source and store in one Postgres database: streamed (not built inside it), every
    type decoding as psycopg reads it."""
    ws = _workspace(make_workspace, request, "postgres")
    package = _build(ws, "kinds", False, caplog)
    first = store.read(ws, package.id, 0, 1)[0]
    assert package.size == 4 and package.tiers == {"default": 1, "gold": 1, "silver": 1,
                                                   "odd\ttier \\ here": 1}
    assert first.data["amount"] == 5.0 and repr(first.data["amount"]) == "5.0"
    assert first.data["at_fraction"] == "2024-03-01T10:00:00.500000"
    assert first.data["at"] == "2024-03-01T10:00:00"
    assert first.data["flag"] is True and first.data["small"] == 0.1  # as psycopg reads a real
    third = store.read(ws, package.id, 2, 3)[0].data
    assert third["ratio"] is None and third["small"] is None and third["amount"] is None
    assert third["count"] == -9007199254740993


@pytest.mark.postgres
def test_a_postgres_segment_cannot_write_through_a_function(make_workspace, request,
                                                            caplog) -> None:
    """Why one Postgres database still streams: the segment runs on the source's
    read-only session, so a function it calls that writes is refused, where an INSERT ...
    SELECT in the workspace database's session would have let it write."""
    ws = _workspace(make_workspace, request, "postgres")
    with ws.store.begin() as conn:
        conn.execute(text("CREATE TABLE touched (at timestamptz)"))
        conn.execute(text("CREATE FUNCTION touch() RETURNS int LANGUAGE sql AS "
                          "'INSERT INTO touched VALUES (now()) RETURNING 1'"))
    (ws.root / "audiences/people.sql").write_text(
        "SELECT people.*, touch() AS t FROM people WHERE score >= :min_score")
    with pytest.raises(AudienceError, match=r"the query failed: .*read-only transaction"):
        _build(ws, "promo", False, caplog)
    with ws.store.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM touched")).scalar() == 0
    assert store.list_packages(ws) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_paths_refuse_the_same_segments_alike(backend, make_workspace, request,
                                                  caplog) -> None:
    """Each rule of a segment's result, on both paths: the same message, nothing kept."""
    ws = _workspace(make_workspace, request, backend)
    cases = {
        "duplicate key": ("SELECT * FROM people WHERE score >= :min_score UNION ALL "
                          "SELECT * FROM people WHERE id = 3",
                          r"audiences/people.sql: duplicate key '3' in the result"),
        "duplicate keys": ("SELECT * FROM people WHERE score >= :min_score UNION ALL "
                           "SELECT * FROM people WHERE id IN (2, 11, 3)",
                           r"duplicate keys '11', '2', '3' in the result"),
        "no key column": ("SELECT id AS pid, name, tier FROM people WHERE score >= :min_score",
                          r"audiences/people.sql: the result has no column 'id' "
                          r"\(audience.key; columns: pid, name, tier\)"),
        "no tier column": ("SELECT id, name FROM people WHERE score >= :min_score",
                           r"no column 'tier' \(audience.tier; columns: id, name\)"),
        "NULL key": ("SELECT CASE WHEN id = 4 THEN NULL ELSE id END AS id, name, tier "
                     "FROM people WHERE score >= :min_score ORDER BY people.id",
                     r"audiences/people.sql: row 4 has NULL in key column 'id'"),
        "failing query": ("SELECT nope FROM people WHERE score >= :min_score",
                          r"audiences/people.sql: the query failed: .*nope"),
    }
    if backend == "sqlite":  # SQLite keeps text as given: one name in another encoding
        cases["text not UTF-8"] = (
            "SELECT id, CASE WHEN id = 12 THEN CAST(X'4AC3' AS TEXT) ELSE name END AS name, "
            "tier FROM people WHERE score >= :min_score",
            r"^audiences/people.sql: the query failed: column 'name' holds text that is not "
            r"UTF-8 \(bytes in another encoding, as SQLite keeps them\): convert it in the "
            r"segment's query or in the source$")
    for name, (segment, expected) in cases.items():
        (ws.root / "audiences/people.sql").write_text(segment)
        messages = []
        for stream in (False, True):
            with pytest.raises(AudienceError, match=expected) as exc:
                _build(ws, "promo", stream, caplog)
            messages.append(str(exc.value))
        assert messages[0] == messages[1], name
    assert store.list_packages(ws) == []
    with ws.store.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM herald_package_rows")).scalar() == 0


ODD_KEYS = [("a\x00b", "t\x00ier"), ('quote " and \\ back', "x"), ("\u2028 line", "中文"),
            ("😀", "\ttab"), ("plain", "x"), ("a", "t")]


@pytest.mark.parametrize("json_rows", [True, False], ids=["one-statement", "executemany"])
def test_streamed_batches_into_sqlite_keep_every_key_exactly(make_workspace, caplog,
                                                             monkeypatch, json_rows) -> None:
    """Streamed into a SQLite workspace database, a batch is one statement over its rows
    as JSON (an executemany where SQLite has no ->>), written by a thread beside the next
    batch: keys and tiers come back exactly, a NUL inside one included (SQLite's JSON
    functions would cut it there: such a batch goes by executemany, and 'a' stays apart
    from 'a\x00b'), in order, over several batches."""
    monkeypatch.setattr(builder, "INSERT_BATCH", 2)
    monkeypatch.setattr(builder, "SQLITE_JSON", json_rows)
    ws = make_workspace({"config/flows/kinds.yaml": KINDS_FLOW,
                         "audiences/kinds.sql": "SELECT * FROM kinds ORDER BY seq"})
    with sqlite3.connect(ws.root / "crm.db") as conn:
        conn.execute("CREATE TABLE kinds (seq INTEGER, id, tier, note)")
        conn.executemany("INSERT INTO kinds VALUES (?, ?, ?, ?)",
                         [(i, key, tier, f"row {i} \\ \"") for i, (key, tier)
                          in enumerate(ODD_KEYS)])
    package = _build(ws, "kinds", True, caplog)
    rows = store.read(ws, package.id)
    assert [(r.seq, r.key, r.tier) for r in rows] == [
        (i, key, tier) for i, (key, tier) in enumerate(ODD_KEYS)]
    assert [r.data["note"] for r in rows] == [f"row {i} \\ \"" for i in range(6)]
    assert rows[0].data["id"] == "a\x00b"


def test_a_duplicate_in_a_later_batch_is_refused_and_nothing_kept(make_workspace, caplog,
                                                                  monkeypatch) -> None:
    """The batch that meets an earlier batch's key fails in the writer's thread; the
    build fails with the duplicate's message (at the next batch or at the end) and the
    package's rows are gone."""
    monkeypatch.setattr(builder, "INSERT_BATCH", 3)
    ws = make_workspace(rows=20)
    # the second 2 in the last batch; the second 5 beside the first in the second batch,
    # with several batches after it
    for key, order in (("2", "id = 2, id"), ("5", "id > 5, id")):
        (ws.root / "audiences/people.sql").write_text(
            "SELECT * FROM (SELECT * FROM people WHERE score >= :min_score "
            f"UNION ALL SELECT * FROM people WHERE id = {key}) ORDER BY {order}")
        with pytest.raises(AudienceError, match=rf"duplicate key '{key}' in the result"):
            _build(ws, "promo", True, caplog)
        assert store.list_packages(ws) == []
        with ws.store.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM herald_package_rows")
                                ).scalar() == 0


def test_a_sqlite_source_is_attached_read_only(make_workspace, caplog) -> None:
    ws = make_workspace(rows=50)
    before = hashlib.sha256((ws.root / "crm.db").read_bytes()).hexdigest()
    package = _build(ws, "promo", False, caplog)
    assert package.size == 50 and store.count_rows(ws, package.id) == 50
    assert hashlib.sha256((ws.root / "crm.db").read_bytes()).hexdigest() == before
    assert sorted(p.name for p in ws.root.glob("crm.db*")) == ["crm.db"]


@pytest.mark.parametrize("stream", [False, True], ids=["inside", "streamed"])
def test_a_signal_stops_a_long_sqlite_segment(make_workspace, stream) -> None:
    """Ctrl-C while SQLite runs a segment that would take minutes: the statement stops
    within a second or so (not when it is done), KeyboardInterrupt comes out, and nothing
    of the package is left."""
    import os
    import signal
    import threading
    import time

    slow = ("WITH RECURSIVE burn(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM burn "
            "WHERE x < 300000000)\nSELECT id, name, email, phone, tier, locale, score\n"
            "FROM people WHERE score >= :min_score AND (SELECT count(*) FROM burn) > 0")
    ws = make_workspace({"audiences/people.sql": slow}, rows=20)
    spec = ws.flow("promo")
    segment = sql.load_segment(ws, spec)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    started = time.monotonic()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        builder.build(ws, spec, segment, stream=stream)
    took = time.monotonic() - started
    timer.join()
    assert took < 5, took
    assert store.list_packages(ws) == []


@pytest.mark.postgres
def test_postgres_refuses_a_writing_cte(make_workspace, request,
                                                      caplog) -> None:
    ws = _workspace(make_workspace, request, "postgres")
    (ws.root / "audiences/people.sql").write_text(
        "WITH gone AS (DELETE FROM people WHERE score >= :min_score RETURNING *) "
        "SELECT * FROM gone")
    # Postgres refuses a data-modifying WITH in a server-side cursor; the read-only
    # session would anyway
    for stream in (False, True):
        with pytest.raises(AudienceError, match=r"the query failed: .*data-modifying"):
            _build(ws, "promo", stream, caplog)
    with ws.store.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM people")).scalar() == 20


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_column_named_twice_is_streamed_and_keeps_the_last(backend, make_workspace,
                                                             request, caplog) -> None:
    """SQL cannot name one of two same-named columns: such a result is streamed, and
    its row keeps the last value, as a dict built from the row does."""
    ws = _workspace(make_workspace, request, backend)
    (ws.root / "audiences/people.sql").write_text(
        "SELECT id, tier, name, email AS name FROM people WHERE score >= :min_score "
        "ORDER BY id")
    spec = ws.flow("promo")
    with caplog.at_level(logging.INFO, logger="herald.audiences"):
        package = builder.build(ws, spec, sql.load_segment(ws, spec))
    assert "streamed through Herald" in caplog.text
    first = store.read(ws, package.id, 0, 1)[0]
    assert package.size == 20 and first.data == {"id": 1, "tier": "silver",
                                                 "name": "user1@example.com"}


def test_rows_read_back_as_written() -> None:
    """A row's JSON is read with orjson, and with json where orjson would change it: an
    integer beyond 64 bits (which orjson reads as a float), at any depth."""
    from herald.audiences.store import decode_row, encode_row

    for row in [{"a": 2**70, "b": "x"}, {"a": [1, -(2**65)]}, {"n": {"x": 10**19}},
                {"i": 2**63, "j": -(2**63)}, {"f": 1.5, "s": "12345678901234567890123"},
                {"f": 1e300, "g": -0.0, "t": True, "z": None}]:
        back = decode_row(encode_row(row))
        assert back == row and repr(back) == repr(row), row
    assert decode_row(encode_row({"nan": float("nan")})) == {"nan": None}
    assert decode_row('{"x": NaN, "y": 1}')["y"] == 1  # json's NaN, as written before


def test_a_database_error_is_told_without_its_statement_or_values(tmp_path) -> None:
    """A run that failed on a database error recorded and printed SQLAlchemy's text of
    it: the statement, its parameters, and with a value in another encoding the value
    itself (a person's name, address or number)."""
    from sqlalchemy.exc import DBAPIError

    from herald.core.db import describe_exception, open_store

    engine = open_store(f"sqlite:///{tmp_path / 'h.db'}", tmp_path)
    where = f"the workspace database sqlite:///{tmp_path / 'h.db'}"
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE people (name TEXT UNIQUE)"))
        conn.execute(text("INSERT INTO people VALUES (CAST(X'4AC3' AS TEXT))"))
        conn.execute(text("INSERT INTO people VALUES ('someone@example.com')"))
    with pytest.raises(DBAPIError) as caught, engine.connect() as conn:
        conn.execute(text("SELECT name FROM people")).all()
    assert "with text 'J" in str(caught.value)  # the driver quotes the value
    assert describe_exception(caught.value) == (
        f"{where}: column 'name' holds text that is not UTF-8 (bytes in another encoding, "
        "as SQLite keeps them): convert it in the segment's query or in the source")
    with pytest.raises(DBAPIError) as caught, engine.begin() as conn:
        conn.execute(text("INSERT INTO people VALUES (:who)"), {"who": "someone@example.com"})
    assert "[SQL" in str(caught.value) and "someone@example.com" in str(caught.value)
    assert describe_exception(caught.value) == f"{where}: UNIQUE constraint failed: people.name"
    engine.dispose()
