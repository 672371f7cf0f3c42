"""Database engines for sources and the workspace store.

SQLite paths in URLs are relative to the workspace, not the current directory, so a
workspace behaves the same wherever Herald is started from.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, MetaData, create_engine, event, inspect
from sqlalchemy.engine import make_url

# Every table Herald keeps in the workspace database (package store, ledger, runs,
# suppression list) is declared on this one MetaData.
metadata = MetaData()


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


def make_engine(url: str, root: Path, store: bool = False) -> Engine:
    """An engine for ``url``. SQLite waits up to 30 s for a lock; the workspace ``store``
    also gets its folder, WAL and write transactions that lock at BEGIN. A source is the
    operator's database: Herald only reads it and leaves its settings alone."""
    resolved = resolve_url(url, root)
    parsed = make_url(resolved)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        if store and parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 30}
    else:
        kwargs["pool_pre_ping"] = True
    engine = create_engine(resolved, **kwargs)
    if store and parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        begin_immediate(engine)
    return engine


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
    # The modules that own the tables declare them on `metadata` when imported.
    import herald.audiences.store  # noqa: F401
    import herald.channels.ledger  # noqa: F401
    import herald.channels.wechat  # noqa: F401  (its shared access tokens)

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
                from herald.flows.errors import WorkspaceError

                raise WorkspaceError(
                    f"the workspace database ({engine.url.render_as_string()}) was made by an "
                    f"older Herald: table {table.name} lacks {', '.join(missing)}. Move it "
                    "aside to start a new one (there are no migrations yet)")


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
