"""The workspace database: engines for it and for sources, and every table Herald keeps.

Tables: runs and the per-recipient ledger (``herald.delivery.ledger``), the decisions of
content experiments (``herald.delivery.variants``), the suppression
list (``herald.delivery.suppression``), audience packages (``herald.audiences.store``)
and state channels share across workers (``herald_channel_tokens``, the rate limits of
``herald_rate_limits``). They are declared
here, in one place, so creating the schema needs no module from above the core.

SQLite paths in URLs are relative to the workspace, not the current directory, so a
workspace behaves the same wherever Herald is started from.
"""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import (
    DDL,
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    inspect,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from herald.core.errors import HeraldError, WorkspaceError
from herald.core.files import check_readable, folder_blocked

# Every table Herald keeps in the workspace database is declared on this one MetaData.
metadata = MetaData()


# -- runs and the ledger ------------------------------------------------------------------
class Status(StrEnum):
    """Every status a ledger row or a run report can show, in report order."""

    SENT = "sent"
    FAILED = "failed"
    CAPPED = "capped"
    SUPPRESSED = "suppressed"
    HELD_OUT = "held_out"
    NO_ADDRESS = "no_address"
    RENDER_ERROR = "render_error"
    QUIET_HOURS = "quiet_hours"
    DEFERRED = "deferred"
    STOPPED = "stopped"  # an experiment without a winner and `fallback: stop`
    WITHDRAWN = "withdrawn"  # reserved by a journey step; the person left before it went out
    DUPLICATE = "duplicate"  # reported only: a rerun found the row already there
    QUEUED = "queued"
    SENDING = "sending"


STATUSES: tuple[str, ...] = tuple(Status)
# Rows that count against frequency caps: sent, or reserved for sending (a deferred
# recipient keeps its place until its quiet hours end).
COUNTED = (Status.QUEUED, Status.SENDING, Status.SENT, Status.DEFERRED)

runs = Table(
    "herald_runs", metadata,
    Column("id", String(40), primary_key=True),
    Column("flow", String(128), nullable=False, index=True),
    Column("run_key", String(128), nullable=False),
    Column("package_id", String(40)),
    Column("dry_run", Boolean, nullable=False, default=False),
    Column("status", String(16), nullable=False),  # running | completed | failed
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    Column("summary", Text),
    Column("error", Text),
    Column("owner", String(128)),  # host:pid of the process running it
)

# SQLite has JSON functions built in from 3.38 (the ->> operator too)
SQLITE_JSON = sqlite3.sqlite_version_info >= (3, 38)

deliveries = Table(
    "herald_deliveries", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("flow", String(128), nullable=False),
    Column("run_key", String(128), nullable=False),
    Column("recipient", String(255), nullable=False),
    Column("run_id", String(40), nullable=False, index=True),
    Column("package_id", String(40), nullable=False),
    Column("tier", String(128), nullable=False),
    Column("channel", String(64)),
    Column("address", String(512)),
    Column("status", String(16), nullable=False),
    Column("reason", Text),
    Column("code", String(64)),
    Column("provider_id", String(255)),
    Column("attempts", Integer, nullable=False, default=0),
    # what frequency caps see: the sending flow's priority, and whether it counts at all
    # (an exempt, transactional flow's messages do not)
    Column("priority", Integer, nullable=False, default=0),
    Column("counted", Boolean, nullable=False, default=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("sent_at", DateTime(timezone=True)),
    Column("not_before", DateTime(timezone=True)),  # deferred: send after this
    Column("segments", Integer),  # what the message cost in provider units (SMS parts)
    Column("variant", String(64)),  # the content variant of the recipient's experiment
    UniqueConstraint("flow", "run_key", "recipient", name="uq_herald_deliveries_once"),
    Index("ix_herald_deliveries_caps", "recipient", "created_at"),
)
# deduplication by address looks up a chunk's addresses among a run key's rows (e-mail
# addresses compared lower-cased): without this index each chunk scanned the run key
Index("ix_herald_deliveries_address", deliveries.c.flow, deliveries.c.run_key,
      deliveries.c.channel, func.lower(deliveries.c.address))
# A row changes state twice after it is written (``sending``, then the provider's answer)
# and none of those columns is indexed: with room left on its page Postgres writes each
# new version beside the old one (a HOT update) instead of a new entry into each of the
# five indexes. Pages filled to 40% keep room for both versions (a settled row is wider
# than a reserved one): measured at 100,000 recipients, 93-97% of updates HOT and 20% less
# Postgres CPU than at 60% (69-72% HOT), in a table no larger (the non-HOT versions took
# new pages). ensure_schema sets it on ledgers created with another fill factor.
LEDGER_FILLFACTOR = 40
event.listen(deliveries, "after_create", DDL(
    f"ALTER TABLE {deliveries.name} SET (fillfactor = {LEDGER_FILLFACTOR})"
).execute_if(dialect="postgresql"))

# One row per experiment of a (flow, run key) that tests a share first: when its decision
# is due, and once made, the winner (null: none, the rest were stopped), the outcome,
# the reason in words and the figures it was made on (JSON).
experiments = Table(
    "herald_experiments", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("flow", String(128), nullable=False),
    Column("run_key", String(128), nullable=False),
    Column("experiment", String(128), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("decide_at", DateTime(timezone=True), nullable=False),
    Column("status", String(16), nullable=False),  # testing | decided
    Column("winner", String(64)),
    Column("outcome", String(16)),  # winner | control | best | stop (the fallback used)
    Column("reason", Text),
    Column("figures", Text),
    Column("decided_at", DateTime(timezone=True)),
    UniqueConstraint("flow", "run_key", "experiment", name="uq_herald_experiments"),
)

# Messages ``herald send-test`` sent to an operator's own address: kept apart from the
# ledger, so no cap, report or rerun ever counts them.
test_sends = Table(
    "herald_test_sends", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("flow", String(128), nullable=False),
    Column("tier", String(128), nullable=False),
    Column("sample", String(255), nullable=False),  # the recipient whose data rendered it
    Column("channel", String(64), nullable=False),
    Column("address", String(512), nullable=False),
    Column("status", String(16), nullable=False),  # sent | failed
    Column("code", String(64)),
    Column("reason", Text),
    Column("provider_id", String(255)),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

ALL_CHANNELS = "*"  # a suppression that holds on every channel

suppressions = Table(
    "herald_suppressions", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("value", String(512), nullable=False),
    Column("channel", String(64), nullable=False),  # "*": every channel
    Column("reason", Text),
    Column("source", String(32), nullable=False),  # operator | import | provider | unsubscribe
    Column("created_at", DateTime(timezone=True), nullable=False),
    # how ``value`` was normalised: null for entries made before values were normalised
    # like addresses (migrated by herald.delivery.suppression.migrate)
    Column("form", Integer),
    UniqueConstraint("value", "channel", name="uq_herald_suppressions"),
)


# -- audience packages -------------------------------------------------------------------
packages = Table(
    "herald_packages", metadata,
    Column("id", String(40), primary_key=True),
    Column("flow", String(128), nullable=False, index=True),
    Column("segment", String(255), nullable=False),
    Column("source", String(128), nullable=False),
    Column("sql_sha256", String(64), nullable=False),
    Column("params", Text, nullable=False),
    Column("key_column", String(128), nullable=False),
    Column("tier_column", String(128)),
    Column("columns", Text, nullable=False),
    Column("built_at", DateTime(timezone=True), nullable=False),
    Column("size", Integer, nullable=False, default=0),
    Column("tiers", Text, nullable=False, default="{}"),
    Column("status", String(16), nullable=False),  # building | ready
    Column("owner", String(128)),  # host:pid of the process building it
)

package_rows = Table(
    "herald_package_rows", metadata,
    Column("package_id", String(40), primary_key=True),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("key", String(255), nullable=False),
    Column("tier", String(128), nullable=False),
    Column("data", Text, nullable=False),
    # A duplicate key in the segment's result would mean two messages to one person.
    UniqueConstraint("package_id", "key", name="uq_herald_package_rows_key"),
)


# -- state channels share (access tokens) ------------------------------------------------
channel_tokens = Table(
    "herald_channel_tokens", metadata,
    Column("channel", String(64), primary_key=True),
    Column("account", String(128), primary_key=True),
    Column("token", Text, nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)
# WeChat's force-refresh requests per account and day (its day, in Beijing time): the
# mode is limited to 20 a day, 30 s apart, whichever worker asks
channel_token_forces = Table(
    "herald_channel_token_forces", metadata,
    Column("account", String(128), primary_key=True),
    Column("day", String(10), nullable=False),
    Column("count", Integer, nullable=False),
    Column("last_at", DateTime(timezone=True), nullable=False),
)


# A channel's rate limit, the provider account's, shared by every process that sends on
# it (herald.delivery.ratelimit): the next free sending slot and the rate now in force
# (halved on throttling, recovering with sends) and a pause the provider asked for, as
# seconds on the database's clock.
rate_limits = Table(
    "herald_rate_limits", metadata,
    Column("channel", String(64), primary_key=True),
    Column("ceiling", Float, nullable=False),  # the configured rate, messages a second
    Column("rate", Float, nullable=False),  # the rate in force (AIMD)
    Column("next_at", Float, nullable=False),  # the next free slot
    Column("cut_at", Float, nullable=False),  # when the rate was last halved
    # a throttling answer's long wait (429 with Retry-After: 120): nothing is sent on the
    # channel before paused_until; the answer's code and detail say why
    Column("paused_until", Float),
    Column("paused_code", String(64)),
    Column("paused_detail", Text),
)


def clock_sql(dialect: str) -> str:
    """SQL for the database's clock in seconds since the epoch: one time base for every
    process and host that shares the database (their own clocks may disagree)."""
    if dialect == "postgresql":
        return "CAST(EXTRACT(EPOCH FROM statement_timestamp()) AS DOUBLE PRECISION)"
    if dialect == "sqlite":
        return "((julianday('now') - 2440587.5) * 86400.0)"
    raise NotImplementedError(f"no clock for the {dialect} dialect")


# -- journeys ---------------------------------------------------------------------------
# A journey's state (herald.journeys): versions of its definition, one enrollment per
# (journey, recipient, entry number) with its step, due time and lease (the shape of
# Mautic's lead event log and Laudspeaker's journey location), one log row per step
# visited, unique on (enrollment, seq) so a replayed move writes nothing twice.
JOURNEY_LIVE = ("active", "waiting")
JOURNEY_ENDED = ("completed", "exited")

journey_versions = Table(
    "herald_journey_versions", metadata,
    Column("journey", String(128), nullable=False),
    Column("version", String(16), nullable=False),
    Column("definition", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("journey", "version", name="pk_herald_journey_versions"),
)

journey_enrollments = Table(
    "herald_journey_enrollments", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("journey", String(128), nullable=False),
    Column("recipient", String(255), nullable=False),
    Column("entry_no", Integer, nullable=False),
    Column("version", String(16), nullable=False),
    Column("step", String(128), nullable=False),
    Column("seq", Integer, nullable=False),  # steps visited so far
    Column("status", String(16), nullable=False),  # active | waiting | completed | exited
    Column("exit_reason", Text),
    Column("tier", String(128), nullable=False),
    Column("cohort", String(64)),
    Column("due_at", DateTime(timezone=True), nullable=False),
    Column("deadline", DateTime(timezone=True)),  # a wait_for's timeout
    Column("arrived_at", DateTime(timezone=True), nullable=False),  # at the current step
    Column("entered_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("checked_at", DateTime(timezone=True)),  # clock time of the last tick to look
    Column("lease_owner", String(64)),
    Column("lease_until", DateTime(timezone=True)),  # real time
    Column("data", Text, nullable=False),  # the entry row, JSON
    UniqueConstraint("journey", "recipient", "entry_no", name="uq_herald_journey_entry"),
    Index("ix_herald_journey_due", "journey", "status", "due_at"),
)

journey_log = Table(
    "herald_journey_log", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("enrollment_id", Integer, nullable=False),
    Column("journey", String(128), nullable=False),
    Column("recipient", String(255), nullable=False),
    Column("entry_no", Integer, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("step", String(128), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("outcome", String(64), nullable=False),
    Column("detail", Text),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("tick", String(40), nullable=False),
    UniqueConstraint("enrollment_id", "seq", name="uq_herald_journey_log_visit"),
    Index("ix_herald_journey_log_step", "journey", "step"),
)


def process_owner() -> str:
    """``host:pid`` of this process, recorded on what it is running or building."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_gone(owner: str | None) -> bool:
    """Whether the process ``owner`` names is known to have ended: it ran on this host
    and no process has its pid. A process on another host is never presumed gone."""
    if not owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def resolve_url(url: str, root: Path) -> str:
    """Make a relative SQLite path absolute against ``root``; other URLs pass through."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return url
    if parsed.database == ":memory:" or parsed.database.startswith("file:"):
        return url
    path = Path(parsed.database)
    if not path.is_absolute():
        path = root / path
    return parsed.set(database=str(path)).render_as_string(hide_password=False)


def make_engine(url: str, root: Path, store: bool = False, read_only: bool = False) -> Engine:
    """An engine for ``url``. SQLite waits up to 30 s for a lock; the workspace ``store``
    also gets its folder, WAL and write transactions that lock at BEGIN. A source is the
    operator's database: Herald only reads it and leaves its settings alone.

    ``read_only`` (every source but a write-back target): SQLite opens the file with
    ``mode=ro`` (a missing file is an error, never a new empty database); Postgres runs
    every transaction read-only. A statement that writes fails in the database itself.
    """
    resolved = resolve_url(url, root)
    parsed = make_url(resolved)
    kwargs: dict[str, Any] = {}
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if store and parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                blocking = folder_blocked(folder)
                raise WorkspaceError(
                    f"the workspace database {render_url(resolved)}: its folder cannot be "
                    "made: " + (f"{blocking} is a file, not a folder" if blocking else
                                f"{folder}: {(exc.strerror or type(exc).__name__).lower()}")
                ) from None
        kwargs["connect_args"] = {"timeout": 30}
        if read_only and parsed.database and parsed.database != ":memory:" \
                and not parsed.database.startswith("file:"):
            path = Path(parsed.database)
            if not path.exists():
                raise WorkspaceError(f"{render_url(resolved)}: database file not found "
                                     f"({path})")
            check_readable(path, render_url(resolved))  # else blamed on the query
            uri = f"{path.as_uri()}?mode=ro"
            kwargs["creator"] = lambda: sqlite3.connect(uri, uri=True, timeout=30,
                                                        check_same_thread=False)
    else:
        kwargs["pool_pre_ping"] = True
        if read_only and backend == "postgresql":
            kwargs["connect_args"] = {"options": "-c default_transaction_read_only=on"}
    problem = driver_problem(resolved)
    if problem:
        raise WorkspaceError(f"{render_url(resolved)}: {problem}")
    engine = create_engine(resolved, **kwargs)
    _name_in_errors(engine, f"{'the workspace database' if store else 'the database'} "
                            f"{render_url(resolved)}")
    if store and backend == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        begin_immediate(engine)
    return engine


def driver_problem(url: str) -> str | None:
    """Why SQLAlchemy cannot load a driver for ``url`` (an unknown database type, or its
    Python driver not installed), or None when it can."""
    try:
        make_url(url).get_dialect().import_dbapi()
    except NoSuchModuleError:
        return (f"unknown database type '{make_url(url).drivername}' (use sqlite or "
                "postgresql+psycopg)")
    except ArgumentError:
        return None  # not a URL at all: that is reported where it is parsed
    except ImportError as exc:
        return (f"unsupported database URL: its driver is not installed (no module "
                f"'{exc.name}'; use sqlite or postgresql+psycopg)")
    return None


def open_store(url: str, root: Path) -> Engine:
    """The workspace database, its schema ensured. A file that is not a database, one
    that cannot be written, a lock that does not come: one line naming the database."""
    engine = make_engine(url, root, store=True)
    try:
        ensure_schema(engine)
    except DBAPIError as exc:
        engine.dispose()
        raise WorkspaceError(describe_db_error(engine.url.render_as_string(), exc)) from None
    return engine


def describe_db_error(url: str, exc: DBAPIError) -> str:
    """``the workspace database URL: what went wrong`` with a hint for the usual cases."""
    return f"the workspace database {render_url(url)}: {_what_went_wrong(exc)}"


DATABASE_NOTE = "herald_database"  # the attribute naming the database an error came from
_names: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()


def _name_in_errors(engine: Engine, name: str) -> None:
    """Every DBAPIError of ``engine`` carries ``name`` (its URL, password hidden), so
    that a failure far from where the engine was made still says which database."""
    _names[engine] = name  # for errors raised at the driver (at_driver)

    @event.listens_for(engine, "handle_error")
    def _note(context: Any) -> None:
        if context.sqlalchemy_exception is not None:
            setattr(context.sqlalchemy_exception, DATABASE_NOTE, name)


@contextmanager
def at_driver(conn: Connection, statement: str) -> Iterator[Any]:
    """The driver's connection under ``conn``, in ``conn``'s transaction (for what
    SQLAlchemy has no statement for: psycopg's COPY, arrays bound whole). A driver error
    comes out as SQLAlchemy's (``DBAPIError`` and its subclasses: OperationalError for a
    lock timeout or a dropped connection), naming the database, as ``conn.execute``'s
    would: retries and the CLI's one-line error treat both alike."""
    raw = conn.connection.dbapi_connection
    assert raw is not None
    dbapi = conn.dialect.loaded_dbapi
    try:
        yield raw
    except dbapi.Error as exc:
        wrapped = DBAPIError.instance(statement, None, exc, dbapi.Error,
                                      dialect=conn.dialect)
        note = _names.get(conn.engine)
        if note:
            setattr(wrapped, DATABASE_NOTE, note)
        raise wrapped from exc


# COPY's text format: a field's backslashes, tabs, newlines and carriage returns escaped
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_escapes(value: str) -> bool:
    """Whether ``value`` may hold one of the four characters COPY's text format escapes
    (``isprintable`` is false for tab, newline and carriage return): a cheap test, so
    that the common value is written as it is."""
    return "\\" in value or not value.isprintable()


def copy_text(value: str) -> str:
    """``value`` as a field of Postgres's COPY text format."""
    return value.translate(_COPY_ESCAPES) if copy_escapes(value) else value


def to_driver(conn: Connection, column: Any) -> Callable[[Any], Any]:
    """The dialect's conversion of a Python value for ``column``, for a statement written
    for the driver (SQLite stores times as text), or the identity when there is none."""
    process = column.type.dialect_impl(conn.dialect).bind_processor(conn.dialect)
    return process or (lambda value: value)


def driver_mark(dialect: Any) -> str:
    """The placeholder of a statement written for the driver (``at_driver``): SQLite's
    ``?``, psycopg's ``%s``."""
    return "?" if dialect.paramstyle == "qmark" else "%s"


def from_database(exc: DBAPIError, engine: Engine) -> bool:
    """Whether ``exc`` was raised by ``engine``'s database (it carries its name)."""
    name = _names.get(engine)
    return name is not None and getattr(exc, DATABASE_NOTE, None) == name


def describe_failure(exc: DBAPIError) -> str:
    """One line for a database error: which database, what went wrong, and a hint."""
    return f"{getattr(exc, DATABASE_NOTE, 'a database')}: {_what_went_wrong(exc)}"


def describe_exception(exc: BaseException) -> str:
    """One line for why something failed, fit for a run's record, its logs and the
    console: a HeraldError's own words; a database error's database and what went wrong
    (not the statement and parameters SQLAlchemy quotes, which may hold contact details);
    else the exception's type and message."""
    if isinstance(exc, HeraldError):
        return str(exc)
    if isinstance(exc, DBAPIError):
        return describe_failure(exc)
    return f"{type(exc).__name__}: {exc}"


# SQLite's driver on a stored text that is not UTF-8; the text it quotes is the value's
_NOT_UTF8 = re.compile(r"Could not decode to UTF-8 column '(.*?)' with text '.*", re.DOTALL)


def driver_message(exc: BaseException) -> str:
    """The first line of what the driver said (a DBAPIError's driver error, or the
    driver's own), without a stored value it quotes."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    lines = str(orig or exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    not_utf8 = _NOT_UTF8.match(text)
    return not_utf8_text(not_utf8.group(1)) if not_utf8 else text


def _what_went_wrong(exc: DBAPIError) -> str:
    text = driver_message(exc) if exc.orig else type(exc).__name__
    hint = ""
    if "not a database" in text or "malformed" in text:
        hint = " (the file is damaged or is not a SQLite database: restore it from a backup)"
    elif "readonly" in text or "read-only" in text:
        hint = " (Herald needs to write to it: check the file's and folder's permissions)"
    elif "locked" in text:
        hint = " (another process holds it: try again when it is done)"
    return f"{text}{hint}"


def not_utf8_text(column: str) -> str:
    """What to say of a column whose stored text is not UTF-8 (never the value: it is a
    person's data)."""
    return (f"column '{column}' holds text that is not UTF-8 (bytes in another encoding, "
            "as SQLite keeps them): convert it in the segment's query or in the source")


def render_url(url: str) -> str:
    """A database URL fit for a message: its password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL that does not parse is shown as the operator wrote it
        return url


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets chunk threads read while another writes; busy_timeout waits for the
    # writer lock instead of failing at once.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    # Switching to WAL needs a moment alone with the file; when several processes open
    # a new workspace database at once, the losers retry (the mode then persists).
    for attempt in range(50):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError:
            if attempt == 49:
                raise
            time.sleep(0.1)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def ensure_schema(engine: Engine) -> None:
    """Create Herald's tables in the workspace database if they do not exist yet.

    Several processes may open a new workspace database at once (parallel runs,
    workers): creation happens under a lock so they do not trip over each other.
    """
    with engine.connect() as conn:  # a read first: a complete schema needs no write lock
        inspector = inspect(conn)
        tables = {t: {c["name"] for c in inspector.get_columns(t)}
                for t in inspector.get_table_names()}
        indexes = _index_names(conn)
        filled = _ledger_fillfactor(conn)
        if all(t.name in tables and {c.name for c in t.columns} <= tables[t.name]
               and {i.name for i in t.indexes} <= indexes
               for t in metadata.sorted_tables) and filled in (None, LEDGER_FILLFACTOR):
            return
    with writing(engine) as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7242816)")
        metadata.create_all(conn)
        inspector = inspect(conn)
        for table in metadata.sorted_tables:
            have = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in have and column.nullable and column.default is None:
                    # a column added since: nullable, so older rows simply lack it
                    kind = column.type.compile(dialect=conn.dialect)
                    conn.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN '
                                         f'"{column.name}" {kind}')
                    have.add(column.name)
            missing = [c.name for c in table.columns if c.name not in have]
            if missing:
                raise WorkspaceError(
                    f"the workspace database ({engine.url.render_as_string()}) was made by an "
                    f"older Herald: table {table.name} lacks {', '.join(missing)}. Move it "
                    "aside to start a new one (there are no migrations yet)")
        named = _index_names(conn)
        for table in metadata.sorted_tables:
            for index in table.indexes:  # an index added since
                if index.name not in named:
                    index.create(conn)
        if _ledger_fillfactor(conn) not in (None, LEDGER_FILLFACTOR):
            # a ledger made by an earlier Herald: pages it fills from now on keep the room
            # (a change of the table's settings only, no rewrite)
            conn.exec_driver_sql(f"ALTER TABLE {deliveries.name} "
                                 f"SET (fillfactor = {LEDGER_FILLFACTOR})")


def _ledger_fillfactor(conn: Connection) -> int | None:
    """The deliveries table's fill factor on Postgres (100 when never set), else None."""
    if conn.dialect.name != "postgresql":
        return None
    options = conn.exec_driver_sql(
        "SELECT coalesce(reloptions, '{}') FROM pg_class WHERE oid = to_regclass(%(name)s)",
        {"name": deliveries.name}).scalar()
    if options is None:  # no table yet
        return None
    found = dict(o.split("=", 1) for o in options)
    return int(found.get("fillfactor", 100))


def _index_names(conn: Connection) -> set[str]:
    """The names of the database's indexes (the inspector skips expression indexes on
    SQLite, with a warning)."""
    if conn.dialect.name == "sqlite":
        query = "SELECT name FROM sqlite_master WHERE type = 'index'"
    elif conn.dialect.name == "postgresql":
        query = "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
    else:  # pragma: no cover - the two stores Herald supports
        return {str(i["name"]) for t in inspect(conn).get_table_names()
                for i in inspect(conn).get_indexes(t)}
    return {name for (name,) in conn.exec_driver_sql(query)}


@contextmanager
def writing(engine: Engine) -> Iterator[Connection]:
    """A transaction that writes. On SQLite it takes the write lock at BEGIN
    (``BEGIN IMMEDIATE``), so it waits its turn instead of failing with "database is
    locked" when another process wrote since it started reading."""
    with engine.connect().execution_options(immediate=True) as conn, conn.begin():
        yield conn


def begin_immediate(engine: Engine) -> None:
    """Make ``connection.execution_options(immediate=True)`` take SQLite's write lock at BEGIN.

    pysqlite defers BEGIN until the first write, so two writers can both read and then
    both write; a reservation must hold the lock from its first read (SQLAlchemy's
    documented recipe for SQLite transactions).
    """
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "connect")
    def _autocommit_driver(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get("immediate")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
