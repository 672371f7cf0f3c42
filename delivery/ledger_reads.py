"""Read-only views of the ledger: what it holds for recipients (during a reservation:
existing rows, taken addresses, cap counts), and counts of runs and run keys for reports.
Nothing here writes; the rows' states change in :mod:`herald.delivery.ledger`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    case,
    func,
    select,
)

from herald.core.db import (
    COUNTED,
    STATUSES,
    deliveries,
)
from herald.delivery.ledger import Existing, among


@dataclass
class RunCounts:
    """Counts of a run by status, tier and channel (every status present)."""

    deliveries: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    by_tier: dict[str, dict[str, int]] = field(default_factory=dict)
    by_channel: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, status: str, tier: str, channel: str | None, n: int = 1) -> None:
        self.deliveries[status] = self.deliveries.get(status, 0) + n
        for table, name in ((self.by_tier, tier), (self.by_channel, channel)):
            if name is None:
                continue
            row = table.setdefault(name, dict.fromkeys(STATUSES, 0))
            row[status] = row.get(status, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return {"deliveries": self.deliveries, "by_tier": self.by_tier,
                "by_channel": self.by_channel}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunCounts:
        counts = cls()
        counts.deliveries.update(data.get("deliveries", {}))
        counts.by_tier = data.get("by_tier", {})
        counts.by_channel = data.get("by_channel", {})
        return counts


def open_rows(engine: Engine, flow: str, run_key: str) -> int:
    """Rows of a run key still waiting for a send (queued, or deferred to a later run)."""
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).where(
            deliveries.c.flow == flow, deliveries.c.run_key == run_key,
            deliveries.c.status.in_(("queued", "deferred")))).scalar() or 0)


def existing(conn: Connection, flow: str, run_key: str, recipients: Sequence[str]
             ) -> dict[str, Existing]:
    """Rows already in the ledger for these recipients under this run key."""
    out: dict[str, Existing] = {}
    for part in among(conn, deliveries.c.recipient, recipients):
        rows = conn.execute(select(deliveries.c.recipient, deliveries.c.status,
                                   deliveries.c.channel, deliveries.c.tier,
                                   deliveries.c.address, deliveries.c.not_before,
                                   deliveries.c.variant, deliveries.c.run_id).where(
            deliveries.c.flow == flow, deliveries.c.run_key == run_key, part))
        out.update({r.recipient: Existing(r.status, r.channel, r.tier, r.address,
                                          r.not_before, r.variant, r.run_id)
                    for r in rows})
    return out


def addresses_taken(conn: Connection, flow: str, run_key: str, channel: str,
                    addresses: Sequence[str], fold_case: bool) -> dict[str, str]:
    """{address: recipient} for the addresses already sent or reserved on ``channel``
    under this run key (``fold_case``: compared lower-cased, as e-mail addresses are).

    Looked up through the index on (flow, run key, channel, lower(address)): a chunk's
    addresses cost index probes, not a scan of every row of the run key."""
    wanted = {a.lower() if fold_case else a for a in addresses}
    out: dict[str, str] = {}
    for part in among(conn, func.lower(deliveries.c.address),
                      sorted({a.lower() for a in wanted})):
        for address, recipient in conn.execute(
                select(deliveries.c.address, deliveries.c.recipient).where(
                    deliveries.c.flow == flow, deliveries.c.run_key == run_key,
                    deliveries.c.channel == channel, deliveries.c.status.in_(COUNTED),
                    part).order_by(deliveries.c.id)):
            key = address.lower() if fold_case else address
            if key in wanted:  # case-sensitive channels: the exact address only
                out.setdefault(key, recipient)
    return out


def attempts(engine: Engine, flow: str, run_key: str, recipients: Sequence[str]
             ) -> dict[str, int]:
    """Provider attempts so far of each recipient's row under this run key."""
    out: dict[str, int] = {}
    with engine.connect() as conn:
        for part in among(conn, deliveries.c.recipient, recipients):
            for recipient, n in conn.execute(select(
                    deliveries.c.recipient, deliveries.c.attempts).where(
                    deliveries.c.flow == flow, deliveries.c.run_key == run_key, part)):
                out[recipient] = int(n or 0)
    return out


@dataclass(frozen=True)
class Window:
    """What one frequency cap counts: messages since ``since``, on ``channel`` and of
    ``flow`` when given."""

    since: datetime
    channel: str | None = None
    flow: str | None = None


def cap_counts(conn: Connection, recipients: Sequence[str], since: datetime,
               channel: str | None, flow: str | None, min_priority: int = -100,
               own: tuple[str, str] | None = None) -> Counter[str]:
    """How many messages each recipient got (or has reserved) in one window (see
    :func:`window_counts`)."""
    return window_counts(conn, recipients, [Window(since, channel, flow)], min_priority,
                         own)[0]


def window_counts(conn: Connection, recipients: Sequence[str], windows: Sequence[Window],
                  min_priority: int = -100, own: tuple[str, str] | None = None
                  ) -> list[Counter[str]]:
    """How many messages each recipient got (or has reserved) in each window, counting
    only flows of priority ``min_priority`` or higher that are not exempt, and not the
    row of ``own`` (flow, run key): a deferred row does not cap itself.

    One query for all the windows: the recipients' rows since the earliest start are
    read once through the caps index (recipient, created_at) and counted per window in
    SQL, so a chunk pays one index probe per recipient whatever the number of rules."""
    counts: list[Counter[str]] = [Counter() for _ in windows]
    if not windows or not recipients:
        return counts
    columns = []
    for w in windows:
        test = deliveries.c.created_at >= w.since
        if w.channel:
            test = test & (deliveries.c.channel == w.channel)
        if w.flow:
            test = test & (deliveries.c.flow == w.flow)
        columns.append(func.count(case((test, 1))))
    earliest = min(w.since for w in windows)
    for part in among(conn, deliveries.c.recipient, recipients):
        query = select(deliveries.c.recipient, *columns).where(
            part, deliveries.c.status.in_(COUNTED),
            deliveries.c.created_at >= earliest, deliveries.c.counted.is_(True),
            deliveries.c.priority >= min_priority)
        if own:
            query = query.where(~((deliveries.c.flow == own[0])
                                  & (deliveries.c.run_key == own[1])))
        for recipient, *found in conn.execute(query.group_by(deliveries.c.recipient)):
            for counter, n in zip(counts, found, strict=True):
                if n:
                    counter[recipient] = int(n)
    return counts


def run_key_rows(engine: Engine, flow: str, run_key: str, columns: Sequence[Any],
                 statuses: Sequence[str] | None = None, size: int = 5000
                 ) -> Iterator[list[Any]]:
    """The rows of (flow, run key), ``size`` at a time in recipient order (each slice a
    short query of its own, so a long consumer holds no transaction open)."""
    last = ""
    while True:
        query = select(deliveries.c.recipient, *columns).where(
            deliveries.c.flow == flow, deliveries.c.run_key == run_key,
            deliveries.c.recipient > last)
        if statuses is not None:
            query = query.where(deliveries.c.status.in_(statuses))
        with engine.connect() as conn:
            rows = list(conn.execute(query.order_by(deliveries.c.recipient).limit(size)))
        if not rows:
            return
        yield rows
        last = rows[-1].recipient


def run_counts(engine: Engine, run_id: str) -> RunCounts:
    """Counts of a run's ledger rows by status, tier and channel."""
    counts = RunCounts()
    query = select(deliveries.c.status, deliveries.c.tier, deliveries.c.channel,
                   func.count()).where(deliveries.c.run_id == run_id).group_by(
        deliveries.c.status, deliveries.c.tier, deliveries.c.channel)
    with engine.connect() as conn:
        for status, tier, channel, n in conn.execute(query):
            counts.add(status, tier, channel, int(n))
    return counts


def key_counts(engine: Engine, flow: str, run_key: str) -> RunCounts:
    """Counts of every ledger row of a run key (each recipient once, whichever run of the
    key wrote it last) by status, tier and channel."""
    counts = RunCounts()
    query = select(deliveries.c.status, deliveries.c.tier, deliveries.c.channel,
                   func.count()).where(deliveries.c.flow == flow,
                                       deliveries.c.run_key == run_key).group_by(
        deliveries.c.status, deliveries.c.tier, deliveries.c.channel)
    with engine.connect() as conn:
        for status, tier, channel, n in conn.execute(query):
            counts.add(status, tier, channel, int(n))
    return counts


def failure_reasons(engine: Engine, flow: str, run_key: str, limit: int = 10,
                    run_id: str | None = None) -> list[Any]:
    """The most common reasons sends failed under a run key (or one run of it): channel,
    the provider's code, the reason (with the provider's message) and how many."""
    query = select(deliveries.c.channel, deliveries.c.code, deliveries.c.reason,
                   func.count().label("n")).where(
        deliveries.c.flow == flow, deliveries.c.run_key == run_key,
        deliveries.c.status == "failed")
    if run_id:
        query = query.where(deliveries.c.run_id == run_id)
    query = query.group_by(deliveries.c.channel, deliveries.c.code,
                           deliveries.c.reason).order_by(func.count().desc(),
                                                         deliveries.c.reason).limit(limit)
    with engine.connect() as conn:
        return list(conn.execute(query))


def stopped_channels(engine: Engine, run_id: str) -> dict[str, tuple[str, int]]:
    """The channels a fatal answer stopped in a run, each with its reason and how many
    of the run's messages it kept ``queued`` (not sent)."""
    query = select(deliveries.c.channel, func.min(deliveries.c.reason),
                   func.count()).where(
        deliveries.c.run_id == run_id, deliveries.c.status == "queued",
        deliveries.c.reason.like("fatal: %")).group_by(deliveries.c.channel)
    with engine.connect() as conn:
        return {str(channel): (str(reason), int(n))
                for channel, reason, n in conn.execute(query)}


def failures(engine: Engine, run_id: str | None, limit: int = 20,
             key: tuple[str, str] | None = None) -> list[Any]:
    """The most common reasons recipients of a run (or of a (flow, run key)) were not
    sent, with their counts: those who will not be (failed, capped, ...) and those still
    waiting (deferred, queued after a stopped channel, sending with the outcome unknown)."""
    where = (deliveries.c.run_id == run_id) if key is None else (
        (deliveries.c.flow == key[0]) & (deliveries.c.run_key == key[1]))
    query = select(deliveries.c.channel, deliveries.c.status, deliveries.c.reason,
                   func.count().label("n")).where(
        where,
        deliveries.c.status.in_(("failed", "render_error", "capped", "suppressed",
                                 "no_address"))
        # waiting rows with a reason: a row queued before its first send has none
        | (deliveries.c.status.in_(("deferred", "queued", "sending"))
           & deliveries.c.reason.is_not(None))).group_by(
        deliveries.c.channel, deliveries.c.status, deliveries.c.reason).order_by(
        func.count().desc()).limit(limit)
    with engine.connect() as conn:
        return list(conn.execute(query))


def deferred_until(engine: Engine, flow: str, run_key: str) -> datetime | None:
    """When the earliest deferred recipient of a run key may be sent (UTC), if any."""
    with engine.connect() as conn:
        when = conn.execute(select(func.min(deliveries.c.not_before)).where(
            deliveries.c.flow == flow, deliveries.c.run_key == run_key,
            deliveries.c.status == "deferred")).scalar()
    if when is None:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)
