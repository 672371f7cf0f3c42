"""One recipient across flows (``herald recipient KEY``): ledger history, the frequency
caps that count them now, suppression and holdout status. A read: it writes nothing."""

from __future__ import annotations

from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, select

from herald.audiences import store
from herald.core import clock
from herald.core.db import deliveries, package_rows
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
        addresses = sorted({r.address for r in rows if r.address}
                           | _package_addresses(ws, conn, key))
        listed = suppression.suppressed(conn, [key, *addresses], ws.config.phone_region)
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


def _package_addresses(ws: Workspace, conn: Connection, key: str) -> set[str]:
    """The recipient's addresses in each flow's latest ready package: the ledger holds an
    address only for the channels a run picked (none for a recipient never sent to, or
    held back by quiet hours), and the suppression list may name another of them."""
    found: set[str] = set()
    for name in ws.flow_names():
        latest = store.list_packages(ws, name, limit=1)
        if not latest:
            continue
        data = conn.execute(select(package_rows.c.data).where(
            package_rows.c.package_id == latest[0].id, package_rows.c.key == key)).scalar()
        if data is None:
            continue
        row = store.decode_row(data)
        for channel in ws.flow(name).channel_names():
            value = row.get(ws.address_column(channel))
            if value not in (None, ""):
                found.add(str(value))
    return found
