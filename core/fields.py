"""The small value types of Herald's YAML: names, durations and cap windows, times of
day, time zones, database URLs, and the strict base model every spec model builds on.

Each is an annotated type that pydantic validates with a readable error, so a spec model
only names it (``window: Duration``) and the YAML's position survives validation.
"""

from __future__ import annotations

import math
import re
from datetime import time, timedelta
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_DURATION = re.compile(r"^\s*([-+]?\d+)\s*(m|min|h|d|w)\s*$")
_UNIT = {"m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


MAX_DURATION = timedelta(days=3650)  # ten years: beyond it a window or wait is a typo


def parse_duration(value: Any) -> timedelta:
    """``30m``, ``12h``, ``7d`` or ``2w`` as a timedelta, at most ten years."""
    if isinstance(value, timedelta):
        return value
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError("duration must look like 30m, 12h, 7d or 2w")
    if int(match.group(1)) <= 0:
        raise ValueError(f"duration must be more than 0 (got {str(value).strip()}; e.g. "
                         "30m, 12h, 7d or 2w)")
    seconds = int(match.group(1)) * _UNIT[match.group(2)]
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError("duration must be at most 3650d (ten years)")
    return timedelta(seconds=seconds)


def _check_timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone '{value}' (use an IANA name such as "
                         "Asia/Shanghai or UTC)") from None
    return value


def _check_name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"'{value}' is not a valid name (ASCII letters, digits, _ and -, "
                         "starting with a letter or _)")
    return value


def _check_url(value: str) -> str:
    try:
        make_url(value)
    except ArgumentError:
        raise ValueError("not a database URL (e.g. sqlite:///.herald/shop.db or "
                         "postgresql+psycopg://user@host/db)") from None
    return value


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
TimeZone = Annotated[str, AfterValidator(_check_timezone)]
Name = Annotated[str, BeforeValidator(_check_name)]
DatabaseUrl = Annotated[str, BeforeValidator(_check_url)]
Scalar = str | int | float | bool | None


def check_param(value: Any) -> Any:
    """A segment parameter is one value, or a list of values for ``IN :name`` (the SQL
    check in ``herald.audiences.sql`` sees that a list is used nowhere else)."""
    if isinstance(value, dict):
        raise ValueError("a parameter is a number, a text, true or false, or a list of "
                         "them for IN :name, not a mapping")
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, float) and not math.isfinite(item):
            # 1e400 is infinity: bound, it selected nobody or everybody without a word
            raise ValueError(f"{item} is not a finite number")
        if isinstance(item, int) and not isinstance(item, bool) and \
                not -2**63 <= item < 2**63:
            # databases store whole numbers in 64 bits: SQLite's driver raised
            # OverflowError deep in the query, Postgres an out-of-range error
            raise ValueError(f"{item} is outside the whole numbers a database stores "
                             "(-9223372036854775808 to 9223372036854775807)")
    if isinstance(value, list):
        if not value:
            raise ValueError("an empty list would select nobody: give one value or more")
        if any(isinstance(item, list | dict) for item in value):
            raise ValueError("a list of numbers, texts, true or false, not of lists or "
                             "mappings")
    return value


# Segment parameters (audience, conversion, condition and schedule params; -p)
Param = Annotated[Scalar | list[Scalar], BeforeValidator(check_param)]


class Strict(BaseModel):
    """Unknown keys are errors, and so are values of the wrong YAML type: pydantic's lax
    mode would read ``"yes"``, ``"on"`` or ``1`` as true (``exempt: "yes"`` would uncap a
    flow) and ``true`` as the number 1 (``chunk_size: true``). A quoted number is text."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              strict=True)


def parse_window(value: Any) -> timedelta | str:
    """A cap's window: a rolling duration (``7d``) or a calendar ``day`` / ``week``."""
    if value in CALENDAR:
        return str(value)
    try:
        return parse_duration(value)
    except ValueError as exc:
        if "at most" in str(exc):
            raise
        raise ValueError("per must be a duration like 12h or 7d, or day or week "
                         "(calendar, in the recipient's time zone)") from None


CALENDAR = ("day", "week")
Window = Annotated[timedelta | str, BeforeValidator(parse_window)]


def format_duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds // 60}m"


_CLOCK = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")  # 21:00, 09:00 or 9:00


def _clock(value: Any) -> time:
    if isinstance(value, time):
        return value
    match = _CLOCK.match(str(value))
    if not match:
        raise ValueError("a time of day like 21:00 or 9:30")
    return time(int(match.group(1)), int(match.group(2)))


Clock = Annotated[time, BeforeValidator(_clock)]
