"""The YAML schema: workspace settings (``config/herald.yaml``) and flows
(``config/flows/*.yaml``). Their value types (durations, names, time zones) are in
``herald.core.fields``, schedules in ``herald.core.schedules``, and the settings every
channel accepts in ``herald.core.channel_settings``.

Models are strict (``extra="forbid"``); cross-references (a tier naming a channel, an
audience naming a source) are checked by ``herald.core.workspace`` where both sides are
known, so those errors carry file and line too.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BeforeValidator, Field, field_validator, model_validator
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from herald.core.fields import (
    Clock,
    DatabaseUrl,
    Duration,
    Name,
    Param,
    Strict,
    TimeZone,
    Window,
    format_duration,
)
from herald.core.schedules import ScheduleSpec

RESERVED_PREFIX = "herald_"  # every table Herald keeps in the workspace database
# the tier entry of every tier without its own, and the tier of every recipient when the
# audience names no tier column
DEFAULT_TIER = "default"


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


class FlowCapRule(_Cap):
    """A cap in a flow's YAML: it always applies to that flow only."""


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


class TaskRunnerSpec(Strict):
    """Where a run's chunks execute: threads of the flow's process, ``workers`` processes
    of this machine started for the run, or a Dask cluster.

    ``dask`` without ``address`` starts a local cluster of ``workers`` processes for the
    run; with ``address`` (``tcp://scheduler:8786``) it uses that cluster's workers.
    """

    type: Literal["threads", "processes", "dask"] = "threads"
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
    # false (as in a flow) or left out: no quiet hours unless a flow sets its own
    quiet_hours: Annotated[QuietHours | None, BeforeValidator(
        lambda value: None if value is False else value)] = None
    chunk_size: int = Field(default=2000, ge=1, le=100_000)
    max_workers: int = Field(default=4, ge=1, le=64)
    alerts: Alerts = Field(default_factory=lambda: Alerts())
    task_runner: TaskRunnerSpec = Field(default_factory=lambda: TaskRunnerSpec())
    writeback: WritebackSpec | None = None
    unsubscribe: UnsubscribeSpec | None = None
    # how reports show revenue: an ISO 4217 code (CNY, USD, EUR) before the amounts
    currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$")

    @field_validator("store")
    @classmethod
    def _outlasts_the_command(cls, value: str) -> str:
        # every command is its own process: an in-memory database would lose the ledger,
        # the suppression list and the packages when it ends (and worker processes or
        # threads of a run would each see another, empty, database)
        if _in_memory(value):
            raise ValueError("an in-memory SQLite database is gone when the command ends, "
                             "and with it the ledger, the suppression list and the packages: "
                             "use a database file (sqlite:///.herald/herald.db) or a server")
        return value

    @field_validator("phone_region")
    @classmethod
    def _known_region(cls, value: str | None) -> str | None:
        if value is None:
            return None
        import phonenumbers  # here, not at the top: most commands never clean a number

        if value not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"unknown region '{value}' (an ISO 3166 country that phone "
                             "numbers have, such as CN or US)")
        return value

    @field_validator("channels", mode="before")
    @classmethod
    def _channel_tables(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for name, settings in value.items():
                if not isinstance(settings, dict):
                    raise ValueError(f"channel '{name}' must be a mapping with a 'type'")
        return value


def _in_memory(url: str) -> bool:
    """Whether ``url`` is a SQLite database that lives in one process's memory: no file
    (``sqlite://``), ``:memory:``, or a ``file:`` URI naming ``:memory:`` or with
    ``mode=memory``."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return False
    if parsed.get_backend_name() != "sqlite":
        return False
    database = parsed.database or ""
    return (database in ("", ":memory:") or database.startswith("file::memory:")
            or parsed.query.get("mode") == "memory")


class AudienceSpec(Strict):
    source: Name
    segment: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_/-]*$")
    params: dict[str, Param] = Field(default_factory=dict)
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
    params: dict[str, Param] = Field(default_factory=dict)


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


def tier_entry(tiers: Mapping[str, TierSpec], tier: str) -> tuple[str, TierSpec] | None:
    """The tier entry a recipient of ``tier`` uses (a flow's or a journey send step's):
    its own, else ``default``, else none."""
    if tier in tiers:
        return tier, tiers[tier]
    if DEFAULT_TIER in tiers:
        return DEFAULT_TIER, tiers[DEFAULT_TIER]
    return None


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
        return tier_entry(self.tiers, tier)

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


