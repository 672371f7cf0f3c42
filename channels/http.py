"""What every HTTP channel shares: one connection pool, a bound on requests in flight, the
mapping of transport failures, and stopping at the first fatal answer.

A subclass implements ``send_one`` (one message, one ``SendResult``); timeouts and
dropped connections become retryable results here, and once an answer is fatal the rest
of the batch is not sent.
"""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import httpx
from pydantic import Field

from herald.channels.base import (
    Channel,
    ChannelContext,
    ChannelSettings,
    Message,
    Outcome,
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
        self._stopped: SendResult | None = None  # a fatal answer: send nothing more

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            # httpx's API over aiohttp's connection pool: httpx's default transport sent
            # a tenth as many requests a second (BENCHMARKS.md, http).
            from httpx_aiohttp import AiohttpTransport

            self._client = httpx.AsyncClient(transport=AiohttpTransport(),
                                             timeout=self.http.timeout)
        return self._client

    @abstractmethod
    async def send_one(self, message: Message) -> SendResult:
        """Send one message; transport failures may propagate as httpx errors."""

    async def send_batch(self, messages: Sequence[Message]) -> list[SendResult]:
        gate = asyncio.Semaphore(self.http.concurrency)

        async def one(message: Message) -> SendResult:
            async with gate:
                if self._stopped is not None:
                    return SendResult.fatal(self._stopped.code, "not sent: the channel "
                                            f"stopped: {self._stopped.detail}")
                try:
                    result = await self.send_one(message)
                except httpx.TimeoutException:
                    result = SendResult.retryable("timeout", "no answer within "
                                                  f"{self.http.timeout:g} s")
                except (httpx.UnsupportedProtocol, httpx.InvalidURL):
                    result = SendResult.permanent("bad_url", "not an http(s) URL")
                except httpx.TransportError as exc:
                    result = SendResult.retryable("connection", "connection failed: "
                                                  f"{type(exc).__name__}")
                if result.outcome is Outcome.FATAL:
                    self._stopped = result
                return result

        return list(await asyncio.gather(*(one(m) for m in messages)))

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def json_body(response: httpx.Response) -> dict[str, Any]:
    """The answer's JSON object, or {} when it is not one."""
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
