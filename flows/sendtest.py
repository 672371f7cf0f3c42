"""``herald send-test``: one real message, rendered for a sample recipient of a tier, sent
through a configured channel to the operator's own address.

It is marked as a test everywhere it shows: the subject (or text) starts with ``[test]``,
e-mail carries ``X-Herald-Test: 1``, and the send is recorded in its own table
(``herald_test_sends``), never in the ledger, so no cap, report or rerun counts it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from typing import Any

from sqlalchemy import insert

from herald.channels.base import Message, Outcome
from herald.core import clock
from herald.core.db import test_sends, writing
from herald.core.errors import HeraldError, quoted
from herald.core.spec import Param
from herald.core.workspace import Workspace
from herald.delivery.addresses import Addresses
from herald.delivery.dispatch import Job, open_channel
from herald.delivery.policy import SEND, Decision
from herald.delivery.render import templates_for
from herald.flows.chunks import build_message
from herald.flows.preview import sample_recipients
from herald.flows.validate import check_flow, did_you_mean

TEST_RUN_KEY = "send-test"


def send_test(ws: Workspace, flow_name: str, tier: str, to: str, channel: str | None = None,
              params: Mapping[str, Param] | None = None) -> dict[str, Any]:
    """Render the message of a sample recipient of ``tier`` and send it to ``to``."""
    templates = templates_for(ws)
    checked = check_flow(ws, flow_name, params, templates)  # secrets included: it sends
    flow = checked.spec
    entry = flow.tier_for(tier)
    if entry is None:
        raise HeraldError(f"--tier: flow '{flow.name}' has no tier '{tier}'"
                          + did_you_mean(tier, flow.tiers) + f" (tiers: {', '.join(flow.tiers)})")
    choices = [channel] if channel else list(entry[1].channels)
    if channel and channel not in entry[1].channels:
        raise HeraldError(f"--channel: tier '{entry[0]}' of {flow.name} does not use channel "
                          f"'{channel}'{did_you_mean(channel, entry[1].channels)} (it uses: "
                          f"{', '.join(entry[1].channels)})")
    address, chosen, why = None, None, []
    for name in choices:
        address, problem = Addresses(ws).clean(name, to)
        if address:
            chosen = name
            break
        why.append(f"{name}: {problem}")
    if not address or not chosen:
        raise HeraldError(f"--to: {quoted(to, 200)} is not an address for "
                          + "; ".join(why or ["any channel of the tier"]))
    sample = sample_recipients(ws, checked, tier if tier != "default" else None, 1)
    if not sample:
        raise HeraldError(f"no recipient of tier '{tier}' to render the message for")
    recipient = sample[0]
    job = Job(flow.name, TEST_RUN_KEY, f"send-test-{clock.now():%Y%m%d%H%M%S}")
    message = build_message(ws, templates, job, Decision(recipient, entry[0], SEND, chosen,
                                                         address))
    message = _marked(message)
    result = asyncio.run(_send(ws, chosen, job, message))
    status = "sent" if result.outcome is Outcome.SENT else "failed"
    record = {"flow": flow.name, "tier": entry[0], "sample": recipient.key,
              "channel": chosen, "address": address, "status": status, "code": result.code,
              "reason": None if status == "sent" else f"{result.outcome.value}: "
                                                      f"{result.detail or 'no detail'}",
              "provider_id": result.provider_id, "created_at": clock.now()}
    with writing(ws.store) as conn:
        conn.execute(insert(test_sends).values(**record))
    return {**record, "created_at": record["created_at"].isoformat(),
            "subject": message.subject, "body": message.body}


def _marked(message: Message) -> Message:
    if message.subject is not None:
        return dataclasses.replace(message, subject=f"[test] {message.subject}",
                                   headers={**message.headers, "X-Herald-Test": "1"})
    if message.kind in ("sms", "webhook"):
        return dataclasses.replace(message, body=f"[test] {message.body}")
    return message  # WeChat's body is the template's JSON data


async def _send(ws: Workspace, channel: str, job: Job, message: Message) -> Any:
    async with open_channel(ws, channel, job) as sender:
        return (await sender.send_batch([message]))[0]
