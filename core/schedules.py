"""Schedules of flows and journeys: ``cron``, ``interval`` or ``rrule`` with a time
zone, checked as Prefect's server checks them."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pydantic import Field, model_validator

from herald.core.fields import Duration, Name, Param, Strict, TimeZone, format_duration

# Cron and RRule strings are checked as Prefect's server checks them, without importing
# Prefect (about 1 s, which read-only commands such as validate and preview do not pay):
# cronsim parses the five (or six) fields and names the one it rejects; dateutil parses
# RRules, as Prefect does.
_CRON_ALIASES = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
                 "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
                 "@hourly": "0 * * * *"}
_CRON_FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week", "second")
MAX_RRULE_LENGTH = 6500  # Prefect's limit (about a year of RDATEs)


def check_cron(value: str) -> None:
    """Raise ValueError naming the bad field of a cron string (Prefect's accepted forms:
    five fields or six with seconds, names, L, #, ranges, steps, ?, and @daily-style
    aliases; no random or hashed H/R fields)."""
    import datetime as dt

    from cronsim import CronSim, CronSimError

    expression = _CRON_ALIASES.get(value.strip().lower(), value)
    fields = expression.split()
    if len(fields) not in (5, 6):
        raise ValueError(f'Invalid cron string: "{value}": {len(fields)} fields, expected 5 '
                         "(minute hour day-of-month month day-of-week) or 6 (and second)")
    for name, field in zip(_CRON_FIELDS, fields, strict=False):
        if field.casefold() in ("h", "r"):
            raise ValueError(f'Invalid cron string: "{value}": random and hashed '
                             f"expressions are unsupported ({name} field '{field}')")
    plain = [f.replace("?", "*") for f in fields]
    # croniter's optional sixth field is seconds: 0-59 like minutes, checked as one
    checks: list[tuple[str, str | None]] = [(" ".join(plain[:5]), None)]
    if len(fields) == 6:
        checks.append((f"{plain[5]} * * * *", "second"))
    for expression, only in checks:
        try:
            CronSim(expression, dt.datetime(2026, 1, 1))
        except CronSimError as exc:
            said = only or str(exc).removeprefix("Bad ").strip()
            where = (f"bad {said} field '{fields[_CRON_FIELDS.index(said)]}'"
                     if said in _CRON_FIELDS else str(exc))
            if said == "day-of-month" and _any_month(plain):
                where = (f"day-of-month '{fields[2]}' never falls in month '{fields[3]}', "
                         "so the schedule would never run")
            raise ValueError(f'Invalid cron string: "{value}": {where} (fields: minute hour '
                             "day-of-month month day-of-week [second])") from None


def _any_month(plain: list[str]) -> bool:
    """Whether the day-of-month field is good on its own (then the month excludes it:
    '30' in February)."""
    import datetime as dt

    from cronsim import CronSim, CronSimError

    try:
        CronSim(" ".join([*plain[:3], "*", plain[4]]), dt.datetime(2026, 1, 1))
    except CronSimError:
        return False
    return True


def check_rrule(value: str) -> None:
    """Raise ValueError when dateutil (as Prefect) cannot parse an RRule string."""
    from dateutil.rrule import rrulestr

    try:
        parsed = rrulestr(value, cache=True)
    except ValueError as exc:
        raise ValueError(f'Invalid RRule string "{value}": {exc}') from None
    # dateutil takes INTERVAL=0 (or less) and then never finds an occurrence: Prefect's
    # scheduler looped, then crashed (ZeroDivisionError) serving it
    for rule in getattr(parsed, "_rrule", None) or [parsed]:
        if getattr(rule, "_interval", 1) < 1:
            raise ValueError(f'Invalid RRule string "{value}": INTERVAL must be 1 or more')
    if len(value) > MAX_RRULE_LENGTH:
        raise ValueError(f"Invalid RRule string: longer than {MAX_RRULE_LENGTH} characters")
    # BYMONTHDAY=30 in February: no occurrence ever, and dateutil (so Prefect's scheduler)
    # searches up to the year 9999 for one, seconds of CPU for a daily rule
    if "BYMONTHDAY=" in value.upper():
        rules = getattr(parsed, "_rrule", None) or [parsed]
        if not getattr(parsed, "_rdate", None) and all(_no_such_day(r) for r in rules):
            raise ValueError(f'Invalid RRule string "{value}": no month it names has '
                             "the day of the month it names, so it would never run")


# the most days each month has (February in a leap year)
_MONTH_DAYS = {1: 31, 2: 29, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30, 10: 31,
               11: 30, 12: 31}


def _no_such_day(rule: Any) -> bool:
    """Whether every day of the month the rule names is past the end of every month it
    names (counting from the month's end, BYMONTHDAY=-1, always exists)."""
    days = getattr(rule, "_bymonthday", None) or ()
    if not days or getattr(rule, "_bynmonthday", None):
        return False
    months = getattr(rule, "_bymonth", None) or range(1, 13)
    return all(day > _MONTH_DAYS[month] for month in months for day in days)


class ScheduleSpec(Strict):
    """When a flow runs by itself: exactly one of ``cron``, ``interval`` or ``rrule``.

    Times are in ``timezone`` (default: the flow's, then the workspace's). ``active:
    false`` pauses the schedule without deleting it; ``params`` override the audience
    parameters for runs of this schedule; ``name`` keeps the schedule's identity on the
    Prefect server when the list is reordered.
    """

    name: Name | None = None
    cron: str | None = None
    interval: Duration | None = None
    # where an interval starts counting: ISO text ("2026-01-05T08:00"), which YAML 1.2
    # leaves a string
    anchor: datetime | None = Field(default=None, strict=False)
    rrule: str | None = None
    timezone: TimeZone | None = None
    active: bool = True
    params: dict[str, Param] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_kind(self) -> ScheduleSpec:
        given = [k for k in ("cron", "interval", "rrule") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a schedule needs exactly one of cron, interval or rrule"
                             + (f" (found {', '.join(given)})" if given else ""))
        if self.anchor is not None and self.interval is None:
            raise ValueError("anchor applies to interval schedules only")
        if self.cron is not None:
            check_cron(self.cron)
        if self.rrule is not None:
            check_rrule(self.rrule)
        return self

    def describe(self) -> str:
        what = (f"cron {self.cron}" if self.cron else f"rrule {self.rrule}" if self.rrule
                else f"every {format_duration(self.interval or timedelta())}")
        return what + ("" if self.active else " (paused)")
