"""Same-database builds: the SQL that writes a segment's rows into the package store
inside the database, so they never travel through Python.

``herald.audiences.store`` decides when a build can run this way and what an error means;
this module only writes the statement. Each row's key and tier must come out as the
streamed build writes them (``str(key)``, ``str(tier)``) and its JSON must read back
(``json.loads``) to the same values as ``store._encode`` of the row, so a column is only
handled here when its type is one SQL can write that way:

- SQLite's values are typed per row: integers, text and NULL go into ``json_object`` as
  they are (twice as fast as building the text by concatenation), reals through
  ``printf('%!.17g')`` (17 digits always read back as the same float; SQLite's own JSON
  writes only 15), infinities as ``null`` (what orjson writes); the rare rest (a real
  key, a blob, a zero that may be -0.0) calls back into Python (``herald_text``,
  ``herald_json``, registered on the connection by the store).
- Postgres columns are typed per column: integers, text, booleans, reals and numerics
  (as float, like the streamed build), dates and timestamps (ISO 8601, microseconds only
  when there are some, as ``datetime.isoformat``). Keys and tiers must be integers or
  text. Any other type: ``postgres_row`` returns None and the build streams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

# Postgres type OIDs (pg_type.oid: fixed for built-in types)
INTEGERS = {20, 21, 23}  # int8, int2, int4
TEXTS = {25, 1043}  # text, varchar (not bpchar: its text drops the padding)
BOOLEAN = 16
NUMERIC = 1700
FLOATS = {700, 701, NUMERIC}  # float4, float8, numeric (the streamed build writes a float)
DATE, TIMESTAMP, TIMESTAMPTZ = 1082, 1114, 1184
JSON_TYPES = INTEGERS | TEXTS | FLOATS | {BOOLEAN, DATE, TIMESTAMP, TIMESTAMPTZ}
KEY_TYPES = INTEGERS | TEXTS

SEGMENT_ALIAS = "herald_segment"


@dataclass(frozen=True)
class RowSql:
    """The select list of a package row (after package id and seq) and its parameters."""

    key: str
    tier: str
    data: str
    params: dict[str, Any]


def quote_name(name: str) -> str:
    """An identifier quoted for SQL (both dialects double a double quote)."""
    return '"' + name.replace('"', '""') + '"'


def _column(name: str) -> str:
    return f"{SEGMENT_ALIAS}.{quote_name(name)}"


def _json_parts(columns: list[str], values: list[str]) -> tuple[str, dict[str, Any]]:
    """``'{"a":' || v1 || ',"b":' || v2 || '}'`` with the names bound, never formatted."""
    parts, params = [], {}
    for i, (name, value) in enumerate(zip(columns, values, strict=True)):
        params[f"herald_name_{i}"] = ("{" if i == 0 else ",") + orjson.dumps(name).decode() + ":"
        parts.append(f":herald_name_{i} || {value}")
    if not columns:
        return "'{}'", params
    return " || ".join(parts) + " || '}'", params


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


def _pg_float(c: str, kind: int) -> str:
    # a float's text is the shortest that reads back in its own type (extra_float_digits
    # >= 1, set by the store), as psycopg reads it and Python's repr writes it; numeric
    # goes through float8 as the streamed build's float(Decimal) does; an integral value
    # gets Python's ".0"
    text = f"({c})::float8::text" if kind == NUMERIC else f"({c})::text"
    return (f"CASE WHEN {c} IS NULL OR ({c})::float8 IN ('NaN', 'Infinity', '-Infinity') "
            f"THEN 'null' WHEN {text} ~ '[.e]' THEN {text} ELSE {text} || '.0' END")


def _pg_timestamp(c: str, zone: bool) -> str:
    fraction = (f"CASE WHEN date_part('microseconds', {c})::bigint % 1000000 <> 0 "
                f"THEN to_char({c}, '.US') ELSE '' END")
    offset = f" || to_char({c}, 'TZH:TZM')" if zone else ""
    return (f"CASE WHEN {c} IS NULL THEN 'null' ELSE '\"' || "
            f"to_char({c}, 'YYYY-MM-DD\"T\"HH24:MI:SS') || {fraction}{offset} || '\"' END")


def postgres_row(columns: list[str], types: list[int], key: str, tier: str | None,
                 default_tier: str) -> RowSql | None:
    """The row expressions on Postgres, or None when a column's type is not one written
    here exactly as the streamed build writes it."""
    by_name = dict(zip(columns, types, strict=True))
    if any(t not in JSON_TYPES for t in types) or by_name[key] not in KEY_TYPES:
        return None
    if tier is not None and by_name[tier] not in KEY_TYPES:
        return None
    values = []
    for name, kind in zip(columns, types, strict=True):
        c = _column(name)
        if kind in FLOATS:
            values.append(_pg_float(c, kind))
        elif kind in (TIMESTAMP, TIMESTAMPTZ):
            values.append(_pg_timestamp(c, kind == TIMESTAMPTZ))
        elif kind in INTEGERS:
            values.append(f"COALESCE(({c})::text, 'null')")
        else:  # text, boolean, date: to_json writes them as Python's encoder does
            values.append(f"COALESCE(to_json({c})::text, 'null')")
    data, params = _json_parts(columns, values)
    params["herald_default_tier"] = default_tier
    tier_sql = (":herald_default_tier" if tier is None
                else f"COALESCE(({_column(tier)})::text, :herald_default_tier)")
    return RowSql(f"({_column(key)})::text", tier_sql, data, params)


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
