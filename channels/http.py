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


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx's transport interface over one aiohttp connection pool, each request under
    a deadline: connecting, sending and reading the whole answer within ``seconds``
    (httpx's own timeouts are per read, so a peer trickling a byte a second never trips
    them). The answer comes back read: an ``httpx.Response`` that holds its body.

    ``send`` is the same exchange without an ``httpx.Request`` built first, the HTTP
    channels' hot path (``HttpChannel.exchange``): httpx's request and stream models
    cost about as much as aiohttp's whole request (BENCHMARKS.md, http).
    """

    def __init__(self, seconds: float, connections: int = 100) -> None:
        self.seconds = seconds
        self.connections = connections
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # httpx's certificate bundle (certifi), as httpx's own transport verifies
            connector = aiohttp.TCPConnector(limit=self.connections,
                                             ssl=httpx.create_ssl_context())
            # httpx decodes Content-Encoding itself: the body is handed over as it came
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False,
                # connecting has its own limit, a little inside the request's, so a
                # request that never left is told from one whose answer was lost
                timeout=aiohttp.ClientTimeout(total=self.seconds,
                                              connect=self.seconds * 0.9))
        return self._session

    async def send(self, method: str, url: str, headers: Any, content: bytes | None,
                   request: httpx.Request | None = None) -> httpx.Response:
        """One request and its whole answer; failures raised as httpx's exceptions."""
        try:
            async with self.session().request(method, url, headers=headers, data=content,
                                              allow_redirects=False) as answer:
                body = await answer.read()
        except aiohttp.ConnectionTimeoutError:  # no connection: nothing was sent
            raise httpx.ConnectTimeout(f"no connection within {self.seconds:g} s",
                                       request=request) from None
        except TimeoutError:  # aiohttp's total timeout: the request's deadline
            raise httpx.ReadTimeout(f"no complete answer within {self.seconds:g} s",
                                    request=request) from None
        except aiohttp.ClientResponseError as exc:  # not HTTP: a bad status line
            raise MalformedAnswer(f"malformed HTTP answer ({type(exc).__name__})",
                                  request=request) from None
        except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
            raise httpx.UnsupportedProtocol(f"not an http(s) URL: {exc}",
                                            request=request) from None
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc), request=request) from None
        except aiohttp.ClientError as exc:  # reset, dropped, a body cut short
            raise httpx.ReadError(f"{type(exc).__name__}: {exc}", request=request) from None
        extensions = {"http_version": b"HTTP/1.1"}
        if answer.reason:
            extensions["reason_phrase"] = answer.reason.encode()
        response = _read_answer(answer.status, answer.raw_headers, body, extensions,
                                encoded=answer.headers.get("Content-Encoding", "identity"))
        if request is not None:
            response.request = request
        return response

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        content = await request.aread()
        return await self.send(request.method, str(request.url),
                               request.headers.multi_items(), content or None, request)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _read_answer(status: int, headers: Any, body: bytes, extensions: dict[str, Any], *,
                 encoded: str) -> httpx.Response:
    """An ``httpx.Response`` holding a whole answer. ``Response(content=...)`` passes the
    body through httpx's decoders and chunker even when there is nothing to decode, 9 of
    the 11 µs the response costs (BENCHMARKS.md, http); an answer without a
    Content-Encoding is handed over as it is, read and closed as httpx leaves it."""
    if encoded.strip().lower() not in ("", "identity"):  # gzip, deflate, br: decoded
        return httpx.Response(status, headers=headers, content=body, extensions=extensions)
    response = httpx.Response(status, headers=headers, stream=httpx.ByteStream(body),
                              extensions=extensions)
    response._content = body  # what Response.read() stores; nothing left to read
    response.is_stream_consumed = response.is_closed = True
    return response


class DeadlineTransport(httpx.AsyncBaseTransport):
    """An injected transport (tests' ``httpx.MockTransport``) under the deadline
    ``AiohttpTransport`` keeps: connecting, sending and reading the whole answer."""

    def __init__(self, inner: httpx.AsyncBaseTransport, seconds: float) -> None:
        self.inner = inner
        self.seconds = seconds

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            async with asyncio.timeout(self.seconds):
                response = await self.inner.handle_async_request(request)
                await response.aread()
        except TimeoutError:
            raise httpx.ReadTimeout(f"no complete answer within {self.seconds:g} s",
                                    request=request) from None
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


# why a lost answer is not retried where the provider takes no idempotency key
MAYBE_SENT = ("the provider may have taken the message (its API takes no idempotency key), "
              "so it is not resent")
# answers after which such a provider may have taken the message all the same: an
# internal error, or a gateway's (502, 504) in front of it, which may have passed the
# request on before failing; 503 (not available) and 429 say it was not taken
MAYBE_TAKEN = frozenset({500, 502, 504})


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
                self._transport = DeadlineTransport(self.context.transport,
                                                    self.http.timeout)
            else:
                self._transport = AiohttpTransport(self.http.timeout,
                                                   max(100, self.http.concurrency))
        return self._transport

    async def exchange(self, method: str, url: str, content: bytes,
                       headers: dict[str, str]) -> httpx.Response:
        """One request and its whole answer, without httpx's client layer (redirects,
        cookies, auth), nor, over the real transport, an ``httpx.Request``: the
        response then has no ``request``. Transport failures raise httpx's errors."""
        transport = self.transport()
        if isinstance(transport, AiohttpTransport):
            return await transport.send(method, url, headers, content)
        return await transport.handle_async_request(
            httpx.Request(method, url, content=content, headers=headers))

    def concurrency(self) -> int:
        return self.http.concurrency

    def resends_safely(self) -> bool:
        """Whether a request whose answer was lost may be sent again: only to an API that
        drops a repeat by its idempotency key (the webhook's and the generic gateway's
        ``Idempotency-Key``). Twilio's, Aliyun's and WeChat's take none, and a message
        whose request timed out or was cut off after it was sent may have gone out."""
        return False

    @abstractmethod
    async def request(self, message: Message) -> SendResult:
        """Send one message as the provider's request and classify its answer; transport
        failures may propagate as httpx errors (``send_one`` maps them)."""

    async def send_one(self, message: Message) -> SendResult:
        try:
            return await self.request(message)
        except (httpx.ConnectTimeout, httpx.ConnectError) as exc:  # nothing was sent
            return SendResult.retryable("connection", "could not connect: "
                                        f"{type(exc).__name__}")
        except httpx.TimeoutException:
            detail = f"no complete answer within {self.http.timeout:g} s"
            if self.resends_safely():
                return SendResult.retryable("timeout", detail)
            return SendResult.unknown("timeout", f"{detail}: {MAYBE_SENT}")
        except (httpx.UnsupportedProtocol, httpx.InvalidURL):
            return SendResult.permanent("bad_url", "not an http(s) URL")
        except MalformedAnswer as exc:
            return SendResult.permanent("unexpected_answer", f"{exc}; outcome unknown, "
                                        "not retried")
        except httpx.TransportError as exc:
            detail = f"connection lost before the answer: {type(exc).__name__}"
            if self.resends_safely():
                return SendResult.retryable("connection", detail)
            return SendResult.unknown("connection", f"{detail}: {MAYBE_SENT}")

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


def classify(response: httpx.Response, message_id: str, *, resends_safely: bool,
             own_endpoint: bool = False) -> SendResult:
    """One HTTP answer as a SendResult (the webhook channel's table). ``resends_safely``:
    the request carried an Idempotency-Key the endpoint drops repeats by (else a 500,
    502 or 504 may have let the message through, and it is not resent);
    ``own_endpoint``: the URL is the recipient's own, not the channel's (a refusal of
    credentials is then about that recipient's endpoint, not about every message)."""
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
    if status in MAYBE_TAKEN and not resends_safely:
        return SendResult.unknown(code, f"{detail}: {MAYBE_SENT}")
    if status in (408, 425, 429) or status >= 500:
        return SendResult.retryable(code, detail, retry_after(response.headers.get(
            "Retry-After")), throttled=status == 429)
    if status == 409 and resends_safely:
        # the Idempotency-Key draft's answer to a repeat of a request still being
        # processed (a retry after a timeout): the first may well go through
        return SendResult.unknown(code, f"{detail}: the endpoint is still processing an "
                                  "earlier request with this Idempotency-Key, so the "
                                  "message is not resent")
    if status in (401, 403):
        if own_endpoint:  # one recipient's endpoint: the others' are not its
            return SendResult.permanent(code, f"{detail}: the recipient's endpoint refused "
                                              "the request")
        return SendResult.fatal(code, f"{detail}: the endpoint refused the channel's "
                                      "credentials")
    if status == 410:  # the webhook's contract: this recipient's address is gone
        return SendResult.permanent(code, f"{detail}: the endpoint is gone", suppress=True)
    return SendResult.permanent(code, detail)
