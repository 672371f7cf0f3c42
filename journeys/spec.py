"""The YAML schema of ``config/journeys/NAME.yaml``: an entry, named steps, settings.

Models are strict (``extra="forbid"``). Graph checks (successors exist, reachability,
cycles without a wait) and cross-references (channels, columns, SQL, templates) are made
by ``herald.journeys.load`` where the file's positions are known.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BeforeValidator, Field, field_validator, model_validator

from herald.core.fields import Clock, Duration, Name, Param, Scalar, Strict, TimeZone
from herald.core.schedules import ScheduleSpec
from herald.core.spec import AudienceSpec, FlowCapRule, QuietHours, TierSpec, tier_entry

_OFFSET = re.compile(r"^\s*([-+]?)\s*(\d+)\s*(m|min|h|d|w)\s*$")
_UNIT = {"m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SQL_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_/-]*$"


def parse_offset(value: Any) -> timedelta:
    """``-3d``, ``+12h``, ``0d``: a signed duration."""
    if isinstance(value, timedelta):
        return value
    match = _OFFSET.match(str(value))
    if not match:
        raise ValueError("offset must look like -3d, 12h or +1w")
    seconds = int(match.group(2)) * _UNIT[match.group(3)]
    return timedelta(seconds=-seconds if match.group(1) == "-" else seconds)


Offset = Annotated[timedelta, BeforeValidator(parse_offset)]


class Condition(Strict):
    """A SQL file in ``audiences/`` returning the key of each recipient who matches.

    ``at`` names a timestamp column that must fall at or after the recipient's own
    reference moment (entry, or arrival at a ``wait_for``); Herald binds ``:since`` and
    ``:until`` and keeps only the keys it asks about.
    """

    condition: str = Field(pattern=_SQL_NAME)
    source: Name | None = None
    at: str | None = None
    params: dict[str, Param] = Field(default_factory=dict)


class ExitWhen(Condition):
    reason: str = Field(default="exit_when", pattern=r"^[A-Za-z0-9_ -]{1,64}$")


class EntrySpec(AudienceSpec):
    """Who enters: a segment run at every tick, like a flow's audience."""


class ReEntry(Strict):
    cooldown: Duration | None = None
    max: int | None = Field(default=None, ge=1)


def _re_entry(value: Any) -> Any:
    if value in ("never", None):
        return {"max": 1}
    if not isinstance(value, dict):  # another word, a number: say what is accepted
        raise ValueError(f"{value!r} is not accepted: never (the default), "
                         "{cooldown: 30d}, {max: 3} or both")
    return value


class GoalSpec(Strict):
    """The conversion a journey is measured by (and, with ``exit``, leaves on)."""

    segment: str = Field(pattern=_SQL_NAME)
    window: Duration
    source: Name | None = None
    key: str | None = None
    at: str = "converted_at"
    amount: str | None = None
    params: dict[str, Param] = Field(default_factory=dict)
    exit: bool = True


class _Step(Strict):
    description: str = ""


class SendStep(_Step):
    type: Literal["send"]
    tiers: dict[Name, TierSpec] = Field(min_length=1)
    next: Name | None = None
    on_capped: Literal["skip", "wait"] = "skip"
    variants: dict[Name, float] = Field(default_factory=dict)

    @field_validator("variants")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        if value and (any(w <= 0 for w in value.values()) or len(value) < 2):
            raise ValueError("variants need at least two names with positive weights")
        return value

    def tier_for(self, tier: str) -> tuple[str, TierSpec] | None:
        return tier_entry(self.tiers, tier)

    def successors(self) -> list[str]:
        return [self.next] if self.next else []


class Until(Strict):
    """A local time (``time``, on ``weekdays``), or a date column plus ``offset``."""

    time: Clock | None = None
    weekdays: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = Field(
        default_factory=list)
    date: str | None = None  # a column of the entry row
    offset: Offset = timedelta(0)

    @model_validator(mode="after")
    def _shape(self) -> Until:
        if self.date is None and self.time is None:
            raise ValueError("until needs a time (10:00) or a date column")
        if self.date is not None and self.weekdays:
            raise ValueError("weekdays apply to a time of day, not to a date column")
        if self.date is None and self.offset:
            raise ValueError("offset applies to a date column")
        return self


class WaitStep(_Step):
    type: Literal["wait"]
    for_: Duration | None = Field(default=None, alias="for")
    until: Until | None = None
    next: Name | None = None

    @model_validator(mode="after")
    def _one(self) -> WaitStep:
        if (self.for_ is None) == (self.until is None):
            raise ValueError("a wait needs exactly one of for or until")
        return self

    def successors(self) -> list[str]:
        return [self.next] if self.next else []

    def due(self, arrived: datetime, zone: ZoneInfo, data: dict[str, Any]) -> datetime:
        """When a recipient who arrived at ``arrived`` may move on (UTC)."""
        if self.for_ is not None:
            return arrived + self.for_
        assert self.until is not None
        return until_moment(self.until, arrived, zone, data)


class NotADate(ValueError):
    """A wait's date column holds something that is not a date."""


def until_moment(until: Until, arrived: datetime, zone: ZoneInfo,
                 data: dict[str, Any]) -> datetime:
    local = arrived.astimezone(zone)
    if until.date is not None:
        value = data.get(until.date)
        day = as_date(value)
        if day is None and value not in (None, ""):
            raise NotADate(f"{until.date} holds {str(value)[:60]!r}, not a date")
        if day is None:  # no date: nothing to wait for
            return arrived
        at = datetime.combine(day, until.time or time(0), tzinfo=zone) + until.offset
        return max(arrived, at.astimezone(UTC))
    assert until.time is not None
    days = {WEEKDAYS.index(d) for d in until.weekdays} or set(range(7))
    for ahead in range(0, 8):
        day = local.date() + timedelta(days=ahead)
        at = datetime.combine(day, until.time, tzinfo=zone)
        if at > local and day.weekday() in days:
            return at.astimezone(UTC)
    raise AssertionError("a weekday set is never empty")


def as_date(value: Any) -> date | None:
    """A date column's value (a date, a datetime, or ISO text) as a date."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    try:
        return datetime.fromisoformat(str(value).strip().replace("Z", "+00:00")).date()
    except ValueError:
        return None


class WaitForStep(_Step, Condition):
    type: Literal["wait_for"]
    within: Duration
    matched: Name
    timeout: Name

    def successors(self) -> list[str]:
        return [self.matched, self.timeout]


class When(Strict):
    """A test on one column of the entry row."""

    column: str
    eq: Scalar = None
    ne: Scalar = None
    in_: list[Scalar] | None = Field(default=None, alias="in")
    not_in: list[Scalar] | None = None
    gt: float | str | None = None
    gte: float | str | None = None
    lt: float | str | None = None
    lte: float | str | None = None
    is_null: bool | None = None

    @model_validator(mode="after")
    def _one_test(self) -> When:
        given = [k for k in ("eq", "ne", "in_", "not_in", "gt", "gte", "lt", "lte",
                             "is_null") if k in self.model_fields_set]
        if len(given) != 1:
            raise ValueError("a when needs exactly one test: eq, ne, in, not_in, gt, gte, "
                             "lt, lte or is_null")
        return self

    def matches(self, data: dict[str, Any]) -> bool:
        return self.test(data) is True

    def test(self, data: dict[str, Any]) -> bool | None:
        """Whether the row passes; None when an order test (gt, gte, lt, lte) cannot
        compare: one side is a number and the other is not (``gt: 50`` on 'n/a')."""
        value = data.get(self.column)
        test = next(k for k in ("eq", "ne", "in_", "not_in", "gt", "gte", "lt", "lte",
                                "is_null") if k in self.model_fields_set)
        expected = getattr(self, test)
        if test == "is_null":
            return (value is None) == bool(expected)
        if test in ("eq", "ne"):
            same = _same(value, expected)
            return same if test == "eq" else not same
        if test in ("in_", "not_in"):
            hit = any(_same(value, e) for e in expected or [])
            return hit if test == "in_" else not hit
        if value is None:
            return False
        pair = _ordered(value, expected)
        if pair is None:
            return None
        left, right = pair
        return {"gt": left > right, "gte": left >= right, "lt": left < right,
                "lte": left <= right}[test]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        return None


def _ordered(value: Any, expected: Any) -> tuple[Any, Any] | None:
    """The two sides of an order test: as numbers when both read as numbers (a text
    column holding '900' is below 1000, and below '1000' too, which text order would
    not say); as text when neither is a number (dates as ISO text); None when one
    side is a number and the other cannot be read as one."""
    left, right = _number(value), _number(expected)
    if left is not None and right is not None:
        return left, right
    if _is_number(value) or _is_number(expected):
        return None
    return str(value), str(expected)


def _same(value: Any, expected: Any) -> bool:
    if value is None or expected is None:
        return value is None and expected is None
    if isinstance(expected, bool) or isinstance(value, bool):
        return bool(value) == bool(expected)
    if _is_number(expected) or _is_number(value):  # a number on one side: as numbers
        # (' 40 ' and 40.0 are 40), as text only when the other is no number
        left, right = _number(value), _number(expected)
        if left is not None and right is not None:
            return left == right
    return str(value) == str(expected)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Case(Strict):
    """``{when: {...}, next: S}``, or ``{condition: NAME, next: S}`` (a condition's SQL
    file, as a wait_for names it; ``{condition: {condition: NAME, at: ..., params: ...}}``
    for its other fields)."""

    when: When | None = None
    condition: Condition | None = None
    next: Name

    @field_validator("condition", mode="before")
    @classmethod
    def _named(cls, value: Any) -> Any:
        return {"condition": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one(self) -> Case:
        if (self.when is None) == (self.condition is None):
            raise ValueError("a case needs exactly one of when or condition")
        return self


class BranchStep(_Step):
    type: Literal["branch"]
    cases: list[Case] = Field(min_length=1)
    default: Name

    def successors(self) -> list[str]:
        return [c.next for c in self.cases] + [self.default]


class Cohort(Strict):
    weight: float = Field(gt=0)
    next: Name | None = None
    holdout: bool = False

    @model_validator(mode="after")
    def _either(self) -> Cohort:
        if self.holdout == (self.next is not None):
            raise ValueError("a cohort has either next or holdout: true")
        return self


class SplitStep(_Step):
    type: Literal["split"]
    cohorts: dict[Name, Cohort] = Field(min_length=1)

    @field_validator("cohorts")
    @classmethod
    def _one_holdout(cls, value: dict[str, Cohort]) -> dict[str, Cohort]:
        if sum(c.holdout for c in value.values()) > 1:
            raise ValueError("at most one cohort is the holdout")
        return value

    def successors(self) -> list[str]:
        return [c.next for c in self.cohorts.values() if c.next]


class ExitStep(_Step):
    type: Literal["exit"]
    reason: str | None = None

    def successors(self) -> list[str]:
        return []


Step = Annotated[SendStep | WaitStep | WaitForStep | BranchStep | SplitStep | ExitStep,
                 Field(discriminator="type")]
STEP_TYPES = ("send", "wait", "wait_for", "branch", "split", "exit")


class JourneySpec(Strict):
    """``config/journeys/NAME.yaml``."""

    name: Name
    description: str = ""
    timezone: TimeZone | None = None
    entry: EntrySpec
    schedules: list[ScheduleSpec] = Field(default_factory=list)
    re_entry: Annotated[ReEntry, BeforeValidator(_re_entry)] = Field(
        default_factory=lambda: ReEntry(max=1))
    exit_when: list[ExitWhen] = Field(default_factory=list)
    goal: GoalSpec | None = None
    max_duration: Duration | None = None
    caps: list[FlowCapRule] = Field(default_factory=list)
    quiet_hours: QuietHours | Literal[False] | None = None
    priority: int = Field(default=0, ge=-100, le=100)
    exempt: bool = False
    chunk_size: int | None = Field(default=None, ge=1, le=100_000)
    steps: dict[Name, Step] = Field(min_length=1)

    @property
    def first(self) -> str:
        return next(iter(self.steps))

    @property
    def flow(self) -> str:
        """The ledger's flow column for this journey's sends."""
        return f"journey:{self.name}"

    def tier_names(self) -> list[str]:
        """The tier entries of its send steps, sorted."""
        return sorted({t for step in self.steps.values() if isinstance(step, SendStep)
                       for t in step.tiers})

    def checks_every_tick(self) -> bool:
        """Whether waiting enrollments must be looked at on every tick, not only when due."""
        return bool(self.exit_when or (self.goal and self.goal.exit) or self.max_duration
                    or any(s.type == "wait_for" for s in self.steps.values()))
