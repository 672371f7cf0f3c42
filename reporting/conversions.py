"""What a campaign achieved: conversions of contacted and held-out recipients, per run key.

A flow that declares ``conversion:`` names a SQL file returning one row per conversion
(recipient key, timestamp, optional amount). For one run key of the flow:

- the **contacted** group is every ledger row ``sent``; their clock starts at ``sent_at``;
- the **held-out** group is every row ``held_out`` (the deterministic control group);
  their clock starts when the policy held them out, the moment they would have been sent;
- a recipient **converted** if a conversion falls in ``[start, start + window)``; revenue
  is the sum of those conversions' amounts.

Uplift is contacted over held out (``herald.reporting.stats``). Recipients of the campaign
arm who were not contacted (capped, suppressed, no address, failed...) are counted apart;
comparing the whole arm with the control group (``intent_to_treat``) answers "what did
running this campaign change", free of the policy's selection of who could be reached.

Memory: conversions of the attribution period are held per recipient key (the period is
bounded by ``:since`` / ``:until``); the ledger is read in slices, never whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, func, select, text
from sqlalchemy.exc import DBAPIError

from herald.audiences.sql import Segment, bind_time, load_sql, probe, statement
from herald.core import clock
from herald.core.errors import AudienceError, HeraldError, Problem, WorkspaceError
from herald.core.fields import format_duration
from herald.core.spec import FlowSpec
from herald.core.workspace import SourceError, Workspace
from herald.delivery import ledger
from herald.reporting.stats import Uplift, mean_difference, uplift

CONTACTED = "sent"
HELD_OUT = "held_out"
SUPPLIED = ("since", "until")  # bound at run time, not from the YAML
SLICE = 500

_d = ledger.deliveries
# when a recipient's attribution window opens: the send, else the policy's decision
_START = func.coalesce(_d.c.sent_at, _d.c.created_at)


@dataclass
class Group:
    """One arm of one row: how many, how many converted, how much they spent."""

    recipients: int = 0
    converted: int = 0
    revenue: float = 0.0
    revenue_squares: float = 0.0  # sum of each converter's revenue squared (intervals)

    @property
    def rate(self) -> float | None:
        return self.converted / self.recipients if self.recipients else None

    def to_dict(self) -> dict[str, Any]:
        return {"recipients": self.recipients, "converted": self.converted,
                "rate": self.rate, "revenue": round(self.revenue, 2),
                "revenue_per_recipient": (round(self.revenue / self.recipients, 4)
                                          if self.recipients else None)}


@dataclass
class Row:
    """Contacted against held out, for the whole run, one tier or one channel."""

    name: str
    contacted: Group = field(default_factory=Group)
    held_out: Group = field(default_factory=Group)
    not_contacted: int = 0  # in the campaign arm, stopped by the policy or a provider

    @property
    def uplift(self) -> Uplift | None:
        if not self.contacted.recipients or not self.held_out.recipients:
            return None
        return uplift(self.contacted.converted, self.contacted.recipients,
                      self.held_out.converted, self.held_out.recipients)

    @property
    def note(self) -> str | None:
        """Why there is no uplift, in words."""
        if not self.contacted.recipients and not self.held_out.recipients:
            return "no recipients"
        if not self.held_out.recipients:
            return "no held-out recipients: uplift cannot be measured"
        if not self.contacted.recipients:
            return "nobody contacted: uplift cannot be measured"
        if self.held_out.converted == 0:
            return "no held-out conversions: relative uplift undefined"
        return None

    def flat(self) -> dict[str, Any]:
        """The row as one level of named figures: the one flattening shared by the
        Prefect table artifact and the write-back table."""
        found = self.uplift
        return {"name": self.name, "contacted": self.contacted.recipients,
                "contacted_converted": self.contacted.converted,
                "contacted_rate": self.contacted.rate,
                "contacted_revenue": self.contacted.revenue,
                "held_out": self.held_out.recipients,
                "held_out_converted": self.held_out.converted,
                "held_out_rate": self.held_out.rate, "held_out_revenue": self.held_out.revenue,
                "not_contacted": self.not_contacted,
                "uplift": found.absolute if found else None,
                "uplift_ci_low": found.low if found else None,
                "uplift_ci_high": found.high if found else None,
                "uplift_relative": found.relative if found else None, "note": self.note}

    def to_dict(self) -> dict[str, Any]:
        found = self.uplift
        return {"name": self.name, "contacted": self.contacted.to_dict(),
                "held_out": self.held_out.to_dict(), "not_contacted": self.not_contacted,
                "uplift": found.to_dict() if found else None, "note": self.note}


@dataclass
class ConversionReport:
    """Conversions of one run key of a flow, by tier and channel."""

    flow: str
    run_key: str
    segment: str
    window: timedelta
    has_revenue: bool
    computed_at: datetime
    first_contact: datetime | None = None
    last_contact: datetime | None = None
    total: Row = field(default_factory=lambda: Row("all"))
    assigned: Group = field(default_factory=Group)  # the whole campaign arm
    tiers: dict[str, Row] = field(default_factory=dict)
    channels: dict[str, Row] = field(default_factory=dict)
    # recipient -> (first attributed conversion, revenue), whatever their status
    converted: dict[str, tuple[datetime, float]] = field(default_factory=dict, repr=False)

    @property
    def closes_at(self) -> datetime | None:
        """When the last recipient's attribution window closes."""
        return self.last_contact + self.window if self.last_contact else None

    @property
    def window_closed(self) -> bool:
        return self.closes_at is None or self.closes_at <= self.computed_at

    @property
    def intent_to_treat(self) -> Uplift | None:
        if not self.assigned.recipients or not self.total.held_out.recipients:
            return None
        return uplift(self.assigned.converted, self.assigned.recipients,
                      self.total.held_out.converted, self.total.held_out.recipients)

    def to_dict(self) -> dict[str, Any]:
        itt = self.intent_to_treat
        return {
            "flow": self.flow, "run_key": self.run_key, "segment": self.segment,
            "window": format_duration(self.window),
            "window_seconds": int(self.window.total_seconds()),
            "first_contact": _iso(self.first_contact), "closes_at": _iso(self.closes_at),
            "window_closed": self.window_closed, "computed_at": _iso(self.computed_at),
            "has_revenue": self.has_revenue,
            "total": self.total.to_dict(),
            "intent_to_treat": {"assigned": self.assigned.to_dict(),
                                "held_out": self.total.held_out.to_dict(),
                                "uplift": itt.to_dict() if itt else None},
            "by_tier": [row.to_dict() for row in self.tiers.values()],
            "by_channel": [row.to_dict() for row in self.channels.values()],
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def utc(value: Any) -> datetime | None:
    """A timestamp from a database as aware UTC (naive values are UTC by convention)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    elif isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if not isinstance(value, datetime):
        raise ValueError(f"not a timestamp: {value!r}")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# -- the conversion query ---------------------------------------------------------------
def conversion_query(ws: Workspace, flow: FlowSpec) -> tuple[str, Segment]:
    """The flow's conversion SQL and the source it runs on (AudienceError if unusable)."""
    conv = flow.conversion
    source = flow.conversion_source()
    if conv is None or source is None:
        raise HeraldError(f"flow '{flow.name}' declares no conversion (add conversion: "
                          "{segment: ..., window: 7d} to its YAML)")
    query = load_sql(ws, conv.segment, source, conv.params, SUPPLIED,
                     hint="set conversion.params in the flow")
    return source, query


def conversion_columns(flow: FlowSpec) -> dict[str, str]:
    """{field: column} the conversion SQL must return."""
    assert flow.conversion is not None
    wanted = {"key": flow.conversion.key or flow.audience.key, "at": flow.conversion.at}
    if flow.conversion.amount:
        wanted["amount"] = flow.conversion.amount
    return wanted


def check_conversion(ws: Workspace, flow: FlowSpec) -> list[Problem]:
    """Validate the conversion SQL like a segment: it compiles on its source and returns
    the key, timestamp and (if named) amount columns."""
    file = ws.flow_file(flow.name)
    try:
        source, query = conversion_query(ws, flow)
        now = clock.now()
        have = probe(ws, source, query, bind_period(ws.source(source), query, now, now))
    except SourceError as exc:
        return [Problem(str(exc))]
    except WorkspaceError as exc:
        return [Problem(str(exc), file=file, field="conversion.segment",
                        line=ws.flow_line(flow.name, ("conversion", "segment")))]
    except AudienceError as exc:
        return [Problem(str(exc))]
    return [Problem(f"column '{column}' is not in the result of {query.file} "
                    f"(columns: {', '.join(have)})", file=file,
                    line=ws.flow_line(flow.name, ("conversion", name)),
                    field=f"conversion.{name}")
            for name, column in conversion_columns(flow).items() if column not in have]


def bind_period(engine: Engine, query: Segment, since: datetime, until: datetime
                ) -> dict[str, Any]:
    """The query's parameters with ``:since`` / ``:until`` as naive UTC: datetimes, or
    ``YYYY-MM-DD HH:MM:SS`` text on SQLite, where timestamps are text that sorts."""
    period = {"since": bind_time(engine, since), "until": bind_time(engine, until)}
    used = set(text(query.sql).compile().binds)
    return {**query.params, **{k: v for k, v in period.items() if k in used}}


def _conversions(ws: Workspace, flow: FlowSpec, since: datetime, until: datetime
                 ) -> tuple[str, dict[str, list[tuple[datetime, float]]]]:
    source, query = conversion_query(ws, flow)
    columns = conversion_columns(flow)
    engine = ws.source(source)
    found: dict[str, list[tuple[datetime, float]]] = {}
    try:
        with engine.connect() as conn:
            params = bind_period(engine, query, since, until)
            result = conn.execution_options(stream_results=True, yield_per=5000).execute(
                statement(query.sql, params), params)
            try:
                have = list(result.keys())
                missing = [c for c in columns.values() if c not in have]
                if missing:
                    raise AudienceError(f"{query.file}: the result has no column "
                                        f"{', '.join(map(repr, missing))} (columns: "
                                        f"{', '.join(have)})")
                for row in result.mappings():
                    key, at = row[columns["key"]], row[columns["at"]]
                    if key is None or at is None:
                        continue
                    try:
                        stamp = utc(at)
                    except ValueError:
                        raise AudienceError(f"{query.file}: column '{columns['at']}' holds "
                                            f"{at!r}, not a timestamp") from None
                    assert stamp is not None
                    amount = row[columns["amount"]] if "amount" in columns else None
                    found.setdefault(str(key), []).append(
                        (stamp, money(amount, query.file, columns.get("amount", ""))))
            finally:
                result.close()
    except DBAPIError as exc:
        first = str(exc.orig or exc).strip().splitlines()[0]
        raise AudienceError(f"{query.file}: the query failed: {first}") from None
    return query.file, found


def money(value: Any, file: str, column: str) -> float:
    """An order's amount as a number (None or empty: 0). Text that is no number, NaN or infinity
    would crash the report or print 'nan' (and --json would emit NaN, which JSON readers
    refuse): named in one line instead."""
    if value is None or value == "":
        return 0.0
    try:
        amount = float(value)
    except (TypeError, ValueError):
        amount = math.nan
    if isinstance(value, bool) or not math.isfinite(amount):
        raise AudienceError(f"{file}: column '{column}' holds {str(value)[:60]!r}, not an "
                            "amount (a finite number)")
    return amount


# -- the report -------------------------------------------------------------------------
def compute(ws: Workspace, flow_name: str, run_key: str, now: datetime | None = None
            ) -> ConversionReport:
    """Conversions of everyone the ledger holds for (flow, run key)."""
    flow = ws.flow(flow_name)
    conv = flow.conversion
    if conv is None:
        conversion_query(ws, flow)  # raises, naming the missing YAML
    assert conv is not None
    report = ConversionReport(flow.name, run_key, "", conv.window, bool(conv.amount),
                              now or clock.now())
    for tier in flow.tiers:
        if tier != "default":
            report.tiers[tier] = Row(tier)
    for channel in flow.channel_names():
        report.channels[channel] = Row(channel)
    # one held-out group for every channel row: channels are not randomised
    for row in report.channels.values():
        row.held_out = report.total.held_out

    where = and_(_d.c.flow == flow.name, _d.c.run_key == run_key)
    counts = select(_d.c.status, _d.c.tier, _d.c.channel, func.count(),
                    func.min(_START), func.max(_START)).where(where).group_by(
        _d.c.status, _d.c.tier, _d.c.channel)
    with ws.store.connect() as conn:
        groups = list(conn.execute(counts))
    starts: list[datetime] = []
    for status, tier, channel, n, first, last in groups:
        arm = _arm(report, status, tier, channel)
        for group in arm:
            group.recipients += int(n)
        if status != HELD_OUT:
            report.assigned.recipients += int(n)
            if status != CONTACTED:
                report.total.not_contacted += int(n)
                report.tiers.setdefault(tier, Row(tier)).not_contacted += int(n)
        if status in (CONTACTED, HELD_OUT):
            starts += [s for s in (utc(first), utc(last)) if s is not None]
    report.tiers = _ordered(report.tiers, flow)
    if not starts:
        report.segment = conversion_query(ws, flow)[1].file
        return report
    report.first_contact, report.last_contact = min(starts), max(starts)
    report.segment, found = _conversions(ws, flow, report.first_contact,
                                         report.last_contact + conv.window)
    keys = sorted(found)
    with ws.store.connect() as conn:
        for part in range(0, len(keys), SLICE):
            rows = conn.execute(select(_d.c.recipient, _d.c.status, _d.c.tier, _d.c.channel,
                                       _START).where(where,
                                                     _d.c.recipient.in_(keys[part:part + SLICE])))
            for recipient, status, tier, channel, start in rows:
                opened = utc(start)
                assert opened is not None
                hits = [(at, amount) for at, amount in found[recipient]
                        if opened <= at < opened + conv.window]
                if not hits:
                    continue
                revenue = sum(amount for _, amount in hits)
                report.converted[recipient] = (min(at for at, _ in hits), revenue)
                groups_hit = _arm(report, status, tier, channel)
                if status != HELD_OUT:
                    groups_hit.append(report.assigned)
                for group in groups_hit:
                    group.converted += 1
                    group.revenue += revenue
                    group.revenue_squares += revenue * revenue
    return report


def _arm(report: ConversionReport, status: str, tier: str, channel: str | None
         ) -> list[Group]:
    """The groups a ledger row of ``status`` counts in (none unless contacted or held out)."""
    if status == CONTACTED:
        out = [report.total.contacted, report.tiers.setdefault(tier, Row(tier)).contacted]
        if channel:
            row = report.channels.setdefault(channel, Row(channel))
            row.held_out = report.total.held_out
            out.append(row.contacted)
        return out
    if status == HELD_OUT:
        return [report.total.held_out, report.tiers.setdefault(tier, Row(tier)).held_out]
    return []


def _ordered(tiers: dict[str, Row], flow: FlowSpec) -> dict[str, Row]:
    """Tiers in the flow's order, then the ones that fell back to ``default``."""
    declared = [t for t in flow.tiers if t in tiers]
    return {name: tiers[name] for name in [*declared, *sorted(set(tiers) - set(declared))]}


def window_closes(ws: Workspace, flow_name: str, run_key: str) -> datetime | None:
    """When the last contacted or held-out recipient's attribution window closes."""
    conv = ws.flow(flow_name).conversion
    if conv is None:
        return None
    with ws.store.connect() as conn:
        last = conn.execute(select(func.max(_START)).where(
            _d.c.flow == flow_name, _d.c.run_key == run_key,
            _d.c.status.in_((CONTACTED, HELD_OUT)))).scalar()
    opened = utc(last)
    return opened + conv.window if opened else None


@dataclass(frozen=True)
class Incremental:
    """What the campaign added over the held-out group's rates, for the contacted:
    conversions and revenue, each with its 95% interval."""

    conversions: float
    conversions_low: float
    conversions_high: float
    revenue: float | None = None
    revenue_low: float | None = None
    revenue_high: float | None = None


def incremental(report: ConversionReport) -> Incremental | None:
    """Incremental conversions (uplift x contacted) and revenue (difference of revenue
    per recipient x contacted), with intervals (the revenue's from the groups' sums of
    squares; non-converters add nothing to them)."""
    total = report.total
    found = total.uplift
    if found is None or not total.contacted.recipients:
        return None
    n = total.contacted.recipients
    out = Incremental(found.absolute * n, found.low * n, found.high * n)
    if not report.has_revenue or not total.held_out.recipients:
        return out
    diff, low, high = mean_difference(n, total.contacted.revenue,
                                      total.contacted.revenue_squares,
                                      total.held_out.recipients, total.held_out.revenue,
                                      total.held_out.revenue_squares)
    return Incremental(out.conversions, out.conversions_low, out.conversions_high,
                       diff * n, low * n, high * n)


def by_day(report: ConversionReport) -> list[tuple[date, int, float]]:
    """Attributed conversions (contacted and held out) by the day of each recipient's
    first one (UTC): day, recipients, revenue."""
    days: dict[date, list[float]] = {}
    for at, revenue in report.converted.values():
        day = days.setdefault(at.astimezone(UTC).date(), [0, 0.0])
        day[0] += 1
        day[1] += revenue
    return [(d, int(v[0]), v[1]) for d, v in sorted(days.items())]
