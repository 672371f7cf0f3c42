"""The suppression list: people and addresses never to contact, per channel or on all.

Values are compared normalised (:func:`normalize`). Operators add them (``herald
suppress add``, ``import``), providers add them (a permanent bounce, an unsubscribe),
the policy reads them for every recipient of a chunk in one batched query.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, insert, select

from herald.core.db import ALL_CHANNELS, suppressions, writing
from herald.core.errors import HeraldError
from herald.delivery.ledger import among, now

Item = tuple[str, str | None, str | None]  # (value, channel or None for all, reason)


def normalize(value: str) -> str:
    """How addresses and keys are compared in the suppression list."""
    return value.strip().lower()


def suppressed(conn: Connection, values: Iterable[str]) -> dict[str, set[str]]:
    """{normalized value: channels it is suppressed on ("*" for every channel)}."""
    wanted = sorted({normalize(v) for v in values if v})
    out: dict[str, set[str]] = defaultdict(set)
    for part in among(conn, suppressions.c.value, wanted):
        for value, channel in conn.execute(select(suppressions.c.value,
                                                  suppressions.c.channel).where(part)):
            out[value].add(channel)
    return out


def suppress(engine: Engine, items: Iterable[tuple[str, str | None, str | None]],
             source: str) -> int:
    """Add (value, channel, reason) items; return how many were new."""
    added = 0
    with writing(engine) as conn:
        for value, channel, reason in items:
            norm, chan = normalize(value), channel or ALL_CHANNELS
            if not norm:
                continue
            exists = conn.execute(select(suppressions.c.id).where(
                suppressions.c.value == norm, suppressions.c.channel == chan)).first()
            if exists:
                continue
            conn.execute(insert(suppressions).values(value=norm, channel=chan, reason=reason,
                                                     source=source, created_at=now()))
            added += 1
    return added


def unsuppress(engine: Engine, value: str, channel: str | None) -> int:
    query = suppressions.delete().where(suppressions.c.value == normalize(value))
    if channel:
        query = query.where(suppressions.c.channel == channel)
    with writing(engine) as conn:
        return int(conn.execute(query).rowcount or 0)


def list_suppressions(engine: Engine, limit: int | None = None) -> list[Any]:
    query = select(suppressions).order_by(suppressions.c.created_at, suppressions.c.id)
    if limit:
        query = query.limit(limit)
    with engine.connect() as conn:
        return list(conn.execute(query))




HEADERS = ("value", "address", "email", "phone")


def read_import(file: Path, channel: str | None, reason: str | None,
                check_channel: Callable[[str | None, str], None]) -> list[Item]:
    """The items of an import file: one value per line, or CSV value[,channel[,reason]]
    (a header line and ``#`` comments skipped). ``check_channel(channel, where)`` raises
    for an unknown channel; every other problem is a HeraldError naming file:line."""
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise HeraldError(f"{file}: file not found") from None
    except UnicodeDecodeError as exc:
        raise HeraldError(f"{file}: not valid UTF-8 (byte {exc.start})") from None
    items: list[Item] = []
    for number, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not row[0].strip() or row[0].startswith("#"):
            continue
        if number == 1 and row[0].strip().lower() in HEADERS:
            continue  # a header line
        if len(row) > 3:
            raise HeraldError(f"{file}:{number}: expected value[,channel[,reason]]")
        row_channel = (row[1].strip() or None) if len(row) > 1 else channel
        check_channel(row_channel, f"{file}:{number}")
        items.append((row[0], row_channel,
                      (row[2].strip() or None) if len(row) > 2 else reason))
    return items
