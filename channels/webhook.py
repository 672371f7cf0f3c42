"""The webhook channel: each message as a signed JSON POST.

The endpoint is ``url`` from the YAML (one endpoint for every recipient, e.g. a team's
own delivery service) or, without it, each recipient's own address (the ``webhook_url``
column). The body is the rendered message; the headers carry an HMAC-SHA256 signature
of ``timestamp.body`` under the channel's secret and an ``Idempotency-Key`` (the message
id), so a receiver can check where a message came from and drop a retried duplicate.

How an answer is classified:

===============================  ==========================================
2xx                              sent (a JSON ``id`` becomes the provider id)
429, 408, 425, 5xx               retryable (``Retry-After`` honoured)
timeout, connection reset/drop   retryable (the Idempotency-Key covers a
                                 request that did arrive)
409 Conflict                     outcome unknown, not resent: the receiver is
                                 still processing a request with this
                                 Idempotency-Key (a retry after a timeout)
401, 403                         the channel's ``url``: fatal (its credentials
                                 are refused); a recipient's own URL: permanent
                                 for that recipient
410 Gone                         permanent, and the address is suppressed
other 4xx                        permanent for this recipient
===============================  ==========================================

A recipient's own URL (no ``url`` in the YAML) must reach a public address: one whose
host is, or resolves to, a loopback, link-local (cloud metadata), private, shared,
multicast or reserved address fails that recipient (``address_not_allowed``) unless the
channel sets ``allow_private_addresses: true``. The channel's own ``url`` is the
operator's choice and is not checked.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import time
from typing import Any

import httpx
import orjson
from pydantic import Field, SecretStr, StrictBool, field_validator

from herald.channels.base import ChannelContext, ChannelSettings, Message, SendResult
from herald.channels.http import HttpChannel, HttpSettings, classify

SIGNATURE_HEADER = "X-Herald-Signature"
TIMESTAMP_HEADER = "X-Herald-Timestamp"


class WebhookSettings(HttpSettings):
    url: str | None = None  # one endpoint for all; default: each recipient's address
    secret: SecretStr | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    concurrency: int = Field(default=32, ge=1, le=1000)
    # recipients' own URLs may point inside the network (loopback, 10/8, 169.254/16...)
    allow_private_addresses: StrictBool = False  # "on" or "yes" is text, not true

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return value


async def _private_target(url: str) -> str | None:
    """Why ``url`` may not be called (its host is or resolves to an internal address),
    or None. A host that does not resolve is left to the request to fail."""
    try:
        host = httpx.URL(url).host
    except (httpx.InvalidURL, TypeError, ValueError):
        return None  # the request fails as bad_url
    if not host:
        return None
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, None)
        except OSError:
            return None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    for address in addresses:
        if not address.is_global or address.is_multicast:
            return (f"the URL's host {host} is a non-public address ({address}); set "
                    "allow_private_addresses: true on the channel to allow it")
    return None


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC of ``timestamp.body``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={digest.hexdigest()}"


class WebhookChannel(HttpChannel):
    """Signed JSON POSTs, ``concurrency`` at a time, over one connection pool."""

    type_name = "webhook"
    kinds = frozenset({"webhook"})
    Settings = WebhookSettings
    batch_size = 200
    max_body = 1_000_000  # characters of a JSON body

    def __init__(self, name: str, settings: ChannelSettings, context: ChannelContext) -> None:
        super().__init__(name, settings, context)
        assert isinstance(settings, WebhookSettings)
        self.options = settings

    def resends_safely(self) -> bool:
        return True  # the receiver drops a repeat by its Idempotency-Key

    async def request(self, message: Message) -> SendResult:
        return await self._post(message)

    async def _post(self, message: Message) -> SendResult:
        url = self.options.url or message.address
        if not self.options.url and not self.options.allow_private_addresses:
            refused = await _private_target(url)
            if refused:
                return SendResult.permanent("address_not_allowed", refused)
        body = orjson.dumps(self.payload(message))
        timestamp = str(int(time.time()))
        headers = {**self.options.headers, "User-Agent": "herald-webhook",
                   "Content-Type": "application/json", "Idempotency-Key": message.message_id,
                   TIMESTAMP_HEADER: timestamp}
        if self.options.secret is not None:
            headers[SIGNATURE_HEADER] = sign(self.options.secret.get_secret_value(),
                                             timestamp, body)
        response = await self.exchange("POST", url, body, headers)
        return classify(response, message.message_id, resends_safely=True,
                        own_endpoint=not self.options.url)

    def payload(self, message: Message) -> dict[str, Any]:
        return {"message_id": message.message_id, "recipient": message.recipient,
                "address": message.address, "kind": message.kind,
                "subject": message.subject, "body": message.body, "html": message.html,
                "meta": dict(message.meta)}

