"""What every HTTP channel shares: one connection pool (or the transport its context
injects: tests pass ``httpx.MockTransport``), a bound on requests in flight, the mapping
of transport failures, Retry-After, and the classification of plain HTTP answers.

A subclass implements ``request`` (one message, one ``SendResult``); timeouts and
dropped connections become retryable results here.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from pydantic import Field

from herald.channels.base import (
    Channel,
    ChannelContext,
    ChannelSettings,
    Message,
    SendResult,
)


class HttpSettings(ChannelSettings):
    timeout: float = Field(default=10.0, gt=0)  # seconds, for each request
    concurrency: int = Field(default=16, ge=1, le=1000)  # requests in flight per chunk


class HttpChannel(Channel):
    """Base class of the channels that talk HTTP to a provider."""

    Settings = HttpSettings

    def __init__(self, name: str, settings: ChannelSettings, context: ChannelContext) -> None:
        super().__init__(name, settings, context)
        assert isinstance(settings, HttpSettings)
        self.http = settings
        self._client: httpx.AsyncClient | None = None
        self._transport: httpx.AsyncBaseTransport | None = None

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(transport=self.transport(),
                                             timeout=self.http.timeout)
        return self._client

    def transport(self) -> httpx.AsyncBaseTransport:
        """The context's transport (tests inject ``httpx.MockTransport``), else httpx's
        API over aiohttp's connection pool: httpx's default transport sent a tenth as
        many requests a second (BENCHMARKS.md, http)."""
        if self._transport is None:
            if self.context.transport is not None:
                self._transport = self.context.transport
            else:
                from httpx_aiohttp import AiohttpTransport

                self._transport = AiohttpTransport()
        return self._transport

    def concurrency(self) -> int:
        return self.http.concurrency

    @abstractmethod
    async def request(self, message: Message) -> SendResult:
        """Send one message as the provider's request and classify its answer; transport
        failures may propagate as httpx errors (``send_one`` maps them)."""

    async def send_one(self, message: Message) -> SendResult:
        try:
            return await self.request(message)
        except httpx.TimeoutException:
            return SendResult.retryable("timeout", f"no answer within {self.http.timeout:g} s")
        except (httpx.UnsupportedProtocol, httpx.InvalidURL):
            return SendResult.permanent("bad_url", "not an http(s) URL")
        except httpx.TransportError as exc:
            return SendResult.retryable("connection", "connection failed: "
                                        f"{type(exc).__name__}")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()  # closes its transport too
        elif self._transport is not None:  # used without a client (the webhook channel)
            await self._transport.aclose()
        self._client, self._transport = None, None


def json_body(response: httpx.Response) -> dict[str, Any]:
    """The answer's JSON object, or {} when it is not one."""
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def classify(response: httpx.Response, message_id: str) -> SendResult:
    """One HTTP answer as a SendResult (see the module's table)."""
    status = response.status_code
    code = str(status)
    if 200 <= status < 300:
        provider_id = message_id
        try:
            data = response.json()
            if isinstance(data, dict) and data.get("id"):
                provider_id = str(data["id"])
        except ValueError:
            pass
        return SendResult.sent(provider_id=provider_id)
    detail = f"HTTP {status} {response.reason_phrase}".strip()
    if status in (408, 425, 429) or status >= 500:
        return SendResult.retryable(code, detail, retry_after(response.headers.get(
            "Retry-After")), throttled=status == 429)
    if status in (401, 403):
        return SendResult.fatal(code, f"{detail}: the endpoint refused the channel's "
                                      "credentials")
    if status == 410:
        return SendResult.permanent(code, f"{detail}: the endpoint is gone", suppress=True)
    return SendResult.permanent(code, detail)
