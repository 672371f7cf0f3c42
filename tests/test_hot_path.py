"""The per-recipient path of a run, written per batch: what a chunk reports matches the
ledger it wrote, and batch state transitions land on SQLite and on Postgres alike."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import UTC, timedelta

import pytest

from herald.core import clock
from herald.core.db import writing
from herald.delivery import ledger, ledger_reads
from herald.flows import chunks, engine

from .helpers import HERALD_YAML, PROMO_YAML, ledger_rows, outbox_recipients


def _chunk_counts(results: list[chunks.ChunkResult]) -> Counter[tuple[str, str, str | None]]:
    counts: Counter[tuple[str, str, str | None]] = Counter()
    for result in results:
        for status, tier, channel, n in result.counts:
            counts[status, tier, channel] += n
    return counts


def _ledger_counts(ws, run_id: str) -> Counter[tuple[str, str, str | None]]:
    from sqlalchemy import func, select

    d = ledger.deliveries
    with ws.store.connect() as conn:
        return Counter({(s, t, c): int(n) for s, t, c, n in conn.execute(
            select(d.c.status, d.c.tier, d.c.channel, func.count()).where(
                d.c.run_id == run_id).group_by(d.c.status, d.c.tier, d.c.channel))})


def test_a_chunks_counts_match_the_ledger_after_settlement(make_workspace, store_url) -> None:
    """Counts come from the outcomes the chunk settled, not from re-reading the ledger:
    sent, render errors, bodies over the limit (failed) and the policy's stops agree
    with the rows, per status, tier and channel."""
    config = HERALD_YAML.replace("sms: {type: outbox, kind: sms}",
                                 "sms: {type: outbox, kind: sms, max_body: 60}")
    ws = make_workspace({"config/herald.yaml": config,
                         # score 1 divides by zero; a long name makes the SMS too long
                         "templates/promo/default.sms.txt.j2":
                             "Hi {{ name }}{{ '!' * (score % 3) * 30 }} "
                             "{{ 100 // (score - 1) }}"},
                        rows=90, store=store_url)
    started = clock.now()
    prepared = engine.prepare(ws, "promo", run_key="k")
    results = [chunks.run_chunk(job) for job in prepared.chunks]
    counts = _chunk_counts(results)
    assert counts == _ledger_counts(ws, prepared.run_id)
    statuses = {status for status, _, _ in counts}
    assert {"sent", "render_error", "failed", "no_address"} <= statuses
    summary = engine.finish(ws, prepared, results, started)
    assert summary["deliveries"]["sent"] == sum(
        n for (s, _, _), n in counts.items() if s == "sent")


def test_a_chunk_on_sqlite_older_than_3_38(make_workspace, monkeypatch) -> None:
    """Where SQLite has no built-in JSON (before 3.38), recipient sets go as IN lists of
    500 and settlements as one executemany: a chunk's outcome is the same."""
    monkeypatch.setattr(ledger, "SQLITE_JSON", False)
    test_a_chunks_counts_match_the_ledger_after_settlement(make_workspace, None)
    test_batch_settle_writes_every_outcome(make_workspace, None, folder="settle")
    test_recipient_sets_and_answers_with_awkward_text(make_workspace, None, folder="odd")
    test_mark_moves_exactly_the_rows_named(make_workspace, None, folder="mark")


def test_batch_settle_writes_every_outcome(make_workspace, store_url,
                                           folder: str = "ws") -> None:
    """One batch's answers (sent, failed, deferred, unknown) are written in one go; the
    rows not in the batch keep their state."""
    ws = make_workspace(rows=10, store=store_url, folder=folder)
    entries = [ledger.Entry(str(i), "gold", "queued", "sms", f"+86138001390{i:02d}")
               for i in range(1, 7)]
    with writing(ws.store) as conn:
        ledger.write_entries(conn, entries, flow="promo", run_key="k", run_id="r",
                             package_id="p")
    ledger.mark(ws.store, "promo", "k", ["1", "2", "3", "4", "5"], "sending")
    later = ledger.now().replace(microsecond=0)
    ledger.settle(ws.store, "promo", "k", [
        ledger.Outcome("1", "sent", code="ok", provider_id="p1", segments=2),
        ledger.Outcome("2", "failed", "permanent: no such number", code="404"),
        ledger.Outcome("3", "deferred", "deferred: busy", attempts=3, not_before=later),
        ledger.Outcome("4", "sending", "outcome unknown, not resent"),
    ])
    with ws.store.connect() as conn:
        got = {r.recipient: r for r in conn.execute(ledger.deliveries.select().where(
            ledger.deliveries.c.run_key == "k"))}
    assert {k: r.status for k, r in got.items()} == {
        "1": "sent", "2": "failed", "3": "deferred", "4": "sending", "5": "sending",
        "6": "queued"}
    assert (got["1"].provider_id, got["1"].segments, got["1"].attempts) == ("p1", 2, 1)
    assert got["1"].sent_at is not None and got["2"].sent_at is None
    assert (got["2"].reason, got["2"].code) == ("permanent: no such number", "404")
    assert got["3"].attempts == 3
    assert got["3"].not_before.replace(tzinfo=None) == later.replace(tzinfo=None)
    assert got["4"].reason == "outcome unknown, not resent"
    ledger.settle(ws.store, "promo", "k", [ledger.Outcome("3", "sent", attempts=2)])
    with ws.store.connect() as conn:
        attempts = conn.execute(ledger.deliveries.select().with_only_columns(
            ledger.deliveries.c.attempts).where(ledger.deliveries.c.recipient == "3")
        ).scalar_one()
    assert attempts == 5  # added to the earlier attempts
    # a batch whose answers share every column but the recipient (on Postgres those go
    # as one value each, not as arrays): a deferral with one time, reason and code
    ledger.mark(ws.store, "promo", "k", ["5", "6"], "sending")
    ledger.settle(ws.store, "promo", "k", [
        ledger.Outcome(k, "deferred", 'busy: "try" \\ later, {NULL}', code="429",
                       attempts=2, not_before=later) for k in ("5", "6")])
    with ws.store.connect() as conn:
        rows = conn.execute(ledger.deliveries.select().where(
            ledger.deliveries.c.recipient.in_(["5", "6"]))).all()
    assert len(rows) == 2
    for row in rows:
        assert (row.status, row.reason, row.code, row.attempts, row.provider_id,
                row.sent_at) == ("deferred", 'busy: "try" \\ later, {NULL}', "429", 2,
                                 None, None)
        assert row.not_before.replace(tzinfo=None) == later.replace(tzinfo=None)


def test_deduplication_finds_addresses_through_the_index(make_workspace, store_url) -> None:
    """A store made before the address index gets it when opened; e-mail addresses are
    compared lower-cased through it, other channels' addresses exactly."""
    from sqlalchemy import text

    from herald.core.db import ensure_schema

    ws = make_workspace(rows=4, store=store_url)
    with writing(ws.store) as conn:
        conn.execute(text("DROP INDEX ix_herald_deliveries_address"))
    ensure_schema(ws.store)
    with writing(ws.store) as conn:
        ledger.write_entries(conn, [
            ledger.Entry("1", "gold", "sent", "email", "Ann@shop.example.com"),
            ledger.Entry("2", "gold", "queued", "wechat", "oAbC"),
            ledger.Entry("3", "gold", "capped", "email", "bob@shop.example.com"),
        ], flow="promo", run_key="k", run_id="r", package_id="p")
    with ws.store.connect() as conn:
        names = {n for (n,) in conn.execute(text(
            "SELECT name FROM sqlite_master WHERE type = 'index'"
            if conn.dialect.name == "sqlite" else
            "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"))}
        assert "ix_herald_deliveries_address" in names
        assert ledger_reads.addresses_taken(conn, "promo", "k", "email",
                                      ["ann@shop.example.com", "bob@shop.example.com"],
                                      True) == {"ann@shop.example.com": "1"}  # capped: free
        assert ledger_reads.addresses_taken(conn, "promo", "k", "wechat", ["oabc", "oAbC"],
                                      False) == {"oAbC": "2"}
        assert ledger_reads.addresses_taken(conn, "promo", "other", "email",
                                      ["ann@shop.example.com"], True) == {}


def test_recipient_sets_and_answers_with_awkward_text(make_workspace, store_url,
                                                      folder: str = "ws") -> None:
    """Recipient sets and answers travel as one parameter (a JSON array on SQLite, array
    text on Postgres): keys and reasons with quotes, backslashes, commas, braces, the
    word NULL or spaces reach the right rows and come back exactly."""
    ws = make_workspace(rows=10, store=store_url, folder=folder)
    keys = ['a"b', "c\\d", "e,f", "{g}", "NULL", " h ", "ü 中", "", "plain"]
    with writing(ws.store) as conn:
        ledger.write_entries(conn, [ledger.Entry(k, "gold", "queued", "sms", None)
                                    for k in keys], flow="promo", run_key="k", run_id="r",
                             package_id="p")
    ledger.mark(ws.store, "promo", "k", keys[:-1], "sending")
    reasons = {k: f'refused: "{k}" \\ {{x}}, NULL' for k in keys[:-1]}
    ledger.settle(ws.store, "promo", "k", [
        ledger.Outcome(k, "failed", reasons[k], code=None if i % 2 else "4,0\"4")
        for i, k in enumerate(keys[:-1])])
    with ws.store.connect() as conn:
        got = {r.recipient: r for r in conn.execute(ledger.deliveries.select().where(
            ledger.deliveries.c.run_key == "k"))}
        taken = ledger_reads.existing(conn, "promo", "k", keys)
    assert set(got) == set(keys) == set(taken)
    assert got["plain"].status == "queued"
    for i, k in enumerate(keys[:-1]):
        assert (got[k].status, got[k].reason) == ("failed", reasons[k]), k
        assert got[k].code == (None if i % 2 else '4,0"4')


def test_mark_moves_exactly_the_rows_named(make_workspace, store_url,
                                           folder: str = "ws") -> None:
    """A mark (one statement at the driver, the keys bound as one array) moves the rows
    named, awkward keys included, stamps them with the clock and sets a reason only when
    given; other rows and other run keys stay as they were."""
    ws = make_workspace(rows=4, store=store_url, folder=folder)
    keys = ['a"b', "c\\d", "e,f", "{g}", "NULL", " h ", "ü 中", ""]
    with writing(ws.store) as conn:
        for run_key in ("k", "other"):
            ledger.write_entries(conn, [ledger.Entry(k, "gold", "queued", "sms", None,
                                                     "old reason") for k in keys],
                                 flow="promo", run_key=run_key, run_id="r", package_id="p")
    at = ledger.now().replace(microsecond=0) + timedelta(hours=1)
    with clock.using(clock.Clock(at, frozen=True)):
        ledger.mark(ws.store, "promo", "k", keys[:4], "sending")
        ledger.mark(ws.store, "promo", "k", keys[4:6], "queued", 'stopped: "x" \\ y')
    with ws.store.connect() as conn:
        got = {(r.run_key, r.recipient): r for r in conn.execute(
            ledger.deliveries.select())}
    for k in keys[:4]:
        row = got["k", k]
        assert (row.status, row.reason) == ("sending", "old reason"), k
        assert row.updated_at.replace(tzinfo=None) == at.replace(tzinfo=None)
    for k in keys[4:6]:
        assert (got["k", k].status, got["k", k].reason) == ("queued", 'stopped: "x" \\ y')
    for k in keys[6:]:
        assert (got["k", k].status, got["k", k].reason) == ("queued", "old reason")
    assert all(got["other", k].status == "queued" for k in keys)


def test_new_rows_are_written_exactly(make_workspace, store_url) -> None:
    """Reservations come back as written, whatever their text holds (on Postgres they
    travel as COPY text built by Herald): tabs, newlines, carriage returns and
    backslashes in keys, tiers, addresses, reasons and variants, an escape sequence
    written out, NULLs, a time of deferral, the run's priority and an exempt flow."""
    ws = make_workspace(rows=4, store=store_url)
    later = ledger.now().replace(microsecond=123456) + timedelta(hours=3)
    entries = [
        ledger.Entry("tab\there", "gold\nline", "queued", "sms", "+8613800138000"),
        ledger.Entry("back\\slash \\N", "default", "capped", "email", "a\rb@example.com",
                     "cap 1 per day:\tsms \\ email", None, "v\\2"),
        ledger.Entry("中文 ✓", "default", "deferred", "sms", None,
                     "deferred to later\n(quiet hours)", later),
        ledger.Entry("\\N", "default", "no_address", None, None, None),
    ]
    stamp = ledger.now().replace(microsecond=654321)
    with writing(ws.store) as conn:
        ledger.write_entries(conn, entries, flow="pro\tmo", run_key="k\\1", run_id="r\n1",
                             package_id="p", priority=7, counted=False, at=stamp)
    with ws.store.connect() as conn:
        got = {r.recipient: r for r in conn.execute(ledger.deliveries.select())}
    assert set(got) == {e.recipient for e in entries}
    for e in entries:
        row = got[e.recipient]
        assert (row.tier, row.status, row.channel, row.address, row.reason, row.variant) == (
            e.tier, e.status, e.channel, e.address, e.reason, e.variant), e.recipient
        assert (row.flow, row.run_key, row.run_id, row.package_id) == (
            "pro\tmo", "k\\1", "r\n1", "p")
        assert (row.attempts, row.priority, row.counted) == (0, 7, False)
        for written, read in ((stamp, row.created_at), (stamp, row.updated_at),
                              (e.not_before, row.not_before)):
            assert (read if read is None or read.tzinfo else read.replace(tzinfo=UTC)
                    ) == written, e.recipient


def test_array_text_joined_in_one_step_only_when_no_value_needs_escaping(
        monkeypatch) -> None:
    """Plain strings are joined whole (the per-value path is not taken); a value with a
    quote or a backslash, a NULL or a time goes value by value, escaped. Both write the
    text Postgres reads back as the same array (checked on a server by the test above)."""
    plain = ["1", "2", "abc", "+8613800138000", "a b,c{d}"]
    monkeypatch.setattr(ledger, "_pg_element", lambda value: pytest.fail(
        f"plain strings went value by value ({value!r})"))
    assert ledger.pg_array(plain) == '{"1","2","abc","+8613800138000","a b,c{d}"}'
    assert ledger.pg_array(["only"]) == '{"only"}'
    monkeypatch.undo()
    assert ledger.pg_array(['say "hi"', "back\\slash", "x"]) == \
        '{"say \\"hi\\"","back\\\\slash","x"}'
    assert ledger.pg_array(["a", None]) == '{"a",NULL}'
    assert ledger.pg_array([1, None, 3]) == "{1,NULL,3}"
    assert ledger.pg_array([]) == "{}"


@pytest.mark.postgres
def test_planner_statistics_refreshed_only_while_they_lag_the_rows(make_workspace,
                                                                   pg_database) -> None:
    """A fresh ledger is analysed after its first reservations, again once it holds more
    than twice what the statistics say, and not in between (an ANALYZE per chunk of a
    large ledger cost as much as a tenth of a run). The statistics cover the address
    index's expression: the deduplication's lookup goes through that index (without
    them the planner read every row of the run key for each chunk)."""
    from sqlalchemy import event

    ws = make_workspace(rows=10, store=pg_database)

    def reserve(first: int, n: int) -> None:
        with writing(ws.store) as conn:
            ledger.write_entries(conn, [
                ledger.Entry(str(i), "gold", "queued", "sms", f"+86138{i:08d}")
                for i in range(first, first + n)],
                flow="promo", run_key="k", run_id="r", package_id="p")

    def known() -> float:
        with ws.store.connect() as conn:
            return float(conn.exec_driver_sql(
                "SELECT reltuples FROM pg_class WHERE oid = 'herald_deliveries'::regclass"
            ).scalar_one())

    assert known() < 0  # never analysed
    reserve(0, 2000)
    ledger.refresh_statistics(ws.store, 2000)
    assert known() == 2000
    reserve(2000, 500)
    ledger.refresh_statistics(ws.store, 2500)  # the statistics still cover most of it
    assert known() == 2000
    reserve(2500, 17_500)
    ledger.refresh_statistics(ws.store, 20_000)
    assert known() == 20_000

    seen: list[tuple[str, object]] = []

    def keep(conn, cursor, statement, parameters, context, executemany) -> None:
        seen.append((statement, parameters))

    event.listen(ws.store, "before_cursor_execute", keep)
    with ws.store.connect() as conn:
        taken = ledger_reads.addresses_taken(
            conn, "promo", "k", "sms", [f"+86138{i:08d}" for i in range(0, 20_000, 100)],
            False)
    event.remove(ws.store, "before_cursor_execute", keep)
    assert len(taken) == 200
    statement, parameters = seen[-1]
    with ws.store.connect() as conn:
        plan = "\n".join(row[0] for row in conn.exec_driver_sql(
            f"EXPLAIN {statement}", parameters))
    assert "ix_herald_deliveries_address" in plan, plan


@pytest.mark.postgres
def test_state_changes_update_rows_in_place_on_postgres(make_workspace, pg_database) -> None:
    """A row's ``sending`` mark and its settlement change no indexed column, and the
    ledger's pages keep room for both new versions: Postgres writes them as HOT updates
    (no new entry in any of the five indexes). A ledger made with another fill factor
    is given the ledger's on opening."""
    import time

    from sqlalchemy import create_engine

    from herald.core.db import LEDGER_FILLFACTOR, deliveries, ensure_schema

    ws = make_workspace(rows=2000, store=pg_database)
    summary = engine.run_local(ws, "promo", run_key="hot")
    sent = summary["deliveries"]["sent"]
    assert sent > 1900
    ws.dispose()  # the run's sessions end and report their statistics
    stats = create_engine(pg_database)
    try:
        for _ in range(100):
            with stats.connect() as conn:
                updates, hot = conn.exec_driver_sql(
                    "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                    "WHERE relname = %(t)s", {"t": deliveries.name}).one()
            if updates >= 2 * sent:
                break
            time.sleep(0.1)
        assert updates == 2 * sent  # each sent row: marked, then settled
        # measured: 99.8% (at fill factor 60: 92.7% here, 72% with a run's larger chunks)
        assert hot >= 0.97 * updates, (hot, updates)

        with stats.begin() as conn:
            conn.exec_driver_sql(f"ALTER TABLE {deliveries.name} SET (fillfactor = 60)")
        ensure_schema(stats)
        with stats.connect() as conn:
            assert conn.exec_driver_sql(
                "SELECT reloptions FROM pg_class WHERE relname = %(t)s",
                {"t": deliveries.name}).scalar() == [f"fillfactor={LEDGER_FILLFACTOR}"]
    finally:
        stats.dispose()


def test_the_collector_is_tuned_while_chunks_work_and_restored_after(make_workspace
                                                                     ) -> None:
    """While chunks work, what existed before is frozen out of the cyclic collector's
    walks and the young generation is collected less often; overlapping chunks (threads)
    share that, and the last one out puts the collector back as it was. Cyclic garbage
    made meanwhile is still collected; a whole run leaves the collector as it found it."""
    import gc
    import threading
    import weakref

    from herald.core import collector

    class Node:
        me: object = None

    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    inside: list[tuple[tuple[int, int, int], int]] = []
    first_in, second_done = threading.Event(), threading.Event()

    def second() -> None:
        first_in.wait(10)
        with collector.for_chunks():
            inside.append((gc.get_threshold(), gc.get_freeze_count()))
        second_done.set()

    helper = threading.Thread(target=second)
    helper.start()
    with collector.for_chunks():
        first_in.set()
        assert second_done.wait(10)
        inside.append((gc.get_threshold(), gc.get_freeze_count()))  # the other one left
        node = Node()
        node.me = node  # a cycle: only the collector frees it
        gone = weakref.ref(node)
        del node
        gc.collect()
        assert gone() is None
    helper.join()
    assert len(inside) == 2
    for threshold, count in inside:
        assert threshold == (max(collector.YOUNG_THRESHOLD, before[0]), *before[1:])
        assert count > frozen
    assert (gc.get_threshold(), gc.get_freeze_count()) == (before, frozen)
    ws = make_workspace(rows=20)
    assert engine.run_local(ws, "promo", run_key="gc")["deliveries"]["sent"] > 0
    assert (gc.get_threshold(), gc.get_freeze_count()) == (before, frozen)


# One channel (SMS in the outbox), five messages a batch: 30 people, 24 with a phone, so
# five batches (5, 5, 5, 5, 4) in one chunk.
BATCHED = {
    "config/herald.yaml": HERALD_YAML.replace(
        "sms: {type: outbox, kind: sms}", "sms: {type: outbox, kind: sms, batch_size: 5}"
    ).replace("chunk_size: 40", "chunk_size: 100"),
    "config/flows/promo.yaml": PROMO_YAML.replace(
        "gold: {channels: [email, sms]}", "gold: {channels: [sms]}").replace(
        "default: {channels: [sms, email]}", "default: {channels: [sms]}"),
}


def test_a_settlement_is_written_beside_the_next_batch_on_postgres(make_workspace, store_url,
                                                                   monkeypatch) -> None:
    """On Postgres a batch's settlement is written while the next batch is marked
    `sending` and sent; on SQLite (one writer at a time) one after the other. Either
    way settlements are written one at a time, in order, each batch marked before it is
    settled, and every row ends `sent`."""
    ws = make_workspace(BATCHED, rows=30, store=store_url)
    events: list[tuple[str, float, float, tuple[str, ...]]] = []
    mark, settle = ledger.mark, ledger.settle

    def marking(engine_, flow, run_key, recipients, status, reason=None) -> None:
        start = time.monotonic()
        mark(engine_, flow, run_key, recipients, status, reason)
        events.append(("mark", start, time.monotonic(), tuple(recipients)))

    def settling(engine_, flow, run_key, outcomes) -> None:
        start = time.monotonic()
        time.sleep(0.2)  # a slow store: long enough to see what happens meanwhile
        settle(engine_, flow, run_key, outcomes)
        events.append(("settle", start, time.monotonic(),
                       tuple(o.recipient for o in outcomes)))

    monkeypatch.setattr(ledger, "mark", marking)
    monkeypatch.setattr(ledger, "settle", settling)
    summary = engine.run_local(ws, "promo", run_key="k")

    assert summary["deliveries"]["sent"] == 24
    assert {s for (s,) in ledger_rows(ws, "status", where="status <> 'no_address'").values()
            } == {"sent"}
    marks = sorted((e for e in events if e[0] == "mark"), key=lambda e: e[1])
    settles = sorted((e for e in events if e[0] == "settle"), key=lambda e: e[1])
    assert [len(e[3]) for e in marks] == [5, 5, 5, 5, 4]
    assert [e[3] for e in settles] == [e[3] for e in marks]  # each batch, in order
    for before, after in zip(settles, settles[1:], strict=False):
        assert before[2] <= after[1]  # one settlement at a time
    for m, s in zip(marks, settles, strict=True):
        assert m[2] <= s[1]  # marked before settled
    # the next batch marked while the previous settlement was still being written
    beside = sum(1 for s, m in zip(settles, marks[1:], strict=False) if m[1] < s[2])
    assert beside == (4 if ws.store.dialect.name == "postgresql" else 0)


def test_a_settlement_that_fails_for_good_stops_the_channel(make_workspace, store_url,
                                                            monkeypatch, caplog) -> None:
    """The store refuses a batch's settlement for good: the channel stops. On Postgres
    the batch sent while it was being written stays `sending` too (it was sent: never
    resent) and the log names it; nothing after it is marked or sent. A rerun sends the
    rest, each recipient once in all."""
    import logging

    from sqlalchemy.exc import OperationalError

    ws = make_workspace(BATCHED, rows=30, store=store_url)
    settle = ledger.settle
    calls: list[int] = []

    def refusing(engine_, flow, run_key, outcomes) -> None:
        calls.append(len(outcomes))
        if len(calls) == 2:
            time.sleep(0.2)
            raise OperationalError("UPDATE herald_deliveries", {}, Exception("disk I/O error"))
        settle(engine_, flow, run_key, outcomes)

    monkeypatch.setattr(ledger, "settle", refusing)
    caplog.set_level(logging.ERROR, logger="herald.dispatch")
    with pytest.raises(OperationalError, match="disk I/O error"):
        engine.run_local(ws, "promo", run_key="k")
    postgres = ws.store.dialect.name == "postgresql"
    rows = ledger_rows(ws, "status", where="status <> 'no_address'")
    statuses = Counter(s for (s,) in rows.values())
    sent_first = outbox_recipients(ws)
    if postgres:  # the third batch went out while the second's settlement was refused
        assert statuses == {"sent": 5, "sending": 10, "queued": 9}
        assert len(sent_first) == 15
        logged = [r.getMessage() for r in caplog.records
                  if "are not recorded either" in r.getMessage()]
        assert len(logged) == 1 and "5 more message(s)" in logged[0]
    else:
        assert statuses == {"sent": 5, "sending": 5, "queued": 14}
        assert len(sent_first) == 10
    assert {r for r, (s,) in rows.items() if s != "queued"} == set(sent_first)

    monkeypatch.setattr(ledger, "settle", settle)
    summary = engine.run_local(ws, "promo", run_key="k")
    assert summary["deliveries"]["sent"] == 9 if postgres else 14
    sent = outbox_recipients(ws)
    assert len(sent) == 24 and set(sent.values()) == {1}  # each once, none lost
    after = Counter(s for (s,) in ledger_rows(ws, "status",
                                              where="status <> 'no_address'").values())
    assert after == {"sent": 14, "sending": 10} if postgres else {"sent": 19, "sending": 5}


def test_a_failure_while_rendering_beside_the_reservation_sends_nothing(
        make_workspace, store_url, monkeypatch) -> None:
    """On Postgres messages are rendered in a helper thread while the reservation is
    written (on SQLite after it): an error there that is not a template's (a defect)
    fails the chunk before anything is handed to a channel, its rows stay `queued`, and
    the rerun sends them."""
    ws = make_workspace(BATCHED, rows=30, store=store_url)
    threads: set[str] = set()
    build = chunks.build_message

    def broken(ws_, templates, job, d):
        threads.add(threading.current_thread().name)
        if d.recipient.key == "17":
            raise ValueError("a defect while rendering")
        return build(ws_, templates, job, d)

    monkeypatch.setattr(chunks, "build_message", broken)
    with pytest.raises(ValueError, match="a defect while rendering"):
        engine.run_local(ws, "promo", run_key="k")
    assert not outbox_recipients(ws)
    # rendered beside the reservation on Postgres, in the chunk's own thread on SQLite
    assert (threads == {"herald-render"}) == (ws.store.dialect.name == "postgresql")
    assert Counter(s for (s,) in ledger_rows(ws, "status", where="status <> 'no_address'")
                   .values()) == {"queued": 24}
    monkeypatch.setattr(chunks, "build_message", build)
    assert engine.run_local(ws, "promo", run_key="k")["deliveries"]["sent"] == 24
    assert set(outbox_recipients(ws).values()) == {1}
