"""What a journey's tables say: where everyone is, one person's path, and per-step
results with the goal's conversions and the uplift over the holdout. Reads only."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, String, and_, cast, func, literal_column, select

from herald.core import clock
from herald.core.db import JOURNEY_LIVE as LIVE
from herald.core.db import journey_enrollments as enrollments
from herald.core.db import journey_log as log
from herald.core.workspace import Workspace
from herald.delivery import ledger
from herald.delivery.variants import assign as assign_variant
from herald.journeys import conditions, load
from herald.journeys.entry import definition
from herald.journeys.spec import JourneySpec, SendStep
from herald.reporting import stats
from herald.reporting.conversions import money

BATCH = 5000


def status(ws: Workspace, name: str) -> dict[str, Any]:
    """How many are at each step (active or waiting), completed, and exited by reason;
    ``queued``: per send step, how many of those waiting there have their message
    reserved but not sent (a channel stopped, or a stop): the next tick sends it."""
    loaded = load.load(ws, name)
    c = enrollments.c
    at: dict[str, dict[str, int]] = {s: {"active": 0, "waiting": 0}
                                     for s in loaded.spec.steps}
    exited: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    completed = total = 0
    with ws.store.connect() as conn:
        for st, step, reason, version, n in conn.execute(
                select(c.status, c.step, c.exit_reason, c.version, func.count()).where(
                    c.journey == name).group_by(c.status, c.step, c.exit_reason, c.version)):
            total += n
            if st in LIVE:
                at.setdefault(step, {"active": 0, "waiting": 0})[st] += n
                versions[version] += n
            elif st == "completed":
                completed += n
            else:
                exited[reason or "exited"] += n
        recipients = conn.execute(select(func.count(func.distinct(c.recipient))).where(
            c.journey == name)).scalar() or 0
        specs = [loaded.spec] + [definition(ws, name, v) for v in versions
                                 if v != loaded.version]
        sends = {s for spec in specs for s, step in spec.steps.items()
                 if isinstance(step, SendStep) and at.get(s, {}).get("waiting")}
        queued = _queued(conn, name, loaded.spec.flow, sends) if sends else {}
    live = sum(a + w for a, w in (tuple(v.values()) for v in at.values()))
    return {"journey": name, "version": loaded.version, "enrollments": total,
            "recipients": int(recipients), "live": live, "at_step": at,
            "queued": queued, "completed": completed, "exited": dict(exited.most_common()),
            "live_by_version": dict(versions)}


def _queued(conn: Any, name: str, flow: str, steps: set[str]) -> dict[str, int]:
    """Per send step, the enrollments waiting there whose message of this visit (run
    key ``e{entry}:{seq}:{step}``) is ``queued`` in the ledger."""
    c, d = enrollments.c, ledger.deliveries.c
    run_key: ColumnElement[str] = (literal_column("'e'", String) + cast(c.entry_no, String)
                                   + ":" + cast(c.seq, String) + ":" + c.step)
    query = select(c.step, func.count()).select_from(enrollments.join(
        ledger.deliveries, and_(d.flow == flow, d.run_key == run_key,
                                d.recipient == c.recipient))).where(
        c.journey == name, c.status == "waiting", c.step.in_(sorted(steps)),
        d.status == "queued").group_by(c.step)
    return {str(step): int(n) for step, n in conn.execute(query)}


def show(ws: Workspace, name: str, recipient: str) -> dict[str, Any]:
    """One person's enrollments, each with its steps and the messages they got."""
    load.load(ws, name)
    c, lc, d = enrollments.c, log.c, ledger.deliveries.c
    out = []
    with ws.store.connect() as conn:
        rows = list(conn.execute(select(enrollments).where(
            c.journey == name, c.recipient == recipient).order_by(c.entry_no)))
        sends = {r.run_key: r for r in conn.execute(select(
            d.run_key, d.status, d.channel, d.reason, d.sent_at).where(
            d.flow == f"journey:{name}", d.recipient == recipient))}
        for row in rows:
            path = []
            for step in conn.execute(select(log).where(lc.enrollment_id == row.id)
                                     .order_by(lc.seq)):
                entry: dict[str, Any] = {"seq": step.seq, "step": step.step,
                                         "kind": step.kind, "outcome": step.outcome,
                                         "detail": step.detail, "at": _iso(step.at)}
                message = sends.get(f"e{row.entry_no}:{step.seq}:{step.step}")
                if message is not None:  # the step's message (an exit: the one withdrawn)
                    entry["channel"], entry["message"] = message.channel, message.status
                path.append(entry)
            # the message of the step they are at, when one is reserved and not yet
            # sent (its channel or the tick stopped: the next tick sends it)
            pending = sends.get(f"e{row.entry_no}:{row.seq}:{row.step}") \
                if row.status in LIVE else None
            out.append({"entry": row.entry_no, "version": row.version,
                        "status": row.status, "step": row.step,
                        "exit_reason": row.exit_reason, "cohort": row.cohort,
                        "entered_at": _iso(row.entered_at), "due_at": _iso(row.due_at)
                        if row.status == "waiting" else None, "path": path,
                        "message": {"status": pending.status, "channel": pending.channel,
                                    "reason": pending.reason} if pending else None})
    return {"journey": name, "recipient": recipient, "enrollments": out}


def _iso(value: Any) -> str | None:
    from herald.reporting.conversions import utc

    moment = utc(value)
    return moment.isoformat() if moment else None


def report(ws: Workspace, name: str) -> dict[str, Any]:
    """Per step: visited, outcomes, messages by status, converted; the goal's uplift of
    the treated over the holdout; per-variant conversion for variant sends."""
    loaded = load.load(ws, name)
    spec = loaded.spec
    lc, d = log.c, ledger.deliveries.c
    steps: dict[str, dict[str, Any]] = {s: {"visited": 0, "outcomes": {}, "messages": {},
                                            "converted": 0} for s in spec.steps}
    with ws.store.connect() as conn:
        for step, outcome, n in conn.execute(select(lc.step, lc.outcome, func.count()).where(
                lc.journey == name).group_by(lc.step, lc.outcome)):
            row = steps.setdefault(step, {"visited": 0, "outcomes": {}, "messages": {},
                                          "converted": 0})
            row["outcomes"][outcome] = int(n)
            if outcome != "exited":
                row["visited"] += int(n)
        for run_key, st, n in conn.execute(select(d.run_key, d.status, func.count()).where(
                d.flow == spec.flow).group_by(d.run_key, d.status)):
            step = run_key.split(":", 2)[-1]
            messages = steps.setdefault(step, {"visited": 0, "outcomes": {}, "messages": {},
                                               "converted": 0})["messages"]
            messages[st] = messages.get(st, 0) + int(n)
    state = status(ws, name)
    goal = _goal(ws, spec, steps) if spec.goal else None
    return {"journey": name, "entered": state["enrollments"], "live": state["live"],
            "queued": state["queued"], "completed": state["completed"],
            "exited": state["exited"], "steps": steps, "goal": goal}


def _goal(ws: Workspace, spec: JourneySpec, steps: dict[str, dict[str, Any]]
          ) -> dict[str, Any]:
    """Conversions within the goal's window after entry, per group, step and variant."""
    assert spec.goal is not None
    goal = spec.goal
    source = goal.source or spec.entry.source
    query = load.load_sql(ws, goal.segment, source, goal.params, ("since", "until"))
    now = clock.now()
    groups = {"treated": [0, 0], "holdout": [0, 0]}
    revenue = {"treated": 0.0, "holdout": 0.0}
    visited: dict[int, set[str]] = defaultdict(set)
    variants: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    send_steps = {n: s for n, s in spec.steps.items() if isinstance(s, SendStep) and s.variants}
    c, lc = enrollments.c, log.c
    last = 0
    while True:
        with ws.store.connect() as conn:
            rows = list(conn.execute(select(c.id, c.recipient, c.entry_no, c.entered_at,
                                            c.exit_reason, c.version).where(
                c.journey == spec.name, c.id > last).order_by(c.id).limit(BATCH)))
            if not rows:
                break
            last = rows[-1].id
            ids = [r.id for r in rows]
            for part in range(0, len(ids), 500):
                for eid, step in conn.execute(select(lc.enrollment_id, lc.step).where(
                        lc.enrollment_id.in_(ids[part:part + 500])).distinct()):
                    visited[eid].add(step)
        by_entry: dict[int, list[Any]] = defaultdict(list)
        for r in rows:
            by_entry[r.entry_no].append(r)
        for batch in by_entry.values():
            since = {r.recipient: _utc(r.entered_at) for r in batch}
            hits = conditions.matching(ws, source, query, goal.key or spec.entry.key,
                                       goal.at, since, now, goal.window)
            amounts = _amounts(ws, source, query, spec, since, now) if goal.amount else {}
            for r in batch:
                arm = "holdout" if r.exit_reason == "holdout" else "treated"
                converted = r.recipient in hits
                groups[arm][0] += 1
                groups[arm][1] += converted
                revenue[arm] += amounts.get(r.recipient, 0.0)
                for step in visited.get(r.id, ()):
                    if converted and step in steps:
                        steps[step]["converted"] += 1
                for step_name, step in send_steps.items():
                    if step_name in visited.get(r.id, ()):
                        chosen = assign_variant(spec.flow, step_name, r.recipient,
                                                list(step.variants.items()))
                        variants[step_name, chosen][0] += 1
                        variants[step_name, chosen][1] += converted
    (nt, xt), (nh, xh) = groups["treated"], groups["holdout"]
    uplift = stats.uplift(xt, nt, xh, nh).to_dict() if nt and nh else None
    return {"segment": goal.segment, "window_seconds": int(goal.window.total_seconds()),
            "treated": {"recipients": nt, "converted": xt, "rate": xt / nt if nt else None,
                        "revenue": round(revenue["treated"], 2) if goal.amount else None},
            "holdout": {"recipients": nh, "converted": xh, "rate": xh / nh if nh else None,
                        "revenue": round(revenue["holdout"], 2) if goal.amount else None},
            "uplift": uplift,
            "note": None if uplift else "no holdout: add a split cohort with holdout: true",
            "variants": [{"step": s, "variant": v, "recipients": n, "converted": x,
                          "rate": x / n if n else None}
                         for (s, v), (n, x) in sorted(variants.items())]}


def _amounts(ws: Workspace, source: str, query: Any, spec: JourneySpec,
             since: dict[str, datetime], now: datetime) -> dict[str, float]:
    assert spec.goal is not None and spec.goal.amount
    goal = spec.goal
    rows = conditions.rows_for(ws, source, query, goal.key or spec.entry.key,
                               [goal.at, goal.amount or ""], sorted(since),
                               min(since.values()), now)
    out: dict[str, float] = defaultdict(float)
    for key, found in rows.items():
        start = since.get(key)
        if start is None:
            continue
        for at, amount in found:
            moment = _utc(at)
            if moment and start <= moment < min(now, start + goal.window):
                out[key] += money(amount, query.file, goal.amount or "")
    return out


def _utc(value: Any) -> datetime:
    from herald.reporting.conversions import utc

    moment = utc(value)
    assert moment is not None
    return moment


def contacts(ws: Workspace, name: str) -> Iterator[tuple[str, str, bool, datetime]]:
    """(recipient, tier, treated?, entered at) of every enrollment, oldest first."""
    c = enrollments.c
    last = 0
    while True:
        with ws.store.connect() as conn:
            rows = list(conn.execute(select(c.id, c.recipient, c.tier, c.exit_reason,
                                            c.entered_at).where(
                c.journey == name, c.id > last).order_by(c.id).limit(BATCH)))
        if not rows:
            return
        last = rows[-1].id
        for r in rows:
            yield r.recipient, r.tier, r.exit_reason != "holdout", _utc(r.entered_at)


def versions_in_use(ws: Workspace, name: str) -> dict[str, JourneySpec]:
    """Definitions that live enrollments follow (for status output)."""
    state = status(ws, name)
    return {v: definition(ws, name, v) for v in state["live_by_version"]}


def dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, indent=2, default=str)
