"""Content experiments' results: each variant's conversions, against the control, and a
verdict that names a winner only when the figures allow it.

For one run key of a flow, per experiment, for all its recipients and per tier (of an
experiment with a test share: the test share only, the randomised part; the rest, sent
the decision's variant, are counted apart):

- each variant's **contacted** recipients (ledger rows ``sent`` with that variant), how
  many **converted** (the attribution of ``herald.reporting.conversions``), the rate with
  its Wilson interval, and revenue;
- each variant **against the control**: the difference of rates with Newcombe's 95%
  interval and the two-sided p-value of the pooled two-proportion z-test;
- the **verdict**: "not enough data" while any variant has fewer than ``min_sample``
  contacted recipients, or while the test of all arms (two arms: the z-test; more:
  Pearson's chi-squared, k - 1 degrees of freedom) gives p >= ``significance``; with
  more than two arms the best must also beat the runner-up (z-test, p <
  ``significance``). Otherwise the winner is the variant with the best rate.

A read: nothing here writes (the decision of a test is recorded by the run that makes it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from herald.core.spec import ExperimentSpec
from herald.core.workspace import Workspace
from herald.delivery import ledger, ledger_reads, variants
from herald.reporting.conversions import CONTACTED
from herald.reporting.stats import chi_squared_test, two_proportion_test, uplift, wilson

NOT_ENOUGH = "not_enough_data"
WINNER = "winner"


@dataclass
class Arm:
    """One variant's contacted recipients."""

    variant: str
    recipients: int = 0
    converted: int = 0
    revenue: float = 0.0

    @property
    def rate(self) -> float | None:
        return self.converted / self.recipients if self.recipients else None

    def to_dict(self) -> dict[str, Any]:
        low, high = wilson(self.converted, self.recipients) if self.recipients else (None,
                                                                                   None)
        return {"variant": self.variant, "contacted": self.recipients,
                "converted": self.converted, "rate": self.rate, "ci_low": low,
                "ci_high": high, "revenue": round(self.revenue, 2)}


@dataclass(frozen=True)
class Verdict:
    """A winner, or "not enough data" with the reason (never a silent pick)."""

    status: str  # winner | not_enough_data
    winner: str | None
    reason: str
    test: str | None = None  # two-proportion z | chi-squared
    statistic: float | None = None
    p_value: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "winner": self.winner, "reason": self.reason,
                "test": self.test, "statistic": self.statistic, "p_value": self.p_value}


@dataclass
class Result:
    """The arms of one experiment for its whole audience or one tier, and the verdict."""

    name: str
    control: str
    arms: dict[str, Arm]
    min_sample: int
    significance: float

    def comparisons(self) -> dict[str, dict[str, Any] | None]:
        """Each variant but the control against the control: difference, 95% interval
        (Newcombe), p-value (two-proportion z); None where an arm has nobody."""
        base = self.arms[self.control]
        out: dict[str, dict[str, Any] | None] = {}
        for name, arm in self.arms.items():
            if name == self.control:
                continue
            if not arm.recipients or not base.recipients:
                out[name] = None
                continue
            diff = uplift(arm.converted, arm.recipients, base.converted, base.recipients)
            z, p = two_proportion_test(arm.converted, arm.recipients, base.converted,
                                       base.recipients)
            out[name] = {"difference": diff.absolute, "ci_low": diff.low,
                         "ci_high": diff.high, "relative": diff.relative, "z": z,
                         "p_value": p}
        return out

    @property
    def verdict(self) -> Verdict:
        return verdict(self.arms, self.min_sample, self.significance)

    def best(self) -> str:
        """The arm with the best rate (the control on a tie): fallback ``best``."""
        ranked = sorted(self.arms.values(), key=lambda a: (
            -(a.rate or 0.0), a.variant != self.control))
        return ranked[0].variant

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "control": self.control,
                "arms": [a.to_dict() for a in self.arms.values()],
                "against_control": self.comparisons(), "verdict": self.verdict.to_dict()}


def verdict(arms: Mapping[str, Arm], min_sample: int, significance: float) -> Verdict:
    """The rules of the module docstring, in order."""
    short = [a for a in arms.values() if a.recipients < min_sample]
    if short:
        return Verdict(NOT_ENOUGH, None, "fewer than {:,} contacted in {}".format(
            min_sample, ", ".join(f"{a.variant} ({a.recipients:,})" for a in short)))
    table = [(a.converted, a.recipients) for a in arms.values()]
    if len(table) == 2:
        (x1, n1), (x2, n2) = table
        z, p = two_proportion_test(x1, n1, x2, n2)
        test, statistic = "two-proportion z", z
    else:
        statistic, _, p = chi_squared_test(table)
        test = "chi-squared"
    if p >= significance:
        return Verdict(NOT_ENOUGH, None, f"no significant difference: p = {p:.3g} >= "
                       f"{significance:g} ({test})", test, statistic, p)
    ranked = sorted(arms.values(), key=lambda a: -(a.rate or 0.0))
    best, second = ranked[0], ranked[1]
    if len(table) > 2:
        _, p_pair = two_proportion_test(best.converted, best.recipients, second.converted,
                                        second.recipients)
        if p_pair >= significance:
            return Verdict(NOT_ENOUGH, None, f"the arms differ (p = {p:.3g}) but "
                           f"{best.variant} does not beat {second.variant} "
                           f"(p = {p_pair:.3g} >= {significance:g})", test, statistic, p)
    return Verdict(WINNER, best.variant, f"{best.variant} converts best: "
                   f"{(best.rate or 0) * 100:.2f}% against {second.variant}'s "
                   f"{(second.rate or 0) * 100:.2f}%, p = {p:.3g} < {significance:g} "
                   f"({test})", test, statistic, p)


@dataclass
class ExperimentReport:
    """One experiment under one run key: all its recipients, per tier, and its state."""

    name: str
    spec: ExperimentSpec
    tiers: list[str]  # the tier entries it covers
    total: Result
    by_tier: dict[str, Result] = field(default_factory=dict)
    waiting: int = 0  # recipients deferred until the decision
    stopped: int = 0
    state: variants.State | None = None
    # test then winner: the rest, sent after the decision, by variant. They were not
    # randomised, so they stay out of the arms and the verdict.
    rest: dict[str, Arm] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        spec = self.spec
        return {"name": self.name, "variants": dict(spec.variants),
                "control": spec.control_variant, "tiers": self.tiers,
                "test_share": spec.test_share,
                "decide_after": (int(spec.decide_after.total_seconds())
                                 if spec.decide_after else None),
                "fallback": spec.fallback, "min_sample": spec.min_sample,
                "significance": spec.significance, "total": self.total.to_dict(),
                "by_tier": [r.to_dict() for r in self.by_tier.values()],
                "waiting": self.waiting, "stopped": self.stopped,
                "rest": [a.to_dict() for a in self.rest.values()],
                "decision": self.state.to_dict() if self.state else None}


def compute(ws: Workspace, flow_name: str, run_key: str,
            converted: Mapping[str, tuple[datetime, float]] | None) -> list[ExperimentReport]:
    """Every experiment of the flow under ``run_key``; ``converted`` is the conversion
    report's attribution (recipient -> (first conversion, revenue)), None when the flow
    measures no conversions (then only the contacted counts mean anything)."""
    flow = ws.flow(flow_name)
    found = flow.experiments()
    if not found:
        return []
    states = variants.states(ws.store, flow.name, run_key)
    reports: dict[str, ExperimentReport] = {}
    for name, (spec, tiers) in found.items():
        reports[name] = ExperimentReport(name, spec, tiers, _result("all", spec),
                                         state=states.get(name))
    entry_of: dict[str, str | None] = {}
    d = ledger.deliveries
    for rows in ledger_reads.run_key_rows(ws.store, flow.name, run_key,
                                    [d.c.tier, d.c.status, d.c.variant, d.c.reason],
                                    statuses=[CONTACTED, "deferred", "stopped"]):
        for r in rows:
            if r.tier not in entry_of:
                entry = flow.tier_for(r.tier)
                exp = flow.experiment_for(entry[0]) if entry else None
                entry_of[r.tier] = exp[0] if exp else None  # None: the tier tests nothing
            tested = entry_of[r.tier]
            if tested is None:
                continue
            report = reports[tested]
            if r.status == "stopped":
                report.stopped += 1
                continue
            if r.status == "deferred":
                if (r.reason or "").startswith(f"experiment {tested}:"):
                    report.waiting += 1
                continue
            if r.variant not in report.total.arms:
                continue  # a variant since removed from the YAML
            hit = converted.get(r.recipient) if converted else None
            share = report.spec.test_share
            if share is not None and not variants.in_test(flow.name, tested, r.recipient,
                                                          share):
                arms = [report.rest.setdefault(r.variant, Arm(r.variant))]
            else:
                tier = report.by_tier.setdefault(r.tier, _result(r.tier, report.spec))
                arms = [report.total.arms[r.variant], tier.arms[r.variant]]
            for arm in arms:
                arm.recipients += 1
                if hit:
                    arm.converted += 1
                    arm.revenue += hit[1]
    for report in reports.values():
        order = [t for t in flow.tiers if t in report.by_tier]
        report.by_tier = {t: report.by_tier[t]
                          for t in [*order, *sorted(set(report.by_tier) - set(order))]}
    return list(reports.values())


def _result(name: str, spec: ExperimentSpec) -> Result:
    control = spec.control_variant
    order = [control, *(v for v in spec.variants if v != control)]
    return Result(name, control, {v: Arm(v) for v in order}, spec.min_sample,
                  spec.significance)
