"""Shared fixtures: workspaces written from ``{path: contents}``, a small CRM source,
Postgres databases made per test, and one Prefect test harness per session."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from herald.core import clock
from herald.core.workspace import Workspace
from herald.flows import chunks

# what tests share besides fixtures lives in tests/helpers.py; these names stay importable
# from here too
from .helpers import (  # noqa: F401
    FILES,
    HERALD_YAML,
    PROMO_YAML,
    fill_people,
    outbox_files,
    outbox_messages,
    people,
    write_people,
)

# Postgres is "configured" when HERALD_TEST_POSTGRES_URL is set (.ci/run sets it): then a
# server that cannot be reached fails the tests that need it. Without it (a laptop), those
# tests try the default URL and skip, saying why, when nothing answers there.
PG_CONFIGURED = bool(os.environ.get("HERALD_TEST_POSTGRES_URL"))
PG_URL = os.environ.get("HERALD_TEST_POSTGRES_URL",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/test")

WorkspaceFactory = Callable[..., Workspace]

# Started in the background by a shell without job control (`make test &`, nohup, a CI
# runner), this process has SIGINT ignored, and every program the tests start would
# inherit that: `herald serve`, stopped with Ctrl-C's signal as an operator stops it,
# would ignore it and be killed after the tests' 30 s wait instead. The tests see SIGINT
# as a terminal's user would send it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# -- the clock ----------------------------------------------------------------------------
# Tests that depend on "now" set Herald's clock, and run at each of these moments with the
# same expected outcomes: the day they were written, a month and a year later, a US DST
# change (New York moves to UTC-4 at 07:00 UTC that day) and a year end (00:30 on
# 1 January in Shanghai). All at 16:30 UTC, so local days fall alike in every zone.
MOMENTS = {
    "written": datetime(2026, 11, 22, 16, 30, tzinfo=UTC),
    "month-later": datetime(2026, 12, 22, 16, 30, tzinfo=UTC),
    "year-later": datetime(2027, 11, 22, 16, 30, tzinfo=UTC),
    "dst-change": datetime(2027, 3, 14, 16, 30, tzinfo=UTC),
    "year-end": datetime(2026, 12, 31, 16, 30, tzinfo=UTC),
}


# `make test HERALD_TEST_NOW=2027-11-29T12:00Z` runs the whole suite with Herald's clock
# set that far away (running on from there), in this process and in the herald processes
# tests start: outcomes must not depend on the date the suite runs.
TEST_NOW = os.environ.get("HERALD_TEST_NOW", "").strip()
BASE_CLOCK = clock.Clock(clock.parse(TEST_NOW)) if TEST_NOW else clock.REAL
if TEST_NOW:
    os.environ[clock.ENV] = TEST_NOW


@pytest.fixture(autouse=True)
def _base_clock() -> Iterator[None]:
    """Every test starts on the suite's clock (the real one unless HERALD_TEST_NOW is
    set), and a test that sets the clock cannot leak it into the next."""
    with clock.using(BASE_CLOCK):
        yield


# -- Prefect's console ----------------------------------------------------------------------
# Prefect builds its console handler once, when a test first imports it (a `herald run`
# imports Prefect lazily), on the sys.stderr of that moment: under `capsys`, a stream
# pytest closes when that test ends. Every later Prefect console line then failed with
# "--- Logging error --- ... I/O operation on closed file" on the next test's stderr, so a
# test's result depended on which test ran before it. After each test the handlers write
# to whatever sys.stderr is current, as they do in a `herald` process.
class _CurrentStderr:
    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return False


@pytest.fixture(autouse=True)
def _prefect_console_follows_stderr() -> Iterator[None]:
    yield
    if "prefect.logging.handlers" not in sys.modules:
        return
    from herald.flows.cli.common import prefect_console_handlers

    for handler in prefect_console_handlers():
        if not isinstance(handler.stream, _CurrentStderr):
            # not setStream: it flushes the old stream, already closed
            handler.stream = _CurrentStderr()  # type: ignore[assignment]
            handler.console.file = handler.stream  # type: ignore[attr-defined]


@pytest.fixture(params=list(MOMENTS.values()), ids=list(MOMENTS))
def now(request: pytest.FixtureRequest) -> Iterator[datetime]:
    """Herald's clock frozen at each of MOMENTS in turn; the test gets the moment."""
    with clock.using(clock.Clock(request.param, frozen=True)):
        yield request.param


@pytest.fixture
def make_workspace(tmp_path: Path) -> Iterator[WorkspaceFactory]:
    """Write a workspace into tmp_path from FILES plus overrides; fill its CRM source."""
    opened: list[Workspace] = []

    def factory(files: dict[str, str | None] | None = None, rows: int = 100,
                folder: str = "ws", store: str | None = None) -> Workspace:
        """``store``: the workspace database URL to use instead of the YAML's."""
        root = tmp_path / folder
        merged: dict[str, str | None] = {**FILES, **(files or {})}
        for rel, content in merged.items():
            if content is None:
                continue
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(content), encoding="utf-8")
        write_people(root / "crm.db", people(rows))
        if store:
            config = root / "config/herald.yaml"
            lines = [line for line in config.read_text().splitlines()
                     if not line.startswith("store:")]
            config.write_text("\n".join([*lines, f'store: "{store}"', ""]))
        ws = Workspace.open(root)
        opened.append(ws)
        return ws

    yield factory
    for ws in opened:
        chunks.forget_workspace(ws.root)
        ws.dispose()


# -- a provider's HTTP API on loopback ------------------------------------------------------
@pytest.fixture
def peer() -> Iterator[Any]:
    """A real HTTP server on loopback answering as each test scripts it (http_peer.py)."""
    from .http_peer import Peer, serve

    server, found = serve(Peer())
    yield found
    server.shutdown()
    server.server_close()


# -- Postgres -----------------------------------------------------------------------------
def _pg_admin() -> Any:
    from sqlalchemy import create_engine

    return create_engine(PG_URL, isolation_level="AUTOCOMMIT")


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A fresh Postgres database for one test (dropped after); skip without a server."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    admin = _pg_admin()
    name = f"herald_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        why = f"PostgreSQL not reachable at {PG_URL}: {str(exc.orig).strip()[:120]}"
        if PG_CONFIGURED:
            pytest.fail(f"{why} (HERALD_TEST_POSTGRES_URL is set: Postgres is required)")
        pytest.skip(why)
    url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        chunks.forget_all()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest) -> str | None:
    """Run a test with the workspace database on SQLite, then on Postgres."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("pg_database"))


# -- Prefect ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One Prefect test harness for the whole session (starting one costs ~12 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# -- the reliability catalogue -------------------------------------------------------------
@pytest.fixture
def catalogue() -> Callable[..., None]:
    """Record a catalogue entry (tests/catalogue.py) once the test's assertions passed."""
    from . import catalogue as entries

    return entries.record


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get("HERALD_CATALOGUE")
    if path:
        from . import catalogue as entries

        entries.save(Path(path))
