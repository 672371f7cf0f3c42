"""The contact policy: who may be contacted, through which channel, and why not.

For each recipient of a chunk, in this order: a holdout draw (deterministic), the
suppression list (the recipient's key, then each address), the tier's channels in order
of preference (skipping those without a valid address, suppressed, or capped for that
channel), then the caps that cover every channel. All lookups are batched: a few queries
per chunk, never one per recipient. ``decide`` runs inside the transaction that reserves
the chosen sends in the ledger, so caps are checked and reserved atomically.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import Connection

from herald.audiences.store import Recipient
from herald.core.spec import CapRule, FlowSpec
from herald.core.workspace import Workspace
from herald.delivery import ledger_reads, suppression, variants
from herald.delivery.addresses import Addresses, clean_address, compared_form

SEND = "send"
NOWHERE: frozenset[str] = frozenset()  # the channels of someone not on the list


class Decision(NamedTuple):
    """What the policy decided for one recipient. A NamedTuple: immutable, and made in a
    third of a frozen dataclass's time (its ``__init__`` sets each of the eight fields
    through ``object.__setattr__``), once for every recipient of a chunk."""

    recipient: Recipient
    tier: str  # the tier entry that applies (templates, channels): its own or "default"
    status: str  # SEND, or the ledger status that stops it
    channel: str | None = None
    address: str | None = None
    reason: str | None = None
    not_before: datetime | None = None  # deferred until (UTC)
    variant: str | None = None  # the content variant to send (experiments)


@dataclass(frozen=True, slots=True)
class Screening:
    """What :meth:`Policy.screen` found in a chunk's rows (by recipient key)."""

    tiers: dict[str, str]  # the tier entry that applies
    # (channel, address or None, why not) in the tier's order of preference
    candidates: dict[str, list[tuple[str, str | None, str | None]]]
    forms: dict[str | tuple[str, str], str]  # compared forms of keys and addresses
    held: set[str]  # in the holdout


def in_holdout(flow: str, key: str, fraction: float) -> bool:
    """A stable draw per (flow, recipient): the same people are held out on every run."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{flow}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class Policy:
    """The rules for one flow: its tiers, the workspace's and the flow's caps, holdout."""

    def __init__(self, ws: Workspace, flow: FlowSpec,
                 experiments: Mapping[str, variants.State] | None = None) -> None:
        self.ws = ws
        self.flow = flow
        self.experiments = experiments or {}  # tests under this run key, by experiment
        self.caps: list[CapRule] = [*ws.config.caps, *flow.cap_rules()]
        self.kinds = {name: ws.channel_kind(name) for name in flow.channel_names()}
        self.addresses = Addresses(ws)
        self.zone = ZoneInfo(ws.timezone(flow))
        self._zones: dict[str, ZoneInfo] = {}
        self.quiet = None if flow.quiet_hours is False else (
            flow.quiet_hours or ws.config.quiet_hours)

    def screen(self, rows: Sequence[Recipient]) -> Screening:
        """What is decided from the rows alone, without the ledger: each recipient's tier
        entry and cleaned addresses, the compared forms of keys and addresses, and the
        holdout draw. A chunk screens its rows before it takes the reservation lock, so
        that another worker's reservation does not wait for this Python work."""
        region = self.ws.config.phone_region
        # each key's and address's compared form, worked out once for the chunk: the
        # suppression lookup and each recipient's checks below use the same forms
        forms: dict[str | tuple[str, str], str] = {
            r.key: suppression.normalize(r.key, region) for r in rows}
        candidates: dict[str, list[tuple[str, str | None, str | None]]] = {}
        tiers: dict[str, str] = {}
        # per tier: its entry's name and, for each of its channels, the address column
        # and the channel's kind (what Addresses.of looks up per call), found once
        plans: dict[str, tuple[str, list[tuple[str, str, str]]]] = {}
        special_use = self.addresses.special_use
        for row in rows:
            plan = plans.get(row.tier)
            if plan is None:
                entry = self.flow.tier_for(row.tier)
                assert entry is not None, "validation guarantees a tier entry or a default"
                plan = plans[row.tier] = (entry[0], [
                    (channel, self.ws.address_column(channel), self.ws.channel_kind(channel))
                    for channel in entry[1].channels])
            tiers[row.key] = plan[0]
            options = []
            data = row.data
            for channel, column, kind in plan[1]:
                # what self.addresses.of(channel, data) and .comparable return
                address, why = clean_address(kind, data.get(column), region, special_use)
                options.append((channel, address, why))
                if address and (channel, address) not in forms:
                    forms[channel, address] = compared_form(kind, address, region)
            candidates[row.key] = options
        held = {r.key for r in rows if in_holdout(self.flow.name, r.key, self.flow.holdout)}
        return Screening(tiers, candidates, forms, held)

    def decide(self, conn: Connection, rows: Sequence[Recipient], at: datetime,
               run_key: str | None = None, screened: Screening | None = None
               ) -> list[Decision]:
        """Decide for ``rows`` inside the reservation's transaction: the suppression
        list, the caps and the deduplication read the ledger. ``screened`` is
        :meth:`screen` of these rows (or of more), done beforehand; else done here."""
        s = screened if screened is not None else self.screen(rows)
        listed = suppression.suppressed(conn, s.forms.values(), normalized=True)
        own = (self.flow.name, run_key) if run_key else None
        counts = [] if self.flow.exempt else self._counts(conn, rows, at, own)
        decisions = [self._one(row, s.tiers[row.key], s.candidates[row.key],
                               row.key in s.held, listed, s.forms, counts, at)
                     for row in rows]
        if self.flow.deduplicate and run_key:
            decisions = self._deduplicate(conn, decisions, run_key)
        return decisions

    def _deduplicate(self, conn: Connection, decisions: list[Decision], run_key: str
                     ) -> list[Decision]:
        """One message per address and channel in a run: a recipient whose address (as
        compared: e-mail lower-cased, phones in E.164) was already sent or reserved
        under another key of this run is recorded ``duplicate`` with that key."""
        by_channel: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for i, d in enumerate(decisions):
            if d.status == SEND and d.channel and d.address:
                fold = self.kinds[d.channel] == "email"
                by_channel[d.channel].append((i, d.address.lower() if fold else d.address))
        out = list(decisions)
        for channel, items in by_channel.items():
            taken = ledger_reads.addresses_taken(conn, self.flow.name, run_key, channel,
                                           [a for _, a in items],
                                           self.kinds[channel] == "email")
            for i, address in items:
                d = out[i]
                first = taken.setdefault(address, d.recipient.key)
                if first != d.recipient.key:
                    out[i] = Decision(d.recipient, d.tier, "duplicate", channel=channel,
                                      address=d.address,
                                      reason=f"same {channel} address as recipient {first} "
                                             "in this run (deduplicated)")
        return out

    def _counts(self, conn: Connection, rows: Sequence[Recipient], at: datetime,
                own: tuple[str, str] | None) -> list[tuple[CapRule, Counter[str]]]:
        """Each recipient's count under each cap rule, from one query for all of them: a
        rolling window is one window for everyone; a calendar window (its start is local
        midnight) one per time zone among the rows, each recipient read from their own."""
        windows: dict[ledger_reads.Window, int] = {}
        plan: list[int | dict[ZoneInfo, int]] = []  # per rule: its window, or per zone
        zones: dict[str, ZoneInfo] = {}
        for rule in self.caps:
            if not rule.calendar:
                window = ledger_reads.Window(rule.since(at, self.zone), rule.channel,
                                             rule.flow)
                plan.append(windows.setdefault(window, len(windows)))
                continue
            if not zones:
                zones = {r.key: self.zone_of(r) for r in rows}
            per_zone = {}
            for zone in set(zones.values()):
                window = ledger_reads.Window(rule.since(at, zone), rule.channel, rule.flow)
                per_zone[zone] = windows.setdefault(window, len(windows))
            plan.append(per_zone)
        found = ledger_reads.window_counts(conn, [r.key for r in rows], list(windows),
                                           self.flow.priority, own)
        out: list[tuple[CapRule, Counter[str]]] = []
        for rule, where in zip(self.caps, plan, strict=True):
            if isinstance(where, int):
                out.append((rule, found[where]))
            else:
                out.append((rule, Counter({key: n for key, zone in zones.items()
                                           if (n := found[where[zone]][key])})))
        return out

    def _quiet(self, row: Recipient, tier: str, channel: str, at: datetime
               ) -> Decision | None:
        """Quiet hours for someone we would send to now through ``channel``: skip or
        defer, else None."""
        if not self.quiet:
            return None
        zone = self.zone_of(row)
        until = self.quiet.until(at, zone)
        if until is None:
            return None
        quiet = (f"{at.astimezone(zone):%H:%M} in {zone.key} is within quiet hours "
                 f"{self.quiet.describe()}")
        if self.quiet.mode == "skip":
            return Decision(row, tier, "quiet_hours", channel=channel,
                            reason=f"skipped: {quiet}")
        return Decision(row, tier, "deferred", channel=channel, not_before=until,
                        reason=f"deferred to {until:%Y-%m-%d %H:%M} UTC: {quiet}")

    def _send(self, row: Recipient, tier: str, channel: str, address: str,
              at: datetime) -> Decision:
        """Someone the policy lets through on ``channel``: their variant, unless they wait
        for an experiment's decision (or it stopped the rest), then quiet hours. What
        stops them here is recorded on that channel, so reports count it in its row."""
        found = self.flow.experiment_for(tier)
        variant = None
        if found:
            name, spec = found
            variant = variants.assign(self.flow.name, name, row.key, spec.weights)
            if spec.test_share is not None and not variants.in_test(
                    self.flow.name, name, row.key, spec.test_share):
                state = self.experiments.get(name)
                if state is None or not state.decided:
                    assert spec.decide_after is not None, "the spec requires it"
                    until = state.decide_at if state else at + spec.decide_after
                    return Decision(row, tier, "deferred", channel=channel, not_before=until,
                                    reason=(f"experiment {name}: waiting for the winner, "
                                            f"decided at {until:%Y-%m-%d %H:%M} UTC"))
                if state.winner is None:
                    return Decision(row, tier, "stopped", channel=channel, reason=(
                        f"experiment {name}: no winner, fallback stop ({state.reason})"))
                variant = state.winner
        return self._quiet(row, tier, channel, at) or Decision(
            row, tier, SEND, channel=channel, address=address, variant=variant)

    def zone_of(self, row: Recipient) -> ZoneInfo:
        """The recipient's time zone (the audience's timezone column), else the flow's."""
        column = self.flow.audience.timezone
        name = row.data.get(column) if column else None
        if not name:
            return self.zone
        if name not in self._zones:
            try:
                self._zones[name] = ZoneInfo(str(name))
            except (ZoneInfoNotFoundError, ValueError):
                self._zones[name] = self.zone  # a malformed zone: the flow's
        return self._zones[name]

    def _one(self, row: Recipient, tier: str,
             options: list[tuple[str, str | None, str | None]], held_out: bool,
             listed: dict[str, set[str]], forms: Mapping[str | tuple[str, str], str],
             counts: list[tuple[CapRule, Counter[str]]], at: datetime) -> Decision:
        if held_out:
            return Decision(row, tier, "held_out",
                            reason=f"control group ({self.flow.holdout:.0%} holdout)")
        # this runs once per recipient: no set, generator or Counter.__missing__ call
        # (a Python function) made for the common case, someone listed nowhere, uncapped
        key = row.key
        key_channels = listed.get(forms[key], NOWHERE)
        if suppression.ALL_CHANNELS in key_channels:
            return Decision(row, tier, "suppressed", reason="recipient is on the suppression list")
        for rule, seen in counts:  # a tier-scoped rule only counted its tier's recipients
            if rule.channel is None and seen.get(key, 0) >= rule.max and _applies(rule, row):
                return Decision(row, tier, "capped", reason=f"cap {rule.describe()}")
        stops: list[tuple[str, str, str | None, str]] = []  # (status, channel, address, why)
        for channel, address, why in options:
            if address is None:
                stops.append(("no_address", channel, None,
                              f"{self.ws.address_column(channel)} {why}"))
                continue
            # the key's own ALL_CHANNELS entry returned above
            on_list = listed.get(forms[channel, address], NOWHERE)
            if suppression.ALL_CHANNELS in on_list or channel in on_list \
                    or channel in key_channels:
                stops.append(("suppressed", channel, address,
                              f"{channel} address is on the suppression list"))
                continue
            capped = None
            for rule, seen in counts:
                if rule.channel == channel and seen.get(key, 0) >= rule.max \
                        and _applies(rule, row):
                    capped = rule
                    break
            if capped:
                stops.append(("capped", channel, address, f"cap {capped.describe()}"))
                continue
            return self._send(row, tier, channel, address, at)
        # No channel left: report the most telling reason (a cap or the suppression
        # list says more than a missing address).
        for status in ("capped", "suppressed", "no_address"):
            hits = [s for s in stops if s[0] == status]
            if hits:
                reason = "; ".join(f"{s[1]}: {s[3]}" for s in stops)
                return Decision(row, tier, status, channel=hits[0][1], address=hits[0][2],
                                reason=reason)
        raise AssertionError("a tier has at least one channel")


def _applies(rule: CapRule, row: Recipient) -> bool:
    return rule.tier is None or rule.tier == row.tier
