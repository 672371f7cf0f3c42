"""The YAML schema: workspace settings (``config/herald.yaml``), flows
(``config/flows/*.yaml``), and the settings every channel accepts (adapters subclass
``ChannelSettings`` in ``herald.channels``).

Models are strict (``extra="forbid"``); cross-references (a tier naming a channel, an
audience naming a source) are checked by ``herald.core.workspace`` where both sides are
known, so those errors carry file and line too.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, time, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_DURATION = re.compile(r"^\s*(\d+)\s*(m|min|h|d|w)\s*$")
_UNIT = {"m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


MAX_DURATION = timedelta(days=3650)  # ten years: beyond it a window or wait is a typo


def parse_duration(value: Any) -> timedelta:
    """``30m``, ``12h``, ``7d`` or ``2w`` as a timedelta, at most ten years."""
    if isinstance(value, timedelta):
        return value
    match = _DURATION.match(str(value))
    if not match or int(match.group(1)) <= 0:
        raise ValueError("duration must look like 30m, 12h, 7d or 2w")
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
        raise ValueError(f"'{value}' is not a valid name (letters, digits, _ and -)")
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


RESERVED_PREFIX = "herald_"  # every table Herald keeps in the workspace database


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


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


class _Cap(Strict):
    max: int = Field(ge=1)
    per: Window
    channel: str | None = None
    tier: str | None = None


class CapRule(_Cap):
    """At most ``max`` messages per window to one recipient, within a scope.

    ``per`` is rolling (the last 7 days) or a calendar day/week in the recipient's time
    zone (since local midnight; weeks start on Monday). ``channel`` and ``flow`` narrow
    which messages count; ``tier`` limits the rule to recipients of that tier.
    """

    flow: str | None = None

    @property
    def calendar(self) -> bool:
        return isinstance(self.per, str)

    def since(self, now: datetime, zone: ZoneInfo) -> datetime:
        """Where this rule's window starts, for a recipient in ``zone``."""
        if isinstance(self.per, timedelta):
            return now - self.per
        local = now.astimezone(zone)
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        if self.per == "week":
            start -= timedelta(days=local.weekday())
        return start.astimezone(UTC)

    def describe(self) -> str:
        scope = [f"channel {self.channel}" if self.channel else "",
                 f"flow {self.flow}" if self.flow else "",
                 f"tier {self.tier}" if self.tier else ""]
        where = ", ".join(s for s in scope if s) or "all channels"
        per = self.per if isinstance(self.per, str) else format_duration(self.per)
        return f"max {self.max} per {per} ({where})"


def format_duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds // 60}m"


class FlowCapRule(_Cap):
    """A cap in a flow's YAML: it always applies to that flow only."""


_CLOCK = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


def _clock(value: Any) -> time:
    if isinstance(value, time):
        return value
    match = _CLOCK.match(str(value))
    if not match:
        raise ValueError("a time of day like 21:00")
    return time(int(match.group(1)), int(match.group(2)))


Clock = Annotated[time, BeforeValidator(_clock)]


class QuietHours(Strict):
    """No messages between ``from`` and ``to`` in the recipient's local time.

    ``defer`` keeps the recipient for a later run with the same run key once the window
    has passed; ``skip`` records them as ``quiet_hours`` and moves on.
    """

    start: Clock = Field(alias="from")
    end: Clock = Field(alias="to")
    mode: Literal["defer", "skip"] = "defer"

    @model_validator(mode="after")
    def _not_empty(self) -> QuietHours:
        if self.start == self.end:
            raise ValueError("from and to are the same time, which is no window at all (to "
                             "turn quiet hours off, write quiet_hours: false)")
        return self

    def until(self, now: datetime, zone: ZoneInfo) -> datetime | None:
        """When the quiet window ends (UTC) if ``now`` is inside it, else None."""
        local = now.astimezone(zone)
        clock = local.time().replace(tzinfo=None)
        if self.start == self.end:
            return None
        inside = (self.start <= clock < self.end) if self.start < self.end else (
            clock >= self.start or clock < self.end)
        if not inside:
            return None
        end_day = local.date() if clock < self.end else local.date() + timedelta(days=1)
        end = datetime.combine(end_day, self.end, tzinfo=zone)
        return end.astimezone(UTC)

    def describe(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


class Alerts(Strict):
    """Thresholds past which a finished run also emits a ``herald.run.alert`` event."""

    failure_rate: float | None = Field(default=0.05, ge=0.0, le=1.0)


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
            raise ValueError(f'Invalid cron string: "{value}": {where} (fields: minute hour '
                             "day-of-month month day-of-week [second])") from None


def check_rrule(value: str) -> None:
    """Raise ValueError when dateutil (as Prefect) cannot parse an RRule string."""
    from dateutil.rrule import rrulestr

    try:
        rrulestr(value, cache=True)
    except ValueError as exc:
        raise ValueError(f'Invalid RRule string "{value}": {exc}') from None
    if len(value) > MAX_RRULE_LENGTH:
        raise ValueError(f"Invalid RRule string: longer than {MAX_RRULE_LENGTH} characters")


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
    anchor: datetime | None = None  # where an interval starts counting
    rrule: str | None = None
    timezone: TimeZone | None = None
    active: bool = True
    params: dict[str, Scalar] = Field(default_factory=dict)

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


class TaskRunnerSpec(Strict):
    """Where a run's chunks execute: threads of the flow's process, or a Dask cluster.

    ``dask`` without ``address`` starts a local cluster of ``workers`` processes for the
    run; with ``address`` (``tcp://scheduler:8786``) it uses that cluster's workers.
    """

    type: Literal["threads", "dask"] = "threads"
    address: str | None = None
    workers: int = Field(default=2, ge=1, le=256)

    @model_validator(mode="after")
    def _address_for_dask(self) -> TaskRunnerSpec:
        if self.address is not None and self.type != "dask":
            raise ValueError("address applies to the dask task runner only")
        return self


class WritebackSpec(Strict):
    """Opt-in copies of the ledger and the conversion results in a source database, for
    analysts: tables ``<prefix>deliveries`` and ``<prefix>conversion_results``.

    Every table of Herald's own starts with ``herald_``, and so may a source that is also
    the workspace database; a prefix of that form is refused, so the copies can never
    land in (or clash with) the ledger's tables."""

    source: Name
    prefix: str = Field(default="campaign_", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,30}$")

    @field_validator("prefix")
    @classmethod
    def _not_herald(cls, value: str) -> str:
        if value.lower().startswith(RESERVED_PREFIX):
            raise ValueError(f"'{value}' is reserved: Herald's own tables start with "
                             f"'{RESERVED_PREFIX}' (choose another prefix, e.g. 'campaign_')")
        return value


class EmailSpec(Strict):
    """How e-mail addresses are checked before a channel sees them."""

    # Special-use domains (RFC 6761: .test, .invalid, .local, .localhost, .onion, .arpa)
    # never deliver; a test or demo workspace whose addresses live there allows them.
    allow_special_use_domains: bool = False


class UnsubscribeSpec(Strict):
    """Unsubscribe links: ``unsubscribe_url`` in every template, ``List-Unsubscribe``
    (with RFC 8058 one-click) on e-mail, honoured by ``herald unsubscribe-server``.

    ``secret`` signs each recipient's token (from the environment: ``${NAME}``; at least
    16 characters); ``base_url`` is where that server is reachable from recipients."""

    base_url: str = Field(pattern=r"^https?://")
    secret: str = Field(repr=False)  # "" when its variable is unset: senders report that

    @field_validator("secret")
    @classmethod
    def _long_enough(cls, value: str) -> str:
        if value and len(value) < 16:
            raise ValueError("the unsubscribe secret needs 16 characters or more")
        return value


class WorkspaceConfig(Strict):
    """``config/herald.yaml``."""

    timezone: TimeZone = "UTC"
    default_locale: str = Field(default="en", pattern=r"^[A-Za-z]{2,3}(?:[_-][A-Za-z0-9]+)*$")
    # the country of phone numbers written without a country code (ISO 3166, e.g. CN)
    phone_region: str | None = Field(default=None, pattern=r"^[A-Z]{2}$")
    email: EmailSpec = Field(default_factory=lambda: EmailSpec())
    sources: dict[Name, DatabaseUrl] = Field(default_factory=dict)
    store: DatabaseUrl = "sqlite:///.herald/herald.db"
    channels: dict[Name, dict[str, Any]] = Field(default_factory=dict)
    caps: list[CapRule] = Field(default_factory=list)
    quiet_hours: QuietHours | None = None
    chunk_size: int = Field(default=2000, ge=1, le=100_000)
    max_workers: int = Field(default=4, ge=1, le=64)
    alerts: Alerts = Field(default_factory=lambda: Alerts())
    task_runner: TaskRunnerSpec = Field(default_factory=lambda: TaskRunnerSpec())
    writeback: WritebackSpec | None = None
    unsubscribe: UnsubscribeSpec | None = None
    # how reports show revenue: an ISO 4217 code (CNY, USD, EUR) before the amounts
    currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$")

    @field_validator("channels", mode="before")
    @classmethod
    def _channel_tables(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for name, settings in value.items():
                if not isinstance(settings, dict):
                    raise ValueError(f"channel '{name}' must be a mapping with a 'type'")
        return value


class AudienceSpec(Strict):
    source: Name
    segment: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_/-]*$")
    params: dict[str, Scalar] = Field(default_factory=dict)
    key: str
    tier: str | None = None
    locale: str | None = None
    timezone: str | None = None  # column with each recipient's IANA time zone


class ConversionSpec(Strict):
    """What counts as a conversion and for how long after contact it is attributed.

    ``segment`` names a SQL file beside the audience segments (``audiences/NAME.sql``,
    dialect variants too) returning one row per conversion: the recipient key, a
    timestamp and optionally an amount. It may use the bound parameters ``:since`` and
    ``:until`` (the period that can hold attributed conversions) and ``params``.
    """

    segment: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_/-]*$")
    window: Duration
    source: Name | None = None  # default: the audience's source
    key: str | None = None  # default: the audience's key column
    at: str = "converted_at"
    amount: str | None = None
    params: dict[str, Scalar] = Field(default_factory=dict)


class ExperimentSpec(Strict):
    """A content experiment: named variants with weights, each with its own templates
    (``templates/FLOW/VARIANT/TIER...``, falling back part by part to the flow's own).

    ``variants`` maps a name to its weight (any positive numbers, relative); the control
    is ``control`` if given, else the first variant. Without ``test_share`` every
    recipient gets their variant; with it, only that share of the audience is tested
    first and, ``decide_after`` the first run of the run key, a follow-up run with the
    same run key names the winner by ``metric`` and sends it to the rest (``fallback``
    says what the rest get when there is no winner). A winner needs at least
    ``min_sample`` contacted recipients per variant and p below ``significance``.
    """

    name: Name | None = None  # default: the flow's name, or the tier's for a tier's own
    variants: dict[Name, float] = Field(min_length=2)
    control: Name | None = None
    test_share: float | None = Field(default=None, gt=0.0, lt=1.0)
    decide_after: Duration | None = None
    metric: Literal["conversion"] = "conversion"
    fallback: Literal["control", "best", "stop"] = "control"
    min_sample: int = Field(default=500, ge=1)
    significance: float = Field(default=0.05, gt=0.0, lt=0.5)

    @field_validator("variants")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [name for name, weight in value.items() if not weight > 0]
        if bad:
            raise ValueError(f"variant weights must be positive ({', '.join(bad)})")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentSpec:
        if self.control is not None and self.control not in self.variants:
            raise ValueError(f"control '{self.control}' is not one of the variants "
                             f"({', '.join(self.variants)})")
        if (self.test_share is None) != (self.decide_after is None):
            raise ValueError("test_share and decide_after go together: test a share "
                             "first, decide after a while, then send the winner")
        return self

    @property
    def control_variant(self) -> str:
        return self.control or next(iter(self.variants))

    @property
    def weights(self) -> list[tuple[str, float]]:
        return list(self.variants.items())


class TierSpec(Strict):
    channels: list[str] = Field(min_length=1)
    template: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_/.-]*$")
    # this tier's own experiment, instead of the flow's (`false`: none for this tier)
    experiment: ExperimentSpec | Literal[False] | None = None

    @field_validator("template")
    @classmethod
    def _inside_templates(cls, value: str | None) -> str | None:
        if value is not None and (".." in value.split("/") or "//" in value
                                  or value.endswith("/")):
            raise ValueError(f"'{value}' is not a template path inside templates/ (like "
                             "winback/vip)")
        return value


def _fraction(value: Any) -> Any:
    """A share of recipients as a fraction: ``5%`` and ``5`` are refused with the spelling
    that works, rather than pydantic's generic messages."""
    if isinstance(value, str) and value.strip().endswith("%"):
        number = value.strip().rstrip("%").strip()
        try:
            share = float(number) / 100
        except ValueError:
            raise ValueError(f"'{value}' is not a share: write a fraction such as 0.05 "
                             "for 5%") from None
        raise ValueError(f"write the fraction {share:g} for {value.strip()} (a share of "
                         "recipients between 0 and 1)")
    if isinstance(value, int | float) and not isinstance(value, bool) and 1 <= value < 100:
        raise ValueError(f"{value} is not a fraction: write {value / 100:g} for {value:g}% "
                         "(a share of recipients between 0 and 1)")
    return value


class FlowSpec(Strict):
    """``config/flows/NAME.yaml``: one campaign."""

    name: Name
    description: str = ""
    timezone: TimeZone | None = None
    audience: AudienceSpec
    tiers: dict[Name, TierSpec] = Field(min_length=1)
    caps: list[FlowCapRule] = Field(default_factory=list)
    holdout: Annotated[float, BeforeValidator(_fraction)] = Field(default=0.0, ge=0.0,
                                                                   lt=1.0)
    # quiet hours for this flow; `false` turns the workspace's off (e.g. transactional)
    quiet_hours: QuietHours | Literal[False] | None = None
    exempt: bool = False  # transactional: not capped, and not counted by any cap
    priority: int = Field(default=0, ge=-100, le=100)
    chunk_size: int | None = Field(default=None, ge=1, le=100_000)
    schedules: list[ScheduleSpec] = Field(default_factory=list)
    alerts: Alerts | None = None  # overrides the workspace's
    # one message per address and channel in a run, even when the segment has the same
    # person under two keys (a duplicate account): later keys are recorded `duplicate`
    deduplicate: bool = True

    @field_validator("schedules")
    @classmethod
    def _distinct_names(cls, value: list[ScheduleSpec]) -> list[ScheduleSpec]:
        names = [s.name for s in value if s.name]
        if len(names) != len(set(names)):
            raise ValueError("schedule names must be distinct")
        return value
    conversion: ConversionSpec | None = None
    experiment: ExperimentSpec | None = None  # content variants for every tier

    def experiment_for(self, tier: str) -> tuple[str, ExperimentSpec] | None:
        """(experiment name, spec) that applies to a tier entry, if any: the tier's own,
        else the flow's (named after the flow unless it names itself)."""
        spec = self.tiers.get(tier)
        own = spec.experiment if spec else None
        if own is False:
            return None
        if own is not None:
            return own.name or tier, own
        if self.experiment is not None:
            return self.experiment.name or self.name, self.experiment
        return None

    def experiments(self) -> dict[str, tuple[ExperimentSpec, list[str]]]:
        """Every experiment of the flow with the tier entries it covers."""
        out: dict[str, tuple[ExperimentSpec, list[str]]] = {}
        for tier in self.tiers:
            found = self.experiment_for(tier)
            if found:
                out.setdefault(found[0], (found[1], []))[1].append(tier)
        return out

    def tier_for(self, tier: str) -> tuple[str, TierSpec] | None:
        """The tier entry a recipient of ``tier`` uses: its own, else ``default``."""
        if tier in self.tiers:
            return tier, self.tiers[tier]
        if "default" in self.tiers:
            return "default", self.tiers["default"]
        return None

    def channel_names(self) -> list[str]:
        seen: dict[str, None] = {}
        for tier in self.tiers.values():
            seen.update(dict.fromkeys(tier.channels))
        return list(seen)

    def conversion_source(self) -> str | None:
        """The source the conversion SQL runs against, if the flow measures conversions."""
        if self.conversion is None:
            return None
        return self.conversion.source or self.audience.source

    def cap_rules(self) -> list[CapRule]:
        return [CapRule(max=c.max, per=c.per, channel=c.channel, tier=c.tier,
                        flow=self.name) for c in self.caps]


# -- channels: what the workspace needs to know of them ----------------------------------
# What a message is, independent of who carries it. Each kind has the recipient column
# that holds its address unless the channel's YAML names another (`address: column`).
KINDS: dict[str, str] = {
    "email": "email",
    "sms": "phone",
    "wechat": "wechat_openid",
    "webhook": "webhook_url",
}

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_PER_SECONDS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60,
                "h": 3600, "hour": 3600}


MAX_RATE = 1_000_000  # messages a second


def parse_rate(value: Any) -> float | None:
    """Parse ``"50/s"``, ``"3000/min"`` or ``"100/h"`` (or a number: per second) into
    messages per second; zero, negative or absurd rates are refused, never "no limit"."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("rate must look like 50/s, 3000/min or 100/h")
    if isinstance(value, float | int):
        if not 0 < value <= MAX_RATE:
            raise ValueError(f"rate must be more than 0 and at most {MAX_RATE:,}/s (leave "
                             "rate out for no limit)")
        return float(value)
    match = _RATE.match(str(value))
    if not match:
        raise ValueError("rate must look like 50/s, 3000/min or 100/h")
    per_second = float(match.group(1)) / _PER_SECONDS[match.group(2)]
    if not 0 < per_second <= MAX_RATE:
        raise ValueError(f"rate must be more than 0 and at most {MAX_RATE:,}/s (leave rate "
                         "out for no limit)")
    return per_second



Rate = Annotated[float | None, BeforeValidator(parse_rate)]


class ChannelSettings(BaseModel):
    """Settings every channel accepts; adapters subclass it with their own fields.

    Secret fields (passwords, tokens) are ``SecretStr`` so they never print.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    kind: str | None = None
    address: str | None = None
    rate: Rate = None
    batch_size: int | None = Field(default=None, gt=0)
    # characters of a message (subject + text + HTML) the channel accepts; longer ones
    # fail as ``body_too_long`` without reaching the provider (default: the adapter's)
    max_body: int | None = Field(default=None, gt=0)


def channel_kind(name: str, settings: ChannelSettings, kinds: frozenset[str]) -> str | None:
    """The kind a configured channel carries (the one home of this decision): its
    ``kind:``, else the adapter's only kind, else the channel's name when it names one
    of the adapter's kinds; None when it cannot be told (a configuration error)."""
    if settings.kind:
        return settings.kind
    if len(kinds) == 1:
        return next(iter(kinds))
    return name if name in kinds else None

