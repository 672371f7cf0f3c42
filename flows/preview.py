"""``herald preview``: render a flow's messages for a few recipients, send nothing.

Preview reads sample rows straight from the segment (no package is stored), picks each
recipient's channel by the tier's order, the addresses present and the suppression list
(a recipient or address listed for a channel, or for all, is passed over there as a run
would), and renders. It does not consult caps or quiet hours: ``herald run --dry-run``
decides with everything.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from herald.audiences.sql import statement
from herald.audiences.store import Recipient, jsonable
from herald.core.errors import AudienceError
from herald.core.spec import DEFAULT_TIER, Param
from herald.core.workspace import Workspace
from herald.delivery import suppression, variants
from herald.delivery.addresses import Addresses
from herald.delivery.dispatch import Job
from herald.delivery.policy import SEND, Decision
from herald.delivery.render import RenderError, templates_for
from herald.flows.chunks import build_message
from herald.flows.engine import default_run_key
from herald.flows.validate import CheckedFlow, check_flow, did_you_mean


def render_samples(ws: Workspace, flow_name: str, params: Mapping[str, Param],
                   tier: str | None, limit: int) -> list[dict[str, Any]]:
    templates = templates_for(ws)
    checked = check_flow(ws, flow_name, params, templates, secrets=False)
    flow = checked.spec
    recipients = sample_recipients(ws, checked, tier, limit)
    job = Job(flow.name, default_run_key(ws, flow_name), "preview")
    samples = []
    addresses = Addresses(ws)
    # each sample's tier entry, and its channels in the tier's order with its address
    # for each (or None)
    entries = [flow.tier_for(r.tier) for r in recipients]
    options = [[(c, addresses.of(c, r.data)[0]) for c in entry[1].channels] if entry else []
               for r, entry in zip(recipients, entries, strict=True)]
    messages = [(r.key, channel, address)
                for r, found in zip(recipients, options, strict=True)
                for channel, address in found if address]
    with ws.store.connect() as conn:  # passed over where the suppression list stops them
        stopped = suppression.stopping(conn, messages, addresses.region)
    for recipient, entry, found in zip(recipients, entries, options, strict=True):
        row_tier = recipient.tier
        sample: dict[str, Any] = {"recipient": recipient.key, "tier": row_tier,
                                  "channel": None, "status": "no_address"}
        if entry is None:
            sample.update(status="no_tier", error=f"tier '{row_tier}' has no entry in tiers")
            samples.append(sample)
            continue
        passed_over = []
        for channel, address in found:
            if address and (recipient.key, channel) in stopped:
                passed_over.append(channel)
                continue
            if address:
                experiment = flow.experiment_for(entry[0])
                variant = (variants.assign(flow.name, experiment[0], recipient.key,
                                           experiment[1].weights) if experiment else None)
                decision = Decision(recipient, entry[0], SEND, channel, address,
                                    variant=variant)
                sample.update(channel=channel, address=address, status="would_send",
                              **({"variant": variant} if variant else {}))
                try:
                    message = build_message(ws, templates, job, decision)
                except RenderError as exc:
                    sample.update(status="render_error", error=str(exc))
                    break
                sample.update(subject=message.subject, body=message.body, html=message.html)
                break
        else:
            if passed_over:
                sample.update(status="suppressed", error="on the suppression list for "
                              + ", ".join(passed_over) + ", the channels it has an "
                              "address for")
            else:
                sample["error"] = "no address for any of " + ", ".join(entry[1].channels)
        samples.append(sample)
    return samples


def write_samples(ws: Workspace, flow: str, samples: list[dict[str, Any]], folder: Path
                  ) -> list[Path]:
    """Write rendered samples to open: ``N-KEY.json`` for each, plus ``N-KEY.eml`` (what
    the e-mail channel would send) and ``N-KEY.html`` for e-mail with an HTML part."""
    from herald.channels.base import Message
    from herald.channels.mime import build_email
    from herald.channels.outbox import safe_name
    from herald.delivery.ledger import message_id

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, sample in enumerate(samples, start=1):
        stem = folder / f"{i:02d}-{safe_name(sample['recipient'])}"
        path = stem.with_suffix(".json")
        path.write_text(json.dumps(sample, ensure_ascii=False, indent=2, default=str),
                        encoding="utf-8")
        written.append(path)
        if sample.get("status") != "would_send" or not sample.get("channel"):
            continue
        if ws.channel_kind(sample["channel"]) != "email":
            continue
        key = default_run_key(ws, flow)
        message = Message(recipient=sample["recipient"], address=sample["address"],
                          kind="email", body=sample["body"], subject=sample.get("subject"),
                          html=sample.get("html"),
                          message_id=message_id(flow, key, sample["recipient"]))
        sender = getattr(ws.channels[sample["channel"]], "sender", None) or \
            "Herald preview <preview@herald.invalid>"
        eml = stem.with_suffix(".eml")
        eml.write_bytes(build_email(message, sender).as_bytes())
        written.append(eml)
        if sample.get("html"):
            html = stem.with_suffix(".html")
            html.write_text(sample["html"], encoding="utf-8")
            written.append(html)
    return written


def sample_recipients(ws: Workspace, checked: CheckedFlow, tier: str | None, limit: int
                      ) -> list[Recipient]:
    """Up to ``limit`` recipients straight from the segment (of ``tier`` if given); no
    package is stored. An unknown tier is an error with a did-you-mean."""
    flow = checked.spec
    engine = ws.source(flow.audience.source)
    bind: dict[str, Any] = dict(checked.segment.params)
    where, column = "", ""
    if tier:
        if not flow.audience.tier:
            raise AudienceError(f"--tier: flow '{flow.name}' has no audience.tier column")
        column = engine.dialect.identifier_preparer.quote(flow.audience.tier)
        where = f" WHERE herald_sample.{column} = :herald_tier"
    if tier == DEFAULT_TIER:
        # whoever the default entry serves: no tier, or one without an entry of its own,
        # decided on the value as text as a run does (so here, whatever the column's type)
        tier_column = flow.audience.tier or ""
        sql = f"SELECT * FROM (\n{checked.segment.sql}\n) AS herald_sample"
        with engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=1000).execute(
                statement(sql, bind), bind).mappings()
            rows = list(itertools.islice(
                (dict(r) for r in result if _by_default(flow, r[tier_column])), limit))
            result.close()
    else:
        bind.update({"herald_limit": limit, **({"herald_tier": tier} if tier else {})})
        sql = (f"SELECT * FROM (\n{checked.segment.sql}\n) AS herald_sample{where} "
               "LIMIT :herald_limit")
        with engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(statement(sql, bind), bind).mappings()]
    if tier and not rows:
        with engine.connect() as conn:
            tiers = [str(t) for t in conn.execute(statement(
                f"SELECT DISTINCT herald_sample.{column} FROM (\n{checked.segment.sql}\n) "
                "AS herald_sample", checked.segment.params), checked.segment.params).scalars()
                     if t is not None]
        known = sorted({*tiers, *(t for t in flow.tiers if t != "default")})
        raise AudienceError(f"--tier: no recipients in tier '{tier}'"
                            + (did_you_mean(tier, known) or "")
                            + f" (tiers: {', '.join(known) or 'none'})")
    out = []
    for i, row in enumerate(rows):
        data = {k: jsonable(v) for k, v in row.items()}
        row_tier = str(data.get(flow.audience.tier) or DEFAULT_TIER) if flow.audience.tier \
            else DEFAULT_TIER
        out.append(Recipient(i, str(data[flow.audience.key]), row_tier, data))
    return out


def _by_default(flow: Any, value: Any) -> bool:
    """Whether a recipient with this tier value gets the flow's ``default`` entry."""
    entry = flow.tier_for(str(value or DEFAULT_TIER))
    return entry is not None and entry[0] == DEFAULT_TIER
