"""The channel adapter interface.

A channel adapter is one class in one module. It declares what it is (``type_name``,
the message ``kinds`` it can carry, its batch size, default rate and body limit, and a
pydantic ``Settings`` model) and implements ``send_one``, which sends one message and
says how the provider answered. The base class's ``send_batch`` sends a batch through it
(``concurrency()`` at a time) and sends nothing more once an answer is fatal; an adapter
whose provider takes whole batches overrides ``send_batch`` instead (one result per
message, in order). Throttling, retries, deferral, body limits, stopping a channel for
the rest of a run, ledger bookkeeping and the contact policy live in the dispatcher
(``herald.delivery.dispatch``), never in adapters.

    class PigeonChannel(Channel):
        type_name = "pigeon"
        kinds = frozenset({"sms"})
        Settings = PigeonSettings

        async def send_one(self, message):
            ...
            return SendResult.sent(provider_id=...)
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

from sqlalchemy import Engine

from herald.core.channel_settings import KINDS, ChannelSettings, Rate, channel_kind, parse_rate

log = logging.getLogger("herald.channels")
# a throttling answer asking for this many seconds or more pauses the channel: every
# request meanwhile would only be refused (and count against the account)
PAUSE_AFTER = 30.0

__all__ = ["KINDS", "Channel", "ChannelContext", "ChannelSettings", "Message", "Outcome",
           "Rate", "SendResult", "parse_rate"]

@dataclass(frozen=True, slots=True)
class Message:
    """One rendered message to one recipient, ready for a channel."""

    recipient: str
    address: str
    kind: str
    body: str
    subject: str | None = None
    html: str | None = None
    message_id: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    meta: Mapping[str, str] = field(default_factory=dict)


class Outcome(StrEnum):
    """How a provider answered one message."""

    SENT = "sent"
    RETRYABLE = "retryable"  # try again later: throttled, greylisted, busy, timed out
    PERMANENT = "permanent"  # never for this recipient: bad address, unsubscribed, bounced
    FATAL = "fatal"  # the channel cannot work: bad credentials, banned sender
    # the message may or may not have gone out (an SMTP server that did not answer after
    # taking the message's data): never retried, the ledger row stays ``sending``
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class SendResult:
    """The outcome of one message: what happened, the provider's code and message id."""

    outcome: Outcome
    code: str | None = None
    detail: str | None = None
    provider_id: str | None = None
    retry_after: float | None = None  # seconds the provider asked us to wait (Retry-After)
    throttled: bool = False  # the provider said "too fast": the channel's rate slows down
    suppress: bool = False  # add the address to the suppression list (unsubscribe, bounce)
    segments: int | None = None  # provider units the message cost (SMS parts)

    @classmethod
    def sent(cls, provider_id: str | None = None, segments: int | None = None) -> SendResult:
        return cls(Outcome.SENT, provider_id=provider_id, segments=segments)

    @classmethod
    def retryable(cls, code: str | None, detail: str, retry_after: float | None = None,
                  throttled: bool = False) -> SendResult:
        return cls(Outcome.RETRYABLE, code=code, detail=detail, retry_after=retry_after,
                   throttled=throttled)

    @classmethod
    def held_back(cls, by: SendResult, seconds: float) -> SendResult:
        """A message not sent because throttling answer ``by`` paused its channel for
        ``seconds`` more (the provider asked for a long wait): retryable after them."""
        return cls(Outcome.RETRYABLE, code=by.code, retry_after=seconds,
                   detail=f"not sent: the provider asked the channel to wait ({by.detail})")

    @classmethod
    def permanent(cls, code: str | None, detail: str, suppress: bool = False) -> SendResult:
        return cls(Outcome.PERMANENT, code=code, detail=detail, suppress=suppress)

    @classmethod
    def unexpected(cls, response: Any, expected: str) -> SendResult:
        """An answer that is neither the provider's documented success nor one of its
        errors (an HTML page from a proxy, JSON without the success field): failed,
        never recorded sent, and not retried, since the provider may have sent it."""
        kind = str(response.headers.get("content-type") or "no content type").split(";")[0]
        return cls(Outcome.PERMANENT, code="unexpected_answer",
                   detail=f"HTTP {response.status_code} ({kind}) without {expected}; "
                          "outcome unknown, not retried")

    @classmethod
    def fatal(cls, code: str | None, detail: str) -> SendResult:
        return cls(Outcome.FATAL, code=code, detail=detail)

    @classmethod
    def unknown(cls, code: str | None, detail: str) -> SendResult:
        return cls(Outcome.UNKNOWN, code=code, detail=detail)


@dataclass(frozen=True, slots=True)
class ChannelContext:
    """Where a channel runs: the workspace, and which flow run it sends for."""

    workspace: Path
    flow: str
    run_key: str
    run_id: str
    # the workspace database, for state a channel shares across workers and runs (an
    # access token); a channel never reaches into the engine for it
    store: Engine | None = None
    # the HTTP transport of HTTP channels (an httpx.AsyncBaseTransport); None: the real
    # one. Unit tests inject httpx.MockTransport here.
    transport: Any = None


class Channel(ABC):
    """Base class of every channel adapter. Use it as an async context manager."""

    type_name: ClassVar[str]
    kinds: ClassVar[frozenset[str]]
    Settings: ClassVar[type[ChannelSettings]] = ChannelSettings
    batch_size: ClassVar[int] = 100
    default_rate: ClassVar[float | None] = None  # messages per second; None: unlimited
    max_body: ClassVar[int | None] = None  # characters

    def __init__(self, name: str, settings: ChannelSettings, context: ChannelContext) -> None:
        self.name = name
        self.settings = settings
        self.context = context
        # a throttling answer that asked for a long wait (429 with Retry-After: 120):
        # until then this channel sends nothing, its messages deferred without a request
        self._paused_until = 0.0
        self._paused_by: SendResult | None = None

    @property
    def kind(self) -> str:
        """The kind of message this configured channel carries (decided once, by
        ``herald.core.spec.channel_kind``, when the workspace is loaded)."""
        return channel_kind(self.name, self.settings, self.kinds) or self.name

    def concurrency(self) -> int:
        """How many messages of a batch ``send_batch`` has in flight at once."""
        return 1

    async def send_one(self, message: Message) -> SendResult:
        """Send one message and say how the provider answered."""
        raise NotImplementedError(f"{type(self).__name__} implements neither send_one "
                                  "nor send_batch")

    async def send_batch(self, messages: Sequence[Message]) -> list[SendResult]:
        """Send ``messages``; return one result per message, in the same order.

        Once an answer is fatal (the channel cannot work: bad credentials, a banned
        sender), the messages not yet handed over are not sent and share its reason. An
        exception while sending one message is that message's failure (outcome unknown,
        not retried), never the batch's.
        """
        # A fixed pool of ``concurrency()`` workers taking the next message in turn: a
        # task per message and a semaphore cost a tenth of an HTTP request each.
        results: list[SendResult | None] = [None] * len(messages)
        turns = iter(range(len(messages)))
        fatal: list[SendResult] = []

        async def worker() -> None:
            for i in turns:
                if fatal:
                    results[i] = SendResult.fatal(fatal[0].code, "not sent: the channel "
                                                  f"stopped: {fatal[0].detail}")
                    continue
                held = self.held()
                if held is not None:
                    results[i] = SendResult.held_back(*held)
                    continue
                try:
                    result = await self.send_one(messages[i])
                except Exception as exc:  # noqa: BLE001 - one message's failure, not the batch's
                    log.exception("channel %s raised while sending one message", self.name)
                    result = SendResult.permanent("adapter_error", f"adapter raised "
                                                  f"{type(exc).__name__}; outcome unknown, "
                                                  "not retried")
                if result.outcome is Outcome.FATAL:
                    fatal.append(result)
                elif result.throttled and (result.retry_after or 0) >= PAUSE_AFTER:
                    self.pause(result, result.retry_after or 0)
                results[i] = result

        workers = min(self.concurrency(), len(messages))
        if workers == 1:
            await worker()
        else:
            await asyncio.gather(*(worker() for _ in range(workers)))
        return [r for r in results if r is not None]

    def pause(self, by: SendResult, seconds: float) -> None:
        """Send nothing for ``seconds``: each message meanwhile is held back (retryable
        after the wait) without a request. ``by`` is the throttling answer that asked for
        the wait, this instance's or, through the channel's shared rate limit, another
        process's (herald.delivery.ratelimit)."""
        until = time.monotonic() + seconds
        if until > self._paused_until:
            self._paused_until, self._paused_by = until, by

    def held(self) -> tuple[SendResult, float] | None:
        """The pause in force: the answer that asked for it and the seconds left."""
        left = self._paused_until - time.monotonic()
        return (self._paused_by, left) if left > 0 and self._paused_by is not None else None

    async def aclose(self) -> None:
        """Release connections. Safe to call more than once."""
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
