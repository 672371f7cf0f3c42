"""The webhook channel against a real HTTP server on loopback: signatures, and every kind
of answer a provider gives, as they land in the ledger and the suppression list."""

from __future__ import annotations

import asyncio
import json
import socket
from collections import Counter
from pathlib import Path

import pytest

from herald.channels.base import ChannelContext, Message, Outcome
from herald.channels.http import AiohttpTransport
from herald.channels.webhook import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookChannel,
    WebhookSettings,
    sign,
)
from herald.core.errors import RunError
from herald.flows import engine

from .helpers import PROMO_YAML, ledger_rows, suppression_rows
from .http_peer import Peer

SECRET = "whsec-test-3f9a"


def hook_workspace(make_workspace, peer: Peer, monkeypatch, **extra: str):
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    options = "".join(f", {k}: {v}" for k, v in extra.items())
    return make_workspace({
        "config/herald.yaml": (
            "timezone: UTC\nsources:\n  crm: \"sqlite:///crm.db\"\nchannels:\n"
            f"  hook: {{type: webhook, url: \"{peer.url}/v1/messages\", "
            f"secret: \"${{HOOK_SECRET}}\", address: email, timeout: 1{options}}}\n"
            "chunk_size: 40\n"),
        "config/flows/promo.yaml": PROMO_YAML.replace(
            "gold: {channels: [email, sms]}", "gold: {channels: [hook]}").replace(
            "default: {channels: [sms, email]}", "default: {channels: [hook]}"),
        "templates/promo/default.webhook.txt.j2": "Hello {{ name }}, score {{ score }}",
    }, rows=12)


def ledger(ws) -> dict[str, tuple]:
    return ledger_rows(ws, "status", "code", "attempts", "provider_id", "reason")


def suppressed(ws) -> set[str]:
    return {r[0] for r in suppression_rows(ws)}


def test_answers_are_classified_retried_and_recorded(make_workspace, peer, monkeypatch
                                                     ) -> None:
    ws = hook_workspace(make_workspace, peer, monkeypatch)
    peer.script("1", ("status", 500))
    peer.script("2", ("status", 429, {"Retry-After": "1"}))
    peer.script("3", ("timeout", 1.5))
    peer.script("4", ("reset",))
    peer.script("5", ("status", 410))
    peer.script("6", ("status", 400))
    peer.script("8", ("status", 503), ("status", 502), ("status", 504))
    summary = engine.run_local(ws, "promo", run_key="hooks")
    rows = ledger(ws)

    assert rows["1"][:3] == ("sent", None, 2)
    assert rows["2"][:3] == ("sent", None, 2)
    assert rows["3"][:3] == ("sent", None, 2)
    assert rows["4"][:3] == ("sent", None, 2)
    assert rows["5"][:3] == ("failed", "410", 1) and "gone" in rows["5"][4]
    assert rows["6"][:3] == ("failed", "400", 1)
    assert rows["8"][:3] == ("deferred", "504", 3)  # a later run of the run key tries again
    assert "after 3 attempts: HTTP 504" in rows["8"][4]
    for plain in ("9", "10", "11", "12"):  # no fault scripted: sent, with the peer's id
        assert rows[plain][0] == "sent" and rows[plain][3].startswith("p-")
    assert rows["7"][0] == "no_address"  # every 7th person has no email
    assert summary["deliveries"]["sent"] == 8 and summary["deliveries"]["failed"] == 2
    assert summary["deliveries"]["deferred"] == 1
    assert suppressed(ws) == {"user5@example.com"}  # 410 Gone only; 400 is not

    # every request is signed, and a retry carries the same idempotency key
    keys: Counter[str] = Counter()
    for request in peer.requests:
        ts = request.headers[TIMESTAMP_HEADER.lower()]
        signature = request.headers[SIGNATURE_HEADER.lower()]
        assert signature == sign(SECRET, ts, request.body)
        keys[request.headers["idempotency-key"]] += 1
        assert request.path == "/v1/messages"
    by_recipient = Counter(r.json()["recipient"] for r in peer.requests)
    assert by_recipient["1"] == by_recipient["3"] == by_recipient["4"] == 2
    assert len(keys) == 11 and max(keys.values()) == 3  # recipient 8: three tries
    # The late answer to recipient 3 reached the server as well as the retry: the
    # receiver drops the second by its Idempotency-Key, nobody is *delivered* twice.
    delivered = peer.delivered()
    assert all(n == 1 for r, n in delivered.items() if r != "3")
    assert SECRET not in repr(rows)

    again = engine.run_local(ws, "promo", run_key="hooks")
    assert again["deliveries"]["duplicate"] == 11 and again["deliveries"]["sent"] == 0
    assert again["deliveries"]["deferred"] == 1  # still waiting for its time


def test_refused_credentials_stop_the_channel(make_workspace, peer, monkeypatch) -> None:
    ws = hook_workspace(make_workspace, peer, monkeypatch, concurrency="1")
    peer.script("1", ("status", 401))
    for i in range(2, 13):
        peer.script(str(i), ("status", 401))
    with pytest.raises(RunError, match=r"channel hook stopped \(.*\): 11 message\(s\) not sent"):
        engine.run_local(ws, "promo", run_key="denied")
    rows = ledger(ws)
    assert all(r[0] == "queued" for k, r in rows.items() if k != "7")
    stopped = [r for r in rows.values() if "channel stopped" in (r[4] or "")]
    refused = [r for r in rows.values() if r[1] == "401" and r not in stopped]
    assert len(refused) == 1 and len(stopped) == 10
    assert len(peer.requests) == 1  # the channel stopped; the rest were never sent
    assert "refused the channel's credentials" in refused[0][4]
    assert suppressed(ws) == set()


def test_a_recipients_own_endpoint_refusing_fails_that_recipient_only(
        make_workspace, peer, monkeypatch) -> None:
    """Without ``url`` each recipient's address is their own endpoint: one answering 401
    or 403 refused that recipient, not the channel's credentials, yet it stopped the
    channel for everyone after it, and again at every rerun."""
    import sqlite3

    ws = make_workspace({
        "config/herald.yaml": (
            "timezone: UTC\nsources:\n  crm: \"sqlite:///crm.db\"\nchannels:\n"
            "  hook: {type: webhook, address: email, timeout: 1, concurrency: 1, "
            "allow_private_addresses: true}\n"),
        "config/flows/promo.yaml": PROMO_YAML.replace(
            "gold: {channels: [email, sms]}", "gold: {channels: [hook]}").replace(
            "default: {channels: [sms, email]}", "default: {channels: [hook]}"),
        "templates/promo/default.webhook.txt.j2": "Hello {{ name }}",
    }, rows=12)
    with sqlite3.connect(ws.root / "crm.db") as conn:
        conn.execute("UPDATE people SET email = ? || '/r/' || id WHERE email IS NOT NULL",
                     (peer.url,))
    peer.script("2", ("status", 401))
    peer.script("3", ("status", 403))
    summary = engine.run_local(ws, "promo", run_key="own")
    rows = ledger(ws)
    assert rows["2"][:2] == ("failed", "401") and "recipient's endpoint" in rows["2"][4]
    assert rows["3"][:2] == ("failed", "403")
    assert summary["deliveries"]["sent"] == 9 and summary["deliveries"]["failed"] == 2
    assert {r.json()["recipient"] for r in peer.requests} == {
        str(i) for i in range(1, 13) if i != 7}  # 7 has no address
    assert suppressed(ws) == set()


def test_a_409_to_a_retried_request_leaves_its_outcome_unknown(make_workspace, peer,
                                                              monkeypatch) -> None:
    """The first request timed out after the receiver had it; the retry, with the same
    Idempotency-Key, is answered 409 (the Idempotency-Key draft's answer while the first
    is still being processed). It was recorded failed, for a message that went out."""
    ws = hook_workspace(make_workspace, peer, monkeypatch)
    peer.script("3", ("timeout", 1.5), ("status", 409))
    engine.run_local(ws, "promo", run_key="conflict")
    rows = ledger(ws)
    assert rows["3"][0] == "sending" and "still processing" in rows["3"][4], rows["3"]
    assert len([r for r in peer.requests if r.json()["recipient"] == "3"]) == 2


def test_transport_failures_over_the_real_connection_pool(tmp_path: Path) -> None:
    """Nothing listening, a URL that is not http(s), a URL that does not parse: each that
    message's own result, as httpx's errors would have made them."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]  # nothing listens there once the socket is closed
    settings = WebhookSettings(type="webhook", allow_private_addresses=True, timeout=5)
    addresses = [f"http://127.0.0.1:{closed}/hook", "ftp://127.0.0.1/hook", "http://[::1/x"]
    messages = [Message(recipient=str(i), address=a, kind="webhook", body="hello",
                        message_id=f"<{i}@test>") for i, a in enumerate(addresses)]

    async def send() -> list:
        async with WebhookChannel("hook", settings, ChannelContext(tmp_path, "promo", "k",
                                                                   "run")) as channel:
            return await channel.send_batch(messages)

    refused, ftp, garbled = asyncio.run(send())
    assert (refused.outcome, refused.code) == (Outcome.RETRYABLE, "connection")
    assert (ftp.outcome, ftp.code) == (Outcome.PERMANENT, "bad_url")
    assert (garbled.outcome, garbled.code) == (Outcome.PERMANENT, "bad_url")


def test_answers_are_read_whole_plain_or_compressed(tmp_path: Path, peer: Peer) -> None:
    """Over the real connection pool an answer comes back read: a plain body handed over
    as it came, a gzip-compressed one decoded, each as httpx would give it."""
    for _ in range(2):  # once for the transport alone, once through the channel
        peer.script("plain", ("ok", {"id": "prov-plain", "note": "café"}))
        peer.script("packed", ("gzip", {"id": "prov-packed", "note": "café"}))
    settings = WebhookSettings(type="webhook", url=f"{peer.url}/v1/messages", timeout=5)
    messages = [Message(recipient=r, address=f"{r}@example.com", kind="webhook",
                        body="hello", message_id=f"<{r}@test>") for r in ("plain", "packed")]

    async def exchange() -> tuple[list, list]:
        transport = AiohttpTransport(5)
        try:
            answers = [await transport.send("POST", f"{peer.url}/v1/messages",
                                            {"Content-Type": "application/json"},
                                            json.dumps({"recipient": r}).encode())
                       for r in ("plain", "packed")]
        finally:
            await transport.aclose()
        async with WebhookChannel("hook", settings, ChannelContext(tmp_path, "promo", "k",
                                                                   "run")) as channel:
            return answers, await channel.send_batch(messages)

    answers, results = asyncio.run(exchange())
    for answer, provider_id in zip(answers, ("prov-plain", "prov-packed"), strict=True):
        assert answer.status_code == 200 and answer.reason_phrase == "OK"
        assert answer.json() == {"id": provider_id, "note": "café"}
        assert answer.text == json.dumps({"id": provider_id, "note": "café"})
        assert answer.is_closed and answer.is_stream_consumed
    assert answers[1].headers["Content-Encoding"] == "gzip"
    assert answers[0].content == json.dumps({"id": "prov-plain", "note": "café"}).encode()
    assert [(r.outcome, r.provider_id) for r in results] == [
        (Outcome.SENT, "prov-plain"), (Outcome.SENT, "prov-packed")]
