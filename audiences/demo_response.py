"""A simulated response to a demo campaign: the orders lapsed customers place after it,
more often when contacted (``herald demo-data --simulate-response``), so the demo's
conversion and uplift reports have something to measure. Demo data only."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, timedelta
from typing import Any

from sqlalchemy import create_engine, insert

from herald.audiences.demo_rows import DEFAULT_SEED
from herald.audiences.demo_shop import check_ours, order_table

# The chance that a lapsed customer orders again within the attribution window, per
# win-back tier: (held out, contacted). Better customers come back more often anyway, and
# the offer works best on them (30% off and a personal channel for champions, 10% off by
# e-mail for the long-gone hibernating ones), so the uplift grows with the tier.
RESPONSE: dict[str, tuple[float, float]] = {
    "champions": (0.10, 0.24),
    "loyal": (0.07, 0.15),
    "at_risk": (0.05, 0.09),
    "hibernating": (0.02, 0.03),
}
DEFAULT_RESPONSE = (0.03, 0.05)  # a tier the table does not know
# The win-back flow's content experiment: a deadline in the subject and first line works
# on the loyal tier only (24% instead of 15%); every other tier ignores it, so the report
# finds a winner for loyal and no significant difference (or too few people) elsewhere.
VARIANT_RESPONSE: dict[tuple[str, str], float] = {("loyal", "deadline"): 0.24}


def response_chance(tier: str, contacted: bool, variant: str | None = None) -> float:
    """The chance a customer of ``tier`` orders within the window in the simulation."""
    if contacted and variant and (tier, variant) in VARIANT_RESPONSE:
        return VARIANT_RESPONSE[tier, variant]
    return RESPONSE.get(tier, DEFAULT_RESPONSE)[int(contacted)]


SIMULATED_ORDER_IDS = 900_000_000  # + customer id: at most one simulated order each


@dataclass(frozen=True)
class Simulated:
    """What the simulation did for one tier and group."""

    tier: str
    contacted: bool
    recipients: int
    ordered: int
    chance: float
    variant: str | None = None


def simulate_response(url: str, contacts: Iterable[tuple[Any, ...]],
                      window: timedelta, seed: int = DEFAULT_SEED) -> list[Simulated]:
    """Add the orders that customers place after a campaign, more often when contacted.

    ``contacts`` are (customer id, tier, contacted?, when their window opened[, content
    variant]). Each customer orders at most once, with the chance in ``RESPONSE`` for
    their tier and group (``VARIANT_RESPONSE`` for a variant that works better),
    at a time inside their attribution window (sooner more likely than later), drawn from
    a generator seeded by ``seed`` and the customer: the same contacts give the same
    orders. Simulating again replaces the earlier simulated orders of those customers.
    These orders lie in the days after the campaign, so some are in the future.
    """
    engine = create_engine(url)
    tally: dict[tuple[str, bool, str], list[int]] = {}
    try:
        check_ours(engine, url)
        with engine.begin() as conn:
            stream = iter(contacts)
            while part := list(itertools.islice(stream, 500)):
                conn.execute(order_table.delete().where(order_table.c.order_id.in_(
                    [SIMULATED_ORDER_IDS + int(c[0]) for c in part])))
                orders = []
                for customer, tier, contacted, at, *rest in part:
                    variant = rest[0] if rest and contacted else None
                    chance = response_chance(tier, contacted, variant)
                    counts = tally.setdefault((tier, contacted, variant or ""), [0, 0])
                    counts[0] += 1
                    rng = random.Random(f"{seed}:{customer}")
                    if rng.random() >= chance:
                        continue
                    counts[1] += 1
                    placed = at + window * rng.random() ** 2  # sooner rather than later
                    orders.append({"order_id": SIMULATED_ORDER_IDS + int(customer),
                                   "customer_id": int(customer),
                                   "placed_at": placed.astimezone(UTC).replace(tzinfo=None),
                                   "amount": round(rng.lognormvariate(5.05, 0.45), 2),
                                   "status": "paid"})
                if orders:
                    conn.execute(insert(order_table), orders)
    finally:
        engine.dispose()
    return [Simulated(tier, contacted, n, hit, response_chance(tier, contacted, variant),
                      variant or None)
            for (tier, contacted, variant), (n, hit) in sorted(tally.items())]
