"""Test, then send the winner: the start and the decision of experiments with a test share.

The first run of a run key starts each such experiment (its decision is due
``decide_after`` later); the policy sends the variants to the test share and defers the
rest until then. The first run of the run key at or after that time decides, here,
before any chunk runs: the verdict of ``herald.reporting.experiments`` on the test's
conversions so far, else the experiment's ``fallback`` (the control, the best arm
whatever its p-value, or stop). The decision is recorded once, with its reason and
figures; the deferred rest are then decided again by the policy, which gives them the
winner (or stops them).
"""

from __future__ import annotations

import logging
from datetime import datetime

from herald.core.spec import FlowSpec
from herald.core.workspace import Workspace
from herald.delivery import variants
from herald.reporting import conversions, experiments

log = logging.getLogger("herald.run")


def advance(ws: Workspace, flow: FlowSpec, run_key: str, at: datetime) -> None:
    """Start the tests of this run key that have not started; decide those now due."""
    states = variants.states(ws.store, flow.name, run_key)
    due = []
    for name, (spec, _tiers) in flow.experiments().items():
        if spec.test_share is None or spec.decide_after is None:
            continue
        state = states.get(name)
        if state is None:
            state = variants.start(ws.store, flow.name, run_key, name, at, spec.decide_after)
            log.info("experiment %s: testing on %.0f%% of the audience, decision at %s",
                     name, spec.test_share * 100, f"{state.decide_at:%Y-%m-%d %H:%M} UTC")
        if not state.decided and state.decide_at <= at:
            due.append(name)
    if due:
        decide(ws, flow, run_key, due, at)


def decide(ws: Workspace, flow: FlowSpec, run_key: str, names: list[str],
           at: datetime) -> None:
    """Name each experiment's winner (or apply its fallback) and record why."""
    report = conversions.compute(ws, flow.name, run_key, now=at)
    results = {r.name: r for r in experiments.compute(ws, flow.name, run_key,
                                                      report.converted)}
    for name in names:
        result = results[name]
        spec, total = result.spec, result.total
        found = total.verdict
        winner: str | None
        if found.winner is not None:
            winner, outcome, reason = found.winner, "winner", found.reason
        elif spec.fallback == "control":
            winner, outcome = spec.control_variant, "control"
            reason = f"no winner ({found.reason}): the rest get the control, {winner}"
        elif spec.fallback == "best":
            winner, outcome = total.best(), "best"
            reason = (f"no winner ({found.reason}): the rest get the best arm so far, "
                      f"{winner} (fallback best)")
        else:
            winner, outcome = None, "stop"
            reason = f"no winner ({found.reason}): the rest are not sent (fallback stop)"
        figures = {**total.to_dict(), "window_closed": report.window_closed,
                   "computed_at": at.isoformat()}
        if variants.record_decision(ws.store, flow.name, run_key, name, winner, outcome,
                                    reason, figures, at):
            log.info("experiment %s decided: %s", name, reason)
