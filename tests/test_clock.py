"""Herald's one clock: set, frozen or running, carried to workers, read by every time
decision (run keys, segment ``:now``, ledger stamps) and settable from the CLI."""

from __future__ import annotations

import json
import pickle
import re
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from herald.audiences import builder, sql, store
from herald.core import clock
from herald.delivery import ledger
from herald.flows import chunks, engine
from herald.flows.cli import main


def test_parse_accepts_iso_8601_and_names_what_is_wrong() -> None:
    assert clock.parse("2026-12-07T10:00+08:00") == datetime(2026, 12, 7, 2, tzinfo=UTC)
    assert clock.parse("2026-12-07T02:00Z") == datetime(2026, 12, 7, 2, tzinfo=UTC)
    assert clock.parse("2026-12-07") == datetime(2026, 12, 7, tzinfo=UTC)
    assert clock.parse(" 2026-12-07T02:00 ") == datetime(2026, 12, 7, 2, tzinfo=UTC)
    with pytest.raises(ValueError, match="'next monday' is not an ISO 8601 time"):
        clock.parse("next monday")
    with pytest.raises(ValueError, match="an empty time"):
        clock.parse("  ")
    # the years are UTC's: 1900-01-01T00:00+14:00 is 1899-12-31T10:00Z
    for far in ("9999-12-31T23:00Z", "0001-01-01", "1899-12-31T23:59+00:00",
                "1900-01-01T00:00+14:00", "9000-12-31T23:59-14:00"):
        with pytest.raises(ValueError, match=re.escape(
                f"'{far}' is outside the years Herald computes with (1900 to 9000, in UTC)")):
            clock.parse(far)
    assert clock.parse("9000-12-31") == datetime(9000, 12, 31, tzinfo=UTC)


def test_frozen_running_advanced_and_restored() -> None:
    clock.install(clock.REAL)  # this test is about the real clock (the suite may set one)
    real = clock.now()
    assert abs((real - datetime.now(UTC)).total_seconds()) < 5
    moment = datetime(2030, 6, 1, 12, tzinfo=UTC)
    with clock.using(clock.Clock(moment, frozen=True)):
        assert clock.now() == moment
        assert clock.advance(timedelta(days=3)).now() == moment + timedelta(days=3)
        assert clock.now() == moment + timedelta(days=3)
    assert clock.current() == clock.REAL
    running = clock.Clock(moment, started=clock.Clock().started - 90)  # set 90 s ago
    assert timedelta(seconds=89) < running.now() - moment < timedelta(seconds=120)
    with pytest.raises(RuntimeError, match="cannot be advanced"):
        clock.advance(timedelta(days=1))


def test_the_environment_sets_a_process_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(clock.ENV, "2031-01-02T03:04Z")
    monkeypatch.setattr(clock, "_current", None)  # as in a process just started
    assert clock.now() - datetime(2031, 1, 2, 3, 4, tzinfo=UTC) < timedelta(seconds=60)


def test_default_run_key_is_today_in_the_flows_zone_by_the_clock(make_workspace) -> None:
    ws = make_workspace()
    # the suite's clock (the real one unless HERALD_TEST_NOW sets it): the expectation is
    # computed from that clock, as the code does
    expected = clock.now().date().isoformat()
    assert engine.default_run_key(ws, "promo") in {
        expected, (clock.now() - timedelta(seconds=5)).date().isoformat()}
    late = datetime(2026, 12, 31, 17, 0, tzinfo=UTC)  # already 1 January in Shanghai
    with clock.using(clock.Clock(late, frozen=True)):
        assert engine.default_run_key(ws, "promo") == "2026-12-31"  # the flow is in UTC
        config = ws.root / "config/herald.yaml"
        config.write_text(config.read_text().replace("timezone: UTC",
                                                     "timezone: Asia/Shanghai"))
        chunks.forget_workspace(ws.root)
        from herald.core.workspace import Workspace

        shanghai = Workspace.open(ws.root)
        try:
            assert engine.default_run_key(shanghai, "promo") == "2027-01-01"
        finally:
            shanghai.dispose()


def test_segment_now_is_bound_from_the_clock(make_workspace, now) -> None:
    ws = make_workspace({"audiences/people.sql": (
        "SELECT id, name, email, phone, tier, locale, score, :now AS as_of\n"
        "FROM people WHERE score >= :min_score ORDER BY id\n")}, rows=3)
    spec = ws.flow("promo")
    segment = sql.load_segment(ws, spec)
    assert segment.params["now"] == now.strftime("%Y-%m-%d %H:%M:%S")  # SQLite: UTC text
    package = builder.build(ws, spec, segment)
    assert package.built_at.replace(tzinfo=UTC) == now
    rows = store.read(ws, package.id, 0, 3)
    assert {r.data["as_of"] for r in rows} == {now.strftime("%Y-%m-%d %H:%M:%S")}
    # an explicit parameter still wins over the clock
    assert sql.load_segment(ws, spec, {"now": "2000-01-01"}).params["now"] == "2000-01-01"


def test_a_chunk_job_carries_the_clock_of_its_run(make_workspace, now) -> None:
    """A Dask worker process starts on the real clock: the job brings the run's clock."""
    ws = make_workspace(rows=5)
    prepared = engine.prepare(ws, "promo", run_key="k")
    job = pickle.loads(pickle.dumps(prepared.chunks[0]))
    assert job.clock == clock.current()
    with clock.using(clock.REAL):  # as in another process
        chunks.run_chunk(job)
    with ws.store.connect() as conn:
        stamps = set(conn.execute(select(ledger.deliveries.c.created_at)).scalars())
    assert {s.replace(tzinfo=UTC) for s in stamps} == {now}


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    captured = capsys.readouterr()
    return int(exc.value.code or 0), captured.out, captured.err


def test_a_bad_now_is_a_usage_error(make_workspace, capsys) -> None:
    ws = make_workspace()
    before = clock.current()
    code, _, err = cli(capsys, "run", "promo", "--dry-run", "--now", "tomorrow",
                       "-w", str(ws.root))
    assert code == 2 and "'tomorrow' is not an ISO 8601 time" in err
    code, _, err = cli(capsys, "journey", "tick", "nudge", "--now", "9999-12-31T23:00Z",
                       "-w", str(ws.root))
    assert code == 2 and "outside the years Herald computes with" in err, err
    assert clock.current().anchor == before.anchor  # HERALD_NOW may set it afresh


def test_a_bad_herald_now_is_named_as_the_environments(make_workspace, capsys,
                                                       monkeypatch) -> None:
    """HERALD_NOW=garbage was refused as "Invalid value for --now", an option the
    operator never gave."""
    ws = make_workspace()
    monkeypatch.setenv(clock.ENV, "garbage")
    code, _, err = cli(capsys, "recipient", "1", "-w", str(ws.root))
    said = " ".join(err.split())
    assert code == 2 and "Invalid value for HERALD_NOW (the environment): 'garbage' is " \
                         "not an ISO 8601 time" in said, err


@pytest.mark.prefect
def test_dry_run_rehearsal_at_a_set_time(make_workspace, prefect_harness, capsys) -> None:
    ws = make_workspace({"config/herald.yaml": (
        "timezone: Asia/Shanghai\nsources: {crm: 'sqlite:///crm.db'}\n"
        "store: 'sqlite:///.herald/herald.db'\nchannels:\n"
        "  email: {type: outbox, kind: email}\n  sms: {type: outbox, kind: sms}\n"
        "quiet_hours: {from: '21:00', to: '09:00', mode: defer}\n")}, rows=10)
    at = "2027-01-01T08:30+08:00"  # inside quiet hours in Shanghai, New Year's morning
    code, out, err = cli(capsys, "run", "promo", "--dry-run", "--json", "--now", at,
                         "-w", str(ws.root))
    assert code == 0, err
    summary = json.loads(out)
    assert summary["run_key"] == "2027-01-01" and summary["dry_run"] is True
    assert summary["deliveries"]["deferred"] == 10 and summary["deliveries"]["sent"] == 0
    started = datetime.fromisoformat(summary["started_at"])
    assert timedelta(0) <= started - clock.parse(at) < timedelta(minutes=2)
    code, out, _ = cli(capsys, "run", "promo", "--dry-run", "--json",
                       "--now", "2027-01-01T10:00+08:00", "-w", str(ws.root))
    assert code == 0
    later = json.loads(out)
    assert later["deliveries"]["sent"] == 10 and later["deliveries"]["deferred"] == 0
