"""Synthetic audiences and workspaces for the benchmarks.

``make_source(url, n)`` fills a ``customers`` table with ``n`` deterministic rows (a tier,
a locale, an e-mail and a phone each) in SQLite or Postgres, as fast as each allows
(executemany in one transaction; COPY on Postgres). ``make_workspace(folder, ...)``
writes a workspace whose flow sends every customer one message through ``channel``.
"""

from __future__ import annotations

import sqlite3
import textwrap
from collections.abc import Iterator
from pathlib import Path

TIERS = ("champions", "loyal", "at_risk", "hibernating")
LOCALES = ("zh_CN", "en_US")
COLUMNS = ("id", "name", "email", "phone", "tier", "locale", "points", "city")
SEGMENT_SQL = ("SELECT id, name, email, phone, tier, locale, points, city\n"
               "FROM customers\nWHERE points >= :min_points\n")


def rows(n: int) -> Iterator[tuple[object, ...]]:
    for i in range(1, n + 1):
        yield (i, f"Customer {i}", f"c{i}@example.com", f"+86138{i % 100_000_000:08d}",
               TIERS[i % 4], LOCALES[i % 2], i % 5000, ("Shanghai", "Beijing", "Hangzhou")[i % 3])


def make_source(url: str, n: int) -> None:
    """Create and fill ``customers`` at ``url`` (sqlite:///path or postgresql+psycopg://)."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        path.unlink(missing_ok=True)
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, "
                         "email TEXT, phone TEXT, tier TEXT, locale TEXT, points INTEGER, "
                         "city TEXT)")
            conn.executemany("INSERT INTO customers VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows(n))
        return
    import psycopg

    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS customers")
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, email TEXT, "
                     "phone TEXT, tier TEXT, locale TEXT, points INTEGER, city TEXT)")
        with conn.cursor() as cur, cur.copy(
                f"COPY customers ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            for row in rows(n):
                copy.write_row(row)
        conn.execute("ANALYZE customers")


HERALD_YAML = """\
timezone: Asia/Shanghai
default_locale: zh
sources:
  crm: "{source}"
store: "{store}"
channels:
  sms: {{type: outbox, kind: sms}}
  email: {{type: outbox, kind: email}}
caps:
  - {{max: 3, per: 7d}}
  - {{max: 1, per: day, channel: sms}}
chunk_size: {chunk_size}
max_workers: {workers}
task_runner: {{type: {runner}, workers: {workers}}}
"""

FLOW_YAML = """\
name: bench
audience:
  source: crm
  segment: customers
  params: {{min_points: 0}}
  key: id
  tier: tier
  locale: locale
tiers:
  default: {{channels: [{channel}]}}
holdout: 0.05
"""

TEMPLATES = {
    "default.sms.txt.zh.j2": ("{{ name }}您好，您有{{ points }}积分即将到期，"
                              "{{ city }}门店本周双倍积分。回T退订"),
    "default.sms.txt.en.j2": ("Hi {{ name }}, {{ points }} points expire soon; double points "
                              "in {{ city }} this week. Reply STOP to opt out"),
    "default.email.subject.j2": "{{ name }}, {{ points }} points are waiting",
    "default.email.txt.j2": "Dear {{ name }},\n\nYou have {{ points }} points.\n",
    "default.email.html.j2": "<p>Dear <b>{{ name }}</b>, you have {{ points }} points.</p>",
}


def make_workspace(folder: Path, source: str, store: str, channel: str = "sms",
                   chunk_size: int = 10_000, workers: int = 2, runner: str = "threads"
                   ) -> Path:
    """Write a benchmark workspace into ``folder``; return it. ``runner``: where a run
    through Prefect executes its chunks (``threads`` or a local ``dask`` cluster)."""
    files = {
        "config/herald.yaml": HERALD_YAML.format(source=source, store=store,
                                                 chunk_size=chunk_size, workers=workers,
                                                 runner=runner),
        "config/flows/bench.yaml": FLOW_YAML.format(channel=channel),
        "audiences/customers.sql": SEGMENT_SQL,
        **{f"templates/bench/{name}": text for name, text in TEMPLATES.items()},
    }
    for rel, content in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(content), encoding="utf-8")
    return folder


def sample_rows(n: int) -> list[dict[str, object]]:
    """``n`` rows as the engine sees them (dicts of column to value)."""
    return [dict(zip(COLUMNS, row, strict=True)) for row in rows(n)]
