"""What every HTTP channel shares: one connection pool (or the transport its context
injects: tests pass ``httpx.MockTransport``), a bound on requests in flight, the mapping
of transport failures, Retry-After, and the classification of plain HTTP answers.

A subclass implements ``request`` (one message, one ``SendResult``); timeouts and
dropped connections become retryable results here. ``timeout`` is a deadline for the
whole request (connecting, sending, the full answer), not for each read: a provider
trickling its answer a byte at a time is cut off at it. An answer that is not HTTP (a
bad status line from a load balancer) fails that one message as ``unexpected_answer``.
"""

from __future__ import annotations

import asyncio
import time
from abc import abstractmethod
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar

import aiohttp
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
    timeout: float = Field(default=10.0, gt=0, le=3600)  # seconds: a deadline per request
    concurrency: int = Field(default=16, ge=1, le=1000)  # requests in flight per chunk


class MalformedAnswer(httpx.RemoteProtocolError):
    """The peer answered with something that is not HTTP (a bad status line)."""


class DeadlineTransport(httpx.AsyncBaseTransport):
    """A transport whose requests each have a deadline: connecting, sending and reading
    the whole answer within ``seconds`` (httpx's own timeouts are per read, so a peer
    trickling a byte a second never trips them)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, seconds: float) -> None:
        self.inner = inner
        self.seconds = seconds

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        deadline = asyncio.get_running_loop().time() + self.seconds
        with _mapped(request, self.seconds):
            async with asyncio.timeout_at(deadline):
                response = await self.inner.handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(response.status_code, headers=response.headers,
                              stream=_DeadlineStream(response.stream, deadline, request,
                                                     self.seconds),
                              request=request, extensions=response.extensions)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _DeadlineStream(httpx.AsyncByteStream):
    def __init__(self, stream: httpx.AsyncByteStream, deadline: float,
                 request: httpx.Request, seconds: float) -> None:
        self.stream, self.deadline, self.request, self.seconds = (stream, deadline, request,
                                                                  seconds)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunks = self.stream.__aiter__()
        while True:
            try:
                with _mapped(self.request, self.seconds):
                    async with asyncio.timeout_at(self.deadline):
                        try:
                            chunk = await chunks.__anext__()
                        except StopAsyncIteration:
                            return
            except BaseException:
                await self.stream.aclose()  # give the connection back, whatever happened
                raise
            yield chunk

    async def aclose(self) -> None:
        await self.stream.aclose()


@contextmanager
def _mapped(request: httpx.Request, seconds: float) -> Iterator[None]:
    try:
        yield
    except TimeoutError:
        raise httpx.ReadTimeout(f"no complete answer within {seconds:g} s",
                                request=request) from None
    except aiohttp.ClientResponseError as exc:  # httpx_aiohttp passes it on unmapped
        raise MalformedAnswer(f"malformed HTTP answer ({type(exc).__name__})",
                              request=request) from None


class HttpChannel(Channel):
    """Base class of the channels that talk HTTP to a provider."""

    Settings: ClassVar[type[ChannelSettings]] = HttpSettings

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
                inner = self.context.transport
            else:
                from httpx_aiohttp import AiohttpTransport

                inner = AiohttpTransport()
            self._transport = DeadlineTransport(inner, self.http.timeout)
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
            return SendResult.retryable("timeout", "no complete answer within "
                                        f"{self.http.timeout:g} s")
        except (httpx.UnsupportedProtocol, httpx.InvalidURL):
            return SendResult.permanent("bad_url", "not an http(s) URL")
        except MalformedAnswer as exc:
            return SendResult.permanent("unexpected_answer", f"{exc}; outcome unknown, "
                                        "not retried")
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


_CODE_FIELDS = ("code", "error_code", "errcode", "errorCode", "Code", "status_code")
_MESSAGE_FIELDS = ("message", "error_description", "errmsg", "errorMessage", "Message",
                   "detail", "description", "error", "msg")
MAX_PROVIDER_TEXT = 200  # characters of a provider's message kept in the ledger


def provider_error(response: httpx.Response) -> tuple[str | None, str | None]:
    """A provider's own error code and message from an error answer's body: JSON in the
    common shapes (``{"code", "message"}``, ``{"error": {"code", "message"}}``,
    ``{"errors": [{...}]}``, ``{"error": "...", "error_description": "..."}``,
    ``{"errcode", "errmsg"}``), else the first line of a short plain-text body."""
    body: Any = json_body(response)
    if not body:
        kind = str(response.headers.get("content-type") or "")
        text = response.text.strip() if kind.startswith("text/plain") else ""
        return None, (text.splitlines()[0][:MAX_PROVIDER_TEXT] if text else None)
    for nested in ("error", "errors"):
        inner = body.get(nested)
        if isinstance(inner, list) and inner and isinstance(inner[0], dict):
            body = {**body, **inner[0]}
        elif isinstance(inner, dict):
            body = {**body, **inner}
    code = next((body[f] for f in _CODE_FIELDS if isinstance(body.get(f), str | int)
                 and not isinstance(body.get(f), bool) and str(body[f]).strip()), None)
    message = next((body[f] for f in _MESSAGE_FIELDS if isinstance(body.get(f), str)
                    and body[f].strip()), None)
    return (str(code).strip()[:64] if code is not None else None,
            " ".join(message.split())[:MAX_PROVIDER_TEXT] if message else None)


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
    own_code, own_message = provider_error(response)
    if own_code or own_message:  # the provider's own words, which an operator can act on
        code = own_code or code
        detail += ": " + ": ".join(x for x in (own_code, own_message) if x)
    if status in (408, 425, 429) or status >= 500:
        return SendResult.retryable(code, detail, retry_after(response.headers.get(
            "Retry-After")), throttled=status == 429)
    if status in (401, 403):
        return SendResult.fatal(code, f"{detail}: the endpoint refused the channel's "
                                      "credentials")
    if status == 410:
        return SendResult.permanent(code, f"{detail}: the endpoint is gone", suppress=True)
    return SendResult.permanent(code, detail)
