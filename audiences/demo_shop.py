"""The demo shop ("Lumen Shop" / 流明商城): a deterministic source database for the demo flows.

``build_demo_shop(url)`` drops and recreates three tables and fills them:

- ``customers``: Chinese (zh_CN, ~60%) and English-speaking (en_US) customers with names,
  contact columns (some missing, a few malformed e-mails) and a sign-up time;
- ``orders``: never, once, a few times or (whales) very often, spread over ~3 years, so
  recency / frequency / money scores mean something and a clear lapsed group exists;
- ``members``: the loyalty programme, points earned from paid orders and the level those
  points reach (bronze 0, silver 1000, gold 5000, platinum 20000).

Only ``random.Random(seed)`` is used, so the same seed and ``today`` give the same rows on
any machine. Every date is relative to ``today``, so the segments ("signed up in the last
7 days", "no order for 90 days") find people whenever the demo is built. Timestamps are
naive UTC, the convention the segment SQL assumes.

Contact data is safe to send to by mistake: e-mail domains are reserved (RFC 2606
``example.com/net/org`` and the ``.example`` TLD), US numbers are in the fictional
555-0100..0199 block, UK numbers in Ofcom's drama range 07700 900xxx, and Chinese numbers
in the well-known sample block 138 0013 8xxx. Those blocks are small, so some customers
share a phone number (as households do); phone is not unique.

The rows are drawn in ``herald.audiences.demo_rows``; the orders a simulated campaign
response adds are ``herald.audiences.demo_response``'s.
"""

from __future__ import annotations

import argparse
import time as timer
from collections.abc import Iterable
from datetime import date, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    Column,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    create_engine,
    insert,
    inspect,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Engine, make_url

from herald.audiences.demo_rows import DEFAULT_CUSTOMERS, DEFAULT_SEED, generate
from herald.core.errors import WorkspaceError

T = TypeVar("T")

DEFAULT_URL = "sqlite:///.herald/demo.db"
INSERT_BATCH = 5000


class _SqliteTimestamp(sqlite.DATETIME):
    """SQLite keeps timestamps as text: whole seconds ('2026-11-21 19:04:05') read better
    in segment results than SQLAlchemy's default '.000000' suffix, still sort and
    julianday() correctly, and ``isoformat`` writes 100,000 of them ten times faster."""

    def bind_processor(self, dialect: Any) -> Any:
        def process(value: datetime | None) -> str | None:
            return None if value is None else value.isoformat(" ", "seconds")
        return process


Timestamp = DateTime().with_variant(_SqliteTimestamp(), "sqlite")

metadata = MetaData()

customer_table = Table(
    "customers", metadata,
    Column("customer_id", Integer, primary_key=True, autoincrement=False),
    Column("first_name", String(40), nullable=False),
    Column("last_name", String(40), nullable=False),
    Column("email", String(120)),
    Column("phone", String(20)),
    Column("wechat_openid", String(28)),
    Column("locale", String(10), nullable=False),
    Column("timezone", String(40), nullable=False),
    Column("signup_at", Timestamp, nullable=False),
    Column("city", String(40), nullable=False),
    Index("ix_customers_signup_at", "signup_at"),
)

order_table = Table(
    "orders", metadata,
    Column("order_id", Integer, primary_key=True, autoincrement=False),
    Column("customer_id", Integer, ForeignKey("customers.customer_id"), nullable=False),
    Column("placed_at", Timestamp, nullable=False),
    Column("amount", Numeric(10, 2, asdecimal=False), nullable=False),
    Column("status", String(10), nullable=False),
    Index("ix_orders_customer_id", "customer_id", "placed_at"),
)

member_table = Table(
    "members", metadata,
    Column("customer_id", Integer, ForeignKey("customers.customer_id"), primary_key=True,
           autoincrement=False),
    Column("level", String(10), nullable=False),
    Column("points", Integer, nullable=False),
    Column("level_since", Date, nullable=False),
)

# Made with the shop's tables: this database's customers, orders and members are the
# demo's, which demo-data may replace and --simulate-response may add orders to.
marker_table = Table(
    "herald_demo_shop", metadata,
    Column("seed", Integer, nullable=False),
    Column("customers", Integer, nullable=False),
)


def check_ours(engine: Engine, url: str) -> None:
    """Refuse a database whose shop tables demo-data did not make: they would be dropped
    (or written to) with a real source's data. A database made before the marker table
    passes when its tables have exactly the demo's columns."""
    inspector = inspect(engine)
    names = set(inspector.get_table_names())
    if marker_table.name in names:
        return
    foreign = [t.name for t in (customer_table, order_table, member_table)
               if t.name in names and {c["name"] for c in inspector.get_columns(t.name)}
               != set(t.columns.keys())]
    if foreign:
        shown = make_url(url).render_as_string(hide_password=True)
        raise WorkspaceError(
            f"{shown} holds {', '.join(foreign)}, which the demo shop did not make (their "
            "columns are not the demo's): demo-data would replace them with demo rows, so "
            "it stops; give it another source (--source), or drop those tables yourself")


# -- database -------------------------------------------------------------------------------
def build_demo_shop(url: str, customers: int = DEFAULT_CUSTOMERS, seed: int = DEFAULT_SEED,
                    today: date | None = None) -> dict[str, int]:
    """(Re)create the demo shop's tables at ``url`` and fill them; return rows per table.

    Works on any SQLAlchemy URL (``sqlite:///path``, ``postgresql+psycopg://...``). Existing
    ``customers``, ``orders`` and ``members`` tables there are dropped first, if the demo
    made them (``check_ours``).
    """
    if customers < 1:
        raise ValueError("customers must be at least 1")
    customer_rows, order_rows, member_rows = generate(customers, seed, today)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    try:
        check_ours(engine, url)
        metadata.drop_all(engine)
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(insert(marker_table), {"seed": seed, "customers": customers})
            for table, rows in ((customer_table, customer_rows), (order_table, order_rows),
                                (member_table, member_rows)):
                for batch in _batches(rows, INSERT_BATCH):
                    conn.execute(insert(table), batch)
    finally:
        engine.dispose()
    return {"customers": len(customer_rows), "orders": len(order_rows),
            "members": len(member_rows)}


def _batches(rows: list[T], size: int) -> Iterable[list[T]]:
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def main(argv: list[str] | None = None) -> int:
    """``python -m herald.audiences.demo_shop [--url URL] [--customers N] [--seed S]``."""
    parser = argparse.ArgumentParser(
        prog="python -m herald.audiences.demo_shop",
        description="(Re)build the deterministic Lumen Shop demo database.")
    parser.add_argument("--url", default=DEFAULT_URL,
                        help=f"SQLAlchemy URL of the database to fill (default: {DEFAULT_URL})")
    parser.add_argument("--customers", type=int, default=DEFAULT_CUSTOMERS,
                        help=f"number of customers (default: {DEFAULT_CUSTOMERS})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"random seed (default: {DEFAULT_SEED})")
    parser.add_argument("--today", type=date.fromisoformat, default=None,
                        help="date the data is relative to, YYYY-MM-DD (default: today, UTC)")
    args = parser.parse_args(argv)
    if args.customers < 1:
        parser.error("--customers must be at least 1")
    started = timer.perf_counter()
    try:
        counts = build_demo_shop(args.url, args.customers, args.seed, args.today)
    except WorkspaceError as exc:
        parser.exit(1, f"error: {exc}\n")
    elapsed = timer.perf_counter() - started
    for table, n in counts.items():
        print(f"{table:<10} {n:>8}")
    print(f"built in {elapsed:.1f} s at {make_url(args.url).render_as_string()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
