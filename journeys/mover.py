"""Moving a claimed chunk of enrollments: exit checks, then rounds of one step each
(branches, splits, waits, sends through the contact policy, the ledger and dispatch),
each round saved in one transaction while the tick holds the lease.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import func, select, update

from herald.channels.base import Message
from herald.core import clock
from herald.core.db import JOURNEY_LIVE as LIVE
from herald.core.db import driver_mark, to_driver, writing
from herald.core.db import journey_enrollments as enrollments
from herald.core.db import journey_log as log
from herald.core.errors import RunError
from herald.core.workspace import Workspace
from herald.delivery import ledger, render, suppression, unsubscribe
from herald.delivery.dispatch import (
    STOPPED,
    Job,
    dispatch,
    fatal_cause,
    group,
    stop_requested,
)
from herald.delivery.ledger import message_id
from herald.delivery.policy import SEND, Decision, Policy
from herald.delivery.render import RenderError
from herald.delivery.variants import assign as assign_variant
from herald.journeys import conditions, load
from herald.journeys.chunks import GRACE, ChunkJob, ChunkResult, Item, among_ids, must
from herald.journeys.entry import definition
from herald.journeys.spec import (
    BranchStep,
    ExitStep,
    JourneySpec,
    NotADate,
    SendStep,
    SplitStep,
    WaitForStep,
    WaitStep,
)

CAPPED_RETRY = timedelta(hours=1)  # on_capped: wait decides again after this
MAX_ROUNDS = 1000  # a safety net: validation forbids cycles without a wait


class Mover:
    """Moves one claimed chunk: exit checks, then rounds of one step each."""

    def __init__(self, ws: Workspace, job: ChunkJob, owner: str, result: ChunkResult) -> None:
        self.ws = ws
        self.job = job
        self.owner = owner
        self.result = result
        self.templates = render.shared(ws)
        self.now = clock.now()
        # (flow, run key, recipient, reason) of messages reserved at a send step whose
        # enrollment left before they went out: withdrawn with the exits' save
        self.withdrawn: list[tuple[str, str, str, str]] = []

    def spec(self, item: Item) -> JourneySpec:
        return definition(self.ws, self.job.journey, item.version)

    def run(self, items: list[Item]) -> None:
        self.check_exits(items)
        self.persist([i for i in items if i.logs])  # those who left
        for item in items:
            if item.status in LIVE and item.status == "waiting":
                step = self.spec(item).steps[item.step]
                item.moving = isinstance(step, WaitForStep) or item.due_at <= self.now + GRACE
            else:
                item.moving = item.status in LIVE
        for _ in range(MAX_ROUNDS):
            moving = [i for i in items if i.moving]
            if not moving:
                return
            self.round(moving)
            self.persist(moving)
        raise RunError(f"journey {self.job.journey}: enrollments still moving after "
                       f"{MAX_ROUNDS} steps in one tick")

    # -- exits before every step ---------------------------------------------------
    def check_exits(self, items: list[Item]) -> None:
        by_version: dict[str, list[Item]] = defaultdict(list)
        for item in items:
            by_version[item.version].append(item)
        for version, group_ in by_version.items():
            spec = definition(self.ws, self.job.journey, version)
            left = list(group_)
            if spec.max_duration:
                for item in left:
                    if self.now - item.entered_at >= spec.max_duration:
                        self.exit(item, "max_duration")
                left = [i for i in left if i.status in LIVE]
            if spec.goal and spec.goal.exit and left:
                goal = spec.goal
                query = load.load_sql(self.ws, goal.segment, goal.source or spec.entry.source,
                                      goal.params, ("since", "until"))
                hits = conditions.matching(
                    self.ws, goal.source or spec.entry.source, query,
                    goal.key or spec.entry.key, goal.at,
                    {i.recipient: i.entered_at for i in left}, self.now, goal.window)
                for item in left:
                    if item.recipient in hits:
                        self.exit(item, "goal")
                left = [i for i in left if i.status in LIVE]
            for cond in spec.exit_when:
                if not left:
                    break
                hits = self.matching(spec, cond, {i.recipient: i.entered_at for i in left})
                for item in left:
                    if item.recipient in hits:
                        self.exit(item, cond.reason)
                left = [i for i in left if i.status in LIVE]

    def matching(self, spec: JourneySpec, cond: Any, since: dict[str, datetime]
                 ) -> dict[str, datetime | None]:
        query = load.condition_sql(self.ws, spec, cond)
        return conditions.matching(self.ws, load.condition_source(spec, cond), query,
                                   spec.entry.key, cond.at, since, self.now)

    def exit(self, item: Item, reason: str) -> None:
        spec = self.spec(item)
        if item.status == "waiting" and isinstance(spec.steps.get(item.step), SendStep):
            # waiting at a send step: a message may be reserved for it (queued after a
            # stop, deferred by the provider), which must not go out now
            self.withdrawn.append((spec.flow, item.run_key, item.recipient,
                                   f"left the journey before it was sent: {reason}"))
        self.visit(item, "exit_check", "exited", reason)
        self.leave(item, reason)

    def leave(self, item: Item, reason: str) -> None:
        """The enrollment ends here, exited for ``reason`` (its step logged already)."""
        item.status, item.exit_reason, item.moving = "exited", reason, False
        self.result.exits[reason] += 1

    # -- moving ------------------------------------------------------------------------
    def visit(self, item: Item, kind: str, outcome: str, detail: str | None = None) -> None:
        """Log the current step's outcome (the step is done)."""
        item.logs.append((item.id, self.job.journey, item.recipient, item.entry_no, item.seq,
                          item.step, kind, outcome, detail))
        item.seq += 1
        self.result.moves[item.step, outcome] += 1

    def go(self, item: Item, nxt: str | None) -> None:
        """Move to ``nxt`` (None: the journey is completed)."""
        if nxt is None:
            item.status, item.exit_reason, item.moving = "completed", None, False
            return
        item.passed.add(item.step)
        item.step, item.status = nxt, "active"
        item.arrived_at = item.due_at = self.now
        item.deadline = None
        if nxt in item.passed:
            # round a cycle that took no time (validation refuses those; a definition
            # an earlier Herald accepted may still hold one): it stops here, due now,
            # and goes on at the next tick instead of round again, sending at each turn
            item.moving = False

    def park(self, item: Item, until: datetime, deadline: datetime | None = None) -> None:
        item.status, item.due_at, item.deadline, item.moving = "waiting", until, deadline, False

    def round(self, moving: list[Item]) -> None:
        groups: dict[tuple[str, str], list[Item]] = defaultdict(list)
        for item in moving:
            groups[item.version, item.step].append(item)
        for (version, step_name), items in groups.items():
            spec = definition(self.ws, self.job.journey, version)
            step = spec.steps[step_name]
            if isinstance(step, ExitStep):
                for item in items:
                    self.visit(item, "exit", "completed", step.reason)
                    self.go(item, None)
            elif isinstance(step, SplitStep):
                self.split(spec, step_name, step, items)
            elif isinstance(step, BranchStep):
                self.branch(spec, step, items)
            elif isinstance(step, WaitStep):
                self.wait(spec, step, items)
            elif isinstance(step, WaitForStep):
                self.wait_for(spec, step, items)
            else:
                assert isinstance(step, SendStep)
                self.send(spec, step_name, step, items)

    def split(self, spec: JourneySpec, name: str, step: SplitStep, items: list[Item]) -> None:
        weights = {cohort: c.weight for cohort, c in step.cohorts.items()}
        for item in items:
            cohort = assign_variant(spec.flow, name, item.recipient,
                                    list(weights.items()))
            chosen = step.cohorts[cohort]
            item.cohort = item.cohort or cohort
            self.visit(item, "split", f"cohort:{cohort}")
            if chosen.holdout:
                item.cohort = cohort
                self.leave(item, "holdout")
            else:
                self.go(item, chosen.next)

    def branch(self, spec: JourneySpec, step: BranchStep, items: list[Item]) -> None:
        left = list(items)
        # whoever a case could not test (a number against text) and no later case took:
        # their default is logged as such, not as an ordinary miss
        unreadable: set[str] = set()
        for i, case in enumerate(step.cases):
            if not left:
                break
            if case.when is not None:
                tests = {it.recipient: case.when.test(it.data) for it in left}
                hits = {recipient for recipient, hit in tests.items() if hit}
                unreadable.update(r for r, hit in tests.items() if hit is None)
            else:
                assert case.condition is not None
                hits = set(self.matching(spec, case.condition,
                                         {it.recipient: it.entered_at for it in left}))
            for item in [it for it in left if it.recipient in hits]:
                self.visit(item, "branch", f"case:{i + 1}", case.next)
                self.go(item, case.next)
            left = [it for it in left if it.recipient not in hits]
        for item in left:
            self.visit(item, "branch", "default_not_a_number" if item.recipient in unreadable
                       else "default", step.default)
            self.go(item, step.default)

    def zone(self, spec: JourneySpec, item: Item) -> ZoneInfo:
        name = item.data.get(spec.entry.timezone) if spec.entry.timezone else None
        try:
            return ZoneInfo(str(name)) if name else ZoneInfo(
                spec.timezone or self.ws.config.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            return ZoneInfo(spec.timezone or self.ws.config.timezone)

    def wait(self, spec: JourneySpec, step: WaitStep, items: list[Item]) -> None:
        for item in items:
            if item.status == "waiting":
                due = item.due_at
            else:
                try:
                    due = step.due(item.arrived_at, self.zone(spec, item), item.data)
                except NotADate as exc:
                    # a wrong column or wrong data: not waiting at all would send the
                    # next message at once; the person leaves, the reason in the log
                    self.visit(item, "wait", "exited", str(exc))
                    self.leave(item, "not_a_date")
                    continue
            if due <= self.now + GRACE:
                self.visit(item, "wait", "waited")
                self.go(item, step.next)
            else:
                self.park(item, due)

    def wait_for(self, spec: JourneySpec, step: WaitForStep, items: list[Item]) -> None:
        hits = self.matching(spec, step, {it.recipient: it.arrived_at for it in items})
        for item in items:
            deadline = item.deadline or item.arrived_at + step.within
            if item.recipient in hits:
                self.visit(item, "wait_for", "matched", step.matched)
                self.go(item, step.matched)
            elif self.now + GRACE >= deadline:
                self.visit(item, "wait_for", "timeout", step.timeout)
                self.go(item, step.timeout)
            else:
                self.park(item, deadline, deadline)

    # -- sending ---------------------------------------------------------------------
    def send(self, spec: JourneySpec, name: str, step: SendStep, items: list[Item]) -> None:
        """Policy, reservation, render and dispatch for the items at one send step."""
        ws, flow = self.ws, spec.flow
        if stop_requested():  # stopping: they stay here, due, for the next tick
            for item in items:
                item.moving = False
            return
        for item in items:  # a capped or deferred recipient back for another try
            item.status = "active"
        orphans = [it for it in items if step.tier_for(it.tier) is None]
        for item in orphans:  # no entry for the tier and no default: nothing to send
            self.visit(item, "send", "no_tier",
                       f"tier '{item.tier}' has no entry in this step and there is no default")
            self.go(item, step.next)
        items = [it for it in items if step.tier_for(it.tier) is not None]
        if not items:
            return
        policy = Policy(ws, load.step_flow(spec, step, flow))
        wanted = {(it.run_key, it.recipient): it for it in items}
        decisions: list[tuple[Item, Decision]] = []
        with writing(ws.store) as conn:
            ledger.reserve_lock(conn)
            have = _ledger_rows(conn, flow, wanted)
            fresh = [it for key, it in wanted.items() if key not in have]
            decided = policy.decide(conn, [it.recipient_row() for it in fresh], self.now)
            by_key: dict[str, list[ledger.Entry]] = defaultdict(list)
            for item, d in zip(fresh, decided, strict=True):
                if d.status == "capped" and step.on_capped == "wait":
                    self.park(item, self.now + CAPPED_RETRY)
                    self.result.moves[name, "capped_waiting"] += 1
                    continue
                if d.status == "deferred":
                    assert d.not_before is not None
                    self.park(item, d.not_before)
                    self.result.moves[name, "quiet_hours_waiting"] += 1
                    continue
                by_key[item.run_key].append(ledger.Entry(
                    item.recipient, item.tier, "queued" if d.status == SEND else d.status,
                    d.channel, d.address, d.reason))
                decisions.append((item, d))
            for run_key, entries in by_key.items():
                ledger.write_entries(conn, entries, flow=flow, run_key=run_key,
                                     run_id=self.job.tick, package_id=item_version(items),
                                     priority=spec.priority, counted=not spec.exempt)
        written = sum(map(len, by_key.values()))
        if written >= 1000:  # as flows' chunks do (see the ledger)
            ledger.refresh_statistics(ws.store, written)
        again: list[tuple[Item, Any]] = []  # reserved earlier: sent now
        for key, row in have.items():
            item = wanted[key]
            # reserved by an earlier tick that did not send it (interrupted, stopped, or
            # its channel stopped), or deferred by the provider's back-off and due now:
            # sent now, on the channel it was reserved for
            if row.status == "deferred" and _due(row) > self.now:
                # claimed within GRACE of its time: the provider's wait is kept to the
                # second (it named it), so it waits on until then
                self.park(item, _due(row))
                continue
            if row.status in ("queued", "deferred"):
                again.append((item, row))
        if again:  # unless the suppression list stops them now (settled `suppressed`)
            with ws.store.connect() as conn:
                stopped = suppression.listed_since(
                    conn, [(it.recipient, row.channel, row.address) for it, row in again],
                    ws.config.phone_region)
            late: dict[str, list[ledger.Outcome]] = defaultdict(list)
            for item, row in again:
                if item.recipient in stopped:
                    late[item.run_key].append(ledger.Outcome(
                        item.recipient, "suppressed", suppression.LISTED_SINCE, attempts=0))
                    continue
                entry = step.tier_for(item.tier)
                assert entry is not None
                decisions.append((item, Decision(item.recipient_row(), entry[0], SEND,
                                                 channel=row.channel, address=row.address)))
            for run_key, outcomes in late.items():
                ledger.settle(ws.store, flow, run_key, outcomes)
        outgoing: dict[str, list[tuple[str, Message]]] = defaultdict(list)
        failed: dict[str, list[ledger.Outcome]] = defaultdict(list)
        for item, d in decisions:
            if d.status != SEND:
                continue
            try:
                message = self.render(spec, name, step, item, d)
            except RenderError as exc:
                failed[item.run_key].append(ledger.Outcome(item.recipient, "render_error",
                                                           str(exc), attempts=0))
                continue
            assert d.channel is not None
            outgoing[item.run_key].append((d.channel, message))
        for run_key, outcomes in failed.items():
            ledger.settle(ws.store, flow, run_key, outcomes)
        if outgoing:
            # Hold the lease for the whole dispatch: renewed now, and nothing is sent if
            # another tick took over (a lease outrun by a slow round).
            self.renew(items)
            self.count_stopped(asyncio.run(self._dispatch(flow, outgoing)))
        with ws.store.connect() as conn:
            settled = _ledger_rows(conn, flow, wanted)
        for key, item in wanted.items():
            if not item.moving:
                continue  # capped (wait) or deferred by quiet hours: decided again later
            row = settled.get(key)
            if row is not None and row.status == "queued":
                # Not handed to a provider (its channel stopped, or a stop): the step is
                # not done. The message stays reserved and the recipient here, due now:
                # the next tick sends it (this one does not claim them again).
                self.park(item, self.now)
                self.result.moves[name, "queued_waiting"] += 1
                continue
            if row is not None and row.status == "deferred":
                # The provider kept answering "later" (throttled, busy) past this tick's
                # retries: the step is not done either. The recipient waits here until
                # the back-off ends, then a tick sends again; after MAX_TOTAL_ATTEMPTS
                # attempts in all the row is `failed` and the recipient moves on.
                self.park(item, _due(row))
                self.result.moves[name, "deferred_waiting"] += 1
                continue
            outcome = row.status if row else "lost"
            self.visit(item, "send", outcome, row.reason if row else None)
            self.go(item, step.next)

    async def _dispatch(self, flow: str, outgoing: dict[str, list[tuple[str, Message]]]
                        ) -> list[tuple[str, ledger.Outcome]]:
        """Send; returns (channel, outcome) of each message a fatal answer kept from
        going out (settled ``queued`` with the reason)."""
        keys = list(outgoing)
        answers = await asyncio.gather(*(
            dispatch(self.ws, Job(flow, run_key, self.job.tick), group(outgoing[run_key]))
            for run_key in keys))
        channel = {(run_key, m.recipient): name for run_key in keys
                   for name, m in outgoing[run_key]}
        return [(channel[run_key, o.recipient], o)
                for run_key, settled in zip(keys, answers, strict=True)
                for o in settled if o.status == "queued"]

    def count_stopped(self, kept: list[tuple[str, ledger.Outcome]]) -> None:
        """Count, per channel a fatal answer stopped, the messages it kept from going
        out, with the provider's answer (the one it gave, rather than the words that say
        the channel had stopped)."""
        reasons: dict[str, list[str]] = defaultdict(list)
        for channel, outcome in kept:
            reasons[channel].append(outcome.reason or "fatal: no detail")
        for channel, found in reasons.items():
            reason = min(found, key=lambda r: r.startswith(STOPPED))
            cause, n = self.result.stopped.get(channel, (fatal_cause(reason), 0))
            self.result.stopped[channel] = (cause, n + len(found))

    def render(self, spec: JourneySpec, name: str, step: SendStep, item: Item,
               d: Decision) -> Message:
        assert d.channel is not None and d.address is not None
        chosen = assign_variant(spec.flow, name, item.recipient,
                                list(step.variants.items())) \
            if step.variants else None
        flow = load.step_flow(spec, step, load.template_folder(spec.name, name, chosen))
        kind = self.ws.channel_kind(d.channel)
        locale = item.data.get(spec.entry.locale) if spec.entry.locale else None
        link, headers = unsubscribe.for_message(self.ws.config.unsubscribe, item.recipient,
                                                d.channel, kind, spec.flow)
        variables = {**item.data, "journey": spec.name, "step": name, "variant": chosen,
                     "flow": spec.flow, "tier": item.tier, "run_key": item.run_key,
                     "channel": d.channel, **link}
        rendered = self.templates.render(flow, d.tier, kind, str(locale) if locale else None,
                                         variables)
        return Message(recipient=item.recipient, address=d.address, kind=kind,
                       body=rendered.body, subject=rendered.subject, html=rendered.html,
                       # "journey-NAME": a colon is not allowed in a Message-ID
                       message_id=message_id(f"journey-{spec.name}", item.run_key,
                                             item.recipient),
                       headers=headers,
                       meta={"flow": spec.flow, "run_key": item.run_key, "tier": item.tier,
                             "journey": spec.name, "step": name,
                             **({"variant": chosen} if chosen else {})})

    # -- persisting ------------------------------------------------------------------
    def renew(self, items: list[Item]) -> None:
        """Extend this tick's lease on ``items``; RunError if it lost any of them."""
        ids = [it.id for it in items]
        with writing(self.ws.store) as conn:
            held = 0
            for part in among_ids(ids):
                held += conn.execute(update(enrollments).where(
                    part, enrollments.c.lease_owner == self.owner).values(
                    lease_until=clock.now() + self.job.lease)).rowcount or 0
            if held != len(ids):
                raise RunError(f"journey {self.job.journey}: tick {self.job.tick} lost the "
                               f"lease on {len(ids) - held} enrollments before sending; "
                               "nothing was sent (a round took longer than the lease: "
                               "use a smaller chunk_size)")

    def persist(self, items: list[Item]) -> None:
        """One transaction: the items' state and their new log rows, lease permitting."""
        if not items:
            return
        logs = [row for it in items for row in it.logs]
        lease = clock.now() + self.job.lease
        with writing(self.ws.store) as conn:
            held = 0
            for part in among_ids([it.id for it in items]):
                held += conn.execute(select(func.count()).select_from(enrollments).where(
                    part, enrollments.c.lease_owner == self.owner)).scalar_one()
            if held != len(items):
                raise RunError(f"journey {self.job.journey}: tick {self.job.tick} lost the "
                               f"lease on {len(items) - held} enrollments (a tick took "
                               "longer than the lease); nothing of this round was saved")
            _save(conn, self.owner, items, logs, self.now, lease, self.job.tick)
            withdrawn, self.withdrawn = self.withdrawn, []
            for flow in sorted({w[0] for w in withdrawn}):
                ledger.withdraw(conn, flow, [w[1:] for w in withdrawn if w[0] == flow])
        for it in items:
            it.logs.clear()


# A round's writes go to the driver: SQLAlchemy building each row's parameters (and, on
# SQLite, converting each time) cost a third of a tick's time (BENCHMARKS.md, Journeys).
# An ended enrollment is nobody's to claim again: its lease goes with the write.
STATE_COLUMNS = ("step", "seq", "status", "exit_reason", "cohort", "due_at", "deadline",
                 "arrived_at", "updated_at", "lease_owner", "lease_until")
LOG_COLUMNS = ("enrollment_id", "journey", "recipient", "entry_no", "seq", "step", "kind",
               "outcome", "detail", "at", "tick")


def _save(conn: Any, owner: str, items: list[Item], logs: list[tuple[Any, ...]],
          now: datetime, lease: datetime, tick: str) -> None:
    """The round's states and log rows: one executemany each at the driver (psycopg sends
    a Postgres executemany as one pipeline), the times converted once (SQLite keeps them
    as text). Measured and not kept on Postgres: one ``UPDATE ... FROM unnest(arrays)``,
    two to three times slower than the executemany here."""
    mark = driver_mark(conn.dialect)
    time = to_driver(conn, enrollments.c.due_at)
    updated, renewed = time(now), time(lease)
    conn.exec_driver_sql(
        f"UPDATE {enrollments.name} SET {', '.join(f'{c} = {mark}' for c in STATE_COLUMNS)} "
        f"WHERE id = {mark} AND lease_owner = {mark}",
        [(it.step, it.seq, it.status, it.exit_reason, it.cohort, time(it.due_at),
          None if it.deadline is None else time(it.deadline), time(it.arrived_at), updated,
          *((owner, renewed) if it.status in LIVE else (None, None)), it.id, owner)
         for it in items])
    if logs:
        conn.exec_driver_sql(
            f"INSERT INTO {log.name} ({', '.join(LOG_COLUMNS)}) "
            f"VALUES ({', '.join([mark] * len(LOG_COLUMNS))})",
            [(*row, updated, tick) for row in logs])


def item_version(items: list[Item]) -> str:
    return items[0].version


def _due(row: Any) -> datetime:
    """When a deferred ledger row may be sent again (its ``not_before``)."""
    return must(row.not_before)


def _ledger_rows(conn: Any, flow: str, wanted: dict[tuple[str, str], Item]
                 ) -> dict[tuple[str, str], Any]:
    """The ledger rows of (run key, recipient) pairs of ``flow``."""
    d = ledger.deliveries.c
    out = {}
    recipients = sorted({k[1] for k in wanted})
    for part in ledger.among(conn, d.recipient, recipients):
        for row in conn.execute(select(
                d.recipient, d.run_key, d.status, d.channel, d.address, d.reason,
                d.not_before).where(d.flow == flow, part)):
            if (row.run_key, row.recipient) in wanted:
                out[row.run_key, row.recipient] = row
    return out
