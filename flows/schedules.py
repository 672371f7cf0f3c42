"""Schedule entries of the YAML (flows' and journeys') as Prefect's schedules."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from herald.core.schedules import ScheduleSpec

if TYPE_CHECKING:
    from prefect.schedules import Schedule


def prefect_schedule(spec: ScheduleSpec, zone: str, slug: str,
                     parameters: dict[str, Any] | None = None) -> Schedule:
    """A schedule entry (flows' and journeys') as Prefect's Cron, RRule or Interval."""
    from prefect.schedules import Cron, Interval, RRule

    common: dict[str, Any] = {"timezone": zone, "active": spec.active, "slug": slug}
    if parameters:
        common["parameters"] = parameters
    if spec.cron is not None:
        return Cron(spec.cron, **common)
    if spec.rrule is not None:
        return RRule(spec.rrule, **common)
    assert spec.interval is not None
    # Without an anchor, "every 6h" counts from local midnight of a fixed day (00, 06,
    # 12, 18), not from whenever the deployment was last served.
    anchor = spec.anchor or datetime(2020, 1, 1)
    if anchor.tzinfo is None:
        anchor = anchor.replace(tzinfo=ZoneInfo(zone))
    return Interval(spec.interval, anchor_date=anchor, **common)
