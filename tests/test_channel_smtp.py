"""The SMTP channel against a real SMTP server on loopback (aiosmtpd)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, timedelta
from email import message_from_bytes
from email.policy import default as default_policy
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from herald.channels.base import ChannelContext, Message, Outcome
from herald.channels.smtp import SmtpChannel, SmtpSettings

from .helpers import free_port


class Handler:
    """Records what it accepts; refuses or drops on cue."""

    def __init__(self) -> None:
        self.received: list[Any] = []
        self.sessions: set[int] = set()
        self.refuse: dict[str, str] = {}
        self.drop_at_rcpt: set[str] = set()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.drop_at_rcpt:
            self.drop_at_rcpt.discard(address)  # only the first time
            server.transport.close()
            return "421 closing"
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.sessions.add(id(session))
        self.received.append(message_from_bytes(envelope.content, policy=default_policy))
        return f"250 2.0.0 Ok: queued as Q{len(self.received):04d}"


@pytest.fixture
def smtp_server() -> Iterator[tuple[Handler, int]]:
    handler = Handler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    yield handler, port
    controller.stop()


def channel(port: int, tmp_path, **extra: Any) -> SmtpChannel:
    settings = SmtpSettings(type="smtp", host="127.0.0.1", port=port, security="none",
                            sender="Lumen Shop <news@shop.example>", timeout=5, **extra)
    return SmtpChannel("email", settings, ChannelContext(tmp_path, "f", "k", "r"))


def message(i: int, address: str | None = None, **extra: Any) -> Message:
    fields: dict[str, Any] = {"body": f"Hello {i}", "subject": f"Hi {i}",
                              "message_id": f"<m{i}.f@herald>", **extra}
    return Message(recipient=str(i), address=address or f"user{i}@example.com", kind="email",
                   **fields)


def send(ch: SmtpChannel, messages: list[Message]):
    async def go():
        async with ch:
            return await ch.send_batch(messages)
    return asyncio.run(go())


def test_many_messages_over_one_connection(smtp_server, tmp_path) -> None:
    handler, port = smtp_server
    results = send(channel(port, tmp_path), [message(i) for i in range(12)])
    assert [r.outcome for r in results] == [Outcome.SENT] * 12
    assert [r.provider_id for r in results[:2]] == ["Q0001", "Q0002"]
    assert len(handler.received) == 12
    assert len(handler.sessions) == 1


def test_multipart_chinese_subject_and_headers(smtp_server, tmp_path) -> None:
    handler, port = smtp_server
    ch = channel(port, tmp_path, list_unsubscribe="https://shop.example/u?m={message_id}",
                 reply_to="care@shop.example")
    m = message(1, subject="刘静，好久不见！", html="<p>您好 <b>刘静</b></p>")
    assert send(ch, [m])[0].outcome is Outcome.SENT
    got = handler.received[0]
    assert got["Subject"] == "刘静，好久不见！"
    assert got["Message-ID"] == "<m1.f@herald>"
    assert got["Reply-To"] == "care@shop.example"
    assert got["List-Unsubscribe"] == "<https://shop.example/u?m=m1.f%40herald>"
    assert got["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert got.get_content_type() == "multipart/alternative"
    assert got.get_body(("plain",)).get_content().strip() == "Hello 1"
    assert got.get_body(("html",)).get_content().strip() == "<p>您好 <b>刘静</b></p>"


def test_refusals_are_classified_per_recipient(smtp_server, tmp_path) -> None:
    handler, port = smtp_server
    handler.refuse = {"user1@example.com": "550 5.1.1 no such user",
                      "user2@example.com": "450 4.2.1 mailbox busy",
                      "user3@example.com": "554 5.7.1 rejected",
                      # a policy answer about the sender (its host on a blocklist): the
                      # recipient's address is fine, so it is not suppressed
                      "user4@example.com": "550 5.7.1 Client host [127.0.0.1] blocked "
                                           "using zen.spamhaus.org",
                      "user5@example.com": "550 5.2.1 mailbox disabled",
                      "user6@example.com": "550 Requested action not taken: mailbox "
                                           "unavailable",
                      # about the sender's own address or domain (its DNS, its SPF), as
                      # Postfix answers RCPT: every recipient there gets it, none is dead
                      "user8@example.com": "553 5.1.8 <news@shop.example>: Sender address "
                                           "rejected: Domain not found",
                      "user9@example.com": "550 5.1.7 Bad sender's mailbox address syntax",
                      "user10@example.com": "552 5.2.2 mailbox full",
                      "user11@example.com": "550 5.1.10 Recipient address has null MX"}
    results = send(channel(port, tmp_path), [message(i) for i in range(12)])
    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.PERMANENT,
                                            Outcome.RETRYABLE, Outcome.PERMANENT,
                                            Outcome.PERMANENT, Outcome.PERMANENT,
                                            Outcome.PERMANENT, Outcome.SENT,
                                            *[Outcome.PERMANENT] * 4]
    assert [r.suppress for r in results[8:]] == [False, False, False, True]
    assert (results[1].code, results[1].suppress) == ("550", True)
    assert results[1].detail == "550 5.1.1 no such user"
    assert (results[3].code, results[3].suppress) == ("554", False)
    assert (results[4].code, results[4].suppress) == ("550", False)
    assert [r.suppress for r in results[5:7]] == [True, True]
    assert len(handler.received) == 2


def test_a_message_over_the_servers_size_fails_alone(tmp_path) -> None:
    """A server with SIZE answers MAIL FROM for a message over its limit with 552 (RFC
    1870), as aiosmtpd does by itself: that message failed as if the sender were
    refused, stopping the channel for every message after it."""
    handler = Handler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, data_size_limit=2000)
    controller.start()
    try:
        results = send(channel(port, tmp_path), [message(1), message(2, body="x" * 5000),
                                                 message(3)])
    finally:
        controller.stop()
    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.PERMANENT, Outcome.SENT]
    assert results[1].code == "552" and "too large" in (results[1].detail or "")
    assert not results[1].suppress
    assert [m["To"] for m in handler.received] == ["user1@example.com", "user3@example.com"]


def test_dropped_connection_reconnects_for_the_rest(smtp_server, tmp_path) -> None:
    handler, port = smtp_server
    handler.drop_at_rcpt = {"user2@example.com"}
    results = send(channel(port, tmp_path), [message(i) for i in range(5)])
    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.SENT, Outcome.RETRYABLE,
                                            Outcome.SENT, Outcome.SENT]
    assert [m["To"] for m in handler.received] == [
        "user0@example.com", "user1@example.com", "user3@example.com", "user4@example.com"]
    assert len(handler.sessions) == 2  # one reconnect, then the connection was reused


def test_nothing_listening_is_fatal(tmp_path) -> None:
    results = send(channel(free_port(), tmp_path), [message(1), message(2)])
    assert [r.outcome for r in results] == [Outcome.FATAL, Outcome.FATAL]
    assert results[0].detail.startswith("cannot connect to 127.0.0.1:")


# plain-text AUTH is fine on loopback; aiosmtpd rightly warns about it anywhere else
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
def test_bad_credentials_are_fatal_and_never_echo_the_password(tmp_path) -> None:
    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = isinstance(auth_data, LoginPassword) and auth_data.password == b"right"
        return AuthResult(success=ok, handled=False)  # let the server answer 535

    port = free_port()
    controller = Controller(Handler(), hostname="127.0.0.1", port=port,
                            authenticator=authenticator, auth_required=True,
                            auth_require_tls=False)
    controller.start()
    try:
        bad = channel(port, tmp_path, username="shop", password="s3cr3t-wrong")
        results = send(bad, [message(1), message(2)])
        assert [r.outcome for r in results] == [Outcome.FATAL, Outcome.FATAL]
        assert "authentication failed" in results[0].detail
        assert "s3cr3t-wrong" not in repr(results) + repr(bad.settings)
        good = channel(port, tmp_path, username="shop", password="right")
        assert send(good, [message(3)])[0].outcome is Outcome.SENT
    finally:
        controller.stop()


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="must be one address"):
        SmtpSettings(type="smtp", host="h", sender="not an address")


def smtp_workspace(port: int, extra: str = "") -> dict[str, str | None]:
    """A workspace whose promo flow sends e-mail to the SMTP server on ``port``."""
    config = f"""\
timezone: UTC
sources: {{crm: "sqlite:///crm.db"}}
channels:
  email: {{type: smtp, host: 127.0.0.1, port: {port}, security: none, timeout: 5,
           sender: "Shop <news@shop.example>"}}
  sms: {{type: outbox, kind: sms}}
""" + extra
    flow = """\
name: promo
audience: {source: crm, segment: people, params: {min_score: 0}, key: id, tier: tier}
tiers:
  default: {channels: [email]}
"""
    return {"config/herald.yaml": config, "config/flows/promo.yaml": flow}


def test_a_run_through_smtp_records_bounces_and_retries(make_workspace, smtp_server
                                                       ) -> None:
    from sqlalchemy import select

    from herald.delivery import ledger, suppression
    from herald.flows.engine import run_local

    handler, port = smtp_server
    handler.refuse = {"user1@example.com": "550 5.1.1 no such user",
                      "user2@example.com": "450 4.2.1 try later"}
    handler.drop_at_rcpt = {"user3@example.com"}  # dropped once, then delivered
    ws = make_workspace(smtp_workspace(port, "chunk_size: 10\n"), rows=20)
    summary = run_local(ws, "promo", run_key="smtp")
    with ws.store.connect() as conn:
        got = {r.recipient: r for r in conn.execute(select(ledger.deliveries))}
    assert got["1"].status == "failed" and got["1"].code == "550"
    assert got["1"].reason == "permanent: 550 5.1.1 no such user"
    # 450: greylisting or "try later": deferred to a later run, not failed, not hammered
    assert (got["2"].status, got["2"].attempts, got["2"].code) == ("deferred", 1, "450")
    assert got["2"].reason.endswith("after 1 attempts: 450 4.2.1 try later")
    wait = got["2"].not_before.replace(tzinfo=UTC) - got["2"].updated_at.replace(tzinfo=UTC)
    assert abs(wait.total_seconds() - 300) < 5
    assert (got["3"].status, got["3"].attempts) == ("sent", 2)
    assert got["4"].provider_id.startswith("Q")
    # ids 7 and 14 have no email: no_address; everyone else sent exactly once
    assert summary["deliveries"]["sent"] == 16 and summary["deliveries"]["failed"] == 1
    assert summary["deliveries"]["deferred"] == 1 and summary["deferred_until"]
    delivered = [m["To"] for m in handler.received]
    assert len(delivered) == len(set(delivered)) == 16
    listed = {(r.value, r.channel) for r in suppression.list_suppressions(ws.store)}
    assert listed == {("user1@example.com", "email")}


class Greylisting(Handler):
    """Greylisting as RFC 6647 describes it: a (client, sender, recipient) triplet seen
    for the first time is refused with 451 until ``delay`` seconds have passed since, on
    the server's own clock (``clock``: seconds, set by the test)."""

    def __init__(self, delay: float = 60.0) -> None:
        super().__init__()
        self.delay = delay
        self.clock = 0.0
        self.first_seen: dict[tuple[str, str, str], float] = {}

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        triplet = (session.peer[0], envelope.mail_from, address)
        seen = self.first_seen.setdefault(triplet, self.clock)
        if self.clock - seen < self.delay:
            return "451 4.7.1 Greylisted, please try again later"
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)


def test_greylisting_for_a_minute_defers_then_delivers_once(make_workspace) -> None:
    from sqlalchemy import select, update

    from herald.delivery import ledger
    from herald.flows.engine import run_local

    handler = Greylisting(delay=60.0)
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        ws = make_workspace(smtp_workspace(port), rows=6)
        first = run_local(ws, "promo", run_key="grey")
        assert first["deliveries"]["deferred"] == 6 and first["deliveries"]["failed"] == 0
        assert len(handler.first_seen) == 6  # one attempt each, not three within seconds
        handler.clock += 30  # half a minute on: still greylisted, but not yet due either
        again = run_local(ws, "promo", run_key="grey")
        assert again["deliveries"]["deferred"] == 6 and not handler.received

        handler.clock += 31  # the greylisting minute is over, and so is the deferral
        with ws.store.begin() as conn:
            conn.execute(update(ledger.deliveries).values(
                not_before=ledger.now() - timedelta(seconds=1)))
        last = run_local(ws, "promo", run_key="grey")
        assert last["deliveries"]["sent"] == 6 and last["deferred_until"] is None
        with ws.store.connect() as conn:
            rows = list(conn.execute(select(ledger.deliveries)))
        assert {(r.status, r.attempts) for r in rows} == {("sent", 2)}
        delivered = [m["To"] for m in handler.received]
        assert len(delivered) == len(set(delivered)) == 6
    finally:
        controller.stop()
