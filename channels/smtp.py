"""Email over SMTP: one connection reused for every message a channel instance sends.

Answers are classified per message: accepted → sent (with the server's queue id when it
gives one); a refused recipient or message with a 5xx → permanent (hard bounces such as
550/551/553 saying the address is dead, 5.1.1/5.1.2/5.1.3/5.1.6/5.1.10/5.2.1 or no
enhanced code, also go to the suppression list; one about the sender's address (5.1.7,
5.1.8), a full mailbox or a 5.7.x policy answer such as a blocklisted sending host does
not); a message over the server's SIZE (552 to MAIL FROM, RFC 1870) → permanent for it;
450/451 (greylisting and other "try later" answers) → retryable after GREYLIST_WAIT,
which defers the recipient to a later run; another 4xx → retryable; a connection
dropped or timed out before the message's data was handed over, or closed by the server
without its answer (it abandoned the transaction) → retryable, and the next message
reconnects; a timeout once the data was sent (a relay scanning content past the
client's timeout) → outcome unknown: the server is still at it and may queue it, so it
is never resent (the ledger row stays ``sending``); bad credentials, a refused sender
or a server that cannot be reached → fatal for the channel.
"""

from __future__ import annotations

import contextlib
import re
from email.errors import MessageError
from email.utils import getaddresses
from typing import Any, Literal
from urllib.parse import quote

import aiosmtplib
from aiosmtplib.response import SMTPResponse
from aiosmtplib.typing import Default
from pydantic import Field, SecretStr, StrictBool, field_validator

from herald.channels.base import Channel, ChannelSettings, Message, SendResult
from herald.channels.mime import build_email

_QUEUED = re.compile(r"queued as\s+([A-Za-z0-9._-]+)", re.IGNORECASE)
HARD_BOUNCES = frozenset({550, 551, 553})
GREYLISTING = frozenset({450, 451})  # "try again later" for a recipient or a message
GREYLIST_WAIT = 300.0  # seconds: a common MTA's first retry (Postfix's minimal backoff)


class SmtpSettings(ChannelSettings):
    host: str
    port: int = Field(default=587, ge=1, le=65535)
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: str | None = None
    password: SecretStr | None = None
    sender: str
    reply_to: str | None = None
    timeout: float = Field(default=30.0, gt=0, le=3600)  # seconds, for each SMTP step
    validate_certs: StrictBool = True  # "off" or "no" is text, not false
    # e.g. "https://shop.example/unsubscribe?m={message_id}" or "mailto:unsub@shop.example"
    list_unsubscribe: str | None = None

    @field_validator("sender", "reply_to")
    @classmethod
    def _one_address(cls, value: str | None) -> str | None:
        if value is None:
            return value
        found = getaddresses([value])
        if len(found) != 1 or "@" not in found[0][1]:
            raise ValueError("must be one address, like 'Shop <news@shop.example>'")
        return value


class _Client(aiosmtplib.SMTP):
    """aiosmtplib's client, noting when a transaction reaches DATA: past that point the
    server may have the message whatever happens to the connection."""

    data_started = False

    async def data(self, message: str | bytes, /, *, timeout: Any = Default.token
                   ) -> SMTPResponse:
        self.data_started = True
        return await super().data(message, timeout=timeout)


class SmtpChannel(Channel):
    """Send email through an SMTP server (STARTTLS, implicit TLS or plain)."""

    type_name = "smtp"
    kinds = frozenset({"email"})
    Settings = SmtpSettings
    batch_size = 50
    max_body = 10_000_000  # characters: the 10 MB most providers accept

    _client: _Client | None = None  # opened on the first message, then reused

    @property
    def _settings(self) -> SmtpSettings:
        assert isinstance(self.settings, SmtpSettings)
        return self.settings

    async def _connected(self) -> _Client:
        if self._client is not None and self._client.is_connected:
            return self._client
        s = self._settings
        client = _Client(
            hostname=s.host, port=s.port, timeout=s.timeout,
            use_tls=s.security == "tls", start_tls=s.security == "starttls",
            validate_certs=s.validate_certs, username=s.username,
            password=s.password.get_secret_value() if s.password else None)
        await client.connect()
        self._client = client
        return client

    def _headers(self, message: Message) -> dict[str, str]:
        template = self._settings.list_unsubscribe
        if not template:
            return {}
        target = template.format(recipient=quote(message.recipient, safe=""),
                                 message_id=quote(message.message_id.strip("<>"), safe=""))
        headers = {"List-Unsubscribe": f"<{target}>"}
        if target.startswith("https://"):  # RFC 8058 one-click
            headers["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        return headers

    async def send_one(self, message: Message) -> SendResult:
        # one message at a time over the channel's connection (concurrency 1)
        s = self._settings
        where = f"{s.host}:{s.port}"
        try:
            client = await self._connected()
        except aiosmtplib.SMTPAuthenticationError as exc:
            return SendResult.fatal(str(exc.code), f"authentication failed at {where} "
                                                   f"({exc.code})")
        except aiosmtplib.SMTPResponseException as exc:
            return SendResult.fatal(str(exc.code), f"{where} refused the session: "
                                                   f"{exc.code} {exc.message[:120]}")
        except (aiosmtplib.SMTPException, OSError) as exc:
            return SendResult.fatal("connect", f"cannot connect to {where}: "
                                               f"{type(exc).__name__}")
        try:
            email = build_email(message, s.sender, s.reply_to, self._headers(message))
        except (ValueError, MessageError) as exc:  # an address or header email cannot carry
            return SendResult.permanent("invalid_address", f"cannot build the message: {exc}")
        client.data_started = False
        try:
            errors, response = await client.send_message(email, recipients=[message.address])
        except aiosmtplib.SMTPRecipientsRefused as exc:
            refused = exc.recipients[0]
            return _classify(refused.code, refused.message, recipient=True)
        except aiosmtplib.SMTPSenderRefused as exc:
            if exc.code == 552:  # RFC 1870: this message is over the server's SIZE
                return SendResult.permanent("552", f"the message is too large for "
                                            f"{where}: {exc.message[:120]}")
            if exc.code >= 500:
                return SendResult.fatal(str(exc.code), f"sender refused: {exc.code} "
                                                       f"{exc.message[:120]}")
            return SendResult.retryable(str(exc.code), f"sender deferred: {exc.message[:120]}")
        except aiosmtplib.SMTPResponseException as exc:
            return _classify(exc.code, exc.message, recipient=False)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError,
                ConnectionError) as exc:
            # the next message reconnects; this one may be retried unless its data went out
            await self._drop()
            if client.data_started and isinstance(exc, aiosmtplib.SMTPTimeoutError):
                return SendResult.unknown("timeout_after_data", f"{where} took the message's "
                                          "data but gave no answer "
                                          f"({type(exc).__name__}): it may have queued it")
            return SendResult.retryable("disconnected", f"connection to {where} lost while "
                                        f"sending ({type(exc).__name__})")
        if errors:  # only one recipient: errors means it was refused
            code, text = next(iter(errors.values()))
            return _classify(code, text, recipient=True)
        match = _QUEUED.search(response)
        return SendResult.sent(provider_id=match.group(1) if match else email["Message-ID"])

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # already gone
                client.close()

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None and client.is_connected:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError):
                client.close()


def _classify(code: int, text: str, recipient: bool) -> SendResult:
    detail = f"{code} {text.strip()[:200]}"
    if code in GREYLISTING:
        # greylisting (RFC 6647) lasts minutes, not seconds: come back later (deferred)
        return SendResult.retryable(str(code), detail, GREYLIST_WAIT)
    if 400 <= code < 500:
        return SendResult.retryable(str(code), detail)
    return SendResult.permanent(str(code), detail,
                                suppress=recipient and code in HARD_BOUNCES
                                and _about_the_mailbox(text))


# RFC 3463's enhanced status code at the start of the text: class.subject.detail
_ENHANCED = re.compile(r"^\s*[245]\.(\d{1,3}\.\d{1,3})\b")
# the enhanced codes of a hard bounce that say the recipient's address is dead (IANA's
# registry): 1.1 bad mailbox, 1.2 bad destination system, 1.3 bad address syntax, 1.6
# mailbox moved without a forwarding address, 1.10 a domain that accepts no mail (RFC
# 7505), 2.1 mailbox disabled
_DEAD_ADDRESS = frozenset({"1.1", "1.2", "1.3", "1.6", "1.10", "2.1"})


def _about_the_mailbox(text: str) -> bool:
    """Whether a hard bounce says the recipient's address is dead (see _DEAD_ADDRESS),
    or says nothing finer. Anything else is not: the sender's address or domain (X.1.7,
    X.1.8: its DNS or SPF), a full mailbox or a message too long (X.2.2, X.2.3), a
    policy answer (X.7.x: the sending host is on a blocklist, relaying denied), the
    system or the network. Suppressing on those would drop the address for good, for
    every recipient such a server refuses."""
    found = _ENHANCED.match(text)
    return found is None or found.group(1) in _DEAD_ADDRESS
