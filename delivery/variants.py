"""Content experiments: which variant a recipient gets, and the state of a test.

One home for the assignment. ``assign`` maps a stable hash of (scope, experiment,
recipient key) onto the variants' weights: the same person gets the same variant on every
run of a recurring flow (and journeys reuse it with their own scope). The hash is salted
apart from the holdout's (``herald.delivery.policy.in_holdout``, a hash of flow and key)
and from the test-share draw (``in_test``), so the three draws are independent: the
holdout takes the same share of every variant, and the test share the same of each.

An experiment with ``test_share`` keeps one row in ``herald_experiments`` per (flow, run
key): created by the run key's first run with the time its decision is due, completed by
the run that decides (the winner, the fallback used, the reason and the figures).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from herald.core.db import experiments, writing

_SCALE = 2**64


def _unit(*parts: str) -> float:
    """A stable draw in [0, 1) from the parts (SHA-256, the first 8 bytes)."""
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def assign(scope: str, experiment: str, key: str,
           weights: Sequence[tuple[str, float]]) -> str:
    """The variant of ``key`` in ``experiment`` of ``scope`` (a flow's or a journey's name):
    variants get recipients in proportion to their weights, the same one on every call."""
    total = sum(w for _, w in weights)
    if not weights or total <= 0:
        raise ValueError("an experiment needs variants with positive weights")
    point = _unit("variant", scope, experiment, key) * total
    upto = 0.0
    for name, weight in weights:
        upto += weight
        if point < upto:
            return name
    return weights[-1][0]  # rounding at the very top of the range


def in_test(scope: str, experiment: str, key: str, share: float) -> bool:
    """Whether ``key`` belongs to the share of the audience that tests the variants
    (the rest wait for the winner); independent of the variant and the holdout."""
    return _unit("test", scope, experiment, key) < share


@dataclass(frozen=True)
class State:
    """An experiment's test under one run key: when it is decided, and what it decided."""

    experiment: str
    started_at: datetime
    decide_at: datetime
    decided: bool = False
    winner: str | None = None  # None once decided: the rest are stopped
    outcome: str | None = None
    reason: str | None = None
    figures: dict[str, Any] | None = None
    decided_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "started_at": self.started_at.isoformat(),
                "decide_at": self.decide_at.isoformat(), "decided": self.decided,
                "winner": self.winner, "outcome": self.outcome, "reason": self.reason,
                "figures": self.figures,
                "decided_at": self.decided_at.isoformat() if self.decided_at else None}


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def states(engine: Engine, flow: str, run_key: str) -> dict[str, State]:
    """Every experiment's state under (flow, run key)."""
    e = experiments.c
    with engine.connect() as conn:
        rows = list(conn.execute(select(experiments).where(e.flow == flow,
                                                           e.run_key == run_key)))
    return {r.experiment: State(
        r.experiment, _utc(r.started_at), _utc(r.decide_at), r.status == "decided",
        r.winner, r.outcome, r.reason, json.loads(r.figures) if r.figures else None,
        _utc(r.decided_at) if r.decided_at else None) for r in rows}


def start(engine: Engine, flow: str, run_key: str, experiment: str, at: datetime,
          after: timedelta) -> State:
    """The test of (flow, run key, experiment): started now unless it already was."""
    try:
        with writing(engine) as conn:
            conn.execute(insert(experiments).values(
                flow=flow, run_key=run_key, experiment=experiment, started_at=at,
                decide_at=at + after, status="testing"))
    except IntegrityError:
        pass  # started by an earlier run of the run key (or a concurrent one)
    return states(engine, flow, run_key)[experiment]


def record_decision(engine: Engine, flow: str, run_key: str, experiment: str,
                    winner: str | None, outcome: str, reason: str,
                    figures: dict[str, Any], at: datetime) -> bool:
    """Record the decision once; False when another run recorded one first."""
    e = experiments.c
    with writing(engine) as conn:
        done = conn.execute(update(experiments).where(
            e.flow == flow, e.run_key == run_key, e.experiment == experiment,
            e.status == "testing").values(
            status="decided", winner=winner, outcome=outcome, reason=reason,
            figures=json.dumps(figures, ensure_ascii=False), decided_at=at))
        return bool(done.rowcount)
