"""Same-database builds: the SQL that writes a segment's rows into the package store
inside the database, so they never travel through Python.

``herald.audiences.builder`` decides when a build can run this way and what an error means;
this module only writes the statement. Each row's key and tier must come out as the
streamed build writes them (``str(key)``, ``str(tier)``) and its JSON must read back
(``json.loads``) to the same values as ``store.encode_row`` of the row, so a column is only
handled here when its type is one SQL can write that way:

- SQLite's values are typed per row: integers, text and NULL go into ``json_object`` as
  they are (twice as fast as building the text by concatenation), reals through
  ``printf('%!.17g')`` (17 digits always read back as the same float; SQLite's own JSON
  writes only 15), infinities as ``null`` (what orjson writes); the rare rest (a real
  key, a blob, a zero that may be -0.0) calls back into Python (``herald_text``,
  ``herald_json``, registered on the connection by the builder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SEGMENT_ALIAS = "herald_segment"


@dataclass(frozen=True)
class RowSql:
    """The select list of a package row (after package id and seq) and its parameters."""

    key: str
    tier: str
    data: str
    params: dict[str, Any]


def quote_name(name: str) -> str:
    """An identifier quoted for SQL (a double quote doubled)."""
    return '"' + name.replace('"', '""') + '"'


def _column(name: str) -> str:
    return f"{SEGMENT_ALIAS}.{quote_name(name)}"


def sqlite_row(columns: list[str], key: str, tier: str | None, default_tier: str) -> RowSql:
    """The row expressions on SQLite (``herald_text`` / ``herald_json`` registered)."""
    args, params = [], {}
    for i, name in enumerate(columns):
        c = _column(name)
        params[f"herald_name_{i}"] = name
        # json_object keeps what json() returns as JSON, through CASE too
        args.append(f":herald_name_{i}, CASE typeof({c}) WHEN 'real' THEN json(CASE WHEN "
                    f"{c} = 0 THEN herald_json({c}) WHEN abs({c}) <= 1.7976931348623157e308 "
                    f"THEN printf('%!.17g', {c}) ELSE 'null' END) WHEN 'blob' THEN "
                    f"json(herald_json({c})) ELSE {c} END")
    data = f"json_object({', '.join(args)})"
    k = _column(key)
    key_sql = (f"CASE typeof({k}) WHEN 'integer' THEN CAST({k} AS TEXT) WHEN 'text' THEN {k} "
               f"WHEN 'null' THEN NULL ELSE herald_text({k}) END")
    params["herald_default_tier"] = default_tier
    if tier is None:
        tier_sql = ":herald_default_tier"
    else:
        t = _column(tier)
        tier_sql = (f"CASE typeof({t}) WHEN 'integer' THEN CAST({t} AS TEXT) WHEN 'text' "
                    f"THEN {t} WHEN 'null' THEN :herald_default_tier ELSE herald_text({t}) END")
    return RowSql(key_sql, tier_sql, data, params)


def insert_select(table: str, segment_sql: str, row: RowSql) -> str:
    """``INSERT INTO table ... SELECT ... FROM (segment)``: seq numbers the rows in the
    segment's own order, as the streamed build does."""
    return (f"INSERT INTO {table} (package_id, seq, key, tier, data)\n"
            f"SELECT :herald_package, row_number() OVER () - 1, {row.key}, {row.tier}, "
            f"{row.data}\nFROM (\n{segment_sql}\n) AS {SEGMENT_ALIAS}")


def null_key_sql(segment_sql: str, key: str) -> str:
    """The position (1-based, in the segment's order) of the first row with a NULL key."""
    return (f"SELECT n FROM (SELECT row_number() OVER () AS n, {_column(key)} AS k FROM (\n"
            f"{segment_sql}\n) AS {SEGMENT_ALIAS}) AS numbered WHERE k IS NULL "
            "ORDER BY n LIMIT 1")


def duplicate_keys_sql(segment_sql: str, row: RowSql) -> str:
    """The keys (as stored) that more than one row of the segment has."""
    return (f"SELECT k FROM (SELECT {row.key} AS k FROM (\n{segment_sql}\n) AS "
            f"{SEGMENT_ALIAS}) AS keyed WHERE k IS NOT NULL GROUP BY k HAVING count(*) > 1")
