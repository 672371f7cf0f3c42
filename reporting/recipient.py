"""One recipient across flows (``herald recipient KEY``): ledger history, the frequency
caps that count them now, suppression and holdout status. A read: it writes nothing."""

from __future__ import annotations

from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select

from herald.core import clock
from herald.core.db import deliveries
from herald.core.spec import CapRule
from herald.core.workspace import Workspace
from herald.delivery import ledger_reads, suppression
from herald.delivery.policy import in_holdout
from herald.reporting.conversions import utc


def recipient_view(ws: Workspace, key: str, limit: int = 50) -> dict[str, Any]:
    """Everything Herald knows about ``key`` that decides whether they get a message."""
    now = clock.now()
    zone = ZoneInfo(ws.config.timezone)
    with ws.store.connect() as conn:
        rows = list(conn.execute(select(
            deliveries.c.flow, deliveries.c.run_key, deliveries.c.tier, deliveries.c.channel,
            deliveries.c.address, deliveries.c.status, deliveries.c.reason,
            deliveries.c.code, deliveries.c.created_at, deliveries.c.sent_at,
            deliveries.c.counted).where(deliveries.c.recipient == key).order_by(
            deliveries.c.created_at.desc()).limit(limit)))
        addresses = sorted({r.address for r in rows if r.address})
        listed = suppression.suppressed(conn, [key, *addresses])
        rules: list[tuple[str | None, CapRule]] = [(None, r) for r in ws.config.caps]
        for name in ws.flow_names():
            rules += [(name, r) for r in ws.flow(name).cap_rules()]
        caps = []
        for flow, rule in rules:
            since = rule.since(now, zone)
            used = ledger_reads.cap_counts(conn, [key], since, rule.channel, rule.flow)[key]
            caps.append({"rule": rule.describe(), "defined_in": flow and
                         f"config/flows/{flow}.yaml" or "config/herald.yaml",
                         "used": used, "max": rule.max, "since": since.isoformat(),
                         "reached": used >= rule.max,
                         **({"tier": rule.tier} if rule.tier else {})})
    holdout = {name: in_holdout(name, key, ws.flow(name).holdout)
               for name in ws.flow_names() if ws.flow(name).holdout > 0}
    return {
        "recipient": key,
        "now": now.isoformat(),
        "history": [{"flow": r.flow, "run_key": r.run_key, "tier": r.tier,
                     "channel": r.channel, "address": r.address, "status": r.status,
                     "reason": r.reason, "code": r.code,
                     "at": (utc(r.created_at) or now).isoformat(),
                     "sent_at": s.isoformat() if (s := utc(r.sent_at)) else None,
                     "counted": bool(r.counted)} for r in rows],
        "caps": caps,
        "suppressed": [{"value": value, "channels": sorted(channels)}
                       for value, channels in sorted(listed.items())],
        "held_out": holdout,
    }

